//! The OpenAPI 3.1 document served at `/openapi.json`. The event schema inside it is the same
//! JSON Schema file producers can use on their own (`schemas/event.schema.json`).

use serde_json::{Value, json};

/// The API's OpenAPI document.
pub fn document() -> Value {
    let event: Value = serde_json::from_str(meterd_schemas::json_schema::EVENT_JSON_SCHEMA)
        // A compile-time constant whose validity meterd-schemas tests.
        .expect("schemas/event.schema.json is valid JSON");
    let error = json!({"$ref": "#/components/schemas/Error"});
    let err =
        |d: &str| json!({"description": d, "content": {"application/json": {"schema": error}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "meterd", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Usage metering and time-series analytics for AI products."},
        "paths": {
            "/v1/events": {"post": {
                "summary": "Ingest usage events; answers after the batch is durable",
                "requestBody": {"required": true, "content": {
                    "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/Event"},
                        {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}]}},
                    "application/x-ndjson": {"schema": {"type": "string", "description": "one event per line"}},
                    "application/cloudevents+json": {"schema": {"type": "object"}},
                    "application/cloudevents-batch+json": {"schema": {"type": "array", "items": {"type": "object"}}}
                }},
                "responses": {
                    "200": {"description": "Batch durable", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/IngestResult"}}}},
                    "400": err("Invalid batch; nothing stored"), "401": err("Missing or unknown API key"),
                    "403": err("Key lacks the scope or tenant"), "413": err("Body too large"),
                    "415": err("Unsupported content type or encoding"),
                    "503": err("Log full or overloaded; retry after Retry-After seconds")
                }}},
            "/v1/sql": {"post": {
                "summary": "Read-only SQL over events",
                "parameters": [{"name": "format", "in": "query", "schema": {"enum": ["json", "ndjson", "csv", "arrow"]}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["sql"], "properties": {"sql": {"type": "string"}}}}}},
                "responses": {"200": {"description": "Query result"}, "400": err("Refused or invalid statement"),
                              "413": err("Result or memory over the limit"), "504": err("Query timed out")}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        },
        "components": {"schemas": {
            "Event": event,
            "IngestResult": {"type": "object", "required": ["accepted", "duplicates", "conflicts"], "properties": {
                "accepted": {"type": "integer"}, "duplicates": {"type": "integer"},
                "conflicts": {"type": "array", "items": {"type": "string"}}}},
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object", "properties": {
                    "index": {"type": "integer"}, "field": {"type": "string"}, "reason": {"type": "string"}}}}}}
        }}
    })
}
