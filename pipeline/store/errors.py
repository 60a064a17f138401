"""Storage failures in words: the one place that maps SQLAlchemy, psycopg and sqlite3 errors to a cause.

Every engine from `make_engine` routes its driver errors through `install`, so whichever command or
step hits a full disk or a refused connection, the operator reads the same line: the database (password
hidden) and the cause ("connection refused", "read-only file", "not migrated: run `finsent db upgrade`").
"""

from __future__ import annotations

import errno
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pipeline.errors import FinsentError

NOT_MIGRATED = "not migrated: run `finsent db upgrade`"

# (SQLSTATE, cause): Postgres reports these with a code, so no message text is parsed.
_PG_STATES = {
    "3D000": "database does not exist",
    "28P01": "authentication failed (wrong user or password)",
    "28000": "authentication failed (wrong user or password)",
    "42501": "permission denied",
    "42P01": NOT_MIGRATED,
    "53100": "disk full",
    "53200": "database server out of memory",
    "53300": "too many connections",
    "25006": "read-only database",
    "57P03": "database server is starting up or shutting down",
    "57P01": "database server shut down",
}
# (lower-case fragment of a driver message, cause): connect failures and SQLite carry no SQLSTATE.
_MESSAGES = (
    ('database "', "database does not exist"),  # only with "does not exist", see storage_cause
    ("connection refused", "connection refused"),
    ("could not translate host name", "unknown host"),
    ("name or service not known", "unknown host"),
    ("timeout expired", "connection timed out"),
    ("timed out", "connection timed out"),
    ("password authentication failed", "authentication failed (wrong user or password)"),
    ("no password supplied", "authentication failed (no password given)"),
    ("attempt to write a readonly database", "read-only file"),
    ("readonly database", "read-only file"),
    ("database or disk is full", "disk full"),
    ("no space left on device", "disk full"),
    ("unable to open database file", "cannot open the file (missing folder or permission denied)"),
    ("permission denied", "permission denied"),
    ("no such table", NOT_MIGRATED),
    ("database is locked", "locked by another process (try again)"),
    ("file is not a database", "not a database file"),
    ("disk i/o error", "disk I/O error"),
    ("server closed the connection", "connection lost"),
    ("connection is closed", "connection lost"),
)
_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EROFS: "read-only file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ECONNREFUSED: "connection refused",
    errno.ENOENT: "file or folder does not exist",
}


class StoreError(FinsentError, RuntimeError):
    """The database cannot be reached or used; the message never contains the password."""


def safe_url(url: Any) -> str:
    """The URL with its password hidden, for logs and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def engine_url(engine: Engine) -> str:
    return safe_url(engine.url.render_as_string(hide_password=False))


def storage_cause(exc: BaseException) -> str | None:
    """The cause of a storage failure in words, or None when `exc` is not one (a bug, a constraint)."""
    from sqlalchemy.exc import DBAPIError

    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _PG_STATES:
        return _PG_STATES[state]
    if isinstance(orig, OSError) and orig.errno in _ERRNOS:
        return _ERRNOS[orig.errno]
    if state or not _is_storage_error(orig):  # a server error with an unlisted SQLSTATE is not a storage fault
        return None
    text = str(orig).lower()
    if 'database "' in text and "does not exist" not in text:
        text = text.replace('database "', "")
    return next((cause for fragment, cause in _MESSAGES if fragment in text), None)


def _is_storage_error(orig: BaseException) -> bool:
    """Operational and programming errors of either driver; integrity and data errors are not storage faults."""
    import sqlite3

    kinds: tuple[type[BaseException], ...] = (sqlite3.OperationalError, sqlite3.DatabaseError)
    try:
        import psycopg

        kinds += (psycopg.OperationalError, psycopg.ProgrammingError, psycopg.InternalError)
    except ImportError:  # SQLite-only installs
        pass
    return isinstance(orig, kinds) and not isinstance(orig, sqlite3.IntegrityError)


def as_store_error(exc: BaseException, where: str) -> StoreError | None:
    """A StoreError naming the database and the cause, or None when `exc` is not a storage failure."""
    cause = storage_cause(exc)
    return StoreError(f"database {where}: {cause}") if cause else None


def install(engine: Engine) -> Engine:
    """Turn this engine's storage failures (connect included) into StoreError, everywhere it is used."""
    where = engine_url(engine)

    @event.listens_for(engine, "handle_error")
    def _to_store_error(ctx: Any) -> BaseException | None:
        if ctx.is_pre_ping:  # the pool reconnects on its own after a failed ping
            return None
        return as_store_error(ctx.original_exception, where)

    return engine
