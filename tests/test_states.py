"""Typed states reach the database: every state column's CHECK constraint allows exactly its enum's values,
on a database built by the migrations (Postgres and SQLite), and the database refuses any other state."""

from __future__ import annotations

import re
from enum import StrEnum

import pytest
from sqlalchemy import CheckConstraint, text
from sqlalchemy.exc import IntegrityError

from pipeline import store
from pipeline.records import (
    AlertKind,
    DeliveryState,
    IncidentState,
    NoticeKind,
    NoticeState,
    OpsScope,
    RunStatus,
    ScopeKind,
    ScoringStatus,
    Severity,
)
from pipeline.store import schema as s

NOT_SCORED = {v.value for v in ScoringStatus} - {ScoringStatus.SCORED}
EXPECTED: dict[str, set[str]] = {
    "ck_pipeline_runs_status": {v.value for v in RunStatus},
    "ck_alert_deliveries_status": {v.value for v in DeliveryState},
    "ck_operator_notices_kind": {v.value for v in NoticeKind},
    "ck_operator_notices_status": {v.value for v in NoticeState},
    "ck_incidents_state": {v.value for v in IncidentState},
    "ck_incidents_severity": {v.value for v in Severity},
    "ck_alerts_severity": {v.value for v in Severity},
    "ck_alerts_kind": {v.value for v in AlertKind},
    "ck_alerts_scope_kind": {v.value for v in ScopeKind} | {v.value for v in OpsScope},
    "ck_scoring_outcomes_status": NOT_SCORED,
}


def _allowed(condition: str) -> set[str]:
    """The quoted values of `col IN (...)` however the database spells it back (Postgres: `= ANY (ARRAY[...])`)."""
    return set(re.findall(r"'([^']*)'", condition))


def test_schema_constraints_are_generated_from_the_enums():
    found = {
        c.name: _allowed(str(c.sqltext))
        for table in s.metadata.tables.values()
        for c in table.constraints
        if isinstance(c, CheckConstraint)
    }
    assert found == EXPECTED


def test_one_of_names_the_constraint_by_table_and_column():
    class Colour(StrEnum):
        RED = "red"

    check = s.one_of("colour", Colour)
    assert (check.name, str(check.sqltext)) == ("colour", "colour IN ('red')")


@pytest.mark.pg
def test_migrated_postgres_allows_exactly_the_enum_values(engine):
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE contype = 'c' AND connamespace = current_schema()::regnamespace"
            )
        ).all()
    assert {name: _allowed(definition) for name, definition in rows} == EXPECTED
    _refuses_unknown_states(engine)


def test_migrated_sqlite_allows_exactly_the_enum_values(tmp_path):
    url = f"sqlite:///{tmp_path / 'finsent.db'}"
    store.upgrade(url)
    engine = store.make_engine(url)
    try:
        with engine.connect() as c:
            tables = c.execute(text("SELECT sql FROM sqlite_master WHERE type = 'table'")).scalars().all()
        found = {
            name: _allowed(condition)
            for sql in tables
            for name, condition in re.findall(r"CONSTRAINT (ck_\w+) CHECK \(([^)]*)\)", sql or "")
        }
        assert found == EXPECTED
        _refuses_unknown_states(engine)
    finally:
        engine.dispose()


def _refuses_unknown_states(engine) -> None:
    run = (
        "INSERT INTO pipeline_runs (kind, started_at, status, counts, errors) "
        "VALUES ('cycle', CURRENT_TIMESTAMP, :status, '{}', '[]')"
    )
    notice = (
        "INSERT INTO operator_notices (key, kind, subject, body, created_at, sent_to, errors) "
        "VALUES (:key, :kind, 's', 'b', CURRENT_TIMESTAMP, '[]', '[]')"
    )
    alert = (
        "INSERT INTO alerts (id, kind, scope_kind, scope_value, window_start, window_end, severity, neg_count, "
        "total_count, neg_share, baseline_share, baseline_neg_rate, statistic, details, created_at) "
        "VALUES (:id, :kind, :scope, 'x', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 'info', 0, 0, 0, 0, 0, 0, '{}', "
        "CURRENT_TIMESTAMP)"
    )
    with engine.begin() as c:  # the known states are accepted
        c.execute(text(run), {"status": RunStatus.ABANDONED.value})
        c.execute(text(notice), {"key": "k1", "kind": NoticeKind.SINK_FAILING.value})
        c.execute(text(alert), {"id": "a1", "kind": AlertKind.SOURCE_HEALTH.value, "scope": OpsScope.HEALTH.value})
        c.execute(text(alert), {"id": "a2", "kind": AlertKind.ESCALATED.value, "scope": ScopeKind.TOPIC.value})
    for statement, params in (
        (run, {"status": "finished"}),
        (notice, {"key": "k2", "kind": "dag_failure"}),
        (alert, {"id": "a3", "kind": "surge", "scope": ScopeKind.MARKET.value}),
        (alert, {"id": "a4", "kind": AlertKind.SPIKE.value, "scope": "watchlist"}),
    ):
        with pytest.raises(IntegrityError, match="ck_|CHECK"), engine.begin() as c:
            c.execute(text(statement), params)
