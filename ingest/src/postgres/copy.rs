//! Binary COPY of events into `meterd.events_data` (and, for benchmarks, any table of the
//! same columns).

use std::pin::Pin;

use chrono::{DateTime, Utc};
use meterd_schemas::{EventData, StoredEvent};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};

/// The columns in the order of [`TYPES`] and [`write_event`].
pub const COLUMNS: &str = "tenant, id, type, time, ingested_at, subject, source, dimensions, \
    provider, model, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, route, \
    method, status_code, request_bytes, response_bytes, agent, run_id, parent_run_id, status, \
    latency_ms, duration_ms, steps, tool_calls";

/// `COPY <table> (COLUMNS) FROM STDIN (FORMAT binary)`; `table` is trusted (a constant).
pub fn copy_statement(table: &str) -> String {
    format!("COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)")
}

/// The column types of [`COLUMNS`].
pub const TYPES: [Type; 27] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
];

/// The type-specific columns of one event; absent ones are NULL.
#[derive(Default)]
struct Payload<'a> {
    provider: Option<&'a str>,
    model: Option<&'a str>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_input_tokens: Option<i64>,
    reasoning_tokens: Option<i64>,
    route: Option<&'a str>,
    method: Option<&'a str>,
    status_code: Option<i64>,
    request_bytes: Option<i64>,
    response_bytes: Option<i64>,
    agent: Option<&'a str>,
    run_id: Option<&'a str>,
    parent_run_id: Option<&'a str>,
    status: Option<&'a str>,
    latency_ms: Option<i64>,
    duration_ms: Option<i64>,
    steps: Option<i64>,
    tool_calls: Option<i64>,
}

fn payload(data: &EventData) -> Payload<'_> {
    match data {
        EventData::LlmUsage(u) => Payload {
            provider: Some(&u.provider),
            model: Some(&u.model),
            input_tokens: Some(u.input_tokens),
            output_tokens: Some(u.output_tokens),
            cached_input_tokens: u.cached_input_tokens,
            reasoning_tokens: u.reasoning_tokens,
            latency_ms: u.latency_ms,
            status: u.status.as_deref(),
            run_id: u.run_id.as_deref(),
            ..Payload::default()
        },
        EventData::ApiRequest(r) => Payload {
            route: r.route.as_deref(),
            method: r.method.as_deref(),
            status_code: Some(r.status_code),
            latency_ms: Some(r.latency_ms),
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            ..Payload::default()
        },
        EventData::AgentRun(a) => Payload {
            agent: a.agent.as_deref(),
            run_id: Some(&a.run_id),
            parent_run_id: a.parent_run_id.as_deref(),
            status: a.status.as_deref(),
            duration_ms: Some(a.duration_ms),
            steps: a.steps,
            tool_calls: a.tool_calls,
            ..Payload::default()
        },
    }
}

fn timestamp(us: i64) -> DateTime<Utc> {
    // Validation bounds event times to a few hundred days around now, far inside chrono's range;
    // the fallback only guards a corrupt record from panicking the sink.
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::UNIX_EPOCH)
}

/// Writes one event as one row.
pub async fn write_event(
    writer: Pin<&mut BinaryCopyInWriter>,
    stored: &StoredEvent,
) -> Result<(), tokio_postgres::Error> {
    let e = &stored.event;
    let p = payload(&e.data);
    let time = timestamp(e.time_us);
    let ingested_at = timestamp(stored.ingested_at_us);
    let dimensions = Json(&e.dimensions);
    let row: [&(dyn ToSql + Sync); 27] = [
        &e.tenant.as_str(),
        &e.id.as_str(),
        &e.event_type().as_str(),
        &time,
        &ingested_at,
        &e.subject.as_deref(),
        &e.source.as_deref(),
        &dimensions,
        &p.provider,
        &p.model,
        &p.input_tokens,
        &p.output_tokens,
        &p.cached_input_tokens,
        &p.reasoning_tokens,
        &p.route,
        &p.method,
        &p.status_code,
        &p.request_bytes,
        &p.response_bytes,
        &p.agent,
        &p.run_id,
        &p.parent_run_id,
        &p.status,
        &p.latency_ms,
        &p.duration_ms,
        &p.steps,
        &p.tool_calls,
    ];
    writer.write(&row).await
}
