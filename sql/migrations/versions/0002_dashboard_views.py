"""dashboard views (Postgres only)

The SQL is frozen here, as this revision applies it (sql/views/*.sql hold the current definitions for
reading only): editing a view never changes what an old migration does, so a fresh database and an
upgraded one end the same. On SQLite (the embedded demo) it does nothing: the views use Postgres
features (FILTER, DISTINCT ON, materialized views) and the demo has no Grafana. A later change to a
view needs a new migration with its own copy of the SQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:30:00
"""
from typing import Sequence, Union

from alembic import op

from pipeline.store import apply_sql

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Dropped in reverse dependency order.
VIEWS = ("v_source_health", "v_recent_alerts", "v_entity_risk", "v_sentiment_hourly", "v_current_model")
MATERIALIZED = ("mv_sentiment_daily",)

# What sql/views/010..050 held when this revision was frozen, one statement each, in order.
STATEMENTS = (
    """\
-- Grafana filters on bucket_start, which uses ix_documents_published_at.
-- An entity row counts each document once per entity it mentions, so entity rows do not sum to market.
CREATE OR REPLACE VIEW v_current_model AS
SELECT id AS model_version
FROM model_versions
ORDER BY is_production DESC, promoted_at DESC NULLS LAST, created_at DESC, id
LIMIT 1
""",
    """\
CREATE OR REPLACE VIEW v_sentiment_hourly AS
WITH scored AS (
    SELECT d.id AS document_id,
           d.source_name,
           date_trunc('hour', d.published_at, 'UTC') AS bucket_start,
           s.model_version_id,
           s.label,
           s.p_negative,
           COALESCE(s.topic, '(none)') AS topic
    FROM documents d
    JOIN scores s ON s.document_id = d.id
    JOIN v_current_model m ON m.model_version = s.model_version_id
),
dims AS (
    SELECT bucket_start, model_version_id, 'market' AS scope_kind, '*' AS scope_value, label, p_negative FROM scored
    UNION ALL
    SELECT bucket_start, model_version_id, 'source', source_name, label, p_negative FROM scored
    UNION ALL
    SELECT bucket_start, model_version_id, 'topic', topic, label, p_negative FROM scored
    UNION ALL
    SELECT sc.bucket_start, sc.model_version_id, 'entity', e.entity, sc.label, sc.p_negative
    FROM scored sc JOIN document_entities e ON e.document_id = sc.document_id
)
SELECT bucket_start,
       bucket_start + interval '1 hour' AS bucket_end,
       scope_kind,
       scope_value,
       model_version_id AS model_version,
       count(*) AS total_count,
       count(*) FILTER (WHERE label = 'negative') AS neg_count,
       count(*) FILTER (WHERE label = 'neutral') AS neu_count,
       count(*) FILTER (WHERE label = 'positive') AS pos_count,
       (count(*) FILTER (WHERE label = 'negative'))::float8 / count(*) AS neg_share,
       avg(p_negative) AS mean_p_negative
FROM dims
GROUP BY bucket_start, scope_kind, scope_value, model_version_id
""",
    """\
-- Daily rollup for long-range panels: materialized because months of hourly rows are slow to
-- aggregate on every dashboard load. finsent_maintenance refreshes it (CONCURRENTLY, hence the
-- unique index) once a day.
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_sentiment_daily AS
SELECT date_trunc('day', bucket_start, 'UTC') AS day_start,
       scope_kind,
       scope_value,
       model_version,
       sum(total_count)::bigint AS total_count,
       sum(neg_count)::bigint AS neg_count,
       sum(neu_count)::bigint AS neu_count,
       sum(pos_count)::bigint AS pos_count,
       sum(neg_count)::float8 / sum(total_count) AS neg_share,
       sum(mean_p_negative * total_count) / sum(total_count) AS mean_p_negative
FROM v_sentiment_hourly
GROUP BY 1, 2, 3, 4
WITH DATA
""",
    """\
CREATE UNIQUE INDEX IF NOT EXISTS ux_mv_sentiment_daily
    ON mv_sentiment_daily (day_start, scope_kind, scope_value, model_version)
""",
    """\
-- The latest risk score per watchlist entity, with its most recent spike or escalation alert, for the risk table panel.
CREATE OR REPLACE VIEW v_entity_risk AS
SELECT DISTINCT ON (r.scope_value)
       r.scope_value AS entity,
       r.window_start,
       r.window_end,
       r.risk,
       r.components,
       r.computed_at,
       (SELECT max(a.window_end)
          FROM alerts a
         WHERE a.scope_kind = 'entity' AND a.scope_value = r.scope_value AND a.kind IN ('spike', 'escalated')) AS last_spike_at
FROM risk_scores r
WHERE r.scope_kind = 'entity'
ORDER BY r.scope_value, r.window_end DESC
""",
    """\
-- Alerts stored in the last 30 days (by insertion, so a backfill of an old window still shows),
-- with how their deliveries went, for the alert table panel.
CREATE OR REPLACE VIEW v_recent_alerts AS
SELECT a.id,
       a.kind,
       a.severity,
       a.scope_kind,
       a.scope_value,
       a.window_start,
       a.window_end,
       a.neg_count,
       a.total_count,
       a.neg_share,
       a.baseline_share,
       a.p_value,
       a.risk_score,
       a.created_at,
       a.acknowledged_at,
       count(d.id) FILTER (WHERE d.status = 'sent') AS deliveries_sent,
       count(d.id) FILTER (WHERE d.status IN ('failed', 'expired')) AS deliveries_failed,
       string_agg(DISTINCT d.sink, ',') AS sinks
FROM alerts a
LEFT JOIN alert_deliveries d ON d.alert_id = a.id
WHERE a.created_at >= now() - interval '30 days'
GROUP BY a.id
""",
    """\
-- Per source: last fetch outcome and the last 24 hours of fetches, so a dead feed shows on the dashboard.
CREATE OR REPLACE VIEW v_source_health AS
SELECT s.name AS source,
       s.kind,
       s.last_status,
       s.last_fetched_at,
       s.last_error,
       count(f.id) FILTER (WHERE f.fetched_at >= now() - interval '24 hours') AS fetches_24h,
       count(f.id) FILTER (WHERE f.fetched_at >= now() - interval '24 hours' AND f.status = 'failed') AS failures_24h,
       coalesce(sum(f.entries_new) FILTER (WHERE f.fetched_at >= now() - interval '24 hours'), 0) AS new_documents_24h
FROM sources s
LEFT JOIN source_fetches f ON f.source_name = s.name
GROUP BY s.name, s.kind, s.last_status, s.last_fetched_at, s.last_error
""",
)


def upgrade() -> None:
    apply_sql(op.get_bind(), STATEMENTS, only="postgresql")


def downgrade() -> None:
    apply_sql(
        op.get_bind(),
        [f"DROP MATERIALIZED VIEW IF EXISTS {name}" for name in MATERIALIZED]
        + [f"DROP VIEW IF EXISTS {name}" for name in VIEWS],
        only="postgresql",
    )
