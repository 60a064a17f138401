"""`finsent serve`: the web app over DATABASE_URL (or the demo's SQLite file)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from pipeline.commands.core import err_console, fail

log = logging.getLogger("finsent")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def resolve_database_url(database_url: str | None, config: Path | None) -> str:
    """--database-url, else DATABASE_URL / the config's database_url (one source of truth: the config)."""
    if database_url:
        return database_url
    from pipeline.commands.core import config_or_exit

    return config_or_exit(config).database_url.get_secret_value()


def serve(
    host: Annotated[
        str, typer.Option(help="Address to bind. Non-loopback needs FINSENT_WEB_TOKEN or FINSENT_WEB_AUTH_HEADER.")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(min=1, max=65535)] = DEFAULT_PORT,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="e.g. sqlite:///finsent-demo.db (default: DATABASE_URL).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", envvar="FINSENT_CONFIG", help="YAML config (for database_url).")
    ] = None,
) -> None:
    """Serve the web app: overview, company pages, alerts (acknowledge), document search (label)."""
    import uvicorn

    from pipeline import store
    from pipeline.web.app import create_app
    from pipeline.web.security import Access, AccessError, check_bind

    access = Access.from_env()
    try:
        check_bind(host, access)
    except AccessError as e:
        raise fail(str(e)) from None
    url = resolve_database_url(database_url, config)
    try:
        engine = store.make_engine(url)
        store.check_schema(engine)
    except store.StoreError as e:
        raise fail(str(e), code=1) from None
    app = create_app(engine, access)
    err_console.print(
        f"finsent web on {serve_url(host, port)} (database {store.safe_url(url)}); Ctrl-C stops it", highlight=False
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False, proxy_headers=False)
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}", code=1) from None
    finally:
        engine.dispose()


def register(app: typer.Typer) -> None:
    app.command()(serve)
