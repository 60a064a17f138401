"""Capture the demo incident as the desk receives it: Slack (a webhook receiver on 127.0.0.1) and email
(aiosmtpd on 127.0.0.1), then render the email's HTML to PNG with headless Chromium.

    python docs/alerts/capture.py   # writes docs/alerts/{slack.json,email.eml,email.html,email*.png}

The demo week is ingested, scored with the bundled model and detected at the surge hour
(2026-11-20 15:00 UTC) in a throwaway SQLite file, exactly as `finsent demo` does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from aiosmtpd.controller import Controller

from pipeline import cycle, store
from pipeline.demo import demo_config
from pipeline.notify import deliver_pending

OUT = Path(__file__).resolve().parent
SPIKE_END = datetime(2026, 11, 20, 15, tzinfo=UTC)


def main() -> None:
    posts: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    mails: list[bytes] = []

    class Box:
        async def handle_DATA(self, server, session, envelope):
            mails.append(envelope.original_content or envelope.content)
            return "250 OK"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    smtp = Controller(Box(), hostname="127.0.0.1", port=port)
    smtp.start()
    os.environ["CAPTURE_SLACK_URL"] = f"http://127.0.0.1:{hook.server_address[1]}/services/T0/B0/x"
    os.environ["CAPTURE_ACK_SECRET"] = "capture-only-secret"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/capture.db"
        base = demo_config(url).model_dump(mode="json")
        base["database_url"] = url
        base["links"] = {
            "base_url": "https://finsent.example.com",
            "dashboard_url_template": "https://grafana.example.com/d/finsent?var-scope_kind={scope_kind}&var-scope_value={scope_value}&from={from_ms}&to={to_ms}",
            "ack_secret_env": "CAPTURE_ACK_SECRET",
        }
        base["sinks"] = [
            {"name": "slack-desk", "kind": "slack", "webhook_url_env": "CAPTURE_SLACK_URL"},
            {"name": "mail-desk", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_starttls": False,
             "mail_from": "finsent@example.com", "mail_to": ["risk-desk@example.com"]},
        ]  # fmt: skip
        cfg = type(demo_config(url)).model_validate(base)
        store.upgrade(url)
        engine = cycle.open_engine(cfg)
        cycle.ingest_all(cfg, engine)
        scorer = cycle.load_scorer(cfg, path=cfg.model.path)
        scored = cycle.score_pending(cfg, engine, scorer)
        cycle.detect_alerts(cfg, engine, SPIKE_END, scored.model_version, scorer=scorer)
        report = deliver_pending(engine, cfg, now=SPIKE_END + timedelta(minutes=2))
        engine.dispose()
    smtp.stop()
    hook.shutdown()
    assert report.sent == 2 and len(posts) == 1 and len(mails) == 1, (report, len(posts), len(mails))
    (OUT / "slack.json").write_text(json.dumps(posts[0], indent=2, ensure_ascii=False) + "\n")
    (OUT / "email.eml").write_bytes(mails[0])
    msg = message_from_bytes(mails[0], policy=policy.default)
    (OUT / "email.txt").write_text(msg.get_body(("plain",)).get_content())
    html = OUT / "email.html"
    html.write_text(msg.get_body(("html",)).get_content())
    for name, size, extra in (
        ("email.png", "800,1040", []),
        (
            "email-phone-dark.png",
            "390,1240",
            ["--force-dark-mode", "--enable-features=WebContentsForceDark:inversion_method/cielab_based"],
        ),
    ):
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
             *extra, f"--screenshot={OUT / name}", html.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    print(f"wrote {OUT}/slack.json, email.eml, email.txt, email.html, email.png, email-phone-dark.png")


if __name__ == "__main__":
    main()
