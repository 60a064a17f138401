"""scoring_outcomes: documents a model did not score (failed, empty, language) and why

A document that makes the model raise is recorded once and skipped by later cycles (a poison document
never blocks the queue); empty and foreign-language documents get no sentiment. Scores stay in
`scores`, so the detector and dashboard views, which read only `scores`, count scored documents only.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scoring_outcomes",
        sa.Column("document_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_version_id", sa.String(100), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("language", sa.String(16), nullable=True),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('failed', 'skipped_empty', 'skipped_language')", name=op.f("ck_scoring_outcomes_status")
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["documents.id"],
            name=op.f("fk_scoring_outcomes_document_id_documents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_scoring_outcomes_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("document_id", "model_version_id", name=op.f("pk_scoring_outcomes")),
    )
    op.create_index("ix_scoring_outcomes_model_status", "scoring_outcomes", ["model_version_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_scoring_outcomes_model_status", table_name="scoring_outcomes")
    op.drop_table("scoring_outcomes")
