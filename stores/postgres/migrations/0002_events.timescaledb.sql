-- meterd.events on TimescaleDB: rows live in meterd.events_data, a hypertable of 1-day chunks
-- compressed by tenant.
-- Compression and retention policies are set by meterd from its configuration.

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
;
SELECT create_hypertable('meterd.events_data', by_range('time', INTERVAL '1 day'));
-- Serves per-tenant time ranges, and keeps an event delivered by two meterd nodes from being
-- stored twice: a batch that hits it is re-sent with ON CONFLICT DO NOTHING.
CREATE UNIQUE INDEX events_tenant_time_id ON meterd.events_data (tenant, time DESC, id);

-- What users and tenant-scoped roles query. TimescaleDB refuses row-level security policies on
-- hypertables with continuous aggregates or compression, so tenant isolation is a security
-- barrier view over a relation tenant-scoped roles are never granted, in both flavors alike.
CREATE VIEW meterd.events WITH (security_barrier) AS
SELECT * FROM meterd.events_data WHERE meterd.tenant_visible(tenant);

ALTER TABLE meterd.events_data SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'tenant',
    timescaledb.compress_orderby = 'time DESC'
);
