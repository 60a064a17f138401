"""Shared Airflow test support: an isolated AIRFLOW_HOME, a metadata DB migrated once per test process,
the DAGs loaded once, loopback feeds, a Slack-style webhook receiver and a real SMTP server.

Import this module before anything imports airflow: Airflow reads AIRFLOW_HOME and its metadata DB
URL once, at import.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS_DIR = ROOT / "dags"
VENV_BIN = Path(sys.executable).parent

# One home per test process (pytest-xdist runs several): a fixed FINSENT_TEST_AIRFLOW_HOME gets a folder per worker.
AIRFLOW_HOME = (
    Path(os.environ["FINSENT_TEST_AIRFLOW_HOME"]) / os.environ.get("PYTEST_XDIST_WORKER", "main")
    if os.environ.get("FINSENT_TEST_AIRFLOW_HOME")
    else Path(tempfile.mkdtemp(prefix="finsent-airflow-"))
)
AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
}
if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(AIRFLOW_HOME):
    raise RuntimeError(
        "tests/airflow_support.py must be imported before airflow (Airflow reads AIRFLOW_HOME at import)"
    )
os.environ.update(AIRFLOW_ENV)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The SQLite metadata DB for dag.test(), migrated once per test process (about 3 s)."""
    marker = AIRFLOW_HOME / ".migrated"
    if not marker.exists():
        proc = subprocess.run(
            [str(VENV_BIN / "airflow"), "db", "migrate"],
            env={**os.environ, **AIRFLOW_ENV},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        marker.touch()
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def dagbag(airflow_db: Path):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_DIR))
    assert not bag.import_errors, bag.import_errors
    return bag


def fresh_dag(dag_id: str, retries: int | None = 0):
    """A freshly parsed DAG (tests may change retries on it without leaking into other tests)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_DIR))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    if retries is not None:
        for t in dag.tasks:
            t.retries = retries
    return dag


# --- feeds -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    guid: str
    title: str
    summary: str
    published: datetime


def rss(title: str, items: list[Item]) -> bytes:
    entries = "".join(
        f'<item><guid isPermaLink="false">{escape(i.guid)}</guid><title>{escape(i.title)}</title>'
        f"<link>https://news.example.com/{escape(i.guid)}</link><description>{escape(i.summary)}</description>"
        f"<pubDate>{format_datetime(i.published)}</pubDate></item>"
        for i in items
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
        f"<title>{escape(title)}</title><link>https://news.example.com/</link><description>test</description>{entries}</channel></rss>"
    ).encode()


WORDS = (
    "shares rally after strong quarterly earnings beat",
    "bank faces lawsuit over accounting irregularities",
    "regulator opens probe into trading desk losses",
    "company raises full-year guidance on demand",
    "analysts cut price target after weak outlook",
    "dividend unchanged as margins hold steady",
    "chief executive resigns amid fraud allegations",
    "record revenue driven by cloud growth",
)


def window_items(prefix: str, start: datetime, count: int, spacing: timedelta = timedelta(minutes=1)) -> list[Item]:
    """`count` deterministic items published from `start` on, one per `spacing`."""
    return [
        Item(
            guid=f"{prefix}-{start:%Y%m%d%H%M}-{i}",
            title=f"{prefix.title()} {WORDS[i % len(WORDS)]}",
            summary=f"{WORDS[(i * 3 + 1) % len(WORDS)]}; item {i} of {prefix} at {start:%H:%M}",
            published=start + i * spacing,
        )
        for i in range(count)
    ]


# --- sinks --------------------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """A Slack-compatible incoming-webhook endpoint on 127.0.0.1 that records every JSON body."""

    bodies: list[dict] = field(default_factory=list)
    status: int = 200
    _server: ThreadingHTTPServer | None = None

    def start(self) -> WebhookReceiver:
        recv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    recv.bodies.append(json.loads(raw or b"{}"))
                except json.JSONDecodeError:
                    recv.bodies.append({"raw": raw.decode("utf-8", "replace")})
                self.send_response(recv.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/services/T000/B000/test-secret-token"

    def texts(self) -> list[str]:
        return [json.dumps(b) for b in self.bodies]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    recv = WebhookReceiver().start()
    yield recv
    recv.stop()


@dataclass
class Mailbox:
    host: str
    port: int
    messages: list = field(default_factory=list)


@pytest.fixture
def smtp_server() -> Iterator[Mailbox]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps every message it accepts."""
    from aiosmtpd.controller import Controller

    box: Mailbox

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            from email import message_from_bytes
            from email.policy import default

            box.messages.append(message_from_bytes(envelope.content, policy=default))
            return "250 OK"

    with socket.socket() as probe:  # aiosmtpd checks its own port on start, so it cannot take port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    box = Mailbox("127.0.0.1", port)
    try:
        yield box
    finally:
        controller.stop()


# --- config -------------------------------------------------------------------------------------


def write_config(
    path: Path,
    feed_urls: dict[str, str],
    *,
    webhook_env: str | None = None,
    smtp: Mailbox | None = None,
    window_minutes: int = 15,
    baseline_days: float = 1.0,
    chunk_size: int = 4,
) -> Path:
    """A finsent YAML config for loopback feeds and sinks (the model path comes from FINSENT_MODEL)."""
    import yaml

    sinks: list[dict] = [{"name": "console", "kind": "console"}]
    if webhook_env:
        sinks.append(
            {
                "name": "ops-slack",
                "kind": "slack",
                "webhook_url_env": webhook_env,
                "severities": ["info", "warning", "critical"],
            }
        )
    if smtp:
        sinks.append(
            {
                "name": "ops-mail",
                "kind": "email",
                "smtp_host": smtp.host,
                "smtp_port": smtp.port,
                "smtp_starttls": False,
                "mail_from": "finsent@example.com",
                "mail_to": ["ops@example.com"],
                "severities": ["info", "warning", "critical"],
            }
        )
    cfg = {
        "sources": [
            {
                "name": n,
                "kind": "rss",
                "url": u,
                "retries": 0,
                "timeout_s": 5,
                "allow_private_network": True,
            }  # loopback feeds
            for n, u in feed_urls.items()
        ],
        "watchlist": [{"ticker": "NWB", "name": "Northwind Bank", "aliases": ["Northwind"]}],
        "model": {"batch_size": 16, "chunk_size": chunk_size, "device": "cpu"},
        "detect": {
            "window_minutes": window_minutes,
            "baseline_days": baseline_days,
            "min_volume": 5,
            "min_negative": 3,
        },
        "sinks": sinks,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
