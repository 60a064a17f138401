"""companies: watchlist display names stored in the database

Dashboards, the web app and alert views show "Northwind Bank (NWB)" rather than a bare ticker, and
they must do so without reading the YAML config. The monitoring cycle upserts the watchlist here.
Plain DDL, so it also runs on the embedded SQLite demo.

Revision ID: 0007
Revises: 0003
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "companies",
        sa.Column("ticker", sa.String(32), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ticker", name="pk_companies"),
    )


def downgrade() -> None:
    op.drop_table("companies")
