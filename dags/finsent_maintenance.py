"""finsent_maintenance: daily raw-text retention, rollup refresh and VACUUM/ANALYZE hints
(pipeline.maintenance), cut at the run's data interval end so a rerun does the same work."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from pipeline import orchestrate


@dag(
    dag_id="finsent_maintenance",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=orchestrate.default_args(retries=2, retry_delay=timedelta(minutes=5)),
    tags=["finsent", "maintenance"],
    doc_md=__doc__,
)
def finsent_maintenance():
    @task
    def maintain(data_interval_end=None) -> dict:
        return orchestrate.maintain(data_interval_end)

    maintain()


finsent_maintenance()
