"""Acting from the message: the signed ack link an email carries works once and refuses a tampered or
expired token; the Slack button is verified (signature, freshness) before it acknowledges."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pytest
from sqlalchemy import update

from pipeline.acks import AckError, acknowledge, verify_ack_token
from pipeline.config import FinsentConfig
from pipeline.messages import ACK_ACTION_ID
from pipeline.notify import deliver_pending
from pipeline.slack_actions import handle_slack_action
from pipeline.store import schema as s
from pipeline.store import session_scope
from tests.notify_receivers import Webhook
from tests.test_notify import FAST, NOW, add_alert

SECRET = "ack-secret-for-tests"


def add_hex_alert(engine) -> str:
    """The shared test alert, with a lower-case id like real ones (hex digests)."""
    aid = add_alert(engine)
    with session_scope(engine) as session:
        session.execute(update(s.Alert).where(s.Alert.id == aid).values(id=aid.lower()))
    return aid.lower()


def test_the_emailed_ack_link_works_once_and_refuses_tampered_or_expired_tokens(
    engine,
    starttls_smtp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box, port = starttls_smtp
    monkeypatch.setenv("TEST_ACK_SECRET", SECRET)
    cfg = FinsentConfig.model_validate(
        {"watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}], "database_url": "sqlite://",
         "links": {"base_url": "https://finsent.example.com/", "ack_secret_env": "TEST_ACK_SECRET", "ack_ttl_hours": 24,
                   "dashboard_url_template": "https://grafana.example.com/d/x?var-scope={scope_kind}:{scope_value}&from={from_ms}"},
         "sinks": [{"name": "mail", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_user": "alerts",
                    "smtp_password_env": "TEST_SMTP_PASSWORD", "mail_to": ["desk@example.com"]}]}
    )  # fmt: skip
    aid = add_hex_alert(engine)
    assert deliver_pending(engine, cfg, now=NOW, retry_delays=FAST).sent == 1
    msg = box.messages[0]
    plain = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert f"View:       https://finsent.example.com/alerts/{aid}" in plain
    assert "https://grafana.example.com/d/x?var-scope=entity:NWB&from=" in plain
    token = re.search(r"https://finsent\.example\.com/ack/(\S+)", plain).group(1)
    assert f"/ack/{token}" in html and SECRET not in plain and SECRET not in html
    assert verify_ack_token(token, SECRET, now=NOW) == aid
    first = acknowledge(engine, verify_ack_token(token, SECRET, now=NOW), "link")
    again = acknowledge(engine, verify_ack_token(token, SECRET, now=NOW), "someone-else")
    assert not first.already and again.already and again.acknowledged_by == "link"
    tampered = token.replace(aid, aid[:-1] + ("0" if aid[-1] != "0" else "1"))
    with pytest.raises(AckError):
        verify_ack_token(tampered, SECRET, now=NOW)
    with pytest.raises(AckError):
        verify_ack_token(token, SECRET, now=NOW + timedelta(hours=25))  # the link lived ack_ttl_hours


def _signed(body: bytes, secret: str, ts: int) -> dict[str, str]:
    sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": str(ts),
        "X-Slack-Signature": sig,
        "Content-Type": "application/x-www-form-urlencoded",
    }


def test_slack_button_acknowledges_only_when_signed_and_fresh(
    engine,
    slack_webhook: Webhook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_SIGNING", "slack-signing-secret")
    cfg = FinsentConfig.model_validate(
        {"watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}], "database_url": "sqlite://",
         "links": {"slack_signing_secret_env": "TEST_SIGNING"},
         "sinks": [{"name": "slack", "kind": "slack", "webhook_url_env": "TEST_SLACK_URL"}]}
    )  # fmt: skip
    aid = add_hex_alert(engine)
    assert deliver_pending(engine, cfg, now=NOW, retry_delays=FAST).sent == 1
    buttons = [e for b in slack_webhook.posts[0]["blocks"] if b["type"] == "actions" for e in b["elements"]]
    ack = next(e for e in buttons if e.get("action_id") == ACK_ACTION_ID)
    assert ack["value"] == aid
    payload = {
        "type": "block_actions",
        "user": {"id": "U1", "username": "alice"},
        "actions": [{"action_id": ACK_ACTION_ID, "value": ack["value"]}],
    }
    body = urlencode({"payload": json.dumps(payload)}).encode()
    now = datetime.now(UTC)
    ts = int(time.time())
    assert (
        handle_slack_action(body, _signed(body, "another-secret", ts), engine, "slack-signing-secret", now).status
        == 401
    )
    assert (
        handle_slack_action(
            body, _signed(body, "slack-signing-secret", ts - 3600), engine, "slack-signing-secret", now
        ).status
        == 401
    )
    forged = body.replace(b"alice", b"mallory")
    assert (
        handle_slack_action(
            forged, _signed(body, "slack-signing-secret", ts), engine, "slack-signing-secret", now
        ).status
        == 401
    )
    with session_scope(engine) as session:
        assert session.get(s.Alert, aid).acknowledged_at is None
    ok = handle_slack_action(body, _signed(body, "slack-signing-secret", ts), engine, "slack-signing-secret", now)
    assert ok.status == 200 and "Acknowledged" in ok.body["text"]
    with session_scope(engine) as session:
        assert session.get(s.Alert, aid).acknowledged_by == "slack:alice"
    again = handle_slack_action(body, _signed(body, "slack-signing-secret", ts), engine, "slack-signing-secret", now)
    assert again.status == 200 and "Already acknowledged by slack:alice" in again.body["text"]


def test_slack_message_keeps_the_signed_link_next_to_the_button(
    engine,
    slack_webhook: Webhook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If Slack cannot reach the server (firewall, wrong request URL) the signed web link still acknowledges."""
    monkeypatch.setenv("TEST_SIGNING", "slack-signing-secret")
    monkeypatch.setenv("TEST_ACK_SECRET", SECRET)
    cfg = FinsentConfig.model_validate(
        {"watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}], "database_url": "sqlite://",
         "links": {"base_url": "https://finsent.example.com/", "ack_secret_env": "TEST_ACK_SECRET",
                   "slack_signing_secret_env": "TEST_SIGNING"},
         "sinks": [{"name": "slack", "kind": "slack", "webhook_url_env": "TEST_SLACK_URL"}]}
    )  # fmt: skip
    aid = add_hex_alert(engine)
    assert deliver_pending(engine, cfg, now=NOW, retry_delays=FAST).sent == 1
    buttons = [e for b in slack_webhook.posts[0]["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert [e["value"] for e in buttons if e.get("action_id") == ACK_ACTION_ID] == [aid]
    links = [e["url"] for e in buttons if e.get("url", "").startswith("https://finsent.example.com/ack/")]
    assert len(links) == 1 and verify_ack_token(links[0].rsplit("/", 1)[1], SECRET, now=NOW) == aid
