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
ORDER BY r.scope_value, r.window_end DESC;
