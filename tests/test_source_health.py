"""Source health (issue #9.7): a dead source (connection refused) and a quiet one raise one alert each
through the sinks, and a resolution when they recover. Real feeds and a real webhook on 127.0.0.1, real
Postgres; cycles run ingest then the notify step with an advancing clock."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from pipeline import cycle, store
from pipeline.config import FinsentConfig, HealthConfig
from pipeline.health import quiet_threshold
from pipeline.store import schema as s
from pipeline.store import session_scope
from tests.airflow_support import rss, window_items
from tests.notify_receivers import Webhook

NOW = datetime(2026, 11, 20, 15, 5, tzinfo=UTC)


class Revivable:
    """A port that refuses connections until `start()` serves an RSS feed on it."""

    def __init__(self, body: bytes) -> None:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        self.body = body
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/feed.xml"

    def start(self) -> None:
        body = self.body

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/rss+xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def dead_source() -> Iterator[Revivable]:
    src = Revivable(rss("dead", window_items("dead", NOW - timedelta(hours=1), 3)))
    yield src
    src.stop()


def make_cfg(sources: dict[str, str], **health) -> FinsentConfig:
    return FinsentConfig.model_validate(
        {
            "sources": [
                {"name": n, "url": u, "retries": 0, "timeout_s": 5, "allow_private_network": True}
                for n, u in sources.items()
            ],
            "sinks": [{"name": "slack-desk", "kind": "slack", "webhook_url_env": "TEST_SLACK_URL", "timeout_s": 5}],
            "health": health,
            "database_url": "sqlite://",
        }
    )


def health_alerts(engine) -> list[tuple[str, str, str]]:
    with session_scope(engine) as session:
        rows = session.scalars(
            select(s.Alert).where(s.Alert.scope_kind == "health").order_by(s.Alert.created_at, s.Alert.kind.desc())
        )
        return [(a.kind, a.scope_value, (a.details or {}).get("condition")) for a in rows]


def test_a_dead_source_raises_one_alert_then_a_resolution(
    engine,
    slack_webhook: Webhook,
    feed_server,
    dead_source: Revivable,
) -> None:
    good = feed_server.put("good.xml", rss("good", window_items("good", NOW - timedelta(hours=1), 3)))
    cfg = make_cfg({"good": good, "dead": dead_source.url}, max_failures=3)
    posts_after = []
    for k in range(6):
        assert {o.source: o.status for o in cycle.ingest_all(cfg, engine)}["dead"] == "failed"
        report = cycle.deliver_alerts(cfg, engine, now=NOW + k * timedelta(minutes=15))
        assert report.failed == 0 and report.expired == 0
        posts_after.append(len(slack_webhook.posts))
    assert posts_after == [0, 0, 1, 1, 1, 1], posts_after  # the third consecutive failure, and only once
    alert = json.dumps(slack_webhook.posts[0])
    assert "finsent source dead is failing" in alert and "failed its last 3 fetches" in alert
    assert "refused" in alert.lower()
    assert health_alerts(engine) == [("source_health", "dead", "dead")]

    dead_source.start()
    for k in range(6, 9):
        assert {o.source: o.status for o in cycle.ingest_all(cfg, engine)}["dead"] == "ok"
        cycle.deliver_alerts(cfg, engine, now=NOW + k * timedelta(minutes=15))
    assert len(slack_webhook.posts) == 2, [p["text"] for p in slack_webhook.posts]
    assert "[RESOLVED] finsent source dead is healthy again" in json.dumps(slack_webhook.posts[1])
    assert health_alerts(engine) == [("source_health", "dead", "dead"), ("resolved", "dead", "dead")]
    with session_scope(engine) as session:
        assert {d.status for d in session.scalars(select(s.AlertDelivery))} == {"sent"}


def _history(engine, name: str, new_at: list[datetime], empty_at: list[datetime]) -> None:
    with session_scope(engine) as session:
        store.ensure_sources(session, make_cfg({name: "http://127.0.0.1:9/q.xml"}).sources)
        for t in new_at:
            session.add(s.SourceFetch(source_name=name, fetched_at=t, status="ok", entries_seen=5, entries_new=2))
        for t in empty_at:
            session.add(
                s.SourceFetch(source_name=name, fetched_at=t, status="not_modified", entries_seen=5, entries_new=0)
            )


def test_a_quiet_source_past_its_usual_gap_raises_one_alert(engine, slack_webhook: Webhook) -> None:
    """Hourly news for a day, then fetches that bring nothing: quiet once 4 x 1 h (its learned gap) has
    passed, not before; one alert over several cycles; resolved when something new arrives."""
    last_new = NOW - timedelta(hours=6)
    _history(
        engine,
        "wire",
        [last_new - timedelta(hours=h) for h in range(24)],
        [last_new + timedelta(minutes=15 * i) for i in range(1, 40)],
    )
    cfg = make_cfg({"wire": "http://127.0.0.1:9/q.xml"}, quiet_floor_hours=2)
    cycle.deliver_alerts(cfg, engine, now=last_new + timedelta(hours=3, minutes=55))
    assert slack_webhook.posts == [] and health_alerts(engine) == []
    for minutes in (5, 20, 35):
        cycle.deliver_alerts(cfg, engine, now=last_new + timedelta(hours=4, minutes=minutes))
    assert len(slack_webhook.posts) == 1 and health_alerts(engine) == [("source_health", "wire", "quiet")]
    assert "has brought nothing new for 4 h" in json.dumps(slack_webhook.posts[0])

    _history(engine, "wire", [last_new + timedelta(hours=4, minutes=40)], [])
    cycle.deliver_alerts(cfg, engine, now=last_new + timedelta(hours=4, minutes=50))
    assert len(slack_webhook.posts) == 2 and "healthy again" in json.dumps(slack_webhook.posts[1])
    assert health_alerts(engine)[-1] == ("resolved", "wire", "quiet")


def test_quiet_threshold_is_learned_with_a_floor() -> None:
    hc = HealthConfig(quiet_factor=4, quiet_floor_hours=6, quiet_unlearned_hours=48, min_history=5)
    hourly = [NOW - timedelta(hours=h) for h in range(10)]
    daily = [NOW - timedelta(days=d) for d in range(10)]
    assert quiet_threshold(hourly, hc) == timedelta(hours=6)  # 4 x 1 h is under the floor
    assert quiet_threshold(daily, hc) == timedelta(days=4)
    assert quiet_threshold(daily[:3], hc) == timedelta(hours=48)  # not enough history yet
