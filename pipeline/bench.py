"""`finsent bench`: scoring throughput of a model on the sample headlines, written to a report file.

Speed is checked here, by a command that prints and records its figures, not by timed unit tests.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.demo import DEMO_DATA


@dataclass(frozen=True, slots=True)
class BenchResult:
    model_version: str
    device: str
    texts: int
    batch_size: int
    mean_chars: float
    seconds: float
    texts_per_s: float


def sample_texts(n: int) -> list[str]:
    """The demo feeds' headlines, repeated to n, so every run scores the same texts."""
    import feedparser

    heads: list[str] = []
    for name in ("newswire.xml", "marketwatch.xml", "reddit_stocks.atom"):
        heads += [e.get("title", "") for e in feedparser.parse(str(DEMO_DATA / name)).entries]
    heads = [h for h in heads if h]
    return [heads[i % len(heads)] for i in range(n)]


def run_bench(model: str, n: int = 2000, batch_sizes: tuple[int, ...] = (32, 64, 128), device: str | None = None) -> list[BenchResult]:
    from pipeline.score import Scorer

    texts = sample_texts(n)
    scorer = Scorer.load(model, device=device)
    scorer.batch_size = batch_sizes[0]
    scorer.score(texts[: min(64, n)])  # warm-up: first-call allocations and kernel selection
    results = []
    for bs in batch_sizes:
        scorer.batch_size = bs
        t0 = time.perf_counter()
        scorer.score(texts)
        dt = time.perf_counter() - t0
        results.append(BenchResult(scorer.version, scorer.device, n, bs, sum(map(len, texts)) / n, dt, n / dt))
    return results


def write_report(results: list[BenchResult], command: str, out: Path) -> None:
    import torch

    meta = {
        "command": command,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "results": [asdict(r) for r in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        "# Scoring throughput",
        "",
        f"Measured {meta['measured_at']} on {meta['machine']} with:",
        "",
        f"```\n{command}\n```",
        "",
        "Dynamic padding, batches built by length, `torch.inference_mode()`; texts are the sample feeds' headlines.",
        "",
        "| model | device | texts | batch | mean chars | seconds | texts/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model_version} | {r.device} | {r.texts} | {r.batch_size} | {r.mean_chars:.0f} | {r.seconds:.2f} | {r.texts_per_s:.0f} |"
        for r in results
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
