"""Calibration study: which post-hoc calibration, fitted on the validation splits only, reaches the ECE target
on every evaluation split (`finsent models calibration MODEL`, writes docs/calibration-study.md/.json).

Every method is fitted by `fit_methods`, which takes the validation splits' raw logits and nothing else (it
refuses any other split name), and is then *reported* on validation and evaluation splits alike. The
diagnostics below the methods (bootstrap intervals, the ECE a perfectly calibrated model would still show,
which single temperatures would meet the target, FPB test by annotator agreement) read the evaluation
splits to explain the numbers; none of them fits anything the model uses.

Methods: the recipe's temperature (pooled validation NLL, as `pipeline.train` fits it), the same with each
validation split weighing the same, vector scaling (a scale and a bias per class; foldable into the
classifier's last Linear like the temperature, but it can change the argmax, so accuracy is reported), and
isotonic regression of the top-class confidence (the most flexible monotone confidence map: not foldable,
included to show what no confidence map can fix).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.data import EVAL_SPLITS, SENTIMENT_LABELS, VAL_SPLITS, Splits, build_splits
from pipeline.errors import FinsentError
from pipeline.train import fit_temperature

SENTIMENT_VAL = ("fpb_val", "tfns_val")
SENTIMENT_EVAL = ("fpb_test", "fpb_allagree_test", "tfns_dev")
TARGET_ECE = 0.05  # pipeline.evaluate.TARGETS: calibrated ECE <= 0.05 on every split
BINS = 15
BOOTSTRAP = 2000
FLOOR_DRAWS = 300
SEED = 20261201

Logits = Mapping[str, tuple[Any, Any]]  # split name -> (raw logits, labels), numpy arrays


class CalibrationError(FinsentError, ValueError):
    """A calibration fit was given something other than validation data (a caller's mistake: exit 1)."""


def softmax(z: Any) -> Any:
    import numpy as np

    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def ece(probs: Any, labels: Any) -> float:
    from pipeline.evaluate import expected_calibration_error

    return expected_calibration_error(probs, labels, bins=BINS)


@dataclass(frozen=True)
class Fitted:
    """One calibration method fitted on validation data: `probs` maps raw logits to probabilities."""

    name: str
    params: dict[str, Any]
    probs: Callable[[Any], Any] = field(repr=False, compare=False)
    foldable: bool = True  # an affine map of the logits: folds into the classifier's last Linear


def _pooled(val: Logits, balanced: bool) -> tuple[Any, Any, Any]:
    """Validation logits and labels concatenated, with per-example weights (each split the same total when
    `balanced`, else each example the same)."""
    import numpy as np

    parts = [(np.asarray(z, dtype=np.float64), np.asarray(y)) for z, y in val.values() if len(y)]
    z = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    w = np.concatenate([np.full(len(p[1]), 1.0 / len(p[1]) if balanced else 1.0) for p in parts])
    return z, y, w


def fit_vector_scaling(logits: Any, labels: Any, weights: Any = None) -> tuple[list[float], list[float]]:
    """(scale, bias) per class minimising weighted NLL of softmax(logits * scale + bias), started at the fitted
    temperature; the bias is centred (softmax ignores a common shift)."""
    import numpy as np
    from scipy.optimize import minimize

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    k = z.shape[1]
    rows = np.arange(len(y))

    def nll(theta: Any) -> tuple[float, Any]:
        a, b = theta[:k], theta[k:]
        p = softmax(z * a + b)
        g = p.copy()
        g[rows, y] -= 1.0  # d(-log p_y)/d(logit)
        g *= w[:, None]
        return float(-(w * np.log(p[rows, y] + 1e-300)).sum()), np.concatenate([(g * z).sum(0), g.sum(0)])

    t = fit_temperature(z, y, w)
    res = minimize(nll, np.concatenate([np.full(k, 1.0 / t), np.zeros(k)]), jac=True, method="L-BFGS-B")
    a, b = res.x[:k], res.x[k:] - res.x[k:].mean()
    return [round(float(v), 6) for v in a], [round(float(v), 6) for v in b]


def fit_isotonic_confidence(logits: Any, labels: Any, temperature: float) -> Callable[[Any], Any]:
    """Isotonic map of the tempered top-class probability to validation accuracy; the other classes keep
    their shares of the rest."""
    import numpy as np
    from sklearn.isotonic import IsotonicRegression

    p = softmax(np.asarray(logits) / temperature)
    k = p.shape[1]
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1.0 / k, y_max=1.0)
    iso.fit(p.max(1), p.argmax(1) == np.asarray(labels))

    def probs(z: Any) -> Any:
        q = softmax(np.asarray(z) / temperature)
        top, conf = q.argmax(1), q.max(1)
        new = iso.predict(conf)
        rest = q * ((1.0 - new) / np.maximum(1.0 - conf, 1e-12))[:, None]
        rest[np.arange(len(q)), top] = new
        return rest

    return probs


def _affine(scale: list[float], bias: list[float]) -> Callable[[Any], Any]:
    import numpy as np

    a, b = np.array(scale), np.array(bias)
    return lambda z: softmax(np.asarray(z) * a + b)


def fit_methods(val: Logits) -> list[Fitted]:
    """Every studied sentiment calibration, fitted on the sentiment validation splits only."""
    import numpy as np

    wrong = sorted(set(val) - set(VAL_SPLITS))
    if wrong:
        raise CalibrationError(f"calibration fits on validation splits only ({', '.join(VAL_SPLITS)}), got {wrong}")
    z, y, w = _pooled(val, balanced=False)
    zb, yb, wb = _pooled(val, balanced=True)
    t = fit_temperature(z, y)
    tb = fit_temperature(zb, yb, wb)
    out = [
        Fitted("temperature, pooled (the recipe)", {"temperature": t}, lambda x: softmax(np.asarray(x) / t)),
        Fitted("temperature, splits weigh the same", {"temperature": tb}, lambda x: softmax(np.asarray(x) / tb)),
    ]
    for label, (zz, yy, ww) in (("pooled", (z, y, None)), ("splits weigh the same", (zb, yb, wb))):
        a, b = fit_vector_scaling(zz, yy, ww)
        out.append(
            Fitted(
                f"vector scaling, {label}",
                {"scale": a, "bias": b},
                _affine(a, b),
            )
        )
    out.append(Fitted("isotonic confidence, pooled", {"temperature": t}, fit_isotonic_confidence(z, y, t), False))
    return out


def bootstrap_interval(probs: Any, labels: Any, draws: int = BOOTSTRAP, seed: int = SEED) -> tuple[float, float]:
    """95% percentile interval of the ECE over bootstrap resamples of the split."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(labels)
    vals = [ece(probs[i], labels[i]) for i in (rng.integers(0, n, n) for _ in range(draws))]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def calibrated_floor(probs: Any, draws: int = FLOOR_DRAWS, seed: int = SEED) -> tuple[float, float]:
    """(mean, 95th percentile) ECE of a perfectly calibrated model with these probabilities: labels drawn from
    the probabilities themselves. What sampling alone adds at this split size and binning."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs, 1)
    vals = [ece(probs, (rng.random((len(probs), 1)) > cum).sum(1).clip(0, probs.shape[1] - 1)) for _ in range(draws)]
    return float(np.mean(vals)), float(np.percentile(vals, 95))


def temperature_ranges(logits: Logits, grid: tuple[float, float, float] = (1.0, 6.0, 0.05)) -> dict[str, Any]:
    """Diagnosis, reading evaluation splits: the temperatures at which each split meets the target, and those
    that meet it on all of them at once (an empty list: no single temperature can)."""
    import numpy as np

    ts = [round(float(t), 2) for t in np.arange(grid[0], grid[1] + 1e-9, grid[2])]
    meets = {s: [t for t in ts if ece(softmax(np.asarray(z) / t), y) <= TARGET_ECE] for s, (z, y) in logits.items()}
    common = sorted(set.intersection(*(set(v) for v in meets.values()))) if meets else []
    return {
        "per_split": {s: [min(v), max(v)] if v else None for s, v in meets.items()},
        "all_splits": [min(common), max(common)] if common else None,
    }


def _split_logits(scorer: Any, splits: Splits, names: tuple[str, ...], group: str) -> dict[str, tuple[Any, Any]]:
    """Raw (sentiment or topic) logits and labels of the named splits, sentiment columns in SENTIMENT_LABELS order."""
    import numpy as np

    from pipeline.evaluate import sentiment_order

    source = splits.val if group == "val" else splits.eval
    out = {}
    for name in names:
        exs = source.get(name) or []
        if not exs:
            continue
        sent, topic = scorer.logits([ex.text for ex in exs])
        if name.startswith("topic"):
            if topic is None:
                continue
            out[name] = (topic.astype(np.float64), np.array([ex.topic for ex in exs]))
        else:
            out[name] = (sent[:, sentiment_order(scorer)].astype(np.float64), np.array([ex.sentiment for ex in exs]))
    return out


def study(model: str | Path, data_dir: str | Path | None = None, *, limit: int | None = None) -> dict[str, Any]:
    """Fit every method on `model`'s validation logits, report each on every split, with the diagnostics."""
    import numpy as np

    from pipeline.evaluate import _model_split_seed
    from pipeline.score import Scorer

    t0 = time.monotonic()
    path = str(model)
    splits = build_splits(data_dir, seed=_model_split_seed(path), limit=limit)
    scorer = Scorer.load(path)
    val = _split_logits(scorer, splits, SENTIMENT_VAL, "val")
    evals = _split_logits(scorer, splits, SENTIMENT_EVAL, "eval")
    everything = {**val, **evals}
    fitted = fit_methods(val)
    methods = []
    for m in fitted:
        row: dict[str, Any] = {"name": m.name, "params": m.params, "foldable": m.foldable, "splits": {}}
        for s, (z, y) in everything.items():
            p = m.probs(z)
            row["splits"][s] = {"ece": ece(p, y), "accuracy": float((p.argmax(1) == y).mean())}
        row["meets_target"] = all(row["splits"][s]["ece"] <= TARGET_ECE for s in evals)
        methods.append(row)
    recipe = fitted[0]
    diagnostics: dict[str, Any] = {}
    for s, (z, y) in everything.items():
        p = recipe.probs(z)
        lo, hi = bootstrap_interval(p, y)
        floor, floor95 = calibrated_floor(p)
        diagnostics[s] = {
            "n": len(y),
            "ece": ece(p, y),
            "bootstrap_95": [lo, hi],
            "perfect_floor_mean": floor,
            "perfect_floor_95": floor95,
            "confidence": float(p.max(1).mean()),
            "accuracy": float((p.argmax(1) == y).mean()),
        }
    if "fpb_test" in evals and "fpb_allagree_test" in evals:
        from pipeline.data import normalise

        allagree = {normalise(ex.text) for ex in splits.eval["fpb_allagree_test"]}
        z, y = evals["fpb_test"]
        p = recipe.probs(z)
        mask = np.array([normalise(ex.text) in allagree for ex in splits.eval["fpb_test"]])
        diagnostics["fpb_test_by_agreement"] = {
            part: {
                "n": int(m.sum()),
                "confidence": float(p[m].max(1).mean()),
                "accuracy": float((p[m].argmax(1) == y[m]).mean()),
                "ece": ece(p[m], y[m]),
            }
            for part, m in (("all annotators agree", mask), ("50-99% agree", ~mask))
            if m.any()
        }
    topic: dict[str, Any] = {}
    topic_val = _split_logits(scorer, splits, ("topic_val",), "val")
    if topic_val:
        tt = fit_temperature(*topic_val["topic_val"])
        for s, (z, y) in {**topic_val, **_split_logits(scorer, splits, ("topic_dev",), "eval")}.items():
            topic[s] = {"ece": ece(softmax(z / tt), y), "accuracy": float((z.argmax(1) == y).mean())}
        topic["temperature"] = tt
    return {
        "model": path,
        "version": scorer.version,
        "recorded_temperature": scorer.temperature,
        "split_seed": splits.seed,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "target_ece": TARGET_ECE,
        "bins": BINS,
        "labels": list(SENTIMENT_LABELS),
        "eval_splits": [s for s in EVAL_SPLITS if s in evals],
        "methods": methods,
        "any_meets_target": any(m["meets_target"] for m in methods),
        "diagnostics": diagnostics,
        "temperature_ranges": temperature_ranges(evals),
        "topic": topic,
        "limit": limit,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _f(v: float) -> str:
    return f"{v:.3f}"


def render_markdown(rep: Mapping[str, Any], command: str) -> str:
    splits = list(rep["methods"][0]["splits"]) if rep["methods"] else []
    lines = [
        "# Calibration study",
        "",
        f"Model `{rep['model']}` (version `{rep['version']}`, recorded sentiment temperature "
        f"{rep['recorded_temperature']:g}), {rep['created_at']}, {rep['seconds']:.0f} s"
        + (f", every split capped at {rep['limit']}" if rep.get("limit") else "")
        + ". Regenerate with:",
        "",
        "```",
        command,
        "```",
        "",
        f"ECE with {rep['bins']} equal-width bins (as `finsent evaluate`); target ≤ {rep['target_ece']} on every "
        "evaluation split. Every method is fitted on the validation splits (fpb_val, tfns_val) only.",
        "",
        "## Methods (ECE / accuracy)",
        "",
        "| method | parameters | " + " | ".join(splits) + " | meets target |",
        "|---|---|" + "---|" * len(splits) + "---|",
    ]
    for m in rep["methods"]:
        params = ", ".join(f"{k} {v}" for k, v in m["params"].items()) + ("" if m["foldable"] else " (not foldable)")
        cells = [f"{_f(m['splits'][s]['ece'])} / {_f(m['splits'][s]['accuracy'])}" for s in splits]
        lines.append(
            f"| {m['name']} | {params} | " + " | ".join(cells) + f" | {'yes' if m['meets_target'] else 'no'} |"
        )
    lines += [
        "",
        f"Any method meeting the target on every evaluation split: **{'yes' if rep['any_meets_target'] else 'no'}**.",
        "",
        "## Is it noise? (the recipe's temperature)",
        "",
        "Bootstrap: 95% percentile interval over resamples of the split. Floor: the ECE a perfectly calibrated "
        "model with the same probabilities would show (labels drawn from them), mean and 95th percentile.",
        "",
        "| split | n | ECE | bootstrap 95% | perfectly calibrated: mean / 95th pct | mean confidence | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, d in rep["diagnostics"].items():
        if s == "fpb_test_by_agreement":
            continue
        lines.append(
            f"| {s} | {d['n']} | {_f(d['ece'])} | {_f(d['bootstrap_95'][0])}–{_f(d['bootstrap_95'][1])} | "
            f"{_f(d['perfect_floor_mean'])} / {_f(d['perfect_floor_95'])} | {_f(d['confidence'])} | "
            f"{_f(d['accuracy'])} |"
        )
    by = rep["diagnostics"].get("fpb_test_by_agreement")
    if by:
        lines += [
            "",
            "## FPB test by annotator agreement (the recipe's temperature)",
            "",
            "| part | n | mean confidence | accuracy | ECE |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {d['n']} | {_f(d['confidence'])} | {_f(d['accuracy'])} | {_f(d['ece'])} |" for k, d in by.items()
        ]
    tr = rep["temperature_ranges"]
    lines += [
        "",
        "## Which single temperature could meet the target (diagnosis: reads the evaluation splits)",
        "",
        "| split | temperatures meeting the target |",
        "|---|---|",
    ]
    lines += [f"| {s} | {'none' if r is None else f'{r[0]:g}–{r[1]:g}'} |" for s, r in tr["per_split"].items()]
    common = tr["all_splits"]
    lines.append(f"| all at once | {'none' if common is None else f'{common[0]:g}–{common[1]:g}'} |")
    if rep["topic"]:
        t = rep["topic"]
        topic_cells = ", ".join(f"{s} ECE {_f(v['ece'])}" for s, v in t.items() if isinstance(v, dict))
        lines += ["", f"Topic head: temperature {t['temperature']:g} fitted on topic_val; {topic_cells}."]
    return "\n".join(lines) + "\n"


def write_study(rep: Mapping[str, Any], out_dir: str | Path, command: str) -> tuple[Path, Path]:
    from pipeline.evaluate import write_pair

    return write_pair(out_dir, "calibration-study", render_markdown(rep, command), dict(rep))
