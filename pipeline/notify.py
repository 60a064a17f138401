"""Notify stage: deliver stored alerts to the configured sinks exactly once, losing none.

Every (alert, sink) pair gets one `alert_deliveries` row (unique: the idempotency key). A run claims a
due row with one conditional UPDATE (pending/failed and due -> sending), so two concurrent or retried
tasks never both send it; the claim is committed before sending. Each attempt is written to
`delivery_attempts`. Failures are retried a few times in the same run with short backoff, then in later
runs (next_attempt_at, exponential, capped at sink.backoff_max_minutes) until sent or `sink.expire_hours`
after the alert was queued: time expires a delivery, not a count, and the state lives in the database, so
restarts change nothing. An expired delivery, or a sink failing for `failing_after_minutes`, is told to
operators once through the other sinks (`operator_notices`) and makes the run degraded.
A claim left by a crashed run is taken over after `CLAIM_LEASE`, so an alert is never lost; in that
one case it may be sent twice (email carries a stable Message-ID so clients fold the copy). Two clocks:
the run's `now` (a backfill's or a retried task's) decides what is due and stamps the attempts; a claim is
a lease between live processes, so it is stamped and judged on the wall clock, for deliveries and notices.
Acknowledged alerts are never (re-)sent: their open deliveries become "cancelled".

Operator notices are claimed, sent, then confirmed (`operator_notices.status`): one that missed a sink is
retried there by later runs (`notices.max_attempts`), never resent where it arrived.

What a message says is pipeline.messages; how it travels (Slack, SMTP, console) is pipeline.sinks.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, and_, func, or_, select, update
from sqlalchemy.orm import Session

from pipeline.config import FinsentConfig, SinkConfig
from pipeline.health import OPS_SCOPES, is_health, render_health
from pipeline.incidents import assign_incidents, head_key, record_message_ref, severity_key
from pipeline.messages import IncidentMessage, alert_title, build_message, routes_to
from pipeline.records import AlertKind, DeliveryState, NoticeKind, NoticeState
from pipeline.sinks import DeliveryError, Sink, build_sink
from pipeline.store import _insert, session_scope
from pipeline.store import schema as s

log = logging.getLogger(__name__)

CLAIM_LEASE = timedelta(minutes=10)
IN_RUN_DELAYS = (1.0, 3.0)  # sleep before the 2nd and 3rd attempt within one run
BACKOFF_BASE = timedelta(minutes=1)
BACKOFF_MAX = timedelta(minutes=30)
STALE_ERROR = "alert window older than expire_hours when first routed"


OPEN_STATES = (DeliveryState.PENDING, DeliveryState.FAILED)


NOTICE_OPEN = (NoticeState.PENDING, NoticeState.RETRYING)
NOTICE_MAX_ATTEMPTS = 10  # notices.max_attempts' default, for callers without a config (record_notice)


@dataclass(slots=True)
class SinkCounts:
    """One sink's share of a run: sent now, still waiting for a retry, given up (expired) now."""

    sent: int = 0
    pending: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class ExpiredDelivery:
    delivery_id: int
    alert_id: str
    sink: str
    attempts: int
    last_error: str | None


@dataclass(slots=True)
class DeliveryReport:
    sent: int = 0
    failed: int = 0  # failed in this run, retried in a later one
    expired: int = 0  # given up in this run (alerts lost to that sink: an operator notice went out)
    skipped: int = 0  # acknowledged before they were sent
    errors: list[str] = field(default_factory=list)
    per_sink: dict[str, SinkCounts] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # why the run is degraded; empty when it is not
    notices: list[str] = field(default_factory=list)  # subjects of the operator notices sent

    @property
    def degraded(self) -> bool:
        return bool(self.problems)


def _enqueue(session: Session, cfg: FinsentConfig, now: datetime) -> list[tuple[str, str]]:
    """One delivery row per routed (alert, sink). Alerts whose window is already older than the sink's
    expiry are recorded as expired rather than sent to Slack or email (a backfill must not page anyone
    about last month); the console sink prints them (the offline demo replays a past week).

    Returns the (alert id, sink) pairs expired here that are a loss, not a backfill: the alert itself was stored
    longer ago than expire_hours, so nothing routed it in time (the notifier was down). The caller tells operators."""
    lost: list[tuple[str, str]] = []
    for sink in cfg.sinks:
        has_row = (
            select(s.AlertDelivery.id)
            .where(s.AlertDelivery.alert_id == s.Alert.id, s.AlertDelivery.sink == sink.name)
            .exists()
        )
        alerts = session.scalars(
            select(s.Alert)
            .where(
                ~has_row,
                s.Alert.acknowledged_at.is_(None),
                or_(s.Alert.scope_kind.in_(sink.scopes), s.Alert.scope_kind.in_(OPS_SCOPES)),
                or_(s.Alert.kind == AlertKind.RESOLVED, s.Alert.severity.in_(sink.severities)),
            )
            .order_by(s.Alert.window_end, s.Alert.id)
        ).all()
        # One message per incident and run: its lead alert carries it, the others are "grouped" into it.
        groups: dict[tuple[str, datetime], list[s.Alert]] = {}
        for a in alerts:
            if routes_to(sink, a):
                groups.setdefault((a.incident_id or a.id, a.window_end), []).append(a)
        rows = []
        leads = [(min(g, key=head_key), g) for g in groups.values()]
        for lead, members in sorted(leads, key=lambda x: (x[0].window_end, severity_key(x[0]))):  # oldest run first
            horizon = now - timedelta(hours=sink.expire_hours)
            stale = sink.kind != "console" and lead.window_end < horizon
            for a in sorted(members, key=head_key):  # a stale message's grouped alerts are as stale as its lead
                if stale and _aware(lead.created_at) < horizon:
                    lost.append((a.id, sink.name))
                status = DeliveryState.PENDING if a is lead else DeliveryState.GROUPED
                rows.append(
                    {
                        "alert_id": a.id,
                        "sink": sink.name,
                        "status": DeliveryState.EXPIRED if stale else status,
                        "attempts": 0,
                        "last_error": STALE_ERROR if stale else None,
                        "created_at": now,
                    }
                )
        if rows:
            session.execute(
                _insert(session, s.AlertDelivery)
                .values(rows)
                .on_conflict_do_nothing(index_elements=["alert_id", "sink"])
            )
    return lost


def _aware(t: datetime) -> datetime:
    """SQLite hands timestamps back naive; they are stored in UTC."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


GROUPED = DeliveryState.GROUPED


def _lease_expired_before() -> datetime:
    """Claims older than this were left by a sender that died. A claim is stamped with the wall clock (a run
    may go on longer than the lease), so its age is judged on the wall clock too, never against a run's
    `now`: a catch-up run whose `now` lies hours back would otherwise never take over a dead claim, and one
    whose `now` lies ahead would take over a live one."""
    return datetime.now(UTC) - CLAIM_LEASE


def _due_filter(now: datetime) -> Any:
    D = s.AlertDelivery
    return or_(
        and_(D.status.in_(OPEN_STATES), or_(D.next_attempt_at.is_(None), D.next_attempt_at <= now)),
        and_(D.status == DeliveryState.SENDING, D.last_attempt_at < _lease_expired_before()),
    )


def _claim(engine: Engine, delivery_id: int, now: datetime) -> bool:
    """Atomically take a due delivery (committed before sending) so no other run sends it too.

    `now` (the run's start) decides what is due; the claim itself is stamped with the wall clock, so a run
    that has been going longer than CLAIM_LEASE does not hand a concurrent notifier a claim that looks stale."""
    D = s.AlertDelivery
    unacked = select(s.Alert.id).where(s.Alert.acknowledged_at.is_(None))
    with session_scope(engine) as session:
        # DML returns a CursorResult (it has rowcount); Session.execute is typed as returning a plain Result
        res = cast(
            CursorResult[Any],
            session.execute(
                update(D)
                .where(D.id == delivery_id, _due_filter(now), D.alert_id.in_(unacked))
                .values(status=DeliveryState.SENDING, last_attempt_at=datetime.now(UTC))
                .execution_options(synchronize_session=False)
            ),
        )
        return res.rowcount == 1


def _record_attempt(engine: Engine, delivery_id: int, ok: bool, error: str | None, at: datetime) -> int:
    """The attempt row carries the run's clock `at`; the delivery's `last_attempt_at` is also its claim stamp
    (the row may stay `sending` for an in-run retry), so it takes the wall clock, as the claim did."""
    D = s.AlertDelivery
    with session_scope(engine) as session:
        session.add(s.DeliveryAttempt(delivery_id=delivery_id, attempted_at=at, ok=ok, error=error))
        attempts = session.scalar(select(D.attempts).where(D.id == delivery_id)) or 0
        values: dict[str, Any] = {"attempts": attempts + 1, "last_attempt_at": datetime.now(UTC), "last_error": error}
        if ok:
            values.update(status=DeliveryState.SENT, delivered_at=at, next_attempt_at=None)
        session.execute(update(D).where(D.id == delivery_id).values(**values))
        return attempts + 1


def _release(engine: Engine, delivery_id: int, status: DeliveryState, next_at: datetime | None) -> None:
    D = s.AlertDelivery
    with session_scope(engine) as session:
        session.execute(
            update(D)
            .where(D.id == delivery_id, D.status == DeliveryState.SENDING)
            .values(status=status, next_attempt_at=next_at)
        )


def backoff(attempts: int, cap: timedelta = BACKOFF_MAX) -> timedelta:
    """Wait before the next cycle's try: 1, 2, 4 ... minutes, capped, so a long outage costs a bounded
    number of tries."""
    return min(BACKOFF_BASE * (2 ** min(max(0, attempts - 1), 30)), cap)


def _deadline(row: Any, sink: SinkConfig) -> datetime:
    created: datetime = row.created_at
    return created + timedelta(hours=sink.expire_hours)


def _expire(engine: Engine, row: Any, now: datetime) -> bool:
    D = s.AlertDelivery
    with session_scope(engine) as session:
        return bool(
            cast(
                CursorResult[Any],
                session.execute(
                    update(D)
                    .where(D.id == row.id, _due_filter(now))
                    .values(status=DeliveryState.EXPIRED, next_attempt_at=None)
                ),
            ).rowcount
        )


def _expire_grouped(engine: Engine, lead: Any) -> list[ExpiredDelivery]:
    """The alerts grouped into an expired lead's message never reached the sink either: they expire with it and
    are named in the same operator notice, rather than staying `grouped` (told nowhere) for ever."""
    D, A = s.AlertDelivery, s.Alert
    with session_scope(engine) as session:
        head = session.get(A, lead.alert_id)
        if head is None or head.incident_id is None:
            return []  # no incident: nothing was grouped under it
        members = select(A.id).where(A.incident_id == head.incident_id, A.window_end == head.window_end)
        rows = session.execute(
            select(D.id, D.alert_id).where(D.sink == lead.sink, D.status == GROUPED, D.alert_id.in_(members))
        ).all()
        err = f"grouped into the message of alert {lead.alert_id}, which was never delivered"
        if rows:
            session.execute(
                update(D)
                .where(D.id.in_([r.id for r in rows]), D.status == GROUPED)
                .values(status=DeliveryState.EXPIRED, last_error=err, next_attempt_at=None)
                .execution_options(synchronize_session=False)
            )
    for r in rows:
        log.error(
            "alert %s to %s expired with the message it was grouped into (alert %s)",
            r.alert_id,
            lead.sink,
            lead.alert_id,
        )
    return [ExpiredDelivery(r.id, r.alert_id, lead.sink, 0, err) for r in rows]


def deliver_pending(
    engine: Engine,
    cfg: FinsentConfig,
    now: datetime | None = None,
    *,
    sinks: dict[str, Sink] | None = None,
    retry_delays: Sequence[float] = IN_RUN_DELAYS,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryReport:
    """Send every due delivery; returns per-sink counts and whatever makes the run degraded.

    A failed delivery is retried in later runs (capped exponential backoff) until `expire_hours` after it
    was queued; one that expires, and a sink failing for `failing_after_minutes`, are told to operators
    through the other sinks (once each, see `operator_notices`) and mark the report degraded.
    `now` is the run's clock for scheduling (tests and backfills pass it); `sinks` replaces the sinks
    built from the config (by name).
    """
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError(f"now={now!r} is naive: pass a timezone-aware UTC datetime")
    report = DeliveryReport()
    by_name = {sc.name: sc for sc in cfg.sinks}
    built = dict(sinks or {})
    D = s.AlertDelivery
    assign_incidents(engine, cfg)
    with session_scope(engine) as session:
        lost = _enqueue(session, cfg, now)
        expired: list[ExpiredDelivery] = [
            ExpiredDelivery(d.id, d.alert_id, d.sink, d.attempts, STALE_ERROR)
            for alert_id, sink_name in lost
            for d in session.scalars(select(D).where(D.alert_id == alert_id, D.sink == sink_name))
        ]
        for e in expired:
            log.error(
                "alert %s was never delivered to %s: older than expire_hours when first routed", e.alert_id, e.sink
            )
        acked = select(s.Alert.id).where(s.Alert.acknowledged_at.is_not(None))
        skipped = cast(
            CursorResult[Any],
            session.execute(
                update(D)
                .where(D.status.in_(OPEN_STATES), D.alert_id.in_(acked))
                .values(status=DeliveryState.CANCELLED, last_error="acknowledged before delivery", next_attempt_at=None)
                .execution_options(synchronize_session=False)
            ),
        )
        report.skipped = skipped.rowcount or 0
        due = session.execute(
            select(D.id, D.sink, D.alert_id, D.attempts, D.created_at, D.last_error)
            .where(_due_filter(now))
            .order_by(D.created_at, D.id)
        ).all()

    down: set[str] = set()  # sinks that failed a delivery in this run: the rest wait for the next run
    for row in due:
        sink_cfg = by_name.get(row.sink)
        if sink_cfg is None:
            continue  # a sink removed from the config keeps its rows untouched
        counts = report.per_sink.setdefault(row.sink, SinkCounts())
        deadline = _deadline(row, sink_cfg)
        capped = sink_cfg.max_attempts is not None and row.attempts >= sink_cfg.max_attempts
        if now > deadline or capped:
            if _expire(engine, row, now):
                expired.append(ExpiredDelivery(row.id, row.alert_id, row.sink, row.attempts, row.last_error))
                expired += _expire_grouped(engine, row)
                log.error("delivery of alert %s to %s expired after %d attempts", row.alert_id, row.sink, row.attempts)
            continue
        if row.sink in down or not _claim(engine, row.id, now):
            continue  # a dead sink costs one delivery's tries per run, not one per pending alert

        try:  # a claimed row must never stay `sending`: a message that cannot be built is a failed attempt
            sink = built.get(row.sink) or built.setdefault(row.sink, build_sink(sink_cfg))
            with session_scope(engine) as session:
                alert_row = session.get(s.Alert, row.alert_id)
                if alert_row is None:
                    continue  # deleted since: its delivery rows went with it (ON DELETE CASCADE)
                send, view = _sender(sink, alert_row, sink_cfg, cfg, session)
        except Exception as e:
            err = f"sink {row.sink}: cannot build the message for alert {row.alert_id}: {type(e).__name__}"
            attempts = _record_attempt(engine, row.id, False, err, now)
            log.error("alert %s to %s: attempt %d failed: %s", row.alert_id, row.sink, attempts, err)
            log.debug("traceback", exc_info=True)
            next_at = min(now + _backoff(attempts, sink_cfg), deadline)
            _give_up(engine, row, sink_cfg, attempts, err, next_at, expired, report)
            continue  # this alert's problem, not the sink's: the next delivery still goes out
        delays = list(retry_delays)
        while True:
            try:
                ref = send()
            except Exception as e:
                err = str(e) if isinstance(e, DeliveryError) else f"sink {row.sink}: {type(e).__name__}"
                attempts = _record_attempt(engine, row.id, False, err, now)
                log.warning("alert %s to %s: attempt %d failed: %s", row.alert_id, row.sink, attempts, err)
                over_cap = sink_cfg.max_attempts is not None and attempts >= sink_cfg.max_attempts
                if not over_cap and delays:
                    sleep(delays.pop(0))
                    continue
                next_at = min(now + _backoff(attempts, sink_cfg), deadline)
                _give_up(engine, row, sink_cfg, attempts, err, next_at, expired, report)
                down.add(row.sink)
                break
            else:
                _record_attempt(engine, row.id, True, None, now)
                if ref and view is not None and view.incident_id:
                    record_message_ref(engine, view.incident_id, row.sink, ref)
                report.sent += 1
                counts.sent += 1
                log.info("alert %s sent to %s", row.alert_id, row.sink)
                break

    report.expired = len(expired)
    for x in expired:
        report.per_sink.setdefault(x.sink, SinkCounts()).failed += 1
    _count_pending(engine, cfg, report)
    failing = _failing_sinks(engine, cfg, now)
    _retry_notices(engine, cfg, now, built, report)  # earlier notices that missed a sink, and queued ones
    if expired:
        _notice_expired(engine, cfg, expired, failing, built, report, now)
    for name, since in failing.items():
        _notice_failing_sink(engine, cfg, name, since, now, failing, built, report)
    return report


def _backoff(attempts: int, sink_cfg: SinkConfig) -> timedelta:
    return backoff(attempts, timedelta(minutes=sink_cfg.backoff_max_minutes))


def _give_up(
    engine: Engine,
    row: Any,
    sink_cfg: SinkConfig,
    attempts: int,
    err: str,
    next_at: datetime,
    expired: list[ExpiredDelivery],
    report: DeliveryReport,
) -> None:
    """Release a claimed delivery after this run's last failed attempt: expired past max_attempts, else
    failed and retried at `next_at`."""
    if sink_cfg.max_attempts is not None and attempts >= sink_cfg.max_attempts:
        _release(engine, row.id, DeliveryState.EXPIRED, None)
        expired.append(ExpiredDelivery(row.id, row.alert_id, row.sink, attempts, err))
        expired += _expire_grouped(engine, row)
    else:
        _release(engine, row.id, DeliveryState.FAILED, next_at)
        report.failed += 1
    report.errors.append(err)


def _sender(
    sink: Sink, alert: s.Alert, sink_cfg: SinkConfig, cfg: FinsentConfig, session: Session
) -> tuple[Callable[[], str | None], IncidentMessage | None]:
    """How this alert goes out: a sentiment alert as its incident's message (returning the reference that later
    messages thread under), source health as a plain notice."""
    if is_health(alert):
        subject, body = render_health(alert)

        def notice() -> None:
            sink.notice(subject, body)

        return notice, None
    view = build_message(session, alert, sink_cfg, cfg)
    return (lambda: sink.send(view)), view


def _count_pending(engine: Engine, cfg: FinsentConfig, report: DeliveryReport) -> None:
    D = s.AlertDelivery
    names = [sc.name for sc in cfg.sinks]
    with session_scope(engine) as session:
        rows = session.execute(
            select(D.sink, func.count())
            .where(D.sink.in_(names), D.status.in_((*OPEN_STATES, DeliveryState.SENDING)))
            .group_by(D.sink)
        ).all()
    for name in names:
        report.per_sink.setdefault(name, SinkCounts())
    for name, n in rows:
        report.per_sink[name].pending = int(n)


def _failing_sinks(engine: Engine, cfg: FinsentConfig, now: datetime) -> dict[str, datetime]:
    """Sinks with undelivered alerts whose every attempt since their last success has failed for at least
    `failing_after_minutes`: sink name -> when the failures began (the outage's identity)."""
    D, A = s.AlertDelivery, s.DeliveryAttempt
    out: dict[str, datetime] = {}
    with session_scope(engine) as session:
        for sc in cfg.sinks:
            open_rows = session.scalar(
                select(func.count()).where(D.sink == sc.name, D.status.in_((*OPEN_STATES, DeliveryState.SENDING)))
            )
            if not open_rows:
                continue
            last_ok = session.scalar(
                select(func.max(A.attempted_at)).join(D, D.id == A.delivery_id).where(D.sink == sc.name, A.ok)
            )
            q = select(func.min(A.attempted_at)).join(D, D.id == A.delivery_id).where(D.sink == sc.name, ~A.ok)
            if last_ok is not None:
                q = q.where(A.attempted_at > last_ok)
            since = session.scalar(q)
            if since is not None and now - since >= timedelta(minutes=sc.failing_after_minutes):
                out[sc.name] = since
    return out


def _notice_expired(
    engine: Engine,
    cfg: FinsentConfig,
    expired: list[ExpiredDelivery],
    failing: dict[str, datetime],
    built: dict[str, Sink],
    report: DeliveryReport,
    now: datetime,
) -> None:
    sinks = sorted({e.sink for e in expired})
    report.problems.append(f"{len(expired)} alert deliveries expired undelivered ({', '.join(sinks)})")
    lines = [f"{len(expired)} alert deliveries gave up without delivering; these alerts did NOT reach their sink:"]
    with session_scope(engine) as session:
        for e in expired[:50]:
            row = session.get(s.Alert, e.alert_id)
            title = alert_title(row, cfg) if row is not None else e.alert_id
            lines.append(
                f"- {title} (alert {e.alert_id}) to {e.sink}: {e.attempts} attempts, "
                f"last error: {e.last_error or 'n/a'}"
            )
    if len(expired) > 50:
        lines.append(f"... and {len(expired) - 50} more")
    lines.append("See them with: finsent alerts list")
    ids = ",".join(str(e.delivery_id) for e in expired)
    key = f"{NoticeKind.DELIVERY_EXPIRED}:{hashlib.sha256(ids.encode()).hexdigest()[:32]}"
    subject = f"[finsent] {len(expired)} alert(s) could not be delivered to {', '.join(sinks)}"
    _notice(
        engine, cfg, key, NoticeKind.DELIVERY_EXPIRED, subject, "\n".join(lines), {*sinks, *failing}, built, report, now
    )


def _notice_failing_sink(
    engine: Engine,
    cfg: FinsentConfig,
    name: str,
    since: datetime,
    now: datetime,
    failing: dict[str, datetime],
    built: dict[str, Sink],
    report: DeliveryReport,
) -> None:
    minutes = int((now - since).total_seconds() // 60)
    pending = report.per_sink.get(name, SinkCounts()).pending
    report.problems.append(f"sink {name} has failed every delivery for {minutes} min ({pending} pending)")
    D = s.AlertDelivery
    with session_scope(engine) as session:
        last_error = session.scalar(
            select(D.last_error)
            .where(D.sink == name, D.last_error.is_not(None))
            .order_by(D.last_attempt_at.desc())
            .limit(1)
        )
    body = "\n".join(
        [
            f"Sink {name} has failed every delivery since {since:%Y-%m-%d %H:%M} UTC ({minutes} min).",
            f"{pending} alert(s) are waiting for it; they are retried until they expire.",
            f"Last error: {last_error or 'n/a'}",
        ]
    )
    key = f"{NoticeKind.SINK_FAILING}:{name}:{since.isoformat()}"
    _notice(
        engine,
        cfg,
        key,
        NoticeKind.SINK_FAILING,
        f"[finsent] alert sink {name} is failing",
        body,
        set(failing),
        built,
        report,
        now,
    )


def queue_failed_documents_notice(
    engine: Engine, version: str, failed: Sequence[tuple[int, str]], now: datetime
) -> None:
    """Queue one operator notice for documents a scoring step failed for good (id, reason); the next notify run
    sends it. The scoring step has no sinks at hand, and a GPU worker may not reach them."""
    ids = ",".join(str(i) for i, _ in failed)
    key = f"{NoticeKind.DOCUMENTS_FAILED}:{version}:{hashlib.sha256(ids.encode()).hexdigest()[:32]}"
    lines = [f"{len(failed)} document(s) failed to score with model {version} and have no sentiment:"]
    lines += [f"- document {i}: {reason}" for i, reason in failed[:20]]
    if len(failed) > 20:
        lines.append(f"... and {len(failed) - 20} more")
    lines.append(f"Score them again (after fixing the cause) with: finsent documents retry --model {version}")
    subject = f"[finsent] {len(failed)} document(s) failed to score with {version}"
    claim_notice(engine, key, NoticeKind.DOCUMENTS_FAILED, subject, "\n".join(lines), now, queue=True)


# --- operator notices ----------------------------------------------------------------------------


def claim_notice(
    engine: Engine,
    key: str,
    kind: NoticeKind,
    subject: str,
    body: str,
    now: datetime | None = None,
    *,
    exclude: Collection[str] = (),
    queue: bool = False,
) -> bool:
    """Record a notice under its dedupe key; True if this caller is the first. Claimed (`sending`), the caller
    must send it and then call `record_notice`; with `queue` it waits (`pending`) for the next notify run,
    for steps that have no sinks at hand (scoring). A claim whose sender died is taken over after CLAIM_LEASE."""
    at = now or datetime.now(UTC)
    with session_scope(engine) as session:
        res = session.execute(
            _insert(session, s.OperatorNotice)
            .values(
                key=key[:300],
                kind=kind,
                subject=subject,
                body=body[:20000],
                created_at=at,
                sent_to=[],
                errors=[],
                status=NoticeState.PENDING if queue else NoticeState.SENDING,
                attempts=0,
                last_attempt_at=None if queue else datetime.now(UTC),
                next_attempt_at=at if queue else None,
                exclude=sorted(exclude),
            )
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(s.OperatorNotice.id)
        )
        return res.scalar() is not None


def record_notice(
    engine: Engine,
    key: str,
    sent_to: Sequence[str],
    errors: Sequence[str],
    now: datetime | None = None,
    *,
    max_attempts: int = NOTICE_MAX_ATTEMPTS,
    backoff_cap: timedelta = BACKOFF_MAX,
) -> NoticeState:
    """Confirm one attempt of a claimed notice: `sent_to` the sinks it reached now, `errors` one entry per
    sink it missed. Sent when it missed none; else retried (to the missed sinks only) after a backoff, until
    `max_attempts`, then `failed` for good. Returns the new state."""
    at = now or datetime.now(UTC)
    N = s.OperatorNotice
    with session_scope(engine) as session:
        row = session.scalars(select(N).where(N.key == key[:300]).with_for_update()).one_or_none()
        if row is None:
            return NoticeState.FAILED
        attempts = (row.attempts or 0) + 1
        if not errors:
            state, next_at = NoticeState.SENT, None
        elif attempts >= max_attempts:
            state, next_at = NoticeState.FAILED, None
        else:
            state, next_at = NoticeState.RETRYING, at + backoff(attempts, backoff_cap)
        row.sent_to = [*(row.sent_to or []), *(n for n in sent_to if n not in (row.sent_to or []))]
        row.errors = list(errors)
        row.status, row.attempts, row.last_attempt_at, row.next_attempt_at = state, attempts, at, next_at
        return state


def broadcast_notice(
    cfg: FinsentConfig, subject: str, body: str, exclude: Collection[str] = (), sinks: dict[str, Sink] | None = None
) -> tuple[list[str], list[str]]:
    """Send a notice to every configured sink not excluded; returns (sinks reached, errors). Never raises."""
    reached: list[str] = []
    errors: list[str] = []
    for sc in cfg.sinks:
        if sc.name in exclude:
            continue
        try:
            sink = (sinks or {}).get(sc.name) or build_sink(sc)
            sink.notice(subject, body)
        except Exception as e:  # noqa: BLE001  (a notice must never mask what it reports)
            err = str(e) if isinstance(e, DeliveryError) else f"sink {sc.name}: {type(e).__name__}"
            errors.append(err)
            log.error("operator notice %r not sent: %s", subject, err)
        else:
            reached.append(sc.name)
    return reached, errors


def pager_sinks(cfg: FinsentConfig, names: Collection[str]) -> list[str]:
    """The sinks among `names` that reach a person (not the console, which only a log reader sees)."""
    kinds = {sc.name: sc.kind for sc in cfg.sinks}
    return [n for n in names if kinds.get(n) != "console"]


def _notice(
    engine: Engine,
    cfg: FinsentConfig,
    key: str,
    kind: NoticeKind,
    subject: str,
    body: str,
    exclude: Collection[str],
    built: dict[str, Sink],
    report: DeliveryReport,
    now: datetime,
) -> None:
    """Claim, send, confirm: a notice that misses its sinks now is retried by `_retry_notices` later."""
    if not claim_notice(engine, key, kind, subject, body, now, exclude=exclude):
        return  # already told (an earlier cycle, or a concurrent run), or queued for retry there
    _send_claimed(engine, cfg, key, subject, body, exclude, (), built, report, now)


def _send_claimed(
    engine: Engine,
    cfg: FinsentConfig,
    key: str,
    subject: str,
    body: str,
    exclude: Collection[str],
    reached_before: Collection[str],
    built: dict[str, Sink],
    report: DeliveryReport,
    now: datetime,
) -> None:
    reached, errors = broadcast_notice(cfg, subject, body, {*exclude, *reached_before}, built)
    n = cfg.notices
    state = record_notice(
        engine, key, reached, errors, now,
        max_attempts=n.max_attempts, backoff_cap=timedelta(minutes=n.backoff_max_minutes),
    )  # fmt: skip
    if reached:
        report.notices.append(subject)
    if state == NoticeState.FAILED:
        report.problems.append(
            f"operator notice {subject!r} gave up after {n.max_attempts} attempts: {'; '.join(errors)}"
        )
    elif state == NoticeState.RETRYING:
        report.problems.append(f"operator notice {subject!r} not delivered yet (retried): {'; '.join(errors)}")
    if (reached or state != NoticeState.RETRYING) and not pager_sinks(cfg, [*reached_before, *reached]):
        report.problems.append(f"operator notice {subject!r} reached no sink besides the console")


def _retry_notices(
    engine: Engine, cfg: FinsentConfig, now: datetime, built: dict[str, Sink], report: DeliveryReport
) -> None:
    """Send the notices that are due: queued ones, ones that missed a sink (to the missed sinks only), and
    claims left by a sender that died. Each is claimed first, so concurrent notifiers send it once."""
    N = s.OperatorNotice
    due = or_(
        and_(N.status.in_(NOTICE_OPEN), or_(N.next_attempt_at.is_(None), N.next_attempt_at <= now)),
        and_(N.status == NoticeState.SENDING, N.last_attempt_at < _lease_expired_before()),
    )
    with session_scope(engine) as session:
        rows = session.execute(select(N.id, N.key).where(due).order_by(N.created_at, N.id)).all()
    for notice_id, key in rows:
        with session_scope(engine) as session:
            claimed = cast(
                CursorResult[Any],
                session.execute(
                    update(N)
                    .where(N.id == notice_id, due)
                    .values(status=NoticeState.SENDING, last_attempt_at=datetime.now(UTC))
                    .execution_options(synchronize_session=False)
                ),
            ).rowcount
            if claimed != 1:
                continue
            row = session.get_one(N, notice_id)
            subject, body, exclude, reached = row.subject, row.body, list(row.exclude or []), list(row.sent_to or [])
        log.info("operator notice %s: retrying (reached so far: %s)", key, ", ".join(reached) or "none")
        _send_claimed(engine, cfg, key, subject, body, exclude, reached, built, report, now)


def summary_line(report: DeliveryReport) -> str:
    """Per-sink counts for the CLI and logs, e.g. 'slack: 0 sent, 2 pending, 1 failed; console: 2 sent, ...'."""
    return (
        "; ".join(
            f"{name}: {c.sent} sent, {c.pending} pending, {c.failed} failed" for name, c in report.per_sink.items()
        )
        or "no sinks"
    )
