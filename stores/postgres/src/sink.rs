//! The delivery loop: log -> binary COPY, one transaction per batch with the checkpoint.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meterd_ingest::log::{Consumer, LogShared, Lsn};
use meterd_ingest::sink::{SinkHandle, retrying, spawn_sink};
use meterd_ingest::tailer::{Limits, Tailer};
use meterd_schemas::StoredEvent;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::migrations::Flavor;
use crate::{PgError, PostgresConfig, SinkStatus, copy, error_chain, sql_err, upkeep};

/// How long a batch waits for more events before it is delivered short of `batch_rows`.
const BATCH_AGE: Duration = Duration::from_millis(20);

/// Starts delivering this node's log to PostgreSQL, and the upkeep task. Both retry every
/// failure with backoff until `shutdown` is cancelled.
pub fn spawn(
    log: Arc<LogShared>,
    consumer: Consumer,
    node_id: String,
    config: PostgresConfig,
    shutdown: CancellationToken,
) -> SinkHandle {
    let status = Arc::new(SinkStatus::default());
    let config = Arc::new(config);
    let sink = Sink {
        log,
        consumer,
        node_id,
        config: Arc::clone(&config),
        status: Arc::clone(&status),
    };
    let upkeep_status = Arc::clone(&status);
    let upkeep_task = tokio::spawn(retrying(
        "postgres",
        "upkeep",
        shutdown.clone(),
        move |token| {
            let config = Arc::clone(&config);
            let status = Arc::clone(&upkeep_status);
            async move {
                let result = upkeep::session(&config, &token, &status).await;
                if let Err(e) = &result {
                    status.set_refresher_error(Some(error_chain(e)));
                }
                result
            }
        },
    ));
    spawn_sink(
        "postgres",
        shutdown,
        move |token| {
            let sink = sink.clone();
            async move { sink.deliver_until_shutdown(&token).await }
        },
        vec![upkeep_task],
        status,
    )
}

/// Connects (without TLS) and spawns the connection's driver. Unless the URL says otherwise,
/// connecting gives up after 10 s and a dead peer is noticed within about a minute (TCP
/// keepalives and user timeout), so an outage or a cut network ends a session instead of
/// hanging it.
pub async fn connect(config: &PostgresConfig) -> Result<Client, PgError> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(PgError::Connect)?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(10));
    }
    pg.keepalives(true);
    if pg.get_keepalives_idle() == Duration::from_secs(2 * 3600) {
        pg.keepalives_idle(Duration::from_secs(30));
    }
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(Duration::from_secs(60));
    }
    let (client, connection) = pg.connect(NoTls).await.map_err(PgError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    // A session left behind by a cut network must not hold this node's checkpoint row (or a
    // lock) for hours: the server ends it once it has idled inside a transaction this long.
    client
        .batch_execute("SET idle_in_transaction_session_timeout = '60s'")
        .await
        .map_err(sql_err("configuring the session"))?;
    Ok(client)
}

#[derive(Debug, Clone)]
struct Sink {
    log: Arc<LogShared>,
    consumer: Consumer,
    node_id: String,
    config: Arc<PostgresConfig>,
    status: Arc<SinkStatus>,
}

type Batch = meterd_ingest::tailer::Batch<()>;

impl Sink {
    async fn deliver_until_shutdown(&self, shutdown: &CancellationToken) -> Result<(), PgError> {
        let mut client = connect(&self.config).await?;
        let report = crate::migrate(&mut client, &self.config).await?;
        let mut lsn = self.claim_checkpoint(&client).await?;
        self.consumer.advance(lsn);
        self.status.set_connected(true);
        self.status.set_delivered(lsn);
        tracing::info!(
            node = %self.node_id,
            flavor = report.flavor.as_str(),
            schema_version = report.version,
            checkpoint = lsn,
            "delivering to PostgreSQL"
        );

        let mut partitions: HashSet<i64> = HashSet::new();
        // The next batch is read from the log while the current one is committed. Batches are
        // cut by rows (a COPY streams, so bytes do not pile up) and by a short age, so that at a
        // low rate several group commits share a transaction instead of one each.
        let limits = Limits {
            rows: self.config.batch_rows,
            bytes: usize::MAX,
            age: BATCH_AGE,
        };
        let mut tailer: Tailer<(), PgError> =
            Tailer::new(Arc::clone(&self.log), lsn, limits, |_, _| Ok(()));
        while !shutdown.is_cancelled() {
            let Some(batch) = tailer.next().await? else {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tailer.more() => continue,
                }
            };
            if report.flavor == Flavor::Postgres {
                ensure_partitions(&client, &batch.events, &mut partitions).await?;
            }
            self.commit(&mut client, &batch, lsn).await?;
            lsn = batch.end;
            self.consumer.advance(lsn);
            self.status.set_delivered(lsn);
        }
        Ok(())
    }

    /// This node's committed checkpoint, created from the local one on first contact.
    async fn claim_checkpoint(&self, client: &Client) -> Result<Lsn, PgError> {
        let local = self.consumer.checkpoint().max(self.log.start());
        client
            .execute(
                "INSERT INTO meterd.sink_checkpoints (node_id, lsn) VALUES ($1, $2)
                 ON CONFLICT (node_id) DO NOTHING",
                &[&self.node_id, &to_i64(local)],
            )
            .await
            .map_err(sql_err("creating this node's checkpoint"))?;
        let committed: i64 = client
            .query_one(
                "SELECT lsn FROM meterd.sink_checkpoints WHERE node_id = $1",
                &[&self.node_id],
            )
            .await
            .map_err(sql_err("reading this node's checkpoint"))?
            .try_get(0)
            .map_err(sql_err("reading a result column"))?;
        let committed =
            u64::try_from(committed).map_err(|_| PgError::NegativeCheckpoint(committed))?;
        let (start, end) = (self.log.start(), self.log.durable_end());
        if committed > end {
            return Err(PgError::CheckpointAhead {
                database: committed,
                end,
            });
        }
        if committed < start {
            tracing::error!(
                checkpoint = committed,
                log_start = start,
                "PostgreSQL's checkpoint for this node is older than the log's start (was the \
                 database restored from an older backup?); the events in between are no longer \
                 in the log and are missing from PostgreSQL"
            );
            client
                .execute(
                    "UPDATE meterd.sink_checkpoints SET lsn = $2, updated_at = now() WHERE node_id = $1",
                    &[&self.node_id, &to_i64(start)],
                )
                .await
                .map_err(sql_err("moving this node's checkpoint to the log's start"))?;
            return Ok(start);
        }
        Ok(committed)
    }

    /// Delivers the batch and moves the checkpoint from `from` to its end, in one transaction.
    /// Normally a plain COPY. If the batch holds an event PostgreSQL already has (the unique
    /// `(tenant, time, id)` index says so: another meterd node delivered it), the batch is sent
    /// again through a staging table with `ON CONFLICT DO NOTHING`, so it adds only new events.
    async fn commit(&self, client: &mut Client, batch: &Batch, from: Lsn) -> Result<(), PgError> {
        match self.deliver(client, batch, from, Delivery::Copy).await {
            Err(PgError::Sql { source, .. })
                if source.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
            {
                self.deliver(client, batch, from, Delivery::SkipExisting)
                    .await
            }
            other => other,
        }
    }

    async fn deliver(
        &self,
        client: &mut Client,
        batch: &Batch,
        from: Lsn,
        how: Delivery,
    ) -> Result<(), PgError> {
        let tx = client
            .transaction()
            .await
            .map_err(sql_err("starting a delivery"))?;
        let target = match how {
            Delivery::Copy => "meterd.events_data",
            Delivery::SkipExisting => {
                tx.batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS meterd_staging
                         (LIKE meterd.events_data) ON COMMIT DELETE ROWS",
                )
                .await
                .map_err(sql_err("creating the staging table"))?;
                "meterd_staging"
            }
        };
        let sink = tx
            .copy_in(&copy::copy_statement(target))
            .await
            .map_err(sql_err("starting COPY into meterd.events_data"))?;
        let writer = BinaryCopyInWriter::new(sink, &copy::types());
        tokio::pin!(writer);
        for event in &batch.events {
            copy::write_event(writer.as_mut(), event).await?;
        }
        writer
            .finish()
            .await
            .map_err(sql_err("finishing COPY into meterd.events_data"))?;
        if how == Delivery::SkipExisting {
            let inserted = tx
                .execute(
                    "INSERT INTO meterd.events_data SELECT * FROM meterd_staging
                     ON CONFLICT DO NOTHING",
                    &[],
                )
                .await
                .map_err(sql_err("inserting the new events of a batch"))?;
            tracing::warn!(
                events = batch.events.len(),
                already_stored = (batch.events.len() as u64).saturating_sub(inserted),
                "a batch held events PostgreSQL already had (delivered by another meterd \
                 node); stored only the new ones"
            );
        }
        let moved = tx
            .execute(
                "UPDATE meterd.sink_checkpoints SET lsn = $3, updated_at = now()
                 WHERE node_id = $1 AND lsn = $2",
                &[&self.node_id, &to_i64(from), &to_i64(batch.end)],
            )
            .await
            .map_err(sql_err("advancing this node's checkpoint"))?;
        if moved != 1 {
            return Err(PgError::CheckpointMoved { expected: from });
        }
        tx.commit()
            .await
            .map_err(sql_err("committing a delivery"))?;
        tracing::debug!(
            events = batch.events.len(),
            checkpoint = batch.end,
            "delivered to PostgreSQL"
        );
        Ok(())
    }
}

/// How a batch goes into `meterd.events_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Straight COPY: the fast path.
    Copy,
    /// COPY into a staging table, then `INSERT ... ON CONFLICT DO NOTHING`.
    SkipExisting,
}

fn to_i64(lsn: Lsn) -> i64 {
    // Log positions are byte offsets; 2^63 bytes is beyond any log.
    i64::try_from(lsn).unwrap_or(i64::MAX)
}

/// Creates the daily partitions the batch needs that this session has not seen yet (plain
/// PostgreSQL), in their own transaction before the COPY.
async fn ensure_partitions(
    client: &Client,
    events: &[StoredEvent],
    known: &mut HashSet<i64>,
) -> Result<(), PgError> {
    const DAY_US: i64 = 86_400_000_000;
    let missing: HashSet<i64> = events
        .iter()
        .map(|e| e.event.time_us.div_euclid(DAY_US) * DAY_US)
        .filter(|d| !known.contains(d))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let times: Vec<DateTime<Utc>> = missing
        .iter()
        .filter_map(|&us| DateTime::from_timestamp_micros(us))
        .collect();
    client
        .execute("SELECT meterd.ensure_event_partitions($1)", &[&times])
        .await
        .map_err(sql_err("creating partitions of meterd.events_data"))?;
    known.extend(missing);
    Ok(())
}
