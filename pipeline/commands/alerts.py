"""`finsent alerts list|show|ack|notices|evaluate`: read and acknowledge stored alerts, see operator notices, and
measure the detector."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, cast

import typer

from pipeline.commands.core import fail
from pipeline.records import ALERT_SCOPES, Severity

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", envvar="FINSENT_CONFIG", help="YAML config file (default: built-in defaults)."),
]
DbOpt = Annotated[
    str | None, typer.Option("--database-url", envvar="DATABASE_URL", help="Overrides the config's database_url.")
]

alerts_app = typer.Typer(
    help="Alerts: list, show, acknowledge, operator notices, evaluate the detector.", no_args_is_help=True
)


def _open(config: str | None, database_url: str | None):
    from pipeline import store
    from pipeline.config import load_config

    cfg = load_config(config)  # ConfigError and StoreError reach the CLI's one handler
    return cfg, store.make_engine(database_url or cfg.database_url.get_secret_value())


def _find(session, alert_id: str):
    """An alert by id or unique id prefix (at least 6 characters)."""
    from sqlalchemy import select

    from pipeline.store import schema as s

    row = session.get(s.Alert, alert_id)
    if row is not None:
        return row
    if len(alert_id) >= 6:
        rows = session.scalars(select(s.Alert).where(s.Alert.id.startswith(alert_id, autoescape=True)).limit(2)).all()
        if len(rows) == 1:
            return rows[0]
        if len(rows) > 1:
            raise fail(f"alert id prefix {alert_id!r} is ambiguous; give more characters")
    raise fail(f"no alert with id {alert_id!r}", code=1)


def _alert_scope(value: str | None) -> str | None:
    """Any scope an alert can have, operational ones included (`records.ALERT_SCOPES`), in any case."""
    if value is None or value.lower() in ALERT_SCOPES:
        return value and value.lower()
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(ALERT_SCOPES)}")


@alerts_app.command("list")
def list_alerts(
    config: ConfigOpt = None,
    database_url: DbOpt = None,
    since_hours: Annotated[
        float, typer.Option("--since-hours", min=0, help="Only alerts whose window ended this recently.")
    ] = 24 * 7,
    scope: Annotated[
        str | None,
        typer.Option(help=f"Only this scope kind: {', '.join(ALERT_SCOPES)}.", callback=_alert_scope),
    ] = None,
    severity: Annotated[Severity | None, typer.Option(help="Only this severity.", case_sensitive=False)] = None,
    unacked: Annotated[bool, typer.Option("--unacked", help="Only alerts not yet acknowledged.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """Recent alerts, newest first, with their incident and delivery state."""
    from sqlalchemy import func, select

    from pipeline.messages import clean_text, scope_label
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    cfg, engine = _open(config, database_url)
    since = datetime.now(UTC) - timedelta(hours=since_hours)
    filters = []
    if scope:
        filters.append(s.Alert.scope_kind == scope)
    if severity:
        filters.append(s.Alert.severity == severity.value)
    if unacked:
        filters.append(s.Alert.acknowledged_at.is_(None))
    with session_scope(engine) as session:
        q = (
            select(s.Alert)
            .where(s.Alert.window_end >= since, *filters)
            .order_by(s.Alert.window_end.desc(), s.Alert.id)
            .limit(limit)
        )
        rows = session.scalars(q).all()
        hidden = "" if rows else _what_was_hidden(session, since, since_hours, filters)
        states = {
            (a, st): c
            for a, st, c in session.execute(
                select(s.AlertDelivery.alert_id, s.AlertDelivery.status, func.count())
                .where(s.AlertDelivery.alert_id.in_([r.id for r in rows]))
                .group_by(s.AlertDelivery.alert_id, s.AlertDelivery.status)
            )
        }
    engine.dispose()
    if not rows:
        typer.echo(hidden)
        return
    header = (
        "id",
        "window end (UTC)",
        "kind",
        "severity",
        "scope",
        "neg/total",
        "share vs base",
        "risk",
        "incident",
        "delivery",
        "ack",
    )
    table = [header]
    for r in rows:
        deliv = ", ".join(f"{st} {c}" for (a, st), c in sorted(states.items()) if a == r.id) or "-"
        table.append(
            (
                r.id[:12],
                f"{r.window_end:%Y-%m-%d %H:%M}",
                r.kind,
                r.severity,
                clean_text(scope_label(r.scope_kind, r.scope_value, cfg), 40),
                f"{r.neg_count}/{r.total_count}",
                f"{100 * r.neg_share:.0f}% vs {100 * r.baseline_share:.0f}%",
                "-" if r.risk_score is None else f"{r.risk_score:.0f}",
                (r.incident_id or "-")[:12],
                deliv,
                "yes" if r.acknowledged_at else "",
            )
        )
    _print_table(table)


def _print_table(table: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@alerts_app.command("notices")
def list_notices(
    config: ConfigOpt = None,
    database_url: DbOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """Operator notices (failed DAG runs, expired deliveries, failing sinks, documents that failed to score):
    undelivered ones first (failed for good, then still retried), then the newest."""
    from sqlalchemy import case, select

    from pipeline.messages import clean_text
    from pipeline.records import NoticeState
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    _, engine = _open(config, database_url)
    N = s.OperatorNotice
    order = case({NoticeState.FAILED: 0, NoticeState.RETRYING: 1, NoticeState.PENDING: 1}, value=N.status, else_=2)
    with session_scope(engine) as session:
        rows = session.scalars(select(N).order_by(order, N.created_at.desc(), N.id.desc()).limit(limit)).all()
        table = [("created (UTC)", "kind", "state", "tries", "reached", "subject / last error")]
        for r in rows:
            missed = "; ".join(str(e) for e in r.errors or [])
            table.append(
                (
                    f"{r.created_at:%Y-%m-%d %H:%M}",
                    r.kind,
                    r.status,
                    str(r.attempts),
                    ", ".join(r.sent_to or []) or "-",
                    clean_text(r.subject, 80) + (f" | {clean_text(missed, 120)}" if missed else ""),
                )
            )
    engine.dispose()
    if not rows:
        typer.echo("no operator notices in this database")
        return
    _print_table(table)


def _what_was_hidden(session, since: datetime, since_hours: float, filters: list) -> str:
    """Why `alerts list` shows nothing, and the command that would show something."""
    from sqlalchemy import func, select

    from pipeline.store import schema as s

    total = session.scalar(select(func.count()).select_from(s.Alert)) or 0
    if not total:
        return "no alerts in this database"
    in_window = session.scalar(select(func.count()).select_from(s.Alert).where(s.Alert.window_end >= since)) or 0
    if in_window:
        return (
            f"no alerts match the filters; {in_window} alert(s) ended in the last {since_hours:g} h "
            "(drop --scope/--severity/--unacked to see them)"
        )
    newest = session.scalar(select(func.max(s.Alert.window_end)))
    hours = int((datetime.now(UTC) - newest).total_seconds() // 3600) + 2
    return (
        f"no alerts in the last {since_hours:g} h; {total} older alert(s), the newest ended {newest:%Y-%m-%d %H:%M} "
        "UTC "
        f"(see them with: finsent alerts list --since-hours {hours})"
    )


@alerts_app.command("show")
def show_alert(
    alert_id: Annotated[str, typer.Argument(help="Alert id (or a unique prefix of 6+ characters).")],
    config: ConfigOpt = None,
    database_url: DbOpt = None,
) -> None:
    """One alert in full: the message the sinks get, plus every delivery attempt."""
    from sqlalchemy import select

    from pipeline.config import SinkConfig
    from pipeline.health import is_health, render_health
    from pipeline.incidents import assign_incidents
    from pipeline.messages import build_message, render_text
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    cfg, engine = _open(config, database_url)
    assign_incidents(engine, cfg)
    with session_scope(engine) as session:
        row = _find(session, alert_id)
        # the message as the console sink would tell it: the incident it belongs to, links, what to do
        console = SinkConfig(name="console", kind="console", severities=list(Severity))
        # source and model health are plain notices, not news surges
        view = render_health(row) if is_health(row) else build_message(session, row, console, cfg)
        deliveries = (
            session.execute(
                select(s.AlertDelivery).where(s.AlertDelivery.alert_id == row.id).order_by(s.AlertDelivery.sink)
            )
            .scalars()
            .all()
        )
        attempts = {
            d.id: session.scalars(
                select(s.DeliveryAttempt).where(s.DeliveryAttempt.delivery_id == d.id).order_by(s.DeliveryAttempt.id)
            ).all()
            for d in deliveries
        }
        ack = (row.acknowledged_at, row.acknowledged_by)
    engine.dispose()
    typer.echo("\n".join(view) if isinstance(view, tuple) else render_text(view))
    if ack[0]:
        typer.echo(f"Acknowledged {ack[0]:%Y-%m-%d %H:%M} UTC by {ack[1] or 'unknown'}")
    if not deliveries:
        typer.echo("Deliveries: none yet")
    for d in deliveries:
        typer.echo(
            f"Delivery to {d.sink}: {d.status}, {d.attempts} attempt(s)"
            + (f", next at {d.next_attempt_at:%H:%M} UTC" if d.next_attempt_at else "")
        )
        for a in attempts[d.id]:
            typer.echo(
                f"  {a.attempted_at:%Y-%m-%d %H:%M:%S} {'ok' if a.ok else 'failed'}"
                + (f": {a.error}" if a.error else "")
            )


@alerts_app.command("ack")
def ack_alert(
    alert_ids: Annotated[list[str], typer.Argument(help="Alert ids (or unique prefixes).")],
    by: Annotated[str | None, typer.Option("--by", help="Who acknowledges (default: $USER).")] = None,
    config: ConfigOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Acknowledge alerts: their pending deliveries are cancelled and they are never re-sent."""
    from pipeline.acks import AckError, acknowledge

    who = (by or os.environ.get("USER") or "unknown")[:100]
    _cfg, engine = _open(config, database_url)
    failed = False
    for aid in alert_ids:
        try:
            res = acknowledge(engine, aid, who)
        except AckError as e:
            typer.echo(f"cannot acknowledge {aid!r}: {e}", err=True)
            failed = True
            continue
        if res.already:
            typer.echo(
                f"{res.alert_id} was already acknowledged by {res.acknowledged_by} at "
                f"{res.acknowledged_at:%Y-%m-%d %H:%M} UTC"
            )
        else:
            typer.echo(f"acknowledged {res.alert_id} as {res.acknowledged_by}")
    engine.dispose()
    if failed:
        raise typer.Exit(1)


@alerts_app.command("evaluate")
def evaluate_cmd(
    config: ConfigOpt = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where alert-evaluation.md/.json go.")] = Path("docs"),
    seed: Annotated[
        list[int] | None,
        typer.Option(help="Random seed of the synthetic streams; repeat to pool several (default 101, 202, 303, 404)."),
    ] = None,
    scopes: Annotated[int, typer.Option(min=2, max=1000, help="Scopes per seed.")] = 100,
    weeks: Annotated[float, typer.Option(min=1, max=52)] = 8.0,
    warning_p: Annotated[float | None, typer.Option("--warning-p", help="Override detect.warning_p.")] = None,
    min_share_increase: Annotated[
        float | None, typer.Option("--min-share-increase", help="Override detect.min_share_increase.")
    ] = None,
    seasonality: Annotated[
        bool | None, typer.Option("--seasonality/--no-seasonality", help="Override detect.seasonality.")
    ] = None,
    db_check: Annotated[
        bool, typer.Option("--db-check/--no-db-check", help="Also replay a slice through SQLite and detect_spikes.")
    ] = True,
    family: Annotated[
        list[str] | None,
        typer.Option(help="Stream family: baseline, realistic, adversarial; repeat for several (default all)."),
    ] = None,
    oracle: Annotated[
        bool,
        typer.Option(
            "--oracle/--no-oracle",
            help="Also run the oracle (the same tests knowing the streams' truth); --no-oracle halves the run time.",
        ),
    ] = True,
) -> None:
    """Replay synthetic streams of every family through the detector; report recall, precision, false alerts, delay."""
    from pipeline.alert_eval import DEFAULT_SEEDS, FAMILIES, Family, evaluate_families, write_report
    from pipeline.config import load_config

    cfg = load_config(config)
    overrides = {
        k: v
        for k, v in {
            "warning_p": warning_p,
            "min_share_increase": min_share_increase,
            "seasonality": seasonality,
        }.items()
        if v is not None
    }
    try:
        detect_cfg = cfg.detect.model_validate({**cfg.detect.model_dump(), **overrides})
    except ValueError as e:
        raise fail(f"invalid detector override: {e}") from None
    names = tuple(family) if family else FAMILIES
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise fail(f"unknown stream family {unknown[0]!r}: use {', '.join(FAMILIES)}")
    families = cast(tuple[Family, ...], names)  # every name was checked against FAMILIES above
    parts = ["finsent alerts evaluate"]
    if config:
        parts.append(f"-c {config}")
    if out_dir != Path("docs"):
        parts.append(f"--out-dir {out_dir}")
    seeds = tuple(seed) if seed else DEFAULT_SEEDS
    if seeds != DEFAULT_SEEDS:
        parts += [f"--seed {x}" for x in seeds]
    parts += [
        f"--{k} {v:g}" for k, v in (("scopes", scopes), ("weeks", weeks)) if v != {"scopes": 100, "weeks": 8.0}[k]
    ]
    if warning_p is not None:
        parts.append(f"--warning-p {warning_p:g}")
    if min_share_increase is not None:
        parts.append(f"--min-share-increase {min_share_increase:g}")
    if seasonality is not None:
        parts.append("--seasonality" if seasonality else "--no-seasonality")
    if not db_check:
        parts.append("--no-db-check")
    if not oracle:
        parts.append("--no-oracle")
    if families != FAMILIES:
        parts += [f"--family {f}" for f in families]
    command = " ".join(parts)
    report = evaluate_families(
        detect_cfg,
        families=families,
        seeds=seeds,
        scopes=scopes,
        weeks=weeks,
        db_check=db_check,
        oracle=oracle,
        command=command,
    )
    md, js = write_report(report, out_dir)
    for name, result in report.families.items():
        typer.echo(f"[{name}]")
        typer.echo(f"  recall (counted surges, n={result.spikes_3sd}): {result.recall_3sd:.3f}   target >= 0.95")
        typer.echo(
            f"  false alerts per scope per week (quiet): {result.false_alerts_per_scope_week:.3f} (worst scope "
            f"{result.max_false_alerts_per_scope_week:.3f})   target <= 1"
        )
        typer.echo(f"  median detection delay (windows): {result.median_delay_windows_3sd}   target <= 1")
        for x in result.per_seed:
            typer.echo(
                f"    seed {x['seed']}: recall {x['recall_3sd']:.3f} over {x['spikes_3sd']} surges, "
                f"{x['false_alerts_per_scope_week']:.3f} false alerts per scope-week"
            )
        typer.echo(
            f"  precision: {result.precision:.3f}   recall over all {result.spikes_total} surges: "
            f"{result.recall_all:.3f}"
        )
        if result.oracle:
            same, one = result.oracle["at_detector_false_alert_rate"], result.oracle["at_1_false_alert_per_scope_week"]
            typer.echo(
                f"  oracle (true share, volume and noise): recall {same['recall_3sd']:.3f} at the same false-alert "
                f"rate, {one['recall_3sd']:.3f} at 1 a scope-week"
            )
        if result.db_path_agreement:
            typer.echo(f"  database path identical to in-memory replay: {result.db_path_agreement['identical']}")
    typer.echo(f"targets met on every family: {'yes' if report.targets_met_on_every_family else 'no'}")
    typer.echo(f"wrote {md} and {js} ({report.seconds:g} s)")


@alerts_app.command("bench-detect")
def bench_detect_cmd(
    database_url: Annotated[
        str,
        typer.Option(
            "--database-url",
            envvar="FINSENT_BENCH_DATABASE_URL",
            help="An EMPTY scratch database (it is migrated and filled).",
        ),
    ],
    entities: Annotated[
        list[int] | None,
        typer.Option(
            "--entities", min=1, max=1_000_000, help="Watchlist size; repeat for several (default 1000 and 10000)."
        ),
    ] = None,
    benchmark_json: Annotated[
        Path | None,
        typer.Option(
            "--benchmark-json",
            help="Record detect.entities_10000_seconds (and _cpu_seconds) in this file (other keys kept).",
        ),
    ] = None,
) -> None:
    """Time one detection window over thousands of entities on a scratch database."""
    import json

    from sqlalchemy import func, select

    from pipeline import store
    from pipeline.alert_eval import bench_detect

    results = []
    for size in entities or [1000, 10000]:
        try:
            store.upgrade(database_url)
            with store.session_scope(store.make_engine(database_url)) as session:
                if session.scalar(select(func.count()).select_from(store.schema.Document)):
                    typer.echo(
                        f"{store.safe_url(database_url)} is not empty: bench-detect needs a scratch database", err=True
                    )
                    raise typer.Exit(2)
            r = bench_detect(database_url, size)
        except store.StoreError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(1) from None
        results.append(r)
        typer.echo(
            f"{r['entities']} entities, {r['documents']} documents ({r['documents_in_window']} in the window): one "
            f"detection window {r['seconds']:.2f} s ({r['cpu_seconds']:.2f} s CPU in this process)"
        )
        _truncate(database_url)
    if benchmark_json is not None:
        ten = [r for r in results if r["entities"] == 10000]
        if ten:
            data = json.loads(benchmark_json.read_text()) if benchmark_json.exists() else {}
            data.setdefault("detect", {})["entities_10000_seconds"] = ten[0]["seconds"]
            # this process's CPU time: on a shared, loaded machine the wall time mostly measures the others
            data["detect"]["entities_10000_cpu_seconds"] = ten[0]["cpu_seconds"]
            benchmark_json.write_text(json.dumps(data, indent=2) + "\n")
            typer.echo(f"wrote detect.entities_10000_seconds to {benchmark_json}")


def _truncate(url: str) -> None:
    """Empty the scratch database between sizes (the bench needs an empty one)."""
    from sqlalchemy import delete

    from pipeline import store
    from pipeline.store import schema as s

    engine = store.make_engine(url)
    with store.session_scope(engine) as session:
        for table in (s.Alert, s.RiskScore, s.DocumentEntity, s.Score, s.Document, s.ModelVersion, s.Source):
            session.execute(delete(table))
    engine.dispose()


incidents_app = typer.Typer(
    help="Incidents: alerts of one run that share evidence, told as one story.", no_args_is_help=True
)


@incidents_app.command("list")
def list_incidents(
    config: ConfigOpt = None,
    database_url: DbOpt = None,
    since_hours: Annotated[
        float | None, typer.Option("--since-hours", min=0, help="Only incidents opened this recently (default: all).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """Incidents, newest first: head scope, severity, state and the scopes they moved."""
    from sqlalchemy import func, select

    from pipeline.incidents import assign_incidents
    from pipeline.messages import clean_text, scope_label
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    cfg, engine = _open(config, database_url)
    assign_incidents(engine, cfg)  # alerts detected but not yet notified get theirs too
    with session_scope(engine) as session:
        q = select(s.Incident).order_by(s.Incident.opened_at.desc(), s.Incident.id).limit(limit)
        if since_hours is not None:
            q = q.where(s.Incident.opened_at >= datetime.now(UTC) - timedelta(hours=since_hours))
        rows = session.scalars(q).all()
        n_alerts = dict(
            session.execute(
                select(s.Alert.incident_id, func.count())
                .where(s.Alert.incident_id.in_([r.id for r in rows]))
                .group_by(s.Alert.incident_id)
            ).all()
        )
    engine.dispose()
    if not rows:
        typer.echo(
            "no incidents"
            + (
                f" opened in the last {since_hours:g} h (drop --since-hours to see all)"
                if since_hours is not None
                else ""
            )
        )
        return
    table = [("id", "opened (UTC)", "closed (UTC)", "state", "severity", "incident", "alerts", "scopes")]
    for r in rows:
        scopes = ", ".join(scope_label(x["scope_kind"], x["scope_value"], cfg) for x in r.scopes)
        table.append(
            (
                r.id[:12], f"{r.opened_at:%Y-%m-%d %H:%M}", f"{r.closed_at:%Y-%m-%d %H:%M}" if r.closed_at else "-",
                r.state, r.severity, clean_text(r.title, 60), str(n_alerts.get(r.id, 0)), clean_text(scopes, 80),
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@incidents_app.command("show")
def show_incident(
    incident_id: Annotated[str, typer.Argument(help="Incident id (or a unique prefix of 6+ characters).")],
    config: ConfigOpt = None,
    database_url: DbOpt = None,
) -> None:
    """One incident: its scopes, every alert in it (oldest first) and where its messages went."""
    from sqlalchemy import select

    from pipeline.messages import clean_text, scope_label
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    cfg, engine = _open(config, database_url)
    with session_scope(engine) as session:
        found = session.scalars(
            select(s.Incident).where(s.Incident.id.startswith(incident_id.strip().lower(), autoescape=True)).limit(2)
        ).all()
        if len(found) != 1 or len(incident_id.strip()) < 6:
            engine.dispose()
            why = (
                "ambiguous; give more characters"
                if len(found) > 1
                else "not found (at least 6 characters; see finsent incidents list)"
            )
            typer.echo(f"incident {incident_id!r}: {why}", err=True)
            raise typer.Exit(1)
        inc = found[0]
        alerts = session.scalars(
            select(s.Alert).where(s.Alert.incident_id == inc.id).order_by(s.Alert.window_end, s.Alert.id)
        ).all()
    engine.dispose()
    typer.echo(f"{clean_text(inc.title, 200)}   [{inc.severity}, {inc.state}]")
    typer.echo(
        f"Incident {inc.id}: opened {inc.opened_at:%Y-%m-%d %H:%M} UTC"
        + (f", closed {inc.closed_at:%Y-%m-%d %H:%M} UTC" if inc.closed_at else "")
    )
    typer.echo(
        "Scopes: "
        + ", ".join(
            f"{scope_label(x['scope_kind'], x['scope_value'], cfg)} ({'open' if x.get('open') else 'back to normal'})"
            for x in inc.scopes
        )
    )
    typer.echo("Alerts:")
    for a in alerts:
        ack = f", acknowledged by {a.acknowledged_by}" if a.acknowledged_at else ""
        typer.echo(
            f"  {a.id[:12]}  {a.window_end:%Y-%m-%d %H:%M}  {a.kind:<9} {a.severity:<8} "
            f"{clean_text(scope_label(a.scope_kind, a.scope_value, cfg), 40)}"
            f"  {a.neg_count}/{a.total_count} negative{ack}"
        )
    if inc.message_refs:
        typer.echo("Threads: " + ", ".join(sorted(inc.message_refs)))


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")
    app.add_typer(incidents_app, name="incidents")
