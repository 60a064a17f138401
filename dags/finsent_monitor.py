"""finsent_monitor: every 15 minutes, ingest each source (one mapped task per source), score on the
GPU queue (one mapped task per shard, FINSENT_SCORE_SHARDS, sized to the gpu pool), detect for the
run's window, notify. Logic lives in pipeline.orchestrate.

Which window a run processes (pipeline.orchestrate.run_window): a scheduled or backfill run its data
interval; a manual run the latest complete 15-minute window at its logical date
(`airflow dags trigger finsent_monitor -l 2026-11-30T10:00Z` processes 09:45-10:00), or at the trigger
time without one. To reprocess a range, backfill it one run at a time:
`airflow backfill create --dag-id finsent_monitor --from-date A --to-date B --max-active-runs 1`
(score, detect and notify also run one at a time across runs, whatever a backfill's --max-active-runs).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, TriggerRule, dag, task

from pipeline import orchestrate


@dag(
    dag_id="finsent_monitor",
    schedule=CronDataIntervalTimetable("*/15 * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=orchestrate.default_args(retries=2, retry_delay=timedelta(minutes=1)),
    on_failure_callback=orchestrate.on_dag_failure,  # a run whose finish was killed too still gets its notice
    tags=["finsent", "monitoring"],
    doc_md=__doc__,
)
def finsent_monitor():
    @task
    def sources() -> list[str]:
        return orchestrate.source_names()

    @task
    def start_run(dag_run=None, run_id=None) -> int:
        start, end = orchestrate.run_window(dag_run)
        return orchestrate.monitor_start(start, end, airflow_run_id=run_id)

    @task(max_active_tis_per_dagrun=8)
    def ingest(source: str, pipeline_run_id: int) -> dict:
        return orchestrate.monitor_ingest(source, pipeline_run_id)

    # max_active_tis_per_dag: a backfill ignores the DAG's max_active_runs, so concurrent runs queue here
    @task(
        queue="gpu",
        pool="gpu",
        trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS,
        execution_timeout=timedelta(minutes=30),
        max_active_tis_per_dag=len(orchestrate.score_shards()),
    )
    def score(shard: int, shards: int) -> dict:
        return orchestrate.monitor_score(shard, shards)

    @task(max_active_tis_per_dag=1)
    def detect(scored, dag_run=None) -> dict:
        return orchestrate.monitor_detect(
            orchestrate.run_window(dag_run)[1], orchestrate.merge_scored(scored)["model_version"]
        )

    @task(max_active_tis_per_dag=1)
    def notify() -> dict:
        return orchestrate.monitor_notify()

    # finish fails on purpose when a step failed, sending the run's failure notice (a killed task sends none);
    # retrying would only repeat that verdict
    @task(trigger_rule=TriggerRule.ALL_DONE, on_failure_callback=None, retries=0)
    def finish(
        pipeline_run_id: int, names: list[str], ingested, scored, detected, notified, shards: int, run_id=None, ti=None
    ) -> dict:
        return orchestrate.monitor_finish(
            pipeline_run_id,
            names,
            orchestrate.xcom_items(ingested),
            scored,
            detected,
            notified,
            shards,
            airflow_run_id=run_id,
            skipped=orchestrate.skipped_steps(ti),
        )

    names = sources()
    pipeline_run_id = start_run()
    ingested = ingest.partial(pipeline_run_id=pipeline_run_id).expand(source=names)
    shards = orchestrate.score_shards()
    scored = score.partial(shards=len(shards)).expand(shard=shards)
    ingested >> scored
    detected = detect(scored)
    notified = notify()
    detected >> notified
    finish(pipeline_run_id, names, ingested, scored, detected, notified, len(shards))


finsent_monitor()
