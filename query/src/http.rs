//! `POST /v1/sql`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::Stream;
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
        Err(e) => e.response(service.hidden_paths()),
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
    // Known before the first byte is sent, as for any complete answer.
    let length = encoded.len();
    let body = Body::from_stream(paced(
        encoded,
        Instant::now(),
        MIN_READ_BYTES_PER_SEC,
        READ_GRACE,
    ));
    let headers = [
        (CONTENT_TYPE, format.content_type().to_owned()),
        (CONTENT_LENGTH, length.to_string()),
    ];
    Ok((headers, body).into_response())
}

/// The slowest a client may read an answer, on average after [`READ_GRACE`]: 256 MiB in about
/// an hour. The answer holds its share of the query memory pool until it is sent: a client
/// reading a byte at a time must not keep it, and the pool, for days.
const MIN_READ_BYTES_PER_SEC: u64 = 64 * 1024;
const READ_GRACE: Duration = Duration::from_secs(30);
/// The piece of the answer handed to the connection at a time; the pace is checked between them.
const CHUNK_BYTES: usize = 64 * 1024;

/// `body` in [`CHUNK_BYTES`] pieces, ending in an error (which closes the connection) if a
/// piece is asked for after `grace` plus the time `body` takes at `min_bytes_per_sec`, counted
/// from `start`. A client that stops reading altogether is the listener's write timeout's.
fn paced(
    body: Bytes,
    start: Instant,
    min_bytes_per_sec: u64,
    grace: Duration,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let allowed = grace.saturating_add(Duration::from_secs_f64(
        body.len() as f64 / min_bytes_per_sec.max(1) as f64,
    ));
    let deadline = start.checked_add(allowed);
    futures::stream::unfold(Some(body), move |rest| async move {
        let mut rest = rest?;
        if rest.is_empty() {
            return None;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            tracing::warn!(
                min_bytes_per_sec,
                left = rest.len(),
                "closing a connection that reads its SQL answer too slowly"
            );
            let error = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read the answer slower than the slowest allowed pace",
            );
            return Some((Err(error), None));
        }
        let chunk = rest.split_to(CHUNK_BYTES.min(rest.len()));
        Some((Ok(chunk), Some(rest)))
    })
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
    use futures::StreamExt;

    #[tokio::test]
    async fn a_slow_reader_is_cut_off() {
        let body = Bytes::from(vec![7u8; 3 * CHUNK_BYTES + 5]);
        let read =
            |start| paced(body.clone(), start, 1024, Duration::from_secs(1)).collect::<Vec<_>>();
        let in_time = read(Instant::now()).await;
        assert_eq!(in_time.len(), 4);
        let sizes: usize = in_time
            .iter()
            .map(|c| c.as_ref().expect("in time").len())
            .sum();
        assert_eq!(sizes, body.len());
        // No grace and no time to send: past its deadline by the first piece.
        let late = paced(body.clone(), Instant::now(), u64::MAX, Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let pieces = late.collect::<Vec<_>>().await;
        assert_eq!(pieces.len(), 1);
        assert!(pieces[0].is_err());
        assert!(read(Instant::now()).await.iter().all(Result::is_ok));
        let empty = paced(Bytes::new(), Instant::now(), 1, Duration::ZERO)
            .collect::<Vec<_>>()
            .await;
        assert!(empty.is_empty());
    }

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
