"""How finsent_monitor's ingest phase scales with Celery worker slots: N loopback sources that each take
DELAY seconds to answer, one run per `default`-queue concurrency, on the same stack as tests/test_celery.py
(Redis on 127.0.0.1:6379, Postgres metadata DB `airflow_test`, the tiny test model). docs/deployment.md
quotes its output.

usage: python docker/bench/celery_scaling.py SOURCES DELAY_S CONCURRENCY[,CONCURRENCY...]
  e.g. python docker/bench/celery_scaling.py 8 2 1,4
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from pipeline.store import upgrade  # noqa: E402
from tests.airflow_support import rss, window_items, write_config  # noqa: E402
from tests.conftest import PG_BASE, make_tiny_model  # noqa: E402
from tests.feedserver import FeedServer  # noqa: E402
from tests.test_celery import _tis, celery_stack, reset_meta_db  # noqa: E402


def main() -> None:
    n_sources, delay, levels = int(sys.argv[1]), float(sys.argv[2]), [int(c) for c in sys.argv[3].split(",")]
    work = Path(tempfile.mkdtemp(prefix="finsent-scaling-"))
    model = make_tiny_model(work / "model")
    end = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    admin = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    with FeedServer(work) as feeds:
        urls = {}
        for i in range(n_sources):
            feeds.put(f"s{i}.xml", rss(f"s{i}", window_items(f"s{i}", end - timedelta(minutes=15), 5)))
            feeds.override(f"s{i}.xml", delay=delay)
            urls[f"s{i}"] = feeds.url(f"s{i}.xml")
        cfg = write_config(work / "finsent.yaml", urls)
        for level in levels:
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            with admin.connect() as c:
                c.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = f"{PG_BASE}?options=-csearch_path%3D{schema}"
            try:
                upgrade(url)
                home = work / f"airflow-{level}"
                home.mkdir()
                meta = reset_meta_db()
                env = {"FINSENT_CONFIG": str(cfg), "DATABASE_URL": url, "FINSENT_MODEL": str(model)}
                with celery_stack(home, meta, env, default_concurrency=level) as stack:
                    run_id, seconds = stack.run_monitor(end)
                tis = _tis(meta, run_id)
                ingest = [t for t in tis if t.task_id == "ingest"]
                with create_engine(meta).connect() as c:
                    span = c.execute(
                        text(
                            "SELECT extract(epoch FROM max(end_date) - min(start_date)) FROM task_instance "
                            "WHERE run_id = :r AND task_id = 'ingest'"
                        ),
                        {"r": run_id},
                    ).scalar()
                print(
                    json.dumps(
                        {
                            "sources": n_sources,
                            "delay_s": delay,
                            "default_worker_concurrency": level,
                            "dag_run_s": round(seconds, 1),
                            "ingest_phase_s": round(float(span), 1),
                            "ingest_task_s_sum": round(sum(float(t.seconds) for t in ingest), 1),
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
