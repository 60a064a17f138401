"""scrub credentials that older redaction let through from stored source URLs and fetch errors

Before this revision display_url missed path tokens containing `_` (/rss/sk_live_.../news) and fetch errors
of file:// sources carried the raw local path. This data migration redacts such token-like runs in
`sources.url` and `source_fetches.error` with the rules of this revision (inline: the migration stays frozen
when pipeline.ingest changes). Rows are read in pages by id, so memory stays bounded on any table size.
Downgrade does nothing: redacted secrets are not restored. Plain SQL through SQLAlchemy: SQLite too.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 12:10:00
"""

import re
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PAGE = 1000
# A credential-like run: 24+ letters/digits/underscores with a digit in it, or a 32+ long hex/UUID.
_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_])(?=[A-Za-z0-9_]*[0-9])[A-Za-z0-9_]{24,}(?![A-Za-z0-9_])"
    r"|(?<![0-9a-fA-F\-])(?=[0-9a-fA-F\-]*[0-9a-fA-F])[0-9a-fA-F\-]{32,}(?![0-9a-fA-F\-])"
)


def scrub(text: str) -> str:
    return _TOKEN.sub("***", text)


def _rewrite(table: str, column: str, fix: Callable[[str], str]) -> None:
    conn = op.get_bind()
    t = sa.table(table, sa.column("id"), sa.column(column))
    last = None
    while True:
        q = sa.select(t.c.id, t.c[column]).where(t.c[column].is_not(None)).order_by(t.c.id).limit(PAGE)
        if last is not None:
            q = q.where(t.c.id > last)
        rows = conn.execute(q).all()
        if not rows:
            return
        for key, value in rows:
            new = fix(value)
            if new != value:
                conn.execute(sa.update(t).where(t.c.id == key).values({column: new}))
        last = rows[-1][0]


def upgrade() -> None:
    _rewrite_sources()
    _rewrite("source_fetches", "error", scrub)


def _rewrite_sources() -> None:
    """sources is keyed by name; few rows (one per configured feed), so one pass."""
    conn = op.get_bind()
    t = sa.table("sources", sa.column("name"), sa.column("url"))
    for name, url in conn.execute(sa.select(t.c.name, t.c.url).where(t.c.url.is_not(None))).all():
        new = scrub(url)
        if new != url:
            conn.execute(sa.update(t).where(t.c.name == name).values(url=new))


def downgrade() -> None:
    pass  # redacted values cannot (and must not) be restored
