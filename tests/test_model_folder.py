"""The model folder format (pipeline.model_folder): temperature folding, old folders, the int8 gate."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from pipeline import model_folder
from pipeline.model_folder import ModelLoadError
from pipeline.precision import (
    INT8_MAX_LOSS,
    INT8_RECIPE,
    apply_precision,
    check_int8,
    int8_failures,
    record_int8_check,
)
from pipeline.score import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
    "The company cut its full-year forecast after weak demand.",
    "Shares were little changed.",
    "$NWB to the moon after earnings beat",
]


def _calibrated_copy(src: Path, dest: Path, temperature: float = 2.5) -> Path:
    """An old-style folder: a calibration temperature in finsent.json, not folded into the weights."""
    shutil.copytree(src, dest)
    meta = json.loads((dest / "finsent.json").read_text())
    meta["temperature"] = temperature
    (dest / "finsent.json").write_text(json.dumps(meta))
    return dest


def _pipeline_probs(folder: Path) -> list[dict[str, float]]:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    return [{r["label"]: r["score"] for r in out} for out in pipe(TEXTS)]


def _max_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_fold_makes_standard_pipeline_give_finsent_probabilities(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = _calibrated_copy(tiny_model_dir, tmp_path / "m")
    before = [p.probs for p in Scorer.load(str(folder), device="cpu").score(TEXTS)]
    # the defect: an unfolded folder gives standard tools uncalibrated probabilities
    assert _max_diff(_pipeline_probs(folder), before) > 1e-3

    meta, changed = model_folder.fold(folder)
    assert changed and meta.temperature_folded and meta.temperature == 2.5
    assert model_folder.fold(folder)[1] is False  # idempotent
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"

    scorer = Scorer.load(str(folder), device="cpu")
    after = [p.probs for p in scorer.score(TEXTS)]
    assert scorer.folded and scorer.temperature == 2.5
    assert _max_diff(after, before) < 1e-5  # finsent's own figures do not move
    assert _max_diff(_pipeline_probs(folder), after) < 1e-3
    # raw logits stay raw: evaluation and explanations divide by the temperature themselves
    raw_before, _ = Scorer.load(str(tiny_model_dir), device="cpu").logits(TEXTS)
    raw_after, _ = scorer.logits(TEXTS)
    assert abs(raw_after - raw_before).max() < 1e-4


def test_old_unfolded_folder_still_divides_by_its_temperature(tmp_path: Path, tiny_model_dir: Path) -> None:
    import numpy as np

    folder = _calibrated_copy(tiny_model_dir, tmp_path / "old", temperature=3.0)
    scorer = Scorer.load(str(folder), device="cpu")
    assert not scorer.folded and model_folder.read_meta(folder).temperature_folded is False
    raw, _ = scorer.logits(TEXTS)
    z = raw / 3.0
    expect = np.exp(z - z.max(1, keepdims=True))
    expect /= expect.sum(1, keepdims=True)
    got = np.array([[p.probs[lab] for lab in scorer.labels] for p in scorer.score(TEXTS)])
    assert abs(got - expect).max() < 1e-5


def test_an_interrupted_fold_is_refused_until_finished(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = _calibrated_copy(tiny_model_dir, tmp_path / "half")
    model_folder.fold(folder)
    meta = json.loads((folder / "finsent.json").read_text())
    meta["temperature_folded"] = False  # as if killed after the weights, before finsent.json
    (folder / "finsent.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="finsent models fold"):
        Scorer.load(str(folder), device="cpu")
    model_folder.fold(folder)
    assert Scorer.load(str(folder), device="cpu").folded


def test_read_weights_takes_the_fold_back_out(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Soups average weights of runs with different temperatures: they must see unfolded classifiers."""
    folder = _calibrated_copy(tiny_model_dir, tmp_path / "w")
    plain = model_folder.read_weights(folder)
    model_folder.fold(folder)
    unfolded = model_folder.read_weights(folder)
    for key in ("classifier.weight", "classifier.bias"):
        assert (unfolded[key] - plain[key]).abs().max() < 1e-5


def test_meta_round_trips_unknown_keys(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = _calibrated_copy(tiny_model_dir, tmp_path / "keys")
    meta = json.loads((folder / "finsent.json").read_text())
    meta["history"] = [{"step": 1}]
    (folder / "finsent.json").write_text(json.dumps(meta))
    model_folder.update_meta(folder, metrics={"eval": {}})
    again = json.loads((folder / "finsent.json").read_text())
    assert again["history"] == [{"step": 1}] and again["topics"] == ["Earnings", "Legal"]
    assert again["metrics"] == {"eval": {}} and again["version"] == "tiny-0"


def _int8_record(
    folder: Path,
    loss: float,
    version: str | None = None,
    topic_loss: float | None = 0.0,
    recipe: str | None = INT8_RECIPE,
    engine: str | None = None,
) -> None:
    import torch

    meta = model_folder.read_meta(folder)
    fp32 = {"fpb_test": 0.84, "tfns_dev": 0.86}
    int8 = {"fpb_test": 0.84 - loss, "tfns_dev": 0.86}
    if topic_loss is not None:
        fp32["topic_dev"], int8["topic_dev"] = 0.90, 0.90 - topic_loss
    rec = {"version": version or meta.version, "fp32": fp32, "int8": int8, "fpb_test_loss": loss, "recipe": recipe}
    rec["engine"] = engine or torch.backends.quantized.engine
    model_folder.update_meta(folder, precision={"int8": rec})


def _refused(folder: Path, caplog: pytest.LogCaptureFixture) -> str:
    """The warning a Scorer asked for int8 logs when the gate sends it back to fp32."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.precision"):
        assert Scorer.load(str(folder), device="cpu", precision="int8").precision == "fp32"
    return caplog.text


def test_int8_gate(tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _calibrated_copy(tiny_model_dir, tmp_path / "q")
    with caplog.at_level(logging.WARNING, logger="pipeline.precision"):
        s = Scorer.load(str(folder), device="cpu", precision="int8")
    assert s.precision == "fp32" and s.version == "tiny-0"
    assert "no int8 check is recorded" in caplog.text and "scoring in fp32" in caplog.text

    _int8_record(folder, INT8_MAX_LOSS + 0.001)
    assert "loses 0.60 points" in _refused(folder, caplog)

    _int8_record(folder, 0.001, version="another-model")
    assert Scorer.load(str(folder), device="cpu", precision="int8").precision == "fp32"

    # the gate's one rule: topic accuracy counts as FPB accuracy does (the bench refused this, the scorer ran it)
    _int8_record(folder, 0.001, topic_loss=INT8_MAX_LOSS + 0.001)
    assert "loses 0.60 points of topic accuracy" in _refused(folder, caplog)

    # a check of another quantisation recipe (e.g. every Linear layer, before) says nothing about this one
    _int8_record(folder, 0.001, recipe=None)
    assert "an older quantisation" in _refused(folder, caplog)

    # a check measured on another quantised engine (x86 against qnnpack on ARM) says nothing about this one
    _int8_record(folder, 0.001, engine="some-other-engine")
    assert "some-other-engine quantised engine" in _refused(folder, caplog)

    # a model with a topic head needs its topic accuracy measured: a check without it does not pass
    _int8_record(folder, 0.001, topic_loss=None)
    assert "has no topic accuracy measured" in _refused(folder, caplog)

    _int8_record(folder, 0.001)
    s = Scorer.load(str(folder), device="cpu", precision="int8")
    # the same version id as fp32: scores, retries, detection and the web view all key on it
    assert s.precision == "int8" and s.version == "tiny-0"
    assert "DynamicQuantizedLinear" in repr(s.model) or "QuantizedLinear" in repr(s.model)
    assert len(s.score(TEXTS)) == len(TEXTS)
    meta = model_folder.read_meta(folder)
    assert apply_precision(object(), None, "int8", meta, "cuda", "v")[2] == "fp32"  # CPU only
    with pytest.raises(ModelLoadError, match="int16"):
        Scorer.load(str(folder), device="cpu", precision="int16")


def test_int8_check_is_recorded_where_the_gate_reads_it(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    folder = _calibrated_copy(tiny_model_dir, tmp_path / "c")
    check = check_int8(folder, data_dir)
    assert set(check.fp32) >= {"fpb_test", "tfns_dev"} and check.version == "tiny-0"
    assert {"fpb_val", "tfns_val"} <= set(check.fp32) and set(check.agreement) == set(check.fp32)
    assert check.passed == (not int8_failures(check.fp32, check.int8, check.topics)) and check.recipe == INT8_RECIPE
    record_int8_check(folder, check)
    assert model_folder.read_meta(folder).precision["int8"]["fpb_test_loss"] == check.fpb_test_loss
    s = Scorer.load(str(folder), device="cpu", precision="int8")
    assert s.precision == ("int8" if check.passed else "fp32")


def test_config_rejects_unknown_precision(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from pipeline.config import ModelConfig

    assert ModelConfig(precision="int8").precision == "int8"
    with pytest.raises(ValidationError):
        ModelConfig(precision="int4")  # type: ignore[arg-type]


def test_trained_folder_is_folded_and_standard(tiny_model: Path) -> None:
    """finsent train writes folded folders that standard tools read as finsent does."""
    meta = model_folder.read_meta(tiny_model)
    assert meta.temperature_folded and model_folder.folded_temperature(tiny_model) == pytest.approx(meta.temperature)
    assert json.loads((tiny_model / "config.json").read_text())["dtype"] == "float32"
    ours = [p.probs for p in Scorer.load(str(tiny_model), device="cpu").score(TEXTS)]
    assert _max_diff(_pipeline_probs(tiny_model), ours) < 1e-3


def test_bench_headline_uses_int8_only_within_half_a_point() -> None:
    from pipeline.bench import headline_precision
    from pipeline.precision import Int8Check

    def check(fpb_int8: float, topic_int8: float) -> Int8Check:
        fp32 = {"fpb_test": 0.84, "tfns_dev": 0.86, "topic_dev": 0.90}
        int8 = {"fpb_test": fpb_int8, "tfns_dev": 0.86, "topic_dev": topic_int8}
        loss = fp32["fpb_test"] - fpb_int8
        ok = not int8_failures(fp32, int8, topics=True)
        return Int8Check("v", fp32, int8, 0.99, 0.99, loss, ok, "t", "x86", "now", 1.0)

    assert headline_precision("fp32", check(0.84, 0.90)) == ("fp32", "")
    assert headline_precision("int8", check(0.838, 0.899))[0] == "int8"
    assert headline_precision("int8", check(0.834, 0.90))[0] == "fp32"  # 0.6 point of FPB accuracy
    chosen, note = headline_precision("int8", check(0.84, 0.894))  # 0.6 point of topic accuracy
    assert chosen == "fp32" and "loses 0.60 points of topic accuracy" in note
    assert headline_precision("int8", None)[0] == "fp32"
    # a model with a topic head whose check measured no topic accuracy: the headline refuses int8 as the scorer does
    unmeasured = Int8Check("v", {"fpb_test": 0.84}, {"fpb_test": 0.84}, 0.99, 0.99, 0.0, True, "t", "x86", "now", 1.0)
    chosen, note = headline_precision("int8", unmeasured)
    assert chosen == "fp32" and "has no topic accuracy measured" in note
