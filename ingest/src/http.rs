//! `POST /v1/events`: decode, validate the whole batch, submit, answer after fsync.
//!
//! A batch is all or nothing on invalid input: one bad event makes the answer a 400 listing (up
//! to 100 of) the problems, and nothing of the batch is stored.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;
use meterd_schemas::{
    FieldError, Principal, ValidationContext, validate_cloudevent, validate_event,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::decode::{self, DecodeError, Framing};
use crate::{Ingest, SubmitError};

/// Most per-event errors listed in a 400.
pub const MAX_LISTED_ERRORS: usize = 100;

/// The router serving `POST /v1/events`.
pub fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .with_state(ingest)
}

/// One rejected field of one event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventError {
    /// Position of the event in the batch (0-based).
    pub index: usize,
    pub field: String,
    pub reason: String,
}

/// Every way `POST /v1/events` can fail; [`IngestError::status`] maps each to its status.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{invalid} of {total} events are invalid; nothing was stored")]
    Invalid {
        invalid: usize,
        total: usize,
        errors: Vec<EventError>,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("event {index} is for tenant {tenant:?}, but the API key is bound to tenant {bound:?}")]
    TenantForbidden {
        index: usize,
        tenant: String,
        bound: String,
    },
    #[error(transparent)]
    Submit(#[from] SubmitError),
}

impl IngestError {
    /// The HTTP status of each error. Exhaustive on purpose: a new variant must choose.
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::Invalid { .. } | IngestError::BodyRead(_) => StatusCode::BAD_REQUEST,
            IngestError::Decode(d) => match d {
                DecodeError::UnsupportedMediaType(_)
                | DecodeError::UnsupportedEncoding(_)
                | DecodeError::UnsupportedDataContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                DecodeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                DecodeError::BadGzip(_)
                | DecodeError::MalformedJson(_)
                | DecodeError::MalformedLine { .. }
                | DecodeError::WrongShape(_)
                | DecodeError::BadHeader { .. }
                | DecodeError::Empty => StatusCode::BAD_REQUEST,
            },
            IngestError::TenantForbidden { .. } => StatusCode::FORBIDDEN,
            IngestError::Submit(s) => match s {
                SubmitError::LogFull { .. }
                | SubmitError::Overloaded { .. }
                | SubmitError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                SubmitError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            IngestError::Invalid { errors, .. } => {
                json!({"error": self.to_string(), "errors": errors})
            }
            IngestError::Decode(DecodeError::MalformedLine { index, reason, .. }) => {
                json!({"error": self.to_string(), "errors": [{"index": index, "field": "", "reason": reason}]})
            }
            _ if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE => {
                tracing::error!(error = %self, source = ?std::error::Error::source(&self), "ingest failed");
                json!({"error": "internal error; see the server log"})
            }
            _ => json!({"error": self.to_string()}),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let retry = if matches!(self, IngestError::Submit(SubmitError::LogFull { .. })) {
                "5"
            } else {
                "1"
            };
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(retry));
        }
        response
    }
}

/// Past the limit, the rest of a body is read and dropped up to this many bytes, so that an
/// ordinary client still sees the 413 instead of a connection reset mid-upload.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// Reads a body of at most `limit` bytes. An oversized body is drained (up to
/// [`DRAIN_LIMIT`]) and answered with 413; it is never buffered.
async fn read_body(mut body: Body, limit: usize) -> Result<bytes::Bytes, IngestError> {
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| IngestError::BodyRead(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > DRAIN_LIMIT {
            break;
        }
        if seen <= limit {
            buf.extend_from_slice(&data);
        }
    }
    if seen > limit {
        return Err(DecodeError::TooLarge { limit }.into());
    }
    Ok(buf.freeze())
}

async fn post_events(
    State(ingest): State<Arc<Ingest>>,
    principal: Option<axum::Extension<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let limit = ingest.config().max_body_bytes;
    let header_str = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let raw = read_body(body, limit).await?;
    let content_type = header_str(header::CONTENT_TYPE);
    let binary = decode::is_binary_cloudevent(
        content_type,
        headers.contains_key(decode::CE_SPECVERSION_HEADER),
    );
    let framing = if binary {
        Framing::CloudEvent
    } else {
        decode::framing(content_type)?
    };
    let body = decode::inflate(raw, header_str(header::CONTENT_ENCODING), limit)?;
    let items = if binary {
        let ce_headers = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()));
        vec![decode::binary_cloudevent(ce_headers, content_type, &body)?]
    } else {
        decode::items(&body, framing)?
    };

    let bound = principal.as_ref().and_then(|p| p.tenant.as_deref());
    if let Some(bound) = bound {
        for (index, item) in items.iter().enumerate() {
            if let Some(Value::String(t)) = item.get("tenant")
                && t != bound
            {
                return Err(IngestError::TenantForbidden {
                    index,
                    tenant: t.chars().take(128).collect(),
                    bound: bound.to_owned(),
                });
            }
        }
    }
    let ctx = ValidationContext {
        now: chrono::Utc::now(),
        limits: ingest.config().limits,
        bound_tenant: bound,
    };
    let total = items.len();
    let mut events = Vec::with_capacity(total);
    let mut errors = Vec::new();
    let mut invalid = 0;
    for (index, item) in items.iter().enumerate() {
        let result = if framing.is_cloudevents() {
            validate_cloudevent(item, &ctx)
        } else {
            validate_event(item, &ctx)
        };
        match result {
            Ok(e) => events.push(e),
            Err(errs) => {
                invalid += 1;
                let room = MAX_LISTED_ERRORS.saturating_sub(errors.len());
                errors.extend(
                    errs.into_iter()
                        .take(room)
                        .map(|FieldError { field, reason }| EventError {
                            index,
                            field,
                            reason,
                        }),
                );
            }
        }
    }
    drop(items);
    if invalid > 0 {
        return Err(IngestError::Invalid {
            invalid,
            total,
            errors,
        });
    }
    let outcome = ingest.submit(events).await?;
    Ok((StatusCode::OK, axum::Json(outcome)).into_response())
}
