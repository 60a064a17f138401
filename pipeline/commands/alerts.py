"""Placeholder: filled by the stage that owns these commands."""

import typer


def register(app: typer.Typer) -> None:
    return None
