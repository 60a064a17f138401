"""Evaluation: metrics, baselines on the same splits, targets, report files, registry records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from pipeline.data import EVAL_SPLITS, build_splits
from pipeline.evaluate import (
    EvaluationError,
    evaluate_model,
    expected_calibration_error,
    record_in_model,
    split_result,
    write_report,
)
from pipeline.lexicon import finvader_label, lm_label, lm_words, vader_label
from pipeline.registry import bundled_baseline, list_models, promote, promote_if_better
from pipeline.score import ModelLoadError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ece_known_values() -> None:
    assert expected_calibration_error([[0.9, 0.1], [0.9, 0.1]], [0, 0]) == pytest.approx(0.1)
    assert expected_calibration_error([[0.6, 0.4]] * 5, [0, 0, 0, 1, 1]) == pytest.approx(0.0)
    assert expected_calibration_error([[1.0, 0.0]] * 4, [1, 1, 1, 1]) == pytest.approx(1.0)


def test_split_result_metrics_and_temperature() -> None:
    logits = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [4.0, 0, 0]])
    r = split_result([0, 1, 2, 1], [0, 1, 2, 0], ["negative", "neutral", "positive"], temperature=2.0, logits=logits)
    assert r.accuracy == 0.75 and r.confusion == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert r.per_class["neutral"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert r.ece_calibrated < r.ece  # softer probabilities fit a 75%-accurate model better


def test_lexicon_baselines() -> None:
    positive, negative = lm_words()  # the real LM master dictionary, not a hand-written list
    assert (len(positive), len(negative)) == (354, 2355)
    assert {"impairment", "restated", "litigation", "writedowns"} <= negative and "liability" not in negative
    assert {"tax", "cost", "crude"}.isdisjoint(negative)  # words generic lexicons call negative, LM does not
    assert lm_label("Operating profit improved and sales achieved a record") == "positive"
    assert lm_label("The company reported a loss and recorded an impairment") == "negative"
    assert lm_label("The results did not improve") == "negative"  # negated positive
    assert lm_label("The company is based in Espoo") == "neutral"
    assert vader_label("This is a great, wonderful result") == "positive"
    # FinVADER's financial lexicons know words plain VADER does not
    assert vader_label("Sales declined") == "neutral" and finvader_label("Sales declined") == "negative"


def test_evaluate_scores_model_and_baselines_on_the_same_splits(
    tiny_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    rep = evaluate_model(tiny_model, data_dir, command="finsent evaluate X")
    splits = build_splits(data_dir, seed=rep.split_seed)
    assert set(rep.results) == {"model", "vader", "finvader", "lm_dictionary", "tfidf_logreg"}
    for split in EVAL_SPLITS:
        assert rep.results["model"][split].n == len(splits.eval[split]) == rep.split_sizes[split]
        assert rep.results["tfidf_logreg"][split].n == len(splits.eval[split])
    assert "topic_dev" not in rep.results["vader"]
    assert rep.results["model"]["fpb_test"].accuracy >= 0.8
    assert rep.results["model"]["fpb_test"].ece_calibrated is not None
    by = {(t["split"], t["metric"]): t for t in rep.targets}
    assert by[("fpb_test", "accuracy")]["met"] == (rep.results["model"]["fpb_test"].accuracy >= 0.86)
    assert rep.baselines_beaten["vader"]["fpb_test"] is True
    md, js = write_report(rep, tmp_path / "docs")
    body = md.read_text()
    assert "finsent evaluate X" in body and "| tfidf_logreg |" in body and "## Targets" in body
    data = json.loads(js.read_text())
    assert data["command"] == "finsent evaluate X" and data["results"]["model"]["fpb_test"]["confusion"]
    # error analysis: the most confident mistakes, surest first, each really wrong, with its kind
    for r in rep.results["model"].values():
        wrong = sum(row[j] for i, row in enumerate(r.confusion) for j in range(len(row)) if i != j)
        assert len(r.mistakes) == min(20, wrong)
        assert [m["confidence"] for m in r.mistakes] == sorted((m["confidence"] for m in r.mistakes), reverse=True)
        assert all(m["true"] != m["predicted"] and m["kind"] and m["text"] for m in r.mistakes)
    assert "## Most confident mistakes" in body and data["results"]["model"]["fpb_test"]["mistakes"] == [
        {**m} for m in rep.results["model"]["fpb_test"].mistakes
    ]
    assert "## Long texts" in body and set(rep.long_text["accuracy"]) == {
        "headline alone",
        "title + lead (finsent's policy)",
        "mean of chunk scores",
    }


def test_error_kinds_say_what_went_wrong() -> None:
    from pipeline.evaluate import error_kind

    labels = ["negative", "neutral", "positive"]
    assert error_kind("Sales rose", "neutral", "positive", labels) == "neutral fact read as positive"
    assert error_kind("Sales did not fall", "positive", "neutral", labels) == "missed positive signal; negation"
    assert error_kind("Loss narrowed to EUR 0.4 mn from EUR 1.9 mn", "positive", "negative", labels, 0.7) == (
        "polarity flip (positive read as negative); figures compared, annotators split (label target 0.70)"
    )
    assert error_kind("$AAPL https://t.co/x", "negative", "neutral", labels) == "missed negative signal; tickers/links"
    assert error_kind("Fed holds", "Fed | Central Banks", "Macro", ["Fed | Central Banks", "Macro"]) == (
        "topic: Fed | Central Banks read as Macro"
    )


def test_evaluate_records_metrics_compares_production_and_ignores_feedback(
    pg_url: str, engine, tiny_model: Path, data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from pipeline.cli import app

    with engine.begin() as c:  # feedback must change no eval split
        c.execute(
            text(
                "INSERT INTO feedback (text, label, created_at) VALUES ('Totally new sentence about margins', "
                "'negative', now())"
            )
        )
    before = build_splits(data_dir).fingerprints
    monkeypatch.setenv("DATABASE_URL", pg_url)
    out = tmp_path / "docs"
    r = CliRunner().invoke(
        app,
        ["evaluate", str(tiny_model), "--data-dir", str(data_dir), "--out", str(out), "--promote", "--no-baselines"],
    )
    assert r.exit_code == 0, r.output
    # with no production model the gate compares with the bundled default, measured on the full data, not these splits
    assert (
        "targets met" in r.output
        and "NOT promoted" in r.output
        and "bundled default" in r.output
        and "different splits" in r.output
    )
    # --no-baselines scores none, so the report cannot claim they were all beaten
    assert "beaten on every split (accuracy and macro-F1): n/a" in (out / "model-evaluation.md").read_text()
    [m] = list_models(engine)
    assert not m.is_production and m.primary is not None
    promote(engine, m.id)
    rep = json.loads((out / "model-evaluation.json").read_text())
    assert {k: v for k, v in rep["fingerprints"].items() if k.startswith("split:")} == {
        k: v for k, v in before.items() if k.startswith("split:")
    }
    assert "finsent evaluate" in rep["command"]
    # a second version is compared against production in the same run; equal numbers are no promotion
    twin = tmp_path / "twin"
    shutil.copytree(tiny_model, twin)
    meta = json.loads((twin / "finsent.json").read_text())
    (twin / "finsent.json").write_text(json.dumps({**meta, "version": "twin-v2"}))
    rep2 = evaluate_model(twin, data_dir, engine=engine, baselines=False)
    prod = rep2.results[f"production ({m.id})"]
    assert prod["fpb_test"].accuracy == rep2.results["model"]["fpb_test"].accuracy
    d = promote_if_better(engine, "twin-v2")
    assert not d.promoted and d.incumbent == m.id


def test_record_in_model_gives_the_gate_a_baseline(
    tiny_model: Path, data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from pipeline.cli import app

    monkeypatch.delenv("DATABASE_URL", raising=False)
    model = tmp_path / "default"
    shutil.copytree(tiny_model, model)
    assert bundled_baseline(model)[1] is None
    run = CliRunner().invoke
    r = run(
        app,
        [
            "evaluate",
            str(model),
            "--data-dir",
            str(data_dir),
            "--out",
            str(tmp_path / "docs"),
            "--no-db",
            "--no-baselines",
            "--record-in-model",
            "--limit",
            "5",
        ],
    )
    assert r.exit_code == 2 and "--record-in-model needs the full splits" in r.output
    assert "eval" not in json.loads((model / "finsent.json").read_text()).get("metrics", {})
    r = run(
        app,
        [
            "evaluate",
            str(model),
            "--data-dir",
            str(data_dir),
            "--out",
            str(tmp_path / "docs"),
            "--no-db",
            "--no-baselines",
            "--record-in-model",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "docs" / "model-evaluation.json").read_text())
    version, metrics, why = bundled_baseline(model)
    assert why is None and version == report["version"]
    assert metrics["eval"]["fpb_test"]["macro_f1"] == report["results"]["model"]["fpb_test"]["macro_f1"]
    assert metrics["eval_fingerprints"] == {k: report["fingerprints"][f"split:{k}"] for k in EVAL_SPLITS}
    assert metrics["eval_command"] == report["command"]
    before = (model / "finsent.json").read_text()
    with pytest.raises(EvaluationError, match=f"report is for 'someone-else'.*{model}"):
        record_in_model({**report, "version": "someone-else"}, model)
    assert (model / "finsent.json").read_text() == before


def test_evaluate_missing_model_is_clear(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path / "absent")):
        evaluate_model(tmp_path / "absent", data_dir, baselines=False)
