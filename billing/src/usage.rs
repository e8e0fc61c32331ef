//! Where usage comes from: each meter's aggregation and the token sums of LLM cost, rendered
//! as one SQL statement each in the store's dialect and run inside the store. Only the
//! aggregated rows come back, as text (the one representation every store gives exactly).

use std::fmt;

use async_trait::async_trait;
use rust_decimal::Decimal;

use crate::config::Aggregation;
use crate::filter::FilterDialect;
use crate::meter::Meter;
use crate::window::Windows;
use meterd_schemas::columns::Column;

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

    /// An event's time as an integer: microseconds since 1970, UTC.
    fn time_us(&self) -> String;

    /// Integer division of two non-negative integers, truncating.
    fn int_div(&self, a: &str, b: &str) -> String {
        format!("({a}) / ({b})")
    }

    /// An integer expression as text.
    fn integer_text(&self, expr: &str) -> String {
        format!("CAST({expr} AS VARCHAR)")
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
    #[error(
        "the answer has more than {0} rows; ask for a shorter range, a larger window or fewer \
         group_by columns"
    )]
    TooManyRows(usize),
}

/// `tenant` and `event type` and a time range: what every usage statement selects by.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub tenant: &'a str,
    pub from_us: i64,
    pub to_us: i64,
}

fn where_clause(d: &dyn UsageDialect, scope: Scope<'_>, event_type: &str) -> String {
    where_tenant(
        d,
        Tenants::One(scope.tenant),
        scope.from_us,
        scope.to_us,
        event_type,
    )
}

/// Whose events a statement reads.
#[derive(Debug, Clone, Copy)]
pub enum Tenants<'a> {
    All,
    One(&'a str),
    /// These tenants' (at most [`MAX_TENANTS_PER_STATEMENT`]).
    Among(&'a [&'a str]),
}

/// The most tenants one statement names: the list is part of the statement's text, and
/// ClickHouse refuses statements past 256 KiB.
pub const MAX_TENANTS_PER_STATEMENT: usize = 1_000;

fn where_tenant(
    d: &dyn UsageDialect,
    tenants: Tenants<'_>,
    from_us: i64,
    to_us: i64,
    event_type: &str,
) -> String {
    let tenant = match tenants {
        Tenants::All => String::new(),
        Tenants::One(t) => format!("{} = {} AND ", d.column("tenant"), d.text_literal(t)),
        Tenants::Among(ts) => format!(
            "{} IN ({}) AND ",
            d.column("tenant"),
            ts.iter()
                .map(|t| d.text_literal(t))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        "{tenant}{} = {} AND {}",
        d.column("type"),
        d.text_literal(event_type),
        d.time_range(from_us, to_us),
    )
}

/// The meter's aggregation.
fn aggregate(d: &dyn UsageDialect, meter: &Meter) -> String {
    match (meter.aggregation, meter.field) {
        (Aggregation::Count, _) => d.count(),
        (Aggregation::Sum, Some(f)) => d.sum(f.name),
        (Aggregation::UniqueCount, Some(f)) => d.unique_count(f.name),
        (Aggregation::Max, Some(f)) => d.max(f.name),
        (Aggregation::Latest, Some(f)) => d.latest(f.name),
        // Validation gives every aggregation but count a field.
        (_, None) => d.count(),
    }
}

fn meter_filter(d: &dyn UsageDialect, meter: &Meter) -> String {
    meter
        .filter
        .as_ref()
        .map(|f| format!(" AND ({})", f.render(d)))
        .unwrap_or_default()
}

/// One meter over one scope: `events counted, value`.
pub fn meter_sql(d: &dyn UsageDialect, meter: &Meter, scope: Scope<'_>) -> String {
    format!(
        "SELECT {} AS c0, {} AS c1 FROM {} WHERE {}{}",
        d.count(),
        aggregate(d, meter),
        d.events(),
        where_clause(d, scope, meter.event_type.as_str()),
        meter_filter(d, meter),
    )
}

/// At most this many rows (windows times groups) in one answer of [`meter_windows`].
pub const MAX_USAGE_ROWS: usize = 100_000;

/// What `GET /v1/usage` asks of one meter.
#[derive(Debug, Clone, Copy)]
pub struct UsageQuery<'a> {
    pub meter: &'a Meter,
    pub tenants: Tenants<'a>,
    pub from_us: i64,
    pub to_us: i64,
    /// `None`: one value over the whole range.
    pub windows: Option<&'a Windows>,
    /// Columns whose values split each window's value.
    pub group_by: &'a [&'static Column],
}

/// [`UsageQuery`] as one statement: `window number, group values..., events, value`,
/// grouped in the store, at most [`MAX_USAGE_ROWS`] + 1 rows.
pub fn windows_sql(d: &dyn UsageDialect, q: UsageQuery<'_>) -> String {
    let window = match q.windows {
        Some(w) => w.number_sql(&d.time_us(), &|a, b| d.int_div(a, b)),
        None => "0".to_owned(),
    };
    let mut select = vec![format!("{} AS c0", d.integer_text(&window))];
    let mut keys = Vec::new();
    // A single window is a constant, which would read as a column's position in GROUP BY.
    if window.parse::<u64>().is_err() {
        keys.push(window.clone());
    }
    for (i, column) in q.group_by.iter().enumerate() {
        select.push(format!("{} AS c{}", d.text(column.name), i + 1));
        keys.push(d.column(column.name));
    }
    let n = q.group_by.len();
    select.push(format!("{} AS c{}", d.count(), n + 1));
    select.push(format!("{} AS c{}", aggregate(d, q.meter), n + 2));
    let group_by = if keys.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {}", keys.join(", "))
    };
    format!(
        "SELECT {} FROM {} WHERE {}{}{} LIMIT {}",
        select.join(", "),
        d.events(),
        where_tenant(
            d,
            q.tenants,
            q.from_us,
            q.to_us,
            q.meter.event_type.as_str()
        ),
        meter_filter(d, q.meter),
        group_by,
        MAX_USAGE_ROWS + 1,
    )
}

/// One row of [`meter_windows`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowValue {
    /// The window's number in [`UsageQuery::windows`] (0 without windows).
    pub window: usize,
    /// The values of the group-by columns, in their order.
    pub groups: Vec<Option<String>>,
    pub value: MeterValue,
}

/// Runs [`windows_sql`]: the windows and groups that have events, ordered by window, then by
/// the groups' values (bytes, NULL first).
pub async fn meter_windows(
    source: &dyn UsageSource,
    q: UsageQuery<'_>,
) -> Result<Vec<WindowValue>, UsageError> {
    let rows = source.rows(&windows_sql(source.dialect(), q)).await?;
    if rows.len() > MAX_USAGE_ROWS {
        return Err(UsageError::TooManyRows(MAX_USAGE_ROWS));
    }
    let n = q.group_by.len();
    let bad = |value: String| UsageError::Value {
        store: source.name().to_owned(),
        value,
    };
    let windows = q.windows.map_or(1, Windows::len);
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let cell = |i: usize| row.get(i).cloned().flatten();
        let window = cell(0).unwrap_or_default();
        let window = window
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|w| *w < windows)
            .ok_or_else(|| bad(window))?;
        let groups = (1..=n).map(cell).collect();
        let value = meter_value_of(source, q.meter, cell(n + 1), cell(n + 2))?;
        // A group of no events is no row (an aggregate without GROUP BY still answers one).
        if value.events == 0 {
            continue;
        }
        out.push(WindowValue {
            window,
            groups,
            value,
        });
    }
    out.sort_by(|a, b| (a.window, &a.groups).cmp(&(b.window, &b.groups)));
    Ok(out)
}

/// Token sums per provider and model over one scope: `provider, model, events, input,
/// output, cached_input, cache_write_input`.
pub fn tokens_sql(d: &dyn UsageDialect, scope: Scope<'_>) -> String {
    tokens_statement(
        d,
        Tenants::One(scope.tenant),
        scope.from_us,
        scope.to_us,
        false,
    )
}

/// Token sums per tenant, provider and model over `[from_us, to_us)`: `tenant, provider,
/// model, events, input, output, cached_input, cache_write_input`.
pub fn tokens_by_tenant_sql(
    d: &dyn UsageDialect,
    tenants: Tenants<'_>,
    from_us: i64,
    to_us: i64,
) -> String {
    tokens_statement(d, tenants, from_us, to_us, true)
}

/// The token sums of `llm.usage` events grouped by provider and model, and by tenant first
/// when `by_tenant`; the select list's items are named `c0`, `c1`, ... in that order.
fn tokens_statement(
    d: &dyn UsageDialect,
    tenants: Tenants<'_>,
    from_us: i64,
    to_us: i64,
    by_tenant: bool,
) -> String {
    let keys: Vec<&str> = if by_tenant {
        vec!["tenant", "provider", "model"]
    } else {
        vec!["provider", "model"]
    };
    let mut items: Vec<String> = keys.iter().map(|k| d.text(k)).collect();
    items.push(d.count());
    for column in [
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cache_write_input_tokens",
    ] {
        items.push(d.sum(column));
    }
    let select: Vec<String> = items
        .iter()
        .enumerate()
        .map(|(i, item)| format!("{item} AS c{i}"))
        .collect();
    let group_by: Vec<String> = keys.iter().map(|k| d.column(k)).collect();
    format!(
        "SELECT {} FROM {} WHERE {} GROUP BY {}",
        select.join(", "),
        d.events(),
        where_tenant(d, tenants, from_us, to_us, "llm.usage"),
        group_by.join(", ")
    )
}

/// Runs [`tokens_by_tenant_sql`]: each tenant's models, ordered as [`model_tokens`] orders
/// them.
pub async fn tokens_by_tenant(
    source: &dyn UsageSource,
    tenants: Tenants<'_>,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<(String, ModelTokens)>, UsageError> {
    let rows = source
        .rows(&tokens_by_tenant_sql(
            source.dialect(),
            tenants,
            from_us,
            to_us,
        ))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let tenant = row.first().cloned().flatten().unwrap_or_default();
        out.push((
            tenant,
            model_tokens_of(source, row.get(1..).unwrap_or_default())?,
        ));
    }
    out.sort_by(|(ta, a), (tb, b)| (ta, &a.provider, &a.model).cmp(&(tb, &b.provider, &b.model)));
    Ok(out)
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
    meter_value_of(
        source,
        meter,
        row.first().cloned().flatten(),
        row.get(1).cloned().flatten(),
    )
}

/// A meter's value from the text of its events counted and its aggregate.
fn meter_value_of(
    source: &dyn UsageSource,
    meter: &Meter,
    events: Option<String>,
    value: Option<String>,
) -> Result<MeterValue, UsageError> {
    let events = event_count(source, number(source, events)?.unwrap_or_default())?;
    let value = number(source, value)?;
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
        out.push(model_tokens_of(source, &row)?);
    }
    out.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
    Ok(out)
}

/// A meter's value for no events: what [`meter_value`] answers for a scope without any.
pub fn no_events(meter: &Meter) -> MeterValue {
    MeterValue {
        events: 0,
        value: match meter.aggregation {
            Aggregation::Sum | Aggregation::Count | Aggregation::UniqueCount => Some(Decimal::ZERO),
            Aggregation::Max | Aggregation::Latest => None,
        },
    }
}

/// A model's tokens from the cells `provider, model, events, input, output, cached_input,
/// cache_write_input`.
fn model_tokens_of(
    source: &dyn UsageSource,
    row: &[Option<String>],
) -> Result<ModelTokens, UsageError> {
    let cell = |i: usize| row.get(i).cloned().flatten();
    let num = |i: usize| number(source, cell(i)).map(Option::unwrap_or_default);
    let events = num(2)?;
    Ok(ModelTokens {
        provider: cell(0).unwrap_or_default(),
        model: cell(1).unwrap_or_default(),
        events: event_count(source, events)?,
        tokens: crate::rate::Tokens {
            input: num(3)?,
            output: num(4)?,
            cached_input: num(5)?,
            cache_write_input: num(6)?,
        },
    })
}

/// A count of events as the store answered it: a whole number of events.
fn event_count(source: &dyn UsageSource, n: Decimal) -> Result<u64, UsageError> {
    u64::try_from(n).map_err(|_| UsageError::Value {
        store: source.name().to_owned(),
        value: n.to_string(),
    })
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
