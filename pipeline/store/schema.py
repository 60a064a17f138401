"""The one schema definition. Alembic migrations in sql/migrations are generated from it.

Types are chosen to work on PostgreSQL (production) and SQLite (the embedded demo default).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ColumnElement,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    literal_column,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

from pipeline.records import (
    AlertKind,
    DeliveryState,
    IncidentState,
    NoticeKind,
    NoticeState,
    OpsScope,
    RunStatus,
    ScopeKind,
    ScoringStatus,
    Severity,
)

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY, Postgres wants BIGINT for big tables.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class TZDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def one_of(column: str, *values: type[StrEnum] | tuple[str, ...]) -> CheckConstraint:
    """The CHECK constraint that a state column holds one of its enums' values (named ck_<table>_<column>),
    so the database refuses a state the code does not know; migrations 0015 and 0016 add these to older
    databases."""
    allowed = ", ".join(f"'{v}'" for group in values for v in group)
    return CheckConstraint(f"{column} IN ({allowed})", name=column)


class _Greatest(FunctionElement[float]):
    """greatest(...) on Postgres; SQLite spells it as the scalar max(...)."""

    type = Float()
    name = "greatest"
    inherit_cache = True


class _Least(FunctionElement[float]):
    type = Float()
    name = "least"
    inherit_cache = True


@compiles(_Greatest)
@compiles(_Least)
def _pg_extreme(element: FunctionElement[float], compiler: SQLCompiler, **kw: Any) -> str:
    return f"{element.name}({compiler.process(element.clauses, **kw)})"


@compiles(_Greatest, "sqlite")
@compiles(_Least, "sqlite")
def _sqlite_extreme(element: FunctionElement[float], compiler: SQLCompiler, **kw: Any) -> str:
    return f"{'max' if element.name == 'greatest' else 'min'}({compiler.process(element.clauses, **kw)})"


def margin_sql(a: Any, b: Any, c: Any) -> ColumnElement[float]:
    """The margin of three probabilities in SQL (top probability minus the runner-up), unrounded: the top minus
    the median, exactly `top - second` of `pipeline.labelqueue.margin` (no sum to subtract from, so no rounding
    error: rounding it to 4 decimals gives `margin`). `scores.margin` is this expression, computed by the
    database for every row however it was written."""
    median = _Greatest(_Least(a, b), _Least(_Greatest(a, b), c))
    return _Greatest(a, b, c) - median


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: TZDateTime, dict[str, Any]: JSONType, list[Any]: JSONType}


class Source(Base):
    """A configured feed, with the HTTP validators for conditional GET."""

    __tablename__ = "sources"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    url: Mapped[str] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(Text)
    last_modified: Mapped[str | None] = mapped_column(Text)
    last_fetched_at: Mapped[datetime | None]
    last_status: Mapped[str | None] = mapped_column(String(20))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SourceFetch(Base):
    """One fetch attempt of one source: the per-source log that makes a broken feed visible."""

    __tablename__ = "source_fetches"
    __table_args__ = (Index("ix_source_fetches_source_time", "source_name", "fetched_at"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    source_name: Mapped[str] = mapped_column(ForeignKey("sources.name", ondelete="CASCADE"), index=True)
    fetched_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(20))  # ok | not_modified | failed
    http_status: Mapped[int | None]
    entries_seen: Mapped[int] = mapped_column(default=0)
    entries_new: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint("source_name", "external_id", name="uq_documents_source_external"),
        Index("ix_documents_published_at", "published_at"),
        Index("ix_documents_content_hash", "content_hash"),
        # the labelling queue: which sources have documents in a range, and each source's seeded draw
        # (content_hash order from a threshold) with the range checked inside the index (migration 0017)
        Index("ix_documents_source_published", "source_name", "published_at"),
        Index("ix_documents_source_hash", "source_name", "content_hash", "published_at"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source_name: Mapped[str] = mapped_column(ForeignKey("sources.name", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(Text)
    summary: Mapped[str] = mapped_column(Text, default="")
    link: Mapped[str | None] = mapped_column(Text)
    published_at: Mapped[datetime]
    fetched_at: Mapped[datetime] = mapped_column(default=utcnow)
    language: Mapped[str | None] = mapped_column(String(16))
    # set when retention cleared a social post's text (pipeline.maintenance); scores and entities stay
    text_purged_at: Mapped[datetime | None]


class DocumentEntity(Base):
    __tablename__ = "document_entities"
    __table_args__ = (Index("ix_document_entities_entity_doc", "entity", "document_id"),)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True)
    entity: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # watchlist | cashtag
    matched: Mapped[str] = mapped_column(Text)


class ModelVersion(Base):
    """Registry of trained or loaded models; exactly one row may be production."""

    __tablename__ = "model_versions"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)  # local folder or hub id
    base: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[list[Any]] = mapped_column(default=list)
    topics: Mapped[list[Any] | None]
    temperature: Mapped[float | None] = mapped_column(Float)
    data_fingerprints: Mapped[dict[str, Any]] = mapped_column(default=dict)
    split_seed: Mapped[int | None]
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    is_production: Mapped[bool] = mapped_column(Boolean, default=False)
    promoted_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Score(Base):
    __tablename__ = "scores"
    __table_args__ = (
        Index("ix_scores_model_version", "model_version_id"),
        Index("ix_scores_scored_at", "scored_at"),
        # the labelling queue reads a model's scores least confident first and stops after its page (0017)
        Index("ix_scores_model_margin", "model_version_id", "margin", "document_id"),
    )
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    label: Mapped[str] = mapped_column(String(16))
    p_negative: Mapped[float] = mapped_column(Float)
    p_neutral: Mapped[float] = mapped_column(Float)
    p_positive: Mapped[float] = mapped_column(Float)
    probs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    topic: Mapped[str | None] = mapped_column(String(64))
    topic_prob: Mapped[float | None] = mapped_column(Float)
    scored_at: Mapped[datetime] = mapped_column(default=utcnow)
    # top probability minus the runner-up, generated by the database from the three probabilities (Postgres:
    # stored; SQLite: virtual, its index stores it), so no writer can leave it out or get it wrong
    margin: Mapped[float] = mapped_column(
        Float,
        Computed(margin_sql(*(literal_column(f"p_{k}") for k in ("negative", "neutral", "positive"))), persisted=True),
    )


NOT_SCORED = tuple(st.value for st in ScoringStatus if st != ScoringStatus.SCORED)


class ScoringOutcome(Base):
    """A document a model version did not score, and why (failed, empty, language); a document is
    `scored` when it has a Score row instead. Scoring skips documents listed here for that model,
    so a poison document never blocks the queue; alerts and dashboards read only `scores`."""

    __tablename__ = "scoring_outcomes"
    __table_args__ = (
        one_of("status", NOT_SCORED),
        Index("ix_scoring_outcomes_model_status", "model_version_id", "status"),
    )
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(24))  # a ScoringStatus other than scored
    reason: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(16))
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)


class ScoringRetry(Base):
    """A document whose scoring raised a transient (device) error: it is tried again at `next_attempt_at`
    (backoff), and recorded as failed in `scoring_outcomes` once `model.score_attempts` are spent."""

    __tablename__ = "scoring_retries"
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    attempts: Mapped[int]
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime]


class Explanation(Base):
    """Evidence words for a document's stored label, computed where it was scored (the model is loaded
    there anyway) so detection and alerts read them without loading the model."""

    __tablename__ = "explanations"
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    tokens: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelHealthWindow(Base):
    """What the model produced for one source in one detection window, and how far that is from the
    source's trailing baseline (pipeline.model_health); `drifted` is NULL when the window was not judged."""

    __tablename__ = "model_health_windows"
    source_name: Mapped[str] = mapped_column(ForeignKey("sources.name", ondelete="CASCADE"), primary_key=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    window_end: Mapped[datetime] = mapped_column()
    documents: Mapped[int] = mapped_column(default=0)
    scored: Mapped[int] = mapped_column(default=0)
    histograms: Mapped[dict[str, Any]] = mapped_column(default=dict)  # feature -> {bin: count}
    label_shares: Mapped[dict[str, Any]] = mapped_column(default=dict)
    mean_top_prob: Mapped[float | None] = mapped_column(Float)
    low_conf_share: Mapped[float | None] = mapped_column(Float)
    mean_text_chars: Mapped[float | None] = mapped_column(Float)
    truncated_share: Mapped[float | None] = mapped_column(Float)
    baseline_items: Mapped[int] = mapped_column(default=0)
    feature: Mapped[str | None] = mapped_column(String(16))  # the feature furthest from the baseline
    psi: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    psi_eval: Mapped[float | None] = mapped_column(Float)  # label mix vs the model's evaluation run (informational)
    drifted: Mapped[bool | None] = mapped_column(Boolean)
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)


class Feedback(Base):
    """Analyst corrections; training uses them, evaluation splits never do."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_document", "document_id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    document_id: Mapped[int | None] = mapped_column(ForeignKey("documents.id", ondelete="SET NULL"))
    text: Mapped[str | None] = mapped_column(Text)  # filled from the document when NULL
    label: Mapped[str | None] = mapped_column(String(16))
    topic: Mapped[str | None] = mapped_column(String(64))
    author: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_scope_window", "scope_kind", "scope_value", "window_end"),
        one_of("severity", Severity),
        one_of("kind", AlertKind),
        one_of("scope_kind", ScopeKind, OpsScope),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # deterministic hash of scope+window+kind
    episode_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # an AlertKind
    scope_kind: Mapped[str] = mapped_column(String(16))  # a ScopeKind or an OpsScope
    scope_value: Mapped[str] = mapped_column(String(200))
    window_start: Mapped[datetime]
    window_end: Mapped[datetime]
    severity: Mapped[str] = mapped_column(String(16))
    neg_count: Mapped[int]
    total_count: Mapped[int]
    neg_share: Mapped[float] = mapped_column(Float)
    baseline_share: Mapped[float] = mapped_column(Float)
    baseline_neg_rate: Mapped[float] = mapped_column(Float)
    statistic: Mapped[float] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    risk_score: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # top documents, evidence, model version
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    acknowledged_at: Mapped[datetime | None]
    acknowledged_by: Mapped[str | None] = mapped_column(String(100))
    incident_id: Mapped[str | None] = mapped_column(String(64), index=True)  # set by pipeline.incidents


class Incident(Base):
    """Alerts of one detection run that share evidence, continued by their escalations and resolutions.

    The id hashes the head alert's id, so reruns and backfills recompute the same incidents.
    `message_refs` keeps, per sink, the first message's reference (email Message-ID, Slack channel/ts)
    that later messages thread under.
    """

    __tablename__ = "incidents"
    __table_args__ = (one_of("severity", Severity), one_of("state", IncidentState))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    head_alert_id: Mapped[str] = mapped_column(String(64))
    head_scope_kind: Mapped[str] = mapped_column(String(16))
    head_scope_value: Mapped[str] = mapped_column(String(200))
    title: Mapped[str] = mapped_column(Text)  # fixed at opening: every message of the incident keeps it
    severity: Mapped[str] = mapped_column(String(16))  # the highest its alerts reached
    state: Mapped[str] = mapped_column(String(16))  # an IncidentState
    scopes: Mapped[list[Any]] = mapped_column(default=list)  # [{scope_kind, scope_value, episode_id, open}]
    opened_at: Mapped[datetime]  # window end of the opening run
    closed_at: Mapped[datetime | None]
    message_refs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AlertDelivery(Base):
    """One row per (alert, sink): the idempotency key that makes delivery exactly-once."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "sink", name="uq_alert_deliveries_alert_sink"),
        one_of("status", DeliveryState),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    alert_id: Mapped[str] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    sink: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)  # a DeliveryState
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryAttempt(Base):
    """Every attempt at delivery, successful or not, for audit."""

    __tablename__ = "delivery_attempts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("alert_deliveries.id", ondelete="CASCADE"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    ok: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)


class OperatorNotice(Base):
    """A notice to operators about the pipeline itself (failed DAG run, expired delivery, failing sink,
    documents that failed to score).

    The unique key is the dedupe: whoever inserts it first sends it, so one event gives one notice. A notice that
    missed a sink is retried there by later notify runs (`status`, `next_attempt_at`), never resent where it
    arrived (`sent_to`)."""

    __tablename__ = "operator_notices"
    __table_args__ = (
        UniqueConstraint("key", name="uq_operator_notices_key"),
        one_of("kind", NoticeKind),
        one_of("status", NoticeState),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(32))  # a NoticeKind
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_to: Mapped[list[Any]] = mapped_column(default=list)  # sink names reached
    errors: Mapped[list[Any]] = mapped_column(default=list)  # sinks that could not be reached, and why
    status: Mapped[str] = mapped_column(String(16), default=NoticeState.SENT, index=True)
    attempts: Mapped[int] = mapped_column(default=1)
    last_attempt_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    exclude: Mapped[list[Any] | None]  # sinks it must not go to (those whose failure it reports)


class RiskScore(Base):
    """Risk in [0, 100] per scope and window, queryable from dashboards."""

    __tablename__ = "risk_scores"
    __table_args__ = (Index("ix_risk_scores_latest", "scope_kind", "scope_value", "window_end"),)
    scope_kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    scope_value: Mapped[str] = mapped_column(String(200), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    window_end: Mapped[datetime]
    risk: Mapped[float] = mapped_column(Float)
    components: Mapped[dict[str, Any]] = mapped_column(default=dict)
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)


class Company(Base):
    """A watchlist company's display name, upserted from the config so views need no YAML."""

    __tablename__ = "companies"
    ticker: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class _RollupCounts:
    """Counts of one rollup row; mean p_negative is sum_p_negative / total_count."""

    scope_kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    scope_value: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(100), primary_key=True)
    total_count: Mapped[int]
    neg_count: Mapped[int]
    neu_count: Mapped[int]
    pos_count: Mapped[int]
    sum_p_negative: Mapped[float] = mapped_column(Float)


class SentimentHourly(_RollupCounts, Base):
    """Hourly per-scope rollup, rewritten by pipeline.rollups for the hours new scores fall in."""

    __tablename__ = "sentiment_hourly"
    __table_args__ = (Index("ix_sentiment_hourly_scope", "scope_kind", "scope_value", "bucket_start"),)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)


class SentimentDaily(_RollupCounts, Base):
    """Daily rollup, recomputed from the hourly rows of the days an update touched."""

    __tablename__ = "sentiment_daily"
    day_start: Mapped[datetime] = mapped_column(primary_key=True)


class RollupState(Base):
    """Per model: rollups are complete for every score with scored_at up to scored_through."""

    __tablename__ = "rollup_state"
    model_version: Mapped[str] = mapped_column(String(100), primary_key=True)
    scored_through: Mapped[datetime]


class PipelineRun(Base):
    __tablename__ = "pipeline_runs"
    __table_args__ = (one_of("status", RunStatus),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # cycle | ingest | score | detect | notify | train | demo
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.RUNNING, index=True)  # a RunStatus
    interval_start: Mapped[datetime | None]
    interval_end: Mapped[datetime | None]
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    errors: Mapped[list[Any]] = mapped_column(default=list)
    # The lease: a live run pushes lease_expires_at forward; once it passes, the next run marks this one abandoned.
    heartbeat_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    owner: Mapped[str | None] = mapped_column(String(200))  # host:pid of the process that holds the lease
    airflow_run_id: Mapped[str | None] = mapped_column(String(250), index=True)


metadata = Base.metadata
