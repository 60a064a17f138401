"""the labelling queue reads a page through indexes instead of ranking every candidate (#12)

- `scores.margin`: top probability minus the runner-up, a generated column computed by the database from the
  three probabilities (the same expression as `pipeline.store.schema.margin_sql`, written out here), so every
  existing row has it the moment the column exists and no writer can leave it out. Postgres: STORED (adding it
  rewrites `scores` once). SQLite cannot add a stored column: VIRTUAL, computed on read, and the index below
  stores it.
- `scores (model_version_id, margin, document_id)`: a model's scores least confident first; the queue walks it
  per source and stops after its page.
- `documents (source_name, content_hash, published_at)`: each source's seeded draw (content_hash order from a
  threshold), the date range checked inside the index.
- `documents (source_name, published_at)`: which sources published in a range, one probe each.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01 17:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_MARGIN = (
    "greatest(p_negative, p_neutral, p_positive) - "
    "greatest(least(p_negative, p_neutral), least(greatest(p_negative, p_neutral), p_positive))"
)
SQLITE_MARGIN = (
    "max(p_negative, p_neutral, p_positive) - "
    "max(min(p_negative, p_neutral), min(max(p_negative, p_neutral), p_positive))"
)
INDEXES = {
    "ix_scores_model_margin": ("scores", ["model_version_id", "margin", "document_id"]),
    "ix_documents_source_hash": ("documents", ["source_name", "content_hash", "published_at"]),
    "ix_documents_source_published": ("documents", ["source_name", "published_at"]),
}


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"ALTER TABLE scores ADD COLUMN margin FLOAT GENERATED ALWAYS AS ({SQLITE_MARGIN}) VIRTUAL")
    else:
        op.execute(
            f"ALTER TABLE scores ADD COLUMN margin DOUBLE PRECISION GENERATED ALWAYS AS ({PG_MARGIN}) STORED NOT NULL"
        )
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
    op.execute("ALTER TABLE scores DROP COLUMN margin")
