"""Evidence for a label: which words pushed a text to its predicted sentiment.

Occlusion over words: drop one word at a time and measure how much the log-probability of the
predicted label falls (log-probability, not probability, so a confident model still shows which words
carry the decision). Whole words (not word pieces) are removed, so the evidence reads as words; one batched
forward pass of n+1 texts, cheap enough for alert messages.
"""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(r"\S+")
_STRIP = ".,;:!?\"'()[]{}«»“”‘’"
MAX_WORDS = 96


def explain_text(scorer: Any, text: str, top_k: int = 5) -> list[tuple[str, float]]:
    """Up to top_k (word, contribution) pairs, largest first; contribution = drop in log P(label) without the word.

    Only words that support the label (contribution > 0) are returned, so an empty list means no single
    word mattered.
    """
    import numpy as np

    words = _TOKEN.findall(text or "")[:MAX_WORDS]
    if not words:
        return []
    variants = [" ".join(words)] + [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
    logits, _ = scorer.logits(variants)
    z = logits / float(getattr(scorer, "temperature", 1.0) or 1.0)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    label = int(logp[0].argmax())
    drops = logp[0, label] - logp[1:, label]
    best: dict[str, float] = {}
    for w, d in zip(words, drops):
        key = w.strip(_STRIP)
        if key and d > 0 and d > best.get(key, 0.0):
            best[key] = float(d)
    return sorted(best.items(), key=lambda kv: -kv[1])[:top_k]


