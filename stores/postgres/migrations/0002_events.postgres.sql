-- meterd.events on plain PostgreSQL: rows live in meterd.events_data, partitioned by UTC day.
-- meterd creates partitions ahead of time and for any day an incoming batch needs, and drops
-- them past retention.

CREATE TABLE meterd.events_data (
    tenant text NOT NULL,
    id text NOT NULL,
    type text NOT NULL,
    time timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL,
    subject text,
    source text,
    dimensions jsonb NOT NULL DEFAULT '{}',
    provider text,
    model text,
    input_tokens bigint,
    output_tokens bigint,
    cached_input_tokens bigint,
    reasoning_tokens bigint,
    route text,
    method text,
    status_code bigint,
    request_bytes bigint,
    response_bytes bigint,
    agent text,
    run_id text,
    parent_run_id text,
    status text,
    latency_ms bigint,
    duration_ms bigint,
    steps bigint,
    tool_calls bigint
)
 PARTITION BY RANGE (time);
-- Serves per-tenant time ranges, and keeps an event delivered by two meterd nodes from being
-- stored twice: a batch that hits it is re-sent with ON CONFLICT DO NOTHING.
CREATE UNIQUE INDEX events_tenant_time_id ON meterd.events_data (tenant, time DESC, id);

-- What users and tenant-scoped roles query. TimescaleDB refuses row-level security policies on
-- hypertables with continuous aggregates or compression, so tenant isolation is a security
-- barrier view over a relation tenant-scoped roles are never granted, in both flavors alike.
CREATE VIEW meterd.events WITH (security_barrier) AS
SELECT * FROM meterd.events_data WHERE meterd.tenant_visible(tenant);

-- Creates the daily partitions holding the given times, if missing. Returns how many it created.
CREATE FUNCTION meterd.ensure_event_partitions(p_times timestamptz[]) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_day timestamptz;
    v_name text;
    v_created integer := 0;
BEGIN
    -- Serialises partition creation across meterd nodes.
    PERFORM pg_advisory_xact_lock(7887054623140311668);
    FOR v_day IN
        SELECT DISTINCT date_bin(INTERVAL '1 day', t, TIMESTAMPTZ '2000-01-01 00:00:00+00')
        FROM unnest(p_times) AS t
    LOOP
        v_name := 'events_' || to_char(v_day AT TIME ZONE 'UTC', 'YYYYMMDD');
        IF to_regclass(format('meterd.%I', v_name)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE meterd.%I PARTITION OF meterd.events_data FOR VALUES FROM (%L) TO (%L)',
                v_name, v_day, v_day + INTERVAL '1 day');
            v_created := v_created + 1;
        END IF;
    END LOOP;
    RETURN v_created;
END
$$;

-- Drops the daily partitions that end at or before `p_before`. Returns how many it dropped.
-- Rollups keep their materialised buckets, as TimescaleDB's continuous aggregates do.
CREATE FUNCTION meterd.drop_event_partitions(p_before timestamptz) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name text;
    v_dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(7887054623140311668);
    FOR v_name IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'meterd.events_data'::regclass
          AND c.relname ~ '^events_[0-9]{8}$'
          AND to_timestamp(substr(c.relname, 8), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC'
              + INTERVAL '1 day' <= p_before
    LOOP
        EXECUTE format('DROP TABLE meterd.%I', v_name);
        v_dropped := v_dropped + 1;
    END LOOP;
    RETURN v_dropped;
END
$$;
