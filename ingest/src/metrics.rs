//! Ingest's Prometheus families: events by outcome, batches by result, how long a batch takes
//! to be durable, and the log's size against its limit.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

/// Registered in ingest's own registry; the binary gathers every crate's.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    registry: Registry,
    events: IntCounterVec,
    batches: IntCounterVec,
    ack: Histogram,
    pub(crate) log_bytes: IntGauge,
    pub(crate) log_limit_bytes: IntGauge,
    pub(crate) unflushed_rows: IntGauge,
}

/// Every `outcome` of an event.
const OUTCOMES: [&str; 3] = ["accepted", "duplicate", "conflict"];
/// Every `result` of a batch.
pub(crate) const RESULTS: [&str; 5] = ["ok", "log_full", "overloaded", "shutting_down", "failed"];

impl IngestMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new(
                "meterd_ingest_events_total",
                "Events submitted, by outcome: accepted (stored for the first time), duplicate \
                 (same id and content as a stored event), conflict (same id, other content)",
            ),
            &["outcome"],
        )?;
        let batches = IntCounterVec::new(
            Opts::new(
                "meterd_ingest_batches_total",
                "Batches of valid events submitted to the log, by result",
            ),
            &["result"],
        )?;
        let ack = Histogram::with_opts(
            HistogramOpts::new(
                "meterd_ingest_ack_duration_seconds",
                "From a batch's submission to its acknowledgement (durable on disk)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let log_bytes = IntGauge::new(
            "meterd_ingest_log_bytes",
            "Bytes the durable log retains (not yet delivered to every store)",
        )?;
        let log_limit_bytes = IntGauge::new(
            "meterd_ingest_log_limit_bytes",
            "Retained bytes past which ingest answers 503",
        )?;
        let unflushed_rows = IntGauge::new(
            "meterd_ingest_unflushed_rows",
            "Events in the embedded store not yet written to Parquet",
        )?;
        for c in [&events, &batches] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(ack.clone()))?;
        for g in [&log_bytes, &log_limit_bytes, &unflushed_rows] {
            registry.register(Box::new(g.clone()))?;
        }
        for o in OUTCOMES {
            events.with_label_values(&[o]);
        }
        for r in RESULTS {
            batches.with_label_values(&[r]);
        }
        Ok(Self {
            registry,
            events,
            batches,
            ack,
            log_bytes,
            log_limit_bytes,
            unflushed_rows,
        })
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn batch(&self, result: &str) {
        self.batches.with_label_values(&[result]).inc();
    }

    pub(crate) fn acknowledged(&self, outcome: &crate::writer::Outcome, seconds: f64) {
        let counts = [
            outcome.accepted,
            outcome.duplicates,
            outcome.conflicts.len(),
        ];
        for (o, n) in OUTCOMES.into_iter().zip(counts) {
            self.events
                .with_label_values(&[o])
                .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        }
        self.ack.observe(seconds);
    }
}
