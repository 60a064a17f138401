"""The finsent web app (Starlette + Jinja, server-rendered, no JavaScript): overview, company pages,
alerts with acknowledgement, document search with label correction. Read pipeline.web.security first.

create_app only assembles: handlers live in pipeline.web.routes (one module per area) and reach the engine,
access settings, clock and templates through pipeline.web.context.web(request)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from pipeline import acks
from pipeline.web.context import HERE, Web, web
from pipeline.web.routes import alerts, auth, documents, pages
from pipeline.web.security import CSRF_COOKIE, Access, allowed, new_csrf

log = logging.getLogger(__name__)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # /ack/<token> URLs must not leak to linked article sites
}


async def errors(request: Request, exc: Exception) -> Response:
    """Every error as a page (the detail escaped by the template); unexpected ones logged with a traceback."""
    code = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error (see the server log)"
    if not isinstance(exc, HTTPException):
        log.exception("web request %s failed", request.url.path)
    if not hasattr(request.state, "csrf"):
        request.state.csrf = request.cookies.get(CSRF_COOKIE) or new_csrf()
    return web(request).render(request, "error.html", status=code, code=code, detail=detail)


async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Access control, the CSRF cookie and security headers on every response."""
    access = web(request).access
    cookie = request.cookies.get(CSRF_COOKIE)
    request.state.csrf = cookie or new_csrf()
    if not allowed(request, access):
        if access.token and request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            response: Response = RedirectResponse("/login", status_code=303)
        else:
            response = HTMLResponse("authentication required", status_code=401)
    else:
        response = await call_next(request)
    if not cookie:
        response.set_cookie(
            CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    return response


def _custom_plans(dbapi_conn: Any, _record: Any) -> None:
    """Pages run the same statements with different filters; after five runs psycopg prepares them and Postgres
    may switch to one generic plan, which is 2-5x slower for a selective company or margin filter."""
    with dbapi_conn.cursor() as cur:
        cur.execute("SET plan_cache_mode = force_custom_plan")
    dbapi_conn.commit()  # a SET inside a transaction that rolls back (a failed request) would be undone


def create_app(engine: Engine, access: Access | None = None, clock: Callable[[], datetime] | None = None) -> Starlette:
    if engine.dialect.name == "postgresql" and not event.contains(engine, "connect", _custom_plans):
        event.listen(engine, "connect", _custom_plans)
        engine.dispose()  # connections opened before (e.g. the schema check) reconnect with the setting
    routes = [
        *pages.ROUTES,
        *alerts.ROUTES,
        *documents.ROUTES,
        *auth.ROUTES,
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)],
        exception_handlers={HTTPException: errors, Exception: errors},
    )
    app.state.web = Web.build(engine, access, clock)
    return app


def ack_link_for(
    base_url: str, alert_id: str, secret: str, created_at: datetime, ttl: timedelta = timedelta(days=7)
) -> str:
    """The URL an alert message links to for one-click (confirmed) acknowledgement."""
    return f"{base_url.rstrip('/')}/ack/{acks.ack_token_for(alert_id, secret, created_at, ttl)}"
