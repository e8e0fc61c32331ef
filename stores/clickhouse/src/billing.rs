//! Usage for invoices from ClickHouse: each meter's statement in ClickHouse's dialect (the same
//! on 18.16 and current servers), run on the server under the SQL API's time limit; only the
//! aggregated rows come back.

use std::time::Duration;

use async_trait::async_trait;
use clickhouse::Client;
use meterd_billing::filter::FilterDialect;
use meterd_billing::{UsageDialect, UsageError, UsageSource};

/// ClickHouse's spelling of a usage statement, for the tables of `database`.
#[derive(Debug, Clone)]
pub struct ClickHouseDialect {
    /// `database.events`.
    events: String,
}

impl ClickHouseDialect {
    /// The dialect for the tables of `database`.
    pub fn new(database: &str) -> Self {
        Self {
            events: format!("{database}.events"),
        }
    }
}

impl FilterDialect for ClickHouseDialect {
    /// ClickHouse reads backslash escapes in string literals, so backslashes are doubled too.
    fn text_literal(&self, s: &str) -> String {
        format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
    }

    fn boolean(&self, b: bool) -> &'static str {
        // 18.16 has no boolean literals.
        if b { "1" } else { "0" }
    }

    /// 18.16 answers `NULL NOT IN (...)` with true and its AND/OR are not SQL's over NULL;
    /// current servers answer `NOT (NULL IN (...))` with true.
    fn spells_out_null_logic(&self) -> bool {
        true
    }
}

impl UsageDialect for ClickHouseDialect {
    /// Exact on `time_us`; the bounds on `time` (its second, or DateTime64 of it) are implied
    /// by them and let ClickHouse use its partitions and sorting key.
    fn time_range(&self, from_us: i64, to_us: i64) -> String {
        let mut sql = format!("time_us >= {from_us} AND time_us < {to_us}");
        // `DateTime` holds seconds from 1970 to 2106 in 32 bits: a bound outside that range
        // would wrap, so it is left to `time_us` alone.
        let seconds = |us: i64| u32::try_from(us.div_euclid(1_000_000)).ok();
        if let Some(from_s) = seconds(from_us) {
            sql.push_str(&format!(" AND time >= toDateTime({from_s})"));
        }
        if let Some(to_s) = seconds(to_us).and_then(|s| s.checked_add(1)) {
            sql.push_str(&format!(" AND time <= toDateTime({to_s})"));
        }
        sql
    }

    fn count(&self) -> String {
        "toString(count())".to_owned()
    }

    /// 128-bit decimals add without wrapping, as PostgreSQL's `numeric`.
    fn sum(&self, column: &str) -> String {
        format!("toString(sum(toDecimal128({column}, 0)))")
    }

    fn unique_count(&self, column: &str) -> String {
        format!("toString(uniqExact({column}))")
    }

    fn max(&self, column: &str) -> String {
        format!("toString(max({column}))")
    }

    /// Rows whose value is NULL are skipped (aggregates skip NULL arguments).
    fn latest(&self, column: &str) -> String {
        format!("toString(argMax({column}, tuple(time_us, id)))")
    }

    fn text(&self, column: &str) -> String {
        format!("toString({column})")
    }

    fn events(&self) -> String {
        self.events.clone()
    }

    fn time_us(&self) -> String {
        "time_us".to_owned()
    }

    fn int_div(&self, a: &str, b: &str) -> String {
        format!("intDiv({a}, {b})")
    }

    fn integer_text(&self, expr: &str) -> String {
        format!("toString({expr})")
    }
}

/// Runs usage statements over HTTP.
#[derive(Debug)]
pub struct ClickHouseUsage {
    client: Client,
    dialect: ClickHouseDialect,
    timeout: Duration,
}

impl ClickHouseUsage {
    pub fn new(client: Client, database: &str, timeout: Duration) -> Self {
        Self {
            client,
            dialect: ClickHouseDialect::new(database),
            timeout,
        }
    }
}

#[async_trait]
impl UsageSource for ClickHouseUsage {
    fn name(&self) -> &str {
        "clickhouse"
    }

    fn dialect(&self) -> &dyn UsageDialect {
        &self.dialect
    }

    async fn rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, UsageError> {
        let failed = |message: String| UsageError::Store {
            store: "clickhouse".to_owned(),
            message,
        };
        // Sent verbatim: a `?` in a literal is text, not a bind placeholder. Every value is a
        // string (or NULL), so JSONEachRow gives it back exactly.
        let mut cursor = self
            .client
            .query_raw(sql)
            .with_setting(
                "max_execution_time",
                self.timeout.as_secs().max(1).to_string(),
            )
            .fetch_bytes("JSONEachRow")
            .map_err(|e| failed(e.to_string()))?;
        let mut body = Vec::new();
        while let Some(chunk) = cursor.next().await.map_err(|e| failed(e.to_string()))? {
            body.extend_from_slice(&chunk);
        }
        let mut rows = Vec::new();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(line).map_err(|e| failed(format!("reading a row: {e}")))?;
            // The select list names its items c0, c1, ...: read them in that order.
            let row = (0..object.len())
                .map(|i| match object.remove(&format!("c{i}")) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s),
                    Some(other) => Some(other.to_string()),
                })
                .collect();
            rows.push(row);
        }
        Ok(rows)
    }
}
