//! ClickHouse behind the binary's [`Store`] trait.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use backon::Retryable;
use datafusion::catalog::TableProvider;
use meterd_ingest::sink::SinkHandle;
use meterd_query::QueryConfig;
use meterd_store::{SinkStart, Store};

use crate::ClickHouseConfig;

/// The ClickHouse store of one configuration.
#[derive(Debug, Clone)]
pub struct ClickHouseStore {
    config: ClickHouseConfig,
}

impl ClickHouseStore {
    pub fn new(config: ClickHouseConfig) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Store for ClickHouseStore {
    fn name(&self) -> &'static str {
        crate::sink::SINK
    }

    fn display_name(&self) -> &'static str {
        "ClickHouse"
    }

    fn start(&self, from: SinkStart) -> SinkHandle {
        crate::spawn(
            from.log,
            from.consumer,
            from.node_id,
            from.data_dir,
            self.config.clone(),
            from.shutdown,
        )
    }

    /// Creates or migrates the tables first, so they exist.
    async fn tables(
        &self,
        names: &[&str],
        query: &QueryConfig,
    ) -> anyhow::Result<Vec<(String, Arc<dyn TableProvider>)>> {
        let client = crate::client(&self.config);
        // The sink creates or migrates the same tables at the same time; the migration guard
        // makes one wait for the other. A failure (the server not up yet) is retried.
        (|| crate::schema::ensure(&client, &self.config))
            .retry(
                backon::ConstantBuilder::default()
                    .with_delay(Duration::from_millis(500))
                    .with_max_times(2),
            )
            .await
            .context("creating meterd's ClickHouse tables")?;
        let database = &self.config.database;
        let mut tables: Vec<(String, Arc<dyn TableProvider>)> = Vec::with_capacity(names.len());
        for &name in names {
            let table = crate::sql::discover(client.clone(), database, name, query.timeout)
                .await
                .with_context(|| format!("reading the ClickHouse table {database}.{name}"))?;
            tables.push((name.to_owned(), Arc::new(table)));
        }
        Ok(tables)
    }

    async fn usage(
        &self,
        query: &QueryConfig,
    ) -> anyhow::Result<Arc<dyn meterd_billing::UsageSource>> {
        Ok(Arc::new(crate::billing::ClickHouseUsage::new(
            crate::client(&self.config),
            &self.config.database,
            query.timeout,
        )))
    }
}
