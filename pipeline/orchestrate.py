"""The Airflow adapter: what each DAG task does, in terms of the steps in `pipeline.cycle`.

DAG files stay declarative and cheap to parse: every task calls one function here (named
`<dag>_<task>`-like: `monitor_detect`, `train_candidate`...), which opens its config and engine through
`task_resources` (Airflow Variables/Connections first, then env vars, so the CLI, `dag.test()` and a
bare container all work) and returns small JSON-able dicts for XCom. The monitor's work steps hold the
cycle lock `finsent run` takes (shared among themselves), so an Airflow run and a cron `finsent run`
never work on one database at once. Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, select

from pipeline import secrets, store
from pipeline.config import SHARDS_ENV as SHARDS_ENV
from pipeline.config import TRAIN_OUTPUT_ENV as TRAIN_OUTPUT_ENV
from pipeline.config import ConfigError, FinsentConfig, load_config, train_output_dir
from pipeline.config import score_shards as configured_shards
from pipeline.errors import FinsentError
from pipeline.records import RunStatus
from pipeline.store import schema as s
from pipeline.store.runs import AIRFLOW_LEASE, AIRFLOW_LOCK_WAIT

log = logging.getLogger(__name__)

CONFIG_VARIABLE = "finsent_config_path"
CONFIG_ENV = "FINSENT_CONFIG"
DB_CONN_ID = "finsent_db"
SLACK_CONN_ID = secrets.SLACK_CONN_ID
SMTP_CONN_ID = secrets.SMTP_CONN_ID
MONITOR_DAG_ID = "finsent_monitor"
RUN_KIND = f"airflow:{MONITOR_DAG_ID}"


class OrchestrationError(FinsentError, RuntimeError):
    """A DAG task cannot resolve its config or inputs; the message says which and never holds secrets."""


def _airflow_variable(key: str) -> str | None:
    """An Airflow Variable, or None outside Airflow or when it is not set."""
    try:
        from airflow.sdk import Variable

        value = Variable.get(key, default=None)
    except Exception:  # outside a task there is no supervisor to ask; the env fallback applies
        return None
    return str(value) if value not in (None, "") else None


def connection_url(conn: Any) -> str:
    """A SQLAlchemy URL from an Airflow Postgres connection (extra `options`, e.g. a search_path, kept)."""
    conn_type = (conn.conn_type or "postgres").lower()
    driver = "postgresql+psycopg" if conn_type in ("postgres", "postgresql") else conn_type
    auth = quote(conn.login or "", safe="")
    if conn.password:
        auth += ":" + quote(conn.password, safe="")
    host = conn.host or "localhost"
    port = f":{conn.port}" if conn.port else ""
    url = f"{driver}://{auth}{'@' if auth else ''}{host}{port}/{conn.schema or ''}"
    extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else {}
    params = {k: v for k, v in (extra or {}).items() if k in ("options", "sslmode", "application_name")}
    if params:
        url += "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
    return url


def config_path() -> str | None:
    return _airflow_variable(CONFIG_VARIABLE) or os.environ.get(CONFIG_ENV) or None


def database_url() -> str | None:
    conn = secrets.airflow_connection(DB_CONN_ID)
    if conn is not None and conn.host:
        return connection_url(conn)
    return os.environ.get("DATABASE_URL") or None


def load() -> FinsentConfig:
    """The config a task runs with: YAML from the Variable/env, DB URL from the connection/env.

    Sink secrets are not resolved here: pipeline.secrets reads them (env first, then the
    `finsent_slack`/`finsent_smtp` connections) at send time, so they never sit in the config object.
    """
    path = config_path()
    if path is None:
        raise OrchestrationError(
            f"no finsent config: set the Airflow Variable {CONFIG_VARIABLE!r} or the env var {CONFIG_ENV} to the YAML "
            "path"
        )
    cfg = load_config(path)
    url = database_url()
    if url:
        from pydantic import SecretStr

        cfg = cfg.model_copy(update={"database_url": SecretStr(url)})
    return cfg


@contextmanager
def _engine(cfg: FinsentConfig) -> Iterator[Engine]:
    """An engine for `cfg`, disposed on the way out (a task process must not keep pooled connections)."""
    from pipeline.cycle import open_engine

    engine = open_engine(cfg)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def task_resources(*, lock: bool = False) -> Iterator[tuple[FinsentConfig, Engine]]:
    """The config and engine one task works with, the engine disposed when it ends.

    `lock`: hold the cycle lock in shared mode (other monitor tasks run alongside; a `finsent run` on the
    same database does not), waiting up to AIRFLOW_LOCK_WAIT for a `finsent run` to finish before the task
    fails with RunLockedError (and is retried)."""
    cfg = load()
    with _engine(cfg) as engine:
        if lock:
            with store.run_lock(engine, shared=True, wait=AIRFLOW_LOCK_WAIT):
                yield cfg, engine
        else:
            yield cfg, engine


def _as_utc(value: Any) -> datetime:
    """Airflow hands pendulum datetimes; the store wants plain aware UTC datetimes."""
    if value is None:
        raise OrchestrationError("the DAG run has no data interval; trigger it with a logical date")
    return datetime.fromtimestamp(value.timestamp(), UTC)


# --- which window a DAG run processes ---------------------------------------------------------------

MONITOR_STEP = timedelta(minutes=15)  # finsent_monitor's schedule (*/15): one data interval
MANUAL_RUN_TYPES = frozenset({"manual", "asset_triggered", "asset_materialization"})


def _floor(value: datetime, step: timedelta) -> datetime:
    seconds = int(step.total_seconds())
    return datetime.fromtimestamp(int(value.timestamp()) // seconds * seconds, UTC)


def run_window(dag_run: Any, step: timedelta = MONITOR_STEP) -> tuple[datetime, datetime]:
    """The (start, end) a DAG run processes, meaning what the operator meant.

    Scheduled and backfill runs keep their data interval. Airflow 3 gives a manual run the interval
    before its *trigger* time (and none at all without a logical date), so a manual run processes the
    latest complete interval at its logical date when it has one (`airflow dags trigger -l`), else at
    its trigger time; bounds given explicitly (REST `data_interval_start/end`) are kept.
    """
    run_type = str(getattr(getattr(dag_run, "run_type", None), "value", None) or getattr(dag_run, "run_type", "") or "")
    start, end = getattr(dag_run, "data_interval_start", None), getattr(dag_run, "data_interval_end", None)
    logical, run_after = getattr(dag_run, "logical_date", None), getattr(dag_run, "run_after", None)
    if start is not None and end is not None and run_type not in MANUAL_RUN_TYPES:
        return _as_utc(start), _as_utc(end)
    inferred_from_trigger = end is None or (run_after is not None and _as_utc(end) == _floor(_as_utc(run_after), step))
    if start is not None and end is not None and not inferred_from_trigger:
        return _as_utc(start), _as_utc(end)  # explicit bounds from the REST API
    anchor = logical if logical is not None else run_after
    window_end = _floor(_as_utc(anchor) if anchor is not None else datetime.now(UTC), step)
    return window_end - step, window_end


# --- finsent_monitor ---------------------------------------------------------------------------


def source_names() -> list[str]:
    """The enabled sources, one mapped ingest task each."""
    cfg = load()
    names = [s.name for s in cfg.sources if s.enabled]
    if not names:
        raise OrchestrationError(f"config {config_path()} has no enabled sources")
    return names


def monitor_start(interval_start: Any, interval_end: Any, airflow_run_id: str | None = None) -> int:
    """The `pipeline_runs` row for this DAG run (store.start_run: a retried start reuses the row its
    earlier try made). Runs whose lease expired (a DAG run whose `finish` never ran) are marked abandoned
    first, so a retry never adopts a dead row."""
    with task_resources() as (_, engine):
        store.abandon_expired(engine)
        return store.start_run(
            engine,
            RUN_KIND,
            _as_utc(interval_start),
            _as_utc(interval_end),
            lease=AIRFLOW_LEASE,
            airflow_run_id=airflow_run_id or None,
        )


def monitor_ingest(name: str, run_id: int | None = None) -> dict[str, Any]:
    from pipeline.cycle import ingest_source

    with task_resources(lock=True) as (cfg, engine):
        return asdict(ingest_source(cfg, engine, name, run_id=run_id))


def score_shards() -> list[int]:
    """Shard numbers for the mapped score task: FINSENT_SCORE_SHARDS (default 1), sized to the gpu pool.

    Read when the DAG file is parsed (an env lookup, no I/O), so the mapping is static per deployment.
    """
    try:
        return list(range(configured_shards()))
    except ConfigError as e:
        raise OrchestrationError(str(e)) from None


def monitor_score(shard: int = 0, shards: int = 1) -> dict[str, Any]:
    """Score this shard of everything still unscored; chunks are committed, so a killed try resumes where it stopped."""
    from pipeline.cycle import score_pending

    with task_resources(lock=True) as (cfg, engine):
        device = shard_device(cfg.model.device, shard)
        if device != cfg.model.device:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device})})
        return asdict(score_pending(cfg, engine, shard=shard, shards=shards, load=lambda: cached_scorer(cfg, engine)))


_SCORERS: dict[tuple[Any, ...], Any] = {}


def cached_scorer(cfg: FinsentConfig, engine: Engine) -> Any:
    """The scoring model, loaded at most once per worker process (and only when score_pending finds
    work); one entry, so a promoted model replaces the old one instead of piling up in memory."""
    from pipeline.cycle import load_scorer, resolve_model

    key = (resolve_model(cfg, engine), cfg.model.device, cfg.model.max_length, cfg.model.batch_size)
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = load_scorer(cfg, path=key[0])
    return _SCORERS[key]


def shard_device(configured: str | None, shard: int) -> str | None:
    """Spread score shards over the GPUs one worker sees (its N task slots share N GPUs); an explicit
    device other than plain "cuda" is kept."""
    if configured not in (None, "cuda"):
        return configured
    import torch

    n = torch.cuda.device_count()
    return f"cuda:{shard % n}" if n > 1 else configured


def xcom_items(values: Iterable[Any] | None) -> list[Any]:
    """A mapped task's results as a list. One slice request: iterating Airflow's lazy XCom sequence
    reads past the end and logs an error-level "XCom not found" for every read."""
    if values is None:
        return []
    if hasattr(values, "__getitem__") and not isinstance(values, Mapping | str):
        return list(values[:])
    return list(values)


def merge_scored(
    scored: Mapping[str, Any] | Iterable[Mapping[str, Any] | None] | None, expected: int | None = None
) -> dict[str, Any] | None:
    """One summary of the mapped score tasks; None when any shard failed. Airflow hands downstream tasks
    only the results that exist, so a failed shard shows up as fewer than `expected` parts."""
    if scored is None or isinstance(scored, Mapping):
        return dict(scored) if scored is not None else None
    parts = xcom_items(scored)
    if not parts or any(p is None for p in parts) or (expected is not None and len(parts) < expected):
        return None
    versions = {p["model_version"] for p in parts}
    if len(versions) != 1:
        raise OrchestrationError(f"score shards used different models: {sorted(versions)}")
    return {
        "model_version": versions.pop(),
        "scored": sum(int(p["scored"]) for p in parts),
        "seconds": max(float(p["seconds"]) for p in parts),
    }


def monitor_detect(interval_end: Any, model_version: str | None = None) -> dict[str, Any]:
    """Detect for the last complete window at the run's data_interval_end, so a backfill replays that window.

    The DAG runs every 15 minutes while detection windows may be longer (detect.window_minutes); the
    window end is aligned to that grid, so the runs inside one window re-check it idempotently.
    """
    from pipeline.cycle import detect_alerts
    from pipeline.detect import window_end

    with task_resources(lock=True) as (cfg, engine):
        as_of = window_end(_as_utc(interval_end), cfg.detect.window_minutes)
        with engine.connect() as c:  # the runs inside one window re-find its alerts: count only this run's
            known = set(c.scalars(select(s.Alert.id).where(s.Alert.window_end == as_of)))
        alerts = detect_alerts(cfg, engine, as_of, model_version=model_version)
    ids = [a.id for a in alerts]
    return {"as_of": as_of.isoformat(), "alerts": ids, "new_alerts": [i for i in ids if i not in known]}


class DeliveryDegraded(OrchestrationError):
    """Alerts expired undelivered or a sink keeps failing: the notify task fails (without retrying, since
    a retry would find nothing newly expired and pass) and the DAG run is marked failed."""


def monitor_notify() -> dict[str, Any]:
    """Deliver due alerts; fail the task, naming why, when delivery is degraded (the operator notice went out)."""
    from pipeline.cycle import deliver_alerts
    from pipeline.notify import summary_line

    with task_resources(lock=True) as (cfg, engine):
        report = deliver_alerts(cfg, engine)
    if report.degraded:
        message = f"alert delivery degraded: {'; '.join(report.problems)} ({summary_line(report)})"
        try:
            from airflow.sdk.exceptions import AirflowFailException
        except ImportError:
            raise DeliveryDegraded(message) from None
        raise AirflowFailException(message)
    return asdict(report)


NOT_RUN_STATES = frozenset({"skipped", "upstream_failed"})


def skipped_steps(ti: Any) -> set[str]:
    """Task ids that never ran in this task's DAG run (skipped, or upstream failed: their own code did not
    fail), mapped ones by their task id when every instance did not run; empty when unknown."""
    try:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
    except Exception as e:  # noqa: BLE001  # outside a task (or an older Airflow): no way to tell skipped from failed
        log.info("task states unavailable (%s): every missing result counts as a failure", type(e).__name__)
        return set()
    by_task: dict[str, set[str]] = {}
    for task, state in states.items():
        by_task.setdefault(re.sub(r"_\d+$", "", task), set()).add(str(getattr(state, "value", state)))
    return {task for task, seen in by_task.items() if seen and seen <= NOT_RUN_STATES}


def monitor_finish(
    run_id: int | None,
    sources: Sequence[str],
    ingested: Iterable[Mapping[str, Any] | None],
    scored: Mapping[str, Any] | Iterable[Mapping[str, Any] | None] | None,
    detected: Mapping[str, Any] | None,
    notified: Mapping[str, Any] | None,
    score_shards: int | None = None,
    airflow_run_id: str | None = None,
    skipped: Collection[str] = (),
) -> dict[str, Any]:
    """Record the run's counts and errors; raise if a step failed so the DAG run is marked failed.

    `finish` runs whatever happened upstream (trigger rule all_done), so it is also where a DAG run whose
    task died without its failure callback (SIGKILL, OOM) gets its one failure notice (`airflow_run_id`).
    A step in `skipped` (it never ran: skipped, or an upstream failed) is recorded, not blamed."""
    if run_id is None:
        message = "start_run failed, so there is no pipeline run to record"
        notify_run_failed(MONITOR_DAG_ID, airflow_run_id, "task failed: start_run", message)
        raise OrchestrationError(message)
    scored = merge_scored(scored, score_shards)
    outcomes = [o for o in (ingested or []) if o]
    errors: list[dict[str, str]] = [
        {"step": "ingest", "source": o["source"], "error": o.get("error") or ""}
        for o in outcomes
        if o["status"] == "failed"
    ]
    missing = sorted(set(sources) - {o["source"] for o in outcomes})
    errors += [{"step": "ingest", "source": n, "error": "task failed"} for n in missing]
    errors += [
        {"step": step, "error": "skipped" if step in skipped else "task failed"}
        for step, out in (("score", scored), ("detect", detected), ("notify", notified))
        if out is None
    ]
    counts = {
        "new_documents": sum(int(o["new_documents"]) for o in outcomes),
        "scored": int(scored["scored"]) if scored else 0,
        "alerts": len(detected.get("new_alerts", detected["alerts"])) if detected else 0,
        "delivered": int((notified or {}).get("sent", 0) or 0),
    }
    failed_steps = [e for e in errors if e["error"] == "task failed"]
    status = RunStatus.FAILED if failed_steps else (RunStatus.PARTIAL if errors else RunStatus.OK)
    with task_resources() as (_, engine):
        store.finish_run(engine, run_id, status, counts, errors)
    if failed_steps:
        message = f"pipeline run {run_id} failed in: {', '.join(e.get('source') or e['step'] for e in failed_steps)}"
        steps = ", ".join(e["step"] for e in failed_steps)
        notify_run_failed(MONITOR_DAG_ID, airflow_run_id, f"failed steps: {steps}", message)
        raise OrchestrationError(message)
    return {"run_id": run_id, "status": status, **counts}


# --- finsent_train -------------------------------------------------------------------------------

TRAIN_GRACE = timedelta(hours=2)


def train_due(dag_run: Any, now: datetime | None = None, grace: timedelta = TRAIN_GRACE) -> bool:
    """Whether a finsent_train run should train: a scheduled run only within `grace` of its scheduled time.

    Unpausing a DAG (or a scheduler back after an outage) makes Airflow run the latest missed interval
    at once even with catchup=False: for a weekly training that is last Sunday's run, hours or days
    late. Such a run is skipped, not failed; manual and backfill runs always train.
    """
    run_type = str(getattr(getattr(dag_run, "run_type", None), "value", None) or getattr(dag_run, "run_type", "") or "")
    if run_type != "scheduled":
        return True
    due = getattr(dag_run, "run_after", None) or getattr(dag_run, "data_interval_end", None)
    if due is None:
        return True
    late = (now or datetime.now(UTC)) - _as_utc(due)
    if late > grace:
        log.info("skipping training: run scheduled for %s started %s late (a catch-up)", _as_utc(due).isoformat(), late)
        return False
    return True


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    try:
        return _jsonable(asdict(value))
    except TypeError:
        return str(value)


def candidate_dir_name(airflow_run_id: str) -> str:
    """A folder name for a DAG run's candidate: the run id made path-safe, plus a short hash of the raw id
    so two run ids that differ only in punctuation never share a folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", airflow_run_id).strip("._-")[:80] or "run"
    return f"{safe}-{hashlib.sha256(airflow_run_id.encode()).hexdigest()[:8]}"


def _finished_candidate(run_dir: Path, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The metadata of a candidate an earlier try of this DAG run finished in `run_dir`, else None.

    `finsent.json` is written last, so without it the folder is a killed try's leftovers. A finished
    folder trained with other options is refused rather than overwritten: it may already be registered.
    """
    from pipeline.model_folder import ModelLoadError, has_meta, read_meta_dict

    if not has_meta(run_dir):
        return None
    try:
        meta = read_meta_dict(run_dir)
    except ModelLoadError:
        return None
    hyper = meta.get("hyperparameters") or {}
    differs = sorted(k for k, v in options.items() if hyper.get(k) != v)
    if differs:
        raise OrchestrationError(
            f"candidate folder {run_dir} holds a model trained with other {differs} than this run asks for; "
            "move it away or trigger a new DAG run"
        )
    return meta


def train_candidate(output_dir: str | None = None, airflow_run_id: str | None = None, **options: Any) -> dict[str, Any]:
    """Fine-tune a candidate and register it; options (limit, epochs, max_steps, base...) come from the run's params.

    Under Airflow the folder is named by the DAG run id, so a retried task finds the candidate an earlier
    try finished (and registers it, idempotently) instead of training and registering a second one.
    """
    from pipeline.logsetup import quiet_model_libraries
    from pipeline.registry import register_trained
    from pipeline.train import TrainConfig, train_model

    quiet_model_libraries()
    cfg = load()  # no engine while training (hours): one is opened to register the result
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise OrchestrationError(f"unknown train option(s) {unknown}; known: {sorted(known)}")
    options = {k: v for k, v in options.items() if v is not None}
    target = Path(output_dir) if output_dir else train_output_dir()
    run_dir = target / (
        candidate_dir_name(airflow_run_id) if airflow_run_id else datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    )
    meta = _finished_candidate(run_dir, options) if airflow_run_id else None
    if meta is not None:
        log.info("reusing candidate %s finished by an earlier try of %s", run_dir, airflow_run_id)
        path, seconds, device = (
            run_dir,
            (meta.get("training") or {}).get("seconds"),
            (meta.get("training") or {}).get("device"),
        )
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        result = train_model(
            run_dir,
            cfg.data_dir,
            TrainConfig(**options),
            database_url=cfg.database_url.get_secret_value(),
            device=cfg.model.device,
            progress=False,
        )
        path, seconds, device = result.output_dir, result.seconds, result.device
    with task_resources() as (_, engine):
        used = result.feedback_used if meta is None else (meta.get("data_sizes") or {}).get("feedback", 0)
        reported = meta is not None and "feedback" in (meta.get("metrics") or {})
        if used and not reported:  # what the analysts' corrections changed, in metrics.feedback (a retry too)
            from pipeline.data import load_feedback_rows
            from pipeline.feedback import record_feedback_report

            rows = load_feedback_rows(cfg.database_url.get_secret_value())
            log.info("feedback report: %s", record_feedback_report(path, cfg.data_dir, rows, engine).to_json())
        version = register_trained(engine, path)
    return _jsonable(
        {
            "path": str(path),
            "version": version,
            "seconds": seconds,
            "device": device,
            "limit": options.get("limit"),
            "reused": meta is not None,
        }
    )


def evaluate_candidate(trained: Mapping[str, Any]) -> dict[str, Any]:
    """Score the candidate on the fixed splits; the metrics land in the registry (not for a `limit` smoke run)."""
    from pipeline.evaluate import evaluate_model
    from pipeline.logsetup import quiet_model_libraries

    quiet_model_libraries()
    with task_resources() as (cfg, engine):
        report = evaluate_model(
            trained["path"],
            cfg.data_dir,
            engine=engine,
            baselines=False,
            limit=trained.get("limit"),
            command="finsent_train.evaluate",
        )
    model = report.results["model"]
    return {
        "version": report.version,
        "metrics": {split: {"accuracy": r.accuracy, "macro_f1": r.macro_f1, "n": r.n} for split, r in model.items()},
        "targets": _jsonable(report.targets),
        "notes": list(report.notes),
    }


def promote_candidate(trained: Mapping[str, Any], evaluated: Mapping[str, Any]) -> dict[str, Any]:
    """Promote through the registry's gate: only a candidate no worse anywhere and better on the primary split."""
    from pipeline.registry import promote_if_better

    if evaluated["version"] != trained["version"]:
        raise OrchestrationError(f"evaluated {evaluated['version']} but trained {trained['version']}")
    with task_resources() as (_, engine):
        return _jsonable(promote_if_better(engine, trained["version"]).as_dict())


# --- finsent_maintenance ------------------------------------------------------------------------


def maintain(as_of: Any) -> dict[str, Any]:
    from pipeline.maintenance import run_maintenance

    with task_resources() as (cfg, engine):
        return _jsonable(
            run_maintenance(engine, now=_as_utc(as_of), social_text_days=cfg.retention.raw_social_text_days)
        )


# --- failure notices ------------------------------------------------------------------------------


def _secrets(cfg: FinsentConfig | None) -> list[str]:
    values: list[str] = []
    if cfg is not None:
        from sqlalchemy.engine import make_url

        try:
            pw = make_url(cfg.database_url.get_secret_value()).password
            if pw:
                values.append(str(pw))
        except Exception:
            pass
        for sink in cfg.sinks:
            if sink.kind == "slack":
                values.append(secrets.slack_webhook_url(sink.webhook_url_env) or "")
            elif sink.kind == "email":
                values.append(secrets.smtp_credentials(sink.smtp_password_env, sink.smtp_user)[1] or "")
    url = os.environ.get("DATABASE_URL")
    if url:
        values.append(url)
    return sorted(set(values), key=len, reverse=True)


def redact(text: str, values: Iterable[str]) -> str:
    for v in values:
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    return text


def failure_message(context: Mapping[str, Any]) -> tuple[str, str]:
    """Subject and body for a failed task: which DAG, task, run and try, and what went wrong."""
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
    task_id = getattr(ti, "task_id", "?")
    map_index = getattr(ti, "map_index", -1)
    run_id = getattr(ti, "run_id", None) or context.get("run_id", "?")
    try_number = getattr(ti, "try_number", "?")
    exc = context.get("exception")
    what = f"{type(exc).__name__}: {exc}" if exc is not None else "no exception recorded"
    task = f"{task_id}[{map_index}]" if isinstance(map_index, int) and map_index >= 0 else str(task_id)
    subject = f"[finsent] task failed: {dag_id}.{task}"
    body = "\n".join(
        [
            f"DAG: {dag_id}",
            f"Task: {task}",
            f"Run: {run_id}",
            f"Try: {try_number}",
            f"Data interval end: {context.get('data_interval_end')}",
            f"Error: {what[:1500]}",
        ]
    )
    return subject, body


def send_notice(cfg: FinsentConfig, subject: str, body: str) -> list[str]:
    """Send an operational notice to every configured sink through pipeline.notify's sinks (the alerts'
    Slack escaping, STARTTLS and secret scrubbing); returns the sinks reached. Never raises."""
    from pipeline.sinks import DeliveryError
    from pipeline.sinks import send_notice as send_to_sink

    hidden = _secrets(cfg)
    subject, body = redact(subject, hidden), redact(body, hidden)
    reached: list[str] = []
    for sink in cfg.sinks:
        try:
            send_to_sink(sink, subject, body)
        except Exception as e:  # a notice must never mask the failure it reports
            why = str(e) if isinstance(e, DeliveryError) else f"{type(e).__name__}: {e}"
            log.error("sink %s: could not send failure notice: %s", sink.name, redact(why, hidden))
        else:
            reached.append(sink.name)
    return reached


def default_args(retries: int, retry_delay: timedelta) -> dict[str, Any]:
    """The default_args every finsent DAG shares: owner, retries, and failure notices to the sinks."""
    return {"owner": "finsent", "retries": retries, "retry_delay": retry_delay, "on_failure_callback": on_failure}


def run_notice_key(dag_id: str, airflow_run_id: str) -> str:
    """The dedupe key of a DAG run's failure notice: one notice per run, whoever notices first."""
    return f"dag_failed:{dag_id}:{airflow_run_id}"


def _claim_run_notice(cfg: FinsentConfig, key: str, subject: str, body: str) -> bool | None:
    """True: this caller sends the notice; False: it was sent already; None: the database cannot say."""
    from pipeline.notify import NoticeKind, claim_notice

    try:
        with _engine(cfg) as engine:
            return claim_notice(engine, key, NoticeKind.DAG_FAILED, subject, body)
    except Exception as e:  # noqa: BLE001  (a bad URL or a database outage must not stop the notice)
        log.error("failure notice %s not recorded: %s", key, redact(f"{type(e).__name__}: {e}", _secrets(cfg)))
        return None


def _record_run_notice(cfg: FinsentConfig, key: str, reached: list[str]) -> None:
    from pipeline.notify import record_notice

    try:
        with _engine(cfg) as engine:
            record_notice(engine, key, reached, [s.name for s in cfg.sinks if s.name not in reached])
    except Exception as e:  # noqa: BLE001  (the notice went out; only its record is missing)
        log.warning("failure notice %s sent to %s but not recorded: %s", key, reached, type(e).__name__)


def _notice_run_failure(subject: str, body: str, dag_id: str, airflow_run_id: str | None, *, unrecorded: bool) -> None:
    """Send a DAG run's failure notice unless another party (a task callback, `finish`, the DAG callback)
    already did. `unrecorded`: whether to send when the database cannot say (the party that saw the
    failure first does; later ones assume it did, so a database outage still gives one notice)."""
    try:
        cfg = load()
    except Exception as e:  # noqa: BLE001
        log.error("failure notice not sent, config unusable (%s): %s", type(e).__name__, redact(body, _secrets(None)))
        return
    if not airflow_run_id:
        send_notice(cfg, subject, body)
        return
    key = run_notice_key(dag_id, airflow_run_id)
    claimed = _claim_run_notice(cfg, key, redact(subject, _secrets(cfg)), redact(body, _secrets(cfg)))
    if claimed is False or (claimed is None and not unrecorded):
        log.info("failure notice for %s already sent (or left to the party that saw the failure)", key)
        return
    reached = send_notice(cfg, subject, body)
    if claimed:
        _record_run_notice(cfg, key, reached)


def notify_run_failed(dag_id: str, airflow_run_id: str | None, what: str, detail: str) -> None:
    """`finish`'s notice for a failed DAG run (a killed task ran no callback of its own)."""
    subject = f"[finsent] DAG run failed: {dag_id} ({what})"
    body = "\n".join([f"DAG: {dag_id}", f"Run: {airflow_run_id or '?'}", f"Error: {detail[:1500]}"])
    _notice_run_failure(subject, body, dag_id, airflow_run_id, unrecorded=False)


def on_failure(context: Mapping[str, Any]) -> None:
    """Airflow on_failure_callback: tell the configured Slack/email sinks which task failed and why
    (once per DAG run: later failures of the same run are in its `finish` record and the Airflow UI)."""
    subject, body = failure_message(context)
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
    _notice_run_failure(
        subject, body, str(dag_id), getattr(ti, "run_id", None) or context.get("run_id"), unrecorded=True
    )


def on_dag_failure(context: Mapping[str, Any]) -> None:
    """DAG-level on_failure_callback, the last resort: a DAG run that failed with no notice yet (its `finish`
    task killed too) gets one here; deduplicated with the task callbacks and `finish`."""
    dag_id = str(getattr(context.get("dag"), "dag_id", MONITOR_DAG_ID))
    run_id = context.get("run_id") or getattr(context.get("dag_run"), "run_id", None)
    reason = str(context.get("reason") or "failed")
    ti = context.get("ti") or context.get("task_instance")
    last = getattr(ti, "task_id", None)
    subject = f"[finsent] DAG run failed: {dag_id}" + (f" (last task: {last})" if last else "")
    body = "\n".join(
        [f"DAG: {dag_id}", f"Run: {run_id or '?'}", f"Reason: {reason[:500]}", f"Last task: {last or '?'}"]
    )
    _notice_run_failure(subject, body, dag_id, run_id, unrecorded=False)
