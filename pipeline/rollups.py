"""Hourly and daily per-scope rollups (counts, negatives, sum of p_negative; market, source, topic, entity).

Dashboards and the web app read these small tables instead of aggregating every stored document, so a
panel over 7 days reads 7 days of rows whatever the history. They are written when a window is detected
(pipeline.cycle.detect_alerts): every hour that holds a document scored since the last refresh is recomputed from
the base tables, delete-then-insert in one transaction, so a rerun or a backfill rewrites the same rows,
and the days those hours fall in are recomputed from the hourly rows. No refresh job to forget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, delete, func, literal, select, text
from sqlalchemy.orm import Session

from pipeline.store import _insert, session_scope
from pipeline.store import schema as s

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# Scores saved by a concurrent writer may commit with a scored_at a little older than the newest one this
# refresh saw; re-reading this margin (idempotent) keeps them from being skipped.
WATERMARK_MARGIN = timedelta(minutes=15)
_SQLITE_FORMAT = {"hour": "%Y-%m-%d %H:00:00.000000", "day": "%Y-%m-%d 00:00:00.000000"}


@dataclass(frozen=True, slots=True)
class RollupReport:
    model_version: str
    hours: int
    days: int


def bucket(session: Session, col: Any, unit: str = "hour") -> Any:
    """The UTC hour (or day) of a timestamp column, as the rollup tables store it on each dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return func.date_trunc(unit, col, "UTC")
    return func.strftime(_SQLITE_FORMAT[unit], col)


def as_utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def runs(points: Iterable[datetime], step: timedelta) -> list[tuple[datetime, datetime]]:
    """Contiguous [start, end) ranges covering the given aligned points."""
    out: list[tuple[datetime, datetime]] = []
    for p in sorted(set(points)):
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + step)
        else:
            out.append((p, p + step))
    return out


def _rebuild_hours(session: Session, model_version: str, start: datetime, end: datetime) -> None:
    """Counts in the alerts' unit: market, topic and entity rows count stories (distinct content, negative when
    any copy is, positive when every copy is, p(negative) the highest copy's), a source row its own items."""
    h = s.SentimentHourly
    session.execute(delete(h).where(h.model_version == model_version, h.bucket_start >= start, h.bucket_start < end))
    b = bucket(session, s.Document.published_at)
    topic = func.coalesce(s.Score.topic, "(none)")
    is_neg = case((s.Score.label == "negative", 1), else_=0)
    is_pos = case((s.Score.label == "positive", 1), else_=0)
    story = s.Document.content_hash
    scopes: list[tuple[str, Any, Any]] = [
        ("market", literal("*"), story),
        ("source", s.Document.source_name, s.Document.id),
        ("topic", topic, story),
        ("entity", s.DocumentEntity.entity, story),
    ]
    cols = ["bucket_start", "scope_kind", "scope_value", "model_version", "total_count", "neg_count", "neu_count",
            "pos_count", "sum_p_negative"]  # fmt: skip
    for kind, value, unit in scopes:
        inner = (
            select(
                b.label("bucket"),
                value.label("value"),
                func.max(is_neg).label("neg"),
                func.min(is_pos).label("pos"),
                func.max(s.Score.p_negative).label("p"),
            )
            .select_from(s.Document)
            .join(s.Score, and_(s.Score.document_id == s.Document.id, s.Score.model_version_id == model_version))
        )
        if kind == "entity":
            inner = inner.join(s.DocumentEntity, s.DocumentEntity.document_id == s.Document.id)
        units = (
            inner.where(s.Document.published_at >= start, s.Document.published_at < end)
            .group_by(b, value, unit)
            .subquery()
        )
        q = select(
            units.c.bucket,
            literal(kind),
            units.c.value,
            literal(model_version),
            func.count(),
            func.sum(units.c.neg),
            func.sum(case((and_(units.c.neg == 0, units.c.pos == 0), 1), else_=0)),
            func.sum(case((and_(units.c.neg == 0, units.c.pos == 1), 1), else_=0)),
            func.sum(units.c.p),
        ).group_by(units.c.bucket, units.c.value)
        session.execute(_insert(session, h).from_select(cols, q))


def _rebuild_days(session: Session, model_version: str, start: datetime, end: datetime) -> None:
    h, d = s.SentimentHourly, s.SentimentDaily
    session.execute(delete(d).where(d.model_version == model_version, d.day_start >= start, d.day_start < end))
    day = bucket(session, h.bucket_start, "day")
    q = (
        select(
            day,
            h.scope_kind,
            h.scope_value,
            h.model_version,
            func.sum(h.total_count),
            func.sum(h.neg_count),
            func.sum(h.neu_count),
            func.sum(h.pos_count),
            func.sum(h.sum_p_negative),
        )  # fmt: skip
        .where(h.model_version == model_version, h.bucket_start >= start, h.bucket_start < end)
        .group_by(day, h.scope_kind, h.scope_value, h.model_version)
    )
    cols = ["day_start", "scope_kind", "scope_value", "model_version", "total_count", "neg_count", "neu_count",
            "pos_count", "sum_p_negative"]  # fmt: skip
    session.execute(_insert(session, d).from_select(cols, q))


def rebuild(session: Session, model_version: str, hours: Iterable[datetime]) -> RollupReport:
    """Recompute the given hours (and their days) for one model in the caller's transaction."""
    if session.get_bind().dialect.name == "postgresql":  # one writer at a time: delete+insert of the same keys
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext('finsent_rollups'))"))
    hour_set = {as_utc(x).replace(minute=0, second=0, microsecond=0) for x in hours}
    for start, end in runs(hour_set, HOUR):
        _rebuild_hours(session, model_version, start, end)
    day_set = {x.replace(hour=0) for x in hour_set}
    for start, end in runs(day_set, DAY):
        _rebuild_days(session, model_version, start, end)
    return RollupReport(model_version, len(hour_set), len(day_set))


def refresh(engine: Engine, model_version: str) -> RollupReport:
    """Bring one model's rollups up to date with every score stored so far (incremental, idempotent)."""
    with session_scope(engine) as session:
        state = session.get(s.RollupState, model_version, with_for_update=True)
        newest = session.scalar(select(func.max(s.Score.scored_at)).where(s.Score.model_version_id == model_version))
        if newest is None:
            return RollupReport(model_version, 0, 0)
        b = bucket(session, s.Document.published_at)
        q = (
            select(b)
            .select_from(s.Score)
            .join(s.Document, s.Document.id == s.Score.document_id)
            .where(s.Score.model_version_id == model_version)
            .distinct()
        )
        if state is not None:
            q = q.where(s.Score.scored_at >= state.scored_through - WATERMARK_MARGIN)
        hours = [as_utc(x) for x in session.scalars(q)]
        report = rebuild(session, model_version, hours)
        stmt = _insert(session, s.RollupState).values(model_version=model_version, scored_through=newest)
        session.execute(stmt.on_conflict_do_update(index_elements=["model_version"], set_={"scored_through": newest}))
    log.info("rollups for %s: %d hours, %d days rewritten", model_version, report.hours, report.days)
    return report


def rebuild_range(engine: Engine, model_version: str, start: datetime, end: datetime) -> RollupReport:
    """Recompute every hour of [start, end) for a model: for backfills and after retention."""
    hours = []
    t = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while t < end:
        hours.append(t)
        t += HOUR
    with session_scope(engine) as session:
        return rebuild(session, model_version, hours)
