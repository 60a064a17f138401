"""Retried Airflow tasks reuse what their earlier try made: one `pipeline_runs` row per monitor DAG run,
one candidate folder and registry row per train DAG run.

A retry is provoked for real through dag.test(): the task's first try does its real work (database row,
trained model) and then fails, as when a worker is lost right after the work, and Airflow retries it.
"""

from __future__ import annotations

import functools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline import orchestrate
from pipeline.store import schema as s
from tests.airflow_support import fresh_dag, rss, window_items, write_config

END = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
START = END - timedelta(minutes=15)
RUN = "scheduled__2026-03-02T10:00:00+00:00"


class WorkerLost(RuntimeError):
    pass


def fail_first_try_after_its_work(task, outputs: list) -> None:
    """Make `task` die after its first try has done its real work (outputs collects each try's result)."""
    real = task.python_callable

    @functools.wraps(real)  # Airflow reads the context arguments from the wrapped signature
    def first_try_lost(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(out)
        if len(outputs) == 1:
            raise WorkerLost("worker lost after the task did its work")
        return out

    task.python_callable = first_try_lost
    task.retries = 1
    task.retry_delay = timedelta(0)


def _runs(engine) -> list[s.PipelineRun]:
    with Session(engine) as session:
        return list(session.scalars(select(s.PipelineRun).order_by(s.PipelineRun.id)))


@pytest.fixture
def env(tmp_path, pg_url, monkeypatch):
    monkeypatch.setenv(
        "FINSENT_CONFIG", str(write_config(tmp_path / "finsent.yaml", {"wire": "http://127.0.0.1:9/none.xml"}))
    )
    monkeypatch.setenv("DATABASE_URL", pg_url)
    return tmp_path


def test_start_run_twice_for_one_dag_run_gives_one_row(env, engine):
    first = orchestrate.monitor_start(START, END, airflow_run_id=RUN)
    assert orchestrate.monitor_start(START, END, airflow_run_id=RUN) == first
    rows = _runs(engine)
    assert [(r.id, r.kind, r.status, r.airflow_run_id, r.counts) for r in rows] == [
        (first, orchestrate.RUN_KIND, "running", RUN, {})
    ]

    other = orchestrate.monitor_start(START, END, airflow_run_id="manual__2026-03-02T10:03:00+00:00")
    assert other != first, "another DAG run for the same interval is a run of its own"
    later = orchestrate.monitor_start(END, END + timedelta(minutes=15), airflow_run_id=RUN)
    assert later not in (first, other), "the same run id over another interval is not the same run"

    done = orchestrate.monitor_finish(
        first,
        ["wire"],
        [{"source": "wire", "status": "ok", "new_documents": 2}],
        {"model_version": "m", "scored": 2, "seconds": 0.1},
        {"alerts": []},
        {"sent": 0},
    )
    assert done["status"] == "ok"
    row = next(r for r in _runs(engine) if r.id == first)
    assert row.status == "ok" and row.airflow_run_id == RUN
    assert row.counts == {"new_documents": 2, "scored": 2, "alerts": 0, "delivered": 0}

    rerun = orchestrate.monitor_start(START, END, airflow_run_id=RUN)
    assert rerun not in (first, other, later), "a DAG run cleared and run again after finish is recorded anew"
    assert len(_runs(engine)) == 4


def test_racing_tries_of_start_run_make_one_row(env, engine):
    """A try Airflow gave up on (a zombie) and its retry, both in start_run at once: still one row."""
    gate = threading.Barrier(4)
    ids: list[int] = []
    errors: list[BaseException] = []

    def one_try() -> None:
        try:
            gate.wait(timeout=30)
            ids.append(orchestrate.monitor_start(START, END, airflow_run_id=RUN))
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=one_try) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(ids) == 4 and len(set(ids)) == 1
    assert len(_runs(engine)) == 1


def test_retried_start_run_task_leaves_one_pipeline_run(
    airflow_db, env, engine, feed_server, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv(
        "FINSENT_CONFIG",
        str(
            write_config(
                env / "monitor.yaml", {"wire": feed_server.put("wire.xml", rss("wire", window_items("wire", START, 3)))}
            )
        ),
    )
    monkeypatch.setenv("FINSENT_MODEL", str(tiny_model_dir))
    dag = fresh_dag("finsent_monitor")
    outputs: list[int] = []
    fail_first_try_after_its_work(dag.task_dict["start_run"], outputs)

    dr = dag.test(logical_date=END)
    assert dr.state == "success"
    ti = next(t for t in dr.get_task_instances() if t.task_id == "start_run")
    assert (ti.state, ti.try_number) == ("success", 2), "start_run was not retried"
    assert len(outputs) == 2 and outputs[0] == outputs[1]
    rows = _runs(engine)
    assert [(r.id, r.status, r.interval_start, r.interval_end) for r in rows] == [(outputs[0], "ok", START, END)]
    assert (
        rows[0].airflow_run_id == dr.run_id and rows[0].counts["new_documents"] == 3 and rows[0].finished_at is not None
    )


TRAIN_CONF = {"base": None, "max_steps": 2, "epochs": 1, "limit": 40}


def _models(engine) -> list:
    with engine.connect() as c:
        return c.execute(select(s.ModelVersion.id, s.ModelVersion.path).order_by(s.ModelVersion.id)).all()


@pytest.mark.data
def test_retried_train_task_reuses_its_candidate(airflow_db, env, engine, tiny_model_dir, monkeypatch):
    candidates = env / "candidates"
    monkeypatch.setenv("FINSENT_TRAIN_OUTPUT", str(candidates))
    conf = {**TRAIN_CONF, "base": str(tiny_model_dir)}
    dag = fresh_dag("finsent_train")
    outputs: list[dict] = []
    fail_first_try_after_its_work(dag.task_dict["train"], outputs)

    dr = dag.test(
        logical_date=datetime(2026, 3, 1, 3, 0, tzinfo=UTC), run_conf=conf, mark_success_pattern="evaluate|promote"
    )
    assert dr.state == "success"
    ti = next(t for t in dr.get_task_instances() if t.task_id == "train")
    assert (ti.state, ti.try_number) == ("success", 2), "train was not retried"
    first, second = outputs
    assert (first["reused"], second["reused"]) == (False, True)
    assert second["version"] == first["version"] and second["path"] == first["path"]
    folder = candidates / orchestrate.candidate_dir_name(dr.run_id)
    assert [p.name for p in candidates.iterdir()] == [folder.name] and (folder / "config.json").is_file()
    assert _models(engine) == [(first["version"], str(folder.resolve()))]

    # the same DAG run asking for other options is refused, and nothing stored changes
    with pytest.raises(orchestrate.OrchestrationError, match=rf"{folder.name}.*\['max_steps'\]"):
        orchestrate.train_candidate(airflow_run_id=dr.run_id, **{**conf, "max_steps": 3})
    assert _models(engine) == [(first["version"], str(folder.resolve()))]
    assert (folder / "finsent.json").is_file()


@pytest.mark.data
@pytest.mark.slow
def test_a_killed_train_try_leaves_nothing_behind(env, engine, tiny_model_dir, monkeypatch):
    """A try killed mid-training leaves a folder without finsent.json: the retry starts that folder afresh."""
    candidates = env / "candidates"
    monkeypatch.setenv("FINSENT_TRAIN_OUTPUT", str(candidates))
    folder = candidates / orchestrate.candidate_dir_name(RUN)
    folder.mkdir(parents=True)
    (folder / "half-written.safetensors").write_bytes(b"\0" * 64)

    out = orchestrate.train_candidate(airflow_run_id=RUN, **{**TRAIN_CONF, "base": str(tiny_model_dir)})
    assert out["reused"] is False and Path(out["path"]) == folder
    assert not (folder / "half-written.safetensors").exists() and (folder / "finsent.json").is_file()
    assert [p.name for p in candidates.iterdir()] == [folder.name]
    assert _models(engine) == [(out["version"], str(folder.resolve()))]


def test_candidate_folder_names_are_path_safe_and_distinct():
    a = orchestrate.candidate_dir_name("manual__2026-03-01T03:00:00+00:00")
    b = orchestrate.candidate_dir_name("manual__2026-03-01T03_00_00_00_00")
    assert a.startswith("manual__2026-03-01T03_00_00_00_00-") and a != b
    assert a == orchestrate.candidate_dir_name("manual__2026-03-01T03:00:00+00:00")
    evil = orchestrate.candidate_dir_name("../../etc/passwd")
    assert "/" not in evil and not evil.startswith(".")
