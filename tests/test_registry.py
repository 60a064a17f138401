"""Registry and promotion gate against the real Postgres."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.config import DEFAULT_MODEL_DIR, load_config
from pipeline.data import EVAL_SPLITS
from pipeline.registry import (
    RegistryError,
    list_models,
    promote,
    promote_if_better,
    read_meta,
    record_evaluation,
    register_trained,
    resolve_model_path,
    rollback,
)
from pipeline.score import ModelLoadError
from pipeline.store import session_scope

FPS = {k: f"fp-{k}" for k in EVAL_SPLITS}


def fake_model(root: Path, version: str) -> Path:
    d = root / version
    d.mkdir(parents=True)
    meta = {"version": version, "base": "tiny", "topics": ["a", "b"], "temperature": 1.5, "split_seed": 7, "hyperparameters": {"lr": 1e-4}, "data_fingerprints": {"x": "y"}}
    (d / "finsent.json").write_text(json.dumps(meta))
    return d


def metrics(primary: float, others: float = 0.80, **overrides: float) -> dict:
    m = {k: {"accuracy": others, "macro_f1": others} for k in EVAL_SPLITS}
    m["fpb_test"]["macro_f1"] = primary
    for key, v in overrides.items():
        split, metric = key.rsplit("__", 1)
        m[split][metric] = v
    return m


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
    add(engine, tmp_path, "m1", metrics(0.80))
    d = promote_if_better(engine, "m1")
    assert d.promoted and d.incumbent is None and production(engine) == "m1"

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
    r = run(app, ["models", "promote", "old"])
    assert r.exit_code == 0 and "PROMOTED" in r.output
    r = run(app, ["models", "promote", "new"])
    assert r.exit_code == 1 and "NOT promoted" in r.output and "primary" in r.output
    r = run(app, ["models", "promote", "new", "--force"])
    assert r.exit_code == 0 and production(engine) == "new"
    r = run(app, ["models", "list"])
    assert r.exit_code == 0 and "* new" in r.output and "  old" in r.output
    r = run(app, ["models", "rollback"])
    assert r.exit_code == 0 and "old" in r.output and production(engine) == "old"
    r = run(app, ["models", "register", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "missing" in r.output
