"""Signing in with the access token (FINSENT_WEB_TOKEN): sets an HttpOnly cookie; see pipeline.web.security."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from pipeline.web.context import field, web
from pipeline.web.security import TOKEN_COOKIE, token_ok

SESSION_SECONDS = 12 * 3600


def login(request: Request) -> Response:
    return web(request).render(request, "login.html", failed=False)


async def login_post(request: Request) -> Response:
    w = web(request)
    form = await request.form()
    w.need_csrf(request, form)
    given = field(form, "token")
    if not token_ok(given, w.access):
        return w.render(request, "login.html", status=401, failed=True)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(
        TOKEN_COOKIE,
        given,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=SESSION_SECONDS,
    )
    return resp


ROUTES = [Route("/login", login), Route("/login", login_post, methods=["POST"])]
