"""`finsent demo`: the whole loop offline on bundled sample feeds, an embedded SQLite database and the
bundled model, so a new user sees ingest -> score -> detect -> alert work on day one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from pipeline import cycle, store
from pipeline.config import DEFAULT_MODEL_DIR, FinsentConfig, SinkConfig, SourceConfig, WatchlistEntity
from pipeline.detect import window_end
from pipeline.errors import UsageError
from pipeline.records import AlertKind, AlertRecord, ScopeKind
from pipeline.store import schema as s

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"

WATCHLIST = [
    WatchlistEntity(ticker="NWB", name="Northwind Bank", aliases=["Northwind"]),
    WatchlistEntity(ticker="ACME", name="Acme Motors", aliases=["Acme"]),
    WatchlistEntity(ticker="GLBX", name="Globex Energy", aliases=["Globex"]),
    WatchlistEntity(ticker="INIT", name="Initech Software", aliases=["Initech"]),
    WatchlistEntity(ticker="UMB", name="Umbrella Pharma", aliases=["Umbrella"]),
]


def demo_config(database_url: str, model_path: str | None = None) -> FinsentConfig:
    sources = [
        SourceConfig(name="newswire", kind="rss", url=(DEMO_DATA / "newswire.xml").as_uri()),
        SourceConfig(name="marketwire", kind="rss", url=(DEMO_DATA / "marketwatch.xml").as_uri()),
        SourceConfig(name="reddit-stocks", kind="reddit", url=(DEMO_DATA / "reddit_stocks.atom").as_uri()),
        SourceConfig(name="stocktwits", kind="stocktwits", url=(DEMO_DATA / "stocktwits.json").as_uri()),
    ]
    return FinsentConfig.model_validate(
        {
            "database_url": database_url,
            "sources": [x.model_dump() for x in sources],
            "watchlist": [w.model_dump() for w in WATCHLIST],
            "model": {"path": model_path or str(DEFAULT_MODEL_DIR), "batch_size": 64},
            "sinks": [SinkConfig(name="console", kind="console").model_dump()],
        }
    )


@dataclass(frozen=True, slots=True)
class DemoReport:
    database_url: str
    per_source: dict[str, int]
    failed_sources: dict[str, str]
    sentiment_mix: dict[str, int]
    top_negative: list[tuple[str, str, float]]  # source, title, p_negative
    alerts: list[AlertRecord]
    scored: int
    model_version: str
    as_of: datetime
    seconds: dict[str, float]
    not_scored: dict[str, int] = field(default_factory=dict)  # ScoringStatus -> items given no sentiment


class DemoError(UsageError):
    """The demo cannot run as asked (e.g. its database file holds real data); the message says why."""


def check_demo_db(db_path: Path) -> None:
    """Refuse to recreate a database that holds anything but the demo's own sample feeds."""
    if not db_path.exists() or db_path.stat().st_size == 0:
        return
    from sqlalchemy import create_engine, inspect

    eng = create_engine(f"sqlite:///{db_path}")
    try:
        with eng.connect() as c:
            if "sources" not in inspect(c).get_table_names():
                raise DemoError(f"{db_path} is not a finsent database; pass --db with another file for the demo")
            urls = [r[0] for r in c.execute(select(s.Source.url))]
    except DemoError:
        raise
    except (SQLAlchemyError, OSError) as e:
        raise DemoError(
            f"{db_path} cannot be read as a finsent database ({type(e).__name__}); pass --db with another file"
        ) from None
    finally:
        eng.dispose()
    ours = DEMO_DATA.as_uri()
    if any(not u.startswith(ours) for u in urls):
        raise DemoError(
            f"{db_path} holds real feeds, not the demo's; the demo recreates its database, so pass --db demo.db"
        )


def next_steps(report: DemoReport, database_url: str | None) -> list[str]:
    """Commands to try after the demo, written to work as printed (with --database-url unless the demo
    used the database every command uses by default)."""
    db = f" --database-url {database_url}" if database_url else ""
    env = f"DATABASE_URL={database_url} " if database_url else ""
    hours = int((datetime.now(UTC) - report.as_of).total_seconds() // 3600) + 2
    steps = [f"finsent incidents list{db}", f"finsent alerts list --since-hours {max(hours, 1)}{db}"]
    lead = next((a for a in report.alerts if a.kind != AlertKind.RESOLVED and a.scope_kind == ScopeKind.ENTITY), None)
    lead = lead or next((a for a in report.alerts if a.kind != AlertKind.RESOLVED), None)
    if lead is not None:
        steps.append(f"finsent alerts show {lead.id[:12]}{db}")
        steps.append(
            f"finsent documents list --entity {lead.scope_value} --negative --limit 5{db}"
            if lead.scope_kind == ScopeKind.ENTITY
            else f"finsent documents list --negative --limit 5{db}"
        )
        if lead.top_documents:
            steps.append(f"{env}finsent explain {lead.top_documents[0].document_id}")
        steps.append(f"finsent alerts ack {lead.id[:12]} --by demo{db}")
    return steps


def run_demo(db_path: Path, model_path: str | None = None, fresh: bool = True) -> DemoReport:
    """Run the monitoring cycle over the sample feeds, detecting as of the end of the sample week."""
    t0 = time.perf_counter()
    check_demo_db(db_path)
    if fresh:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{db_path}"
    cfg = demo_config(url, model_path)
    store.upgrade(url)
    engine = cycle.open_engine(cfg)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    outcomes = cycle.ingest_all(cfg, engine)
    timings["ingest"] = time.perf_counter() - t

    t = time.perf_counter()
    scorer = cycle.load_scorer(cfg, path=cfg.model.path)
    timings["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    scored = cycle.score_pending(cfg, engine, scorer)
    timings["score"] = time.perf_counter() - t

    with store.session_scope(engine) as session:
        latest = session.scalar(select(func.max(s.Document.published_at)))
    window = timedelta(minutes=cfg.detect.window_minutes)
    as_of = window_end(latest, cfg.detect.window_minutes) + window if latest else window_end(datetime.now(), 60)

    t = time.perf_counter()
    alerts = cycle.detect_alerts(cfg, engine, as_of, scored.model_version, scorer=scorer)
    timings["detect"] = time.perf_counter() - t
    t = time.perf_counter()
    cycle.deliver_alerts(cfg, engine)
    timings["notify"] = time.perf_counter() - t

    with store.session_scope(engine) as session:
        per_source = dict(
            session.execute(select(s.Document.source_name, func.count()).group_by(s.Document.source_name)).all()
        )
        mix = dict(
            session.execute(
                select(s.Score.label, func.count())
                .where(s.Score.model_version_id == scored.model_version)
                .group_by(s.Score.label)
            ).all()
        )
        top = session.execute(
            select(s.Document.source_name, s.Document.title, s.Score.p_negative)
            .join(s.Score, s.Score.document_id == s.Document.id)
            .where(s.Score.model_version_id == scored.model_version)
            .order_by(s.Score.p_negative.desc(), s.Document.published_at.desc())
            .limit(5)
        ).all()
    engine.dispose()
    timings["total"] = time.perf_counter() - t0
    return DemoReport(
        database_url=url,
        per_source=per_source,
        failed_sources={o.source: o.error or "" for o in outcomes if o.status == "failed"},
        sentiment_mix=mix,
        top_negative=[(r[0], r[1], float(r[2])) for r in top],
        alerts=alerts,
        scored=scored.scored,
        model_version=scored.model_version,
        as_of=as_of,
        seconds=timings,
        not_scored=scored.not_scored,
    )
