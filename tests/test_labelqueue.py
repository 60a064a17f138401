"""The labelling queue (issue #15.2): ordered by the documented rule (open-alert flips, then least confident
round-robin across sources, then a random share), and labelling from it reaches training's feedback."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Column, Float, MetaData, Table, select
from typer.testing import CliRunner

from pipeline import labelqueue, store
from pipeline.data import feedback_examples, load_feedback_rows
from pipeline.ingest import content_hash
from pipeline.labelqueue import Reason, label_queue, margin
from pipeline.store import schema as s
from pipeline.store import session_scope
from pipeline.store.schema import margin_sql

VERSION = "queue-model-1"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def _doc(
    session, source: str, n: int, margin: float, label: str = "negative", age_h: float = 1.0, model: str = VERSION
) -> int:
    """A document scored by `model`, whose top probability beats the runner-up by `margin`."""
    top = (1 + margin) / 2 - (1 - margin) / 8  # the third class stays below the runner-up
    second = top - margin
    probs = dict.fromkeys(("negative", "neutral", "positive"), 1 - top - second)
    probs[label] = top
    probs[next(k for k in probs if k != label)] = second
    at = NOW - timedelta(hours=age_h)
    title = f"{source} headline {n}"
    doc = s.Document(
        source_name=source,
        external_id=f"{source}-{n}",
        content_hash=content_hash(title, ""),  # as ingest stores it: a large source's draw starts in its order
        title=title,
        summary="",
        published_at=at,
        fetched_at=at,
        language="en",
    )
    session.add(doc)
    session.flush()
    session.add(
        s.Score(
            document_id=doc.id,
            model_version_id=model,
            label=label,
            p_negative=probs["negative"],
            p_neutral=probs["neutral"],
            p_positive=probs["positive"],
            probs=probs,
            scored_at=at,
        )
    )
    return doc.id


def _alert(session, aid: str, kind: str, docs: list[int], episode: str) -> None:
    session.add(
        s.Alert(
            id=aid,
            episode_id=episode,
            kind=kind,
            scope_kind="entity",
            scope_value="NWB",
            window_start=NOW - timedelta(hours=1),
            window_end=NOW,
            severity="warning",
            neg_count=3,
            total_count=5,
            neg_share=0.6,
            baseline_share=0.1,
            baseline_neg_rate=0.1,
            statistic=5.0,
            details={"top_documents": [{"document_id": d} for d in docs]},
            created_at=NOW,
        )
    )


def seed(engine) -> dict[str, int]:
    from pipeline.config import SourceConfig

    ids: dict[str, int] = {}
    with session_scope(engine) as session:
        store.ensure_sources(
            session, [SourceConfig(name=n, url=f"https://x.example.com/{n}.xml") for n in ("alpha", "beta")]
        )
        store.register_model(session, VERSION, name=VERSION, path="x", labels=["negative", "neutral", "positive"])
        for i, m in enumerate((0.02, 0.05, 0.10, 0.30, 0.50, 0.60, 0.70, 0.80)):
            ids[f"a{i}"] = _doc(session, "alpha", i, m)
        for i, m in enumerate((0.15, 0.40, 0.90)):
            ids[f"b{i}"] = _doc(session, "beta", i, m)
        ids["flip"] = _doc(session, "beta", 10, 0.12)  # cited by an open alert, close call
        ids["sure"] = _doc(session, "beta", 11, 0.95)  # cited by an open alert, but the model is sure
        ids["closed"] = _doc(session, "alpha", 12, 0.01)  # cited only by an episode that has resolved
        ids["done"] = _doc(session, "alpha", 13, 0.0)  # already labelled
        ids["old"] = _doc(session, "alpha", 14, 0.0, age_h=24 * 30)  # outside the window
        _alert(session, "open1", "spike", [ids["flip"], ids["sure"]], "open1")
        _alert(session, "gone1", "spike", [ids["closed"]], "gone1")
        _alert(session, "gone1-r", "resolved", [], "gone1")
        session.add(s.Feedback(document_id=ids["done"], label="neutral", created_at=NOW))
    return ids


@pytest.fixture(params=["postgres", "sqlite"])
def any_engine(request, tmp_path: Path):
    """The queue ranks in SQL: the same rule on Postgres and on the embedded SQLite."""
    if request.param == "postgres":
        yield request.getfixturevalue("engine")
        return
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    store.upgrade(url)
    eng = store.make_engine(url)
    yield eng
    eng.dispose()


def test_queue_orders_flips_then_least_confident_round_robin_then_random(any_engine) -> None:
    ids = seed(any_engine)
    by_id = {v: k for k, v in ids.items()}
    q = label_queue(any_engine, VERSION, limit=10, random_share=0.2, now=NOW, seed=3)
    got = [(by_id[i.document_id], i.reason) for i in q]
    assert got[:8] == [
        ("flip", Reason.ALERT_FLIP),
        ("closed", Reason.LEAST_CONFIDENT),  # alpha's least confident (its episode resolved: no flip)
        ("b0", Reason.LEAST_CONFIDENT),  # then beta's, in turn
        ("a0", Reason.LEAST_CONFIDENT),
        ("b1", Reason.LEAST_CONFIDENT),
        ("a1", Reason.LEAST_CONFIDENT),
        ("b2", Reason.LEAST_CONFIDENT),
        ("a2", Reason.LEAST_CONFIDENT),
    ], got
    listed = {k for k, _ in got}
    assert not listed & {"done", "old"}  # labelled already, or outside the window
    # the random share, round-robin: alpha's first in the draw, then beta's only unlisted candidate
    assert got[8][0] in {"a3", "a4", "a5", "a6", "a7"} and got[8:] == [
        (got[8][0], Reason.RANDOM),
        ("sure", Reason.RANDOM),
    ], got
    assert len(listed) == 10
    assert q[0].alert_id == "open1" and q[0].margin == 0.12
    assert [i.margin for i in q[1:8]] == [0.01, 0.15, 0.02, 0.4, 0.05, 0.9, 0.1]
    again = label_queue(any_engine, VERSION, limit=10, random_share=0.2, now=NOW, seed=3)
    assert again == q  # same seed, same queue
    # the draw depends on the seed, and every unlisted alpha candidate is drawn by some seed: not stuck on the
    # newest, the oldest or the least confident
    drawn = {
        by_id[label_queue(any_engine, VERSION, limit=10, random_share=0.2, now=NOW, seed=k)[8].document_id]
        for k in range(40)
    }
    assert drawn == {"a3", "a4", "a5", "a6", "a7"}, drawn


def test_a_small_limit_keeps_the_random_share_and_the_flips_first(any_engine) -> None:
    ids = seed(any_engine)
    by_id = {v: k for k, v in ids.items()}
    q = label_queue(any_engine, VERSION, limit=2, random_share=0.2, now=NOW, seed=5)
    assert [(by_id[i.document_id], i.reason) for i in q][:1] == [("flip", Reason.ALERT_FLIP)]
    assert q[1].reason is Reason.RANDOM and by_id[q[1].document_id] not in {"flip", "done", "old"}
    assert label_queue(any_engine, VERSION, limit=1, now=NOW) == q[:1]  # no room for a random item
    assert label_queue(any_engine, VERSION, now=NOW - timedelta(days=60)) == []  # nothing published then


def test_a_large_source_is_walked_by_margin_and_drawn_from_a_seeded_threshold(any_engine) -> None:
    """A source with more candidates than the draw reads whole (gamma): its least confident come from the margin
    index walk, its random items from the walk that starts at the seed's content-hash threshold; either walk
    skips what the queue must skip (purged, labelled, outside the window, scored by another model only), and a
    source whose documents are all labelled (delta) lists nothing."""
    import random

    ids = seed(any_engine)
    rnd = random.Random(7)
    gamma: dict[str, tuple[int, float]] = {}
    with session_scope(any_engine) as session:
        from pipeline.config import SourceConfig

        store.ensure_sources(
            session, [SourceConfig(name=n, url=f"https://x.example.com/{n}.xml") for n in ("gamma", "delta")]
        )
        store.register_model(session, "other", name="other", path="x", labels=["negative", "neutral", "positive"])
        for i in range(130):
            m = round(rnd.uniform(0.05, 0.95), 4)
            gamma[f"g{i}"] = (_doc(session, "gamma", i, m), m)
        skipped = {
            "purged": _doc(session, "gamma", 200, 0.001),
            "labelled": _doc(session, "gamma", 201, 0.002),
            "old": _doc(session, "gamma", 202, 0.003, age_h=24 * 30),
            "other model's": _doc(session, "gamma", 203, 0.004, model="other"),
            "delta's only, labelled": _doc(session, "delta", 0, 0.0005),  # a source with no candidate
        }
        session.get(s.Document, skipped["purged"]).text_purged_at = NOW
        for labelled in ("labelled", "delta's only, labelled"):
            session.add(s.Feedback(document_id=skipped[labelled], label="neutral", created_at=NOW))
    assert len(gamma) > labelqueue._SMALL_SOURCE  # the walks, not the small-source path
    by_id = {v: k for k, v in ids.items()} | {d: k for k, (d, _) in gamma.items()}
    least_gamma = sorted(gamma, key=lambda k: (gamma[k][1], gamma[k][0]))

    def queue(seed_: int) -> list[tuple[str, Reason]]:
        q = label_queue(any_engine, VERSION, limit=12, random_share=0.25, now=NOW, seed=seed_)
        assert not {i.document_id for i in q} & set(skipped.values()), q
        return [(by_id[i.document_id], i.reason) for i in q]

    got = queue(4)
    assert got[:9] == [
        ("flip", Reason.ALERT_FLIP),
        ("closed", Reason.LEAST_CONFIDENT),
        ("b0", Reason.LEAST_CONFIDENT),
        (least_gamma[0], Reason.LEAST_CONFIDENT),  # gamma's two smallest margins, from its walk
        ("a0", Reason.LEAST_CONFIDENT),
        ("b1", Reason.LEAST_CONFIDENT),
        (least_gamma[1], Reason.LEAST_CONFIDENT),
        ("a1", Reason.LEAST_CONFIDENT),
        ("b2", Reason.LEAST_CONFIDENT),
    ], got
    assert [r for _, r in got[9:]] == [Reason.RANDOM] * 3 and got[10][0] == "sure", got
    assert got[9][0] in {"a2", "a3", "a4", "a5", "a6", "a7"} and got[11][0] in set(least_gamma[2:]), got
    assert queue(4) == got  # same seed, same queue
    # gamma's random item: one of the _SMALL_SOURCE candidates from the seed's threshold up in content-hash order
    # (wrapping around), so spread over all of them as the seed changes
    hashes = {k: content_hash(f"gamma headline {k[1:]}", "") for k in gamma}
    ring = sorted(gamma, key=hashes.__getitem__)

    def window(seed_: int) -> set[str]:
        t = labelqueue.draw_threshold(seed_)
        return set(
            ([k for k in ring if hashes[k] >= t] + [k for k in ring if hashes[k] < t])[: labelqueue._SMALL_SOURCE]
        )

    drawn = {k: queue(k)[11][0] for k in range(30)}
    assert all(g in window(k) for k, g in drawn.items()), drawn
    assert len(set(drawn.values())) >= 20 and set(drawn.values()) <= set(least_gamma[2:]), drawn


def test_labelling_from_the_queue_reaches_training(engine, pg_url: str, tmp_path: Path, monkeypatch) -> None:
    from pipeline.cli import app

    ids = seed(engine)
    model = tmp_path / "model"
    model.mkdir()
    (model / "finsent.json").write_text(json.dumps({"version": VERSION}))
    cfg = tmp_path / "finsent.yaml"
    cfg.write_text(json.dumps({"database_url": pg_url, "model": {"path": str(model)}}))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("FINSENT_MODEL", raising=False)
    run = CliRunner().invoke
    r = run(app, ["label", "queue", "-c", str(cfg), "--limit", "3", "--days", "36500"], terminal_width=200)
    assert r.exit_code == 0, r.output
    first = r.output.split("\n")
    row = next(ln for ln in first if "alert_flip" in ln)
    assert str(ids["flip"]) in row.replace("│", " ").split(), r.output
    r = run(app, ["label", str(ids["flip"]), "neutral", "-c", str(cfg), "--author", "ana"])
    assert r.exit_code == 0, r.output
    r = run(app, ["label", "queue", "-c", str(cfg), "--limit", "3", "--days", "36500"], terminal_width=200)
    assert r.exit_code == 0 and "alert_flip" not in r.output, r.output  # labelled: off the queue
    rows = load_feedback_rows(pg_url)
    examples, skipped = feedback_examples(rows, topics=[], banned=set())
    assert ("beta headline 10", 1, "feedback") in [(e.text, e.sentiment, e.source) for e in examples], (
        examples,
        skipped,
    )
    with session_scope(engine) as session:
        assert session.scalars(select(s.Feedback.author).where(s.Feedback.document_id == ids["flip"])).all() == ["ana"]


def test_label_still_needs_a_label_and_a_numeric_id(engine, pg_url: str, tmp_path: Path, monkeypatch) -> None:
    from pipeline.cli import app

    cfg = tmp_path / "finsent.yaml"
    cfg.write_text(json.dumps({"database_url": pg_url}))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = CliRunner().invoke(app, ["label", "12", "-c", str(cfg)])
    assert r.exit_code == 2 and "give a LABEL" in r.output, r.output
    r = CliRunner().invoke(app, ["label", "twelve", "neutral", "-c", str(cfg)])
    assert r.exit_code == 2 and "'twelve' is not a number" in r.output, r.output


def test_sql_margin_is_the_documented_margin(any_engine) -> None:
    """The database ranks by `margin_sql`; rounded, it gives exactly the documented `margin` on both dialects
    (ties included: two classes sharing the top probability have margin 0)."""
    import itertools
    import random as rnd

    values = [0.0, 0.1, 0.2, 0.25, 1 / 3, 0.5, 1.0, *(rnd.Random(1).random() for _ in range(7))]
    triples = list(itertools.product(values, repeat=3))
    probe = Table("margin_probe", MetaData(), *(Column(k, Float) for k in "abc"), prefixes=["TEMPORARY"])
    with any_engine.begin() as c:
        probe.create(c)
        c.execute(probe.insert(), [dict(zip("abc", t, strict=True)) for t in triples])
        got = c.execute(select(probe.c.a, probe.c.b, probe.c.c, margin_sql(probe.c.a, probe.c.b, probe.c.c))).all()
    assert len(got) == len(triples)
    for a, b, c_, m in got:
        assert round(m, 4) == margin((a, b, c_)), (a, b, c_, m)


def _many_sources(engine, n: int, docs: int) -> list[str]:
    """`n` sources (s000, s001, ...) with `docs` scored candidates each, margins 0.3 and up."""
    from pipeline.config import SourceConfig

    names = [f"s{i:03d}" for i in range(n)]
    with session_scope(engine) as session:
        store.ensure_sources(session, [SourceConfig(name=k, url=f"https://x.example.com/{k}.xml") for k in names])
        store.register_model(session, VERSION, name=VERSION, path="x", labels=["negative", "neutral", "positive"])
        for k in names:
            for j in range(docs):
                _doc(session, k, j, 0.3 + j / 10)
    return names


def test_a_queue_over_many_sources_keeps_each_statement_within_the_database_limits(any_engine, monkeypatch) -> None:
    """More than 500 sources published in the window: SQLite caps a compound SELECT at 500 terms, and bound
    parameters are capped too (SQLite 32,766, psycopg 65,535), so the per-source walks run in chunks and no
    statement's terms or parameters grow with the number of sources or of open-alert flips."""
    names = _many_sources(any_engine, 501, 5)
    monkeypatch.setattr(labelqueue, "_SMALL_SOURCE", 1)  # 5 candidates make a source large: the margin walks run
    statements: list[tuple[str, int]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append((statement, len(parameters or ())))

    from sqlalchemy import event

    event.listen(any_engine, "before_cursor_execute", record)
    try:
        q = label_queue(any_engine, VERSION, limit=4, random_share=0.2, now=NOW, seed=1)
        # the least confident of the first sources by name (margin 0.3 each), then a random one
        assert [(i.source, i.reason) for i in q[:3]] == [
            ("s000", Reason.LEAST_CONFIDENT),
            ("s001", Reason.LEAST_CONFIDENT),
            ("s002", Reason.LEAST_CONFIDENT),
        ], q
        assert [i.margin for i in q[:3]] == [0.3] * 3 and q[3].reason is Reason.RANDOM, q
        no_flip = max(p for _, p in statements)
        # an open alert citing a close call of the last source: it comes first, is not listed again among that
        # source's least confident, and adds no parameter to the walks
        with session_scope(any_engine) as session:
            flip = _doc(session, names[-1], 99, 0.05)
            _alert(session, "open1", "spike", [flip], "open1")
        statements.clear()
        q = label_queue(any_engine, VERSION, limit=4, random_share=0.2, now=NOW, seed=1)
        assert [(i.document_id, i.reason) for i in q[:1]] == [(flip, Reason.ALERT_FLIP)], q
        assert [(i.source, i.reason) for i in q[1:3]] == [
            ("s000", Reason.LEAST_CONFIDENT),
            ("s001", Reason.LEAST_CONFIDENT),
        ], q
        assert [i.document_id for i in q].count(flip) == 1, q
        with_flip = max(p for _, p in statements)
    finally:
        event.remove(any_engine, "before_cursor_execute", record)
    assert with_flip == no_flip
    terms = max(st.upper().count("UNION ALL") + 1 for st, _ in statements)
    assert terms <= labelqueue._CHUNK < 500, terms
    assert no_flip < 32_766 // 2, no_flip


def _syndicated(session, sources: list[str], n: int, margin: float, story: str) -> list[int]:
    """Copies of one story in several sources (cross-source copies share the content hash, as ingest stores it)."""
    ids = [_doc(session, src, n, margin) for src in sources]
    for d in ids:
        session.get(s.Document, d).content_hash = content_hash(story, "")
    return ids


def _wire_sources(session, names: tuple[str, ...]) -> None:
    from pipeline.config import SourceConfig

    store.ensure_sources(session, [SourceConfig(name=k, url=f"https://x.example.com/{k}.xml") for k in names])


def test_the_queue_lists_a_syndicated_story_once_keeping_its_first_place(any_engine) -> None:
    """Copies of a story in several sources share its content hash: the queue lists the first by its order (a flip,
    then the least confident round-robin, then the random share) and skips the others, so the least-confident
    part takes the next candidates instead and stays full."""
    ids = seed(any_engine)
    with session_scope(any_engine) as session:
        _wire_sources(session, ("delta", "epsilon", "gamma"))
        syn_a, syn_b = _syndicated(session, ["alpha", "beta"], 20, 0.03, "a close call on the wire")
        wire = _syndicated(session, ["delta", "epsilon", "gamma"], 20, 0.9, "a sure thing on the wire")
        flip_copy = _syndicated(session, ["alpha"], 21, 0.04, "beta headline 10")[0]  # a copy of the flip
    by_id = {v: k for k, v in ids.items()} | {syn_a: "syn_a", syn_b: "syn_b", wire[0]: "wire_d", flip_copy: "flip2"}
    q = label_queue(any_engine, VERSION, limit=14, random_share=0.2, now=NOW, seed=3)
    got = [(by_id.get(i.document_id, i.document_id), i.reason) for i in q]
    with session_scope(any_engine) as session:
        hashes = [session.get(s.Document, i.document_id).content_hash for i in q]
    assert len(set(hashes)) == len(hashes) == 14, got
    L = Reason.LEAST_CONFIDENT
    assert got[:11] == [
        ("flip", Reason.ALERT_FLIP),  # its copy in alpha (flip2) is not listed again
        ("closed", L),
        ("syn_b", L),  # the close call's first copy in round-robin order (beta's least confident) ...
        ("wire_d", L),  # ... and the sure thing's (delta's, the first of the three sources by name)
        ("a0", L),
        ("b0", L),
        ("b1", L),  # alpha's copy of the close call (syn_a) is skipped: beta's next
        ("b2", L),  # alpha's copy of the flip (flip2, margin 0.04) is skipped too
        ("a1", L),
        ("sure", L),
        ("a2", L),
    ], got
    assert [r for _, r in got[11:]] == [Reason.RANDOM] * 3, got


def test_the_random_share_draws_a_syndicated_story_once(any_engine) -> None:
    """Every source's draw starts at the same seeded content-hash threshold, so copies of a story in several
    sources fall in every source's draw: the random share lists each story once."""
    with session_scope(any_engine) as session:
        _wire_sources(session, ("delta", "epsilon", "gamma"))
        store.register_model(session, VERSION, name=VERSION, path="x", labels=["negative", "neutral", "positive"])
        x = _syndicated(session, ["delta", "epsilon", "gamma"], 0, 0.9, "story x")
        y = _syndicated(session, ["delta", "epsilon", "gamma"], 1, 0.8, "story y")
    for k in range(5):
        q = label_queue(any_engine, VERSION, limit=3, random_share=1.0, now=NOW, seed=k)
        assert [i.reason for i in q] == [Reason.RANDOM] * 2, q
        assert len({i.document_id for i in q} & set(x)) == 1 and len({i.document_id for i in q} & set(y)) == 1, q


def test_an_alert_storm_citing_tens_of_thousands_of_documents_still_gives_a_queue(any_engine) -> None:
    """Open alerts may cite more documents than a statement may carry parameters (psycopg 65,535; SQLite
    builds set their own): the cited documents are read in chunks and the close call among them still comes first."""
    seed(any_engine)
    with session_scope(any_engine) as session:
        flip = _doc(session, "alpha", 50, 0.03)
        _alert(session, "storm", "spike", [*range(10_000_000, 10_070_000), flip], "storm")
    q = label_queue(any_engine, VERSION, limit=5, random_share=0.2, now=NOW, seed=1)
    assert [(i.document_id, i.reason, i.alert_id) for i in q[:1]] == [(flip, Reason.ALERT_FLIP, "storm")], q
