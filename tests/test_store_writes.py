"""Bulk writes on a real Postgres: one compiled INSERT executed for many rows, never one statement past psycopg's
65,535-parameter limit, whatever the row count or chunk size; re-writing the same rows writes (and counts) none."""

from sqlalchemy import select

from pipeline import store
from pipeline.config import SourceConfig
from pipeline.records import Prediction, ScoreRow, ScoringStatus, TextOutcome
from pipeline.store import schema as s
from tests.test_store import count, docs

MODEL = "bulk-model"
N = 7_200  # save_scores has 10 columns: 72,000 parameters when sent as one VALUES list


def _stored_ids(engine, n: int, batch: int = 500) -> list[int]:
    with store.session_scope(engine) as session:
        store.ensure_sources(session, [SourceConfig(name="wire", url="https://example.com/wire.xml")])
        store.register_model(session, MODEL, name=MODEL, path=MODEL, labels=["negative", "neutral", "positive"])
        assert store.save_documents(session, docs("wire", n), batch=batch) == n
    with store.session_scope(engine) as session:
        return list(session.scalars(select(s.Document.id).order_by(s.Document.id)))


def test_scores_past_the_parameter_limit_are_written_once_and_counted(engine):
    ids = _stored_ids(engine, N)
    pred = Prediction("negative", {"negative": 0.7, "neutral": 0.2, "positive": 0.1}, topic="earnings", topic_prob=0.6)
    rows = [ScoreRow(d, MODEL, pred) for d in ids]
    with store.session_scope(engine) as session:
        assert store.save_scores(session, rows) == N
    with store.session_scope(engine) as session:  # idempotent: another writer's rows are not counted again
        assert store.save_scores(session, rows[:10] + rows) == 0
    assert count(engine, s.Score) == N
    assert count(engine, s.DocumentEntity) == N
    with store.session_scope(engine) as session:
        row = session.scalars(select(s.Score).where(s.Score.document_id == ids[-1])).one()
    assert (row.label, row.p_negative, row.probs["neutral"], row.topic) == ("negative", 0.7, 0.2, "earnings")


def test_documents_outcomes_and_explanations_past_the_parameter_limit(engine):
    n = 11_000  # outcomes: 6 columns (66,000 parameters); language update: 11,000 ids in one IN list
    ids = _stored_ids(engine, n, batch=n)  # documents: 9 columns, 99,000 parameters as one VALUES list
    outcomes = [(d, TextOutcome(ScoringStatus.SKIPPED_LANGUAGE, language="de", reason="language de")) for d in ids]
    with store.session_scope(engine) as session:
        assert store.save_outcomes(session, MODEL, outcomes) == n
        assert store.save_outcomes(session, MODEL, outcomes) == 0
    evidence = {d: ("fines", "probe") for d in ids[:n]}
    with store.session_scope(engine) as session:
        assert store.save_explanations(session, MODEL, evidence) == n
        assert store.save_explanations(session, MODEL, evidence) == 0
    with store.session_scope(engine) as session:
        langs = set(session.scalars(select(s.Document.language)))
    assert langs == {"de"}
    assert count(engine, s.Explanation) == n


def test_the_sqlite_demo_store_takes_the_same_bulk_writes(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    store.upgrade(url)
    engine = store.make_engine(url)
    try:
        n = 4_000  # the demo's path of the same writes (executemany, not COPY): counts and idempotency hold
        ids = _stored_ids(engine, n, batch=n)
        pred = Prediction("neutral", {"negative": 0.1, "neutral": 0.8, "positive": 0.1})
        with store.session_scope(engine) as session:
            assert store.save_scores(session, [ScoreRow(d, MODEL, pred) for d in ids]) == n
            assert store.save_scores(session, [ScoreRow(d, MODEL, pred) for d in ids]) == 0
        assert count(engine, s.DocumentEntity) == n
        with store.session_scope(engine) as session:
            assert session.scalars(select(s.Score.probs).limit(1)).one() == pred.probs
    finally:
        engine.dispose()
