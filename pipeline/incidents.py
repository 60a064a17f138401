"""Incidents: the alerts of one detection run that share their evidence, told to a reader as one story.

One surge of negative Northwind Bank news moves the entity, the market, the sources that carried it and
its topic: four alerts, one event. Alerts of one run (one window end) join the incident whose evidence
(the negative stories behind it) they share; the incident is headed by its most specific, most severe
scope. Escalations and resolutions continue the incident their episode belongs to, so their messages
thread under the first one. Incident ids hash the head alert's id (itself a hash of scope, window and
kind), so reruns and backfills recompute the same incidents; assignment is idempotent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pipeline.health import OPS_SCOPES
from pipeline.records import OPEN_KINDS, AlertKind, ScopeKind
from pipeline.records import IncidentState as IncidentState
from pipeline.store import _insert, session_scope
from pipeline.store import schema as s


class MessageKind(StrEnum):
    """What one incident message tells: it opened, got worse, partly calmed down, or is over."""

    OPENED = "opened"
    ESCALATED = "escalated"
    UPDATE = "update"
    RESOLVED = "resolved"


SCOPE_RANK: dict[str, int] = {
    ScopeKind.ENTITY: 0,
    ScopeKind.TOPIC: 1,
    ScopeKind.SOURCE: 2,
    ScopeKind.MARKET: 3,
}  # most specific first
SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}
SHARED_EVIDENCE = 0.5  # alerts share evidence when this share of the smaller one's negative stories is common


def incident_id_for(head_alert_id: str) -> str:
    return hashlib.sha256(f"v1|incident|{head_alert_id}".encode()).hexdigest()[:32]


def head_key(a: s.Alert) -> tuple[int, int, float, str]:
    """Order that picks an incident's head: most specific scope, then most severe, then highest risk."""
    return (SCOPE_RANK.get(a.scope_kind, 9), SEVERITY_RANK.get(a.severity, 9), -(a.risk_score or 0.0), a.id)


def severity_key(a: s.Alert) -> tuple[int, float, int, str]:
    """Order of messages and of the scopes listed in one: severity, then risk."""
    return (SEVERITY_RANK.get(a.severity, 9), -(a.risk_score or 0.0), SCOPE_RANK.get(a.scope_kind, 9), a.id)


def scope_documents(
    session: Session,
    scope_kind: str,
    scope_value: str,
    model_version: str | None,
    start: datetime,
    end: datetime,
    *,
    negative_only: bool = False,
) -> list[tuple[int, str, str]]:
    """(document id, content hash, label) of the scored documents a scope counts in [start, end)."""
    D, Sc, E = s.Document, s.Score, s.DocumentEntity
    q = (
        select(D.id, D.content_hash, Sc.label)
        .join(Sc, Sc.document_id == D.id)
        .where(D.published_at >= start, D.published_at < end)
    )
    if model_version:
        q = q.where(Sc.model_version_id == model_version)
    if negative_only:
        q = q.where(Sc.label == "negative")
    if scope_kind == ScopeKind.ENTITY:
        q = q.join(E, E.document_id == D.id).where(E.entity == scope_value, E.kind == "watchlist")
    elif scope_kind == ScopeKind.SOURCE:
        q = q.where(D.source_name == scope_value)
    elif scope_kind == ScopeKind.TOPIC:
        q = q.where(Sc.topic == scope_value)
    return [(int(r[0]), str(r[1]), str(r[2])) for r in session.execute(q.order_by(D.id))]


def _evidence(session: Session, a: s.Alert) -> frozenset[str]:
    """The negative stories behind an alert (content hashes); its cited documents when none are stored."""
    mv = (a.details or {}).get("model_version")
    docs = scope_documents(session, a.scope_kind, a.scope_value, mv, a.window_start, a.window_end, negative_only=True)
    if docs:
        return frozenset(h for _, h, _ in docs)
    return frozenset(f"doc:{d.get('document_id')}" for d in (a.details or {}).get("top_documents", []))


@dataclass(slots=True)
class _Group:
    incident_id: str
    members: list[s.Alert] = field(default_factory=list)
    evidence: set[str] = field(default_factory=set)


def _shares(a: frozenset[str], b: set[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / min(len(a), len(b))


def group_run(
    session: Session, alerts: Sequence[s.Alert], continued: dict[str, str], existing: Sequence[s.Alert] = ()
) -> list[_Group]:
    """Groups for one run's alerts: continuations first (their episode's incident), then each new alert,
    most specific first, joins the group it shares most evidence with, or heads a new incident.
    `existing`: alerts of the same window already in an open incident (a later detection pass found more),
    so a late alert joins that incident rather than opening a second one. Only groups with new alerts return."""
    groups: dict[str, _Group] = {}
    for old in existing:
        if old.incident_id and old.kind != AlertKind.RESOLVED:
            groups.setdefault(old.incident_id, _Group(old.incident_id)).evidence |= _evidence(session, old)
    evidence = {a.id: _evidence(session, a) for a in alerts}
    rest = []
    for a in sorted(alerts, key=head_key):
        inc = continued.get(a.id)
        if inc is None:
            rest.append(a)
            continue
        g = groups.setdefault(inc, _Group(inc))
        g.members.append(a)
        if a.kind != AlertKind.RESOLVED:
            g.evidence |= evidence[a.id]
    for a in rest:
        best = max(groups.values(), key=lambda g: (_shares(evidence[a.id], g.evidence), -len(g.members)), default=None)
        if best is None or _shares(evidence[a.id], best.evidence) < SHARED_EVIDENCE:
            best = groups.setdefault(incident_id_for(a.id), _Group(incident_id_for(a.id)))
        best.members.append(a)
        best.evidence |= evidence[a.id]
    return [g for g in groups.values() if g.members]


def incident_title(a: s.Alert, cfg: Any = None) -> str:
    from pipeline.messages import scope_label

    return f"{scope_label(a.scope_kind, a.scope_value, cfg)}: negative news surge"


def assign_incidents(engine: Engine, cfg: Any = None) -> list[str]:
    """Put every alert that has no incident yet into one, run by run (oldest window first); the ids of the
    incidents touched. Safe to call from every notifier run: it only looks at unassigned alerts."""
    touched: list[str] = []
    with session_scope(engine) as session:
        pending = session.scalars(
            select(s.Alert)
            .where(
                s.Alert.incident_id.is_(None), s.Alert.scope_kind.not_in(OPS_SCOPES)
            )  # source/model health is not news
            .order_by(s.Alert.window_end, s.Alert.id)
        ).all()
        by_run: dict[datetime, list[s.Alert]] = {}
        for a in pending:
            by_run.setdefault(a.window_end, []).append(a)
        for window_end, alerts in sorted(by_run.items()):
            continued = {}
            for a in alerts:
                if a.kind != AlertKind.SPIKE and a.episode_id:
                    inc = session.scalar(
                        select(s.Alert.incident_id)
                        .where(
                            s.Alert.episode_id == a.episode_id,
                            s.Alert.incident_id.is_not(None),
                            s.Alert.window_end < window_end,
                        )
                        .order_by(s.Alert.window_end.desc())
                        .limit(1)
                    )
                    if inc:
                        continued[a.id] = inc
            existing = session.scalars(
                select(s.Alert)
                .join(s.Incident, s.Incident.id == s.Alert.incident_id)
                .where(s.Alert.window_end == window_end, s.Incident.state == IncidentState.OPEN)
                .order_by(s.Alert.id)
            ).all()
            for g in group_run(session, alerts, continued, existing):
                _store_group(session, g, window_end, cfg)
                touched.append(g.incident_id)
            session.flush()
    return touched


def _store_group(session: Session, g: _Group, window_end: datetime, cfg: Any) -> None:
    head = min(g.members, key=head_key)
    now = datetime.now(UTC)
    session.execute(
        _insert(session, s.Incident)
        .values(
            id=g.incident_id,
            head_alert_id=head.id,
            head_scope_kind=head.scope_kind,
            head_scope_value=head.scope_value,
            title=incident_title(head, cfg),
            severity=head.severity if head.severity != "info" else "warning",
            state=IncidentState.OPEN,
            scopes=[],
            opened_at=window_end,
            closed_at=None,
            message_refs={},
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["id"])
    )
    inc = session.get(s.Incident, g.incident_id, with_for_update=True)
    assert inc is not None
    scopes = {(x["scope_kind"], x["scope_value"]): dict(x) for x in inc.scopes or []}
    severity = inc.severity
    for a in g.members:
        a.incident_id = inc.id
        key = (a.scope_kind, a.scope_value)
        entry = scopes.setdefault(
            key, {"scope_kind": a.scope_kind, "scope_value": a.scope_value, "episode_id": a.episode_id}
        )
        entry["open"] = a.kind != AlertKind.RESOLVED
        entry["episode_id"] = a.episode_id
        if a.kind != AlertKind.RESOLVED and SEVERITY_RANK.get(a.severity, 9) < SEVERITY_RANK.get(severity, 9):
            severity = a.severity
    ordered = sorted(
        scopes.values(), key=lambda x: (SCOPE_RANK.get(x["scope_kind"], 9), x["scope_kind"], x["scope_value"])
    )
    inc.scopes = ordered
    inc.severity = severity
    if any(x["open"] for x in ordered):
        inc.state, inc.closed_at = IncidentState.OPEN, None
    else:
        inc.state, inc.closed_at = IncidentState.RESOLVED, window_end
    inc.updated_at = now


def message_kind(inc: s.Incident | None, members: Iterable[s.Alert], window_end: datetime) -> MessageKind:
    kinds = {a.kind for a in members}
    if inc is None:
        return MessageKind.RESOLVED if kinds == {AlertKind.RESOLVED} else MessageKind.OPENED
    if inc.opened_at == window_end and AlertKind.SPIKE in kinds:
        return MessageKind.OPENED
    if inc.state == IncidentState.RESOLVED and inc.closed_at == window_end:
        return MessageKind.RESOLVED
    if kinds & set(OPEN_KINDS):
        return MessageKind.ESCALATED
    return MessageKind.UPDATE


def record_message_ref(engine: Engine, incident_id: str, sink: str, ref: str) -> None:
    """Remember the first message an incident got on a sink, so later ones thread under it."""
    with session_scope(engine) as session:
        inc = session.get(s.Incident, incident_id, with_for_update=True)
        if inc is not None and sink not in (inc.message_refs or {}):
            inc.message_refs = {**(inc.message_refs or {}), sink: ref}


def count_units(docs: Iterable[tuple[int, str, str]], scope_kind: str) -> tuple[int, int]:
    """(items, negatives) in the unit alerts and the dashboard share: stories (distinct content, negative when
    any copy is) for market, entity and topic scopes; a source scope's own items."""
    if scope_kind == ScopeKind.SOURCE:
        rows = list(docs)
        return len(rows), sum(1 for _, _, label in rows if label == "negative")
    stories: dict[str, bool] = {}
    for _, h, label in docs:
        stories[h] = stories.get(h, False) or label == "negative"
    return len(stories), sum(stories.values())


def usual_count(session: Session, a: s.Alert, cfg: Any = None) -> float | None:
    """How many stories (items, for a source) the scope had on average in the same hour of the previous
    baseline days: the 'usually sees about N' of a message. None without a model version."""
    mv = (a.details or {}).get("model_version")
    if not mv:
        return None
    days = max(1, round(float(getattr(getattr(cfg, "detect", None), "baseline_days", 7.0))))
    counts = []
    for d in range(1, days + 1):
        shift = timedelta(days=d)
        docs = scope_documents(session, a.scope_kind, a.scope_value, mv, a.window_start - shift, a.window_end - shift)
        counts.append(count_units(docs, a.scope_kind)[0])
    return sum(counts) / len(counts)
