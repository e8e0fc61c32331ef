//! The JSON Schema (draft 2020-12) of the v1 event, for producers that want to validate before
//! sending. meterd serves it inside its OpenAPI document; the file itself is
//! `schemas/event.schema.json`.

/// The JSON Schema of one v1 event, as text.
pub const EVENT_JSON_SCHEMA: &str = include_str!("../event.schema.json");

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::{Value, json};

    use super::*;
    use crate::validate::{Limits, ValidationContext, validate_event};

    fn schema() -> Value {
        serde_json::from_str(EVENT_JSON_SCHEMA).expect("schema is JSON")
    }

    /// The schema and the validator must agree on which fields each type has: an event using
    /// every property the schema lists for a type is accepted, and one more property is not.
    #[test]
    fn schema_lists_the_fields_the_validator_accepts() {
        let schema = schema();
        let ctx = ValidationContext {
            now: Utc
                .with_ymd_and_hms(2026, 11, 21, 12, 0, 0)
                .single()
                .expect("valid date"),
            limits: Limits::default(),
            bound_tenant: None,
        };
        for t in ["llm.usage", "api.request", "agent.run"] {
            let props = schema["$defs"][t]["properties"]
                .as_object()
                .expect("properties");
            let mut data = serde_json::Map::new();
            for (name, prop) in props {
                // An optional field's type is `[type, "null"]`: the first is its value's.
                let ty = prop.get("type").and_then(|t| {
                    t.as_str()
                        .or_else(|| t.as_array().and_then(|a| a.first()).and_then(Value::as_str))
                });
                let v = match (ty, prop.get("enum")) {
                    (_, Some(Value::Array(options))) => options[0].clone(),
                    (Some("integer"), _) => {
                        json!(prop.get("minimum").and_then(Value::as_i64).unwrap_or(0))
                    }
                    _ => json!(if name == "method" { "GET" } else { "x" }),
                };
                data.insert(name.clone(), v);
            }
            let mut event =
                json!({"id": "1", "tenant": "t", "type": t, "time": "2026-11-21T10:00:00Z"});
            event["data"] = Value::Object(data.clone());
            validate_event(&event, &ctx).unwrap_or_else(|e| panic!("{t}: {e:?}"));
            data.insert("not_in_schema".into(), json!(1));
            event["data"] = Value::Object(data);
            assert!(
                validate_event(&event, &ctx).is_err(),
                "{t} accepted a field the schema lacks"
            );
        }
        let top: Vec<_> = schema["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .cloned()
            .collect();
        assert_eq!(top.len(), 8);
    }

    /// What the schema calls optional may be `null`, and the validator takes `null` as absent;
    /// what it requires may not.
    #[test]
    fn optional_fields_may_be_null_and_required_ones_not() {
        let schema = schema();
        let ctx = ValidationContext {
            now: Utc
                .with_ymd_and_hms(2026, 11, 21, 12, 0, 0)
                .single()
                .expect("valid date"),
            limits: Limits::default(),
            bound_tenant: None,
        };
        let base = json!({"id": "1", "tenant": "t", "type": "agent.run",
            "time": "2026-11-21T10:00:00Z", "subject": "s", "source": "x", "dimensions": {},
            "data": {"agent": "a", "run_id": "r", "parent_run_id": "p", "status": "failed",
                     "duration_ms": 5, "steps": 1, "tool_calls": 2}});
        validate_event(&base, &ctx).expect("valid");
        let top_required: Vec<&str> = schema["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for key in ["subject", "source", "dimensions"] {
            assert!(!top_required.contains(&key));
            let mut e = base.clone();
            e[key] = Value::Null;
            validate_event(&e, &ctx).unwrap_or_else(|err| panic!("{key}: null: {err:?}"));
            let ty = &schema["properties"][key]["type"];
            assert!(
                ty.as_array().is_some_and(|a| a.contains(&json!("null"))),
                "{key}: {ty}"
            );
        }
        let run = &schema["$defs"]["agent.run"];
        let required: Vec<&str> = run["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for (key, prop) in run["properties"].as_object().expect("properties") {
            let mut e = base.clone();
            e["data"][key] = Value::Null;
            let nullable_in_schema = prop["type"]
                .as_array()
                .is_some_and(|a| a.contains(&json!("null")))
                || prop["enum"]
                    .as_array()
                    .is_some_and(|a| a.contains(&Value::Null));
            assert_eq!(
                validate_event(&e, &ctx).is_ok(),
                !required.contains(&key.as_str()),
                "{key}: null"
            );
            assert_eq!(
                nullable_in_schema,
                !required.contains(&key.as_str()),
                "{key}"
            );
        }
    }
}
