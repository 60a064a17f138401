"""Scorer: loads finsent folders (fp16 on disk, fp32 on CPU) and fails clearly on broken ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.score import ModelLoadError, Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_loads_fp16_folder_as_fp32_on_cpu_with_calibrated_probs(tiny_model: Path) -> None:
    import numpy as np

    s = Scorer.load(str(tiny_model), device="cpu")
    assert next(s.model.parameters()).dtype.is_floating_point and str(next(s.model.parameters()).dtype) == "torch.float32"
    texts = ["Acme said operating profit rose sharply in quarter 1 .", "", "Acme : the chairman is based in Espoo"]
    preds = s.score(texts)
    assert len(preds) == 3 and all(abs(sum(p.probs.values()) - 1) < 1e-5 for p in preds)
    sent, topic = s.logits(texts)
    z = sent[0] / s.temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.allclose([preds[0].probs[lab] for lab in s.labels], expected, atol=1e-5)
    assert topic.shape == (3, len(s.topics)) and preds[0].topic in s.topics


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"model folder not found: {tmp_path / 'nope'}"):
        Scorer.load(str(tmp_path / "nope"))


def test_corrupt_weights_name_the_path(tmp_path: Path, tiny_model: Path) -> None:
    bad = _copy(tiny_model, tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=str(bad)):
        Scorer.load(str(bad))


def test_corrupt_topic_head_and_meta_name_the_path(tmp_path: Path, tiny_model: Path) -> None:
    head = _copy(tiny_model, tmp_path / "head")
    (head / "topic_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=f"{head}.*topic_head.safetensors"):
        Scorer.load(str(head))
    meta = _copy(tiny_model, tmp_path / "meta")
    m = json.loads((meta / "finsent.json").read_text())
    m["topics"] = m["topics"][:2]
    (meta / "finsent.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match=f"{meta}.*2 topics"):
        Scorer.load(str(meta))
    nocfg = _copy(tiny_model, tmp_path / "nocfg")
    (nocfg / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=f"{nocfg} has no config.json"):
        Scorer.load(str(nocfg))


def test_bundled_default_model_loads_and_is_sane() -> None:
    from pipeline.config import DEFAULT_MODEL_DIR

    meta = json.loads((DEFAULT_MODEL_DIR / "finsent.json").read_text())
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 60e6
    s = Scorer.load(str(DEFAULT_MODEL_DIR), device="cpu")
    assert s.version == meta["version"] and len(s.topics) == 20 and s.temperature == meta["temperature"]
    neg, pos, neu = s.score([
        "Operating loss widened and the company issued a profit warning.",
        "Net sales rose 25% and operating profit more than doubled.",
        "The company's head office is located in Helsinki.",
    ])
    assert (neg.label, pos.label, neu.label) == ("negative", "positive", "neutral")
