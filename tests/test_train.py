"""Training: end to end on CPU with a tiny model, the fixed splits, feedback into training only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from pipeline.data import (
    EVAL_SPLITS,
    DataError,
    Example,
    FeedbackRow,
    build_splits,
    eval_texts,
    feedback_examples,
    load_feedback_rows,
    normalise,
)
from pipeline.train import TrainConfig, TrainError, default_base, train_model
from tests.train_support import TINY, TOPICS, _sentences, make_data_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_splits_fixed_across_runs_and_file_order(tmp_path: Path, data_dir: Path) -> None:
    a = build_splits(data_dir, seed=7)
    b = build_splits(data_dir, seed=7)
    c = build_splits(make_data_dir(tmp_path, shuffle_seed=99), seed=7)  # same rows, other order
    for split in EVAL_SPLITS:
        assert [e.text for e in a.eval[split]] == [e.text for e in b.eval[split]]
        assert sorted(e.text for e in a.eval[split]) == sorted(e.text for e in c.eval[split])
        assert a.fingerprints[f"split:{split}"] == b.fingerprints[f"split:{split}"]
    assert build_splits(data_dir, seed=8).fingerprints["split:fpb_test"] != a.fingerprints["split:fpb_test"]
    # stratified 20% test, AllAgree subset inside it, no eval text in training
    n_fpb = len(_sentences()) + 1
    assert abs(len(a.eval["fpb_test"]) - 0.2 * n_fpb) <= 3
    assert {e.text for e in a.eval["fpb_allagree_test"]} <= {e.text for e in a.eval["fpb_test"]}
    assert not {normalise(e.text) for e in a.train} & eval_texts(a)
    assert any("Hämeenlinna" in e.text for e in a.train + a.eval["fpb_test"] + a.val["fpb_val"])


def test_missing_data_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "tfn_topic" / "classes.txt")):
        build_splits(tmp_path)


def test_training_runs_end_to_end_and_changes_predictions(tiny_model: Path, tiny_base: Path, data_dir: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from pipeline.score import Scorer

    meta = json.loads((tiny_model / "finsent.json").read_text())
    assert meta["topics"] == TOPICS and meta["split_seed"] and meta["data_fingerprints"]["split:fpb_test"]
    assert meta["temperature"] > 0 and meta["topic_temperature"] > 0
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        # safetensors' safe_open is not a dict: it has keys() but is not iterable
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    # fp16 encoder; the classifier with the temperature folded in stays fp32 (pipeline.model_folder)
    assert {d for k, d in dtypes.items() if not k.startswith("classifier.")} == {torch.float16}
    assert dtypes["classifier.weight"] == dtypes["classifier.bias"] == torch.float32
    assert meta["temperature_folded"] is True
    scorer = Scorer.load(str(tiny_model))
    assert scorer.version == meta["version"] and scorer.topics == TOPICS

    splits = build_splits(data_dir, seed=meta["split_seed"])
    tests = splits.eval["fpb_test"]
    preds = scorer.score([e.text for e in tests])
    acc = sum(
        p.label == ("negative", "neutral", "positive")[e.sentiment] for p, e in zip(preds, tests, strict=True)
    ) / len(tests)
    torch.manual_seed(TrainConfig().seed)
    untrained = AutoModelForSequenceClassification.from_pretrained(str(tiny_base), num_labels=3).eval()
    enc = scorer.tokenizer([e.text for e in tests], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = untrained(**enc).logits.argmax(1).tolist()
    acc_before = sum(y == e.sentiment for y, e in zip(before, tests, strict=True)) / len(tests)
    assert acc >= 0.8 > acc_before + 0.2
    topics = splits.eval["topic_dev"]
    tpreds = scorer.score([e.text for e in topics])
    assert sum(p.topic == TOPICS[e.topic] for p, e in zip(tpreds, topics, strict=True)) / len(topics) >= 0.8


def test_real_minilm_trains_on_a_few_dozen_examples(tmp_path: Path, data_dir: Path) -> None:
    from pipeline.score import Scorer

    out = tmp_path / "minilm"
    texts = [
        "Acme said operating profit rose sharply in quarter 1 .",
        "Acme said operating loss widened badly in quarter 1 .",
    ]
    res = train_model(
        out, data_dir, TrainConfig(limit=10, max_steps=4, batch_size=8, lr=1e-4, max_length=32), progress=False
    )
    assert res.version.startswith("finsent-minilm-") and res.output_dir == out
    size = (out / "model.safetensors").stat().st_size
    assert 30e6 < size < 60e6  # fp16 MiniLM
    trained = Scorer.load(str(out)).logits(texts)[0]
    base = Scorer.load(str(out))
    assert base.version == res.version
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(TrainConfig().seed)
    fresh = AutoModelForSequenceClassification.from_pretrained(default_base(), num_labels=3).eval()
    with torch.no_grad():
        before = fresh(**base.tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    assert abs(trained - before).max() > 1e-3


def test_examples_train_only_the_head_they_have_a_label_for(tiny_base: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.data import Example
    from pipeline.train import JointModel, _encode, joint_loss

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model = JointModel(AutoModelForSequenceClassification.from_pretrained(str(tiny_base), num_labels=3), 4, 0.0)
    for batch, quiet in (
        ([Example("a tweet", topic=1), Example("another", topic=2)], "seq.classifier"),
        ([Example("profit rose", sentiment=2)], "topic_head"),
    ):
        model.zero_grad(set_to_none=True)
        enc, ys, yt = _encode(tok, batch, 16, "cpu")
        joint_loss(*model(**enc), ys, yt, 0.5).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is None or not g.any() for n, g in grads.items() if n.startswith(quiet))
        assert any(g is not None and g.any() for n, g in grads.items() if n.startswith("seq.bert.encoder"))


def test_cpu_training_is_reproducible(tmp_path: Path, data_dir: Path, tiny_base: Path) -> None:
    from safetensors.torch import load_file

    cfg = TrainConfig(base=str(tiny_base), limit=12, max_steps=3, batch_size=8, max_length=32, lr=1e-3)
    a = train_model(tmp_path / "a", data_dir, cfg, progress=False)
    b = train_model(tmp_path / "b", data_dir, cfg, progress=False)
    wa, wb = load_file(str(a.output_dir / "model.safetensors")), load_file(str(b.output_dir / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa) and a.metrics == b.metrics


def test_bad_base_is_a_clear_error(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(TrainError, match=str(tmp_path / "no-such-base")):
        train_model(
            tmp_path / "out",
            data_dir,
            TrainConfig(base=str(tmp_path / "no-such-base"), limit=4, max_steps=1),
            progress=False,
        )


def test_feedback_filtering_never_touches_eval_texts(data_dir: Path) -> None:
    splits = build_splits(data_dir)
    eval_text = splits.eval["fpb_test"][0].text
    rows = [
        FeedbackRow(1, "Brand new analyst sentence about margins", "negative", None),
        FeedbackRow(2, eval_text.upper(), "positive", None),  # same text, other case: still excluded
        FeedbackRow(3, "A tweet about the Fed", None, "macro"),
        FeedbackRow(4, "Bad label", "bullish-ish", None),
        FeedbackRow(5, "", "negative", None),
    ]
    exs, skipped = feedback_examples(rows, splits.topics, eval_texts(splits))
    assert [(e.text, e.sentiment, e.topic) for e in exs] == [
        ("Brand new analyst sentence about margins", 0, None),
        ("A tweet about the Fed", None, 2),
    ]
    assert skipped == {"in_eval_split": 1, "unknown_label": 1, "no_text": 1}


def test_feedback_rows_from_postgres_reach_training_not_evaluation(
    pg_url: str, engine, tmp_path: Path, data_dir: Path, tiny_base: Path
) -> None:
    splits = build_splits(data_dir)
    eval_text = splits.eval["tfns_dev"][0].text
    with engine.begin() as c:
        c.execute(text("INSERT INTO sources (name, kind, url, created_at) VALUES ('wire', 'rss', 'http://x', now())"))
        doc_id = c.execute(
            text(
                "INSERT INTO documents (source_name, external_id, content_hash, title, summary, published_at, "
                "fetched_at) "
                "VALUES ('wire', 'g1', 'h', 'Orion Paper cuts 300 jobs', 'Mill closes.', now(), now()) RETURNING id"
            )
        ).scalar_one()
        c.execute(
            text("INSERT INTO feedback (document_id, text, label, created_at) VALUES (:d, NULL, 'negative', now())"),
            {"d": doc_id},
        )
        c.execute(
            text(
                "INSERT INTO feedback (text, label, topic, created_at) VALUES ('Kone Lifts stock jumps', 'positive', "
                "'Stock Movement', now())"
            )
        )
        c.execute(
            text("INSERT INTO feedback (text, label, created_at) VALUES (:t, 'negative', now())"), {"t": eval_text}
        )
    rows = load_feedback_rows(pg_url)
    assert sorted(r.text for r in rows) == sorted(
        ["Orion Paper cuts 300 jobs. Mill closes.", "Kone Lifts stock jumps", eval_text]
    )

    seen: list[str] = []
    out = tmp_path / "fb"
    res = train_model(
        out,
        data_dir,
        TrainConfig(base=str(tiny_base), limit=6, max_steps=2, batch_size=64, max_length=32),
        database_url=pg_url,
        progress=False,
        on_eval=lambda r: seen.append("eval"),
    )
    meta = json.loads((out / "finsent.json").read_text())
    assert res.feedback_used == 2
    assert meta["data_sizes"]["feedback"] == 2 and meta["data_sizes"]["feedback_skipped"] == {"in_eval_split": 1}
    again = build_splits(data_dir, limit=6)
    for split in EVAL_SPLITS:
        assert meta["data_fingerprints"][f"split:{split}"] == again.fingerprints[f"split:{split}"]
    assert seen


def test_cli_train_with_limit(tmp_path: Path, data_dir: Path, tiny_base: Path, pg_url: str, monkeypatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.registry import list_models

    monkeypatch.setenv("DATABASE_URL", pg_url)
    out = tmp_path / "cli-model"
    r = CliRunner().invoke(
        app,
        [
            "train",
            "--out",
            str(out),
            "--base",
            str(tiny_base),
            "--data-dir",
            str(data_dir),
            "--limit",
            "8",
            "--max-steps",
            "2",
            "--epochs",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (out / "topic_head.safetensors").exists() and "registered" in r.output
    assert "held-out splits" in r.output and "FPB 50Agree test" in r.output
    from pipeline.store import make_engine

    eng = make_engine(pg_url)
    try:
        [m] = list_models(eng)
        assert m.path == str(out.resolve()) and not m.is_production
        assert m.primary is None  # --limit runs never record held-out metrics
    finally:
        eng.dispose()
    shutil.rmtree(out)


def test_soft_labels_follow_annotator_agreement(tmp_path: Path, data_dir: Path, tiny_base: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    from pipeline.data import FPB_50_TARGET, build_splits, normalise, read_phrasebank
    from pipeline.train import joint_loss

    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    fpb = read_phrasebank(d / "financial_phrasebank/Sentences_50Agree.txt")
    (d / "financial_phrasebank/Sentences_75Agree.txt").write_text(
        "".join(f"{t}@{['negative', 'neutral', 'positive'][y]}\n" for t, y in fpb[:30]), encoding="utf-8"
    )
    allagree = {normalise(t) for t, _ in read_phrasebank(d / "financial_phrasebank/Sentences_AllAgree.txt")}
    sp = build_splits(d)
    fpb_train = [ex for ex in sp.train if ex.source == "fpb"]
    for ex in fpb_train:
        t = normalise(ex.text)
        expected = 1.0 if t in allagree else 0.87 if t in {normalise(x) for x, _ in fpb[:30]} else FPB_50_TARGET
        assert ex.agreement == expected, ex.text
    assert {ex.agreement for ex in fpb_train} == {1.0, 0.87, FPB_50_TARGET}
    assert all(ex.agreement == 1.0 for split in sp.eval.values() for ex in split)  # evaluation keeps hard labels
    assert all(ex.agreement == 1.0 for ex in sp.train if ex.source != "fpb")

    ys, yt = torch.tensor([0]), torch.tensor([-100])
    sure, unsure = torch.tensor([[6.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]])
    hard = joint_loss(sure, torch.zeros(1, 4), ys, yt, 0.5)
    assert torch.isclose(joint_loss(sure, torch.zeros(1, 4), ys, yt, 0.5, torch.tensor([1.0])), hard)
    soft = torch.tensor([FPB_50_TARGET])
    # With a 0.58 target a near-certain prediction costs more than a hesitant one; with a hard label, less.
    assert joint_loss(sure, torch.zeros(1, 4), ys, yt, 0.5, soft) > joint_loss(
        unsure, torch.zeros(1, 4), ys, yt, 0.5, soft
    )
    assert hard < joint_loss(unsure, torch.zeros(1, 4), ys, yt, 0.5)

    cfg = TrainConfig(base=str(tiny_base), limit=12, max_steps=3, batch_size=8, max_length=32, lr=1e-3)
    a = train_model(tmp_path / "hard", d, cfg, progress=False)
    b = train_model(tmp_path / "soft", d, TrainConfig(**{**cfg.__dict__, "soft_labels": True}), progress=False)
    wa, wb = load_file(str(a.output_dir / "model.safetensors")), load_file(str(b.output_dir / "model.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the soft targets reached the gradient
    assert json.loads((b.output_dir / "finsent.json").read_text())["hyperparameters"]["soft_labels"] is True


def test_continuing_from_a_finsent_model_keeps_its_topic_head(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from pipeline.train import JointModel, _load_topic_head

    saved = load_file(str(tiny_model / "topic_head.safetensors"))
    n_topics = saved["weight"].shape[0]
    model = JointModel(AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=3), n_topics, 0.0)
    assert not torch.allclose(model.topic_head.weight, saved["weight"].float())
    _load_topic_head(model, tiny_model)
    assert torch.equal(model.topic_head.weight, saved["weight"].float()) and torch.equal(
        model.topic_head.bias, saved["bias"].float()
    )
    other = JointModel(
        AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=3), n_topics + 1, 0.0
    )
    before = other.topic_head.weight.clone()
    _load_topic_head(other, tiny_model)
    assert torch.equal(other.topic_head.weight, before) and "does not fit" in caplog.text


def test_a_continued_model_keeps_the_recipe_of_every_stage(tmp_path: Path, tiny_model: Path, data_dir: Path) -> None:
    """Bundling a continued model (a distilled student) replaces the folder it started from: the stages it came
    from, newest first, stay in its own finsent.json."""
    from pipeline.train import lineage

    first = json.loads((tiny_model / "finsent.json").read_text())
    assert first["lineage"] == []  # trained from a base encoder, not from a finsent model
    assert lineage("") == lineage("sentence-transformers/all-MiniLM-L6-v2") == lineage(str(tmp_path / "gone")) == []
    a, b = tmp_path / "a", tmp_path / "b"
    train_model(a, data_dir, TrainConfig(base=str(tiny_model), name="a", max_steps=2, **TINY), progress=False)
    train_model(b, data_dir, TrainConfig(base=str(a), name="b", max_steps=2, **TINY), progress=False)
    meta_a = json.loads((a / "finsent.json").read_text())
    stages = json.loads((b / "finsent.json").read_text())["lineage"]
    assert [x["version"] for x in stages] == [meta_a["version"], first["version"]]
    assert stages[0]["hyperparameters"] == meta_a["hyperparameters"] and stages[0]["hyperparameters"]["base"] == str(
        tiny_model
    )
    assert stages[-1]["hyperparameters"] == first["hyperparameters"] and "command" in stages[-1]
    assert stages[-1]["data_fingerprints"] == first["data_fingerprints"] and "history" not in stages[-1]

    # A soup keeps its first member's own stage (and that member's lineage) on record, not only the lineage.
    from pipeline.train import soup_models

    # Every member's distillation record too (a distilled student souped behind the model it started from).
    for folder in (a, b):
        meta = json.loads((folder / "finsent.json").read_text())
        meta["distillation"] = {"teacher": f"teacher-of-{meta['version']}", "topic_teacher": None}
        (folder / "finsent.json").write_text(json.dumps(meta))
    soup_models([b, a], tmp_path / "soup", data_dir, device="cpu")
    soup = json.loads((tmp_path / "soup" / "finsent.json").read_text())
    versions = [x["version"] for x in soup["lineage"]]
    assert versions[0] == soup["soup"]["members"][0] and versions[-1] == first["version"], versions
    members = soup["soup"]["members"]
    assert [d["teacher"] for d in soup["soup"]["member_distillation"]] == [f"teacher-of-{v}" for v in members]


def test_the_recorded_command_can_be_pasted_into_a_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from pipeline.train import _command_line

    monkeypatch.setattr(sys, "argv", ["/x/pipeline/train.py", "soup", "out dir", "m1"])
    assert _command_line() == "python -m pipeline.train soup 'out dir' m1"


def _step_clock(monkeypatch: pytest.MonkeyPatch, seconds_per_step: float) -> None:
    """pipeline.train's clock reads `seconds_per_step` x the optimizer steps taken so far: time limits and pace
    lines fall on known steps, whatever the machine's speed."""
    import types

    import pipeline.train

    taken = [0]
    real_step = pipeline.train._TrainingLoop.step

    def counted(self, batch):
        taken[0] += 1
        return real_step(self, batch)

    monkeypatch.setattr(pipeline.train._TrainingLoop, "step", counted)
    monkeypatch.setattr(pipeline.train, "time", types.SimpleNamespace(monotonic=lambda: taken[0] * seconds_per_step))


@pytest.mark.parametrize(("eval_every", "validated"), [(5, [5, 7]), (1, [1, 2, 3, 4, 5, 6, 7])])
def test_a_time_limit_validates_the_last_step_before_stopping(
    tmp_path: Path, tiny_base: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, eval_every: int, validated: list
) -> None:
    """A run stopped by its time limit between two validations validates what it trained since the last one, so
    the newest weights compete for the checkpoint (before, they were dropped: a teacher cut off at step 574 of 728
    kept step 400's weights); a step that was just validated is not validated twice."""
    _step_clock(monkeypatch, 10.0)  # the 65 s limit passes at step 7
    out = tmp_path / "m"
    cfg = TrainConfig(base=str(tiny_base), max_steps=12, eval_every=eval_every, time_limit_s=65, **TINY)
    train_model(out, data_dir, cfg, progress=False)
    meta = json.loads((out / "finsent.json").read_text())
    assert meta["training"]["steps"] == 7 and [r["step"] for r in meta["history"]] == validated


def test_a_run_without_a_progress_bar_logs_its_pace(
    tmp_path: Path, tiny_base: Path, data_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background run (no terminal) says how far it is, how long it has to go and where its time limit will
    stop it, not only at its validations."""
    import pipeline.train

    monkeypatch.setattr(pipeline.train, "LOG_EVERY_S", 0.0)
    _step_clock(monkeypatch, 10.0)
    cfg = TrainConfig(base=str(tiny_base), max_steps=12, eval_every=12, time_limit_s=55, **TINY)
    with caplog.at_level("INFO", logger="pipeline.train"):
        train_model(tmp_path / "m", data_dir, cfg, progress=False)
    lines = [r.getMessage() for r in caplog.records if "s/step" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["1/12", "2/12", "3/12", "4/12", "5/12", "6/12"]
    assert "10.00 s/step" in lines[0] and "about 45 s to go" in lines[0]
    assert "time limit 55 s: stops near step 5" in lines[0]


def test_length_buckets_keep_every_example_once_and_cut_the_padding() -> None:
    """--length-buckets: each epoch still sees every example once in shuffled batches, but a batch pads to
    texts of similar length (what a CPU run pays for)."""
    import random

    from pipeline.train import _batches

    gen = random.Random(5)
    examples = [Example("w " * gen.choice([3, 5, 8, 12, 20, 40, 60]), sentiment=0) for _ in range(2000)]

    def padded(batches: list) -> int:
        return sum(max(len(ex.text) for ex in b) * len(b) for b in batches)

    plain = _batches(examples, 16, random.Random(1))
    bucketed = _batches(examples, 16, random.Random(1), buckets=True)
    assert sorted(id(ex) for b in bucketed for ex in b) == sorted(id(ex) for ex in examples)
    assert [len(b) for b in bucketed].count(16) >= len(examples) // 16 - 3  # only each bucket's last batch is short
    real = sum(len(ex.text) for ex in examples)
    assert padded(plain) > 1.8 * real and padded(bucketed) < 1.1 * real
    longest = [max(len(ex.text) for ex in b) for b in bucketed]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # batch order is shuffled
    again = _batches(examples, 16, random.Random(1), buckets=True)
    assert [[id(ex) for ex in b] for b in again] == [[id(ex) for ex in b] for b in bucketed]  # seed fixes it


def test_distil_loss_is_zero_when_the_student_matches_the_teacher() -> None:
    import torch

    from pipeline.train import distil_loss

    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    known = torch.tensor([True, True])
    assert distil_loss(teacher.clone(), None, teacher, None, known, 2.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    assert distil_loss(other, None, teacher, None, known, 2.0, 0.0).item() > 0.1
    only_second = torch.tensor([False, True])  # rows the teacher never saw add nothing
    assert distil_loss(other, None, teacher, None, only_second, 2.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_a_transfer_labelling_killed_before_its_marker_is_never_reused(
    tmp_path: Path, data_dir: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relabelling killed after its logits were written but before its marker, or a marker cut short, must make
    the next run label again: reusing them would distil another transfer set's logits (or crash on the marker)."""
    import numpy as np

    import pipeline.train as train_mod
    from pipeline.train import DistilConfig, train_with_teacher, transfer_texts

    cfg = TrainConfig(base=str(tiny_base), name="teacher", max_steps=4, eval_every=4, **TINY)
    work = tmp_path / "work"

    def run(extra: list[str]):
        return train_with_teacher(tmp_path / "student", work, data_dir, cfg, cfg, DistilConfig(), extra_texts=extra,
                                  progress=False, stop_after="transfer")  # fmt: skip

    assert run([]).reused == []  # the teacher trained, the transfer set labelled, its marker written

    class Killed:
        @staticmethod
        def now(tz=None):
            raise RuntimeError("killed before the marker")

    with monkeypatch.context() as m:  # another transfer set, killed between its logits and its marker
        m.setattr(train_mod, "datetime", Killed)
        with pytest.raises(RuntimeError, match="killed"):
            run(["An extra unlabelled headline"])
    rerun = run([])
    n = len(transfer_texts(build_splits(data_dir), []))
    assert rerun.reused == ["teacher"] and np.load(work / "transfer.npz")["sentiment"].shape[0] == n

    (work / "transfer.json").write_text('{"teacher": ')  # a marker cut short
    assert run([]).reused == ["teacher"] and json.loads((work / "transfer.json").read_text())["texts"] == n
    assert run([]).reused == ["teacher", "transfer"]


def test_teacher_run_stopped_after_the_teacher_resumes_without_redoing_it(
    tmp_path: Path, data_dir: Path, tiny_base: Path
) -> None:
    from pipeline.score import Scorer
    from pipeline.train import DistilConfig, train_with_teacher, transfer_texts

    small = {**TINY, "epochs": 2}
    teacher_cfg = TrainConfig(base=str(tiny_base), name="teacher", max_steps=12, eval_every=6, **small)
    student_cfg = TrainConfig(base=str(tiny_base), name="student", max_steps=12, eval_every=6, **small)
    work, out = tmp_path / "work", tmp_path / "student"
    extra = ["Unlabelled ingested headline about Acme", "Another unlabelled text about Fiskars"]

    def run(stop_after=None):
        return train_with_teacher(out, work, data_dir, teacher_cfg, student_cfg,
                                  DistilConfig(temperature=2.0, alpha=0.5), extra_texts=extra, progress=False,
                                  stop_after=stop_after)  # fmt: skip

    first = run(stop_after="teacher")
    assert first.student is None and not out.exists() and first.reused == []
    teacher_meta = work / "teacher" / "finsent.json"
    stamp = teacher_meta.stat().st_mtime_ns

    second = run()
    assert second.reused == ["teacher"] and second.teacher_version == first.teacher_version
    assert teacher_meta.stat().st_mtime_ns == stamp  # the teacher was not trained again
    splits = build_splits(data_dir)
    texts = transfer_texts(splits, extra)
    assert second.transfer_size == len(texts) > len({ex.text for ex in splits.train if ex.sentiment is not None})
    assert not {normalise(t) for t in texts} & eval_texts(splits)  # evaluation and validation splits never enter
    meta = json.loads((out / "finsent.json").read_text())
    assert meta["distillation"]["teacher"] == first.teacher_version and meta["distillation"]["transfer_texts"] == len(
        texts
    )
    assert Scorer.load(str(out), device="cpu").score(["Acme profit rose"])[0].label in (
        "negative",
        "neutral",
        "positive",
    )

    third = run()
    assert third.reused == ["teacher", "transfer", "student"] and third.student.version == second.student.version

    # A work folder seeded with the teacher's finsent.json and the transfer logits only, no teacher weights (what
    # a GPU machine's run can hand back), trains the student without the teacher.
    seeded = tmp_path / "seeded"
    (seeded / "teacher").mkdir(parents=True)
    shutil.copy(teacher_meta, seeded / "teacher" / "finsent.json")
    for name in ("transfer.npz", "transfer.json"):
        shutil.copy(work / name, seeded / name)
    distil = DistilConfig(temperature=2.0, alpha=0.5)
    fourth = train_with_teacher(
        tmp_path / "student2", seeded, data_dir, teacher_cfg, student_cfg, distil, extra_texts=extra, progress=False
    )
    assert fourth.reused == ["teacher", "transfer"] and fourth.student is not None
    assert json.loads((tmp_path / "student2" / "finsent.json").read_text())["distillation"]["teacher"] == (
        first.teacher_version
    )


def test_cli_teacher_run_resumes_and_keeps_weights_out_of_the_repo(
    tmp_path: Path, data_dir: Path, tiny_base: Path
) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config import PROJECT_DIR

    args = ["train", "--no-db", "--out", str(tmp_path / "student"), "--base", str(tiny_base),
            "--teacher", str(tiny_base), "--data-dir", str(data_dir), "--limit", "8", "--max-steps", "2",
            "--epochs", "1", "--teacher-epochs", "1", "--no-held-out", "--time-limit-s", "600"]  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--work-dir", str(PROJECT_DIR / "runs" / "distil")])
    assert r.exit_code == 2 and "inside the repository" in r.output and not (PROJECT_DIR / "runs" / "distil").exists()
    work = tmp_path / "work"
    r = CliRunner().invoke(app, [*args, "--work-dir", str(work), "--stop-after", "teacher"])
    assert r.exit_code == 0, r.output
    assert (
        "stopped after teacher" in r.output
        and (work / "teacher" / "finsent.json").exists()
        and not (tmp_path / "student").exists()
    )
    # By default the teacher learns sentiment only: the topic-only tweets would cost compute and teach nothing.
    teacher_meta = json.loads((work / "teacher" / "finsent.json").read_text())
    sentiment_train = [ex for ex in build_splits(data_dir, limit=8).train if ex.sentiment is not None]
    assert teacher_meta["hyperparameters"]["topic_weight"] == 0
    assert teacher_meta["data_sizes"]["train_with_repeats"] == len(sentiment_train)
    assert teacher_meta["history"] and not any("topic_val" in k for h in teacher_meta["history"] for k in h)
    assert teacher_meta["hyperparameters"]["time_limit_s"] is None  # --time-limit-s is the student's budget
    r = CliRunner().invoke(app, [*args, "--work-dir", str(work)])
    assert r.exit_code == 0, r.output
    assert "reused the finished phase(s) teacher" in r.output and (tmp_path / "student" / "finsent.json").exists()
    # ...so the student distils only the sentiment head (the teacher's topic head was never trained).
    first = json.loads((tmp_path / "student" / "finsent.json").read_text())
    assert first["distillation"]["topic"] is False and first["distillation"]["topic_teacher"] is None

    # --topic-teacher: another finsent model's topic head labels the transfer set's topics (learning without
    # forgetting: the model the student continues from keeps its topics), and the student distils both heads.
    from pipeline.score import Scorer
    from pipeline.train import transfer_texts

    second = [*args[:3], str(tmp_path / "student2"), *args[4:], "--work-dir", str(work)]
    r = CliRunner().invoke(app, [*second, "--topic-teacher", str(tiny_base)])
    assert r.exit_code == 1 and "not a finsent model folder" in r.output, r.output
    r = CliRunner().invoke(app, [*second, "--topic-teacher", str(tmp_path / "student")])
    assert r.exit_code == 0, r.output
    meta_version = json.loads((tmp_path / "student2" / "finsent.json").read_text())["version"]
    meta = json.loads((tmp_path / "student2" / "finsent.json").read_text())["distillation"]
    assert meta["topic"] is True and meta["topic_teacher"] == first["version"]
    texts = transfer_texts(build_splits(data_dir, limit=8), [])
    _, expected = Scorer.load(str(tmp_path / "student"), device="cpu").logits(texts)
    np.testing.assert_allclose(np.load(work / "topic-transfer.npz")["topic"], expected, rtol=1e-4, atol=1e-4)
    r = CliRunner().invoke(app, [*second, "--topic-teacher", str(tmp_path / "student")])
    assert r.exit_code == 0 and "phase(s) teacher, transfer, topic transfer, student from" in " ".join(r.output.split())
    assert json.loads((tmp_path / "student2" / "finsent.json").read_text())["version"] == meta_version
    # Another topic teacher: its topics are labelled afresh and the student is trained again.
    r = CliRunner().invoke(app, [*second, "--topic-teacher", str(tmp_path / "student2")])
    assert r.exit_code == 0 and "phase(s) teacher, transfer from" in " ".join(r.output.split()), r.output
    assert json.loads((tmp_path / "student2" / "finsent.json").read_text())["distillation"]["topic_teacher"] == (
        meta_version
    )
    r = CliRunner().invoke(app, [*second, "--topic-teacher", str(tmp_path / "student"), "--topic-weight", "0"])
    assert r.exit_code == 1 and "--topic-weight 0" in r.output, r.output
    r = CliRunner().invoke(app, ["train", "--no-db", "--topic-teacher", str(tmp_path / "student")])
    assert r.exit_code == 2 and "needs --teacher" in r.output
