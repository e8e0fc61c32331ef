//! Frozen layouts: the event as meterd once encoded it, kept so that what it wrote then reads,
//! and hashes, the same in every later version.
//!
//! [`v1`] is the layout of the first log records (bare postcard, before records carried a
//! version) and of the dedup content hash. The event types in [`crate::event`] may grow; the
//! types here never change. When the current layout moves on, a new module sits beside
//! `v1`, and readers convert each older layout into the current one.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::event::{Event, EventData};

/// The first layout, owned, for reading old log records.
pub mod v1 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StoredEvent {
        pub ingested_at_us: i64,
        pub event: Event,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Event {
        pub tenant: String,
        pub id: String,
        pub time_us: i64,
        pub subject: Option<String>,
        pub source: Option<String>,
        pub dimensions: BTreeMap<String, String>,
        pub data: EventData,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub enum EventData {
        LlmUsage(LlmUsage),
        ApiRequest(ApiRequest),
        AgentRun(AgentRun),
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct LlmUsage {
        pub provider: String,
        pub model: String,
        pub input_tokens: i64,
        pub output_tokens: i64,
        pub cached_input_tokens: Option<i64>,
        pub reasoning_tokens: Option<i64>,
        pub latency_ms: Option<i64>,
        pub status: Option<String>,
        pub run_id: Option<String>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ApiRequest {
        pub route: Option<String>,
        pub method: Option<String>,
        pub status_code: i64,
        pub latency_ms: i64,
        pub request_bytes: Option<i64>,
        pub response_bytes: Option<i64>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct AgentRun {
        pub agent: Option<String>,
        pub run_id: String,
        pub parent_run_id: Option<String>,
        pub status: Option<String>,
        pub duration_ms: i64,
        pub steps: Option<i64>,
        pub tool_calls: Option<i64>,
    }

    impl From<StoredEvent> for crate::StoredEvent {
        fn from(v: StoredEvent) -> Self {
            crate::StoredEvent {
                ingested_at_us: v.ingested_at_us,
                event: v.event.into(),
            }
        }
    }

    impl From<Event> for crate::Event {
        fn from(v: Event) -> Self {
            crate::Event {
                tenant: v.tenant,
                id: v.id,
                time_us: v.time_us,
                subject: v.subject,
                source: v.source,
                dimensions: v.dimensions,
                data: match v.data {
                    EventData::LlmUsage(d) => crate::EventData::LlmUsage(crate::LlmUsage {
                        provider: d.provider,
                        model: d.model,
                        input_tokens: d.input_tokens,
                        output_tokens: d.output_tokens,
                        cached_input_tokens: d.cached_input_tokens,
                        cache_write_input_tokens: None,
                        reasoning_tokens: d.reasoning_tokens,
                        latency_ms: d.latency_ms,
                        status: d.status,
                        run_id: d.run_id,
                    }),
                    EventData::ApiRequest(d) => crate::EventData::ApiRequest(crate::ApiRequest {
                        route: d.route,
                        method: d.method,
                        status_code: d.status_code,
                        latency_ms: d.latency_ms,
                        request_bytes: d.request_bytes,
                        response_bytes: d.response_bytes,
                    }),
                    EventData::AgentRun(d) => crate::EventData::AgentRun(crate::AgentRun {
                        agent: d.agent,
                        run_id: d.run_id,
                        parent_run_id: d.parent_run_id,
                        status: d.status,
                        duration_ms: d.duration_ms,
                        steps: d.steps,
                        tool_calls: d.tool_calls,
                    }),
                },
            }
        }
    }
}

/// The tags of fields added to events after the first layout, in the content hash. Each is
/// appended after the first layout's bytes, tag then value, only when the field is present, so
/// an event without it hashes exactly as before the field existed. Never renumber or reuse a
/// tag; a new field takes the next one.
const TAG_CACHE_WRITE_INPUT_TOKENS: u8 = 1;

/// Appends the fields added since the first layout to the content hash's input (see the tags
/// above). The first layout's encoding is self-delimiting, so what follows it cannot be
/// mistaken for part of it.
pub(crate) fn append_later_fields(e: &Event, out: &mut Vec<u8>) {
    if let EventData::LlmUsage(d) = &e.data
        && let Some(n) = d.cache_write_input_tokens
    {
        out.push(TAG_CACHE_WRITE_INPUT_TOKENS);
        let mut buf = [0u8; 10];
        // An i64 takes at most ten bytes as a postcard varint: encoding into the buffer cannot fail.
        let encoded = postcard::to_slice(&n, &mut buf).expect("an i64 fits ten bytes");
        out.extend_from_slice(encoded);
    }
}

/// The v1 layout over a borrowed current event: what the content hash is computed over, without
/// copying the event. Serializes to the same bytes as [`v1::Event`] (a test checks it).
#[derive(Serialize)]
pub(crate) struct HashV1<'a> {
    tenant: &'a str,
    id: &'a str,
    time_us: i64,
    subject: Option<&'a str>,
    source: Option<&'a str>,
    dimensions: &'a BTreeMap<String, String>,
    data: DataV1<'a>,
}

#[derive(Serialize)]
enum DataV1<'a> {
    LlmUsage {
        provider: &'a str,
        model: &'a str,
        input_tokens: i64,
        output_tokens: i64,
        cached_input_tokens: Option<i64>,
        reasoning_tokens: Option<i64>,
        latency_ms: Option<i64>,
        status: Option<&'a str>,
        run_id: Option<&'a str>,
    },
    ApiRequest {
        route: Option<&'a str>,
        method: Option<&'a str>,
        status_code: i64,
        latency_ms: i64,
        request_bytes: Option<i64>,
        response_bytes: Option<i64>,
    },
    AgentRun {
        agent: Option<&'a str>,
        run_id: &'a str,
        parent_run_id: Option<&'a str>,
        status: Option<&'a str>,
        duration_ms: i64,
        steps: Option<i64>,
        tool_calls: Option<i64>,
    },
}

impl<'a> HashV1<'a> {
    pub(crate) fn of(e: &'a Event) -> Self {
        HashV1 {
            tenant: &e.tenant,
            id: &e.id,
            time_us: e.time_us,
            subject: e.subject.as_deref(),
            source: e.source.as_deref(),
            dimensions: &e.dimensions,
            data: match &e.data {
                EventData::LlmUsage(d) => DataV1::LlmUsage {
                    provider: &d.provider,
                    model: &d.model,
                    input_tokens: d.input_tokens,
                    output_tokens: d.output_tokens,
                    cached_input_tokens: d.cached_input_tokens,
                    reasoning_tokens: d.reasoning_tokens,
                    latency_ms: d.latency_ms,
                    status: d.status.as_deref(),
                    run_id: d.run_id.as_deref(),
                },
                EventData::ApiRequest(d) => DataV1::ApiRequest {
                    route: d.route.as_deref(),
                    method: d.method.as_deref(),
                    status_code: d.status_code,
                    latency_ms: d.latency_ms,
                    request_bytes: d.request_bytes,
                    response_bytes: d.response_bytes,
                },
                EventData::AgentRun(d) => DataV1::AgentRun {
                    agent: d.agent.as_deref(),
                    run_id: &d.run_id,
                    parent_run_id: d.parent_run_id.as_deref(),
                    status: d.status.as_deref(),
                    duration_ms: d.duration_ms,
                    steps: d.steps,
                    tool_calls: d.tool_calls,
                },
            },
        }
    }
}
