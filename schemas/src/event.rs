//! The validated v1 usage event.
//!
//! An [`Event`] only exists after validation: every field is within its bounds, `time` is UTC
//! microseconds, and `dimensions` is ordered, so two events with the same content encode to the
//! same bytes and therefore hash to the same [`Event::content_hash`]. That hash is what tells a
//! duplicate (same `(tenant, id)`, same content) from a conflict (same key, other content).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The three kinds of usage meterd meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// One call to a language model.
    LlmUsage,
    /// One request served by an API.
    ApiRequest,
    /// One run of an AI agent (possibly a child of another run).
    AgentRun,
}

impl EventType {
    /// Every type, in the order of the design document.
    pub const ALL: [EventType; 3] = [
        EventType::LlmUsage,
        EventType::ApiRequest,
        EventType::AgentRun,
    ];

    /// The wire name (`llm.usage`, `api.request`, `agent.run`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::LlmUsage => "llm.usage",
            EventType::ApiRequest => "api.request",
            EventType::AgentRun => "agent.run",
        }
    }

    /// Parses a wire name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A validated usage event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The tenant the usage belongs to.
    pub tenant: String,
    /// The idempotency key; `(tenant, id)` identifies the event forever.
    pub id: String,
    /// When the usage happened, microseconds since the Unix epoch, UTC.
    pub time_us: i64,
    /// Who caused the usage (a user, an API key, a workspace).
    pub subject: Option<String>,
    /// Which service reported it.
    pub source: Option<String>,
    /// Free-form grouping keys, ordered so encoding is canonical.
    pub dimensions: BTreeMap<String, String>,
    /// The type-specific payload.
    pub data: EventData,
}

/// The type-specific part of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventData {
    /// `llm.usage`
    LlmUsage(LlmUsage),
    /// `api.request`
    ApiRequest(ApiRequest),
    /// `agent.run`
    AgentRun(AgentRun),
}

/// Payload of an `llm.usage` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmUsage {
    pub provider: String,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
    pub latency_ms: Option<i64>,
    /// `ok` or `error`.
    pub status: Option<String>,
    pub run_id: Option<String>,
}

/// Payload of an `api.request` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiRequest {
    /// The route template (`/v1/chat`), never the raw path.
    pub route: Option<String>,
    pub method: Option<String>,
    pub status_code: i64,
    pub latency_ms: i64,
    pub request_bytes: Option<i64>,
    pub response_bytes: Option<i64>,
}

/// Payload of an `agent.run` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRun {
    pub agent: Option<String>,
    pub run_id: String,
    pub parent_run_id: Option<String>,
    /// `succeeded`, `failed`, `cancelled` or `timeout`.
    pub status: Option<String>,
    pub duration_ms: i64,
    pub steps: Option<i64>,
    pub tool_calls: Option<i64>,
}

impl EventData {
    /// The event type this payload belongs to.
    pub fn event_type(&self) -> EventType {
        match self {
            EventData::LlmUsage(_) => EventType::LlmUsage,
            EventData::ApiRequest(_) => EventType::ApiRequest,
            EventData::AgentRun(_) => EventType::AgentRun,
        }
    }
}

impl Event {
    /// The event type.
    pub fn event_type(&self) -> EventType {
        self.data.event_type()
    }

    /// A 128-bit hash of the event's full content, stable across processes and versions of
    /// meterd that keep this struct's layout. Equal content gives an equal hash.
    pub fn content_hash(&self) -> u128 {
        // postcard over a struct with only ordered collections is canonical. Encoding into a
        // Vec cannot fail for these types: every field is a plain value or an ordered map.
        let bytes = postcard::to_allocvec(self).expect("events always encode");
        xxhash_rust::xxh3::xxh3_128(&bytes)
    }
}

/// An accepted event as the durable log keeps it: the event plus when meterd accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// When the batch holding this event was accepted, microseconds since the epoch, UTC.
    pub ingested_at_us: i64,
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event {
            tenant: "acme".into(),
            id: "e1".into(),
            time_us: 1_700_000_000_000_000,
            subject: None,
            source: Some("bot".into()),
            dimensions: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
            data: EventData::ApiRequest(ApiRequest {
                route: Some("/v1/chat".into()),
                method: Some("POST".into()),
                status_code: 200,
                latency_ms: 12,
                request_bytes: None,
                response_bytes: None,
            }),
        }
    }

    #[test]
    fn content_hash_follows_content() {
        let a = sample();
        let mut b = sample();
        assert_eq!(a.content_hash(), b.content_hash());
        b.source = Some("other".into());
        assert_ne!(a.content_hash(), b.content_hash());
    }

    #[test]
    fn type_names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("llm"), None);
    }
}
