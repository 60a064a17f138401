"""CHECK constraints on state columns: the database refuses a state the code does not know

Each state column holds one of its `StrEnum`'s values (pipeline.records); the schema generates the
constraints from the enums, and this revision adds them to existing databases with the values of this
revision written out (inline: the migration stays frozen when an enum later grows; that change brings a
migration of its own). Postgres: ALTER TABLE ... ADD CONSTRAINT. SQLite cannot add a constraint to a
table, so batch mode rebuilds each table with it (copying its rows).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 14:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEVERITY = ("info", "warning", "critical")
CHECKS: dict[str, dict[str, tuple[str, ...]]] = {
    "pipeline_runs": {"status": ("running", "ok", "partial", "degraded", "failed", "abandoned")},
    "alert_deliveries": {"status": ("pending", "sending", "sent", "failed", "expired", "cancelled", "grouped")},
    "operator_notices": {
        "kind": ("dag_failed", "delivery_expired", "sink_failing", "documents_failed"),
        "status": ("pending", "sending", "sent", "retrying", "failed"),
    },
    "incidents": {"severity": SEVERITY, "state": ("open", "resolved")},
    "alerts": {"severity": SEVERITY},
}


def _condition(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, columns in CHECKS.items():
        if sqlite:
            with op.batch_alter_table(table) as batch:
                for column, values in columns.items():
                    batch.create_check_constraint(op.f(f"ck_{table}_{column}"), _condition(column, values))
            continue
        for column, values in columns.items():
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT ck_{table}_{column} CHECK ({_condition(column, values)})")


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, columns in CHECKS.items():
        if sqlite:
            with op.batch_alter_table(table) as batch:
                for column in columns:
                    batch.drop_constraint(op.f(f"ck_{table}_{column}"), type_="check")
            continue
        for column in columns:
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT ck_{table}_{column}")
