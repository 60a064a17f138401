"""v_entity_risk counts escalated alerts as spikes (Postgres only)

The detector can now send an `escalated` alert inside an open episode; the risk panel's
`last_spike_at` should move with it. The view SQL is frozen here (sql/views/ is for reading only).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 20:10:00
"""
from typing import Sequence, Union

from alembic import op

from pipeline.store import apply_sql

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

V_ENTITY_RISK = """\
-- The latest risk score per watchlist entity, with its most recent spike or escalation alert, for the risk table panel.
CREATE OR REPLACE VIEW v_entity_risk AS
SELECT DISTINCT ON (r.scope_value)
       r.scope_value AS entity,
       r.window_start,
       r.window_end,
       r.risk,
       r.components,
       r.computed_at,
       (SELECT max(a.window_end)
          FROM alerts a
         WHERE a.scope_kind = 'entity' AND a.scope_value = r.scope_value AND a.kind IN ('spike', 'escalated')) AS last_spike_at
FROM risk_scores r
WHERE r.scope_kind = 'entity'
ORDER BY r.scope_value, r.window_end DESC
"""


def upgrade() -> None:
    apply_sql(op.get_bind(), [V_ENTITY_RISK], only="postgresql")


def downgrade() -> None:
    apply_sql(op.get_bind(), [
        "CREATE OR REPLACE VIEW v_entity_risk AS SELECT DISTINCT ON (r.scope_value) r.scope_value AS entity, "
        "r.window_start, r.window_end, r.risk, r.components, r.computed_at, "
        "(SELECT max(a.window_end) FROM alerts a WHERE a.scope_kind = 'entity' AND a.scope_value = r.scope_value "
        "AND a.kind = 'spike') AS last_spike_at FROM risk_scores r WHERE r.scope_kind = 'entity' "
        "ORDER BY r.scope_value, r.window_end DESC"
    ], only="postgresql")
