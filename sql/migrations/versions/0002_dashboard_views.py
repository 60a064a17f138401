"""dashboard views (Postgres only)

The view definitions live in sql/views/*.sql so Grafana authors and reviewers read plain SQL; this
migration applies the files listed below in order. On SQLite (the embedded demo) it does nothing:
the views use Postgres features (FILTER, DISTINCT ON, materialized views) and the demo has no Grafana.
A later change to a view file needs a new migration that re-applies it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:30:00
"""
from pathlib import Path
from typing import Sequence, Union

from alembic import op

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

VIEWS_DIR = Path(__file__).resolve().parents[2] / "views"
FILES = (
    "010_v_sentiment_hourly.sql",
    "020_mv_sentiment_daily.sql",
    "030_v_entity_risk.sql",
    "040_v_recent_alerts.sql",
    "050_v_source_health.sql",
)
# Dropped in reverse dependency order.
VIEWS = ("v_source_health", "v_recent_alerts", "v_entity_risk", "v_sentiment_hourly", "v_current_model")
MATERIALIZED = ("mv_sentiment_daily",)


def statements(sql: str) -> list[str]:
    """Split a view file on statement-ending semicolons (the files hold no semicolons inside strings)."""
    return [s.strip() for s in sql.split(";\n") if s.strip() and not all(l.strip().startswith("--") or not l.strip() for l in s.splitlines())]


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for name in FILES:
        for stmt in statements((VIEWS_DIR / name).read_text(encoding="utf-8")):
            bind.exec_driver_sql(stmt)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for name in MATERIALIZED:
        bind.exec_driver_sql(f"DROP MATERIALIZED VIEW IF EXISTS {name}")
    for name in VIEWS:
        bind.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")
