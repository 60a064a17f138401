"""Risk score: one number in [0, 100] per scope and window that a desk can sort and chart.

    risk = 100 * (0.45 * intensity + 0.35 * anomaly + 0.20 * topic_severity)

- intensity: mean p_negative of the window's documents, shrunk toward the scope's baseline negative
  share with the weight of `INTENSITY_PRIOR_DOCS` documents, so one bad headline in an empty hour
  does not max it out;
- anomaly: how far the negative count is above the scope's expected count, in standard deviations,
  clipped to [0, 1] at `ANOMALY_FULL_SD` (6 SD reads as fully anomalous);
- topic_severity: the mean topic weight of the window's negative documents (`TOPIC_WEIGHTS`; legal and
  regulatory news weighs most, stock commentary least; documents without a topic count
  `DEFAULT_TOPIC_WEIGHT`); 0 when nothing is negative.

Each component lies in [0, 1] and the weights sum to 1, so the score lies in [0, 100]. The components
are stored next to the score (risk_scores.components) so a number can always be explained.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

WEIGHTS = {"intensity": 0.45, "anomaly": 0.35, "topic_severity": 0.20}
INTENSITY_PRIOR_DOCS = 5.0
ANOMALY_FULL_SD = 6.0
DEFAULT_TOPIC_WEIGHT = 0.5

# Keys are lower-cased substrings of topic names (the Twitter Financial News topics and similar).
TOPIC_WEIGHTS: dict[str, float] = {
    "legal": 1.0,
    "regulat": 1.0,
    "lawsuit": 1.0,
    "fraud": 1.0,
    "earnings": 0.85,
    "guidance": 0.85,
    "m&a": 0.7,
    "merger": 0.7,
    "personnel": 0.6,
    "fed": 0.6,
    "central bank": 0.6,
    "macro": 0.55,
    "politics": 0.55,
    "treasuries": 0.5,
    "debt": 0.5,
    "dividend": 0.5,
    "analyst": 0.5,
    "company": 0.5,
    "product": 0.5,
    "financials": 0.45,
    "energy": 0.45,
    "currencies": 0.4,
    "gold": 0.4,
    "ipo": 0.4,
    "markets": 0.35,
    "stock movement": 0.35,
    "general news": 0.3,
    "opinion": 0.3,
    "stock commentary": 0.25,
}


@lru_cache(maxsize=1024)
def topic_weight(topic: str | None) -> float:
    """Severity weight of a topic; the highest matching key wins, unknown topics get the default."""
    if not topic:
        return DEFAULT_TOPIC_WEIGHT
    name = topic.lower()
    hits = [w for key, w in TOPIC_WEIGHTS.items() if key in name]
    return max(hits) if hits else DEFAULT_TOPIC_WEIGHT


@dataclass(frozen=True, slots=True)
class RiskComponents:
    intensity: float
    anomaly: float
    topic_severity: float

    @property
    def risk(self) -> float:
        return float(risk_of(self.intensity, self.anomaly, self.topic_severity))

    def as_dict(self) -> dict[str, float]:
        return {
            "intensity": round(self.intensity, 4),
            "anomaly": round(self.anomaly, 4),
            "topic_severity": round(self.topic_severity, 4),
            "risk": self.risk,
        }


def risk_of(intensity: Any, anomaly: Any, topic_severity: Any) -> Any:
    """The score from its components (numbers or arrays), in [0, 100], rounded to 0.01."""
    r = 100.0 * (
        WEIGHTS["intensity"] * np.asarray(intensity)
        + WEIGHTS["anomaly"] * np.asarray(anomaly)
        + WEIGHTS["topic_severity"] * np.asarray(topic_severity)
    )
    return np.round(np.clip(r, 0.0, 100.0), 2)


def component_arrays(
    n: np.ndarray,
    neg: np.ndarray,
    sum_p_negative: np.ndarray,
    sum_topic_weight_negative: np.ndarray,
    baseline_share: np.ndarray,
    expected_negatives: np.ndarray,
    negatives_sd: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intensity, anomaly, topic_severity) of many scopes at once, one entry per scope: detection scores
    every scope of a window in one pass."""
    intensity = (sum_p_negative + INTENSITY_PRIOR_DOCS * baseline_share) / (n + INTENSITY_PRIOR_DOCS)
    anomaly = (neg - expected_negatives) / np.maximum(negatives_sd, 1.0) / ANOMALY_FULL_SD
    with np.errstate(divide="ignore", invalid="ignore"):
        topic = np.where(neg > 0, sum_topic_weight_negative / np.where(neg > 0, neg, 1), 0.0)
    return np.clip(intensity, 0.0, 1.0), np.clip(anomaly, 0.0, 1.0), np.clip(topic, 0.0, 1.0)


def risk_components(
    n: int,
    neg: int,
    sum_p_negative: float,
    sum_topic_weight_negative: float,
    baseline_share: float,
    expected_negatives: float,
    negatives_sd: float,
) -> RiskComponents:
    """Components from one window's counts and the scope's baseline (all inputs are plain numbers)."""
    args = (n, neg, sum_p_negative, sum_topic_weight_negative, baseline_share, expected_negatives, negatives_sd)
    return RiskComponents(*(float(x) for x in component_arrays(*(np.asarray(a, dtype=np.float64) for a in args))))
