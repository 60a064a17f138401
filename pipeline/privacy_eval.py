"""Masking must not change sentiment: the model's accuracy on the FPB test and TFNS dev splits, scored as written and
after the personal-data masking ingest applies (the same function, `pipeline.ingest.personal_data_masker`, with the
config's rules and watchlist). Target: accuracy unchanged within 0.5 point on each split.

Only the texts masking changed are scored again; every other masked text is the same input as before, so its
prediction is the one already made. `finsent evaluate MODEL --masking` writes docs/masking-evaluation.md/.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import PrivacyConfig, WatchlistEntity
from pipeline.data import SENTIMENT_LABELS, Splits, build_splits
from pipeline.evaluate import (
    SPLIT_TITLES,
    _cell,
    _model_split_seed,
    _truth,
    sentiment_predictions,
    split_result,
    write_pair,
)

MASKING_SPLITS = ("fpb_test", "tfns_dev")
TARGET_POINTS = 0.5  # largest accepted accuracy change, in percentage points
EXAMPLES = 15  # changed texts listed per split (flipped predictions first)


@dataclass
class MaskingSplit:
    n: int
    changed: int  # texts the masking changed
    flipped: int  # of those, how many got another predicted label
    accuracy: float
    accuracy_masked: float
    macro_f1: float
    macro_f1_masked: float
    examples: list[dict[str, Any]] = field(default_factory=list)  # masked text, truth, prediction before/after

    @property
    def delta_points(self) -> float:
        return round((self.accuracy_masked - self.accuracy) * 100, 3)

    @property
    def met(self) -> bool:
        return abs(self.delta_points) <= TARGET_POINTS


@dataclass
class MaskingReport:
    model: str
    version: str
    created_at: str
    command: str
    split_seed: int
    rules: dict[str, Any]
    watchlist: list[str]
    splits: dict[str, MaskingSplit]
    seconds: float = 0.0

    @property
    def met(self) -> bool:
        return all(r.met for r in self.splits.values())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k, r in self.splits.items():
            out["splits"][k].update(delta_points=r.delta_points, met=r.met)
        out.update(target_points=TARGET_POINTS, met=self.met)
        return out


def masking_effect(scorer: Any, splits: Splits, mask: Callable[[str], str]) -> dict[str, MaskingSplit]:
    """Accuracy and macro-F1 of `scorer` on each masking split as written and masked, with what changed."""
    labels = list(SENTIMENT_LABELS)
    out: dict[str, MaskingSplit] = {}
    for split in MASKING_SPLITS:
        exs = splits.eval.get(split) or []
        if not exs:
            continue
        texts = [ex.text for ex in exs]
        y = _truth(splits, split)
        masked = [mask(t) for t in texts]
        changed = [i for i, (a, b) in enumerate(zip(texts, masked, strict=True)) if a != b]
        before = sentiment_predictions(scorer, texts)
        after = list(before)
        for i, p in zip(changed, sentiment_predictions(scorer, [masked[i] for i in changed]), strict=True):
            after[i] = p
        r0, r1 = split_result(y, before, labels), split_result(y, after, labels)
        flipped = [i for i in changed if before[i] != after[i]]
        shown = flipped + [i for i in changed if before[i] == after[i]]
        out[split] = MaskingSplit(
            n=len(texts),
            changed=len(changed),
            flipped=len(flipped),
            accuracy=r0.accuracy,
            accuracy_masked=r1.accuracy,
            macro_f1=r0.macro_f1,
            macro_f1_masked=r1.macro_f1,
            examples=[
                {"masked": masked[i], "true": labels[y[i]], "before": labels[before[i]], "after": labels[after[i]]}
                for i in shown[:EXAMPLES]
            ],
        )
    return out


def evaluate_masking(
    model: str | Path,
    data_dir: str | Path | None,
    rules: PrivacyConfig,
    watchlist: Sequence[WatchlistEntity],
    *,
    limit: int | None = None,
    command: str = "",
) -> MaskingReport:
    """Score MODEL on the masking splits as written and masked with ingest's masker for these rules and watchlist."""
    from pipeline.ingest import personal_data_masker
    from pipeline.score import Scorer

    t0 = time.monotonic()
    seed = _model_split_seed(str(model))
    splits = build_splits(data_dir, seed=seed, limit=limit)
    scorer = Scorer.load(str(model))
    results = masking_effect(scorer, splits, personal_data_masker(rules, watchlist))
    return MaskingReport(
        model=str(model),
        version=scorer.version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        split_seed=seed,
        rules=rules.model_dump(),
        watchlist=[w.key for w in watchlist],
        splits=results,
        seconds=round(time.monotonic() - t0, 1),
    )


def render_markdown(rep: MaskingReport) -> str:
    kept = ", ".join(rep.watchlist) or "none"
    lines = [
        "# Masking personal data does not change sentiment",
        "",
        f"Model `{rep.model}` (version `{rep.version}`), {rep.created_at}, {rep.seconds:.0f} s. Regenerate with:",
        "",
        f"```\n{rep.command}\n```",
        "",
        "Each text of the fixed splits (seed "
        f"{rep.split_seed}) is scored as written and after `pipeline.ingest.personal_data_masker`, the function "
        "ingest applies before a document is stored, with the config's rules "
        f"(`{json.dumps(rep.rules, sort_keys=True)}`) and watchlist (handles kept: {kept}). Rules: "
        "[docs/privacy.md](privacy.md). Target: accuracy unchanged within "
        f"{TARGET_POINTS} point on each split: **{'met' if rep.met else 'not met'}**.",
        "",
        "| split | n | texts masking changed | predictions flipped | accuracy as written | accuracy masked | "
        "difference (points) | macro-F1 as written | macro-F1 masked | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in rep.splits.items():
        lines.append(
            f"| {SPLIT_TITLES[k]} | {r.n} | {r.changed} | {r.flipped} | {r.accuracy:.4f} | {r.accuracy_masked:.4f} | "
            f"{r.delta_points:+.2f} | {r.macro_f1:.4f} | {r.macro_f1_masked:.4f} | {'met' if r.met else '**missed**'} |"
        )
    for k, r in rep.splits.items():
        if not r.examples:
            continue
        lines += [
            "",
            f"### {SPLIT_TITLES[k]}: texts masking changed (flipped predictions first, at most {EXAMPLES})",
            "",
            "| masked text | true | predicted as written | predicted masked |",
            "|---|---|---|---|",
        ]
        for e in r.examples:
            text = _cell(" ".join(e["masked"].split())[:220])
            lines.append(f"| {text} | {e['true']} | {e['before']} | {e['after']} |")
    return "\n".join(lines) + "\n"


def write_report(rep: MaskingReport, out_dir: str | Path) -> tuple[Path, Path]:
    return write_pair(out_dir, "masking-evaluation", render_markdown(rep), rep.to_json())
