"""hourly rollups, company names, dashboard views on the rollups

- `sentiment_hourly`: per (hour, scope, model) counts, negatives, sum of p_negative, written incrementally
  by pipeline.rollups when a window is scored/detected (idempotent: a rerun rewrites the same rows).
  Topics are a scope kind, so per-topic counts are rows too. Plain DDL: the SQLite demo has it.
- `sentiment_daily`: the same per day, recomputed from the hourly rows of the days an update touched.
- `rollup_state`: per model, the scored_at watermark up to which rollups are complete.
- `companies`: watchlist display names (ticker -> name), upserted by the cycle from the config.
- Postgres only: v_sentiment_hourly and v_sentiment_daily now read the rollups (mv_sentiment_daily, which
  needed a daily refresh, is dropped), with company names; the SQL is inline so this migration is frozen.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

V_CURRENT_MODEL = """
CREATE OR REPLACE VIEW v_current_model AS
SELECT id AS model_version
FROM model_versions
ORDER BY is_production DESC, promoted_at DESC NULLS LAST, created_at DESC, id
LIMIT 1
"""

# Reads the rollup table: Grafana's time filter on bucket_start uses the primary key, so a 7-day panel
# reads 7 days of rows whatever the history. entity_name: the watchlist name, else the ticker.
V_SENTIMENT_HOURLY = """
CREATE VIEW v_sentiment_hourly AS
SELECT h.bucket_start,
       h.bucket_start + interval '1 hour' AS bucket_end,
       h.scope_kind::text AS scope_kind,
       h.scope_value::text AS scope_value,
       h.model_version::text AS model_version,
       h.total_count::bigint AS total_count,
       h.neg_count::bigint AS neg_count,
       h.neu_count::bigint AS neu_count,
       h.pos_count::bigint AS pos_count,
       h.neg_count::float8 / NULLIF(h.total_count, 0) AS neg_share,
       h.sum_p_negative / NULLIF(h.total_count, 0) AS mean_p_negative,
       h.sum_p_negative,
       CASE WHEN h.scope_kind = 'entity' THEN coalesce(c.name, h.scope_value) ELSE h.scope_value END AS scope_label
FROM sentiment_hourly h
JOIN v_current_model m ON m.model_version = h.model_version
LEFT JOIN companies c ON h.scope_kind = 'entity' AND c.ticker = h.scope_value
"""

V_SENTIMENT_DAILY = """
CREATE VIEW v_sentiment_daily AS
SELECT d.day_start,
       d.scope_kind::text AS scope_kind,
       d.scope_value::text AS scope_value,
       d.model_version::text AS model_version,
       d.total_count::bigint AS total_count,
       d.neg_count::bigint AS neg_count,
       d.neu_count::bigint AS neu_count,
       d.pos_count::bigint AS pos_count,
       d.neg_count::float8 / NULLIF(d.total_count, 0) AS neg_share,
       d.sum_p_negative / NULLIF(d.total_count, 0) AS mean_p_negative,
       CASE WHEN d.scope_kind = 'entity' THEN coalesce(c.name, d.scope_value) ELSE d.scope_value END AS scope_label
FROM sentiment_daily d
JOIN v_current_model m ON m.model_version = d.model_version
LEFT JOIN companies c ON d.scope_kind = 'entity' AND c.ticker = d.scope_value
"""

# Entity names for the Grafana variable (label) without scanning any history.
V_ENTITIES = """
CREATE VIEW v_entities AS
SELECT c.ticker AS entity, c.name FROM companies c
"""

# As 0003's plus the company name, but fast at a year of hourly risk rows: a skip scan finds each entity
# once (recursive CTE over the primary key), then one index probe per entity fetches its newest window.
V_ENTITY_RISK = """
CREATE VIEW v_entity_risk AS
WITH RECURSIVE e(v) AS (
    (SELECT scope_value FROM risk_scores WHERE scope_kind = 'entity' ORDER BY scope_value LIMIT 1)
    UNION ALL
    SELECT (SELECT r.scope_value FROM risk_scores r
             WHERE r.scope_kind = 'entity' AND r.scope_value > e.v ORDER BY r.scope_value LIMIT 1)
    FROM e WHERE e.v IS NOT NULL
)
SELECT l.scope_value AS entity,
       l.window_start,
       l.window_end,
       l.risk,
       l.components,
       l.computed_at,
       (SELECT max(a.window_end)
          FROM alerts a
         WHERE a.scope_kind = 'entity' AND a.scope_value = l.scope_value
           AND a.kind IN ('spike', 'escalated')) AS last_spike_at,
       (SELECT c.name FROM companies c WHERE c.ticker = l.scope_value) AS name
FROM e
CROSS JOIN LATERAL (
    SELECT r.* FROM risk_scores r
     WHERE r.scope_kind = 'entity' AND r.scope_value = e.v
     ORDER BY r.window_end DESC LIMIT 1
) l
WHERE e.v IS NOT NULL
"""

# As 0002's, but joining only the last 24 hours of fetches (an index range), not every fetch ever logged.
V_SOURCE_HEALTH = """
CREATE OR REPLACE VIEW v_source_health AS
SELECT s.name AS source,
       s.kind,
       s.last_status,
       s.last_fetched_at,
       s.last_error,
       count(f.id) AS fetches_24h,
       count(f.id) FILTER (WHERE f.status = 'failed') AS failures_24h,
       coalesce(sum(f.entries_new), 0) AS new_documents_24h
FROM sources s
LEFT JOIN source_fetches f ON f.source_name = s.name AND f.fetched_at >= now() - interval '24 hours'
GROUP BY s.name, s.kind, s.last_status, s.last_fetched_at, s.last_error
"""

OLD_SOURCE_HEALTH = """
CREATE OR REPLACE VIEW v_source_health AS
SELECT s.name AS source, s.kind, s.last_status, s.last_fetched_at, s.last_error,
       count(f.id) FILTER (WHERE f.fetched_at >= now() - interval '24 hours') AS fetches_24h,
       count(f.id) FILTER (WHERE f.fetched_at >= now() - interval '24 hours' AND f.status = 'failed') AS failures_24h,
       coalesce(sum(f.entries_new) FILTER (WHERE f.fetched_at >= now() - interval '24 hours'), 0) AS new_documents_24h
FROM sources s
LEFT JOIN source_fetches f ON f.source_name = s.name
GROUP BY s.name, s.kind, s.last_status, s.last_fetched_at, s.last_error
"""

# 0002's and 0003's definitions, for downgrade.
OLD_ENTITY_RISK = """
CREATE VIEW v_entity_risk AS
SELECT DISTINCT ON (r.scope_value)
       r.scope_value AS entity, r.window_start, r.window_end, r.risk, r.components, r.computed_at,
       (SELECT max(a.window_end) FROM alerts a
         WHERE a.scope_kind = 'entity' AND a.scope_value = r.scope_value
           AND a.kind IN ('spike', 'escalated')) AS last_spike_at
FROM risk_scores r
WHERE r.scope_kind = 'entity'
ORDER BY r.scope_value, r.window_end DESC
"""
# What migration 0006 defined (stories for market/topic/entity, items for a source), restored on downgrade.
OLD_HOURLY = """
CREATE OR REPLACE VIEW v_sentiment_hourly AS
WITH scored AS (
    SELECT d.id AS document_id,
           d.source_name,
           d.content_hash,
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
    SELECT bucket_start, model_version_id, 'market' AS scope_kind, '*' AS scope_value, content_hash AS unit, label,
           p_negative FROM scored
    UNION ALL
    SELECT bucket_start, model_version_id, 'source', source_name, document_id::text, label, p_negative FROM scored
    UNION ALL
    SELECT bucket_start, model_version_id, 'topic', topic, content_hash, label, p_negative FROM scored
    UNION ALL
    SELECT sc.bucket_start, sc.model_version_id, 'entity', e.entity, sc.content_hash, sc.label, sc.p_negative
    FROM scored sc JOIN document_entities e ON e.document_id = sc.document_id
),
units AS (
    SELECT bucket_start, model_version_id, scope_kind, scope_value, unit,
           CASE WHEN bool_or(label = 'negative') THEN 'negative'
                WHEN bool_and(label = 'positive') THEN 'positive'
                ELSE 'neutral' END AS label,
           max(p_negative) AS p_negative
    FROM dims
    GROUP BY bucket_start, model_version_id, scope_kind, scope_value, unit
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
FROM units
GROUP BY bucket_start, scope_kind, scope_value, model_version_id
"""
OLD_DAILY = """
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_sentiment_daily AS
SELECT date_trunc('day', bucket_start, 'UTC') AS day_start, scope_kind, scope_value, model_version,
       sum(total_count)::bigint AS total_count, sum(neg_count)::bigint AS neg_count,
       sum(neu_count)::bigint AS neu_count, sum(pos_count)::bigint AS pos_count,
       sum(neg_count)::float8 / sum(total_count) AS neg_share,
       sum(mean_p_negative * total_count) / sum(total_count) AS mean_p_negative
FROM v_sentiment_hourly
GROUP BY 1, 2, 3, 4
WITH DATA
"""


def _counts() -> list[sa.Column]:
    return [
        sa.Column("total_count", sa.Integer(), nullable=False),
        sa.Column("neg_count", sa.Integer(), nullable=False),
        sa.Column("neu_count", sa.Integer(), nullable=False),
        sa.Column("pos_count", sa.Integer(), nullable=False),
        sa.Column("sum_p_negative", sa.Float(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "companies",
        sa.Column("ticker", sa.String(32), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ticker", name="pk_companies"),
    )
    op.create_table(
        "sentiment_hourly",
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scope_kind", sa.String(16), nullable=False),
        sa.Column("scope_value", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(100), nullable=False),
        *_counts(),
        sa.PrimaryKeyConstraint(
            "bucket_start", "scope_kind", "scope_value", "model_version", name="pk_sentiment_hourly"
        ),
    )
    op.create_index("ix_sentiment_hourly_scope", "sentiment_hourly", ["scope_kind", "scope_value", "bucket_start"])
    op.create_table(
        "sentiment_daily",
        sa.Column("day_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scope_kind", sa.String(16), nullable=False),
        sa.Column("scope_value", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(100), nullable=False),
        *_counts(),
        sa.PrimaryKeyConstraint("day_start", "scope_kind", "scope_value", "model_version", name="pk_sentiment_daily"),
    )
    op.create_table(
        "rollup_state",
        sa.Column("model_version", sa.String(100), nullable=False),
        sa.Column("scored_through", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_version", name="pk_rollup_state"),
    )
    op.create_index("ix_scores_scored_at", "scores", ["scored_at"])
    op.create_index("ix_risk_scores_latest", "risk_scores", ["scope_kind", "scope_value", "window_end"])
    op.create_index("ix_source_fetches_source_time", "source_fetches", ["source_name", "fetched_at"])
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.exec_driver_sql("DROP MATERIALIZED VIEW IF EXISTS mv_sentiment_daily")
    bind.exec_driver_sql("DROP VIEW IF EXISTS v_sentiment_hourly")
    bind.exec_driver_sql("DROP VIEW IF EXISTS v_entity_risk")
    for sql in (V_CURRENT_MODEL, V_SENTIMENT_HOURLY, V_SENTIMENT_DAILY, V_ENTITIES, V_ENTITY_RISK, V_SOURCE_HEALTH):
        bind.exec_driver_sql(sql)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for view in ("v_entities", "v_sentiment_daily", "v_sentiment_hourly", "v_entity_risk"):
            bind.exec_driver_sql(f"DROP VIEW IF EXISTS {view}")
        bind.exec_driver_sql(OLD_HOURLY)
        bind.exec_driver_sql(OLD_DAILY)
        bind.exec_driver_sql(
            "CREATE UNIQUE INDEX IF NOT EXISTS ux_mv_sentiment_daily "
            "ON mv_sentiment_daily (day_start, scope_kind, scope_value, model_version)"
        )
        bind.exec_driver_sql(OLD_ENTITY_RISK)
        bind.exec_driver_sql(OLD_SOURCE_HEALTH)
    op.drop_index("ix_source_fetches_source_time", table_name="source_fetches")
    op.drop_index("ix_risk_scores_latest", table_name="risk_scores")
    op.drop_index("ix_scores_scored_at", table_name="scores")
    op.drop_table("rollup_state")
    op.drop_table("sentiment_daily")
    op.drop_index("ix_sentiment_hourly_scope", table_name="sentiment_hourly")
    op.drop_table("sentiment_hourly")
    op.drop_table("companies")
