"""`finsent run` end to end against the real Postgres, with the sample feeds served from 127.0.0.1."""

from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select
from typer.testing import CliRunner

from pipeline import store
from pipeline.cli import app
from pipeline.config import DEFAULT_MODEL_DIR
from pipeline.demo import DEMO_DATA, WATCHLIST
from pipeline.store import schema as s
from tests.feedserver import FeedServer

runner = CliRunner()
SPIKE_WINDOW_END = "2026-11-20T15:00Z"


@pytest.fixture
def demo_feeds():
    with FeedServer(DEMO_DATA) as fs:
        yield fs


def write_config(tmp_path: Path, fs: FeedServer, extra_sources: list[dict] | None = None) -> Path:
    cfg = {
        "sources": [
            {"name": "newswire", "kind": "rss", "url": fs.url("newswire.xml")},
            {"name": "marketwire", "kind": "rss", "url": fs.url("marketwatch.xml")},
            {"name": "reddit-stocks", "kind": "reddit", "url": fs.url("reddit_stocks.atom")},
            {"name": "stocktwits", "kind": "stocktwits", "url": fs.url("stocktwits.json")},
            *(extra_sources or []),
        ],
        "watchlist": [w.model_dump() for w in WATCHLIST],
        "model": {"path": str(DEFAULT_MODEL_DIR)},
        "sinks": [{"name": "console", "kind": "console"}],
    }
    for source in cfg["sources"]:
        source.setdefault("allow_private_network", True)  # the feeds are on 127.0.0.1
    p = tmp_path / "finsent.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def counts(engine) -> dict[str, int]:
    with store.session_scope(engine) as session:
        return {
            t.__tablename__: store.count_rows(session, t)
            for t in (s.Document, s.Score, s.Alert, s.AlertDelivery, s.PipelineRun)
        }


@pytest.mark.slow
def test_run_twice_with_a_broken_source(tmp_path, demo_feeds, pg_url, engine, monkeypatch):
    demo_feeds.put("broken.xml", b"<rss><channel><item><title>unterminated", "application/xml")
    cfg = write_config(tmp_path, demo_feeds, [{"name": "broken", "url": demo_feeds.url("broken.xml")}])
    monkeypatch.setenv("DATABASE_URL", pg_url)

    first = runner.invoke(app, ["run", "-c", str(cfg), "--as-of", SPIKE_WINDOW_END])
    assert first.exit_code == 3, first.output  # a failed source is reported, the others are stored
    assert "broken" in first.output
    after_first = counts(engine)
    assert after_first["documents"] == 249 and after_first["scores"] == 249
    with store.session_scope(engine) as session:
        spikes = session.scalars(select(s.Alert).where(s.Alert.kind == "spike")).all()
        run = session.scalars(select(s.PipelineRun)).one()
        failed = session.scalars(select(s.SourceFetch.source_name).where(s.SourceFetch.status == "failed")).all()
        nwb_neg = session.scalar(
            select(func.count())
            .select_from(s.Score)
            .join(s.DocumentEntity, s.DocumentEntity.document_id == s.Score.document_id)
            .where(s.DocumentEntity.entity == "NWB", s.Score.label == "negative")
        )
    assert {(a.scope_kind, a.scope_value) for a in spikes} >= {("entity", "NWB")}
    assert run.status == "partial" and run.counts["scored"] == 249 and run.errors[0]["source"] == "broken"
    assert failed == ["broken"]
    assert nwb_neg >= 16

    second = runner.invoke(app, ["run", "-c", str(cfg), "--as-of", SPIKE_WINDOW_END])
    assert second.exit_code == 3
    after_second = counts(engine)
    assert {k: v for k, v in after_second.items() if k != "pipeline_runs"} == {
        k: v for k, v in after_first.items() if k != "pipeline_runs"
    }
    assert after_second["pipeline_runs"] == 2
    second_cycle = demo_feeds.requests[-5:]  # conditional GET: unchanged feeds answer 304
    assert sorted(r.status for r in second_cycle if r.path != "/broken.xml") == [304, 304, 304, 304]


def test_bad_config_and_missing_model_fail_clearly(tmp_path, demo_feeds, pg_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", pg_url)
    cfg = write_config(tmp_path, demo_feeds)
    bad = tmp_path / "typo.yaml"
    bad.write_text(cfg.read_text().replace("watchlist:", "watchlst:"))
    res = runner.invoke(app, ["run", "-c", str(bad)])
    assert res.exit_code == 2 and "typo.yaml" in res.output and "watchlst" in res.output

    res = runner.invoke(app, ["run", "-c", str(cfg), "--as-of", "2026-11-20T15:07Z"])
    assert res.exit_code == 2 and "not on the 60-minute window grid" in res.output and "2026-11-20T15:00Z" in res.output

    monkeypatch.setenv("FINSENT_MODEL", str(tmp_path / "no-such-model"))
    res = runner.invoke(app, ["run", "-c", str(cfg), "--as-of", SPIKE_WINDOW_END])
    assert res.exit_code == 1 and "no-such-model" in res.output
    engine = store.make_engine(pg_url)
    assert counts(engine)["documents"] == 249  # documents were committed before scoring failed
    engine.dispose()


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    db = tmp_path / "demo.db"
    res = runner.invoke(app, ["demo", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "newswire" in res.output and "Top negative headlines" in res.output
    summary = res.output.split("Top negative headlines")[1]
    assert "CRITICAL entity NWB" in summary and "CRITICAL market *" in summary
    assert "evidence:" in res.output  # the console alert cites the words that made headlines negative
    assert "Northwind Bank" in summary
