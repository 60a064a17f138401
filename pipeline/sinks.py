"""Sinks: how a message or an operator notice reaches people (console, Slack webhook or Web API, SMTP).

Each sink renders through pipeline.messages and raises DeliveryError on failure with a message safe to log
and store: secrets (webhook URL, bot token, SMTP password) never reach logs, stored errors or exceptions.
Which alert is sent when, and retried how, is pipeline.notify's business.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import ssl
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, Protocol, TextIO

from pipeline import secrets
from pipeline.config import SinkConfig
from pipeline.errors import FinsentError
from pipeline.incidents import MessageKind
from pipeline.messages import (
    AlertView,
    IncidentMessage,
    as_message,
    clean_block,
    clean_text,
    render_html,
    render_notice_slack,
    render_slack,
    render_text,
)


class DeliveryError(FinsentError, RuntimeError):
    """A sink could not deliver; the message is safe to log and store (no secrets)."""


def scrub(message: str, secrets_: Sequence[str | None]) -> str:
    """The message with every secret (and a Slack webhook path) replaced by a placeholder."""
    for sec in secrets_:
        if sec:
            message = message.replace(sec, "<redacted>")
    return re.sub(r"hooks\.slack\.com/\S+", "hooks.slack.com/<redacted>", message)[:1000]


# --- sinks ---------------------------------------------------------------------------------------


class Sink(Protocol):
    name: str

    def send(self, view: IncidentMessage) -> str | None:
        """Deliver one message; returns a reference later messages of the incident thread under (or None)."""
        ...

    def notice(self, subject: str, body: str) -> None: ...


class ConsoleSink:
    """Prints a readable plain-text alert (the offline demo's sink; under Airflow it lands in the task log)."""

    def __init__(self, cfg: SinkConfig, stream: TextIO | None = None) -> None:
        self.name = cfg.name
        self.stream = stream

    def send(self, view: IncidentMessage | AlertView) -> str | None:
        print(render_text(view), file=self.stream or sys.stdout, flush=True)
        return None

    def notice(self, subject: str, body: str) -> None:
        print(f"{clean_text(subject, 200)}\n{clean_block(body, 10000)}", file=self.stream or sys.stdout, flush=True)


class _RedactFilter(logging.Filter):
    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage(), [self.secret]), None
        return True


class SlackSink:
    """Slack with Block Kit: an incoming webhook (slack_sdk WebhookClient; URL from env or `finsent_slack`),
    or, when `channel` is set and a bot token is in env `bot_token_env`, the Web API (chat.postMessage),
    which threads an incident's updates under its first message (thread_ts)."""

    def __init__(self, cfg: SinkConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg

    def send(self, view: IncidentMessage | AlertView) -> str | None:
        m = as_message(view)
        token = os.environ.get(self.cfg.bot_token_env, "").strip()
        if self.cfg.channel and token:
            return self._post_api(m, token)
        self._post(*render_slack(m))
        return "webhook"

    def _post_api(self, m: IncidentMessage, token: str) -> str:
        from http.client import HTTPException

        from slack_sdk import WebClient
        from slack_sdk.errors import SlackClientError

        c = self.cfg
        thread = m.thread_ref.split(" ", 1) if m.thread_ref and " " in m.thread_ref else None
        text, blocks = render_slack(m, threaded=thread is not None)
        try:
            client = WebClient(
                token=token,
                base_url=c.api_base_url.rstrip("/") + "/",
                timeout=max(1, round(c.timeout_s)),
                retry_handlers=[],
            )
            resp = client.chat_postMessage(
                channel=thread[0] if thread else str(c.channel),
                text=text,
                blocks=blocks,
                thread_ts=thread[1] if thread else None,
                reply_broadcast=bool(thread) and m.kind in (MessageKind.ESCALATED, MessageKind.RESOLVED),
                unfurl_links=False,
                unfurl_media=False,
            )
        except (SlackClientError, OSError, HTTPException, ValueError) as e:
            raise DeliveryError(
                f"sink {self.name}: Slack chat.postMessage failed: {scrub(f'{type(e).__name__}: {e}', [token])}"
            ) from None
        channel, ts = resp.get("channel") or c.channel, resp.get("ts")
        if not ts:
            raise DeliveryError(f"sink {self.name}: Slack chat.postMessage answered without a message ts")
        return f"{channel} {ts}"

    def notice(self, subject: str, body: str) -> None:
        self._post(*render_notice_slack(subject, body))

    def _post(self, text: str, blocks: list[dict[str, Any]]) -> None:
        from slack_sdk.webhook import WebhookClient

        url = secrets.slack_webhook_url(self.cfg.webhook_url_env)
        if not url:
            raise DeliveryError(
                f"sink {self.name}: no Slack webhook URL "
                f"(set env {self.cfg.webhook_url_env} or Airflow connection {secrets.SLACK_CONN_ID})"
            )
        sdk_log = logging.Logger(f"{__name__}.slack_sdk", level=logging.WARNING)
        sdk_log.addFilter(_RedactFilter(url))
        for h in logging.getLogger().handlers:
            sdk_log.addHandler(h)
        try:
            client = WebhookClient(url, timeout=max(1, round(self.cfg.timeout_s)), logger=sdk_log, retry_handlers=[])
            resp = client.send(text=text, blocks=blocks, unfurl_links=False, unfurl_media=False)
        except Exception as e:
            raise DeliveryError(
                f"sink {self.name}: Slack webhook failed: {scrub(f'{type(e).__name__}: {e}', [url])}"
            ) from None
        if resp.status_code != 200:
            raise DeliveryError(
                f"sink {self.name}: Slack webhook answered HTTP {resp.status_code}: "
                f"{scrub(str(resp.body)[:200], [url])}"
            )


class EmailSink:
    """Email over SMTP with STARTTLS (certificate verified) and AUTH; plain text plus an HTML alternative."""

    def __init__(self, cfg: SinkConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg

    def message(self, view: IncidentMessage | AlertView) -> EmailMessage:
        """One email; an incident's later messages keep its subject and reply to its first (threading)."""
        m = as_message(view)
        msg = EmailMessage()
        msg["Subject"] = m.subject
        msg["From"] = self.cfg.mail_from
        msg["To"] = ", ".join(self.cfg.mail_to)
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = f"<{m.lead.alert.id}.{self.name}@finsent.alerts>"
        if m.thread_ref and m.thread_ref.startswith("<") and m.thread_ref != msg["Message-ID"]:
            msg["In-Reply-To"] = m.thread_ref
            msg["References"] = m.thread_ref
        msg.set_content(render_text(m))
        msg.add_alternative(render_html(m), subtype="html")
        return msg

    def notice(self, subject: str, body: str) -> None:
        """A plain-text operational notice over the same SMTP path (STARTTLS, AUTH) as alerts."""
        msg = EmailMessage()
        msg["Subject"] = clean_text(subject, 200)
        msg["From"] = self.cfg.mail_from
        msg["To"] = ", ".join(self.cfg.mail_to)
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid(domain="finsent.alerts")
        msg.set_content(clean_block(body, 10000))
        self._deliver(msg)

    def send(self, view: IncidentMessage | AlertView) -> str | None:
        msg = self.message(view)
        self._deliver(msg)
        return str(msg["Message-ID"])

    def _deliver(self, msg: EmailMessage) -> None:
        c = self.cfg
        if not c.mail_to:
            raise DeliveryError(f"sink {self.name}: no recipients (mail_to is empty)")
        user, password = secrets.smtp_credentials(c.smtp_password_env, c.smtp_user)
        if user and not password:
            raise DeliveryError(
                f"sink {self.name}: no SMTP password for {user} "
                f"(set env {c.smtp_password_env} or Airflow connection {secrets.SMTP_CONN_ID})"
            )
        try:
            with smtplib.SMTP(c.smtp_host, c.smtp_port, timeout=c.timeout_s) as smtp:
                smtp.ehlo()
                if c.smtp_starttls:
                    smtp.starttls(context=ssl.create_default_context())
                    smtp.ehlo()
                if user:
                    smtp.login(user, password or "")
                smtp.send_message(msg)
        except (smtplib.SMTPException, OSError, ssl.SSLError) as e:
            raise DeliveryError(
                f"sink {self.name}: SMTP {c.smtp_host}:{c.smtp_port} failed: "
                f"{scrub(f'{type(e).__name__}: {e}', [password])}"
            ) from None


_SINK_KINDS: dict[str, type[ConsoleSink | SlackSink | EmailSink]] = {
    "console": ConsoleSink,
    "slack": SlackSink,
    "email": EmailSink,
}


def build_sink(cfg: SinkConfig) -> Sink:
    return _SINK_KINDS[cfg.kind](cfg)


def send_notice(cfg: SinkConfig, subject: str, body: str) -> None:
    """Send an operational notice (e.g. a failed Airflow task) through the sink code alerts use, with the
    same escaping and TLS; raises DeliveryError (secret-free) when the sink cannot deliver it."""
    _SINK_KINDS[cfg.kind](cfg).notice(subject, body)
