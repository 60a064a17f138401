"""Training test material shared by several modules: a miniature of ../shared/data in the same formats,
a tiny BERT base, and one-thread torch (fixtures built from these live in conftest.py)."""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

from pipeline.train import default_base

TOPICS = ["Analyst Update", "Earnings", "Macro", "Stock Movement"]
_COMPANIES = [
    "Acme",
    "Nordic Steel",
    "Baltic Foods",
    "Helsinki Tech",
    "Orion Paper",
    "Kone Lifts",
    "Vaasa Energy",
    "Oulu Mills",
]
_POS = [
    "operating profit rose sharply",
    "net sales increased strongly",
    "the company won a large order",
    "earnings beat expectations",
]
_NEG = [
    "operating loss widened badly",
    "net sales decreased sharply",
    "the company issued a profit warning",
    "shares plunged after losses",
]
_NEU = [
    "the company is headquartered in",
    "the annual meeting will be held in",
    "the report is available on the website of",
    "the chairman is based in",
]


def _sentences(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for c in _COMPANIES:
        for i, (pos, neg, neu) in enumerate(zip(_POS, _NEG, _NEU, strict=True)):
            rows.append((f"{c} said {pos} in quarter {i + 1} .", "positive"))
            rows.append((f"{c} said {neg} in quarter {i + 1} .", "negative"))
            rows.append((f"{c} : {neu} Espoo , Finland , in {2000 + i} .", "neutral"))
    rng.shuffle(rows)
    return rows


def make_data_dir(root: Path, shuffle_seed: int = 0) -> Path:
    """A miniature of ../shared/data in the same formats (Latin-1 FPB, CSVs), with learnable templates."""
    d = root / "data"
    for sub in ("financial_phrasebank", "tfns", "tfn_topic"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    rows = _sentences(shuffle_seed)
    rows.append(("Fiskars said the Hämeenlinna plant's profit rose .", "positive"))  # non-ASCII, Latin-1 encoded
    (d / "financial_phrasebank/Sentences_50Agree.txt").write_bytes(
        "".join(f"{t}@{y}\n" for t, y in rows).encode("latin-1")
    )
    (d / "financial_phrasebank/Sentences_AllAgree.txt").write_text(
        "".join(f"{t}@{y}\n" for t, y in sorted(rows)[::2]), encoding="utf-8"
    )
    tfns_map = {"negative": 0, "positive": 1, "neutral": 2}
    tweets = [
        (f"$TICK{i} {t.replace(' .', '')} https://t.co/x{i}", tfns_map[y])
        for i, (t, y) in enumerate(sorted(_sentences()))
    ]
    random.Random(shuffle_seed).shuffle(tweets)
    (d / "tfns/sent_train.csv").write_text(
        "text,label\n" + "".join(f'"{t}",{y}\n' for t, y in tweets), encoding="utf-8"
    )
    topic_words = [
        "analyst upgrade rating",
        "quarterly earnings report",
        "central bank inflation rates",
        "stock jumps premarket trading",
    ]
    rng = random.Random(shuffle_seed)
    topic_rows = [(f"{c} {w} update {k}", t) for k in range(3) for c in _COMPANIES for t, w in enumerate(topic_words)]
    rng.shuffle(topic_rows)
    (d / "tfn_topic/topic_train.csv").write_text(
        "text,label\n" + "".join(f'"{t}",{y}\n' for t, y in topic_rows), encoding="utf-8"
    )
    (d / "tfn_topic/classes.txt").write_text("\n".join(TOPICS) + "\n", encoding="utf-8")
    return d


def make_tiny_base(root: Path) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer: trains in seconds on CPU."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = root / "tiny-base"
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(default_base()).save_pretrained(out)
    return out


@contextmanager
def single_thread():
    """Tiny models on a shared 2-core box run several times faster on one thread than fighting for two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Pins everything the tiny runs rely on, so a change of the production recipe (TrainConfig) leaves them alone.
TINY = dict(
    epochs=30,
    batch_size=16,
    lr=1e-2,
    head_lr=1e-2,
    max_length=32,
    patience=100,
    fpb_repeat=1,
    warmup_frac=0.0,
    seed=13,
    topic_weight=0.5,
    ema=0.0,
)
