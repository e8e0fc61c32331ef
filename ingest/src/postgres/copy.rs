//! Binary COPY of events into `meterd.events_data` (and, for benchmarks, any table of the
//! same columns).

use std::pin::Pin;

use chrono::{DateTime, Utc};
use meterd_schemas::StoredEvent;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};

use crate::payload::payload;
use crate::postgres::PgError;

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

/// A time for PostgreSQL. Validation bounds event times to a few hundred days around now, far
/// inside chrono's range: a time outside it is a damaged record, and an error rather than a
/// plausible wrong date.
fn timestamp(id: &str, field: &'static str, us: i64) -> Result<DateTime<Utc>, PgError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| PgError::TimeOutOfRange {
        id: id.to_owned(),
        field,
        us,
    })
}

/// Writes one event as one row.
pub async fn write_event(
    writer: Pin<&mut BinaryCopyInWriter>,
    stored: &StoredEvent,
) -> Result<(), PgError> {
    let e = &stored.event;
    let p = payload(&e.data);
    let time = timestamp(&e.id, "time", e.time_us)?;
    let ingested_at = timestamp(&e.id, "ingested_at", stored.ingested_at_us)?;
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
    writer.write(&row).await.map_err(|source| PgError::Sql {
        step: "COPY into meterd.events_data",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_no_timestamp_holds_are_errors() {
        assert_eq!(
            timestamp("e", "time", 0).expect("the epoch"),
            DateTime::UNIX_EPOCH
        );
        let message = timestamp("e1", "time", i64::MAX)
            .expect_err("out of range")
            .to_string();
        assert!(message.contains("\"e1\" has a value of time"), "{message}");
    }
}
