"""Hourly/daily rollups: incremental and idempotent, equal to aggregating the base tables, and read by
the dashboard views; every Grafana panel returns rows for the demo week (topic panel included)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from pipeline import cycle, rollups, store
from pipeline.dashboard_bench import expand_macros, grafana_queries
from pipeline.detect import window_end
from pipeline.records import Document, EntityMention, Prediction, ScoreRow
from pipeline.store import schema as s

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 20, 10, tzinfo=UTC)
LABELS = ("negative", "neutral", "positive")


def _store(engine, items: list[tuple[str, int, str | None, str, float, str]], model: str = "m1") -> None:
    """items: (external id, minutes after T0, entity, label, p_negative, topic)."""
    docs = [
        Document(
            source="wire", external_id=x, content_hash=hashlib.sha256(x.encode()).hexdigest(), title=f"t {x}",
            summary="", link=None, published_at=T0 + timedelta(minutes=m),
            entities=(EntityMention(e, "watchlist", e),) if e else (),
        )
        for x, m, e, *_ in items
    ]  # fmt: skip
    with store.session_scope(engine) as session:
        if session.get(s.Source, "wire") is None:
            session.add(s.Source(name="wire", kind="rss", url="http://127.0.0.1/x"))
            session.flush()
        store.register_model(session, model, name=model, path=model, labels=list(LABELS))
        store.save_documents(session, docs)
    with store.session_scope(engine) as session:
        ids = dict(session.execute(select(s.Document.external_id, s.Document.id)).tuples().all())
        rows = [
            ScoreRow(ids[x], model, Prediction(lab, {"negative": p, "neutral": 1 - p, "positive": 0.0}, topic=topic))
            for x, _m, _e, lab, p, topic in items
        ]
        store.save_scores(session, rows)


def _rollup(engine) -> list[tuple]:
    with engine.connect() as c:
        return sorted(
            (*r[:-1], round(r[-1], 6))
            for r in c.execute(
                select(
                    s.SentimentHourly.bucket_start,
                    s.SentimentHourly.scope_kind,
                    s.SentimentHourly.scope_value,
                    s.SentimentHourly.total_count,
                    s.SentimentHourly.neg_count,
                    s.SentimentHourly.sum_p_negative,
                )  # fmt: skip
            )
        )


def _from_base(engine) -> list[tuple]:
    """The same aggregates straight from documents/scores (what 0002's view computed on every read)."""
    sql = """
    WITH sc AS (SELECT d.id, d.source_name, date_trunc('hour', d.published_at, 'UTC') AS b, s.label, s.p_negative,
                       coalesce(s.topic, '(none)') AS topic
                FROM documents d JOIN scores s ON s.document_id = d.id)
    SELECT b, k, v, count(*), count(*) FILTER (WHERE label = 'negative'), sum(p_negative) FROM (
        SELECT b, 'market' AS k, '*' AS v, label, p_negative FROM sc
        UNION ALL SELECT b, 'source', source_name, label, p_negative FROM sc
        UNION ALL SELECT b, 'topic', topic, label, p_negative FROM sc
        UNION ALL SELECT b, 'entity', e.entity, label, p_negative
                  FROM sc JOIN document_entities e ON e.document_id = sc.id
    ) x GROUP BY b, k, v"""
    with engine.connect() as c:
        return sorted((*r[:-1], round(r[-1], 6)) for r in c.execute(text(sql)))


def test_refresh_is_incremental_idempotent_and_equals_the_base_aggregate(engine) -> None:
    _store(
        engine,
        [
            ("a", 5, "NWB", "negative", 0.9, "Macro"),
            ("b", 20, "NWB", "neutral", 0.2, "Macro"),
            ("c", 70, "ACME", "negative", 0.8, "Earnings"),
            ("d", 75, None, "positive", 0.0, None),
        ],
    )
    assert rollups.refresh(engine, "m1").hours == 2
    first = _rollup(engine)
    assert first == _from_base(engine)
    assert ((T0, "entity", "NWB", 2, 1, 1.1) in first) and (
        (T0 + timedelta(hours=1), "topic", "(none)", 1, 0, 0.0) in first
    )
    rollups.refresh(engine, "m1")  # a rerun rewrites the same rows
    assert _rollup(engine) == first
    # a late document for an old hour (a backfill) is picked up by the next refresh, and only its hour is rebuilt
    _store(engine, [("late", 30, "NWB", "negative", 0.7, "Macro")])
    assert rollups.refresh(engine, "m1").hours >= 1
    after = _rollup(engine)
    assert after == _from_base(engine)
    assert (T0, "entity", "NWB", 3, 2, 1.8) in after
    with engine.connect() as c:
        day = c.execute(text("SELECT total_count, neg_count FROM sentiment_daily WHERE scope_kind = 'market'")).one()
    assert tuple(day) == (5, 3)


def test_dashboard_views_read_the_rollups_with_company_names(engine) -> None:
    _store(engine, [("a", 5, "NWB", "negative", 0.9, "Macro"), ("b", 20, "NWB", "neutral", 0.2, "Macro")])
    with store.session_scope(engine) as session:
        store.save_companies(session, [type("W", (), {"key": "NWB", "name": "Northwind Bank"})()])
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM v_sentiment_hourly")).scalar() == 0  # nothing until a refresh
    rollups.refresh(engine, "m1")
    with engine.connect() as c:
        row = c.execute(text("SELECT total_count, neg_share, mean_p_negative, scope_label FROM v_sentiment_hourly "
                             "WHERE scope_kind = 'entity'")).one()  # fmt: skip
        assert (row.total_count, row.neg_share, row.scope_label) == (2, 0.5, "Northwind Bank")
        assert row.mean_p_negative == pytest.approx(0.55)
        assert c.execute(text("SELECT neg_count FROM v_sentiment_daily WHERE scope_kind = 'market'")).scalar() == 1


@pytest.fixture
def demo_week(pg_url):
    """The demo's feeds, model and detection, on Postgres."""
    from pipeline.demo import demo_config

    cfg = demo_config(pg_url)
    engine = cycle.open_engine(cfg)
    cycle.ingest_all(cfg, engine)
    scorer = cycle.load_scorer(cfg, path=cfg.model.path)
    scored = cycle.score_pending(cfg, engine, scorer)
    with store.session_scope(engine) as session:
        latest = session.scalar(select(func.max(s.Document.published_at)))
    as_of = window_end(latest, 60) + timedelta(hours=1)
    cycle.detect_alerts(cfg, engine, as_of, scored.model_version, scorer=scorer)
    yield engine, as_of
    engine.dispose()


def test_every_grafana_panel_returns_rows_for_the_demo_week(demo_week) -> None:
    engine, as_of = demo_week
    queries = grafana_queries()
    assert len(queries) >= 10
    with engine.connect() as c:
        for title, sql in queries:
            rows = c.execute(text(expand_macros(sql, as_of - timedelta(days=7), as_of, ["NWB", "ACME"]))).all()
            assert rows, f"{title}: no rows for the demo week"
        topics = c.execute(
            text(
                expand_macros(next(q for t, q in queries if "topic" in t.lower()), as_of - timedelta(days=7), as_of, [])
            )
        ).all()
        assert len({r[1] for r in topics}) >= 5  # several topics, daily points, without any refresh job
