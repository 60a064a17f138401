"""The docs/deployment.md recipe without compose, for real: `airflow db migrate` on its own Postgres
database, `finsent db upgrade`, then `airflow scheduler`, `dag-processor` and `api-server` (LocalExecutor,
execution API URL and a shared JWT secret, async metadata URL with psycopg), and one finsent_monitor run
driven to success by the free-running scheduler within a bounded wait.

Run directly to time a monitor run on any checkout (docs/deployment.md reports before/after):
    python tests/test_deployment.py /path/to/checkout
"""

from __future__ import annotations

import json
import os
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

import tests.airflow_support  # isolated AIRFLOW_HOME before anything imports airflow
from tests.feedserver import feed_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
PG_BASE = os.environ.get("FINSENT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
VENV_BIN = Path(sys.executable).parent
RUN_WAIT_S = 150  # the whole test stays under ~3 minutes on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def airflow_database() -> Iterator[str]:
    """A Postgres database of its own for Airflow's metadata (dropped afterwards); yields its base URL."""
    name = f"af_{uuid.uuid4().hex[:10]}"
    server = PG_BASE.rsplit("/", 1)[0]
    admin = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server}/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def stack_env(
    code_root: Path, home: Path, meta_url: str, api_port: int, finsent_url: str, config: Path, model: Path
) -> dict[str, str]:
    """Every setting docs/deployment.md lists for Airflow 3 without compose (LocalExecutor variant)."""
    host_and_db = meta_url.split("://", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FINSENT_"))}
    env.update(
        {
            "PYTHONPATH": str(code_root),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(code_root / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg://{host_and_db}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"postgresql+psycopg_async://{host_and_db}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW_VAR_FINSENT_CONFIG_PATH": str(config),
            "DATABASE_URL": finsent_url,
            "FINSENT_MODEL": str(model),
            "FINSENT_SCORE_SHARDS": "1",
            "FINSENT_GPU_SLOTS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    return env


def _airflow(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(VENV_BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"airflow {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _wait_for_run(
    meta, procs: list, home: Path, index: int, deadline: float, unpause: bool
) -> tuple[str | None, object]:
    """Poll the metadata DB until the index-th finsent_monitor run finishes (or the deadline passes)."""
    unpaused = not unpause
    row = None
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, (
                f"airflow {p.args[1]} exited {p.returncode}: {(home / f'{p.args[1]}.log').read_text()[-3000:]}"
            )
        with meta.begin() as c:
            if not unpaused:  # `airflow dags unpause finsent_monitor`, without another CLI start
                unpaused = bool(
                    c.execute(text("UPDATE dag SET is_paused = false WHERE dag_id = 'finsent_monitor'")).rowcount
                )
            row = c.execute(
                text(
                    "SELECT run_id, run_type, state, start_date, end_date FROM dag_run"
                    " WHERE dag_id = 'finsent_monitor' ORDER BY id OFFSET :i LIMIT 1"
                ),
                {"i": index},
            ).first()
        if row is not None and row.state in ("success", "failed"):
            return row.state, row
        time.sleep(1)
    return None, row


def _wait_for_api(port: int, procs: list, home: Path, deadline: float) -> None:
    """The execution API answers before any task starts: on a loaded machine a task whose first call to a
    still-starting api-server times out fails its first try (and waits for the retry)."""
    import httpx

    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, (
                f"airflow {p.args[1]} exited {p.returncode}: {(home / f'{p.args[1]}.log').read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/execution/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"api-server on port {port} did not answer: {(home / 'api-server.log').read_text()[-3000:]}")


def run_monitor_once(
    code_root: Path, finsent_url: str, config: Path, model: Path, wait_s: float = RUN_WAIT_S, idle_run: bool = False
) -> dict:
    """Bring the stack up, let the scheduler run finsent_monitor once (and, with idle_run, a manual run
    with nothing new after it), tear it down; the runs' facts."""
    api_port = _free_port()
    home = Path(tempfile.mkdtemp(prefix="finsent-stack-"))
    procs: list[subprocess.Popen] = []
    with airflow_database() as meta_url:
        env = stack_env(code_root, home, meta_url, api_port, finsent_url, config, model)
        _airflow(env, "db", "migrate")
        _airflow(env, "pools", "set", "gpu", env["FINSENT_GPU_SLOTS"], "GPU slots for scoring and training")
        subprocess.run(
            [str(VENV_BIN / "python"), "-m", "pipeline.cli", "db", "upgrade"],
            env={**env, "FINSENT_CONFIG": str(config)},
            cwd=code_root,
            check=True,
            capture_output=True,
            timeout=120,
        )
        if not _port_free(api_port):
            pytest.skip(f"port {api_port} for the api-server was taken meanwhile")
        try:
            for cmd in (["api-server", "--port", str(api_port)], ["dag-processor"], ["scheduler", "--skip-serve-logs"]):
                log = (home / f"{cmd[0]}.log").open("w")
                procs.append(
                    subprocess.Popen(
                        [str(VENV_BIN / "airflow"), *cmd],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + wait_s
            _wait_for_api(api_port, procs, home, deadline)
            meta = create_engine(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
            state, row = _wait_for_run(meta, procs, home, 0, deadline, unpause=True)
            idle: dict = {}
            if idle_run and state == "success":
                at = datetime.fromtimestamp(time.time() // 900 * 900, UTC).isoformat()
                _airflow(env, "dags", "trigger", "finsent_monitor", "-l", at)
                idle_state, idle_row = _wait_for_run(meta, procs, home, 1, time.monotonic() + wait_s, unpause=False)
                idle = {
                    "state": idle_state,
                    "wall_s": (idle_row.end_date - idle_row.start_date).total_seconds() if idle_state else None,
                }
            logs = {p.args[1]: (home / f"{p.args[1]}.log").read_text() for p in procs}
            with meta.connect() as c:
                tasks = c.execute(
                    text(
                        "SELECT task_id, map_index, state, start_date, end_date FROM task_instance"
                        " WHERE dag_id = 'finsent_monitor' ORDER BY start_date"
                    )
                ).all()
            meta.dispose()
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 15)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.wait(timeout=10)
    wall = (
        (row.end_date - row.start_date).total_seconds() if row is not None and row.end_date and row.start_date else None
    )
    return {
        "state": state,
        "run_type": row.run_type if row is not None else None,
        "wall_s": wall,
        "idle_run": idle if idle_run else None,
        "tasks": [
            (
                t.task_id,
                t.map_index,
                t.state,
                (t.end_date - t.start_date).total_seconds() if t.end_date and t.start_date else None,
            )
            for t in tasks
        ],
        "logs": logs,
        "home": str(home),
    }


@pytest.mark.slow
@pytest.mark.airflow
def test_recipe_without_compose_runs_a_monitor_cycle_under_the_real_scheduler(
    tmp_path,
    pg_url,
    feed_server,  # noqa: F811
    tiny_model_dir,
):
    from tests.airflow_support import rss, window_items, write_config

    now = datetime.now(UTC)
    urls = {
        n: feed_server.put(f"{n}.xml", rss(n, window_items(n, now - timedelta(minutes=40), 3)))
        for n in ("wire", "social")
    }
    config = write_config(tmp_path / "finsent.yaml", urls)
    out = run_monitor_once(ROOT, pg_url, config, tiny_model_dir)
    assert out["state"] == "success", f"monitor run ended {out['state']} (tasks {out['tasks']}); logs in {out['home']}"
    assert {t[0] for t in out["tasks"] if t[2] == "success"} >= {
        "start_run",
        "ingest",
        "score",
        "detect",
        "notify",
        "finish",
    }
    engine = create_engine(pg_url)
    with engine.connect() as c:
        runs = c.execute(text("SELECT status, counts FROM pipeline_runs")).all()
        docs = c.scalar(text("SELECT count(*) FROM documents"))
    engine.dispose()
    assert [r.status for r in runs] == ["ok"] and docs == 6 and runs[0].counts["scored"] == 6


if __name__ == "__main__":  # timing on any checkout: python tests/test_deployment.py CHECKOUT [runs]
    sys.path.insert(0, str(ROOT))
    import tests.airflow_support  # noqa: F401
    from tests.airflow_support import rss, window_items, write_config
    from tests.conftest import PG_BASE as BASE
    from tests.conftest import _schema_url, make_tiny_model
    from tests.feedserver import FeedServer

    checkout = Path(sys.argv[1]).resolve()
    work = Path(tempfile.mkdtemp(prefix="finsent-timing-"))
    model = make_tiny_model(work / "model", topics=["Earnings", "Legal"])
    server = FeedServer().start()
    try:
        now = datetime.now(UTC)
        urls = {
            n: server.put(f"{n}.xml", rss(n, window_items(n, now - timedelta(minutes=40), 3)))
            for n in ("wire", "social")
        }
        config = write_config(work / "finsent.yaml", urls)
        schema = f"t_{uuid.uuid4().hex[:12]}"  # empty: the checkout's own `finsent db upgrade` migrates it
        admin = create_engine(BASE, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            out = run_monitor_once(checkout, _schema_url(schema), config, model, idle_run=True)
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        print(json.dumps({k: v for k, v in out.items() if k != "logs"}, default=str, indent=1))
    finally:
        server.stop()
