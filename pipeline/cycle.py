"""The step layer: one monitoring cycle (ingest -> score -> detect -> deliver) as separate steps.

`finsent run` calls `run_cycle`; each Airflow task (pipeline.orchestrate, the thin adapter) calls one
step. Steps take a config and an engine and never dispose them. Each step opens its own transactions,
so a failure in a later step never loses what an earlier one stored: documents are committed before
scoring, scores chunk by chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from pipeline import store
from pipeline.config import FinsentConfig, SourceConfig
from pipeline.records import AlertRecord, CycleSummary, FetchResult, RunStatus, ScoreRow, ScoringStatus
from pipeline.store.runs import Heartbeat

if TYPE_CHECKING:
    from pipeline.notify import DeliveryReport
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
    not_scored: dict[str, int] = field(default_factory=dict)  # ScoringStatus (failed, skipped_*) -> documents


@dataclass(slots=True)
class StepTimer:
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def open_engine(cfg: FinsentConfig) -> Engine:
    return store.make_engine(cfg.database_url.get_secret_value())


def ingest_source(cfg: FinsentConfig, engine: Engine, name: str, run_id: int | None = None) -> IngestOutcome:
    """Fetch one source and commit its new documents; a broken feed is recorded, never raised."""
    src = cfg.source(name)
    etag, last_modified = _prepare_source(cfg, engine, src)
    return _save_fetch(engine, _fetch(cfg, src, etag, last_modified), run_id)


def _prepare_source(cfg: FinsentConfig, engine: Engine, src: SourceConfig) -> tuple[str | None, str | None]:
    """Register the source (and the watchlist's company names) and read its conditional-GET validators."""
    with store.session_scope(engine) as session:
        store.ensure_sources(session, [src])
        store.save_companies(session, cfg.watchlist)
        return store.source_validators(session, src.name)


def _fetch(cfg: FinsentConfig, src: SourceConfig, etag: str | None, last_modified: str | None) -> FetchResult:
    from pipeline.ingest import fetch_source

    return fetch_source(
        src,
        cfg.watchlist,
        etag=etag,
        last_modified=last_modified,
        user_agent=cfg.user_agent,
        privacy=cfg.ingest.privacy,
    )


def _save_fetch(engine: Engine, result: FetchResult, run_id: int | None) -> IngestOutcome:
    name = result.source
    with store.session_scope(engine) as session:
        saved = store.save_fetch(session, result, run_id=run_id)
    if result.status == "failed":
        log.error("source %s failed: %s", name, result.error)
    else:
        log.info("source %s: %s, %d entries, %d new", name, result.status, result.entries_seen, saved.new_documents)
    return IngestOutcome(name, result.status, saved.new_documents, result.entries_seen, result.error)


def ingest_all(
    cfg: FinsentConfig, engine: Engine, names: Sequence[str] | None = None, run_id: int | None = None
) -> list[IngestOutcome]:
    """Fetch sources concurrently (cfg.ingest.max_workers), so a slow host costs only its own deadline; the
    database work stays on this thread (SQLite has one writer). Outcomes come back in source order."""
    wanted = names if names is not None else [s.name for s in cfg.sources if s.enabled]
    sources = [cfg.source(n) for n in wanted]
    validators = {src.name: _prepare_source(cfg, engine, src) for src in sources}
    results: dict[str, IngestOutcome] = {}
    workers = max(1, min(cfg.ingest.max_workers, len(sources)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        futures = {pool.submit(_fetch, cfg, src, *validators[src.name]): src for src in sources}
        for future in as_completed(futures):
            src = futures[future]
            try:
                result = future.result()
            except Exception as e:  # fetch_source turns feed problems into results; this is a last guard
                log.debug("traceback", exc_info=True)
                error = f"source {src.name!r}: fetch crashed: {type(e).__name__}"
                result = FetchResult(source=src.name, status="failed", error=error)
            results[src.name] = _save_fetch(engine, result, run_id)
    return [results[src.name] for src in sources]


def resolve_model(cfg: FinsentConfig, engine: Engine) -> str:
    """Which model `run` uses: an explicit config/env path, else the registry's production model, else the bundled
    one."""
    from pipeline.registry import resolve_model_path

    with store.session_scope(engine) as session:
        return resolve_model_path(cfg, session)


def load_scorer(cfg: FinsentConfig, engine: Engine | None = None, path: str | None = None) -> Scorer:
    from pipeline.logsetup import quiet_model_libraries
    from pipeline.score import Scorer, default_threads

    quiet_model_libraries()

    target = path or (resolve_model(cfg, engine) if engine is not None else cfg.model.path)
    return Scorer.load(
        target,
        device=cfg.model.device,
        max_length=cfg.model.max_length,
        batch_size=cfg.model.batch_size,
        languages=cfg.model.languages,
        max_chars=cfg.model.max_chars,
        threads=cfg.model.threads or default_threads(),
        precision=cfg.model.precision,
    )


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
    cfg: FinsentConfig,
    engine: Engine,
    scorer: Scorer | None = None,
    shard: int = 0,
    shards: int = 1,
    load: Callable[[], Scorer] | None = None,
    now: datetime | None = None,
) -> ScoreOutcome:
    """Score every stored document the model has not scored or given up on (this shard's share), committing
    chunk by chunk. Empty, foreign-language and failing documents are recorded with the reason, never scored.
    A document that failed on a device error (out of memory) is retried by later runs with backoff, up to
    `model.score_attempts` tries; documents failed for good are told to operators (a notice the notify step
    sends; `finsent documents retry` queues them again).

    The model is loaded (`load`, else load_scorer) only when there is a document to score, so an idle
    run costs a query, not a model load. Documents scored negative get their evidence words stored
    with the score: the model is in memory here, and alerts later read them without loading it.
    """
    t = StepTimer()
    version = scorer.version if scorer is not None else current_model_version(cfg, engine)
    if scorer is not None:
        register_scorer(engine, scorer)
    total = 0
    not_scored: dict[str, int] = {}
    names = watched_names(cfg)
    from pipeline.notify import backoff, queue_failed_documents_notice

    now = now or datetime.now(UTC)
    failed_now: list[tuple[int, str]] = []
    for chunk in store.iter_unscored(engine, version, cfg.model.chunk_size, shard, shards, char_limit(cfg), now):
        if scorer is None:
            scorer = load() if load is not None else load_scorer(cfg, engine)
            register_scorer(engine, scorer)
        outcomes = scorer.assess([d.text for d in chunk])
        rows = [
            ScoreRow(d.id, scorer.version, o.prediction) for d, o in zip(chunk, outcomes, strict=True) if o.prediction
        ]
        negatives = [
            (d.id, d.text)
            for d, o in zip(chunk, outcomes, strict=True)
            if o.prediction and o.prediction.label == "negative"
        ]
        evidence = explain_negatives(scorer, negatives, names)
        with store.session_scope(engine) as session:
            written = store.save_scores(session, rows)
            final = store.defer_transient(
                session, scorer.version, [(d.id, o) for d, o in zip(chunk, outcomes, strict=True)],
                cfg.model.score_attempts, lambda n: now + backoff(n),
            )  # fmt: skip
            store.save_outcomes(session, scorer.version, final)
            store.clear_scoring_retries(session, scorer.version, [doc_id for doc_id, _ in final])
            store.save_explanations(session, scorer.version, evidence)
        total += written
        outcome_of = dict(final)
        for d in chunk:
            o = outcome_of.get(d.id)
            status = o.status if o is not None else RETRYING
            if status != ScoringStatus.SCORED:
                not_scored[status] = not_scored.get(status, 0) + 1
            if o is not None and o.status == ScoringStatus.FAILED:
                log.error("document %d failed to score with %s: %s", d.id, scorer.version, o.reason)
                failed_now.append((d.id, o.reason or ""))
        # rows written, not attempted: a document another writer scored first is not counted twice
        log.info(
            "scored %d documents (%d written, %d so far, %d explained) with %s",
            len(rows),
            written,
            total,
            len(evidence),
            scorer.version,
        )
    if scorer is None:
        log.info("nothing to score for %s: model not loaded", version)
    if not_scored:
        log.warning("not scored with %s: %s", version, ", ".join(f"{k} {v}" for k, v in sorted(not_scored.items())))
    if failed_now:
        queue_failed_documents_notice(engine, version, failed_now, now)
    return ScoreOutcome(version, total, t.elapsed, not_scored)


RETRYING = "retrying"  # ScoreOutcome.not_scored key: documents waiting for another try after a device error


def char_limit(cfg: FinsentConfig) -> int:
    """Characters of a document that ever leave the database for scoring (the Scorer cuts to the same)."""
    from pipeline.score import CHARS_PER_TOKEN

    return cfg.model.max_chars or cfg.model.max_length * CHARS_PER_TOKEN


def watched_names(cfg: FinsentConfig) -> list[str]:
    """Every watched name, ticker and alias: evidence never cites the company it is about."""
    return [x for w in cfg.watchlist for x in (w.name, w.ticker, *w.aliases)]


def explain_negatives(
    scorer: Scorer, docs: Sequence[tuple[int, str]], exclude: Sequence[str] = ()
) -> dict[int, Sequence[str]]:
    """Evidence words for documents scored negative (the only ones alerts cite), by document id."""
    from pipeline.explain import evidence_tokens

    return {doc_id: evidence_tokens(scorer, text, exclude) for doc_id, text in docs}


def current_model_version(cfg: FinsentConfig, engine: Engine) -> str:
    from pipeline.score import model_version_id

    return model_version_id(resolve_model(cfg, engine))


def detect_alerts(
    cfg: FinsentConfig, engine: Engine, as_of: datetime, model_version: str | None = None, scorer: Scorer | None = None
) -> list[AlertRecord]:
    """Refresh the rollups, store the window's spike alerts, then the model-drift alerts (notify delivers both)."""
    from pipeline import rollups
    from pipeline.detect import detect_spikes
    from pipeline.model_health import check_models

    version = model_version or (scorer.version if scorer else current_model_version(cfg, engine))
    rollups.refresh(engine, version)  # dashboards and the web app read the rollups, never a stale refresh
    alerts = detect_spikes(engine, cfg, as_of, version, scorer=scorer)
    check_models(engine, cfg, as_of, version)  # model drift per source: alerts rows, delivered by notify
    return alerts


def deliver_alerts(cfg: FinsentConfig, engine: Engine, now: datetime | None = None) -> DeliveryReport:
    """Check source health (dead or quiet sources become alerts), then deliver due alerts; the report's
    `problems` (expired deliveries, a failing sink) make the run degraded."""
    from pipeline.health import check_sources
    from pipeline.notify import deliver_pending, summary_line

    now = now or datetime.now(UTC)
    check_sources(engine, cfg, now)
    report = deliver_pending(engine, cfg, now=now)
    log.info("delivery: %s", summary_line(report))
    for problem in report.problems:
        log.error("delivery degraded: %s", problem)
    return report


def notify_summary(report: DeliveryReport) -> str:
    from pipeline.notify import summary_line

    return summary_line(report)


def run_cycle(
    cfg: FinsentConfig, as_of: datetime | None = None, engine: Engine | None = None, scorer: Scorer | None = None
) -> CycleSummary:
    """ingest -> score -> detect -> notify, recorded in pipeline_runs with per-step counts and errors.

    One cycle at a time per database: a second one raises RunLockedError before doing anything. The run
    holds a lease its heartbeat renews, so if this process dies the next cycle marks the run abandoned.
    """
    from pipeline.detect import check_as_of, window_end

    engine = engine or open_engine(cfg)
    as_of = as_of or window_end(datetime.now(UTC), cfg.detect.window_minutes)
    check_as_of(as_of, cfg.detect.window_minutes)
    store.check_schema(engine)
    with store.run_lock(engine):
        store.abandon_expired(engine)
        run_id = store.start_run(engine, "cycle", as_of - timedelta(minutes=cfg.detect.window_minutes), as_of)
        with Heartbeat(engine, run_id):
            return _leased_cycle(cfg, as_of, engine, scorer, run_id)


def _leased_cycle(
    cfg: FinsentConfig, as_of: datetime, engine: Engine, scorer: Scorer | None, run_id: int
) -> CycleSummary:
    """The steps of one cycle under its run's lease; the outcome is recorded whatever happens."""
    errors: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    status = RunStatus.FAILED
    try:
        outcomes = ingest_all(cfg, engine, run_id=run_id)
        errors += [
            {"step": "ingest", "source": o.source, "error": o.error or ""} for o in outcomes if o.status == "failed"
        ]
        counts["new_documents"] = sum(o.new_documents for o in outcomes)
        scorer = scorer or load_scorer(cfg, engine)  # one load: it scores and explains the alerts
        scored = score_pending(cfg, engine, scorer)
        counts["scored"] = scored.scored
        counts.update({f"not_scored_{k}": v for k, v in scored.not_scored.items()})
        alerts = detect_alerts(cfg, engine, as_of, scored.model_version, scorer=scorer)
        counts["alerts"] = len(alerts)
        report = deliver_alerts(cfg, engine)
        counts["delivered"] = report.sent
        errors += [{"step": "notify", "error": p} for p in report.problems]
        status = RunStatus.DEGRADED if report.degraded else (RunStatus.PARTIAL if errors else RunStatus.OK)
        return CycleSummary(
            run_id=run_id,
            fetched={o.source: o.new_documents for o in outcomes},
            failed_sources={o.source: o.error or "" for o in outcomes if o.status == "failed"},
            scored=scored.scored,
            alerts=alerts,
            delivered=counts["delivered"],
            delivery=notify_summary(report),
            problems=tuple(report.problems),
            not_scored=scored.not_scored,
        )
    except Exception as e:
        errors.append({"step": "cycle", "error": f"{type(e).__name__}: {e}"[:2000]})
        raise
    finally:
        try:
            store.finish_run(engine, run_id, status, counts, errors)
        except store.StoreError as e:
            log.error("could not record the end of run %s: %s", run_id, e)
