"""Write throughput of the store's idempotent inserts (documents + entities, then scores) on a Postgres,
with P concurrent writer processes, the way parallel ingest tasks and score chunks hit the database.
Runs in a throwaway schema and drops it. docs/deployment.md quotes its output; `finsent bench` compares the
same writes with the idempotent COPY ceiling (ratios.db_writes_vs_copy).

usage: python docker/bench/db_writes.py DATABASE_URL DOCS_PER_WRITER WRITERS[,WRITERS...]
  e.g. python docker/bench/db_writes.py postgresql+psycopg://postgres@127.0.0.1:5432/test 20000 1,2,4
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sqlalchemy import create_engine, select, text  # noqa: E402

from pipeline import store  # noqa: E402
from pipeline.bench import bench_documents  # noqa: E402
from pipeline.config import SourceConfig  # noqa: E402
from pipeline.records import Prediction, ScoreRow  # noqa: E402
from pipeline.store import schema as s  # noqa: E402

CHUNK = 2000  # ModelConfig.chunk_size default: one transaction per chunk, as score_pending commits


def writer(args: tuple[str, int, int]) -> tuple[float, float]:
    url, w, n = args
    engine = store.make_engine(url)
    docs = bench_documents(f"src{w}", n)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, [SourceConfig(name=f"src{w}", url="https://example.com/feed")])
    start = time.perf_counter()
    for i in range(0, n, CHUNK):
        with store.session_scope(engine) as session:
            store.save_documents(session, docs[i : i + CHUNK])
    doc_s = time.perf_counter() - start
    with engine.connect() as c:
        ids = (
            c.execute(select(s.Document.id).where(s.Document.source_name == f"src{w}").order_by(s.Document.id))
            .scalars()
            .all()
        )
    pred = Prediction("neutral", {"negative": 0.1, "neutral": 0.8, "positive": 0.1})
    start = time.perf_counter()
    for i in range(0, len(ids), CHUNK):
        with store.session_scope(engine) as session:
            store.save_scores(session, [ScoreRow(d, "bench", pred) for d in ids[i : i + CHUNK]])
    score_s = time.perf_counter() - start
    engine.dispose()
    return doc_s, score_s


def main() -> None:
    base, n, writers = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    for p in writers:
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = f"{base}?options=-csearch_path%3D{schema}"
        try:
            store.upgrade(url)
            with store.session_scope(store.make_engine(url)) as session:
                store.register_model(
                    session, "bench", name="bench", path="bench", labels=["negative", "neutral", "positive"]
                )
            wall = time.perf_counter()
            with Pool(p) as pool:
                times = pool.map(writer, [(url, w, n) for w in range(p)])
            wall = time.perf_counter() - wall
            docs_s = max(t[0] for t in times)
            scores_s = max(t[1] for t in times)
            print(
                json.dumps(
                    {
                        "writers": p,
                        "docs_per_writer": n,
                        "documents_per_s": round(p * n / docs_s),
                        "scores_per_s": round(p * n / scores_s),
                        "wall_s": round(wall, 1),
                    }
                ),
                flush=True,
            )
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


if __name__ == "__main__":
    main()
