from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from pipeline import cycle, store
from pipeline.config import FinsentConfig
from pipeline.records import Document, EntityMention, FetchResult
from pipeline.store import schema as s

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def docs(source: str, n: int, start: int = 0) -> list[Document]:
    return [
        Document(
            source=source,
            external_id=f"{source}-{i}",
            content_hash=f"h{i}",
            title=f"Headline {i} about Northwind Bank",
            summary="",
            link=f"https://example.com/{i}",
            published_at=T0 + timedelta(minutes=i),
            entities=(EntityMention("NWB", "watchlist", "Northwind Bank"),),
        )
        for i in range(start, start + n)
    ]


def cfg_for(url: str, model_dir, sources=("wire",)) -> FinsentConfig:
    return FinsentConfig.model_validate(
        {
            "database_url": url,
            "sources": [{"name": n, "url": f"https://example.com/{n}.xml"} for n in sources],
            "model": {"path": str(model_dir), "chunk_size": 7, "batch_size": 4},
        }
    )


def count(engine, model) -> int:
    with store.session_scope(engine) as session:
        return store.count_rows(session, model)


def test_saving_the_same_fetch_twice_stores_nothing_twice(engine, tiny_model_dir, pg_url):
    cfg = cfg_for(pg_url, tiny_model_dir, sources=("wire", "other"))
    with store.session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
    result = FetchResult(source="wire", documents=docs("wire", 12) + docs("wire", 3), entries_seen=15, etag='"v1"')
    for _ in range(2):
        with store.session_scope(engine) as session:
            store.save_fetch(session, result)
    # the same story from another source is its own row (same content hash)
    with store.session_scope(engine) as session:
        saved = store.save_fetch(session, FetchResult(source="other", documents=docs("other", 2)))
    assert saved.new_documents == 2
    assert count(engine, s.Document) == 14
    assert count(engine, s.DocumentEntity) == 14
    assert count(engine, s.SourceFetch) == 3
    with store.session_scope(engine) as session:
        assert store.source_validators(session, "wire") == ('"v1"', None)
        hashes = session.scalars(select(func.count(func.distinct(s.Document.content_hash)))).one()
    assert hashes == 12


def test_failed_fetch_keeps_documents_and_validators(engine, tiny_model_dir, pg_url):
    cfg = cfg_for(pg_url, tiny_model_dir)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
        store.save_fetch(session, FetchResult(source="wire", documents=docs("wire", 5), etag='"v1"'))
    with store.session_scope(engine) as session:
        store.save_fetch(
            session,
            FetchResult(
                source="wire", status="failed", http_status=500, error="HTTP 500 from https://example.com/wire.xml"
            ),
        )
    assert count(engine, s.Document) == 5
    with store.session_scope(engine) as session:
        src = session.get(s.Source, "wire")
        assert (src.last_status, src.etag) == ("failed", '"v1"')
        errors = session.scalars(select(s.SourceFetch.error).where(s.SourceFetch.status == "failed")).all()
    assert errors == ["HTTP 500 from https://example.com/wire.xml"]


def test_scoring_streams_in_chunks_and_a_crash_loses_nothing(engine, tiny_model_dir, pg_url):
    cfg = cfg_for(pg_url, tiny_model_dir)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
        store.save_documents(session, docs("wire", 20))
    scorer = cycle.load_scorer(cfg, path=str(tiny_model_dir))
    chunks = [len(c) for c in store.iter_unscored(engine, scorer.version, 7)]
    assert chunks == [7, 7, 6]

    calls = {"n": 0}
    real = scorer.score

    def crash_on_second_chunk(texts):
        calls["n"] += 1
        if calls["n"] >= 2:  # the device stays down: every later call fails, a plain sentence too
            raise RuntimeError("GPU fell over")
        return real(texts)

    scorer.score = crash_on_second_chunk
    with pytest.raises(RuntimeError):
        cycle.score_pending(cfg, engine, scorer)
    assert count(engine, s.Document) == 20
    assert count(engine, s.Score) == 7
    assert count(engine, s.ScoringOutcome) == 0  # a device failure marks no document as failed

    scorer.score = real
    out = cycle.score_pending(cfg, engine, scorer)
    assert out.scored == 13 and count(engine, s.Score) == 20
    assert cycle.score_pending(cfg, engine, scorer).scored == 0
    with store.session_scope(engine) as session:
        row = session.scalars(select(s.Score)).first()
        mv = session.get(s.ModelVersion, scorer.version)
    assert abs(row.p_negative + row.p_neutral + row.p_positive - 1) < 1e-4
    assert row.model_version_id == "tiny-0" and mv.path == str(tiny_model_dir)
    assert row.topic in ("Earnings", "Legal")


def test_database_going_away_gives_clear_error_without_password(tiny_model_dir):
    cfg = cfg_for("postgresql+psycopg://finsent:hunter2@127.0.0.1:1/nowhere", tiny_model_dir)
    engine = cycle.open_engine(cfg)
    with pytest.raises(store.StoreError) as e:
        store.start_run(engine, "cycle")
    assert "hunter2" not in str(e.value) and "127.0.0.1:1/nowhere" in str(e.value)


def test_sqlite_uses_the_same_migrations(tmp_path, tiny_model_dir):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store.upgrade(url)
    store.upgrade(url)
    cfg = cfg_for(url, tiny_model_dir)
    engine = cycle.open_engine(cfg)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
        assert store.save_documents(session, docs("wire", 3)) == 3
        assert store.save_documents(session, docs("wire", 3)) == 0
    assert cycle.score_pending(cfg, engine).scored == 3
    with store.session_scope(engine) as session:
        published = session.scalars(select(s.Document.published_at).order_by(s.Document.id)).first()
    assert published == T0 and published.tzinfo is not None


def test_shards_split_the_backlog_without_overlap(engine, tiny_model_dir, pg_url):
    cfg = cfg_for(pg_url, tiny_model_dir)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
        store.save_documents(session, docs("wire", 11))
    scorer = cycle.load_scorer(cfg, path=str(tiny_model_dir))
    seen = [
        {d.id for chunk in store.iter_unscored(engine, scorer.version, 4, shard, 3) for d in chunk}
        for shard in range(3)
    ]
    assert sum(len(x) for x in seen) == 11 and len(set().union(*seen)) == 11
    assert all(seen)
    assert [cycle.score_pending(cfg, engine, scorer, shard=i, shards=3).scored for i in range(3)] == [
        len(x) for x in seen
    ]
    assert count(engine, s.Score) == 11
    with pytest.raises(ValueError, match="shard 3 is outside 0..2"):
        next(store.iter_unscored(engine, scorer.version, 4, 3, 3))


def test_a_moved_source_forgets_its_validators(engine, tiny_model_dir, pg_url):
    cfg = cfg_for(pg_url, tiny_model_dir)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
        store.save_fetch(
            session,
            FetchResult(
                source="wire", documents=docs("wire", 1), etag='"v1"', last_modified="Fri, 20 Nov 2026 10:00:00 GMT"
            ),
        )
        store.ensure_sources(session, cfg.sources)
        assert store.source_validators(session, "wire") == ('"v1"', "Fri, 20 Nov 2026 10:00:00 GMT")
    moved = cfg_for(pg_url, tiny_model_dir).model_copy(
        update={"sources": [cfg.sources[0].model_copy(update={"url": "https://example.org/new.xml"})]}
    )
    with store.session_scope(engine) as session:
        store.ensure_sources(session, moved.sources)
        assert store.source_validators(session, "wire") == (None, None)
        assert session.get(s.Source, "wire").url == "https://example.org/new.xml"


def test_unmigrated_or_old_database_says_run_db_upgrade(tmp_path, engine, pg_url):
    bare = store.make_engine(f"sqlite:///{tmp_path / 'bare.db'}")
    with pytest.raises(store.StoreError, match="not migrated: run `finsent db upgrade`"):
        store.check_schema(bare)
    store.check_schema(engine)  # migrated fixture: no error
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0001'")
    with pytest.raises(store.StoreError, match="revision 0001, this finsent needs .*: run `finsent db upgrade`"):
        store.check_schema(engine)


def test_entity_risk_view_counts_escalations_as_spikes(engine) -> None:
    from sqlalchemy import insert, text

    ws = datetime(2026, 11, 20, 14, tzinfo=UTC)
    h = timedelta(hours=1)

    def alert(kind: str, start: datetime) -> dict:
        return {"id": f"{kind}-{start:%H}", "episode_id": "ep", "kind": kind, "scope_kind": "entity",
                "scope_value": "NWB", "window_start": start, "window_end": start + h,
                "severity": "info" if kind == "resolved" else "critical",
                "neg_count": 9, "total_count": 10, "neg_share": 0.9, "baseline_share": 0.2, "baseline_neg_rate": 2.0,
                "statistic": 5.0, "p_value": 1e-7, "risk_score": 80.0, "details": {}, "created_at": start}  # fmt: skip

    with engine.begin() as c:
        c.execute(insert(s.RiskScore), [{"scope_kind": "entity", "scope_value": "NWB", "window_start": ws + 3 * h,
                                         "window_end": ws + 4 * h, "risk": 42.0, "components": {},
                                         "computed_at": ws}])  # fmt: skip
        c.execute(insert(s.Alert), [alert("spike", ws), alert("escalated", ws + h), alert("resolved", ws + 3 * h)])
        row = c.execute(text("SELECT entity, risk, last_spike_at FROM v_entity_risk")).one()
    assert (row.entity, row.risk, row.last_spike_at) == ("NWB", 42.0, ws + 2 * h)  # the escalation, not the resolution
