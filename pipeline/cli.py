"""The `finsent` command line: every stage is usable without Airflow.

One error handler for every command: an expected failure (`FinsentError`, storage failures included)
prints one line and exits 1 (2 for usage or config); `finsent --debug ...` also prints the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from pipeline.commands import alerts, core, documents, models, web
from pipeline.errors import FinsentError


class _Handled(TyperGroup):
    """The root group: turns a FinsentError raised by any subcommand into its one-line message and exit code."""

    def invoke(self, ctx: Any) -> Any:  # typer's (vendored) click Context
        try:
            return super().invoke(ctx)
        except FinsentError as e:
            if ctx.params.get("debug"):
                traceback.print_exc(file=sys.stderr)
            core.err_console.print(f"[bold red]error:[/] {core.escape(str(e))}", highlight=False)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    cls=_Handled, help="finsent: financial sentiment monitoring.", no_args_is_help=True, pretty_exceptions_enable=False
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an expected failure too.")] = False,
) -> None:
    """finsent: financial sentiment monitoring."""


core.register(app)
models.register(app)
alerts.register(app)
documents.register(app)
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
