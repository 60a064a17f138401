"""Labelled data and the fixed, recorded splits that training and evaluation share.

Splits are made by hashing (seed, text) rather than by a library's shuffle, so they are identical
across runs, machines and scikit-learn versions, and do not depend on file order. No heavy imports:
this module runs on the GPU machine too, where the database stack is not installed.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.errors import FinsentError
from pipeline.model_folder import SENTIMENT_LABELS

log = logging.getLogger(__name__)

DEFAULT_SEED = 20241125
FPB_TEST_FRAC = 0.20
FPB_VAL_FRAC = 0.10
TWEET_DEV_FRAC = 0.10
TWEET_VAL_FRAC = 0.05

FPB_50 = "financial_phrasebank/Sentences_50Agree.txt"
FPB_ALL = "financial_phrasebank/Sentences_AllAgree.txt"
FPB_AGREEMENT = (  # (file, target probability of the majority label for sentences at that agreement level)
    ("financial_phrasebank/Sentences_AllAgree.txt", 1.0),
    ("financial_phrasebank/Sentences_75Agree.txt", 0.87),
    ("financial_phrasebank/Sentences_66Agree.txt", 0.70),
)
FPB_50_TARGET = 0.58  # sentences on which only 50-65% of the annotators agreed
TFNS = "tfns/sent_train.csv"
TOPIC = "tfn_topic/topic_train.csv"
TOPIC_CLASSES = "tfn_topic/classes.txt"
DATA_FILES = (FPB_50, FPB_ALL, TFNS, TOPIC, TOPIC_CLASSES)
EVAL_SPLITS = ("fpb_test", "fpb_allagree_test", "tfns_dev", "topic_dev")
VAL_SPLITS = ("fpb_val", "tfns_val", "topic_val")
_TFNS_MAP = {0: 0, 1: 2, 2: 1}  # bearish -> negative, bullish -> positive, neutral -> neutral


class DataError(FinsentError, ValueError):
    """A data file is missing or malformed; the message names the file."""


@dataclass(frozen=True, slots=True)
class Example:
    """One text with whichever labels it has (None: that head does not train on it)."""

    text: str
    sentiment: int | None = None  # index into SENTIMENT_LABELS
    topic: int | None = None  # index into Splits.topics
    source: str = ""
    agreement: float = 1.0  # target probability of the sentiment label (soft labels; 1.0 = a hard label)


@dataclass
class Splits:
    """Train data, validation splits (early stopping, calibration) and held-out evaluation splits."""

    seed: int
    topics: list[str]
    train: list[Example]
    val: dict[str, list[Example]]
    eval: dict[str, list[Example]]
    fingerprints: dict[str, str] = field(default_factory=dict)
    excluded: frozenset[str] = frozenset()  # normalised texts of the full eval and validation splits (before any limit)

    def summary(self) -> dict[str, int]:
        out = {"train": len(self.train)}
        out.update({k: len(v) for k, v in self.val.items()})
        out.update({k: len(v) for k, v in self.eval.items()})
        return out


def normalise(text: str) -> str:
    """Key used to match texts across files and against feedback (case and spacing ignored)."""
    return " ".join(text.split()).casefold()


def default_data_dir() -> Path:
    from pipeline.config import DEFAULT_DATA_DIR

    return Path(DEFAULT_DATA_DIR)


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"data file not found: {path} (set data_dir or FINSENT_DATA_DIR)")
    return path


def read_phrasebank(path: Path) -> list[tuple[str, int]]:
    """`sentence@label` lines; 50Agree is Latin-1, AllAgree UTF-8, so try UTF-8 first."""
    raw = _need(path).read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        content = raw.decode("latin-1")
    rows = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        text, sep, label = line.rpartition("@")
        label = label.strip().lower()
        if not sep or label not in SENTIMENT_LABELS:
            raise DataError(f"{path}:{n}: expected 'sentence@negative|neutral|positive', got {line[:80]!r}")
        rows.append((text.strip(), SENTIMENT_LABELS.index(label)))
    return rows


def read_labelled_csv(path: Path, n_labels: int) -> list[tuple[str, int]]:
    rows = []
    with _need(path).open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a CSV header with 'text' and 'label', got {reader.fieldnames}")
        for n, rec in enumerate(reader, 2):
            try:
                label = int(rec["label"])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{n}: label {rec['label']!r} is not an integer") from None
            if not 0 <= label < n_labels:
                raise DataError(f"{path}:{n}: label {label} outside 0..{n_labels - 1}")
            if rec["text"] and rec["text"].strip():
                rows.append((rec["text"].strip(), label))
    return rows


def read_topics(data_dir: Path) -> list[str]:
    names = [
        line.strip()
        for line in _need(data_dir / TOPIC_CLASSES).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if len(names) < 2:
        raise DataError(f"{data_dir / TOPIC_CLASSES}: expected one topic name per line")
    return names


def _hash(*parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()


def fpb_agreement(data_dir: Path) -> dict[str, float]:
    """Normalised FPB sentence -> target probability from the highest agreement file it appears in.

    Training with these soft targets teaches the model to be less sure where annotators were not,
    which a single temperature cannot do (the 50Agree test wants a higher temperature than its AllAgree
    subset). Files that are missing are skipped: their sentences fall back to FPB_50_TARGET.
    """
    out: dict[str, float] = {}
    for name, target in reversed(FPB_AGREEMENT):
        path = data_dir / name
        if path.exists():
            out.update({normalise(t): target for t, _ in read_phrasebank(path)})
    return out


def stratified_split(
    items: Sequence[tuple[str, int]], frac: float, seed: int, salt: str
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(rest, held): per class, the round(frac*n) items with the smallest hash(seed, salt, text) are held out."""
    by_class: dict[int, list[tuple[str, tuple[str, int]]]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    for text, label in items:
        key = normalise(text)
        seen[key] += 1
        by_class[label].append((_hash(seed, salt, key, seen[key]), (text, label)))
    rest, held = [], []
    for label in sorted(by_class):
        ranked = sorted(by_class[label])
        k = round(frac * len(ranked))
        held += [it for _, it in ranked[:k]]
        rest += [it for _, it in ranked[k:]]
    return rest, held


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def split_fingerprint(examples: Iterable[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{normalise(ex.text)}\t{ex.sentiment}\t{ex.topic}\n".encode())
    return h.hexdigest()[:16]


def _cap(items: list, limit: int | None, seed: int, salt: str) -> list:
    if limit is None or len(items) <= limit:
        return items
    ranked = sorted(
        items, key=lambda it: _hash(seed, "cap", salt, normalise(it.text if isinstance(it, Example) else it[0]))
    )
    return ranked[:limit]


def build_splits(data_dir: str | Path | None = None, seed: int = DEFAULT_SEED, limit: int | None = None) -> Splits:
    """The fixed splits. `limit` caps each training source and each split (for quick tests), after splitting.

    Any text that occurs in an evaluation split is dropped from training and validation, for every task,
    so duplicates across files (the same tweet in the sentiment and topic sets, repeated FPB sentences)
    cannot leak.
    """
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    topics = read_topics(d)
    fpb = read_phrasebank(d / FPB_50)
    allagree = {normalise(t) for t, _ in read_phrasebank(d / FPB_ALL)}
    tfns = [(t, _TFNS_MAP[y]) for t, y in read_labelled_csv(d / TFNS, 3)]
    topic = read_labelled_csv(d / TOPIC, len(topics))

    fpb_rest, fpb_test = stratified_split(fpb, FPB_TEST_FRAC, seed, "fpb_test")
    fpb_train, fpb_val = stratified_split(fpb_rest, FPB_VAL_FRAC, seed, "fpb_val")
    tfns_rest, tfns_dev = stratified_split(tfns, TWEET_DEV_FRAC, seed, "tfns_dev")
    tfns_train, tfns_val = stratified_split(tfns_rest, TWEET_VAL_FRAC, seed, "tfns_val")
    topic_rest, topic_dev = stratified_split(topic, TWEET_DEV_FRAC, seed, "topic_dev")
    topic_train, topic_val = stratified_split(topic_rest, TWEET_VAL_FRAC, seed, "topic_val")

    def sent(rows, src):
        return [Example(t, sentiment=y, source=src) for t, y in rows]

    def top(rows, src):
        return [Example(t, topic=y, source=src) for t, y in rows]

    evals = {
        "fpb_test": sent(fpb_test, "fpb"),
        "fpb_allagree_test": sent([r for r in fpb_test if normalise(r[0]) in allagree], "fpb"),
        "tfns_dev": sent(tfns_dev, "tfns"),
        "topic_dev": top(topic_dev, "topic"),
    }
    banned = {normalise(ex.text) for split in evals.values() for ex in split}
    keep = lambda exs: [ex for ex in exs if normalise(ex.text) not in banned]  # noqa: E731
    val = {
        "fpb_val": keep(sent(fpb_val, "fpb")),
        "tfns_val": keep(sent(tfns_val, "tfns")),
        "topic_val": keep(top(topic_val, "topic")),
    }
    banned |= {normalise(ex.text) for split in val.values() for ex in split}
    excluded = frozenset(banned)
    trains = {
        "fpb": keep(sent(fpb_train, "fpb")),
        "tfns": keep(sent(tfns_train, "tfns")),
        "topic": keep(top(topic_train, "topic")),
    }
    if limit is not None:
        evals = {k: _cap(v, limit, seed, k) for k, v in evals.items()}
        val = {k: _cap(v, limit, seed, k) for k, v in val.items()}
        trains = {k: _cap(v, limit, seed, k) for k, v in trains.items()}
    agree = fpb_agreement(d)
    trains["fpb"] = [replace(ex, agreement=agree.get(normalise(ex.text), FPB_50_TARGET)) for ex in trains["fpb"]]
    train = [ex for src in ("fpb", "tfns", "topic") for ex in trains[src]]
    fingerprints = {f"file:{name}": file_fingerprint(d / name) for name in DATA_FILES}
    fingerprints.update({f"split:{k}": split_fingerprint(v) for k, v in {**evals, **val}.items()})
    fingerprints["split:train"] = split_fingerprint(train)
    return Splits(
        seed=seed, topics=topics, train=train, val=val, eval=evals, fingerprints=fingerprints, excluded=excluded
    )


def eval_texts(splits: Splits) -> set[str]:
    """Normalised texts of every evaluation and validation split (uncapped): feedback must never add to these."""
    return set(splits.excluded) | {
        normalise(ex.text) for group in (splits.eval, splits.val) for exs in group.values() for ex in exs
    }


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    id: int
    text: str
    label: str | None
    topic: str | None
    purged: bool = False  # retention removed its document's text (pipeline.maintenance): nothing to learn from


def feedback_examples(
    rows: Iterable[FeedbackRow], topics: Sequence[str], banned: set[str]
) -> tuple[list[Example], dict[str, int]]:
    """Feedback as training examples; rows naming unknown labels or matching an eval text are skipped and counted."""
    topic_index = {t.casefold(): i for i, t in enumerate(topics)}
    out: list[Example] = []
    skipped: defaultdict[str, int] = defaultdict(int)
    for r in rows:
        if not r.text or not r.text.strip():
            skipped["text_purged" if r.purged else "no_text"] += 1
            continue
        if normalise(r.text) in banned:
            skipped["in_eval_split"] += 1
            continue
        label = r.label.strip().lower() if r.label else None
        sentiment = SENTIMENT_LABELS.index(label) if label in SENTIMENT_LABELS else None
        topic = topic_index.get(r.topic.strip().casefold()) if r.topic else None
        if (label and sentiment is None) or (r.topic and topic is None):
            skipped["unknown_label"] += 1
            continue
        if sentiment is None and topic is None:
            skipped["no_label"] += 1
            continue
        out.append(Example(r.text.strip(), sentiment=sentiment, topic=topic, source="feedback"))
    return out, dict(skipped)


def load_feedback_rows(database_url: str) -> list[FeedbackRow]:
    """Feedback rows, text taken from the document when the row has none (latest correction per text wins); a row
    whose document's text retention removed has no text (the placeholder title is never learned from)."""
    from sqlalchemy import select

    from pipeline.store import document_text, make_engine, session_scope
    from pipeline.store import schema as s

    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            q = (
                select(
                    s.Feedback.id,
                    s.Feedback.text,
                    s.Feedback.label,
                    s.Feedback.topic,
                    s.Document.title,
                    s.Document.summary,
                    s.Document.text_purged_at,
                )
                .outerjoin(s.Document, s.Document.id == s.Feedback.document_id)
                .order_by(s.Feedback.created_at, s.Feedback.id)
            )
            latest: dict[str, FeedbackRow] = {}
            for r in session.execute(q):
                purged = r.text_purged_at is not None
                text = r.text or (document_text(r.title, r.summary) if r.title is not None and not purged else None)
                row = FeedbackRow(id=r.id, text=text or "", label=r.label, topic=r.topic, purged=purged and not text)
                latest[normalise(row.text) or f"#{r.id}"] = row
            return list(latest.values())
    finally:
        engine.dispose()
