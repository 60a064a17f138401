"""Alert storage: the per-scope window counts detection reads, and the risk rows and alerts it writes.

The statistics (pipeline.detect) never see the database: they get a `ScopeMatrix` from `load_scope_counts`
and hand back records that `save_risk_scores` and `save_alerts` store idempotently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import BigInteger, cast, func, select, text
from sqlalchemy.orm import Session

from pipeline.config import FinsentConfig
from pipeline.detect import MARKET, TOP_DOCUMENTS, ScopeMatrix, WindowGrid
from pipeline.records import AlertItem, AlertRecord, ScopeKind, document_text
from pipeline.risk import topic_weight
from pipeline.store import _insert
from pipeline.store import schema as s

ScopeKey = tuple[str, str]  # (scope kind, scope value)
# AlertRecord fields stored as alert columns of the same name (top_documents go into details).
ALERT_COLUMNS = tuple(f.name for f in fields(AlertRecord) if f.name != "top_documents")


def _epoch_seconds(conn: Any, column: Any) -> Any:
    """Whole UTC seconds of a timestamp column, computed by the database (parsing 10^5 datetimes in
    Python costs more than the whole detection); windows start on whole minutes, so seconds suffice."""
    if conn.dialect.name == "sqlite":
        return cast(func.strftime("%s", column), BigInteger)
    return cast(func.floor(func.extract("epoch", column)), BigInteger)


def _fetch_tuples(conn: Any, stmt: Any) -> list[tuple]:
    """All rows of a Core select as the driver's plain tuples: the selected columns need no result
    processing (integers, floats, booleans, text), and building 10^5-10^6 Row objects costs more than
    the query itself."""
    result = conn.execute(stmt)
    try:
        return list(result.cursor.fetchall())
    finally:
        result.close()


def load_scope_counts(session: Session, cfg: FinsentConfig, model_version: str, grid: WindowGrid) -> ScopeMatrix:
    """Every scope's per-window counts over the grid, in one pass of grouped pandas arithmetic (no loop per
    scope). Market, entity and topic scopes count a story once however many sources carry it (distinct
    content_hash; negative if any copy is); a source scope counts its own items. Configured scopes (the
    market, every watched entity and source) get a row even without items."""
    start, end = grid.start, grid.end
    D, Sc, E = s.Document, s.Score, s.DocumentEntity
    # Core execution (no ORM row processing): this reads every item of the history, 10^5-10^6 rows.
    conn = session.connection()
    rows = _fetch_tuples(
        conn,
        select(
            D.id,
            _epoch_seconds(conn, D.published_at),
            D.content_hash,
            D.source_name,
            Sc.label == "negative",
            Sc.p_negative,
            Sc.topic,
        )
        .join(Sc, Sc.document_id == D.id)
        .where(Sc.model_version_id == model_version, D.published_at >= start, D.published_at < end),
    )
    kinds = set(cfg.detect.scopes)
    ents = (
        _fetch_tuples(
            conn,
            select(E.document_id, E.entity)
            .join(D, D.id == E.document_id)
            .where(E.kind == "watchlist", D.published_at >= start, D.published_at < end),
        )
        if ScopeKind.ENTITY in kinds and rows
        else []
    )

    keys: set[ScopeKey] = set()
    if ScopeKind.MARKET in kinds:
        keys.add((ScopeKind.MARKET, MARKET))
    if ScopeKind.ENTITY in kinds:
        keys.update((ScopeKind.ENTITY, w.key) for w in cfg.watchlist)
    if ScopeKind.SOURCE in kinds:
        keys.update((ScopeKind.SOURCE, src.name) for src in cfg.sources)
    frames: list[pd.DataFrame] = []
    if rows:
        names = ["id", "epoch", "content_hash", "source_name", "negative", "p_negative", "topic"]
        df = pd.DataFrame.from_records(rows, columns=names)
        df["content_hash"] = pd.factorize(df["content_hash"])[0]  # integer keys group several times faster
        df["w"] = grid.index_of_epoch(df["epoch"].to_numpy(dtype=np.int64))
        df = df[(df["w"] >= 0) & (df["w"] < grid.windows)]
        df["neg"] = df["negative"].astype(np.float64)
        df["p"] = df["p_negative"].astype(np.float64)
        weights = {t: topic_weight(t) for t in df["topic"].dropna().unique()}
        df["tw_neg"] = df["topic"].map(weights).fillna(topic_weight(None)).astype(np.float64) * df["neg"]

        def add(kind: str, frame: pd.DataFrame, scope_col: str, dedup_col: str) -> None:
            """Count one item per (scope, window, dedup key); a story is negative if any copy is."""
            if frame.empty:
                return
            items = frame.groupby([scope_col, "w", dedup_col], sort=False)[["neg", "p", "tw_neg"]].max()
            g = items.groupby(level=[0, 1]).agg(
                n=("neg", "size"), k=("neg", "sum"), sp=("p", "sum"), stw=("tw_neg", "sum")
            )
            g = g.reset_index(names=["value", "w"])
            frames.append(g.assign(kind=str(kind), value=g["value"].astype(str)))

        if ScopeKind.MARKET in kinds:
            add(ScopeKind.MARKET, df.assign(scope=MARKET), "scope", "content_hash")
        if ScopeKind.ENTITY in kinds and ents:
            ids, names_ = zip(*ents, strict=True)
            ent_df = pd.DataFrame({"id": ids, "entity": names_}).drop_duplicates()
            add(ScopeKind.ENTITY, df.merge(ent_df, on="id"), "entity", "content_hash")
        if ScopeKind.SOURCE in kinds:
            add(ScopeKind.SOURCE, df, "source_name", "id")
        if ScopeKind.TOPIC in kinds:
            add(ScopeKind.TOPIC, df[df["topic"].notna()], "topic", "content_hash")
    counts = pd.concat(frames, ignore_index=True) if frames else None
    if counts is not None:
        seen = counts[["kind", "value"]].drop_duplicates()
        keys.update(zip(seen["kind"].tolist(), seen["value"].tolist(), strict=True))
    mat = ScopeMatrix.zeros(sorted(keys), grid)
    if counts is not None:
        row = pd.MultiIndex.from_tuples(mat.keys).get_indexer(
            pd.MultiIndex.from_arrays([counts["kind"], counts["value"]])
        )
        w = counts["w"].to_numpy()
        mat.n[row, w], mat.k[row, w] = counts["n"].to_numpy(), counts["k"].to_numpy()
        mat.sum_p[row, w], mat.sum_tw[row, w] = counts["sp"].to_numpy(), counts["stw"].to_numpy()
    return mat


def top_documents(
    session: Session, scopes: Sequence[ScopeKey], model_version: str, start: datetime, end: datetime
) -> dict[ScopeKey, list[tuple[AlertItem, str | None]]]:
    """The most negative documents of each alerting scope in [start, end), with their text (None for a post
    whose text retention removed: its title is a placeholder, not words to explain), from one query for all
    scopes (not one per scope): highest p_negative first, then newest, one copy per story."""
    if not scopes:
        return {}
    D, Sc, E = s.Document, s.Score, s.DocumentEntity
    q = (
        select(
            D.id,
            D.title,
            D.summary,
            D.link,
            D.source_name,
            D.content_hash,
            D.published_at,
            D.text_purged_at,
            Sc.p_negative,
            Sc.topic,
            E.entity,
        )
        .join(Sc, Sc.document_id == D.id)
        .outerjoin(E, (E.document_id == D.id) & (E.kind == "watchlist"))
        .where(
            Sc.model_version_id == model_version, Sc.label == "negative", D.published_at >= start, D.published_at < end
        )
    )
    docs: dict[int, Any] = {}
    by_scope: dict[ScopeKey, set[int]] = {}
    for r in session.execute(q):
        docs.setdefault(r.id, r)
        by_scope.setdefault((ScopeKind.MARKET, MARKET), set()).add(r.id)
        by_scope.setdefault((ScopeKind.SOURCE, r.source_name), set()).add(r.id)
        if r.topic is not None:
            by_scope.setdefault((ScopeKind.TOPIC, r.topic), set()).add(r.id)
        if r.entity is not None:
            by_scope.setdefault((ScopeKind.ENTITY, r.entity), set()).add(r.id)
    out: dict[ScopeKey, list[tuple[AlertItem, str | None]]] = {}
    for key in scopes:
        ranked = sorted(
            (docs[i] for i in by_scope.get(key, ())), key=lambda r: (-r.p_negative, -r.published_at.timestamp(), r.id)
        )
        seen: set[str] = set()
        items: list[tuple[AlertItem, str | None]] = []
        for r in ranked:
            if r.content_hash in seen:
                continue
            seen.add(r.content_hash)
            item = AlertItem(
                document_id=r.id, title=r.title, link=r.link, source=r.source_name, p_negative=float(r.p_negative)
            )
            items.append((item, None if r.text_purged_at else document_text(r.title, r.summary)))
            if len(items) >= TOP_DOCUMENTS:
                break
        out[key] = items
    return out


def save_risk_scores(
    session: Session, window_start: datetime, window_end: datetime, scores: Sequence[tuple[ScopeKey, dict[str, Any]]]
) -> None:
    """Upsert one risk row per scope for the window; `scores` pairs a scope with its components (whose
    "risk" is the score). No statement grows with the scope count (psycopg caps one at 65,535 parameters):
    Postgres gets one INSERT ... SELECT over a single JSON parameter (one encode, no per-value escaping),
    SQLite an executemany."""
    if not scores:
        return
    now = datetime.now(UTC)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text(_RISK_UPSERT_PG),
            {
                "rows": json.dumps([[kind, value, comp] for (kind, value), comp in scores]),
                "window_start": window_start,
                "window_end": window_end,
                "now": now,
            },
        )
        return
    rows = [
        {
            "scope_kind": kind,
            "scope_value": value,
            "window_start": window_start,
            "window_end": window_end,
            "risk": comp["risk"],
            "components": comp,
            "computed_at": now,
        }
        for (kind, value), comp in scores
    ]
    stmt = _insert(session, s.RiskScore)
    stmt = stmt.on_conflict_do_update(
        index_elements=["scope_kind", "scope_value", "window_start"],
        set_={c: stmt.excluded[c] for c in _RISK_UPDATED},
    )
    session.execute(stmt, rows)


_RISK_UPDATED = ("window_end", "risk", "components", "computed_at")
_RISK_UPSERT_PG = f"""
INSERT INTO risk_scores (scope_kind, scope_value, window_start, window_end, risk, components, computed_at)
SELECT r ->> 0, r ->> 1, :window_start, :window_end, CAST(r -> 2 ->> 'risk' AS float8), r -> 2, :now
FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS r
ON CONFLICT (scope_kind, scope_value, window_start) DO UPDATE SET
{", ".join(f"{c} = EXCLUDED.{c}" for c in _RISK_UPDATED)}
"""


def item_to_dict(i: AlertItem) -> dict[str, Any]:
    return {
        "document_id": i.document_id,
        "title": i.title,
        "link": i.link,
        "source": i.source,
        "p_negative": round(i.p_negative, 4),
        "evidence": list(i.evidence),
    }


def save_alerts(session: Session, alerts: Sequence[tuple[AlertRecord, dict[str, Any]]]) -> None:
    """Store alerts with their details (the cited documents are added to them); an id stored before keeps
    its row, so a retry or backfill writes nothing twice."""
    if not alerts:
        return
    now = datetime.now(UTC)
    rows = [
        {
            **{c: getattr(r, c) for c in ALERT_COLUMNS},
            "details": {**details, "top_documents": [item_to_dict(i) for i in r.top_documents]},
            "created_at": now,
        }
        for r, details in alerts
    ]
    session.execute(_insert(session, s.Alert).on_conflict_do_nothing(index_elements=["id"]), rows)


def alert_from_row(a: s.Alert) -> AlertRecord:
    """Rebuild the record from a stored alert (notify and the CLI read alerts back this way)."""
    docs = tuple(
        AlertItem(
            document_id=int(d["document_id"]),
            title=str(d.get("title", "")),
            link=d.get("link"),
            source=str(d.get("source", "")),
            p_negative=float(d.get("p_negative", 0.0)),
            evidence=tuple(d.get("evidence") or ()),
        )
        for d in (a.details or {}).get("top_documents", [])
    )
    return AlertRecord(**{c: getattr(a, c) for c in ALERT_COLUMNS}, top_documents=docs)
