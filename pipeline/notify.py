"""Notify stage: deliver stored alerts to the configured sinks exactly once, losing none.

Every (alert, sink) pair gets one `alert_deliveries` row (unique: the idempotency key). A run claims a
due row with one conditional UPDATE (pending/failed and due -> sending), so two concurrent or retried
tasks never both send it; the claim is committed before sending. Each attempt is written to
`delivery_attempts`. Failures are retried a few times in the same run with short backoff, then in later
runs (next_attempt_at, exponential, capped at sink.backoff_max_minutes) until sent or `sink.expire_hours`
after the alert was queued: time expires a delivery, not a count, and the state lives in the database, so
restarts change nothing. An expired delivery, or a sink failing for `failing_after_minutes`, is told to
operators once through the other sinks (`operator_notices`) and makes the run degraded.
A claim left by a crashed run is taken over after `CLAIM_LEASE`, so an alert is never lost; in that
one case it may be sent twice (email carries a stable Message-ID so clients fold the copy).
Acknowledged alerts are never (re-)sent: their open deliveries become "cancelled".

Text from feeds is untrusted: it is escaped for Slack mrkdwn (&, <, >, mentions, formatting marks)
and HTML, control characters are dropped for terminals, and secrets (webhook URL, SMTP password)
never reach logs, stored errors or exceptions.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import smtplib
import ssl
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from enum import StrEnum
from typing import Any, Protocol, TextIO, cast
from urllib.parse import quote, urlsplit

from sqlalchemy import CursorResult, Engine, and_, func, or_, select, update
from sqlalchemy.orm import Session

from pipeline import secrets
from pipeline.acks import ack_token_for
from pipeline.config import FinsentConfig, SinkConfig
from pipeline.errors import FinsentError
from pipeline.health import OPS_SCOPES, is_health, render_health
from pipeline.incidents import (
    MessageKind,
    assign_incidents,
    head_key,
    message_kind,
    record_message_ref,
    severity_key,
    usual_count,
)
from pipeline.records import AlertRecord
from pipeline.store import _insert, session_scope
from pipeline.store import schema as s
from pipeline.store.alerts import alert_from_row

log = logging.getLogger(__name__)

CLAIM_LEASE = timedelta(minutes=10)
IN_RUN_DELAYS = (1.0, 3.0)  # sleep before the 2nd and 3rd attempt within one run
BACKOFF_BASE = timedelta(minutes=1)
BACKOFF_MAX = timedelta(minutes=30)
MAX_TOP_ITEMS = 5
STALE_ERROR = "alert window older than expire_hours when first routed"


class DeliveryState(StrEnum):
    """`alert_deliveries.status`."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"  # an attempt failed; retried at next_attempt_at
    EXPIRED = "expired"  # given up: past expire_hours (or max_attempts), or stale when first routed
    CANCELLED = "cancelled"  # acknowledged before it was sent
    GROUPED = "grouped"  # told inside its incident's message (the lead alert's row carries the delivery)


OPEN_STATES = (DeliveryState.PENDING, DeliveryState.FAILED)


class NoticeKind(StrEnum):
    """`operator_notices.kind`: what an operator is told about the pipeline itself."""

    DAG_FAILED = "dag_failed"
    DELIVERY_EXPIRED = "delivery_expired"
    SINK_FAILING = "sink_failing"


class DeliveryError(FinsentError, RuntimeError):
    """A sink could not deliver; the message is safe to log and store (no secrets)."""


@dataclass(slots=True)
class SinkCounts:
    """One sink's share of a run: sent now, still waiting for a retry, given up (expired) now."""

    sent: int = 0
    pending: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class ExpiredDelivery:
    delivery_id: int
    alert_id: str
    sink: str
    attempts: int
    last_error: str | None


@dataclass(slots=True)
class DeliveryReport:
    sent: int = 0
    failed: int = 0  # failed in this run, retried in a later one
    expired: int = 0  # given up in this run (alerts lost to that sink: an operator notice went out)
    skipped: int = 0  # acknowledged before they were sent
    errors: list[str] = field(default_factory=list)
    per_sink: dict[str, SinkCounts] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # why the run is degraded; empty when it is not
    notices: list[str] = field(default_factory=list)  # subjects of the operator notices sent

    @property
    def degraded(self) -> bool:
        return bool(self.problems)


# --- text hygiene --------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SLACK_MARKS = str.maketrans({"*": "\u2217", "_": "\uff3f", "~": "\u223c", "`": "\u02cb", "|": "\u2223"})


def clean_text(text: str | None, limit: int = 300) -> str:
    """One line of feed text without control or bidi-override characters (terminal/escape safety)."""
    t = _CONTROL.sub(" ", text or "")
    t = " ".join(t.split())
    return t if len(t) <= limit else t[: limit - 1] + "\u2026"


def slack_escape(text: str | None, limit: int = 300) -> str:
    """Feed text made inert for Slack mrkdwn: no links, mentions, channel pings or formatting."""
    t = clean_text(text, limit)
    t = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    t = t.replace("@", "@\u200b")
    return t.translate(_SLACK_MARKS)


def safe_link(url: str | None) -> str | None:
    """An http(s) URL, percent-encoded where it could break out of Slack or HTML syntax; else None."""
    if not url:
        return None
    url = clean_text(url, 2000).replace(" ", "")
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return quote(url, safe=":/?#[]@!$&'()*+,;=%~-._")


def clean_block(text: str | None, limit: int = 2900) -> str:
    """Multi-line text (an error, a traceback line) with its line breaks kept but control characters dropped."""
    lines = [" ".join(_CONTROL.sub(" ", line).split()) for line in (text or "").splitlines()]
    t = "\n".join(lines).strip("\n")
    return t if len(t) <= limit else t[: limit - 1] + "\u2026"


def slack_code_block(text: str | None, limit: int = 2900) -> str:
    """Untrusted multi-line text as a Slack code block: read verbatim (no *_~ formatting inside a block),
    with no links, mentions or channel pings, and no backtick that could close the block early."""
    t = clean_block(text, limit)
    t = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("@", "@\u200b").replace("`", "\u02cb")
    return f"```{t}```"


def _slack_link(url: str | None, label: str) -> str:
    link = safe_link(url)
    if not link:
        return label
    return f"<{link.replace('&', '&amp;').replace('|', '%7C')}|{label}>"


def scrub(message: str, secrets_: Sequence[str | None]) -> str:
    """The message with every secret (and a Slack webhook path) replaced by a placeholder."""
    for sec in secrets_:
        if sec:
            message = message.replace(sec, "<redacted>")
    return re.sub(r"hooks\.slack\.com/\S+", "hooks.slack.com/<redacted>", message)[:1000]


# --- rendering -----------------------------------------------------------------------------------

# Alerts and the dashboard (v_sentiment_hourly) count the same unit: market, entity and topic scopes count
# stories (one per distinct text however many sources carry it; negative when any copy is), a source
# scope counts the items it published.
SEVERITY_COLOURS = {"critical": "#b42318", "warning": "#b54708", "info": "#027a48"}


@dataclass(frozen=True, slots=True)
class AlertView:
    """An alert plus what a reader needs around it (display names, episode, model, usual volume)."""

    alert: AlertRecord
    scope_label: str
    episode_severity: str
    episode_onset: str | None
    model_version: str | None
    acknowledged: bool = False
    scope_name: str = ""  # "Northwind Bank": what the counts are about
    usual_count: float | None = None  # stories this scope usually has in this hour of the day

    @property
    def title(self) -> str:
        a = self.alert
        if a.kind == "resolved":
            return f"[RESOLVED] {self.scope_label}: back to normal"
        if a.kind == "escalated":
            return f"[{a.severity.upper()}] {self.scope_label}: negative news surge escalating"
        return f"[{a.severity.upper()}] {self.scope_label}: negative news surge"

    @property
    def window(self) -> str:
        a = self.alert
        return f"{a.window_start:%Y-%m-%d %H:%M}\u2013{a.window_end:%H:%M} UTC"

    @property
    def unit(self) -> str:
        return "items" if self.alert.scope_kind == "source" else "stories"

    @property
    def about(self) -> str:
        a = self.alert
        name = self.scope_name or self.scope_label
        return {"market": "across all sources", "source": f"from {name}", "topic": f"on {name}"}.get(
            a.scope_kind, f"about {name}"
        )

    @property
    def period(self) -> str:
        a = self.alert
        minutes = round((a.window_end - a.window_start).total_seconds() / 60)
        span = "hour" if minutes == 60 else f"{minutes} minutes"
        return f"in the {span} to {a.window_end:%H:%M} UTC"

    @property
    def share_line(self) -> str:
        """What happened, in the dashboard's unit: '11 stories about X in the hour to 15:00 UTC, 10 negative (91%).'"""
        a = self.alert
        if not a.total_count:
            return f"No {self.unit} {self.about} {self.period}."
        return (
            f"{a.total_count} {self.unit} {self.about} {self.period}, "
            f"{a.neg_count} negative ({100 * a.neg_share:.0f}%)."
        )

    @property
    def usual_line(self) -> str:
        a = self.alert
        if self.usual_count is None:
            return f"Usually {100 * a.baseline_share:.0f}% negative."
        return (
            f"At this hour it usually sees about {_num(self.usual_count)} {self.unit}, "
            f"with {100 * a.baseline_share:.0f}% negative."
        )

    @property
    def stats_line(self) -> str:
        a = self.alert
        p = f"p={a.p_value:.1e}" if a.p_value is not None else "p=n/a"
        return f"z={a.statistic:.1f}, {p} (chance of this many negatives in a normal hour, vs the last 7 days)"

    @property
    def onset(self) -> str:
        try:
            return f"{datetime.fromisoformat(self.episode_onset):%Y-%m-%d %H:%M} UTC" if self.episode_onset else "n/a"
        except ValueError:
            return clean_text(self.episode_onset, 40)

    @property
    def risk(self) -> str:
        r = self.alert.risk_score
        return "n/a" if r is None else f"{r:.0f}/100"

    @property
    def risk_line(self) -> str:
        return f"Risk {self.risk}: how negative, how unusual and how serious the topics are (0 calm, 50+ worth a look)."

    @property
    def short(self) -> str:
        """One line for the 'also moved' list of an incident message."""
        a = self.alert
        if a.kind == "resolved":
            return f"{self.scope_label}: back to normal"
        return (
            f"{a.severity.upper()} {self.scope_label}: {a.total_count} {self.unit}, "
            f"{a.neg_count} negative ({100 * a.neg_share:.0f}%; usually {100 * a.baseline_share:.0f}%), "
            f"risk {self.risk}"
        )


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}".removesuffix(".0")


@dataclass(frozen=True, slots=True)
class IncidentMessage:
    """One message of an incident to one sink: its lead alert, the other scopes it moved, how to act."""

    lead: AlertView
    others: tuple[AlertView, ...] = ()
    incident_id: str | None = None
    incident_title: str | None = None
    kind: MessageKind = MessageKind.OPENED
    severity: str = "warning"
    thread_ref: str | None = None  # the first message of the incident on this sink: reply to it
    opened_at: datetime | None = None
    closed_at: datetime | None = None
    peak_share: float | None = None
    peak_risk: float | None = None
    alert_url: str | None = None
    dashboard_url: str | None = None
    ack_url: str | None = None
    ack_button: bool = False  # a Slack button, when a signing secret lets finsent verify the click

    @property
    def name(self) -> str:
        return self.incident_title or f"{self.lead.scope_label}: negative news surge"

    @property
    def heading(self) -> str:
        if self.kind == MessageKind.RESOLVED:
            return f"[RESOLVED] {self.name}"
        if self.kind == MessageKind.ESCALATED:
            return f"[{self.severity.upper()}] Escalating: {self.name}"
        if self.kind == MessageKind.UPDATE:
            return f"Update: {self.name}"
        return f"[{self.severity.upper()}] {self.name}"

    @property
    def subject(self) -> str:
        """The same for every message of an incident, so mail clients keep one conversation."""
        return clean_text(f"finsent: {self.name}", 200)

    @property
    def short_id(self) -> str:
        return (self.incident_id or self.lead.alert.id)[:12]

    @property
    def continues(self) -> bool:
        """A later message of an incident opened in an earlier run."""
        return (
            self.kind != MessageKind.OPENED
            and self.opened_at is not None
            and self.opened_at < self.lead.alert.window_end
        )

    @property
    def resolved_line(self) -> str | None:
        if self.kind != MessageKind.RESOLVED:
            return None
        parts = ["Back to normal"]
        end = self.lead.alert.window_end
        try:
            start = datetime.fromisoformat(self.lead.episode_onset) if self.lead.episode_onset else None
        except ValueError:
            start = None
        if start is not None:
            hours = (end - start).total_seconds() / 3600
            parts.append(
                f"after {_num(hours)} h ({start:%Y-%m-%d %H:%M}\u2013{end:%H:%M} UTC, "
                "counting the quiet hours that confirm it)"
            )
        peak = []
        if self.peak_share is not None:
            peak.append(f"{100 * self.peak_share:.0f}% negative")
        if self.peak_risk is not None:
            peak.append(f"risk {self.peak_risk:.0f}/100")
        return " ".join(parts) + "." + (f" Peak: {', '.join(peak)}." if peak else "")

    @property
    def escalated_line(self) -> str | None:
        if self.kind != MessageKind.ESCALATED:
            return None
        return f"Open since {self.lead.onset}; the evidence is now much stronger than at its last alert."

    @property
    def update_line(self) -> str | None:
        if not self.continues:
            return None
        opened = f" (opened {self.opened_at:%Y-%m-%d %H:%M} UTC)" if self.opened_at else ""
        return f"Update to incident {self.short_id}{opened}."

    @property
    def others_label(self) -> str:
        return "Also back to normal" if self.kind == MessageKind.RESOLVED else "Also moved"


def as_message(v: AlertView | IncidentMessage) -> IncidentMessage:
    if isinstance(v, IncidentMessage):
        return v
    kind = {"resolved": MessageKind.RESOLVED, "escalated": MessageKind.ESCALATED}.get(v.alert.kind, MessageKind.OPENED)
    return IncidentMessage(
        lead=v, kind=kind, severity=v.episode_severity if v.alert.kind == "resolved" else v.alert.severity
    )


def view_of(row: s.Alert, cfg: FinsentConfig | None = None, usual_count: float | None = None) -> AlertView:
    a = alert_from_row(row)
    d = row.details or {}
    return AlertView(
        alert=a,
        scope_label=scope_label(a.scope_kind, a.scope_value, cfg),
        episode_severity=str(d.get("episode_severity") or a.severity),
        episode_onset=d.get("episode_onset"),
        model_version=d.get("model_version"),
        acknowledged=row.acknowledged_at is not None,
        scope_name=scope_name(a.scope_kind, a.scope_value, cfg),
        usual_count=usual_count,
    )


def scope_name(kind: str, value: str, cfg: FinsentConfig | None = None) -> str:
    """What a reader calls the scope in a sentence ('Northwind Bank', 'newswire', 'the market')."""
    if kind == "market":
        return "the market"
    if kind == "entity":
        names = {w.key: w.name for w in cfg.watchlist} if cfg else {}
        return clean_text(names.get(value, value), 100)
    return clean_text(value, 100)


def scope_label(kind: str, value: str, cfg: FinsentConfig | None = None) -> str:
    if kind == "market":
        return "market-wide"
    if kind == "entity":
        names = {w.key: w.name for w in cfg.watchlist} if cfg else {}
        return (
            f"{clean_text(names[value], 100)} ({clean_text(value, 40)})"
            if value in names
            else f"entity {clean_text(value, 60)}"
        )
    return f"{kind} {clean_text(value, 100)}"


def _ack_hint(m: IncidentMessage) -> str | None:
    if m.kind == MessageKind.RESOLVED:
        return None
    aid = m.lead.alert.id
    return f"{m.ack_url}  (or: finsent alerts ack {aid[:12]})" if m.ack_url else f"finsent alerts ack {aid[:12]}"


def render_text(v: AlertView | IncidentMessage) -> str:
    """Plain text for the console/log sink and the email's text part."""
    m = as_message(v)
    a = m.lead.alert
    rule = "=" * 78
    lines = [rule, m.heading, rule]
    lines += [x for x in (m.update_line, m.escalated_line) if x]
    if m.resolved_line:
        lines.append(m.resolved_line)
        lines.append(f"Now: {m.lead.share_line}")
    else:
        lines += [m.lead.share_line, m.lead.usual_line, m.lead.risk_line]
    if m.others:
        lines.append(f"{m.others_label}:")
        lines += [f"  - {o.short}" for o in m.others]
    if a.top_documents:
        lines.append("Top negative stories:")
        for i, d in enumerate(a.top_documents[:MAX_TOP_ITEMS], 1):
            lines.append(f"  {i}. [{clean_text(d.source, 60)}] {clean_text(d.title)}  (p_neg {d.p_negative:.2f})")
            link = safe_link(d.link)
            if link:
                lines.append(f"     {link}")
            if d.evidence:
                lines.append(f"     evidence: {', '.join(clean_text(t, 40) for t in d.evidence)}")
    if m.kind != MessageKind.RESOLVED:
        lines.append(f"Details:    {m.lead.stats_line}")
    lines.append(f"Window:     {m.lead.window}   incident {m.short_id}   alert {a.id}")
    for label, url in (("View:", m.alert_url), ("Dashboard:", m.dashboard_url)):
        link = safe_link(url)
        if link:
            lines.append(f"{label:<11} {link}")
    hint = _ack_hint(m)
    if hint:
        lines.append(f"Acknowledge: {hint}")
    lines.append(rule)
    return "\n".join(lines)


def render_slack(v: AlertView | IncidentMessage, *, threaded: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """Fallback text and Block Kit blocks; every feed-derived string goes through slack_escape.

    `threaded`: the message is a reply in the incident's thread (bot mode), so it needs no "update to" line."""
    m = as_message(v)
    a = m.lead.alert
    heading = clean_text(m.heading, 150)
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": heading, "emoji": False}}]
    if m.update_line and not threaded:
        view_link = _slack_link(m.alert_url, "view incident") if safe_link(m.alert_url) else ""
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {"type": "mrkdwn", "text": slack_escape(m.update_line) + (f" {view_link}" if view_link else "")}
                ],
            }
        )
    if m.resolved_line:
        body = f"{slack_escape(m.resolved_line)}\nNow: {slack_escape(m.lead.share_line)}"
    else:
        body = (
            f"*{slack_escape(m.lead.share_line)}*\n{slack_escape(m.lead.usual_line)}\n{slack_escape(m.lead.risk_line)}"
        )
        if m.escalated_line:
            body = f"{slack_escape(m.escalated_line)}\n{body}"
    blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": body}})
    if m.others:
        others = "\n".join(f"\u2022 {slack_escape(o.short)}" for o in m.others)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*{m.others_label}*\n{others}"[:2900]}})
    items = []
    for d in a.top_documents[:MAX_TOP_ITEMS]:
        line = (
            f"\u2022 {_slack_link(d.link, slack_escape(d.title))} "
            f"\u2014 {slack_escape(d.source, 60)}, p_neg {d.p_negative:.2f}"
        )
        if d.evidence:
            line += f"\n    evidence: {slack_escape(', '.join(d.evidence), 200)}"
        items.append(line)
    if items:
        blocks.append(
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "*Top negative stories*\n" + "\n".join(items)[:2900]},
            }
        )
    buttons: list[dict[str, Any]] = []
    for label, url in (("Open alert", m.alert_url), ("Dashboard", m.dashboard_url)):
        link = safe_link(url)
        if link:
            buttons.append({"type": "button", "text": {"type": "plain_text", "text": label}, "url": link})
    if m.ack_button and m.kind != MessageKind.RESOLVED:
        buttons.append(
            {
                "type": "button",
                "action_id": ACK_ACTION_ID,
                "style": "primary",
                "text": {"type": "plain_text", "text": "Acknowledge"},
                "value": a.id,
            }
        )
    if safe_link(m.ack_url) and m.kind != MessageKind.RESOLVED:  # also with the button: works if Slack can't reach us
        label = "Acknowledge (web)" if m.ack_button else "Acknowledge"
        buttons.append({"type": "button", "text": {"type": "plain_text", "text": label}, "url": safe_link(m.ack_url)})
    if buttons:
        blocks.append({"type": "actions", "elements": buttons})
    context = f"{m.lead.stats_line} | " if m.kind != MessageKind.RESOLVED else ""
    context += f"incident {m.short_id} | alert {a.id}"
    if m.kind != MessageKind.RESOLVED and not m.ack_button:
        context += f" | acknowledge: finsent alerts ack {a.id[:12]}"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": slack_escape(context, 600)}]})
    fallback = f"{heading} \u2014 {m.lead.share_line}" if not m.resolved_line else f"{heading} \u2014 {m.resolved_line}"
    if m.update_line and not threaded:
        fallback = f"{m.update_line} {fallback}"
    return slack_escape(fallback, 400), blocks


ACK_ACTION_ID = "finsent_ack"


def render_html(v: AlertView | IncidentMessage) -> str:
    """A styled, accessible email: severity colour bar, real table headers, dark mode, fits a phone."""
    m = as_message(v)
    a = m.lead.alert
    e = html.escape
    sev = "info" if m.kind == MessageKind.RESOLVED else m.severity
    colour = SEVERITY_COLOURS.get(sev, SEVERITY_COLOURS["warning"])
    paras = []
    paras += [f"<p class='muted'>{e(x)}</p>" for x in (m.update_line, m.escalated_line) if x]
    if m.resolved_line:
        paras.append(f"<p class='lead'>{e(m.resolved_line)}</p><p>Now: {e(m.lead.share_line)}</p>")
    else:
        paras.append(
            f"<p class='lead'>{e(m.lead.share_line)}</p><p>{e(m.lead.usual_line)}</p><p>{e(m.lead.risk_line)}</p>"
        )
    others = ""
    if m.others:
        lis = "".join(f"<li>{e(o.short)}</li>" for o in m.others)
        others = f"<h2>{e(m.others_label)}</h2><ul>{lis}</ul>"
    items = []
    for d in a.top_documents[:MAX_TOP_ITEMS]:
        title = e(clean_text(d.title))
        link = safe_link(d.link)
        head = f'<a href="{e(link, quote=True)}">{title}</a>' if link else title
        ev = (
            f"<br><span class='muted'>evidence: {e(', '.join(clean_text(t, 40) for t in d.evidence))}</span>"
            if d.evidence
            else ""
        )
        items.append(f"<li>{head} &mdash; {e(clean_text(d.source, 60))}, p_neg {d.p_negative:.2f}{ev}</li>")
    top = f"<h2>Top negative stories</h2><ol>{''.join(items)}</ol>" if items else ""
    buttons = []
    for label, url in (
        ("Open alert", m.alert_url),
        ("Dashboard", m.dashboard_url),
        ("Acknowledge", m.ack_url if m.kind != MessageKind.RESOLVED else None),
    ):
        link = safe_link(url)
        if link:
            buttons.append(f"<a class='btn' href=\"{e(link, quote=True)}\">{e(label)}</a>")
    actions = f"<p class='actions'>{' '.join(buttons)}</p>" if buttons else ""
    details = [f"Window {m.lead.window}", f"incident {m.short_id}", f"alert {a.id}"]
    if m.kind != MessageKind.RESOLVED:
        details.insert(0, m.lead.stats_line)
        if not m.ack_url:
            details.append(f"acknowledge: finsent alerts ack {a.id[:12]}")
    style = (
        "body{margin:0;padding:0;background:#f4f5f7;color:#1d2433;"
        "font:16px/1.5 -apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif}"
        ".card{max-width:600px;width:100%;margin:0 auto;background:#fff;border-top:6px solid "
        + colour
        + ";box-sizing:border-box;padding:16px 20px}"
        "h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:16px 0 4px}"
        ".badge{display:inline-block;padding:2px 8px;border-radius:4px;color:#fff;background:"
        + colour
        + ";font-size:13px;font-weight:600}"
        ".lead{font-size:17px;font-weight:600}.muted{color:#5b6474;font-size:14px}"
        "a{color:#1a56db}.btn{display:inline-block;margin:4px 8px 4px 0;padding:8px 14px;border-radius:6px;"
        "background:#1a56db;color:#fff!important;text-decoration:none}"
        "ol,ul{padding-left:20px}li{margin:4px 0;word-wrap:break-word}"
        "@media (prefers-color-scheme: dark){body{background:#111418;color:#e6e9ef}"
        ".card{background:#1b1f26}.muted{color:#a3acb9}a{color:#8ab4f8}}"
        "@media (max-width:480px){.card{padding:12px}h1{font-size:18px}}"
    )
    badge = "RESOLVED" if m.kind == MessageKind.RESOLVED else m.severity.upper()
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        "<meta name='color-scheme' content='light dark'><meta name='supported-color-schemes' content='light dark'>"
        f"<title>{e(clean_text(m.heading, 200))}</title><style>{style}</style></head>"
        f"<body><div class='card' role='article' aria-label='{e(clean_text(m.heading, 200), quote=True)}'>"
        f"<span class='badge'>{e(badge)}</span><h1>{e(clean_text(m.name, 200))}</h1>"
        f"{''.join(paras)}{others}{top}{actions}"
        f"<p class='muted'>{' &middot; '.join(e(x) for x in details)}</p>"
        "</div></body></html>"
    )


def render_notice_slack(subject: str, body: str) -> tuple[str, list[dict[str, Any]]]:
    """An operational notice (not an alert): a plain-text header and the body as an escaped code block."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": clean_text(subject, 150), "emoji": False}},
        {"type": "section", "text": {"type": "mrkdwn", "text": slack_code_block(body)}},
    ]
    return slack_escape(subject, 400), blocks


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


# --- delivery ------------------------------------------------------------------------------------


def routes_to(sink: SinkConfig, alert: s.Alert) -> bool:
    """Scope and severity routing; a resolution goes wherever its episode's alert went (or to 'info' sinks).
    Source-health alerts ignore the sentiment scopes: every sink taking their severity gets them."""
    if alert.scope_kind not in sink.scopes and alert.scope_kind not in OPS_SCOPES:
        return False
    if alert.kind == "resolved":
        episode_sev = (alert.details or {}).get("episode_severity", "warning")
        return "info" in sink.severities or episode_sev in sink.severities
    return alert.severity in sink.severities


def _enqueue(session: Session, cfg: FinsentConfig, now: datetime) -> list[tuple[str, str]]:
    """One delivery row per routed (alert, sink). Alerts whose window is already older than the sink's
    expiry are recorded as expired rather than sent to Slack or email (a backfill must not page anyone
    about last month); the console sink prints them (the offline demo replays a past week).

    Returns the (alert id, sink) pairs expired here that are a loss, not a backfill: the alert itself was stored
    longer ago than expire_hours, so nothing routed it in time (the notifier was down). The caller tells operators."""
    lost: list[tuple[str, str]] = []
    for sink in cfg.sinks:
        has_row = (
            select(s.AlertDelivery.id)
            .where(s.AlertDelivery.alert_id == s.Alert.id, s.AlertDelivery.sink == sink.name)
            .exists()
        )
        alerts = session.scalars(
            select(s.Alert)
            .where(
                ~has_row,
                s.Alert.acknowledged_at.is_(None),
                or_(s.Alert.scope_kind.in_(sink.scopes), s.Alert.scope_kind.in_(OPS_SCOPES)),
                or_(s.Alert.kind == "resolved", s.Alert.severity.in_(sink.severities)),
            )
            .order_by(s.Alert.window_end, s.Alert.id)
        ).all()
        # One message per incident and run: its lead alert carries it, the others are "grouped" into it.
        groups: dict[tuple[str, datetime], list[s.Alert]] = {}
        for a in alerts:
            if routes_to(sink, a):
                groups.setdefault((a.incident_id or a.id, a.window_end), []).append(a)
        rows = []
        leads = [(min(g, key=head_key), g) for g in groups.values()]
        for lead, members in sorted(leads, key=lambda x: (x[0].window_end, severity_key(x[0]))):  # oldest run first
            horizon = now - timedelta(hours=sink.expire_hours)
            stale = sink.kind != "console" and lead.window_end < horizon
            if stale and _aware(lead.created_at) < horizon:
                lost.append((lead.id, sink.name))
            for a in sorted(members, key=head_key):
                status = (
                    (DeliveryState.EXPIRED if stale else DeliveryState.PENDING) if a is lead else DeliveryState.GROUPED
                )
                rows.append(
                    {
                        "alert_id": a.id,
                        "sink": sink.name,
                        "status": status,
                        "attempts": 0,
                        "last_error": STALE_ERROR if stale and a is lead else None,
                        "created_at": now,
                    }
                )
        if rows:
            session.execute(
                _insert(session, s.AlertDelivery)
                .values(rows)
                .on_conflict_do_nothing(index_elements=["alert_id", "sink"])
            )
    return lost


def _aware(t: datetime) -> datetime:
    """SQLite hands timestamps back naive; they are stored in UTC."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


GROUPED = DeliveryState.GROUPED


def build_message(session: Session, row: s.Alert, sink: SinkConfig, cfg: FinsentConfig) -> IncidentMessage:
    """The message a sink gets for the lead alert `row`: the other alerts of its incident and run that
    route to this sink, where it threads, and the links to act on it."""
    inc = session.get(s.Incident, row.incident_id) if row.incident_id else None
    members = []
    if inc is not None:
        members = [
            a
            for a in session.scalars(
                select(s.Alert).where(s.Alert.incident_id == inc.id, s.Alert.window_end == row.window_end)
            )
            if a.id != row.id and routes_to(sink, a)
        ]
    kind = message_kind(inc, [row, *members], row.window_end)
    peak_share = peak_risk = None
    if kind == MessageKind.RESOLVED and inc is not None:
        peaks = session.execute(
            select(func.max(s.Alert.neg_share), func.max(s.Alert.risk_score)).where(
                s.Alert.incident_id == inc.id, s.Alert.kind != "resolved",
                s.Alert.scope_kind == row.scope_kind, s.Alert.scope_value == row.scope_value,
            )
        ).one()  # fmt: skip
        peak_share, peak_risk = peaks
    links = cfg.links
    base = links.base_url.rstrip("/") if links.base_url else None
    secret = os.environ.get(links.ack_secret_env, "")
    ack_url = None
    if base and secret and kind != MessageKind.RESOLVED:
        token = ack_token_for(row.id, secret, row.created_at, timedelta(hours=links.ack_ttl_hours))
        ack_url = f"{base}/ack/{token}"
    return IncidentMessage(
        lead=view_of(row, cfg, usual_count(session, row, cfg)),
        others=tuple(view_of(a, cfg) for a in sorted(members, key=severity_key)),
        incident_id=inc.id if inc else None,
        incident_title=inc.title if inc else None,
        kind=kind,
        severity=(inc.severity if inc else row.severity)
        if row.severity != "info" or inc
        else str((row.details or {}).get("episode_severity", "warning")),
        thread_ref=(inc.message_refs or {}).get(sink.name) if inc else None,
        opened_at=inc.opened_at if inc else None,
        closed_at=inc.closed_at if inc else None,
        peak_share=peak_share,
        peak_risk=peak_risk,
        alert_url=f"{base}/alerts/{(inc.head_alert_id if inc else row.id)}" if base else None,
        dashboard_url=dashboard_url(links.dashboard_url_template, row),
        ack_url=ack_url,
        ack_button=bool(os.environ.get(links.slack_signing_secret_env)),
    )


def dashboard_url(template: str | None, row: s.Alert) -> str | None:
    """The configured dashboard link for an alert's scope and the day around its window (None if unset or broken)."""
    if not template:
        return None
    start, end = row.window_end - timedelta(days=1), row.window_end + timedelta(hours=6)
    try:
        return template.format(
            scope_kind=quote(row.scope_kind, safe=""), scope_value=quote(row.scope_value, safe=""),
            from_ms=int(start.timestamp() * 1000), to_ms=int(end.timestamp() * 1000),
            alert_id=row.id, incident_id=row.incident_id or "",
        )  # fmt: skip
    except (KeyError, IndexError, ValueError) as e:
        log.warning("links.dashboard_url_template cannot be filled (%s): no dashboard link", type(e).__name__)
        return None


def _due_filter(now: datetime) -> Any:
    D = s.AlertDelivery
    return or_(
        and_(D.status.in_(OPEN_STATES), or_(D.next_attempt_at.is_(None), D.next_attempt_at <= now)),
        and_(D.status == DeliveryState.SENDING, D.last_attempt_at < now - CLAIM_LEASE),
    )


def _claim(engine: Engine, delivery_id: int, now: datetime) -> bool:
    """Atomically take a due delivery (committed before sending) so no other run sends it too.

    `now` (the run's start) decides what is due; the claim itself is stamped with the wall clock, so a run
    that has been going longer than CLAIM_LEASE does not hand a concurrent notifier a claim that looks stale."""
    D = s.AlertDelivery
    unacked = select(s.Alert.id).where(s.Alert.acknowledged_at.is_(None))
    with session_scope(engine) as session:
        # DML returns a CursorResult (it has rowcount); Session.execute is typed as returning a plain Result
        res = cast(
            CursorResult[Any],
            session.execute(
                update(D)
                .where(D.id == delivery_id, _due_filter(now), D.alert_id.in_(unacked))
                .values(status=DeliveryState.SENDING, last_attempt_at=datetime.now(UTC))
                .execution_options(synchronize_session=False)
            ),
        )
        return res.rowcount == 1


def _renew_claim(engine: Engine, delivery_id: int) -> None:
    """Re-stamp a claim this run still holds (between in-run retries: recording the attempt set the run's time)."""
    D = s.AlertDelivery
    with session_scope(engine) as session:
        session.execute(
            update(D)
            .where(D.id == delivery_id, D.status == DeliveryState.SENDING)
            .values(last_attempt_at=datetime.now(UTC))
        )


def _record_attempt(engine: Engine, delivery_id: int, ok: bool, error: str | None, at: datetime) -> int:
    D = s.AlertDelivery
    with session_scope(engine) as session:
        session.add(s.DeliveryAttempt(delivery_id=delivery_id, attempted_at=at, ok=ok, error=error))
        attempts = session.scalar(select(D.attempts).where(D.id == delivery_id)) or 0
        values: dict[str, Any] = {"attempts": attempts + 1, "last_attempt_at": at, "last_error": error}
        if ok:
            values.update(status=DeliveryState.SENT, delivered_at=at, next_attempt_at=None)
        session.execute(update(D).where(D.id == delivery_id).values(**values))
        return attempts + 1


def _release(engine: Engine, delivery_id: int, status: DeliveryState, next_at: datetime | None) -> None:
    D = s.AlertDelivery
    with session_scope(engine) as session:
        session.execute(
            update(D)
            .where(D.id == delivery_id, D.status == DeliveryState.SENDING)
            .values(status=status, next_attempt_at=next_at)
        )


def backoff(attempts: int, cap: timedelta = BACKOFF_MAX) -> timedelta:
    """Wait before the next cycle's try: 1, 2, 4 ... minutes, capped, so a long outage costs a bounded
    number of tries."""
    return min(BACKOFF_BASE * (2 ** min(max(0, attempts - 1), 30)), cap)


def _deadline(row: Any, sink: SinkConfig) -> datetime:
    created: datetime = row.created_at
    return created + timedelta(hours=sink.expire_hours)


def _expire(engine: Engine, row: Any, now: datetime) -> bool:
    D = s.AlertDelivery
    with session_scope(engine) as session:
        return bool(
            cast(
                CursorResult[Any],
                session.execute(
                    update(D)
                    .where(D.id == row.id, _due_filter(now))
                    .values(status=DeliveryState.EXPIRED, next_attempt_at=None)
                ),
            ).rowcount
        )


def deliver_pending(
    engine: Engine,
    cfg: FinsentConfig,
    now: datetime | None = None,
    *,
    sinks: dict[str, Sink] | None = None,
    retry_delays: Sequence[float] = IN_RUN_DELAYS,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryReport:
    """Send every due delivery; returns per-sink counts and whatever makes the run degraded.

    A failed delivery is retried in later runs (capped exponential backoff) until `expire_hours` after it
    was queued; one that expires, and a sink failing for `failing_after_minutes`, are told to operators
    through the other sinks (once each, see `operator_notices`) and mark the report degraded.
    `now` is the run's clock for scheduling (tests and backfills pass it); `sinks` replaces the sinks
    built from the config (by name).
    """
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError(f"now={now!r} is naive: pass a timezone-aware UTC datetime")
    report = DeliveryReport()
    by_name = {sc.name: sc for sc in cfg.sinks}
    built = dict(sinks or {})
    D = s.AlertDelivery
    assign_incidents(engine, cfg)
    with session_scope(engine) as session:
        lost = _enqueue(session, cfg, now)
        expired: list[ExpiredDelivery] = [
            ExpiredDelivery(d.id, d.alert_id, d.sink, d.attempts, STALE_ERROR)
            for alert_id, sink_name in lost
            for d in session.scalars(select(D).where(D.alert_id == alert_id, D.sink == sink_name))
        ]
        for e in expired:
            log.error(
                "alert %s was never delivered to %s: older than expire_hours when first routed", e.alert_id, e.sink
            )
        acked = select(s.Alert.id).where(s.Alert.acknowledged_at.is_not(None))
        skipped = cast(
            CursorResult[Any],
            session.execute(
                update(D)
                .where(D.status.in_(OPEN_STATES), D.alert_id.in_(acked))
                .values(status=DeliveryState.CANCELLED, last_error="acknowledged before delivery", next_attempt_at=None)
                .execution_options(synchronize_session=False)
            ),
        )
        report.skipped = skipped.rowcount or 0
        due = session.execute(
            select(D.id, D.sink, D.alert_id, D.attempts, D.created_at, D.last_error)
            .where(_due_filter(now))
            .order_by(D.created_at, D.id)
        ).all()

    down: set[str] = set()  # sinks that failed a delivery in this run: the rest wait for the next run
    for row in due:
        sink_cfg = by_name.get(row.sink)
        if sink_cfg is None:
            continue  # a sink removed from the config keeps its rows untouched
        counts = report.per_sink.setdefault(row.sink, SinkCounts())
        deadline = _deadline(row, sink_cfg)
        capped = sink_cfg.max_attempts is not None and row.attempts >= sink_cfg.max_attempts
        if now > deadline or capped:
            if _expire(engine, row, now):
                expired.append(ExpiredDelivery(row.id, row.alert_id, row.sink, row.attempts, row.last_error))
                log.error("delivery of alert %s to %s expired after %d attempts", row.alert_id, row.sink, row.attempts)
            continue
        if row.sink in down or not _claim(engine, row.id, now):
            continue  # a dead sink costs one delivery's tries per run, not one per pending alert

        try:  # a claimed row must never stay `sending`: a message that cannot be built is a failed attempt
            sink = built.get(row.sink) or built.setdefault(row.sink, build_sink(sink_cfg))
            with session_scope(engine) as session:
                alert_row = session.get(s.Alert, row.alert_id)
                if alert_row is None:
                    continue  # deleted since: its delivery rows went with it (ON DELETE CASCADE)
                send, view = _sender(sink, alert_row, sink_cfg, cfg, session)
        except Exception as e:
            err = f"sink {row.sink}: cannot build the message for alert {row.alert_id}: {type(e).__name__}"
            attempts = _record_attempt(engine, row.id, False, err, now)
            log.error("alert %s to %s: attempt %d failed: %s", row.alert_id, row.sink, attempts, err)
            log.debug("traceback", exc_info=True)
            next_at = min(now + _backoff(attempts, sink_cfg), deadline)
            _give_up(engine, row, sink_cfg, attempts, err, next_at, expired, report)
            continue  # this alert's problem, not the sink's: the next delivery still goes out
        delays = list(retry_delays)
        while True:
            try:
                ref = send()
            except Exception as e:
                err = str(e) if isinstance(e, DeliveryError) else f"sink {row.sink}: {type(e).__name__}"
                attempts = _record_attempt(engine, row.id, False, err, now)
                log.warning("alert %s to %s: attempt %d failed: %s", row.alert_id, row.sink, attempts, err)
                over_cap = sink_cfg.max_attempts is not None and attempts >= sink_cfg.max_attempts
                if not over_cap and delays:
                    _renew_claim(engine, row.id)
                    sleep(delays.pop(0))
                    continue
                next_at = min(now + _backoff(attempts, sink_cfg), deadline)
                _give_up(engine, row, sink_cfg, attempts, err, next_at, expired, report)
                down.add(row.sink)
                break
            else:
                _record_attempt(engine, row.id, True, None, now)
                if ref and view is not None and view.incident_id:
                    record_message_ref(engine, view.incident_id, row.sink, ref)
                report.sent += 1
                counts.sent += 1
                log.info("alert %s sent to %s", row.alert_id, row.sink)
                break

    report.expired = len(expired)
    for x in expired:
        report.per_sink.setdefault(x.sink, SinkCounts()).failed += 1
    _count_pending(engine, cfg, report)
    failing = _failing_sinks(engine, cfg, now)
    if expired:
        _notice_expired(engine, cfg, expired, failing, built, report)
    for name, since in failing.items():
        _notice_failing_sink(engine, cfg, name, since, now, failing, built, report)
    return report


def _backoff(attempts: int, sink_cfg: SinkConfig) -> timedelta:
    return backoff(attempts, timedelta(minutes=sink_cfg.backoff_max_minutes))


def _give_up(
    engine: Engine,
    row: Any,
    sink_cfg: SinkConfig,
    attempts: int,
    err: str,
    next_at: datetime,
    expired: list[ExpiredDelivery],
    report: DeliveryReport,
) -> None:
    """Release a claimed delivery after this run's last failed attempt: expired past max_attempts, else
    failed and retried at `next_at`."""
    if sink_cfg.max_attempts is not None and attempts >= sink_cfg.max_attempts:
        _release(engine, row.id, DeliveryState.EXPIRED, None)
        expired.append(ExpiredDelivery(row.id, row.alert_id, row.sink, attempts, err))
    else:
        _release(engine, row.id, DeliveryState.FAILED, next_at)
        report.failed += 1
    report.errors.append(err)


def _sender(
    sink: Sink, alert: s.Alert, sink_cfg: SinkConfig, cfg: FinsentConfig, session: Session
) -> tuple[Callable[[], str | None], IncidentMessage | None]:
    """How this alert goes out: a sentiment alert as its incident's message (returning the reference that later
    messages thread under), source health as a plain notice."""
    if is_health(alert):
        subject, body = render_health(alert)

        def notice() -> None:
            sink.notice(subject, body)

        return notice, None
    view = build_message(session, alert, sink_cfg, cfg)
    return (lambda: sink.send(view)), view


def alert_title(alert: s.Alert, cfg: FinsentConfig) -> str:
    return render_health(alert)[0] if is_health(alert) else view_of(alert, cfg).title


def _count_pending(engine: Engine, cfg: FinsentConfig, report: DeliveryReport) -> None:
    D = s.AlertDelivery
    names = [sc.name for sc in cfg.sinks]
    with session_scope(engine) as session:
        rows = session.execute(
            select(D.sink, func.count())
            .where(D.sink.in_(names), D.status.in_((*OPEN_STATES, DeliveryState.SENDING)))
            .group_by(D.sink)
        ).all()
    for name in names:
        report.per_sink.setdefault(name, SinkCounts())
    for name, n in rows:
        report.per_sink[name].pending = int(n)


def _failing_sinks(engine: Engine, cfg: FinsentConfig, now: datetime) -> dict[str, datetime]:
    """Sinks with undelivered alerts whose every attempt since their last success has failed for at least
    `failing_after_minutes`: sink name -> when the failures began (the outage's identity)."""
    D, A = s.AlertDelivery, s.DeliveryAttempt
    out: dict[str, datetime] = {}
    with session_scope(engine) as session:
        for sc in cfg.sinks:
            open_rows = session.scalar(
                select(func.count()).where(D.sink == sc.name, D.status.in_((*OPEN_STATES, DeliveryState.SENDING)))
            )
            if not open_rows:
                continue
            last_ok = session.scalar(
                select(func.max(A.attempted_at)).join(D, D.id == A.delivery_id).where(D.sink == sc.name, A.ok)
            )
            q = select(func.min(A.attempted_at)).join(D, D.id == A.delivery_id).where(D.sink == sc.name, ~A.ok)
            if last_ok is not None:
                q = q.where(A.attempted_at > last_ok)
            since = session.scalar(q)
            if since is not None and now - since >= timedelta(minutes=sc.failing_after_minutes):
                out[sc.name] = since
    return out


def _notice_expired(
    engine: Engine,
    cfg: FinsentConfig,
    expired: list[ExpiredDelivery],
    failing: dict[str, datetime],
    built: dict[str, Sink],
    report: DeliveryReport,
) -> None:
    sinks = sorted({e.sink for e in expired})
    report.problems.append(f"{len(expired)} alert deliveries expired undelivered ({', '.join(sinks)})")
    lines = [f"{len(expired)} alert deliveries gave up without delivering; these alerts did NOT reach their sink:"]
    with session_scope(engine) as session:
        for e in expired[:50]:
            row = session.get(s.Alert, e.alert_id)
            title = alert_title(row, cfg) if row is not None else e.alert_id
            lines.append(
                f"- {title} (alert {e.alert_id}) to {e.sink}: {e.attempts} attempts, "
                f"last error: {e.last_error or 'n/a'}"
            )
    if len(expired) > 50:
        lines.append(f"... and {len(expired) - 50} more")
    lines.append("See them with: finsent alerts list")
    ids = ",".join(str(e.delivery_id) for e in expired)
    key = f"{NoticeKind.DELIVERY_EXPIRED}:{hashlib.sha256(ids.encode()).hexdigest()[:32]}"
    subject = f"[finsent] {len(expired)} alert(s) could not be delivered to {', '.join(sinks)}"
    _notice(engine, cfg, key, NoticeKind.DELIVERY_EXPIRED, subject, "\n".join(lines), {*sinks, *failing}, built, report)


def _notice_failing_sink(
    engine: Engine,
    cfg: FinsentConfig,
    name: str,
    since: datetime,
    now: datetime,
    failing: dict[str, datetime],
    built: dict[str, Sink],
    report: DeliveryReport,
) -> None:
    minutes = int((now - since).total_seconds() // 60)
    pending = report.per_sink.get(name, SinkCounts()).pending
    report.problems.append(f"sink {name} has failed every delivery for {minutes} min ({pending} pending)")
    D = s.AlertDelivery
    with session_scope(engine) as session:
        last_error = session.scalar(
            select(D.last_error)
            .where(D.sink == name, D.last_error.is_not(None))
            .order_by(D.last_attempt_at.desc())
            .limit(1)
        )
    body = "\n".join(
        [
            f"Sink {name} has failed every delivery since {since:%Y-%m-%d %H:%M} UTC ({minutes} min).",
            f"{pending} alert(s) are waiting for it; they are retried until they expire.",
            f"Last error: {last_error or 'n/a'}",
        ]
    )
    key = f"{NoticeKind.SINK_FAILING}:{name}:{since.isoformat()}"
    _notice(
        engine,
        cfg,
        key,
        NoticeKind.SINK_FAILING,
        f"[finsent] alert sink {name} is failing",
        body,
        set(failing),
        built,
        report,
    )


# --- operator notices ----------------------------------------------------------------------------


def claim_notice(
    engine: Engine, key: str, kind: NoticeKind, subject: str, body: str, now: datetime | None = None
) -> bool:
    """Record a notice under its dedupe key; True if this caller is the first and so must send it."""
    with session_scope(engine) as session:
        res = session.execute(
            _insert(session, s.OperatorNotice)
            .values(
                key=key[:300],
                kind=kind,
                subject=subject,
                body=body[:20000],
                created_at=now or datetime.now(UTC),
                sent_to=[],
                errors=[],
            )
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(s.OperatorNotice.id)
        )
        return res.scalar() is not None


def record_notice(engine: Engine, key: str, sent_to: Sequence[str], errors: Sequence[str]) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(s.OperatorNotice)
            .where(s.OperatorNotice.key == key[:300])
            .values(sent_to=list(sent_to), errors=list(errors))
        )


def broadcast_notice(
    cfg: FinsentConfig, subject: str, body: str, exclude: Collection[str] = (), sinks: dict[str, Sink] | None = None
) -> tuple[list[str], list[str]]:
    """Send a notice to every configured sink not excluded; returns (sinks reached, errors). Never raises."""
    reached: list[str] = []
    errors: list[str] = []
    for sc in cfg.sinks:
        if sc.name in exclude:
            continue
        sink = (sinks or {}).get(sc.name) or build_sink(sc)
        try:
            sink.notice(subject, body)
        except Exception as e:  # noqa: BLE001  (a notice must never mask what it reports)
            err = str(e) if isinstance(e, DeliveryError) else f"sink {sc.name}: {type(e).__name__}"
            errors.append(err)
            log.error("operator notice %r not sent: %s", subject, err)
        else:
            reached.append(sc.name)
    return reached, errors


def pager_sinks(cfg: FinsentConfig, names: Collection[str]) -> list[str]:
    """The sinks among `names` that reach a person (not the console, which only a log reader sees)."""
    kinds = {sc.name: sc.kind for sc in cfg.sinks}
    return [n for n in names if kinds.get(n) != "console"]


def _notice(
    engine: Engine,
    cfg: FinsentConfig,
    key: str,
    kind: NoticeKind,
    subject: str,
    body: str,
    exclude: Collection[str],
    built: dict[str, Sink],
    report: DeliveryReport,
) -> None:
    if not claim_notice(engine, key, kind, subject, body):
        return  # already told (an earlier cycle, or a concurrent run)
    reached, errors = broadcast_notice(cfg, subject, body, exclude, built)
    record_notice(engine, key, reached, errors)
    report.notices.append(subject)
    if not pager_sinks(cfg, reached):
        report.problems.append(f"operator notice {subject!r} reached no sink besides the console")


def summary_line(report: DeliveryReport) -> str:
    """Per-sink counts for the CLI and logs, e.g. 'slack: 0 sent, 2 pending, 1 failed; console: 2 sent, ...'."""
    return (
        "; ".join(
            f"{name}: {c.sent} sent, {c.pending} pending, {c.failed} failed" for name, c in report.per_sink.items()
        )
        or "no sinks"
    )
