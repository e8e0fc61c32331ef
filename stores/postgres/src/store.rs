//! PostgreSQL behind the binary's [`Store`] trait.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use datafusion::catalog::TableProvider;
use meterd_ingest::sink::{SinkHandle, SinkStatus};
use meterd_query::QueryConfig;
use meterd_store::{SinkStart, Store};
use serde_json::Value;

use crate::PostgresConfig;

/// The schema meterd's relations live in.
const SCHEMA: &str = "meterd";

/// The PostgreSQL (or TimescaleDB) store of one configuration.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    config: PostgresConfig,
}

impl PostgresStore {
    pub fn new(config: PostgresConfig) -> Self {
        Self { config }
    }

    /// A pool of connections for SQL, set up as the sink's are.
    fn pool(&self, query: &QueryConfig) -> anyhow::Result<deadpool_postgres::Pool> {
        let mut config: tokio_postgres::Config = self
            .config
            .url
            .parse()
            .context("parsing the PostgreSQL URL")?;
        // As the sink's connections: give up connecting after 10 s, notice a dead peer in a
        // minute.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(60));
        }
        config.keepalives_idle(Duration::from_secs(30));
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(query.threads.max(1) * 4)
            .build()
            .context("building the PostgreSQL pool")
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn display_name(&self) -> &'static str {
        "PostgreSQL"
    }

    fn start(&self, from: SinkStart) -> SinkHandle {
        crate::spawn(
            from.log,
            from.consumer,
            from.node_id,
            self.config.clone(),
            from.shutdown,
        )
    }

    fn readiness(&self, status: &SinkStatus) -> Value {
        serde_json::json!({
            "connected": status.connected(),
            "delivered_lsn": status.delivered(),
            "last_error": status.last_error(),
            "rollup_refresher_error": status.refresher_error(),
        })
    }

    /// Migrates first, so the relations exist, then reads them through a pool of connections
    /// set up as the sink's are.
    async fn tables(
        &self,
        names: &[&str],
        query: &QueryConfig,
    ) -> anyhow::Result<Vec<(String, Arc<dyn TableProvider>)>> {
        let mut client = crate::connect(&self.config)
            .await
            .context("connecting to PostgreSQL")?;
        crate::migrate(&mut client, &self.config)
            .await
            .context("migrating PostgreSQL")?;
        drop(client);
        let pool = self.pool(query)?;
        let mut tables: Vec<(String, Arc<dyn TableProvider>)> = Vec::with_capacity(names.len());
        for &name in names {
            let table = crate::sql::discover(pool.clone(), SCHEMA, name, query.timeout)
                .await
                .with_context(|| format!("reading the PostgreSQL relation {SCHEMA}.{name}"))?;
            tables.push((name.to_owned(), Arc::new(table)));
        }
        Ok(tables)
    }

    async fn usage(
        &self,
        query: &QueryConfig,
    ) -> anyhow::Result<Arc<dyn meterd_billing::UsageSource>> {
        Ok(Arc::new(crate::billing::PostgresUsage::new(
            self.pool(query)?,
            query.timeout,
        )))
    }

    fn closed_invoices(
        &self,
        query: &QueryConfig,
    ) -> anyhow::Result<Option<Arc<dyn meterd_billing::ClosedStore>>> {
        Ok(Some(Arc::new(crate::billing::PostgresClosedStore::new(
            self.pool(query)?,
        ))))
    }
}
