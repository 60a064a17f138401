"""Run bookkeeping: `pipeline_runs` rows with a lease, the reaper for dead runs, and the one-cycle-at-a-time lock.

A run holds a lease (`lease_expires_at`) that its process keeps pushing forward (a heartbeat). A process
that dies (SIGKILL, OOM, a lost host) stops pushing, so the next run finds the lease expired and marks the
row `abandoned` instead of leaving it `running` forever. Separately, `run_lock` makes concurrent
`finsent run`s on one database exclusive (a Postgres advisory lock, a file lock next to a SQLite file),
so only one scores and detects; Airflow monitor tasks hold it shared, so they never overlap a `finsent
run` either. The lock dies with its process, so it never needs reaping.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session

from pipeline.errors import FinsentError
from pipeline.records import RunStatus
from pipeline.store import schema as s
from pipeline.store.errors import StoreError, engine_url

log = logging.getLogger(__name__)

DEFAULT_LEASE = timedelta(minutes=10)
# An Airflow run spans tasks on several workers and only some of them heartbeat it: a lease longer than
# three score tries (30 min execution_timeout each) plus ingest and retries.
AIRFLOW_LEASE = timedelta(hours=3)
# How long an Airflow monitor task waits for a `finsent run` holding the cycle lock before it fails (and retries).
AIRFLOW_LOCK_WAIT = timedelta(minutes=5)
LOCK_NAME = "finsent.run_cycle"


class RunLockedError(FinsentError):
    """Another run holds the cycle lock on this database; nothing was done (exit 5, so cron mail says so;
    3 is a failed source, 4 degraded delivery)."""

    exit_code = 5


def owner() -> str:
    """Who holds a lease: host and process id, so an operator can find (or kill) the process."""
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def start_run(
    engine: Engine,
    kind: str,
    interval_start: datetime | None = None,
    interval_end: datetime | None = None,
    *,
    lease: timedelta = DEFAULT_LEASE,
    airflow_run_id: str | None = None,
    now: datetime | None = None,
) -> int:
    """A new `running` row holding a lease of `lease` from now.

    With an `airflow_run_id`, a retried start reuses the unfinished row an earlier try made (same kind,
    interval and Airflow run id) instead of leaving an orphan; call `abandon_expired` first so a retry
    never adopts a dead row. A DAG run cleared and run again after it finished gets a new row.
    """
    from pipeline.store import session_scope

    t = _now(now)
    P = s.PipelineRun
    with session_scope(engine) as session:
        if airflow_run_id:
            found = _unfinished_airflow_run(session, kind, interval_start, interval_end, airflow_run_id)
            if found is not None:
                log.info("pipeline run %s reused for Airflow run %s (a retried start)", found, airflow_run_id)
                session.execute(update(P).where(P.id == found).values(heartbeat_at=t, lease_expires_at=t + lease))
                return found
        run = P(
            kind=kind,
            started_at=t,
            status=RunStatus.RUNNING,
            interval_start=interval_start,
            interval_end=interval_end,
            heartbeat_at=t,
            lease_expires_at=t + lease,
            owner=owner(),
            airflow_run_id=airflow_run_id,
        )
        session.add(run)
        session.flush()
        return run.id


def _unfinished_airflow_run(
    session: Session, kind: str, start: datetime | None, end: datetime | None, airflow_run_id: str
) -> int | None:
    """The running row an earlier try of this Airflow run made; two racing tries (a zombie and its retry)
    serialise on a transaction lock on Postgres, so they still make one row."""
    P = s.PipelineRun
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"{kind}:{airflow_run_id}"))))
    return session.scalars(
        select(P.id)
        .where(
            P.kind == kind,
            P.interval_start == start,
            P.interval_end == end,
            P.status == RunStatus.RUNNING,
            P.airflow_run_id == airflow_run_id,
        )
        .order_by(P.id.desc())
        .limit(1)
    ).first()


def heartbeat(engine: Engine, run_id: int, lease: timedelta = DEFAULT_LEASE, now: datetime | None = None) -> bool:
    """Push the run's lease forward; False when the run is no longer `running` (finished, or abandoned by another)."""
    from pipeline.store import session_scope

    t = _now(now)
    with session_scope(engine) as session:
        done = session.execute(
            update(s.PipelineRun)
            .where(s.PipelineRun.id == run_id, s.PipelineRun.status == RunStatus.RUNNING)
            .values(heartbeat_at=t, lease_expires_at=t + lease)
        )
        return bool(getattr(done, "rowcount", 0))


def finish_run(engine: Engine, run_id: int, status: str, counts: dict[str, Any], errors: list[Any]) -> None:
    """Record a run's outcome. A run abandoned meanwhile (it was only presumed dead) gets its real outcome."""
    from pipeline.store import session_scope

    t = datetime.now(UTC)
    with session_scope(engine) as session:
        was = session.scalar(select(s.PipelineRun.status).where(s.PipelineRun.id == run_id))
        if was == RunStatus.ABANDONED:
            log.warning("run %s was marked abandoned (its lease expired) but finished: recording %s", run_id, status)
        session.execute(
            update(s.PipelineRun)
            .where(s.PipelineRun.id == run_id)
            .values(finished_at=t, status=RunStatus(status), counts=counts, errors=errors, heartbeat_at=t)
        )


def abandon_expired(engine: Engine, now: datetime | None = None) -> list[int]:
    """Mark every `running` row whose lease has expired as `abandoned` (its process died); returns their ids.

    Each one is logged as an error naming the run, its owner and its last heartbeat, so a killed run is seen.
    """
    from pipeline.store import session_scope

    t = _now(now)
    P = s.PipelineRun
    abandoned: list[int] = []
    with session_scope(engine) as session:
        rows = session.execute(
            select(P.id, P.kind, P.owner, P.heartbeat_at, P.errors).where(
                P.status == RunStatus.RUNNING, P.lease_expires_at < t
            )
        ).all()
        for row in rows:
            last = f"{row.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC" if row.heartbeat_at else "never"
            why = f"lease expired: no heartbeat since {last} from {row.owner or 'an unknown process'}; presumed dead"
            errors = [*(row.errors or []), {"step": "lease", "error": why}]
            done = session.execute(
                update(P)
                .where(P.id == row.id, P.status == RunStatus.RUNNING)  # a run that finished meanwhile keeps its outcome
                .values(status=RunStatus.ABANDONED, finished_at=t, errors=errors)
            )
            if getattr(done, "rowcount", 0):
                abandoned.append(row.id)
                log.error("pipeline run %s (%s) abandoned: %s", row.id, row.kind, why)
    return abandoned


class Heartbeat:
    """A daemon thread that renews a run's lease every third of it while the run's process lives."""

    def __init__(self, engine: Engine, run_id: int, lease: timedelta = DEFAULT_LEASE) -> None:
        self.engine, self.run_id, self.lease = engine, run_id, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-run-{run_id}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease.total_seconds() / 3):
            try:
                if not heartbeat(self.engine, self.run_id, self.lease):
                    log.error("pipeline run %s is no longer `running` in the database (abandoned?)", self.run_id)
            except StoreError as e:  # a busy SQLite file or a blip: the next beat retries well inside the lease
                log.warning("heartbeat of run %s failed: %s", self.run_id, e)
            except Exception as e:  # anything else too: a dead thread would get the live run marked abandoned
                log.error("heartbeat of run %s failed: %s (retrying)", self.run_id, type(e).__name__)
                log.debug("traceback", exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _holder(engine: Engine) -> str:
    """Who most likely holds the lock, for the refusal message (best effort: the newest running run)."""
    from pipeline.store import session_scope

    try:
        with session_scope(engine) as session:
            row = session.execute(
                select(s.PipelineRun.id, s.PipelineRun.kind, s.PipelineRun.owner, s.PipelineRun.started_at)
                .where(s.PipelineRun.status == RunStatus.RUNNING)
                .order_by(s.PipelineRun.id.desc())
                .limit(1)
            ).first()
    except StoreError:
        return ""
    if row is None:
        return ""
    return f" (run {row.id}, {row.kind}, by {row.owner}, started {row.started_at:%Y-%m-%d %H:%M:%S} UTC)"


@contextmanager
def run_lock(
    engine: Engine, name: str = LOCK_NAME, *, shared: bool = False, wait: timedelta = timedelta(0)
) -> Iterator[None]:
    """Hold the cycle lock for this database, or raise RunLockedError (after `wait`, polling each second).

    `finsent run` holds it exclusively; Airflow monitor tasks hold it `shared`, so they run side by side
    (mapped ingest and score tasks) but never while a `finsent run` does, and a `finsent run` never starts
    while one of them works. Postgres: a session advisory lock keyed by the name and the current schema,
    held on a connection of its own. SQLite: an flock on `<database file>.lock`. Both are released by the
    OS when the process dies.
    """
    deadline = time.monotonic() + wait.total_seconds()
    if engine.dialect.name == "postgresql":
        mode = "_shared" if shared else ""
        with engine.connect() as conn:
            key = text("SELECT hashtextextended(:name || ':' || current_schema(), 0)")
            lock_id = conn.execute(key, {"name": name}).scalar_one()
            while not conn.execute(text(f"SELECT pg_try_advisory_lock{mode}(:k)"), {"k": lock_id}).scalar_one():
                conn.commit()
                if time.monotonic() >= deadline:
                    where = f"database {engine_url(engine)}{_holder(engine)}"
                    raise RunLockedError(f"another finsent run holds the lock on {where}; nothing done")
                time.sleep(1)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text(f"SELECT pg_advisory_unlock{mode}(:k)"), {"k": lock_id})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        yield  # an in-memory or URI database: one process only, nothing to lock against
        return
    import fcntl

    path = Path(database).with_name(Path(database).name + ".lock")
    try:
        fh = path.open("a")
    except OSError as e:
        raise StoreError(f"database {engine_url(engine)}: cannot create the lock file {path}: {e.strerror}") from None
    with fh:
        while True:
            try:
                fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunLockedError(
                        f"another finsent run holds the lock {path}{_holder(engine)}; nothing done"
                    ) from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
