"""Slack interactive buttons: the "Acknowledge" button of an alert message, verified and applied.

Slack signs every interaction request (HMAC-SHA256 of "v0:{timestamp}:{body}" with the app's signing
secret, in X-Slack-Signature); a request that is unsigned, signed with another secret, altered or older
than five minutes (a replay) is refused before anything is parsed. The web server (`finsent serve`)
mounts `handle_slack_action` at /slack/actions; acknowledging goes through `pipeline.acks.acknowledge`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

from sqlalchemy.engine import Engine

from pipeline.acks import AckError, acknowledge
from pipeline.messages import ACK_ACTION_ID

MAX_SKEW = timedelta(minutes=5)
MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class SlackActionResult:
    """What to answer Slack: the HTTP status and a JSON body (an ephemeral note to the clicking user)."""

    status: int
    body: dict[str, str]


def _note(status: int, text: str) -> SlackActionResult:
    return SlackActionResult(status, {"response_type": "ephemeral", "replace_original": "false", "text": text})


def verify_slack_signature(body: bytes, headers: Mapping[str, str], secret: str, now: datetime) -> str | None:
    """None when the request is Slack's and fresh; else why it is refused (no secret material in it)."""
    if not secret:
        return "no Slack signing secret configured"
    h = {k.lower(): v for k, v in headers.items()}
    ts, sig = h.get("x-slack-request-timestamp", ""), h.get("x-slack-signature", "")
    if not ts.isdigit() or not sig.startswith("v0="):
        return "missing or malformed Slack signature headers"
    if abs(now.timestamp() - int(ts)) > MAX_SKEW.total_seconds():
        return "stale Slack request (timestamp more than 5 minutes off)"
    want = "v0=" + hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig):
        return "Slack signature does not match"
    return None


def handle_slack_action(
    body: bytes, headers: Mapping[str, str], engine: Engine, secret: str, now: datetime | None = None
) -> SlackActionResult:
    """Verify a Slack interaction request and acknowledge the alert its button names."""
    now = now or datetime.now(UTC)
    if len(body) > MAX_BODY:
        return _note(413, "request too large")
    why = verify_slack_signature(body, headers, secret, now)
    if why:
        return _note(401, why)
    try:
        payload = json.loads(parse_qs(body.decode("utf-8"), strict_parsing=True)["payload"][0])
        actions = payload.get("actions") or []
        user = payload.get("user") or {}
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, AttributeError):
        return _note(400, "malformed Slack interaction payload")
    action = next((a for a in actions if isinstance(a, dict) and a.get("action_id") == ACK_ACTION_ID), None)
    if action is None or not isinstance(action.get("value"), str):
        return _note(400, "not a finsent acknowledge button")
    who = f"slack:{user.get('username') or user.get('name') or user.get('id') or 'unknown'}"
    try:
        res = acknowledge(engine, action["value"], who, at=now)
    except AckError as e:
        return _note(200, f"Cannot acknowledge: {e}")
    if res.already:
        return _note(200, f"Already acknowledged by {res.acknowledged_by} at {res.acknowledged_at:%Y-%m-%d %H:%M} UTC.")
    return _note(
        200, f"Acknowledged alert {res.alert_id[:12]} as {res.acknowledged_by}; its pending messages will not be sent."
    )
