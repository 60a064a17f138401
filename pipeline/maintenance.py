"""Daily housekeeping: raw-text retention, rollup refresh, and VACUUM/ANALYZE hints.

Retention keeps what the dashboards and audits need (headline, scores, entities, alerts) and drops
what policy says we may not keep forever: the article body (`documents.summary`) and old fetch and
delivery-attempt logs after FINSENT_RETENTION_DAYS (default 90, a deployment setting); and, when the config
sets `retention.raw_social_text_days`, every stored word of a social post (title, summary, link with the
author's name, evidence words, copies in alerts and feedback) after that many days (`purge_social_text`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, delete, func, select, text, update
from sqlalchemy.orm import Session

from pipeline import config, store
from pipeline.config import DEFAULT_RETENTION_DAYS as DEFAULT_RETENTION_DAYS
from pipeline.config import RETENTION_ENV as RETENTION_ENV
from pipeline.config import SOCIAL_KINDS, ConfigError
from pipeline.errors import FinsentError
from pipeline.records import ScopeKind
from pipeline.store import schema as s

log = logging.getLogger(__name__)

PURGED_TITLE = "[text removed after {days} days]"  # what a purged social post shows wherever its title is shown
PURGE_PAGE = 2000  # documents purged per transaction: bounded memory and lock time on any backlog
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
    social_text_days: int | None = None  # retention.raw_social_text_days; None: social text kept
    social_texts_purged: int = 0


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


PURGE_LOCK_WAIT = timedelta(minutes=5)  # a monitor task or `finsent run` finishes well within it


def purge_social_text(
    engine: Engine, cutoff: datetime, days: int, now: datetime | None = None, lock_wait: timedelta = PURGE_LOCK_WAIT
) -> int:
    """Remove the stored text of social posts fetched before `cutoff`; returns how many documents were purged.

    The title becomes PURGED_TITLE (so the web view and dashboards say why it is gone), summary and link (which
    names the author) are cleared, `text_purged_at` is set; the document's evidence words, the title, link and
    evidence copied into alerts' `top_documents`, and the text of its feedback rows go too. Scores, entities,
    rollups, alert counts and feedback labels stay. Each page is one transaction and only unpurged documents
    are selected, so a rerun, or a run after a crash, finishes the work once.

    Each page holds the cycle lock exclusively (waiting up to `lock_wait` for a running cycle or monitor task):
    a scoring or detect step that read a post's text before the purge must not write its words or title back
    after it."""
    now = now or datetime.now(UTC)
    placeholder = PURGED_TITLE.format(days=days)
    D = s.Document
    social = select(s.Source.name).where(s.Source.kind.in_(SOCIAL_KINDS))
    total = 0
    while True:
        with store.run_lock(engine, wait=lock_wait), store.session_scope(engine) as session:
            ids = list(
                session.scalars(
                    select(D.id)
                    .where(D.source_name.in_(social), D.fetched_at < cutoff, D.text_purged_at.is_(None))
                    .order_by(D.id)
                    .limit(PURGE_PAGE)
                )
            )
            if not ids:
                return total
            session.execute(
                update(D)
                .where(D.id.in_(ids))
                .values(title=placeholder, summary="", link=None, text_purged_at=now)
                .execution_options(synchronize_session=False)
            )
            session.execute(delete(s.Explanation).where(s.Explanation.document_id.in_(ids)))
            # scoring skips purged posts, so a pending retry would never be taken up or cleared
            session.execute(delete(s.ScoringRetry).where(s.ScoringRetry.document_id.in_(ids)))
            session.execute(
                update(s.Feedback)
                .where(s.Feedback.document_id.in_(ids))
                .values(text=None)
                .execution_options(synchronize_session=False)
            )
            _scrub_alerts(session, set(ids), placeholder)
            total += len(ids)


def _scrub_alerts(session: Session, ids: set[int], placeholder: str) -> None:
    """Remove these documents' copies from the alerts citing them. An alert cites only documents published
    inside its window (store.alerts.top_documents), and only sentiment alerts cite any: so only the alerts
    whose window holds one of these documents are read (a page with one odd date reads that date's alerts,
    not every alert between its dates), and of those only the ones naming a document are changed."""
    A, D = s.Alert, s.Document
    first, last = session.execute(select(func.min(D.published_at), func.max(D.published_at)).where(D.id.in_(ids))).one()
    if first is None:
        return
    holds = select(D.id).where(D.id.in_(ids), D.published_at >= A.window_start, D.published_at < A.window_end)
    in_range = (A.window_end > first, A.window_start <= last)  # a cheap prefilter: the EXISTS is per alert
    for alert in session.scalars(select(A).where(A.scope_kind.in_(list(ScopeKind)), *in_range, holds.exists())):
        docs = (alert.details or {}).get("top_documents") or []
        if not any(int(d.get("document_id", -1)) in ids for d in docs):
            continue
        scrubbed = [
            {**d, "title": placeholder, "link": None, "evidence": []} if int(d.get("document_id", -1)) in ids else d
            for d in docs
        ]
        alert.details = {**alert.details, "top_documents": scrubbed}


def refresh_rollups(engine: Engine) -> list[str]:
    """Bring every model's hourly/daily rollups up to date (pipeline.rollups; normally done at each detect,
    so this is the safety net for scores written outside a cycle), and refresh any materialized view left."""
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


def run_maintenance(
    engine: Engine, now: datetime | None = None, days: int | None = None, social_text_days: int | None = None
) -> MaintenanceReport:
    """One daily pass; `now` is the DAG run's data interval end, so a rerun cuts at the same point.
    `social_text_days`: the config's `retention.raw_social_text_days` (None: social text is kept)."""
    now = now or datetime.now(UTC)
    days = days if days is not None else retention_days()
    cutoff = now - timedelta(days=days)
    cleared, fetches, attempts = apply_retention(engine, cutoff)
    purged = 0
    if social_text_days is not None:
        purged = purge_social_text(engine, now - timedelta(days=social_text_days), social_text_days, now)
        log.info("social text retention %d days: %d posts purged", social_text_days, purged)
    refreshed = refresh_rollups(engine)
    analyzed, hints = analyze_and_hint(engine, touched=bool(cleared or fetches or attempts or purged))
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
    return MaintenanceReport(
        days, cutoff, cleared, fetches, attempts, refreshed, analyzed, hints, social_text_days, purged
    )
