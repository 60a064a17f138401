-- Current definition, for reading (migrations carry their own frozen copies; 0009 applies this one).
-- Hourly sentiment per scope, in the same scope vocabulary and the same unit as alerts: market, entity
-- and topic rows count stories (one per distinct content however many sources carry it; negative when any
-- copy is, as the detector counts), a source row counts the items it published. It reads the rollup table
-- sentiment_hourly (written by pipeline.rollups at every detection), for the current model: the production
-- one, else the newest registered. Entity rows do not sum to market (a story can name several entities).
CREATE OR REPLACE VIEW v_current_model AS
SELECT id AS model_version
FROM model_versions
ORDER BY is_production DESC, promoted_at DESC NULLS LAST, created_at DESC, id
LIMIT 1;

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
LEFT JOIN companies c ON h.scope_kind = 'entity' AND c.ticker = h.scope_value;
