"""Evidence for a label: which words pushed a text to its predicted sentiment.

Occlusion over words: drop one word at a time and measure how much the log-probability of the
predicted label falls (log-probability, not probability, so a confident model still shows which words
carry the decision). Whole words (not word pieces) are removed, so the evidence reads as words; one batched
forward pass of n+1 texts, cheap enough for alert messages.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from pipeline.records import AlertItem

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"\S+")
_STRIP = ".,;:!?\"'()[]{}«»“”‘’"
_NUMBER = re.compile(r"^[$€£%+\-]?[\d.,:/]+(%|[kmbKMB]n?|bn|mn)?$")
_WORDISH = re.compile(r"[A-Za-z]")
MAX_WORDS = 96
MIN_WEIGHT = 0.02  # a drop in log P(label) below this explains nothing a reader should see
PHRASE_GAIN = 1.25  # an adjacent pair replaces its words when removing both drops this much more than either,
# or when both words are evidence and the pair explains at least as much as the stronger one
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers him his how i if in into is it its itself just me more most my no nor not now of off on once only
    or other our out over own same she should so some such than that the their them then there these they this
    those through to too under until up very was we were what when where which while who whom why will with
    would you your yours inc corp co ltd plc says said say new its s
    """.split()  # noqa: SIM905  (a word list reads best as text)
)


def evidence_terms(names: Iterable[str]) -> frozenset[str]:
    """Lower-cased words of entity names, tickers and aliases (with and without a $), to leave out of evidence."""
    out: set[str] = set()
    for name in names:
        for w in _TOKEN.findall(name or ""):
            key = w.strip(_STRIP).lower().lstrip("$")
            if key:
                out |= {key, f"${key}", f"{key}'s"}
    return frozenset(out)


def is_evidence_word(word: str, exclude: frozenset[str] = frozenset()) -> bool:
    """A word a reader learns from: not a stopword, punctuation, a bare number or the scope's own name."""
    key = word.strip(_STRIP).lower()
    if not key or not _WORDISH.search(key) or _NUMBER.match(key):
        return False
    return key not in STOPWORDS and key not in exclude and key.removesuffix("'s") not in exclude


def explain_text(
    scorer: Any, text: str, top_k: int = 5, *, exclude: Iterable[str] = (), min_weight: float | None = None
) -> list[tuple[str, float]]:
    """Up to top_k (word or phrase, contribution) pairs, largest first; contribution = drop in log P(label)
    without it.

    Only words that support the label by at least `min_weight` (default MIN_WEIGHT) and that a reader learns from
    are returned (no stopwords, punctuation, bare numbers, or the `exclude` names: pass the entity's name, ticker and
    aliases); an adjacent pair becomes a phrase ("profit warning") when it explains more than its words apart. An
    empty list means no single word mattered.
    """
    import numpy as np

    words = _TOKEN.findall(text or "")[:MAX_WORDS]
    if not words:
        return []
    skip = evidence_terms(exclude)
    min_weight = MIN_WEIGHT if min_weight is None else min_weight
    n = len(words)
    ok = [is_evidence_word(w, skip) for w in words]

    def log_probs(variants: list[str]) -> Any:
        logits, _ = scorer.logits(variants)
        z = logits / float(getattr(scorer, "temperature", 1.0) or 1.0)
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    logp = log_probs([" ".join(words)] + [" ".join(words[:i] + words[i + 1 :]) for i in range(n)])
    label = int(logp[0].argmax())
    single = logp[0, label] - logp[1:, label]
    # Adjacent pairs only where both words could be evidence: a second, smaller batch.
    pairs = [i for i in range(n - 1) if ok[i] and ok[i + 1] and max(single[i], single[i + 1]) > 0]
    pair: dict[int, float] = {}
    if pairs:
        lp = log_probs([" ".join(words[:i] + words[i + 2 :]) for i in pairs])
        pair = {i: float(logp[0, label] - lp[j, label]) for j, i in enumerate(pairs)}
    best: dict[str, float] = {}
    used: set[int] = set()
    for i, d in pair.items():
        both = min(single[i], single[i + 1]) >= min_weight and d >= max(single[i], single[i + 1])
        if d >= min_weight and d > 0 and (both or d > PHRASE_GAIN * max(single[i], single[i + 1], 0.0)):
            key = f"{words[i].strip(_STRIP)} {words[i + 1].strip(_STRIP)}"
            if d > best.get(key, 0.0):
                best[key] = d
                used |= {i, i + 1}
    for i, (w, d) in enumerate(zip(words, single, strict=True)):
        key = w.strip(_STRIP)
        if i in used or not ok[i] or d <= 0 or d < min_weight:
            continue
        if d > best.get(key, 0.0):
            best[key] = float(d)
    return sorted(best.items(), key=lambda kv: -kv[1])[:top_k]


# --- evidence as alerts carry it -------------------------------------------------------------------------

EVIDENCE_TOKENS = 5  # evidence words stored per document and shown per cited document


def tokens_of(result: Any, top_k: int) -> tuple[str, ...]:
    """Evidence tokens from whatever an explainer returns: strings, (token, weight) pairs or objects."""
    if result is None:
        return ()
    if hasattr(result, "tokens"):
        result = result.tokens
    out: list[str] = []
    for item in result:
        if isinstance(item, str):
            tok = item
        elif isinstance(item, dict):
            tok = item.get("token") or item.get("text") or ""
        elif isinstance(item, tuple | list) and item:
            tok = item[0]
        else:
            tok = getattr(item, "token", None) or getattr(item, "text", None) or ""
        tok = str(tok).strip()
        if tok:
            out.append(tok[:60])
        if len(out) >= top_k:
            break
    return tuple(out)


def evidence_tokens(scorer: Any, text: str, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The words that pushed `text` to its label, leaving out `exclude` (the watched names), as stored and
    shown; () on any failure."""
    try:
        return tokens_of(explain_text(scorer, text, EVIDENCE_TOKENS, exclude=exclude), EVIDENCE_TOKENS)
    except Exception as e:  # noqa: BLE001  # evidence is optional: a failure must not cost the score or the alert
        log.warning("no evidence tokens: explain_text failed (%s)", type(e).__name__)
        return ()


def with_evidence(
    items: Sequence[tuple[AlertItem, str | None]],
    stored: dict[int, tuple[str, ...]],
    scorer: Any = None,
    exclude: Sequence[str] = (),
) -> tuple[AlertItem, ...]:
    """Cited documents with the evidence stored when they were scored. Detection never loads the model: a
    scorer the caller already holds (the CLI's one-process cycle) fills in documents stored without any.
    A text of None is a post whose text retention removed: it gets no evidence (its placeholder title is no
    evidence of anything)."""
    out = []
    for item, text in items:
        ev = stored.get(item.document_id)
        if ev is None and scorer is not None and text is not None:
            ev = stored[item.document_id] = evidence_tokens(scorer, text, exclude)
        out.append(replace(item, evidence=ev or ()))
    return tuple(out)
