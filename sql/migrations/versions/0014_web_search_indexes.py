"""indexes for the web app's search and company filter at a quarter of history (#12)

- `document_entities (entity, document_id)` replaces the index on `entity` alone: "documents naming C07"
  becomes an index-only scan instead of one heap page per row.
- `feedback (document_id)`: the search page and the labelling queue look up corrections per document.
- Postgres only: trigram GIN indexes (pg_trgm, in Postgres contrib) on lower(title) and lower(summary), so the
  document search's `lower(x) LIKE '%text%'` reads the matching rows instead of every row in the range. The
  extension is created in `public` unless it is installed already (then its schema is used); where it cannot
  be created (contrib missing, no privilege) the migration says so and goes on: search still works, scanning.
  SQLite keeps the plain LIKE scan (the demo's few thousand rows).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 14:00:00
"""

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")
FIND = "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pg_trgm'"
TRGM_INDEXES = {"ix_documents_title_trgm": "title", "ix_documents_summary_trgm": "summary"}


def _trgm_schema(conn: sa.Connection) -> str | None:
    """The schema pg_trgm lives in, creating it in `public` if absent; None when it cannot be created."""
    found = conn.scalar(sa.text(FIND))
    if found:
        return str(found)
    try:
        with conn.begin_nested():
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public"))
    except sa.exc.DBAPIError as e:
        found = conn.scalar(sa.text(FIND))  # another schema's migration may have created it meanwhile
        if not found:
            log.warning("pg_trgm not available (%s): document text search will scan its date range", e.orig)
        return str(found) if found else None
    return "public"


def upgrade() -> None:
    conn = op.get_bind()
    op.create_index("ix_document_entities_entity_doc", "document_entities", ["entity", "document_id"])
    op.drop_index("ix_document_entities_entity", table_name="document_entities")
    op.create_index("ix_feedback_document", "feedback", ["document_id"])
    if conn.dialect.name != "postgresql":
        return
    schema = _trgm_schema(conn)
    if schema is None:
        return
    ops = f'"{schema}".gin_trgm_ops'
    for name, column in TRGM_INDEXES.items():
        conn.execute(sa.text(f"CREATE INDEX {name} ON documents USING gin (lower({column}) {ops})"))


def downgrade() -> None:
    for name in TRGM_INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")  # the extension stays: other objects may use it
    op.drop_index("ix_feedback_document", table_name="feedback")
    op.create_index("ix_document_entities_entity", "document_entities", ["entity"])
    op.drop_index("ix_document_entities_entity_doc", table_name="document_entities")
