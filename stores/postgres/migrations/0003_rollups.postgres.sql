-- Rollups: generated from the definitions in the rollups crate. Do not edit by hand;
-- run `METERD_BLESS=1 cargo test --workspace --lib -- migrations_match` to regenerate.

CREATE TABLE meterd.rollup_watermarks (
    rollup text PRIMARY KEY,
    watermark timestamptz NOT NULL
);
-- Read by the rollup views with the querying role's rights; it holds no tenant data.
GRANT SELECT ON meterd.rollup_watermarks TO PUBLIC;

-- Buckets whose source rows changed since they were last materialised. Append-only (no
-- unique key, so a writer never skips its row because another transaction's row is
-- there): a refresh deletes the rows it can see, and the rows of transactions that
-- commit later stay for the next one.
CREATE TABLE meterd.rollup_invalidations (
    rollup text NOT NULL,
    bucket timestamptz NOT NULL
);
CREATE INDEX ON meterd.rollup_invalidations (rollup, bucket);

CREATE FUNCTION meterd.rollup_watermark(p_rollup text) RETURNS timestamptz
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce((SELECT watermark FROM meterd.rollup_watermarks WHERE rollup = p_rollup),
                    '-infinity'::timestamptz);
END;

CREATE TABLE meterd.usage_hourly_mat (
    bucket timestamptz NOT NULL,
    tenant text NOT NULL,
    type text NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    agent text NOT NULL,
    route text NOT NULL,
    status_class text NOT NULL,
    events bigint NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    errors bigint NOT NULL,
    latency_count bigint NOT NULL,
    latency_ms_sum bigint NOT NULL,
    duration_count bigint NOT NULL,
    duration_ms_sum bigint NOT NULL,
    latency_le_5 bigint NOT NULL,
    latency_le_10 bigint NOT NULL,
    latency_le_25 bigint NOT NULL,
    latency_le_50 bigint NOT NULL,
    latency_le_100 bigint NOT NULL,
    latency_le_250 bigint NOT NULL,
    latency_le_500 bigint NOT NULL,
    latency_le_1000 bigint NOT NULL,
    latency_le_2500 bigint NOT NULL,
    latency_le_5000 bigint NOT NULL,
    latency_le_10000 bigint NOT NULL,
    latency_le_30000 bigint NOT NULL,
    latency_le_60000 bigint NOT NULL
);
CREATE INDEX ON meterd.usage_hourly_mat (bucket);
CREATE INDEX ON meterd.usage_hourly_mat (tenant, bucket);
INSERT INTO meterd.rollup_watermarks VALUES ('usage_hourly', '-infinity');

CREATE VIEW meterd.usage_hourly WITH (security_barrier) AS
SELECT bucket, tenant, type, provider, model, agent, route, status_class, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, errors, latency_count, latency_ms_sum, duration_count, duration_ms_sum, latency_le_5, latency_le_10, latency_le_25, latency_le_50, latency_le_100, latency_le_250, latency_le_500, latency_le_1000, latency_le_2500, latency_le_5000, latency_le_10000, latency_le_30000, latency_le_60000
FROM meterd.usage_hourly_mat
WHERE bucket < meterd.rollup_watermark('usage_hourly')
  AND meterd.tenant_visible(tenant)
UNION ALL
SELECT date_bin(INTERVAL '1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
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
WHERE time >= meterd.rollup_watermark('usage_hourly')
  AND meterd.tenant_visible(tenant)
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
COMMENT ON VIEW meterd.usage_hourly IS 'meterd rollup by 1 hour bucket (UTC); see the rollups crate for the columns';

CREATE TABLE meterd.usage_daily_mat (
    bucket timestamptz NOT NULL,
    tenant text NOT NULL,
    type text NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    agent text NOT NULL,
    route text NOT NULL,
    status_class text NOT NULL,
    events bigint NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    errors bigint NOT NULL,
    latency_count bigint NOT NULL,
    latency_ms_sum bigint NOT NULL,
    duration_count bigint NOT NULL,
    duration_ms_sum bigint NOT NULL,
    latency_le_5 bigint NOT NULL,
    latency_le_10 bigint NOT NULL,
    latency_le_25 bigint NOT NULL,
    latency_le_50 bigint NOT NULL,
    latency_le_100 bigint NOT NULL,
    latency_le_250 bigint NOT NULL,
    latency_le_500 bigint NOT NULL,
    latency_le_1000 bigint NOT NULL,
    latency_le_2500 bigint NOT NULL,
    latency_le_5000 bigint NOT NULL,
    latency_le_10000 bigint NOT NULL,
    latency_le_30000 bigint NOT NULL,
    latency_le_60000 bigint NOT NULL
);
CREATE INDEX ON meterd.usage_daily_mat (bucket);
CREATE INDEX ON meterd.usage_daily_mat (tenant, bucket);
INSERT INTO meterd.rollup_watermarks VALUES ('usage_daily', '-infinity');

CREATE VIEW meterd.usage_daily WITH (security_barrier) AS
SELECT bucket, tenant, type, provider, model, agent, route, status_class, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, errors, latency_count, latency_ms_sum, duration_count, duration_ms_sum, latency_le_5, latency_le_10, latency_le_25, latency_le_50, latency_le_100, latency_le_250, latency_le_500, latency_le_1000, latency_le_2500, latency_le_5000, latency_le_10000, latency_le_30000, latency_le_60000
FROM meterd.usage_daily_mat
WHERE bucket < meterd.rollup_watermark('usage_daily')
  AND meterd.tenant_visible(tenant)
UNION ALL
SELECT date_bin(INTERVAL '1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
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
FROM meterd.usage_hourly
WHERE bucket >= meterd.rollup_watermark('usage_daily')
  AND meterd.tenant_visible(tenant)
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
COMMENT ON VIEW meterd.usage_daily IS 'meterd rollup by 1 day bucket (UTC); see the rollups crate for the columns';

CREATE FUNCTION meterd.invalidate_rollups() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO meterd.rollup_invalidations (rollup, bucket)
    SELECT DISTINCT 'usage_hourly', date_bin(INTERVAL '1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') FROM changed;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_invalidate_insert AFTER INSERT ON meterd.events_data
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION meterd.invalidate_rollups();
CREATE TRIGGER events_invalidate_update_old AFTER UPDATE ON meterd.events_data
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION meterd.invalidate_rollups();
CREATE TRIGGER events_invalidate_update_new AFTER UPDATE ON meterd.events_data
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION meterd.invalidate_rollups();
CREATE TRIGGER events_invalidate_delete AFTER DELETE ON meterd.events_data
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION meterd.invalidate_rollups();

CREATE FUNCTION meterd.refresh_rollups(p_now timestamptz DEFAULT now()) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_watermark timestamptz;
    v_buckets timestamptz[];
    v_lo timestamptz;
    v_hi timestamptz;
    v_chunk timestamptz[];
    v_total bigint := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(7887054623174194024);

    -- usage_hourly
    v_watermark := greatest(meterd.rollup_watermark('usage_hourly'), date_bin(INTERVAL '1 hour', p_now, TIMESTAMPTZ '2000-01-01 00:00:00+00'));
    UPDATE meterd.rollup_watermarks SET watermark = v_watermark WHERE rollup = 'usage_hourly';
    WITH done AS (
        DELETE FROM meterd.rollup_invalidations
        WHERE rollup = 'usage_hourly' AND bucket < v_watermark
        RETURNING bucket)
    SELECT coalesce(array_agg(DISTINCT bucket ORDER BY bucket), '{}') INTO v_buckets
    FROM done;
    IF cardinality(v_buckets) > 0 THEN
        DELETE FROM meterd.usage_hourly_mat WHERE bucket = ANY (v_buckets);
        -- One scan per day of source rows, so partitions are pruned and each row is
        -- checked against that day's buckets only.
        FOR v_lo, v_hi, v_chunk IN
            SELECT min(b), max(b), array_agg(b) FROM unnest(v_buckets) AS b
            GROUP BY date_bin(INTERVAL '1 day', b, TIMESTAMPTZ '2000-01-01 00:00:00+00')
        LOOP
        INSERT INTO meterd.usage_hourly_mat (bucket, tenant, type, provider, model, agent, route, status_class, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, errors, latency_count, latency_ms_sum, duration_count, duration_ms_sum, latency_le_5, latency_le_10, latency_le_25, latency_le_50, latency_le_100, latency_le_250, latency_le_500, latency_le_1000, latency_le_2500, latency_le_5000, latency_le_10000, latency_le_30000, latency_le_60000)
        SELECT date_bin(INTERVAL '1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
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
        WHERE time >= v_lo AND time < v_hi + INTERVAL '1 hour'
                  AND date_bin(INTERVAL '1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') = ANY (v_chunk)
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
        END LOOP;
        v_total := v_total + cardinality(v_buckets);
        INSERT INTO meterd.rollup_invalidations (rollup, bucket)
        SELECT DISTINCT 'usage_daily', date_bin(INTERVAL '1 day', b, TIMESTAMPTZ '2000-01-01 00:00:00+00') FROM unnest(v_buckets) AS b;
    END IF;

    -- usage_daily
    v_watermark := greatest(meterd.rollup_watermark('usage_daily'), least(date_bin(INTERVAL '1 day', p_now, TIMESTAMPTZ '2000-01-01 00:00:00+00'), date_bin(INTERVAL '1 day', meterd.rollup_watermark('usage_hourly'), TIMESTAMPTZ '2000-01-01 00:00:00+00')));
    UPDATE meterd.rollup_watermarks SET watermark = v_watermark WHERE rollup = 'usage_daily';
    WITH done AS (
        DELETE FROM meterd.rollup_invalidations
        WHERE rollup = 'usage_daily' AND bucket < v_watermark
        RETURNING bucket)
    SELECT coalesce(array_agg(DISTINCT bucket ORDER BY bucket), '{}') INTO v_buckets
    FROM done;
    IF cardinality(v_buckets) > 0 THEN
        DELETE FROM meterd.usage_daily_mat WHERE bucket = ANY (v_buckets);
        -- One scan per day of source rows, so partitions are pruned and each row is
        -- checked against that day's buckets only.
        FOR v_lo, v_hi, v_chunk IN
            SELECT min(b), max(b), array_agg(b) FROM unnest(v_buckets) AS b
            GROUP BY date_bin(INTERVAL '1 day', b, TIMESTAMPTZ '2000-01-01 00:00:00+00')
        LOOP
        INSERT INTO meterd.usage_daily_mat (bucket, tenant, type, provider, model, agent, route, status_class, events, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, errors, latency_count, latency_ms_sum, duration_count, duration_ms_sum, latency_le_5, latency_le_10, latency_le_25, latency_le_50, latency_le_100, latency_le_250, latency_le_500, latency_le_1000, latency_le_2500, latency_le_5000, latency_le_10000, latency_le_30000, latency_le_60000)
        SELECT date_bin(INTERVAL '1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
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
        FROM meterd.usage_hourly_mat
        WHERE bucket >= v_lo AND bucket < v_hi + INTERVAL '1 day'
                  AND date_bin(INTERVAL '1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') = ANY (v_chunk)
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
        END LOOP;
        v_total := v_total + cardinality(v_buckets);
    END IF;
    RETURN v_total;
END
$$;
