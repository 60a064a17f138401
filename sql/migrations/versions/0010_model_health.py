"""model_health_windows: per source and window, what the model produced and its drift (issue #15.1)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 11:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (never read from sql/views): one row per source and window, newest first, for Grafana.
V_MODEL_HEALTH = """
CREATE VIEW v_model_health AS
SELECT source_name, model_version_id, window_start, window_end, documents, scored,
       mean_top_prob, low_conf_share, mean_text_chars, truncated_share,
       feature, psi, p_value, psi_eval, drifted, baseline_items
FROM model_health_windows
"""


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "model_health_windows",
        sa.Column("source_name", sa.String(length=100), nullable=False),
        sa.Column("model_version_id", sa.String(length=100), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("documents", sa.Integer(), nullable=False),
        sa.Column("scored", sa.Integer(), nullable=False),
        sa.Column("histograms", _json(), nullable=False),
        sa.Column("label_shares", _json(), nullable=False),
        sa.Column("mean_top_prob", sa.Float(), nullable=True),
        sa.Column("low_conf_share", sa.Float(), nullable=True),
        sa.Column("mean_text_chars", sa.Float(), nullable=True),
        sa.Column("truncated_share", sa.Float(), nullable=True),
        sa.Column("baseline_items", sa.Integer(), nullable=False),
        sa.Column("feature", sa.String(length=16), nullable=True),
        sa.Column("psi", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("psi_eval", sa.Float(), nullable=True),
        sa.Column("drifted", sa.Boolean(), nullable=True),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_name"], ["sources.name"], name="fk_model_health_windows_source_name_sources", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"], ["model_versions.id"], name="fk_model_health_windows_model_version_id_model_versions"
        ),
        sa.PrimaryKeyConstraint("source_name", "model_version_id", "window_start", name="pk_model_health_windows"),
    )
    op.execute(V_MODEL_HEALTH)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_model_health")
    op.drop_table("model_health_windows")
