"""The labelling queue (active learning): which stored documents are most worth an analyst's minute.

Candidates are documents scored by the model in use, published in the last `days`, that no analyst has
labelled yet (no `feedback` row) and whose text retention has not removed. The margin of a score is its top
probability minus the runner-up (`scores.margin`, computed by the database): a small margin means the model
nearly chose another label. The queue is, in this order (the documented rule):

1. **alert_flip**: documents cited as evidence by an open alert (a spike or escalation whose episode has no
   resolution) whose margin is below `flip_margin`: relabelling one could flip what an alert claims.
   Smallest margin first.
2. **least_confident**: the other candidates, smallest margin first, taken round-robin across sources (the
   least confident of each source in turn, sources by name), so one noisy feed cannot fill the queue.
3. **random**: `random_share` of the queue (at least one item when there is room) from the candidates not
   already listed, round-robin across sources: each source's candidates in the order of a seeded integer hash
   of their id (`_draw_key`: the same seed and candidates give the same items, another seed others), a
   pseudo-random sample independent of the margin, so the feedback also measures accuracy where the model is
   confident. A source with more than `_SMALL_SOURCE` candidates shuffles the `_SMALL_SOURCE` that follow a
   threshold the seed picks in content-hash order (the sha256 of their text, wrapping around): each candidate's
   chance stays close to even, and the database never reads the rest.

A story is listed once: cross-source copies of a syndicated story share its content hash (the sha256 of its
text), and every source's draw starts at the same threshold in that order, so the copies would otherwise fall
in every source's draw (and, equally close calls, in every source's least confident). The queue keeps the first
item of each content hash in the order above and skips the others; a skipped least-confident copy makes room for
the next candidate in the round-robin (so a source with a copy of an earlier item yields its next one), and when
the walks read too few distinct stories to fill that part, the random share fills the rest of the queue.

The database reads about a page, not every candidate (migration 0017's indexes; nothing sorts the candidates):
one index range gives the window's lowest and highest document id, one index probe per source which sources
published in the window. Each source's draw walks `documents (source_name, content_hash, published_at)` from the
seed's threshold (the window checked inside the index) and stops after `_SMALL_SOURCE` candidates, so a smaller
source is read whole; for each larger source, the least confident walk `scores (model_version_id, margin,
document_id)` upwards (the window's id range checked inside the index) and stop after the page's need. Such a
walk reads about need x (the model's scores / the source's candidates) index entries and looks up only the
documents in the window's id range: a source whose candidates are all more confident than most stored scores
makes it long (at worst every score of the model, and a lookup per document of the window). The walks run
`_CHUNK` sources per statement (a `UNION ALL` of them; SQLite caps a compound select at 500 terms) and a walk's
parameters do not depend on the flips (it reads need + its source's flips and skips those here), so no statement
grows with the number of sources or of flips: up to `_CHUNK` sources published in the window, each walk is one
statement.

The web app's `/label-queue` page lists the same items (this function, these defaults) with a form per item.
Labelling an item (`finsent label DOC_ID LABEL`, or that form) writes the `feedback` row the next `finsent train` reads
(`pipeline.data.load_feedback_rows`; feedback never enters the evaluation splits), and drops it from the queue.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import chain, zip_longest
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Engine, Select, func, select, union_all
from sqlalchemy.orm import Session

from pipeline.health import OPS_SCOPES
from pipeline.records import AlertKind
from pipeline.store import schema as s
from pipeline.store import session_scope

DEFAULT_LIMIT = 20  # items listed by default (the CLI and the web page)
DEFAULT_DAYS = 7.0  # candidates published in the last N days by default
_SMALL_SOURCE = 100  # a source with fewer candidates is read whole by its draw instead of walked by margin
_CHUNK = 200  # per-source walks per statement (SQLite caps a compound SELECT at 500 terms)
_CITED_CHUNK = 1000  # cited documents per flips statement (psycopg allows 65,535 parameters, SQLite 32,766 or more)
_PRIME = 2_147_483_647  # 2**31 - 1
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
    """The documented margin (top probability minus the runner-up, 4 decimals); `scores.margin` holds the same,
    unrounded (`pipeline.store.schema.margin_sql`)."""
    top, second = sorted(probs, reverse=True)[:2]
    return round(top - second, 4)


def draw_threshold(seed: int) -> str:
    """Where a seed's draw starts in content-hash order: a sha256 hex digest, as the content hashes are."""
    return hashlib.sha256(f"finsent label queue draw {seed}".encode()).hexdigest()


def _draw_key(doc_id: int, seed: int) -> int:
    """The random part's order: an integer hash of (document id, seed). A linear step, a squaring step that
    breaks the linear pattern consecutive ids would otherwise keep, and a second linear step, modulo a prime."""
    s1, s2 = seed % _PRIME, (seed * 7_919 + 1) % _PRIME
    x = (doc_id % _PRIME * _MULT + s1) % _PRIME
    x = (x * x + s2) % _PRIME
    return (x * _MULT + s1) % _PRIME


class _Cand(NamedTuple):
    """A candidate as the database returns it."""

    document_id: int
    source: str
    margin: float  # unrounded
    content_hash: str  # shared by cross-source copies of a story


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
    alerts = session.execute(  # two columns, not the ORM objects: a quarter's open alerts cost milliseconds
        select(A.id, A.details)
        .where(A.kind != AlertKind.RESOLVED, A.scope_kind.not_in(OPS_SCOPES), A.episode_id.not_in(resolved))
        .order_by(A.window_end.desc())
    )
    cited: dict[int, str] = {}
    for alert_id, details in alerts:
        for d in (details or {}).get("top_documents", []):
            cited.setdefault(int(d["document_id"]), alert_id)
    return cited


def _each(session: Session, parts: Sequence[Select[*tuple[Any, ...]]], *order: str) -> list[Any]:
    """The rows of several LIMIT-ed selects, `_CHUNK` of them per statement (UNION ALL; each wrapped in a
    subquery, as SQLite takes no ORDER BY or LIMIT inside a compound select), each statement's rows ordered by
    the `order` columns: a part's rows stay in that order, whatever the number of parts."""
    rows: list[Any] = []
    for i in range(0, len(parts), _CHUNK):
        u = union_all(*(select(p.subquery()) for p in parts[i : i + _CHUNK])).subquery()
        rows += session.execute(select(u).order_by(*(u.c[k] for k in order)))
    return rows


def _first_unique(items: Iterable[_Cand], seen: set[str], k: int) -> list[_Cand]:
    """The first `k` items whose content hash is not in `seen` (nor an earlier item's); adds theirs to it."""
    out: list[_Cand] = []
    for c in items:
        if len(out) >= k:
            break
        if c.content_hash not in seen:
            seen.add(c.content_hash)
            out.append(c)
    return out


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
    window = (D.published_at >= now - timedelta(days=days), D.published_at <= now)

    def candidates(*where: Any) -> Select[int, str, float, str]:
        return (
            select(D.id, D.source_name.label("source"), Sc.margin, D.content_hash)
            .join(Sc, (Sc.document_id == D.id) & (Sc.model_version_id == model_version))
            .where(
                *window,
                *where,
                D.text_purged_at.is_(None),  # retention removed its text: nothing left to read
                ~select(F.document_id).where(F.document_id == D.id).exists(),  # labelled already
            )
        )

    with session_scope(engine) as session:
        # the window's id range (id + 0: min(id) alone makes Postgres walk the id index from 1 until a row
        # falls in the window), so the margin walks skip other dates' scores inside their index
        first, last = session.execute(select(func.min(D.id + 0), func.max(D.id + 0)).where(*window)).one()
        if first is None:
            return []  # nothing published in the window
        published = select(D.id).where(D.source_name == s.Source.name, *window).exists()
        sources = list(session.scalars(select(s.Source.name).where(published)))
        # each source's draw: the n candidates from the seed's threshold up in content-hash order, wrapping
        # around to the bottom for the sources whose walk reached the top
        threshold, n = draw_threshold(seed), max(limit, _SMALL_SOURCE)

        def walk(names: Sequence[str], above: bool) -> dict[str, list[_Cand]]:
            where = D.content_hash >= threshold if above else D.content_hash < threshold
            by_hash = (D.content_hash, D.id)
            parts = [candidates(D.source_name == src, where).order_by(*by_hash).limit(n) for src in names]
            out: dict[str, list[_Cand]] = defaultdict(list)
            for r in _each(session, parts, "source", "content_hash", "id"):
                out[r.source].append(_Cand(*r))
            return out

        upper = walk(sources, above=True)
        wrapped = [src for src in sources if len(upper[src]) < n]
        lower = walk(wrapped, above=False)
        read = {src: upper[src] + lower[src] for src in sources}
        whole = {src for src in wrapped if len(lower[src]) < n}  # every candidate of the source was read
        # the draw: the first n from the threshold on (all of a smaller source's), shuffled by the seed
        drawn = {
            src: sorted(cs[:n], key=lambda c: (_draw_key(c.document_id, seed), c.document_id))
            for src, cs in read.items()
        }

        cited = _cited_by_open_alerts(session)
        ids = sorted(cited)  # an alert storm cites thousands: read them _CITED_CHUNK a statement (parameter limits)
        flips = sorted(
            (
                _Cand(*r)
                for at in range(0, len(ids), _CITED_CHUNK)
                for r in session.execute(candidates(D.id.in_(ids[at : at + _CITED_CHUNK]), Sc.margin < flip_margin))
            ),
            key=lambda c: (c.margin, c.document_id),
        )
        total = sum(map(len, drawn.values()))  # every candidate, or at least `limit`: enough for the share
        n_random = min(total, max(1, round(limit * random_share))) if limit > 1 else 0
        seen: set[str] = set()  # the content hashes listed so far: a story is listed once
        head = [(c, Reason.ALERT_FLIP) for c in _first_unique(flips, seen, limit - n_random)]
        need = max(0, limit - n_random - len(head))
        flip_ids = {c.document_id for c in flips}
        flips_in = Counter(c.source for c in flips)
        least = [
            c
            for src in sorted(whole)
            for c in sorted(
                (c for c in read[src] if c.document_id not in flip_ids), key=lambda c: (c.margin, c.document_id)
            )[:need]
        ]
        if need:
            # the source's flips are read too and skipped here: a NOT IN per walk would grow the statement's
            # parameters as sources x flips
            walks = [
                candidates(D.source_name == src, Sc.document_id.between(first, last))
                .order_by(Sc.margin, Sc.document_id)
                .limit(need + flips_in[src])
                for src in sources
                if src not in whole
            ]
            least += [
                c
                for c in map(_Cand._make, _each(session, walks, "source", "margin", "id"))
                if c.document_id not in flip_ids
            ]
        head += [(c, Reason.LEAST_CONFIDENT) for c in _first_unique(_round_robin(least), seen, need)]
        taken = {c.document_id for c, _ in head}
        rest = [c for src in sorted(drawn) for c in drawn[src][:limit] if c.document_id not in taken]
        chosen = head + [(c, Reason.RANDOM) for c in _first_unique(_round_robin(rest), seen, limit - len(head))]
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
