"""Analyst label corrections: one writer for `finsent label` and the web app's search page."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from pipeline.data import SENTIMENT_LABELS
from pipeline.store import schema as s
from pipeline.store import session_scope

MAX_AUTHOR_LENGTH = 100


def add_feedback(
    engine: Engine,
    document_id: int,
    label: str | None,
    topic: str | None = None,
    author: str | None = None,
    text: str | None = None,
) -> int:
    """Insert one analyst correction; returns the feedback id. Label must be negative/neutral/positive.

    Training reads these rows (never evaluation), so a bad label is refused here rather than later."""
    if label is not None and label.lower() not in SENTIMENT_LABELS:
        raise ValueError(f"label {label!r}: expected one of {', '.join(SENTIMENT_LABELS)}")
    with session_scope(engine) as session:
        if session.get(s.Document, document_id) is None:
            raise LookupError(f"no document with id {document_id}")
        fb = s.Feedback(
            document_id=document_id,
            text=text,
            label=label.lower() if label else None,
            topic=topic,
            author=author[:MAX_AUTHOR_LENGTH] if author else None,
            created_at=datetime.now(UTC),
        )
        session.add(fb)
        session.flush()
        return fb.id
