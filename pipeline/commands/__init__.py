"""CLI command groups; each module exposes `register(app)` so stages own their commands."""
