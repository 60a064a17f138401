"""`finsent serve` on the demo database, driven in real headless Chromium (Playwright + Debian's chromium).

The demo database is built by the demo's own code (bundled feeds, bundled model, SQLite), then one
hostile headline is stored the way ingest stores documents, and `finsent serve` runs as a subprocess on
127.0.0.1. Set FINSENT_WEB_SCREENSHOTS=docs to also (re)write the README's screenshots."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy import delete, select

from pipeline import acks, store
from pipeline.messages import ACK_ACTION_ID
from pipeline.records import ALERT_SCOPES, AlertKind, Document, EntityMention, OpsScope
from pipeline.store import schema as s

CHROMIUM = os.environ.get("FINSENT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ACK_SECRET = "test-ack-secret-not-for-production"
XSS_TITLE = 'Northwind Bank <script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> probe'
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINSENT_WEB_")}
    env.update(PYTHONPATH=str(ROOT), FINSENT_ACK_SECRET=ACK_SECRET, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def finsent(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=timeout,
        cwd=ROOT,
    )


@contextmanager
def serving(url: str, env: dict[str, str] | None = None, *args: str) -> Iterator[str]:
    """`finsent serve` as a real process on a free loopback port; yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port), "--database-url", url, *args],
        env=env or _env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(
                    f"finsent serve exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                httpx.get(base + "/static/style.css", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("finsent serve did not answer within 30 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass(frozen=True)
class Demo:
    url: str
    base: str
    nwb_alert: str
    other_alert: str
    market_alert: str
    surge_hour: datetime
    xss_doc: int


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    from pipeline.demo import run_demo

    db = tmp_path_factory.mktemp("web-demo") / "finsent-demo.db"
    report = run_demo(db)
    engine = store.make_engine(report.database_url)
    with store.session_scope(engine) as session:
        alerts = session.scalars(select(s.Alert).where(s.Alert.kind == "spike").order_by(s.Alert.id)).all()
        nwb = next(a for a in alerts if a.scope_kind == "entity" and a.scope_value == "NWB")
        other = next(a for a in alerts if a.scope_kind == "source")
        market = next(a for a in alerts if a.scope_kind == "market")
        surge = nwb.window_start
        published = surge + timedelta(minutes=30)
        store.ensure_sources(session, [s.Source(name="hostile", kind="rss", url="http://127.0.0.1/hostile.xml")])
        store.save_documents(
            session,
            [
                Document(
                    source="hostile",
                    external_id="xss-1",
                    content_hash=hashlib.sha256(XSS_TITLE.encode()).hexdigest(),
                    title=XSS_TITLE,
                    summary="",
                    link="javascript:alert(1)",
                    published_at=published,
                    entities=(EntityMention("NWB", "watchlist", "Northwind Bank"),),
                )
            ],
        )
        xss_doc = session.scalar(select(s.Document.id).where(s.Document.external_id == "xss-1"))
        ids = (nwb.id, other.id, market.id)
    engine.dispose()
    with serving(report.database_url) as base:
        yield Demo(report.database_url, base, *ids, surge, int(xss_doc or 0))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: run `apt-get install -y chromium` (as .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    yield p
    context.close()


def _ack_state(url: str, alert_id: str) -> tuple[datetime | None, str | None]:
    engine = store.make_engine(url)
    with store.session_scope(engine) as session:
        row = session.get(s.Alert, alert_id)
        assert row is not None
        state = (row.acknowledged_at, row.acknowledged_by)
    engine.dispose()
    return state


def test_overview_lists_northwind_first_with_open_alert(demo: Demo, page: Any) -> None:
    page.goto(demo.base + "/")
    first = page.locator("#companies tr.company").first
    assert first.locator("a.name").inner_text() == "Northwind Bank"
    assert first.locator(".open-alert").count() == 1
    first_open = page.locator("#open-items tbody tr").first
    assert "Northwind Bank (NWB)" in first_open.inner_text() and "incident" in first_open.inner_text()
    assert "Market-wide" in first_open.locator(".also").inner_text()  # one incident row, not one row per scope
    assert page.locator("#companies tr.company").count() == 5
    assert page.locator("#sources").inner_text().count("ok") >= 4
    assert page.locator("#model").inner_text().startswith("finsent-minilm")


def test_company_chart_has_points_for_the_surge_hour(demo: Demo, page: Any) -> None:
    page.goto(demo.base + "/company/NWB")
    hour = demo.surge_hour.strftime("%Y-%m-%dT%H:00Z")
    point = page.locator(f'#hourly-chart circle.pt[data-hour="{hour}"]')
    assert point.count() == 1
    neg, total = int(point.get_attribute("data-neg")), int(point.get_attribute("data-total"))
    assert total >= 10 and neg / total > 0.8, (neg, total)
    assert page.locator(f'#hourly-chart .marker[data-hour="{hour}"]').count() == 1
    # the surge hour is chosen by default; its headlines are listed with scores and topics
    rows = page.locator("#docs tbody tr[data-doc]")
    assert rows.count() >= 10
    assert "negative" in rows.first.inner_text()
    # empty hours are points of zero volume, never bridged: every hour of the week has a bar
    assert page.locator("#hourly-chart rect.bar").count() == 7 * 24


def test_acknowledge_from_page_shows_in_cli(demo: Demo, page: Any) -> None:
    assert _ack_state(demo.url, demo.other_alert) == (None, None)
    page.goto(f"{demo.base}/alerts/{demo.other_alert}")
    page.fill("input[name=by]", "pw-analyst")
    page.click("#ack-form button")
    page.wait_for_url(f"**/alerts/{demo.other_alert}?acked=1")
    assert "yes, by pw-analyst" in page.locator("#ack-state").inner_text()
    shown = finsent("alerts", "show", demo.other_alert, "--database-url", demo.url)
    assert shown.returncode == 0, shown.stderr
    assert "by pw-analyst" in shown.stdout and "Acknowledged" in shown.stdout


def test_feed_headline_with_script_renders_as_text(demo: Demo, page: Any) -> None:
    for path in ("/documents?q=probe", f"/company/NWB?hour={demo.surge_hour:%Y-%m-%dT%H:00Z}"):
        page.goto(demo.base + path)
        cell = page.locator(f'#docs tr[data-doc="{demo.xss_doc}"] td.headline')
        assert "<script>window.__xss = 1</script>" in cell.inner_text()
        assert page.locator("main script, main img").count() == 0
        assert page.evaluate("window.__xss") is None
        assert cell.locator("a").count() == 0  # a javascript: link is never made clickable


def test_ack_link_get_confirms_and_post_acknowledges(demo: Demo, page: Any) -> None:
    token = acks.ack_token_for(demo.market_alert, ACK_SECRET, datetime.now(UTC))
    page.goto(f"{demo.base}/ack/{token}")  # what a mail scanner does: must not acknowledge
    assert "Acknowledge this alert?" in page.content()
    assert _ack_state(demo.url, demo.market_alert) == (None, None)
    page.fill("input[name=by]", "mail-reader")
    page.click("main form button")
    assert "acknowledged by mail-reader" in page.locator("main").inner_text()
    assert _ack_state(demo.url, demo.market_alert)[1] == "mail-reader"
    bad = httpx.get(f"{demo.base}/ack/{token[:-2]}xx")
    assert bad.status_code == 400 and "not valid" in bad.text


def test_label_correction_writes_feedback(demo: Demo, page: Any) -> None:
    page.goto(demo.base + "/documents?q=probe")
    row = page.locator(f'#docs tr[data-doc="{demo.xss_doc}"]')
    row.locator("select[name=label]").select_option("negative")
    row.locator("button").click()
    page.wait_for_url("**saved=*")
    assert "analyst: negative" in page.locator(f'#docs tr[data-doc="{demo.xss_doc}"]').inner_text()
    engine = store.make_engine(demo.url)
    with store.session_scope(engine) as session:
        fb = session.scalars(select(s.Feedback).where(s.Feedback.document_id == demo.xss_doc)).all()
    engine.dispose()
    assert [(f.label, f.author) for f in fb] == [("negative", "web")]


def test_label_queue_page_lists_the_queue_and_labels_from_it(demo: Demo, page: Any) -> None:
    """The page shows exactly what pipeline.labelqueue.label_queue (`finsent label queue`) returns for the model
    and time it names; labelling an item writes the same feedback row as `finsent label` and drops it."""
    from pipeline.data import SENTIMENT_LABELS
    from pipeline.labelqueue import label_queue

    page.goto(demo.base + "/label-queue")
    rule = page.locator("#queue-rule")
    model, as_of = rule.get_attribute("data-model"), rule.get_attribute("data-as-of")
    assert model and as_of
    shown = [int(x) for x in page.locator("#queue tbody tr[data-doc]").evaluate_all("rs => rs.map(r => r.dataset.doc)")]
    engine = store.make_engine(demo.url)
    expected = label_queue(engine, model, now=datetime.fromisoformat(as_of.replace("Z", "+00:00")))
    assert len(shown) == 20 and shown == [i.document_id for i in expected]
    assert {i.reason for i in expected} >= {"least_confident", "random"}
    doc = shown[0]
    row = page.locator(f'#queue tr[data-doc="{doc}"]')
    new = next(lab for lab in SENTIMENT_LABELS if lab != row.locator("select[name=label]").input_value())
    row.locator("select[name=label]").select_option(new)
    row.locator("button").click()
    page.wait_for_url("**/label-queue?*saved=*")
    assert "Label saved" in page.locator("main").inner_text()
    assert page.locator(f'#queue tr[data-doc="{doc}"]').count() == 0  # labelled: no longer worth a minute
    with store.session_scope(engine) as session:
        fb = session.scalars(select(s.Feedback).where(s.Feedback.document_id == doc)).all()
        assert [(f.label, f.author) for f in fb] == [(new, "web")]
    engine.dispose()


def test_long_company_range_is_drawn_in_coarser_buckets(demo: Demo) -> None:
    """A 30-day range is drawn in 3-hour buckets (240 bars, not 720), and they hold the same items as the
    week's hourly bars; a bar leads to its hours."""
    week = httpx.get(f"{demo.base}/company/NWB").text
    end = re.search(r'name="end" value="([^"]+)"', week)
    assert end is not None
    last = datetime.fromisoformat(end[1].replace("Z", "+00:00"))
    stop = last.replace(hour=0) + timedelta(days=1)  # whole days: exactly 240 three-hour buckets
    span = {"start": f"{stop - timedelta(days=30):%Y-%m-%dT%H:%MZ}", "end": f"{stop:%Y-%m-%dT%H:%MZ}"}
    month = httpx.get(f"{demo.base}/company/NWB", params=span).text
    assert 'data-step-hours="3"' in month and 'data-step-hours="1"' in week
    assert month.count('class="bar') == 240 and week.count('class="bar') == 7 * 24

    def total(html: str) -> int:
        return sum(int(x) for x in re.findall(r'data-total="(\d+)"', html))

    assert total(month) == total(week) > 0
    assert re.search(r'<a href="/company/NWB\?start=[^"&]+&amp;end=[^"]+"><rect', month)


def test_post_without_csrf_token_is_refused(demo: Demo) -> None:
    r = httpx.post(f"{demo.base}/documents/{demo.xss_doc}/label", data={"label": "positive"})
    assert r.status_code == 403
    with httpx.Client(base_url=demo.base) as c:
        c.get("/documents")  # sets the CSRF cookie
        token = c.cookies["finsent_csrf"]
        cross = c.post(
            f"/documents/{demo.xss_doc}/label",
            data={"label": "positive", "csrf": token},
            headers={"Origin": "http://evil.example"},
        )
        assert cross.status_code == 403


def test_ack_url_needs_the_exact_alert_id(demo: Demo) -> None:
    with httpx.Client(base_url=demo.base) as c:
        c.get("/alerts")
        r = c.post(f"/alerts/{demo.nwb_alert[:8]}/ack", data={"csrf": c.cookies["finsent_csrf"], "by": "x"})
    assert r.status_code == 404
    assert _ack_state(demo.url, demo.nwb_alert) == (None, None)


def test_bad_query_values_give_clear_errors(demo: Demo) -> None:
    r = httpx.get(f"{demo.base}/company/NWB?start=yesterday")
    assert r.status_code == 400 and "start=&#39;yesterday&#39;" in r.text
    assert httpx.get(f"{demo.base}/company/NOPE").status_code == 404
    assert httpx.get(f"{demo.base}/alerts/nope").status_code == 404


def test_alert_filters_offer_every_kind_and_scope_the_database_holds(demo: Demo) -> None:
    """The alerts page filters by the kinds and scopes of pipeline.records, operational ones included: a
    source-health or model-drift alert can be listed on its own (before, `scope_kind=health` was dropped as
    unknown and every alert was listed)."""
    engine = store.make_engine(demo.url)
    when = datetime(2026, 1, 1, tzinfo=UTC)
    ops = {
        "ops-health": (AlertKind.SOURCE_HEALTH, OpsScope.HEALTH),
        "ops-model": (AlertKind.MODEL_HEALTH, OpsScope.MODEL),
    }
    try:
        with store.session_scope(engine) as session:
            for aid, (kind, scope) in ops.items():
                session.add(
                    s.Alert(
                        id=aid, kind=kind, scope_kind=scope, scope_value="newswire", window_start=when,
                        window_end=when, severity="warning", neg_count=0, total_count=0, neg_share=0.0,
                        baseline_share=0.0, baseline_neg_rate=0.0, statistic=0.0, details={},
                    )
                )  # fmt: skip
        health = httpx.get(f"{demo.base}/alerts", params={"scope_kind": "health"}).text
        model = httpx.get(f"{demo.base}/alerts", params={"kind": "model_health"}).text
        page = httpx.get(f"{demo.base}/alerts").text
    finally:
        with store.session_scope(engine) as session:
            session.execute(delete(s.Alert).where(s.Alert.id.in_(list(ops))))
        engine.dispose()
    listed = re.compile(r'href="/alerts/([0-9a-z-]+)"')
    assert set(listed.findall(health)) == {"ops-health"}
    assert set(listed.findall(model)) == {"ops-model"}
    options = set(re.findall(r"<option[^>]*>([a-z_]+)</option>", page))
    assert {*AlertKind, *ALERT_SCOPES} <= options


def test_non_loopback_without_access_control_refuses_to_start() -> None:
    r = finsent("serve", "--host", "0.0.0.0", "--database-url", "sqlite:///nowhere.db", timeout=30)
    assert r.returncode == 2
    assert "refusing to serve on 0.0.0.0" in r.stderr and "FINSENT_WEB_TOKEN" in r.stderr
    assert "Traceback" not in r.stderr


def test_access_token_is_required_when_set(demo: Demo) -> None:
    with serving(demo.url, _env(FINSENT_WEB_TOKEN="s3cret-token")) as base:
        assert httpx.get(base + "/alerts").status_code == 401
        assert httpx.get(base + "/alerts", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + "/alerts", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        with httpx.Client(base_url=base) as c:  # the sign-in form sets an HttpOnly cookie
            c.get("/login")
            r = c.post("/login", data={"token": "s3cret-token", "csrf": c.cookies["finsent_csrf"]})
            assert r.status_code == 303
            assert c.get("/alerts").status_code == 200


def test_slack_button_and_ack_links_use_the_configured_secrets(demo: Demo, tmp_path: Path) -> None:
    """`serve` reads the secrets from the env vars the config names (as the notifier does); the Slack button's
    POST /slack/actions needs no sign-in (Slack's signature stands in) while other pages still do."""
    cfg = tmp_path / "finsent.yaml"
    cfg.write_text("links:\n  ack_secret_env: DESK_ACK_SECRET\n  slack_signing_secret_env: DESK_SLACK_SIGNING\n")
    env = _env(FINSENT_WEB_TOKEN="s3cret-token", DESK_ACK_SECRET="desk-ack", DESK_SLACK_SIGNING="desk-slack")
    env.pop("FINSENT_ACK_SECRET")
    engine = store.make_engine(demo.url)
    with store.session_scope(engine) as session:  # an alert no other test acknowledges
        aid = session.scalars(
            select(s.Alert.id).where(s.Alert.id.not_in([demo.nwb_alert, demo.other_alert, demo.market_alert]))
        ).first()
    engine.dispose()
    assert aid is not None
    payload = {"user": {"username": "carol"}, "actions": [{"action_id": ACK_ACTION_ID, "value": aid}]}
    body = urlencode({"payload": json.dumps(payload)}).encode()
    ts = str(int(time.time()))

    def signed(secret: str) -> dict[str, str]:
        sig = hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
        return {
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": f"v0={sig}",
            "Content-Type": "application/x-www-form-urlencoded",
        }

    with serving(demo.url, env, "--config", str(cfg)) as base:
        assert httpx.get(base + "/alerts").status_code == 401  # still behind the token
        link = f"{base}/ack/{acks.ack_token_for(aid, 'desk-ack', datetime.now(UTC))}"
        assert "Acknowledge this alert?" in httpx.get(link).text
        forged = httpx.post(base + "/slack/actions", content=body, headers=signed("another-secret"))
        assert forged.status_code == 401 and _ack_state(demo.url, aid) == (None, None)
        r = httpx.post(base + "/slack/actions", content=body, headers=signed("desk-slack"))
        assert r.status_code == 200 and r.json()["text"].startswith("Acknowledged alert"), r.text
    assert _ack_state(demo.url, aid)[1] == "slack:carol"


@pytest.mark.skipif(
    not os.environ.get("FINSENT_WEB_SCREENSHOTS"), reason="set FINSENT_WEB_SCREENSHOTS=docs to write screenshots"
)
def test_screenshots(demo: Demo, page: Any) -> None:
    out = ROOT / os.environ["FINSENT_WEB_SCREENSHOTS"]
    for name, path in (
        ("web-overview", "/"),
        ("web-company", "/company/NWB"),
        ("web-alert", f"/alerts/{demo.nwb_alert}"),
        ("web-label-queue", "/label-queue"),
    ):
        page.goto(demo.base + path)
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)
        assert (out / f"{name}.png").stat().st_size > 10_000


def test_web_connections_plan_each_query_for_its_filters(pg_url: str) -> None:
    """On Postgres the app's connections plan every statement for its own parameters: psycopg prepares a
    statement after five runs and Postgres may then keep one generic plan, 2-5x slower for a selective company
    filter or the label queue's margin walk."""
    from sqlalchemy import text

    from pipeline import store
    from pipeline.web.app import create_app

    engine = store.make_engine(pg_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as c:
            assert c.scalar(text("SHOW plan_cache_mode")) == "auto"
        create_app(engine)
        create_app(engine)  # a second app on the same engine adds nothing twice
        with engine.connect() as c:
            assert c.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
            c.rollback()  # a request that failed: the setting outlives its transaction
        with engine.connect() as c:
            assert c.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
    finally:
        engine.dispose()
