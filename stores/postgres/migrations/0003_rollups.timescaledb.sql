-- Rollups: generated from the definitions in the rollups crate. Do not edit by hand;
-- run `METERD_BLESS=1 cargo test --workspace --lib -- migrations_match` to regenerate.

CREATE MATERIALIZED VIEW meterd.usage_hourly_agg
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket,
       tenant AS tenant,
       type AS type,
       coalesce(provider, '') AS provider,
       coalesce(model, '') AS model,
       coalesce(agent, '') AS agent,
       coalesce(route, '') AS route,
       CASE WHEN type = 'api.request' THEN (status_code / 100)::text || 'xx' ELSE coalesce(status, '') END AS status_class,
       count(*) AS events,
       least(coalesce(sum(input_tokens), 0), 9223372036854775807)::bigint AS input_tokens,
       least(coalesce(sum(output_tokens), 0), 9223372036854775807)::bigint AS output_tokens,
       least(coalesce(sum(cached_input_tokens), 0), 9223372036854775807)::bigint AS cached_input_tokens,
       least(coalesce(sum(reasoning_tokens), 0), 9223372036854775807)::bigint AS reasoning_tokens,
       sum(CASE WHEN (type = 'api.request' AND status_code >= 500) OR (type = 'llm.usage' AND status = 'error') OR (type = 'agent.run' AND status IN ('failed', 'timeout')) THEN 1 ELSE 0 END)::bigint AS errors,
       sum(CASE WHEN latency_ms IS NOT NULL THEN 1 ELSE 0 END)::bigint AS latency_count,
       least(coalesce(sum(latency_ms), 0), 9223372036854775807)::bigint AS latency_ms_sum,
       sum(CASE WHEN duration_ms IS NOT NULL THEN 1 ELSE 0 END)::bigint AS duration_count,
       least(coalesce(sum(duration_ms), 0), 9223372036854775807)::bigint AS duration_ms_sum,
       sum(CASE WHEN latency_ms <= 5 THEN 1 ELSE 0 END)::bigint AS latency_le_5,
       sum(CASE WHEN latency_ms <= 10 THEN 1 ELSE 0 END)::bigint AS latency_le_10,
       sum(CASE WHEN latency_ms <= 25 THEN 1 ELSE 0 END)::bigint AS latency_le_25,
       sum(CASE WHEN latency_ms <= 50 THEN 1 ELSE 0 END)::bigint AS latency_le_50,
       sum(CASE WHEN latency_ms <= 100 THEN 1 ELSE 0 END)::bigint AS latency_le_100,
       sum(CASE WHEN latency_ms <= 250 THEN 1 ELSE 0 END)::bigint AS latency_le_250,
       sum(CASE WHEN latency_ms <= 500 THEN 1 ELSE 0 END)::bigint AS latency_le_500,
       sum(CASE WHEN latency_ms <= 1000 THEN 1 ELSE 0 END)::bigint AS latency_le_1000,
       sum(CASE WHEN latency_ms <= 2500 THEN 1 ELSE 0 END)::bigint AS latency_le_2500,
       sum(CASE WHEN latency_ms <= 5000 THEN 1 ELSE 0 END)::bigint AS latency_le_5000,
       sum(CASE WHEN latency_ms <= 10000 THEN 1 ELSE 0 END)::bigint AS latency_le_10000,
       sum(CASE WHEN latency_ms <= 30000 THEN 1 ELSE 0 END)::bigint AS latency_le_30000,
       sum(CASE WHEN latency_ms <= 60000 THEN 1 ELSE 0 END)::bigint AS latency_le_60000
FROM meterd.events_data
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
WITH NO DATA;

CREATE VIEW meterd.usage_hourly WITH (security_barrier) AS
SELECT bucket, tenant, type, provider, model, agent, route, status_class, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, errors, latency_count, latency_ms_sum, duration_count, duration_ms_sum, latency_le_5, latency_le_10, latency_le_25, latency_le_50, latency_le_100, latency_le_250, latency_le_500, latency_le_1000, latency_le_2500, latency_le_5000, latency_le_10000, latency_le_30000, latency_le_60000
FROM meterd.usage_hourly_agg
WHERE meterd.tenant_visible(tenant);
COMMENT ON VIEW meterd.usage_hourly IS 'meterd rollup by 1 hour bucket (UTC); see the rollups crate for the columns';

SELECT add_continuous_aggregate_policy('meterd.usage_hourly_agg',
    start_offset => NULL,
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '1 minute');

CREATE MATERIALIZED VIEW meterd.usage_daily_agg
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', bucket) AS bucket,
       tenant AS tenant,
       type AS type,
       provider AS provider,
       model AS model,
       agent AS agent,
       route AS route,
       status_class AS status_class,
       least(sum(events), 9223372036854775807)::bigint AS events,
       least(sum(input_tokens), 9223372036854775807)::bigint AS input_tokens,
       least(sum(output_tokens), 9223372036854775807)::bigint AS output_tokens,
       least(sum(cached_input_tokens), 9223372036854775807)::bigint AS cached_input_tokens,
       least(sum(reasoning_tokens), 9223372036854775807)::bigint AS reasoning_tokens,
       least(sum(errors), 9223372036854775807)::bigint AS errors,
       least(sum(latency_count), 9223372036854775807)::bigint AS latency_count,
       least(sum(latency_ms_sum), 9223372036854775807)::bigint AS latency_ms_sum,
       least(sum(duration_count), 9223372036854775807)::bigint AS duration_count,
       least(sum(duration_ms_sum), 9223372036854775807)::bigint AS duration_ms_sum,
       least(sum(latency_le_5), 9223372036854775807)::bigint AS latency_le_5,
       least(sum(latency_le_10), 9223372036854775807)::bigint AS latency_le_10,
       least(sum(latency_le_25), 9223372036854775807)::bigint AS latency_le_25,
       least(sum(latency_le_50), 9223372036854775807)::bigint AS latency_le_50,
       least(sum(latency_le_100), 9223372036854775807)::bigint AS latency_le_100,
       least(sum(latency_le_250), 9223372036854775807)::bigint AS latency_le_250,
       least(sum(latency_le_500), 9223372036854775807)::bigint AS latency_le_500,
       least(sum(latency_le_1000), 9223372036854775807)::bigint AS latency_le_1000,
       least(sum(latency_le_2500), 9223372036854775807)::bigint AS latency_le_2500,
       least(sum(latency_le_5000), 9223372036854775807)::bigint AS latency_le_5000,
       least(sum(latency_le_10000), 9223372036854775807)::bigint AS latency_le_10000,
       least(sum(latency_le_30000), 9223372036854775807)::bigint AS latency_le_30000,
       least(sum(latency_le_60000), 9223372036854775807)::bigint AS latency_le_60000
FROM meterd.usage_hourly_agg
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
WITH NO DATA;

CREATE VIEW meterd.usage_daily WITH (security_barrier) AS
SELECT bucket, tenant, type, provider, model, agent, route, status_class, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, errors, latency_count, latency_ms_sum, duration_count, duration_ms_sum, latency_le_5, latency_le_10, latency_le_25, latency_le_50, latency_le_100, latency_le_250, latency_le_500, latency_le_1000, latency_le_2500, latency_le_5000, latency_le_10000, latency_le_30000, latency_le_60000
FROM meterd.usage_daily_agg
WHERE meterd.tenant_visible(tenant);
COMMENT ON VIEW meterd.usage_daily IS 'meterd rollup by 1 day bucket (UTC); see the rollups crate for the columns';

SELECT add_continuous_aggregate_policy('meterd.usage_daily_agg',
    start_offset => NULL,
    end_offset => INTERVAL '1 day',
    schedule_interval => INTERVAL '1 minute');

