"""Source health: a source that keeps failing, or has gone quiet for longer than usual, raises an alert.

A dead feed (connection refused, garbage) is recorded per fetch but never fails a run, and a feed that
answers but publishes nothing looks healthy; both would silently blind the monitor. Each cycle checks
every enabled source against its own history in `source_fetches`:

- dead: its last `health.max_failures` fetches all failed;
- quiet: nothing new for longer than max(`quiet_floor_hours`, `quiet_factor` x its median gap between
  fetches that brought something), learned from its last `health.history` such fetches
  (`quiet_unlearned_hours` until `min_history` gaps are known).

A condition becomes one `alerts` row (kind `source_health`, scope kind `health`, scope value the source;
its id is derived from the outage's start, so one alert per outage however many cycles see it) and is
delivered through the sinks by the alert delivery machinery (retries, expiry, operator notices). When the
condition ends, a `resolved` alert of the same episode is stored and delivered.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from itertools import pairwise
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from pipeline.config import FinsentConfig, HealthConfig
from pipeline.records import AlertKind, OpsScope, Severity
from pipeline.store import _insert, session_scope
from pipeline.store import schema as s

log = logging.getLogger(__name__)

# Source-health alerts: scope OpsScope.HEALTH, kind AlertKind.SOURCE_HEALTH, their end AlertKind.RESOLVED.
OPS_SCOPES: tuple[str, ...] = tuple(OpsScope)  # operational alerts: every sink taking their severity gets them


class Condition(StrEnum):
    DEAD = "dead"
    QUIET = "quiet"


@dataclass(frozen=True, slots=True)
class Outage:
    source: str
    condition: Condition
    since: datetime  # first failure of the streak, or the last fetch that brought something
    failures: int = 0
    last_error: str | None = None
    threshold_hours: float | None = None

    @property
    def alert_id(self) -> str:
        return _id(AlertKind.SOURCE_HEALTH, self.source, self.condition, self.since.isoformat())


@dataclass(slots=True)
class HealthReport:
    opened: list[str] = field(default_factory=list)  # alert ids stored in this check
    resolved: list[str] = field(default_factory=list)


def _id(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _dead(session: Session, name: str, hc: HealthConfig) -> Outage | None:
    F = s.SourceFetch
    recent = session.execute(
        select(F.status, F.fetched_at, F.error)
        .where(F.source_name == name)
        .order_by(F.fetched_at.desc(), F.id.desc())
        .limit(hc.max_failures)
    ).all()
    if len(recent) < hc.max_failures or any(r.status != "failed" for r in recent):
        return None
    last_ok = session.scalar(
        select(F.fetched_at).where(F.source_name == name, F.status != "failed").order_by(F.fetched_at.desc()).limit(1)
    )
    first = select(F.fetched_at, F.id).where(F.source_name == name, F.status == "failed")
    if last_ok is not None:
        first = first.where(F.fetched_at > last_ok)
    since = session.execute(first.order_by(F.fetched_at, F.id).limit(1)).one().fetched_at
    streak = session.scalar(
        select(func.count()).select_from(F).where(F.source_name == name, F.status == "failed", F.fetched_at >= since)
    )
    return Outage(name, Condition.DEAD, since, failures=int(streak or 0), last_error=recent[0].error)


def quiet_threshold(productive: list[datetime], hc: HealthConfig) -> timedelta:
    """How long a source may bring nothing new: learned from the gaps between its productive fetches."""
    times = sorted(productive)
    gaps = [(b - a).total_seconds() for a, b in pairwise(times) if b > a]
    if len(gaps) < hc.min_history:
        return timedelta(hours=max(hc.quiet_floor_hours, hc.quiet_unlearned_hours))
    return max(timedelta(hours=hc.quiet_floor_hours), timedelta(seconds=hc.quiet_factor * statistics.median(gaps)))


def _quiet(session: Session, name: str, hc: HealthConfig, now: datetime) -> Outage | None:
    F = s.SourceFetch
    latest = session.execute(
        select(F.status, F.fetched_at).where(F.source_name == name).order_by(F.fetched_at.desc(), F.id.desc()).limit(1)
    ).first()
    if latest is None or latest.status == "failed":
        return None  # never fetched, or failing: the dead rule speaks for it
    productive = list(
        session.scalars(
            select(F.fetched_at)
            .where(F.source_name == name, F.entries_new > 0)
            .order_by(F.fetched_at.desc())
            .limit(hc.history)
        )
    )
    since = (
        productive[0]
        if productive
        else session.scalar(select(F.fetched_at).where(F.source_name == name).order_by(F.fetched_at).limit(1))
    )
    if since is None:
        return None
    threshold = quiet_threshold(productive, hc)
    if now - since <= threshold:
        return None
    return Outage(name, Condition.QUIET, since, threshold_hours=round(threshold.total_seconds() / 3600, 2))


def _alert_row(o: Outage, now: datetime) -> dict[str, Any]:
    hours = (now - o.since).total_seconds() / 3600
    return {
        "id": o.alert_id,
        "episode_id": o.alert_id,
        "kind": AlertKind.SOURCE_HEALTH,
        "scope_kind": OpsScope.HEALTH,
        "scope_value": o.source,
        "window_start": o.since,
        "window_end": now,
        "severity": Severity.WARNING,
        "neg_count": o.failures,
        "total_count": 0,
        "neg_share": 0.0,
        "baseline_share": 0.0,
        "baseline_neg_rate": 0.0,
        "statistic": round(hours, 2),
        "details": {
            "condition": str(o.condition),
            "since": o.since.isoformat(),
            "failures": o.failures,
            "last_error": (o.last_error or "")[:500] or None,
            "threshold_hours": o.threshold_hours,
            "episode_severity": Severity.WARNING,
        },
        "created_at": now,
    }


def check_sources(engine: Engine, cfg: FinsentConfig, now: datetime) -> HealthReport:
    """Store a `source_health` alert for each new outage and a `resolved` one for each that ended."""
    report = HealthReport()
    hc = cfg.health
    A = s.Alert
    with session_scope(engine) as session:
        current: dict[str, Outage] = {}
        for src in cfg.sources:
            if not src.enabled:
                continue
            for o in (_dead(session, src.name, hc), _quiet(session, src.name, hc, now)):
                if o is not None:
                    current[o.alert_id] = o
        resolved_eps = select(A.episode_id).where(A.scope_kind == OpsScope.HEALTH, A.kind == AlertKind.RESOLVED)
        open_rows = session.scalars(
            select(A).where(
                A.scope_kind == OpsScope.HEALTH, A.kind == AlertKind.SOURCE_HEALTH, A.id.not_in(resolved_eps)
            )
        ).all()
        open_ids = {a.id for a in open_rows}
        for aid, o in current.items():
            if aid in open_ids:
                continue
            stored = session.execute(
                _insert(session, A)
                .values(_alert_row(o, now))
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(A.id)
            )
            if stored.scalar() is not None:
                report.opened.append(aid)
                log.error("source %s is %s since %s", o.source, o.condition, o.since.isoformat())
        for a in open_rows:
            if a.id in current:
                continue
            row = {
                **{
                    k: getattr(a, k)
                    for k in ("scope_kind", "scope_value", "window_start", "neg_count", "total_count", "neg_share")
                },
                "id": _id(AlertKind.RESOLVED, a.id),
                "episode_id": a.id,
                "kind": AlertKind.RESOLVED,
                "window_end": now,
                "severity": Severity.INFO,
                "baseline_share": 0.0,
                "baseline_neg_rate": 0.0,
                "statistic": round((now - a.window_start).total_seconds() / 3600, 2),
                "details": {**(a.details or {}), "resolved_at": now.isoformat()},
                "created_at": now,
            }
            session.execute(_insert(session, A).values(row).on_conflict_do_nothing(index_elements=["id"]))
            report.resolved.append(row["id"])
            log.info(
                "source %s recovered (%s since %s)",
                a.scope_value,
                (a.details or {}).get("condition"),
                a.window_start.isoformat(),
            )
    return report


def is_health(alert: s.Alert) -> bool:
    """An operational alert (source or model health), sent as a plain notice."""
    return alert.scope_kind in OPS_SCOPES


def render_health(alert: s.Alert) -> tuple[str, str]:
    """Subject and plain body of a source-health alert or its resolution (sent as a sink notice)."""
    if alert.scope_kind == OpsScope.MODEL:
        from pipeline.model_health import render_model_health

        return render_model_health(alert)
    d = alert.details or {}
    name, condition = alert.scope_value, d.get("condition", "dead")
    since = f"{alert.window_start:%Y-%m-%d %H:%M} UTC"
    if alert.kind == AlertKind.RESOLVED:
        subject = f"[RESOLVED] finsent source {name} is healthy again"
        lines = [f"Source {name} recovered at {alert.window_end:%Y-%m-%d %H:%M} UTC; it was {condition} since {since}."]
    elif condition == Condition.QUIET:
        subject = f"[WARNING] finsent source {name} has brought nothing new for {alert.statistic:.0f} h"
        lines = [
            f"Source {name} has brought no new item since {since} ({alert.statistic:.1f} h),",
            f"longer than its usual gap allows ({d.get('threshold_hours')} h). Is the feed still publishing?",
        ]
    else:
        subject = f"[WARNING] finsent source {name} is failing"
        lines = [
            f"Source {name} has failed its last {alert.neg_count} fetches (since {since}).",
            f"Last error: {d.get('last_error') or 'n/a'}",
        ]
    lines.append(f"Alert id: {alert.id}   (acknowledge: finsent alerts ack {alert.id})")
    return subject, "\n".join(lines)
