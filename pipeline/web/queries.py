"""What the web pages show, as plain dataclasses: one function per page, SQLAlchemy 2 selects that run on
Postgres and the embedded SQLite alike. Pages never query the database themselves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import ColumnElement, Integer, and_, func, or_, select
from sqlalchemy.orm import Session, defer

from pipeline import rollups
from pipeline.records import OPEN_KINDS, AlertKind, ScopeKind
from pipeline.store import schema as s

T = TypeVar("T")
HOUR = timedelta(hours=1)
SPARK_DAYS = 7
SPARK_STEP = timedelta(hours=6)
MAX_RANGE = timedelta(days=92)  # the company chart's widest range: bounded work for any URL
MAX_CHART_POINTS = 24 * 14  # a longer range is drawn in coarser buckets (chart_step): bounded page size
CHART_STEPS = (1, 2, 3, 6, 12, 24)  # hours per chart bucket, each dividing a day
STALE_AFTER = timedelta(hours=6)  # a source not fetched for this long is shown as stale
MAX_HOUR_DOCS = 200
MAX_SEARCH_ROWS = 100
SEARCH_DAYS = 7  # document search's default range
CURRENT_RISK = timedelta(days=2)  # a risk score older than this before the newest data is not "current"
MAX_ALERT_ROWS = 200

SourceState = Literal["ok", "failing", "stale", "never"]
AlertStatus = Literal["open", "acknowledged", "all"]
ALERT_STATUSES: tuple[AlertStatus, ...] = ("open", "acknowledged", "all")


@dataclass(frozen=True, slots=True)
class HourPoint:
    start: datetime
    total: int
    neg: int

    @property
    def share(self) -> float | None:
        return self.neg / self.total if self.total else None


@dataclass(frozen=True, slots=True)
class CompanyRow:
    ticker: str
    name: str
    risk: float | None
    risk_at: datetime | None
    open_alerts: int
    spark: list[HourPoint]

    @property
    def volume_7d(self) -> int:
        return sum(p.total for p in self.spark)

    @property
    def neg_share_7d(self) -> float | None:
        total = self.volume_7d
        return sum(p.neg for p in self.spark) / total if total else None


@dataclass(frozen=True, slots=True)
class OpenItem:
    """What needs attention: an incident (its head alert, with the other scopes it moved) or a lone alert."""

    kind: Literal["alert", "incident"]
    id: str
    title: str
    severity: str
    scope_kind: str
    scope_value: str
    window_end: datetime
    neg_count: int
    total_count: int
    neg_share: float
    baseline_share: float
    also: tuple[str, ...] = ()  # an incident's other open scopes, most severe first


@dataclass(frozen=True, slots=True)
class SourceRow:
    name: str
    kind: str
    state: SourceState
    last_fetched_at: datetime | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ModelRow:
    id: str
    name: str
    is_production: bool
    promoted_at: datetime | None


@dataclass(frozen=True, slots=True)
class Overview:
    anchor: datetime
    open_items: list[OpenItem]
    companies: list[CompanyRow]
    sources: list[SourceRow]
    model: ModelRow | None


@dataclass(frozen=True, slots=True)
class DocRow:
    id: int
    source: str
    title: str
    link: str | None
    published_at: datetime
    label: str | None
    p_negative: float | None
    p_neutral: float | None
    p_positive: float | None
    topic: str | None
    evidence: tuple[str, ...] = ()
    entities: tuple[str, ...] = ()
    feedback: str | None = None


@dataclass(frozen=True, slots=True)
class CompanyPage:
    ticker: str
    name: str
    start: datetime
    end: datetime
    series: list[HourPoint]
    alerts: list[s.Alert]
    hour: datetime | None
    headlines: list[DocRow]
    risk: float | None
    step: timedelta = HOUR  # the chart's bucket (chart_step)


@dataclass(frozen=True, slots=True)
class SearchFilters:
    q: str = ""
    company: str = ""
    source: str = ""
    label: str = ""
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class AlertFilters:
    status: AlertStatus = "all"
    kind: str = ""
    severity: str = ""
    scope_kind: str = ""
    scope_value: str = ""


@dataclass(frozen=True, slots=True)
class Choices:
    """Values offered in filter drop-downs."""

    companies: list[tuple[str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


# --- helpers ---------------------------------------------------------------------------------------


def floor_hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_bucket(session: Session, col: Any) -> ColumnElement[Any]:
    return rollups.bucket(session, col)


def as_hour(value: Any) -> datetime:
    return rollups.as_utc(value)


def _once(session: Session, key: str, compute: Callable[[], T]) -> T:
    """Per-request invariants (the model in use, company names) read once per session, however many page
    parts ask: the session is the request's unit of work, so nothing stale outlives it."""
    memo = session.info.setdefault("finsent_web_memo", {})
    if key not in memo:
        memo[key] = compute()
    return cast(T, memo[key])


def _current_model_row(session: Session) -> s.ModelVersion | None:
    return _once(
        session,
        "model",
        lambda: session.scalar(
            select(s.ModelVersion)
            .order_by(s.ModelVersion.is_production.desc(), s.ModelVersion.created_at.desc(), s.ModelVersion.id)
            .limit(1)
        ),
    )


def current_model(session: Session) -> str | None:
    """The model the pipeline scores with: production, else the newest registered (as v_current_model)."""
    m = _current_model_row(session)
    return m.id if m is not None else None


def company_names(session: Session) -> dict[str, str]:
    return _once(
        session, "names", lambda: dict(session.execute(select(s.Company.ticker, s.Company.name)).tuples().all())
    )


def anchor_time(session: Session, now: datetime) -> datetime:
    """The end of 'the last 7 days': now, or the hour after the newest document when the data is older
    (a demo week, a paused pipeline), so pages show data rather than an empty week."""
    latest = session.scalar(select(func.max(s.Document.published_at)))
    end = min(now, latest) if latest is not None else now
    return floor_hour(end) + HOUR


def zero_filled(points: dict[datetime, tuple[int, int]], start: datetime, end: datetime) -> list[HourPoint]:
    """Every hour of [start, end): an hour without documents is a zero-volume point, never bridged."""
    out = []
    t = start
    while t < end:
        total, neg = points.get(t, (0, 0))
        out.append(HourPoint(t, total, neg))
        t += HOUR
    return out


def chart_step(start: datetime, end: datetime) -> timedelta:
    """The bucket a chart of [start, end) draws: hourly up to MAX_CHART_POINTS hours (two weeks), else the
    smallest of CHART_STEPS that keeps it under that many points (a 90-day range: 12-hour buckets)."""
    for hours in CHART_STEPS:
        step = timedelta(hours=hours)
        if (end - start) / step <= MAX_CHART_POINTS:
            return step
    return timedelta(hours=CHART_STEPS[-1])


def align(t: datetime, step: timedelta) -> datetime:
    """`t` floored to a multiple of `step` since the epoch (UTC), so buckets start at 00:00, 06:00, ..."""
    secs = int(step.total_seconds())
    return datetime.fromtimestamp(int(t.timestamp()) // secs * secs, UTC)


def series_by_entity(
    session: Session, tickers: Sequence[str], start: datetime, end: datetime, step: timedelta = HOUR
) -> dict[str, list[HourPoint]]:
    """Volume and negatives per entity for the current model in `step` buckets from `start`, zero-filled (an
    empty bucket is a zero-volume point, never bridged), read from the hourly rollup (pipeline.rollups) and
    summed in the database: the cost follows the range shown, not the history stored, and the overview's 50
    sparklines fetch 50 x 28 rows instead of 50 x 168."""
    model = current_model(session)
    n = int((end - start) / step)
    raw: dict[str, dict[int, tuple[int, int]]] = {t: {} for t in tickers}
    if model is not None and tickers:
        h = s.SentimentHourly
        secs = int(step.total_seconds())
        if session.get_bind().dialect.name == "postgresql":  # date_bin: timestamp arithmetic, no numerics
            k: Any = func.date_bin(step, h.bucket_start, start).label("k")
        else:
            epoch = func.cast(func.strftime("%s", h.bucket_start), Integer)
            k = func.floor((epoch - start.timestamp()) / secs).label("k")
        rows = session.execute(
            select(h.scope_value, k, func.sum(h.total_count), func.sum(h.neg_count))
            .where(
                h.model_version == model,
                h.scope_kind == ScopeKind.ENTITY,
                h.scope_value.in_(list(tickers)),
                h.bucket_start >= start,
                h.bucket_start < end,
            )
            .group_by(h.scope_value, k)
        ).all()
        for entity, i, total, neg in rows:
            index = int((as_hour(i) - start) / step) if isinstance(i, datetime) else int(i)
            raw[entity][index] = (int(total), int(neg))
    return {t: [HourPoint(start + i * step, *raw[t].get(i, (0, 0))) for i in range(n)] for t in tickers}


# --- pages -----------------------------------------------------------------------------------------


def open_items(session: Session, limit: int = 50) -> list[OpenItem]:
    """Unacknowledged spike/escalation alerts whose episode has not resolved, most severe and newest first, one row
    per incident (headed like its message: the most specific, most severe scope) or per alert not in one yet."""
    from pipeline.incidents import head_key, severity_key

    resolved = select(s.Alert.episode_id).where(s.Alert.kind == AlertKind.RESOLVED, s.Alert.episode_id.is_not(None))
    rows = session.scalars(
        select(s.Alert)
        .options(defer(s.Alert.details))  # evidence lists: not shown here, and parsing 200 of them costs
        .where(
            s.Alert.kind.in_(OPEN_KINDS),
            s.Alert.acknowledged_at.is_(None),
            or_(s.Alert.episode_id.is_(None), s.Alert.episode_id.not_in(resolved)),
        )
        .order_by((s.Alert.severity == "critical").desc(), s.Alert.window_end.desc(), s.Alert.id)
        .limit(limit * 4)
    ).all()
    names = company_names(session)
    groups: dict[str, list[s.Alert]] = {}  # in the query's order: the first group is the most urgent
    for a in rows:
        groups.setdefault(a.incident_id or a.id, []).append(a)
    items = []
    for members in list(groups.values())[:limit]:
        head = min(members, key=head_key)
        others = sorted((a for a in members if a is not head), key=severity_key)
        items.append(
            OpenItem(
                kind="incident" if head.incident_id else "alert",
                id=head.id,
                title=scope_title(head.scope_kind, head.scope_value, names),
                severity=min((a.severity for a in members), key=lambda v: v != "critical"),
                scope_kind=head.scope_kind,
                scope_value=head.scope_value,
                window_end=head.window_end,
                neg_count=head.neg_count,
                total_count=head.total_count,
                neg_share=head.neg_share,
                baseline_share=head.baseline_share,
                also=tuple(scope_title(a.scope_kind, a.scope_value, names) for a in others),
            )
        )
    return items


def scope_title(kind: str, value: str, names: dict[str, str]) -> str:
    if kind == ScopeKind.MARKET:
        return "Market-wide"
    if kind == ScopeKind.ENTITY:
        return f"{names[value]} ({value})" if value in names else value
    return f"{kind.capitalize()} {value}"


def source_rows(session: Session, now: datetime) -> list[SourceRow]:
    out = []
    for src in session.scalars(select(s.Source).order_by(s.Source.name)):
        state: SourceState
        if src.last_fetched_at is None:
            state = "never"
        elif src.last_status == "failed":
            state = "failing"
        elif now - src.last_fetched_at > STALE_AFTER:
            state = "stale"
        else:
            state = "ok"
        out.append(SourceRow(src.name, src.kind, state, src.last_fetched_at, src.last_error))
    return out


def model_row(session: Session) -> ModelRow | None:
    m = _current_model_row(session)
    return ModelRow(m.id, m.name, m.is_production, m.promoted_at) if m else None


def latest_risk(session: Session, tickers: Sequence[str], anchor: datetime) -> dict[str, tuple[float, datetime]]:
    """The newest risk score per entity within CURRENT_RISK before `anchor` (older is not current risk).

    One statement over an index range per entity (ix_risk_scores_latest), whatever the history."""
    if not tickers:
        return {}
    r = s.RiskScore
    recent = [r.scope_kind == ScopeKind.ENTITY, r.scope_value.in_(list(tickers)), r.window_end > anchor - CURRENT_RISK]
    newest = select(r.scope_value, func.max(r.window_end).label("w")).where(*recent).group_by(r.scope_value).subquery()
    rows = session.execute(
        select(r.scope_value, r.risk, r.window_end)
        .join(newest, and_(r.scope_value == newest.c.scope_value, r.window_end == newest.c.w))
        .where(*recent)
    ).all()
    return {v: (float(risk), w) for v, risk, w in rows}


def overview(session: Session, now: datetime) -> Overview:
    anchor = anchor_time(session, now)
    items = open_items(session)
    names = company_names(session)
    tickers = sorted(names)
    risks = latest_risk(session, tickers, anchor)
    spark = series_by_entity(session, tickers, anchor - timedelta(days=SPARK_DAYS), anchor, SPARK_STEP)
    open_count: dict[str, int] = {}
    for i in items:
        if i.scope_kind == ScopeKind.ENTITY:
            open_count[i.scope_value] = open_count.get(i.scope_value, 0) + 1
    companies = [
        CompanyRow(
            t,
            names.get(t, t),
            risks[t][0] if t in risks else None,
            risks[t][1] if t in risks else None,
            open_count.get(t, 0),
            spark[t],
        )
        for t in tickers
    ]
    companies.sort(key=lambda c: (c.risk is None, -(c.risk or 0.0), c.name.casefold()))
    return Overview(anchor, items, companies, source_rows(session, now), model_row(session))


def _evidence(alerts: Sequence[s.Alert]) -> dict[int, tuple[str, ...]]:
    out: dict[int, tuple[str, ...]] = {}
    for a in alerts:
        for d in (a.details or {}).get("top_documents", []):
            if d.get("evidence") and "document_id" in d:
                out[int(d["document_id"])] = tuple(str(x) for x in d["evidence"])
    return out


def _doc_select(model: str | None) -> Any:
    return select(s.Document, s.Score).outerjoin(
        s.Score, and_(s.Score.document_id == s.Document.id, s.Score.model_version_id == (model or ""))
    )


def _doc_rows(session: Session, rows: Sequence[Any], evidence: dict[int, tuple[str, ...]]) -> list[DocRow]:
    ids = [d.id for d, _ in rows]
    ents: dict[int, list[str]] = {}
    fb: dict[int, str] = {}
    if ids:
        for doc_id, ent in session.execute(
            select(s.DocumentEntity.document_id, s.DocumentEntity.entity).where(s.DocumentEntity.document_id.in_(ids))
        ):
            ents.setdefault(doc_id, []).append(ent)
        for fb_doc, lab in session.execute(
            select(s.Feedback.document_id, s.Feedback.label)
            .where(s.Feedback.document_id.in_(ids))
            .order_by(s.Feedback.id)
        ):
            if fb_doc is not None and lab:
                fb[fb_doc] = lab  # the newest correction wins
    return [
        DocRow(
            id=d.id,
            source=d.source_name,
            title=d.title,
            link=d.link,
            published_at=d.published_at,
            label=sc.label if sc else None,
            p_negative=sc.p_negative if sc else None,
            p_neutral=sc.p_neutral if sc else None,
            p_positive=sc.p_positive if sc else None,
            topic=sc.topic if sc else None,
            evidence=evidence.get(d.id, ()),
            entities=tuple(sorted(ents.get(d.id, []))),
            feedback=fb.get(d.id),
        )
        for d, sc in rows
    ]


def company_page(
    session: Session, ticker: str, now: datetime, start: datetime | None, end: datetime | None, hour: datetime | None
) -> CompanyPage | None:
    names = company_names(session)
    known = ticker in names or session.scalar(
        select(s.DocumentEntity.entity).where(s.DocumentEntity.entity == ticker).limit(1)
    )
    if not known:
        return None
    end = floor_hour(end) if end else anchor_time(session, now)
    start = floor_hour(start) if start else end - timedelta(days=SPARK_DAYS)
    if start >= end:
        start = end - HOUR
    start = max(start, end - MAX_RANGE)
    step = chart_step(start, end)
    if step > HOUR:  # whole buckets, so every bar sums the same number of hours
        start, end = align(start, step), align(end - HOUR, step) + step
    series = series_by_entity(session, [ticker], start, end, step)[ticker]
    alerts = list(
        session.scalars(
            select(s.Alert)
            .where(
                s.Alert.scope_kind == ScopeKind.ENTITY,
                s.Alert.scope_value == ticker,
                s.Alert.window_end > start,
                s.Alert.window_start < end,
            )
            .order_by(s.Alert.window_end)
        ).all()
    )
    if hour is None:  # default: the newest alert's window, else the hour with most negatives
        flagged = [a for a in alerts if a.kind in OPEN_KINDS]
        if flagged:
            hour = floor_hour(flagged[-1].window_end - HOUR)
        elif step == HOUR and any(p.neg for p in series):
            hour = max(series, key=lambda p: (p.neg, p.start)).start
    headlines: list[DocRow] = []
    if hour is not None:
        hour = floor_hour(hour)
        model = current_model(session)
        rows = session.execute(
            _doc_select(model)
            .join(
                s.DocumentEntity, and_(s.DocumentEntity.document_id == s.Document.id, s.DocumentEntity.entity == ticker)
            )
            .where(s.Document.published_at >= hour, s.Document.published_at < hour + HOUR)
            .order_by(s.Score.p_negative.desc(), s.Document.published_at.desc())
            .limit(MAX_HOUR_DOCS)
        ).all()
        headlines = _doc_rows(session, rows, _evidence(alerts))
    risk = latest_risk(session, [ticker], end).get(ticker)
    return CompanyPage(
        ticker, names.get(ticker, ticker), start, end, series, alerts, hour, headlines, risk[0] if risk else None, step
    )


def alert_list(session: Session, f: AlertFilters) -> list[s.Alert]:
    q = (
        select(s.Alert)
        .options(defer(s.Alert.details))  # the list shows no evidence
        .order_by(s.Alert.window_end.desc(), s.Alert.id)
        .limit(MAX_ALERT_ROWS)
    )
    if f.status == "open":
        q = q.where(s.Alert.acknowledged_at.is_(None), s.Alert.kind.in_(OPEN_KINDS))
    elif f.status == "acknowledged":
        q = q.where(s.Alert.acknowledged_at.is_not(None))
    if f.kind:
        q = q.where(s.Alert.kind == f.kind)
    if f.severity:
        q = q.where(s.Alert.severity == f.severity)
    if f.scope_kind:
        q = q.where(s.Alert.scope_kind == f.scope_kind)
    if f.scope_value:
        q = q.where(s.Alert.scope_value == f.scope_value)
    return list(session.scalars(q).all())


def search_documents(session: Session, f: SearchFilters, now: datetime) -> tuple[list[DocRow], datetime]:
    """Newest first; without a start time the last SEARCH_DAYS days, so a text search reads a bounded
    range (an index range on published_at) whatever the history. Returns the rows and the start used."""
    start = f.start or anchor_time(session, now) - timedelta(days=SEARCH_DAYS)
    q = (
        _doc_select(current_model(session))
        .order_by(s.Document.published_at.desc(), s.Document.id.desc())
        .limit(MAX_SEARCH_ROWS)
    )
    if f.q:
        pattern = f"%{like_escape(f.q.lower())}%"
        q = q.where(
            or_(
                func.lower(s.Document.title).like(pattern, escape="\\"),
                func.lower(s.Document.summary).like(pattern, escape="\\"),
            )
        )
    if f.company:
        q = q.where(
            select(s.DocumentEntity.document_id)
            .where(s.DocumentEntity.document_id == s.Document.id, s.DocumentEntity.entity == f.company)
            .exists()
        )
    if f.source:
        q = q.where(s.Document.source_name == f.source)
    if f.label:
        q = q.where(s.Score.label == f.label)
    q = q.where(s.Document.published_at >= start)
    if f.end:
        q = q.where(s.Document.published_at < f.end)
    return _doc_rows(session, session.execute(q).all(), {}), start


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def choices(session: Session) -> Choices:
    names = company_names(session)
    return Choices(
        sorted(names.items(), key=lambda kv: kv[1].casefold()),
        list(session.scalars(select(s.Source.name).order_by(s.Source.name))),
    )
