"""Who may use the web app, and how forms are protected.

- On a loopback address the app is open (it is the analyst's own laptop).
- Anywhere else `finsent serve` refuses to start unless one of these is configured:
  * FINSENT_WEB_TOKEN: every request needs `Authorization: Bearer <token>` or the HttpOnly cookie set by
    signing in at /login with the token;
  * FINSENT_WEB_AUTH_HEADER (e.g. X-Forwarded-User): a reverse proxy that authenticates users sets this
    header; requests without it are refused and its value is recorded as who acknowledged. The proxy must
    strip any copy of the header sent by clients.
- State-changing requests (POST) need a CSRF token: a random cookie (SameSite=Strict) echoed in a hidden
  form field (double submit), and an Origin header, when the browser sends one, that names this host.
- /ack/<token> links carry their own HMAC-signed token (pipeline.acks), so they work without signing in;
  GET only shows a confirmation page, so a mail scanner that follows links acknowledges nothing.
- /slack/actions (the Slack "Acknowledge" button) is open too: Slack's request signature, checked by
  pipeline.slack_actions, replaces sign-in and CSRF there.
- Both secrets are read from the env vars the config names (`links.ack_secret_env`,
  `links.slack_signing_secret_env`), the same ones the notifier signs with.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

from pipeline.config import LinksConfig
from pipeline.errors import UsageError

TOKEN_ENV = "FINSENT_WEB_TOKEN"
AUTH_HEADER_ENV = "FINSENT_WEB_AUTH_HEADER"
ACK_SECRET_ENV = LinksConfig().ack_secret_env  # the default name
TOKEN_COOKIE = "finsent_token"
CSRF_COOKIE = "finsent_csrf"
CSRF_FIELD = "csrf"
SLACK_ACTIONS_PATH = "/slack/actions"
OPEN_PATHS = ("/static/", "/login", "/ack/", SLACK_ACTIONS_PATH)


class AccessError(UsageError, ValueError):
    """The server would be reachable by others without any access control."""


@dataclass(frozen=True)
class Access:
    token: str | None = None
    auth_header: str | None = None
    ack_secret: str | None = None
    slack_signing_secret: str | None = None
    ack_secret_env: str = ACK_SECRET_ENV  # named in errors, so an operator knows which variable to set

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, links: LinksConfig | None = None) -> Access:
        """Access settings from the environment; secret variable names from the config's `links` (one source)."""
        e = os.environ if env is None else env
        links = links or LinksConfig()
        return cls(
            e.get(TOKEN_ENV) or None,
            e.get(AUTH_HEADER_ENV) or None,
            e.get(links.ack_secret_env) or None,
            e.get(links.slack_signing_secret_env) or None,
            links.ack_secret_env,
        )

    @property
    def protected(self) -> bool:
        return bool(self.token or self.auth_header)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, access: Access) -> None:
    """Refuse a non-loopback bind without a token or a trusted proxy header."""
    if not is_loopback(host) and not access.protected:
        raise AccessError(
            f"refusing to serve on {host}: other machines could read and acknowledge alerts; set {TOKEN_ENV} "
            f"(an access token) or {AUTH_HEADER_ENV} (the user header your authenticating reverse proxy sets), "
            "or bind to 127.0.0.1"
        )


def user_of(request: Request, access: Access) -> str | None:
    """Who is making the request: the proxy's user header, when one is trusted."""
    if access.auth_header:
        value = request.headers.get(access.auth_header, "").strip()
        return value[:100] or None
    return None


def allowed(request: Request, access: Access) -> bool:
    path = request.url.path
    if any(path.startswith(p) for p in OPEN_PATHS):
        return True
    if access.auth_header and not user_of(request, access):
        return False
    if access.token:
        given = request.cookies.get(TOKEN_COOKIE, "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), access.token.encode())
    return True


def token_ok(given: str, access: Access) -> bool:
    return bool(access.token) and hmac.compare_digest(given.encode(), (access.token or "").encode())


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(request: Request, form_value: str | None) -> bool:
    """Double submit: the form's hidden field equals the cookie; and a cross-site Origin is refused."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not form_value or not hmac.compare_digest(cookie.encode(), form_value.encode()):
        return False
    origin = request.headers.get("origin")
    if origin and origin != "null":
        return urlsplit(origin).netloc == request.headers.get("host", "")
    return True
