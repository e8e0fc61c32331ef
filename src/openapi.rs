//! The OpenAPI 3.1 document served at `/openapi.json`.
//!
//! The event schema inside it is the JSON Schema file producers can use on their own
//! (`schemas/event.schema.json`). Its `$defs` (the per-type `data` schemas) become components
//! here and its references are rewritten to them: OpenAPI tools resolve a `#/...` reference
//! against the document's root, where `#/$defs/...` does not exist.
//!
//! The document is built per request so its examples carry a current `time`: an example event
//! from the past would be refused by the server it describes.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// Component names of the per-type `data` schemas, by their name in the event schema's `$defs`.
const DATA_COMPONENTS: [(&str, &str); 3] = [
    ("llm.usage", "LlmUsageData"),
    ("api.request", "ApiRequestData"),
    ("agent.run", "AgentRunData"),
];

/// The event JSON Schema as an OpenAPI component: without `$schema`/`$id` (an `$id` would make
/// tools resolve references against meterd.dev), its `$defs` moved out, references rewritten.
/// Returns the event schema and the moved definitions.
fn event_components() -> (Value, Map<String, Value>) {
    let mut event: Value = serde_json::from_str(meterd_schemas::json_schema::EVENT_JSON_SCHEMA)
        // A compile-time constant whose validity meterd-schemas tests.
        .expect("schemas/event.schema.json is valid JSON");
    let mut moved = Map::new();
    if let Some(obj) = event.as_object_mut() {
        obj.remove("$schema");
        obj.remove("$id");
        if let Some(Value::Object(defs)) = obj.remove("$defs") {
            for (name, schema) in defs {
                let component = DATA_COMPONENTS
                    .iter()
                    .find(|(def, _)| *def == name)
                    .map_or(name.clone(), |(_, component)| (*component).to_owned());
                moved.insert(component, schema);
            }
        }
    }
    rewrite_refs(&mut event);
    (event, moved)
}

/// Points `#/$defs/<name>` references at `#/components/schemas/<component>`.
fn rewrite_refs(value: &mut Value) {
    match value {
        Value::Object(obj) => {
            for (key, v) in obj.iter_mut() {
                if key == "$ref"
                    && let Some(target) = v.as_str().and_then(|r| r.strip_prefix("#/$defs/"))
                {
                    let component = DATA_COMPONENTS
                        .iter()
                        .find(|(def, _)| *def == target)
                        .map_or(target, |(_, component)| component);
                    *v = Value::String(format!("#/components/schemas/{component}"));
                } else {
                    rewrite_refs(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

/// A billing period: a calendar month from 1970 on.
const PERIOD_PATTERN: &str = "^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])$";

/// The API's OpenAPI document, with examples timed `now`.
pub fn document(now: DateTime<Utc>) -> Value {
    let (event, data_schemas) = event_components();
    let time = (now - chrono::Duration::seconds(1)).to_rfc3339_opts(SecondsFormat::Millis, true);
    let example_event = json!({
        "id": "run-42-step-3", "tenant": "acme", "type": "llm.usage", "time": time,
        "subject": "user-17", "source": "support-bot",
        "dimensions": {"department": "customer_service"},
        "data": {"provider": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300}
    });
    let example_cloudevent = json!({
        "specversion": "1.0", "id": "ce-42", "source": "support-bot", "type": "llm.usage",
        "time": time, "tenant": "acme",
        "data": {"provider": "anthropic", "model": "claude-sonnet-4", "input_tokens": 900, "output_tokens": 120}
    });
    let error = json!({"$ref": "#/components/schemas/Error"});
    let err =
        |d: &str| json!({"description": d, "content": {"application/json": {"schema": error}}});
    let retry_after = json!({"Retry-After": {"description": "Seconds to wait before sending again",
        "schema": {"type": "integer", "minimum": 0}}});
    let unavailable = |d: &str| {
        json!({"description": d, "headers": retry_after,
               "content": {"application/json": {"schema": error}}})
    };
    let mut schemas = Map::new();
    schemas.insert("Event".into(), event);
    schemas.extend(data_schemas);
    schemas.insert("CloudEvent".into(), cloudevent_schema());
    schemas.insert("IngestResult".into(), json!({
        "type": "object", "required": ["accepted", "duplicates", "conflicts"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 0, "description": "Events stored now"},
            "duplicates": {"type": "integer", "minimum": 0, "description": "Events already stored with the same content"},
            "conflicts": {"type": "array", "items": {"type": "string"},
                          "description": "Ids already stored with other content; not stored again"}}}));
    schemas.insert(
        "SqlRequest".into(),
        json!({
        "type": "object", "required": ["sql"], "additionalProperties": false,
        "properties": {"sql": {"type": "string", "minLength": 1, "pattern": "\\S",
            "description": "One SELECT, WITH, EXPLAIN or SHOW statement"}}}),
    );
    schemas.insert("SqlResult".into(), json!({
        "type": "object", "required": ["columns", "rows"],
        "properties": {
            "columns": {"type": "array", "items": {"type": "object", "required": ["name", "type"],
                "properties": {"name": {"type": "string"},
                               "type": {"type": "string", "description": "SQL type name, e.g. BIGINT, VARCHAR, TIMESTAMP WITH TIME ZONE"}}}},
            "rows": {"type": "array", "items": {"type": "array"}}}}));
    schemas.insert("Error".into(), json!({
        "type": "object", "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object",
                "required": ["index", "field", "reason"], "properties": {
                "index": {"type": "integer"}, "field": {"type": "string"}, "reason": {"type": "string"}}}}}}));
    schemas.insert("Status".into(), json!({"type": "object"}));
    schemas.insert(
        "Invoice".into(),
        json!({
        "type": "object",
        "required": ["tenant", "period", "timezone", "period_start", "period_end", "plan",
                     "currency", "status", "lines", "base_fee", "subtotal", "minimum",
                     "minimum_adjustment", "credits_applied", "total", "inputs"],
        "properties": {
            "tenant": {"type": "string"}, "period": {"type": "string"},
            "timezone": {"type": "string"},
            "period_start": {"type": "string", "format": "date-time"},
            "period_end": {"type": "string", "format": "date-time"},
            "plan": {"type": "string"}, "currency": {"type": "string"},
            "status": {"enum": ["draft", "preview", "closed"]},
            "closed_at": {"type": "string", "format": "date-time"},
            "lines": {"type": "array", "items": {"type": "object",
                "required": ["charge", "model", "quantity", "amount"]}},
            "base_fee": {"type": "string"}, "subtotal": {"type": "string"},
            "minimum": {"type": "string"}, "minimum_adjustment": {"type": "string"},
            "credits_applied": {"type": "array", "items": {"type": "object"}},
            "total": {"type": "string", "description": "Decimal, in the currency's minor unit"},
            "inputs": {"type": "object"}}}),
    );
    schemas.insert("InvoicePreview".into(), json!({
        "type": "object", "required": ["tenant", "period"], "additionalProperties": false,
        "properties": {
            "tenant": {"type": "string", "minLength": 1, "maxLength": 128},
            "period": {"type": "string", "pattern": PERIOD_PATTERN},
            "plan": {"type": "object", "description": "A [[plans]] entry; default: the tenant's plan"},
            "prices": {"type": "array", "items": {"type": "object"},
                       "description": "[[prices]] entries; default: the configured price book"},
            "timezone": {"type": "string", "description": "IANA zone; default: the tenant's"}}}));

    json!({
        "openapi": "3.1.0",
        "info": {"title": "meterd", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Usage metering and time-series analytics for AI products."},
        "paths": {
            "/v1/events": {"post": {
                "operationId": "ingestEvents",
                "summary": "Ingest usage events; answers after the batch is durable",
                "description": "One event or an array (JSON), one event per line (NDJSON), or CloudEvents: structured (one or a batch) or binary mode (ce-* headers, the data as a JSON body). A body may be gzip-compressed (Content-Encoding: gzip).",
                "requestBody": {"required": true, "content": {
                    "application/json": {
                        "schema": {"oneOf": [{"$ref": "#/components/schemas/Event"},
                            {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Event"}}]},
                        "example": example_event},
                    "application/x-ndjson": {
                        "schema": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Event"}},
                        "description": "The events, one JSON object per line"},
                    "application/cloudevents+json": {
                        "schema": {"$ref": "#/components/schemas/CloudEvent"},
                        "example": example_cloudevent},
                    "application/cloudevents-batch+json": {
                        "schema": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/CloudEvent"}}}
                }},
                "responses": {
                    "200": {"description": "Batch durable", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/IngestResult"}}}},
                    "400": err("Invalid batch (each problem named by event index and field); nothing stored"),
                    "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the scope or tenant"),
                    "413": err("Body too large, also after gzip inflation"),
                    "415": err("Unsupported content type or encoding"),
                    "503": unavailable("Log full or overloaded; retry after Retry-After seconds")
                }}},
            "/v1/sql": {"post": {
                "operationId": "querySql",
                "summary": "Read-only SQL over events and the rollups",
                "parameters": [{"name": "format", "in": "query", "required": false,
                                "schema": {"type": "string", "enum": ["json", "ndjson", "csv", "arrow"]}}],
                "requestBody": {"required": true, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/SqlRequest"},
                    "example": {"sql": "SELECT tenant, count(*) AS events FROM events GROUP BY tenant"}}}},
                "responses": {
                    "200": {"description": "Query result, in the requested format", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/SqlResult"}},
                        "application/x-ndjson": {"schema": {"type": "string"}},
                        "text/csv; charset=utf-8": {"schema": {"type": "string"}},
                        "application/vnd.apache.arrow.stream": {"schema": {"type": "string", "format": "binary"}}}},
                    "400": err("Refused or invalid statement or request"),
                    "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the query scope"),
                    "413": err("Result or memory over the limit"),
                    "504": err("Query timed out")}}},
            "/v1/meters": {"get": {
                "operationId": "listMeters",
                "summary": "The configured meters",
                "responses": {
                    "200": {"description": "Meters", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["meters"],
                        "properties": {"meters": {"type": "array", "items": {"type": "object"}}}}}}},
                    "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the query scope")}}},
            "/v1/usage": usage_path(),
            "/v1/slos": slos_path(),
            "/v1/invoices": {"get": {
                "operationId": "getInvoice",
                "summary": "The invoice of a tenant for a calendar month in its zone, or without a tenant every customer's (the invoice run)",
                "parameters": [
                    {"name": "tenant", "in": "query", "required": false,
                     "description": "Default: every customer (a key bound to a tenant: that tenant)",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 128}},
                    {"name": "period", "in": "query", "required": true,
                     "schema": {"type": "string", "pattern": PERIOD_PATTERN}, "example": "2026-10"},
                    {"name": "format", "in": "query", "required": false,
                     "schema": {"type": "string", "enum": ["json", "csv"]}}],
                "responses": {
                    "200": {"description": "The invoice, or its lines as CSV; without a tenant, every customer's", "content": {
                        "application/json": {"schema": {"oneOf": [
                            {"$ref": "#/components/schemas/Invoice"},
                            {"type": "object", "required": ["period", "invoices", "errors"], "properties": {
                                "period": {"type": "string"},
                                "invoices": {"type": "array", "items": {"$ref": "#/components/schemas/Invoice"}},
                                "errors": {"type": "array", "items": {"type": "object",
                                    "required": ["tenant", "status", "error"]}}}}]}},
                        "text/csv; charset=utf-8": {"schema": {"type": "string"}}}},
                    "400": err("Missing or invalid parameter"),
                    "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the query scope, or is bound to another tenant"),
                    "404": err("The tenant is not a customer"),
                    "409": err("Usage of a model without a price in force, or an amount past the decimal range"),
                    "503": err("The store did not answer"),
                    "504": err("The store timed out")}}},
            "/v1/invoices/preview": {"post": {
                "operationId": "previewInvoice",
                "summary": "The invoice under a plan or prices given here; changes nothing",
                "requestBody": {"required": true, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/InvoicePreview"}}}},
                "responses": {
                    "200": {"description": "The invoice, status preview", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Invoice"}}}},
                    "400": err("Invalid request, plan or prices"),
                    "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the query scope, or is bound to another tenant"),
                    "404": err("The tenant is not a customer"),
                    "409": err("Usage of a model without a price in force, or an amount past the decimal range"),
                    "413": err("Body too large"),
                    "415": err("Body is not JSON"),
                    "422": err("Body does not match the request's shape"),
                    "503": err("The store did not answer"),
                    "504": err("The store timed out")}}},
            "/v1/periods/{period}/close": {"post": {
                "operationId": "closePeriod",
                "summary": "Freeze the period's invoices of every customer (or of ?tenant=) whose period has ended",
                "parameters": [
                    {"name": "period", "in": "path", "required": true,
                     "schema": {"type": "string", "pattern": PERIOD_PATTERN}, "example": "2026-10"},
                    {"name": "tenant", "in": "query", "required": false,
                     "schema": {"type": "string", "minLength": 1, "maxLength": 128}}],
                "responses": {
                    "200": {"description": "Which tenants were closed now, before, or not yet", "content": {
                        "application/json": {"schema": {"type": "object",
                            "required": ["period", "closed", "already_closed", "not_ended"]}}}},
                    "400": err("Invalid period"),
                    "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the query scope, or is bound to a tenant"),
                    "404": err("The tenant is not a customer"),
                    "409": err("Usage of a model without a price in force, or an amount past the decimal range"),
                    "503": err("The store did not answer"),
                    "504": err("The store timed out")}}},
            "/metrics": {"get": {"operationId": "metrics",
                "summary": "Prometheus text exposition of meterd's metrics (usage, SLOs, ingest, stores, SQL)",
                "responses": {
                    "200": {"description": "The metrics", "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}},
                    "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the query scope")}}},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness",
                "responses": {"200": {"description": "alive", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}}}}},
            "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness: stores reachable, log not full",
                "responses": {"200": {"description": "ready", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}},
                              "503": {"description": "not ready", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}}
        },
        "components": {"schemas": schemas}
    })
}

/// A CloudEvent (structured mode) carrying a meterd event: the attributes meterd reads, the
/// extension `tenant`, and `data` by `type`. Other extension attributes are allowed.
fn cloudevent_schema() -> Value {
    let not_nul = "^[^\\u0000]*$";
    let string =
        |max: u32| json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": not_nul});
    // Optional attributes may also be `null`, which meterd reads as absent.
    let optional = |max: u32| json!({"type": ["string", "null"], "minLength": 1, "maxLength": max, "pattern": not_nul});
    let by_type: Vec<Value> = DATA_COMPONENTS
        .iter()
        .map(|(name, component)| {
            json!({"if": {"properties": {"type": {"const": name}}},
                   "then": {"properties": {"data": {"$ref": format!("#/components/schemas/{component}")}}}})
        })
        .collect();
    json!({
        "type": "object",
        "required": ["specversion", "id", "source", "type", "tenant", "data"],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": string(128),
            "source": string(256),
            "type": {"enum": DATA_COMPONENTS.iter().map(|(name, _)| *name).collect::<Vec<_>>()},
            "time": {"type": ["string", "null"], "format": "date-time",
                     "description": "Optional: an event without it takes the time it was received."},
            "subject": optional(256),
            "tenant": {"type": "string", "minLength": 1, "maxLength": 128,
                       "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$",
                       "description": "Extension attribute; may be left out with an API key bound to a tenant."},
            "datacontenttype": {"type": ["string", "null"], "pattern": "^application/json(;.*)?$"},
            "dimensions": {"type": ["object", "null"], "maxProperties": 16,
                "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": not_nul},
                "additionalProperties": {"type": "string", "maxLength": 256, "pattern": not_nul}},
            "data": {"type": "object"}
        },
        "not": {"required": ["data_base64"]},
        "allOf": by_type
    })
}

/// `GET /v1/slos`, apart (see [`usage_path`]).
fn slos_path() -> Value {
    let err = |description: &str| {
        json!({"description": description, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Error"}}}})
    };
    let rate = json!({"type": "number", "minimum": 0});
    let burn_rates = json!({"type": "object",
        "required": ["5m", "30m", "1h", "2h", "6h", "1d", "3d"],
        "properties": {"5m": rate, "30m": rate, "1h": rate, "2h": rate,
                       "6h": rate, "1d": rate, "3d": rate}});
    json!({"get": {
        "operationId": "listSlos",
        "summary": "Each SLO's SLI, error budget (in events), burn rates and alerts, counted now",
        "parameters": [
            {"name": "name", "in": "query", "required": false, "schema": {"type": "string"}},
            {"name": "tenant", "in": "query", "required": false,
             "description": "The SLOs per tenant (that tenant's entry) and of that tenant",
             "schema": {"type": "string", "minLength": 1, "maxLength": 128}}],
        "responses": {
            "200": {"description": "The SLOs", "content": {"application/json": {"schema": {
                "type": "object", "required": ["slos"],
                "properties": {"slos": {"type": "array", "items": {
                    "type": "object",
                    "required": ["name", "tenant", "objective", "window", "window_start",
                                 "window_end", "valid_events", "good_events", "sli",
                                 "error_budget", "burn_rates", "alerts"],
                    "properties": {
                        "name": {"type": "string"},
                        "tenant": {"type": ["string", "null"]},
                        "objective": {"type": "number"},
                        "window": {"type": "string"},
                        "window_start": {"type": "string", "format": "date-time",
                            "description": "The window counted starts here: a whole minute, or a whole hour for a window of a day or more"},
                        "window_end": {"type": "string", "format": "date-time",
                            "description": "The window counted ends here (excluded): the last whole minute"},
                        "valid_events": {"type": "integer", "minimum": 0},
                        "good_events": {"type": "integer", "minimum": 0},
                        "sli": {"type": ["number", "null"]},
                        "error_budget": {"type": "object",
                            "required": ["total", "used", "remaining", "remaining_ratio"],
                            "properties": {"total": {"type": "number"}, "used": {"type": "integer"},
                                           "remaining": {"type": "number"},
                                           "remaining_ratio": {"type": "number"}}},
                        "burn_rates": burn_rates,
                        "alerts": {"type": "object", "required": ["fast_burn", "slow_burn"],
                            "properties": {"fast_burn": {"type": "boolean"},
                                           "slow_burn": {"type": "boolean"}}}}}}}}}}},
            "400": err("Invalid parameter"),
            "401": err("Missing or unknown API key"),
            "403": err("Key lacks the query scope, or is bound to another tenant"),
            "404": err("No SLO of that name"),
            "503": err("The store did not answer"),
            "504": err("The store timed out")}}})
}

/// `GET /v1/usage`, apart: one `json!` of the whole document would pass the macro's
/// recursion limit.
fn usage_path() -> Value {
    let err = |description: &str| {
        json!({"description": description, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Error"}}}})
    };
    json!({"get": {
                "operationId": "getUsage",
                "summary": "A meter's values per window of a zone's clock, optionally split by columns",
                "description": "Windows start where the zone's clock reads a whole minute, hour, day or month; the first and last are cut to from and to. Windows and groups without events are left out. At most 10,000 windows (1,200 months) and 100,000 rows.",
                "parameters": [
                    {"name": "meter", "in": "query", "required": true,
                     "schema": {"type": "string", "minLength": 1}, "example": "agent_runs"},
                    {"name": "tenant", "in": "query", "required": false,
                     "description": "Default: every tenant (a key bound to a tenant: that tenant)",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 128}},
                    {"name": "from", "in": "query", "required": true,
                     "schema": {"type": "string", "format": "date-time"}, "example": "2026-10-01T00:00:00Z"},
                    {"name": "to", "in": "query", "required": false,
                     "description": "Default: now",
                     "schema": {"type": "string", "format": "date-time"}, "example": "2026-10-02T00:00:00Z"},
                    {"name": "window", "in": "query", "required": false,
                     "schema": {"type": "string", "enum": ["minute", "hour", "day", "month"]}},
                    {"name": "tz", "in": "query", "required": false,
                     "description": "An IANA zone; default UTC",
                     "schema": {"type": "string"}, "example": "America/Sao_Paulo"},
                    {"name": "group_by", "in": "query", "required": false,
                     "description": "Comma-separated: tenant, or columns of the meter's group_by",
                     "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "The meter's values", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["meter", "from", "to", "tz", "data"],
                        "properties": {
                            "meter": {"type": "string"},
                            "aggregation": {"type": "string"},
                            "tenant": {"type": ["string", "null"]},
                            "from": {"type": "string", "format": "date-time"},
                            "to": {"type": "string", "format": "date-time"},
                            "window": {"type": ["string", "null"]},
                            "tz": {"type": "string"},
                            "group_by": {"type": "array", "items": {"type": "string"}},
                            "source": {"type": "string"},
                            "data": {"type": "array", "items": {
                                "type": "object",
                                "required": ["window_start", "window_end", "group_by", "events", "value"],
                                "properties": {
                                    "window_start": {"type": "string", "format": "date-time"},
                                    "window_end": {"type": "string", "format": "date-time"},
                                    "group_by": {"type": "object"},
                                    "events": {"type": "integer", "minimum": 0},
                                    "value": {"type": ["string", "null"],
                                              "description": "A decimal number as text (exact); null for max or latest of no value"}}}}}}}}},
                    "400": err("Missing or invalid parameter"),
                    "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the query scope, or is bound to another tenant"),
                    "404": err("No meter of that name"),
                    "413": err("More than 100,000 rows"),
                    "503": err("The store did not answer"),
                    "504": err("The store timed out")}}})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in the document points at something in the document.
    #[test]
    fn every_reference_resolves_from_the_root() {
        let doc = document(Utc::now());
        let mut refs = Vec::new();
        fn collect(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(obj) => {
                    for (k, v) in obj {
                        match (k.as_str(), v.as_str()) {
                            ("$ref", Some(r)) => out.push(r.to_owned()),
                            _ => collect(v, out),
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        collect(&doc, &mut refs);
        assert!(refs.len() > 10, "{refs:?}");
        for r in refs {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external ref {r}"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
        assert!(doc.pointer("/components/schemas/Event/$defs").is_none());
        assert!(doc.pointer("/components/schemas/Event/$id").is_none());
    }

    #[test]
    fn tenant_is_required_and_examples_are_recent() {
        let now = Utc::now();
        let doc = document(now);
        let required = doc
            .pointer("/components/schemas/Event/required")
            .and_then(Value::as_array)
            .expect("required");
        assert!(required.contains(&json!("tenant")));
        let time = doc
            .pointer("/paths/~1v1~1events/post/requestBody/content/application~1json/example/time")
            .and_then(Value::as_str)
            .expect("example time");
        let time = DateTime::parse_from_rfc3339(time).expect("RFC 3339");
        assert!((now - time.with_timezone(&Utc)).num_seconds().abs() < 5);
    }
}
