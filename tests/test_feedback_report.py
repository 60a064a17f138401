"""The training run reports how many feedback rows it used and what they changed on the validation and dev splits
(issue #15, item 2); feedback never enters those splits. Tiny models on the miniature data keep it cheap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from pipeline.data import EVAL_SPLITS, VAL_SPLITS, FeedbackRow, build_splits
from pipeline.feedback import REPORT_SPLITS, feedback_effect, record_feedback_report
from pipeline.score import Scorer
from pipeline.train import TrainConfig, train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LIMIT = 12


def _rows(data_dir: Path) -> list[FeedbackRow]:
    splits = build_splits(data_dir)
    return [
        FeedbackRow(1, "Orion Paper said the mill closure wipes out the profit", "negative", None),
        FeedbackRow(2, "Kone Lifts stock jumps on a record order", "positive", None),
        FeedbackRow(3, splits.eval["fpb_test"][0].text, "positive", None),  # a test text: never trained on
        FeedbackRow(4, splits.val["tfns_val"][0].text.lower(), "negative", None),  # a validation text, other case
    ]


def test_feedback_effect_counts_rows_and_compares_each_split_with_the_reference(
    tmp_path: Path, data_dir: Path, tiny_base: Path, tiny_model_dir: Path
) -> None:
    rows = _rows(data_dir)
    out = tmp_path / "with-feedback"
    train_model(
        out,
        data_dir,
        TrainConfig(base=str(tiny_base), limit=LIMIT, max_steps=2, batch_size=64, max_length=32),
        feedback_rows=rows,
        progress=False,
    )
    meta = json.loads((out / "finsent.json").read_text())
    assert meta["data_sizes"]["feedback"] == 2 and meta["data_sizes"]["feedback_skipped"] == {"in_eval_split": 2}
    # the splits the report reads are those of the data files alone
    plain = build_splits(data_dir, limit=LIMIT)
    for split in (*EVAL_SPLITS, *VAL_SPLITS):
        assert meta["data_fingerprints"][f"split:{split}"] == plain.fingerprints[f"split:{split}"]

    rep = feedback_effect(out, tiny_model_dir, data_dir, rows, limit=LIMIT)
    assert rep.rows_used == 2 and rep.skipped == {"in_eval_split": 2} and rep.reference == "tiny-0"
    assert set(rep.splits) == set(REPORT_SPLITS)
    # every figure agrees with scoring both models independently
    new, ref = Scorer.load(str(out)), Scorer.load(str(tiny_model_dir))
    for name in REPORT_SPLITS:
        exs = {**plain.val, **plain.eval}[name]
        texts, y = [ex.text for ex in exs], [ex.sentiment for ex in exs]
        p_new = [p.label for p in new.score(texts)]
        p_ref = [p.label for p in ref.score(texts)]
        labels = ["negative", "neutral", "positive"]
        c = rep.splits[name]
        assert c.n == len(texts)
        right_new = sum(labels[t] == p for t, p in zip(y, p_new, strict=True))
        right_ref = sum(labels[t] == p for t, p in zip(y, p_ref, strict=True))
        assert (c.accuracy, c.accuracy_reference) == (
            pytest.approx(right_new / len(y)),
            pytest.approx(right_ref / len(y)),
        )
        assert c.flipped == sum(a != b for a, b in zip(p_new, p_ref, strict=True))
        assert c.fixed - c.broken == round((c.accuracy - c.accuracy_reference) * c.n)
    assert rep.agreement["n"] == 2 and 0 <= rep.agreement["model"] <= 2

    # stored where the registry reads it
    recorded = record_feedback_report(out, data_dir, rows, None)
    meta = json.loads((out / "finsent.json").read_text())
    assert meta["metrics"]["feedback"]["rows_used"] == recorded.rows_used == 2
    assert set(meta["metrics"]["feedback"]["splits"]) == set(REPORT_SPLITS)


def test_no_feedback_used_means_no_comparison(tmp_path: Path, data_dir: Path, tiny_model_dir: Path) -> None:
    splits = build_splits(data_dir)
    rows = [FeedbackRow(1, splits.eval["tfns_dev"][0].text, "negative", None)]
    rep = feedback_effect(tiny_model_dir, tiny_model_dir, data_dir, rows)
    assert rep.rows_used == 0 and rep.skipped == {"in_eval_split": 1} and not rep.splits
    assert rep.note == "no feedback rows used: nothing to compare"


def test_finsent_train_prints_and_registers_the_feedback_report(
    tmp_path: Path, data_dir: Path, tiny_base: Path, tiny_model_dir: Path, pg_url: str, engine, monkeypatch
) -> None:
    from pipeline.cli import app
    from pipeline.registry import register_trained
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    reference = register_trained(engine, tiny_model_dir)  # production: the reference the report compares with
    with engine.begin() as c:
        c.execute(text("UPDATE model_versions SET is_production = true WHERE id = :v"), {"v": reference})
        c.execute(
            text("INSERT INTO feedback (text, label, created_at) VALUES ('Acme said the order book collapsed', "
                 "'negative', now())")
        )  # fmt: skip
    monkeypatch.setenv("DATABASE_URL", pg_url)
    out = tmp_path / "cli-model"
    args = ["train", "--out", str(out), "--base", str(tiny_base), "--data-dir", str(data_dir), "--limit", str(LIMIT),
            "--max-steps", "2", "--epochs", "1", "--no-held-out"]  # fmt: skip
    r = CliRunner().invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "feedback: 1 rows used for training (skipped: none)" in r.output, r.output
    assert f"what changed against {reference}" in r.output and "tfns_dev" in r.output, r.output
    assert "analyst labels matched:" in r.output
    version = json.loads((out / "finsent.json").read_text())["version"]
    with session_scope(engine) as session:
        metrics = session.get(s.ModelVersion, version).metrics
    assert metrics["feedback"]["rows_used"] == 1 and metrics["feedback"]["reference"] == reference
    assert set(metrics["feedback"]["splits"]) == set(REPORT_SPLITS)


def test_the_train_task_records_the_feedback_report(
    tmp_path: Path, data_dir: Path, tiny_base: Path, pg_url: str, engine, monkeypatch
) -> None:
    """The finsent_train DAG's task (called as Airflow calls it, minus Airflow) stores the report in the registry."""
    from pipeline import orchestrate
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    with engine.begin() as c:
        c.execute(text("INSERT INTO feedback (text, label, created_at) VALUES ('Acme cuts jobs', 'negative', now())"))
    cfg = tmp_path / "finsent.yaml"
    cfg.write_text(json.dumps({"data_dir": str(data_dir)}))
    monkeypatch.setenv("FINSENT_CONFIG", str(cfg))
    monkeypatch.setenv("DATABASE_URL", pg_url)
    done = orchestrate.train_candidate(
        str(tmp_path / "candidates"), base=str(tiny_base), limit=LIMIT, max_steps=2, epochs=1
    )
    with session_scope(engine) as session:
        feedback = session.get(s.ModelVersion, done["version"]).metrics["feedback"]
    assert feedback["rows_used"] == 1 and set(feedback["splits"]) == set(REPORT_SPLITS)
    assert feedback["reference"]  # no production model: the bundled default
