"""finsent: financial sentiment monitoring pipeline (ingest -> store -> score -> detect -> notify)."""

__version__ = "0.1.0"
