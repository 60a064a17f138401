"""`finsent documents list|show|retry`: find the document ids that `finsent explain` and `finsent label` take, and
queue documents that failed to score for another try."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from pipeline.commands.alerts import ConfigOpt, DbOpt, _open

documents_app = typer.Typer(
    help="Documents: find ids for explain and label; retry failed scoring.", no_args_is_help=True
)


def _current_model(session) -> str | None:
    """The model the dashboards show: production, else the newest registered (as v_current_model)."""
    from sqlalchemy import select

    from pipeline.store import schema as s

    M = s.ModelVersion
    return session.scalar(
        select(M.id)
        .order_by(M.is_production.desc(), M.promoted_at.desc().nulls_last(), M.created_at.desc(), M.id)
        .limit(1)
    )


@documents_app.command("list")
def list_documents(
    config: ConfigOpt = None,
    database_url: DbOpt = None,
    source: Annotated[str | None, typer.Option(help="Only this source.")] = None,
    entity: Annotated[str | None, typer.Option(help="Only documents naming this watchlist ticker.")] = None,
    negative: Annotated[
        bool, typer.Option("--negative", help="Only documents the current model labels negative.")
    ] = False,
    since_hours: Annotated[
        float | None,
        typer.Option("--since-hours", min=0, help="Only documents published this recently (default: all)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 20,
) -> None:
    """Documents, newest first, with the current model's label."""
    from sqlalchemy import select

    from pipeline.messages import clean_text
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    _cfg, engine = _open(config, database_url)
    D, Sc, E = s.Document, s.Score, s.DocumentEntity
    with session_scope(engine) as session:
        mv = _current_model(session)
        q = (
            select(D.id, D.published_at, D.source_name, D.title, Sc.label, Sc.p_negative)
            .outerjoin(Sc, (Sc.document_id == D.id) & (Sc.model_version_id == mv))
            .order_by(D.published_at.desc(), D.id.desc())
            .limit(limit)
        )
        if source:
            q = q.where(D.source_name == source)
        if entity:
            q = q.where(D.id.in_(select(E.document_id).where(E.entity == entity.upper().lstrip("$"))))
        if negative:
            q = q.where(Sc.label == "negative")
        if since_hours is not None:
            q = q.where(D.published_at >= datetime.now(UTC) - timedelta(hours=since_hours))
        rows = session.execute(q).all()
    engine.dispose()
    if not rows:
        typer.echo(
            "no documents match"
            + (
                " (drop --since-hours, --source, --entity or --negative to see more)"
                if any((source, entity, negative, since_hours))
                else ""
            )
        )
        return
    for r in rows:
        label = f"{r.label} {r.p_negative:.2f}" if r.label else "unscored"
        typer.echo(
            f"{r.id:>8}  {r.published_at:%Y-%m-%d %H:%M}  {clean_text(r.source_name, 20):<20} {label:<13} "
            f"{clean_text(r.title, 90)}"
        )


@documents_app.command("show")
def show_document(
    document_id: Annotated[int, typer.Argument(help="Document id (see finsent documents list).")],
    config: ConfigOpt = None,
    database_url: DbOpt = None,
) -> None:
    """One document: text, link, entities, and every model's score."""
    from sqlalchemy import select

    from pipeline.messages import clean_block, clean_text, safe_link
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    _cfg, engine = _open(config, database_url)
    with session_scope(engine) as session:
        doc = session.get(s.Document, document_id)
        if doc is None:
            engine.dispose()
            typer.echo(f"no document with id {document_id} (see finsent documents list)", err=True)
            raise typer.Exit(1)
        ents = session.execute(
            select(s.DocumentEntity.entity, s.DocumentEntity.kind).where(s.DocumentEntity.document_id == doc.id)
        ).all()
        scores = session.scalars(select(s.Score).where(s.Score.document_id == doc.id).order_by(s.Score.scored_at)).all()
    engine.dispose()
    typer.echo(
        f"Document {doc.id} from {clean_text(doc.source_name, 60)}, published {doc.published_at:%Y-%m-%d %H:%M} UTC"
    )
    typer.echo(f"Title:    {clean_text(doc.title, 500)}")
    if doc.summary and doc.summary != doc.title:
        typer.echo(f"Summary:  {clean_block(doc.summary, 2000)}")
    typer.echo(f"Link:     {safe_link(doc.link) or '-'}")
    if doc.text_purged_at is not None:
        typer.echo(f"Purged:   text removed by retention on {doc.text_purged_at:%Y-%m-%d %H:%M} UTC")
    typer.echo("Entities: " + (", ".join(f"{e} ({k})" for e, k in ents) or "-"))
    for sc in scores:
        topic = f", topic {sc.topic}" if sc.topic else ""
        typer.echo(
            f"Score:    {sc.model_version_id}: {sc.label} (p_neg {sc.p_negative:.2f}, p_neu {sc.p_neutral:.2f}, p_pos "
            f"{sc.p_positive:.2f}{topic})"
        )
    typer.echo(f"Explain:  finsent explain {doc.id}")


@documents_app.command("retry")
def retry_documents(
    ids: Annotated[list[int] | None, typer.Argument(help="Document ids (default: every failed document).")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model version (default: the current model, as `documents list`).")
    ] = None,
    config: ConfigOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Queue documents that failed to score (or wait after a device error) for the next scoring step."""
    from pipeline.commands.core import fail
    from pipeline.store import retry_failed_scoring, session_scope

    _, engine = _open(config, database_url)
    with session_scope(engine) as session:
        version = model or _current_model(session)
        if version is None:
            raise fail("no model is registered in this database: nothing has been scored yet", code=1)
        released = retry_failed_scoring(session, version, ids or None)
    engine.dispose()
    typer.echo(f"{released} document(s) queued to be scored again with {version} by the next scoring step")


def register(app: typer.Typer) -> None:
    app.add_typer(documents_app, name="documents")
