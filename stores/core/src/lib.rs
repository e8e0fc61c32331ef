//! What the binary needs of an external store, so that it iterates over the configured stores
//! instead of naming them: start delivering the log, report for `/readyz`, and serve SQL.
//!
//! Each store is a crate of its own (`stores/postgres`, `stores/clickhouse`) that owns its
//! configuration, migrations and DDL, rollup rendering, sink and SQL tables. Dependencies point
//! one way: a store depends on `ingest` (the log, the tailer, sink bookkeeping), on `query`
//! (the shared remote scan) and on `rollups` (the definitions it renders); `ingest` and `query`
//! never depend on a store or on each other.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::TableProvider;
use meterd_ingest::log::{Consumer, LogShared};
use meterd_ingest::sink::{SinkHandle, SinkStatus};
use meterd_query::QueryConfig;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What a store's sink starts from.
#[derive(Debug, Clone)]
pub struct SinkStart {
    pub log: Arc<LogShared>,
    /// The store's log consumer, registered under [`Store::name`].
    pub consumer: Consumer,
    pub node_id: String,
    pub data_dir: PathBuf,
    /// Cancelled once ingest has drained.
    pub shutdown: CancellationToken,
}

/// An external store fed from the log.
#[async_trait]
pub trait Store: fmt::Debug + Send + Sync {
    /// The store's name: its log consumer, its key in `/readyz`, its `sql_source`.
    fn name(&self) -> &'static str;

    /// A name for people (`PostgreSQL`).
    fn display_name(&self) -> &'static str;

    /// Starts delivering the log to the store, and whatever upkeep the store needs.
    fn start(&self, from: SinkStart) -> SinkHandle;

    /// What `/readyz` shows of the store.
    fn readiness(&self, status: &SinkStatus) -> Value {
        json!({
            "connected": status.connected(),
            "delivered_lsn": status.delivered(),
            "last_error": status.last_error(),
        })
    }

    /// Makes the store ready for SQL (its tables created or migrated) and reads `names` from
    /// it as DataFusion tables, each under its own name.
    async fn tables(
        &self,
        names: &[&str],
        query: &QueryConfig,
    ) -> anyhow::Result<Vec<(String, Arc<dyn TableProvider>)>>;

    /// Where invoices read usage: each meter's aggregation rendered in the store's dialect and
    /// run inside it (called after [`Store::tables`], which migrates).
    async fn usage(
        &self,
        query: &QueryConfig,
    ) -> anyhow::Result<Arc<dyn meterd_billing::UsageSource>>;

    /// Where closed invoices are kept so that every node answers the same ones, if this store
    /// keeps them (PostgreSQL does; without one, each node keeps its own under its data
    /// directory).
    fn closed_invoices(
        &self,
        _query: &QueryConfig,
    ) -> anyhow::Result<Option<Arc<dyn meterd_billing::ClosedStore>>> {
        Ok(None)
    }
}
