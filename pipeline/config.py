"""Configuration: one YAML file (sources, watchlist, thresholds, sinks) plus env overrides for secrets.

Validated on load so a typo fails fast with the file, the key and what was expected, instead of a
KeyError in the middle of a scheduled run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
# FINSENT_HOME: where sql/ and models/ live when the package is installed outside its checkout (e.g. the image)
PROJECT_DIR = Path(os.environ.get("FINSENT_HOME") or PACKAGE_DIR.parent).resolve()
DEFAULT_MODEL_DIR = PROJECT_DIR / "models" / "finsent-minilm"
DEFAULT_DATA_DIR = PROJECT_DIR.parent / "shared" / "data"
DEFAULT_DATABASE_URL = "sqlite:///finsent.db"


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file, key and expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=100)]
    kind: Literal["rss", "atom", "reddit", "stocktwits"] = "rss"
    url: str
    enabled: bool = True
    timeout_s: float = Field(default=15.0, gt=0, le=300)
    max_bytes: int = Field(default=10_000_000, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    max_entries: int = Field(default=20_000, gt=0)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "file://")):
            raise ValueError("must start with http://, https:// or file://")
        return v


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
    warning_p: float = Field(default=4e-3, gt=0, lt=1)
    critical_p: float = Field(default=1e-6, gt=0, lt=1)
    cooldown_windows: int = Field(default=3, ge=0)
    seasonality: bool = True
    scopes: list[Literal["market", "entity", "source", "topic"]] = ["market", "entity", "source", "topic"]


class SinkConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    kind: Literal["console", "slack", "email"]
    severities: list[Literal["info", "warning", "critical"]] = ["warning", "critical"]
    scopes: list[Literal["market", "entity", "source", "topic"]] = ["market", "entity", "source", "topic"]
    # slack: the webhook URL comes from this env var or Airflow connection, never from the file
    webhook_url_env: str = "FINSENT_SLACK_WEBHOOK_URL"
    # email
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=587, gt=0, lt=65536)
    smtp_starttls: bool = True
    smtp_user: str | None = None
    smtp_password_env: str = "FINSENT_SMTP_PASSWORD"
    mail_from: str = "finsent@localhost"
    mail_to: list[str] = []
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    max_attempts: int = Field(default=10, ge=1)
    expire_hours: float = Field(default=24.0, gt=0)


class ModelConfig(_Strict):
    path: str = str(DEFAULT_MODEL_DIR)  # local folder or Hugging Face hub id
    batch_size: int = Field(default=64, ge=1, le=4096)
    max_length: int = Field(default=128, ge=8, le=512)
    device: str | None = None  # None: cuda if available, else cpu
    chunk_size: int = Field(default=2000, ge=1)


class FinsentConfig(_Strict):
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    data_dir: str = str(DEFAULT_DATA_DIR)
    sources: list[SourceConfig] = []
    watchlist: list[WatchlistEntity] = []
    model: ModelConfig = ModelConfig()
    detect: DetectConfig = DetectConfig()
    sinks: list[SinkConfig] = [SinkConfig(name="console", kind="console")]
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
