"""Runtime model monitoring (issue #15.1): a replay of hourly windows into real Postgres, each window checked
by the detect step's model-health check and followed by the notify step to a real webhook on 127.0.0.1.
A shifted stream (tweets into a news-only source, another language, a spam burst) raises exactly one
`model_health` alert for that source and a resolution when it ends; a normal week raises none."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline import cycle, store
from pipeline.config import FinsentConfig
from pipeline.model_health import check_models, compare, psi
from pipeline.store import schema as s
from pipeline.store import session_scope
from tests.notify_receivers import Webhook

VERSION = "replay-model-1"
START = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
PER_WINDOW = 30
NEWS_WORDS = [
    "shares",
    "revenue",
    "quarter",
    "guidance",
    "profit",
    "outlook",
    "board",
    "dividend",
    "bank",
    "lending",
    "margin",
    "results",
]


def make_cfg(**mh) -> FinsentConfig:
    return FinsentConfig.model_validate(
        {
            "sources": [{"name": n, "url": f"https://feeds.example.com/{n}.xml"} for n in ("newswire", "steady")],
            "sinks": [{"name": "slack-desk", "kind": "slack", "webhook_url_env": "TEST_SLACK_URL", "timeout_s": 5}],
            "detect": {"window_minutes": 60},
            "model_health": {"baseline_days": 2, **mh},
            "database_url": "sqlite://",
        }
    )


def news(rng: random.Random) -> tuple[str, str, str, float]:
    """(title, language, label, top probability) of an ordinary newswire headline."""
    title = " ".join(rng.choice(NEWS_WORDS) for _ in range(rng.randint(8, 16))).capitalize()
    label = rng.choices(["negative", "neutral", "positive"], [0.2, 0.6, 0.2])[0]
    return title, "en", label, rng.uniform(0.7, 0.99)


def tweet(rng: random.Random) -> tuple[str, str, str, float]:
    """A short social post: polar, and the model is unsure of it."""
    title = f"$NWB {rng.choice(['to the moon', 'dumping hard', 'lol', 'bagholders again'])} {rng.randint(1, 99)}"
    label = rng.choices(["negative", "neutral", "positive"], [0.4, 0.15, 0.45])[0]
    return title, "en", label, rng.uniform(0.38, 0.65)


def german(rng: random.Random) -> tuple[str, str, str | None, float]:
    """Another language: the English model does not score it (no score row)."""
    return (
        " ".join(rng.choice(["Aktie", "Gewinn", "Quartal", "Bank", "steigt", "fällt"]) for _ in range(10)),
        "de",
        None,
        0.0,
    )


def spam(rng: random.Random) -> tuple[str, str, str, float]:
    """A pump-and-dump burst: near-identical confident positives."""
    return (
        f"BUY $XYZ NOW 1000% gains guaranteed join t.me/pump{rng.randint(1, 5)}",
        "en",
        "positive",
        rng.uniform(0.95, 0.99),
    )


SHIFTS = {"tweets": tweet, "language": german, "spam": spam}


def seed(engine, cfg: FinsentConfig, hours: int, shifted: dict[int, object] | None = None, rng_seed: int = 7) -> None:
    """PER_WINDOW documents per source and hour, with this model's scores; `shifted` maps an hour of the
    newswire to the generator that replaces its normal headlines (and triples its volume)."""
    rng = random.Random(rng_seed)
    shifted = shifted or {}
    with session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
        store.register_model(session, VERSION, name=VERSION, path="replay", labels=["negative", "neutral", "positive"])
        for h in range(hours):
            for src in ("newswire", "steady"):
                gen = shifted.get(h) if src == "newswire" else None
                n = PER_WINDOW * 3 if gen is spam else PER_WINDOW
                made = []
                for i in range(n):
                    title, lang, label, top = (gen or news)(rng)  # type: ignore[operator]
                    at = START + timedelta(hours=h, minutes=rng.randint(0, 59))
                    doc = s.Document(
                        source_name=src,
                        external_id=f"{src}-{h}-{i}",
                        content_hash=f"{src}-{h}-{i}",
                        title=title,
                        summary="",
                        published_at=at,
                        fetched_at=at,
                        language=lang,
                    )
                    made.append((doc, label, top, at))
                session.add_all([m[0] for m in made])
                session.flush()  # one round trip per source and hour: ids for the scores
                for doc, label, top, at in made:
                    if label is None:
                        continue
                    rest = (1 - top) / 2
                    probs = {k: (top if k == label else rest) for k in ("negative", "neutral", "positive")}
                    session.add(
                        s.Score(
                            document_id=doc.id,
                            model_version_id=VERSION,
                            label=label,
                            p_negative=probs["negative"],
                            p_neutral=probs["neutral"],
                            p_positive=probs["positive"],
                            probs=probs,
                            scored_at=at,
                        )
                    )


def replay(engine, cfg: FinsentConfig, hours: int) -> None:
    """The detect step's model check then the notify step, window after window."""
    for h in range(1, hours + 1):
        as_of = START + timedelta(hours=h)
        check_models(engine, cfg, as_of, VERSION)
        cycle.deliver_alerts(cfg, engine, now=as_of)


def model_alerts(engine) -> list[tuple[str, str, str | None]]:
    with session_scope(engine) as session:
        rows = session.scalars(select(s.Alert).where(s.Alert.scope_kind == "model").order_by(s.Alert.created_at)).all()
        return [(a.kind, a.scope_value, (a.details or {}).get("feature")) for a in rows]


@pytest.mark.parametrize(("shift", "feature"), [("tweets", None), ("language", "language"), ("spam", "label")])
def test_a_shifted_stream_raises_one_model_health_alert_then_a_resolution(
    engine,
    pg_url: str,
    tmp_path,
    monkeypatch,
    slack_webhook: Webhook,
    shift: str,
    feature: str | None,
) -> None:
    cfg = make_cfg()
    hours = 4 * 24
    seed(engine, cfg, hours, shifted=dict.fromkeys(range(72, 80), SHIFTS[shift]))
    replay(engine, cfg, hours)

    alerts = model_alerts(engine)
    assert [(k, src) for k, src, _ in alerts] == [("model_health", "newswire"), ("resolved", "newswire")], alerts
    if feature:
        assert alerts[0][2] == feature
    opened = json.dumps(slack_webhook.posts[0])
    assert "model output drifted on source newswire" in opened and "PSI" in opened and "chi-square p=" in opened
    assert len(slack_webhook.posts) == 2 and "back to its baseline" in json.dumps(slack_webhook.posts[1])
    with session_scope(engine) as session:
        W = s.ModelHealthWindow
        drifted = session.scalars(select(W.window_start).where(W.drifted.is_(True)).order_by(W.window_start)).all()
        steady = session.scalars(select(W.drifted).where(W.source_name == "steady", W.drifted.is_not(None))).all()
    assert drifted and all(START + timedelta(hours=72) <= t < START + timedelta(hours=80) for t in drifted)
    assert steady and not any(steady)  # the other source was judged all along and never drifted
    if shift == "spam":  # `finsent alerts show` tells it as the notice the sinks got, not as a news surge
        from typer.testing import CliRunner

        from pipeline.cli import app

        (tmp_path / "c.yaml").write_text(json.dumps({"database_url": pg_url}))
        monkeypatch.delenv("DATABASE_URL", raising=False)
        with session_scope(engine) as session:
            aid = session.scalars(select(s.Alert.id).where(s.Alert.kind == "model_health")).one()
        r = CliRunner().invoke(app, ["alerts", "show", aid, "-c", str(tmp_path / "c.yaml")], terminal_width=200)
        assert r.exit_code == 0 and "model output drifted on source newswire: label PSI" in r.output, r.output
        assert "news surge" not in r.output


def test_a_normal_week_raises_no_model_health_alert(engine, slack_webhook: Webhook) -> None:
    cfg = make_cfg()
    hours = 7 * 24
    seed(engine, cfg, hours, rng_seed=11)
    replay(engine, cfg, hours)
    assert model_alerts(engine) == []
    assert slack_webhook.posts == []
    with session_scope(engine) as session:
        judged = session.scalar(
            select(func.count()).select_from(s.ModelHealthWindow).where(s.ModelHealthWindow.drifted.is_not(None))
        )
    assert judged and judged > 2 * (
        hours - 48
    )  # both sources judged in (nearly) every window after the baseline filled


def test_psi_and_the_significance_check_both_gate_a_drift() -> None:
    mh = make_cfg().model_health
    base = {"a": 20, "b": 60, "c": 20}
    assert psi(base, {k: v * 10 for k, v in base.items()}) < 0.01
    few = compare("label", {"a": 8, "b": 5, "c": 7}, base, mh)  # a big PSI from 20 items is chance (p=0.016)
    assert few.psi > 0.25 and few.p_value > mh.alpha and not few.drifted
    many = compare("label", {"a": 20000, "b": 56000, "c": 24000}, {k: v * 1000 for k, v in base.items()}, mh)
    assert many.p_value < 1e-100 and many.psi < 0.02 and not many.drifted  # real but trivial on 100,000 items
    real = compare("label", {"a": 40, "b": 20, "c": 40}, {k: v * 5 for k, v in base.items()}, mh)
    assert real.drifted and real.psi > 0.25 and real.p_value < mh.alpha


def test_the_sustained_rule_is_validated_at_load() -> None:
    from pipeline.config import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match="sustained_k"):
        make_cfg(sustained_k=5, sustained_m=4)
    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / "finsent.yaml")
    assert cfg.model_health.sustained_k == 3 and cfg.model_health.psi_threshold == 0.25
