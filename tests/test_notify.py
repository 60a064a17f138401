"""Delivery against real receivers: a Slack-style webhook on 127.0.0.1, aiosmtpd with STARTTLS + AUTH,
and the real Postgres (alerts, deliveries and attempts). The receivers and their fixtures (`slack_webhook`,
`starttls_smtp`, `failing_smtp`) live in tests/notify_receivers.py, a plugin listed in conftest."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from pipeline.config import FinsentConfig
from pipeline.messages import safe_link, slack_escape
from pipeline.notify import DeliveryReport, deliver_pending
from pipeline.sinks import DeliveryError, EmailSink
from pipeline.store import schema as s
from pipeline.store import session_scope
from tests.notify_receivers import Webhook, make_cert

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 20, 15, 5, tzinfo=UTC)
HOSTILE = "<!channel> <script>alert(1)</script> Profits & losses @here <@U123ABC> *bold* `code`"
FAST = (0.01, 0.01)


# --- data ----------------------------------------------------------------------------------------


def make_cfg(**sink_overrides) -> FinsentConfig:
    sinks = sink_overrides.pop("sinks", None) or [
        {"name": "slack-desk", "kind": "slack", "webhook_url_env": "TEST_SLACK_URL", "timeout_s": 5, **sink_overrides}
    ]
    return FinsentConfig.model_validate(
        {"watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}], "sinks": sinks, "database_url": "sqlite://"}
    )


def add_alert(
    engine,
    kind: str = "spike",
    severity: str = "critical",
    scope: tuple[str, str] = ("entity", "NWB"),
    suffix: str = "a",
    hours_earlier: int = 0,
) -> str:
    ws = datetime(2026, 11, 20, 14, tzinfo=UTC) - timedelta(hours=hours_earlier)
    aid = f"{kind}-{scope[1]}-{suffix}".ljust(12, "0")
    details = {
        "model_version": "m1",
        "episode_severity": "warning" if kind == "resolved" else severity,
        "episode_onset": ws.isoformat(),
        "top_documents": [
            {
                "document_id": 1,
                "title": HOSTILE,
                "link": "https://news.example.com/a?x=1&y=<2>",
                "source": "newswire",
                "p_negative": 0.97,
                "evidence": ["plunge", "<@U999>"],
            },
            {
                "document_id": 2,
                "title": "Northwind Bank faces record fine",
                "link": "javascript:alert(1)",
                "source": "reddit",
                "p_negative": 0.91,
                "evidence": [],
            },
        ]
        if kind != "resolved"
        else [],
    }
    with session_scope(engine) as session:
        session.add(
            s.Alert(
                id=aid,
                episode_id="ep1",
                kind=kind,
                scope_kind=scope[0],
                scope_value=scope[1],
                window_start=ws,
                window_end=ws + timedelta(hours=1),
                severity=severity if kind != "resolved" else "info",
                neg_count=12,
                total_count=15,
                neg_share=0.8,
                baseline_share=0.15,
                baseline_neg_rate=0.6,
                statistic=9.5,
                p_value=1e-9,
                risk_score=81.5,
                details=details,
                created_at=NOW,
            )
        )
    return aid


def deliveries(engine) -> list[s.AlertDelivery]:
    with session_scope(engine) as session:
        return list(session.scalars(select(s.AlertDelivery).order_by(s.AlertDelivery.id)))


def attempts(engine) -> list[s.DeliveryAttempt]:
    with session_scope(engine) as session:
        return list(session.scalars(select(s.DeliveryAttempt).order_by(s.DeliveryAttempt.id)))


# --- tests ---------------------------------------------------------------------------------------


def test_slack_block_kit_message_arrives_with_hostile_text_neutralised(engine, slack_webhook: Webhook) -> None:
    add_alert(engine)
    report = deliver_pending(engine, make_cfg(), now=NOW, retry_delays=FAST)
    assert (report.sent, report.failed, report.expired) == (1, 0, 0)
    assert len(slack_webhook.posts) == 1
    post = slack_webhook.posts[0]
    raw = json.dumps(post, ensure_ascii=False)
    assert post["blocks"][0]["type"] == "header"
    assert (
        "CRITICAL" in post["blocks"][0]["text"]["text"] and "Northwind Bank (NWB)" in post["blocks"][0]["text"]["text"]
    )
    assert "15 stories about Northwind Bank in the hour to 15:00 UTC, 12 negative (80%)" in raw and "82/100" in raw
    for bad in ("<!channel>", "<@U123ABC>", "<@U999>", "<script>", "@here", "*bold*", "`code`", "javascript:"):
        assert bad not in raw, bad
    assert "&lt;!channel&gt;" in raw and "&lt;script&gt;" in raw and "Profits &amp; losses" in raw
    assert "<https://news.example.com/a?x=1&amp;y=%3C2%3E|" in raw  # the link survives, escaped
    assert "plunge" in raw  # evidence tokens are shown
    d = deliveries(engine)
    assert [(x.status, x.attempts) for x in d] == [("sent", 1)]
    assert [a.ok for a in attempts(engine)] == [True]


def test_repeated_and_concurrent_runs_send_once(engine, slack_webhook: Webhook) -> None:
    add_alert(engine)
    slack_webhook.delay = 0.5
    cfg = make_cfg()
    reports = []
    threads = [
        threading.Thread(target=lambda: reports.append(deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.sent for r in reports) == 1
    assert slack_webhook.hits == 1
    again = deliver_pending(engine, cfg, now=NOW + timedelta(hours=1), retry_delays=FAST)
    assert again.sent == 0 and slack_webhook.hits == 1
    assert len(deliveries(engine)) == 1


def test_500_is_retried_in_run_then_in_a_later_run(
    engine, slack_webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    add_alert(engine)
    slack_webhook.status = 500
    cfg = make_cfg(max_attempts=10)
    with caplog.at_level(logging.DEBUG):
        r1 = deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    assert (r1.sent, r1.failed) == (0, 1)
    assert slack_webhook.hits == 3  # three attempts in the same run
    d = deliveries(engine)[0]
    assert d.status == "failed" and d.attempts == 3 and d.next_attempt_at > NOW
    errs = [a.error for a in attempts(engine)]
    assert len(errs) == 3 and all("HTTP 500" in e for e in errs)
    assert "s3cretT0ken" not in caplog.text and all("s3cretT0ken" not in e for e in errs)

    slack_webhook.status = 200
    r_early = deliver_pending(engine, cfg, now=NOW + timedelta(seconds=30), retry_delays=FAST)
    assert r_early.sent == 0 and slack_webhook.posts == []  # not due yet: backoff
    r2 = deliver_pending(engine, cfg, now=NOW + timedelta(hours=1), retry_delays=FAST)
    assert r2.sent == 1 and len(slack_webhook.posts) == 1
    d = deliveries(engine)[0]
    assert d.status == "sent" and d.attempts == 4
    assert [a.ok for a in attempts(engine)] == [False, False, False, True]


def test_receiver_down_then_up_delivers_later_without_leaking_url(
    engine, slack_webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    add_alert(engine)
    slack_webhook.stop()
    cfg = make_cfg()
    with caplog.at_level(logging.DEBUG):
        r1 = deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    assert r1.failed == 1 and r1.sent == 0
    assert "s3cretT0ken" not in caplog.text and all("s3cretT0ken" not in e for e in r1.errors)
    assert all("s3cretT0ken" not in (a.error or "") for a in attempts(engine))
    assert "Slack webhook failed" in r1.errors[0]
    slack_webhook.start()
    r2 = deliver_pending(engine, cfg, now=NOW + timedelta(hours=1), retry_delays=FAST)
    assert r2.sent == 1 and len(slack_webhook.posts) == 1


def test_max_attempts_and_expiry(engine, slack_webhook: Webhook) -> None:
    add_alert(engine, suffix="x")
    slack_webhook.status = 500
    r = deliver_pending(engine, make_cfg(max_attempts=2), now=NOW, retry_delays=FAST)
    assert (r.sent, r.failed, r.expired) == (0, 0, 1)
    assert slack_webhook.hits == 2
    assert deliveries(engine)[0].status == "expired"
    slack_webhook.status = 200
    assert deliver_pending(engine, make_cfg(max_attempts=2), now=NOW + timedelta(hours=2), retry_delays=FAST).sent == 0

    add_alert(engine, suffix="y")
    slack_webhook.status = 500
    cfg = make_cfg(expire_hours=1)
    assert deliver_pending(engine, cfg, now=NOW, retry_delays=FAST).failed == 1
    slack_webhook.status = 200
    late = deliver_pending(engine, cfg, now=NOW + timedelta(hours=3), retry_delays=FAST)
    assert late.expired == 1 and late.sent == 0 and slack_webhook.posts == []


def test_acknowledged_alerts_are_not_sent_or_resent(engine, slack_webhook: Webhook) -> None:
    first = add_alert(engine, suffix="1")
    with session_scope(engine) as session:
        session.get(s.Alert, first).acknowledged_at = NOW
    second = add_alert(engine, suffix="2")
    slack_webhook.status = 500
    r = deliver_pending(engine, make_cfg(), now=NOW, retry_delays=FAST)
    assert r.failed == 1  # only the unacknowledged one was tried
    with session_scope(engine) as session:
        session.get(s.Alert, second).acknowledged_at = NOW
    slack_webhook.status = 200
    r2 = deliver_pending(engine, make_cfg(), now=NOW + timedelta(hours=1), retry_delays=FAST)
    assert r2.sent == 0 and r2.skipped == 1 and slack_webhook.posts == []
    states = {d.alert_id: d.status for d in deliveries(engine)}
    assert states == {second: "cancelled"}


def test_resolution_notice_follows_its_episode_route(engine, slack_webhook: Webhook) -> None:
    add_alert(engine, kind="resolved")
    add_alert(engine, scope=("source", "reddit"), suffix="r")
    cfg = make_cfg(severities=["warning", "critical"], scopes=["entity", "market"])
    r = deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    assert r.sent == 1  # the source-scope spike is routed elsewhere
    text = json.dumps(slack_webhook.posts[0])
    assert (
        "RESOLVED" in text
        and "Back to normal after 1 h" in text
        and "Acknowledge" not in text
        and "alerts ack" not in text
    )
    # A critical-only sink gets the critical spike but not the end of a warning-level episode.
    crit = make_cfg(severities=["critical"])
    crit = crit.model_copy(update={"sinks": [crit.sinks[0].model_copy(update={"name": "crit"})]})
    assert deliver_pending(engine, crit, now=NOW, retry_delays=FAST).sent == 1
    assert "RESOLVED" not in json.dumps(slack_webhook.posts[1]) and "reddit" in json.dumps(slack_webhook.posts[1])


def test_email_starttls_auth_text_and_html(engine, starttls_smtp, caplog: pytest.LogCaptureFixture) -> None:
    box, port = starttls_smtp
    aid = add_alert(engine)
    sink = {
        "name": "mail-desk",
        "kind": "email",
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_user": "alerts",
        "smtp_password_env": "TEST_SMTP_PASSWORD",
        "mail_from": "finsent@example.com",
        "mail_to": ["desk@example.com"],
    }
    cfg = make_cfg(sinks=[sink])
    with caplog.at_level(logging.DEBUG):
        r = deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    assert r.sent == 1, r.errors
    assert box.logins == [("alerts", "smtp-pa55word")]
    assert len(box.messages) == 1
    msg = box.messages[0]
    assert msg["Subject"] == "finsent: Northwind Bank (NWB): negative news surge"
    assert msg["Message-ID"] == f"<{aid}.mail-desk@finsent.alerts>"
    plain = msg.get_body(("plain",)).get_content()
    html_part = msg.get_body(("html",)).get_content()
    assert (
        "15 stories about Northwind Bank in the hour to 15:00 UTC, 12 negative (80%)." in plain
        and "Risk 82/100" in plain
    )
    assert "<script>" not in html_part and "&lt;script&gt;" in html_part and "Profits &amp; losses" in html_part
    assert 'href="https://news.example.com/a?x=1&amp;y=%3C2%3E"' in html_part
    assert "javascript:" not in html_part
    assert "smtp-pa55word" not in caplog.text


def test_email_wrong_password_fails_without_leaking_it(engine, starttls_smtp, monkeypatch: pytest.MonkeyPatch) -> None:
    box, port = starttls_smtp
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong-pa55word")
    add_alert(engine)
    sink = {"name": "mail", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_user": "alerts",
            "smtp_password_env": "TEST_SMTP_PASSWORD", "mail_to": ["desk@example.com"]}  # fmt: skip
    r = deliver_pending(engine, make_cfg(sinks=[sink]), now=NOW, retry_delays=FAST)
    assert r.failed == 1 and box.messages == []
    assert "SMTPAuthenticationError" in r.errors[0]
    assert all("wrong-pa55word" not in (a.error or "") for a in attempts(engine))


def test_email_refuses_an_unverified_certificate(
    engine, starttls_smtp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    box, port = starttls_smtp
    (tmp_path / "other").mkdir()
    other, _ = make_cert(tmp_path / "other")  # a different CA than the server's
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    sink = make_cfg(sinks=[{"name": "m", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port,
                            "smtp_user": "alerts", "smtp_password_env": "TEST_SMTP_PASSWORD",
                            "mail_to": ["d@example.com"]}]).sinks[0]  # fmt: skip
    from pipeline.messages import view_of

    aid = add_alert(engine)
    with session_scope(engine) as session:
        view = view_of(session.get(s.Alert, aid))
    with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        EmailSink(sink).send(view)
    assert box.messages == [] and box.logins == []


def test_console_sink_prints_a_readable_alert(engine, capsys: pytest.CaptureFixture[str]) -> None:
    add_alert(engine)
    cfg = make_cfg(sinks=[{"name": "console", "kind": "console"}])
    assert deliver_pending(engine, cfg, now=NOW + timedelta(days=30)).sent == 1  # the console prints past alerts (demo)
    out = capsys.readouterr().out
    assert "[CRITICAL] Northwind Bank (NWB): negative news surge" in out
    assert "Window:     2026-11-20 14:00\u201315:00 UTC" in out
    assert "15 stories about Northwind Bank in the hour to 15:00 UTC, 12 negative (80%)." in out
    assert "At this hour it usually sees" in out and "with 15% negative." in out
    assert "1. [newswire]" in out and "https://news.example.com/a?x=1&y=%3C2%3E" in out and "evidence: plunge" in out
    assert "javascript:" not in out


def test_stale_alerts_are_not_paged_to_slack(engine, slack_webhook: Webhook) -> None:
    add_alert(engine)
    r = deliver_pending(engine, make_cfg(expire_hours=24), now=NOW + timedelta(days=3), retry_delays=FAST)
    assert r.sent == 0 and slack_webhook.hits == 0
    assert deliveries(engine)[0].status == "expired"


def test_escaping_helpers() -> None:
    assert slack_escape("<!here> & <@U1|x> @channel") == "&lt;!here&gt; &amp; &lt;@\u200bU1\u2223x&gt; @\u200bchannel"
    assert slack_escape("a\x1b[31mred\u202eevil") == "a [31mred evil"
    assert safe_link("javascript:alert(1)") is None and safe_link("ftp://x/y") is None
    assert safe_link("https://e.com/a b|c") == "https://e.com/ab%7Cc"


def test_secrets_from_airflow_connections_when_env_is_empty() -> None:
    """In a fresh interpreter (Airflow reads its config at import): connections come from AIRFLOW_CONN_*."""
    code = (
        "from pipeline import secrets;"
        "print(secrets.slack_webhook_url('UNSET_ENV_VAR'));"
        "print(secrets.smtp_credentials('UNSET_ENV_VAR', None));"
        "print(secrets.airflow_connection('no_such_conn'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")} | {
        "AIRFLOW_CONN_FINSENT_SLACK": json.dumps(
            {"conn_type": "slackwebhook", "host": "https://hooks.example.com/services", "password": "T1/B2/xyz"}
        ),
        "AIRFLOW_CONN_FINSENT_SMTP": json.dumps({"conn_type": "smtp", "login": "bot", "password": "from-conn"}),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines == ["https://hooks.example.com/services/T1/B2/xyz", "('bot', 'from-conn')", "None"]


def test_a_claim_left_by_a_crashed_run_is_taken_over_after_the_lease(engine, slack_webhook: Webhook) -> None:
    add_alert(engine)
    cfg = make_cfg()
    with session_scope(engine) as session:  # claims are stamped with the wall clock
        session.add(
            s.AlertDelivery(
                alert_id=session.scalar(select(s.Alert.id)),
                sink="slack-desk",
                status="sending",
                attempts=0,
                last_attempt_at=datetime.now(UTC) - timedelta(minutes=2),
                created_at=NOW,
            )
        )
    assert (
        deliver_pending(engine, cfg, now=NOW + timedelta(minutes=2), retry_delays=FAST).sent == 0
    )  # another run may still be sending
    assert slack_webhook.hits == 0
    with session_scope(engine) as session:
        session.execute(update(s.AlertDelivery).values(last_attempt_at=datetime.now(UTC) - timedelta(minutes=15)))
    r = deliver_pending(engine, cfg, now=NOW + timedelta(minutes=15), retry_delays=FAST)
    assert r.sent == 1 and len(slack_webhook.posts) == 1
    assert [(d.status, d.attempts) for d in deliveries(engine)] == [("sent", 1)]


def test_console_resolution_notice(engine, capsys: pytest.CaptureFixture[str]) -> None:
    add_alert(engine, kind="resolved")
    assert (
        deliver_pending(
            engine, make_cfg(sinks=[{"name": "console", "kind": "console", "severities": ["warning"]}]), now=NOW
        ).sent
        == 1
    )
    out = capsys.readouterr().out
    assert "[RESOLVED] Northwind Bank (NWB): negative news surge" in out
    assert "Back to normal after 1 h (2026-11-20 14:00\u201315:00 UTC" in out and "Top negative stories" not in out
    assert "Acknowledge" not in out and "p=1.0e-09" not in out


def test_escalation_is_paged_like_a_spike_and_says_so(
    engine, slack_webhook: Webhook, capsys: pytest.CaptureFixture[str]
) -> None:
    add_alert(engine, kind="escalated", severity="critical")
    assert deliver_pending(engine, make_cfg(severities=["critical"]), now=NOW, retry_delays=FAST).sent == 1
    text = json.dumps(slack_webhook.posts[0])
    assert "[CRITICAL] Escalating: Northwind Bank (NWB)" in text and "much stronger than at its last alert" in text
    assert "Top negative stories" in text and "<@U999>" not in text
    assert deliver_pending(engine, make_cfg(sinks=[{"name": "console", "kind": "console"}]), now=NOW).sent == 1
    assert "Open since 2026-11-20 14:00 UTC" in capsys.readouterr().out


# --- no silent loss (issue #9.6) -----------------------------------------------------------------


def mail_sink(port: int, **extra) -> dict:
    return {"name": "mail-ops", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_starttls": False,
            "mail_from": "finsent@example.com", "mail_to": ["ops@example.com"], **extra}  # fmt: skip


def slack_sink(**extra) -> dict:
    return {"name": "slack-desk", "kind": "slack", "webhook_url_env": "TEST_SLACK_URL", "timeout_s": 5, **extra}


def notices(engine) -> list[s.OperatorNotice]:
    with session_scope(engine) as session:
        return list(session.scalars(select(s.OperatorNotice).order_by(s.OperatorNotice.id)))


def test_six_hour_slack_outage_ends_in_exactly_one_delivery(engine, slack_webhook: Webhook, failing_smtp) -> None:
    """Slack answers 500 for six hours of 15-minute cycles (each a fresh run, as after a restart), then
    recovers: the alert arrives exactly once, and email hears once that Slack is failing."""
    box, port = failing_smtp
    box.accept = True  # email works: it is the "other sink" the operator hears from
    add_alert(engine)
    cfg = make_cfg(sinks=[slack_sink(), mail_sink(port)])
    slack_webhook.status = 500
    degraded = []
    for k in range(6 * 4):
        r = deliver_pending(engine, cfg, now=NOW + k * timedelta(minutes=15), retry_delays=FAST)
        assert r.sent == (1 if k == 0 else 0) and r.expired == 0  # only email's copy of the alert, in the first cycle
        degraded.append(r.degraded)
    assert slack_webhook.posts == [] and 10 <= slack_webhook.hits <= 60, (
        slack_webhook.hits
    )  # retried, with backoff (not every cycle)
    d = {x.sink: x for x in deliveries(engine)}
    assert d["slack-desk"].status == "failed" and d["mail-ops"].status == "sent"
    assert degraded[:4] == [False] * 4 and all(degraded[4:]), degraded  # failing_after_minutes=60
    assert [(n.kind, n.sent_to, n.errors) for n in notices(engine)] == [("sink_failing", ["mail-ops"], [])]
    assert len(box.messages) == 2  # the alert, then one notice (not one per cycle)
    notice = box.messages[1]
    assert notice["Subject"] == "[finsent] alert sink slack-desk is failing"
    assert "HTTP 500" in notice.get_content() and "s3cretT0ken" not in notice.get_content()

    slack_webhook.status = 200
    done = []
    for k in range(24, 24 + 4):
        r = deliver_pending(engine, cfg, now=NOW + k * timedelta(minutes=15), retry_delays=FAST)
        done.append((r.sent, r.degraded))
    sent_at = [i for i, (n, _) in enumerate(done) if n]
    assert len(slack_webhook.posts) == 1 and len(sent_at) == 1 and sum(n for n, _ in done) == 1, done
    assert not any(deg for _, deg in done[sent_at[0] :]), done  # degraded until it is delivered, not after
    assert {x.sink: x.status for x in deliveries(engine)} == {"slack-desk": "sent", "mail-ops": "sent"}
    assert r.per_sink["slack-desk"].pending == 0 and len(box.messages) == 2


def test_an_email_outage_past_expire_hours_sends_one_operator_notice(
    engine, slack_webhook: Webhook, failing_smtp
) -> None:
    """SMTP refuses every message for longer than expire_hours: the delivery expires, Slack (the other
    sink) gets one notice naming the lost alert, the report is degraded and counts it as failed."""
    box, port = failing_smtp
    add_alert(engine)
    cfg = make_cfg(sinks=[mail_sink(port, expire_hours=3, failing_after_minutes=600), slack_sink(severities=["info"])])
    reports = [
        deliver_pending(engine, cfg, now=NOW + k * timedelta(minutes=15), retry_delays=FAST) for k in range(4 * 4)
    ]
    assert box.messages == [] and box.refused >= 6
    expired_at = [k for k, r in enumerate(reports) if r.expired]
    assert len(expired_at) == 1 and expired_at[0] > 4 * 3 - 1  # not before expire_hours
    k = expired_at[0]
    assert reports[k].degraded and not any(r.degraded for r in reports[:k])
    assert reports[k].per_sink["mail-ops"].failed == 1 and reports[k].per_sink["mail-ops"].pending == 0
    assert "expired undelivered" in reports[k].problems[0]
    assert len(slack_webhook.posts) == 1, (
        "exactly one notice, and the alert itself was never routed to this info-only sink"
    )
    text = json.dumps(slack_webhook.posts[0])
    assert "could not be delivered to mail-ops" in text and "Northwind Bank (NWB)" in text and "451" in text
    assert [(n.kind, n.sent_to) for n in notices(engine)] == [("delivery_expired", ["slack-desk"])]
    assert deliveries(engine)[0].status == "expired"


def test_an_alert_nobody_routed_before_expire_hours_is_reported_not_dropped(
    engine, slack_webhook: Webhook, failing_smtp
) -> None:
    """A backfilled old window is not paged (the alert was just stored); but an alert stored two days ago that no
    notifier routed in time (the notifier was down) is a loss: operators hear of it through the other sink."""
    box, port = failing_smtp
    box.accept = True
    cfg = make_cfg(sinks=[mail_sink(port), slack_sink(severities=["info"])])
    add_alert(engine, suffix="backfill", hours_earlier=72)  # stored now, about an old window: a backfill
    r = deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    assert r.expired == 0 and not r.degraded and slack_webhook.posts == [] and box.messages == []

    lost = add_alert(engine, suffix="lost", hours_earlier=48)
    with session_scope(engine) as session:  # stored when its window closed, two days before this run
        session.get_one(s.Alert, lost).created_at = NOW - timedelta(hours=47)
    r = deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    assert r.expired == 1 and r.degraded and box.messages == []
    assert len(slack_webhook.posts) == 1 and "could not be delivered to mail-ops" in json.dumps(slack_webhook.posts[0])
    assert {d.alert_id: d.status for d in deliveries(engine) if d.sink == "mail-ops"}[lost] == "expired"
    assert deliver_pending(engine, cfg, now=NOW + timedelta(minutes=15), retry_delays=FAST).expired == 0  # told once


def test_a_notice_that_reaches_only_the_console_is_itself_a_problem(
    engine, slack_webhook: Webhook, capsys: pytest.CaptureFixture[str]
) -> None:
    add_alert(engine)
    slack_webhook.status = 500
    cfg = make_cfg(sinks=[slack_sink(expire_hours=1), {"name": "console", "kind": "console"}])
    deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    r = deliver_pending(engine, cfg, now=NOW + timedelta(hours=2), retry_delays=FAST)
    assert r.expired == 1 and r.degraded
    assert any("reached no sink besides the console" in p for p in r.problems), r.problems
    assert "could not be delivered to slack-desk" in capsys.readouterr().out


def test_summary_counts_sent_pending_failed_per_sink(engine, slack_webhook: Webhook) -> None:
    from pipeline.notify import summary_line

    add_alert(engine)
    slack_webhook.status = 500
    r = deliver_pending(
        engine, make_cfg(sinks=[slack_sink(), {"name": "console", "kind": "console"}]), now=NOW, retry_delays=FAST
    )
    assert summary_line(r) == "slack-desk: 0 sent, 1 pending, 0 failed; console: 1 sent, 0 pending, 0 failed"


def test_backoff_is_exponential_and_capped() -> None:
    from pipeline.notify import backoff

    assert [backoff(n).total_seconds() / 60 for n in (1, 2, 3, 4, 5, 6, 7, 50, 10**6)] == [
        1,
        2,
        4,
        8,
        16,
        30,
        30,
        30,
        30,
    ]
    assert backoff(9, timedelta(hours=2)) == timedelta(minutes=120)


def test_a_dead_sink_costs_one_deliverys_tries_per_run(engine, slack_webhook: Webhook) -> None:
    """Twenty alerts queued for a dead webhook: one run tries one of them (three attempts), not all twenty,
    so a run stays bounded; all are delivered once the webhook is back."""
    for i in range(20):
        add_alert(engine, suffix=f"n{i}", hours_earlier=i)  # twenty windows: twenty incidents, twenty messages
    slack_webhook.status = 500
    r = deliver_pending(engine, make_cfg(), now=NOW, retry_delays=FAST)
    assert slack_webhook.hits == 3 and r.failed == 1 and r.per_sink["slack-desk"].pending == 20
    slack_webhook.status = 200
    r = deliver_pending(engine, make_cfg(), now=NOW + timedelta(hours=1), retry_delays=FAST)
    assert r.sent == 20 and len(slack_webhook.posts) == 20 and r.per_sink["slack-desk"].pending == 0


def test_an_alert_that_cannot_be_rendered_fails_alone_and_frees_its_claim(engine, slack_webhook: Webhook) -> None:
    """A renderer error after the claim is a recorded failed attempt (retried later), not a row stuck in
    `sending`; the next alert in the queue still goes out."""
    broken = add_alert(engine, suffix="x", hours_earlier=2)
    good = add_alert(engine, scope=("market", "*"))
    with session_scope(engine) as session:
        session.get(s.Alert, broken).details = {"top_documents": [{"document_id": 3, "p_negative": "very"}]}
    r = deliver_pending(engine, make_cfg(), now=NOW, retry_delays=FAST)
    assert r.sent == 1 and r.failed == 1 and len(slack_webhook.posts) == 1
    rows = {d.alert_id: d for d in deliveries(engine)}
    assert rows[good].status == "sent"
    bad = rows[broken]
    assert bad.status == "failed" and bad.attempts == 1 and bad.next_attempt_at is not None
    assert bad.last_error.startswith(f"sink slack-desk: cannot build the message for alert {broken}")
    assert "s3cretT0ken" not in bad.last_error and any(broken in e for e in r.errors)


def test_a_run_longer_than_the_lease_keeps_its_claim_from_a_concurrent_notifier(engine, slack_webhook: Webhook) -> None:
    """Run A started 15 min ago (longer than CLAIM_LEASE) and is sending; run B starting now must see A's claim
    as live (stamped when it was taken, not with A's start time) and not send the alert a second time."""
    start = datetime.now(UTC) - timedelta(minutes=15)
    aid = add_alert(engine)
    with session_scope(engine) as session:
        row = session.get(s.Alert, aid)
        row.window_start, row.window_end = start - timedelta(hours=1), start
    cfg = make_cfg(timeout_s=60)
    slack_webhook.hold = threading.Event()
    runs: dict[str, DeliveryReport] = {}
    a = threading.Thread(target=lambda: runs.update(a=deliver_pending(engine, cfg, now=start, retry_delays=FAST)))
    a.start()
    try:
        for _ in range(600):  # until A's post reaches the receiver (A holds the claim from here on)
            if slack_webhook.hits:
                break
            time.sleep(0.05)
        assert slack_webhook.hits == 1
        runs["b"] = deliver_pending(engine, cfg, now=datetime.now(UTC), retry_delays=FAST)
    finally:
        slack_webhook.hold.set()
        a.join(60)
    assert runs["b"].sent == 0 and runs["a"].sent == 1 and slack_webhook.hits == 1
    assert [(d.status, d.attempts) for d in deliveries(engine)] == [("sent", 1)]


def test_claims_are_judged_on_the_wall_clock_they_are_stamped_with(engine, slack_webhook: Webhook) -> None:
    """Claims of notices and deliveries are stamped with the wall clock, so their age is judged on it, never
    against the run's `now`. A catch-up run whose `now` lies two hours back takes over a notice and a delivery
    whose sender died 30 minutes ago (before: no such run ever did); a run whose `now` lies an hour ahead
    leaves a notice claimed 2 minutes ago alone (before: it sent it a second time)."""
    wall = datetime.now(UTC)
    aid = add_alert(engine)
    cfg = make_cfg()

    def notice(key: str, claimed: datetime) -> s.OperatorNotice:
        return s.OperatorNotice(
            key=key, kind="sink_failing", subject=f"notice {key}", body="b", created_at=wall - timedelta(hours=3),
            sent_to=[], errors=[], status="sending", attempts=0, last_attempt_at=claimed, exclude=[],
        )  # fmt: skip

    with session_scope(engine) as session:
        session.add(
            s.AlertDelivery(
                alert_id=aid, sink="slack-desk", status="sending", attempts=0,
                last_attempt_at=wall - timedelta(minutes=30), created_at=wall - timedelta(hours=3),
            )
        )  # fmt: skip
        session.add_all([notice("dead", wall - timedelta(minutes=30)), notice("live", wall - timedelta(minutes=2))])
    r = deliver_pending(engine, cfg, now=wall - timedelta(hours=2), retry_delays=FAST)
    assert r.sent == 1 and [d.status for d in deliveries(engine)] == ["sent"]
    assert {n.key: n.status for n in notices(engine)} == {"dead": "sent", "live": "sending"}
    deliver_pending(engine, cfg, now=wall + timedelta(hours=1), retry_delays=FAST)
    assert {n.key: n.status for n in notices(engine)} == {"dead": "sent", "live": "sending"}
    told = [json.dumps(p) for p in slack_webhook.posts]
    assert sum("notice dead" in p for p in told) == 1 and not any("notice live" in p for p in told)


# --- operator notices are claimed, sent, confirmed (reliability review, item 1) --------------------


def test_a_notice_that_reached_no_sink_is_retried_next_run_and_sent_once(
    engine, slack_webhook: Webhook, failing_smtp
) -> None:
    """Email refuses the alert past expire_hours; when its notice is due, Slack (the only other sink) answers 500
    too. The notice is not lost: the next notify run after the backoff sends it, once, and later runs send
    nothing more. (Before: the notice was marked sent when claimed and never tried again.)"""
    box, port = failing_smtp
    add_alert(engine)
    cfg = make_cfg(sinks=[mail_sink(port, expire_hours=1, failing_after_minutes=600), slack_sink(severities=["info"])])
    deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    slack_webhook.status = 500
    r = deliver_pending(engine, cfg, now=NOW + timedelta(hours=2), retry_delays=FAST)
    assert r.expired == 1 and r.degraded and slack_webhook.posts == []
    assert any("not delivered yet" in p for p in r.problems), r.problems
    [n] = notices(engine)
    assert (n.status, n.sent_to, n.attempts) == ("retrying", [], 1) and "HTTP 500" in n.errors[0]

    slack_webhook.status = 200
    r = deliver_pending(engine, cfg, now=NOW + timedelta(hours=2, seconds=30), retry_delays=FAST)
    assert slack_webhook.posts == [], "not before its backoff"
    r = deliver_pending(engine, cfg, now=NOW + timedelta(hours=2, minutes=2), retry_delays=FAST)
    assert len(slack_webhook.posts) == 1 and "could not be delivered to mail-ops" in json.dumps(slack_webhook.posts[0])
    assert r.notices and not r.degraded
    [n] = notices(engine)
    assert (n.status, n.sent_to, n.errors, n.attempts) == ("sent", ["slack-desk"], [], 2)
    for k in range(1, 4):
        deliver_pending(engine, cfg, now=NOW + timedelta(hours=3 + k), retry_delays=FAST)
    assert len(slack_webhook.posts) == 1 and box.messages == []


def test_a_notice_is_retried_only_where_it_missed_and_gives_up_visibly(
    engine, pg_url, slack_webhook: Webhook, failing_smtp, tmp_path
) -> None:
    """A DAG-failure notice reached Slack but not email: later runs retry email only (Slack never gets a second
    copy), `notices.max_attempts` times in all; then it stays `failed`, the run that gives up is degraded, and
    `finsent alerts notices` lists it first with the sink's error."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.notify import NoticeKind, broadcast_notice, claim_notice, record_notice

    box, port = failing_smtp
    cfg = FinsentConfig.model_validate(
        {"sinks": [slack_sink(), mail_sink(port)], "notices": {"max_attempts": 3}, "database_url": pg_url}
    )
    key, subject = "dag_failed:finsent_monitor:run-1", "[finsent] DAG run failed: finsent_monitor (score)"
    assert claim_notice(engine, key, NoticeKind.DAG_FAILED, subject, "Error: killed")
    reached, errors = broadcast_notice(cfg, subject, "Error: killed")
    assert reached == ["slack-desk"] and len(errors) == 1
    assert record_notice(engine, key, reached, errors, NOW, max_attempts=3) == "retrying"

    runs = [deliver_pending(engine, cfg, now=NOW + timedelta(hours=k), retry_delays=FAST) for k in range(1, 6)]
    assert len(slack_webhook.posts) == 1, "Slack had it: never sent twice"
    assert box.refused == 3, "email tried 3 times in all (the first, then twice by later runs), then left alone"
    assert [any("gave up after 3 attempts" in p for p in r.problems) for r in runs] == [
        False,
        True,
        False,
        False,
        False,
    ]
    [n] = notices(engine)
    assert (n.status, n.sent_to, n.attempts) == ("failed", ["slack-desk"], 3) and "451" in n.errors[0]

    path = tmp_path / "finsent.yaml"
    path.write_text(yaml.safe_dump({"sinks": [slack_sink(), mail_sink(port)], "database_url": pg_url}))
    out = CliRunner().invoke(app, ["alerts", "notices", "-c", str(path)])
    assert out.exit_code == 0, out.output
    line = out.output.splitlines()[1]
    assert "dag_failed" in line and "failed" in line and "slack-desk" in line and "451" in line


# --- alerts grouped into a message that never arrived (reliability review, item 2) ---------------


def test_alerts_grouped_under_an_expired_lead_are_reported_with_it(
    engine, slack_webhook: Webhook, failing_smtp
) -> None:
    """Two alerts of one incident and run go to email as one message (the entity leads, the market is
    `grouped` into it). Email refuses it past expire_hours: both deliveries expire and the notice names both.
    (Before: the market alert stayed `grouped` for ever, told nowhere, and the notice named the lead only.)"""
    box, port = failing_smtp
    lead = add_alert(engine)
    market = add_alert(engine, scope=("market", "*"), severity="warning")
    cfg = make_cfg(sinks=[mail_sink(port, expire_hours=1, failing_after_minutes=600), slack_sink(severities=["info"])])
    deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    assert {d.alert_id: d.status for d in deliveries(engine)} == {lead: "failed", market: "grouped"}

    r = deliver_pending(engine, cfg, now=NOW + timedelta(hours=2), retry_delays=FAST)
    assert {d.alert_id: d.status for d in deliveries(engine)} == {lead: "expired", market: "expired"}
    assert r.expired == 2 and r.per_sink["mail-ops"].failed == 2 and r.degraded
    [post] = slack_webhook.posts
    text = json.dumps(post)
    assert "2 alert(s) could not be delivered to mail-ops" in text
    assert f"(alert {lead})" in text and f"(alert {market})" in text and "market-wide" in text
    assert f"grouped into the message of alert {lead}" in text
    deliver_pending(engine, cfg, now=NOW + timedelta(hours=3), retry_delays=FAST)
    assert len(slack_webhook.posts) == 1 and box.messages == []


def test_a_stale_groups_alerts_are_reported_with_their_lead(engine, slack_webhook: Webhook, failing_smtp) -> None:
    """An incident nobody routed before expire_hours (the notifier was down): every alert of its message is a
    loss, not only the lead."""
    box, port = failing_smtp
    box.accept = True
    cfg = make_cfg(sinks=[mail_sink(port), slack_sink(severities=["info"])])
    ids = [add_alert(engine, hours_earlier=48), add_alert(engine, scope=("market", "*"), hours_earlier=48)]
    with session_scope(engine) as session:
        for aid in ids:
            session.get_one(s.Alert, aid).created_at = NOW - timedelta(hours=47)
    r = deliver_pending(engine, cfg, now=NOW, retry_delays=FAST)
    assert r.expired == 2 and box.messages == []
    assert {d.alert_id: d.status for d in deliveries(engine) if d.sink == "mail-ops"} == dict.fromkeys(ids, "expired")
    text = json.dumps(slack_webhook.posts)
    assert all(f"(alert {aid})" in text for aid in ids)
