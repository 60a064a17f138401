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
GROUP BY a.id;
