"""Explanations: occlusion finds the words that carry the label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from pipeline.explain import explain_text
from pipeline.score import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class KeywordScorer:
    """Negative logit grows with 'plunged' (strongly) and 'losses' (weakly): a known ground truth."""

    temperature = 1.0

    def logits(self, texts):
        rows = []
        for t in texts:
            w = t.lower().split()
            rows.append([3.0 * ("plunged" in w) + 1.0 * ("losses," in w or "losses" in w), 1.0, 0.0])
        return np.array(rows, dtype=np.float32), None


def test_occlusion_ranks_the_decisive_word_first() -> None:
    ev = explain_text(KeywordScorer(), "Shares plunged after heavy losses, traders said", top_k=3)
    assert [w for w, _ in ev] == ["plunged", "losses"]
    assert ev[0][1] > ev[1][1] > 0


class NameScorer:
    """Negative logit driven by stopwords, numbers, punctuation and the entity's name as much as by 'cuts':
    only 'cuts' (and the phrase 'dividend cut' when removing both words matters more) may be evidence."""

    temperature = 1.0

    def logits(self, texts):
        rows = []
        for t in texts:
            w = t.lower().split()
            score = sum(2.0 for x in w if x in ("northwind", "nwb", "the", "55", "--", "and", "after"))
            score += 1.5 * ("cuts" in w) + 0.01 * ("weekly" in w)
            score += 2.5 if ("dividend" in w and "outlook" in w) else 0.0
            rows.append([score, 15.0, 0.0])
        return np.array(rows, dtype=np.float32), None


def test_evidence_skips_stopwords_numbers_punctuation_weak_words_and_the_entity_name() -> None:
    ev = explain_text(
        NameScorer(),
        "Northwind (NWB) cuts weekly dividend outlook after the 55 -- and",
        top_k=5,
        exclude=["Northwind Bank", "NWB", "Northwind"],
    )
    words = [w for w, _ in ev]
    assert words[0] == "dividend outlook" and "cuts" in words  # a phrase when the pair explains more
    for bad in ("Northwind", "NWB", "the", "55", "--", "and", "after", "weekly"):
        assert bad not in words


def test_no_supporting_word_and_empty_text() -> None:
    assert explain_text(KeywordScorer(), "The meeting is in Espoo") == []
    assert explain_text(KeywordScorer(), "   ") == []


def test_bundled_model_evidence_names_the_sentiment_word() -> None:
    from pipeline.config import DEFAULT_MODEL_DIR

    s = Scorer.load(str(DEFAULT_MODEL_DIR), device="cpu")
    neg = explain_text(s, "Shares of Acme plunged after the company issued a profit warning for 2026.", top_k=2)
    pos = explain_text(s, "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn a year earlier.", top_k=2)
    assert 1 <= len(neg) <= 2 and all(isinstance(w, str) and wt >= 0.02 for w, wt in neg)  # weak words are dropped
    assert neg[0][0] == "plunged" and "rose" in pos[0][0].split()  # "profit rose": a phrase when it explains more


def test_label_and_explain_commands(pg_url: str, engine, tiny_model: Path, monkeypatch) -> None:
    import pipeline.explain

    monkeypatch.setattr(pipeline.explain, "MIN_WEIGHT", 0.0)  # even with no weight threshold ...
    from pipeline.cli import app

    monkeypatch.setenv("DATABASE_URL", pg_url)
    with engine.begin() as c:
        c.execute(text("INSERT INTO sources (name, kind, url, created_at) VALUES ('wire', 'rss', 'http://x', now())"))
        doc = c.execute(
            text(
                "INSERT INTO documents (source_name, external_id, content_hash, title, summary, published_at, "
                "fetched_at) "
                "VALUES ('wire', 'e1', 'h', 'Acme said operating loss widened badly in quarter 2 .', '', now(), "
                "now()) RETURNING id"
            )
        ).scalar_one()
    run = CliRunner().invoke
    r = run(app, ["explain", str(doc), "--model", str(tiny_model)])
    assert r.exit_code == 0, r.output
    assert "negative" in r.output, r.output[-600:]
    # This saturated tiny model's only positive contributions are the bare "2" and ".": filler, not evidence.
    assert not [ln for ln in r.output.splitlines() if ln.strip().startswith(("2 ", ". "))], r.output[-600:]
    r = run(app, ["label", str(doc), "Negative", "--author", "ana"])
    assert r.exit_code == 0, r.output
    r = run(app, ["label", str(doc), "bullish"])
    assert r.exit_code == 2 and "expected one of" in r.output
    r = run(app, ["label", "999999", "neutral"])
    assert r.exit_code == 2 and "no document with id 999999" in r.output
    with engine.connect() as c:
        rows = c.execute(text("SELECT document_id, text, label, author FROM feedback")).all()
    assert [tuple(r) for r in rows] == [(doc, None, "negative", "ana")]


def test_explain_prints_feed_text_verbatim(pg_url: str, engine, tiny_model: Path, monkeypatch) -> None:
    """Headlines are untrusted: rich markup in them must neither crash the command nor vanish."""
    from pipeline.cli import app

    monkeypatch.setenv("DATABASE_URL", pg_url)
    title = "[/r/stocks] Acme [removed] shares [bold]plunged[/bold] after loss"
    with engine.begin() as c:
        c.execute(
            text("INSERT INTO sources (name, kind, url, created_at) VALUES ('reddit', 'reddit', 'http://x', now())")
        )
        doc = c.execute(
            text(
                "INSERT INTO documents (source_name, external_id, content_hash, title, summary, published_at, "
                "fetched_at) "
                "VALUES ('reddit', 'r1', 'h', :t, '', now(), now()) RETURNING id"
            ),
            {"t": title},
        ).scalar_one()
    r = CliRunner().invoke(app, ["explain", str(doc), "--model", str(tiny_model), "--top-k", "20"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert title in r.output
    r = CliRunner().invoke(
        app, ["explain", str(doc), "--model", str(Path(str(tiny_model) + "[missing]"))], terminal_width=400
    )
    assert r.exit_code == 1 and "[missing]" in r.output and "\\[" not in r.output  # ModelLoadError: exit 1 everywhere
