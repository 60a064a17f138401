"""Alembic environment: the URL comes from the caller (finsent db upgrade) or DATABASE_URL, never a file."""

import os

from alembic import context

from pipeline.store import make_engine
from pipeline.store.schema import metadata

config = context.config
url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL") or "sqlite:///finsent.db"
connection = config.attributes.get("connection")


def _configure(conn) -> None:
    context.configure(
        connection=conn,
        target_metadata=metadata,
        render_as_batch=conn.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _configure(connection)
else:
    engine = make_engine(url)
    with engine.connect() as conn:
        _configure(conn)
    engine.dispose()
