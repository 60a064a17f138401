"""Language detection for the scoring input policy: which texts the configured model may score.

lingua ships its n-gram models inside the wheel (no download). It runs in high-accuracy mode over a
handful of languages common in financial news: short English headlines full of tickers and names are
misread by the low-accuracy mode (about 1 in 70 of the FPB/TFNS evaluation texts), by this one about
1 in 2,000, and those were French and Danish texts. A text is called non-English only on strong evidence,
so an English headline is never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

DETECT_CHARS = 1000  # the start of a text decides its language; keeps detection cost flat
MIN_CONFIDENCE = 0.5  # the top language must be at least this likely ...
MAX_ENGLISH = 0.05  # ... and English at most this likely, before a text counts as non-English
_NOISE = re.compile(r"https?://\S+|www\.\S+|[$#@]\w+|\d[\d.,:%/-]*")
_LANGUAGES = (
    "ENGLISH", "GERMAN", "FRENCH", "SPANISH", "ITALIAN", "PORTUGUESE", "DUTCH",
    "RUSSIAN", "CHINESE", "JAPANESE", "KOREAN", "ARABIC",
)  # fmt: skip


@lru_cache(maxsize=1)
def _detector() -> Any:
    from lingua import Language, LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_languages(*(getattr(Language, n) for n in _LANGUAGES)).build()


def _letters(text: str) -> int:
    return sum(ch.isalpha() for ch in text)


def detect_languages(texts: Sequence[str]) -> list[str | None]:
    """ISO 639-1 code per text ("en" unless another language is clearly more likely); None for texts
    with too few letters to tell (scored as English: a ticker-only post is not a foreign language)."""
    from lingua import Language

    cleaned = [_NOISE.sub(" ", t[:DETECT_CHARS]) for t in texts]
    todo = [i for i, t in enumerate(cleaned) if _letters(t) >= 3]
    out: list[str | None] = [None] * len(texts)
    if not todo:
        return out
    confidences = _detector().compute_language_confidence_values_in_parallel([cleaned[i] for i in todo])
    for i, values in zip(todo, confidences, strict=True):
        out[i] = "en"
        if not values:
            continue
        top = values[0]
        english = next((v.value for v in values if v.language == Language.ENGLISH), 0.0)
        if top.language != Language.ENGLISH and top.value >= MIN_CONFIDENCE and english <= MAX_ENGLISH:
            out[i] = top.language.iso_code_639_1.name.lower()
    return out
