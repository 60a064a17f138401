"""Document search and the labelling queue, each with an analyst's label correction (the same `feedback`
rows as `finsent label`, written by pipeline.feedback.add_feedback)."""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from pipeline.data import SENTIMENT_LABELS
from pipeline.feedback import add_feedback
from pipeline.labelqueue import DEFAULT_DAYS, DEFAULT_LIMIT, label_queue
from pipeline.web import queries
from pipeline.web.context import choice, field, parse_int, parse_time, web

MAX_QUEUE_LIMIT = 200  # forms on one page
MAX_QUEUE_DAYS = 92  # bounded like the company chart


def documents(request: Request) -> Response:
    w = web(request)
    qp = request.query_params
    f = queries.SearchFilters(
        q=(qp.get("q") or "")[:200],
        company=(qp.get("company") or "")[:32],
        source=(qp.get("source") or "")[:100],
        label=choice(qp.get("label"), SENTIMENT_LABELS),
        start=parse_time(qp.get("start"), "start"),
        end=parse_time(qp.get("end"), "end"),
    )
    with w.session() as session:
        rows, since = queries.search_documents(session, f, w.now())
        opts = queries.choices(session)
    return w.render(
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


async def _save_label(request: Request) -> str:
    """One analyst correction from a form, through the library function `finsent label` uses; returns the
    query string of the page to go back to, naming the feedback row."""
    w = web(request)
    form = await request.form()
    w.need_csrf(request, form)
    try:
        doc_id = int(request.path_params["doc_id"])
        fid = add_feedback(w.engine, doc_id, field(form, "label") or None, author=w.who(request, form, "web"))
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    except LookupError as e:
        raise HTTPException(404, str(e)) from None
    back = field(form, "back")
    return f"{back}&saved={fid}" if back else f"saved={fid}"


async def label_doc(request: Request) -> Response:
    return RedirectResponse(f"/documents?{await _save_label(request)}", status_code=303)


def label_queue_page(request: Request) -> Response:
    """`finsent label queue` as a page: the same function, rule and defaults (pipeline.labelqueue), for the
    model the other pages show, over the last `days` of data (the newest document, as the other pages)."""
    w = web(request)
    qp = request.query_params
    limit = parse_int(qp.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_QUEUE_LIMIT)
    days = parse_int(qp.get("days"), "days", int(DEFAULT_DAYS), 1, MAX_QUEUE_DAYS)
    seed = parse_int(qp.get("seed"), "seed", 0, 0, 2**31 - 1)
    with w.session() as session:
        model = queries.current_model(session)
        as_of = queries.anchor_time(session, w.now())
    items = label_queue(w.engine, model, limit, days=days, seed=seed, now=as_of) if model else []
    return w.render(
        request,
        "label_queue.html",
        items=items,
        model=model,
        as_of=as_of,
        days=days,
        limit=limit,
        labels=SENTIMENT_LABELS,
        saved=qp.get("saved"),
        back=urlencode({"limit": limit, "days": days, "seed": seed}),
    )


async def label_from_queue(request: Request) -> Response:
    return RedirectResponse(f"/label-queue?{await _save_label(request)}", status_code=303)


ROUTES = [
    Route("/documents", documents),
    Route("/documents/{doc_id:int}/label", label_doc, methods=["POST"]),
    Route("/label-queue", label_queue_page),
    Route("/label-queue/{doc_id:int}/label", label_from_queue, methods=["POST"]),
]
