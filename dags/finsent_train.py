"""finsent_train: weekly (and on demand, with params) fine-tune a candidate, evaluate it, and promote it
only if it beats the production model. Logic lives in pipeline.orchestrate / pipeline.train.

Paused at creation, and a scheduled run that starts more than two hours late (unpausing runs the last
missed Sunday at once) skips training: it trains on its schedule or when triggered, never as a catch-up."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from pipeline import orchestrate


@dag(
    dag_id="finsent_train",
    schedule="0 3 * * 0",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=True,
    default_args=orchestrate.default_args(retries=1, retry_delay=timedelta(minutes=10)),
    tags=["finsent", "training"],
    params={
        "limit": Param(None, type=["null", "integer"], minimum=1, description="cap on examples per split (smoke runs)"),
        "epochs": Param(None, type=["null", "integer"], minimum=1),
        "max_steps": Param(None, type=["null", "integer"], minimum=1),
        "time_limit_s": Param(None, type=["null", "number"], minimum=1),
        "base": Param(
            None, type=["null", "string"], description="model folder or hub id to fine-tune (default: MiniLM)"
        ),
    },
    doc_md=__doc__,
)
def finsent_train():
    @task.short_circuit
    def on_schedule(dag_run=None) -> bool:
        return orchestrate.train_due(dag_run)

    @task(queue="gpu", pool="gpu", execution_timeout=timedelta(hours=6))
    def train(params=None, run_id=None) -> dict:
        return orchestrate.train_candidate(
            airflow_run_id=run_id, **{k: v for k, v in (params or {}).items() if v is not None}
        )

    @task(queue="gpu", pool="gpu")
    def evaluate(trained: dict) -> dict:
        return orchestrate.evaluate_candidate(trained)

    @task
    def promote(trained: dict, evaluated: dict) -> dict:
        return orchestrate.promote_candidate(trained, evaluated)

    trained = train()
    on_schedule() >> trained
    promote(trained, evaluate(trained))


finsent_train()
