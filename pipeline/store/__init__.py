"""Storage stage: engine, migrations and the idempotent writes every other stage relies on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Engine, case, create_engine, delete, event, func, inspect, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session

from pipeline.config import PROJECT_DIR
from pipeline.records import Document as DocumentRecord
from pipeline.records import (
    FetchResult,
    PendingDocument,
    ScoreRow,
    ScoringStatus,
    TextOutcome,
    document_text,
)
from pipeline.store import schema as s
from pipeline.store.errors import NOT_MIGRATED, StoreError, as_store_error, engine_url, install, safe_url
from pipeline.store.runs import (  # re-exported: callers use store.start_run etc.
    RunLockedError as RunLockedError,
)
from pipeline.store.runs import (
    abandon_expired as abandon_expired,
)
from pipeline.store.runs import (
    finish_run as finish_run,
)
from pipeline.store.runs import (
    heartbeat as heartbeat,
)
from pipeline.store.runs import (
    run_lock as run_lock,
)
from pipeline.store.runs import (
    start_run as start_run,
)

log = logging.getLogger(__name__)

MIGRATIONS_DIR = PROJECT_DIR / "sql" / "migrations"
_IN_LIST_MAX = 10_000  # ids per IN (...) list: far under psycopg's 65,535 parameters per statement


def make_engine(url: str, **kw: Any) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(
            "DATABASE_URL is not a valid SQLAlchemy URL (expected e.g. postgresql+psycopg://user@host/db)"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, **kw)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return install(engine)
    kw.setdefault("pool_pre_ping", True)
    return install(create_engine(parsed, **kw))


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error, and turn connection loss into StoreError."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except OperationalError as e:  # one the mapping has no words for: still name the database
            session.rollback()
            raise as_store_error(e, engine_url(engine)) or StoreError(
                f"database {engine_url(engine)} failed: {type(e.orig or e).__name__}"
            ) from None
        except BaseException:
            session.rollback()
            raise


def _insert(session: Session, table: Any) -> Any:
    """Dialect insert that supports ON CONFLICT, for idempotent writes on Postgres and SQLite."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise StoreError(f"unsupported database dialect {name!r}: use PostgreSQL or SQLite")


def _insert_new(
    session: Session, table: Any, rows: Sequence[dict[str, Any]], conflict: Sequence[str], *returning: Any
) -> list[tuple]:
    """INSERT ... ON CONFLICT DO NOTHING of many rows, returning the `returning` columns (default: the first
    conflict column) of the rows actually inserted, so callers count what was written, not what was tried.

    Postgres: COPY into a temporary staging table, then one INSERT ... SELECT ... ON CONFLICT DO NOTHING, at the
    pace of COPY and with no statement parameters at all. SQLite (the demo): one compiled INSERT executed for all
    rows (SQLAlchemy's insertmanyvalues pages them under the driver's parameter limit). Either way no row count
    or chunk size can hit psycopg's 65,535-parameter limit. Every row must carry the same keys."""
    if not rows:
        return []
    tbl = getattr(table, "__table__", table)  # the Core table: a plain executemany, not the ORM bulk path
    names = [c.key for c in returning] or [conflict[0]]
    if session.get_bind().dialect.name == "postgresql":
        return _copy_insert_new(session, tbl, rows, conflict, names)
    stmt = _insert(session, tbl).on_conflict_do_nothing(index_elements=list(conflict))
    return [tuple(r) for r in session.execute(stmt.returning(*(tbl.c[n] for n in names)), list(rows))]


def _copy_insert_new(
    session: Session, tbl: Any, rows: Sequence[dict[str, Any]], conflict: Sequence[str], names: list[str]
) -> list[tuple]:
    """The Postgres path of _insert_new, in the session's transaction. Values go through each column's own
    bind processing (JSONB, aware UTC datetimes), exactly as an executemany would send them."""
    dialect = session.get_bind().dialect
    cols = list(rows[0])
    procs = [tbl.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in cols]
    quoted = ", ".join(f'"{c}"' for c in cols)
    stage = f"_stage_{tbl.name}"
    # the pooled connection is checked out, so its psycopg driver connection is always set here
    raw = cast(Any, session.connection().connection.driver_connection)
    with raw.cursor() as cur:
        cur.execute(f'CREATE TEMP TABLE "{stage}" ON COMMIT DROP AS SELECT {quoted} FROM "{tbl.name}" WITH NO DATA')
        with cur.copy(f'COPY "{stage}" ({quoted}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row([p(row[c]) if p else row[c] for c, p in zip(cols, procs, strict=True)])
        cur.execute(
            f'INSERT INTO "{tbl.name}" ({quoted}) SELECT {quoted} FROM "{stage}" '
            f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING RETURNING {', '.join(names)}"
        )
        out = cur.fetchall()
        cur.execute(f'DROP TABLE "{stage}"')
    return out


def upgrade(url: str, revision: str = "head") -> None:
    """Apply Alembic migrations (the same ones for Postgres and the embedded SQLite)."""
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    try:
        command.upgrade(cfg, revision)
    except CommandError as e:  # an unknown revision, or a database migrated by a newer finsent
        raise StoreError(f"migrating {safe_url(url)}: {e}") from None


def apply_sql(bind: Any, statements: Iterable[str], only: str | None = None) -> None:
    """Run SQL statements in order, each as written (migrations pass their own frozen copies, never a file);
    with `only`, nothing happens on another dialect (Postgres-only views skip the SQLite demo)."""
    if only is not None and bind.dialect.name != only:
        return
    for statement in statements:
        bind.exec_driver_sql(statement)


def check_schema(engine: Engine) -> None:
    """Fail fast, with the fix, when the database was never migrated or is behind this code."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    where = engine_url(engine)
    with engine.connect() as conn:  # connect failures arrive as StoreError (store.errors)
        if not inspect(conn).has_table("alembic_version"):
            raise StoreError(f"database {where}: {NOT_MIGRATED}")
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    if current != head:
        raise StoreError(
            f"database {where} is at schema revision {current}, this finsent needs {head}: run `finsent db upgrade`"
        )


def ensure_sources(session: Session, sources: Iterable[Any]) -> None:
    """Register configured sources (name, kind, url); keeps their HTTP validators unless the URL changed,
    since an old ETag/Last-Modified sent to a new URL could make it answer 304 forever. The URL is stored
    redacted (no user:password, no token-like query values or path segments): rows are read by dashboards."""
    from pipeline.ingest import display_url

    table = s.Source.__table__
    for src in sources:
        url = display_url(src.url)
        stmt = _insert(session, s.Source).values(name=src.name, kind=src.kind, url=url, created_at=datetime.now(UTC))
        moved = table.c.url != stmt.excluded.url
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={
                "kind": stmt.excluded.kind,
                "url": stmt.excluded.url,
                "etag": case((moved, None), else_=table.c.etag),
                "last_modified": case((moved, None), else_=table.c.last_modified),
            },
        )
        session.execute(stmt)


def save_companies(session: Session, watchlist: Iterable[Any]) -> None:
    """Upsert the watchlist's display names (ticker -> name) so dashboards and the web app need no YAML."""
    now = datetime.now(UTC)
    for w in watchlist:
        stmt = _insert(session, s.Company).values(ticker=w.key, name=w.name, updated_at=now)
        session.execute(
            stmt.on_conflict_do_update(index_elements=["ticker"], set_={"name": stmt.excluded.name, "updated_at": now})
        )


def source_validators(session: Session, name: str) -> tuple[str | None, str | None]:
    row = session.execute(select(s.Source.etag, s.Source.last_modified).where(s.Source.name == name)).first()
    return (row[0], row[1]) if row else (None, None)


@dataclass(frozen=True, slots=True)
class SavedFetch:
    new_documents: int
    fetch_id: int


def save_fetch(session: Session, result: FetchResult, run_id: int | None = None) -> SavedFetch:
    """Store a fetch outcome and its documents; re-storing the same entries inserts nothing."""
    now = datetime.now(UTC)
    new_docs = 0
    if result.documents:
        new_docs = save_documents(session, result.documents)
    values: dict[str, Any] = {"last_fetched_at": now, "last_status": result.status, "last_error": result.error}
    if result.status == "ok":
        values.update(etag=result.etag, last_modified=result.last_modified)
    session.execute(update(s.Source).where(s.Source.name == result.source).values(**values))
    fetch = s.SourceFetch(
        run_id=run_id,
        source_name=result.source,
        fetched_at=now,
        status=result.status,
        http_status=result.http_status,
        entries_seen=result.entries_seen,
        entries_new=new_docs,
        error=result.error,
    )
    session.add(fetch)
    session.flush()
    return SavedFetch(new_documents=new_docs, fetch_id=fetch.id)


def save_documents(session: Session, docs: Sequence[DocumentRecord], batch: int = 5000) -> int:
    """Insert documents and their entities; existing (source, external_id) pairs are skipped.
    `batch` bounds the rows built in memory per write (any size is safe for the database: see _insert_new)."""
    inserted = 0
    now = datetime.now(UTC)
    seen: set[tuple[str, str]] = set()
    for i in range(0, len(docs), batch):
        chunk = []
        for d in docs[i : i + batch]:
            if (d.source, d.external_id) not in seen:  # the first copy wins, as it would across calls
                seen.add((d.source, d.external_id))
                chunk.append(d)
        rows = [
            {
                "source_name": d.source,
                "external_id": d.external_id,
                "content_hash": d.content_hash,
                "title": d.title,
                "summary": d.summary,
                "link": d.link,
                "published_at": d.published_at,
                "fetched_at": now,
                "language": d.language,
            }
            for d in chunk
        ]
        D = s.Document.__table__.c
        written = _insert_new(
            session, s.Document, rows, ["source_name", "external_id"], D.id, D.source_name, D.external_id
        )
        new = {(source, external_id): doc_id for doc_id, source, external_id in written}
        inserted += len(new)
        ent_rows = [
            {"document_id": new[(d.source, d.external_id)], "entity": e.entity, "kind": e.kind, "matched": e.matched}
            for d in chunk
            if (d.source, d.external_id) in new
            for e in {e.entity: e for e in d.entities}.values()
        ]
        _insert_new(session, s.DocumentEntity, ent_rows, ["document_id", "entity"])
    return inserted


def register_model(session: Session, version: str, **fields: Any) -> None:
    """Record a model version once; later calls with the same id change nothing."""
    stmt = _insert(session, s.ModelVersion).values(id=version, created_at=datetime.now(UTC), **fields)
    session.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))


def production_model(session: Session) -> s.ModelVersion | None:
    return session.scalars(select(s.ModelVersion).where(s.ModelVersion.is_production.is_(True))).first()


def iter_unscored(
    engine: Engine,
    model_version: str,
    chunk_size: int = 2000,
    shard: int = 0,
    shards: int = 1,
    max_chars: int | None = None,
    now: datetime | None = None,
) -> Iterator[list[PendingDocument]]:
    """Stream documents this model has neither scored nor given up on, and whose text retention has not
    removed, in id order, a chunk at a time (a document waiting after a transient scoring error comes back
    once its `next_attempt_at` is past `now`).

    Title and summary are cut to `max_chars` in SQL, so a huge document never reaches Python whole.
    With shards > 1 only ids congruent to `shard` are read, so several GPU workers split one backlog.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is outside 0..{shards - 1}")
    last_id = 0
    now = now or datetime.now(UTC)
    while True:
        with Session(engine) as session:
            R = s.ScoringRetry
            waiting = select(R.document_id).where(
                R.model_version_id == model_version, R.document_id == s.Document.id, R.next_attempt_at > now
            )
            scored = select(s.Score.document_id).where(
                s.Score.model_version_id == model_version, s.Score.document_id == s.Document.id
            )
            given_up = select(s.ScoringOutcome.document_id).where(
                s.ScoringOutcome.model_version_id == model_version, s.ScoringOutcome.document_id == s.Document.id
            )
            title: Any = s.Document.title
            summary: Any = s.Document.summary
            if max_chars is not None:
                title, summary = func.substr(title, 1, max_chars), func.substr(summary, 1, max_chars)
            rows = session.execute(
                select(s.Document.id, title.label("title"), summary.label("summary"))
                .where(
                    s.Document.id > last_id,
                    s.Document.text_purged_at.is_(None),  # retention left only a placeholder: nothing to score
                    ~scored.exists(),
                    ~given_up.exists(),
                    ~waiting.exists(),
                    *([s.Document.id % shards == shard] if shards > 1 else []),
                )
                .order_by(s.Document.id)
                .limit(chunk_size)
            ).all()
        if not rows:
            return
        last_id = rows[-1].id
        yield [PendingDocument(id=r.id, text=document_text(r.title, r.summary)) for r in rows]


def save_scores(session: Session, rows: Sequence[ScoreRow]) -> int:
    """Store scores; a (document, model) pair already scored is skipped. Returns the rows actually written."""
    if not rows:
        return 0
    now = datetime.now(UTC)
    values = [
        {
            "document_id": r.document_id,
            "model_version_id": r.model_version,
            "label": r.prediction.label,
            "p_negative": r.prediction.probs.get("negative", 0.0),
            "p_neutral": r.prediction.probs.get("neutral", 0.0),
            "p_positive": r.prediction.probs.get("positive", 0.0),
            "probs": dict(r.prediction.probs),
            "topic": r.prediction.topic,
            "topic_prob": r.prediction.topic_prob,
            "scored_at": now,
        }
        for r in rows
    ]
    return len(_insert_new(session, s.Score, values, ["document_id", "model_version_id"]))


def save_outcomes(session: Session, model_version: str, outcomes: Sequence[tuple[int, TextOutcome]]) -> int:
    """Record documents this model did not score (status and reason); re-recording one changes nothing.
    Also stores each document's detected language where the feed declared none."""
    now = datetime.now(UTC)
    values = [
        {
            "document_id": doc_id,
            "model_version_id": model_version,
            "status": str(o.status),
            "reason": o.reason,
            "language": o.language,
            "attempted_at": now,
        }
        for doc_id, o in outcomes
        if o.status != ScoringStatus.SCORED
    ]
    saved = len(_insert_new(session, s.ScoringOutcome, values, ["document_id", "model_version_id"]))
    by_language: dict[str, list[int]] = {}
    for doc_id, o in outcomes:
        if o.language:
            by_language.setdefault(o.language, []).append(doc_id)
    for lang, ids in by_language.items():
        for i in range(0, len(ids), _IN_LIST_MAX):  # each id in IN (...) is a bound parameter
            part = ids[i : i + _IN_LIST_MAX]
            session.execute(
                update(s.Document).where(s.Document.id.in_(part), s.Document.language.is_(None)).values(language=lang)
            )
    return saved


def defer_scoring(
    session: Session,
    model_version: str,
    failures: Sequence[tuple[int, str]],
    max_attempts: int,
    retry_at: Callable[[int], datetime],
) -> dict[int, int]:
    """Put documents whose scoring hit a transient error back in the queue for `retry_at(attempts)`, counting
    attempts; returns {document id: attempts} of those whose `max_attempts` are spent (the caller records them
    failed)."""
    R = s.ScoringRetry
    spent: dict[int, int] = {}
    for doc_id, reason in failures:
        row = session.get(R, (doc_id, model_version))
        attempts = (row.attempts if row is not None else 0) + 1
        if attempts >= max_attempts:
            spent[doc_id] = attempts
            if row is not None:
                session.delete(row)
        elif row is None:
            session.add(R(document_id=doc_id, model_version_id=model_version, attempts=attempts,
                          last_error=reason, next_attempt_at=retry_at(attempts)))  # fmt: skip
        else:
            row.attempts, row.last_error, row.next_attempt_at = attempts, reason, retry_at(attempts)
    session.flush()
    return spent


def defer_transient(
    session: Session,
    model_version: str,
    results: Sequence[tuple[int, TextOutcome]],
    max_attempts: int,
    retry_at: Callable[[int], datetime],
) -> list[tuple[int, TextOutcome]]:
    """The outcomes to record now: a document that failed on a device error is deferred (`defer_scoring`)
    until its tries are spent, when it is recorded failed, saying so."""
    transient = [(i, o.reason or "") for i, o in results if o.status == ScoringStatus.FAILED and o.transient]
    spent = defer_scoring(session, model_version, transient, max_attempts, retry_at)
    final = []
    for doc_id, o in results:
        if o.status == ScoringStatus.FAILED and o.transient:
            if doc_id not in spent:
                log.warning("document %d: %s; tried again in a later run", doc_id, o.reason)
                continue
            o = replace(o, reason=f"{o.reason} (a device error, {spent[doc_id]} attempts)")
        final.append((doc_id, o))
    return final


def clear_scoring_retries(session: Session, model_version: str, doc_ids: Sequence[int]) -> None:
    """Forget the retry state of documents that have an outcome now (scored, skipped or failed for good)."""
    R = s.ScoringRetry
    for i in range(0, len(doc_ids), _IN_LIST_MAX):
        part = list(doc_ids[i : i + _IN_LIST_MAX])
        session.execute(delete(R).where(R.model_version_id == model_version, R.document_id.in_(part)))


def retry_failed_scoring(session: Session, model_version: str, doc_ids: Sequence[int] | None = None) -> int:
    """Make documents this model failed on (or that wait after a transient error) due again: the next scoring
    step tries them. `doc_ids` None: all of them. Returns how many documents were released."""
    Out, R = s.ScoringOutcome, s.ScoringRetry
    where_o = [Out.model_version_id == model_version, Out.status == ScoringStatus.FAILED]
    where_r = [R.model_version_id == model_version]
    if doc_ids is not None:
        where_o.append(Out.document_id.in_(list(doc_ids)))
        where_r.append(R.document_id.in_(list(doc_ids)))
    failed = cast(Any, session.execute(delete(Out).where(*where_o))).rowcount or 0
    waiting = cast(Any, session.execute(delete(R).where(*where_r))).rowcount or 0
    return int(failed) + int(waiting)


def scoring_status_counts(session: Session, model_version: str) -> dict[ScoringStatus, int]:
    """Documents per scoring status for one model (scored from `scores`, the rest from `scoring_outcomes`)."""
    counts = dict.fromkeys(ScoringStatus, 0)
    counts[ScoringStatus.SCORED] = (
        session.scalar(select(func.count()).select_from(s.Score).where(s.Score.model_version_id == model_version)) or 0
    )
    rows = session.execute(
        select(s.ScoringOutcome.status, func.count())
        .where(s.ScoringOutcome.model_version_id == model_version)
        .group_by(s.ScoringOutcome.status)
    ).all()
    for status, n in rows:
        counts[ScoringStatus(status)] = n
    return counts


def count_rows(session: Session, model: Any) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def save_explanations(session: Session, model_version: str, evidence: dict[int, Sequence[str]]) -> int:
    """Store evidence words per document for `model_version`; a document already explained keeps its row."""
    if not evidence:
        return 0
    now = datetime.now(UTC)
    values = [
        {"document_id": d, "model_version_id": model_version, "tokens": list(t), "created_at": now}
        for d, t in evidence.items()
    ]
    return len(_insert_new(session, s.Explanation, values, ["document_id", "model_version_id"]))


def load_explanations(session: Session, model_version: str, document_ids: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """Stored evidence words by document id (documents never explained are absent)."""
    ids = sorted(set(document_ids))
    if not ids:
        return {}
    E = s.Explanation
    rows = session.execute(
        select(E.document_id, E.tokens).where(E.model_version_id == model_version, E.document_id.in_(ids))
    )
    return {int(d): tuple(str(t) for t in (tokens or ())) for d, tokens in rows}
