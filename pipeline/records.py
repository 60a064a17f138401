"""Small typed records passed between pipeline stages (instead of dicts of dicts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class RunStatus(StrEnum):
    """A `pipeline_runs` row's state: `running` holds a lease; `abandoned` is a run whose lease ran out."""

    RUNNING = "running"
    OK = "ok"
    PARTIAL = "partial"
    DEGRADED = "degraded"  # the work was done but an alert or notice could not be delivered
    FAILED = "failed"
    ABANDONED = "abandoned"


class ScopeKind(StrEnum):
    """The sentiment scopes detection tests and risk scores, sinks route and the dashboard views speak of."""

    MARKET = "market"
    ENTITY = "entity"
    SOURCE = "source"
    TOPIC = "topic"


class OpsScope(StrEnum):
    """`alerts.scope_kind` of operational alerts, about the pipeline rather than sentiment: every sink that
    takes their severity gets them, whatever its `scopes`."""

    HEALTH = "health"  # a dead or quiet source (pipeline.health)
    MODEL = "model"  # the model drifting on a source (pipeline.model_health)


ALERT_SCOPES: tuple[str, ...] = (*ScopeKind, *OpsScope)  # every `alerts.scope_kind`


class AlertKind(StrEnum):
    """`alerts.kind`: a sentiment episode opens (spike), gets worse (escalated) and ends (resolved); an
    operational episode opens as source_health or model_health and ends as resolved too."""

    SPIKE = "spike"
    ESCALATED = "escalated"
    RESOLVED = "resolved"
    SOURCE_HEALTH = "source_health"
    MODEL_HEALTH = "model_health"


OPEN_KINDS: tuple[AlertKind, ...] = (AlertKind.SPIKE, AlertKind.ESCALATED)  # sentiment alerts that page someone


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class DeliveryState(StrEnum):
    """`alert_deliveries.status`."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"  # an attempt failed; retried at next_attempt_at
    EXPIRED = "expired"  # given up: past expire_hours (or max_attempts), or stale when first routed
    CANCELLED = "cancelled"  # acknowledged before it was sent
    GROUPED = "grouped"  # told inside its incident's message (the lead alert's row carries the delivery)


class NoticeKind(StrEnum):
    """`operator_notices.kind`: what an operator is told about the pipeline itself."""

    DAG_FAILED = "dag_failed"
    DELIVERY_EXPIRED = "delivery_expired"
    SINK_FAILING = "sink_failing"
    DOCUMENTS_FAILED = "documents_failed"


class NoticeState(StrEnum):
    """`operator_notices.status`: claim, send, confirm, so a notice that reached nobody is not lost."""

    PENDING = "pending"  # queued by a step with no sinks at hand (scoring): the next notify run sends it
    SENDING = "sending"  # claimed by a sender; taken over after CLAIM_LEASE if that sender died
    SENT = "sent"  # every sink it was meant for has it
    RETRYING = "retrying"  # missed a sink: retried there (only there) at next_attempt_at
    FAILED = "failed"  # missed a sink after notices.max_attempts tries: on record, `finsent alerts notices`


class IncidentState(StrEnum):
    """`incidents.state`."""

    OPEN = "open"
    RESOLVED = "resolved"


def document_text(title: str, summary: str | None) -> str:
    """The text a model scores: title plus summary (one definition for ingest, storage, scoring and evidence)."""
    if summary and summary != title:
        return f"{title}. {summary}" if title else summary
    return title


@dataclass(frozen=True, slots=True)
class EntityMention:
    """A watchlist entity or cashtag found in a document's text."""

    entity: str  # canonical key: the ticker for watchlist entities, e.g. "AAPL"; "$XYZ" cashtags map to "XYZ"
    kind: str  # "watchlist" | "cashtag"
    matched: str  # the text that matched


@dataclass(frozen=True, slots=True)
class Document:
    """One normalised feed entry, ready to store."""

    source: str
    external_id: str  # feed GUID, else canonical URL, else content hash
    content_hash: str  # sha256 of normalised title+summary, for cross-source duplicate detection
    title: str
    summary: str
    link: str | None
    published_at: datetime  # timezone-aware UTC
    language: str | None = None
    entities: tuple[EntityMention, ...] = ()

    @property
    def text(self) -> str:
        return document_text(self.title, self.summary)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Outcome of fetching one source: documents on success, an error message on failure."""

    source: str
    documents: list[Document] = field(default_factory=list)
    status: str = "ok"  # "ok" | "not_modified" | "failed"
    http_status: int | None = None
    error: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    entries_seen: int = 0
    entries_skipped: int = 0


@dataclass(frozen=True, slots=True)
class Prediction:
    """Model output for one text."""

    label: str  # negative | neutral | positive
    probs: dict[str, float]  # class name -> probability, sums to 1
    topic: str | None = None
    topic_prob: float | None = None


class ScoringStatus(StrEnum):
    """What scoring did with one text; only `scored` texts have a sentiment and count in alerts."""

    SCORED = "scored"
    FAILED = "failed"  # the model raised on this text; later cycles skip it (a device error is retried first)
    SKIPPED_EMPTY = "skipped_empty"  # empty or whitespace-only: nothing to score
    SKIPPED_LANGUAGE = "skipped_language"  # a language the model was not trained for


NO_LABEL = "none"  # the label written for a text that got no sentiment (never "neutral")


@dataclass(frozen=True, slots=True)
class TextOutcome:
    """One text through the scoring input policy: a prediction only when status is `scored`."""

    status: ScoringStatus
    prediction: Prediction | None = None
    language: str | None = None  # ISO 639-1, None when too short to tell
    reason: str | None = None  # why it was not scored
    transient: bool = False  # failed on a device error (out of memory...): worth another try later

    @property
    def label(self) -> str:
        return self.prediction.label if self.prediction else NO_LABEL


@dataclass(frozen=True, slots=True)
class PendingDocument:
    """A stored document that has no score yet from the current model."""

    id: int
    text: str


@dataclass(frozen=True, slots=True)
class ScoreRow:
    document_id: int
    model_version: str
    prediction: Prediction


@dataclass(frozen=True, slots=True)
class AlertItem:
    """A negative document cited by an alert as evidence."""

    document_id: int
    title: str
    link: str | None
    source: str
    p_negative: float
    evidence: tuple[str, ...] = ()  # tokens that pushed the label, when available


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """A detected (or resolved) negative-sentiment episode for one scope and window."""

    id: str  # deterministic: same scope+window+kind -> same id
    scope_kind: str  # a ScopeKind (an OpsScope for operational alerts)
    scope_value: str  # "*" for market
    window_start: datetime
    window_end: datetime
    kind: str  # an AlertKind
    severity: str  # a Severity
    neg_count: int
    total_count: int
    neg_share: float
    baseline_share: float
    baseline_neg_rate: float  # expected negatives per window
    statistic: float  # test statistic or z-score
    p_value: float | None = None
    risk_score: float | None = None
    top_documents: tuple[AlertItem, ...] = ()
    episode_id: str | None = None


@dataclass(frozen=True, slots=True)
class CycleSummary:
    """What one monitoring cycle did, for logs, the CLI and pipeline_runs."""

    run_id: int | None
    fetched: dict[str, int]  # source -> new documents
    failed_sources: dict[str, str]  # source -> error
    scored: int
    alerts: list[AlertRecord]
    delivered: int = 0  # deliveries sent in this run, all sinks together
    delivery: str = ""  # per-sink "sent / pending / failed" line (pipeline.notify.summary_line)
    problems: tuple[str, ...] = ()  # why the run is degraded (expired deliveries, failing sinks)
    not_scored: dict[str, int] = field(default_factory=dict)  # ScoringStatus -> documents given no sentiment
