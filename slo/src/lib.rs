//! SLOs: the share of good events among valid ones over a rolling window, with the error
//! budget it leaves and how fast it burns (Google's SRE workbook, multi-window burn rates).
//!
//! Counted exactly from the stored events by the store that serves SQL: one statement per SLO
//! counts valid and good events in the SLO's window and in every burn-rate window at once, with
//! the `good` and `valid` filters parsed once at startup and rendered in the store's dialect as
//! meter filters are (three-valued logic: an event whose `good` is unknown is not good).

pub mod cache;
pub mod metrics;

use std::time::Duration;

use meterd_billing::filter::Filter;
use meterd_billing::usage::{UsageDialect, UsageError, UsageSource};
use meterd_schemas::{EventType, StoredEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The trailing windows burn rates are reported for, with their lengths in seconds.
/// (2h is the short window of the slow ticket alert: 3 over 1d and 2h.)
pub const BURN_WINDOWS: [(&str, i64); 7] = [
    ("5m", 300),
    ("30m", 1_800),
    ("1h", 3_600),
    ("2h", 7_200),
    ("6h", 21_600),
    ("1d", 86_400),
    ("3d", 259_200),
];

/// A page: both the 1h and the 5m burn rate above this.
pub const FAST_BURN: Decimal = Decimal::from_parts(144, 0, 0, false, 1);
/// A ticket: both the 6h and the 30m burn rate above this.
pub const SLOW_BURN: Decimal = Decimal::from_parts(6, 0, 0, false, 0);

/// The longest window an SLO may have.
pub const MAX_WINDOW: Duration = Duration::from_secs(400 * 86_400);

/// An objective as written: a number (`0.999`) or a decimal string (`"0.999"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ObjectiveConfig {
    Number(f64),
    Text(String),
}

/// One `[[slos]]` entry as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// A SQL boolean expression over events columns: the event is good.
    pub good: String,
    /// Which events count at all; default: every event of the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<String>,
    pub objective: ObjectiveConfig,
    /// Rolling, as `30d`, `7d`, `24h`.
    pub window: String,
    /// One SLO per tenant.
    #[serde(default)]
    pub per_tenant: bool,
    /// One tenant's events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Whose events an SLO counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SloScope {
    /// Every tenant's together.
    All,
    /// Each tenant's apart.
    PerTenant,
    /// One tenant's.
    Tenant(String),
}

/// An SLO as checked at startup.
#[derive(Debug, Clone)]
pub struct Slo {
    pub name: String,
    pub event_type: EventType,
    pub good: Filter,
    pub valid: Option<Filter>,
    /// Strictly between 0 and 1.
    pub objective: Decimal,
    pub window: Duration,
    /// The window as written (`30d`).
    pub window_text: String,
    pub scope: SloScope,
    pub description: Option<String>,
}

/// An `[[slos]]` entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("slos[{index}] ({name:?}): {reason}")]
pub struct SloConfigError {
    pub index: usize,
    pub name: String,
    pub reason: String,
}

impl Slo {
    /// Checks one entry; the error says what is wrong with it.
    pub fn new(config: &SloConfig) -> Result<Slo, String> {
        if config.name.is_empty() || config.name.len() > 128 {
            return Err("name: 1 to 128 bytes".to_owned());
        }
        let event_type = meterd_billing::meter::event_type(&config.event_type)?;
        let good = Filter::parse(&config.good).map_err(|e| format!("good: {e}"))?;
        let valid = config
            .valid
            .as_deref()
            .map(Filter::parse)
            .transpose()
            .map_err(|e| format!("valid: {e}"))?;
        let objective = match &config.objective {
            // The shortest text that reads back as the number: what was written.
            ObjectiveConfig::Number(n) => n.to_string(),
            ObjectiveConfig::Text(t) => t.clone(),
        };
        let objective = Decimal::from_str_exact(objective.trim())
            .map_err(|_| format!("objective: {objective:?} is not a number"))?;
        if objective <= Decimal::ZERO || objective >= Decimal::ONE {
            return Err(format!(
                "objective: {objective} is not between 0 and 1 (0.999 is 99.9%)"
            ));
        }
        let window = humantime::parse_duration(&config.window).map_err(|e| {
            format!(
                "window: {:?} is not a duration such as 30d ({e})",
                config.window
            )
        })?;
        if window < Duration::from_secs(60) || window > MAX_WINDOW {
            return Err(format!(
                "window: {:?} is not between a minute and 400 days",
                config.window
            ));
        }
        let scope = match (config.per_tenant, &config.tenant) {
            (true, Some(_)) => {
                return Err("per_tenant and tenant: one or the other".to_owned());
            }
            (true, None) => SloScope::PerTenant,
            (false, Some(t)) if t.is_empty() || t.len() > 128 => {
                return Err("tenant: 1 to 128 bytes".to_owned());
            }
            (false, Some(t)) => SloScope::Tenant(t.clone()),
            (false, None) => SloScope::All,
        };
        Ok(Slo {
            name: config.name.clone(),
            event_type,
            good,
            valid,
            objective,
            window,
            window_text: config.window.clone(),
            scope,
            description: config.description.clone(),
        })
    }

    /// Checks every entry: names are unique, each entry usable.
    pub fn all(configs: &[SloConfig]) -> Result<Vec<Slo>, SloConfigError> {
        let mut out: Vec<Slo> = Vec::with_capacity(configs.len());
        for (index, c) in configs.iter().enumerate() {
            let error = |reason: String| SloConfigError {
                index,
                name: c.name.clone(),
                reason,
            };
            if out.iter().any(|s| s.name == c.name) {
                return Err(error("another SLO has this name".to_owned()));
            }
            out.push(Slo::new(c).map_err(error)?);
        }
        Ok(out)
    }

    /// The SLO's window and the burn-rate windows, in µs, the SLO's first.
    pub fn windows_us(&self) -> [i64; WINDOWS] {
        let mut out = [0; WINDOWS];
        out[0] = i64::try_from(self.window.as_micros()).unwrap_or(i64::MAX);
        for (o, (_, s)) in out[1..].iter_mut().zip(BURN_WINDOWS) {
            *o = s * 1_000_000;
        }
        out
    }

    /// The windows `[start, end)` (µs) counted at `now_us`, the SLO's first, then the burn-rate
    /// windows: each ends at the last whole minute of `now_us`, and starts its length before,
    /// at a whole minute, or at a whole hour for a window of a day or more (so the store's
    /// counts by hour answer it).
    pub fn bounds(&self, now_us: i64) -> [(i64, i64); WINDOWS] {
        let end = now_us.div_euclid(cache::MINUTE_US) * cache::MINUTE_US;
        self.windows_us().map(|w| {
            let unit = if w >= 24 * cache::HOUR_US {
                cache::HOUR_US
            } else {
                cache::MINUTE_US
            };
            (end.saturating_sub(w).div_euclid(unit) * unit, end)
        })
    }

    /// Whether accepted event `e` counts for this SLO, and if so under which tenant (`""` unless
    /// the SLO is per tenant) and whether it is good: the store's three-valued logic, where an
    /// unknown `valid` or `good` is false.
    pub fn counts<'e>(&self, e: &'e StoredEvent) -> Option<(&'e str, bool)> {
        if e.event.data.event_type() != self.event_type {
            return None;
        }
        let tenant = match &self.scope {
            SloScope::All => "",
            SloScope::Tenant(t) if *t == e.event.tenant => "",
            SloScope::Tenant(_) => return None,
            SloScope::PerTenant => e.event.tenant.as_str(),
        };
        if self.valid.as_ref().is_some_and(|v| v.eval(e) != Some(true)) {
            return None;
        }
        Some((tenant, self.good.eval(e) == Some(true)))
    }
}

/// The SLO's window and its burn-rate windows.
pub const WINDOWS: usize = 1 + BURN_WINDOWS.len();

/// Raw ranges a window is counted over at most; past them it is counted whole from raw events.
pub const MAX_RAW_RANGES: usize = 32;

/// Which of the store's events an SLO counts with its time in one of `ranges` (`[from, to)` in
/// µs; none matches nothing): of its type, its tenant (or `tenant`'s, for a per-tenant SLO), and valid.
fn conditions(
    d: &dyn UsageDialect,
    slo: &Slo,
    tenant: Option<&str>,
    ranges: &[(i64, i64)],
) -> String {
    let mut conditions = vec![
        format!(
            "{} = {}",
            d.column("type"),
            d.text_literal(slo.event_type.as_str())
        ),
        any_range(d, ranges),
    ];
    let scoped = match (&slo.scope, tenant) {
        (SloScope::Tenant(t), _) => Some(t.as_str()),
        (SloScope::PerTenant, Some(t)) => Some(t),
        _ => None,
    };
    if let Some(t) = scoped {
        conditions.push(format!("{} = {}", d.column("tenant"), d.text_literal(t)));
    }
    if let Some(valid) = &slo.valid {
        conditions.push(format!("({})", valid.render(d)));
    }
    conditions.join(" AND ")
}

/// Time in any of `ranges`; never true without ranges.
fn any_range(d: &dyn UsageDialect, ranges: &[(i64, i64)]) -> String {
    match ranges {
        [] => "1 = 0".to_owned(),
        [(from, to)] => d.time_range(*from, *to),
        _ => format!(
            "({})",
            ranges
                .iter()
                .map(|(from, to)| format!("({})", d.time_range(*from, *to)))
                .collect::<Vec<_>>()
                .join(" OR ")
        ),
    }
}

/// The statement counting an SLO's valid and good events whose time is in `raw[i]` for each
/// window `i` (in the order of [`Slo::windows_us`]): a tenant (or `''`), then valid and good
/// events of each window; one row, or one per tenant for a per-tenant SLO. `None` when no
/// window has a range.
pub fn slo_sql(
    d: &dyn UsageDialect,
    slo: &Slo,
    raw: &[Vec<(i64, i64)>; WINDOWS],
    tenant: Option<&str>,
) -> Option<String> {
    let mut all: Vec<(i64, i64)> = raw.iter().flatten().copied().collect();
    all.sort_unstable();
    let mut union: Vec<(i64, i64)> = Vec::with_capacity(all.len());
    for (from, to) in all {
        match union.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => union.push((from, to)),
        }
    }
    if union.is_empty() {
        return None;
    }
    let mut select = Vec::new();
    let per_tenant = slo.scope == SloScope::PerTenant;
    select.push(if per_tenant {
        format!("{} AS c0", d.text("tenant"))
    } else {
        format!("{} AS c0", d.text_literal(""))
    });
    let good = slo.good.render(d);
    for (i, ranges) in raw.iter().enumerate() {
        let within = any_range(d, ranges);
        select.push(format!(
            "{} AS c{}",
            d.sum(&format!("CASE WHEN {within} THEN 1 ELSE 0 END")),
            2 * i + 1
        ));
        select.push(format!(
            "{} AS c{}",
            d.sum(&format!(
                "CASE WHEN {within} AND ({good}) THEN 1 ELSE 0 END"
            )),
            2 * i + 2
        ));
    }
    let mut sql = format!(
        "SELECT {} FROM {} WHERE {}",
        select.join(", "),
        d.events(),
        conditions(d, slo, tenant, &union)
    );
    if per_tenant {
        sql.push_str(&format!(" GROUP BY {}", d.column("tenant")));
    }
    Some(sql)
}

/// Each window of `bounds` less its ranges in `covered` (ascending and apart, inside the
/// window): the ranges `[from, to)` still to be counted from raw events.
pub fn raw_ranges(
    bounds: &[(i64, i64); WINDOWS],
    covered: &[Vec<(i64, i64)>; WINDOWS],
) -> [Vec<(i64, i64)>; WINDOWS] {
    std::array::from_fn(|i| {
        let (start, end) = bounds[i];
        let mut out = Vec::new();
        let mut cursor = start;
        for &(from, to) in &covered[i] {
            if from > cursor {
                out.push((cursor, from.min(end)));
            }
            cursor = cursor.max(to);
        }
        if cursor < end {
            out.push((cursor, end));
        }
        out
    })
}

/// Each window whose raw ranges are more than [`MAX_RAW_RANGES`] (kept hours broken up by many
/// late events) is counted whole from raw events, in one range, rather than by a statement too
/// long for the store: its kept counts are dropped.
fn whole_when_scattered(
    bounds: &[(i64, i64); WINDOWS],
    raw: &mut [Vec<(i64, i64)>; WINDOWS],
    kept: &mut cache::KeptCounts,
) {
    for (i, ranges) in raw.iter_mut().enumerate() {
        if ranges.len() > MAX_RAW_RANGES {
            *ranges = vec![bounds[i]];
            kept.covered[i].clear();
            for counts in kept.by_tenant.values_mut() {
                counts[i] = Counts::default();
            }
        }
    }
}

/// A count as a store answers it (`12`, or `12.0` from an exact sum); NULL is 0.
fn read_count(cell: Option<&str>) -> Option<u64> {
    match cell {
        None => Some(0),
        Some(text) => {
            let t = text.trim();
            t.split('.').next().unwrap_or(t).parse::<u64>().ok()
        }
    }
}

/// Valid and good events in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub valid: u64,
    pub good: u64,
}

impl Counts {
    pub fn bad(self) -> u64 {
        self.valid.saturating_sub(self.good)
    }
}

/// An SLO's state, as `GET /v1/slos` answers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SloStatus {
    pub name: String,
    /// The tenant of a per-tenant or single-tenant SLO; `None` for all tenants together.
    pub tenant: Option<String>,
    pub objective: f64,
    pub window: String,
    /// The window counted, `[window_start, window_end)` (RFC 3339, UTC): it ends at the last
    /// whole minute and starts at a whole minute, or hour for a window of a day or more.
    pub window_start: String,
    pub window_end: String,
    pub valid_events: u64,
    pub good_events: u64,
    /// Good over valid events; `None` without valid events.
    pub sli: Option<f64>,
    pub error_budget: ErrorBudget,
    pub burn_rates: BurnRates,
    pub alerts: Alerts,
}

/// The error budget in events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBudget {
    /// (1 - objective) x valid events.
    pub total: f64,
    /// Bad events.
    pub used: u64,
    /// total - used; negative once the budget is spent.
    pub remaining: f64,
    /// remaining / total; 1 without valid events.
    pub remaining_ratio: f64,
}

/// The bad ratio of each trailing window over (1 - objective); 0 without events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BurnRates {
    #[serde(rename = "5m")]
    pub m5: f64,
    #[serde(rename = "30m")]
    pub m30: f64,
    #[serde(rename = "1h")]
    pub h1: f64,
    #[serde(rename = "2h")]
    pub h2: f64,
    #[serde(rename = "6h")]
    pub h6: f64,
    #[serde(rename = "1d")]
    pub d1: f64,
    #[serde(rename = "3d")]
    pub d3: f64,
}

impl BurnRates {
    /// `(name, rate)` in the order of [`BURN_WINDOWS`].
    pub fn each(&self) -> [(&'static str, f64); 7] {
        [
            ("5m", self.m5),
            ("30m", self.m30),
            ("1h", self.h1),
            ("2h", self.h2),
            ("6h", self.h6),
            ("1d", self.d1),
            ("3d", self.d3),
        ]
    }
}

/// The multi-window burn-rate alerts: fast burn pages (1h and 5m above 14.4), slow burn
/// files a ticket (6h and 30m above 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Alerts {
    pub fast_burn: bool,
    pub slow_burn: bool,
}

fn to_f64(d: Decimal) -> f64 {
    use rust_decimal::prelude::ToPrimitive;
    d.to_f64().unwrap_or(f64::NAN)
}

/// An SLO's state from its counts: `counts[0]` over the SLO's window, then each burn window in
/// the order of [`BURN_WINDOWS`].
pub fn status(
    slo: &Slo,
    tenant: Option<String>,
    window: (i64, i64),
    counts: &[Counts; WINDOWS],
) -> SloStatus {
    let at = |us: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_micros(us)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default()
    };
    let allowed = Decimal::ONE - slo.objective;
    let whole = counts[0];
    let total = allowed * Decimal::from(whole.valid);
    let used = whole.bad();
    let remaining = total - Decimal::from(used);
    let remaining_ratio = if whole.valid == 0 {
        Decimal::ONE
    } else {
        // total > 0 here: objective < 1 and valid > 0.
        remaining.checked_div(total).unwrap_or(Decimal::ZERO)
    };
    let burn = |c: Counts| -> Decimal {
        if c.valid == 0 {
            return Decimal::ZERO;
        }
        (Decimal::from(c.bad()) / Decimal::from(c.valid))
            .checked_div(allowed)
            .unwrap_or(Decimal::ZERO)
    };
    let rates: Vec<Decimal> = counts[1..].iter().map(|c| burn(*c)).collect();
    let (m5, m30, h1, h6) = (rates[0], rates[1], rates[2], rates[4]);
    SloStatus {
        name: slo.name.clone(),
        tenant,
        objective: to_f64(slo.objective),
        window: slo.window_text.clone(),
        window_start: at(window.0),
        window_end: at(window.1),
        valid_events: whole.valid,
        good_events: whole.good,
        sli: (whole.valid > 0)
            .then(|| to_f64(Decimal::from(whole.good) / Decimal::from(whole.valid))),
        error_budget: ErrorBudget {
            total: to_f64(total),
            used,
            remaining: to_f64(remaining),
            remaining_ratio: to_f64(remaining_ratio),
        },
        burn_rates: BurnRates {
            m5: to_f64(m5),
            m30: to_f64(m30),
            h1: to_f64(h1),
            h2: to_f64(rates[3]),
            h6: to_f64(h6),
            d1: to_f64(rates[5]),
            d3: to_f64(rates[6]),
        },
        alerts: Alerts {
            fast_burn: h1 > FAST_BURN && m5 > FAST_BURN,
            slow_burn: h6 > SLOW_BURN && m30 > SLOW_BURN,
        },
    }
}

/// Counts an SLO's windows at `now_us` (see [`Slo::bounds`]) and answers its state: one status,
/// or one per tenant with events in the SLO's window (only `tenant`'s when given). With `kept`
/// (the cache and the SLO's index in it), what it holds is read from it and only the rest from
/// the store.
pub async fn evaluate(
    source: &dyn UsageSource,
    slo: &Slo,
    now_us: i64,
    tenant: Option<&str>,
    kept: Option<(&cache::SloCache, usize)>,
) -> Result<Vec<SloStatus>, UsageError> {
    let bounds = slo.bounds(now_us);
    // Kept counts carry the tenant of a per-tenant SLO only.
    let per_tenant = tenant.filter(|_| slo.scope == SloScope::PerTenant);
    let mut kept = match kept {
        Some((cache, index)) => cache.read(index, now_us, &bounds, per_tenant),
        None => cache::KeptCounts::default(),
    };
    let mut raw = raw_ranges(&bounds, &kept.covered);
    whole_when_scattered(&bounds, &mut raw, &mut kept);
    let rows = match slo_sql(source.dialect(), slo, &raw, tenant) {
        Some(sql) => source.rows(&sql).await?,
        None => Vec::new(),
    };
    let bad_value = |value: String| UsageError::Value {
        store: source.name().to_owned(),
        value,
    };
    let mut by_tenant: std::collections::BTreeMap<String, [Counts; WINDOWS]> = kept
        .by_tenant
        .into_iter()
        .map(|(t, c)| (t.to_string(), c))
        .collect();
    for row in rows {
        let row_tenant = row.first().cloned().flatten().unwrap_or_default();
        let counts = by_tenant
            .entry(row_tenant)
            .or_insert([Counts::default(); WINDOWS]);
        for (i, c) in counts.iter_mut().enumerate() {
            for (n, at) in [(&mut c.valid, 2 * i + 1), (&mut c.good, 2 * i + 2)] {
                let cell = row.get(at).cloned().flatten();
                *n += read_count(cell.as_deref())
                    .ok_or_else(|| bad_value(cell.unwrap_or_default()))?;
            }
        }
    }
    let mut out = Vec::new();
    for (row_tenant, counts) in by_tenant {
        let row_tenant = match &slo.scope {
            SloScope::All => None,
            SloScope::Tenant(t) => Some(t.clone()),
            SloScope::PerTenant => Some(row_tenant),
        };
        // A per-tenant SLO lists the tenants with events; the others always answer.
        if slo.scope == SloScope::PerTenant && counts.iter().all(|c| c.valid == 0) {
            continue;
        }
        out.push(status(slo, row_tenant, bounds[0], &counts));
    }
    if out.is_empty() && slo.scope != SloScope::PerTenant {
        out.push(status(
            slo,
            match &slo.scope {
                SloScope::Tenant(t) => Some(t.clone()),
                _ => None,
            },
            bounds[0],
            &[Counts::default(); WINDOWS],
        ));
    }
    out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo(objective: &str, window: &str) -> Slo {
        Slo::new(&SloConfig {
            name: "api".to_owned(),
            event_type: "api.request".to_owned(),
            good: "status_code < 500".to_owned(),
            valid: None,
            objective: ObjectiveConfig::Text(objective.to_owned()),
            window: window.to_owned(),
            per_tenant: false,
            tenant: None,
            description: None,
        })
        .expect("slo")
    }

    /// A dialect for statements that are only looked at.
    struct Plain;
    impl meterd_billing::filter::FilterDialect for Plain {}
    impl UsageDialect for Plain {
        fn time_range(&self, from_us: i64, to_us: i64) -> String {
            format!("time_us >= {from_us} AND time_us < {to_us}")
        }
        fn sum(&self, column: &str) -> String {
            format!("sum({column})")
        }
        fn latest(&self, column: &str) -> String {
            column.to_owned()
        }
        fn time_us(&self) -> String {
            "time_us".to_owned()
        }
    }

    #[test]
    fn a_window_scattered_by_late_events_is_counted_whole() {
        use cache::HOUR_US;
        let bounds: [(i64, i64); WINDOWS] = [(0, 100 * HOUR_US); WINDOWS];
        let mut kept = cache::KeptCounts::default();
        // Window 0: every other hour kept (50 raw ranges); window 1: ten kept hours in a row.
        kept.covered[0] = (0..50)
            .map(|h| (2 * h * HOUR_US, (2 * h + 1) * HOUR_US))
            .collect();
        kept.covered[1] = vec![(0, 10 * HOUR_US)];
        let mut counts = [Counts::default(); WINDOWS];
        counts[0] = c(500, 490);
        counts[1] = c(100, 99);
        kept.by_tenant.insert(std::sync::Arc::from(""), counts);
        let mut raw = raw_ranges(&bounds, &kept.covered);
        assert_eq!(raw[0].len(), 50);
        whole_when_scattered(&bounds, &mut raw, &mut kept);
        assert_eq!(raw[0], vec![bounds[0]]);
        assert_eq!(kept.by_tenant[""][0], Counts::default());
        // The other window keeps its kept hours.
        assert_eq!(raw[1], vec![(10 * HOUR_US, 100 * HOUR_US)]);
        assert_eq!(kept.by_tenant[""][1], c(100, 99));
    }

    #[test]
    fn the_statement_counts_each_window_over_its_raw_ranges() {
        let mut raw: [Vec<(i64, i64)>; WINDOWS] = Default::default();
        raw[0] = vec![(0, 10), (90, 100)];
        raw[1] = vec![(90, 100)];
        let sql = slo_sql(&Plain, &slo("0.99", "30d"), &raw, None).expect("a statement");
        // The windows' ranges, and only those, are read.
        assert!(
            sql.contains("((time_us >= 0 AND time_us < 10) OR (time_us >= 90 AND time_us < 100))"),
            "{sql}"
        );
        // A window without raw ranges counts nothing from the store.
        assert!(
            sql.contains("sum(CASE WHEN 1 = 0 THEN 1 ELSE 0 END) AS c5"),
            "{sql}"
        );
    }

    fn c(valid: u64, good: u64) -> Counts {
        Counts { valid, good }
    }

    #[test]
    fn a_budget_exactly_used_up() {
        let s = status(&slo("0.99", "30d"), None, (0, 0), &[c(1000, 990); WINDOWS]);
        assert_eq!(s.sli, Some(0.99));
        assert_eq!(s.error_budget.total, 10.0);
        assert_eq!(s.error_budget.used, 10);
        assert_eq!(s.error_budget.remaining, 0.0);
        assert_eq!(s.error_budget.remaining_ratio, 0.0);
        // Bad at exactly the allowed rate burns at 1 in every window.
        assert!(s.burn_rates.each().iter().all(|(_, r)| *r == 1.0));
        assert_eq!(
            s.alerts,
            Alerts {
                fast_burn: false,
                slow_burn: false
            }
        );
    }

    #[test]
    fn each_burn_window_and_the_alerts() {
        // Allowed: 0.1% bad.
        let counts = [
            c(100_000, 99_950), // 30d
            c(100, 98),         // 5m: 2% bad, 20
            c(1_000, 993),      // 30m: 7
            c(1_000, 985),      // 1h: 15
            c(2_000, 1_990),    // 2h: 5
            c(10_000, 9_935),   // 6h: 6.5
            c(20_000, 19_980),  // 1d: 1
            c(0, 0),            // 3d: no events, 0
        ];
        let s = status(&slo("0.999", "30d"), None, (0, 0), &counts);
        assert_eq!(
            s.burn_rates.each(),
            [
                ("5m", 20.0),
                ("30m", 7.0),
                ("1h", 15.0),
                ("2h", 5.0),
                ("6h", 6.5),
                ("1d", 1.0),
                ("3d", 0.0)
            ]
        );
        assert_eq!(
            s.alerts,
            Alerts {
                fast_burn: true,
                slow_burn: true
            }
        );
        // A rate exactly at the threshold does not page: the rule is "above".
        let mut at = counts;
        at[3] = c(10_000, 10_000 - 144); // 1h: 1.44% bad, 14.4
        let s = status(&slo("0.999", "30d"), None, (0, 0), &at);
        assert_eq!(s.burn_rates.h1, 14.4);
        assert!(!s.alerts.fast_burn);
        assert!(s.alerts.slow_burn);
    }

    #[test]
    fn no_events_burn_nothing() {
        let s = status(
            &slo("0.999", "7d"),
            None,
            (0, 0),
            &[Counts::default(); WINDOWS],
        );
        assert_eq!(s.sli, None);
        assert_eq!(s.valid_events, 0);
        assert_eq!(s.error_budget.total, 0.0);
        assert_eq!(s.error_budget.remaining_ratio, 1.0);
        assert!(s.burn_rates.each().iter().all(|(_, r)| *r == 0.0));
        assert!(!s.alerts.fast_burn && !s.alerts.slow_burn);
        assert_eq!(s.window, "7d");
    }

    #[test]
    fn a_spent_budget_goes_negative() {
        let s = status(&slo("0.9", "1d"), None, (0, 0), &[c(100, 70); WINDOWS]);
        assert_eq!(s.error_budget.total, 10.0);
        assert_eq!(s.error_budget.used, 30);
        assert_eq!(s.error_budget.remaining, -20.0);
        assert_eq!(s.error_budget.remaining_ratio, -2.0);
    }

    #[test]
    fn windows_end_at_a_whole_minute_and_long_ones_start_at_a_whole_hour() {
        use cache::{HOUR_US, MINUTE_US};
        // 20 minutes and 30 seconds past an hour.
        let now = 1_000 * HOUR_US + 20 * MINUTE_US + 30_000_000;
        let end = 1_000 * HOUR_US + 20 * MINUTE_US;
        let b = slo("0.999", "2d").bounds(now);
        // 2d: from the whole hour at or before two days back.
        assert_eq!(b[0], (952 * HOUR_US, end));
        // 5m, 30m, 1h, 2h, 6h: whole minutes.
        assert_eq!(b[1], (end - 5 * MINUTE_US, end));
        assert_eq!(b[5], (end - 6 * HOUR_US, end));
        // 1d and 3d: whole hours.
        assert_eq!(b[6], (976 * HOUR_US, end));
        assert_eq!(b[7], (928 * HOUR_US, end));
        // A window of a few minutes less than a day starts at a minute.
        let b = slo("0.999", "1439m").bounds(now);
        assert_eq!(b[0], (end - 1_439 * MINUTE_US, end));
    }

    #[test]
    fn raw_ranges_are_each_window_less_what_is_kept() {
        use cache::HOUR_US;
        let bounds: [(i64, i64); WINDOWS] = std::array::from_fn(|i| (i as i64 * 10, 100 * HOUR_US));
        let mut covered: [Vec<(i64, i64)>; WINDOWS] = Default::default();
        covered[0] = vec![(0, HOUR_US), (3 * HOUR_US, 99 * HOUR_US)];
        covered[1] = vec![(10, 100 * HOUR_US)];
        covered[2] = vec![(50 * HOUR_US, 60 * HOUR_US)];
        let raw = raw_ranges(&bounds, &covered);
        assert_eq!(
            raw[0],
            vec![(HOUR_US, 3 * HOUR_US), (99 * HOUR_US, 100 * HOUR_US)]
        );
        assert!(raw[1].is_empty());
        assert_eq!(
            raw[2],
            vec![(20, 50 * HOUR_US), (60 * HOUR_US, 100 * HOUR_US)]
        );
        // Nothing kept: the window whole, as a plain count over it.
        assert_eq!(raw[3], vec![(30, 100 * HOUR_US)]);
        for (i, ranges) in raw.iter().enumerate() {
            let kept: i64 = covered[i].iter().map(|(a, b)| b - a).sum();
            let counted: i64 = ranges.iter().map(|(a, b)| b - a).sum();
            assert_eq!(kept + counted, bounds[i].1 - bounds[i].0, "window {i}");
        }
        // Nothing raw at all: no statement.
        let all: [Vec<(i64, i64)>; WINDOWS] = std::array::from_fn(|i| vec![bounds[i]]);
        let d = Plain;
        assert!(slo_sql(&d, &slo("0.99", "30d"), &raw_ranges(&bounds, &all), None).is_none());
    }

    #[test]
    fn bad_entries_are_refused_naming_the_field() {
        let mut config = SloConfig {
            name: "x".to_owned(),
            event_type: "api.request".to_owned(),
            good: "status_code < 500".to_owned(),
            valid: None,
            objective: ObjectiveConfig::Number(0.999),
            window: "30d".to_owned(),
            per_tenant: false,
            tenant: None,
            description: None,
        };
        let slo = Slo::new(&config).expect("valid");
        assert_eq!(slo.objective.to_string(), "0.999");
        assert_eq!(slo.window, Duration::from_secs(30 * 86_400));
        for (change, field) in [
            (
                (|c: &mut SloConfig| c.objective = ObjectiveConfig::Number(1.0))
                    as fn(&mut SloConfig),
                "objective:",
            ),
            (
                |c| c.objective = ObjectiveConfig::Text("ninety".to_owned()),
                "objective:",
            ),
            (|c| c.window = "forever".to_owned(), "window:"),
            (|c| c.window = "500d".to_owned(), "window:"),
            (|c| c.good = "nope > 1".to_owned(), "good:"),
            (|c| c.valid = Some("(SELECT 1) = 1".to_owned()), "valid:"),
            (|c| c.event_type = "llm.call".to_owned(), "type"),
            (
                |c| {
                    c.per_tenant = true;
                    c.tenant = Some("acme".to_owned());
                },
                "per_tenant",
            ),
        ] {
            let mut bad = config.clone();
            change(&mut bad);
            let e = Slo::new(&bad).expect_err("refused");
            assert!(e.contains(field), "{e}");
        }
        config.name = "same".to_owned();
        let e = Slo::all(&[config.clone(), config]).expect_err("duplicate");
        assert_eq!(e.index, 1);
        assert!(e.to_string().contains("another SLO has this name"), "{e}");
    }
}
