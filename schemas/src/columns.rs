//! The one definition of the columns of `events`: for each, its name, its kind (from which its
//! Arrow, PostgreSQL and ClickHouse types follow), which event types carry it, and how to read
//! it from an accepted event.
//!
//! The Arrow schema and batch builder, the PostgreSQL COPY encoder and the ClickHouse insert
//! block are driven by [`COLUMNS`]. Files that must stay literal (the PostgreSQL migrations, the
//! JSON Schema, the validator's allowed keys) are checked against it by tests. Adding a column
//! is one entry here, one migration per store (the PostgreSQL migrations, literal SQL, are checked
//! against this table by a test beside them) and, for a new field of an event, the field
//! itself (see `docs/architecture.md`, "Adding a column").

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, TimeUnit};

use crate::event::{AgentRun, ApiRequest, EventData, EventType, LlmUsage, StoredEvent};

/// What a column holds; its type in every store follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text.
    Text,
    /// A 64-bit integer.
    Int,
    /// An instant, microseconds since the Unix epoch, UTC.
    Time,
    /// The event's `dimensions`, string keys to string values.
    Dimensions,
}

/// One value of a column, as read from an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Time(i64),
    Dimensions(&'a BTreeMap<String, String>),
}

/// One column of `events`.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
    /// Whether the column may be NULL: true for every column some event types lack.
    pub nullable: bool,
    /// The event types whose `data` carries the column; empty for the columns every event has
    /// outside `data` (its envelope).
    pub carried_by: &'static [EventType],
    /// The column's value for one event (NULL for the types that do not carry it).
    pub read: for<'a> fn(&'a StoredEvent) -> Value<'a>,
}

impl Column {
    /// The column's Arrow type (its field is nullable as [`Column::nullable`] says).
    pub fn arrow_type(&self) -> DataType {
        match self.kind {
            Kind::Text => DataType::Utf8,
            Kind::Int => DataType::Int64,
            Kind::Time => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Kind::Dimensions => crate::arrow_schema::dimensions_type(),
        }
    }

    /// The column's PostgreSQL type.
    pub fn postgres_type(&self) -> &'static str {
        match self.kind {
            Kind::Text => "text",
            Kind::Int => "bigint",
            Kind::Time => "timestamptz",
            Kind::Dimensions => "jsonb",
        }
    }

    /// The column's name and type in ClickHouse's insert table `events_in`, the same on every
    /// server version: times as `Int64` microseconds (`time_us`), dimensions as a JSON string.
    pub fn clickhouse_input(&self) -> (String, &'static str) {
        match (self.kind, self.nullable) {
            (Kind::Time, _) => (format!("{}_us", self.name), "Int64"),
            (Kind::Dimensions, _) => (self.name.to_owned(), "String"),
            (Kind::Text, false) => (self.name.to_owned(), "String"),
            (Kind::Text, true) => (self.name.to_owned(), "Nullable(String)"),
            (Kind::Int, false) => (self.name.to_owned(), "Int64"),
            (Kind::Int, true) => (self.name.to_owned(), "Nullable(Int64)"),
        }
    }
}

fn llm(e: &StoredEvent) -> Option<&LlmUsage> {
    match &e.event.data {
        EventData::LlmUsage(d) => Some(d),
        _ => None,
    }
}

fn api(e: &StoredEvent) -> Option<&ApiRequest> {
    match &e.event.data {
        EventData::ApiRequest(d) => Some(d),
        _ => None,
    }
}

fn agent(e: &StoredEvent) -> Option<&AgentRun> {
    match &e.event.data {
        EventData::AgentRun(d) => Some(d),
        _ => None,
    }
}

const ENVELOPE: &[EventType] = &[];
const LLM: &[EventType] = &[EventType::LlmUsage];
const API: &[EventType] = &[EventType::ApiRequest];
const AGENT: &[EventType] = &[EventType::AgentRun];
const LLM_AGENT: &[EventType] = &[EventType::LlmUsage, EventType::AgentRun];
const LLM_API: &[EventType] = &[EventType::LlmUsage, EventType::ApiRequest];

const fn column(
    name: &'static str,
    kind: Kind,
    nullable: bool,
    carried_by: &'static [EventType],
    read: for<'a> fn(&'a StoredEvent) -> Value<'a>,
) -> Column {
    Column {
        name,
        kind,
        nullable,
        carried_by,
        read,
    }
}

/// Every column of `events`, in table order.
pub static COLUMNS: &[Column] = &[
    column("tenant", Kind::Text, false, ENVELOPE, |e| {
        Value::Text(Some(&e.event.tenant))
    }),
    column("id", Kind::Text, false, ENVELOPE, |e| {
        Value::Text(Some(&e.event.id))
    }),
    column("type", Kind::Text, false, ENVELOPE, |e| {
        Value::Text(Some(e.event.event_type().as_str()))
    }),
    column("time", Kind::Time, false, ENVELOPE, |e| {
        Value::Time(e.event.time_us)
    }),
    column("ingested_at", Kind::Time, false, ENVELOPE, |e| {
        Value::Time(e.ingested_at_us)
    }),
    column("subject", Kind::Text, true, ENVELOPE, |e| {
        Value::Text(e.event.subject.as_deref())
    }),
    column("source", Kind::Text, true, ENVELOPE, |e| {
        Value::Text(e.event.source.as_deref())
    }),
    column("dimensions", Kind::Dimensions, false, ENVELOPE, |e| {
        Value::Dimensions(&e.event.dimensions)
    }),
    column("provider", Kind::Text, true, LLM, |e| {
        Value::Text(llm(e).map(|d| d.provider.as_str()))
    }),
    column("model", Kind::Text, true, LLM, |e| {
        Value::Text(llm(e).map(|d| d.model.as_str()))
    }),
    column("input_tokens", Kind::Int, true, LLM, |e| {
        Value::Int(llm(e).map(|d| d.input_tokens))
    }),
    column("output_tokens", Kind::Int, true, LLM, |e| {
        Value::Int(llm(e).map(|d| d.output_tokens))
    }),
    column("cached_input_tokens", Kind::Int, true, LLM, |e| {
        Value::Int(llm(e).and_then(|d| d.cached_input_tokens))
    }),
    column("cache_write_input_tokens", Kind::Int, true, LLM, |e| {
        Value::Int(llm(e).and_then(|d| d.cache_write_input_tokens))
    }),
    column("reasoning_tokens", Kind::Int, true, LLM, |e| {
        Value::Int(llm(e).and_then(|d| d.reasoning_tokens))
    }),
    column("route", Kind::Text, true, API, |e| {
        Value::Text(api(e).and_then(|d| d.route.as_deref()))
    }),
    column("method", Kind::Text, true, API, |e| {
        Value::Text(api(e).and_then(|d| d.method.as_deref()))
    }),
    column("status_code", Kind::Int, true, API, |e| {
        Value::Int(api(e).map(|d| d.status_code))
    }),
    column("request_bytes", Kind::Int, true, API, |e| {
        Value::Int(api(e).and_then(|d| d.request_bytes))
    }),
    column("response_bytes", Kind::Int, true, API, |e| {
        Value::Int(api(e).and_then(|d| d.response_bytes))
    }),
    column("agent", Kind::Text, true, AGENT, |e| {
        Value::Text(agent(e).and_then(|d| d.agent.as_deref()))
    }),
    column("run_id", Kind::Text, true, LLM_AGENT, |e| {
        Value::Text(match &e.event.data {
            EventData::LlmUsage(d) => d.run_id.as_deref(),
            EventData::AgentRun(d) => Some(&d.run_id),
            EventData::ApiRequest(_) => None,
        })
    }),
    column("parent_run_id", Kind::Text, true, AGENT, |e| {
        Value::Text(agent(e).and_then(|d| d.parent_run_id.as_deref()))
    }),
    column("status", Kind::Text, true, LLM_AGENT, |e| {
        Value::Text(match &e.event.data {
            EventData::LlmUsage(d) => d.status.as_deref(),
            EventData::AgentRun(d) => d.status.as_deref(),
            EventData::ApiRequest(_) => None,
        })
    }),
    column("latency_ms", Kind::Int, true, LLM_API, |e| {
        Value::Int(match &e.event.data {
            EventData::LlmUsage(d) => d.latency_ms,
            EventData::ApiRequest(d) => Some(d.latency_ms),
            EventData::AgentRun(_) => None,
        })
    }),
    column("duration_ms", Kind::Int, true, AGENT, |e| {
        Value::Int(agent(e).map(|d| d.duration_ms))
    }),
    column("steps", Kind::Int, true, AGENT, |e| {
        Value::Int(agent(e).and_then(|d| d.steps))
    }),
    column("tool_calls", Kind::Int, true, AGENT, |e| {
        Value::Int(agent(e).and_then(|d| d.tool_calls))
    }),
];

/// The names of the `data` keys an event of type `t` may carry, in table order.
pub fn data_keys(t: EventType) -> impl Iterator<Item = &'static str> {
    COLUMNS
        .iter()
        .filter(move |c| c.carried_by.contains(&t))
        .map(|c| c.name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The JSON Schema is a literal file: each type's `data` properties must be the columns
    /// the table says that type carries.
    #[test]
    fn the_json_schema_lists_the_data_columns() {
        let schema: serde_json::Value =
            serde_json::from_str(crate::json_schema::EVENT_JSON_SCHEMA).expect("JSON");
        for t in EventType::ALL {
            let listed: BTreeSet<&str> = schema["$defs"][t.as_str()]["properties"]
                .as_object()
                .expect("properties")
                .keys()
                .map(String::as_str)
                .collect();
            let wanted: BTreeSet<&str> = data_keys(t).collect();
            assert_eq!(listed, wanted, "{}", t.as_str());
        }
    }

    /// Each column's reader gives a value of the column's kind, for an event of every type, and
    /// a NULL exactly for the types that do not carry it.
    #[test]
    fn readers_give_values_of_their_kind() {
        use crate::event::Event;
        let event = |data: EventData| StoredEvent {
            ingested_at_us: 1,
            event: Event {
                tenant: "t".into(),
                id: "i".into(),
                time_us: 2,
                subject: None,
                source: None,
                dimensions: BTreeMap::new(),
                data,
            },
        };
        let events = [
            event(EventData::LlmUsage(LlmUsage {
                provider: "p".into(),
                model: "m".into(),
                input_tokens: 1,
                output_tokens: 2,
                cached_input_tokens: Some(3),
                cache_write_input_tokens: Some(6),
                reasoning_tokens: Some(4),
                latency_ms: Some(5),
                status: Some("ok".into()),
                run_id: Some("r".into()),
            })),
            event(EventData::ApiRequest(ApiRequest {
                route: Some("/r".into()),
                method: Some("GET".into()),
                status_code: 200,
                latency_ms: 5,
                request_bytes: Some(6),
                response_bytes: Some(7),
            })),
            event(EventData::AgentRun(AgentRun {
                agent: Some("a".into()),
                run_id: "r".into(),
                parent_run_id: Some("q".into()),
                status: Some("failed".into()),
                duration_ms: 8,
                steps: Some(9),
                tool_calls: Some(10),
            })),
        ];
        for e in &events {
            let t = e.event.event_type();
            for c in COLUMNS {
                let value = (c.read)(e);
                let (kind, null) = match value {
                    Value::Text(v) => (Kind::Text, v.is_none()),
                    Value::Int(v) => (Kind::Int, v.is_none()),
                    Value::Time(_) => (Kind::Time, false),
                    Value::Dimensions(_) => (Kind::Dimensions, false),
                };
                assert_eq!(kind, c.kind, "{} of {}", c.name, t.as_str());
                if !c.carried_by.is_empty() {
                    assert_eq!(
                        null,
                        !c.carried_by.contains(&t),
                        "{} of {} (every field of these events is set)",
                        c.name,
                        t.as_str()
                    );
                }
            }
        }
    }

    #[test]
    fn names_are_unique_and_only_envelope_columns_may_be_required() {
        let mut names: Vec<&str> = COLUMNS.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), COLUMNS.len());
        for c in COLUMNS {
            assert!(
                c.nullable || c.carried_by.is_empty(),
                "{} is carried by some types only, so it is NULL for the others",
                c.name
            );
        }
    }
}
