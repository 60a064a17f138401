"""operator notices and scoring failures become retryable

`operator_notices` gains a state: a notice that reached none of the sinks it was meant for is retried by later
notify runs (to the sinks it missed only, with backoff) until `notices.max_attempts`, then stays `failed` on
record; `exclude` keeps the sinks it must not go to (the one whose failure it reports). Rows written before
this revision were sent once and never retried: those that reached no sink become `failed`, the rest `sent`.

`scoring_retries`: a document whose scoring raised a transient (device) error waits here, with its attempt
count and the time of its next try, instead of being marked failed for good.

Plain DDL and SQL, valid on SQLite too.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.add_column("operator_notices", sa.Column("status", sa.String(16), nullable=False, server_default="sent"))
    op.add_column("operator_notices", sa.Column("attempts", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("operator_notices", sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("operator_notices", sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("operator_notices", sa.Column("exclude", JSON, nullable=True))
    empty = "sent_to = '[]'::jsonb" if op.get_bind().dialect.name == "postgresql" else "json_array_length(sent_to) = 0"
    op.execute(f"UPDATE operator_notices SET status = 'failed' WHERE {empty}")
    op.create_index("ix_operator_notices_status", "operator_notices", ["status"])
    op.create_table(
        "scoring_retries",
        sa.Column("document_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_version_id", sa.String(100), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["document_id"], ["documents.id"], name=op.f("fk_scoring_retries_document_id_documents"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_scoring_retries_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("document_id", "model_version_id", name=op.f("pk_scoring_retries")),
    )


def downgrade() -> None:
    op.drop_table("scoring_retries")
    op.drop_index("ix_operator_notices_status", "operator_notices")
    with op.batch_alter_table("operator_notices") as batch:
        for column in ("exclude", "next_attempt_at", "last_attempt_at", "attempts", "status"):
            batch.drop_column(column)
