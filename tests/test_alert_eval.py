"""The synthetic replay and the `finsent alerts` commands (list/show/ack against the real Postgres)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import select
from typer.testing import CliRunner

from pipeline.alert_eval import (
    ScopeProfile,
    Spike,
    _oracle_alerts,
    _oracle_tests,
    _OracleSeries,
    db_replay_check,
    evaluate_detector,
    family_profiles,
    make_family_stream,
    make_stream,
)
from pipeline.cli import app
from pipeline.config import DetectConfig
from pipeline.detect import DetectorParams, SeriesStats, event_at
from pipeline.notify import deliver_pending
from pipeline.records import AlertKind
from pipeline.store import schema as s
from pipeline.store import session_scope
from tests.test_notify import NOW, add_alert, make_cfg

runner = CliRunner()


def test_replay_is_deterministic_and_measures_the_detector() -> None:
    a = evaluate_detector(DetectConfig(), seeds=(11,), scopes=6, weeks=2, db_check=False)
    b = evaluate_detector(DetectConfig(), seeds=(11,), scopes=6, weeks=2, db_check=False)
    assert (a.recall_3sd, a.false_alerts_per_scope_week, a.precision) == (
        b.recall_3sd,
        b.false_alerts_per_scope_week,
        b.precision,
    )
    assert a.spikes_total > 20 and a.spikes_3sd > 5
    assert (
        0.5 <= a.recall_3sd <= 1 and a.false_alerts_per_scope_week <= 2
    )  # 12 scope-weeks: the report measures the target
    assert a.recall_by_local_sd["6-8.01"]["recall"] >= a.recall_by_local_sd["1-2"]["recall"]
    # Counted surges by injected size: a subset of the counted surges, and of all surges of that size.
    by_size = a.recall_3sd_by_local_sd
    assert sum(v["spikes"] for v in by_size.values()) == a.spikes_3sd
    assert all(by_size[b]["spikes"] <= a.recall_by_local_sd[b]["spikes"] for b in by_size)
    # A detector that can never fire finds nothing: the metrics respond to the detector.
    blind = evaluate_detector(DetectConfig(min_volume=10_000), seeds=(11,), scopes=6, weeks=2, db_check=False)
    assert blind.recall_3sd == 0 and blind.quiet_false_alerts == 0
    # Several seeds pool their spikes; each seed is reported on its own too.
    c = evaluate_detector(DetectConfig(), seeds=(12,), scopes=6, weeks=2, db_check=False)
    both = evaluate_detector(DetectConfig(), seeds=(11, 12), scopes=6, weeks=2, db_check=False)
    assert (
        both.spikes_total == a.spikes_total + c.spikes_total
        and both.quiet_false_alerts == a.quiet_false_alerts + c.quiet_false_alerts
    )
    assert [x["seed"] for x in both.per_seed] == [11, 12] and both.per_seed[0]["recall_3sd"] == a.recall_3sd


def test_oracle_keeps_the_detectors_episode_rules_and_its_false_alert_rate() -> None:
    # The one-pass episode scan the oracle uses alerts where event_at does, on random hot/warm/critical runs.
    p = DetectorParams.from_config(DetectConfig())
    rng = np.random.default_rng(3)
    T = 600
    for _ in range(20):
        pv = np.where(rng.random(T) < 0.06, 10 ** rng.uniform(-9, -2, T), rng.uniform(0.01, 1, T))
        hot = pv <= 3e-3
        warm = hot | (rng.random(T) < 0.1)  # episodes shorter than the lookback (event_at re-alerts after it)
        crit = pv <= 1e-6
        zero = np.zeros(T)
        st = SeriesStats(zero, zero, pv, zero, zero, zero, zero, hot, warm, crit)
        want = [t for t in range(100, T) if (ev := event_at(st, t, p)) is not None and ev.kind != AlertKind.RESOLVED]
        got = _oracle_alerts(_OracleSeries(p_min=np.where(hot, pv, 1.0), warm=warm, critical=crit), 3e-3, p, 100)
        assert got == want
    # Its tests are calibrated on quiet streams: about 1 % of windows at p <= 0.01 (share test given n, count
    # test given the other items), on the burstiest family.
    rng = np.random.default_rng(5)
    share_p, count_p = [], []
    for prof in family_profiles(rng, "adversarial", 12):
        st = make_family_stream(rng, "adversarial", prof, 1500, 60)
        tests = _oracle_tests(st, p)
        share_p.append(tests["share"][st.n >= 5])
        count_p.append(tests["count"])
    for pv in (np.concatenate(share_p), np.concatenate(count_p)):
        assert len(pv) > 5000 and 0.006 <= float(np.mean(pv <= 0.01)) <= 0.012  # a moment-matched count test: 0.013
        assert 0.0015 <= float(np.mean(pv <= 0.003)) <= 0.0045  # near the warning levels the oracle runs at
    # The oracle's warning level is set to the detector's false-alert rate on the quiet streams, and 1 a
    # scope-week allows at least as much recall as any lower rate.
    r = evaluate_detector(DetectConfig(), family="realistic", seeds=(11,), scopes=8, weeks=2, db_check=False)
    same, one = r.oracle["at_detector_false_alert_rate"], r.oracle["at_1_false_alert_per_scope_week"]
    if math.isnan(same["warning_p"]):  # the detector's rate was below anything the oracle can go down to
        assert math.isnan(same["recall_3sd"])
    else:
        assert same["false_alerts_per_scope_week"] <= r.false_alerts_per_scope_week + 1e-9
        assert 0 <= same["recall_3sd"] <= 1
        assert one["false_alerts_per_scope_week"] <= 1.0 and (
            one["warning_p"] >= same["warning_p"] or r.false_alerts_per_scope_week > 1
        )


def test_database_path_gives_the_same_alerts_as_the_replay() -> None:
    rng = np.random.default_rng(5)
    d = DetectConfig()
    prof = ScopeProfile(mean_volume=25, share=0.15, cycle_amplitude=0.5, peak_hour=13)
    stream = make_stream(rng, prof, 24 * 7 * 3, 60)
    onset = 24 * 7 * 2 + 10
    stream.n[onset : onset + 2] += 30
    stream.k[onset : onset + 2] += 30
    stream.spikes.append(Spike(scope=0, onset=onset, length=2, extra_per_window=(30, 30), local_sd=8.0))
    out = db_replay_check(stream, d, windows=14)
    assert out["identical"] is True
    assert out["db_events"] >= 1  # the slice holds the spike, so both paths had something to agree on


def test_evaluate_command_writes_the_report(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "alerts",
            "evaluate",
            "--out-dir",
            str(tmp_path),
            "--seed",
            "3",
            "--seed",
            "4",
            "--scopes",
            "4",
            "--weeks",
            "1",
            "--no-db-check",
            "--warning-p",
            "0.006",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "recall (counted surges" in res.output and "false alerts per scope per week" in res.output
    assert res.output.count("oracle (true share, volume and noise): recall") == 3
    assert [line for line in res.output.splitlines() if line.startswith("[")] == [
        "[baseline]",
        "[realistic]",
        "[adversarial]",
    ]
    data = json.loads((tmp_path / "alert-evaluation.json").read_text())
    assert data["detector"]["warning_p"] == 0.006 and data["scopes"] == 4 and data["seeds"] == [3, 4]
    assert data["tuning_seeds"] == [7, 11] and not set(data["tuning_seeds"]) & set(data["seeds"])
    assert set(data["families"]) == {"baseline", "realistic", "adversarial"}
    for fam in data["families"].values():
        assert {
            "recall_3sd",
            "precision",
            "false_alerts_per_scope_week",
            "median_delay_windows_3sd",
            "recall_3sd_by_volume",
            "oracle",
        } <= set(fam)
    md = (tmp_path / "alert-evaluation.md").read_text()
    assert "finsent alerts evaluate" in md and "--warning-p 0.006" in md and "--seed 3 --seed 4" in md and "| 4 |" in md
    assert "oracle recall at 1 false alert / scope-week" in md and md.count("| oracle: recall of counted surges") == 6
    assert md.count("Where it still fails:") == 3 and "## Family `adversarial`" in md
    bad = runner.invoke(app, ["alerts", "evaluate", "--out-dir", str(tmp_path), "--warning-p", "2"])
    assert bad.exit_code == 2 and "warning_p" in bad.output
    fam = runner.invoke(app, ["alerts", "evaluate", "--out-dir", str(tmp_path), "--family", "calm"])
    assert fam.exit_code == 2 and "unknown stream family 'calm'" in fam.output


def test_no_oracle_skips_only_the_oracle(tmp_path: Path) -> None:
    args = [
        "alerts",
        "evaluate",
        "--seed",
        "5",
        "--scopes",
        "3",
        "--weeks",
        "1",
        "--no-db-check",
        "--family",
        "realistic",
    ]
    full = runner.invoke(app, [*args, "--out-dir", str(tmp_path / "full")])
    fast = runner.invoke(app, [*args, "--out-dir", str(tmp_path / "fast"), "--no-oracle"])
    assert full.exit_code == 0 and fast.exit_code == 0, full.output + fast.output
    assert "oracle (true share" in full.output and "oracle (true share" not in fast.output
    a, b = (
        json.loads((tmp_path / d / "alert-evaluation.json").read_text())["families"]["realistic"]
        for d in ("full", "fast")
    )
    assert a["oracle"] and b["oracle"] == {}
    for key in ("recall_3sd", "false_alerts_per_scope_week", "spikes_3sd", "precision"):
        assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key])  # the detector's figures are untouched
    md = (tmp_path / "fast" / "alert-evaluation.md").read_text()
    full_md = (tmp_path / "full" / "alert-evaluation.md").read_text()
    assert "--no-oracle" in md.splitlines()[2] and "--no-oracle" not in full_md.splitlines()[2]
    assert "not run" not in full_md
    assert md.count("not run (--no-oracle)") == 2 and "| not run | not run |" in md


def test_list_show_ack_and_acked_alerts_are_not_sent(engine, pg_url: str, monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.delenv("FINSENT_CONFIG", raising=False)
    aid = add_alert(engine)
    with session_scope(engine) as session:
        session.execute(
            s.Alert.__table__.update().values(
                window_end=datetime.now(UTC), window_start=datetime.now(UTC) - timedelta(hours=1)
            )
        )
    listed = runner.invoke(app, ["alerts", "list"])
    assert listed.exit_code == 0, listed.output
    assert aid[:12] in listed.output and "critical" in listed.output and "80% vs 15%" in listed.output

    shown = runner.invoke(app, ["alerts", "show", aid[:8]])
    assert shown.exit_code == 0, shown.output
    assert "[CRITICAL] entity NWB: negative news surge" in shown.output and "Deliveries: none yet" in shown.output
    assert runner.invoke(app, ["alerts", "show", "nope-not-an-id"]).exit_code == 1

    acked = runner.invoke(app, ["alerts", "ack", aid, "--by", "risk-desk"])
    assert acked.exit_code == 0 and "acknowledged" in acked.output, acked.output
    with session_scope(engine) as session:
        row = session.get(s.Alert, aid)
        assert row.acknowledged_by == "risk-desk" and row.acknowledged_at is not None
    report = deliver_pending(engine, make_cfg(sinks=[{"name": "console", "kind": "console"}]), now=NOW)
    assert report.sent == 0
    with session_scope(engine) as session:
        assert session.scalars(select(s.AlertDelivery)).all() == []
    assert "already acknowledged" in runner.invoke(app, ["alerts", "ack", aid]).output


def test_list_filters_operational_alerts_by_their_scope(engine, pg_url: str, monkeypatch) -> None:
    """`alerts list --scope` takes every scope an alert can have, operational ones included (before, only the
    four sentiment scopes: a dead source's alert could not be listed on its own)."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.delenv("FINSENT_CONFIG", raising=False)
    spike = add_alert(engine)
    health = add_alert(engine, kind="source_health", severity="warning", scope=("health", "newswire"), suffix="h")
    with session_scope(engine) as session:
        session.execute(
            s.Alert.__table__.update().values(
                window_end=datetime.now(UTC), window_start=datetime.now(UTC) - timedelta(hours=1)
            )
        )
    listed = runner.invoke(app, ["alerts", "list", "--scope", "HEALTH"])
    assert listed.exit_code == 0, listed.output
    assert health[:12] in listed.output and spike[:12] not in listed.output
    listed = runner.invoke(app, ["alerts", "list", "--scope", "entity"])
    assert listed.exit_code == 0 and spike[:12] in listed.output and health[:12] not in listed.output
    bad = runner.invoke(app, ["alerts", "list", "--scope", "sector"])
    assert bad.exit_code == 2 and "sector" in bad.output
