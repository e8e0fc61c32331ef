//! Plain PostgreSQL upkeep: the rollup refresher, partitions ahead of time, retention.
//! On TimescaleDB the extension's own policies do all of this, and the task only reads when
//! their continuous aggregate refreshes last succeeded, for the refresh lag.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use crate::migrations::Flavor;
use crate::sink::connect;
use crate::{PgError, PostgresConfig, SinkStatus, sql_err};

/// How often partitions ahead and retention are looked after.
const PARTITION_INTERVAL: Duration = Duration::from_secs(3600);

/// When every one of meterd's continuous aggregates last finished a refresh by its policy
/// (µs since 1970; NULL until each has): the oldest of their last successful runs.
pub const TIMESCALEDB_REFRESHED_AT: &str = "\
    SELECT (extract(epoch FROM min(s.last_successful_finish)) * 1000000)::bigint AS at_us \
      FROM timescaledb_information.jobs j \
      LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id \
     WHERE j.proc_name = 'policy_refresh_continuous_aggregate' \
       AND (j.config->>'mat_hypertable_id')::int IN ( \
           SELECT mat_hypertable_id FROM _timescaledb_catalog.continuous_agg \
            WHERE user_view_schema = 'meterd') \
    HAVING count(*) > 0 AND count(*) = count(s.last_successful_finish)";

pub(crate) async fn session(
    config: &PostgresConfig,
    shutdown: &CancellationToken,
    status: &SinkStatus,
) -> Result<(), PgError> {
    let client = connect(config).await?;
    // Wait for the sink to have migrated the schema.
    let current = crate::migrations::POSTGRES.last().map_or(0, |m| m.version);
    let flavor = loop {
        let row = client
            .query_opt(
                "SELECT flavor, max(version) FROM meterd.schema_migrations GROUP BY flavor",
                &[],
            )
            .await;
        match row {
            Ok(Some(row)) => {
                let (name, version): (String, i32) = (
                    row.try_get(0).map_err(sql_err("reading a result column"))?,
                    row.try_get(1).map_err(sql_err("reading a result column"))?,
                );
                if version >= current {
                    break Flavor::parse(&name).ok_or(PgError::UnknownFlavor(name))?;
                }
            }
            Ok(None) => {}
            // Before the first migration the table does not exist yet: ask again shortly.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {}
            Err(e) => return Err(sql_err("reading the schema version")(e)),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    if flavor == Flavor::TimescaleDb {
        loop {
            let at: Option<i64> = client
                .query_opt(TIMESCALEDB_REFRESHED_AT, &[])
                .await
                .map_err(sql_err("reading the continuous aggregates' refresh jobs"))?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(sql_err("reading a result column"))?
                .flatten();
            status.set_refresher_error(None);
            if let Some(at) = at {
                status.set_rollups_refreshed_at_us(at);
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(config.refresh_interval) => {}
            }
        }
    }

    let mut last_partitions: Option<Instant> = None;
    loop {
        if last_partitions.is_none_or(|t| t.elapsed() >= PARTITION_INTERVAL) {
            partitions(&client, config, Utc::now()).await?;
            last_partitions = Some(Instant::now());
        }
        let started = Instant::now();
        let started_at = Utc::now();
        let buckets: i64 = client
            .query_one("SELECT meterd.refresh_rollups()", &[])
            .await
            .map_err(sql_err("refreshing rollups (meterd.refresh_rollups)"))?
            .try_get(0)
            .map_err(sql_err("reading a result column"))?;
        status.set_refresher_error(None);
        status.set_rollups_refreshed_at_us(started_at.timestamp_micros());
        if buckets > 0 {
            tracing::debug!(
                buckets,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "refreshed rollups"
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(config.refresh_interval) => {}
        }
    }
}

/// Creates partitions for today and the days ahead, and drops those past retention.
async fn partitions(
    client: &tokio_postgres::Client,
    config: &PostgresConfig,
    now: DateTime<Utc>,
) -> Result<(), PgError> {
    let days: Vec<DateTime<Utc>> = (0..=i64::from(config.partitions_ahead_days))
        .map(|d| now + chrono::Duration::days(d))
        .collect();
    client
        .execute("SELECT meterd.ensure_event_partitions($1)", &[&days])
        .await
        .map_err(sql_err("creating partitions ahead"))?;
    if let Some(retention) = &config.retention {
        let dropped: i32 = client
            .query_one(
                "SELECT meterd.drop_event_partitions(now() - $1::text::interval)",
                &[retention],
            )
            .await
            .map_err(sql_err(
                "dropping partitions past retention (postgres.retention)",
            ))?
            .try_get(0)
            .map_err(sql_err("reading a result column"))?;
        if dropped > 0 {
            tracing::info!(
                dropped,
                "dropped partitions of meterd.events_data past retention"
            );
        }
    }
    Ok(())
}
