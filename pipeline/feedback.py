"""Analyst label corrections: one writer for `finsent label` and the web app's search page, and the report of
what the corrections a training run used changed (`feedback_effect`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from pipeline.data import DEFAULT_SEED, SENTIMENT_LABELS, FeedbackRow, build_splits, eval_texts, feedback_examples
from pipeline.store import schema as s
from pipeline.store import session_scope

MAX_AUTHOR_LENGTH = 100


def add_feedback(
    engine: Engine,
    document_id: int,
    label: str | None,
    topic: str | None = None,
    author: str | None = None,
    text: str | None = None,
) -> int:
    """Insert one analyst correction; returns the feedback id. Label must be negative/neutral/positive.

    Training reads these rows (never evaluation), so a bad label is refused here rather than later."""
    if label is not None and label.lower() not in SENTIMENT_LABELS:
        raise ValueError(f"label {label!r}: expected one of {', '.join(SENTIMENT_LABELS)}")
    with session_scope(engine) as session:
        if session.get(s.Document, document_id) is None:
            raise LookupError(f"no document with id {document_id}")
        fb = s.Feedback(
            document_id=document_id,
            text=text,
            label=label.lower() if label else None,
            topic=topic,
            author=author[:MAX_AUTHOR_LENGTH] if author else None,
            created_at=datetime.now(UTC),
        )
        session.add(fb)
        session.flush()
        return fb.id


# --------------------------------------------------------------------------- what feedback changed

# Validation splits (early stopping) and the held-out dev/test splits: feedback never enters any of them
# (pipeline.data.eval_texts), so they show what the feedback changed elsewhere.
REPORT_SPLITS = ("fpb_val", "tfns_val", "fpb_test", "tfns_dev")


@dataclass(frozen=True, slots=True)
class SplitChange:
    n: int
    accuracy: float
    accuracy_reference: float
    macro_f1: float
    macro_f1_reference: float
    flipped: int  # texts the two models label differently
    fixed: int  # ... of which the reference was wrong and the new model right
    broken: int  # ... and the reverse


@dataclass
class FeedbackReport:
    """A model trained with analyst feedback against a reference (the production model, else the bundled default):
    per split, the metric differences and how many predictions flipped; and how often each model agrees with the
    analysts' own labels. The reference may differ in more than the feedback (another run, other data), so this is
    what changed since the reference, not an ablation."""

    rows_used: int
    skipped: dict[str, int]
    reference: str | None  # version
    reference_path: str | None
    splits: dict[str, SplitChange] = field(default_factory=dict)
    agreement: dict[str, int] = field(default_factory=dict)  # n, model, reference: analyst sentiment labels matched
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def feedback_effect(
    candidate: str | Path,
    reference: str | Path | None,
    data_dir: str | Path | None,
    rows: Sequence[FeedbackRow],
    *,
    split_seed: int | None = None,
    limit: int | None = None,
) -> FeedbackReport:
    """What the feedback rows a model was trained with changed, against `reference` (None: counts only)."""
    from pipeline.evaluate import sentiment_predictions, split_result
    from pipeline.score import Scorer

    splits = build_splits(data_dir, seed=DEFAULT_SEED if split_seed is None else split_seed, limit=limit)
    used, skipped = feedback_examples(rows, splits.topics, eval_texts(splits))  # as train_model selects them
    report = FeedbackReport(len(used), skipped, None, None)
    if not used:
        report.note = "no feedback rows used: nothing to compare"
        return report
    if reference is None:
        report.note = "no reference model to compare with"
        return report
    model, ref = Scorer.load(str(candidate)), Scorer.load(str(reference))
    report.reference, report.reference_path = ref.version, str(reference)
    if ref.version == model.version:
        report.note = "the reference is the model itself"
        return report
    labels = list(SENTIMENT_LABELS)
    pools = {**splits.val, **splits.eval}
    for name in REPORT_SPLITS:
        exs = [ex for ex in pools.get(name, []) if ex.sentiment is not None]
        if not exs:
            continue
        texts, y = [ex.text for ex in exs], [int(ex.sentiment or 0) for ex in exs]
        new, old = sentiment_predictions(model, texts), sentiment_predictions(ref, texts)
        r_new, r_old = split_result(y, new, labels), split_result(y, old, labels)
        pairs = [(a, b, t) for a, b, t in zip(new, old, y, strict=True) if a != b]
        report.splits[name] = SplitChange(
            n=len(texts),
            accuracy=r_new.accuracy,
            accuracy_reference=r_old.accuracy,
            macro_f1=r_new.macro_f1,
            macro_f1_reference=r_old.macro_f1,
            flipped=len(pairs),
            fixed=sum(a == t for a, _, t in pairs),
            broken=sum(b == t for _, b, t in pairs),
        )
    labelled = [ex for ex in used if ex.sentiment is not None]
    if labelled:
        texts, y = [ex.text for ex in labelled], [int(ex.sentiment or 0) for ex in labelled]
        report.agreement = {
            "n": len(labelled),
            "model": sum(p == t for p, t in zip(sentiment_predictions(model, texts), y, strict=True)),
            "reference": sum(p == t for p, t in zip(sentiment_predictions(ref, texts), y, strict=True)),
        }
    return report


def reference_model(engine: Engine | None) -> str:
    """The model a new one is compared with: the registry's production model, else the bundled default."""
    from pipeline.config import DEFAULT_MODEL_DIR

    if engine is not None:
        from pipeline.store import production_model

        with session_scope(engine) as session:
            prod = production_model(session)
            if prod is not None and prod.path and Path(prod.path).expanduser().is_dir():
                return prod.path
    return str(DEFAULT_MODEL_DIR)


def record_feedback_report(
    model_dir: str | Path, data_dir: str | Path | None, rows: Sequence[FeedbackRow], engine: Engine | None
) -> FeedbackReport:
    """Compute the report for a trained model folder (its split seed and limit) and store it in its finsent.json
    as `metrics.feedback`, which the registry copies when the folder is registered."""
    from pipeline import model_folder

    meta = model_folder.read_meta_dict(model_dir)
    hp = meta.get("hyperparameters") or {}
    report = feedback_effect(
        model_dir,
        reference_model(engine) if rows else None,
        data_dir,
        rows,
        split_seed=meta.get("split_seed"),
        limit=hp.get("limit"),
    )
    metrics = {**(meta.get("metrics") or {}), "feedback": report.to_json()}
    model_folder.update_meta(model_dir, metrics=metrics)  # atomic: finsent.json marks a finished candidate
    return report
