"""The `finsent` command line: every stage is usable without Airflow."""

from __future__ import annotations

import logging
import os
import sys

import typer

from pipeline.commands import alerts, core, models, web

app = typer.Typer(help="finsent: financial sentiment monitoring.", no_args_is_help=True, pretty_exceptions_enable=False)
core.register(app)
models.register(app)
alerts.register(app)
web.register(app)


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=os.environ.get("FINSENT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "httpx", "httpcore", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
