-- Applied by migration 0002 only. Migration 0007 replaces v_sentiment_hourly with views over the rollup tables
-- (sentiment_hourly / sentiment_daily, written by pipeline.rollups); its SQL is inline there.
-- Hourly sentiment per scope, in the same scope vocabulary as alerts (market / source / entity / topic),
-- for the current model: the production one, else the newest registered. Always fresh (a plain view);
-- Grafana filters on bucket_start, which uses ix_documents_published_at.
-- An entity row counts each document once per entity it mentions, so entity rows do not sum to market.
CREATE OR REPLACE VIEW v_current_model AS
SELECT id AS model_version
FROM model_versions
ORDER BY is_production DESC, promoted_at DESC NULLS LAST, created_at DESC, id
LIMIT 1;

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
GROUP BY bucket_start, scope_kind, scope_value, model_version_id;
