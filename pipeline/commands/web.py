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
        Path | None, typer.Option("--config", "-c", envvar="FINSENT_CONFIG", help="YAML config (database_url, links).")
    ] = None,
) -> None:
    """Serve the web app: overview, company pages, alerts (acknowledge), document search (label)."""
    import uvicorn

    from pipeline import store
    from pipeline.commands.core import config_or_exit
    from pipeline.web.app import create_app
    from pipeline.web.security import Access, AccessError, check_bind

    cfg = config_or_exit(config)
    access = Access.from_env(links=cfg.links)  # the env vars the notifier signs with: one setting, the config's
    try:
        check_bind(host, access)
    except AccessError as e:
        raise fail(str(e)) from None
    url = database_url or cfg.database_url.get_secret_value()
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


export_app = typer.Typer(help="Export hourly series or scored documents to CSV or Parquet.", no_args_is_help=True)
ScopeOpt = Annotated[
    str, typer.Option(help="market, or KIND:VALUE with KIND entity, source or topic (e.g. entity:NWB).")
]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Output file: .csv or .parquet.")]
StartOpt = Annotated[str, typer.Option(help="Start (inclusive), ISO 8601 UTC, e.g. 2026-11-13 or 2026-11-13T00:00Z.")]
EndOpt = Annotated[str, typer.Option(help="End (exclusive), ISO 8601 UTC.")]
DbOpt = Annotated[str | None, typer.Option("--database-url", help="Default: DATABASE_URL / the config's database_url.")]
CfgOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="FINSENT_CONFIG", help="YAML config.")]


def _scope(scope: str) -> tuple[str, str]:
    from pipeline.export import SCOPE_KINDS

    kind, _, value = scope.partition(":")
    if kind not in SCOPE_KINDS or (kind != "market" and not value):
        raise fail(f"--scope {scope!r}: expected market or KIND:VALUE with KIND one of entity, source, topic")
    return kind, value or "*"


def _time(value: str, name: str):
    from pipeline.commands.core import parse_time

    try:
        return parse_time(value)
    except typer.Exit:
        raise fail(f"--{name} {value!r}: expected an ISO 8601 date or time such as 2026-11-20T15:00Z") from None


def _run_export(database_url: str | None, config: Path | None, output: Path, job) -> None:
    from pipeline import store
    from pipeline.export import ExportError, output_format

    try:
        output_format(output)
    except ExportError as e:
        raise fail(str(e)) from None
    url = resolve_database_url(database_url, config)
    try:
        engine = store.make_engine(url)
        store.check_schema(engine)
        n = job(engine)
    except ExportError as e:
        raise fail(str(e)) from None
    except store.StoreError as e:
        raise fail(str(e), code=1) from None
    err_console.print(f"wrote {n} rows to {output}", highlight=False)


@export_app.command("series")
def export_series(
    output: OutOpt,
    start: StartOpt,
    end: EndOpt,
    scope: ScopeOpt = "market",
    database_url: DbOpt = None,
    config: CfgOpt = None,
) -> None:
    """A scope's hourly series (counts, negatives, sum and mean p_negative), one row per hour, zeros included."""
    from pipeline.export import SERIES_COLUMNS, hourly_series, write_frames
    from pipeline.store import session_scope

    kind, value = _scope(scope)
    t0, t1 = _time(start, "start"), _time(end, "end")

    def job(engine) -> int:
        with session_scope(engine) as session:
            df = hourly_series(session, kind, value, t0, t1)
        return write_frames([df], output, SERIES_COLUMNS)

    _run_export(database_url, config, output, job)


@export_app.command("documents")
def export_documents(
    output: OutOpt,
    start: StartOpt,
    end: EndOpt,
    scope: ScopeOpt = "market",
    database_url: DbOpt = None,
    config: CfgOpt = None,
) -> None:
    """Documents published in [start, end) with the current model's scores and topic, oldest first."""
    from pipeline.export import DOCUMENT_COLUMNS, iter_documents, write_frames

    kind, value = _scope(scope)
    t0, t1 = _time(start, "start"), _time(end, "end")
    _run_export(
        database_url,
        config,
        output,
        lambda engine: write_frames(iter_documents(engine, t0, t1, kind, value), output, DOCUMENT_COLUMNS),
    )


def bench_dashboard(
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="PostgreSQL; the data goes into schema finsent_bench.")
    ] = None,
    documents: Annotated[int, typer.Option(min=1000, max=5_000_000)] = 300_000,
    days: Annotated[int, typer.Option(min=7, max=400)] = 90,
    companies: Annotated[int, typer.Option(min=5, max=100)] = 50,
    repeat: Annotated[
        int, typer.Option(min=1, max=100, help="Timed runs per query and page (median, p95 and best reported).")
    ] = 20,
    report: Annotated[Path, typer.Option(help="Markdown report path.")] = Path("docs/dashboard-bench.md"),
    keep: Annotated[bool, typer.Option(help="Keep the finsent_bench schema afterwards.")] = False,
    config: CfgOpt = None,
) -> None:
    """Build a quarter of history on Postgres and time every Grafana panel query and web page."""
    import sys

    from pipeline import store
    from pipeline.dashboard_bench import run_bench, write_report

    url = resolve_database_url(database_url, config)
    command = "finsent bench-dashboard " + " ".join("$DATABASE_URL" if "://" in a else a for a in sys.argv[2:])
    try:
        result = run_bench(url, documents, days, companies, repeat, keep, command.strip())
    except ValueError as e:
        raise fail(str(e)) from None
    except store.StoreError as e:
        raise fail(str(e), code=1) from None
    write_report(result, report)
    for t in result.timings:
        s = t.ms_7d
        verdict = "ok  " if t.ok else "SLOW"
        cost = "" if t.cpu_ms is None else f"  cpu {t.cpu_ms:6.1f}  sql {t.sql_ms or 0:6.1f}"
        err_console.print(
            f"{t.kind:8} {verdict} median {s.median:7.1f} ms  p95 {s.p95:7.1f}  best {s.best:7.1f}{cost}  {t.what}",
            highlight=False,
        )
    slow = [t for t in result.timings if not t.ok]
    err_console.print(f"report: {report}; {len(slow)} over target", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.add_typer(export_app, name="export")
    app.command("bench-dashboard")(bench_dashboard)
