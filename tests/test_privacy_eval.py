"""Masking must not change sentiment, shown (issue #15, item 3): `finsent evaluate MODEL --masking` scores the FPB
test and TFNS dev splits as written and after ingest's masking, and reports both accuracies, the difference and
how many texts masking changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.config import PrivacyConfig, WatchlistEntity
from pipeline.data import Example, Splits, build_splits
from pipeline.ingest import personal_data_masker
from pipeline.privacy_eval import masking_effect
from pipeline.score import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WATCHLIST = [WatchlistEntity(ticker="NWB", name="Northwind Bank", aliases=["Northwind"])]
TWEETS = [
    ("$NWB plunges, ask @bagholder_99 or mail jane.doe@example.com", 0),
    ("@NorthwindBank confirms the dividend, $NWB up 2.5%", 2),
    ("Call 415-555-0142 for $NWB picks, profits soar", 2),
    ("Northwind Bank results in line with guidance", 1),
    ("$NWB flat today", 1),
]


def test_only_changed_texts_differ_and_scores_match_full_rescoring(tiny_model_dir: Path) -> None:
    splits = Splits(
        seed=0,
        topics=[],
        train=[],
        val={},
        eval={
            "fpb_test": [Example("Northwind Bank said profit rose .", sentiment=2)],
            "tfns_dev": [Example(t, sentiment=y) for t, y in TWEETS],
        },
    )
    mask = personal_data_masker(PrivacyConfig(), WATCHLIST)
    scorer = Scorer.load(str(tiny_model_dir))
    res = masking_effect(scorer, splits, mask)
    assert res["fpb_test"].changed == 0 and res["fpb_test"].accuracy == res["fpb_test"].accuracy_masked
    tweets = res["tfns_dev"]
    assert (tweets.n, tweets.changed) == (5, 2)  # the company's own handle is kept
    masked = [e["masked"] for e in tweets.examples]
    assert sorted(masked) == ["$NWB plunges, ask @user or mail [email]", "Call [phone] for $NWB picks, profits soar"]
    # the shortcut (rescore only what changed) gives what scoring every masked text would
    labels = ["negative", "neutral", "positive"]
    full = [p.label for p in scorer.score([mask(t) for t, _ in TWEETS])]
    assert tweets.accuracy_masked == pytest.approx(
        sum(labels[y] == p for (_, y), p in zip(TWEETS, full, strict=True)) / 5
    )
    plain = [p.label for p in scorer.score([t for t, _ in TWEETS])]
    assert tweets.accuracy == pytest.approx(sum(labels[y] == p for (_, y), p in zip(TWEETS, plain, strict=True)) / 5)
    assert tweets.flipped == sum(a != b for a, b in zip(plain, full, strict=True))


def test_cli_writes_the_report_with_its_command(tmp_path: Path, data_dir: Path, tiny_model_dir: Path, monkeypatch):
    from pipeline.cli import app

    data = tmp_path / "data"
    data.mkdir()
    for f in data_dir.rglob("*"):
        if f.is_file():
            (data / f.relative_to(data_dir)).parent.mkdir(parents=True, exist_ok=True)
            (data / f.relative_to(data_dir)).write_bytes(f.read_bytes())
    extra = [f'"$TICK{i} dip bought, thanks @trader_{i} (mail me: t{i}@example.com)",1\n' for i in range(40)]
    with (data / "tfns/sent_train.csv").open("a", encoding="utf-8") as fh:
        fh.writelines(extra)
    expected = sum("@" in ex.text for ex in build_splits(data).eval["tfns_dev"])
    assert expected  # some of the added tweets fall in the dev split
    monkeypatch.delenv("FINSENT_CONFIG", raising=False)
    out = tmp_path / "docs"
    r = CliRunner().invoke(
        app,
        ["evaluate", str(tiny_model_dir), "--masking", "--data-dir", str(data), "--out", str(out)],
        terminal_width=200,
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "masking-evaluation.json").read_text())
    assert report["splits"]["tfns_dev"]["changed"] == expected
    assert report["splits"]["fpb_test"]["changed"] == 0
    md = (out / "masking-evaluation.md").read_text()
    assert f"finsent evaluate {tiny_model_dir} --data-dir {data} --out {out} --masking\n" in md
    assert "@trader_" not in md and "@example.com" not in md  # the report shows the masked texts only
    assert ("target (unchanged within 0.5 point on each split): met" in r.output) == report["met"]
    r = CliRunner().invoke(app, ["evaluate", str(tiny_model_dir), "--masking", "--promote"])
    assert r.exit_code == 2 and "--masking measures masking only" in r.output, r.output
