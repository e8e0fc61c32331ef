-- Rollups: generated from the definitions in the rollups crate. Do not edit by hand;
-- run `METERD_BLESS=1 cargo test --workspace --lib -- migrations_match` to regenerate.

DO $$
DECLARE
    v_dependents text;
BEGIN
    SELECT string_agg(DISTINCT v.oid::regclass::text, ', ') INTO v_dependents
    FROM pg_catalog.pg_depend d
    JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
    JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
    WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass
      AND d.refobjid IN ('meterd.usage_hourly'::regclass, 'meterd.usage_daily'::regclass)
      AND v.oid NOT IN ('meterd.usage_hourly'::regclass, 'meterd.usage_daily'::regclass);
    IF v_dependents IS NOT NULL THEN
        RAISE EXCEPTION 'meterd''s migration 4 (exact sums) re-creates meterd.usage_hourly and meterd.usage_daily; drop the views built on them first: %', v_dependents;
    END IF;
END
$$;

CREATE TEMPORARY TABLE meterd_rollup_grants ON COMMIT DROP AS
SELECT c.relname AS relation, a.grantee, a.privilege_type, a.is_grantable
FROM pg_catalog.pg_class c
CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
WHERE c.relnamespace = 'meterd'::regnamespace
  AND c.relname IN ('usage_hourly', 'usage_daily')
  AND a.grantee <> c.relowner;

DROP VIEW meterd.usage_daily;
DROP VIEW meterd.usage_hourly;

ALTER TABLE meterd.usage_hourly_mat
    ALTER COLUMN input_tokens TYPE numeric(38, 0),
    ALTER COLUMN output_tokens TYPE numeric(38, 0),
    ALTER COLUMN cached_input_tokens TYPE numeric(38, 0),
    ALTER COLUMN reasoning_tokens TYPE numeric(38, 0),
    ALTER COLUMN latency_ms_sum TYPE numeric(38, 0),
    ALTER COLUMN duration_ms_sum TYPE numeric(38, 0);

ALTER TABLE meterd.usage_daily_mat
    ALTER COLUMN input_tokens TYPE numeric(38, 0),
    ALTER COLUMN output_tokens TYPE numeric(38, 0),
    ALTER COLUMN cached_input_tokens TYPE numeric(38, 0),
    ALTER COLUMN reasoning_tokens TYPE numeric(38, 0),
    ALTER COLUMN latency_ms_sum TYPE numeric(38, 0),
    ALTER COLUMN duration_ms_sum TYPE numeric(38, 0);

INSERT INTO meterd.rollup_invalidations (rollup, bucket)
SELECT DISTINCT 'usage_hourly', m.bucket FROM meterd.usage_hourly_mat m
WHERE (m.input_tokens = 9223372036854775807 OR m.output_tokens = 9223372036854775807 OR m.cached_input_tokens = 9223372036854775807 OR m.reasoning_tokens = 9223372036854775807 OR m.latency_ms_sum = 9223372036854775807 OR m.duration_ms_sum = 9223372036854775807)
  AND EXISTS (SELECT 1 FROM meterd.events_data e
              WHERE e.tenant = m.tenant AND e.time >= m.bucket
                AND e.time < m.bucket + INTERVAL '1 hour');

INSERT INTO meterd.rollup_invalidations (rollup, bucket)
SELECT DISTINCT 'usage_daily', m.bucket FROM meterd.usage_daily_mat m
WHERE (m.input_tokens = 9223372036854775807 OR m.output_tokens = 9223372036854775807 OR m.cached_input_tokens = 9223372036854775807 OR m.reasoning_tokens = 9223372036854775807 OR m.latency_ms_sum = 9223372036854775807 OR m.duration_ms_sum = 9223372036854775807)
  AND EXISTS (SELECT 1 FROM meterd.events_data e
              WHERE e.tenant = m.tenant AND e.time >= m.bucket
                AND e.time < m.bucket + INTERVAL '1 day');

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
       coalesce(sum(input_tokens), 0)::numeric(38, 0) AS input_tokens,
       coalesce(sum(output_tokens), 0)::numeric(38, 0) AS output_tokens,
       coalesce(sum(cached_input_tokens), 0)::numeric(38, 0) AS cached_input_tokens,
       coalesce(sum(reasoning_tokens), 0)::numeric(38, 0) AS reasoning_tokens,
       sum(CASE WHEN (type = 'api.request' AND status_code >= 500) OR (type = 'llm.usage' AND status = 'error') OR (type = 'agent.run' AND status IN ('failed', 'timeout')) THEN 1 ELSE 0 END)::bigint AS errors,
       sum(CASE WHEN latency_ms IS NOT NULL THEN 1 ELSE 0 END)::bigint AS latency_count,
       coalesce(sum(latency_ms), 0)::numeric(38, 0) AS latency_ms_sum,
       sum(CASE WHEN duration_ms IS NOT NULL THEN 1 ELSE 0 END)::bigint AS duration_count,
       coalesce(sum(duration_ms), 0)::numeric(38, 0) AS duration_ms_sum,
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
       sum(events)::bigint AS events,
       sum(input_tokens)::numeric(38, 0) AS input_tokens,
       sum(output_tokens)::numeric(38, 0) AS output_tokens,
       sum(cached_input_tokens)::numeric(38, 0) AS cached_input_tokens,
       sum(reasoning_tokens)::numeric(38, 0) AS reasoning_tokens,
       sum(errors)::bigint AS errors,
       sum(latency_count)::bigint AS latency_count,
       sum(latency_ms_sum)::numeric(38, 0) AS latency_ms_sum,
       sum(duration_count)::bigint AS duration_count,
       sum(duration_ms_sum)::numeric(38, 0) AS duration_ms_sum,
       sum(latency_le_5)::bigint AS latency_le_5,
       sum(latency_le_10)::bigint AS latency_le_10,
       sum(latency_le_25)::bigint AS latency_le_25,
       sum(latency_le_50)::bigint AS latency_le_50,
       sum(latency_le_100)::bigint AS latency_le_100,
       sum(latency_le_250)::bigint AS latency_le_250,
       sum(latency_le_500)::bigint AS latency_le_500,
       sum(latency_le_1000)::bigint AS latency_le_1000,
       sum(latency_le_2500)::bigint AS latency_le_2500,
       sum(latency_le_5000)::bigint AS latency_le_5000,
       sum(latency_le_10000)::bigint AS latency_le_10000,
       sum(latency_le_30000)::bigint AS latency_le_30000,
       sum(latency_le_60000)::bigint AS latency_le_60000
FROM meterd.usage_hourly
WHERE bucket >= meterd.rollup_watermark('usage_daily')
  AND meterd.tenant_visible(tenant)
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
COMMENT ON VIEW meterd.usage_daily IS 'meterd rollup by 1 day bucket (UTC); see the rollups crate for the columns';

CREATE OR REPLACE FUNCTION meterd.refresh_rollups(p_now timestamptz DEFAULT now()) RETURNS bigint
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
               coalesce(sum(input_tokens), 0)::numeric(38, 0) AS input_tokens,
               coalesce(sum(output_tokens), 0)::numeric(38, 0) AS output_tokens,
               coalesce(sum(cached_input_tokens), 0)::numeric(38, 0) AS cached_input_tokens,
               coalesce(sum(reasoning_tokens), 0)::numeric(38, 0) AS reasoning_tokens,
               sum(CASE WHEN (type = 'api.request' AND status_code >= 500) OR (type = 'llm.usage' AND status = 'error') OR (type = 'agent.run' AND status IN ('failed', 'timeout')) THEN 1 ELSE 0 END)::bigint AS errors,
               sum(CASE WHEN latency_ms IS NOT NULL THEN 1 ELSE 0 END)::bigint AS latency_count,
               coalesce(sum(latency_ms), 0)::numeric(38, 0) AS latency_ms_sum,
               sum(CASE WHEN duration_ms IS NOT NULL THEN 1 ELSE 0 END)::bigint AS duration_count,
               coalesce(sum(duration_ms), 0)::numeric(38, 0) AS duration_ms_sum,
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
               sum(events)::bigint AS events,
               sum(input_tokens)::numeric(38, 0) AS input_tokens,
               sum(output_tokens)::numeric(38, 0) AS output_tokens,
               sum(cached_input_tokens)::numeric(38, 0) AS cached_input_tokens,
               sum(reasoning_tokens)::numeric(38, 0) AS reasoning_tokens,
               sum(errors)::bigint AS errors,
               sum(latency_count)::bigint AS latency_count,
               sum(latency_ms_sum)::numeric(38, 0) AS latency_ms_sum,
               sum(duration_count)::bigint AS duration_count,
               sum(duration_ms_sum)::numeric(38, 0) AS duration_ms_sum,
               sum(latency_le_5)::bigint AS latency_le_5,
               sum(latency_le_10)::bigint AS latency_le_10,
               sum(latency_le_25)::bigint AS latency_le_25,
               sum(latency_le_50)::bigint AS latency_le_50,
               sum(latency_le_100)::bigint AS latency_le_100,
               sum(latency_le_250)::bigint AS latency_le_250,
               sum(latency_le_500)::bigint AS latency_le_500,
               sum(latency_le_1000)::bigint AS latency_le_1000,
               sum(latency_le_2500)::bigint AS latency_le_2500,
               sum(latency_le_5000)::bigint AS latency_le_5000,
               sum(latency_le_10000)::bigint AS latency_le_10000,
               sum(latency_le_30000)::bigint AS latency_le_30000,
               sum(latency_le_60000)::bigint AS latency_le_60000
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

DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT * FROM meterd_rollup_grants LOOP
        EXECUTE format('GRANT %s ON meterd.%I TO %s%s', g.privilege_type, g.relation,
            CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
            CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;
