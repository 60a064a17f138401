"""One monitoring cycle (ingest -> score -> detect -> notify), as separate steps the CLI and DAGs call.

Each step opens its own transactions, so a failure in a later step never loses what an earlier one
stored: documents are committed before scoring, scores chunk by chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from pipeline import store
from pipeline.config import FinsentConfig
from pipeline.records import AlertRecord, CycleSummary, ScoreRow

if TYPE_CHECKING:
    from pipeline.score import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    source: str
    status: str  # ok | not_modified | failed
    new_documents: int
    entries_seen: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ScoreOutcome:
    model_version: str
    scored: int
    seconds: float


@dataclass(slots=True)
class StepTimer:
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def open_engine(cfg: FinsentConfig) -> Engine:
    return store.make_engine(cfg.database_url.get_secret_value())


def window_end(now: datetime, window_minutes: int) -> datetime:
    """The end of the last complete window at `now` (windows are aligned to the epoch)."""
    step = window_minutes * 60
    ts = int(now.timestamp()) // step * step
    return datetime.fromtimestamp(ts, UTC)


def check_as_of(as_of: datetime, window_minutes: int) -> None:
    """Reject an off-grid detection time before any work is done, naming the nearest valid ones."""
    if as_of.tzinfo is None:
        raise ValueError(f"as-of time {as_of.isoformat()} has no timezone: give UTC, e.g. {as_of.isoformat()}Z")
    before = window_end(as_of, window_minutes)
    if before != as_of:
        after = before + timedelta(minutes=window_minutes)
        raise ValueError(
            f"as-of time {as_of.isoformat()} is not on the {window_minutes}-minute window grid: "
            f"use {before:%Y-%m-%dT%H:%MZ} or {after:%Y-%m-%dT%H:%MZ}"
        )


def ingest_source(cfg: FinsentConfig, engine: Engine, name: str, run_id: int | None = None) -> IngestOutcome:
    """Fetch one source and commit its new documents; a broken feed is recorded, never raised."""
    from pipeline.ingest import fetch_source

    src = cfg.source(name)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, [src])
        store.save_companies(session, cfg.watchlist)
        etag, last_modified = store.source_validators(session, name)
    result = fetch_source(src, cfg.watchlist, etag=etag, last_modified=last_modified, user_agent=cfg.user_agent)
    with store.session_scope(engine) as session:
        saved = store.save_fetch(session, result, run_id=run_id)
    if result.status == "failed":
        log.error("source %s failed: %s", name, result.error)
    else:
        log.info("source %s: %s, %d entries, %d new", name, result.status, result.entries_seen, saved.new_documents)
    return IngestOutcome(name, result.status, saved.new_documents, result.entries_seen, result.error)


def ingest_all(cfg: FinsentConfig, engine: Engine, names: Sequence[str] | None = None, run_id: int | None = None) -> list[IngestOutcome]:
    wanted = names if names is not None else [s.name for s in cfg.sources if s.enabled]
    return [ingest_source(cfg, engine, n, run_id) for n in wanted]


def resolve_model(cfg: FinsentConfig, engine: Engine) -> str:
    """Which model `run` uses: an explicit config/env path, else the registry's production model, else the bundled one."""
    from pipeline.registry import resolve_model_path

    with store.session_scope(engine) as session:
        return resolve_model_path(cfg, session)


def load_scorer(cfg: FinsentConfig, engine: Engine | None = None, path: str | None = None) -> Scorer:
    from pipeline.score import Scorer

    target = path or (resolve_model(cfg, engine) if engine is not None else cfg.model.path)
    return Scorer.load(target, device=cfg.model.device, max_length=cfg.model.max_length, batch_size=cfg.model.batch_size)


def register_scorer(engine: Engine, scorer: Scorer) -> None:
    with store.session_scope(engine) as session:
        store.register_model(
            session,
            scorer.version,
            name=scorer.version,
            path=scorer.source,
            labels=list(scorer.labels),
            topics=list(scorer.topics) if scorer.topics else None,
            temperature=scorer.temperature,
        )


def score_pending(
    cfg: FinsentConfig, engine: Engine, scorer: Scorer | None = None, shard: int = 0, shards: int = 1
) -> ScoreOutcome:
    """Score every stored document the model has not scored yet (this shard's share), committing chunk by chunk."""
    t = StepTimer()
    scorer = scorer or load_scorer(cfg, engine)
    register_scorer(engine, scorer)
    total = 0
    for chunk in store.iter_unscored(engine, scorer.version, cfg.model.chunk_size, shard, shards):
        preds = scorer.score([d.text for d in chunk])
        rows = [ScoreRow(d.id, scorer.version, p) for d, p in zip(chunk, preds, strict=True)]
        with store.session_scope(engine) as session:
            total += store.save_scores(session, rows)
        log.info("scored %d documents (%d so far) with %s", len(rows), total, scorer.version)
    return ScoreOutcome(scorer.version, total, t.elapsed)


def current_model_version(cfg: FinsentConfig, engine: Engine) -> str:
    from pipeline.score import model_version_id

    return model_version_id(resolve_model(cfg, engine))


def detect(
    cfg: FinsentConfig, engine: Engine, as_of: datetime, model_version: str | None = None, scorer: Scorer | None = None
) -> list[AlertRecord]:
    from pipeline import rollups
    from pipeline.detect import detect_spikes

    version = model_version or (scorer.version if scorer else current_model_version(cfg, engine))
    rollups.refresh(engine, version)  # dashboards and the web app read the rollups, never a stale refresh
    return detect_spikes(engine, cfg, as_of, version, scorer=scorer)


def notify(cfg: FinsentConfig, engine: Engine, now: datetime | None = None):
    from pipeline.notify import deliver_pending

    return deliver_pending(engine, cfg, now=now)


def run_cycle(cfg: FinsentConfig, as_of: datetime | None = None, engine: Engine | None = None, scorer: Scorer | None = None) -> CycleSummary:
    """ingest -> score -> detect -> notify, recorded in pipeline_runs with per-step counts and errors."""
    engine = engine or open_engine(cfg)
    as_of = as_of or window_end(datetime.now(UTC), cfg.detect.window_minutes)
    check_as_of(as_of, cfg.detect.window_minutes)
    store.check_schema(engine)
    run_id = store.start_run(engine, "cycle", as_of - timedelta(minutes=cfg.detect.window_minutes), as_of)
    errors: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    status = "failed"
    try:
        outcomes = ingest_all(cfg, engine, run_id=run_id)
        errors += [{"step": "ingest", "source": o.source, "error": o.error or ""} for o in outcomes if o.status == "failed"]
        counts["new_documents"] = sum(o.new_documents for o in outcomes)
        scorer = scorer or load_scorer(cfg, engine)  # one load: it scores and explains the alerts
        scored = score_pending(cfg, engine, scorer)
        counts["scored"] = scored.scored
        alerts = detect(cfg, engine, as_of, scored.model_version, scorer=scorer)
        counts["alerts"] = len(alerts)
        report = notify(cfg, engine)
        counts["delivered"] = getattr(report, "sent", 0)
        status = "partial" if errors else "ok"
        return CycleSummary(
            run_id=run_id,
            fetched={o.source: o.new_documents for o in outcomes},
            failed_sources={o.source: o.error or "" for o in outcomes if o.status == "failed"},
            scored=scored.scored,
            alerts=alerts,
            delivered=counts["delivered"],
        )
    except Exception as e:
        errors.append({"step": "cycle", "error": f"{type(e).__name__}: {e}"[:2000]})
        raise
    finally:
        try:
            store.finish_run(engine, run_id, status, counts, errors)
        except store.StoreError as e:
            log.error("could not record the end of run %s: %s", run_id, e)
