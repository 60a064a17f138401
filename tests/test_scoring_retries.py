"""Scoring failures are never silent and never final by accident (reliability review, item 3): a device error
(CUDA out of memory) leaves the document queued with an attempt count and backoff; once its tries are spent it
is failed on record, an operator notice goes out through the sinks, and `finsent documents retry` queues it
again. Real Postgres, the tiny model, a real webhook receiver; the device error is the one fake (no GPU here):
the model's forward raises RuntimeError a given number of times."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from typer.testing import CliRunner

from pipeline import cycle, store
from pipeline.cli import app
from pipeline.config import FinsentConfig
from pipeline.notify import deliver_pending
from pipeline.store import schema as s
from tests.notify_receivers import Webhook
from tests.test_notify import FAST, notices, slack_sink
from tests.test_store import cfg_for, docs

T = datetime(2026, 11, 20, 15, tzinfo=UTC)
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"


class FlakyDevice:
    """The model, except that its next `fails` forward passes raise what a GPU out of memory raises."""

    def __init__(self, model: Any) -> None:
        self.model, self.fails = model, 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if self.fails:
            self.fails -= 1
            raise RuntimeError(OOM)
        return self.model(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _setup(engine, pg_url, tiny_model_dir, attempts: int, n: int = 5):
    base = cfg_for(pg_url, tiny_model_dir)
    cfg = base.model_copy(update={"model": base.model.model_copy(update={"score_attempts": attempts})})
    with store.session_scope(engine) as session:
        store.ensure_sources(session, cfg.sources)
        store.save_documents(session, docs("wire", n))
    scorer = cycle.load_scorer(cfg, path=str(tiny_model_dir))
    flaky = FlakyDevice(scorer.model)
    scorer.model = flaky
    return cfg, scorer, flaky


def _state(engine, version: str) -> tuple[int, list[tuple[int, str]], list[tuple[int, int]]]:
    with store.session_scope(engine) as session:
        scored = len(session.scalars(select(s.Score.document_id).where(s.Score.model_version_id == version)).all())
        failed = [
            (o.document_id, o.status)
            for o in session.scalars(select(s.ScoringOutcome).where(s.ScoringOutcome.model_version_id == version))
        ]
        waiting = [(r.document_id, r.attempts) for r in session.scalars(select(s.ScoringRetry))]
    return scored, failed, waiting


def test_a_device_error_leaves_the_document_queued_and_a_later_run_scores_it(engine, pg_url, tiny_model_dir):
    """The forward raises twice (the chunk, then the first document alone; the plain canary sentence passes, so
    before this fix the document was marked failed for good). Now it waits one minute and is scored then."""
    cfg, scorer, flaky = _setup(engine, pg_url, tiny_model_dir, attempts=3)
    flaky.fails = 2
    first = cycle.score_pending(cfg, engine, scorer, now=T)
    assert first.scored == 4 and first.not_scored == {"retrying": 1}
    scored, failed, waiting = _state(engine, scorer.version)
    assert (scored, failed) == (4, []) and len(waiting) == 1 and waiting[0][1] == 1
    assert cycle.score_pending(cfg, engine, scorer, now=T + timedelta(seconds=30)).scored == 0, "backoff"
    later = cycle.score_pending(cfg, engine, scorer, now=T + timedelta(minutes=2))
    assert later.scored == 1 and later.not_scored == {}
    assert _state(engine, scorer.version) == (5, [], [])
    assert notices(engine) == []


def test_a_document_out_of_tries_is_failed_told_and_can_be_retried(
    engine, pg_url, tiny_model_dir, slack_webhook: Webhook
):
    cfg, scorer, flaky = _setup(engine, pg_url, tiny_model_dir, attempts=2, n=3)
    flaky.fails = 2
    cycle.score_pending(cfg, engine, scorer, now=T)
    flaky.fails = 2  # the device fails that document again on its second (last) try
    out = cycle.score_pending(cfg, engine, scorer, now=T + timedelta(minutes=2))
    assert out.not_scored == {"failed": 1}
    scored, failed, waiting = _state(engine, scorer.version)
    assert (scored, len(failed), waiting) == (2, 1, []) and failed[0][1] == "failed"
    doc_id = failed[0][0]
    with store.session_scope(engine) as session:
        reason = session.get_one(s.ScoringOutcome, (doc_id, scorer.version)).reason
    assert "out of memory" in reason and "2 attempts" in reason

    [n] = notices(engine)
    assert (n.kind, n.status) == ("documents_failed", "pending")
    sinks = FinsentConfig.model_validate({"sinks": [slack_sink()], "database_url": pg_url})
    r = deliver_pending(engine, sinks, now=T + timedelta(minutes=3), retry_delays=FAST)
    assert r.notices and not r.degraded
    [post] = slack_webhook.posts
    text = json.dumps(post)
    assert f"document {doc_id}" in text and f"finsent documents retry --model {scorer.version}" in text
    deliver_pending(engine, sinks, now=T + timedelta(minutes=30), retry_delays=FAST)
    assert len(slack_webhook.posts) == 1, "told once"

    res = CliRunner().invoke(app, ["documents", "retry", "--model", scorer.version, "--database-url", pg_url])
    assert res.exit_code == 0, res.output
    assert f"1 document(s) queued to be scored again with {scorer.version}" in res.output
    assert cycle.score_pending(cfg, engine, scorer, now=T + timedelta(minutes=40)).scored == 1
    assert _state(engine, scorer.version) == (3, [], [])
