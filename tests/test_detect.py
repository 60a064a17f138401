"""Detection on seeded rows in the real Postgres: documents, entities and scores inserted with SQLAlchemy."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import func, insert, select

from pipeline.config import FinsentConfig
from pipeline.detect import DetectorParams, Series, compute_stats, detect_spikes, event_at
from pipeline.explain import tokens_of
from pipeline.risk import risk_components, topic_weight
from pipeline.store import register_model, session_scope
from pipeline.store import schema as s

AS_OF = datetime(2026, 11, 20, 15, tzinfo=UTC)
H = timedelta(hours=1)
MODEL = "test-model-v1"


def cfg(**detect) -> FinsentConfig:
    return FinsentConfig.model_validate(
        {
            "database_url": "sqlite://",
            "sources": [
                {"name": "newswire", "url": "http://127.0.0.1/a"},
                {"name": "reddit", "kind": "reddit", "url": "http://127.0.0.1/b"},
            ],
            "watchlist": [{"ticker": "NWB", "name": "Northwind Bank"}, {"ticker": "ACME", "name": "Acme Motors"}],
            "detect": detect,
        }
    )


class Seeder:
    """Writes documents with their entities and scores, the way ingest and score leave them."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.n = 0
        with session_scope(engine) as session:
            for name, kind in (("newswire", "rss"), ("reddit", "reddit")):
                session.add(s.Source(name=name, kind=kind, url=f"http://127.0.0.1/{name}"))
            register_model(session, MODEL, name="t", path="-", labels=["negative", "neutral", "positive"])

    def add(self, items: list[dict]) -> None:
        docs, ents, scores = [], [], []
        with session_scope(self.engine) as session:
            for it in items:
                self.n += 1
                title = it.get("title") or f"item {self.n}"
                docs.append(
                    {
                        "source_name": it.get("source", "newswire"),
                        "external_id": f"x{self.n}",
                        "content_hash": it.get("hash") or hashlib.sha256(title.encode()).hexdigest(),
                        "title": title,
                        "summary": "",
                        "link": f"https://news.example.com/{self.n}",
                        "published_at": it["at"],
                        "fetched_at": it["at"],
                    }
                )
            ids = (
                session.execute(insert(s.Document).returning(s.Document.id, sort_by_parameter_order=True), docs)
                .scalars()
                .all()
            )
            for doc_id, it in zip(ids, items, strict=True):
                neg = it.get("neg", False)
                pn = it.get("p", 0.93 if neg else 0.04)
                scores.append(
                    {
                        "document_id": doc_id,
                        "model_version_id": MODEL,
                        "label": "negative" if neg else "neutral",
                        "p_negative": pn,
                        "p_neutral": 1 - pn - 0.01,
                        "p_positive": 0.01,
                        "probs": {},
                        "topic": it.get("topic"),
                        "topic_prob": 0.9 if it.get("topic") else None,
                    }
                )
                for e in it.get("entities", ()):
                    ents.append({"document_id": doc_id, "entity": e, "kind": "watchlist", "matched": e})
                ents += (
                    [{"document_id": doc_id, "entity": "ZZZ", "kind": "cashtag", "matched": "$ZZZ"}]
                    if it.get("cashtag")
                    else []
                )
            session.execute(insert(s.Score), scores)
            if ents:
                session.execute(insert(s.DocumentEntity), ents)

    def quiet(self, start: datetime, end: datetime, seed: int = 1) -> None:
        rng = random.Random(seed)
        items = []
        t = start
        while t < end:
            for j in range(rng.randint(8, 14)):
                items.append(
                    {
                        "at": t + timedelta(minutes=rng.randint(0, 59)),
                        "neg": rng.random() < 0.15,
                        "source": rng.choice(["newswire", "reddit"]),
                        "entities": [rng.choice(["NWB", "ACME"])],
                        "topic": rng.choice(["Earnings", "Stock Commentary", "Legal | Regulation"]),
                        "title": f"quiet {t:%m%d%H} {j} {rng.random()}",
                        "cashtag": j == 0,
                    }
                )
            t += H
        self.add(items)

    def spike(self, start: datetime, negatives: int = 14, tag: str = "s") -> None:
        items = [
            {
                "at": start + timedelta(minutes=3 * i),
                "neg": True,
                "p": 0.80 + i / 100,
                "source": "newswire" if i % 2 else "reddit",
                "entities": ["NWB"],
                "topic": "Legal | Regulation",
                "title": f"Northwind Bank probe widens {tag}{i}",
            }
            for i in range(negatives)
        ]
        # The same story carried by both sources: counted once for market/entity/topic scopes.
        items += [
            {
                "at": start + timedelta(minutes=50),
                "neg": True,
                "p": 0.99,
                "source": src,
                "entities": ["NWB"],
                "topic": "Legal | Regulation",
                "title": f"Regulator fines Northwind Bank {tag}",
                "hash": f"dup-{tag}",
            }  # fmt: skip
            for src in ("newswire", "reddit")
        ]
        items += [
            {
                "at": start + timedelta(minutes=20),
                "source": "reddit",
                "entities": ["ACME"],
                "title": f"Acme schedule {tag}{i}",
            }
            for i in range(3)
        ]
        self.add(items)


@pytest.fixture
def seeded(engine) -> Seeder:
    sd = Seeder(engine)
    sd.quiet(AS_OF - timedelta(days=7) - 60 * H, AS_OF - H)
    return sd


def by_scope(alerts) -> dict[tuple[str, str], object]:
    return {(a.scope_kind, a.scope_value): a for a in alerts}


def test_spike_alerts_per_scope_with_top_documents_and_risk(engine, seeded: Seeder) -> None:
    seeded.spike(AS_OF - H)
    alerts = detect_spikes(engine, cfg(), AS_OF, MODEL)
    got = by_scope(alerts)
    assert ("entity", "NWB") in got and ("market", "*") in got and ("topic", "Legal | Regulation") in got
    assert ("entity", "ACME") not in got and ("entity", "ZZZ") not in got  # cashtags are not scopes
    nwb = got[("entity", "NWB")]
    assert nwb.kind == "spike" and nwb.severity == "critical" and nwb.p_value < 1e-6
    assert (nwb.neg_count, nwb.total_count) == (15, 15)  # 14 + one story carried twice
    assert got[("market", "*")].total_count == 18
    assert 0.1 < nwb.baseline_share < 0.25 and nwb.neg_share == 1.0
    assert nwb.window_start == AS_OF - H and nwb.window_end == AS_OF
    tops = nwb.top_documents
    assert len(tops) == 5 and [t.p_negative for t in tops] == sorted((t.p_negative for t in tops), reverse=True)
    assert (
        tops[0].title == "Regulator fines Northwind Bank s" and sum(t.title.startswith("Regulator") for t in tops) == 1
    )
    assert got[("source", "newswire")].total_count == 8  # a source scope counts its own copy
    with session_scope(engine) as session:
        risks = dict(
            session.execute(
                select(s.RiskScore.scope_value, s.RiskScore.risk).where(
                    s.RiskScore.scope_kind == "entity", s.RiskScore.window_start == AS_OF - H
                )
            ).all()
        )
        stored = session.scalar(select(s.Alert).where(s.Alert.id == nwb.id))
    assert set(risks) == {"NWB", "ACME"}
    assert 70 <= risks["NWB"] <= 100 and risks["ACME"] < 30
    assert nwb.risk_score == risks["NWB"]
    assert stored.details["top_documents"][0]["title"] == "Regulator fines Northwind Bank s"
    assert stored.details["episode_severity"] == "critical"


def test_rerun_and_backfill_give_the_same_ids_and_store_nothing_twice(engine, seeded: Seeder) -> None:
    seeded.spike(AS_OF - H)
    first = detect_spikes(engine, cfg(), AS_OF, MODEL, explain=False)
    again = detect_spikes(engine, cfg(), AS_OF, MODEL, explain=False)
    assert sorted(a.id for a in first) == sorted(a.id for a in again) and first
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(s.Alert)) == len(first)
        assert (
            session.scalar(select(func.count()).select_from(s.RiskScore)) == 2 + 2 + 1 + 3
        )  # entities, sources, market, topics


def test_one_episode_one_alert_then_a_resolution(engine, seeded: Seeder) -> None:
    seeded.spike(AS_OF - H, tag="a")
    seeded.spike(AS_OF, negatives=10, tag="b")  # the episode goes on in the next window
    seeded.quiet(AS_OF + H, AS_OF + 6 * H, seed=9)
    c = cfg(cooldown_windows=3)
    windows = [AS_OF + i * H for i in range(6)]
    seen = {
        w: [a for a in detect_spikes(engine, c, w, MODEL, explain=False) if a.scope_kind == "entity"] for w in windows
    }
    kinds = {w: [(a.scope_value, a.kind) for a in v] for w, v in seen.items()}
    assert kinds[AS_OF] == [("NWB", "spike")]
    later = [(w, v) for w, v in kinds.items() if w > AS_OF and v]
    # One resolution, only after three windows that are neither hot nor warm (the quiet data after the
    # spike may hold a mildly warm window, which keeps the episode open one window longer).
    assert len(later) == 1 and later[0][1] == [("NWB", "resolved")] and later[0][0] >= AS_OF + 4 * H
    resolved_at = later[0][0]
    spike, resolved = seen[AS_OF][0], seen[resolved_at][0]
    assert resolved.episode_id == spike.episode_id and resolved.severity == "info" and resolved.id != spike.id
    # A backfill in reverse order recomputes the same episodes and ids.
    back = {
        w: [a.id for a in detect_spikes(engine, c, w, MODEL, explain=False) if a.scope_kind == "entity"]
        for w in reversed(windows)
    }
    assert all(back[w] == [a.id for a in seen[w]] for w in windows)


def test_quiet_data_raises_nothing_and_bad_as_of_is_named(engine, seeded: Seeder) -> None:
    assert detect_spikes(engine, cfg(), AS_OF - 3 * H, MODEL) == []
    assert detect_spikes(engine, cfg(seasonality=True), AS_OF - 3 * H, MODEL) == []
    with pytest.raises(
        ValueError, match="not on the 60-minute window grid: use 2026-11-20T14:00Z or 2026-11-20T15:00Z"
    ):
        detect_spikes(engine, cfg(), AS_OF - timedelta(minutes=20), MODEL)
    with pytest.raises(ValueError, match="has no timezone"):
        detect_spikes(engine, cfg(), AS_OF.replace(tzinfo=None), MODEL)
    assert detect_spikes(engine, cfg(), AS_OF, "another-model") == []  # scores of other models are not mixed in


def test_seasonality_and_min_volume_gates(engine, seeded: Seeder) -> None:
    seeded.spike(AS_OF - H)
    assert ("entity", "NWB") in by_scope(detect_spikes(engine, cfg(seasonality=True), AS_OF, MODEL, explain=False))
    high_floor = detect_spikes(engine, cfg(min_volume=100), AS_OF, MODEL, explain=False)
    assert high_floor == []


def test_core_counts_statistics() -> None:
    """The statistics core on plain arrays: a calm binomial series, then one window with a jump."""
    p = DetectorParams.from_config(cfg().detect)
    rng = np.random.default_rng(3)
    T = p.history_windows + 10
    n = rng.poisson(40, T).astype(float)
    k = rng.binomial(n.astype(int), 0.2).astype(float)
    n[-1], k[-1] = 40, 22
    st = compute_stats(Series(n=n, k=k, slot=np.arange(T) % 24), p)
    assert abs(st.p0[-1] - 0.2) < 0.02 and st.rho[-1] < 0.02
    assert st.hot[-1] and st.critical[-1] and not st.hot[-10:-1].any()
    ev = event_at(st, T - 1, p)
    assert ev is not None and ev.kind == "spike" and ev.severity == "critical"
    assert not st.hot[: p.baseline_windows].any()  # no verdict without a full baseline


def test_risk_formula_and_topic_weights() -> None:
    assert topic_weight("Legal | Regulation") == 1.0 > topic_weight("Earnings") > topic_weight("Stock Commentary")
    assert topic_weight(None) == 0.5 and topic_weight("Unheard Of") == 0.5
    calm = risk_components(20, 3, 3.0, 1.5, 0.15, 3.0, 1.7)
    hot = risk_components(20, 18, 17.0, 18.0, 0.15, 3.0, 1.7)
    assert 0 <= calm.risk < 20 and 85 <= hot.risk <= 100
    legal = risk_components(20, 10, 9.0, 10 * 1.0, 0.15, 3.0, 1.7).risk
    chatter = risk_components(20, 10, 9.0, 10 * 0.25, 0.15, 3.0, 1.7).risk
    assert legal > chatter
    assert risk_components(0, 0, 0.0, 0.0, 0.15, 0.0, 0.0).risk < 10


def test_evidence_token_shapes() -> None:
    class Tok:
        def __init__(self, t: str) -> None:
            self.token = t

    assert tokens_of(["plunge", "probe"], 5) == ("plunge", "probe")
    assert tokens_of([("loss", 0.9), ("cut", 0.5)], 1) == ("loss",)
    assert tokens_of([{"token": "fine"}], 5) == ("fine",)
    assert tokens_of([Tok("scandal")], 5) == ("scandal",)
    assert tokens_of(None, 5) == ()


def test_evidence_is_read_from_explanations_stored_at_scoring_and_the_model_is_never_loaded(
    engine, seeded: Seeder, tiny_model_dir, monkeypatch
) -> None:
    """Detect cites the evidence stored when the documents were scored, for the version that scored them,
    and never loads a model (it runs on the CPU queue), even with a loadable model configured."""
    from pipeline.score import Scorer
    from pipeline.store import save_explanations

    loads: list[str] = []
    real_load = Scorer.load.__func__

    def spy(cls, path_or_id, *a, **kw):
        loads.append(str(path_or_id))
        return real_load(cls, path_or_id, *a, **kw)

    monkeypatch.setattr(Scorer, "load", classmethod(spy))
    seeded.spike(AS_OF - H)
    c = cfg().model_copy(update={"model": cfg().model.model_copy(update={"path": str(tiny_model_dir)})})
    first = by_scope(detect_spikes(engine, c, AS_OF, MODEL))[("entity", "NWB")]
    assert first.top_documents and all(d.evidence == () for d in first.top_documents)  # nothing stored yet
    cited = [d.document_id for d in first.top_documents]
    with session_scope(engine) as session:
        register_model(session, "other-model", name="other", path="/x", labels=["negative", "neutral", "positive"])
        save_explanations(session, MODEL, {cited[0]: ("fines", "probe"), cited[1]: ()})
        save_explanations(session, "other-model", {cited[2]: ("wrong",)})
    again = by_scope(detect_spikes(engine, c, AS_OF, MODEL))[("entity", "NWB")]
    got = {d.document_id: d.evidence for d in again.top_documents}
    assert got[cited[0]] == ("fines", "probe") and got[cited[1]] == () and got[cited[2]] == ()
    assert loads == [], f"detect loaded a model: {loads}"


def _calm(p: DetectorParams, mean_volume: float, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    T = p.history_windows + 10
    n = rng.poisson(mean_volume, T).astype(float)
    return n, rng.binomial(n.astype(int), share).astype(float)


def test_negative_volume_test_sees_a_spike_the_share_test_alone_misses() -> None:
    """A quiet scope (about 4 items an hour) suddenly carries 14 items, 7 negative: the share alone is
    only mildly unusual (p ~ 0.007), the negative volume is far out of line, so the window alerts;
    the same share in a scope that always carries 14 items an hour does not."""
    p = DetectorParams.from_config(cfg().detect)
    n, k = _calm(p, 4, 0.2, seed=4)
    n[-1], k[-1] = 14, 7
    st = compute_stats(Series(n=n, k=k, slot=np.arange(len(n)) % 24), p)
    assert st.hot[-1] and st.p_value[-1] < p.warning_p
    busy_n, busy_k = _calm(p, 14, 0.2, seed=4)
    busy_n[-1], busy_k[-1] = 14, 7
    busy = compute_stats(Series(n=busy_n, k=busy_k, slot=np.arange(len(busy_n)) % 24), p)
    assert not busy.hot[-1] and busy.p_value[-1] > p.warning_p
    # A volume burst at the usual share is news, not a negative spike.
    n2, k2 = _calm(p, 4, 0.2, seed=4)
    n2[-1], k2[-1] = 40, 8
    assert not compute_stats(Series(n=n2, k=k2, slot=np.arange(len(n2)) % 24), p).hot[-1]


def test_an_open_episode_escalates_once_when_the_evidence_grows() -> None:
    p = DetectorParams.from_config(cfg().detect)
    n, k = _calm(p, 40, 0.2, seed=3)
    T = len(n)
    n[-4], k[-4] = 40, 17  # a warning
    n[-3], k[-3] = 40, 30  # far stronger: escalates to critical
    n[-2], k[-2] = 40, 29  # as strong again: no third alert
    n[-1], k[-1] = 40, 8
    st = compute_stats(Series(n=n, k=k, slot=np.arange(T) % 24), p)
    events = [event_at(st, t, p) for t in range(T - 4, T)]
    assert events[0] is not None and (events[0].kind, events[0].severity) == ("spike", "warning")
    assert events[1] is not None and (events[1].kind, events[1].severity) == ("escalated", "critical")
    assert events[1].onset == events[0].onset == T - 4
    assert events[2] is None and events[3] is None
    quiet = np.concatenate([n, np.full(3, 40.0)]), np.concatenate([k, np.full(3, 8.0)])
    st2 = compute_stats(Series(n=quiet[0], k=quiet[1], slot=np.arange(T + 3) % 24), p)
    ends = [ev for t in range(T - 1, T + 3) if (ev := event_at(st2, t, p)) is not None]
    assert [(e.kind, e.severity) for e in ends] == [("resolved", "critical")]  # the episode's peak severity


def test_escalation_reaches_the_database_with_its_own_id(engine, seeded: Seeder) -> None:
    seeded.spike(AS_OF - H, negatives=4, tag="mild")
    seeded.spike(AS_OF, negatives=40, tag="big")
    c = cfg()
    first = [a for a in detect_spikes(engine, c, AS_OF, MODEL, explain=False) if a.scope_kind == "entity"]
    second = [a for a in detect_spikes(engine, c, AS_OF + H, MODEL, explain=False) if a.scope_kind == "entity"]
    assert [(a.scope_value, a.kind) for a in first] == [("NWB", "spike")]
    assert [(a.scope_value, a.kind, a.severity) for a in second] == [("NWB", "escalated", "critical")]
    assert second[0].episode_id == first[0].episode_id and second[0].id != first[0].id and second[0].top_documents
    again = [a.id for a in detect_spikes(engine, c, AS_OF + H, MODEL, explain=False) if a.scope_kind == "entity"]
    assert again == [second[0].id]


def test_ten_thousand_scopes_in_one_window(engine, seeded: Seeder) -> None:
    """10,010 watchlist scopes: one risk row each and the spike found, with no statement near psycopg's
    65,535-parameter cap (risk rows used to go in one 7-parameter-per-row INSERT ... VALUES)."""
    base = cfg()
    many = [{"ticker": "NWB", "name": "Northwind Bank"}, {"ticker": "ACME", "name": "Acme Motors"}]
    many += [{"ticker": f"Q{i:05d}", "name": f"Quiet Co {i}"} for i in range(10_008)]
    c = FinsentConfig.model_validate({**base.model_dump(), "watchlist": many})
    seeded.spike(AS_OF - H)
    alerts = by_scope(detect_spikes(engine, c, AS_OF, MODEL, explain=False))
    assert alerts[("entity", "NWB")].kind == "spike" and alerts[("entity", "NWB")].top_documents
    assert ("entity", "ACME") not in alerts and not any(v.startswith("Q") for _, v in alerts)
    with session_scope(engine) as session:
        stored = session.scalar(select(func.count()).select_from(s.RiskScore).where(s.RiskScore.scope_kind == "entity"))
        quiet = session.scalar(select(s.RiskScore.components).where(s.RiskScore.scope_value == "Q00042"))
    assert stored == 10_010
    assert quiet["n"] == 0 and quiet["p_value"] == 1.0


def _newsy_stream(seed: int, vol: float, news: tuple = (), drift: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Four weeks of hourly counts: a daily cycle, a weekend lull, Gamma-Poisson volume, share 0.15;
    optional news days (volume x f for some hours at the usual share) and a drift of the share."""
    rng = np.random.default_rng(seed)
    h = np.arange(24 * 7 * 4)
    mu = vol * (1 + 0.5 * np.cos(2 * np.pi * (h % 24 - 14) / 24)) * np.where((h // 24) % 7 >= 5, 0.5, 1.0)
    for a, b, f in news:
        mu[a:b] *= f
    share = np.full(len(h), 0.15)
    if drift:
        a, dur, f = drift
        share *= 1 + (f - 1) * np.clip((h - a) / dur, 0, 1)
    n = rng.poisson(rng.gamma(8, mu / 8))
    return n.astype(float), rng.binomial(n, share).astype(float)


def _alert_windows(n: np.ndarray, k: np.ndarray, first: int) -> list[int]:
    p = DetectorParams.from_config(cfg().detect)
    st = compute_stats(Series(n=n, k=k, slot=np.arange(len(n)) % 24), p)
    return [t for t in range(first, len(n)) if (ev := event_at(st, t, p)) is not None and ev.kind != "resolved"]


NEWS = ((24 * 12 + 9, 24 * 12 + 17, 5.0), (24 * 18 + 8, 24 * 18 + 16, 4.0))


def test_news_days_at_the_usual_share_do_not_alert() -> None:
    """Earnings or a launch: 4-5x the volume for 8 hours at the usual negative share. Over 40 scopes of 2-150
    items an hour those windows alert no more than the same windows without the news (up to chance: about
    2.6 alerts are expected in 800 windows); the old negative-volume test, which compared negatives with the
    usual volume, alerted on 7 of them against 2."""
    in_news = quiet_same = 0
    for seed in range(40):
        vol = [2, 5, 20, 60, 150][seed % 5]
        windows = {t for a, b, _ in NEWS for t in range(a, b + 2)}
        in_news += len(windows.intersection(_alert_windows(*_newsy_stream(seed, vol, news=NEWS), 24 * 9)))
        quiet_same += len(windows.intersection(_alert_windows(*_newsy_stream(seed, vol), 24 * 9)))
    assert in_news <= quiet_same + 3, (in_news, quiet_same)


def test_a_slow_share_drift_alerts_about_as_often_as_quiet_data() -> None:
    """The negative share drifts over three days to 1.6x and stays. p0 follows the recent share up, so the
    drifted streams alert at most 1.3x as often as their quiet twins (76 vs 61; the detector before the
    recent share scaled every hour's share: 1.6x at these settings; the one before that 2.9x). Not yet "no
    more than quiet data": the extra alerts come while the share is still rising, in busy scopes."""
    drifted = quiet = 0
    for seed in range(40):
        vol = [2, 5, 20, 60, 150][seed % 5]
        drifted += len(_alert_windows(*_newsy_stream(seed, vol, drift=(24 * 12, 72, 1.6)), 24 * 9))
        quiet += len(_alert_windows(*_newsy_stream(seed, vol), 24 * 9))
    assert drifted <= 1.3 * quiet, (drifted, quiet)


def test_a_surge_two_days_after_another_is_judged_against_the_share_before_both() -> None:
    """Surges come every few days in spiked streams. The recent share that p0 follows (so that a drift is
    the new normal) leaves an earlier surge's windows out: over 40 scopes of 5 items an hour, a second
    surge two days after a first is caught nearly as often as the same surge alone (28 vs 32; counting the
    first surge in raised p0: 20 vs 27)."""
    p = DetectorParams.from_config(cfg().detect)
    alone = after = 0
    for seed in range(40):
        n, k = _calm(p, 5, 0.15, seed=seed)
        T = len(n)
        second = T - 1
        n[second] += 4
        k[second] += 4
        alone += int(compute_stats(Series(n=n, k=k, slot=np.arange(T) % 24), p).hot[second])
        first = second - 48
        n[first : first + 4] += 6
        k[first : first + 4] += 6
        after += int(compute_stats(Series(n=n, k=k, slot=np.arange(T) % 24), p).hot[second])
    assert alone >= 20 and after >= 0.85 * alone, (after, alone)
