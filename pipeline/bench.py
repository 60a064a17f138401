"""`finsent bench`: finsent's scoring against the naive `transformers.pipeline` and a hand-written torch loop,
and its database writes against the idempotent COPY ceiling, all in one run, written to a report file.

Speed is checked here, by a command that prints and records its figures, not by timed unit tests. Every
figure is a ratio measured in the same run, interleaved round by round, so load from other processes on
a shared machine hits the contenders alike; absolute figures are quoted only with the machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.demo import DEMO_DATA

METHODS = ("finsent", "finsent_int8", "naive_pipeline", "hand_loop")
NAIVE_BATCH = 32  # how `transformers.pipeline` is typically called: fp32, batch 32, texts as given
SLICE = 250  # texts each contender scores before the next one runs (see run_bench)


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One contender on one text set: texts/s of each interleaved round, and their median."""

    text_set: str
    method: str
    texts: int
    mean_tokens: float
    batch_size: int
    rounds_texts_per_s: list[float]
    slice_seconds: list[float] = field(default_factory=list)  # per SLICE of texts, paired across contenders

    @property
    def texts_per_s(self) -> float:
        return statistics.median(self.rounds_texts_per_s)


def sample_texts(n: int) -> list[str]:
    """The demo feeds' headlines, repeated to n, so every run scores the same texts."""
    import feedparser

    heads: list[str] = []
    for name in ("newswire.xml", "marketwatch.xml", "reddit_stocks.atom"):
        heads += [e.get("title", "") for e in feedparser.parse(str(DEMO_DATA / name)).entries]
    heads = [h for h in heads if h]
    return [heads[i % len(heads)] for i in range(n)]


def text_sets(n: int, data_dir: Path | None = None) -> tuple[dict[str, list[str]], str]:
    """n real FPB sentences and n TFNS tweets (a fixed sample) when the labelled data is present, else the
    sample headlines; and a sentence saying which, for the report."""
    import random

    from pipeline.data import (
        FPB_50,
        TFNS,
        default_data_dir,
        read_labelled_csv,
        read_phrasebank,
    )

    d = Path(data_dir) if data_dir else default_data_dir()
    if (d / FPB_50).is_file() and (d / TFNS).is_file():
        fpb = [t for t, _ in read_phrasebank(d / FPB_50)]
        tfns = [t for t, _ in read_labelled_csv(d / TFNS, 3)]
        rng = random.Random(16)
        sets = {"fpb": rng.sample(fpb, min(n, len(fpb))), "tfns": rng.sample(tfns, min(n, len(tfns)))}
        return sets, f"{n} Financial PhraseBank sentences and {n} TFNS tweets (fixed random sample) from {d}"
    return {
        "headlines": sample_texts(n)
    }, f"labelled data not found in {d}: the bundled sample feeds' headlines, repeated to {n}"


def _naive_pipeline(model: str, device: str) -> Callable[[list[str]], Any]:
    """What a user gets from the standard tool: `pipeline()` in fp32, batch 32, texts in the order given."""
    import torch
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model, dtype=torch.float32, device=device, top_k=None)
    return lambda texts: pipe(texts, batch_size=NAIVE_BATCH, truncation=True, max_length=128)


def _hand_loop(scorer: Any) -> Callable[[list[str]], Any]:
    """A plain hand-written dynamic-padding loop over the same model and tokenizer: texts sorted by token
    count, one padded tokenizer call per batch, forward, softmax, .tolist(). Sentiment only (no topic)."""
    import torch

    tok, model, bs = scorer.tokenizer, scorer.model, scorer.batch_size

    def run(texts: list[str]) -> list:
        lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=scorer.max_length)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out: list = [None] * len(texts)
        with torch.inference_mode():
            for i in range(0, len(order), bs):
                idx = order[i : i + bs]
                enc = tok(
                    [texts[j] for j in idx],
                    padding=True,
                    truncation=True,
                    max_length=scorer.max_length,
                    return_tensors="pt",
                )
                probs = torch.softmax(model(**enc.to(scorer.device)).logits.float(), dim=-1).cpu().tolist()
                for j, p in zip(idx, probs, strict=True):
                    out[j] = p
        return out

    return run


class _ZeroEncoder:
    """Stands in for the encoder: the last hidden state as a zero-cost broadcast view of the right shape."""

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        self.hooks: list[Callable[..., Any]] = []

    def register_forward_hook(self, hook: Callable[..., Any]) -> Any:
        hooks = self.hooks
        hooks.append(hook)

        class Handle:
            def remove(self) -> None:
                hooks.remove(hook)

        return Handle()


class ZeroCostModel:
    """A forward pass that costs nothing: zeros of the right shapes. Scoring with it times only the Python,
    tokeniser and post-processing around the model (issue #16: <= 40 us per text)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.base_model = _ZeroEncoder(int(model.config.hidden_size))
        self.n_labels = int(model.config.num_labels)
        self.torch = torch

    def __call__(self, input_ids: Any, **_: Any) -> Any:
        from types import SimpleNamespace

        b, length = input_ids.shape
        torch = self.torch
        hidden = torch.zeros(1, 1, self.base_model.hidden).expand(b, length, self.base_model.hidden)
        for hook in list(self.base_model.hooks):
            hook(self.base_model, (input_ids,), (hidden,))
        return SimpleNamespace(logits=torch.zeros(b, self.n_labels))


def cpu_side_us(scorer: Any, texts: list[str], rounds: int = 5) -> dict[str, float]:
    """Microseconds per text that finsent (and, for reference, the hand loop) spend outside the model: the
    fastest of `rounds` timings of scoring `texts` with ZeroCostModel in place of the network (a cost, not a
    throughput: other processes on a shared machine can only add to it, as timeit's best-of-n); and, alone, the
    transformers tokenizer call (what the hand loop pays, and finsent did before it called the Rust backend)
    and the Rust backend's encoding that finsent's fast path makes (the floor under finsent)."""
    from dataclasses import replace

    stub = replace(scorer, model=ZeroCostModel(scorer.model))
    runners: dict[str, Callable[[list[str]], Any]] = {
        "finsent": stub.score,
        "hand_loop": _hand_loop(stub),
        "tokenizer_call": lambda ts: scorer.tokenizer(ts, truncation=True, max_length=scorer.max_length),
    }
    fast = stub._encoder()
    if fast is not None:
        runners["rust_encode_alone"] = fast.encode
    out = {}
    for name, run in runners.items():
        run(texts[:64])
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            run(texts)
            times.append(time.perf_counter() - t0)
        out[name] = round(1e6 * min(times) / len(texts), 1)
    return out


def run_bench(
    model: str,
    n: int = 400,
    rounds: int = 3,
    batch_size: int = 64,
    device: str | None = None,
    data_dir: Path | None = None,
) -> tuple[list[BenchResult], str]:
    """Score each text set with finsent (fp32, and int8 on CPU), the naive pipeline and the hand loop, `rounds`
    times, interleaved. The peers run the fp32 model, as their users would."""
    from pipeline.precision import int8_scorer
    from pipeline.score import Scorer

    sets, source = text_sets(n, data_dir)
    scorer = Scorer.load(model, device=device, batch_size=batch_size)
    runners: dict[str, Callable[[list[str]], Any]] = {"finsent": scorer.score}
    if scorer.device == "cpu":
        runners["finsent_int8"] = int8_scorer(scorer).score
    runners |= {"naive_pipeline": _naive_pipeline(model, scorer.device), "hand_loop": _hand_loop(scorer)}
    for run in runners.values():  # warm-up: first-call allocations and kernel selection
        run(next(iter(sets.values()))[:32])
    times: dict[tuple[str, str], list[float]] = {}
    slices: dict[tuple[str, str], list[float]] = {}
    methods = list(runners)
    for _ in range(rounds):
        for name, texts in sets.items():
            spent = dict.fromkeys(methods, 0.0)
            # contenders alternate every SLICE texts, in rotating order, so a burst of load from other
            # processes on a shared machine lands on all of them rather than on whoever ran during it
            for k, i in enumerate(range(0, len(texts), SLICE)):
                for method in methods[k % len(methods) :] + methods[: k % len(methods)]:
                    t0 = time.perf_counter()
                    runners[method](texts[i : i + SLICE])
                    dt = time.perf_counter() - t0
                    spent[method] += dt
                    slices.setdefault((name, method), []).append(dt)
            for method in methods:
                times.setdefault((name, method), []).append(len(texts) / spent[method])
    results = []
    for name, texts in sets.items():
        tokens = sum(
            len(ids) for ids in scorer.tokenizer(texts, truncation=True, max_length=scorer.max_length)["input_ids"]
        )
        for method in runners:
            bs = NAIVE_BATCH if method == "naive_pipeline" else batch_size
            results.append(
                BenchResult(
                    name, method, len(texts), tokens / len(texts), bs, times[(name, method)], slices[(name, method)]
                )
            )
    return results, source


def scoring_ratios(results: Sequence[BenchResult], ours: str = "finsent") -> dict[str, float]:
    """`ours`'s speed over each peer's: per text set, the median over slices of the peer's seconds over
    ours on the same texts (run back to back, under the same load from other processes), then the
    geometric mean over the sets."""
    import math

    out = {}
    for method, key in (("naive_pipeline", "vs_naive_pipeline"), ("hand_loop", "vs_hand_loop")):
        ratios = []
        for r in results:
            if r.method == ours:
                peer = next(p for p in results if p.text_set == r.text_set and p.method == method)
                paired = [b / a for a, b in zip(r.slice_seconds, peer.slice_seconds, strict=True)]
                ratios.append(statistics.median(paired))
        out[key] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    return out


def machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


@dataclass
class Report:
    command: str
    texts_source: str
    scoring: list[BenchResult]
    writes: list[WriteResult] = field(default_factory=list)
    writes_note: str = ""
    precision: str = "fp32"  # whose ratios are the headline: finsent as deployed (fp32, or int8 past its gate)
    precision_note: str = ""
    cpu_side_us: dict[str, float] = field(default_factory=dict)
    int8: Any = None  # pipeline.precision.Int8Check, measured in the same run


def headline_precision(requested: str, check: Any) -> tuple[str, str]:
    """int8 counts for the headline ratios only where its check, measured in this run, passes the gate's rule
    (pipeline.precision.int8_failures, the rule Scorer.load applies to the recorded check; recipe and engine
    always match a check measured in this run)."""
    if requested != "int8":
        return "fp32", ""
    if check is None:
        return "fp32", "int8 requested, but its accuracy could not be measured here (no labelled data): fp32 shown"
    if check.failures:
        return "fp32", f"int8 requested, but it {' and '.join(check.failures)} (limit 0.5): fp32 shown"
    topic = check.fp32.get("topic_dev", 0.0) - check.int8.get("topic_dev", 0.0)
    return "int8", (
        f"finsent runs int8 (model.precision: int8): it loses {100 * check.fpb_test_loss:.2f} points of FPB test "
        f"accuracy and {100 * topic:.2f} of topic accuracy against fp32 in this run (limit 0.5)"
    )


def write_report(report: Report, out: Path) -> dict[str, Any]:
    """docs/benchmark.json and .md; keys other commands record there (detect.*) are kept."""
    path = out.with_suffix(".json")
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        old = {}
    ours = "finsent_int8" if report.precision == "int8" else "finsent"
    ratios = {k: round(v, 3) for k, v in scoring_ratios(report.scoring, ours).items()}
    if ours != "finsent":
        ratios |= {f"fp32_{k}": round(v, 3) for k, v in scoring_ratios(report.scoring).items()}
    if report.writes:
        ratios["db_writes_vs_copy"] = round(write_ratio(report.writes), 3)
    elif "db_writes_vs_copy" in old.get("ratios", {}):
        ratios["db_writes_vs_copy"] = old["ratios"]["db_writes_vs_copy"]
    meta: dict[str, Any] = {
        "command": report.command,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "texts": report.texts_source,
        "ratios": ratios,
        "precision": report.precision,
        "precision_note": report.precision_note,
        "cpu_side_us_per_text": report.cpu_side_us,
        "int8": asdict(report.int8) if report.int8 is not None else None,
        "scoring": [
            {
                **asdict(r),
                "texts_per_s": round(r.texts_per_s, 1),
                "slice_seconds": [round(x, 4) for x in r.slice_seconds],
            }
            for r in report.scoring
        ],
        "db_writes": [{**asdict(w), "rows_per_s": round(w.rows_per_s)} for w in report.writes]
        or old.get("db_writes", []),
    }
    if "detect" in old:
        meta["detect"] = old["detect"]
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        "# Benchmark",
        "",
        f"Measured {meta['measured_at']} on {meta['machine']} with:",
        "",
        f"```\n{report.command}\n```",
        "",
        f"Ratios are finsent over its peer **in the same run**: "
        f"the contenders take turns every {SLICE} texts (rotating",
        "order), a ratio is the median over those slices of the peer's seconds over finsent's on the same texts, then",
        "the geometric mean over the text sets. Absolute texts/s hold for this machine only, under",
        "whatever else it was running (the rounds column shows how much that varied).",
        "",
        "| ratio | value |",
        "|---|---|",
        *(f"| `ratios.{k}` | {v:.2f} |" for k, v in ratios.items()),
        *(f"| `detect.{k}` | {v} |" for k, v in meta.get("detect", {}).items()),
        *(f"| `cpu_side_us_per_text.{k}` | {v:.1f} |" for k, v in report.cpu_side_us.items()),
        "",
        f"`vs_*` ratios are finsent at **{report.precision}**"
        + (f": {report.precision_note}." if report.precision_note else "."),
        "`fp32_vs_*` are the same with finsent in fp32." if ours != "finsent" else "",
        "`cpu_side_us_per_text`: microseconds per FPB text spent outside the network (tokeniser, padding,",
        "post-processing, Python), timed with a zero-cost stand-in model (`pipeline.bench.ZeroCostModel`), fastest",
        "of 5 rounds over 2,000 FPB texts (other processes on this shared machine can only add time; the tokenizer's",
        "Rust encoding runs on both cores, so a busy core slows it up to 2x);",
        "`tokenizer_call` is the transformers tokenizer call alone on the same texts (what the hand loop pays),",
        "`rust_encode_alone` the fast tokenizer's Rust `encode_batch_fast` alone (finsent's floor: finsent calls",
        "it directly and pads with numpy).",
        "",
        "## Scoring",
        "",
        f"Texts: {report.texts_source}. Contenders: `finsent` "
        "(Scorer.score: token-count buckets, one Rust tokenizer pass,",
        "sentiment + topic head, calibrated); `naive_pipeline` (`transformers.pipeline`, fp32, batch 32, texts in the",
        "given order); `hand_loop` (a hand-written dynamic-padding torch loop, "
        "texts sorted by token count, sentiment only).",
        "",
        "`finsent_int8` is the same scorer with PyTorch dynamic int8 quantisation of the Linear layers that do not",
        "narrow their input (`model.precision: int8`, CPU only; `pipeline.precision`); the peers run fp32, as their",
        "users would.",
        "",
        "| texts | contender | n | mean tokens | batch | texts/s (median) | rounds |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r.text_set} | {r.method} | {r.texts} | {r.mean_tokens:.1f} | {r.batch_size} | {r.texts_per_s:.1f} | "
            + ", ".join(f"{x:.0f}" for x in r.rounds_texts_per_s)
            + " |"
            for r in report.scoring
        ),
        "",
        *_int8_lines(report.int8),
        "## Database writes",
        "",
    ]
    if report.writes:
        lines += [
            "Documents + entities + scores in 2,000-row transactions on Postgres: `finsent` (store.save_documents and",
            "save_scores) against `copy_staging` "
            "(COPY into a temp table + INSERT ... ON CONFLICT DO NOTHING RETURNING,",
            "the idempotent COPY ceiling), interleaved, in a throwaway schema.",
            "",
            "| method | rows | seconds | rows/s |",
            "|---|---|---|---|",
            *(f"| {w.method} | {w.rows} | {w.seconds:.2f} | {w.rows_per_s:.0f} |" for w in report.writes),
        ]
    else:
        lines.append(report.writes_note or "Not measured in this run.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return meta


def _int8_lines(check: Any) -> list[str]:
    if check is None:
        return []
    from pipeline.precision import INT8_MAX_LOSS

    rows = [
        f"| {split} | {check.fp32[split]:.4f} | {check.int8.get(split, float('nan')):.4f} | "
        f"{100 * (check.fp32[split] - check.int8.get(split, float('nan'))):+.2f} | "
        f"{check.agreement.get(split, float('nan')):.4f} |"
        for split in check.fp32
    ]
    return [
        "## int8 against fp32 (accuracy, same run)",
        "",
        f"Model {check.version}, torch {check.torch}, quantised engine `{check.engine}`, recipe `{check.recipe}`;",
        "full fixed splits (`*_test`/`*_dev`: evaluation, what the gate reads; `*_val`: validation, what the recipe",
        f"was chosen on). `model.precision: int8` is used only when it loses less than {100 * INT8_MAX_LOSS:.1f} point",
        "of FPB test accuracy and of topic accuracy (recorded by `finsent models check-int8 MODEL`; otherwise the",
        "scorer warns and runs fp32). Agreement: share of texts whose label (topic) int8 and fp32 agree on. The",
        "recipes compared, and how this one was chosen: docs/deployment.md (CPU-only deployments).",
        "",
        "| split | fp32 accuracy | int8 accuracy | points lost | agreement |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Sentiment label agreement on FPB test + TFNS dev {check.sentiment_agreement:.4f}, topic agreement on topic "
        f"dev {check.topic_agreement:.4f}. Gate: "
        + ("**passes**." if check.passed else f"**fails** (int8 {' and '.join(check.failures)}; int8 is refused)."),
        "",
    ]


DOC_COLUMNS = (
    "source_name",
    "external_id",
    "content_hash",
    "title",
    "summary",
    "link",
    "published_at",
    "fetched_at",
    "language",
)
SCORE_COLUMNS = (
    "document_id",
    "model_version_id",
    "label",
    "p_negative",
    "p_neutral",
    "p_positive",
    "probs",
    "topic",
    "topic_prob",
    "scored_at",
)
WRITE_CHUNK = 2000  # ModelConfig.chunk_size default: one transaction per chunk, as score_pending commits


@dataclass(frozen=True, slots=True)
class WriteResult:
    method: str  # finsent | copy_staging (COPY into a temp table + INSERT ... ON CONFLICT DO NOTHING: idempotent)
    rows: int  # documents + entities + scores written
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def bench_documents(tag: str, n: int) -> list:
    """Synthetic documents with one watchlist mention each: the write benchmarks' input (also docker/bench)."""
    import hashlib
    from datetime import timedelta

    from pipeline.records import Document, EntityMention

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        Document(
            source=tag,
            external_id=f"{tag}-{i}",
            content_hash=hashlib.sha256(f"{tag}-{i}".encode()).hexdigest(),
            title=f"Company {i % 50} shares move on quarterly results {i}",
            summary="Analysts weigh guidance, margins and demand " * 3,
            link=f"https://news.example.com/{tag}/{i}",
            published_at=t0 + timedelta(seconds=i),
            entities=(EntityMention(f"T{i % 50}", "watchlist", f"Company {i % 50}"),),
        )
        for i in range(n)
    ]


def _write_finsent(engine, docs: list, model: str) -> int:
    from sqlalchemy import select

    from pipeline import store
    from pipeline.records import Prediction, ScoreRow
    from pipeline.store import schema as s

    written = 0
    pred = Prediction("neutral", {"negative": 0.1, "neutral": 0.8, "positive": 0.1}, topic="earnings", topic_prob=0.5)
    for i in range(0, len(docs), WRITE_CHUNK):
        with store.session_scope(engine) as session:
            written += 2 * store.save_documents(session, docs[i : i + WRITE_CHUNK])  # + one entity each
    with store.session_scope(engine) as session:
        ids = list(session.scalars(select(s.Document.id).where(s.Document.source_name == docs[0].source)))
    for i in range(0, len(ids), WRITE_CHUNK):
        with store.session_scope(engine) as session:
            written += store.save_scores(session, [ScoreRow(d, model, pred) for d in ids[i : i + WRITE_CHUNK]])
    return written


def _copy_insert(
    cur, table: str, columns: tuple[str, ...], rows: list[tuple], conflict: str, returning: str
) -> list[tuple]:
    """The idempotent COPY ceiling: COPY into a temp table, then INSERT ... SELECT ... ON CONFLICT DO NOTHING."""
    cols = ", ".join(columns)
    cur.execute(f"CREATE TEMP TABLE stage AS SELECT {cols} FROM {table} WITH NO DATA")
    with cur.copy(f"COPY stage ({cols}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    cur.execute(
        f"INSERT INTO {table} ({cols}) SELECT {cols} FROM stage "
        f"ON CONFLICT ({conflict}) DO NOTHING RETURNING {returning}"
    )
    out = cur.fetchall()
    cur.execute("DROP TABLE stage")
    return out


def _write_copy(engine, docs: list, model: str) -> int:
    written = 0
    now = datetime.now(UTC)
    probs = json.dumps({"negative": 0.1, "neutral": 0.8, "positive": 0.1})
    conn = engine.raw_connection()
    try:
        for i in range(0, len(docs), WRITE_CHUNK):
            chunk = docs[i : i + WRITE_CHUNK]
            with conn.cursor() as cur:
                rows = [
                    (
                        d.source,
                        d.external_id,
                        d.content_hash,
                        d.title,
                        d.summary,
                        d.link,
                        d.published_at,
                        now,
                        d.language,
                    )
                    for d in chunk
                ]
                new = {
                    (src, ext): i
                    for i, src, ext in _copy_insert(
                        cur, "documents", DOC_COLUMNS, rows, "source_name, external_id", "id, source_name, external_id"
                    )
                }
                ents = [
                    (new[(d.source, d.external_id)], e.entity, e.kind, e.matched)
                    for d in chunk
                    if (d.source, d.external_id) in new
                    for e in d.entities
                ]
                ent_cols = ("document_id", "entity", "kind", "matched")
                written += len(new) + len(
                    _copy_insert(cur, "document_entities", ent_cols, ents, "document_id, entity", "document_id")
                )
            conn.commit()
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM documents WHERE source_name = %s", (docs[0].source,))
            ids = [r[0] for r in cur.fetchall()]
        conn.commit()
        for i in range(0, len(ids), WRITE_CHUNK):
            score_rows = [
                (d, model, "neutral", 0.1, 0.8, 0.1, probs, "earnings", 0.5, now) for d in ids[i : i + WRITE_CHUNK]
            ]
            with conn.cursor() as cur:
                written += len(
                    _copy_insert(
                        cur, "scores", SCORE_COLUMNS, score_rows, "document_id, model_version_id", "document_id"
                    )
                )
            conn.commit()
    finally:
        conn.close()
    return written


def run_db_bench(url: str, n: int = 10_000, rounds: int = 3) -> list[WriteResult]:
    """finsent's store writes (documents, entities, scores) against the idempotent COPY ceiling on the same
    Postgres, interleaved round by round, each in a throwaway schema that is dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from pipeline import store
    from pipeline.config import SourceConfig

    admin = create_engine(store.make_engine(url).url, isolation_level="AUTOCOMMIT")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    base = make_url(url)
    scoped = base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    results: list[WriteResult] = []
    try:
        store.upgrade(scoped)
        engine = store.make_engine(scoped)
        tags = [f"{m}{r}" for r in range(rounds) for m in ("finsent", "copy")]
        with store.session_scope(engine) as session:
            store.register_model(
                session, "bench", name="bench", path="bench", labels=["negative", "neutral", "positive"]
            )
            store.ensure_sources(session, [SourceConfig(name=t, url="https://example.com/feed") for t in tags])
        for tag in tags:
            docs = bench_documents(tag, n)
            t0 = time.perf_counter()
            rows = (_write_finsent if tag.startswith("finsent") else _write_copy)(engine, docs, "bench")
            dt = time.perf_counter() - t0
            if rows != 3 * n:
                raise RuntimeError(f"db bench {tag}: wrote {rows} rows, expected {3 * n}")
            results.append(WriteResult("finsent" if tag.startswith("finsent") else "copy_staging", rows, dt))
        engine.dispose()
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return results


def write_ratio(results: list[WriteResult]) -> float:
    """finsent's rows/s over the idempotent COPY ceiling's, each summed over its rounds."""

    def rate(method: str) -> float:
        rs = [r for r in results if r.method == method]
        return sum(r.rows for r in rs) / sum(r.seconds for r in rs)

    return rate("finsent") / rate("copy_staging")
