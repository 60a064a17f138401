"""`finsent export` on Postgres: hourly series (zero-filled) and scored documents, CSV and Parquet."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select

from pipeline import store
from pipeline.records import Document, EntityMention, Prediction, ScoreRow
from pipeline.store import schema as s

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 20, 10, tzinfo=UTC)


def _doc(i: int, minutes: int, entity: str | None, source: str = "wire") -> Document:
    title = f"headline {i}"
    return Document(
        source=source, external_id=str(i), content_hash=hashlib.sha256(title.encode()).hexdigest(), title=title,
        summary="", link=None, published_at=T0 + timedelta(minutes=minutes),
        entities=(EntityMention(entity, "watchlist", entity),) if entity else (),
    )  # fmt: skip


@pytest.fixture
def stored(engine, pg_url):
    """Five documents: three NWB in hour 0 (two negative), none in hour 1, one NWB in hour 2, one other."""
    with store.session_scope(engine) as session:
        session.add(s.Source(name="wire", kind="rss", url="http://127.0.0.1/x"))
        session.flush()
        store.register_model(session, "m1", name="m1", path="m1", labels=["negative", "neutral", "positive"])
        docs = [_doc(1, 5, "NWB"), _doc(2, 20, "NWB"), _doc(3, 40, "NWB"), _doc(4, 130, "NWB"), _doc(5, 10, "ACME")]
        store.save_documents(session, docs)
    with store.session_scope(engine) as session:
        ids = dict(session.execute(select(s.Document.external_id, s.Document.id)).tuples().all())
        labels = {
            "1": ("negative", 0.9),
            "2": ("negative", 0.8),
            "3": ("positive", 0.1),
            "4": ("neutral", 0.2),
            "5": ("negative", 0.7),
        }
        rows = [
            ScoreRow(
                ids[k],
                "m1",
                Prediction(lab, {"negative": p, "neutral": (1 - p) / 2, "positive": (1 - p) / 2}, topic="Macro"),
            )
            for k, (lab, p) in labels.items()
        ]
        store.save_scores(session, rows)
    return pg_url


def finsent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_series_csv_is_zero_filled_and_counts_the_scope(stored, tmp_path) -> None:
    out = tmp_path / "nwb.csv"
    r = finsent(
        "export",
        "series",
        "--scope",
        "entity:NWB",
        "--start",
        "2026-11-20T10:00Z",
        "--end",
        "2026-11-20T13:00Z",
        "-o",
        str(out),
        "--database-url",
        stored,
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert list(df.total_count) == [3, 0, 1]  # the empty hour is a row of zeros, not a gap
    assert list(df.neg_count) == [2, 0, 0]
    assert df.sum_p_negative[0] == pytest.approx(1.8)
    assert df.neg_share[0] == pytest.approx(2 / 3) and pd.isna(df.neg_share[1])
    assert set(df.scope_value) == {"NWB"} and set(df.model_version) == {"m1"}


def test_documents_parquet_has_scores_and_entities(stored, tmp_path) -> None:
    out = tmp_path / "docs.parquet"
    r = finsent(
        "export", "documents", "--start", "2026-11-20", "--end", "2026-11-21", "-o", str(out), "--database-url", stored
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out)
    assert len(df) == 5 and list(df.published_at) == sorted(df.published_at)
    row = df[df.title == "headline 1"].iloc[0]
    assert (row.label, row.entities, row.topic) == ("negative", "NWB", "Macro")
    assert str(df.published_at.dtype) == "datetime64[us, UTC]"


def test_documents_export_streams_in_batches(stored, engine, tmp_path) -> None:
    from pipeline.export import DOCUMENT_COLUMNS, iter_documents, write_frames

    batches = list(iter_documents(engine, T0, T0 + timedelta(days=1), "entity", "NWB", batch=2))
    assert [len(b) for b in batches] == [2, 2]
    n = write_frames(iter(batches), tmp_path / "nwb.parquet", DOCUMENT_COLUMNS)
    assert n == 4 and len(pd.read_parquet(tmp_path / "nwb.parquet")) == 4


def test_unknown_extension_and_bad_scope_are_refused(tmp_path) -> None:
    r = finsent("export", "documents", "--start", "2026-11-20", "--end", "2026-11-21", "-o", str(tmp_path / "x.xlsx"))
    assert r.returncode == 2 and "unknown extension '.xlsx'; use .csv or .parquet" in r.stderr
    assert not (tmp_path / "x.xlsx").exists()
    r = finsent(
        "export",
        "series",
        "--scope",
        "sector:banks",
        "--start",
        "2026-11-20",
        "--end",
        "2026-11-21",
        "-o",
        str(tmp_path / "x.csv"),
    )
    assert r.returncode == 2 and "--scope 'sector:banks'" in r.stderr and "Traceback" not in r.stderr
