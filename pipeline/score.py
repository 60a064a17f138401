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
import copy
import hashlib
import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import model_folder
from pipeline.model_folder import SENTIMENT_LABELS, ModelLoadError
from pipeline.records import Prediction, ScoringStatus, TextOutcome

log = logging.getLogger(__name__)

__all__ = ["ModelLoadError", "Scorer", "clip", "model_version_id"]
_LABEL_ALIASES = {"bearish": "negative", "bullish": "positive", "neg": "negative", "pos": "positive", "neu": "neutral"}
CHARS_PER_TOKEN = 12  # max_chars default = max_length * this: generous (English averages ~4.5), still bounded
RAW_CHUNK = 8192  # texts tokenised and scored per pass in Scorer._raw: one tokenizer call and one host copy each
ANY_LANGUAGE = "*"  # in `languages`: a multilingual model, score every language
_CANARY = "The company reported its quarterly results."


def clip(text: str, max_chars: int) -> str:
    """The first max_chars characters: applied before the tokenizer ever sees a text."""
    return text if len(text) <= max_chars else text[:max_chars]


def _reason(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


_DEVICE_ERROR = re.compile(r"out of memory|cuda|cudnn|cublas|nccl|device-side|\bmps\b|\bhip\b", re.IGNORECASE)


def is_transient(e: BaseException) -> bool:
    """A device error (out of memory, a CUDA/cuDNN fault) that says nothing about the text: retried later."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and bool(_DEVICE_ERROR.search(str(e))))


@dataclass(frozen=True, slots=True)
class TextFailure:
    """Why the model raised on one text, and whether that was the device's fault rather than the text's."""

    reason: str
    transient: bool = False


def _is_local(path_or_id: str) -> bool:
    p = Path(path_or_id)
    return p.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1


def model_version_id(path_or_id: str) -> str:
    """A stable id: finsent.json's version, else folder name + weight hash, else the hub id (+revision)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        if model_folder.has_meta(p):
            v = model_folder.read_meta(p).version
            if v:
                return v
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


def default_threads() -> int:
    """torch intra-op threads when config sets none: OMP_NUM_THREADS when the environment sets it, else
    min(4, cores): more than 4 rarely helps a small encoder, and on a shared box every extra thread fights
    the other processes for the same cores."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(4, os.cpu_count() or 1))


class FastEncoder:
    """A fast tokenizer's Rust backend (`tokenizers.Tokenizer`) called directly: `encode_batch_fast` (no
    offsets) on a private copy configured once (truncation as the tokenizer's own call sets it, no padding),
    ids read from the encodings into flat numpy arrays. Skips the transformers call's per-token Python
    (BatchEncoding, one dict per text) that cost 70 of the 73 us per text spent outside the model. Gives the
    ids of `tokenizer(texts, truncation=True, max_length=...)` exactly (tests/test_score.py checks it)."""

    def __init__(self, backend: Any, tokenizer: Any) -> None:
        import numpy as np

        self.backend = backend
        self.encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        self.types = "token_type_ids" in tokenizer.model_input_names
        self.masks = "attention_mask" in tokenizer.model_input_names
        # a single sequence's type ids come from the post-processor's template, not from the text: when a probe
        # gets all zeros every text does, and they need not be read out per token
        probe = backend.encode("a b")
        self.zero_types = not any(probe.type_ids)
        self.np = np

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, max_length: int) -> FastEncoder | None:
        """The fast path for a transformers fast tokenizer that encodes the standard way (no override of its
        call or encoding, no input/target modes that rewrite the backend); None for any other tokenizer (the
        caller then uses the tokenizer's call)."""
        try:
            from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
        except ImportError:  # pragma: no cover - transformers is a dependency; a stand-in tokenizer still works
            return None
        kind = type(tokenizer)
        if (
            not isinstance(tokenizer, PreTrainedTokenizerFast)
            or kind._encode_plus is not PreTrainedTokenizerFast._encode_plus
            or kind.__call__ is not PreTrainedTokenizerBase.__call__
            or hasattr(tokenizer, "_switch_to_input_mode")
        ):
            return None
        backend = copy.deepcopy(tokenizer.backend_tokenizer)  # the tokenizer's own calls re-set the shared one
        backend.enable_truncation(
            max_length=max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side
        )
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        return cls(backend, tokenizer)

    def __call__(self, texts: list[str]) -> tuple[dict[str, Any], Any]:
        np = self.np
        encodings = self.encode(texts)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        flat: dict[str, Any] = {
            "input_ids": np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
        }
        if self.types:
            flat["token_type_ids"] = (
                np.zeros(total, dtype=np.int64)
                if self.zero_types
                else np.fromiter(
                    itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=np.int64, count=total
                )
            )
        if self.masks:
            flat["attention_mask"] = None  # all ones without padding: made from the lengths in Scorer._batch
        return flat, lengths


@dataclass(frozen=True, slots=True)
class RawOutput:
    """One forward pass over many texts, in input order, as numpy arrays: raw logits and calibrated
    probabilities (topic arrays None without a topic head)."""

    sent_logits: Any
    sent_probs: Any
    topic_logits: Any = None
    topic_probs: Any = None


@dataclass
class Scorer:
    """A loaded model; `score` maps texts to Predictions in input order."""

    # transformers / torch objects, imported lazily, so typed loosely
    model: Any
    tokenizer: Any
    labels: list[str]
    version: str
    source: str
    device: str
    topics: list[str] | None = None
    topic_head: Any | None = None
    temperature: float = 1.0  # calibration: probabilities = softmax(raw logits / temperature), folded or not
    topic_temperature: float = 1.0
    max_length: int = 128
    batch_size: int = 64
    languages: tuple[str, ...] = ("en",)  # what the model was trained for; "*" for a multilingual model
    max_chars: int | None = None  # None: max_length * CHARS_PER_TOKEN
    folded: bool = False  # the classifier outputs raw logits / temperature already (pipeline.model_folder)
    precision: str = "fp32"  # what actually runs: fp32, or int8 when the gate in pipeline.precision allowed it
    _fast: Any = field(default=None, init=False, repr=False, compare=False)  # (tokenizer, its settings, FastEncoder)

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
        threads: int | None = None,
        precision: str = "fp32",
    ) -> Scorer:
        """Load a checkpoint; `languages` overrides what finsent.json declares (default: English only).
        `threads` sets torch's intra-op threads for the process (None: leave them as they are). `precision`
        int8 quantises the Linear layers when the folder's recorded int8 check allows it (else fp32, warned)."""
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = str(path_or_id)
        local = Path(source).expanduser()
        if _is_local(source) and not local.is_dir():
            raise ModelLoadError(f"model folder not found: {local}")
        if local.is_dir() and not (local / "config.json").exists():
            raise ModelLoadError(f"model folder {local} has no config.json: not a Hugging Face checkpoint")
        target = str(local) if local.is_dir() else source
        meta = model_folder.read_meta(local) if local.is_dir() and model_folder.has_meta(local) else None
        if meta is not None:
            model_folder.check_fold(local, meta)
        try:
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            # finsent folders store fp16; CPU kernels want fp32, CUDA runs fp16 under autocast anyway
            dtype = torch.float16 if dev.startswith("cuda") else torch.float32
            tokenizer = AutoTokenizer.from_pretrained(target)
            model = AutoModelForSequenceClassification.from_pretrained(target, dtype=dtype)
        except Exception as e:  # transformers raises many types (OSError, ValueError, safetensors errors)
            raise ModelLoadError(
                f"cannot load model {source}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            ) from None
        labels = _normalise_labels(model.config.id2label, source)
        model.to(dev).eval()
        topics = list(meta.topics) if meta is not None and meta.topics else None
        topic_head = model_folder.load_topic_head(local, len(topics)) if topics else None
        if topic_head is None:
            topics = None
        else:
            topic_head.to(dev)
        version = model_version_id(source)
        from pipeline.precision import apply_precision

        model, topic_head, precision, version = apply_precision(model, topic_head, precision, meta, dev, version)
        return cls(
            model=model,
            tokenizer=tokenizer,
            labels=labels,
            version=version,
            source=source,
            device=dev,
            topics=topics,
            topic_head=topic_head,
            temperature=meta.temperature if meta else 1.0,
            topic_temperature=meta.topic_temperature if meta else 1.0,
            max_length=max_length,
            batch_size=batch_size,
            languages=tuple(languages or (meta.languages if meta else None) or ("en",)),
            max_chars=max_chars,
            folded=bool(meta and meta.temperature_folded),
            precision=precision,
        )

    def _encoder(self) -> FastEncoder | None:
        """The fast path for this tokenizer and max_length (built once; None: call the tokenizer)."""
        tok = self.tokenizer
        # what the private copy was configured from: a change to the tokenizer in place rebuilds it
        key = (
            self.max_length,
            getattr(tok, "truncation_side", None),
            getattr(tok, "split_special_tokens", None),
            len(tok) if hasattr(type(tok), "__len__") else None,
        )
        cached = self._fast
        if cached is None or cached[0] is not tok or cached[1] != key:
            cached = self._fast = (tok, key, FastEncoder.for_tokenizer(tok, self.max_length))
        return cached[2]

    def _tokenise(self, texts: list[str]) -> tuple[dict[str, Any], Any]:
        """One tokenizer pass for many texts: flat int64 arrays per model input (attention masks are made when
        padding) and the token count per text. Through the Rust backend directly when the tokenizer has one,
        else through the tokenizer's own call; both give the same ids."""
        import numpy as np

        fast = self._encoder()
        if fast is not None:
            return fast(texts)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        ids = enc["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat: dict[str, Any] = {}
        for key in ("input_ids", "token_type_ids"):
            if key in enc:
                rows = enc[key]
                flat[key] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        if "attention_mask" in enc:
            flat["attention_mask"] = None  # all ones without padding: made from the lengths in _batch
        return flat, lengths

    def _batch(self, flat: dict[str, Any], lengths: Any, starts: Any, idx: Any) -> dict[str, Any]:
        """Pad one batch of pre-tokenised rows to its longest row with numpy fancy indexing (no Python loop
        over rows); on CUDA through pinned memory with non-blocking copies, so the host builds the next batch
        while the device runs this one."""
        import numpy as np
        import torch

        lens = lengths[idx][:, None]
        width = int(lens.max())
        col = np.arange(width)[None, :]
        if getattr(self.tokenizer, "padding_side", "right") == "left":
            shift = width - lens
            mask, src = col >= shift, starts[idx][:, None] + np.clip(col - shift, 0, None)
        else:
            mask, src = col < lens, starts[idx][:, None] + np.minimum(col, np.maximum(lens - 1, 0))
        tok = self.tokenizer
        pads = {
            "input_ids": getattr(tok, "pad_token_id", None) or 0,
            "token_type_ids": getattr(tok, "pad_token_type_id", 0),
        }
        out = {}
        for key, values in flat.items():
            if values is None:  # the attention mask
                arr = mask.astype(np.int64)
            else:
                arr = np.where(mask, values[np.minimum(src, len(values) - 1)] if len(values) else 0, pads.get(key, 0))
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
            if self.device.startswith("cuda"):
                t = t.pin_memory().to(self.device, non_blocking=True)
            elif self.device != "cpu":
                t = t.to(self.device)
            out[key] = t
        return out

    def _forward(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        """Sentiment logits and the last hidden state's [CLS] vector (None without a topic head), taken by a
        hook on the encoder: output_hidden_states would keep every layer's states alive."""
        if self.topic_head is None:
            return self.model(**batch).logits, None
        seen: list[Any] = []
        # a copy of the [CLS] rows only: a view would keep the whole (batch, tokens, hidden) state alive until
        # the chunk ends (up to RAW_CHUNK texts' worth)
        handle = self.model.base_model.register_forward_hook(lambda _m, _i, out: seen.append(out[0][:, 0].clone()))
        try:
            logits = self.model(**batch).logits
        finally:
            handle.remove()
        return logits, seen[-1]

    def _raw(self, texts: list[str]) -> RawOutput:
        """Logits and calibrated probabilities of `texts` (already clipped), in input order: one tokenizer call,
        batches bucketed by token count, softmax on the device, and one device-to-host copy for all of them.
        Logits are raw (a folded temperature is multiplied back out), probabilities calibrated."""
        import numpy as np
        import torch

        n_sent = len(self.labels)
        if not texts:
            empty = np.zeros((0, n_sent), dtype=np.float32)
            topic = np.zeros((0, len(self.topics or ())), dtype=np.float32) if self.topic_head is not None else None
            return RawOutput(empty, empty, topic, topic)
        if len(texts) > RAW_CHUNK:  # bound the token lists held at once when evaluation passes a whole dataset
            pieces = [self._raw(texts[i : i + RAW_CHUNK]) for i in range(0, len(texts), RAW_CHUNK)]
            fields = ("sent_logits", "sent_probs", "topic_logits", "topic_probs")
            joined = {
                f: None if getattr(pieces[0], f) is None else np.concatenate([getattr(p, f) for p in pieces])
                for f in fields
            }
            return RawOutput(**joined)
        texts = [clip(t, self.char_limit) for t in texts]
        flat, lengths = self._tokenise(texts)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        order = np.argsort(lengths, kind="stable")
        autocast = (
            torch.autocast("cuda", dtype=torch.float16) if self.device.startswith("cuda") else contextlib.nullcontext()
        )
        # the classifier outputs logits / T when T is folded in: probabilities directly, raw logits times T
        out_scale, prob_div = (self.temperature, 1.0) if self.folded else (1.0, self.temperature)
        sent_parts, cls_parts = [], []
        with torch.inference_mode(), autocast:
            for i in range(0, len(order), self.batch_size):
                logits, cls_vec = self._forward(self._batch(flat, lengths, starts, order[i : i + self.batch_size]))
                sent_parts.append(logits)
                if cls_vec is not None:
                    cls_parts.append(cls_vec)
            # post-processing once per chunk, not per batch: a few small ops instead of six per batch, each of
            # which costs a thread-pool wake-up on CPU and a kernel launch on GPU
            sent = torch.cat(sent_parts).float()
            cols = [sent * out_scale, torch.softmax(sent / prob_div, dim=-1)]
            if self.topic_head is not None:
                topic = self.topic_head(torch.cat(cls_parts).float()).float()
                cols += [topic, torch.softmax(topic / self.topic_temperature, dim=-1)]
            host = torch.cat(cols, dim=-1).cpu().numpy()  # the one synchronising copy
        res = np.empty_like(host)
        res[order] = host
        if self.topic_head is None:
            return RawOutput(res[:, :n_sent], res[:, n_sent:])
        n_topic = (res.shape[1] - 2 * n_sent) // 2
        t0 = 2 * n_sent
        return RawOutput(res[:, :n_sent], res[:, n_sent:t0], res[:, t0 : t0 + n_topic], res[:, t0 + n_topic :])

    def logits(self, texts: Sequence[str]):
        """Uncalibrated (sentiment, topic-or-None) logits as numpy arrays in input order: for evaluation and
        explanations."""
        texts = [clip(t, self.char_limit) if t and t.strip() else " " for t in texts]
        out = self._raw(texts)
        topic = out.topic_logits if self.topics else None
        return out.sent_logits, topic

    def score(self, texts: Sequence[str]) -> list[Prediction]:
        """A prediction for every text, no questions asked (evaluation, benchmarks); see `assess` for the policy."""
        texts = [clip(t, self.char_limit) if t and t.strip() else " " for t in texts]
        out = self._raw(texts)
        labels = self.labels
        best = out.sent_probs.argmax(axis=1).tolist()
        probs = out.sent_probs.tolist()
        if out.topic_probs is not None and self.topics:
            k = out.topic_probs.argmax(axis=1)
            names = [self.topics[j] for j in k.tolist()]
            tprobs = out.topic_probs[range(len(k)), k].tolist()
            return [
                Prediction(label=labels[b], probs=dict(zip(labels, p, strict=True)), topic=t, topic_prob=tp)
                for b, p, t, tp in zip(best, probs, names, tprobs, strict=True)
            ]
        return [
            Prediction(label=labels[b], probs=dict(zip(labels, p, strict=True)))
            for b, p in zip(best, probs, strict=True)
        ]

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
                out[i] = TextOutcome(
                    ScoringStatus.FAILED, language=languages[i], reason=result.reason, transient=result.transient
                )
        return [o for o in out if o is not None]

    def _score_isolating(self, texts: list[str]) -> list[Prediction | TextFailure]:
        """Predictions, or the failure reason of each text the model raises on. When a batch fails its texts
        are retried one by one; if the model then fails on a plain sentence too, the fault is the model's or the
        device's, not the texts', and the error is raised instead of marking every document failed."""
        if not texts:
            return []
        try:
            return list(self.score(texts))
        except Exception as batch_error:  # noqa: BLE001  any model/tokenizer error: find which text causes it
            results: list[Prediction | TextFailure] = []
            for text in texts:
                try:
                    results.append(self.score([text])[0])
                except Exception as e:  # noqa: BLE001  this text's failure is recorded with its reason
                    results.append(TextFailure(_reason(e), is_transient(e)))
            if any(isinstance(r, TextFailure) for r in results):
                try:
                    self.score([_CANARY])
                except Exception:  # noqa: BLE001  the model fails on any text: not the documents' fault
                    raise batch_error from None
                log.warning(
                    "%d of %d texts failed to score", sum(isinstance(r, TextFailure) for r in results), len(texts)
                )
            return results
