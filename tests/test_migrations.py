"""Migrations are frozen (#10.9): each applies SQL written inside it, so editing sql/views/ (the current
definitions, for reading) can never change what an old revision does to a fresh database."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text

from pipeline import store

VERSIONS = Path(store.MIGRATIONS_DIR) / "versions"


def test_no_migration_reads_a_file():
    for path in sorted(VERSIONS.glob("*.py")):
        tree = ast.parse(path.read_text())
        calls = {
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
        }
        assert not calls & {"read_text", "read_bytes", "open"}, f"{path.name} reads a file"
        assert "views" not in {
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }


@pytest.mark.pg
def test_views_down_to_0001_and_up_again(pg_url, engine):
    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS_DIR))
    cfg.attributes["database_url"] = pg_url

    def views() -> set[str]:
        with engine.connect() as c:
            return set(c.scalars(text("SELECT viewname FROM pg_views WHERE schemaname = current_schema()"))) | set(
                c.scalars(text("SELECT matviewname FROM pg_matviews WHERE schemaname = current_schema()"))
            )

    expected = {
        "v_current_model", "v_sentiment_hourly", "v_sentiment_daily", "v_entities", "v_entity_risk", "v_recent_alerts",
        "v_source_health", "v_model_health",
    }  # fmt: skip
    assert views() == expected
    command.downgrade(cfg, "0002")
    with engine.connect() as c:
        assert "escalated" not in c.scalar(text("SELECT pg_get_viewdef('v_entity_risk')")), (
            "0003's downgrade restores spikes only"
        )
    command.downgrade(cfg, "0001")
    assert views() == set()
    command.upgrade(cfg, "head")
    assert views() == expected
    with engine.connect() as c:
        assert "escalated" in c.scalar(text("SELECT pg_get_viewdef('v_entity_risk')"))


@pytest.mark.pg
def test_0011_scrubs_tokens_older_redaction_stored(pg_url, engine):
    """Rows written before 0011 by the older display_url (path tokens with `_`) and file:// errors (raw path)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS_DIR))
    cfg.attributes["database_url"] = pg_url
    command.downgrade(cfg, "0010")
    token, hexed = "sk_live_abcdEFGH1234ijkl5678", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    with engine.begin() as c:
        c.execute(
            text("INSERT INTO sources (name, kind, url, created_at) VALUES (:n, 'rss', :u, now())"),
            [
                {"n": "keyed", "u": f"https://feeds.example.com/rss/{token}/news?api_key=***"},
                {"n": "plain", "u": "https://feeds.example.com/rss/market_news/latest"},
            ],
        )
        c.execute(
            text(
                "INSERT INTO source_fetches (source_name, fetched_at, status, entries_seen, entries_new, error) "
                "VALUES ('keyed', now(), 'failed', 0, 0, :e)"
            ),
            [
                {"e": f"source 'keyed' (file:///srv/{hexed}/feed.xml): file not found: /srv/{hexed}/feed.xml"},
                {"e": "source 'keyed' (https://feeds.example.com/rss/market_news/latest): HTTP 500"},
            ],
        )
    command.upgrade(cfg, "head")
    with engine.connect() as c:
        urls = dict(c.execute(text("SELECT name, url FROM sources")).all())
        errors = list(c.scalars(text("SELECT error FROM source_fetches ORDER BY id")))
    assert urls == {
        "keyed": "https://feeds.example.com/rss/***/news?api_key=***",
        "plain": "https://feeds.example.com/rss/market_news/latest",
    }
    assert errors == [
        "source 'keyed' (file:///srv/***/feed.xml): file not found: /srv/***/feed.xml",
        "source 'keyed' (https://feeds.example.com/rss/market_news/latest): HTTP 500",
    ]


def test_sqlite_table_rebuilds_keep_every_child_row(tmp_path):
    """On SQLite, batch mode rebuilds a table (copy, DROP, rename): 0012's downgrade rebuilds documents, 0015
    rebuilds alerts, incidents and runs both ways, 0016 alerts again. With foreign keys on, each DROP cascaded
    to the children (every alert delivery, every score and entity row); a migration must move no row."""
    from pipeline.demo import run_demo

    db = tmp_path / "demo.db"
    run_demo(db)
    url = f"sqlite:///{db}"
    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    tables = (
        "documents", "document_entities", "scores", "explanations", "alerts", "alert_deliveries",
        "delivery_attempts", "incidents", "pipeline_runs", "operator_notices",
    )  # fmt: skip

    def counts() -> dict[str, int]:
        eng = store.make_engine(url)
        try:
            with eng.connect() as c:
                return {t: c.scalar(text(f"SELECT count(*) FROM {t}")) for t in tables}
        finally:
            eng.dispose()

    before = counts()
    assert before["alert_deliveries"] and before["document_entities"] and before["scores"] and before["incidents"]
    command.downgrade(cfg, "0011")
    assert counts() == before
    command.upgrade(cfg, "head")
    assert counts() == before


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_0016_keeps_every_alert_kind_and_scope_and_names_an_unknown_one(dialect, request, tmp_path):
    """0016 constrains alerts.kind and alerts.scope_kind: a database holding every value the code writes
    (sentiment and operational alerts) upgrades with its rows; one holding a value the code never wrote stops
    before any change, with one line naming it."""
    from pipeline.records import ALERT_SCOPES, AlertKind
    from pipeline.store.errors import StoreError

    url = request.getfixturevalue("pg_url") if dialect == "postgres" else f"sqlite:///{tmp_path / 'f.db'}"
    if dialect == "sqlite":
        store.upgrade(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    command.downgrade(cfg, "0015")
    insert = text(
        "INSERT INTO alerts (id, kind, scope_kind, scope_value, window_start, window_end, severity, neg_count, "
        "total_count, neg_share, baseline_share, baseline_neg_rate, statistic, details, created_at) "
        "VALUES (:id, :kind, :scope, 'x', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 'info', 0, 0, 0, 0, 0, 0, '{}', "
        "CURRENT_TIMESTAMP)"
    )
    rows = [
        {"id": f"{kind}-{scope}", "kind": kind.value, "scope": scope} for kind in AlertKind for scope in ALERT_SCOPES
    ]
    engine = store.make_engine(url)
    try:
        with engine.begin() as c:
            c.execute(insert, rows)
        store.upgrade(url)
        with engine.connect() as c:
            assert c.scalar(text("SELECT count(*) FROM alerts")) == len(rows) == 30
        command.downgrade(cfg, "0015")
        with engine.begin() as c:
            c.execute(insert, [{"id": "old", "kind": "surge", "scope": "market"}])
        with pytest.raises(StoreError, match=r"alerts\.kind holds values finsent never writes: surge$"):
            store.upgrade(url)
        with engine.connect() as c:
            assert c.scalar(text("SELECT count(*) FROM alerts")) == len(rows) + 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_0017_margin_backfilled_and_written_for_new_scores(dialect, request, tmp_path):
    """`scores.margin` (the labelling queue's order) exists for every score: rows stored before 0017 get it from
    the migration, rows the scorer writes afterwards (store.save_scores) from the database; the queue's indexes
    come with it, and a downgrade takes all of it away."""
    from datetime import UTC, datetime

    from sqlalchemy import inspect

    from pipeline.labelqueue import margin
    from pipeline.records import Prediction, ScoreRow

    if dialect == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'm.db'}"
        store.upgrade(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(store.MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    command.downgrade(cfg, "0016")
    eng = store.make_engine(url)
    old = {1: (0.7, 0.2, 0.1), 2: (0.25, 0.25, 0.5), 3: (0.4, 0.4, 0.2), 4: (0.1, 0.6, 0.3)}
    at = datetime(2026, 11, 20, tzinfo=UTC)
    try:
        with eng.begin() as c:
            c.execute(
                text("INSERT INTO sources (name, kind, url, created_at) VALUES ('s', 'rss', 'https://x', :t)"),
                {"t": at},
            )
            c.execute(
                text(
                    "INSERT INTO model_versions (id, name, path, labels, data_fingerprints, hyperparameters, metrics, "
                    "is_production, created_at) VALUES ('m', 'm', 'm', '[]', '{}', '{}', '{}', false, :t)"
                ),
                {"t": at},
            )
            for i in [*old, 5]:
                c.execute(
                    text(
                        "INSERT INTO documents (id, source_name, external_id, content_hash, title, summary, "
                        "published_at, fetched_at) VALUES (:i, 's', :e, :h, 't', '', :t, :t)"
                    ),
                    {"i": i, "e": f"d{i}", "h": f"h{i}", "t": at},
                )
            c.execute(
                text(
                    "INSERT INTO scores (document_id, model_version_id, label, p_negative, p_neutral, p_positive, "
                    "probs, scored_at) VALUES (:d, 'm', 'neutral', :n, :u, :p, '{}', :t)"
                ),
                [{"d": d, "n": n, "u": u, "p": p, "t": at} for d, (n, u, p) in old.items()],
            )
        command.upgrade(cfg, "head")
        with store.session_scope(eng) as session:
            new = Prediction("positive", {"negative": 0.05, "neutral": 0.35, "positive": 0.6})
            assert store.save_scores(session, [ScoreRow(5, "m", new)]) == 1
        with eng.connect() as c:
            got = dict(c.execute(text("SELECT document_id, margin FROM scores")).all())
            indexes = {i["name"] for t in ("scores", "documents") for i in inspect(c).get_indexes(t)}
        expected = {**{d: margin(p) for d, p in old.items()}, 5: 0.25}
        assert {d: round(m, 4) for d, m in got.items()} == expected
        assert {"ix_scores_model_margin", "ix_documents_source_hash", "ix_documents_source_published"} <= indexes
        command.downgrade(cfg, "0016")
        with eng.connect() as c:
            assert "margin" not in {col["name"] for col in inspect(c).get_columns("scores")}
            assert c.scalar(text("SELECT count(*) FROM scores")) == 5
    finally:
        eng.dispose()
