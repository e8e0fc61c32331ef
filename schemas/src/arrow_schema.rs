//! The flattened Arrow schema of the `events` table and a builder that turns accepted events into
//! record batches. The same column names are used by every store (design §3).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arrow::array::{
    ArrayRef, Int64Builder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;

use crate::columns::{COLUMNS, Kind, Value};
use crate::event::StoredEvent;

/// Column names of `events`, in schema order.
pub mod columns {
    pub const TENANT: &str = "tenant";
    pub const ID: &str = "id";
    pub const TYPE: &str = "type";
    pub const TIME: &str = "time";
    pub const INGESTED_AT: &str = "ingested_at";
}

fn map_fields() -> MapFieldNames {
    MapFieldNames {
        entry: "entries".into(),
        key: "key".into(),
        value: "value".into(),
    }
}

/// The Arrow type of `dimensions`: a map of string keys to string values.
pub(crate) fn dimensions_type() -> DataType {
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

/// The Arrow schema of the `events` table, from [`COLUMNS`].
pub fn events_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(
                COLUMNS
                    .iter()
                    .map(|c| Field::new(c.name, c.arrow_type(), c.nullable))
                    .collect::<Vec<_>>(),
            ))
        })
        .clone()
}

/// The builder of one column.
#[derive(Debug)]
enum ColumnBuilder {
    Text(StringBuilder),
    Int(Int64Builder),
    Time(TimestampMicrosecondBuilder),
    /// Boxed: one per builder, and far larger than the others.
    Dimensions(Box<MapBuilder<StringBuilder, StringBuilder>>),
}

impl ColumnBuilder {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Text => ColumnBuilder::Text(StringBuilder::new()),
            Kind::Int => ColumnBuilder::Int(Int64Builder::new()),
            Kind::Time => {
                ColumnBuilder::Time(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
            Kind::Dimensions => {
                let map = MapBuilder::new(
                    Some(map_fields()),
                    StringBuilder::new(),
                    StringBuilder::new(),
                )
                .with_values_field(Arc::new(Field::new(
                    "value",
                    DataType::Utf8,
                    true,
                )));
                ColumnBuilder::Dimensions(Box::new(map))
            }
        }
    }

    fn append(&mut self, value: Value<'_>) -> Result<(), ArrowError> {
        match (self, value) {
            (ColumnBuilder::Text(b), Value::Text(v)) => b.append_option(v),
            (ColumnBuilder::Int(b), Value::Int(v)) => b.append_option(v),
            (ColumnBuilder::Time(b), Value::Time(v)) => b.append_value(v),
            (ColumnBuilder::Dimensions(b), Value::Dimensions(map)) => {
                for (k, v) in map {
                    b.keys().append_value(k);
                    b.values().append_value(v);
                }
                b.append(true)?;
            }
            (builder, value) => {
                return Err(ArrowError::InvalidArgumentError(format!(
                    "a {value:?} does not go into {builder:?}"
                )));
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Text(b) => Arc::new(b.finish()),
            ColumnBuilder::Int(b) => Arc::new(b.finish()),
            ColumnBuilder::Time(b) => Arc::new(b.finish()),
            ColumnBuilder::Dimensions(b) => Arc::new(b.finish()),
        }
    }
}

/// Accumulates events column by column and emits `events` record batches.
#[derive(Debug)]
pub struct EventsBatchBuilder {
    /// One builder per entry of [`COLUMNS`], in order.
    columns: Vec<ColumnBuilder>,
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
        Self {
            columns: COLUMNS.iter().map(|c| ColumnBuilder::new(c.kind)).collect(),
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
        for (builder, column) in self.columns.iter_mut().zip(COLUMNS) {
            builder.append((column.read)(stored))?;
        }
        self.rows += 1;
        Ok(())
    }

    /// Emits the rows appended so far as one batch and resets the builder.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.rows = 0;
        let columns: Vec<ArrayRef> = self.columns.iter_mut().map(ColumnBuilder::finish).collect();
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
    use crate::event::{AgentRun, Event, EventData};

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
