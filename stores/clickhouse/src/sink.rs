//! The delivery loop: log -> one `Native` block per month per batch, with a durable delivery
//! record and settling of every batch whose outcome was not seen.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickhouse::Client;
use meterd_ingest::log::{Consumer, LogShared, Lsn};
use meterd_ingest::sink::{
    DeliveryRecord, SinkHandle, error_chain, load_delivery, save_delivery, spawn_sink,
};
use meterd_ingest::tailer::{Batch, Limits, Tailer, read_exact};
use tokio_util::sync::CancellationToken;

use crate::block::{MonthBlock, month_blocks, month_of};
use crate::schema::{self, Entries, Target, TargetKind};
use crate::{ChError, ClickHouseConfig, SinkStatus, query_err};

/// The name of this sink's log consumer and files under `sinks/`.
pub const SINK: &str = "clickhouse";

/// Time limits of one insert: sending a chunk, and the server's whole handling of it
/// (materialized views included).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
const END_TIMEOUT: Duration = Duration::from_secs(300);

/// How often retention runs where meterd drops expired months itself.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// A client of the configured server: `RowBinary` without schema validation (the
/// `RowBinaryWithNamesAndTypes` format it needs does not exist before ClickHouse 22).
pub fn client(config: &ClickHouseConfig) -> Client {
    let mut client = Client::default()
        .with_url(&config.url)
        .with_validation(false);
    if let Some(user) = &config.user {
        client = client.with_user(user);
    }
    if let Some(password) = &config.password {
        client = client.with_password(password);
    }
    client
}

/// Starts delivering this node's log to ClickHouse. Failures are retried with backoff until
/// `shutdown` is cancelled.
pub fn spawn(
    log: Arc<LogShared>,
    consumer: Consumer,
    node_id: String,
    data_dir: PathBuf,
    config: ClickHouseConfig,
    shutdown: CancellationToken,
) -> SinkHandle {
    let status = Arc::new(SinkStatus::default());
    let sink = Sink {
        log,
        consumer,
        node_id,
        data_dir,
        config: Arc::new(config),
        status: Arc::clone(&status),
    };
    spawn_sink(
        SINK,
        shutdown,
        move |token| {
            let sink = sink.clone();
            async move { sink.deliver_until_shutdown(&token).await }
        },
        Vec::new(),
        status,
    )
}

#[derive(Debug, Clone)]
struct Sink {
    log: Arc<LogShared>,
    consumer: Consumer,
    node_id: String,
    data_dir: PathBuf,
    config: Arc<ClickHouseConfig>,
    status: Arc<SinkStatus>,
}

impl Sink {
    async fn deliver_until_shutdown(&self, shutdown: &CancellationToken) -> Result<(), ChError> {
        let client = client(&self.config);
        let schema = schema::ensure(&client, &self.config).await?;
        let entries = &schema.entries;
        let mut recorded = self.load_record().await?;
        if recorded.in_flight_end > recorded.checkpoint {
            // The last batch was sent, or was being sent, when this node stopped or failed.
            let (from, end) = (recorded.checkpoint, recorded.in_flight_end);
            let batch = read_exact(Arc::clone(&self.log), from, end).await?;
            if batch.end != end {
                return Err(ChError::RecordMismatch {
                    from,
                    end,
                    found: batch.end,
                });
            }
            self.settle(&client, &batch, entries).await?;
        }
        let mut checkpoint = recorded.in_flight_end;
        self.status.set_connected(true);
        self.status.set_delivered(checkpoint);
        tracing::info!(
            node = %self.node_id,
            server = %schema.server.text,
            insert_table = %entries.name("events_in"),
            database = %self.config.database,
            checkpoint,
            "delivering to ClickHouse"
        );

        // Retention by whole months, dropped by meterd: all of it on servers without TTL, and
        // on the others what the table's TTL does not cover (a table created before an upgrade
        // has none, and a TTL keeps the days it was created with).
        let retention = self.config.retention_days;
        let mut last_retention: Option<Instant> = None;
        // The next batch is read, and its blocks built, while the current one is inserted.
        let limits = Limits {
            rows: self.config.batch_rows,
            bytes: self.config.batch_bytes,
            age: self.config.batch_period,
        };
        let node = self.node_id.clone();
        let mut tailer = Tailer::new(
            Arc::clone(&self.log),
            checkpoint,
            limits,
            move |start, events| month_blocks(&node, start, events),
        );
        while !shutdown.is_cancelled() {
            if let Some(days) = retention
                && last_retention.is_none_or(|t| t.elapsed() >= RETENTION_INTERVAL)
            {
                last_retention = Some(Instant::now());
                if let Err(e) = self.drop_expired_months(&client, days).await {
                    tracing::warn!(error = %error_chain(&e), "dropping expired months of events");
                }
            }
            let Some(batch) = tailer.next().await? else {
                if recorded.checkpoint < checkpoint {
                    // Idle: record the last batch as delivered so the log can let it go.
                    recorded = self.record(checkpoint, checkpoint).await?;
                }
                let retention_due = async {
                    match (retention, last_retention) {
                        (Some(_), Some(t)) => {
                            tokio::time::sleep_until((t + RETENTION_INTERVAL).into()).await
                        }
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tailer.more() => continue,
                    () = retention_due => continue,
                }
            };
            // Durably before the first byte is sent; this also confirms `checkpoint`.
            recorded = self.record(checkpoint, batch.end).await?;
            for block in &batch.prepared {
                self.insert(&client, &entries.name("events_in"), block)
                    .await?;
            }
            checkpoint = batch.end;
            self.status.set_delivered(checkpoint);
            tracing::debug!(
                events = batch.events.len(),
                bytes = batch.bytes,
                checkpoint,
                "delivered to ClickHouse"
            );
        }
        Ok(())
    }

    /// The delivery record, or a fresh one at the log consumer's checkpoint.
    async fn load_record(&self) -> Result<DeliveryRecord, ChError> {
        let (start, end) = (self.log.start(), self.log.durable_end());
        let record = match load_delivery(&self.data_dir, SINK).map_err(ChError::Record)? {
            Some(r) => r,
            None => {
                let at = self.consumer.checkpoint().max(start);
                self.record(at, at).await?
            }
        };
        if record.in_flight_end > end {
            return Err(ChError::RecordOutsideLog {
                checkpoint: record.checkpoint,
                start,
                end,
            });
        }
        if record.checkpoint < start {
            // The log let go of records ClickHouse never confirmed: the sink was not configured
            // for a while (its consumer was not registered), or the data directory was
            // restored. Those events cannot be delivered from here any more.
            tracing::error!(
                checkpoint = record.checkpoint,
                log_start = start,
                "the ClickHouse delivery record is older than the log's start; the events in \
                 between are no longer in the log and are missing from ClickHouse"
            );
            return self.record(start, start).await;
        }
        Ok(record)
    }

    /// Writes the delivery record durably, then lets the log go of what it confirms.
    async fn record(&self, checkpoint: Lsn, in_flight_end: Lsn) -> Result<DeliveryRecord, ChError> {
        let record = DeliveryRecord {
            checkpoint,
            in_flight_end,
        };
        let dir = self.data_dir.clone();
        tokio::task::spawn_blocking(move || save_delivery(&dir, SINK, record))
            .await
            .map_err(|e| ChError::ReaderTask(e.to_string()))?
            .map_err(ChError::Record)?;
        self.consumer.advance(checkpoint);
        Ok(record)
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.config.database)
    }

    async fn insert(
        &self,
        client: &Client,
        entry: &str,
        block: &MonthBlock,
    ) -> Result<(), ChError> {
        let mut insert = client
            .insert_native_unescaped(&self.table(entry))
            .with_timeouts(Some(SEND_TIMEOUT), Some(END_TIMEOUT))
            // At most one insert of a delivery runs at a time: ClickHouse refuses a query whose
            // id is running, and settling waits for it (see `wait_for_earlier_inserts`).
            .with_setting("query_id", self.query_id(block.delivery))
            // One aggregation output block per view, so each table gets one part per insert.
            .with_setting("group_by_two_level_threshold", "0")
            .with_setting("group_by_two_level_threshold_bytes", "0");
        insert
            .write(&block.block)
            .await
            .map_err(query_err("sending an insert"))?;
        insert.end().await.map_err(query_err("finishing an insert"))
    }

    /// Drops the months of `events` that lie wholly before the retention cutoff (servers
    /// without TTL). The rollups keep those months.
    async fn drop_expired_months(&self, client: &Client, days: u32) -> Result<(), ChError> {
        let cutoff_us = chrono::Utc::now().timestamp_micros() - i64::from(days) * 86_400_000_000;
        // Before 1970 nothing can be expired; past 2105 everything the table can hold has.
        let cutoff_month = month_of(cutoff_us).unwrap_or(if cutoff_us < 0 { 0 } else { u32::MAX });
        let partitions: Vec<String> = client
            .query(
                "SELECT DISTINCT partition FROM system.parts \
                 WHERE database = ? AND table = 'events' AND active",
            )
            .bind(self.config.database.as_str())
            .fetch_all()
            .await
            .map_err(query_err("listing the partitions of events"))?;
        for partition in partitions {
            let Ok(month) = partition.trim_matches('\'').parse::<u32>() else {
                continue;
            };
            if month < cutoff_month {
                client
                    .query(&format!(
                        "ALTER TABLE {} DROP PARTITION {month}",
                        self.table("events")
                    ))
                    .execute()
                    .await
                    .map_err(query_err("dropping an expired month of events"))?;
                tracing::info!(
                    month,
                    retention_days = days,
                    "dropped an expired month of events"
                );
            }
        }
        Ok(())
    }

    /// The query id of every insert of `delivery`.
    fn query_id(&self, delivery: u64) -> String {
        format!("meterd-{}-{delivery:016x}", self.node_id)
    }

    /// Waits until no insert of `block`'s delivery runs on the server. ClickHouse finishes an
    /// insert it has received even after its client is gone (a crashed or timed-out meterd),
    /// so what the tables hold is final only then.
    async fn wait_for_earlier_inserts(
        &self,
        client: &Client,
        block: &MonthBlock,
    ) -> Result<(), ChError> {
        let query_id = self.query_id(block.delivery);
        let deadline = Instant::now() + END_TIMEOUT + Duration::from_secs(60);
        loop {
            let running: u64 = client
                .query("SELECT count() FROM system.processes WHERE query_id = ?")
                .bind(query_id.as_str())
                .fetch_one()
                .await
                .map_err(query_err("looking for an earlier insert still running"))?;
            if running == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ChError::StillRunning { query_id });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes every table hold each month block of `batch` exactly once, whatever part of it an
    /// earlier attempt wrote.
    async fn settle(
        &self,
        client: &Client,
        batch: &Batch<()>,
        entries: &Entries,
    ) -> Result<(), ChError> {
        let targets = schema::targets();
        for block in month_blocks(&self.node_id, batch.start, &batch.events)? {
            self.wait_for_earlier_inserts(client, &block).await?;
            let missing = self.missing(client, &targets, &block).await?;
            if missing.is_empty() {
                continue;
            }
            if missing.len() == targets.len() {
                self.insert(client, &entries.name("events_in"), &block)
                    .await?;
            } else {
                for target in &missing {
                    self.insert(client, &entries.name(&target.repair_entry), &block)
                        .await?;
                }
            }
            let still = self.missing(client, &targets, &block).await?;
            if let Some(target) = still.first() {
                return Err(ChError::RepairDidNotLand {
                    table: self.table(&target.table),
                    delivery: block.delivery,
                });
            }
            tracing::warn!(
                month = block.month,
                delivery = format!("{:#x}", block.delivery),
                tables = ?missing.iter().map(|t| t.table.as_str()).collect::<Vec<_>>(),
                "settled an insert whose outcome was unknown: sent it again to the tables \
                 that lacked it"
            );
        }
        Ok(())
    }

    /// The tables that do not hold `block`'s delivery.
    async fn missing(
        &self,
        client: &Client,
        targets: &[Target],
        block: &MonthBlock,
    ) -> Result<Vec<Target>, ChError> {
        let mut missing = Vec::new();
        for target in targets {
            let found: u64 = match target.kind {
                TargetKind::Events => client
                    .query(&format!(
                        "SELECT count() FROM {} WHERE _delivery = ? \
                         AND time >= toDateTime(?, 'UTC') AND time < toDateTime(?, 'UTC')",
                        self.table(&target.table)
                    ))
                    .bind(block.delivery)
                    .bind(block.min_time_us.div_euclid(1_000_000))
                    .bind(block.max_time_us.div_euclid(1_000_000) + 1),
                TargetKind::RollupState => client
                    .query(&format!(
                        "SELECT count() FROM {} WHERE tenant = '' AND _delivery = ?",
                        self.table(&target.table)
                    ))
                    .bind(block.delivery),
            }
            .fetch_one()
            .await
            .map_err(query_err("checking a delivery"))?;
            match (target.kind, found) {
                (_, 0) => missing.push(target.clone()),
                (TargetKind::RollupState, _) => {}
                (TargetKind::Events, n) if n == block.events => {}
                (TargetKind::Events, n) => {
                    return Err(ChError::PartialDelivery {
                        table: self.table(&target.table),
                        delivery: block.delivery,
                        found: n,
                        expected: block.events,
                    });
                }
            }
        }
        Ok(missing)
    }
}
