"""Alembic environment: the URL comes from the caller (finsent db upgrade) or DATABASE_URL, never a file."""

import os

from alembic import context

from pipeline.store import make_engine
from pipeline.store.schema import metadata

config = context.config
url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL") or "sqlite:///finsent.db"
connection = config.attributes.get("connection")


def _configure(conn) -> None:
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table (copy, DROP, rename); with foreign keys on, the DROP would cascade to
        # every child row (deliveries of alerts, scores of documents). The pragma only takes effect outside a
        # transaction, so it is set before the migrations' transaction and restored after it.
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.commit()
    try:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=sqlite, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            conn.commit()
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left {len(broken)} rows whose parent is missing: {broken[:5]}")
    finally:
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


if connection is not None:
    _configure(connection)
else:
    engine = make_engine(url)
    with engine.connect() as conn:
        _configure(conn)
    engine.dispose()
