//! The delivery loop: log -> one `Native` block per month per batch, with a durable delivery
//! record and settling of every batch whose outcome was not seen.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickhouse::Client;
use meterd_schemas::StoredEvent;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::block::{MonthBlock, month_blocks, month_of};
use super::schema::{self, Target, TargetKind};
use super::{ChError, ClickHouseConfig, SinkStatus, query_err};
use crate::log::{Consumer, LogReader, LogShared, Lsn};
use crate::sink::{DeliveryRecord, error_chain, load_delivery, retrying, save_delivery};

/// The name of this sink's log consumer and files under `sinks/`.
pub const SINK: &str = "clickhouse";

/// How long the sink waits for new log records once it has caught up.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Time limits of one insert: sending a chunk, and the server's whole handling of it
/// (materialized views included).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
const END_TIMEOUT: Duration = Duration::from_secs(300);

/// How often retention runs where meterd drops expired months itself.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// A running ClickHouse sink.
#[derive(Debug)]
pub struct ClickHouseHandle {
    pub status: Arc<SinkStatus>,
    task: JoinHandle<()>,
}

impl ClickHouseHandle {
    /// Waits for the sink to end (after the shutdown token was cancelled). An insert in flight
    /// is abandoned; the delivery record makes the next start settle it.
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the ClickHouse sink panicked");
        }
    }
}

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
) -> ClickHouseHandle {
    let status = Arc::new(SinkStatus::default());
    let sink = Sink {
        log,
        consumer,
        node_id,
        data_dir,
        config: Arc::new(config),
        status: Arc::clone(&status),
    };
    let task = tokio::spawn(retrying(SINK, "sink", shutdown, move |token| {
        let sink = sink.clone();
        async move { sink.session(&token).await }
    }));
    ClickHouseHandle { status, task }
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

/// Events read from the log, from `start` up to `end` (whole records), and once built, their
/// month blocks.
struct Batch {
    start: Lsn,
    end: Lsn,
    events: Vec<StoredEvent>,
    bytes: usize,
    blocks: Vec<MonthBlock>,
}

/// What one blocking read step produced.
struct Step {
    reader: LogReader,
    events: Vec<StoredEvent>,
    end: Lsn,
    bytes: usize,
    caught_up: bool,
}

impl Sink {
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), ChError> {
        let result = self.deliver_until_shutdown(shutdown).await;
        if let Err(e) = &result {
            self.status.set_error(error_chain(e));
        }
        result
    }

    async fn deliver_until_shutdown(&self, shutdown: &CancellationToken) -> Result<(), ChError> {
        let client = client(&self.config);
        let version = schema::ensure(&client, &self.config).await?;
        let mut recorded = self.load_record().await?;
        if recorded.in_flight_end > recorded.checkpoint {
            // The last batch was sent, or was being sent, when this node stopped or failed.
            let batch = self
                .read_exact(recorded.checkpoint, recorded.in_flight_end)
                .await?;
            self.settle(&client, &batch).await?;
        }
        let mut checkpoint = recorded.in_flight_end;
        self.status.set_connected(true);
        self.status.set_delivered(checkpoint);
        tracing::info!(
            node = %self.node_id,
            server = %version.text,
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
        let mut next = self.read_ahead(None, checkpoint);
        while !shutdown.is_cancelled() {
            if let Some(days) = retention
                && last_retention.is_none_or(|t| t.elapsed() >= RETENTION_INTERVAL)
            {
                last_retention = Some(Instant::now());
                if let Err(e) = self.drop_expired_months(&client, days).await {
                    tracing::warn!(error = %error_chain(&e), "dropping expired months of events");
                }
            }
            let (reader, batch) = next
                .await
                .map_err(|e| ChError::ReaderTask(e.to_string()))??;
            if batch.events.is_empty() {
                next = self.read_ahead(Some(reader), checkpoint);
                if recorded.checkpoint < checkpoint {
                    // Idle: record the last batch as delivered so the log can let it go.
                    recorded = self.record(checkpoint, checkpoint).await?;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(IDLE_POLL) => continue,
                }
            }
            next = self.read_ahead(Some(reader), batch.end);
            // Durably before the first byte is sent; this also confirms `checkpoint`.
            recorded = self.record(checkpoint, batch.end).await?;
            for block in &batch.blocks {
                self.insert(&client, "events_in", block).await?;
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

    /// Starts reading the batch from `from` and building its blocks, on a task of its own.
    fn read_ahead(
        &self,
        reader: Option<LogReader>,
        from: Lsn,
    ) -> JoinHandle<Result<(LogReader, Batch), ChError>> {
        let sink = self.clone();
        tokio::spawn(async move {
            let (reader, mut batch) = sink.next_batch(reader, from).await?;
            if !batch.events.is_empty() {
                batch = sink.build_blocks(batch).await?;
            }
            Ok((reader, batch))
        })
    }

    /// Builds the month blocks of `batch` on a blocking thread.
    async fn build_blocks(&self, mut batch: Batch) -> Result<Batch, ChError> {
        let node = self.node_id.clone();
        tokio::task::spawn_blocking(move || {
            batch.blocks = month_blocks(&node, batch.start, &batch.events)?;
            Ok(batch)
        })
        .await
        .map_err(|e| ChError::ReaderTask(e.to_string()))?
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

    /// Reads the next batch from `from`: up to the row or byte limit, or what there is once
    /// the first event has waited `batch_period`. Empty when the log has nothing new.
    async fn next_batch(
        &self,
        reader: Option<LogReader>,
        from: Lsn,
    ) -> Result<(LogReader, Batch), ChError> {
        let mut batch = Batch {
            start: from,
            end: from,
            events: Vec::new(),
            bytes: 0,
            blocks: Vec::new(),
        };
        let mut reader = reader;
        let mut first_read: Option<Instant> = None;
        loop {
            let step = self
                .read_step(
                    reader.take(),
                    batch.end,
                    self.config.batch_rows.saturating_sub(batch.events.len()),
                    self.config.batch_bytes.saturating_sub(batch.bytes),
                    None,
                )
                .await?;
            if !step.events.is_empty() {
                first_read.get_or_insert_with(Instant::now);
            }
            batch.events.extend(step.events);
            batch.end = step.end;
            batch.bytes += step.bytes;
            reader = Some(step.reader);
            let full = batch.events.len() >= self.config.batch_rows
                || batch.bytes >= self.config.batch_bytes;
            let waited = first_read.is_some_and(|t| t.elapsed() >= self.config.batch_period);
            if full || waited || batch.events.is_empty() {
                let reader = reader.ok_or_else(|| ChError::ReaderTask("no log reader".into()))?;
                return Ok((reader, batch));
            }
            if step.caught_up {
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }

    /// Re-reads exactly the records from `from` to `end`: a batch sent before, with the same
    /// boundaries.
    async fn read_exact(&self, from: Lsn, end: Lsn) -> Result<Batch, ChError> {
        let step = self
            .read_step(None, from, usize::MAX, usize::MAX, Some(end))
            .await?;
        if step.end != end {
            return Err(ChError::RecordMismatch {
                from,
                end,
                found: step.end,
            });
        }
        Ok(Batch {
            start: from,
            end,
            events: step.events,
            bytes: step.bytes,
            blocks: Vec::new(),
        })
    }

    /// Reads whole records from `from` on a blocking thread, until `max_rows` events or
    /// `max_bytes` bytes (at least one record if there is one), the log's end, or `until`.
    async fn read_step(
        &self,
        reader: Option<LogReader>,
        from: Lsn,
        max_rows: usize,
        max_bytes: usize,
        until: Option<Lsn>,
    ) -> Result<Step, ChError> {
        let log = Arc::clone(&self.log);
        tokio::task::spawn_blocking(move || -> Result<Step, crate::Error> {
            let mut reader = match reader {
                Some(r) if r.position() == from => r,
                _ => log.reader(from)?,
            };
            let (mut events, mut end, mut bytes, mut caught_up) = (Vec::new(), from, 0, false);
            let mut payload = Vec::new();
            while events.len() < max_rows.max(1) && bytes < max_bytes.max(1) {
                if until.is_some_and(|u| end >= u) {
                    break;
                }
                let Some((lsn, record_end)) = reader.next_record(&mut payload)? else {
                    caught_up = true;
                    break;
                };
                events.extend(crate::decode_record(lsn, &payload)?);
                bytes += payload.len();
                end = record_end;
            }
            Ok(Step {
                reader,
                events,
                end,
                bytes,
                caught_up,
            })
        })
        .await
        .map_err(|e| ChError::ReaderTask(e.to_string()))?
        .map_err(ChError::Log)
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
    async fn settle(&self, client: &Client, batch: &Batch) -> Result<(), ChError> {
        let targets = schema::targets();
        for block in month_blocks(&self.node_id, batch.start, &batch.events)? {
            self.wait_for_earlier_inserts(client, &block).await?;
            let missing = self.missing(client, &targets, &block).await?;
            if missing.is_empty() {
                continue;
            }
            if missing.len() == targets.len() {
                self.insert(client, "events_in", &block).await?;
            } else {
                for target in &missing {
                    self.insert(client, &target.repair_entry, &block).await?;
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
