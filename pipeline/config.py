"""Configuration: one YAML file (sources, watchlist, thresholds, sinks) plus env overrides for secrets.

Validated on load so a typo fails fast with the file, the key and what was expected, instead of a
KeyError in the middle of a scheduled run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import UsageError
from pipeline.precision import Precision
from pipeline.records import ScopeKind, Severity

PACKAGE_DIR = Path(__file__).resolve().parent
# FINSENT_HOME: where sql/ and models/ live when the package is installed outside its checkout (e.g. the image)
PROJECT_DIR = Path(os.environ.get("FINSENT_HOME") or PACKAGE_DIR.parent).resolve()
DEFAULT_MODEL_DIR = PROJECT_DIR / "models" / "finsent-minilm"
DEFAULT_DATA_DIR = PROJECT_DIR.parent / "shared" / "data"
DEFAULT_DATABASE_URL = "sqlite:///finsent.db"


class ConfigError(UsageError, ValueError):
    """A config file or value is wrong; the message names the file, key and expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SourceKind = Literal["rss", "atom", "reddit", "stocktwits"]
# Kinds whose documents are posts by people: `retention.raw_social_text_days` removes their stored text.
SOCIAL_KINDS: tuple[SourceKind, ...] = ("reddit", "stocktwits")


class SourceConfig(_Strict):
    """One feed. Network and size limits bound what a hostile or broken host can cost (docs/reliability.md)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=100)]
    kind: SourceKind = "rss"
    url: str
    enabled: bool = True
    # one wall-clock deadline per attempt: connect, headers, every redirect hop and the body together
    timeout_s: float = Field(default=15.0, gt=0, le=300)
    max_bytes: int = Field(default=10_000_000, gt=0)  # raw and decoded (after every Content-Encoding layer)
    retries: int = Field(default=2, ge=0, le=10)
    # one wall-clock deadline for the whole fetch, every attempt and backoff together (None: 2 x timeout_s),
    # so retries cannot multiply timeout_s; an attempt never gets more than what is left of it
    deadline_s: float | None = Field(default=None, gt=0, le=900)
    max_entries: int = Field(default=20_000, gt=0)
    # Character caps per stored field, applied to the raw feed value before HTML stripping and again after.
    max_title_chars: int = Field(default=1_000, ge=16, le=100_000)
    max_summary_chars: int = Field(default=20_000, ge=16, le=1_000_000)
    max_link_chars: int = Field(default=2_000, ge=16, le=100_000)
    # published_at later than fetch time + this skew is clamped to the fetch time
    max_future_skew_s: float = Field(default=300.0, ge=0, le=86_400)
    # False: loopback, private, link-local and other non-global addresses are refused on every hop.
    # True: allowed. A list of "host" or "host:port": allowed for those targets only.
    allow_private_network: bool | list[str] = False
    # Credentials come from the environment, never the URL: header name -> env var, query param -> env var.
    headers_env: dict[str, str] = {}
    query_env: dict[str, str] = {}

    @property
    def fetch_deadline_s(self) -> float:
        """The overall deadline of one fetch across its attempts (the one place its default is decided)."""
        return self.deadline_s if self.deadline_s is not None else 2 * self.timeout_s

    @model_validator(mode="after")
    def _url_is_possible(self) -> SourceConfig:
        problem = url_problem(self.url)
        if problem:
            raise ValueError(f"source {self.name!r}: url {problem}")
        return self


def url_problem(url: str) -> str | None:
    """Why `url` cannot be fetched (scheme, host, port), or None; checked at config load so a cycle never meets it."""
    if not url.startswith(("http://", "https://", "file://")):
        return "must start with http://, https:// or file://"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"is not a valid URL ({e})"
    if parts.scheme == "file":
        return None if parts.path else "has no file path"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has port 0"
    if any(c.isspace() for c in url):
        return "contains whitespace"
    return None


class WatchlistEntity(_Strict):
    """A company to watch: documents mentioning its ticker or any alias are attributed to it."""

    ticker: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9.\-]{0,11}$")]
    name: str
    aliases: list[str] = []

    @property
    def key(self) -> str:
        return self.ticker.upper()


class DetectConfig(_Strict):
    window_minutes: int = Field(default=60, gt=0, le=7 * 24 * 60)
    baseline_days: float = Field(default=7.0, gt=0, le=90)
    min_volume: int = Field(default=5, ge=1)
    min_negative: int = Field(default=3, ge=1)
    min_share_increase: float = Field(default=0.05, ge=0, le=1)
    warning_p: float = Field(default=3e-3, gt=0, lt=1)
    critical_p: float = Field(default=1e-6, gt=0, lt=1)
    cooldown_windows: int = Field(default=3, ge=0)
    seasonality: bool = True
    scopes: list[ScopeKind] = list(ScopeKind)


class SinkConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    kind: Literal["console", "slack", "email"]
    severities: list[Severity] = [Severity.WARNING, Severity.CRITICAL]
    scopes: list[ScopeKind] = list(ScopeKind)
    # slack: the webhook URL comes from this env var or Airflow connection, never from the file
    webhook_url_env: str = "FINSENT_SLACK_WEBHOOK_URL"
    # slack bot mode (threads incident updates): used when `channel` is set and the token env var is non-empty
    bot_token_env: str = "FINSENT_SLACK_BOT_TOKEN"
    channel: str | None = None
    api_base_url: Annotated[str, Field(pattern=r"^https?://")] = "https://slack.com/api/"
    # email
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=587, gt=0, lt=65536)
    smtp_starttls: bool = True
    smtp_user: str | None = None
    smtp_password_env: str = "FINSENT_SMTP_PASSWORD"
    mail_from: str = "finsent@localhost"
    mail_to: list[str] = []
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    # delivery: retried with capped exponential backoff until expire_hours after the alert was queued;
    # max_attempts is an optional extra cap (None: only time expires a delivery)
    max_attempts: int | None = Field(default=None, ge=1)
    expire_hours: float = Field(default=24.0, gt=0)
    backoff_max_minutes: float = Field(default=30.0, gt=0, le=24 * 60)
    # a sink whose deliveries have failed without a success for this long is reported to the other sinks
    failing_after_minutes: float = Field(default=60.0, gt=0)


class NoticesConfig(_Strict):
    """Operator notices (pipeline.notify): a notice that missed a sink is retried there by later notify runs,
    with backoff 1, 2, 4 ... minutes capped at `backoff_max_minutes`, at most `max_attempts` tries in all;
    then it stays `failed` (`finsent alerts notices`)."""

    max_attempts: int = Field(default=10, ge=1, le=1000)
    backoff_max_minutes: float = Field(default=30.0, gt=0, le=24 * 60)


class HealthConfig(_Strict):
    """Source health: when a source counts as dead or quiet (pipeline.health)."""

    max_failures: int = Field(default=3, ge=1, le=1000)  # consecutive failed fetches that make a source dead
    quiet_factor: float = Field(default=4.0, ge=1)  # quiet after this many times its median gap between new items
    quiet_floor_hours: float = Field(default=6.0, gt=0)  # never quiet sooner than this
    quiet_unlearned_hours: float = Field(default=48.0, gt=0)  # the threshold until its history is learned
    history: int = Field(default=50, ge=3, le=10_000)  # recent fetches that brought something, to learn the gap
    min_history: int = Field(default=5, ge=2)  # gaps needed before the learned threshold applies


class ModelHealthConfig(_Strict):
    """Runtime model monitoring: when a source's scored windows count as drifted (pipeline.model_health)."""

    enabled: bool = True
    psi_threshold: float = Field(default=0.25, gt=0)  # PSI of a feature at least this (0.25: the usual "major shift")
    alpha: float = Field(default=1e-3, gt=0, lt=1)  # ... and a chi-square test of homogeneity below this p-value
    min_items: int = Field(default=20, ge=5)  # scored items a window needs before it is judged
    baseline_days: float = Field(default=7.0, gt=0, le=90)  # trailing baseline: this source's earlier undrifted windows
    baseline_min_items: int = Field(default=100, ge=10)  # scored items the baseline needs before any verdict
    sustained_k: int = Field(default=3, ge=1)  # alert when k of the last m judged windows drifted
    sustained_m: int = Field(default=4, ge=1)  # ... and resolve when none of the last m did
    low_confidence: float = Field(default=0.6, gt=0, lt=1)  # top probability below this is "low confidence"

    @model_validator(mode="after")
    def _k_le_m(self) -> ModelHealthConfig:
        if self.sustained_k > self.sustained_m:
            raise ValueError(f"sustained_k ({self.sustained_k}) must not exceed sustained_m ({self.sustained_m})")
        return self


class LinksConfig(_Strict):
    """Where alert messages point: the web view of an alert, a dashboard, and signed ack links."""

    base_url: Annotated[str, Field(pattern=r"^https?://")] | None = None  # `finsent serve`: {base_url}/alerts/{id}
    # e.g. "https://grafana.example.com/d/finsent?var-scope_kind={scope_kind}&var-scope_value={scope_value}&from={from_ms}&to={to_ms}"
    dashboard_url_template: str | None = None
    ack_secret_env: str = "FINSENT_ACK_SECRET"  # signs ack links and verifies nothing else; links only when set
    ack_ttl_hours: float = Field(default=7 * 24, gt=0)
    slack_signing_secret_env: str = "FINSENT_SLACK_SIGNING_SECRET"  # Slack buttons only when set


class ModelConfig(_Strict):
    path: str = str(DEFAULT_MODEL_DIR)  # local folder or Hugging Face hub id
    batch_size: int = Field(default=64, ge=1, le=4096)
    max_length: int = Field(default=128, ge=8, le=512)
    device: str | None = None  # None: cuda if available, else cpu
    chunk_size: int = Field(default=2000, ge=1)
    # languages the model scores (ISO 639-1, "*" = any); None: what the model folder declares, else ["en"]
    languages: list[str] | None = None
    max_chars: int | None = Field(default=None, ge=16)  # characters kept before tokenising; None: max_length * 12
    threads: int | None = Field(default=None, ge=1, le=256)  # torch intra-op threads; None: min(4, CPU cores)
    # tries a document gets when scoring raises a transient (device) error, with backoff, before it is failed
    score_attempts: int = Field(default=3, ge=1, le=100)
    # int8: dynamic quantisation on CPU, used only if `finsent models check-int8` recorded < 0.5 point FPB loss
    precision: Precision = "fp32"


class PrivacyConfig(_Strict):
    """Personal data masked in titles and summaries before a document is stored (docs/privacy.md lists the
    rules). Cashtags and company names are never touched; handles of watchlist companies are kept."""

    mask_emails: bool = True  # -> [email]
    mask_phones: bool = True  # -> [phone]
    mask_handles: bool = True  # @someone -> @user, u/someone -> u/user
    keep_handles: list[str] = []  # extra handles (without @) that are public accounts, kept as written


class RetentionConfig(_Strict):
    """How long stored text is kept (pipeline.maintenance, run daily; docs/privacy.md). Article bodies and
    fetch/delivery logs follow FINSENT_RETENTION_DAYS (a deployment setting, `retention_days` below)."""

    # Title, summary and link of documents from SOCIAL_KINDS sources are removed this many days after they
    # were fetched (the title becomes "[text removed after N days]"); the row, its scores, entities, rollups and
    # alerts stay. None: kept until FINSENT_RETENTION_DAYS clears the body (the title stays).
    raw_social_text_days: int | None = Field(default=None, ge=1, le=36_500)


class IngestConfig(_Strict):
    """How a cycle fetches: sources run concurrently, so a slow host costs only its own deadline."""

    max_workers: int = Field(default=8, ge=1, le=64)
    privacy: PrivacyConfig = PrivacyConfig()


class FinsentConfig(_Strict):
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    data_dir: str = str(DEFAULT_DATA_DIR)
    sources: list[SourceConfig] = []
    watchlist: list[WatchlistEntity] = []
    ingest: IngestConfig = IngestConfig()
    model: ModelConfig = ModelConfig()
    detect: DetectConfig = DetectConfig()
    sinks: list[SinkConfig] = [SinkConfig(name="console", kind="console")]
    health: HealthConfig = HealthConfig()
    notices: NoticesConfig = NoticesConfig()
    model_health: ModelHealthConfig = ModelHealthConfig()
    retention: RetentionConfig = RetentionConfig()
    links: LinksConfig = LinksConfig()
    user_agent: str = "finsent/0.1 (+https://github.com/finsent)"

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate source names: {', '.join(dupes)}")
        return v

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"no source named {name!r} in config (known: {', '.join(s.name for s in self.sources)})")


class EnvOverrides(BaseSettings):
    """Values that come from the environment, so secrets never live in the YAML file."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    database_url: SecretStr | None = None
    finsent_model: str | None = None
    finsent_data_dir: str | None = None


def env_int(name: str, default: int, what: str, env: Mapping[str, str] | None = None) -> int:
    """A whole-number (>= 1) setting from the environment; a bad value names the variable and what it counts."""
    raw = (env if env is not None else os.environ).get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={raw!r}: expected a whole number of {what} (>= 1)")
    return value


# Deployment settings that come only from the environment (they size the deployment, not the monitoring);
# this is the one place each variable is read.
MODEL_ENV = "FINSENT_MODEL"
SHARDS_ENV = "FINSENT_SCORE_SHARDS"
RETENTION_ENV = "FINSENT_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 90
TRAIN_OUTPUT_ENV = "FINSENT_TRAIN_OUTPUT"


def model_override(env: Mapping[str, str] | None = None) -> str | None:
    """FINSENT_MODEL: a model folder or hub id that wins over the registry's production model."""
    return (env if env is not None else os.environ).get(MODEL_ENV) or None


def score_shards(env: Mapping[str, str] | None = None) -> int:
    """FINSENT_SCORE_SHARDS: how many score tasks split the backlog (one per GPU), default 1."""
    return env_int(SHARDS_ENV, 1, "score shards", env)


def retention_days(env: Mapping[str, str] | None = None) -> int:
    """FINSENT_RETENTION_DAYS: how long article bodies and fetch/delivery logs are kept, default 90."""
    return env_int(RETENTION_ENV, DEFAULT_RETENTION_DAYS, "days", env)


def train_output_dir(env: Mapping[str, str] | None = None) -> Path:
    """FINSENT_TRAIN_OUTPUT: where the training DAG writes candidates, default ./models/candidates."""
    return Path((env if env is not None else os.environ).get(TRAIN_OUTPUT_ENV) or Path.cwd() / "models" / "candidates")


def _format_validation_error(path: str, err: ValidationError) -> str:
    lines = [f"invalid config {path}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{got_s}; check the spelling")
        else:
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, *, env: bool = True) -> FinsentConfig:
    """Load and validate a YAML config; with no path, the defaults (plus env overrides)."""
    raw: dict = {}
    where = str(path) if path else "(defaults)"
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at top level, got {type(loaded).__name__}")
        raw = loaded
    if env:
        ov = EnvOverrides()
        if ov.database_url is not None:
            raw["database_url"] = ov.database_url.get_secret_value()
        if ov.finsent_model:
            raw.setdefault("model", {})
            raw["model"] = {**raw["model"], "path": ov.finsent_model}
        if ov.finsent_data_dir:
            raw["data_dir"] = ov.finsent_data_dir
    try:
        return FinsentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(where, e)) from None
