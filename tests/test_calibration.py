"""Calibration study: fits read validation data only, the fitters recover known miscalibration, the diagnostics
measure what they claim, and `finsent models calibration` reproduces the recipe's temperature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.calibration import (
    CalibrationError,
    calibrated_floor,
    fit_methods,
    fit_vector_scaling,
    softmax,
    temperature_ranges,
)
from pipeline.model_folder import read_meta
from pipeline.train import fit_temperature

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sample(rng: np.random.Generator, n: int, scale, bias) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits and labels drawn from softmax(logits * scale + bias): data whose true calibration is known."""
    z = rng.normal(0.0, 3.0, (n, 3))
    p = softmax(z * np.asarray(scale) + np.asarray(bias))
    y = (rng.random((n, 1)) > np.cumsum(p, 1)).sum(1).clip(0, 2)
    return z, y


def test_fits_refuse_evaluation_splits() -> None:
    z, y = _sample(np.random.default_rng(0), 200, [0.5] * 3, [0.0] * 3)
    with pytest.raises(CalibrationError, match="fpb_test"):
        fit_methods({"fpb_val": (z, y), "fpb_test": (z, y)})
    assert [m.name for m in fit_methods({"fpb_val": (z, y), "tfns_val": (z, y)})][0].endswith("(the recipe)")


def test_vector_scaling_recovers_a_known_per_class_miscalibration() -> None:
    scale, bias = [0.6, 0.25, 0.4], [-0.4, 0.5, -0.1]
    z, y = _sample(np.random.default_rng(1), 30000, scale, bias)
    a, b = fit_vector_scaling(z, y)
    assert np.allclose(a, scale, atol=0.03) and np.allclose(b, bias, atol=0.05)
    # a single temperature cannot express it: vector scaling fits the data better
    t = fit_temperature(z, y)
    nll = lambda p: -np.log(p[np.arange(len(y)), y]).mean()  # noqa: E731
    assert nll(softmax(z * np.array(a) + np.array(b))) < nll(softmax(z / t)) - 0.01


def test_balanced_weights_undo_a_split_repeated_k_times() -> None:
    rng = np.random.default_rng(2)
    za, ya = _sample(rng, 400, [0.5] * 3, [0.0] * 3)  # wants T = 2
    zb, yb = _sample(rng, 400, [0.25] * 3, [0.0] * 3)  # wants T = 4
    pooled = fit_temperature(np.concatenate([za, zb]), np.concatenate([ya, yb]))
    zb4, yb4 = np.concatenate([zb] * 4), np.concatenate([yb] * 4)
    z, y = np.concatenate([za, zb4]), np.concatenate([ya, yb4])
    unweighted = fit_temperature(z, y)
    weighted = fit_temperature(z, y, np.concatenate([np.full(400, 1.0), np.full(1600, 0.25)]))
    assert weighted == pooled and unweighted > pooled  # the repeated split pulls an unweighted fit towards T = 4


def test_perfect_calibration_floor_draws_labels_from_the_probabilities() -> None:
    sure = np.tile([[0.0, 0.0, 1.0]], (300, 1))  # labels drawn from these are always class 2: ECE exactly 0
    assert calibrated_floor(sure, draws=5) == (0.0, 0.0)
    mean, p95 = calibrated_floor(softmax(np.random.default_rng(3).normal(0, 2, (500, 3))), draws=50)
    assert 0.0 < mean <= p95 < 0.1


def test_temperature_ranges_say_when_no_single_temperature_serves_every_split() -> None:
    rng = np.random.default_rng(4)
    hot, cold = _sample(rng, 4000, [0.5] * 3, [0.0] * 3), _sample(rng, 4000, [1 / 6] * 3, [0.0] * 3)
    ranges = temperature_ranges({"a": hot, "b": cold})
    assert ranges["per_split"]["a"][0] <= 2.0 <= ranges["per_split"]["a"][1]
    assert ranges["per_split"]["b"][0] <= 6.0 <= ranges["per_split"]["b"][1]
    assert ranges["all_splits"] is None
    assert temperature_ranges({"a": hot, "a2": _sample(rng, 4000, [0.5] * 3, [0.0] * 3)})["all_splits"] is not None


def test_cli_study_reproduces_the_recipes_temperature_and_changes_nothing(
    tiny_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    from pipeline.cli import app

    before = {p.name: p.read_bytes() for p in tiny_model.iterdir()}
    out = tmp_path / "docs"
    r = CliRunner().invoke(app, ["models", "calibration", str(tiny_model), "--data-dir", str(data_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "calibration-study.json").read_text())
    recipe = rep["methods"][0]
    assert recipe["name"] == "temperature, pooled (the recipe)"
    # refitted from the saved folder's logits (fp16 weights), it lands within a grid step or two of training's fit
    assert recipe["params"]["temperature"] == pytest.approx(read_meta(tiny_model).temperature, rel=0.035)
    assert set(recipe["splits"]) == {"fpb_val", "tfns_val", "fpb_test", "fpb_allagree_test", "tfns_dev"}
    md = (out / "calibration-study.md").read_text()
    assert f"finsent models calibration {tiny_model} --data-dir {data_dir} --out {out}" in md
    assert {p.name: p.read_bytes() for p in tiny_model.iterdir()} == before
