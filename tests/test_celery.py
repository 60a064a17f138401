"""Scale-out: finsent_monitor under the CeleryExecutor, Redis on 127.0.0.1:6379 as the broker, and two
local Celery workers (one serving `default`, one serving `gpu`), against a Postgres metadata DB that the
processes share. Checks each task ran on the queue and worker it was routed to, and that the stored
results equal those of an in-process dag.test() of the same window.

The run is driven by `airflow dags test --use-executor` (the scheduler's loop in one process, tasks
shipped through Celery), so no scheduled run of an unpaused DAG can race the one under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.airflow_support import DAGS_DIR, ROOT, fresh_dag, rss, window_items, write_config
from tests.conftest import PG_BASE, migrated_schema
from tests.test_dags import _snapshot

PG_ADMIN = PG_BASE
META_DB = "airflow_test"
REDIS_DB = 7  # a Redis database of its own, flushed before the run
BOOT_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ok() -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=2).ping())
    except Exception:
        return False


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url} server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s:\n{log.read_text()[-4000:]}")


def _wait_worker(log: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        if " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"worker not ready after {timeout} s:\n{log.read_text()[-4000:]}")


class Stack:
    """Long-running processes started by this test, each stopped by its own pid (process group)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        fh = log.open("w")
        proc = subprocess.Popen(
            args, cwd=cwd or ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc, log))
        return proc, log

    def stop(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _tis(meta_url: str, run_id: str) -> list:
    eng = create_engine(meta_url)
    with eng.connect() as c:
        rows = c.execute(
            text(
                "SELECT task_id, map_index, state, queue, pool, hostname, extract(epoch FROM end_date - start_date) "
                "AS seconds "
                "FROM task_instance WHERE dag_id = 'finsent_monitor' AND run_id = :r ORDER BY start_date, map_index"
            ),
            {"r": run_id},
        ).all()
    eng.dispose()
    return rows


def _celery_compatible() -> str | None:
    """Why the Celery provider cannot load with the installed celery, or None."""
    try:
        import airflow.providers.celery.executors.celery_executor_utils  # noqa: F401
    except ImportError as e:
        import celery

        return (
            f"apache-airflow-providers-celery cannot import with celery {celery.__version__} ({e}); pin celery==5.6.3"
        )
    return None


def reset_meta_db() -> str:
    """Drop and recreate the shared Airflow metadata database; returns its URL."""
    admin = create_engine(PG_ADMIN.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {META_DB} WITH (FORCE)"))
        c.execute(text(f"CREATE DATABASE {META_DB}"))
    admin.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{META_DB}"


@contextmanager
def celery_stack(
    home: Path, meta_db_url: str, app_env: dict[str, str], default_concurrency: int = 2
) -> Iterator[CeleryStack]:
    """Migrated metadata DB, serialized DAGs, the gpu pool, an api-server and two Celery workers
    (`default` and `gpu`), all sharing `meta_db_url` and the Redis broker; stopped on exit."""
    import redis

    assert _redis_ok(), "needs Redis on 127.0.0.1:6379 (.ci/run starts it)"
    problem = _celery_compatible()
    assert problem is None, problem
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    api_port = _free_port()
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
        | {
            "AIRFLOW_HOME": str(home),
            "PYTHONPATH": str(ROOT),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_db_url,
            # psycopg 3 serves the async engine too (Airflow would otherwise pick asyncpg, not installed)
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": meta_db_url.replace(
                "postgresql+psycopg://", "postgresql+psycopg_async://"
            ),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta_db_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # each worker runs in its own directory; recording that as the TI's hostname tells them apart
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "os.getcwd",
        }
        | app_env
    )
    stack = CeleryStack(home, env)
    try:
        t0 = time.monotonic()
        for args in (["db", "migrate"], ["dags", "reserialize"], ["pools", "set", "gpu", "1", "one slot per GPU"]):
            done = subprocess.run([stack.airflow, *args], env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"airflow {' '.join(args)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        stack.setup_seconds = time.monotonic() - t0
        api, api_log = stack.start("api-server", [stack.airflow, "api-server", "--port", str(api_port)])
        for queue, concurrency in (("default", default_concurrency), ("gpu", 1)):
            stack.dirs[queue] = home / f"worker-{queue}"
            stack.dirs[queue].mkdir()
            stack.start(
                f"worker-{queue}",
                [
                    stack.airflow,
                    "celery",
                    "worker",
                    "--queues",
                    queue,
                    "--concurrency",
                    str(concurrency),
                    "--celery-hostname",
                    f"{queue}@%h",
                    "--skip-serve-logs",
                    "--without-gossip",
                    "--without-mingle",
                ],
                cwd=stack.dirs[queue],
            )
        _wait_http(f"http://127.0.0.1:{api_port}/api/v2/version", api, api_log, BOOT_TIMEOUT)
        for name, proc, log in stack.procs:
            if name.startswith("worker-"):
                _wait_worker(log, proc, BOOT_TIMEOUT)
        yield stack
    finally:
        stack.stop()


class CeleryStack(Stack):
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(workdir, env)
        self.airflow = str(Path(sys.executable).parent / "airflow")
        self.dirs: dict[str, Path] = {}
        self.setup_seconds = 0.0

    def run_monitor(self, logical_date: datetime) -> tuple[str, float]:
        """One finsent_monitor run, its tasks shipped through Celery; returns (run_id, seconds)."""
        started = time.monotonic()
        done = subprocess.run(
            [self.airflow, "dags", "test", "finsent_monitor", logical_date.isoformat(), "--use-executor"],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
        )
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
        meta = create_engine(self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        with meta.connect() as c:
            row = c.execute(
                text("SELECT run_id, state FROM dag_run WHERE dag_id = 'finsent_monitor' AND logical_date = :d"),
                {"d": logical_date},
            ).one()
        meta.dispose()
        assert row.state == "success", self.logs()
        return row.run_id, seconds

    def logs(self) -> dict[str, str]:
        return {name: log.read_text(errors="replace")[-3000:] for name, _, log in self.procs}


@pytest.mark.redis
def test_monitor_on_celery_workers_matches_dag_test(
    tmp_path, airflow_db, pg_url, feed_server, tiny_model_dir, monkeypatch
):
    end = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    feed_server.put("wire.xml", rss("wire", window_items("wire", end - timedelta(minutes=15), 6)))
    feed_server.put("social.xml", rss("social", window_items("social", end - timedelta(minutes=12), 5)))
    cfg = write_config(
        tmp_path / "finsent.yaml", {"wire": feed_server.url("wire.xml"), "social": feed_server.url("social.xml")}
    )
    meta_db_url = reset_meta_db()
    home = Path(tempfile.mkdtemp(prefix="finsent-celery-"))
    app_env = {"FINSENT_CONFIG": str(cfg), "DATABASE_URL": pg_url, "FINSENT_MODEL": str(tiny_model_dir)}
    with celery_stack(home, meta_db_url, app_env) as stack:
        run_id, ran = stack.run_monitor(end)
        dirs = dict(stack.dirs)

    tis = _tis(meta_db_url, run_id)
    by_task: dict[str, list] = {}
    for ti in tis:
        by_task.setdefault(ti.task_id, []).append(ti)
    assert set(by_task) == {"sources", "start_run", "ingest", "score", "detect", "notify", "finish"}
    assert all(ti.state == "success" for ti in tis), [(t.task_id, t.map_index, t.state) for t in tis]
    assert sorted(ti.map_index for ti in by_task["ingest"]) == [0, 1]  # one mapped instance per source
    assert [(ti.queue, ti.pool) for ti in by_task["score"]] == [("gpu", "gpu")]
    assert by_task["score"][0].hostname == str(dirs["gpu"]), "score did not run on the gpu worker"
    for ti in tis:
        if ti.task_id != "score":
            assert ti.queue == "default" and ti.hostname == str(dirs["default"]), (ti.task_id, ti.queue, ti.hostname)

    celery_engine = create_engine(pg_url)
    on_celery = _snapshot(celery_engine)
    celery_engine.dispose()
    assert len(on_celery["documents"]) == 11 and len(on_celery["scores"]) == 11

    # the same window with dag.test() in this process, into a schema of its own
    with _fresh_schema() as pg_local:
        monkeypatch.setenv("FINSENT_CONFIG", str(cfg))
        monkeypatch.setenv("DATABASE_URL", pg_local)
        monkeypatch.setenv("FINSENT_MODEL", str(tiny_model_dir))
        assert fresh_dag("finsent_monitor").test(logical_date=end).state == "success"
        local_engine = create_engine(pg_local)
        in_process = _snapshot(local_engine)
        local_engine.dispose()
    assert _rounded(on_celery) == _rounded(in_process)
    shutil.rmtree(home, ignore_errors=True)
    print(f"celery stack: metadata DB setup {stack.setup_seconds:.1f} s, DAG run {ran:.1f} s")
    for ti in tis:
        print(f"  {ti.task_id}[{ti.map_index}] queue={ti.queue} {ti.seconds:.1f} s")


def _rounded(snapshot: dict[str, list]) -> dict[str, list]:
    return {
        k: [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]
        for k, rows in snapshot.items()
    }


_fresh_schema = migrated_schema
