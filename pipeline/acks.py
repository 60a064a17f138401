"""Acknowledging alerts: one library function for the CLI, the web view, signed links and Slack buttons.

An acknowledgement records who and when; an acknowledged alert's pending deliveries are never sent.
Links in alert messages carry a signed, expiring token (HMAC-SHA256 over the alert id and expiry), so
a link works without a login but cannot be forged, altered or reused after it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline.errors import FinsentError
from pipeline.store import session_scope
from pipeline.store.schema import Alert

MAX_BY_LENGTH = 100


class AckError(FinsentError):
    """An acknowledgement that cannot be done: unknown alert, ambiguous prefix, bad or expired token."""


@dataclass(frozen=True)
class AckResult:
    alert_id: str
    acknowledged_by: str
    acknowledged_at: datetime
    already: bool  # True when it had been acknowledged before this call (by acknowledged_by)


def find_alert_id(engine: Engine, id_or_prefix: str) -> str:
    """The full id of the one alert whose id starts with `id_or_prefix` (ids are 32 hex characters)."""
    given = id_or_prefix.strip()
    prefix = given.lower()
    if not prefix:
        raise AckError("empty alert id")
    with session_scope(engine) as session:
        if session.get(Alert, given) is not None:  # an exact id as stored, whatever its case
            return given
        ids = session.scalars(select(Alert.id).where(Alert.id.startswith(prefix, autoescape=True)).limit(2)).all()
    if not ids:
        raise AckError(f"no alert with id {id_or_prefix!r}")
    if len(ids) > 1:
        raise AckError(f"alert id prefix {id_or_prefix!r} is ambiguous: give more characters")
    return ids[0]


def acknowledge(engine: Engine, id_or_prefix: str, by: str, at: datetime | None = None) -> AckResult:
    """Record that `by` acknowledged the alert now (or `at`); a second acknowledgement keeps the first."""
    alert_id = find_alert_id(engine, id_or_prefix)
    who = (by.strip() or "unknown")[:MAX_BY_LENGTH]
    when = at or datetime.now(UTC)
    with session_scope(engine) as session:
        row = session.get(Alert, alert_id, with_for_update=True)
        if row is None:  # deleted between the two statements
            raise AckError(f"no alert with id {id_or_prefix!r}")
        if row.acknowledged_at is not None:
            return AckResult(row.id, row.acknowledged_by or "unknown", row.acknowledged_at, already=True)
        row.acknowledged_at = when
        row.acknowledged_by = who
        return AckResult(row.id, who, when, already=False)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: str) -> bytes:
    return hmac.new(secret.encode("utf-8"), payload.encode("utf-8"), hashlib.sha256).digest()


def sign_ack_token(alert_id: str, secret: str, expires_at: datetime) -> str:
    """A URL-safe token that lets its holder acknowledge `alert_id` until `expires_at`."""
    if not secret:
        raise AckError("no signing secret configured for acknowledgement links")
    payload = f"{alert_id}.{int(expires_at.timestamp())}"
    return f"{payload}.{_b64(_mac(secret, payload))}"


def verify_ack_token(token: str, secret: str, now: datetime | None = None) -> str:
    """The alert id a token was signed for; AckError when it was altered, signed with another secret, or expired."""
    if not secret:
        raise AckError("no signing secret configured for acknowledgement links")
    try:
        alert_id, expiry, signature = token.split(".")
        expires = int(expiry)
        given = _unb64(signature)
    except ValueError as exc:
        raise AckError("malformed acknowledgement token") from exc
    if not hmac.compare_digest(given, _mac(secret, f"{alert_id}.{expiry}")):
        raise AckError("acknowledgement token is not valid")
    if (now or datetime.now(UTC)).timestamp() > expires:
        raise AckError("acknowledgement link has expired")
    return alert_id


def ack_token_for(alert_id: str, secret: str, created_at: datetime, ttl: timedelta = timedelta(days=7)) -> str:
    """The token that goes into an alert message: valid for `ttl` after the alert was created."""
    return sign_ack_token(alert_id, secret, created_at + ttl)
