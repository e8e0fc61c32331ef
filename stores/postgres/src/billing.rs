//! Usage for invoices from PostgreSQL: each meter's statement in PostgreSQL's dialect, run in a
//! read-only transaction under the SQL API's time limit, so the aggregation happens in the
//! database and only one row per meter (or per model) comes back.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{SecondsFormat, TimeZone, Utc};
use deadpool_postgres::Pool;
use meterd_billing::filter::FilterDialect;
use std::collections::BTreeMap;

use meterd_billing::closed::ClosedError;
use meterd_billing::{ClosedStore, Period, UsageDialect, UsageError, UsageSource};
use tokio_postgres::SimpleQueryMessage;

/// PostgreSQL's spelling of a usage statement.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostgresDialect;

impl FilterDialect for PostgresDialect {
    /// meterd orders text by its bytes on every store; so does the "C" collation, whatever
    /// the column's own is.
    fn text_in_byte_order(&self, name: &str) -> String {
        format!("{name} COLLATE \"C\"")
    }
}

/// An instant as a `timestamptz` literal, exact to the microsecond.
fn timestamp(us: i64) -> String {
    let t = Utc
        .timestamp_micros(us)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true);
    format!("'{t}'::timestamptz")
}

impl UsageDialect for PostgresDialect {
    fn time_range(&self, from_us: i64, to_us: i64) -> String {
        format!(
            "time >= {} AND time < {}",
            timestamp(from_us),
            timestamp(to_us)
        )
    }

    fn count(&self) -> String {
        "count(*)::text".to_owned()
    }

    /// `sum(bigint)` is `numeric`: it never wraps.
    fn sum(&self, column: &str) -> String {
        format!("sum({column})::text")
    }

    fn unique_count(&self, column: &str) -> String {
        format!("count(DISTINCT {column})::text")
    }

    fn max(&self, column: &str) -> String {
        format!("max({column})::text")
    }

    fn latest(&self, column: &str) -> String {
        format!(
            "((array_agg({column} ORDER BY time DESC, id COLLATE \"C\" DESC) \
             FILTER (WHERE {column} IS NOT NULL))[1])::text"
        )
    }

    /// The table under `meterd.events`: meterd's own role sees every tenant, and the view's
    /// tenant filter would keep PostgreSQL from scanning in parallel.
    fn events(&self) -> String {
        "meterd.events_data".to_owned()
    }

    /// `extract` gives `numeric` (exact to the microsecond) from PostgreSQL 14 on.
    fn time_us(&self) -> String {
        "(extract(epoch FROM time) * 1000000)::bigint".to_owned()
    }
}

/// Runs usage statements on a pool of connections.
#[derive(Debug)]
pub struct PostgresUsage {
    pool: Pool,
    statement_timeout: Duration,
}

impl PostgresUsage {
    pub fn new(pool: Pool, statement_timeout: Duration) -> Self {
        Self {
            pool,
            statement_timeout,
        }
    }
}

#[async_trait]
impl UsageSource for PostgresUsage {
    fn name(&self) -> &str {
        "postgres"
    }

    fn dialect(&self) -> &dyn UsageDialect {
        &PostgresDialect
    }

    async fn rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, UsageError> {
        let failed = |e: &dyn std::fmt::Display| UsageError::Store {
            store: "postgres".to_owned(),
            message: e.to_string(),
        };
        let mut client = self.pool.get().await.map_err(|e| failed(&e))?;
        // Dropped without a commit on any error: rolled back, the connection clean again.
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| failed(&e))?;
        // Literals are quoted by doubling `'` only: backslashes must stay plain characters
        // whatever the server's default.
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}; SET LOCAL standard_conforming_strings = on",
            self.statement_timeout.as_millis().max(1)
        ))
        .await
        .map_err(|e| failed(&e))?;
        let messages = tx.simple_query(sql).await.map_err(|e| failed(&e))?;
        tx.commit().await.map_err(|e| failed(&e))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }
}

/// Closed invoices in `meterd.closed_invoices`, so every node answers the same ones.
#[derive(Debug)]
pub struct PostgresClosedStore {
    pool: Pool,
}

impl PostgresClosedStore {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

fn closed_error(e: &dyn std::fmt::Display) -> ClosedError {
    ClosedError::Store(format!("PostgreSQL: {e}"))
}

#[async_trait]
impl ClosedStore for PostgresClosedStore {
    async fn load(&self, tenant: &str) -> Result<BTreeMap<Period, Vec<u8>>, ClosedError> {
        let client = self.pool.get().await.map_err(|e| closed_error(&e))?;
        let rows = client
            .query(
                "SELECT period, body FROM meterd.closed_invoices WHERE tenant = $1",
                &[&tenant],
            )
            .await
            .map_err(|e| closed_error(&e))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let period: String = row.try_get(0).map_err(|e| closed_error(&e))?;
            let body: Vec<u8> = row.try_get(1).map_err(|e| closed_error(&e))?;
            let period = period
                .parse::<Period>()
                .map_err(|e| closed_error(&format!("a stored period: {e}")))?;
            out.insert(period, body);
        }
        Ok(out)
    }

    /// The first node to close a period stores its invoice; the others keep that one.
    async fn store(
        &self,
        tenant: &str,
        period: Period,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClosedError> {
        let client = self.pool.get().await.map_err(|e| closed_error(&e))?;
        let period = period.to_string();
        client
            .execute(
                "INSERT INTO meterd.closed_invoices (tenant, period, body) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant, period) DO NOTHING",
                &[&tenant, &period, &body],
            )
            .await
            .map_err(|e| closed_error(&e))?;
        let row = client
            .query_one(
                "SELECT body FROM meterd.closed_invoices WHERE tenant = $1 AND period = $2",
                &[&tenant, &period],
            )
            .await
            .map_err(|e| closed_error(&e))?;
        row.try_get(0).map_err(|e| closed_error(&e))
    }
}
