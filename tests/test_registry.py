"""Registry and promotion gate against the real Postgres."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.config import DEFAULT_MODEL_DIR, load_config
from pipeline.data import EVAL_SPLITS
from pipeline.model_folder import ModelLoadError
from pipeline.model_folder import read_meta_dict as read_meta
from pipeline.registry import (
    RegistryError,
    bundled_baseline,
    list_models,
    promote,
    promote_if_better,
    record_evaluation,
    register_trained,
    resolve_model_path,
    rollback,
)
from pipeline.store import session_scope

FPS = {k: f"fp-{k}" for k in EVAL_SPLITS}


def fake_model(root: Path, version: str) -> Path:
    d = root / version
    d.mkdir(parents=True)
    meta = {
        "version": version,
        "base": "tiny",
        "topics": ["a", "b"],
        "temperature": 1.5,
        "split_seed": 7,
        "hyperparameters": {"lr": 1e-4},
        "data_fingerprints": {"x": "y"},
    }
    (d / "finsent.json").write_text(json.dumps(meta))
    return d


def metrics(primary: float, others: float = 0.80, **overrides: float) -> dict:
    m = {k: {"accuracy": others, "macro_f1": others} for k in EVAL_SPLITS}
    m["fpb_test"]["macro_f1"] = primary
    for key, v in overrides.items():
        split, metric = key.rsplit("__", 1)
        m[split][metric] = v
    return m


def bundled(root: Path, version: str, evals: dict | None, fps: dict = FPS) -> Path:
    """A stand-in for models/finsent-minilm: a finsent.json with (or without) recorded fixed-split metrics."""
    d = fake_model(root, version)
    if evals is not None:
        meta = json.loads((d / "finsent.json").read_text())
        (d / "finsent.json").write_text(
            json.dumps({**meta, "metrics": {"val": {}, "eval": evals, "eval_fingerprints": fps}})
        )
    return d


def add(engine, root: Path, version: str, evals: dict | None, fps: dict = FPS) -> str:
    path = fake_model(root, version)
    assert register_trained(engine, path) == version
    if evals is not None:
        record_evaluation(engine, version, str(path), evals, fps)
    return version


def production(engine) -> str | None:
    return next((m.id for m in list_models(engine) if m.is_production), None)


def test_gate_accepts_first_and_better_refuses_worse(engine, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.registry")
    weak = bundled(tmp_path / "bundled", "default-v0", metrics(0.75, others=0.75))
    add(engine, tmp_path, "m1", metrics(0.80))
    d = promote_if_better(engine, "m1", bundled=weak)
    assert d.promoted and d.incumbent is None and d.baseline == "default-v0" and production(engine) == "m1"
    assert d.reasons[0] == "no production model: compared with the bundled default default-v0"
    again = promote_if_better(engine, "m1", bundled=weak)  # a retried promote task
    assert again.promoted and again.reasons == d.reasons and again.comparisons == d.comparisons
    with session_scope(engine) as session:
        from pipeline.store import schema as sc

        assert session.get(sc.ModelVersion, "m1").metrics["promotion_decision"]["promoted"] is True

    add(engine, tmp_path, "worse", metrics(0.79))
    d = promote_if_better(engine, "worse")
    assert not d.promoted and production(engine) == "m1"
    assert any("primary" in r for r in d.reasons)

    add(engine, tmp_path, "same", metrics(0.80))
    assert not promote_if_better(engine, "same").promoted  # equal is not better

    add(engine, tmp_path, "trade", metrics(0.85, tfns_dev__accuracy=0.70))  # better primary, worse elsewhere
    d = promote_if_better(engine, "trade")
    assert not d.promoted and production(engine) == "m1"
    assert any("tfns_dev accuracy" in r for r in d.reasons)
    bad = [c for c in d.comparisons if not c.ok]
    assert [(c.split, c.metric, c.candidate, c.incumbent) for c in bad] == [("tfns_dev", "accuracy", 0.70, 0.80)]
    assert promote_if_better(engine, "trade", tolerance=0.2).promoted  # the tolerance is an explicit choice

    add(engine, tmp_path, "better", metrics(0.90, others=0.85))
    d = promote_if_better(engine, "better")
    assert d.promoted and d.incumbent == "trade" and production(engine) == "better"
    assert "ACCEPTED for better" in caplog.text and "REFUSED for worse" in caplog.text
    with session_scope(engine) as s:
        from pipeline.store import schema as sc

        row = s.get(sc.ModelVersion, "worse")
        assert row.metrics["promotion_decision"]["promoted"] is False
        assert row.split_seed == 7 and row.hyperparameters == {"lr": 1e-4} and row.base == "tiny"


def test_without_production_the_candidate_must_beat_the_bundled_default(engine, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.registry")
    default = bundled(tmp_path / "bundled", "default-v1", metrics(0.82, others=0.85))
    add(engine, tmp_path, "weak", metrics(0.40, others=0.40))
    d = promote_if_better(engine, "weak", bundled=default)
    assert not d.promoted and d.incumbent is None and d.baseline == "default-v1" and production(engine) is None
    assert "not better on the primary fpb_test macro_f1: 0.4 <= 0.82" in d.reasons
    assert "worse on tfns_dev accuracy: 0.4 < 0.85" in d.reasons
    assert "REFUSED for weak (production was None, compared with default-v1)" in caplog.text

    add(engine, tmp_path, "trade", metrics(0.90, others=0.85, topic_dev__macro_f1=0.84))
    d = promote_if_better(engine, "trade", bundled=default)
    assert not d.promoted and [(c.split, c.metric, c.candidate, c.incumbent) for c in d.comparisons if not c.ok] == [
        ("topic_dev", "macro_f1", 0.84, 0.85)
    ]

    add(engine, tmp_path, "other-data", metrics(0.95, others=0.95), fps={k: "other" for k in EVAL_SPLITS})
    d = promote_if_better(engine, "other-data", bundled=default)
    assert not d.promoted and "different splits" in d.reasons[0] and "default-v1" in d.reasons[0]

    add(engine, tmp_path, "good", metrics(0.83, others=0.85))
    d = promote_if_better(engine, "good", bundled=default)
    assert d.promoted and not d.forced and production(engine) == "good"
    assert d.reasons[-1] == "better on fpb_test macro_f1 (0.82 -> 0.83) and no worse elsewhere"


def test_the_shipped_default_model_is_the_baseline(engine, tmp_path: Path) -> None:
    """models/finsent-minilm carries its test-split numbers, so a first weekly candidate has a bar to clear."""
    version, shipped, why = bundled_baseline()
    assert why is None and version == read_meta(DEFAULT_MODEL_DIR)["version"]
    report = json.loads((Path(__file__).parents[1] / "docs" / "model-evaluation.json").read_text())
    assert report["version"] == version
    for split in EVAL_SPLITS:
        assert shipped["eval"][split]["macro_f1"] == report["results"]["model"][split]["macro_f1"]
        assert shipped["eval_fingerprints"][split] == report["fingerprints"][f"split:{split}"]
    fps = shipped["eval_fingerprints"]
    just_below = {
        k: {m: v - 0.001 for m, v in r.items() if m in ("accuracy", "macro_f1")} for k, r in shipped["eval"].items()
    }
    add(engine, tmp_path, "candidate", just_below, fps)
    d = promote_if_better(engine, "candidate")
    assert not d.promoted and d.baseline == version and production(engine) is None
    primary = next(c for c in d.comparisons if "primary" in c.metric)
    assert primary.incumbent == shipped["eval"]["fpb_test"]["macro_f1"] and not primary.ok


def test_no_baseline_numbers_refuses_unless_forced(engine, tmp_path: Path) -> None:
    unevaluated = bundled(tmp_path / "bundled", "default-v2", None)
    add(engine, tmp_path, "c1", metrics(0.99, others=0.99))
    d = promote_if_better(engine, "c1", bundled=unevaluated)
    assert not d.promoted and production(engine) is None
    assert "default-v2 has no recorded evaluation metrics" in d.reasons[0] and "--force" in d.reasons[0]
    d = promote_if_better(engine, "c1", bundled=tmp_path / "no-such-folder")
    assert not d.promoted and "cannot be read" in d.reasons[0] and "no-such-folder" in d.reasons[0]
    d = promote_if_better(engine, "c1", bundled=unevaluated, force=True)
    assert d.promoted and d.forced and production(engine) == "c1"
    assert d.reasons[-1] == "forced by the operator although the gate refused"
    with session_scope(engine) as s:
        from pipeline.store import schema as sc

        assert s.get(sc.ModelVersion, "c1").metrics["promotion_decision"]["forced"] is True


def test_production_bundled_default_without_db_metrics_uses_its_folder(engine, tmp_path: Path) -> None:
    """The bundled default promoted by hand has a registry row without `eval` (run registers it bare)."""
    default = bundled(tmp_path / "bundled", "default-v3", metrics(0.82))
    add(engine, tmp_path, "default-v3", None)
    promote(engine, "default-v3")
    add(engine, tmp_path, "worse", metrics(0.81))
    d = promote_if_better(engine, "worse", bundled=default)
    assert not d.promoted and d.incumbent == d.baseline == "default-v3"
    assert "not better on the primary fpb_test macro_f1: 0.81 <= 0.82" in d.reasons
    add(engine, tmp_path, "stranger-prod", None)
    promote(engine, "stranger-prod")
    d = promote_if_better(engine, "worse", bundled=default)
    assert not d.promoted and d.reasons == [
        "production stranger-prod has no evaluation metrics: evaluate it, or promote by hand with --force"
    ]


def test_gate_needs_evaluations_on_the_same_splits(engine, tmp_path: Path) -> None:
    add(engine, tmp_path, "prod", metrics(0.80))
    promote(engine, "prod")
    add(engine, tmp_path, "unevaluated", None)
    d = promote_if_better(engine, "unevaluated")
    assert not d.promoted and "finsent evaluate" in d.reasons[0]
    add(engine, tmp_path, "other-splits", metrics(0.95, others=0.95), fps={k: "different" for k in EVAL_SPLITS})
    d = promote_if_better(engine, "other-splits")
    assert not d.promoted and "different splits" in d.reasons[0]
    with pytest.raises(RegistryError, match="nope"):
        promote_if_better(engine, "nope")


def test_rollback_walks_back_through_promotions(engine, tmp_path: Path) -> None:
    for v in ("a", "b", "c"):
        add(engine, tmp_path, v, metrics(0.8))
        promote(engine, v)
    assert production(engine) == "c"
    assert rollback(engine) == "b" and production(engine) == "b"
    assert rollback(engine) == "a"
    with pytest.raises(RegistryError, match="only model ever promoted"):
        rollback(engine)


def test_resolve_model_path(engine, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FINSENT_MODEL", raising=False)
    cfg = load_config(None)
    with session_scope(engine) as s:
        assert resolve_model_path(cfg, s) == str(DEFAULT_MODEL_DIR)
    add(engine, tmp_path, "p", metrics(0.8))
    promote(engine, "p")
    with session_scope(engine) as s:
        assert resolve_model_path(cfg, s) == str((tmp_path / "p").resolve())
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model:\n  path: {tmp_path / 'explicit'}\n")
    with session_scope(engine) as s:
        assert resolve_model_path(load_config(yaml), s) == str(tmp_path / "explicit")
    monkeypatch.setenv("FINSENT_MODEL", "/models/from-env")
    with session_scope(engine) as s:
        assert resolve_model_path(load_config(None), s) == "/models/from-env"


def test_missing_or_corrupt_model_folder_is_named(tmp_path: Path, engine) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path / "gone")):
        read_meta(tmp_path / "gone")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "finsent.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"{bad}.*not valid JSON"):
        register_trained(engine, bad)


def test_models_cli(pg_url: str, engine, tmp_path: Path, monkeypatch) -> None:
    from pipeline.cli import app

    monkeypatch.setenv("DATABASE_URL", pg_url)
    add(engine, tmp_path, "old", metrics(0.80))
    add(engine, tmp_path, "new", metrics(0.70))
    run = CliRunner().invoke
    r = run(app, ["models", "promote", "old"])  # these fake splits are not the ones the bundled default was measured on
    assert (
        r.exit_code == 1
        and "NOT promoted" in r.output
        and "bundled default" in r.output
        and "different splits" in r.output
    )
    assert production(engine) is None
    r = run(app, ["models", "promote", "old", "--force"])
    assert r.exit_code == 0 and "PROMOTED (forced)" in r.output and production(engine) == "old"
    r = run(app, ["models", "promote", "new"])
    assert r.exit_code == 1 and "NOT promoted" in r.output and "primary" in r.output
    r = run(app, ["models", "promote", "new", "--force"])
    assert (
        r.exit_code == 0
        and "PROMOTED (forced)" in r.output
        and "0.700 vs 0.800 WORSE" in r.output
        and production(engine) == "new"
    )
    r = run(app, ["models", "list"])
    assert r.exit_code == 0 and "* new" in r.output and "  old" in r.output
    r = run(app, ["models", "rollback"])
    assert r.exit_code == 0 and "old" in r.output and production(engine) == "old"
    r = run(app, ["models", "register", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "missing" in r.output  # a model that cannot be loaded: exit 1, like score and run
