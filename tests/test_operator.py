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
    (folder / "finsent.json").write_text(json.dumps({**json.loads((folder / "finsent.json").read_text()), "version": "tiny-neg"}))
    return folder


def test_score_loads_the_model_only_for_work_and_stores_evidence_for_negatives(engine, negative_model_dir, pg_url):
    """Nothing pending: no model load. Work pending: one load for all chunks, and every document scored
    negative gets its evidence words stored with the score (detect reads them, never the model)."""
    cfg = cfg_for(pg_url, negative_model_dir).model_copy(update={"model": cfg_for(pg_url, negative_model_dir).model.model_copy(update={"chunk_size": 7})})
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
        explained = dict(c.execute(select(s.Explanation.document_id, s.Explanation.tokens).where(s.Explanation.model_version_id == "tiny-neg")).all())
    assert negatives, "the tiny model labelled nothing negative: pick other documents"
    assert set(explained) == negatives
    texts = dict((d.external_id, f"{d.title} {d.summary}") for d in docs("wire", 40))
    with engine.connect() as c:
        ext = dict(c.execute(select(s.Document.id, s.Document.external_id)).all())
    assert any(explained.values()), "no document got evidence words"
    for doc_id, tokens in explained.items():
        assert all(tok in texts[ext[doc_id]] for tok in tokens), (tokens, texts[ext[doc_id]])

    assert cycle.score_pending(cfg, engine, load=load).scored == 0 and len(loads) == 1
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(s.Explanation)) == len(negatives)
