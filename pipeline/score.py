"""Scoring stage: any Hugging Face sequence-classification checkpoint, plus finsent's optional topic head.

A finsent model folder is a normal HF checkpoint (so `from_pretrained` and other tools read it) with
two optional extras: `finsent.json` (version, topic names, calibration temperatures) and
`topic_head.safetensors` (a linear head on the [CLS] hidden state, so sentiment and topic come from
one encoder pass).

Input policy (`Scorer.assess`): every text is cut to `max_chars` characters before tokenising, so a
100 MB document costs what a normal one does; long texts are scored as title + lead (the first
`max_length` tokens of "title. summary"). Empty texts and texts in a language the model does not
declare get no sentiment; a text the model raises on is reported as failed, never blocking the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import FinsentError
from pipeline.records import Prediction, ScoringStatus, TextOutcome

log = logging.getLogger(__name__)

SENTIMENT_LABELS = ("negative", "neutral", "positive")
_LABEL_ALIASES = {"bearish": "negative", "bullish": "positive", "neg": "negative", "pos": "positive", "neu": "neutral"}
META_FILE = "finsent.json"
TOPIC_HEAD_FILE = "topic_head.safetensors"
CHARS_PER_TOKEN = 12  # max_chars default = max_length * this: generous (English averages ~4.5), still bounded
ANY_LANGUAGE = "*"  # in `languages`: a multilingual model, score every language
_CANARY = "The company reported its quarterly results."


class ModelLoadError(FinsentError, RuntimeError):
    """The model folder or hub id cannot be loaded; the message names it."""


def clip(text: str, max_chars: int) -> str:
    """The first max_chars characters: applied before the tokenizer ever sees a text."""
    return text if len(text) <= max_chars else text[:max_chars]


def _reason(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def _is_local(path_or_id: str) -> bool:
    p = Path(path_or_id)
    return p.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1


def model_version_id(path_or_id: str) -> str:
    """A stable id: finsent.json's version, else folder name + weight hash, else the hub id (+revision)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        meta = p / META_FILE
        if meta.exists():
            v = json.loads(meta.read_text()).get("version")
            if v:
                return str(v)
        h = hashlib.sha256()
        for f in sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin")):
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
            h.update(str(f.stat().st_size).encode())
        return f"{p.name}-{h.hexdigest()[:12]}"
    return f"hub:{path_or_id}"


def _normalise_labels(id2label: dict[int, str], source: str) -> list[str]:
    labels = []
    for i in range(len(id2label)):
        name = str(id2label[i]).strip().lower()
        name = _LABEL_ALIASES.get(name, name)
        labels.append(name)
    missing = set(SENTIMENT_LABELS) - set(labels)
    if missing:
        raise ModelLoadError(
            f"model {source}: its labels {labels} do not name {sorted(missing)}; "
            "a sentiment model needs negative/neutral/positive (or bearish/bullish) in config.id2label"
        )
    return labels


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by similar length so dynamic padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


@dataclass
class Scorer:
    """A loaded model; `score` maps texts to Predictions in input order."""

    model: object
    tokenizer: object
    labels: list[str]
    version: str
    source: str
    device: str
    topics: list[str] | None = None
    topic_head: object | None = None
    temperature: float = 1.0
    topic_temperature: float = 1.0
    max_length: int = 128
    batch_size: int = 64
    languages: tuple[str, ...] = ("en",)  # what the model was trained for; "*" for a multilingual model
    max_chars: int | None = None  # None: max_length * CHARS_PER_TOKEN

    @property
    def char_limit(self) -> int:
        return self.max_chars or self.max_length * CHARS_PER_TOKEN

    @classmethod
    def load(
        cls,
        path_or_id: str,
        device: str | None = None,
        max_length: int = 128,
        batch_size: int = 64,
        languages: Sequence[str] | None = None,
        max_chars: int | None = None,
    ) -> Scorer:
        """Load a checkpoint; `languages` overrides what finsent.json declares (default: English only)."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = str(path_or_id)
        local = Path(source).expanduser()
        if _is_local(source) and not local.is_dir():
            raise ModelLoadError(f"model folder not found: {local}")
        if local.is_dir() and not (local / "config.json").exists():
            raise ModelLoadError(f"model folder {local} has no config.json: not a Hugging Face checkpoint")
        target = str(local) if local.is_dir() else source
        try:
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            # finsent folders store fp16; CPU kernels want fp32, CUDA runs fp16 under autocast anyway
            dtype = torch.float16 if dev.startswith("cuda") else torch.float32
            tokenizer = AutoTokenizer.from_pretrained(target)
            model = AutoModelForSequenceClassification.from_pretrained(target, dtype=dtype)
        except Exception as e:  # transformers raises many types (OSError, ValueError, safetensors errors)
            raise ModelLoadError(f"cannot load model {source}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        labels = _normalise_labels(model.config.id2label, source)
        model.to(dev).eval()
        meta = {}
        if local.is_dir() and (local / META_FILE).exists():
            try:
                meta = json.loads((local / META_FILE).read_text())
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"model folder {local}: {META_FILE} is not valid JSON ({e})") from None
        topics = meta.get("topics")
        topic_head = None
        if topics and (local / TOPIC_HEAD_FILE).exists():
            from safetensors.torch import load_file

            head_path = local / TOPIC_HEAD_FILE
            try:
                state = load_file(str(head_path))
                topic_head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
                topic_head.load_state_dict({k: v.float() for k, v in state.items()})
            except Exception as e:
                raise ModelLoadError(f"model folder {local}: cannot read {head_path.name}: {type(e).__name__}: {str(e)[:200]}") from None
            if topic_head.out_features != len(topics):
                raise ModelLoadError(
                    f"model folder {local}: {head_path.name} has {topic_head.out_features} outputs but {META_FILE} lists {len(topics)} topics"
                )
            topic_head.to(dev).eval()
        elif topics:
            topics = None
        return cls(
            model=model,
            tokenizer=tokenizer,
            labels=labels,
            version=model_version_id(source),
            source=source,
            device=dev,
            topics=topics,
            topic_head=topic_head,
            temperature=float(meta.get("temperature", 1.0)),
            topic_temperature=float(meta.get("topic_temperature", 1.0)),
            max_length=max_length,
            batch_size=batch_size,
            languages=tuple(languages or meta.get("languages") or ("en",)),
            max_chars=max_chars,
        )

    def _raw(self, texts: list[str]):
        import torch

        texts = [clip(t, self.char_limit) for t in texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.startswith("cuda") else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            out = self.model(**enc, output_hidden_states=self.topic_head is not None)
            topic = None
            if self.topic_head is not None:
                topic = self.topic_head(out.hidden_states[-1][:, 0].float()).float().cpu()
        return out.logits.float().cpu(), topic

    def _forward(self, texts: list[str]):
        import torch

        sent, topic = self._raw(texts)
        sent = torch.softmax(sent / self.temperature, dim=-1)
        if topic is not None:
            topic = torch.softmax(topic / self.topic_temperature, dim=-1)
        return sent, topic

    def logits(self, texts: Sequence[str]):
        """Uncalibrated (sentiment, topic-or-None) logits as numpy arrays in input order: for evaluation and explanations."""
        import numpy as np

        texts = [clip(t, self.char_limit) if t and t.strip() else " " for t in texts]
        sent = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        topic = np.zeros((len(texts), len(self.topics)), dtype=np.float32) if self.topic_head is not None and self.topics else None
        for idx in length_batches([len(t) for t in texts], self.batch_size):
            s, t = self._raw([texts[i] for i in idx])
            sent[idx] = s.numpy()
            if topic is not None and t is not None:
                topic[idx] = t.numpy()
        return sent, topic

    def score(self, texts: Sequence[str]) -> list[Prediction]:
        """A prediction for every text, no questions asked (evaluation, benchmarks); see `assess` for the policy."""
        texts = [clip(t, self.char_limit) if t and t.strip() else " " for t in texts]
        lengths = [len(t) for t in texts]
        results: list[Prediction | None] = [None] * len(texts)
        for idx in length_batches(lengths, self.batch_size):
            sent, topic = self._forward([texts[i] for i in idx])
            for row, i in enumerate(idx):
                probs = {lab: float(sent[row, j]) for j, lab in enumerate(self.labels)}
                label = max(probs, key=probs.__getitem__)
                t_name = t_prob = None
                if topic is not None and self.topics:
                    k = int(topic[row].argmax())
                    t_name, t_prob = self.topics[k], float(topic[row, k])
                results[i] = Prediction(label=label, probs=probs, topic=t_name, topic_prob=t_prob)
        return [r for r in results if r is not None]

    def accepts(self, language: str | None) -> bool:
        """Whether this model may score a text in `language` (None: too short to tell, scored as English)."""
        return ANY_LANGUAGE in self.languages or (language or "en") in self.languages

    def assess(self, texts: Sequence[str]) -> list[TextOutcome]:
        """The input policy, in input order: empty and foreign-language texts are skipped with a reason,
        a text the model raises on is `failed`, every other text is scored."""
        from pipeline.language import detect_languages

        clipped = [clip(t or "", self.char_limit) for t in texts]
        languages = detect_languages(clipped)
        out: list[TextOutcome | None] = [None] * len(clipped)
        todo: list[int] = []
        for i, (text, lang) in enumerate(zip(clipped, languages, strict=True)):
            if not text.strip():
                out[i] = TextOutcome(ScoringStatus.SKIPPED_EMPTY, reason="empty or whitespace-only text")
            elif not self.accepts(lang):
                out[i] = TextOutcome(
                    ScoringStatus.SKIPPED_LANGUAGE,
                    language=lang,
                    reason=f"language {lang}: the model scores {', '.join(self.languages)} (model.languages)",
                )
            else:
                todo.append(i)
        for i, result in zip(todo, self._score_isolating([clipped[i] for i in todo]), strict=True):
            if isinstance(result, Prediction):
                out[i] = TextOutcome(ScoringStatus.SCORED, result, languages[i])
            else:
                out[i] = TextOutcome(ScoringStatus.FAILED, language=languages[i], reason=result)
        return [o for o in out if o is not None]

    def _score_isolating(self, texts: list[str]) -> list[Prediction | str]:
        """Predictions, or the failure reason of each text the model raises on. When a batch fails its texts
        are retried one by one; if the model then fails on a plain sentence too, the fault is the model's or the
        device's, not the texts', and the error is raised instead of marking every document failed."""
        if not texts:
            return []
        try:
            return list(self.score(texts))
        except Exception as batch_error:  # noqa: BLE001  any model/tokenizer error: find which text causes it
            results: list[Prediction | str] = []
            for text in texts:
                try:
                    results.append(self.score([text])[0])
                except Exception as e:  # noqa: BLE001  this text's failure is recorded with its reason
                    results.append(_reason(e))
            if any(isinstance(r, str) for r in results):
                try:
                    self.score([_CANARY])
                except Exception:  # noqa: BLE001  the model fails on any text: not the documents' fault
                    raise batch_error from None
                log.warning("%d of %d texts failed to score", sum(isinstance(r, str) for r in results), len(texts))
            return results
