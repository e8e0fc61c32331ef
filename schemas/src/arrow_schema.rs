//! The flattened Arrow schema of the `events` table and a builder that turns accepted events into
//! record batches. The same column names are used by every store (design §3).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arrow::array::{
    ArrayRef, Int64Builder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

use crate::event::{EventData, StoredEvent};

/// Column names of `events`, in schema order.
pub mod columns {
    pub const TENANT: &str = "tenant";
    pub const ID: &str = "id";
    pub const TYPE: &str = "type";
    pub const TIME: &str = "time";
    pub const INGESTED_AT: &str = "ingested_at";
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn map_fields() -> MapFieldNames {
    MapFieldNames {
        entry: "entries".into(),
        key: "key".into(),
        value: "value".into(),
    }
}

fn dimensions_type() -> DataType {
    let names = map_fields();
    DataType::Map(
        Arc::new(Field::new(
            names.entry,
            DataType::Struct(
                vec![
                    Field::new(names.key, DataType::Utf8, false),
                    Field::new(names.value, DataType::Utf8, true),
                ]
                .into(),
            ),
            false,
        )),
        false,
    )
}

/// The Arrow schema of the `events` table.
pub fn events_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let s = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
            let i = |name: &str| Field::new(name, DataType::Int64, true);
            Arc::new(Schema::new(vec![
                s("tenant", false),
                s("id", false),
                s("type", false),
                Field::new("time", timestamp(), false),
                Field::new("ingested_at", timestamp(), false),
                s("subject", true),
                s("source", true),
                Field::new("dimensions", dimensions_type(), false),
                s("provider", true),
                s("model", true),
                i("input_tokens"),
                i("output_tokens"),
                i("cached_input_tokens"),
                i("reasoning_tokens"),
                s("route", true),
                s("method", true),
                i("status_code"),
                i("request_bytes"),
                i("response_bytes"),
                s("agent", true),
                s("run_id", true),
                s("parent_run_id", true),
                s("status", true),
                i("latency_ms"),
                i("duration_ms"),
                i("steps"),
                i("tool_calls"),
            ]))
        })
        .clone()
}

/// Accumulates events column by column and emits `events` record batches.
#[derive(Debug)]
pub struct EventsBatchBuilder {
    tenant: StringBuilder,
    id: StringBuilder,
    event_type: StringBuilder,
    time: TimestampMicrosecondBuilder,
    ingested_at: TimestampMicrosecondBuilder,
    subject: StringBuilder,
    source: StringBuilder,
    dimensions: MapBuilder<StringBuilder, StringBuilder>,
    provider: StringBuilder,
    model: StringBuilder,
    input_tokens: Int64Builder,
    output_tokens: Int64Builder,
    cached_input_tokens: Int64Builder,
    reasoning_tokens: Int64Builder,
    route: StringBuilder,
    method: StringBuilder,
    status_code: Int64Builder,
    request_bytes: Int64Builder,
    response_bytes: Int64Builder,
    agent: StringBuilder,
    run_id: StringBuilder,
    parent_run_id: StringBuilder,
    status: StringBuilder,
    latency_ms: Int64Builder,
    duration_ms: Int64Builder,
    steps: Int64Builder,
    tool_calls: Int64Builder,
    rows: usize,
}

impl Default for EventsBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EventsBatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        let ts = || TimestampMicrosecondBuilder::new().with_timezone("UTC");
        Self {
            tenant: StringBuilder::new(),
            id: StringBuilder::new(),
            event_type: StringBuilder::new(),
            time: ts(),
            ingested_at: ts(),
            subject: StringBuilder::new(),
            source: StringBuilder::new(),
            dimensions: MapBuilder::new(
                Some(map_fields()),
                StringBuilder::new(),
                StringBuilder::new(),
            )
            .with_values_field(Arc::new(Field::new("value", DataType::Utf8, true))),
            provider: StringBuilder::new(),
            model: StringBuilder::new(),
            input_tokens: Int64Builder::new(),
            output_tokens: Int64Builder::new(),
            cached_input_tokens: Int64Builder::new(),
            reasoning_tokens: Int64Builder::new(),
            route: StringBuilder::new(),
            method: StringBuilder::new(),
            status_code: Int64Builder::new(),
            request_bytes: Int64Builder::new(),
            response_bytes: Int64Builder::new(),
            agent: StringBuilder::new(),
            run_id: StringBuilder::new(),
            parent_run_id: StringBuilder::new(),
            status: StringBuilder::new(),
            latency_ms: Int64Builder::new(),
            duration_ms: Int64Builder::new(),
            steps: Int64Builder::new(),
            tool_calls: Int64Builder::new(),
            rows: 0,
        }
    }

    /// Rows appended since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether nothing was appended since the last [`finish`](Self::finish).
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends one accepted event as a row.
    pub fn append(&mut self, stored: &StoredEvent) -> Result<(), ArrowError> {
        let e = &stored.event;
        self.tenant.append_value(&e.tenant);
        self.id.append_value(&e.id);
        self.event_type.append_value(e.event_type().as_str());
        self.time.append_value(e.time_us);
        self.ingested_at.append_value(stored.ingested_at_us);
        self.subject.append_option(e.subject.as_deref());
        self.source.append_option(e.source.as_deref());
        for (k, v) in &e.dimensions {
            self.dimensions.keys().append_value(k);
            self.dimensions.values().append_value(v);
        }
        self.dimensions.append(true)?;

        let (mut provider, mut model, mut input, mut output, mut cached, mut reasoning) =
            (None, None, None, None, None, None);
        let (mut route, mut method, mut code, mut req_b, mut resp_b) =
            (None, None, None, None, None);
        let (mut agent, mut run_id, mut parent, mut status) = (None, None, None, None);
        let (mut latency, mut duration, mut steps, mut tools) = (None, None, None, None);
        match &e.data {
            EventData::LlmUsage(d) => {
                provider = Some(d.provider.as_str());
                model = Some(d.model.as_str());
                input = Some(d.input_tokens);
                output = Some(d.output_tokens);
                cached = d.cached_input_tokens;
                reasoning = d.reasoning_tokens;
                latency = d.latency_ms;
                status = d.status.as_deref();
                run_id = d.run_id.as_deref();
            }
            EventData::ApiRequest(d) => {
                route = d.route.as_deref();
                method = d.method.as_deref();
                code = Some(d.status_code);
                latency = Some(d.latency_ms);
                req_b = d.request_bytes;
                resp_b = d.response_bytes;
            }
            EventData::AgentRun(d) => {
                agent = d.agent.as_deref();
                run_id = Some(d.run_id.as_str());
                parent = d.parent_run_id.as_deref();
                status = d.status.as_deref();
                duration = Some(d.duration_ms);
                steps = d.steps;
                tools = d.tool_calls;
            }
        }
        self.provider.append_option(provider);
        self.model.append_option(model);
        self.input_tokens.append_option(input);
        self.output_tokens.append_option(output);
        self.cached_input_tokens.append_option(cached);
        self.reasoning_tokens.append_option(reasoning);
        self.route.append_option(route);
        self.method.append_option(method);
        self.status_code.append_option(code);
        self.request_bytes.append_option(req_b);
        self.response_bytes.append_option(resp_b);
        self.agent.append_option(agent);
        self.run_id.append_option(run_id);
        self.parent_run_id.append_option(parent);
        self.status.append_option(status);
        self.latency_ms.append_option(latency);
        self.duration_ms.append_option(duration);
        self.steps.append_option(steps);
        self.tool_calls.append_option(tools);
        self.rows += 1;
        Ok(())
    }

    /// Emits the rows appended so far as one batch and resets the builder.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.rows = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.tenant.finish()),
            Arc::new(self.id.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.time.finish()),
            Arc::new(self.ingested_at.finish()),
            Arc::new(self.subject.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.dimensions.finish()),
            Arc::new(self.provider.finish()),
            Arc::new(self.model.finish()),
            Arc::new(self.input_tokens.finish()),
            Arc::new(self.output_tokens.finish()),
            Arc::new(self.cached_input_tokens.finish()),
            Arc::new(self.reasoning_tokens.finish()),
            Arc::new(self.route.finish()),
            Arc::new(self.method.finish()),
            Arc::new(self.status_code.finish()),
            Arc::new(self.request_bytes.finish()),
            Arc::new(self.response_bytes.finish()),
            Arc::new(self.agent.finish()),
            Arc::new(self.run_id.finish()),
            Arc::new(self.parent_run_id.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.latency_ms.finish()),
            Arc::new(self.duration_ms.finish()),
            Arc::new(self.steps.finish()),
            Arc::new(self.tool_calls.finish()),
        ];
        RecordBatch::try_new(events_schema(), columns)
    }
}

/// Keeps the files of an embedded store's snapshots on disk while it is held: a compaction that
/// replaces a file deletes it only once no pin taken before the replacement is left.
pub type SnapshotPin = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// A consistent view of the embedded store at one instant: the Parquet files that hold flushed
/// events plus the accepted events not yet flushed. Every acknowledged event is in exactly one of
/// the two.
#[derive(Debug, Clone, Default)]
pub struct EventsSnapshot {
    /// Absolute paths of Parquet files with the `events` schema.
    pub parquet_files: Vec<PathBuf>,
    /// In-memory batches with the `events` schema.
    pub batches: Vec<RecordBatch>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::event::{AgentRun, Event};

    #[test]
    fn builds_batches_matching_the_schema() {
        let mut b = EventsBatchBuilder::new();
        let ev = StoredEvent {
            ingested_at_us: 2,
            event: Event {
                tenant: "t".into(),
                id: "1".into(),
                time_us: 1,
                subject: None,
                source: None,
                dimensions: BTreeMap::from([("k".into(), "v".into())]),
                data: EventData::AgentRun(AgentRun {
                    agent: Some("a".into()),
                    run_id: "r".into(),
                    parent_run_id: None,
                    status: Some("failed".into()),
                    duration_ms: 10,
                    steps: None,
                    tool_calls: Some(1),
                }),
            },
        };
        b.append(&ev).expect("append");
        b.append(&ev).expect("append");
        assert_eq!(b.len(), 2);
        let batch = b.finish().expect("batch");
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema(), events_schema());
        assert!(b.is_empty());
    }
}
