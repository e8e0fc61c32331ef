//! Where usage comes from: each meter's aggregation and the token sums of LLM cost, rendered
//! as one SQL statement each in the store's dialect and run inside the store. Only the
//! aggregated rows come back, as text (the one representation every store gives exactly).

use std::fmt;

use async_trait::async_trait;
use rust_decimal::Decimal;

use crate::config::Aggregation;
use crate::filter::FilterDialect;
use crate::meter::Meter;

/// How a store writes the parts of a usage statement a filter does not have.
pub trait UsageDialect: FilterDialect + Send + Sync {
    /// `time` at or after `from_us` and before `to_us` (microseconds since the epoch, UTC),
    /// exactly to the microsecond.
    fn time_range(&self, from_us: i64, to_us: i64) -> String;

    /// The number of rows, as text.
    fn count(&self) -> String {
        "CAST(count(*) AS VARCHAR)".to_owned()
    }

    /// The exact sum of an integer column (never wrapping), as text; NULL without rows.
    fn sum(&self, column: &str) -> String;

    /// The number of distinct non-NULL values, as text.
    fn unique_count(&self, column: &str) -> String {
        format!("CAST(count(DISTINCT {}) AS VARCHAR)", self.column(column))
    }

    /// The largest value of an integer column, as text.
    fn max(&self, column: &str) -> String {
        format!("CAST(max({}) AS VARCHAR)", self.column(column))
    }

    /// The value of an integer column in the latest row that has one (greatest `time`, then
    /// greatest `id`), as text.
    fn latest(&self, column: &str) -> String;

    /// A text column's value as text (for `GROUP BY` keys).
    fn text(&self, column: &str) -> String {
        self.column(column)
    }

    /// The events table, qualified as the store needs.
    fn events(&self) -> String {
        "events".to_owned()
    }
}

/// Runs usage statements where the events are.
#[async_trait]
pub trait UsageSource: Send + Sync + fmt::Debug {
    /// The store's name (`embedded`, `postgres`, `clickhouse`), shown in an invoice's inputs.
    fn name(&self) -> &str;

    fn dialect(&self) -> &dyn UsageDialect;

    /// Runs one statement rendered with [`UsageSource::dialect`] and answers its rows, every
    /// value as text (`None` for NULL), in the order of the select list (whose items are named
    /// `c0`, `c1`, ...).
    async fn rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, UsageError>;
}

/// A usage statement failed.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("the {store} store did not answer: {message}")]
    Store { store: String, message: String },
    #[error("the {store} store answered {value:?} where a number was expected")]
    Value { store: String, value: String },
}

/// `tenant` and `event type` and a time range: what every usage statement selects by.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub tenant: &'a str,
    pub from_us: i64,
    pub to_us: i64,
}

fn where_clause(d: &dyn UsageDialect, scope: Scope<'_>, event_type: &str) -> String {
    format!(
        "{} = {} AND {} = {} AND {}",
        d.column("tenant"),
        d.text_literal(scope.tenant),
        d.column("type"),
        d.text_literal(event_type),
        d.time_range(scope.from_us, scope.to_us),
    )
}

/// One meter over one scope: `events counted, value`.
pub fn meter_sql(d: &dyn UsageDialect, meter: &Meter, scope: Scope<'_>) -> String {
    let value = match (meter.aggregation, meter.field) {
        (Aggregation::Count, _) => d.count(),
        (Aggregation::Sum, Some(f)) => d.sum(f.name),
        (Aggregation::UniqueCount, Some(f)) => d.unique_count(f.name),
        (Aggregation::Max, Some(f)) => d.max(f.name),
        (Aggregation::Latest, Some(f)) => d.latest(f.name),
        // Validation gives every aggregation but count a field.
        (_, None) => d.count(),
    };
    let mut sql = format!(
        "SELECT {} AS c0, {} AS c1 FROM {} WHERE {}",
        d.count(),
        value,
        d.events(),
        where_clause(d, scope, meter.event_type.as_str())
    );
    if let Some(filter) = &meter.filter {
        sql.push_str(&format!(" AND ({})", filter.render(d)));
    }
    sql
}

/// Token sums per provider and model over one scope: `provider, model, events, input,
/// output, cached_input, cache_write_input`.
pub fn tokens_sql(d: &dyn UsageDialect, scope: Scope<'_>) -> String {
    format!(
        "SELECT {p} AS c0, {m} AS c1, {n} AS c2, {i} AS c3, {o} AS c4, {c} AS c5, {w} AS c6 \
         FROM {t} WHERE {wh} GROUP BY {pc}, {mc}",
        p = d.text("provider"),
        m = d.text("model"),
        n = d.count(),
        i = d.sum("input_tokens"),
        o = d.sum("output_tokens"),
        c = d.sum("cached_input_tokens"),
        w = d.sum("cache_write_input_tokens"),
        t = d.events(),
        wh = where_clause(d, scope, "llm.usage"),
        pc = d.column("provider"),
        mc = d.column("model"),
    )
}

/// A meter's value over a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterValue {
    pub events: u64,
    /// `None`: no event had a value (max and latest of nothing).
    pub value: Option<Decimal>,
}

/// Runs [`meter_sql`].
pub async fn meter_value(
    source: &dyn UsageSource,
    meter: &Meter,
    scope: Scope<'_>,
) -> Result<MeterValue, UsageError> {
    let rows = source
        .rows(&meter_sql(source.dialect(), meter, scope))
        .await?;
    let row = rows.into_iter().next().unwrap_or_default();
    let events = number(source, row.first().cloned().flatten())?.unwrap_or_default();
    let events = u64::try_from(events).map_err(|_| UsageError::Value {
        store: source.name().to_owned(),
        value: events.to_string(),
    })?;
    let value = number(source, row.get(1).cloned().flatten())?;
    let value = match meter.aggregation {
        // A sum or count of nothing is zero everywhere.
        Aggregation::Sum | Aggregation::Count | Aggregation::UniqueCount => {
            Some(value.unwrap_or_default())
        }
        Aggregation::Max | Aggregation::Latest => value,
    };
    Ok(MeterValue { events, value })
}

/// Token sums of one provider's model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTokens {
    pub provider: String,
    pub model: String,
    pub events: u64,
    pub tokens: crate::rate::Tokens,
}

/// Runs [`tokens_sql`]; the models come back ordered by provider, then model, by their bytes
/// (stores order text by their own collations, so the order is made here).
pub async fn model_tokens(
    source: &dyn UsageSource,
    scope: Scope<'_>,
) -> Result<Vec<ModelTokens>, UsageError> {
    let rows = source.rows(&tokens_sql(source.dialect(), scope)).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let cell = |i: usize| row.get(i).cloned().flatten();
        let num = |i: usize| number(source, cell(i)).map(Option::unwrap_or_default);
        let events = num(2)?;
        out.push(ModelTokens {
            provider: cell(0).unwrap_or_default(),
            model: cell(1).unwrap_or_default(),
            events: u64::try_from(events).map_err(|_| UsageError::Value {
                store: source.name().to_owned(),
                value: events.to_string(),
            })?,
            tokens: crate::rate::Tokens {
                input: num(3)?,
                output: num(4)?,
                cached_input: num(5)?,
                cache_write_input: num(6)?,
            },
        });
    }
    out.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
    Ok(out)
}

fn number(source: &dyn UsageSource, cell: Option<String>) -> Result<Option<Decimal>, UsageError> {
    let Some(text) = cell else { return Ok(None) };
    // Sums come back as `123`, `123.0` or `123.000` depending on the store's decimal type.
    Decimal::from_str_exact(text.trim())
        .map(|d| Some(d.normalize()))
        .map_err(|_| UsageError::Value {
            store: source.name().to_owned(),
            value: text,
        })
}
