//! SLOs: the share of good events among valid ones over a rolling window, with the error
//! budget it leaves and how fast it burns (Google's SRE workbook, multi-window burn rates).
//!
//! Counted exactly from the stored events by the store that serves SQL: one statement per SLO
//! counts valid and good events in the SLO's window and in every burn-rate window at once, with
//! the `good` and `valid` filters parsed once at startup and rendered in the store's dialect as
//! meter filters are (three-valued logic: an event whose `good` is unknown is not good).

pub mod metrics;

use std::time::Duration;

use meterd_billing::filter::Filter;
use meterd_billing::usage::{UsageDialect, UsageError, UsageSource};
use meterd_schemas::EventType;
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
    fn windows_us(&self) -> Vec<i64> {
        let window = i64::try_from(self.window.as_micros()).unwrap_or(i64::MAX);
        std::iter::once(window)
            .chain(BURN_WINDOWS.iter().map(|(_, s)| s * 1_000_000))
            .collect()
    }
}

/// The statement counting an SLO's valid and good events at `now_us` (µs since 1970): a
/// tenant (or `''`), then valid and good events of each window in the order of
/// [`Slo::windows_us`]; one row, or one per tenant for a per-tenant SLO.
pub fn slo_sql(d: &dyn UsageDialect, slo: &Slo, now_us: i64, tenant: Option<&str>) -> String {
    let windows = slo.windows_us();
    let longest = windows.iter().copied().max().unwrap_or(0);
    let mut select = Vec::new();
    let per_tenant = slo.scope == SloScope::PerTenant;
    select.push(if per_tenant {
        format!("{} AS c0", d.text("tenant"))
    } else {
        format!("{} AS c0", d.text_literal(""))
    });
    let good = slo.good.render(d);
    for (i, w) in windows.iter().enumerate() {
        let within = d.time_range(now_us.saturating_sub(*w), now_us);
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
    let mut conditions = vec![
        format!(
            "{} = {}",
            d.column("type"),
            d.text_literal(slo.event_type.as_str())
        ),
        d.time_range(now_us.saturating_sub(longest), now_us),
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
    let mut sql = format!(
        "SELECT {} FROM {} WHERE {}",
        select.join(", "),
        d.events(),
        conditions.join(" AND ")
    );
    if per_tenant {
        sql.push_str(&format!(" GROUP BY {}", d.column("tenant")));
    }
    sql
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
pub fn status(slo: &Slo, tenant: Option<String>, counts: &[Counts; 8]) -> SloStatus {
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

/// Counts an SLO at `now_us` in the store and answers its state: one status, or one per tenant
/// with events in the SLO's window (only `tenant`'s when given).
pub async fn evaluate(
    source: &dyn UsageSource,
    slo: &Slo,
    now_us: i64,
    tenant: Option<&str>,
) -> Result<Vec<SloStatus>, UsageError> {
    let rows = source
        .rows(&slo_sql(source.dialect(), slo, now_us, tenant))
        .await?;
    let bad_value = |value: String| UsageError::Value {
        store: source.name().to_owned(),
        value,
    };
    let mut out = Vec::new();
    for row in rows {
        let mut counts = [Counts::default(); 8];
        for (i, c) in counts.iter_mut().enumerate() {
            let read = |cell: Option<&Option<String>>| -> Result<u64, UsageError> {
                match cell.cloned().flatten() {
                    None => Ok(0),
                    Some(text) => {
                        let t = text.trim();
                        // Exact sums may come back as `12` or `12.0`.
                        let whole = t.split('.').next().unwrap_or(t);
                        whole.parse::<u64>().map_err(|_| bad_value(text.clone()))
                    }
                }
            };
            c.valid = read(row.get(2 * i + 1))?;
            c.good = read(row.get(2 * i + 2))?;
        }
        let row_tenant = match &slo.scope {
            SloScope::All => None,
            SloScope::Tenant(t) => Some(t.clone()),
            SloScope::PerTenant => Some(row.first().cloned().flatten().unwrap_or_default()),
        };
        // A per-tenant SLO lists the tenants with events; the others always answer.
        if slo.scope == SloScope::PerTenant && counts.iter().all(|c| c.valid == 0) {
            continue;
        }
        out.push(status(slo, row_tenant, &counts));
    }
    if out.is_empty() && slo.scope != SloScope::PerTenant {
        out.push(status(
            slo,
            match &slo.scope {
                SloScope::Tenant(t) => Some(t.clone()),
                _ => None,
            },
            &[Counts::default(); 8],
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

    fn c(valid: u64, good: u64) -> Counts {
        Counts { valid, good }
    }

    #[test]
    fn a_budget_exactly_used_up() {
        let s = status(&slo("0.99", "30d"), None, &[c(1000, 990); 8]);
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
        let s = status(&slo("0.999", "30d"), None, &counts);
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
        let s = status(&slo("0.999", "30d"), None, &at);
        assert_eq!(s.burn_rates.h1, 14.4);
        assert!(!s.alerts.fast_burn);
        assert!(s.alerts.slow_burn);
    }

    #[test]
    fn no_events_burn_nothing() {
        let s = status(&slo("0.999", "7d"), None, &[Counts::default(); 8]);
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
        let s = status(&slo("0.9", "1d"), None, &[c(100, 70); 8]);
        assert_eq!(s.error_budget.total, 10.0);
        assert_eq!(s.error_budget.used, 30);
        assert_eq!(s.error_budget.remaining, -20.0);
        assert_eq!(s.error_budget.remaining_ratio, -2.0);
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
