-- Hourly sentiment per scope, in the same scope vocabulary and the same unit as alerts: market, entity
-- and topic rows count stories (one per distinct content however many sources carry it; negative when any
-- copy is, as the detector counts), a source row counts the items it published. For the current model:
-- the production one, else the newest registered. Always fresh (a plain view); Grafana filters on
-- bucket_start, which uses ix_documents_published_at. Entity rows do not sum to market (a story can name
-- several entities). Migration 0006 applies this definition (inline copy).
CREATE OR REPLACE VIEW v_current_model AS
SELECT id AS model_version
FROM model_versions
ORDER BY is_production DESC, promoted_at DESC NULLS LAST, created_at DESC, id
LIMIT 1;

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
    SELECT bucket_start, model_version_id, 'market' AS scope_kind, '*' AS scope_value, content_hash AS unit, label, p_negative FROM scored
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
GROUP BY bucket_start, scope_kind, scope_value, model_version_id;
