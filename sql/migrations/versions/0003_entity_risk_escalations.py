"""v_entity_risk counts escalated alerts as spikes (Postgres only)

The detector can now send an `escalated` alert inside an open episode; the risk panel's
`last_spike_at` should move with it. Re-applies sql/views/030_v_entity_risk.sql.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 20:10:00
"""
from pathlib import Path
from typing import Sequence, Union

from alembic import op

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

VIEW_FILE = Path(__file__).resolve().parents[2] / "views" / "030_v_entity_risk.sql"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.exec_driver_sql(VIEW_FILE.read_text(encoding="utf-8").strip().rstrip(";"))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.exec_driver_sql(
        "CREATE OR REPLACE VIEW v_entity_risk AS SELECT DISTINCT ON (r.scope_value) r.scope_value AS entity, "
        "r.window_start, r.window_end, r.risk, r.components, r.computed_at, "
        "(SELECT max(a.window_end) FROM alerts a WHERE a.scope_kind = 'entity' AND a.scope_value = r.scope_value "
        "AND a.kind = 'spike') AS last_spike_at FROM risk_scores r WHERE r.scope_kind = 'entity' "
        "ORDER BY r.scope_value, r.window_end DESC"
    )
