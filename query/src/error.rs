//! Everything that can go wrong while answering `POST /v1/sql`, and the one place that decides
//! which HTTP status each failure gets.

use std::time::Duration;

use arrow::error::ArrowError;
use axum::Json;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use datafusion::error::DataFusionError;

/// Result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed SQL request, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request body could not be read (too large, connection dropped).
    #[error("reading the request body failed: {}", .0.body_text())]
    ReadBody(#[source] BytesRejection),

    /// The request body was empty.
    #[error("the request body is empty; expected a JSON object {{\"sql\": \"...\"}}")]
    EmptyBody,

    /// The request body is not the JSON object `{"sql": "..."}`.
    #[error("the request body must be a JSON object {{\"sql\": \"...\"}}: {0}")]
    InvalidBody(#[source] serde_json::Error),

    /// The query string could not be parsed.
    #[error("invalid query string: {}", .0.body_text())]
    InvalidQueryString(#[source] QueryRejection),

    /// `?format=` named a format this API does not produce.
    #[error("unknown format {0:?}: expected json, ndjson, csv or arrow")]
    UnknownFormat(String),

    /// The SQL text does not parse.
    #[error("{0}")]
    Parse(#[source] DataFusionError),

    /// The statement is larger than a limit of [`crate::bounds`] allows.
    #[error("the statement has {found} {what}, more than the limit of {limit}")]
    TooComplex {
        /// What was counted, e.g. `tokens`.
        what: &'static str,
        /// How many the statement has.
        found: usize,
        /// The limit.
        limit: usize,
    },

    /// The statement nests deeper than [`crate::bounds::MAX_NESTING_DEPTH`].
    #[error(
        "the statement is nested deeper than {limit} levels (expressions, operators and \
         subqueries); use an IN list instead of a chain of OR, or split the statement"
    )]
    TooDeep {
        /// The limit.
        limit: usize,
    },

    /// The request held zero or several statements.
    #[error("only one SELECT, WITH, EXPLAIN or SHOW statement per request; got {count} statements")]
    StatementCount {
        /// How many statements the SQL text held.
        count: usize,
    },

    /// The statement would change state; the SQL API is read-only.
    #[error(
        "{kind} statements are not allowed: the SQL API is read-only (SELECT, WITH, EXPLAIN or SHOW)"
    )]
    NotAllowed {
        /// The refused statement's leading keyword(s), e.g. `COPY`.
        kind: String,
    },

    /// The statement parsed but could not be planned (unknown table or column, type errors, or
    /// a plan the read-only guard refused).
    #[error("{0}")]
    Plan(#[source] DataFusionError),

    /// Executing the plan failed.
    #[error("{0}")]
    Execute(#[source] DataFusionError),

    /// The query needed more memory than the pool allows.
    #[error(
        "the query needs more memory than the {} query memory limit; aggregate further, add a LIMIT or narrow the time range ({source})",
        display_bytes(*.limit_bytes)
    )]
    MemoryLimit {
        /// The configured pool size.
        limit_bytes: usize,
        /// DataFusion's `ResourcesExhausted` error, naming the operator that ran out.
        #[source]
        source: DataFusionError,
    },

    /// The result has more rows than the configured cap.
    #[error(
        "the result has more than {max_rows} rows (the row cap); add a LIMIT or aggregate further"
    )]
    TooManyRows {
        /// The configured cap.
        max_rows: usize,
    },

    /// The encoded answer would pass the response cap.
    #[error(
        "the response would be larger than {} (the response cap); select fewer columns, add a LIMIT or aggregate further",
        display_bytes(*.max_bytes)
    )]
    ResponseTooLarge {
        /// The configured cap.
        max_bytes: usize,
    },

    /// Planning, executing and encoding together took longer than the timeout.
    #[error("query exceeded the {} timeout", display_duration(*.timeout))]
    Timeout {
        /// The configured timeout.
        timeout: Duration,
    },

    /// Writing the result in the requested format failed.
    #[error("encoding the result as {format} failed")]
    Encode {
        /// The requested format.
        format: &'static str,
        /// What the Arrow writer reported.
        #[source]
        source: ArrowError,
    },

    /// The dedicated query runtime could not be started.
    #[error("starting the query runtime failed")]
    StartRuntime(#[source] std::io::Error),

    /// The DataFusion runtime environment could not be built.
    #[error("building the DataFusion runtime environment failed")]
    Setup(#[source] DataFusionError),

    /// A table could not be registered (for PostgreSQL: it is missing, or its columns could not
    /// be read from the catalog).
    #[error("registering table {table}")]
    Table {
        table: String,
        #[source]
        source: DataFusionError,
    },

    /// The task running the query panicked or was cancelled.
    #[error("the query task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl Error {
    /// The HTTP status for this error. Exhaustive on purpose: a new kind of failure must be
    /// classified here rather than silently becoming a 500.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Error::ReadBody(rejection) => match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _client_problem => StatusCode::BAD_REQUEST,
            },
            Error::EmptyBody
            | Error::InvalidBody(_)
            | Error::InvalidQueryString(_)
            | Error::UnknownFormat(_)
            | Error::Parse(_)
            | Error::StatementCount { .. }
            | Error::TooComplex { .. }
            | Error::TooDeep { .. }
            | Error::NotAllowed { .. } => StatusCode::BAD_REQUEST,
            Error::Plan(e) | Error::Execute(e) => datafusion_error_status_code(e),
            Error::MemoryLimit { .. }
            | Error::TooManyRows { .. }
            | Error::ResponseTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::Encode { .. }
            | Error::StartRuntime(_)
            | Error::Setup(_)
            | Error::Table { .. }
            | Error::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Whether a DataFusion error is the client's doing (4xx) or ours (5xx).
///
/// `Context`, `Shared`, `Diagnostic` and `External` wrap the error that decides, so they are
/// unwrapped first; `find_root` walks the `source()` chain to the innermost DataFusion error.
fn datafusion_error_status_code(e: &DataFusionError) -> StatusCode {
    match e.find_root() {
        DataFusionError::SQL(..)
        | DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Configuration(_)
        // DataFusion raises `Execution` for input-dependent failures: bad function arguments,
        // invalid regexes, overflowing casts.
        | DataFusionError::Execution(_) => StatusCode::BAD_REQUEST,
        DataFusionError::ResourcesExhausted(_) => StatusCode::PAYLOAD_TOO_LARGE,
        DataFusionError::ArrowError(arrow, _) => arrow_error_status_code(arrow),
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
            datafusion_error_status_code(inner)
        }
        DataFusionError::Shared(inner) => datafusion_error_status_code(inner),
        DataFusionError::Collection(errors) => match errors.first() {
            Some(first) => datafusion_error_status_code(first),
            None => StatusCode::INTERNAL_SERVER_ERROR,
        },
        DataFusionError::External(inner) => match inner.downcast_ref::<ArrowError>() {
            Some(arrow) => arrow_error_status_code(arrow),
            None => StatusCode::INTERNAL_SERVER_ERROR,
        },
        DataFusionError::ParquetError(_)
        | DataFusionError::ObjectStore(_)
        | DataFusionError::IoError(_)
        | DataFusionError::Internal(_)
        | DataFusionError::ExecutionJoin(_)
        | DataFusionError::Substrait(_)
        | DataFusionError::Ffi(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Arrow errors during a query are mostly about the data the query asked for (casts, division
/// by zero); the rest are I/O or format failures on our side.
fn arrow_error_status_code(e: &ArrowError) -> StatusCode {
    match e {
        ArrowError::CastError(_)
        | ArrowError::ParseError(_)
        | ArrowError::DivideByZero
        | ArrowError::ArithmeticOverflow(_)
        | ArrowError::InvalidArgumentError(_)
        | ArrowError::ComputeError(_)
        | ArrowError::SchemaError(_)
        | ArrowError::NotYetImplemented(_) => StatusCode::BAD_REQUEST,
        ArrowError::MemoryError(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ArrowError::ExternalError(inner) => match inner.downcast_ref::<DataFusionError>() {
            Some(df) => datafusion_error_status_code(df),
            None => StatusCode::INTERNAL_SERVER_ERROR,
        },
        ArrowError::CsvError(_)
        | ArrowError::JsonError(_)
        | ArrowError::AvroError(_)
        | ArrowError::IoError(..)
        | ArrowError::IpcError(_)
        | ArrowError::ParquetError(_)
        | ArrowError::CDataInterface(_)
        | ArrowError::DictionaryKeyOverflowError
        | ArrowError::RunEndIndexOverflowError
        | ArrowError::OffsetOverflowError(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `30s`, `1.5s` or `200ms`, as an operator would write the setting.
fn display_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// `512 MiB`, `64 KiB` or `1000 bytes`.
fn display_bytes(n: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

/// The error and all its sources, `outer: inner: root`, for the log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // DataFusion and our variants often repeat the source in their own message.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.response(&[])
    }
}

impl Error {
    /// The HTTP answer, with every occurrence of each of `hidden` (the data directory's paths)
    /// in the message replaced by `meterd://events`: an I/O error of a scan names its file.
    pub(crate) fn response(self, hidden: &[String]) -> Response {
        let status = self.status_code();
        let mut message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(status = status.as_u16(), error = %chain(&self), "sql request failed");
            "internal error".to_owned()
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "sql request refused");
            self.to_string()
        };
        for path in hidden.iter().filter(|p| !p.is_empty()) {
            message = message.replace(path.as_str(), "meterd://events");
        }
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn answers_do_not_show_the_data_directory() {
        let error = Error::Execute(DataFusionError::Execution(
            "cannot read /srv/meterd/data/events/day=2026-11-01/part-1.parquet".into(),
        ));
        let response = error.response(&["/srv/meterd/data/events".to_owned()]);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("/srv"), "{text}");
        assert!(
            text.contains("meterd://events/day=2026-11-01/part-1.parquet"),
            "{text}"
        );
    }

    #[test]
    fn wrapped_errors_are_classified_by_their_root() {
        let exhausted = DataFusionError::ResourcesExhausted("pool".into());
        let wrapped = DataFusionError::Shared(Arc::new(exhausted.context("sorting")));
        assert_eq!(
            datafusion_error_status_code(&wrapped),
            StatusCode::PAYLOAD_TOO_LARGE
        );

        let external =
            DataFusionError::External(Box::new(DataFusionError::Plan("no such column".into())));
        assert_eq!(
            datafusion_error_status_code(&external),
            StatusCode::BAD_REQUEST
        );

        let arrow = DataFusionError::ArrowError(Box::new(ArrowError::DivideByZero), None);
        assert_eq!(
            datafusion_error_status_code(&arrow),
            StatusCode::BAD_REQUEST
        );

        let io = DataFusionError::IoError(std::io::Error::other("disk gone"));
        assert_eq!(
            datafusion_error_status_code(&io.context("reading")),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn durations_read_like_settings() {
        assert_eq!(display_duration(Duration::from_secs(30)), "30s");
        assert_eq!(display_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(display_duration(Duration::from_millis(1500)), "1.5s");
        let e = Error::Timeout {
            timeout: Duration::from_secs(30),
        };
        assert_eq!(e.to_string(), "query exceeded the 30s timeout");
        assert_eq!(display_bytes(512 * 1024 * 1024), "512 MiB");
        assert_eq!(display_bytes(1000), "1000 bytes");
    }
}
