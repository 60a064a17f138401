"""Real notification receivers on 127.0.0.1, shared by the delivery tests (a pytest plugin, listed in
conftest's `pytest_plugins`): a Slack-style webhook (`slack_webhook`), aiosmtpd with STARTTLS + AUTH
(`starttls_smtp`) and an SMTP server that refuses mail until told otherwise (`failing_smtp`).

Named apart from airflow_support's `webhook` and `smtp_server`, which are different receivers."""

from __future__ import annotations

import email
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class Webhook:
    """A Slack-style incoming webhook: records accepted JSON posts; `status` switches to 500; `delay` slows it."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.hits = 0
        self.status = 200
        self.delay = 0.0
        self.hold: threading.Event | None = None  # when set: each post waits (max 30 s) until the event is set
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hook.lock:
                    hook.hits += 1
                if hook.hold is not None:
                    hook.hold.wait(30)
                time.sleep(hook.delay)
                if hook.status != 200:
                    self.send_response(hook.status)
                    self.end_headers()
                    self.wfile.write(b"internal_error")
                    return
                with hook.lock:
                    hook.posts.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/services/T000/B000/s3cretT0ken"
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.server.RequestHandlerClass)
            self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread = None


@pytest.fixture
def slack_webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Webhook]:
    hook = Webhook()
    hook.server.server_close()  # start() rebinds the same port, so "down" and "up again" are both real
    hook.start()
    monkeypatch.setenv("TEST_SLACK_URL", hook.url)
    yield hook
    hook.stop()


def make_cert(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


@pytest.fixture
def starttls_smtp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Mailbox, int]]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    cert, key = make_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    box = Mailbox()

    def authenticator(server, session, envelope, mechanism, auth_data):
        box.logins.append((auth_data.login.decode(), auth_data.password.decode()))
        ok = auth_data.login == b"alerts" and auth_data.password == b"smtp-pa55word"
        return AuthResult(success=ok, handled=False)

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctl = Controller(
        box,
        hostname="127.0.0.1",
        port=port,
        tls_context=ctx,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=authenticator,
    )
    ctl.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client verifies the server against this CA
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "smtp-pa55word")
    yield box, port
    ctl.stop()


class FailingMailbox:
    """An SMTP server that answers every message with a temporary failure (451) until `accept` is set."""

    def __init__(self) -> None:
        self.accept = False
        self.refused = 0
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if not self.accept:
            self.refused += 1
            return "451 4.3.0 mail system temporarily unavailable"
        self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


@pytest.fixture
def failing_smtp() -> Iterator[tuple[FailingMailbox, int]]:
    from aiosmtpd.controller import Controller

    box = FailingMailbox()
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctl = Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    yield box, port
    ctl.stop()
