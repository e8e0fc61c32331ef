//! CloudEvents 1.0 (structured JSON mode) mapped onto the v1 event.
//!
//! `id`, `type`, `time`, `subject`, `source` and `data` map directly; the tenant comes from the
//! extension attribute `tenant` or from the API key; an optional `dimensions` attribute holds an
//! object of strings. `time` is optional in CloudEvents: an event without it takes the time it
//! was received (so a retry of it, received later, is a conflict rather than a duplicate).
//! Other extension attributes (`traceparent`, ...) are allowed and ignored, as the CloudEvents
//! spec asks of consumers that do not understand them.

use serde_json::Value;

use crate::event::Event;
use crate::validate::{EnvelopeFields, FieldError, ValidationContext, Validator, kind, truncate};

/// Validates one CloudEvent (structured JSON mode) and maps it to an [`Event`].
pub fn validate_cloudevent(
    value: &Value,
    ctx: &ValidationContext<'_>,
) -> Result<Event, Vec<FieldError>> {
    let Some(obj) = value.as_object() else {
        return Err(vec![FieldError {
            field: String::new(),
            reason: format!("expected a CloudEvent object, got {}", kind(value)),
        }]);
    };
    let mut v = Validator::default();
    match obj.get("specversion") {
        Some(Value::String(s)) if s == "1.0" => {}
        Some(Value::String(s)) => v.err(
            "specversion",
            format!("{:?} is not supported; expected \"1.0\"", truncate(s)),
        ),
        Some(other) => v.err(
            "specversion",
            format!("expected a string, got {}", kind(other)),
        ),
        None => v.err("specversion", "required"),
    }
    match obj.get("datacontenttype") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "application/json" || s.starts_with("application/json;") => {
        }
        Some(Value::String(s)) => v.err(
            "datacontenttype",
            format!(
                "{:?} is not supported; data must be application/json",
                truncate(s)
            ),
        ),
        Some(other) => v.err(
            "datacontenttype",
            format!("expected a string, got {}", kind(other)),
        ),
    }
    if obj.contains_key("data_base64") {
        v.err(
            "data_base64",
            "binary data is not supported; send data as a JSON object",
        );
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
        source_required: true,
        time_defaults_to_now: true,
    };
    v.envelope(fields, ctx)
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    use super::*;
    use crate::validate::Limits;

    fn ctx(bound: Option<&str>) -> ValidationContext<'_> {
        ValidationContext {
            now: Utc
                .with_ymd_and_hms(2026, 11, 21, 12, 0, 0)
                .single()
                .expect("valid date"),
            limits: Limits::default(),
            bound_tenant: bound,
        }
    }

    fn ce() -> Value {
        json!({"specversion": "1.0", "id": "c1", "source": "support-bot", "type": "llm.usage",
               "time": "2026-11-21T10:00:00Z", "subject": "user-1", "tenant": "acme",
               "traceparent": "00-abc-def-01",
               "data": {"provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 2}})
    }

    #[test]
    fn maps_attributes() {
        let e = validate_cloudevent(&ce(), &ctx(None)).expect("valid");
        assert_eq!((e.tenant.as_str(), e.id.as_str()), ("acme", "c1"));
        assert_eq!(e.source.as_deref(), Some("support-bot"));
        assert_eq!(e.subject.as_deref(), Some("user-1"));
    }

    #[test]
    fn tenant_from_key() {
        let mut v = ce();
        v.as_object_mut().expect("object").remove("tenant");
        assert_eq!(
            validate_cloudevent(&v, &ctx(Some("acme")))
                .expect("valid")
                .tenant,
            "acme"
        );
        let errs = validate_cloudevent(&v, &ctx(None)).expect_err("no tenant");
        assert_eq!(errs[0].field, "tenant");
    }

    #[test]
    fn time_is_optional_and_then_the_time_received() {
        let mut v = ce();
        v.as_object_mut().expect("object").remove("time");
        let ctx = ctx(None);
        let e = validate_cloudevent(&v, &ctx).expect("valid without time");
        assert_eq!(e.time_us, ctx.now.timestamp_micros());
        v["time"] = Value::Null;
        assert_eq!(
            validate_cloudevent(&v, &ctx).expect("null time").time_us,
            ctx.now.timestamp_micros()
        );
        v["time"] = json!("yesterday");
        assert_eq!(
            validate_cloudevent(&v, &ctx).expect_err("bad time")[0].field,
            "time"
        );
    }

    #[test]
    fn long_values_are_not_echoed_in_full() {
        let mut v = ce();
        v["datacontenttype"] = json!(format!("text/{}", "x".repeat(1_000_000)));
        v["specversion"] = json!("9".repeat(1_000_000));
        let errors = validate_cloudevent(&v, &ctx(None)).expect_err("refused");
        assert_eq!(errors.len(), 2, "{errors:?}");
        for e in errors {
            assert!(
                e.reason.len() < 200,
                "{}: {} bytes",
                e.field,
                e.reason.len()
            );
        }
    }

    #[test]
    fn ce_rules() {
        let mut v = ce();
        v["specversion"] = json!("0.3");
        assert_eq!(
            validate_cloudevent(&v, &ctx(None)).expect_err("old")[0].field,
            "specversion"
        );
        let mut v = ce();
        v.as_object_mut().expect("object").remove("source");
        assert_eq!(
            validate_cloudevent(&v, &ctx(None)).expect_err("no source")[0].field,
            "source"
        );
        let mut v = ce();
        v["datacontenttype"] = json!("text/plain");
        assert_eq!(
            validate_cloudevent(&v, &ctx(None)).expect_err("text")[0].field,
            "datacontenttype"
        );
    }
}
