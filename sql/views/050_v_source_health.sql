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
GROUP BY s.name, s.kind, s.last_status, s.last_fetched_at, s.last_error;
