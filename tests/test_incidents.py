"""Incidents end to end: the demo surge through Postgres to a Slack webhook and SMTP on 127.0.0.1, and
escalation/resolution threading against a loopback fake of Slack's Web API and a real SMTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select, text

from pipeline import cycle
from pipeline.demo import demo_config
from pipeline.notify import deliver_pending
from pipeline.store import make_engine, session_scope
from pipeline.store import schema as s
from tests.conftest import migrated_schema
from tests.notify_receivers import Webhook
from tests.test_notify import FAST, NOW

SPIKE_END = datetime(2026, 11, 20, 15, tzinfo=UTC)
STOPWORDS = {"the", "and", "a", "an", "to", "of", "as", "after", "in", "on", "for", "with", "at", "by", "is"}


@pytest.fixture(scope="module")
def demo_pg() -> Iterator[str]:
    """The demo week ingested, scored by the bundled model and detected at the surge hour, in Postgres."""
    with migrated_schema() as url:
        cfg = demo_config(url)
        engine = make_engine(url)
        cycle.ingest_all(cfg, engine)
        scorer = cycle.load_scorer(cfg, path=cfg.model.path)
        scored = cycle.score_pending(cfg, engine, scorer)
        cycle.detect_alerts(cfg, engine, SPIKE_END, scored.model_version, scorer=scorer)
        engine.dispose()
        yield url


def _sinks(port: int) -> list[dict]:
    return [
        {"name": "slack-desk", "kind": "slack", "webhook_url_env": "TEST_SLACK_URL"},
        {"name": "mail-desk", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_user": "alerts",
         "smtp_password_env": "TEST_SMTP_PASSWORD", "mail_from": "finsent@example.com",
         "mail_to": ["desk@example.com"]},
    ]  # fmt: skip


def test_demo_surge_is_one_incident_with_one_message_per_sink_entity_first(
    demo_pg, slack_webhook: Webhook, starttls_smtp
) -> None:
    box, port = starttls_smtp
    cfg = demo_config(demo_pg).model_copy(update={"sinks": []})
    cfg = type(cfg).model_validate({**cfg.model_dump(mode="json"), "database_url": demo_pg, "sinks": _sinks(port)})
    engine = make_engine(demo_pg)
    report = deliver_pending(engine, cfg, now=SPIKE_END + timedelta(minutes=5), retry_delays=FAST)
    with session_scope(engine) as session:
        alerts = session.scalars(select(s.Alert).where(s.Alert.window_end == SPIKE_END)).all()
        incidents = session.scalars(select(s.Incident)).all()
        statuses = sorted((d.sink, d.status) for d in session.scalars(select(s.AlertDelivery)))
    engine.dispose()
    scopes = {(a.scope_kind, a.scope_value) for a in alerts}
    assert ("entity", "NWB") in scopes and ("market", "*") in scopes and len(alerts) >= 3, scopes
    assert len(incidents) == 1 and {a.incident_id for a in alerts} == {incidents[0].id}
    assert incidents[0].head_scope_kind == "entity" and incidents[0].head_scope_value == "NWB"
    assert report.sent == 2, report.errors
    assert len(slack_webhook.posts) == 1 and len(box.messages) == 1
    header = slack_webhook.posts[0]["blocks"][0]["text"]["text"]
    assert header == "[CRITICAL] Northwind Bank (NWB): negative news surge"
    raw = json.dumps(slack_webhook.posts[0], ensure_ascii=False)
    assert "Also moved" in raw and "market-wide" in raw
    assert box.messages[0]["Subject"] == "finsent: Northwind Bank (NWB): negative news surge"
    assert statuses.count(("slack-desk", "sent")) == 1 and statuses.count(("slack-desk", "grouped")) == len(alerts) - 1


def test_alert_counts_equal_the_dashboard_view(demo_pg) -> None:
    engine = make_engine(demo_pg)
    with session_scope(engine) as session:
        alerts = session.scalars(select(s.Alert).where(s.Alert.window_end == SPIKE_END)).all()
        assert alerts
        for a in alerts:
            row = session.execute(
                text(
                    "SELECT total_count, neg_count FROM v_sentiment_hourly "
                    "WHERE bucket_start = :b AND scope_kind = :k AND scope_value = :v"
                ),
                {"b": a.window_start, "k": a.scope_kind, "v": a.scope_value},
            ).one()
            assert (row.total_count, row.neg_count) == (a.total_count, a.neg_count), (a.scope_kind, a.scope_value)
    engine.dispose()


def test_demo_evidence_has_no_stopwords_nor_the_entity_name(demo_pg) -> None:
    engine = make_engine(demo_pg)
    with session_scope(engine) as session:
        a = session.scalars(
            select(s.Alert).where(s.Alert.window_end == SPIKE_END, s.Alert.scope_kind == "entity")
        ).first()
    engine.dispose()
    assert a is not None
    tokens = [t for d in a.details["top_documents"] for t in d["evidence"]]
    assert tokens, "the demo headlines should carry evidence"
    words = {w.lower() for t in tokens for w in t.split()}
    assert not words & STOPWORDS, words
    assert not words & {"northwind", "nwb", "bank", "$nwb"}, words
    assert not any(w.strip("%$").replace(".", "").isdigit() for w in words), words


class FakeSlackApi:
    """A loopback stand-in for Slack's Web API chat.postMessage: records calls, answers with a channel and ts."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, dict]] = []
        self.error: str | None = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                api.calls.append((dict(self.headers), json.loads(body)))
                answer = (
                    {"ok": False, "error": api.error}
                    if api.error
                    else {"ok": True, "channel": "C0DESK", "ts": f"1700000000.00{len(api.calls)}"}
                )
                out = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _add(
    engine, aid: str, kind: str, scope: tuple[str, str], end: datetime, severity: str, episode: str, neg: int = 12
) -> None:
    with session_scope(engine) as session:
        session.add(
            s.Alert(
                id=aid, episode_id=episode, kind=kind, scope_kind=scope[0], scope_value=scope[1],
                window_start=end - timedelta(hours=1), window_end=end, severity=severity, neg_count=neg, total_count=15,
                neg_share=neg / 15, baseline_share=0.15, baseline_neg_rate=0.6, statistic=9.5, p_value=1e-9,
                risk_score=70.0 + neg,
                details={"episode_severity": severity if kind != "resolved" else "critical",
                         "episode_onset": (SPIKE_END - timedelta(hours=1)).isoformat(),
                         "top_documents": [] if kind == "resolved" else [
                             {"document_id": 7, "title": "Northwind cuts dividend", "link": None,
                              "source": "newswire", "p_negative": 0.9, "evidence": ["cuts"]}]},
                created_at=NOW,
            )
        )  # fmt: skip


def test_escalation_and_resolution_thread_in_email_and_slack(
    engine, starttls_smtp, monkeypatch: pytest.MonkeyPatch
) -> None:
    box, port = starttls_smtp
    api = FakeSlackApi()
    monkeypatch.setenv("TEST_SLACK_BOT", "xoxb-test-token")
    sinks = _sinks(port)
    sinks[0].update(
        {
            "channel": "C0DESK",
            "bot_token_env": "TEST_SLACK_BOT",
            "api_base_url": api.url,
            "severities": ["warning", "critical"],
        }
    )
    from pipeline.config import FinsentConfig

    cfg = FinsentConfig.model_validate(
        {"watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}], "sinks": sinks, "database_url": "sqlite://"}
    )
    _add(engine, "spike-nwb", "spike", ("entity", "NWB"), SPIKE_END, "critical", "ep-nwb")
    _add(engine, "spike-mkt", "spike", ("market", "*"), SPIKE_END, "warning", "ep-mkt")
    assert deliver_pending(engine, cfg, now=SPIKE_END, retry_delays=FAST).sent == 2
    _add(
        engine, "esc-nwb", "escalated", ("entity", "NWB"), SPIKE_END + timedelta(hours=1), "critical", "ep-nwb", neg=14
    )
    assert deliver_pending(engine, cfg, now=SPIKE_END + timedelta(hours=1), retry_delays=FAST).sent == 2
    _add(engine, "res-nwb", "resolved", ("entity", "NWB"), SPIKE_END + timedelta(hours=5), "info", "ep-nwb", neg=0)
    _add(engine, "res-mkt", "resolved", ("market", "*"), SPIKE_END + timedelta(hours=5), "info", "ep-mkt", neg=0)
    assert deliver_pending(engine, cfg, now=SPIKE_END + timedelta(hours=5), retry_delays=FAST).sent == 2

    with session_scope(engine) as session:
        incidents = session.scalars(select(s.Incident)).all()
    assert len(incidents) == 1 and incidents[0].state == "resolved"
    # Email: one conversation, every later message replying to the first.
    assert len(box.messages) == 3
    first = box.messages[0]["Message-ID"]
    assert {m["Subject"] for m in box.messages} == {"finsent: Northwind Bank (NWB): negative news surge"}
    assert box.messages[0]["In-Reply-To"] is None
    for m in box.messages[1:]:
        assert m["In-Reply-To"] == first and m["References"] == first
    resolved = box.messages[2].get_body(("plain",)).get_content()
    assert "Back to normal after 6 h" in resolved and "Peak: 93% negative, risk 84/100" in resolved
    assert "alerts ack" not in resolved and "Also back to normal" in resolved
    # Slack: the first post opens a thread, the escalation and resolution reply in it.
    assert len(api.calls) == 3
    assert all(h.get("Authorization") == "Bearer xoxb-test-token" for h, _ in api.calls)
    assert "thread_ts" not in api.calls[0][1] or not api.calls[0][1]["thread_ts"]
    assert [b["thread_ts"] for _, b in api.calls[1:]] == ["1700000000.001", "1700000000.001"]
    assert "Escalating" in api.calls[1][1]["text"] and "RESOLVED" in api.calls[2][1]["text"]
    api.server.shutdown()


def test_webhook_only_updates_say_which_incident_they_continue(engine, slack_webhook: Webhook) -> None:
    from pipeline.config import FinsentConfig

    cfg = FinsentConfig.model_validate(
        {"watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}], "database_url": "sqlite://",
         "links": {"base_url": "https://finsent.example.com"},
         "sinks": [{"name": "slack-desk", "kind": "slack", "webhook_url_env": "TEST_SLACK_URL"}]}
    )  # fmt: skip
    _add(engine, "spike-nwb", "spike", ("entity", "NWB"), SPIKE_END, "critical", "ep-nwb")
    _add(
        engine, "esc-nwb", "escalated", ("entity", "NWB"), SPIKE_END + timedelta(hours=1), "critical", "ep-nwb", neg=14
    )
    assert deliver_pending(engine, cfg, now=SPIKE_END + timedelta(hours=1), retry_delays=FAST).sent == 2
    with session_scope(engine) as session:
        inc = session.scalars(select(s.Incident)).one()
    second = json.dumps(slack_webhook.posts[1], ensure_ascii=False)
    assert f"Update to incident {inc.id[:12]}" in second and "https://finsent.example.com/alerts/spike-nwb" in second
    assert "Update to incident" not in json.dumps(slack_webhook.posts[0], ensure_ascii=False)


def test_slack_web_api_error_is_a_failed_delivery_without_the_token(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import FinsentConfig

    api = FakeSlackApi()
    api.error = "channel_not_found"
    monkeypatch.setenv("TEST_SLACK_BOT", "xoxb-secret-token")
    cfg = FinsentConfig.model_validate(
        {"watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}], "database_url": "sqlite://",
         "sinks": [{"name": "slack-bot", "kind": "slack", "channel": "C0DESK", "bot_token_env": "TEST_SLACK_BOT",
                    "api_base_url": api.url, "max_attempts": 2}]}
    )  # fmt: skip
    _add(engine, "spike-nwb", "spike", ("entity", "NWB"), SPIKE_END, "critical", "ep-nwb")
    report = deliver_pending(engine, cfg, now=SPIKE_END, retry_delays=FAST)
    api.server.shutdown()
    assert report.sent == 0 and report.expired == 1 and len(api.calls) == 2
    assert "chat.postMessage failed" in report.errors[0] and "channel_not_found" in report.errors[0]
    assert "xoxb-secret-token" not in " ".join(report.errors)


def test_alert_found_in_a_later_pass_joins_the_open_incident_of_its_window(engine, starttls_smtp) -> None:
    """A second detection pass over the same window adds the market alert that shares the entity's evidence:
    it joins the incident already open for that window, and its mail replies in that incident's thread."""
    from pipeline.config import FinsentConfig

    box, port = starttls_smtp
    cfg = FinsentConfig.model_validate(
        {
            "watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}],
            "sinks": _sinks(port)[1:],
            "database_url": "sqlite://",
        }
    )
    _add(engine, "spike-nwb", "spike", ("entity", "NWB"), SPIKE_END, "critical", "ep-nwb")
    assert deliver_pending(engine, cfg, now=SPIKE_END, retry_delays=FAST).sent == 1
    _add(engine, "spike-mkt", "spike", ("market", "*"), SPIKE_END, "warning", "ep-mkt")
    _add(engine, "spike-other", "spike", ("entity", "ACME"), SPIKE_END, "warning", "ep-acme")
    with session_scope(engine) as session:  # no shared evidence: this one is a story of its own
        other = session.get(s.Alert, "spike-other")
        other.details = {"top_documents": [{"document_id": 99, "title": "Acme", "link": None}]}
    deliver_pending(engine, cfg, now=SPIKE_END + timedelta(minutes=10), retry_delays=FAST)
    with session_scope(engine) as session:
        incidents = {a.id: a.incident_id for a in session.scalars(select(s.Alert))}
        assert session.scalar(select(func.count()).select_from(s.Incident)) == 2
    assert incidents["spike-mkt"] == incidents["spike-nwb"] != incidents["spike-other"]
    first = box.messages[0]["Message-ID"]
    late = [m for m in box.messages[1:] if "Northwind" in m["Subject"]]
    assert late and all(m["In-Reply-To"] == first for m in late)
