"""The finsent model folder format, owned here and nowhere else.

A finsent model folder is a plain Hugging Face sequence-classification checkpoint (config.json, tokenizer,
`model.safetensors`) that standard tools load, plus two extras:

- `finsent.json`: version, labels, topics, calibration temperatures, recipe, metrics (`ModelMeta`);
- `topic_head.safetensors`: a linear topic head on the last hidden state's [CLS] vector.

Weights are fp16 (half the download) but `config.json` says float32, so `from_pretrained` and
`transformers.pipeline()` compute in fp32 on CPU. The sentiment temperature T is *folded* into the
classifier's final layer (weight and bias scaled by 1/T, kept in fp32), so `pipeline()` returns finsent's
calibrated probabilities. The weights file's own metadata records the fold (`finsent.temperature_folded`),
written atomically with the weights, and `finsent.json` mirrors it; a folder whose two records disagree
(a fold killed half-way) is refused until `finsent models fold` finishes it. Old folders (temperature not
folded, fp16 in config.json) load as before.

This module imports neither torch nor SQLAlchemy at import time (`python -m pipeline.train` on a bare GPU box).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import FinsentError

SENTIMENT_LABELS = ("negative", "neutral", "positive")
META_FILE = "finsent.json"
TOPIC_HEAD_FILE = "topic_head.safetensors"
WEIGHTS_FILE = "model.safetensors"
FOLD_KEY = "finsent.temperature_folded"  # in the weights file's safetensors metadata: the T folded in, as text


class ModelLoadError(FinsentError, RuntimeError):
    """The model folder or hub id cannot be loaded; the message names it."""


@dataclass(frozen=True)
class ModelMeta:
    """finsent.json. Keys this class does not name (history, training, soup, distillation, ...) are kept in
    `extra` and written back unchanged, so old and new folders round-trip."""

    version: str
    labels: tuple[str, ...] = SENTIMENT_LABELS
    topics: tuple[str, ...] | None = None
    temperature: float = 1.0  # sentiment calibration: probabilities = softmax(raw logits / temperature)
    topic_temperature: float = 1.0
    temperature_folded: bool = False  # the classifier already outputs raw logits / temperature
    base: str | None = None
    languages: tuple[str, ...] | None = None
    split_seed: int | None = None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    data_fingerprints: Mapping[str, str] = field(default_factory=dict)
    precision: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"int8": check record}, see pipeline.precision
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMeta:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for key in ("labels", "topics", "languages"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        for key in ("temperature", "topic_temperature"):
            if known.get(key) is not None:
                known[key] = float(known[key])
        known = {k: v for k, v in known.items() if v is not None or k in ("topics", "base", "split_seed")}
        if "version" not in known:
            known["version"] = ""
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "base": self.base,
            "labels": list(self.labels),
            "topics": list(self.topics) if self.topics is not None else None,
            "temperature": self.temperature,
            "topic_temperature": self.topic_temperature,
            "temperature_folded": self.temperature_folded,
        }
        if self.languages is not None:
            out["languages"] = list(self.languages)
        if self.split_seed is not None:
            out["split_seed"] = self.split_seed
        out["hyperparameters"] = dict(self.hyperparameters)
        if self.data_fingerprints:
            out["data_fingerprints"] = dict(self.data_fingerprints)
        out["metrics"] = dict(self.metrics)
        if self.precision:
            out["precision"] = dict(self.precision)
        out.update(self.extra)
        return out

    def replace(self, **changes: Any) -> ModelMeta:
        return replace(self, **changes)

    @property
    def applied_temperature(self) -> float:
        """What finsent still divides the classifier's output by: 1 once the temperature is folded in."""
        return 1.0 if self.temperature_folded else self.temperature


def has_meta(folder: str | Path) -> bool:
    return (Path(folder).expanduser() / META_FILE).is_file()


def read_meta_dict(folder: str | Path) -> dict[str, Any]:
    """finsent.json as a dict; ModelLoadError naming the folder when it is missing or not JSON."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"model folder not found: {p}")
    path = p / META_FILE
    if not path.is_file():
        raise ModelLoadError(f"model folder {p} has no {META_FILE}: not trained by finsent train")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model folder {p}: {META_FILE} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"model folder {p}: {META_FILE} is not a JSON object")
    return data


def read_meta(folder: str | Path) -> ModelMeta:
    return ModelMeta.from_dict(read_meta_dict(folder))


def write_meta(folder: str | Path, meta: ModelMeta | Mapping[str, Any]) -> Path:
    """Write finsent.json atomically (temp file + rename: it is the folder's completion marker). Whether the
    temperature is folded is copied from the weights file, which records it atomically with the weights."""
    p = Path(folder).expanduser()
    m = meta if isinstance(meta, ModelMeta) else ModelMeta.from_dict(meta)
    folded = folded_temperature(p)
    m = m.replace(temperature_folded=folded is not None)
    path = p / META_FILE
    data = m.to_dict()
    if path.is_file():  # keep the existing key order, so a changed field is a small diff
        try:
            old = [k for k in json.loads(path.read_text()) if k in data]
        except (json.JSONDecodeError, TypeError):
            old = []
        data = {**{k: data[k] for k in old}, **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def update_meta(folder: str | Path, **changes: Any) -> ModelMeta:
    """Read, change some fields, write back: the one way commands edit a folder's finsent.json."""
    meta = read_meta(folder).replace(**changes)
    write_meta(folder, meta)
    return meta


def folded_temperature(folder: str | Path) -> float | None:
    """The temperature folded into the weights file's classifier, None when none is (or no weights file)."""
    path = Path(folder).expanduser() / WEIGHTS_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get(FOLD_KEY)
    except Exception as e:  # noqa: BLE001  safetensors raises several types for a damaged file
        raise ModelLoadError(
            f"cannot load model {folder}: {WEIGHTS_FILE}: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    return float(value) if value else None


def check_fold(folder: str | Path, meta: ModelMeta) -> None:
    """Refuse a folder whose weights and finsent.json disagree about the fold: scoring it would divide by
    the temperature twice or not at all."""
    folded = folded_temperature(folder)
    if (folded is not None) != meta.temperature_folded or (
        folded is not None and abs(folded - meta.temperature) > 1e-6
    ):
        raise ModelLoadError(
            f"model folder {folder}: the weights record temperature folded = {folded} but {META_FILE} says "
            f"temperature_folded={meta.temperature_folded}, temperature={meta.temperature} (an interrupted fold?): "
            f"run `finsent models fold {folder}` to finish it"
        )


def _classifier_keys(state: Mapping[str, Any], num_labels: int) -> tuple[str, str | None]:
    """The sentiment classifier's final layer in a sequence-classification state dict (BERT `classifier`,
    RoBERTa `classifier.out_proj`, others `score`): the one 2-D weight with num_labels rows under that name."""
    hits = [
        k
        for k, v in state.items()
        if k.endswith("weight") and ("classifier" in k or k.startswith("score")) and v.ndim == 2
        if v.shape[0] == num_labels
    ]
    if len(hits) != 1:
        raise ModelLoadError(f"cannot tell the classifier's final layer among {hits or 'no candidates'}")
    bias = hits[0][: -len("weight")] + "bias"
    return hits[0], bias if bias in state else None


def _save_weights(folder: Path, state: dict[str, Any], folded: float | None) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if folded is not None:
        meta[FOLD_KEY] = repr(float(folded))
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # a model folder is read by other users (the web app, Airflow workers)
    os.replace(tmp, folder / WEIGHTS_FILE)


def _fold_state(state: dict[str, Any], num_labels: int, factor: float) -> dict[str, Any]:
    """The classifier's final layer times `factor`, in fp32 (fp16 would round the folded weights)."""
    w, b = _classifier_keys(state, num_labels)
    out = dict(state)
    for key in (w, b):
        if key is not None:
            out[key] = (state[key].float() * factor).contiguous()
    return out


def _standard_config(folder: Path) -> None:
    """config.json says float32, so standard tools compute in fp32 whatever dtype the weights are stored in."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("torch_dtype", None)
    if cfg.get("dtype") != "float32":
        cfg["dtype"] = "float32"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_checkpoint(folder: str | Path, seq_model: Any, tokenizer: Any, topic_head: Any, temperature: float) -> None:
    """Write the standard part of a folder: fp16 encoder weights with the temperature folded into an fp32
    classifier, config.json in float32, the tokenizer and the topic head. finsent.json is written after
    (write_meta), last, by the caller."""
    import torch

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    seq_model.to("cpu", dtype=torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_topic_head(out, topic_head)
    from safetensors.torch import load_file

    state = load_file(str(out / WEIGHTS_FILE))
    _save_weights(out, _fold_state(state, int(seq_model.config.num_labels), 1.0 / temperature), temperature)
    _standard_config(out)


def fold(folder: str | Path) -> tuple[ModelMeta, bool]:
    """Fold finsent.json's sentiment temperature into the classifier of an existing folder, in place, and
    make config.json float32. Idempotent and safe to rerun after a crash. Returns (meta, changed)."""
    from safetensors.torch import load_file

    p = Path(folder).expanduser()
    meta = read_meta(p)
    if not (p / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"model folder {p} has no {WEIGHTS_FILE}: nothing to fold")
    done = folded_temperature(p)
    changed = False
    if done is None:
        state = load_file(str(p / WEIGHTS_FILE))
        _save_weights(p, _fold_state(state, len(meta.labels), 1.0 / meta.temperature), meta.temperature)
        changed = True
    elif abs(done - meta.temperature) > 1e-6:
        raise ModelLoadError(
            f"model folder {p}: its weights have T={done} folded in but {META_FILE} says {meta.temperature}"
        )
    _standard_config(p)
    if not meta.temperature_folded:
        changed = True
    write_meta(p, meta)
    return read_meta(p), changed


def read_weights(folder: str | Path, num_labels: int = len(SENTIMENT_LABELS)) -> dict[str, Any]:
    """The encoder + classifier state dict in fp32 with any folded temperature taken back out: what weight
    averaging (soups) and continued training need, since folded classifiers of different T do not average."""
    from safetensors.torch import load_file

    p = Path(folder).expanduser()
    state = {k: v.float() for k, v in load_file(str(p / WEIGHTS_FILE)).items()}
    folded = folded_temperature(p)
    return _fold_state(state, num_labels, folded) if folded is not None else state


def unfold_classifier(seq_model: Any, folder: str | Path) -> None:
    """Undo the fold in a model loaded by `from_pretrained(folder)` (training continued from a finsent folder)."""
    import torch

    folded = folded_temperature(folder) if Path(folder).expanduser().is_dir() else None
    if folded is None:
        return
    state = seq_model.state_dict()
    w, b = _classifier_keys(state, int(seq_model.config.num_labels))
    with torch.no_grad():
        for key in (w, b):
            if key is not None:
                state[key].mul_(folded)


def read_topic_head_state(folder: str | Path) -> dict[str, Any] | None:
    """The topic head's weight and bias in fp32, None when the folder has none."""
    path = Path(folder).expanduser() / TOPIC_HEAD_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as e:  # noqa: BLE001  safetensors raises several types for a damaged file
        raise ModelLoadError(
            f"model folder {folder}: cannot read {TOPIC_HEAD_FILE}: {type(e).__name__}: {str(e)[:200]}"
        ) from None


def load_topic_head(folder: str | Path, n_topics: int) -> Any | None:
    """The topic head as a torch Linear (fp32), None when the folder has none; refused if it does not have
    one output per topic."""
    import torch

    state = read_topic_head_state(folder)
    if state is None:
        return None
    if "weight" not in state or "bias" not in state:
        raise ModelLoadError(f"model folder {folder}: {TOPIC_HEAD_FILE} lacks weight or bias")
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    if head.out_features != n_topics:
        raise ModelLoadError(
            f"model folder {folder}: {TOPIC_HEAD_FILE} has {head.out_features} outputs "
            f"but {META_FILE} lists {n_topics} topics"
        )
    return head.eval()


def save_topic_head(folder: str | Path, head: Any) -> None:
    """The topic head in fp16, like the encoder."""
    import torch
    from safetensors.torch import save_file

    h = head.to("cpu", dtype=torch.float16)
    save_file(
        {"weight": h.weight.detach().contiguous(), "bias": h.bias.detach().contiguous()},
        str(Path(folder) / TOPIC_HEAD_FILE),
    )
