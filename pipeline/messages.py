"""Alert messages: what a reader is told about an alert, built from its stored records.

One module decides the words and layout every sink shows (plain text for the console and the email's text
part, Slack Block Kit, the HTML email, operational notices), and which alerts a sink is told about
(`routes_to`), so Slack, email and `finsent alerts show` can never drift apart. Delivery (claiming, retries,
operator notices) is pipeline.notify; transport (webhook, SMTP) is pipeline.sinks.

Text from feeds is untrusted: it is escaped for Slack mrkdwn (&, <, >, mentions, formatting marks) and
HTML, and control and bidi characters are dropped for terminals.
"""

from __future__ import annotations

import html
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.acks import ack_token_for
from pipeline.config import FinsentConfig, SinkConfig
from pipeline.health import OPS_SCOPES, is_health, render_health
from pipeline.incidents import MessageKind, message_kind, severity_key, usual_count
from pipeline.records import AlertKind, AlertRecord, ScopeKind
from pipeline.store import schema as s
from pipeline.store.alerts import alert_from_row

log = logging.getLogger(__name__)

MAX_TOP_ITEMS = 5


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
        if a.kind == AlertKind.RESOLVED:
            return f"[RESOLVED] {self.scope_label}: back to normal"
        if a.kind == AlertKind.ESCALATED:
            return f"[{a.severity.upper()}] {self.scope_label}: negative news surge escalating"
        return f"[{a.severity.upper()}] {self.scope_label}: negative news surge"

    @property
    def window(self) -> str:
        a = self.alert
        return f"{a.window_start:%Y-%m-%d %H:%M}\u2013{a.window_end:%H:%M} UTC"

    @property
    def unit(self) -> str:
        return "items" if self.alert.scope_kind == ScopeKind.SOURCE else "stories"

    @property
    def about(self) -> str:
        a = self.alert
        name = self.scope_name or self.scope_label
        about: dict[str, str] = {
            ScopeKind.MARKET: "across all sources",
            ScopeKind.SOURCE: f"from {name}",
            ScopeKind.TOPIC: f"on {name}",
        }
        return about.get(a.scope_kind, f"about {name}")

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
        if a.kind == AlertKind.RESOLVED:
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
    kinds: dict[str, MessageKind] = {
        AlertKind.RESOLVED: MessageKind.RESOLVED,
        AlertKind.ESCALATED: MessageKind.ESCALATED,
    }
    kind = kinds.get(v.alert.kind, MessageKind.OPENED)
    return IncidentMessage(
        lead=v, kind=kind, severity=v.episode_severity if v.alert.kind == AlertKind.RESOLVED else v.alert.severity
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
    if kind == ScopeKind.MARKET:
        return "the market"
    if kind == ScopeKind.ENTITY:
        names = {w.key: w.name for w in cfg.watchlist} if cfg else {}
        return clean_text(names.get(value, value), 100)
    return clean_text(value, 100)


def scope_label(kind: str, value: str, cfg: FinsentConfig | None = None) -> str:
    if kind == ScopeKind.MARKET:
        return "market-wide"
    if kind == ScopeKind.ENTITY:
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


# --- from stored records to a message ------------------------------------------------------------


def routes_to(sink: SinkConfig, alert: s.Alert) -> bool:
    """Scope and severity routing; a resolution goes wherever its episode's alert went (or to 'info' sinks).
    Source-health alerts ignore the sentiment scopes: every sink taking their severity gets them."""
    if alert.scope_kind not in sink.scopes and alert.scope_kind not in OPS_SCOPES:
        return False
    if alert.kind == AlertKind.RESOLVED:
        episode_sev = (alert.details or {}).get("episode_severity", "warning")
        return "info" in sink.severities or episode_sev in sink.severities
    return alert.severity in sink.severities


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
                s.Alert.incident_id == inc.id, s.Alert.kind != AlertKind.RESOLVED,
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


def alert_title(alert: s.Alert, cfg: FinsentConfig) -> str:
    return render_health(alert)[0] if is_health(alert) else view_of(alert, cfg).title
