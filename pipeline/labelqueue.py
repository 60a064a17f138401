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
3. **random**: `random_share` of the queue (at least one item when there is room) drawn uniformly from the
   candidates not already listed, seeded, round-robin across sources: an unbiased sample, so the
   feedback also measures accuracy where the model is confident.

The web app's `/label-queue` page lists the same items (this function, these defaults) with a form per item.
Labelling an item (`finsent label DOC_ID LABEL`, or that form) writes the `feedback` row the next `finsent train` reads
(`pipeline.data.load_feedback_rows`; feedback never enters the evaluation splits), and drops it from the queue.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import chain, zip_longest
from typing import NamedTuple, TypeVar

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from pipeline.health import OPS_SCOPES
from pipeline.store import schema as s
from pipeline.store import session_scope

MAX_CANDIDATES = 50_000  # the newest candidates considered: bounds memory whatever the backlog
DEFAULT_LIMIT = 20  # items listed by default (the CLI and the web page)
DEFAULT_DAYS = 7.0  # candidates published in the last N days by default


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
    top, second = sorted(probs, reverse=True)[:2]
    return round(top - second, 4)


def _margin3(a: float, b: float, c: float) -> float:
    """margin((a, b, c)) without building and sorting a list: the same two values, the same result."""
    hi, lo = (a, b) if a >= b else (b, a)
    if c > hi:
        return round(c - hi, 4)
    return round(hi - (c if c > lo else lo), 4)


class _Cand(NamedTuple):
    """A candidate while the queue is chosen: plain tuples, since tens of thousands of frozen dataclasses cost
    more than the query; QueueItems are built for the chosen few."""

    document_id: int
    source: str
    margin: float


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
    resolved = select(A.episode_id).where(A.kind == "resolved", A.episode_id.is_not(None))
    alerts = session.scalars(
        select(A)
        .where(A.kind != "resolved", A.scope_kind.not_in(OPS_SCOPES), A.episode_id.not_in(resolved))
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
    with session_scope(engine) as session:
        rows = (
            session.connection()
            .execute(  # Core rows: no ORM bookkeeping for 50,000 tuples
                select(D.id, D.source_name, Sc.p_negative, Sc.p_neutral, Sc.p_positive)
                .join(Sc, (Sc.document_id == D.id) & (Sc.model_version_id == model_version))
                .where(
                    D.published_at >= now - timedelta(days=days),
                    D.published_at <= now,
                    D.text_purged_at.is_(None),  # retention removed its text: nothing left to read
                    ~labelled,
                )
                .order_by(D.id.desc())
                .limit(MAX_CANDIDATES)
            )
            .all()
        )
        cited = _cited_by_open_alerts(session)
        items = [_Cand(i, src, _margin3(pn, pu, pp)) for i, src, pn, pu, pp in rows]
        chosen = _choose(items, cited, limit, flip_margin, random_share, seed)
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
            c.margin,
            shown[c.document_id].title,
            cited[c.document_id] if reason is Reason.ALERT_FLIP else None,
        )
        for c, reason in chosen
        if c.document_id in shown  # deleted meanwhile (retention): not worth a minute any more
    ]


def _choose(
    items: list[_Cand], cited: dict[int, str], limit: int, flip_margin: float, random_share: float, seed: int
) -> list[tuple[_Cand, Reason]]:
    """The rule of the module docstring over candidates newest first (the random draw depends on that order)."""
    flips = sorted(
        (i for i in items if i.document_id in cited and i.margin < flip_margin),
        key=lambda i: (i.margin, i.document_id),
    )
    n_random = min(len(items), max(1, round(limit * random_share))) if limit > 1 else 0
    head = [(i, Reason.ALERT_FLIP) for i in flips[: limit - n_random]]
    taken = {i.document_id for i, _ in head}
    need = max(0, limit - n_random - len(head))
    by_source: dict[str, list[_Cand]] = defaultdict(list)
    for i in items:
        if i.document_id not in taken:
            by_source[i.source].append(i)
    # the first `need` of the round-robin take at most `need` from each source: no need to sort them all
    least = [
        c for src in by_source.values() for c in heapq.nsmallest(need, src, key=lambda i: (i.margin, i.document_id))
    ]
    head += [(i, Reason.LEAST_CONFIDENT) for i in _round_robin(least)[:need]]
    taken |= {i.document_id for i, _ in head}
    rest = [i for i in items if i.document_id not in taken]
    rng = random.Random(seed)
    sample = _round_robin(rng.sample(rest, len(rest)))
    return head + [(i, Reason.RANDOM) for i in sample[: limit - len(head)]]
