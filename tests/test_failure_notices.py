"""Nothing fails quietly (issue #9.7): every failed finsent_monitor DAG run sends exactly one failure notice,
a task killed on its last try included (a killed process runs no on_failure_callback), under dag.test()
with a real Slack-style webhook and a real SMTP server on 127.0.0.1 and the real Postgres.

A SIGKILL cannot be sent inside dag.test() (the task runs in the test's own process), so a killed task is
what Airflow sees of one: the try fails and its failure callback never runs.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from pipeline import orchestrate
from pipeline.store import schema as s
from pipeline.store import session_scope
from tests.airflow_support import airflow_db, fresh_dag, rss, smtp_server, webhook, window_items, write_config  # noqa: F401
from tests.feedserver import feed_server  # noqa: F401

END = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
WEBHOOK_ENV = "FINSENT_TEST_WEBHOOK_URL"


@pytest.fixture
def env(airflow_db, tmp_path, pg_url, feed_server, tiny_model_dir, webhook, smtp_server, monkeypatch):  # noqa: F811
    url = feed_server.put("wire.xml", rss("wire", window_items("wire", END - timedelta(minutes=14), 3)))
    monkeypatch.setenv(
        "FINSENT_CONFIG",
        str(write_config(tmp_path / "finsent.yaml", {"wire": url}, webhook_env=WEBHOOK_ENV, smtp=smtp_server)),
    )
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("FINSENT_MODEL", str(tiny_model_dir))
    monkeypatch.setenv(WEBHOOK_ENV, webhook.url)
    return {"webhook": webhook, "smtp": smtp_server}


def kill(task) -> None:
    """The task dies on its (only, last) try the way a SIGKILL looks to Airflow: failed, no callback."""

    @functools.wraps(task.python_callable)
    def killed(*args, **kwargs):
        raise RuntimeError("task process was killed (SIGKILL)")

    task.python_callable = killed
    task.on_failure_callback = None
    task.retries = 0


def fail(task) -> None:
    """The task fails with an exception; its failure callback runs as usual."""

    @functools.wraps(task.python_callable)
    def failing(*args, **kwargs):
        raise RuntimeError("scorer crashed: CUDA error")

    task.python_callable = failing
    task.retries = 0


def _notices(engine) -> list[s.OperatorNotice]:
    with session_scope(engine) as session:
        return list(session.scalars(select(s.OperatorNotice).order_by(s.OperatorNotice.id)))


def _failure_notices(env) -> tuple[list[str], list]:
    texts = [t for t in env["webhook"].texts() if "finsent_monitor" in t]
    mails = [m for m in env["smtp"].messages if "finsent_monitor" in str(m["Subject"])]
    return texts, mails


def test_a_score_task_killed_on_its_last_try_sends_one_notice(env, engine):
    dag = fresh_dag("finsent_monitor")
    kill(dag.task_dict["score"])
    dr = dag.test(logical_date=END)
    assert dr.state == "failed"
    texts, mails = _failure_notices(env)
    assert len(texts) == 1 and len(mails) == 1, (texts, [m["Subject"] for m in mails])
    assert "DAG run failed: finsent_monitor" in texts[0] and "score" in texts[0] and dr.run_id in texts[0]
    assert "test-secret-token" not in texts[0]
    notice = _notices(engine)
    assert [(n.kind, n.key) for n in notice] == [
        ("dag_failed", orchestrate.run_notice_key("finsent_monitor", dr.run_id))
    ]
    assert sorted(notice[0].sent_to) == ["console", "ops-mail", "ops-slack"]


def test_a_failing_task_with_its_callback_still_gives_one_notice(env, engine):
    """The task's own callback sends it (with the exception); finish and the DAG callback stay quiet."""
    dag = fresh_dag("finsent_monitor")
    fail(dag.task_dict["score"])
    dr = dag.test(logical_date=END)
    assert dr.state == "failed"
    texts, mails = _failure_notices(env)
    assert len(texts) == 1 and len(mails) == 1, texts
    assert "task failed: finsent_monitor.score" in texts[0] and "CUDA error" in texts[0]
    assert len(_notices(engine)) == 1


def test_a_killed_finish_task_is_covered_by_the_dag_callback(env, engine):
    """finish itself killed (after score was killed too): the DAG-level callback sends the one notice."""
    dag = fresh_dag("finsent_monitor")
    kill(dag.task_dict["score"])
    kill(dag.task_dict["finish"])
    dr = dag.test(logical_date=END)
    assert dr.state == "failed"
    texts, mails = _failure_notices(env)
    assert len(texts) == 1 and len(mails) == 1, texts
    assert "DAG run failed: finsent_monitor" in texts[0] and "finish" in texts[0]
    assert len(_notices(engine)) == 1


def test_degraded_delivery_fails_the_notify_task_with_its_reason(env, engine):
    """An alert delivery to Slack expires during the run (Slack answering 500 for over a day): email gets the
    operator notice, the notify task fails at once (no retry) saying why, and the run's one failure notice."""
    from tests.test_notify import add_alert

    aid = add_alert(engine)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        session.add(s.AlertDelivery(alert_id=aid, sink="ops-slack", status="failed", attempts=40, last_error="HTTP 500",
                                    created_at=now - timedelta(hours=25),
                                    next_attempt_at=now - timedelta(minutes=1)))  # fmt: skip
        # routed to both sinks a day ago, as a running notifier does; email delivered it then
        session.add(s.AlertDelivery(alert_id=aid, sink="ops-mail", status="sent", attempts=1,
                                    created_at=now - timedelta(hours=25)))  # fmt: skip
    env["webhook"].status = 500
    dag = fresh_dag("finsent_monitor", retries=None)
    dr = dag.test(logical_date=END)
    assert dr.state == "failed"
    ti = next(t for t in dr.get_task_instances() if t.task_id == "notify")
    assert (ti.state, ti.try_number) == ("failed", 1), "a degraded notify must not be retried into a pass"
    subjects = [str(m["Subject"]) for m in env["smtp"].messages]
    assert subjects == [
        "[finsent] 1 alert(s) could not be delivered to ops-slack",
        "[finsent] task failed: finsent_monitor.notify",
    ], subjects
    body = env["smtp"].messages[1].get_content()
    assert "alert delivery degraded: 1 alert deliveries expired undelivered (ops-slack)" in body
    assert "ops-slack: 0 sent, 0 pending, 1 failed" in body
    with session_scope(engine) as session:
        run = session.scalars(select(s.PipelineRun)).one()
        assert run.status == "failed" and {"step": "notify", "error": "task failed"} in run.errors
