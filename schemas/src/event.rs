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
    /// Input tokens read from the provider's prompt cache (billed at the cached price).
    pub cached_input_tokens: Option<i64>,
    /// Input tokens written to the provider's prompt cache (billed at the cache-write price).
    pub cache_write_input_tokens: Option<i64>,
    /// The informational part of `output_tokens` spent on reasoning.
    pub reasoning_tokens: Option<i64>,
    pub latency_ms: Option<i64>,
    /// `ok` or `error`.
    pub status: Option<String>,
    pub run_id: Option<String>,
}

impl LlmUsage {
    /// The priced token counts: input, output, cached input, cache-write input (a count left
    /// out is 0; validation keeps them at 0 or more).
    pub fn priced_tokens(&self) -> [u64; 4] {
        [
            Some(self.input_tokens),
            Some(self.output_tokens),
            self.cached_input_tokens,
            self.cache_write_input_tokens,
        ]
        .map(|n| n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
    }
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

    /// A 128-bit hash of the event's full content, the same in every version of meterd: the
    /// dedup index keeps it to tell a re-sent duplicate from a conflict, across upgrades.
    /// Equal content gives an equal hash.
    ///
    /// It is computed over a canonical encoding that does not follow this struct's layout:
    /// the fields of the first layout, encoded as postcard encoded them
    /// ([`crate::frozen::v1`]). A field added to the event later is appended here only when
    /// present, as its tag and its value (there are none yet), so an event without it hashes
    /// as it always did.
    pub fn content_hash(&self) -> u128 {
        // Encoding cannot fail: every field is a plain value or an ordered map.
        let mut bytes =
            postcard::to_allocvec(&crate::frozen::HashV1::of(self)).expect("events always encode");
        crate::frozen::append_later_fields(self, &mut bytes);
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

    /// Pins the canonical encoding: a hash computed by the first version of meterd. If this
    /// fails, every event stored before the change would be a conflict when re-sent.
    #[test]
    fn content_hash_is_the_first_versions() {
        assert_eq!(
            sample().content_hash(),
            0x80e2_7b24_4dc7_e2be_864f_67ad_c2d2_921f,
            "{:#x}",
            sample().content_hash()
        );
    }

    /// A field added after the first layout changes the hash only when it is present: the same
    /// event without it hashes as it always did, with it as something else.
    #[test]
    fn later_fields_hash_only_when_present() {
        let llm = |cache_write| Event {
            data: EventData::LlmUsage(LlmUsage {
                provider: "anthropic".into(),
                model: "claude".into(),
                input_tokens: 10,
                output_tokens: 20,
                cached_input_tokens: Some(3),
                cache_write_input_tokens: cache_write,
                reasoning_tokens: None,
                latency_ms: None,
                status: None,
                run_id: None,
            }),
            ..sample()
        };
        let without = llm(None);
        let first_layout =
            postcard::to_allocvec(&crate::frozen::HashV1::of(&without)).expect("view");
        assert_eq!(
            without.content_hash(),
            xxhash_rust::xxh3::xxh3_128(&first_layout)
        );
        assert_ne!(llm(Some(0)).content_hash(), without.content_hash());
        assert_ne!(llm(Some(0)).content_hash(), llm(Some(1)).content_hash());
    }

    /// The borrowed view the hash is computed over encodes exactly as the frozen owned layout,
    /// for an event of each type and with every optional field both set and unset.
    #[test]
    fn the_hash_view_encodes_as_the_frozen_layout() {
        let mut events = vec![sample()];
        let mut full = sample();
        full.subject = Some("user".into());
        full.data = EventData::LlmUsage(LlmUsage {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            input_tokens: 10,
            output_tokens: 20,
            cached_input_tokens: Some(3),
            cache_write_input_tokens: None,
            reasoning_tokens: Some(1),
            latency_ms: Some(99),
            status: Some("ok".into()),
            run_id: Some("r".into()),
        });
        events.push(full.clone());
        full.data = EventData::AgentRun(AgentRun {
            agent: Some("a".into()),
            run_id: "r".into(),
            parent_run_id: None,
            status: Some("failed".into()),
            duration_ms: 5,
            steps: None,
            tool_calls: Some(2),
        });
        events.push(full);
        for event in events {
            let view = postcard::to_allocvec(&crate::frozen::HashV1::of(&event)).expect("view");
            let frozen = crate::frozen::v1::Event {
                tenant: event.tenant.clone(),
                id: event.id.clone(),
                time_us: event.time_us,
                subject: event.subject.clone(),
                source: event.source.clone(),
                dimensions: event.dimensions.clone(),
                data: match event.data.clone() {
                    EventData::LlmUsage(d) => {
                        crate::frozen::v1::EventData::LlmUsage(crate::frozen::v1::LlmUsage {
                            provider: d.provider,
                            model: d.model,
                            input_tokens: d.input_tokens,
                            output_tokens: d.output_tokens,
                            cached_input_tokens: d.cached_input_tokens,
                            reasoning_tokens: d.reasoning_tokens,
                            latency_ms: d.latency_ms,
                            status: d.status,
                            run_id: d.run_id,
                        })
                    }
                    EventData::ApiRequest(d) => {
                        crate::frozen::v1::EventData::ApiRequest(crate::frozen::v1::ApiRequest {
                            route: d.route,
                            method: d.method,
                            status_code: d.status_code,
                            latency_ms: d.latency_ms,
                            request_bytes: d.request_bytes,
                            response_bytes: d.response_bytes,
                        })
                    }
                    EventData::AgentRun(d) => {
                        crate::frozen::v1::EventData::AgentRun(crate::frozen::v1::AgentRun {
                            agent: d.agent,
                            run_id: d.run_id,
                            parent_run_id: d.parent_run_id,
                            status: d.status,
                            duration_ms: d.duration_ms,
                            steps: d.steps,
                            tool_calls: d.tool_calls,
                        })
                    }
                },
            };
            let owned = postcard::to_allocvec(&frozen).expect("frozen");
            assert_eq!(view, owned);
            let back: Event = postcard::from_bytes::<crate::frozen::v1::Event>(&owned)
                .expect("decodes")
                .into();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn type_names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("llm"), None);
    }
}
