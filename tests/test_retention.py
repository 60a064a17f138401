"""Social text retention (issue #15, item 3): `retention.raw_social_text_days` removes every stored word of a social
post after N days while its row, scores, entities, rollups and alerts stay; on real Postgres and SQLite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from pipeline import store
from pipeline.data import feedback_examples, load_feedback_rows
from pipeline.labelqueue import label_queue
from pipeline.maintenance import refresh_rollups, run_maintenance
from pipeline.store import schema as s
from pipeline.store import session_scope

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
VERSION = "m-retention"
POST = "$NWB is toast, @user says sell"  # what ingest stored (already masked)


@pytest.fixture(params=["postgres", "sqlite"])
def db(request, tmp_path: Path) -> Iterator[tuple[str, object]]:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'retention.db'}"
        store.upgrade(url)
    engine = store.make_engine(url)
    yield url, engine
    engine.dispose()


def seed(engine, now: datetime = NOW) -> dict[str, int]:
    """Three documents scored by one model: an old and a fresh StockTwits post, an old news item; an alert citing
    the old post and the news item, evidence words and analyst feedback on the old post."""
    old, fresh = now - timedelta(days=40), now - timedelta(days=2)
    ids: dict[str, int] = {}
    with session_scope(engine) as session:
        session.add_all(
            [
                s.Source(name="st-nwb", kind="stocktwits", url="https://api.stocktwits.com/x"),
                s.Source(name="wire", kind="rss", url="https://news.example/rss"),
                s.ModelVersion(id=VERSION, name=VERSION, path="/nowhere", labels=["negative", "neutral", "positive"]),
            ]
        )
        session.flush()
        for key, source, when, title, summary, link in [
            ("old_post", "st-nwb", old, POST, "", "https://stocktwits.com/jane_doe/message/1"),
            ("new_post", "st-nwb", fresh, "$NWB to the moon", "", "https://stocktwits.com/moon_guy/message/2"),
            ("old_news", "wire", old, "Northwind Bank cuts jobs", "Body of the article.", "https://news.example/1"),
        ]:
            doc = s.Document(
                source_name=source,
                external_id=key,
                content_hash=key,
                title=title,
                summary=summary,
                link=link,
                published_at=when,
                fetched_at=when,
            )
            session.add(doc)
            session.flush()
            ids[key] = doc.id
            session.add(s.DocumentEntity(document_id=doc.id, entity="NWB", kind="watchlist", matched="$NWB"))
            session.add(
                s.Score(
                    document_id=doc.id,
                    model_version_id=VERSION,
                    label="negative",
                    p_negative=0.5,
                    p_neutral=0.3,
                    p_positive=0.2,
                    scored_at=when,
                )
            )
            session.add(s.Explanation(document_id=doc.id, model_version_id=VERSION, tokens=[[title.split()[1], 0.4]]))
        cited = [
            {"document_id": ids[k], "title": t, "link": f"https://x/{k}", "source": "s", "p_negative": 0.5,
             "evidence": [word]}
            for k, t, word in (("old_post", POST, "toast"), ("old_news", "Northwind Bank cuts jobs", "cuts"))
        ]  # fmt: skip
        session.add(
            s.Alert(
                id="a1",
                kind="spike",
                scope_kind="entity",
                scope_value="NWB",
                window_start=old - timedelta(minutes=30),
                window_end=old + timedelta(minutes=30),
                severity="warning",
                neg_count=2,
                total_count=2,
                neg_share=1.0,
                baseline_share=0.2,
                baseline_neg_rate=0.2,
                statistic=3.0,
                details={"top_documents": cited, "model_version": VERSION},
            )
        )
        session.add(s.Feedback(document_id=ids["old_post"], label="neutral", created_at=old))  # text from the doc
        session.add(s.Feedback(document_id=ids["old_post"], text=POST + " (copy)", label="negative", created_at=old))
        session.add(s.Feedback(document_id=ids["new_post"], label="positive", created_at=fresh))
    return ids


def snapshot(engine) -> dict[str, object]:
    with session_scope(engine) as session:
        return {
            "scores": session.execute(
                select(s.Score.document_id, s.Score.label, s.Score.p_negative).order_by(s.Score.document_id)
            ).all(),
            "entities": session.execute(select(s.DocumentEntity.document_id, s.DocumentEntity.entity)).all(),
            "daily": session.execute(
                select(
                    s.SentimentDaily.scope_kind, s.SentimentDaily.scope_value, s.SentimentDaily.total_count
                ).order_by(s.SentimentDaily.scope_kind, s.SentimentDaily.scope_value)
            ).all(),
            "alert": session.execute(select(s.Alert.neg_count, s.Alert.total_count, s.Alert.severity)).all(),
            "documents": session.scalar(select(func.count()).select_from(s.Document)),
        }


def test_social_text_is_removed_after_n_days_and_scores_stay(db) -> None:
    url, engine = db
    ids = seed(engine)
    refresh_rollups(engine)
    before = snapshot(engine)
    assert before["daily"]  # the rollups hold the three scores

    rep = run_maintenance(engine, now=NOW, days=365, social_text_days=30)
    assert rep.social_texts_purged == 1 and rep.social_text_days == 30

    with session_scope(engine) as session:
        docs = {d.external_id: d for d in session.scalars(select(s.Document))}
        old = docs["old_post"]
        assert (old.title, old.summary, old.link) == ("[text removed after 30 days]", "", None)
        assert old.text_purged_at == NOW
        # the fresh post and every news item keep their text
        assert (docs["new_post"].title, docs["new_post"].text_purged_at) == ("$NWB to the moon", None)
        article = docs["old_news"]
        assert (article.title, article.summary) == ("Northwind Bank cuts jobs", "Body of the article.")
        explained = set(session.scalars(select(s.Explanation.document_id)))
        assert explained == {ids["new_post"], ids["old_news"]}
        cited = session.get(s.Alert, "a1").details["top_documents"]
        feedback = session.execute(select(s.Feedback.document_id, s.Feedback.text, s.Feedback.label)).all()
    post, news = cited
    assert (post["title"], post["link"], post["evidence"]) == ("[text removed after 30 days]", None, [])
    assert post["p_negative"] == 0.5 and post["document_id"] == ids["old_post"]
    assert news["title"] == "Northwind Bank cuts jobs" and news["evidence"] == ["cuts"]
    assert sorted((d, t, lab) for d, t, lab in feedback if d == ids["old_post"]) == [
        (ids["old_post"], None, "negative"),
        (ids["old_post"], None, "neutral"),
    ]
    assert snapshot(engine) == before  # scores, entities, rollups, alert counts: untouched

    # nothing reads the placeholder as text: training skips the feedback, scoring and the queue skip the post
    examples, skipped = feedback_examples(load_feedback_rows(url), topics=[], banned=set())
    assert [e.text for e in examples] == ["$NWB to the moon"] and skipped == {"text_purged": 2}
    pending = [d.id for chunk in store.iter_unscored(engine, "another-model") for d in chunk]
    assert pending == sorted([ids["new_post"], ids["old_news"]])
    queue = label_queue(engine, VERSION, limit=10, days=60, now=NOW)
    assert ids["old_post"] not in {i.document_id for i in queue}

    # idempotent: a rerun of the same day (or the next) purges nothing more and keeps the first stamp
    again = run_maintenance(engine, now=NOW + timedelta(days=1), days=365, social_text_days=30)
    assert again.social_texts_purged == 0
    with session_scope(engine) as session:
        assert session.get(s.Document, ids["old_post"]).text_purged_at == NOW
    assert snapshot(engine) == before


def test_a_purge_page_reads_only_the_alerts_whose_window_holds_its_posts(db) -> None:
    """A page's alerts used to be every alert between its oldest and newest post: one post with an odd date
    (a year before the rest) read every alert of that year. Now only alerts whose window holds a purged post
    are read (operational alerts, whose windows span days, cite no post), and only those citing one change."""
    from sqlalchemy import event

    from pipeline.maintenance import purge_social_text

    _, engine = db
    ids = seed(engine)
    old, odd = NOW - timedelta(days=40), NOW - timedelta(days=400)

    def alert(aid: str, start: datetime, cited: list[dict], **kw: object) -> s.Alert:
        values: dict = dict(
            id=aid, kind="spike", scope_kind="entity", scope_value="NWB", window_start=start,
            window_end=start + timedelta(hours=1), severity="warning", neg_count=1, total_count=1, neg_share=1.0,
            baseline_share=0.2, baseline_neg_rate=0.2, statistic=3.0, details={"top_documents": cited},
        )  # fmt: skip
        return s.Alert(**{**values, **kw})

    news = {"document_id": ids["old_news"], "title": "Northwind Bank cuts jobs", "link": None, "evidence": ["cuts"]}
    with session_scope(engine) as session:
        post = s.Document(
            source_name="st-nwb", external_id="odd", content_hash="odd", title="$NWB bagholders unite", summary="",
            link="https://stocktwits.com/odd_guy/message/3", published_at=odd, fetched_at=old,
        )  # fmt: skip
        session.add(post)
        session.flush()
        odd_cite = {"document_id": post.id, "title": post.title, "link": post.link, "evidence": ["bagholders"]}
        session.add(alert("odd", odd - timedelta(minutes=10), [odd_cite]))
        session.add_all(alert(f"between-{i}", odd + timedelta(days=30 * i), [news]) for i in range(1, 12))
        session.add(
            alert("feed-dead", odd - timedelta(days=1), [], kind="source_health", scope_kind="health",
                  scope_value="st-nwb", window_end=NOW)
        )  # fmt: skip
    loaded: list[str] = []

    def on_load(target: s.Alert, _context: object) -> None:
        loaded.append(target.id)

    event.listen(s.Alert, "load", on_load)
    try:
        assert purge_social_text(engine, NOW - timedelta(days=30), 30, NOW) == 2
    finally:
        event.remove(s.Alert, "load", on_load)
    assert sorted(loaded) == ["a1", "odd"]
    with session_scope(engine) as session:
        details = {a.id: a.details["top_documents"] for a in session.scalars(select(s.Alert))}
    assert details["odd"] == [{**odd_cite, "title": "[text removed after 30 days]", "link": None, "evidence": []}]
    assert all(details[f"between-{i}"] == [news] for i in range(1, 12))
    assert details["a1"][0]["title"] == "[text removed after 30 days]" and details["a1"][1]["title"] == news["title"]


def test_no_evidence_is_made_up_from_a_purged_post(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    """A purged post's title is a placeholder: `finsent explain` says the text was removed (and when) instead of
    ranking the placeholder's words, and a detection rerun over its window cites it without evidence even with
    a model at hand (before, both computed "evidence" from "[text removed after 30 days]")."""
    import pipeline.explain
    from pipeline.cli import app
    from pipeline.explain import with_evidence
    from pipeline.maintenance import purge_social_text
    from pipeline.score import Scorer
    from pipeline.store import alerts as stored

    monkeypatch.setattr(pipeline.explain, "MIN_WEIGHT", 0.0)  # any word the model leans on counts as evidence
    url = f"sqlite:///{tmp_path / 'explain.db'}"
    store.upgrade(url)
    engine = store.make_engine(url)
    ids = seed(engine)
    assert purge_social_text(engine, NOW - timedelta(days=30), 30, NOW) == 1
    cfg = tmp_path / "finsent.yaml"
    cfg.write_text(json.dumps({"database_url": url}))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    run = CliRunner().invoke
    r = run(app, ["explain", str(ids["old_post"]), "--model", str(tiny_model_dir), "-c", str(cfg)])
    assert r.exit_code == 1, r.output
    assert "text was removed on 2026-11-30 12:00 UTC" in r.output and "+0." not in r.output, r.output
    r = run(app, ["explain", str(ids["old_news"]), "--model", str(tiny_model_dir), "-c", str(cfg)])
    assert r.exit_code == 0 and "Northwind Bank cuts jobs" in r.output, r.output  # the news item is explained

    scorer = Scorer.load(str(tiny_model_dir))
    old = NOW - timedelta(days=40)
    with session_scope(engine) as session:
        tops = stored.top_documents(
            session, [("entity", "NWB")], VERSION, old - timedelta(hours=1), old + timedelta(hours=1)
        )
    engine.dispose()
    texts = {item.document_id: text for item, text in tops[("entity", "NWB")]}
    assert texts == {ids["old_post"]: None, ids["old_news"]: "Northwind Bank cuts jobs. Body of the article."}
    cited = {i.document_id: i for i in with_evidence(tops[("entity", "NWB")], {}, scorer)}
    assert cited[ids["old_post"]].evidence == ()
    assert cited[ids["old_post"]].title == "[text removed after 30 days]"
    assert cited[ids["old_news"]].evidence  # a document with its text still gets its words


def test_without_the_setting_social_text_is_kept(db) -> None:
    _url, engine = db
    ids = seed(engine)
    rep = run_maintenance(engine, now=NOW, days=365)
    assert rep.social_texts_purged == 0 and rep.social_text_days is None
    with session_scope(engine) as session:
        assert session.get(s.Document, ids["old_post"]).title == POST


def test_finsent_db_maintain_applies_the_configured_retention(tmp_path: Path, monkeypatch) -> None:
    from pipeline.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store.upgrade(url)
    engine = store.make_engine(url)
    ids = seed(engine, now=datetime.now(UTC))
    cfg = tmp_path / "finsent.yaml"
    cfg.write_text(json.dumps({"database_url": url, "retention": {"raw_social_text_days": 30}}))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("FINSENT_RETENTION_DAYS", raising=False)
    r = CliRunner().invoke(app, ["db", "maintain", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "1 social posts purged (older than 30 days)" in r.output, r.output
    r = CliRunner().invoke(app, ["documents", "show", str(ids["old_post"]), "-c", str(cfg)])
    assert r.exit_code == 0 and "[text removed after 30 days]" in r.output and "Purged:" in r.output, r.output
    assert "jane_doe" not in r.output and "toast" not in r.output
    r = CliRunner().invoke(app, ["db", "maintain", "-c", str(cfg)])
    assert "0 social posts purged" in r.output, r.output
    engine.dispose()


def test_the_setting_is_validated(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, FinsentConfig, load_config

    assert FinsentConfig().retention.raw_social_text_days is None  # off unless configured
    bad = tmp_path / "bad.yaml"
    bad.write_text("retention:\n  raw_social_text_days: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*retention\.raw_social_text_days: .*greater than or equal"):
        load_config(bad, env=False)


def test_the_maintenance_task_reads_the_setting_from_the_config(pg_url: str, engine, tmp_path: Path, monkeypatch):
    """The finsent_maintenance DAG's task (called as Airflow calls it, minus Airflow) applies the config's setting."""
    from pipeline import orchestrate

    ids = seed(engine)
    cfg = tmp_path / "finsent.yaml"
    cfg.write_text(json.dumps({"retention": {"raw_social_text_days": 30}}))
    monkeypatch.setenv("FINSENT_CONFIG", str(cfg))
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("FINSENT_RETENTION_DAYS", "365")
    done = orchestrate.maintain(NOW)
    assert done["social_texts_purged"] == 1 and done["social_text_days"] == 30
    with session_scope(engine) as session:
        assert session.get(s.Document, ids["old_post"]).text_purged_at == NOW
    assert orchestrate.maintain(NOW)["social_texts_purged"] == 0


def test_the_web_view_shows_why_the_text_is_gone(tmp_path: Path) -> None:
    """`finsent serve` (a real process on 127.0.0.1) shows the placeholder on the alert and in document search,
    and nothing of the purged post: no text, no author link, no evidence word."""
    import httpx

    from tests.test_web import serving

    url = f"sqlite:///{tmp_path / 'web.db'}"
    store.upgrade(url)
    engine = store.make_engine(url)
    now = datetime.now(UTC)
    seed(engine, now=now)
    run_maintenance(engine, now=now, days=365, social_text_days=30)
    engine.dispose()
    start = (now - timedelta(days=60)).strftime("%Y-%m-%dT%H:%M")
    with serving(url) as base:
        alert = httpx.get(f"{base}/alerts/a1", timeout=30)
        docs = httpx.get(f"{base}/documents", params={"company": "NWB", "start": start}, timeout=30)
    for page in (alert, docs):
        assert page.status_code == 200, page.text[:500]
        assert "[text removed after 30 days]" in page.text
        assert "toast" not in page.text and "jane_doe" not in page.text
    assert "Northwind Bank cuts jobs" in alert.text and "$NWB to the moon" in docs.text  # the others are intact


def test_the_purge_waits_for_a_running_cycle_step(db) -> None:
    """A score or detect step that read a post's text before the purge would write its words (evidence) or title
    (alert details) back after it: the purge takes the cycle lock, so it never runs beside such a step."""
    from pipeline.maintenance import purge_social_text
    from pipeline.store.runs import RunLockedError

    _, engine = db
    ids = seed(engine)
    with session_scope(engine) as session:  # a retry pending after a device error: scoring skips purged posts
        session.add(
            s.ScoringRetry(document_id=ids["old_post"], model_version_id=VERSION, attempts=1, next_attempt_at=NOW)
        )
    with store.run_lock(engine, shared=True), pytest.raises(RunLockedError):  # a monitor task (Airflow) at work
        purge_social_text(engine, NOW - timedelta(days=30), 30, NOW, lock_wait=timedelta(0))
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).where(s.Document.text_purged_at.is_not(None))) == 0
    assert purge_social_text(engine, NOW - timedelta(days=30), 30, NOW, lock_wait=timedelta(0)) == 1
    with session_scope(engine) as session:
        assert session.scalars(select(s.ScoringRetry)).all() == []  # nothing left waiting for a text that is gone
