"""pipeline_runs: lease (heartbeat, expiry, owner) and the Airflow run id in its own column

A run whose process died is found by its expired lease and marked `abandoned` by the next run,
instead of staying `running` forever. The Airflow run id moves out of the `counts` JSON, where a
retried start_run had to search for it. Plain columns: the same DDL works on SQLite (batch mode).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:45:00
"""

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from alembic import op

import pipeline.store.schema

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows left `running` by older code get this long from their start before the next run abandons them.
LEGACY_LEASE = timedelta(hours=6)


def upgrade() -> None:
    with op.batch_alter_table("pipeline_runs") as batch:
        batch.add_column(sa.Column("heartbeat_at", pipeline.store.schema.TZDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", pipeline.store.schema.TZDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("owner", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("airflow_run_id", sa.String(length=250), nullable=True))
        batch.create_index("ix_pipeline_runs_airflow_run_id", ["airflow_run_id"])
        batch.create_index("ix_pipeline_runs_status", ["status"])
    runs = sa.table(
        "pipeline_runs",
        sa.column("id", sa.BigInteger()),
        sa.column("status", sa.String()),
        sa.column("started_at", pipeline.store.schema.TZDateTime(timezone=True)),
        sa.column("lease_expires_at", pipeline.store.schema.TZDateTime(timezone=True)),
        sa.column("airflow_run_id", sa.String()),
        sa.column("counts", pipeline.store.schema.JSONType),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(runs.c.id, runs.c.status, runs.c.started_at, runs.c.counts)).all()
    for run_id, status, started_at, counts in rows:
        values = {}
        if isinstance(counts, dict) and "airflow_run_id" in counts:
            values["airflow_run_id"] = str(counts["airflow_run_id"])[:250]
            values["counts"] = {k: v for k, v in counts.items() if k != "airflow_run_id"}
        if status == "running":
            values["lease_expires_at"] = started_at + LEGACY_LEASE
        if values:
            bind.execute(sa.update(runs).where(runs.c.id == run_id).values(**values))


def downgrade() -> None:
    runs = sa.table(
        "pipeline_runs",
        sa.column("id", sa.BigInteger()),
        sa.column("status", sa.String()),
        sa.column("airflow_run_id", sa.String()),
        sa.column("counts", pipeline.store.schema.JSONType),
    )
    bind = op.get_bind()
    for run_id, airflow_run_id, counts in bind.execute(
        sa.select(runs.c.id, runs.c.airflow_run_id, runs.c.counts).where(runs.c.airflow_run_id.is_not(None))
    ).all():
        restored = {**(counts or {}), "airflow_run_id": airflow_run_id}
        bind.execute(sa.update(runs).where(runs.c.id == run_id).values(counts=restored))
    bind.execute(sa.update(runs).where(runs.c.status == "abandoned").values(status="failed"))
    with op.batch_alter_table("pipeline_runs") as batch:
        batch.drop_index("ix_pipeline_runs_status")
        batch.drop_index("ix_pipeline_runs_airflow_run_id")
        batch.drop_column("airflow_run_id")
        batch.drop_column("owner")
        batch.drop_column("lease_expires_at")
        batch.drop_column("heartbeat_at")
