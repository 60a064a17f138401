"""Runs are leased and exclusive (#9.8): a run whose process died is marked abandoned by the next run,
and two concurrent `finsent run`s on one database never both score (real Postgres, real processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from pipeline import cycle, orchestrate, store
from pipeline.config import load_config
from pipeline.records import RunStatus
from pipeline.store import schema as s

ROOT = Path(__file__).resolve().parents[1]
AS_OF = "2026-03-02T10:00:00Z"
ITEMS = 12


def _rss(count: int) -> bytes:
    items = "".join(
        f"<item><guid>wire-{i}</guid><title>Northwind Bank item {i} about quarterly results</title>"
        f"<link>https://example.com/{i}</link><pubDate>Mon, 02 Mar 2026 09:{i:02d}:00 +0000</pubDate></item>"
        for i in range(count)
    )
    return f'<?xml version="1.0"?><rss version="2.0"><channel><title>wire</title>{items}</channel></rss>'.encode()


class GatedFeed:
    """A feed on 127.0.0.1 that answers only once the test opens the gate, so a run can be held mid-cycle."""

    def __init__(self, body: bytes) -> None:
        self.requested = threading.Event()
        self.gate = threading.Event()
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                feed.requested.set()
                feed.gate.wait(timeout=300)
                self.send_response(200)
                self.send_header("Content-Type", "application/rss+xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/feed.xml"

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gated_feed() -> Iterator[GatedFeed]:
    feed = GatedFeed(_rss(ITEMS))
    yield feed
    feed.close()


def _config(path: Path, url: str, model: Path) -> Path:
    cfg = {
        "sources": [
            {"name": "wire", "kind": "rss", "url": url, "retries": 0, "timeout_s": 300, "allow_private_network": True}
        ],
        "model": {"path": str(model), "device": "cpu", "chunk_size": 4, "batch_size": 4},
        "sinks": [{"name": "console", "kind": "console"}],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _finsent(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _runs(engine) -> list[s.PipelineRun]:
    with Session(engine) as session:
        return list(session.scalars(select(s.PipelineRun).order_by(s.PipelineRun.id)))


@pytest.mark.pg
@pytest.mark.slow
def test_two_concurrent_runs_score_each_document_once(tmp_path, pg_url, engine, tiny_model_dir, gated_feed):
    """Run A is held inside its cycle (its feed has not answered); run B starts meanwhile and must refuse at once."""
    config = _config(tmp_path / "finsent.yaml", gated_feed.url, tiny_model_dir)
    env = {**os.environ, "DATABASE_URL": pg_url, "PYTHONPATH": str(ROOT), "FINSENT_LOG_LEVEL": "WARNING"}
    first = _finsent("run", "-c", str(config), "--as-of", AS_OF, env=env)
    try:
        while not gated_feed.requested.wait(timeout=1):  # A holds the lock once it is fetching
            assert first.poll() is None, f"run A ended early: {first.communicate()[1]}"
        second = _finsent("run", "-c", str(config), "--as-of", AS_OF, env=env)
        try:
            _, err = second.communicate(timeout=120)
        finally:
            second.kill()
        assert second.returncode == 5, err
        assert "another finsent run holds the lock on database" in err and "nothing done" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    finally:
        gated_feed.gate.set()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err

    with Session(engine) as session:
        documents = session.scalar(select(func.count()).select_from(s.Document))
        scores = session.scalar(select(func.count()).select_from(s.Score))
    assert documents == scores == ITEMS
    runs = _runs(engine)
    assert [(r.kind, r.status, r.counts["scored"]) for r in runs] == [("cycle", RunStatus.OK, ITEMS)]

    third = _finsent("run", "-c", str(config), "--as-of", AS_OF, env=env)  # the lock was released on exit
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert [r.counts["scored"] for r in _runs(engine)] == [ITEMS, 0], "a later run scores nothing twice"


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import UTC, datetime, timedelta
    from pipeline import store
    engine = store.make_engine(sys.argv[1])
    # started an hour ago with a 10-minute lease, and never renewed since: then killed
    run_id = store.start_run(engine, "cycle", now=datetime.now(UTC) - timedelta(hours=1))
    print(run_id, os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.pg
def test_killed_run_is_marked_abandoned_by_the_next_run(tmp_path, pg_url, engine, tiny_model_dir, gated_feed):
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, pg_url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead, pid = (int(x) for x in proc.stdout.split())
    live = store.start_run(engine, "cycle")  # a run with a fresh lease elsewhere: not to be touched
    assert {r.id: r.status for r in _runs(engine)} == {dead: RunStatus.RUNNING, live: RunStatus.RUNNING}

    gated_feed.gate.set()
    cfg = load_config(_config(tmp_path / "finsent.yaml", gated_feed.url, tiny_model_dir), env=False)
    cfg = cfg.model_copy(update={"database_url": type(cfg.database_url)(pg_url)})
    summary = cycle.run_cycle(cfg, as_of=datetime(2026, 3, 2, 10, tzinfo=UTC), engine=engine)

    rows = {r.id: r for r in _runs(engine)}
    assert rows[dead].status == RunStatus.ABANDONED and rows[dead].finished_at is not None
    [lease_error] = rows[dead].errors
    assert lease_error["step"] == "lease" and "presumed dead" in lease_error["error"]
    assert rows[dead].owner.endswith(f":{pid}") and rows[dead].owner in lease_error["error"], "names the dead process"
    assert rows[live].status == RunStatus.RUNNING
    assert rows[summary.run_id].status == RunStatus.OK and rows[summary.run_id].lease_expires_at is not None


@pytest.mark.pg
def test_heartbeat_renews_the_lease_while_the_run_lives(engine):
    run_id = store.start_run(engine, "cycle", lease=timedelta(seconds=3))
    first = _runs(engine)[0].lease_expires_at
    with store.runs.Heartbeat(engine, run_id, lease=timedelta(seconds=3)):
        for _ in range(100):
            if _runs(engine)[0].lease_expires_at > first:
                break
            threading.Event().wait(0.2)
    assert _runs(engine)[0].lease_expires_at > first
    store.finish_run(engine, run_id, RunStatus.OK, {}, [])
    assert not store.heartbeat(engine, run_id), "a finished run's lease is not renewed"


@pytest.mark.pg
def test_heartbeat_survives_an_unexpected_database_error(engine, caplog):
    """A beat that fails with something other than a connection problem (here a trigger refusing the UPDATE:
    a ProgrammingError, not a StoreError) is logged, and the next beats still renew the lease."""
    run_id = store.start_run(engine, "cycle", lease=timedelta(seconds=3))
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION refuse_beat() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'beat refused'; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER refuse_beat BEFORE UPDATE ON pipeline_runs FOR EACH ROW EXECUTE FUNCTION refuse_beat()"
            )
        )
    first = _runs(engine)[0].lease_expires_at
    with store.runs.Heartbeat(engine, run_id, lease=timedelta(seconds=3)):
        for _ in range(100):
            if f"heartbeat of run {run_id} failed" in caplog.text:
                break
            threading.Event().wait(0.2)
        assert "ProgrammingError" in caplog.text
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse_beat ON pipeline_runs"))
        for _ in range(100):
            if _runs(engine)[0].lease_expires_at > first:
                break
            threading.Event().wait(0.2)
    assert _runs(engine)[0].lease_expires_at > first, "the heartbeat thread died on the first unexpected error"


@pytest.mark.pg
def test_airflow_start_run_abandons_an_expired_run_and_never_adopts_it(tmp_path, pg_url, engine, monkeypatch):
    monkeypatch.setenv("FINSENT_CONFIG", str(_config(tmp_path / "f.yaml", "http://127.0.0.1:9/none.xml", tmp_path)))
    monkeypatch.setenv("DATABASE_URL", pg_url)
    end = datetime(2026, 3, 2, 10, tzinfo=UTC)
    start, run = end - timedelta(minutes=15), "scheduled__2026-03-02T10:00:00+00:00"
    first = orchestrate.monitor_start(start, end, airflow_run_id=run)
    row = _runs(engine)[0]
    assert (row.airflow_run_id, row.counts, row.status) == (run, {}, RunStatus.RUNNING)
    assert row.lease_expires_at - row.heartbeat_at == store.runs.AIRFLOW_LEASE
    assert orchestrate.monitor_start(start, end, airflow_run_id=run) == first, "a retried start_run reuses its row"

    with store.session_scope(engine) as session:  # the DAG run's workers died and `finish` never ran
        session.get(s.PipelineRun, first).lease_expires_at = datetime.now(UTC) - timedelta(seconds=1)
    retried = orchestrate.monitor_start(start, end, airflow_run_id=run)
    assert retried != first
    assert {r.id: r.status for r in _runs(engine)} == {first: RunStatus.ABANDONED, retried: RunStatus.RUNNING}


@pytest.mark.pg
def test_airflow_tasks_and_finsent_run_never_overlap(tmp_path, pg_url, engine, tiny_model_dir, gated_feed, monkeypatch):
    """An Airflow monitor task holds the cycle lock `finsent run` takes (shared among monitor tasks): a cron
    `finsent run` started while the task works refuses, and a task started while `finsent run` works
    waits for it, then fails (to be retried) if it does not end within AIRFLOW_LOCK_WAIT."""
    config = _config(tmp_path / "finsent.yaml", gated_feed.url, tiny_model_dir)
    monkeypatch.setenv("FINSENT_CONFIG", str(config))
    monkeypatch.setenv("DATABASE_URL", pg_url)
    done: list[dict] = []
    task = threading.Thread(target=lambda: done.append(orchestrate.monitor_ingest("wire")), daemon=True)
    task.start()
    try:
        assert gated_feed.requested.wait(timeout=120), "the ingest task never fetched"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FINSENT_LOG_LEVEL": "WARNING"}
        cron = _finsent("run", "-c", str(config), "--as-of", AS_OF, env=env)
        _, err = cron.communicate(timeout=120)
        assert cron.returncode == 5, err
        assert "another finsent run holds the lock on database" in err and "nothing done" in err, err
        with orchestrate.task_resources(lock=True):  # another monitor task (a mapped sibling) runs alongside
            pass
    finally:
        gated_feed.gate.set()
        task.join(timeout=120)
    assert [(d["source"], d["new_documents"]) for d in done] == [("wire", ITEMS)]
    assert _runs(engine) == [], "the refused `finsent run` left no row"

    monkeypatch.setattr(orchestrate, "AIRFLOW_LOCK_WAIT", timedelta(0))
    with store.run_lock(engine), pytest.raises(store.RunLockedError, match="holds the lock"):  # as `finsent run`
        orchestrate.monitor_notify()

    monkeypatch.setattr(orchestrate, "AIRFLOW_LOCK_WAIT", timedelta(minutes=2))
    held, release = threading.Event(), threading.Event()

    def cron_run() -> None:
        with store.run_lock(engine):
            held.set()
            release.wait(timeout=120)

    holder = threading.Thread(target=cron_run, daemon=True)
    holder.start()
    assert held.wait(timeout=60)
    threading.Timer(2, release.set).start()
    assert orchestrate.monitor_notify()["sent"] == 0, "the task waited for the lock, then delivered"
    assert release.is_set()
    holder.join(timeout=60)


@pytest.mark.pg
def test_migration_moves_the_airflow_run_id_out_of_counts(pg_url, engine):
    """Rows written before 0004 keep their Airflow run id (now in its own column) and get a lease."""
    _migrate(pg_url, "0003", down=True)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO pipeline_runs (kind, started_at, status, counts, errors) VALUES "
            "('airflow:finsent_monitor', now() - interval '1 day', 'running', "
            '\'{"airflow_run_id": "r1", "scored": 3}\', \'[]\')'
        )
    _migrate(pg_url, "head")
    [row] = _runs(engine)
    assert (row.airflow_run_id, row.counts) == ("r1", {"scored": 3})
    assert row.lease_expires_at is not None and row.lease_expires_at < datetime.now(UTC)
    assert store.abandon_expired(engine) == [row.id], "a run left running by older code is reaped too"

    _migrate(pg_url, "0003", down=True)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT status, counts FROM pipeline_runs").one() == (
            "failed",
            {"scored": 3, "airflow_run_id": "r1"},
        )
    _migrate(pg_url, "head")


def _migrate(url: str, revision: str, down: bool = False) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    (command.downgrade if down else command.upgrade)(cfg, revision)


def test_sqlite_run_lock_is_a_file_next_to_the_database(tmp_path):
    """While one process holds the lock, `finsent run` in another exits 4 naming the lock file; then it runs."""
    db = tmp_path / "finsent.db"
    url = f"sqlite:///{db}"
    store.upgrade(url)
    engine = store.make_engine(url)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "PYTHONPATH": str(ROOT),
        "FINSENT_CONFIG": "",
        "FINSENT_LOG_LEVEL": "WARNING",
    }
    try:
        with store.run_lock(engine):
            held = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "run"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        assert held.returncode == 5, held.stderr
        assert held.stderr.strip() == f"error: another finsent run holds the lock {db}.lock; nothing done"
        with (
            store.run_lock(engine),
            pytest.raises(store.RunLockedError),  # a second holder in this process too
            store.run_lock(store.make_engine(url)),
        ):
            pass
        assert _runs(engine) == [], "a refused run leaves no row"
    finally:
        engine.dispose()
