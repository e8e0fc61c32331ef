//! `POST /v1/sql`.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde::Deserialize;

use crate::QueryService;
use crate::error::{Error, Result};
use crate::format::Format;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
}

/// The query string.
#[derive(Debug, Deserialize)]
struct SqlParams {
    format: Option<String>,
}

pub(crate) fn router(service: Arc<QueryService>) -> Router {
    Router::new()
        .route("/v1/sql", post(sql))
        .with_state(service)
}

async fn sql(
    State(service): State<Arc<QueryService>>,
    params: Result<Query<SqlParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match answer(&service, params, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn answer(
    service: &QueryService,
    params: Result<Query<SqlParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let Query(params) = params.map_err(Error::InvalidQueryString)?;
    let format = Format::parse(params.format.as_deref())?;
    let request = parse_body(&body.map_err(Error::ReadBody)?)?;
    let encoded = service.query_encoded(request.sql, format).await?;
    Ok(([(CONTENT_TYPE, format.content_type())], encoded).into_response())
}

/// Reads `{"sql": "..."}` whatever the `Content-Type` says: `curl -d` sends form encoding by
/// default, and refusing that would only be in the way.
fn parse_body(body: &[u8]) -> Result<SqlRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::EmptyBody);
    }
    serde_json::from_slice(body).map_err(Error::InvalidBody)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_name_their_problem() {
        assert!(matches!(parse_body(b""), Err(Error::EmptyBody)));
        let missing = parse_body(b"{}").expect_err("missing sql");
        assert!(
            missing.to_string().contains("missing field `sql`"),
            "{missing}"
        );
        let typo = parse_body(br#"{"query": "SELECT 1"}"#).expect_err("unknown field");
        assert!(typo.to_string().contains("unknown field `query`"), "{typo}");
        let not_json = parse_body(b"SELECT 1").expect_err("not json");
        assert!(
            not_json
                .to_string()
                .starts_with("the request body must be a JSON object"),
            "{not_json}"
        );
        assert_eq!(
            parse_body(br#"{"sql": "SELECT 1"}"#).expect("valid").sql,
            "SELECT 1"
        );
    }
}
