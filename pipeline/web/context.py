"""What every handler needs, built once by create_app: the engine, access settings, clock and templates
(`Web`, reached as `web(request)`: the one way a handler gets them), and the form/query-string parsers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from pipeline.store import session_scope
from pipeline.web import charts
from pipeline.web.security import CSRF_FIELD, Access, csrf_ok, user_of

HERE = Path(__file__).resolve().parent
MAX_FORM_FIELD = 2000


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True), auto_reload=False
    )
    env.globals.update(sparkline=charts.sparkline, pct=lambda x: "n/a" if x is None else f"{100 * x:.0f}%")
    env.filters["hour"] = lambda t: "" if t is None else t.strftime("%Y-%m-%d %H:%M")
    env.filters["iso"] = lambda t: "" if t is None else t.strftime("%Y-%m-%dT%H:%MZ")
    return Jinja2Templates(env=env)


@dataclass(frozen=True)
class Web:
    engine: Engine
    access: Access
    clock: Callable[[], datetime]
    templates: Jinja2Templates

    @classmethod
    def build(cls, engine: Engine, access: Access | None, clock: Callable[[], datetime] | None) -> Web:
        return cls(engine, access or Access(), clock or (lambda: datetime.now(UTC)), _templates())

    def now(self) -> datetime:
        return self.clock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.engine) as session:
            yield session

    def render(self, request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        ctx.update(
            csrf=request.state.csrf, csrf_field=CSRF_FIELD, user=user_of(request, self.access), path=request.url.path
        )
        return self.templates.TemplateResponse(request, name, ctx, status_code=status)

    def need_csrf(self, request: Request, form: FormData) -> None:
        if not csrf_ok(request, field(form, CSRF_FIELD)):
            raise HTTPException(403, "form expired or sent from another site: reload the page and try again")

    def who(self, request: Request, form: FormData, default: str) -> str:
        """The proxy's user, else the form's `by`, else `default` ("web", "email link")."""
        return user_of(request, self.access) or field(form, "by")[:100] or default


def web(request: Request) -> Web:
    return request.app.state.web


def parse_time(value: str | None, name: str) -> datetime | None:
    """An ISO date or time from a query string (UTC unless it says otherwise); 400 on nonsense."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(400, f"{name}={value[:40]!r}: expected a date or time such as 2026-11-20T14:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_int(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    """A bounded integer from a query string; 400 outside [lo, hi]."""
    if not value:
        return default
    if not value.strip().isdigit() or not lo <= int(value) <= hi:
        raise HTTPException(400, f"{name}={value[:20]!r}: expected a whole number from {lo} to {hi}")
    return int(value)


def field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value[:MAX_FORM_FIELD].strip() if isinstance(value, str) else ""


def choice(value: str | None, allowed_values: tuple[str, ...]) -> str:
    return value if value in allowed_values else ""
