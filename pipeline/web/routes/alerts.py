"""Alerts: list with filters, detail, acknowledge (form, signed e-mail link, Slack button)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from pipeline import acks
from pipeline.messages import view_of
from pipeline.records import ALERT_SCOPES, AlertKind, Severity
from pipeline.slack_actions import MAX_BODY as SLACK_MAX_BODY
from pipeline.slack_actions import handle_slack_action
from pipeline.store import schema as s
from pipeline.web import queries
from pipeline.web.context import Web, choice, web
from pipeline.web.security import SLACK_ACTIONS_PATH

ALERT_KINDS: tuple[str, ...] = tuple(AlertKind)
SEVERITIES: tuple[str, ...] = tuple(Severity)


def _alert(session: Session, alert_id: str) -> s.Alert:
    row = session.get(s.Alert, alert_id[:64])
    if row is None:
        raise HTTPException(404, f"no alert with id {alert_id[:64]!r}")
    return row


def alert_list(request: Request) -> Response:
    w = web(request)
    qp = request.query_params
    status = qp.get("status", "all")
    f = queries.AlertFilters(
        status=status if status in queries.ALERT_STATUSES else "all",
        kind=choice(qp.get("kind"), ALERT_KINDS),
        severity=choice(qp.get("severity"), SEVERITIES),
        scope_kind=choice(qp.get("scope_kind"), ALERT_SCOPES),
        scope_value=(qp.get("scope_value") or "")[:200],
    )
    with w.session() as session:
        rows = queries.alert_list(session, f)
        names = queries.company_names(session)
    items = [(a, queries.scope_title(a.scope_kind, a.scope_value, names)) for a in rows]
    return w.render(
        request,
        "alerts.html",
        items=items,
        f=f,
        statuses=queries.ALERT_STATUSES,
        kinds=ALERT_KINDS,
        severities=SEVERITIES,
        scope_kinds=ALERT_SCOPES,
    )


def alert_detail(request: Request) -> Response:
    w = web(request)
    with w.session() as session:
        row = _alert(session, request.path_params["alert_id"])
        names = queries.company_names(session)
        view = view_of(row)
        deliveries = session.scalars(
            select(s.AlertDelivery).where(s.AlertDelivery.alert_id == row.id).order_by(s.AlertDelivery.sink)
        ).all()
    title = queries.scope_title(row.scope_kind, row.scope_value, names)
    return w.render(
        request,
        "alert.html",
        a=row,
        view=view,
        title=title,
        deliveries=deliveries,
        acked=request.query_params.get("acked"),
    )


async def alert_ack(request: Request) -> Response:
    w = web(request)
    form = await request.form()
    w.need_csrf(request, form)
    alert_id = request.path_params["alert_id"]
    with w.session() as session:
        _alert(session, alert_id)  # the exact id: acknowledge() also accepts prefixes, a URL must not
    try:
        acks.acknowledge(w.engine, alert_id, by=w.who(request, form, "web"))
    except acks.AckError as e:
        raise HTTPException(404, str(e)) from None
    return RedirectResponse(f"/alerts/{alert_id}?acked=1", status_code=303)


def _token_alert(w: Web, token: str) -> str:
    if not w.access.ack_secret:
        raise HTTPException(
            503, f"acknowledgement links are not configured on this server ({w.access.ack_secret_env} is not set)"
        )
    try:
        return acks.verify_ack_token(token, w.access.ack_secret, w.now())
    except acks.AckError as e:
        raise HTTPException(400, str(e)) from None


def ack_link(request: Request) -> Response:
    w = web(request)
    alert_id = _token_alert(w, request.path_params["token"])
    with w.session() as session:
        row = _alert(session, alert_id)
        names = queries.company_names(session)
    return w.render(
        request,
        "ack_confirm.html",
        a=row,
        title=queries.scope_title(row.scope_kind, row.scope_value, names),
        token=request.path_params["token"],
    )


async def ack_link_post(request: Request) -> Response:
    w = web(request)
    form = await request.form()
    w.need_csrf(request, form)
    alert_id = _token_alert(w, request.path_params["token"])
    try:
        result = acks.acknowledge(w.engine, alert_id, by=w.who(request, form, "email link"))
    except acks.AckError as e:
        raise HTTPException(404, str(e)) from None
    return w.render(request, "ack_done.html", result=result)


async def slack_action(request: Request) -> Response:
    """Slack's "Acknowledge" button: the raw body (at most one byte over the cap is read) is what Slack
    signed, so it is verified as received; no sign-in or CSRF here (see pipeline.web.security)."""
    w = web(request)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > SLACK_MAX_BODY:
            break
    result = await run_in_threadpool(
        handle_slack_action, bytes(body), request.headers, w.engine, w.access.slack_signing_secret or "", w.now()
    )
    return JSONResponse(result.body, status_code=result.status)


ROUTES = [
    Route("/alerts", alert_list),
    Route("/alerts/{alert_id}", alert_detail),
    Route("/alerts/{alert_id}/ack", alert_ack, methods=["POST"]),
    Route("/ack/{token}", ack_link),
    Route("/ack/{token}", ack_link_post, methods=["POST"]),
    Route(SLACK_ACTIONS_PATH, slack_action, methods=["POST"]),
]
