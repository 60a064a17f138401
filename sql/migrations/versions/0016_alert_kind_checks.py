"""CHECK constraints on alerts.kind and alerts.scope_kind, as 0015 did for the other state columns

The values are pipeline.records' AlertKind and ScopeKind + OpsScope at this revision, written out (inline: the
migration stays frozen when an enum later grows; that change brings a migration of its own). They are every
value the code has ever written: detection's spike/escalated/resolved over market/entity/source/topic,
source health's source_health over "health" and model drift's model_health over "model" (both end as
resolved). A database holding any other value stops the upgrade with one line naming it, before any change.
Postgres: ALTER TABLE ... ADD CONSTRAINT. SQLite: batch mode rebuilds the table with them (copying its rows;
env.py turns foreign keys off around it, so no delivery of an alert is lost).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError  # finsent db upgrade reports it as one line

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS: dict[str, tuple[str, ...]] = {
    "kind": ("spike", "escalated", "resolved", "source_health", "model_health"),
    "scope_kind": ("market", "entity", "source", "topic", "health", "model"),
}


def _condition(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    bind = op.get_bind()
    for column, values in CHECKS.items():
        unknown = bind.execute(
            sa.text(f"SELECT DISTINCT {column} FROM alerts WHERE NOT ({_condition(column, values)})")
        ).scalars()
        found = sorted(unknown)
        if found:
            raise CommandError(f"alerts.{column} holds values finsent never writes: {', '.join(found)}")
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("alerts") as batch:
            for column, values in CHECKS.items():
                batch.create_check_constraint(op.f(f"ck_alerts_{column}"), _condition(column, values))
        return
    for column, values in CHECKS.items():
        op.execute(f"ALTER TABLE alerts ADD CONSTRAINT ck_alerts_{column} CHECK ({_condition(column, values)})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("alerts") as batch:
            for column in CHECKS:
                batch.drop_constraint(op.f(f"ck_alerts_{column}"), type_="check")
        return
    for column in CHECKS:
        op.execute(f"ALTER TABLE alerts DROP CONSTRAINT ck_alerts_{column}")
