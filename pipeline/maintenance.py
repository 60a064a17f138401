"""Daily housekeeping: raw-text retention, rollup refresh, and VACUUM/ANALYZE hints.

Retention keeps what the dashboards and audits need (headline, scores, entities, alerts) and drops
what policy says we may not keep forever: the article body (`documents.summary`) and old fetch and
delivery-attempt logs. The retention period comes from FINSENT_RETENTION_DAYS (default 90) because
the YAML schema belongs to pipeline.config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, delete, text, update

from pipeline import config, store
from pipeline.config import DEFAULT_RETENTION_DAYS as DEFAULT_RETENTION_DAYS
from pipeline.config import RETENTION_ENV as RETENTION_ENV
from pipeline.config import ConfigError
from pipeline.errors import FinsentError
from pipeline.store import schema as s

log = logging.getLogger(__name__)

ROLLUPS = ("mv_sentiment_daily",)  # dropped by migration 0009 (rollup tables instead)
# A table deserves a manual VACUUM when dead rows exceed this share and autovacuum has not caught up.
DEAD_SHARE_HINT = 0.2
TABLES = (
    "documents",
    "scores",
    "document_entities",
    "source_fetches",
    "alerts",
    "alert_deliveries",
    "delivery_attempts",
)


class MaintenanceError(FinsentError, ValueError):
    """A maintenance setting is wrong; the message names it."""


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    retention_days: int
    cutoff: datetime
    texts_cleared: int
    fetch_logs_deleted: int
    delivery_attempts_deleted: int
    rollups_refreshed: list[str] = field(default_factory=list)
    analyzed: list[str] = field(default_factory=list)
    vacuum_hints: list[str] = field(default_factory=list)


def retention_days(env: dict[str, str] | None = None) -> int:
    try:
        return config.retention_days(env)
    except ConfigError as e:
        raise MaintenanceError(str(e)) from None


def apply_retention(engine: Engine, cutoff: datetime) -> tuple[int, int, int]:
    """Clear article bodies fetched before `cutoff` and delete older fetch/attempt logs; idempotent."""
    with store.session_scope(engine) as session:
        # DML returns a CursorResult (it has rowcount); Session.execute is typed as returning a plain Result
        cleared = cast(
            CursorResult[Any],
            session.execute(
                update(s.Document).where(s.Document.fetched_at < cutoff, s.Document.summary != "").values(summary="")
            ),
        ).rowcount
        fetches = cast(
            CursorResult[Any], session.execute(delete(s.SourceFetch).where(s.SourceFetch.fetched_at < cutoff))
        ).rowcount
        attempts = cast(
            CursorResult[Any], session.execute(delete(s.DeliveryAttempt).where(s.DeliveryAttempt.attempted_at < cutoff))
        ).rowcount
    return cleared or 0, fetches or 0, attempts or 0


def refresh_rollups(engine: Engine) -> list[str]:
    """Bring every model's hourly/daily rollups up to date (pipeline.rollups; normally done at each detect,
    so this is the safety net for scores written outside a cycle), and refresh any materialized view left."""
    from sqlalchemy import select

    from pipeline import rollups

    done = []
    with store.session_scope(engine) as session:
        models = list(session.scalars(select(s.ModelVersion.id).order_by(s.ModelVersion.id)))
    for model in models:
        report = rollups.refresh(engine, model)
        done.append(f"sentiment_hourly/daily {model}: {report.hours} hours")
    if engine.dialect.name != "postgresql":
        return done
    with engine.begin() as conn:
        sql = "SELECT matviewname FROM pg_matviews WHERE schemaname = current_schema()"
        present = set(conn.execute(text(sql)).scalars())
        for name in ROLLUPS:
            if name in present:
                conn.execute(text(f"REFRESH MATERIALIZED VIEW CONCURRENTLY {name}"))
                done.append(name)
    return done


def analyze_and_hint(engine: Engine, touched: bool) -> tuple[list[str], list[str]]:
    """ANALYZE the tables retention changed; suggest VACUUM where dead rows pile up.

    VACUUM itself is left to autovacuum or an operator: it cannot run in a transaction and a
    VACUUM FULL locks the table, which a scheduled task should not decide on its own.
    """
    if engine.dialect.name != "postgresql":
        return [], []
    analyzed: list[str] = []
    hints: list[str] = []
    with engine.begin() as conn:
        if touched:
            for name in ("documents", "source_fetches", "delivery_attempts"):
                conn.execute(text(f"ANALYZE {name}"))
                analyzed.append(name)
        rows = conn.execute(
            text(
                "SELECT relname, n_live_tup, n_dead_tup, last_autovacuum, last_vacuum "
                "FROM pg_stat_user_tables WHERE schemaname = current_schema() AND relname = ANY(:names)"
            ),
            {"names": list(TABLES)},
        ).all()
    for r in rows:
        total = (r.n_live_tup or 0) + (r.n_dead_tup or 0)
        if total and (r.n_dead_tup or 0) / total > DEAD_SHARE_HINT and (r.n_dead_tup or 0) >= 1000:
            hints.append(
                f"VACUUM (ANALYZE) {r.relname}: {r.n_dead_tup} dead of {total} rows "
                f"(last vacuum {r.last_vacuum or r.last_autovacuum or 'never'})"
            )
    return analyzed, hints


def run_maintenance(engine: Engine, now: datetime | None = None, days: int | None = None) -> MaintenanceReport:
    """One daily pass; `now` is the DAG run's data interval end, so a rerun cuts at the same point."""
    now = now or datetime.now(UTC)
    days = days if days is not None else retention_days()
    cutoff = now - timedelta(days=days)
    cleared, fetches, attempts = apply_retention(engine, cutoff)
    refreshed = refresh_rollups(engine)
    analyzed, hints = analyze_and_hint(engine, touched=bool(cleared or fetches or attempts))
    for h in hints:
        log.warning("maintenance hint: %s", h)
    log.info(
        "retention %d days (cutoff %s): %d bodies cleared, %d fetch logs and %d attempts deleted",
        days,
        cutoff,
        cleared,
        fetches,
        attempts,
    )
    return MaintenanceReport(days, cutoff, cleared, fetches, attempts, refreshed, analyzed, hints)
