"""The finsent web app (Starlette + Jinja, server-rendered, no JavaScript): overview, company pages,
alerts with acknowledgement, document search with label correction. Read pipeline.web.security first."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from pipeline import acks
from pipeline.data import SENTIMENT_LABELS
from pipeline.feedback import add_feedback
from pipeline.messages import view_of
from pipeline.slack_actions import MAX_BODY as SLACK_MAX_BODY
from pipeline.slack_actions import handle_slack_action
from pipeline.store import schema as s
from pipeline.store import session_scope
from pipeline.web import charts, queries
from pipeline.web.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SLACK_ACTIONS_PATH,
    TOKEN_COOKIE,
    Access,
    allowed,
    csrf_ok,
    new_csrf,
    token_ok,
    user_of,
)

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MAX_FORM_FIELD = 2000
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # /ack/<token> URLs must not leak to linked article sites
}
ALERT_KINDS = ("spike", "escalated", "resolved")
SEVERITIES = ("info", "warning", "critical")
SCOPE_KINDS = ("market", "entity", "source", "topic")


def _parse_time(value: str | None, name: str) -> datetime | None:
    """An ISO date or time from a query string (UTC unless it says otherwise); 400 on nonsense."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(400, f"{name}={value[:40]!r}: expected a date or time such as 2026-11-20T14:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value[:MAX_FORM_FIELD].strip() if isinstance(value, str) else ""


def _choice(value: str | None, allowed_values: tuple[str, ...]) -> str:
    return value if value in allowed_values else ""


def create_app(engine: Engine, access: Access | None = None, clock: Callable[[], datetime] | None = None) -> Starlette:
    access = access or Access()
    now = clock or (lambda: datetime.now(UTC))
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True), auto_reload=False
    )
    templates = Jinja2Templates(env=env)
    env.globals.update(sparkline=charts.sparkline, pct=lambda x: "n/a" if x is None else f"{100 * x:.0f}%")
    env.filters["hour"] = lambda t: "" if t is None else t.strftime("%Y-%m-%d %H:%M")
    env.filters["iso"] = lambda t: "" if t is None else t.strftime("%Y-%m-%dT%H:%MZ")

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        ctx.update(csrf=request.state.csrf, csrf_field=CSRF_FIELD, user=user_of(request, access), path=request.url.path)
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def need_csrf(request: Request, form: FormData) -> None:
        if not csrf_ok(request, _field(form, CSRF_FIELD)):
            raise HTTPException(403, "form expired or sent from another site: reload the page and try again")

    def who(request: Request, form: FormData, default: str) -> str:
        return user_of(request, access) or _field(form, "by")[:100] or default

    # --- pages ---------------------------------------------------------------------------------

    def overview(request: Request) -> Response:
        with session_scope(engine) as session:
            data = queries.overview(session, now())
        return render(request, "overview.html", data=data)

    def company(request: Request) -> Response:
        ticker = request.path_params["ticker"]
        qp = request.query_params
        start, end = _parse_time(qp.get("start"), "start"), _parse_time(qp.get("end"), "end")
        hour = _parse_time(qp.get("hour"), "hour")
        with session_scope(engine) as session:
            page = queries.company_page(session, ticker, now(), start, end, hour)
        if page is None:
            raise HTTPException(404, f"no company {ticker[:40]!r} on the watchlist or in the documents")
        base = (
            f"/company/{ticker}?"
            + urlencode({"start": page.start.strftime("%Y-%m-%dT%H:%MZ"), "end": page.end.strftime("%Y-%m-%dT%H:%MZ")})
            + "&hour="
        )
        markers = [
            (
                queries.floor_hour(a.window_end - queries.HOUR),
                a.severity,
                f"{a.kind} {a.severity}: {a.neg_count}/{a.total_count} negative",
                f"/alerts/{a.id}",
            )
            for a in page.alerts
        ]
        chart = charts.hourly_chart(page.series, markers, page.hour, base)
        return render(request, "company.html", page=page, chart=chart)

    def alert_list(request: Request) -> Response:
        qp = request.query_params
        status = qp.get("status", "all")
        f = queries.AlertFilters(
            status=status if status in queries.ALERT_STATUSES else "all",
            kind=_choice(qp.get("kind"), ALERT_KINDS),
            severity=_choice(qp.get("severity"), SEVERITIES),
            scope_kind=_choice(qp.get("scope_kind"), SCOPE_KINDS),
            scope_value=(qp.get("scope_value") or "")[:200],
        )
        with session_scope(engine) as session:
            rows = queries.alert_list(session, f)
            names = queries.company_names(session)
        items = [(a, queries.scope_title(a.scope_kind, a.scope_value, names)) for a in rows]
        return render(
            request,
            "alerts.html",
            items=items,
            f=f,
            statuses=queries.ALERT_STATUSES,
            kinds=ALERT_KINDS,
            severities=SEVERITIES,
            scope_kinds=SCOPE_KINDS,
        )

    def _alert(session: Any, alert_id: str) -> s.Alert:
        row = session.get(s.Alert, alert_id[:64])
        if row is None:
            raise HTTPException(404, f"no alert with id {alert_id[:64]!r}")
        return row

    def alert_detail(request: Request) -> Response:
        with session_scope(engine) as session:
            row = _alert(session, request.path_params["alert_id"])
            names = queries.company_names(session)
            view = view_of(row)
            deliveries = session.scalars(
                select(s.AlertDelivery).where(s.AlertDelivery.alert_id == row.id).order_by(s.AlertDelivery.sink)
            ).all()
        title = queries.scope_title(row.scope_kind, row.scope_value, names)
        return render(
            request,
            "alert.html",
            a=row,
            view=view,
            title=title,
            deliveries=deliveries,
            acked=request.query_params.get("acked"),
        )

    async def alert_ack(request: Request) -> Response:
        form = await request.form()
        need_csrf(request, form)
        alert_id = request.path_params["alert_id"]
        with session_scope(engine) as session:
            _alert(session, alert_id)  # the exact id: acknowledge() also accepts prefixes, a URL must not
        try:
            acks.acknowledge(engine, alert_id, by=who(request, form, "web"))
        except acks.AckError as e:
            raise HTTPException(404, str(e)) from None
        return RedirectResponse(f"/alerts/{alert_id}?acked=1", status_code=303)

    def _token_alert(token: str) -> str:
        if not access.ack_secret:
            raise HTTPException(
                503, f"acknowledgement links are not configured on this server ({access.ack_secret_env} is not set)"
            )
        try:
            return acks.verify_ack_token(token, access.ack_secret, now())
        except acks.AckError as e:
            raise HTTPException(400, str(e)) from None

    def ack_link(request: Request) -> Response:
        alert_id = _token_alert(request.path_params["token"])
        with session_scope(engine) as session:
            row = _alert(session, alert_id)
            names = queries.company_names(session)
        return render(
            request,
            "ack_confirm.html",
            a=row,
            title=queries.scope_title(row.scope_kind, row.scope_value, names),
            token=request.path_params["token"],
        )

    async def ack_link_post(request: Request) -> Response:
        form = await request.form()
        need_csrf(request, form)
        alert_id = _token_alert(request.path_params["token"])
        try:
            result = acks.acknowledge(engine, alert_id, by=who(request, form, "email link"))
        except acks.AckError as e:
            raise HTTPException(404, str(e)) from None
        return render(request, "ack_done.html", result=result)

    async def slack_action(request: Request) -> Response:
        """Slack's "Acknowledge" button: the raw body (at most one byte over the cap is read) is what Slack
        signed, so it is verified as received; no sign-in or CSRF here (see pipeline.web.security)."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > SLACK_MAX_BODY:
                break
        result = await run_in_threadpool(
            handle_slack_action, bytes(body), request.headers, engine, access.slack_signing_secret or "", now()
        )
        return JSONResponse(result.body, status_code=result.status)

    def documents(request: Request) -> Response:
        qp = request.query_params
        f = queries.SearchFilters(
            q=(qp.get("q") or "")[:200],
            company=(qp.get("company") or "")[:32],
            source=(qp.get("source") or "")[:100],
            label=_choice(qp.get("label"), SENTIMENT_LABELS),
            start=_parse_time(qp.get("start"), "start"),
            end=_parse_time(qp.get("end"), "end"),
        )
        with session_scope(engine) as session:
            rows, since = queries.search_documents(session, f, now())
            opts = queries.choices(session)
        return render(
            request,
            "documents.html",
            rows=rows,
            since=since,
            f=f,
            opts=opts,
            labels=SENTIMENT_LABELS,
            saved=qp.get("saved"),
            back=str(request.url.query),
        )

    async def label_doc(request: Request) -> Response:
        form = await request.form()
        need_csrf(request, form)
        try:
            doc_id = int(request.path_params["doc_id"])
            fid = add_feedback(engine, doc_id, _field(form, "label") or None, author=who(request, form, "web"))
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        except LookupError as e:
            raise HTTPException(404, str(e)) from None
        back = _field(form, "back")
        return RedirectResponse(
            f"/documents?{back}&saved={fid}" if back else f"/documents?saved={fid}", status_code=303
        )

    def login(request: Request) -> Response:
        return render(request, "login.html", failed=False)

    async def login_post(request: Request) -> Response:
        form = await request.form()
        need_csrf(request, form)
        given = _field(form, "token")
        if not token_ok(given, access):
            return render(request, "login.html", status=401, failed=True)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            TOKEN_COOKIE,
            given,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            max_age=12 * 3600,
        )
        return resp

    async def errors(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error (see the server log)"
        if not isinstance(exc, HTTPException):
            log.exception("web request %s failed", request.url.path)
        if not hasattr(request.state, "csrf"):
            request.state.csrf = request.cookies.get(CSRF_COOKIE) or new_csrf()
        return render(request, "error.html", status=code, code=code, detail=detail)

    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
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

    routes = [
        Route("/", overview),
        Route("/company/{ticker}", company),
        Route("/alerts", alert_list),
        Route("/alerts/{alert_id}", alert_detail),
        Route("/alerts/{alert_id}/ack", alert_ack, methods=["POST"]),
        Route("/ack/{token}", ack_link),
        Route("/ack/{token}", ack_link_post, methods=["POST"]),
        Route(SLACK_ACTIONS_PATH, slack_action, methods=["POST"]),
        Route("/documents", documents),
        Route("/documents/{doc_id:int}/label", label_doc, methods=["POST"]),
        Route("/login", login),
        Route("/login", login_post, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)],
        exception_handlers={HTTPException: errors, Exception: errors},
    )


def ack_link_for(
    base_url: str, alert_id: str, secret: str, created_at: datetime, ttl: timedelta = timedelta(days=7)
) -> str:
    """The URL an alert message links to for one-click (confirmed) acknowledgement."""
    return f"{base_url.rstrip('/')}/ack/{acks.ack_token_for(alert_id, secret, created_at, ttl)}"
