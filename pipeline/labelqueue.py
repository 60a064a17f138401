"""The labelling queue (active learning): which stored documents are most worth an analyst's minute.

Candidates are documents scored by the model in use, published in the last `days`, that no analyst has
labelled yet (no `feedback` row) and whose text retention has not removed; at most the newest `MAX_CANDIDATES`
of them. The margin of a score is its top probability minus the runner-up: a small margin means the model nearly
chose another label. The queue is, in this order (the documented rule):

1. **alert_flip**: documents cited as evidence by an open alert (a spike or escalation whose episode has no
   resolution) whose margin is below `flip_margin`: relabelling one could flip what an alert claims.
   Smallest margin first.
2. **least_confident**: the other candidates, smallest margin first, taken round-robin across sources (the
   least confident of each source in turn, sources by name), so one noisy feed cannot fill the queue.
3. **random**: `random_share` of the queue (at least one item when there is room) from the candidates not
   already listed, round-robin across sources: each source's candidates in the order of a seeded integer hash
   of their id computed by the database (`_draw_key`: the same seed and candidates give the same items, another
   seed others), a pseudo-random sample independent of the margin, so the feedback also measures accuracy
   where the model is confident.

The database ranks (margins, one window per order): Python receives the open alerts' flips and at most `limit`
candidates per source for each of the other two parts, however many candidates there are.

The web app's `/label-queue` page lists the same items (this function, these defaults) with a form per item.
Labelling an item (`finsent label DOC_ID LABEL`, or that form) writes the `feedback` row the next `finsent train` reads
(`pipeline.data.load_feedback_rows`; feedback never enters the evaluation splits), and drops it from the queue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import chain, zip_longest
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import BigInteger, ColumnElement, Engine, Float, and_, cast, false, func, literal, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from pipeline.health import OPS_SCOPES
from pipeline.records import AlertKind
from pipeline.store import schema as s
from pipeline.store import session_scope

MAX_CANDIDATES = 50_000  # the newest candidates considered: bounds the database's work whatever the backlog
DEFAULT_LIMIT = 20  # items listed by default (the CLI and the web page)
DEFAULT_DAYS = 7.0  # candidates published in the last N days by default
_PRIME = 2_147_483_647  # 2**31 - 1: every step of _draw_key stays below 2**63 (SQLite and Postgres bigint)
_MULT = 1_103_515_245


class Reason(StrEnum):
    ALERT_FLIP = "alert_flip"
    LEAST_CONFIDENT = "least_confident"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class QueueItem:
    document_id: int
    source: str
    reason: Reason
    label: str
    margin: float  # top probability minus the runner-up
    title: str
    alert_id: str | None = None  # the open alert citing it (alert_flip)


def margin(probs: Iterable[float]) -> float:
    """The documented margin (top probability minus the runner-up, 4 decimals); `margin_sql` computes the same."""
    top, second = sorted(probs, reverse=True)[:2]
    return round(top - second, 4)


class _Greatest(FunctionElement[float]):
    """greatest(...) on Postgres; SQLite spells it as the scalar max(...)."""

    type = Float()
    name = "greatest"
    inherit_cache = True


class _Least(FunctionElement[float]):
    type = Float()
    name = "least"
    inherit_cache = True


@compiles(_Greatest)
@compiles(_Least)
def _pg_extreme(element: FunctionElement[float], compiler: SQLCompiler, **kw: Any) -> str:
    return f"{element.name}({compiler.process(element.clauses, **kw)})"


@compiles(_Greatest, "sqlite")
@compiles(_Least, "sqlite")
def _sqlite_extreme(element: FunctionElement[float], compiler: SQLCompiler, **kw: Any) -> str:
    return f"{'max' if element.name == 'greatest' else 'min'}({compiler.process(element.clauses, **kw)})"


def margin_sql(a: Any, b: Any, c: Any) -> ColumnElement[float]:
    """The margin of three probabilities in SQL, unrounded: the top minus the median, exactly `top - second` of
    `margin` (no sum to subtract from, so no rounding error: rounding it to 4 decimals gives `margin`)."""
    median = _Greatest(_Least(a, b), _Least(_Greatest(a, b), c))
    return _Greatest(a, b, c) - median


def _draw_key(doc_id: Any, seed: int) -> ColumnElement[int]:
    """The random part's order: an integer hash of (document id, seed), computed the same way by SQLite and
    Postgres. A linear step, a squaring step that breaks the linear pattern consecutive ids would otherwise keep,
    and a second linear step, each modulo the prime 2**31 - 1, so no product exceeds 2**62."""
    s1, s2 = seed % _PRIME, (seed * 7_919 + 1) % _PRIME
    x = (cast(doc_id, BigInteger) % _PRIME * _MULT + s1) % _PRIME
    x = (x * x + s2) % _PRIME
    return (x * _MULT + s1) % _PRIME


class _Cand(NamedTuple):
    """A ranked candidate as the database returns it."""

    document_id: int
    source: str
    margin: float  # unrounded
    flip: bool  # cited by an open alert with a margin below flip_margin
    by_margin: int  # rank among its source's non-flip candidates, smallest margin first (from 1)
    by_draw: int  # rank among its source's candidates in the random draw's order (from 1)
    total: int  # candidates in all


_C = TypeVar("_C", QueueItem, _Cand)


def _round_robin(items: Sequence[_C]) -> list[_C]:
    """Items (already in priority order) interleaved across sources, sources by name."""
    by_source: dict[str, list[_C]] = defaultdict(list)
    for i in items:
        by_source[i.source].append(i)
    rounds = zip_longest(*(by_source[k] for k in sorted(by_source)))
    return [i for i in chain.from_iterable(rounds) if i is not None]


def _cited_by_open_alerts(session: Session) -> dict[int, str]:
    A = s.Alert
    resolved = select(A.episode_id).where(A.kind == AlertKind.RESOLVED, A.episode_id.is_not(None))
    alerts = session.scalars(
        select(A)
        .where(A.kind != AlertKind.RESOLVED, A.scope_kind.not_in(OPS_SCOPES), A.episode_id.not_in(resolved))
        .order_by(A.window_end.desc())
    ).all()
    cited: dict[int, str] = {}
    for a in alerts:
        for d in (a.details or {}).get("top_documents", []):
            cited.setdefault(int(d["document_id"]), a.id)
    return cited


def label_queue(
    engine: Engine,
    model_version: str,
    limit: int = DEFAULT_LIMIT,
    *,
    days: float = DEFAULT_DAYS,
    flip_margin: float = 0.2,
    random_share: float = 0.2,
    seed: int = 0,
    now: datetime | None = None,
) -> list[QueueItem]:
    """The queue by the rule in the module docstring; at most `limit` items."""
    if limit <= 0:
        return []
    now = now or datetime.now(UTC)
    D, Sc, F = s.Document, s.Score, s.Feedback
    labelled = select(F.document_id).where(F.document_id == D.id).exists()
    window = (D.published_at >= now - timedelta(days=days), D.published_at <= now)
    with session_scope(engine) as session:
        # a literal lower bound on the candidates' ids lets Postgres estimate how few scores rows match and read
        # them by the scores key, instead of hashing every score of the model (about 30% of the query at 300,000)
        # (min of id + 0: min(id) alone makes Postgres walk the id index from 1 until a row falls in the window)
        first = session.scalar(select(func.min(D.id + 0)).where(*window))
        if first is None:
            return []  # nothing published in the window
        cited = _cited_by_open_alerts(session)
        m = margin_sql(Sc.p_negative, Sc.p_neutral, Sc.p_positive)
        flip = and_(D.id.in_(list(cited)), m < flip_margin) if cited else false()
        cand = (
            select(D.id, D.source_name.label("source"), m.label("margin"), flip.label("flip"))
            .join(Sc, (Sc.document_id == D.id) & (Sc.model_version_id == model_version))
            .where(
                *window,
                Sc.document_id >= first,
                D.text_purged_at.is_(None),  # retention removed its text: nothing left to read
                ~labelled,
            )
            .order_by(D.id.desc())
            .limit(MAX_CANDIDATES)
            .subquery("cand")
        )
        ranked = select(
            cand.c.id,
            cand.c.source,
            cand.c.margin,
            cand.c.flip,
            func.row_number()
            .over(partition_by=(cand.c.source, cand.c.flip), order_by=(cand.c.margin, cand.c.id))
            .label("by_margin"),
            func.row_number()
            .over(partition_by=cand.c.source, order_by=(_draw_key(cand.c.id, seed), cand.c.id))
            .label("by_draw"),
            func.count(literal(1)).over().label("total"),
        ).subquery("ranked")
        r = ranked.c
        rows = [
            _Cand(*row)
            for row in session.connection().execute(
                select(ranked).where(or_(r.flip, r.by_margin <= limit, r.by_draw <= limit))
            )
        ]
        chosen = _choose(rows, limit, random_share)
        shown = {
            r.id: r
            for r in session.execute(
                select(D.id, func.substr(D.title, 1, 200).label("title"), Sc.label)
                .join(Sc, (Sc.document_id == D.id) & (Sc.model_version_id == model_version))
                .where(D.id.in_([c.document_id for c, _ in chosen]))
            )
        }
    return [
        QueueItem(
            c.document_id,
            c.source,
            reason,
            shown[c.document_id].label,
            round(c.margin, 4),
            shown[c.document_id].title,
            cited[c.document_id] if reason is Reason.ALERT_FLIP else None,
        )
        for c, reason in chosen
        if c.document_id in shown  # deleted meanwhile (retention): not worth a minute any more
    ]


def _choose(rows: list[_Cand], limit: int, random_share: float) -> list[tuple[_Cand, Reason]]:
    """The rule of the module docstring over the ranked rows: every flip, and each source's first `limit` by
    margin (flips aside: when any least confident item is listed, every flip is) and by the draw's order. A
    listed item takes at most one of its source's first `limit` in the draw, so those leave enough for the rest."""
    total = rows[0].total if rows else 0
    n_random = min(total, max(1, round(limit * random_share))) if limit > 1 else 0
    flips = sorted((i for i in rows if i.flip), key=lambda i: (i.margin, i.document_id))
    head = [(i, Reason.ALERT_FLIP) for i in flips[: limit - n_random]]
    need = max(0, limit - n_random - len(head))
    least = sorted((i for i in rows if not i.flip and i.by_margin <= need), key=lambda i: i.by_margin)
    head += [(i, Reason.LEAST_CONFIDENT) for i in _round_robin(least)[:need]]
    taken = {i.document_id for i, _ in head}
    rest = sorted((i for i in rows if i.by_draw <= limit and i.document_id not in taken), key=lambda i: i.by_draw)
    return head + [(i, Reason.RANDOM) for i in _round_robin(rest)[: limit - len(head)]]
