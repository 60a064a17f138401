"""`finsent run` when alerts cannot be delivered: an outage past expire_hours ends in an operator notice
through the other sink, a `degraded` pipeline run and a non-zero exit (real Postgres, a real SMTP server
that refuses mail, a real webhook receiver on 127.0.0.1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import schema as s
from pipeline.store import session_scope
from tests.test_notify import add_alert, mail_sink, slack_sink

runner = CliRunner()


def test_finsent_run_exits_non_zero_when_an_alert_expires_undelivered(
    tmp_path,
    pg_url,
    engine,
    slack_webhook,
    failing_smtp,
    tiny_model_dir,
    monkeypatch,
):
    box, port = failing_smtp
    aid = add_alert(engine)
    now = datetime.now(UTC)
    with session_scope(engine) as session:  # a delivery an earlier process has been retrying for 25 hours
        session.add(s.AlertDelivery(alert_id=aid, sink="mail-ops", status="failed", attempts=40,
                                    last_error="sink mail-ops: SMTP 451", created_at=now - timedelta(hours=25),
                                    last_attempt_at=now - timedelta(minutes=20),
                                    next_attempt_at=now - timedelta(minutes=5)))  # fmt: skip
    cfg = {
        "sources": [],
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "sinks": [
            mail_sink(port),
            slack_sink(severities=["info"]),
            {"name": "console", "kind": "console", "severities": ["info"]},
        ],
    }
    path = tmp_path / "finsent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("DATABASE_URL", pg_url)

    result = runner.invoke(app, ["run", "-c", str(path)])
    assert result.exit_code == 4, result.output
    assert "degraded: 1 alert deliveries expired undelivered (mail-ops)" in result.output
    assert "mail-ops: 0 sent, 0 pending, 1 failed" in result.output
    assert len(slack_webhook.posts) == 1 and "could not be delivered to mail-ops" in json.dumps(slack_webhook.posts[0])
    assert box.messages == []
    with session_scope(engine) as session:
        run = session.scalars(select(s.PipelineRun).order_by(s.PipelineRun.id.desc())).first()
        assert run is not None and run.status == "degraded"
        assert {"step": "notify", "error": "1 alert deliveries expired undelivered (mail-ops)"} in run.errors

    again = runner.invoke(app, ["run", "-c", str(path)])
    assert again.exit_code == 0, again.output  # told once; nothing new is lost
    assert len(slack_webhook.posts) == 1
