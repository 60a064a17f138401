"""The Airflow DAGs: structure, parse cost, and real runs with dag.test() against the Postgres here.

Each dag.test() costs several seconds on this machine, so every run here checks as much as it can.
"""

from __future__ import annotations

import json
import os
import select as io_select
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from pipeline import store
from pipeline.config import SourceConfig
from pipeline.records import Document, EntityMention, Prediction, ScoreRow
from pipeline.store import schema as s
from tests.airflow_support import AIRFLOW_ENV, DAGS_DIR, ROOT, Item, fresh_dag, rss, window_items, write_config

DAG_IDS = {"finsent_monitor", "finsent_train", "finsent_maintenance"}
WEBHOOK_ENV = "FINSENT_TEST_WEBHOOK_URL"
TINY_VERSION = "tiny-0"


def test_dagbag_structure(dagbag):
    from airflow.utils.dag_cycle_tester import check_cycle

    from pipeline import orchestrate

    assert set(dagbag.dags) == DAG_IDS
    for dag_id, dag in dagbag.dags.items():
        check_cycle(dag)
        assert dag.owner == "finsent", dag_id
        assert dag.tags and "finsent" in dag.tags, dag_id
        assert getattr(dag.timetable, "expression", None), f"{dag_id} has no schedule"
        assert not dag.catchup and dag.max_active_runs == 1, dag_id
        for t in dag.tasks:
            if t.task_id == "finish":  # fails on purpose when a step failed: a retry would only repeat that
                assert t.retries == 0, f"{dag_id}.finish retries a deliberate failure"
            else:
                assert t.retries >= 1, f"{dag_id}.{t.task_id} has no retries"
                cbs = t.on_failure_callback if isinstance(t.on_failure_callback, list) else [t.on_failure_callback]
                assert orchestrate.on_failure in cbs, f"{dag_id}.{t.task_id} has no failure notifier"

    monitor = dagbag.dags["finsent_monitor"]
    assert (
        monitor.timetable.expression == "*/15 * * * *"
        and type(monitor.timetable).__name__ == "CronDataIntervalTimetable"
    )
    tasks = {t.task_id: t for t in monitor.tasks}
    assert set(tasks) == {"sources", "start_run", "ingest", "score", "detect", "notify", "finish"}
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    assert isinstance(tasks["ingest"], MappedOperator)  # one task instance per configured source
    assert (tasks["score"].queue, tasks["score"].pool) == ("gpu", "gpu")
    assert {t.queue for n, t in tasks.items() if n != "score"} == {"default"}
    assert tasks["score"].upstream_task_ids == {"ingest"}
    assert tasks["detect"].upstream_task_ids == {"score"}
    assert tasks["notify"].upstream_task_ids == {"detect"}
    assert tasks["finish"].upstream_task_ids == {"start_run", "sources", "ingest", "score", "detect", "notify"}

    train = dagbag.dags["finsent_train"]
    ttasks = {t.task_id: t for t in train.tasks}
    assert ttasks["evaluate"].upstream_task_ids == {"train"}
    assert ttasks["promote"].upstream_task_ids == {"train", "evaluate"}
    assert ttasks["train"].queue == "gpu"
    assert ttasks["train"].upstream_task_ids == {"on_schedule"}  # the catch-up guard gates training
    assert train.is_paused_upon_creation is True
    # a backfill ignores max_active_runs: the model-heavy steps still run one at a time across runs
    assert (tasks["detect"].max_active_tis_per_dag, tasks["notify"].max_active_tis_per_dag) == (1, 1)
    assert tasks["score"].partial_kwargs.get("max_active_tis_per_dag") == len(orchestrate.score_shards())
    assert train.timetable.expression == "0 3 * * 0"
    assert dagbag.dags["finsent_maintenance"].timetable.expression == "0 0 * * *"


def test_dag_files_parse_without_heavy_imports():
    """Each DAG file, parsed in a fresh interpreter the way the dag-processor does, imports no torch,
    transformers or scipy (what makes parsing slow); the check is on imports, not on a clock."""
    probe = (
        "import importlib.util, json, sys\n"
        "import airflow.sdk\n"
        "spec = importlib.util.spec_from_file_location('dagfile', sys.argv[1])\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(json.dumps({'heavy': sorted(m for m in ('torch', 'transformers', 'scipy') if m in sys.modules)}))\n"
    )
    files = sorted(DAGS_DIR.glob("*.py"))
    assert {f.stem for f in files} == DAG_IDS
    for f in files:
        proc = subprocess.run(
            [sys.executable, "-c", probe, str(f)],
            capture_output=True,
            text=True,
            env={**os.environ, **AIRFLOW_ENV},
            cwd=ROOT,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["heavy"] == [], f"{f.name} imports {out['heavy']} at parse time"


# --- helpers for the dag.test() runs -----------------------------------------------------------


def _snapshot(engine) -> dict[str, list]:
    """Everything a cycle stores, keyed by natural keys (no surrogate ids or wall-clock timestamps)."""
    with engine.connect() as c:
        docs = c.execute(
            select(
                s.Document.source_name,
                s.Document.external_id,
                s.Document.content_hash,
                s.Document.title,
                s.Document.summary,
                s.Document.published_at,
            ).order_by(s.Document.source_name, s.Document.external_id)
        ).all()
        scores = c.execute(
            select(
                s.Document.source_name,
                s.Document.external_id,
                s.Score.model_version_id,
                s.Score.label,
                s.Score.p_negative,
                s.Score.p_positive,
                s.Score.topic,
            )
            .join(s.Document, s.Document.id == s.Score.document_id)
            .order_by(s.Document.source_name, s.Document.external_id)
        ).all()
        ents = c.execute(
            select(s.Document.external_id, s.DocumentEntity.entity)
            .join(s.Document, s.Document.id == s.DocumentEntity.document_id)
            .order_by(s.Document.external_id, s.DocumentEntity.entity)
        ).all()
        alerts = c.execute(
            select(
                s.Alert.id,
                s.Alert.kind,
                s.Alert.scope_kind,
                s.Alert.scope_value,
                s.Alert.window_end,
                s.Alert.severity,
                s.Alert.neg_count,
                s.Alert.total_count,
            ).order_by(s.Alert.id)
        ).all()
        risks = c.execute(
            select(
                s.RiskScore.scope_kind, s.RiskScore.scope_value, s.RiskScore.window_start, s.RiskScore.risk
            ).order_by(s.RiskScore.scope_kind, s.RiskScore.scope_value, s.RiskScore.window_start)
        ).all()
        deliveries = c.execute(
            select(s.AlertDelivery.alert_id, s.AlertDelivery.sink, s.AlertDelivery.status).order_by(
                s.AlertDelivery.alert_id, s.AlertDelivery.sink
            )
        ).all()
    return {
        "documents": docs,
        "scores": scores,
        "entities": ents,
        "alerts": alerts,
        "risk_scores": risks,
        "deliveries": deliveries,
    }


def _runs(engine) -> list:
    with engine.connect() as c:
        return c.execute(
            select(
                s.PipelineRun.kind,
                s.PipelineRun.status,
                s.PipelineRun.interval_start,
                s.PipelineRun.interval_end,
                s.PipelineRun.counts,
                s.PipelineRun.finished_at,
            ).order_by(s.PipelineRun.id)
        ).all()


def _schema_of(pg_url: str) -> str:
    return pg_url.rsplit("%3D", 1)[1]


@pytest.fixture
def monitor_env(airflow_db, tmp_path, pg_url, feed_server, tiny_model_dir, webhook, smtp_server, monkeypatch):
    """Config + env for finsent_monitor: two loopback feeds, the tiny model, loopback Slack and SMTP sinks."""
    urls = {
        "wire": feed_server.put("wire.xml", rss("wire", [])),
        "social": feed_server.put("social.xml", rss("social", [])),
    }
    cfg = write_config(tmp_path / "finsent.yaml", urls, webhook_env=WEBHOOK_ENV, smtp=smtp_server)
    monkeypatch.setenv("FINSENT_CONFIG", str(cfg))
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("FINSENT_MODEL", str(tiny_model_dir))
    monkeypatch.setenv(WEBHOOK_ENV, webhook.url)
    return {"config": cfg, "feeds": feed_server, "webhook": webhook, "smtp": smtp_server}


def test_monitor_backfill_of_two_windows_is_reproducible(pg_url, engine, monitor_env, monkeypatch):
    """Two past windows, run twice: the second pass stores nothing new and changes nothing.

    Config comes through the Airflow Variable and the DB through the `finsent_db` connection (both from
    their AIRFLOW_VAR_/AIRFLOW_CONN_ env forms), with a broken DATABASE_URL to prove the connection wins.
    """
    feeds = monitor_env["feeds"]
    monkeypatch.delenv("FINSENT_CONFIG")
    monkeypatch.setenv("AIRFLOW_VAR_FINSENT_CONFIG_PATH", str(monitor_env["config"]))
    conn = {
        "conn_type": "postgres",
        "host": "127.0.0.1",
        "port": 5432,
        "login": "postgres",
        "schema": "test",
        "extra": {"options": f"-csearch_path={_schema_of(pg_url)}"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FINSENT_DB", json.dumps(conn))
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://nobody:wrong@127.0.0.1:1/nowhere")

    a_end = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    b_end = a_end + timedelta(minutes=15)
    wire_a = window_items("wire", a_end - timedelta(minutes=15), 6)
    social_a = window_items("social", a_end - timedelta(minutes=14), 4) + [
        # the same story under a social GUID, and one about a watchlist name
        Item(
            "social-nwb",
            "Northwind Bank faces lawsuit",
            "Northwind Bank accused of hiding losses",
            a_end - timedelta(minutes=2),
        )
    ]
    wire_b = window_items("wire", b_end - timedelta(minutes=15), 5)
    monkeypatch.setenv("FINSENT_SCORE_SHARDS", "2")  # two mapped score tasks split the backlog
    dag = fresh_dag("finsent_monitor")

    def run_window(end: datetime, wire, social) -> None:
        feeds.put("wire.xml", rss("wire", wire))
        feeds.put("social.xml", rss("social", social))
        dr = dag.test(logical_date=end)
        assert dr.state == "success", f"{end}: {dr.state}"
        assert sorted(ti.map_index for ti in dr.get_task_instances() if ti.task_id == "score") == [0, 1]

    run_window(a_end, wire_a, social_a)
    first_a = _snapshot(engine)
    assert len(first_a["documents"]) == 11
    assert len(first_a["scores"]) == 11 and {r.model_version_id for r in first_a["scores"]} == {TINY_VERSION}
    assert ("social-nwb", "NWB") in [tuple(e) for e in first_a["entities"]]
    runs = _runs(engine)
    assert [(r.kind, r.status, r.interval_start, r.interval_end) for r in runs] == [
        ("airflow:finsent_monitor", "ok", a_end - timedelta(minutes=15), a_end)
    ]
    assert runs[0].counts["new_documents"] == 11 and runs[0].counts["scored"] == 11 and runs[0].finished_at is not None

    run_window(b_end, wire_a + wire_b, social_a)
    first = _snapshot(engine)
    assert len(first["documents"]) == 16 and len(first["scores"]) == 16
    with engine.connect() as c:
        risk_windows = set(c.execute(select(s.RiskScore.window_end).distinct()).scalars())
    assert risk_windows == {a_end, b_end}, "detect did not run for each backfilled window's own data interval end"

    # backfill the same two windows again, feeds unchanged since
    run_window(a_end, wire_a + wire_b, social_a)
    run_window(b_end, wire_a + wire_b, social_a)
    assert _snapshot(engine) == first
    runs = _runs(engine)
    assert [r.status for r in runs] == ["ok"] * 4
    assert [r.counts["new_documents"] for r in runs] == [11, 5, 0, 0]
    assert [r.counts["scored"] for r in runs] == [11, 5, 0, 0]
    with engine.connect() as c:
        dupes = c.execute(
            select(s.Document.source_name, s.Document.external_id)
            .group_by(s.Document.source_name, s.Document.external_id)
            .having(func.count() > 1)
        ).all()
    assert dupes == []


def _seed_spike(engine, spike_end: datetime, window_minutes: int = 15) -> int:
    """A day of quiet Northwind coverage, then one window where most of it turns negative.

    The scores are written directly (as the scorer would) because the tiny test model's labels are
    random; detection, storage and notification all run for real on top of them.
    """
    step = timedelta(minutes=window_minutes)
    docs, rows = [], []
    start = spike_end - timedelta(days=1, minutes=window_minutes)
    t, i = start, 0
    while t < spike_end - step:
        for j in range(3):
            docs.append((f"seed-{i}-{j}", t + timedelta(minutes=j), "negative" if (i + j) % 10 == 0 else "neutral"))
        t += step
        i += 1
    for j in range(12):
        docs.append((f"spike-{j}", spike_end - step + timedelta(minutes=j), "negative" if j < 10 else "neutral"))
    records = [
        Document(
            source="seed",
            external_id=ext,
            content_hash=f"{ext:0>64}"[-64:],
            title=f"Northwind Bank update {ext}",
            summary=f"Northwind Bank coverage {ext}",
            link=None,
            published_at=pub,
            entities=(EntityMention("NWB", "watchlist", "Northwind Bank"),),
        )
        for ext, pub, _ in docs
    ]
    with store.session_scope(engine) as session:
        store.ensure_sources(session, [SourceConfig(name="seed", url="http://127.0.0.1/seed.xml")])
        store.save_documents(session, records)
        store.register_model(
            session, TINY_VERSION, name=TINY_VERSION, path="tiny", labels=["negative", "neutral", "positive"]
        )
        ids = dict(
            session.execute(select(s.Document.external_id, s.Document.id).where(s.Document.source_name == "seed")).all()
        )
        for ext, _, label in docs:
            probs = (
                {"negative": 0.05, "neutral": 0.9, "positive": 0.05}
                if label == "neutral"
                else {"negative": 0.9, "neutral": 0.05, "positive": 0.05}
            )
            rows.append(ScoreRow(ids[ext], TINY_VERSION, Prediction(label=label, probs=probs)))
        store.save_scores(session, rows)
    return len(docs)


KILL_AFTER_FIRST_CHUNK = """
import sys, time
from pipeline import orchestrate
from pipeline.score import Scorer
calls = {"n": 0}
real = Scorer.score
def score(self, texts):
    calls["n"] += 1
    if calls["n"] == 2:  # the first chunk is committed by now; hang in the second until killed
        print("IN_SECOND_CHUNK", flush=True)
        time.sleep(300)
    return real(self, texts)
Scorer.score = score
orchestrate.monitor_score()
"""


def test_killed_score_task_and_reruns_leave_no_duplicates(tmp_path, pg_url, engine, monitor_env):
    """SIGKILL the score task after its first committed chunk, then let the DAG run (the retry) finish,
    then run the same window again: every document scored once, one alert, one message per sink."""
    from pipeline.detect import window_end

    feeds, hook, smtp = monitor_env["feeds"], monitor_env["webhook"], monitor_env["smtp"]
    # the latest complete window: alerts about older windows are recorded but not paged (backfill rule)
    spike_end = window_end(datetime.now(UTC), 15)
    seeded = _seed_spike(engine, spike_end)
    feeds.put("wire.xml", rss("wire", window_items("wire", spike_end - timedelta(hours=3), 7)))
    feeds.put("social.xml", rss("social", window_items("social", spike_end - timedelta(hours=5), 5)))

    from pipeline import orchestrate

    for name in ("wire", "social"):
        assert orchestrate.monitor_ingest(name)["status"] == "ok"
    err_log = (tmp_path / "score-task.err").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_AFTER_FIRST_CHUNK],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=err_log,
        text=True,
    )
    try:
        ready, _, _ = io_select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if "IN_SECOND_CHUNK" not in line:
            err_log.seek(0)
            pytest.fail(f"score task did not reach its second chunk: {line!r}\n{err_log.read()[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        err_log.close()
    assert proc.returncode == -signal.SIGKILL
    with engine.connect() as c:
        partial = c.scalar(
            select(func.count()).select_from(s.Score).join(s.Document).where(s.Document.source_name != "seed")
        )
    assert partial == 4, "the first chunk (chunk_size=4) should be committed before the kill"

    dag = fresh_dag("finsent_monitor")
    dr = dag.test(logical_date=spike_end)
    assert dr.state == "success"
    after_retry = _snapshot(engine)
    assert len(after_retry["documents"]) == seeded + 12
    assert len(after_retry["scores"]) == seeded + 12
    spikes = [
        a for a in after_retry["alerts"] if a.kind == "spike" and a.scope_kind == "entity" and a.scope_value == "NWB"
    ]
    assert len(spikes) == 1 and spikes[0].window_end == spike_end
    alert_ids = {a.id for a in after_retry["alerts"]}
    assert {(d.alert_id, d.sink) for d in after_retry["deliveries"] if d.status == "sent"} >= {
        (spikes[0].id, "ops-slack"),
        (spikes[0].id, "ops-mail"),
    }
    slack_msgs, mails = len(hook.bodies), len(smtp.messages)
    assert any("NWB" in t or "Northwind" in t for t in hook.texts())

    dr = dag.test(logical_date=spike_end)
    assert dr.state == "success"
    assert _snapshot(engine) == after_retry
    assert {a.id for a in _snapshot(engine)["alerts"]} == alert_ids
    assert (len(hook.bodies), len(smtp.messages)) == (slack_msgs, mails), "a rerun delivered an alert twice"
    first_run, rerun = _runs(engine)[-2:]
    assert first_run.counts["alerts"] >= 1 and rerun.counts["alerts"] == 0, (
        "counts.alerts repeats the window's old alerts"
    )


def test_failed_task_notifies_sinks_without_leaking_secrets(tmp_path, monitor_env, monkeypatch):
    """A task that cannot reach the database fails the DAG run and tells Slack and email which task and why."""
    password = "pw-Sup3rSecret"
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg://postgres:{password}@127.0.0.1:5432/finsent_no_such_db")
    dag = fresh_dag("finsent_monitor")
    dr = dag.test(logical_date=datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    assert dr.state == "failed"
    hook, smtp = monitor_env["webhook"], monitor_env["smtp"]
    texts = hook.texts()
    assert len(texts) == 1 and "finsent_monitor.start_run" in texts[0], texts
    assert "StoreError" in texts[0] and "finsent_no_such_db" in texts[0]
    assert len(smtp.messages) == 1 and "finsent_monitor.start_run" in smtp.messages[0]["Subject"]
    for blob in texts + [m.get_content() for m in smtp.messages]:
        assert password not in blob and "test-secret-token" not in blob


def test_failure_notice_text_from_feeds_is_escaped_and_a_broken_sink_does_not_stop_the_others(
    monitor_env, capsys, caplog
):
    """The on_failure callback with an error quoting hostile feed text: Slack gets it inert in a code block,
    email and the console get it without control characters, and a sink that fails is logged without secrets."""
    from types import SimpleNamespace

    from pipeline import orchestrate

    hook, smtp = monitor_env["webhook"], monitor_env["smtp"]
    hostile = "feed 'wire' item <!channel> <http://evil.example|click> @here *bold* ```x``` \x1b[31mred\u202e"
    ti = SimpleNamespace(
        dag_id="finsent_monitor",
        task_id="ingest",
        map_index=1,
        run_id="scheduled__2026-03-02T10:00:00+00:00",
        try_number=3,
    )
    context = {"ti": ti, "exception": ValueError(hostile), "data_interval_end": datetime(2026, 3, 2, 10, 0, tzinfo=UTC)}
    orchestrate.on_failure(context)

    assert len(hook.bodies) == 1 and len(smtp.messages) == 1
    post = hook.bodies[0]
    assert post["blocks"][0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "[finsent] task failed: finsent_monitor.ingest[1]", "emoji": False},
    }
    code = post["blocks"][1]["text"]["text"]
    assert code.startswith("```") and code.endswith("```") and code.count("```") == 2, code
    assert "Task: ingest[1]" in code and "Try: 3" in code and "ValueError" in code
    raw = json.dumps(post, ensure_ascii=False)
    for bad in ("<!channel>", "<http://evil.example|click>", "@here", "\x1b", "\u202e"):
        assert bad not in raw, bad
    assert "&lt;!channel&gt;" in code and "&lt;http://evil.example|click&gt;" in code
    assert "<" not in post["text"] and "*" not in post["text"]
    mail = smtp.messages[0]
    assert mail["Subject"] == "[finsent] task failed: finsent_monitor.ingest[1]"
    assert (
        "<!channel>" in mail.get_content() and "\x1b" not in mail.get_content()
    )  # plain text: shown as is, minus control characters
    out = capsys.readouterr().out
    assert "finsent_monitor.ingest[1]" in out and "\x1b" not in out and "\u202e" not in out

    hook.status = 500
    caplog.clear()
    assert orchestrate.send_notice(orchestrate.load(), "[finsent] task failed: x", "Error: boom") == [
        "console",
        "ops-mail",
    ]
    assert len(smtp.messages) == 2 and "ops-slack" in caplog.text and "HTTP 500" in caplog.text
    assert "test-secret-token" not in caplog.text


def test_maintenance_dag_applies_retention_and_refreshes_rollups(airflow_db, tmp_path, pg_url, engine, monkeypatch):
    monkeypatch.setenv(
        "FINSENT_CONFIG", str(write_config(tmp_path / "m.yaml", {"wire": "http://127.0.0.1:9/none.xml"}))
    )
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("FINSENT_RETENTION_DAYS", "30")
    run_end = datetime(2026, 3, 5, 0, 0, tzinfo=UTC)
    _seed_spike(engine, run_end - timedelta(days=1))
    with engine.begin() as c:
        c.execute(text("UPDATE documents SET fetched_at = published_at"))
        old_ids = [r[0] for r in c.execute(text("SELECT id FROM documents ORDER BY id LIMIT 5"))]
        c.execute(
            text("UPDATE documents SET fetched_at = :t WHERE id = ANY(:ids)"),
            {"t": run_end - timedelta(days=31), "ids": old_ids},
        )
        total = c.scalar(text("SELECT count(*) FROM documents"))
        assert (
            c.scalar(text("SELECT count(*) FROM v_sentiment_daily")) == 0
        )  # scores written outside a cycle: no rollup yet

    dag = fresh_dag("finsent_maintenance")
    assert dag.test(logical_date=run_end).state == "success"
    with engine.connect() as c:
        cleared = c.execute(text("SELECT id FROM documents WHERE summary = '' ORDER BY id")).scalars().all()
        assert cleared == old_ids
        assert c.scalar(text("SELECT count(*) FROM documents")) == total  # headlines and scores stay
        assert c.scalar(text("SELECT count(*) FROM scores")) == total
        daily = c.execute(
            text("SELECT scope_kind, scope_value, total_count FROM v_sentiment_daily WHERE scope_kind = 'entity'")
        ).all()
    assert sum(r.total_count for r in daily) == total and {r.scope_value for r in daily} == {"NWB"}
    # idempotent: a rerun of the same day clears nothing more
    assert dag.test(logical_date=run_end).state == "success"
    with engine.connect() as c:
        assert c.execute(text("SELECT id FROM documents WHERE summary = '' ORDER BY id")).scalars().all() == old_ids


def test_dashboard_views_agree_with_stored_scores(engine):
    end = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
    n = _seed_spike(engine, end)
    from pipeline.maintenance import refresh_rollups

    refresh_rollups(engine)  # the views read the rollups, which detection (or maintenance) writes
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT bucket_start, total_count, neg_count, neg_share FROM v_sentiment_hourly WHERE scope_kind = "
                "'entity' AND scope_value = 'NWB' ORDER BY bucket_start"
            )
        ).all()
        market = c.scalar(text("SELECT sum(total_count) FROM v_sentiment_hourly WHERE scope_kind = 'market'"))
        negs = c.scalar(text("SELECT count(*) FROM scores WHERE label = 'negative'"))
    assert sum(r.total_count for r in rows) == n == market
    assert sum(r.neg_count for r in rows) == negs
    last = rows[-1]
    assert last.bucket_start == end - timedelta(hours=1) and last.neg_share == pytest.approx(
        last.neg_count / last.total_count
    )
    baseline = sum(r.neg_count for r in rows[:-1]) / sum(r.total_count for r in rows[:-1])
    assert last.neg_share > 0.4 > 0.2 > baseline


@pytest.mark.data
def test_train_dag_trains_evaluates_and_gates_against_the_bundled_default(
    airflow_db, tmp_path, pg_url, engine, tiny_model_dir, monkeypatch
):
    """finsent_train with a tiny base and two steps: a registered candidate with its fixed-split metrics in
    the registry, refused by the registry's gate: with no production model it must beat the bundled default."""
    from pipeline.registry import bundled_baseline

    default_version, default_metrics, _ = bundled_baseline()
    monkeypatch.setenv(
        "FINSENT_CONFIG", str(write_config(tmp_path / "t.yaml", {"wire": "http://127.0.0.1:9/none.xml"}))
    )
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("FINSENT_TRAIN_OUTPUT", str(tmp_path / "candidates"))
    dag = fresh_dag("finsent_train")
    conf = {"base": str(tiny_model_dir), "max_steps": 2, "epochs": 1}
    assert dag.test(logical_date=datetime(2026, 3, 1, 3, 0, tzinfo=UTC), run_conf=conf).state == "success"
    with engine.connect() as c:
        rows = c.execute(
            select(s.ModelVersion.id, s.ModelVersion.path, s.ModelVersion.is_production, s.ModelVersion.metrics)
        ).all()
    assert len(rows) == 1 and not rows[0].is_production
    assert Path(rows[0].path).is_relative_to(tmp_path / "candidates") and (Path(rows[0].path) / "config.json").is_file()
    assert set(rows[0].metrics["eval"]) >= {"fpb_test", "tfns_dev"}
    decision = rows[0].metrics["promotion_decision"]
    assert not decision["promoted"] and decision["incumbent"] is None and decision["baseline"] == default_version
    assert decision["reasons"][0] == f"no production model: compared with the bundled default {default_version}"
    primary = next(c for c in decision["comparisons"] if "primary" in c["metric"])
    assert (
        primary["incumbent"] == default_metrics["eval"]["fpb_test"]["macro_f1"]
        and primary["candidate"] < primary["incumbent"]
    )
    assert any(r.startswith("not better on the primary fpb_test macro_f1") for r in decision["reasons"])


def test_bad_task_inputs_fail_with_errors_that_name_them(tmp_path, monkeypatch):
    from pipeline import orchestrate
    from pipeline.config import ConfigError
    from pipeline.maintenance import MaintenanceError, retention_days

    monkeypatch.delenv("FINSENT_CONFIG", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_FINSENT_CONFIG_PATH", raising=False)
    with pytest.raises(orchestrate.OrchestrationError, match="finsent_config_path.*FINSENT_CONFIG"):
        orchestrate.load()
    bad = tmp_path / "typo.yaml"
    bad.write_text("sources:\n  - name: wire\n    url: http://127.0.0.1/x.xml\n    timeout: 5\n")
    monkeypatch.setenv("FINSENT_CONFIG", str(bad))
    with pytest.raises(ConfigError, match=r"typo\.yaml[\s\S]*sources\.0\.timeout: unknown key"):
        orchestrate.source_names()
    with pytest.raises(MaintenanceError, match="FINSENT_RETENTION_DAYS='ninety'"):
        retention_days({"FINSENT_RETENTION_DAYS": "ninety"})
    assert retention_days({}) == 90 and retention_days({"FINSENT_RETENTION_DAYS": "7"}) == 7


def test_finsent_db_connection_becomes_a_sqlalchemy_url():
    from airflow.sdk import Connection
    from sqlalchemy.engine import make_url

    from pipeline import orchestrate

    conn = Connection(
        conn_id="finsent_db",
        conn_type="postgres",
        host="db.internal",
        port=5433,
        login="finsent",
        password="p@ss/w:rd",
        schema="finsent",
        extra=json.dumps({"options": "-csearch_path=prod", "sslmode": "require", "other": "x"}),
    )
    url = make_url(orchestrate.connection_url(conn))
    assert (url.drivername, url.host, url.port, url.username, url.password, url.database) == (
        "postgresql+psycopg",
        "db.internal",
        5433,
        "finsent",
        "p@ss/w:rd",
        "finsent",
    )
    assert dict(url.query) == {"options": "-csearch_path=prod", "sslmode": "require"}


def test_run_window_is_what_the_operator_meant():
    """Scheduled/backfill runs keep their interval; a manual run uses its logical date (Airflow 3 infers the
    interval from the trigger time), else its trigger time; explicit REST bounds are kept."""
    from types import SimpleNamespace as NS

    from pipeline import orchestrate

    def at(h: int, m: int) -> datetime:
        return datetime(2026, 11, 30, h, m, tzinfo=UTC)

    scheduled = NS(
        run_type="scheduled",
        data_interval_start=at(10, 0),
        data_interval_end=at(10, 15),
        logical_date=at(10, 0),
        run_after=at(10, 15),
    )
    assert orchestrate.run_window(scheduled) == (at(10, 0), at(10, 15))
    backfill = NS(
        run_type="backfill",
        data_interval_start=at(8, 0),
        data_interval_end=at(8, 15),
        logical_date=at(8, 0),
        run_after=at(12, 3),
    )
    assert orchestrate.run_window(backfill) == (at(8, 0), at(8, 15))
    # `airflow dags trigger -l 2026-11-30T10:07Z` at 12:03: Airflow hands the 11:45-12:00 interval
    with_date = NS(
        run_type="manual",
        data_interval_start=at(11, 45),
        data_interval_end=at(12, 0),
        logical_date=at(10, 7),
        run_after=at(12, 3),
    )
    assert orchestrate.run_window(with_date) == (at(9, 45), at(10, 0))
    no_date = NS(
        run_type="manual", data_interval_start=None, data_interval_end=None, logical_date=None, run_after=at(12, 3)
    )
    assert orchestrate.run_window(no_date) == (at(11, 45), at(12, 0))
    rest = NS(
        run_type="manual",
        data_interval_start=at(6, 0),
        data_interval_end=at(6, 15),
        logical_date=at(6, 0),
        run_after=at(12, 3),
    )
    assert orchestrate.run_window(rest) == (at(6, 0), at(6, 15))


def test_manual_trigger_without_logical_date_processes_the_latest_window_and_pages_nobody(engine, monitor_env, capsys):
    """`airflow dags trigger finsent_monitor` with no logical date: the run succeeds for the latest complete
    window at its trigger time, with no failure notice to any sink."""
    for name in ("wire", "social"):
        monitor_env["feeds"].put(
            f"{name}.xml", rss(name, window_items(name, datetime(2026, 3, 2, 9, 50, tzinfo=UTC), 2))
        )
    dag = fresh_dag("finsent_monitor")
    dr = dag.test(logical_date=None, run_after=datetime(2026, 3, 2, 10, 7, tzinfo=UTC))
    assert dr.state == "success"
    runs = _runs(engine)
    assert [(r.status, r.interval_start, r.interval_end) for r in runs] == [
        ("ok", datetime(2026, 3, 2, 9, 45, tzinfo=UTC), datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    ]
    with engine.connect() as c:
        assert set(c.execute(select(s.RiskScore.window_end).distinct()).scalars()) <= {
            datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
        }
    assert monitor_env["webhook"].bodies == [] and monitor_env["smtp"].messages == []
    assert "XCom not found" not in capsys.readouterr().out  # mapped results are read in one slice, not past the end


def test_train_skips_a_catch_up_run_but_not_its_schedule_or_a_trigger():
    """Unpausing finsent_train makes Airflow run last Sunday's interval at once: that run trains nothing."""
    from types import SimpleNamespace as NS

    from pipeline import orchestrate

    sunday = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
    scheduled = NS(run_type="scheduled", run_after=sunday, data_interval_end=sunday)
    assert orchestrate.train_due(scheduled, now=sunday + timedelta(minutes=1))
    assert not orchestrate.train_due(scheduled, now=sunday + timedelta(days=2))
    assert orchestrate.train_due(
        NS(run_type="manual", run_after=sunday, data_interval_end=sunday), now=sunday + timedelta(days=2)
    )
    assert orchestrate.train_due(
        NS(run_type="backfill", run_after=sunday, data_interval_end=sunday), now=sunday + timedelta(days=2)
    )
