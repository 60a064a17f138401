"""Overview and company pages (read-only)."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipeline.web import charts, queries
from pipeline.web.context import parse_time, web


def overview(request: Request) -> Response:
    w = web(request)
    with w.session() as session:
        data = queries.overview(session, w.now())
    return w.render(request, "overview.html", data=data)


def company(request: Request) -> Response:
    w = web(request)
    ticker = request.path_params["ticker"]
    qp = request.query_params
    start, end = parse_time(qp.get("start"), "start"), parse_time(qp.get("end"), "end")
    hour = parse_time(qp.get("hour"), "hour")
    with w.session() as session:
        page = queries.company_page(session, ticker, w.now(), start, end, hour)
    if page is None:
        raise HTTPException(404, f"no company {ticker[:40]!r} on the watchlist or in the documents")
    base = f"/company/{ticker}?"
    span = {"start": _iso(page.start), "end": _iso(page.end)}
    markers = [
        (
            queries.floor_hour(a.window_end - queries.HOUR),
            a.severity,
            f"{a.kind} {a.severity}: {a.neg_count}/{a.total_count} negative",
            f"/alerts/{a.id}",
        )
        for a in page.alerts
    ]

    def link(p: queries.HourPoint) -> str:
        """An hour's headlines; a coarse bucket zooms in to its hours."""
        if page.step == queries.HOUR:
            return base + urlencode({**span, "hour": _iso(p.start)})
        return base + urlencode({"start": _iso(p.start), "end": _iso(p.start + page.step)})

    chart = charts.hourly_chart(page.series, markers, page.hour, link, page.step)
    return w.render(request, "company.html", page=page, chart=chart)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%MZ")


ROUTES = [Route("/", overview), Route("/company/{ticker}", company)]
