//! The type-specific columns of an event, flattened the same way for every store.

use meterd_schemas::EventData;

/// The type-specific columns of one event; absent ones are NULL.
#[derive(Debug, Default)]
pub(crate) struct Payload<'a> {
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cached_input_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
    pub route: Option<&'a str>,
    pub method: Option<&'a str>,
    pub status_code: Option<i64>,
    pub request_bytes: Option<i64>,
    pub response_bytes: Option<i64>,
    pub agent: Option<&'a str>,
    pub run_id: Option<&'a str>,
    pub parent_run_id: Option<&'a str>,
    pub status: Option<&'a str>,
    pub latency_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub steps: Option<i64>,
    pub tool_calls: Option<i64>,
}

pub(crate) fn payload(data: &EventData) -> Payload<'_> {
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
