"""Scorer: loads finsent folders (fp16 on disk, fp32 on CPU) and fails clearly on broken ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.score import ModelLoadError, Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_loads_fp16_folder_as_fp32_on_cpu_with_calibrated_probs(tiny_model: Path) -> None:
    import numpy as np

    s = Scorer.load(str(tiny_model), device="cpu")
    assert (
        next(s.model.parameters()).dtype.is_floating_point and str(next(s.model.parameters()).dtype) == "torch.float32"
    )
    texts = ["Acme said operating profit rose sharply in quarter 1 .", "", "Acme : the chairman is based in Espoo"]
    preds = s.score(texts)
    assert len(preds) == 3 and all(abs(sum(p.probs.values()) - 1) < 1e-5 for p in preds)
    sent, topic = s.logits(texts)
    z = sent[0] / s.temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.allclose([preds[0].probs[lab] for lab in s.labels], expected, atol=1e-5)
    assert topic.shape == (3, len(s.topics)) and preds[0].topic in s.topics


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"model folder not found: {tmp_path / 'nope'}"):
        Scorer.load(str(tmp_path / "nope"))


def test_corrupt_weights_name_the_path(tmp_path: Path, tiny_model: Path) -> None:
    bad = _copy(tiny_model, tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=str(bad)):
        Scorer.load(str(bad))


def test_corrupt_topic_head_and_meta_name_the_path(tmp_path: Path, tiny_model: Path) -> None:
    head = _copy(tiny_model, tmp_path / "head")
    (head / "topic_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=f"{head}.*topic_head.safetensors"):
        Scorer.load(str(head))
    meta = _copy(tiny_model, tmp_path / "meta")
    m = json.loads((meta / "finsent.json").read_text())
    m["topics"] = m["topics"][:2]
    (meta / "finsent.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match=f"{meta}.*2 topics"):
        Scorer.load(str(meta))
    nocfg = _copy(tiny_model, tmp_path / "nocfg")
    (nocfg / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=f"{nocfg} has no config.json"):
        Scorer.load(str(nocfg))


def test_bundled_default_model_loads_and_is_sane() -> None:
    from pipeline.config import DEFAULT_MODEL_DIR

    meta = json.loads((DEFAULT_MODEL_DIR / "finsent.json").read_text())
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 60e6
    s = Scorer.load(str(DEFAULT_MODEL_DIR), device="cpu")
    assert s.version == meta["version"] and len(s.topics) == 20 and s.temperature == meta["temperature"]
    neg, pos, neu = s.score(
        [
            "Operating loss widened and the company issued a profit warning.",
            "Net sales rose 25% and operating profit more than doubled.",
            "The company's head office is located in Helsinki.",
        ]
    )
    assert (neg.label, pos.label, neu.label) == ("negative", "positive", "neutral")


# --- input policy: empty, foreign-language, huge and poison inputs --------------------------------------------

FOREIGN = [
    "苹果公司股价暴跌",
    "Die Aktie bricht nach Gewinnwarnung ein",
    "Les actions de Renault chutent après l'avertissement",
]


def test_empty_and_foreign_texts_get_no_sentiment_unless_the_model_is_multilingual(tiny_model_dir: Path) -> None:
    from pipeline.records import NO_LABEL, ScoringStatus

    s = Scorer.load(str(tiny_model_dir), device="cpu")
    english = "Northwind Bank chief executive resigns amid lending scandal"
    out = s.assess(["", "   \n\t", *FOREIGN, english])
    assert [o.status for o in out] == [ScoringStatus.SKIPPED_EMPTY] * 2 + [ScoringStatus.SKIPPED_LANGUAGE] * 3 + [
        ScoringStatus.SCORED
    ]
    assert all(o.prediction is None and o.label == NO_LABEL and o.reason for o in out[:5])
    assert [o.language for o in out[2:]] == ["zh", "de", "fr", "en"]
    assert "language zh" in out[2].reason and out[5].label in s.labels

    multi = Scorer.load(str(tiny_model_dir), device="cpu", languages=["*"])
    out = multi.assess(["", *FOREIGN])
    assert out[0].status == ScoringStatus.SKIPPED_EMPTY
    assert all(o.status == ScoringStatus.SCORED and o.label in s.labels for o in out[1:])


def test_english_financial_headlines_are_detected_as_english() -> None:
    """A sample of real FPB sentences and TFNS tweets (tickers, links, names): >= 99% must read as English."""
    from pipeline.data import build_splits, default_data_dir
    from pipeline.language import detect_languages

    if not (default_data_dir() / "tfns" / "sent_train.csv").exists():
        pytest.skip(f"labelled data not found in {default_data_dir()}")
    splits = build_splits(default_data_dir())
    texts = [e.text for e in splits.eval["fpb_test"]] + [e.text for e in splits.eval["tfns_dev"]]
    langs = detect_languages(texts)
    english = sum(lang in ("en", None) for lang in langs)
    assert len(texts) > 1500 and english / len(texts) >= 0.99, [
        t for t, lang in zip(texts, langs, strict=True) if lang not in ("en", None)
    ][:20]


def test_long_text_is_cut_by_characters_before_tokenising(tiny_model_dir: Path) -> None:
    s = Scorer.load(str(tiny_model_dir), device="cpu", max_length=32)
    lead = "Acme said operating profit rose sharply in quarter 1 ."
    long_text = lead + " The board met." * 200_000
    seen: list[int] = []
    real = s.tokenizer

    class Spy:  # records what the real tokenizer is given
        def __call__(self, texts, **kw):
            seen.extend(len(t) for t in texts)
            return real(texts, **kw)

    s.tokenizer = Spy()
    a, b = s.score([long_text])[0], s.score([lead + " The board met." * (s.char_limit // 15)])[0]
    assert max(seen) <= s.char_limit == 32 * 12
    assert a.probs == b.probs  # title + lead: the same first characters give the same score


def _pending_docs(engine, n: int, source: str = "wire") -> None:
    from pipeline import store
    from tests.test_store import docs

    with store.session_scope(engine) as session:
        store.ensure_sources(
            session, [SimpleNamespace(name=source, kind="rss", url=f"https://example.com/{source}.xml")]
        )
        store.save_documents(session, docs(source, n))


class PoisonScorer(Scorer):
    """The real model, except that it raises on one document, like a tokenizer or kernel bug would."""

    def _raw(self, texts):
        if any("Headline 3 " in t for t in texts):
            raise ValueError("cannot tokenize this text")
        return super()._raw(texts)


def test_a_poison_document_is_recorded_failed_and_never_blocks_the_queue(engine, pg_url, tiny_model_dir) -> None:
    from sqlalchemy import select

    from pipeline import cycle, store
    from pipeline.records import ScoringStatus
    from pipeline.store import schema as sch
    from tests.test_store import cfg_for

    cfg = cfg_for(pg_url, tiny_model_dir)
    _pending_docs(engine, 10)
    scorer = PoisonScorer.load(str(tiny_model_dir), device="cpu", batch_size=4)
    out = cycle.score_pending(cfg, engine, scorer)
    assert out.scored == 9 and out.not_scored == {ScoringStatus.FAILED: 1}
    with store.session_scope(engine) as session:
        failed = session.execute(select(sch.ScoringOutcome, sch.Document.title).join(sch.Document)).one()
        counts = store.scoring_status_counts(session, scorer.version)
    assert failed[1] == "Headline 3 about Northwind Bank" and failed[0].status == ScoringStatus.FAILED
    assert failed[0].reason == "ValueError: cannot tokenize this text"
    assert counts[ScoringStatus.SCORED] == 9 and counts[ScoringStatus.FAILED] == 1
    _pending_docs(engine, 15)  # a later cycle: new documents are scored, the poison one is not retried
    again = cycle.score_pending(cfg, engine, scorer)
    assert again.scored == 5 and again.not_scored == {}


def test_empty_and_foreign_documents_never_reach_scores(engine, pg_url, tiny_model_dir) -> None:
    from sqlalchemy import select, update

    from pipeline import cycle, store
    from pipeline.store import schema as sch
    from tests.test_store import cfg_for

    cfg = cfg_for(pg_url, tiny_model_dir)
    _pending_docs(engine, 4)
    with store.session_scope(engine) as session:
        session.execute(update(sch.Document).where(sch.Document.external_id == "wire-0").values(title=" ", summary=""))
        session.execute(update(sch.Document).where(sch.Document.external_id == "wire-1").values(title=FOREIGN[1]))
    out = cycle.score_pending(cfg, engine)
    assert out.scored == 2 and out.not_scored == {"skipped_empty": 1, "skipped_language": 1}
    with store.session_scope(engine) as session:
        scored = set(session.scalars(select(sch.Document.external_id).join(sch.Score)))
        langs = dict(session.execute(select(sch.Document.external_id, sch.Document.language)).tuples().all())
    assert scored == {"wire-2", "wire-3"}  # the detector and dashboard views read only `scores`
    assert langs == {"wire-0": None, "wire-1": "de", "wire-2": "en", "wire-3": "en"}


_SCORE_IN_SUBPROCESS = """
import json, resource, sys
from pipeline import cycle, store
from tests.test_store import cfg_for
url, model = sys.argv[1], sys.argv[2]
engine = store.make_engine(url)
out = cycle.score_pending(cfg_for(url, model), engine)
print(json.dumps({"scored": out.scored, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _score_in_subprocess(url: str, model: Path) -> dict:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-c", _SCORE_IN_SUBPROCESS, url, str(model)],
        check=False,
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_100_mb_document_costs_no_more_than_a_normal_one(pg_url, engine, tiny_model_dir) -> None:
    """200 normal documents and one of 100 MB: all 201 scored, and peak memory as with 201 normal ones."""
    from sqlalchemy import text

    from pipeline.store import make_engine
    from tests.conftest import migrated_schema

    _pending_docs(engine, 201)
    with engine.begin() as conn:  # built in the database, so the test process never holds it
        conn.execute(
            text(
                "UPDATE documents SET summary = repeat('The company said quarterly profit fell sharply. ', 2200000) "
                "WHERE external_id = 'wire-100'"
            )
        )
        assert (
            conn.execute(text("SELECT length(summary) FROM documents WHERE external_id = 'wire-100'")).scalar()
            > 100_000_000
        )
    huge = _score_in_subprocess(pg_url, tiny_model_dir)
    with migrated_schema() as normal_url:
        normal_engine = make_engine(normal_url)
        _pending_docs(normal_engine, 201)
        normal_engine.dispose()
        normal = _score_in_subprocess(normal_url, tiny_model_dir)
    assert huge["scored"] == normal["scored"] == 201
    assert huge["rss_mb"] < normal["rss_mb"] + 64, (huge, normal)


# --- speed: batching by token count, one tokenizer call, threads (issue #16) -------------------------------


def test_batches_are_bucketed_by_token_count_with_one_tokenizer_call(tiny_model_dir: Path) -> None:
    """Texts whose character and token lengths disagree: padding follows tokens, and the whole call tokenises once."""
    s = Scorer.load(str(tiny_model_dir), device="cpu", batch_size=2)
    texts = ["$ % & ( ) * + , - .", "Internationalization", "a ; b ; c ; d ; e", "Reorganizations"] * 3
    lengths = [len(ids) for ids in s.tokenizer(texts)["input_ids"]]
    calls: list[int] = []
    widths: list[tuple[int, int]] = []
    real_tok, real_model = s.tokenizer, s.model

    class Spy:  # the real tokenizer, counting calls
        def __getattr__(self, name):
            return getattr(real_tok, name)

        def __call__(self, batch, **kw):
            calls.append(len(batch))
            return real_tok(batch, **kw)

    class ModelSpy:  # the real model (its encoder too, for the topic head), recording batch shapes
        def __getattr__(self, name):
            return getattr(real_model, name)

        def __call__(self, **kw):
            widths.append(tuple(kw["input_ids"].shape))
            return real_model(**kw)

    s.tokenizer, s.model = Spy(), ModelSpy()
    preds = s.score(texts)

    def padded(order: list[int]) -> int:  # tokens fed to the model when batches of 2 follow `order`
        return sum(max(lengths[i] for i in order[k : k + 2]) * len(order[k : k + 2]) for k in range(0, len(order), 2))

    by_tokens = sorted(range(len(texts)), key=lengths.__getitem__)
    by_chars = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    assert calls == [len(texts)]
    assert sum(b * w for b, w in widths) == padded(by_tokens) < padded(by_chars)
    s.tokenizer, s.model = real_tok, real_model
    alone = s.score(texts[:4])  # the same texts in other batches: the same probabilities, in input order
    # not strict: `alone` covers only the first four texts, so only those are compared
    assert all(abs(a.probs[k] - b.probs[k]) < 1e-5 for a, b in zip(preds, alone, strict=False) for k in a.probs)


def test_thread_count_is_applied_when_given(tiny_model_dir: Path) -> None:
    import torch

    from pipeline.score import default_threads

    before = torch.get_num_threads()
    try:
        Scorer.load(str(tiny_model_dir), device="cpu", threads=3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert 1 <= default_threads() <= 4


def test_bundled_folder_loads_as_fp32_in_transformers_pipeline_and_matches_finsent() -> None:
    """Standard tools read the folder right: fp32 on CPU (fp16 weights, fp32 dtype in config.json), and, the
    temperature being folded into the classifier, the pipeline's own probabilities are finsent's calibrated ones;
    its raw outputs times the temperature are finsent's raw logits."""
    import numpy as np
    from transformers import pipeline

    from pipeline.config import DEFAULT_MODEL_DIR

    texts = [
        "Operating loss widened and the company issued a profit warning.",
        "Net sales rose 25% on strong demand.",
        "The AGM is on Friday.",
    ]
    pipe = pipeline("text-classification", model=str(DEFAULT_MODEL_DIR), top_k=None, device="cpu")
    assert str(pipe.model.dtype) == "torch.float32"
    s = Scorer.load(str(DEFAULT_MODEL_DIR), device="cpu")
    assert s.folded
    raw_logits, _ = s.logits(texts)
    for text, mine, logits in zip(texts, s.score(texts), raw_logits, strict=True):
        probs = {d["label"]: d["score"] for d in pipe(text, top_k=None)}
        assert np.allclose([probs[lab] for lab in s.labels], [mine.probs[lab] for lab in s.labels], atol=1e-5)
        raw = {d["label"]: d["score"] for d in pipe(text, top_k=None, function_to_apply="none")}
        assert np.allclose(np.array([raw[lab] for lab in s.labels]) * s.temperature, logits, atol=1e-4)


# --- the fast tokenizer path (issue #16: CPU-side cost per text) -------------------------------------------

_MIXED = [
    " ",
    "a",
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007 .",
    "Nestlé’s Q3 — ¥1,2 bn 📈 in Zürich; 株式 naïve café\u00a0déjà vu",
    "[CLS] an inline [SEP] special token and [UNK] [PAD]",
    "tabs\tand\nnew lines\r\n  and   spaces",
    "Internationalization " * 40,  # far past max_length: truncated
    "$ % & ( ) * + , - .",
]


def _template_type_one(tok) -> None:
    from tokenizers.processors import TemplateProcessing

    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS]:1 $A:1 [SEP]:1", special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)]
    )


def _left(tok) -> None:
    tok.padding_side = tok.truncation_side = "left"


@pytest.mark.parametrize("variant", [None, _left, _template_type_one], ids=["default", "left", "type-ids-1"])
def test_fast_tokenizer_path_gives_exactly_the_transformers_ids_and_masks(tiny_model_dir: Path, variant) -> None:
    """The Rust backend called directly (encode_batch_fast, padding made by numpy) gives the ids, type ids and
    attention masks of the transformers tokenizer call, unpadded per text and padded per batch."""
    import numpy as np

    s = Scorer.load(str(tiny_model_dir), device="cpu", max_length=16)
    if variant is not None:
        variant(s.tokenizer)
    assert s._encoder() is not None  # the fast path is the one under test
    ref = s.tokenizer(_MIXED, truncation=True, max_length=16)
    flat, lengths = s._tokenise(list(_MIXED))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    assert lengths.tolist() == [len(ids) for ids in ref["input_ids"]]
    for key in ("input_ids", "token_type_ids"):
        got = [flat[key][a : a + n].tolist() for a, n in zip(starts, lengths, strict=True)]
        assert got == ref[key], key
    assert max(lengths) == 16 and any(max(ref["token_type_ids"])) == (variant is _template_type_one)
    padded = s.tokenizer(_MIXED, truncation=True, max_length=16, padding=True, return_tensors="pt")
    batch = s._batch(flat, lengths, starts, np.arange(len(_MIXED)))
    assert set(batch) == set(padded) == {"input_ids", "token_type_ids", "attention_mask"}
    for key in padded:
        assert batch[key].tolist() == padded[key].tolist(), key


def test_scorer_without_a_fast_backend_calls_the_tokenizer_and_scores_the_same(tiny_model_dir: Path) -> None:
    """Any tokenizer works: one that is not a transformers fast tokenizer is called as usual, with the same result."""
    s = Scorer.load(str(tiny_model_dir), device="cpu", max_length=16)
    fast = s.score(_MIXED)
    real = s.tokenizer
    calls: list[int] = []

    class Plain:  # a tokenizer with the transformers call but no Rust backend behind it
        padding_side, pad_token_id, pad_token_type_id = real.padding_side, real.pad_token_id, real.pad_token_type_id

        def __call__(self, texts, **kw):
            calls.append(len(texts))
            return real(texts, **kw)

    s.tokenizer = Plain()
    assert s._encoder() is None
    assert s.score(_MIXED) == fast and calls == [len(_MIXED)]


def test_fast_tokenizer_path_follows_changes_made_to_the_tokenizer_in_place(tiny_model_dir: Path) -> None:
    """The private backend copy is rebuilt when the tokenizer it was configured from changes (truncation side,
    added tokens), so the fast path never keeps encoding the old way while the tokenizer's call does not."""
    import numpy as np

    s = Scorer.load(str(tiny_model_dir), device="cpu", max_length=16)
    s._tokenise(list(_MIXED))  # builds and caches the fast path
    s.tokenizer.truncation_side = "left"
    s.tokenizer.add_tokens(["zürichcafé"])
    texts = [*_MIXED, "a zürichcafé token"]
    ref = s.tokenizer(texts, truncation=True, max_length=16)
    flat, lengths = s._tokenise(texts)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    got = [flat["input_ids"][a : a + n].tolist() for a, n in zip(starts, lengths, strict=True)]
    assert got == ref["input_ids"]
