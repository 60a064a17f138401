"""`finsent export`: a scope's hourly series or a time range of scored documents, to CSV or Parquet, for
notebooks. Documents are streamed in batches, so memory stays bounded whatever the range."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import and_, case, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pipeline.errors import UsageError
from pipeline.records import ScopeKind
from pipeline.store import schema as s
from pipeline.web.queries import HOUR, as_hour, current_model, floor_hour, hour_bucket, zero_filled

SCOPE_KINDS: tuple[str, ...] = tuple(ScopeKind)
FORMATS = {".csv": "csv", ".parquet": "parquet"}
MAX_SERIES_RANGE = timedelta(days=366)
BATCH = 10_000
SERIES_COLUMNS = [
    "bucket_start", "bucket_end", "scope_kind", "scope_value", "model_version",
    "total_count", "neg_count", "neu_count", "pos_count", "neg_share", "sum_p_negative", "mean_p_negative",
]  # fmt: skip
DOCUMENT_COLUMNS = [
    "document_id", "published_at", "source", "title", "summary", "link", "entities",
    "model_version", "label", "p_negative", "p_neutral", "p_positive", "topic", "topic_prob",
]  # fmt: skip


# Parquet column types, fixed so a batch whose column is all empty cannot change the file's schema.
ARROW_TYPES = {
    "bucket_start": "ts", "bucket_end": "ts", "published_at": "ts",
    "total_count": "int", "neg_count": "int", "neu_count": "int", "pos_count": "int", "document_id": "int",
    "neg_share": "float", "sum_p_negative": "float", "mean_p_negative": "float",
    "p_negative": "float", "p_neutral": "float", "p_positive": "float", "topic_prob": "float",
}  # fmt: skip


def arrow_schema(columns: list[str]) -> Any:
    import pyarrow as pa

    types = {"ts": pa.timestamp("us", tz="UTC"), "int": pa.int64(), "float": pa.float64()}
    return pa.schema([(c, types.get(ARROW_TYPES.get(c, ""), pa.string())) for c in columns])


class ExportError(UsageError, ValueError):
    """An export that cannot be done as asked (bad extension, range, scope); the message says which."""


def output_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ExportError(f"{path}: unknown extension {path.suffix or '(none)'!r}; use .csv or .parquet")
    return fmt


def _check_range(start: datetime, end: datetime, limit: timedelta | None = None) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ExportError("start and end need a time zone (UTC)")
    if end <= start:
        raise ExportError(f"end {end:%Y-%m-%d %H:%M} is not after start {start:%Y-%m-%d %H:%M}")
    if limit is not None and end - start > limit:
        raise ExportError(f"range of {(end - start).days} days is longer than {limit.days} days; split the export")


def _scope_where(kind: str, value: str) -> list[Any]:
    if kind == "market":
        return []
    if kind == "entity":
        return [
            select(s.DocumentEntity.document_id)
            .where(s.DocumentEntity.document_id == s.Document.id, s.DocumentEntity.entity == value)
            .exists()
        ]
    if kind == "source":
        return [s.Document.source_name == value]
    if kind == "topic":
        return [func.coalesce(s.Score.topic, "(none)") == value]
    raise ExportError(f"scope kind {kind!r}: expected one of {', '.join(SCOPE_KINDS)}")


def hourly_series(session: Session, kind: str, value: str, start: datetime, end: datetime) -> pd.DataFrame:
    """One row per hour of [start, end) for the scope and the current model; empty hours are zero rows."""
    _check_range(start, end, MAX_SERIES_RANGE)
    start, end = floor_hour(start), floor_hour(end - timedelta(microseconds=1)) + HOUR
    value = "*" if kind == "market" else value
    model = current_model(session)
    rows: dict[datetime, tuple[int, int, int, int, float]] = {}
    if model is not None:
        bucket = hour_bucket(session, s.Document.published_at).label("bucket")
        is_ = lambda lab: func.sum(case((s.Score.label == lab, 1), else_=0))  # noqa: E731
        q = (
            select(bucket, func.count(), is_("negative"), is_("neutral"), is_("positive"), func.sum(s.Score.p_negative))
            .join(s.Score, and_(s.Score.document_id == s.Document.id, s.Score.model_version_id == model))
            .where(s.Document.published_at >= start, s.Document.published_at < end, *_scope_where(kind, value))
            .group_by(bucket)
        )
        for b, total, neg, neu, pos, psum in session.execute(q):
            rows[as_hour(b)] = (int(total), int(neg or 0), int(neu or 0), int(pos or 0), float(psum or 0.0))
    out = []
    for p in zero_filled({k: (v[0], v[1]) for k, v in rows.items()}, start, end):
        total, neg, neu, pos, psum = rows.get(p.start, (0, 0, 0, 0, 0.0))
        out.append(
            (p.start, p.start + HOUR, kind, value, model, total, neg, neu, pos,
             neg / total if total else None, psum, psum / total if total else None)
        )  # fmt: skip
    return pd.DataFrame(out, columns=SERIES_COLUMNS)


def iter_documents(
    engine: Engine, start: datetime, end: datetime, kind: str = "market", value: str = "*", batch: int = BATCH
) -> Iterator[pd.DataFrame]:
    """Scored documents published in [start, end) for a scope, oldest first, `batch` rows at a time."""
    _check_range(start, end)
    with Session(engine) as session:
        model = current_model(session) or ""
        q = (
            select(s.Document, s.Score)
            .outerjoin(s.Score, and_(s.Score.document_id == s.Document.id, s.Score.model_version_id == model))
            .where(s.Document.published_at >= start, s.Document.published_at < end, *_scope_where(kind, value))
            .order_by(s.Document.published_at, s.Document.id)
            .execution_options(yield_per=batch)
        )
        result = session.execute(q)
        for part in result.partitions(batch):
            ids = [d.id for d, _ in part]
            names: dict[int, list[str]] = {}
            for doc_id, ent in session.execute(
                select(s.DocumentEntity.document_id, s.DocumentEntity.entity).where(
                    s.DocumentEntity.document_id.in_(ids)
                )
            ):
                names.setdefault(doc_id, []).append(ent)
            yield pd.DataFrame(
                [
                    (d.id, d.published_at, d.source_name, d.title, d.summary, d.link,
                     ",".join(sorted(names.get(d.id, []))),
                     sc.model_version_id if sc else None, sc.label if sc else None,
                     sc.p_negative if sc else None, sc.p_neutral if sc else None, sc.p_positive if sc else None,
                     sc.topic if sc else None, sc.topic_prob if sc else None)
                    for d, sc in part
                ],
                columns=DOCUMENT_COLUMNS,
            )  # fmt: skip


def write_frames(frames: Iterator[pd.DataFrame] | list[pd.DataFrame], path: Path, columns: list[str]) -> int:
    """Write frames to CSV or Parquet (by extension) one batch at a time; returns the row count.

    An empty export still writes the header / schema, so a notebook reading it gets the columns."""
    fmt = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    n = 0
    writer: Any = None
    try:
        if fmt == "csv":
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                header = True
                for df in frames:
                    df.to_csv(fh, index=False, header=header, date_format="%Y-%m-%dT%H:%M:%S%z")
                    header = False
                    n += len(df)
                if header:
                    pd.DataFrame(columns=columns).to_csv(fh, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = arrow_schema(columns)
            writer = pq.ParquetWriter(tmp, schema)
            for df in frames:
                writer.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))
                n += len(df)
            writer.close()
            writer = None
        tmp.replace(path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return n
