-- Applied by migration 0002 only. Migration 0009 replaces mv_sentiment_daily with views over the rollup tables
-- (sentiment_hourly / sentiment_daily, written by pipeline.rollups); its SQL is inline there.
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
WITH DATA;

CREATE UNIQUE INDEX IF NOT EXISTS ux_mv_sentiment_daily
    ON mv_sentiment_daily (day_start, scope_kind, scope_value, model_version);
