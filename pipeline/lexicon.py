"""Lexicon baselines: VADER and a small Loughran-McDonald-style finance dictionary.

The real Loughran-McDonald Master Dictionary cannot be downloaded here (no network), so this module
ships a short hand-written list in its spirit: words that are negative or positive in financial text
(e.g. "liability" and "tax" are not negative, "loss", "impairment", "downgrade" are). It is a baseline
to beat, not a reproduction of LM; results will differ from the published dictionary's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

LM_NEGATIVE = frozenset(
    """
    loss losses lost lose losing decline declined declines declining decrease decreased decreases decreasing
    drop dropped drops fall fell falling falls down downturn downgrade downgraded downgrades weak weaker weakened
    weakness worse worsen worsened worst negative adverse adversely impairment impairments impaired writedown
    write-down writeoff write-off deficit deficits default defaults defaulted bankrupt bankruptcy insolvency
    insolvent layoff layoffs laid redundancies redundancy cut cuts cutting slump slumped plunge plunged plunges
    tumble tumbled tumbles slide slid sink sank crash crashed warning warns warned profit-warning lawsuit
    litigation fraud fine fined penalty penalties investigation probe recall recalled delay delayed delays
    shortfall miss missed misses disappointing disappointed disappointment fail failed failure failures concern
    concerns risk risks volatile volatility uncertain uncertainty bearish sell-off selloff closure closed closing
    shutdown suspend suspended terminated termination dismissal dismissed restructuring unprofitable negatively
    hurt hit struggling struggle strike strikes dispute crisis recession underperform underperformed lower lowest
    """.split()
)
LM_POSITIVE = frozenset(
    """
    gain gains gained grow grew growth growing grows increase increased increases increasing rise rose rising rises
    up upgrade upgraded upgrades strong stronger strongest strength improve improved improvement improvements
    improving profit profits profitable profitability record beat beats exceeded exceed exceeds outperform
    outperformed surge surged surges soar soared jump jumped jumps rally rallied boost boosted positive positively
    success successful win won wins award awarded benefit benefits benefited advantage expand expanded expansion
    higher highest robust solid favorable favourable bullish recovery recovered rebound rebounded upbeat
    optimistic opportunity opportunities achieve achieved achievement efficient efficiency innovative leading
    leader dividend raise raised raises agreement acquire acquired breakthrough buy outperforming
    """.split()
)
NEGATIONS = frozenset({"not", "no", "never", "neither", "nor", "without", "n't", "cannot"})
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


def lm_counts(text: str) -> tuple[int, int]:
    """(positive, negative) hits; a negation in the 3 preceding words flips a positive hit (LM's own rule)."""
    words = _WORD.findall(text.lower())
    pos = neg = 0
    for i, w in enumerate(words):
        if w in LM_POSITIVE:
            if any(x in NEGATIONS or x.endswith("n't") for x in words[max(0, i - 3) : i]):
                neg += 1
            else:
                pos += 1
        elif w in LM_NEGATIVE:
            neg += 1
    return pos, neg


def lm_label(text: str) -> str:
    pos, neg = lm_counts(text)
    return "positive" if pos > neg else "negative" if neg > pos else "neutral"


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_label(text: str, threshold: float = 0.05) -> str:
    """VADER's documented rule: compound >= 0.05 positive, <= -0.05 negative, else neutral."""
    c = _vader().polarity_scores(text)["compound"]
    return "positive" if c >= threshold else "negative" if c <= -threshold else "neutral"


def label_all(fn, texts: Sequence[str]) -> list[str]:
    return [fn(t) for t in texts]
