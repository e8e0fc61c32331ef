//! Turns one decoded JSON object into an [`Event`], or into the list of everything wrong with it.
//!
//! Every rejection is a [`FieldError`] naming the field by its JSON path (`data.input_tokens`) and
//! saying why, so a producer can fix its payload without reading meterd's source. Validation
//! collects all problems of an event rather than stopping at the first.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::event::{AgentRun, ApiRequest, Event, EventData, EventType, LlmUsage};

/// Length bounds, in bytes, of the string fields.
pub mod bounds {
    pub const ID_MAX: usize = 128;
    pub const TENANT_MAX: usize = 128;
    pub const SUBJECT_MAX: usize = 256;
    pub const SOURCE_MAX: usize = 256;
    pub const DIMENSIONS_MAX_KEYS: usize = 16;
    pub const DIMENSION_KEY_MAX: usize = 64;
    pub const DIMENSION_VALUE_MAX: usize = 256;
    pub const NAME_MAX: usize = 128;
    pub const ROUTE_MAX: usize = 256;
    pub const METHOD_MAX: usize = 16;
}

/// One reason an event was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// JSON path of the offending field, e.g. `data.input_tokens`; empty for the event itself.
    pub field: String,
    /// What is wrong, in words a producer can act on.
    pub reason: String,
}

impl FieldError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Time bounds on accepted events.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How far past "now" an event's time may be.
    pub max_future_skew: chrono::Duration,
    /// How far before "now" an event's time may be (the accepted history).
    pub max_age: chrono::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_future_skew: chrono::Duration::minutes(5),
            max_age: chrono::Duration::days(400),
        }
    }
}

/// What validation needs to know besides the event.
#[derive(Debug, Clone, Copy)]
pub struct ValidationContext<'a> {
    /// "Now", from the caller's clock.
    pub now: DateTime<Utc>,
    pub limits: Limits,
    /// The tenant the API key is bound to: fills an absent `tenant`, and a different one is
    /// rejected.
    pub bound_tenant: Option<&'a str>,
}

/// Validates a native (v1) event object.
pub fn validate_event(
    value: &Value,
    ctx: &ValidationContext<'_>,
) -> Result<Event, Vec<FieldError>> {
    let Some(obj) = value.as_object() else {
        return Err(vec![FieldError::new(
            "",
            format!("expected a JSON object, got {}", kind(value)),
        )]);
    };
    let mut v = Validator::default();
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "id" | "tenant" | "type" | "time" | "subject" | "source" | "dimensions" | "data"
        ) {
            v.err(key.as_str(), "unknown field");
        }
    }
    let fields = EnvelopeFields {
        id: obj.get("id"),
        tenant: obj.get("tenant"),
        event_type: obj.get("type"),
        time: obj.get("time"),
        subject: obj.get("subject"),
        source: obj.get("source"),
        dimensions: obj.get("dimensions"),
        data: obj.get("data"),
        source_required: false,
        time_defaults_to_now: false,
    };
    v.envelope(fields, ctx)
}

/// The envelope attributes, however the wire format spelled them (native or CloudEvents).
#[derive(Debug, Clone, Copy)]
pub(crate) struct EnvelopeFields<'a> {
    pub id: Option<&'a Value>,
    pub tenant: Option<&'a Value>,
    pub event_type: Option<&'a Value>,
    pub time: Option<&'a Value>,
    pub subject: Option<&'a Value>,
    pub source: Option<&'a Value>,
    pub dimensions: Option<&'a Value>,
    pub data: Option<&'a Value>,
    pub source_required: bool,
    /// CloudEvents make `time` optional: an event without it happened when it was received.
    pub time_defaults_to_now: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Validator {
    pub errors: Vec<FieldError>,
}

impl Validator {
    pub(crate) fn err(&mut self, field: &str, reason: impl Into<String>) {
        self.errors.push(FieldError::new(field, reason));
    }

    pub(crate) fn envelope(
        mut self,
        f: EnvelopeFields<'_>,
        ctx: &ValidationContext<'_>,
    ) -> Result<Event, Vec<FieldError>> {
        let id = self.required_str(f.id, "id", 1, bounds::ID_MAX);
        let tenant = match (f.tenant, ctx.bound_tenant) {
            (None | Some(Value::Null), Some(bound)) => Some(bound.to_owned()),
            (t, bound) => {
                let t = self.required_str(t, "tenant", 1, bounds::TENANT_MAX);
                if let Some(t) = &t {
                    if let Some(c) = t.chars().find(|c| c.is_control()) {
                        self.err(
                            "tenant",
                            format!(
                                "control character {c:?} not allowed; any other UTF-8 text of 1 to {} bytes is a tenant",
                                bounds::TENANT_MAX
                            ),
                        );
                    }
                    if let Some(bound) = bound
                        && t != bound
                    {
                        self.err(
                            "tenant",
                            format!("the API key is bound to tenant {bound:?}"),
                        );
                    }
                }
                t
            }
        };
        let event_type = match f.event_type {
            None | Some(Value::Null) => {
                self.err("type", "required");
                None
            }
            Some(Value::String(s)) => match EventType::parse(s) {
                Some(t) => Some(t),
                None => {
                    self.err(
                        "type",
                        format!(
                            "unknown type {:?}; expected llm.usage, api.request or agent.run",
                            truncate(s)
                        ),
                    );
                    None
                }
            },
            Some(other) => {
                self.err("type", format!("expected a string, got {}", kind(other)));
                None
            }
        };
        let time_us = match f.time {
            None | Some(Value::Null) if f.time_defaults_to_now => Some(ctx.now.timestamp_micros()),
            time => self.time(time, ctx),
        };
        let subject = self.optional_str(f.subject, "subject", 1, bounds::SUBJECT_MAX);
        let source = if f.source_required {
            self.required_str(f.source, "source", 1, bounds::SOURCE_MAX)
        } else {
            self.optional_str(f.source, "source", 1, bounds::SOURCE_MAX)
        };
        let dimensions = self.dimensions(f.dimensions);
        let data = match (event_type, f.data) {
            (_, None | Some(Value::Null)) => {
                self.err("data", "required");
                None
            }
            (Some(t), Some(Value::Object(data))) => self.data(t, data),
            (None, Some(Value::Object(_))) => None,
            (_, Some(other)) => {
                self.err("data", format!("expected an object, got {}", kind(other)));
                None
            }
        };
        match (id, tenant, time_us, data) {
            (Some(id), Some(tenant), Some(time_us), Some(data)) if self.errors.is_empty() => {
                Ok(Event {
                    tenant,
                    id,
                    time_us,
                    subject,
                    source,
                    dimensions,
                    data,
                })
            }
            _ => Err(self.errors),
        }
    }

    fn time(&mut self, v: Option<&Value>, ctx: &ValidationContext<'_>) -> Option<i64> {
        let s = match v {
            None | Some(Value::Null) => {
                self.err("time", "required");
                return None;
            }
            Some(Value::String(s)) => s,
            Some(other) => {
                self.err(
                    "time",
                    format!("expected an RFC 3339 string, got {}", kind(other)),
                );
                return None;
            }
        };
        let parsed = match DateTime::parse_from_rfc3339(s) {
            Ok(t) => t.with_timezone(&Utc),
            Err(e) => {
                self.err(
                    "time",
                    format!("not an RFC 3339 timestamp with offset ({e})"),
                );
                return None;
            }
        };
        if parsed > ctx.now + ctx.limits.max_future_skew {
            self.err(
                "time",
                format!(
                    "{} is more than {}s in the future",
                    parsed.to_rfc3339(),
                    ctx.limits.max_future_skew.num_seconds()
                ),
            );
            return None;
        }
        if parsed < ctx.now - ctx.limits.max_age {
            self.err(
                "time",
                format!(
                    "{} is older than the accepted history of {} days",
                    parsed.to_rfc3339(),
                    ctx.limits.max_age.num_days()
                ),
            );
            return None;
        }
        match parsed.timestamp_micros() {
            t if t != i64::MIN => Some(t),
            _ => {
                self.err("time", "out of range");
                None
            }
        }
    }

    fn dimensions(&mut self, v: Option<&Value>) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let map = match v {
            None | Some(Value::Null) => return out,
            Some(Value::Object(m)) => m,
            Some(other) => {
                self.err(
                    "dimensions",
                    format!("expected an object of strings, got {}", kind(other)),
                );
                return out;
            }
        };
        if map.len() > bounds::DIMENSIONS_MAX_KEYS {
            self.err(
                "dimensions",
                format!(
                    "{} keys; at most {} allowed",
                    map.len(),
                    bounds::DIMENSIONS_MAX_KEYS
                ),
            );
            return out;
        }
        for (k, val) in map {
            let field = format!("dimensions.{}", truncate(k));
            if k.is_empty() || k.len() > bounds::DIMENSION_KEY_MAX {
                self.err(
                    &field,
                    format!("key must be 1 to {} bytes", bounds::DIMENSION_KEY_MAX),
                );
                continue;
            }
            if k.contains('\0') {
                self.err(&field, format!("key {NUL_REASON}"));
                continue;
            }
            match val {
                Value::String(s) if s.contains('\0') => self.err(&field, NUL_REASON),
                Value::String(s) if s.len() <= bounds::DIMENSION_VALUE_MAX => {
                    out.insert(k.clone(), s.clone());
                }
                Value::String(s) => self.err(
                    &field,
                    format!(
                        "{} bytes; at most {} allowed",
                        s.len(),
                        bounds::DIMENSION_VALUE_MAX
                    ),
                ),
                other => self.err(&field, format!("expected a string, got {}", kind(other))),
            }
        }
        out
    }

    fn data(&mut self, t: EventType, data: &Map<String, Value>) -> Option<EventData> {
        // The `data` keys each type carries, from the column table.
        static ALLOWED: LazyLock<[Vec<&'static str>; 3]> =
            LazyLock::new(|| EventType::ALL.map(|t| crate::columns::data_keys(t).collect()));
        let allowed: &[&str] = EventType::ALL
            .iter()
            .position(|x| *x == t)
            .and_then(|i| ALLOWED.get(i))
            .map_or(&[], Vec::as_slice);
        for key in data.keys() {
            if !allowed.contains(&key.as_str()) {
                self.err(
                    &format!("data.{}", truncate(key)),
                    format!("unknown field for {}", t.as_str()),
                );
            }
        }
        let d = |k: &str| data.get(k);
        match t {
            EventType::LlmUsage => {
                let provider =
                    self.required_str(d("provider"), "data.provider", 1, bounds::NAME_MAX);
                let model = self.required_str(d("model"), "data.model", 1, bounds::NAME_MAX);
                let input_tokens = self.required_count(d("input_tokens"), "data.input_tokens");
                let output_tokens = self.required_count(d("output_tokens"), "data.output_tokens");
                let cached_input_tokens =
                    self.optional_count(d("cached_input_tokens"), "data.cached_input_tokens");
                let cache_write_input_tokens = self.optional_count(
                    d("cache_write_input_tokens"),
                    "data.cache_write_input_tokens",
                );
                let reasoning_tokens =
                    self.optional_count(d("reasoning_tokens"), "data.reasoning_tokens");
                let latency_ms = self.optional_count(d("latency_ms"), "data.latency_ms");
                let status = self.optional_enum(d("status"), "data.status", &["ok", "error"]);
                let run_id = self.optional_str(d("run_id"), "data.run_id", 1, bounds::ID_MAX);
                Some(EventData::LlmUsage(LlmUsage {
                    provider: provider?,
                    model: model?,
                    input_tokens: input_tokens?,
                    output_tokens: output_tokens?,
                    cached_input_tokens,
                    cache_write_input_tokens,
                    reasoning_tokens,
                    latency_ms,
                    status,
                    run_id,
                }))
            }
            EventType::ApiRequest => {
                let route = self.optional_str(d("route"), "data.route", 1, bounds::ROUTE_MAX);
                let method = self.optional_str(d("method"), "data.method", 1, bounds::METHOD_MAX);
                if let Some(m) = &method
                    && !m.bytes().all(|b| b.is_ascii_uppercase())
                {
                    self.err(
                        "data.method",
                        "expected an upper-case HTTP method such as GET or POST",
                    );
                }
                let status_code = self.required_count(d("status_code"), "data.status_code");
                if let Some(code) = status_code
                    && !(100..=599).contains(&code)
                {
                    self.err(
                        "data.status_code",
                        format!("{code} is not an HTTP status (100 to 599)"),
                    );
                }
                let latency_ms = self.required_count(d("latency_ms"), "data.latency_ms");
                let request_bytes = self.optional_count(d("request_bytes"), "data.request_bytes");
                let response_bytes =
                    self.optional_count(d("response_bytes"), "data.response_bytes");
                Some(EventData::ApiRequest(ApiRequest {
                    route,
                    method,
                    status_code: status_code?,
                    latency_ms: latency_ms?,
                    request_bytes,
                    response_bytes,
                }))
            }
            EventType::AgentRun => {
                let agent = self.optional_str(d("agent"), "data.agent", 1, bounds::NAME_MAX);
                let run_id = self.required_str(d("run_id"), "data.run_id", 1, bounds::ID_MAX);
                let parent_run_id =
                    self.optional_str(d("parent_run_id"), "data.parent_run_id", 1, bounds::ID_MAX);
                let status = self.optional_enum(
                    d("status"),
                    "data.status",
                    &["succeeded", "failed", "cancelled", "timeout"],
                );
                let duration_ms = self.required_count(d("duration_ms"), "data.duration_ms");
                let steps = self.optional_count(d("steps"), "data.steps");
                let tool_calls = self.optional_count(d("tool_calls"), "data.tool_calls");
                Some(EventData::AgentRun(AgentRun {
                    agent,
                    run_id: run_id?,
                    parent_run_id,
                    status,
                    duration_ms: duration_ms?,
                    steps,
                    tool_calls,
                }))
            }
        }
    }

    fn required_str(
        &mut self,
        v: Option<&Value>,
        field: &str,
        min: usize,
        max: usize,
    ) -> Option<String> {
        match v {
            None | Some(Value::Null) => {
                self.err(field, "required");
                None
            }
            some => self.optional_str(some, field, min, max),
        }
    }

    fn optional_str(
        &mut self,
        v: Option<&Value>,
        field: &str,
        min: usize,
        max: usize,
    ) -> Option<String> {
        match v {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() < min => {
                self.err(field, "must not be empty");
                None
            }
            Some(Value::String(s)) if s.len() > max => {
                self.err(field, format!("{} bytes; at most {max} allowed", s.len()));
                None
            }
            Some(Value::String(s)) if s.contains('\0') => {
                self.err(field, NUL_REASON);
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.err(field, format!("expected a string, got {}", kind(other)));
                None
            }
        }
    }

    fn optional_enum(
        &mut self,
        v: Option<&Value>,
        field: &str,
        allowed: &[&str],
    ) -> Option<String> {
        let s = self.optional_str(v, field, 1, bounds::NAME_MAX)?;
        if allowed.contains(&s.as_str()) {
            Some(s)
        } else {
            self.err(
                field,
                format!("{:?} is not one of {}", truncate(&s), allowed.join(", ")),
            );
            None
        }
    }

    fn required_count(&mut self, v: Option<&Value>, field: &str) -> Option<i64> {
        match v {
            None | Some(Value::Null) => {
                self.err(field, "required");
                None
            }
            some => self.optional_count(some, field),
        }
    }

    /// A non-negative integer that fits a signed 64-bit column in every store.
    fn optional_count(&mut self, v: Option<&Value>, field: &str) -> Option<i64> {
        let n = match v {
            None | Some(Value::Null) => return None,
            Some(Value::Number(n)) => n,
            Some(Value::String(_)) => {
                self.err(
                    field,
                    "expected an integer, got a string (send numbers unquoted)",
                );
                return None;
            }
            Some(other) => {
                self.err(field, format!("expected an integer, got {}", kind(other)));
                return None;
            }
        };
        if let Some(i) = n.as_i64() {
            if i < 0 {
                self.err(field, format!("{i} is negative; must be >= 0"));
                return None;
            }
            return Some(i);
        }
        if n.as_u64().is_some() {
            self.err(field, format!("{n} is out of range; at most {}", i64::MAX));
            return None;
        }
        match n.as_f64() {
            // JSON Schema, and many encoders, count `1200.0` as the integer 1200. Up to 2^53
            // every integer is exactly a double, so the value is the one that was meant.
            Some(f) if f.fract() == 0.0 && f.abs() <= MAX_EXACT_FLOAT => {
                if f < 0.0 {
                    self.err(field, format!("{n} is negative; must be >= 0"));
                    return None;
                }
                // In range and integral: the cast is exact.
                return Some(f as i64);
            }
            Some(f) if f.fract() == 0.0 && f.abs() >= i64::MAX as f64 => {
                self.err(field, format!("{n} is out of range; at most {}", i64::MAX));
            }
            Some(f) if f.fract() == 0.0 => self.err(
                field,
                format!("{n} is written as a decimal number past 2^53, where decimals are not exact; write it as an integer"),
            ),
            _ => self.err(field, format!("{n} is not an integer")),
        }
        None
    }
}

/// The largest magnitude up to which every integer is exactly an `f64` (2^53).
const MAX_EXACT_FLOAT: f64 = 9_007_199_254_740_992.0;

/// Why a string with a NUL character is refused: PostgreSQL cannot store it in `text` or
/// `jsonb`, so one such event would stop delivery to it.
const NUL_REASON: &str = "must not contain the NUL character (\\u0000)";

/// A JSON value's kind, for error messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Echoing a producer's 1 MiB string back in an error helps nobody.
pub(crate) fn truncate(s: &str) -> &str {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0)
            .single()
            .expect("valid date")
    }

    fn ctx() -> ValidationContext<'static> {
        ValidationContext {
            now: now(),
            limits: Limits::default(),
            bound_tenant: None,
        }
    }

    fn llm() -> Value {
        json!({
            "id": "run-42-step-3", "tenant": "acme", "type": "llm.usage",
            "time": "2026-11-21T10:00:00.123Z", "subject": "user-17", "source": "support-bot",
            "dimensions": {"department": "customer_service", "agent": "faq"},
            "data": {"provider": "openai", "model": "gpt-4o", "input_tokens": 1200,
                     "output_tokens": 300, "cached_input_tokens": 0, "reasoning_tokens": 0,
                     "latency_ms": 830, "status": "ok", "run_id": "run-42"}
        })
    }

    fn api() -> Value {
        json!({"id": "r1", "tenant": "acme", "type": "api.request", "time": "2026-11-21T10:00:00Z",
               "data": {"route": "/v1/chat", "method": "POST", "status_code": 200, "latency_ms": 41,
                        "request_bytes": 100, "response_bytes": 2000}})
    }

    fn agent() -> Value {
        json!({"id": "a1", "tenant": "acme", "type": "agent.run", "time": "2026-11-21T10:00:00+02:00",
               "data": {"agent": "faq", "run_id": "run-42", "parent_run_id": "run-41",
                        "status": "succeeded", "duration_ms": 5000, "steps": 4, "tool_calls": 2}})
    }

    /// Applies `patch` (a JSON pointer and a value; `None` removes) and returns the errors.
    fn errors_after(base: Value, pointer: &str, value: Option<Value>) -> Vec<FieldError> {
        let mut v = base;
        let (parent, key) = pointer.rsplit_once('/').expect("pointer has a slash");
        let target = v
            .pointer_mut(parent)
            .expect("parent exists")
            .as_object_mut()
            .expect("object");
        match value {
            Some(x) => {
                target.insert(key.to_owned(), x);
            }
            None => {
                target.remove(key);
            }
        }
        validate_event(&v, &ctx()).expect_err("must be rejected")
    }

    fn assert_rejects(
        base: Value,
        pointer: &str,
        value: Option<Value>,
        field: &str,
        reason_part: &str,
    ) {
        let errs = errors_after(base, pointer, value.clone());
        assert!(
            errs.iter()
                .any(|e| e.field == field && e.reason.contains(reason_part)),
            "{pointer} = {value:?}: expected {field}: ..{reason_part}.., got {errs:?}"
        );
    }

    #[test]
    fn accepts_the_three_types() {
        let e = validate_event(&llm(), &ctx()).expect("valid");
        assert_eq!(e.event_type(), EventType::LlmUsage);
        assert_eq!(e.time_us, 1_795_255_200_123_000);
        assert_eq!(e.dimensions.len(), 2);
        validate_event(&api(), &ctx()).expect("valid api.request");
        let a = validate_event(&agent(), &ctx()).expect("valid agent.run");
        // +02:00 is stored in UTC.
        assert_eq!(a.time_us, 1_795_255_200_000_000 - 2 * 3_600_000_000);
    }

    #[test]
    fn envelope_rules_name_the_field() {
        assert_rejects(llm(), "/id", None, "id", "required");
        assert_rejects(llm(), "/id", Some(json!("")), "id", "empty");
        assert_rejects(
            llm(),
            "/id",
            Some(json!("x".repeat(129))),
            "id",
            "129 bytes",
        );
        assert_rejects(llm(), "/id", Some(json!(42)), "id", "expected a string");
        validate_event(
            &{
                let mut v = llm();
                v["id"] = json!("x".repeat(128));
                v
            },
            &ctx(),
        )
        .expect("128-byte id is fine");
        assert_rejects(llm(), "/tenant", None, "tenant", "required");
        assert_rejects(
            llm(),
            "/tenant",
            Some(json!("a\nb")),
            "tenant",
            "control character '\\n' not allowed",
        );
        // (NUL has a reason of its own, as in every field.)
        for control in ["\t", "\r", "\u{7f}", "\u{85}", "\u{1b}[31m"] {
            assert_rejects(
                llm(),
                "/tenant",
                Some(json!(format!("acme{control}"))),
                "tenant",
                "control character",
            );
        }
        assert_rejects(
            llm(),
            "/tenant",
            Some(json!("é".repeat(65))),
            "tenant",
            "130 bytes; at most 128",
        );
        assert_rejects(llm(), "/type", None, "type", "required");
        assert_rejects(llm(), "/type", Some(json!("llm")), "type", "unknown type");
        assert_rejects(llm(), "/time", None, "time", "required");
        assert_rejects(
            llm(),
            "/time",
            Some(json!("2026-11-21 10:00")),
            "time",
            "RFC 3339",
        );
        assert_rejects(
            llm(),
            "/time",
            Some(json!("2026-11-21T10:00:00")),
            "time",
            "RFC 3339",
        );
        assert_rejects(
            llm(),
            "/time",
            Some(json!(1700000000)),
            "time",
            "expected an RFC 3339 string",
        );
        assert_rejects(
            llm(),
            "/time",
            Some(json!("2026-11-21T12:06:00Z")),
            "time",
            "future",
        );
        assert_rejects(
            llm(),
            "/time",
            Some(json!("2025-10-01T00:00:00Z")),
            "time",
            "older than",
        );
        assert_rejects(
            llm(),
            "/subject",
            Some(json!("s".repeat(1 << 20))),
            "subject",
            "at most 256",
        );
        assert_rejects(
            llm(),
            "/source",
            Some(json!(["x"])),
            "source",
            "expected a string",
        );
        assert_rejects(llm(), "/extra", Some(json!(1)), "extra", "unknown field");
        assert_rejects(llm(), "/data", None, "data", "required");
        assert_rejects(
            llm(),
            "/data",
            Some(json!("x")),
            "data",
            "expected an object",
        );
    }

    #[test]
    fn tenants_are_any_text_without_control_characters() {
        for tenant in [
            "acme",
            "user@example.com",
            "Acme Corp",
            "org/42",
            "café-ü",
            "O'Brien \"quoted\" \\ back; DROP TABLE events; --",
            "%_*?[]{}$`",
            "日本語のテナント",
            " leading and trailing spaces ",
            "é".repeat(64).as_str(),
        ] {
            let mut v = llm();
            v["tenant"] = json!(tenant);
            let e = validate_event(&v, &ctx()).unwrap_or_else(|e| panic!("{tenant:?}: {e:?}"));
            assert_eq!(e.tenant, tenant);
        }
    }

    #[test]
    fn time_within_skew_is_accepted() {
        let mut v = llm();
        v["time"] = json!("2026-11-21T12:04:59Z");
        validate_event(&v, &ctx()).expect("inside the 5 minute skew");
    }

    #[test]
    fn dimension_rules() {
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_rejects(
            llm(),
            "/dimensions",
            Some(Value::Object(many)),
            "dimensions",
            "17 keys",
        );
        let sixteen: Map<String, Value> = (0..16).map(|i| (format!("k{i}"), json!("v"))).collect();
        let mut ok = llm();
        ok["dimensions"] = Value::Object(sixteen);
        validate_event(&ok, &ctx()).expect("16 dimensions are fine");
        assert_rejects(
            llm(),
            "/dimensions/agent",
            Some(json!(3)),
            "dimensions.agent",
            "expected a string",
        );
        assert_rejects(
            llm(),
            "/dimensions/agent",
            Some(json!("v".repeat(257))),
            "dimensions.agent",
            "257 bytes",
        );
        assert_rejects(
            llm(),
            "/dimensions",
            Some(json!(["a"])),
            "dimensions",
            "expected an object",
        );
    }

    #[test]
    fn count_rules() {
        for field in ["input_tokens", "output_tokens"] {
            let path = format!("/data/{field}");
            let name = format!("data.{field}");
            assert_rejects(llm(), &path, None, &name, "required");
            assert_rejects(llm(), &path, Some(json!("12")), &name, "got a string");
            assert_rejects(llm(), &path, Some(json!(-1)), &name, "negative");
            assert_rejects(llm(), &path, Some(json!(1.5)), &name, "not an integer");
            assert_rejects(
                llm(),
                &path,
                Some(json!(9_223_372_036_854_775_808u64)),
                &name,
                "out of range",
            );
            assert_rejects(llm(), &path, Some(json!(1e30)), &name, "out of range");
            assert_rejects(
                llm(),
                &path,
                Some(json!(true)),
                &name,
                "expected an integer",
            );
        }
        for field in ["cached_input_tokens", "reasoning_tokens", "latency_ms"] {
            assert_rejects(
                llm(),
                &format!("/data/{field}"),
                Some(json!(-5)),
                &format!("data.{field}"),
                "negative",
            );
        }
        let mut max = llm();
        max["data"]["input_tokens"] = json!(i64::MAX);
        validate_event(&max, &ctx()).expect("i64::MAX fits");
        // An integral decimal is that integer, as JSON Schema counts it, up to 2^53.
        let mut float = llm();
        float["data"]["input_tokens"] = json!(1200.0);
        float["data"]["latency_ms"] = json!(9_007_199_254_740_992.0);
        let e = validate_event(&float, &ctx()).expect("integral decimals");
        match e.data {
            EventData::LlmUsage(u) => {
                assert_eq!(u.input_tokens, 1200);
                assert_eq!(u.latency_ms, Some(9_007_199_254_740_992));
            }
            other => panic!("{other:?}"),
        }
        assert_rejects(
            llm(),
            "/data/input_tokens",
            Some(json!(1e17)),
            "data.input_tokens",
            "write it as an integer",
        );
        assert_rejects(
            llm(),
            "/data/input_tokens",
            Some(json!(-3.0)),
            "data.input_tokens",
            "negative",
        );
    }

    #[test]
    fn nul_characters_are_refused_everywhere() {
        assert_rejects(llm(), "/subject", Some(json!("a\u{0}b")), "subject", "NUL");
        assert_rejects(
            llm(),
            "/data/model",
            Some(json!("gpt\u{0}")),
            "data.model",
            "NUL",
        );
        assert_rejects(
            llm(),
            "/dimensions/department",
            Some(json!("x\u{0}")),
            "dimensions.department",
            "NUL",
        );
        let mut key = llm();
        key["dimensions"] = json!({"a\u{0}": "x"});
        let errors = validate_event(&key, &ctx()).expect_err("NUL in a key");
        assert!(
            errors.iter().any(|e| e.reason.contains("NUL")),
            "{errors:?}"
        );
    }

    #[test]
    fn llm_rules() {
        assert_rejects(llm(), "/data/provider", None, "data.provider", "required");
        assert_rejects(llm(), "/data/model", None, "data.model", "required");
        assert_rejects(llm(), "/data/model", Some(json!("")), "data.model", "empty");
        assert_rejects(
            llm(),
            "/data/status",
            Some(json!("fine")),
            "data.status",
            "not one of ok, error",
        );
        assert_rejects(
            llm(),
            "/data/route",
            Some(json!("/x")),
            "data.route",
            "unknown field for llm.usage",
        );
        assert_rejects(
            llm(),
            "/data/run_id",
            Some(json!(7)),
            "data.run_id",
            "expected a string",
        );
    }

    #[test]
    fn api_rules() {
        assert_rejects(
            api(),
            "/data/status_code",
            None,
            "data.status_code",
            "required",
        );
        assert_rejects(
            api(),
            "/data/status_code",
            Some(json!(99)),
            "data.status_code",
            "not an HTTP status",
        );
        assert_rejects(
            api(),
            "/data/status_code",
            Some(json!(600)),
            "data.status_code",
            "not an HTTP status",
        );
        assert_rejects(
            api(),
            "/data/latency_ms",
            None,
            "data.latency_ms",
            "required",
        );
        assert_rejects(
            api(),
            "/data/method",
            Some(json!("post")),
            "data.method",
            "upper-case",
        );
        assert_rejects(
            api(),
            "/data/route",
            Some(json!("r".repeat(300))),
            "data.route",
            "at most 256",
        );
        assert_rejects(
            api(),
            "/data/request_bytes",
            Some(json!(-1)),
            "data.request_bytes",
            "negative",
        );
        assert_rejects(
            api(),
            "/data/model",
            Some(json!("x")),
            "data.model",
            "unknown field for api.request",
        );
    }

    #[test]
    fn agent_rules() {
        assert_rejects(agent(), "/data/run_id", None, "data.run_id", "required");
        assert_rejects(
            agent(),
            "/data/duration_ms",
            None,
            "data.duration_ms",
            "required",
        );
        assert_rejects(
            agent(),
            "/data/status",
            Some(json!("ok")),
            "data.status",
            "not one of succeeded",
        );
        assert_rejects(
            agent(),
            "/data/steps",
            Some(json!(-2)),
            "data.steps",
            "negative",
        );
        assert_rejects(
            agent(),
            "/data/tool_calls",
            Some(json!("3")),
            "data.tool_calls",
            "got a string",
        );
        for s in ["succeeded", "failed", "cancelled", "timeout"] {
            let mut v = agent();
            v["data"]["status"] = json!(s);
            validate_event(&v, &ctx()).expect("status allowed");
        }
    }

    #[test]
    fn all_errors_are_reported_together() {
        let mut v = llm();
        v["id"] = json!("");
        v["data"]["input_tokens"] = json!(-1);
        v["data"]["model"] = Value::Null;
        let errs = validate_event(&v, &ctx()).expect_err("invalid");
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["id", "data.model", "data.input_tokens"]);
    }

    #[test]
    fn bound_tenant_fills_or_must_match() {
        let bound = ValidationContext {
            bound_tenant: Some("acme"),
            ..ctx()
        };
        let mut v = llm();
        v.as_object_mut().expect("object").remove("tenant");
        assert_eq!(validate_event(&v, &bound).expect("filled").tenant, "acme");
        let mut other = llm();
        other["tenant"] = json!("globex");
        let errs = validate_event(&other, &bound).expect_err("mismatch");
        assert!(
            errs.iter()
                .any(|e| e.field == "tenant" && e.reason.contains("bound"))
        );
    }

    #[test]
    fn non_objects_are_rejected() {
        let errs = validate_event(&json!([1]), &ctx()).expect_err("array");
        assert_eq!(errs[0].reason, "expected a JSON object, got an array");
    }

    #[test]
    fn long_names_are_truncated_in_errors() {
        let mut v = llm();
        v["type"] = json!("t".repeat(1 << 20));
        let errs = validate_event(&v, &ctx()).expect_err("bad type");
        assert!(errs[0].reason.len() < 200);
    }
}
