"""Numeric precision of the scoring model: fp32, or int8 for CPU deployments, behind an accuracy gate.

int8 is PyTorch dynamic quantisation (weights int8 per tensor, activations quantised per batch; no
new dependency, no calibration data) of the Linear layers that do not narrow their input: attention
projections, FFN up-projections, pooler. The narrowing ones stay fp32: each encoder block's FFN
down-projection (quantising its GELU input cost most of the agreement with fp32) and the classifier heads
(the topic head is a separate module and is never quantised). Chosen by agreement with fp32 on the
validation splits (docs/deployment.md, CPU-only deployments). It is used only when the model folder records
an int8 check (`finsent models check-int8 PATH`, written to finsent.json `precision.int8`) of this recipe for
this model version, measured on this machine's quantised engine (`torch.backends.quantized.engine`: a check
from x86 says nothing about qnnpack on ARM), that passes `int8_failures`, the one rule: less than INT8_MAX_LOSS
of FPB test accuracy and, for a model with a topic head, of topic accuracy lost against fp32, both measured;
otherwise the scorer warns and runs fp32.
An int8 scorer keeps the model's version id: it is how that version runs, like the device, and only after
the gate showed it scores like fp32. Scores, retries, detection, the registry and the web view all key on the
version id, so a suffixed id made every stored score look missing (each run rescored the whole history).
The scorer's `precision` field and the log say which one ran.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline.model_folder import SENTIMENT_LABELS, ModelLoadError, ModelMeta

log = logging.getLogger(__name__)

Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "int8")
INT8_MAX_LOSS = 0.005  # accuracy, as a fraction: int8 must lose less than half a point (FPB test, topic dev)
INT8_RECIPE = "dynamic-qint8:non-narrowing-linears"  # what `quantise` does; a check is for one recipe
_GATED = (("fpb_test", "FPB test"), ("topic_dev", "topic"))  # (split, name): accuracy int8 may not lose


def quantised_layers(model: Any) -> list[str]:
    """Names of the Linear layers `quantise` makes int8: those whose output is at least as wide as their input."""
    import torch

    return [
        name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features >= m.in_features
    ]


def quantise(model: Any) -> Any:
    """A dynamically quantised int8 copy of `model` (INT8_RECIPE; CPU)."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = dict.fromkeys(quantised_layers(model), default_dynamic_qconfig)
    with warnings.catch_warnings():  # torch.ao eager quantisation is deprecated in favour of torchao, still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, spec, dtype=torch.qint8)


def int8_failures(fp32: Mapping[str, float], int8: Mapping[str, float], topics: bool) -> list[str]:
    """The gate, the one place its rule lives: what int8 loses beyond INT8_MAX_LOSS against fp32 on the
    evaluation splits (FPB test accuracy, and topic accuracy when the model has a topic head: `topics`), or
    which of them was not measured; [] passes."""
    out = []
    for split, name in _GATED:
        if split == "topic_dev" and not topics:
            continue
        if split not in fp32:
            out.append(f"has no {name} accuracy measured")
            continue
        loss = fp32[split] - int8.get(split, float("nan"))
        if not loss < INT8_MAX_LOSS:
            out.append(f"loses {100 * loss:.2f} points of {name} accuracy")
    return out


def int8_refusal(meta: ModelMeta | None, device: str) -> str | None:
    """Why int8 may not be used for this model on this device; None when the recorded check allows it."""
    if device != "cpu":
        return f"dynamic int8 quantisation runs on CPU only (device {device})"
    if meta is None:
        return "the model has no finsent.json, so no int8 check can be recorded for it"
    rec = meta.precision.get("int8")
    fix = "run `finsent models check-int8 MODEL` (needs the labelled data) to measure and record it"
    if not rec:
        return f"no int8 check is recorded for {meta.version}: {fix}"
    if rec.get("version") != meta.version:
        return f"the recorded int8 check is for {rec.get('version')}, not {meta.version}: {fix}"
    if rec.get("recipe") != INT8_RECIPE:
        return (
            f"the recorded int8 check measured {rec.get('recipe') or 'an older quantisation'}, not {INT8_RECIPE}: {fix}"
        )
    import torch

    engine = torch.backends.quantized.engine
    if rec.get("engine") != engine:
        return f"the recorded int8 check ran on the {rec.get('engine')} quantised engine, not {engine}: {fix}"
    why = int8_failures(rec.get("fp32") or {}, rec.get("int8") or {}, topics=bool(meta.topics))
    if why:
        return f"int8 {' and '.join(why)} (the limit is {100 * INT8_MAX_LOSS:.1f}; {fix})"
    return None


def apply_precision(
    model: Any, topic_head: Any, precision: str, meta: ModelMeta | None, device: str, version: str
) -> tuple[Any, Any, str, str]:
    """(model, topic head, precision in use, version id) for the requested precision, after the gate."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"model.precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return model, topic_head, "fp32", version
    why = int8_refusal(meta, device)
    if why is not None:
        log.warning("model.precision int8 refused for %s: %s; scoring in fp32", version, why)
        return model, topic_head, "fp32", version
    log.info("scoring %s in int8 (dynamic quantisation; its recorded check passed)", version)
    return quantise(model), topic_head, "int8", version


def int8_scorer(scorer: Any) -> Any:
    """An int8 twin of a loaded fp32 Scorer, bypassing the gate: for measuring what the gate decides on."""
    return replace(scorer, model=quantise(copy.deepcopy(scorer.model)), precision="int8")


@dataclass(frozen=True)
class Int8Check:
    """fp32 against int8 on the fixed evaluation splits, measured in one run."""

    version: str
    fp32: dict[str, float]  # fpb_test / tfns_dev / topic_dev accuracy
    int8: dict[str, float]
    sentiment_agreement: float  # share of FPB test + TFNS dev texts whose label int8 and fp32 agree on
    topic_agreement: float  # the same for topics on topic_dev
    fpb_test_loss: float  # fp32 minus int8 FPB test accuracy (fraction)
    passed: bool  # int8_failures(fp32, int8, topics) is empty
    torch: str
    engine: str
    measured_at: str
    seconds: float
    recipe: str = INT8_RECIPE
    agreement: dict[str, float] = field(default_factory=dict)  # per split, validation splits included
    topics: bool = True  # the model has a topic head: its topic accuracy is gated too

    @property
    def failures(self) -> list[str]:
        return int8_failures(self.fp32, self.int8, self.topics)


def _accuracy(pred: Any, truth: Sequence[int | None]) -> float:
    return float((pred == truth).mean()) if len(truth) else float("nan")


def check_int8(path: str | Path, data_dir: str | Path | None = None, batch_size: int = 64) -> Int8Check:
    """Score the fixed splits with the model in fp32 and int8 in one run and compare accuracies: the evaluation
    splits the gate reads, and the validation splits (what a recipe is chosen on, reported alongside)."""
    import numpy as np
    import torch

    from pipeline.data import DEFAULT_SEED, build_splits
    from pipeline.model_folder import read_meta
    from pipeline.score import Scorer

    t0 = time.monotonic()
    meta = read_meta(path)
    splits = build_splits(data_dir, seed=meta.split_seed or DEFAULT_SEED)
    fp = Scorer.load(str(path), device="cpu", batch_size=batch_size)
    q = int8_scorer(fp)
    preds: dict[str, dict[str, Any]] = {"fp32": {}, "int8": {}}
    acc: dict[str, dict[str, float]] = {"fp32": {}, "int8": {}}
    order = [fp.labels.index(lab) for lab in SENTIMENT_LABELS]
    for split in ("fpb_test", "tfns_dev", "topic_dev", "fpb_val", "tfns_val", "topic_val"):
        exs = splits.eval.get(split) or splits.val.get(split) or []
        if not exs:
            continue
        for name, scorer in (("fp32", fp), ("int8", q)):
            sent, topic = scorer.logits([ex.text for ex in exs])
            if split.startswith("topic"):
                if topic is None:
                    continue
                p, truth = topic.argmax(1), [ex.topic for ex in exs]
            else:
                p, truth = sent[:, order].argmax(1), [ex.sentiment for ex in exs]
            preds[name][split] = p
            acc[name][split] = _accuracy(p, truth)
    sent_splits = [s for s in ("fpb_test", "tfns_dev") if s in preds["fp32"]]
    agree: Any = np.concatenate([preds["fp32"][s] == preds["int8"][s] for s in sent_splits]) if sent_splits else []
    topic_agree: Any = preds["fp32"]["topic_dev"] == preds["int8"]["topic_dev"] if "topic_dev" in preds["fp32"] else []
    if "fpb_test" not in acc["fp32"]:
        raise ModelLoadError(f"int8 check of {path}: no FPB test split in the labelled data, nothing to compare")
    return Int8Check(
        version=meta.version,
        fp32=acc["fp32"],
        int8=acc["int8"],
        sentiment_agreement=float(np.mean(agree)) if len(agree) else float("nan"),
        topic_agreement=float(np.mean(topic_agree)) if len(topic_agree) else float("nan"),
        fpb_test_loss=acc["fp32"]["fpb_test"] - acc["int8"]["fpb_test"],
        passed=not int8_failures(acc["fp32"], acc["int8"], topics=fp.topic_head is not None),
        torch=torch.__version__,
        engine=str(torch.backends.quantized.engine),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(time.monotonic() - t0, 1),
        agreement={s: float(np.mean(preds["fp32"][s] == preds["int8"][s])) for s in preds["fp32"]},
        topics=fp.topic_head is not None,
    )


def record_int8_check(path: str | Path, check: Int8Check) -> None:
    """Store the check in finsent.json `precision.int8`, where Scorer.load's gate reads it."""
    from pipeline.model_folder import read_meta, update_meta

    meta = read_meta(path)
    if meta.version != check.version:
        raise ModelLoadError(f"int8 check is for {check.version} but {path} is {meta.version}")
    update_meta(path, precision={**meta.precision, "int8": asdict(check)})
