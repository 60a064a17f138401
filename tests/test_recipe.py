"""One training recipe (#10.1): `TrainConfig`'s defaults are the bundled model's recorded recipe, and what
`finsent train` and the finsent_train DAG's task actually train with (read back from the models they write)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline import orchestrate
from pipeline.cli import app
from pipeline.config import DEFAULT_MODEL_DIR
from pipeline.train import TrainConfig

# Per-run inputs and budgets, not part of the recipe: the model to start from and when to stop early.
RUN_INPUTS = {"base", "max_steps", "limit", "time_limit_s"}
RECIPE_FIELDS = sorted({f.name for f in fields(TrainConfig)} - RUN_INPUTS)
BUDGET = {"limit": 8, "max_steps": 1}


def recipe(hyperparameters: dict) -> dict:
    return {k: hyperparameters.get(k, TrainConfig.__dataclass_fields__[k].default) for k in RECIPE_FIELDS}


def recorded() -> dict:
    """The recipe of the bundled model's first stage, the one trained from the base encoder: a model continued
    from an earlier one (a distilled student) keeps that stage last in its `lineage`."""
    meta = json.loads((DEFAULT_MODEL_DIR / "finsent.json").read_text())
    return (meta.get("lineage") or [meta])[-1]["hyperparameters"]


def test_train_config_defaults_are_the_bundled_models_recipe():
    hp = recorded()
    assert set(RECIPE_FIELDS) - set(hp) <= {"soft_labels", "length_buckets"}, (
        "the bundled model records every recipe field but the two added after it (their defaults are its behaviour)"
    )
    assert recipe(asdict(TrainConfig())) == recipe(hp)


def test_cli_train_options_default_to_the_dataclass():
    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in command.params}
    shared = {name for name in defaults if name in TrainConfig.__dataclass_fields__} - {"base"}  # base: default MiniLM
    assert {"epochs", "lr", "topic_weight", "ema", "seed", "patience", "eval_every", "fpb_repeat"} <= shared
    assert {k: defaults[k] for k in shared} == {k: getattr(TrainConfig(), k) for k in shared}


@pytest.mark.slow
def test_cli_and_dag_task_train_the_recorded_recipe(tmp_path, data_dir, tiny_base, pg_url, monkeypatch):
    """Both paths train for one step and write finsent.json: its recipe is the bundled model's."""
    out = tmp_path / "cli-model"
    res = CliRunner().invoke(
        app,
        [
            "train",
            "-o",
            str(out),
            "--base",
            str(tiny_base),
            "--data-dir",
            str(data_dir),
            "--no-db",
            "--no-held-out",
            "--limit",
            str(BUDGET["limit"]),
            "--max-steps",
            str(BUDGET["max_steps"]),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    cli_hp = json.loads((out / "finsent.json").read_text())["hyperparameters"]

    config = tmp_path / "finsent.yaml"
    config.write_text(f"data_dir: {data_dir}\nmodel: {{device: cpu}}\n")
    monkeypatch.setenv("FINSENT_CONFIG", str(config))
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("FINSENT_TRAIN_OUTPUT", str(tmp_path / "candidates"))
    # what the DAG's train task passes: only the run's params that are set (all default to None)
    trained = orchestrate.train_candidate(airflow_run_id="manual__recipe", base=str(tiny_base), **BUDGET)
    dag_hp = json.loads((Path(trained["path"]) / "finsent.json").read_text())["hyperparameters"]

    assert recipe(cli_hp) == recipe(dag_hp) == recipe(recorded())


@pytest.mark.airflow
@pytest.mark.slow
def test_dag_params_leave_the_recipe_to_the_dataclass(dagbag):
    params = dagbag.dags["finsent_train"].params
    assert set(params) <= set(TrainConfig.__dataclass_fields__)
    assert {name: params[name] for name in params} == dict.fromkeys(params), "a DAG default would override the recipe"
