//! The SQL API's Prometheus families: statements by result, and how long they took.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

use crate::Error;

/// Registered in the service's own registry; the binary gathers every crate's.
#[derive(Debug, Clone)]
pub struct QueryMetrics {
    registry: Registry,
    queries: IntCounterVec,
    duration: Histogram,
}

/// Every `result` label value, so each series exists from the start.
const RESULTS: [&str; 5] = ["ok", "bad_request", "too_large", "timeout", "error"];

impl QueryMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let queries = IntCounterVec::new(
            Opts::new(
                "meterd_sql_queries_total",
                "SQL statements run (POST /v1/sql, invoices, usage, SLOs over the embedded store) by result",
            ),
            &["result"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "meterd_sql_query_duration_seconds",
                "How long SQL statements took, answer or not",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        for result in RESULTS {
            queries.with_label_values(&[result]);
        }
        Ok(Self {
            registry,
            queries,
            duration,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn observe<T>(&self, outcome: &Result<T, Error>, seconds: f64) {
        let result = match outcome {
            Ok(_) => "ok",
            Err(Error::Timeout { .. }) => "timeout",
            Err(e) => match e.status_code().as_u16() {
                413 => "too_large",
                400..=499 => "bad_request",
                _ => "error",
            },
        };
        self.queries.with_label_values(&[result]).inc();
        self.duration.observe(seconds);
    }
}
