"""documents.text_purged_at: when retention removed a social post's stored text (issue #15, item 3)

The row, its scores, entities and rollups stay; only the text columns are cleared (pipeline.maintenance).
Scoring skips documents whose text was purged, so a later model never scores the placeholder.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 13:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("documents", sa.Column("text_purged_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("text_purged_at")
