//! Billing: meters over the deduplicated events, an effective-dated price book, plans with
//! per-unit, graduated, volume, package and LLM-cost charges, prepaid credits, and invoices
//! computed exactly in decimal.
//!
//! The rule, in full (docs/billing.md says it for users):
//! 1. Each meter is aggregated inside the store over the tenant's events of the period
//!    (calendar month in the customer's zone, start inclusive, end exclusive).
//! 2. Each charge prices its meter's quantity minus its included units; each line is computed
//!    exactly, then rounded half to even to the currency's minor unit.
//! 3. LLM cost: per provider, model and price entry in force, tokens times the price book's
//!    prices per million, plus the markup; one line each, rounded alike.
//! 4. Subtotal = the rounded lines + the base fee, raised to the plan's minimum.
//! 5. Credits come off last: lowest priority first, then earliest expiry (none last), skipping
//!    grants expired at the period's start; never below zero. A grant's balance is its amount
//!    less what closed invoices took of it.

pub mod closed;
pub mod config;
pub mod filter;
pub mod invoice;
pub mod meter;
pub mod metrics;
pub mod money;
pub mod period;
pub mod rate;
pub mod usage;
pub mod window;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;

pub use closed::{ClosedStore, FileClosedStore};
pub use config::BillingConfig;
pub use invoice::{Answer, Closing, Invoice, InvoiceError};
pub use meter::Meter;
pub use money::Currency;
pub use period::Period;
pub use usage::{UsageDialect, UsageError, UsageSource};
pub use window::{WindowSize, Windows};

use config::{ChargeModel, CreditConfig, PlanConfig, PriceEntry, TierConfig};
use rate::{Pricing, Tier, TokenPrices};

/// A configuration entry that cannot be used, named as in the file (`plans[0] (pro)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry}: {reason}")]
pub struct ConfigError {
    pub entry: String,
    pub reason: String,
}

fn entry(section: &str, index: usize, name: &str) -> String {
    format!("{section}[{index}] ({name})")
}

/// One charge of a plan.
#[derive(Debug, Clone)]
pub struct Charge {
    pub name: String,
    pub kind: ChargeKind,
}

#[derive(Debug, Clone)]
pub enum ChargeKind {
    /// Prices a meter's quantity.
    Metered {
        /// Index into [`Billing::meters`].
        meter: usize,
        model: ChargeModel,
        pricing: Pricing,
        included: Decimal,
    },
    /// Prices LLM tokens with the price book.
    LlmCost { markup: Decimal },
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub currency: Currency,
    pub base_fee: Decimal,
    pub minimum: Decimal,
    pub charges: Vec<Charge>,
}

/// Prices per provider and model, each entry in force from its `effective_from` until the
/// next entry of the same model.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    /// Per (provider, model), entries by `effective_from`.
    entries: BTreeMap<(String, String), Vec<PriceEntry>>,
}

impl PriceBook {
    /// Checks `[[prices]]`; every entry must be in `currency` when one is required.
    pub fn new(entries: &[PriceEntry]) -> Result<PriceBook, ConfigError> {
        let mut book = PriceBook::default();
        for (i, e) in entries.iter().enumerate() {
            let name = entry("prices", i, &format!("{}/{}", e.provider, e.model));
            let fail = |reason: String| ConfigError {
                entry: name.clone(),
                reason,
            };
            if Currency::from_code(e.currency()).is_none() {
                return Err(fail(format!(
                    "{:?} is not an ISO 4217 currency",
                    e.currency()
                )));
            }
            for (what, v) in [
                ("input_per_million", e.input_per_million),
                ("output_per_million", e.output_per_million),
                ("cached_input_per_million", e.cached_input()),
                ("cache_write_per_million", e.cache_write()),
            ] {
                if v.get() < Decimal::ZERO {
                    return Err(fail(format!("{what} is negative")));
                }
            }
            let list = book
                .entries
                .entry((e.provider.clone(), e.model.clone()))
                .or_default();
            // Entries are few per model; a request's price book is capped by the API.
            if list.iter().any(|o| o.effective_from == e.effective_from) {
                return Err(fail(format!(
                    "a second entry for {}/{} from {}",
                    e.provider, e.model, e.effective_from
                )));
            }
            if let Some(o) = list.first()
                && o.currency() != e.currency()
            {
                return Err(fail(format!(
                    "{}/{} is priced in {} and {}",
                    e.provider,
                    e.model,
                    o.currency(),
                    e.currency()
                )));
            }
            list.push(e.clone());
        }
        for list in book.entries.values_mut() {
            list.sort_by_key(|o| o.effective_from);
        }
        Ok(book)
    }

    /// A model's entries, by `effective_from`.
    pub fn entries(&self, provider: &str, model: &str) -> Option<&[PriceEntry]> {
        self.entries
            .get(&(provider.to_owned(), model.to_owned()))
            .map(Vec::as_slice)
    }

    /// The entry in force for a model at `at`.
    pub fn at(&self, provider: &str, model: &str, at: DateTime<Utc>) -> Option<&PriceEntry> {
        self.entries
            .get(&(provider.to_owned(), model.to_owned()))?
            .iter()
            .rev()
            .find(|e| e.effective_from <= at)
    }

    /// Every instant a price changes strictly inside `[from, to)`, in order.
    pub fn changes_within(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let set: BTreeSet<DateTime<Utc>> = self
            .entries
            .values()
            .flatten()
            .map(|e| e.effective_from)
            .filter(|t| *t > from && *t < to)
            .collect();
        set.into_iter().collect()
    }

    pub fn currencies(&self) -> BTreeSet<&str> {
        self.entries
            .values()
            .flatten()
            .map(PriceEntry::currency)
            .collect()
    }
}

/// A tenant's billing setup.
#[derive(Debug, Clone)]
pub struct Customer {
    pub tenant: String,
    /// Index into [`Billing::plans`].
    pub plan: usize,
    pub timezone: Tz,
}

/// A prepaid credit grant.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: String,
    pub tenant: String,
    pub amount: Decimal,
    pub expires: Option<DateTime<Utc>>,
    pub priority: i64,
}

/// The validated billing configuration.
#[derive(Debug, Clone, Default)]
pub struct Billing {
    pub meters: Vec<Meter>,
    pub plans: Vec<Plan>,
    pub prices: PriceBook,
    pub customers: BTreeMap<String, Customer>,
    pub grants: Vec<Grant>,
}

impl Billing {
    /// Checks every entry and the references between them; the error names the first entry
    /// that cannot be used and why.
    pub fn new(config: &BillingConfig) -> Result<Billing, ConfigError> {
        let mut meters = Vec::with_capacity(config.meters.len());
        for (i, m) in config.meters.iter().enumerate() {
            let name = entry("meters", i, &m.name);
            if m.name.is_empty() {
                return Err(ConfigError {
                    entry: name,
                    reason: "a meter needs a name".to_owned(),
                });
            }
            if meters.iter().any(|o: &Meter| o.name == m.name) {
                return Err(ConfigError {
                    entry: name,
                    reason: format!("a second meter named {:?}", m.name),
                });
            }
            meters.push(Meter::new(m).map_err(|reason| ConfigError {
                entry: name,
                reason,
            })?);
        }
        let prices = PriceBook::new(&config.prices)?;
        let mut plans: Vec<Plan> = Vec::with_capacity(config.plans.len());
        for (i, p) in config.plans.iter().enumerate() {
            let name = entry("plans", i, &p.name);
            if plans.iter().any(|o| o.name == p.name) {
                return Err(ConfigError {
                    entry: name,
                    reason: format!("a second plan named {:?}", p.name),
                });
            }
            plans.push(plan(p, &meters, &prices).map_err(|reason| ConfigError {
                entry: name,
                reason,
            })?);
        }
        let mut customers = BTreeMap::new();
        for (i, c) in config.customers.iter().enumerate() {
            let name = entry("customers", i, &c.tenant);
            let fail = |reason: String| ConfigError {
                entry: name.clone(),
                reason,
            };
            let plan = plans
                .iter()
                .position(|p| p.name == c.plan)
                .ok_or_else(|| fail(format!("plan {:?} is not defined", c.plan)))?;
            let timezone = match &c.timezone {
                None => Tz::UTC,
                Some(z) => z
                    .parse::<Tz>()
                    .map_err(|_| fail(format!("timezone {z:?} is not an IANA zone")))?,
            };
            if customers
                .insert(
                    c.tenant.clone(),
                    Customer {
                        tenant: c.tenant.clone(),
                        plan,
                        timezone,
                    },
                )
                .is_some()
            {
                return Err(fail(format!("tenant {:?} is listed twice", c.tenant)));
            }
        }
        let grants = grants(&config.credits, &customers, &plans)?;
        Ok(Billing {
            meters,
            plans,
            prices,
            customers,
            grants,
        })
    }

    pub fn meter(&self, name: &str) -> Option<&Meter> {
        self.meters.iter().find(|m| m.name == name)
    }

    /// Checks a plan given outside the configuration (a preview) against these meters and a
    /// price book.
    pub fn plan_from(&self, config: &PlanConfig, prices: &PriceBook) -> Result<Plan, String> {
        plan(config, &self.meters, prices)
    }
}

fn plan(p: &PlanConfig, meters: &[Meter], prices: &PriceBook) -> Result<Plan, String> {
    let currency = Currency::from_code(&p.currency)
        .ok_or_else(|| format!("currency {:?} is not an ISO 4217 currency", p.currency))?;
    let money = |what: &str, v: Option<money::Dec>| -> Result<Decimal, String> {
        let v = v.map_or(Decimal::ZERO, money::Dec::get);
        if v < Decimal::ZERO {
            return Err(format!("{what} is negative"));
        }
        Ok(v)
    };
    let base_fee = money("base_fee", p.base_fee)?;
    let minimum = money("minimum", p.minimum)?;
    for (what, v) in [("base_fee", base_fee), ("minimum", minimum)] {
        if currency.round(v) != v {
            return Err(format!(
                "{what} {v} has finer units than {}",
                currency.code()
            ));
        }
    }
    if p.charges.len() > MAX_CHARGES {
        return Err(format!(
            "{} charges, more than {MAX_CHARGES}",
            p.charges.len()
        ));
    }
    if p.charges
        .iter()
        .filter(|c| c.model == ChargeModel::LlmCost)
        .count()
        > 1
    {
        return Err("two llm_cost charges would bill the same tokens twice".to_owned());
    }
    let mut charges = Vec::with_capacity(p.charges.len());
    for (i, c) in p.charges.iter().enumerate() {
        let at = |reason: String| format!("charges[{i}]: {reason}");
        let unused = |what: &str, given: bool| -> Result<(), String> {
            if given {
                Err(at(format!(
                    "{what} does not apply to a {} charge",
                    c.model.as_str()
                )))
            } else {
                Ok(())
            }
        };
        if c.model == ChargeModel::LlmCost {
            unused("meter", c.meter.is_some())?;
            unused("unit_price", c.unit_price.is_some())?;
            unused("tiers", c.tiers.is_some())?;
            unused("package_size", c.package_size.is_some())?;
            unused("package_price", c.package_price.is_some())?;
            unused("included", c.included.is_some())?;
            let markup = c.markup.map_or(Decimal::ZERO, money::Dec::get);
            if markup < Decimal::ZERO {
                return Err(at("markup is negative".to_owned()));
            }
            if let Some(other) = prices
                .currencies()
                .into_iter()
                .find(|x| *x != currency.code())
            {
                return Err(at(format!(
                    "the price book has prices in {other}, and the plan bills in {}",
                    currency.code()
                )));
            }
            charges.push(Charge {
                name: c.name.clone().unwrap_or_else(|| "llm_cost".to_owned()),
                kind: ChargeKind::LlmCost { markup },
            });
            continue;
        }
        unused("markup", c.markup.is_some())?;
        let meter_name = c
            .meter
            .as_deref()
            .ok_or_else(|| at(format!("a {} charge needs a meter", c.model.as_str())))?;
        let meter = meters
            .iter()
            .position(|m| m.name == meter_name)
            .ok_or_else(|| at(format!("meter {meter_name:?} is not defined")))?;
        let price_of = |what: &str, v: Option<money::Dec>| -> Result<Decimal, String> {
            let v = v
                .ok_or_else(|| at(format!("a {} charge needs {what}", c.model.as_str())))?
                .get();
            if v < Decimal::ZERO {
                return Err(at(format!("{what} is negative")));
            }
            Ok(v)
        };
        let pricing = match c.model {
            ChargeModel::PerUnit => {
                unused("tiers", c.tiers.is_some())?;
                unused("package_size", c.package_size.is_some())?;
                unused("package_price", c.package_price.is_some())?;
                Pricing::PerUnit {
                    unit_price: price_of("unit_price", c.unit_price)?,
                }
            }
            ChargeModel::Graduated | ChargeModel::Volume => {
                unused("unit_price", c.unit_price.is_some())?;
                unused("package_size", c.package_size.is_some())?;
                unused("package_price", c.package_price.is_some())?;
                let tiers = tiers(c.tiers.as_deref().unwrap_or_default()).map_err(at)?;
                if c.model == ChargeModel::Graduated {
                    Pricing::Graduated { tiers }
                } else {
                    Pricing::Volume { tiers }
                }
            }
            ChargeModel::Package => {
                unused("unit_price", c.unit_price.is_some())?;
                unused("tiers", c.tiers.is_some())?;
                let size = c
                    .package_size
                    .filter(|s| *s > 0)
                    .ok_or_else(|| at("a package charge needs package_size above 0".to_owned()))?;
                Pricing::Package {
                    size: Decimal::from(size),
                    price: price_of("package_price", c.package_price)?,
                }
            }
            // Handled above; a meter is never priced by the price book.
            ChargeModel::LlmCost => {
                return Err(at("an llm_cost charge takes no meter".to_owned()));
            }
        };
        charges.push(Charge {
            name: c.name.clone().unwrap_or_else(|| meter_name.to_owned()),
            kind: ChargeKind::Metered {
                meter,
                model: c.model,
                pricing,
                included: Decimal::from(c.included.unwrap_or(0)),
            },
        });
    }
    let mut names = BTreeSet::new();
    for c in &charges {
        if !names.insert(c.name.as_str()) {
            return Err(format!(
                "two charges are named {:?}; give one a name",
                c.name
            ));
        }
    }
    Ok(Plan {
        name: p.name.clone(),
        currency,
        base_fee,
        minimum,
        charges,
    })
}

/// The most charges of a plan and tiers of a charge: far more than price lists have, few
/// enough that a plan in a preview request cannot make rating expensive.
const MAX_CHARGES: usize = 64;
const MAX_TIERS: usize = 100;

fn tiers(config: &[TierConfig]) -> Result<Vec<Tier>, String> {
    if config.is_empty() {
        return Err("tiers are needed".to_owned());
    }
    if config.len() > MAX_TIERS {
        return Err(format!("{} tiers, more than {MAX_TIERS}", config.len()));
    }
    let mut out = Vec::with_capacity(config.len());
    let mut below: Option<u64> = None;
    for (i, t) in config.iter().enumerate() {
        let last = i + 1 == config.len();
        match (t.up_to, last) {
            (None, false) => {
                return Err(format!(
                    "tiers[{i}] has no up_to, but only the last tier may be open"
                ));
            }
            (Some(_), true) => {
                return Err(format!(
                    "tiers[{i}] is the last tier and must have no up_to, so every quantity \
                     has a price"
                ));
            }
            (Some(u), false) => {
                if below.is_some_and(|b| u <= b) || u == 0 {
                    return Err(format!(
                        "tiers[{i}] up_to {u} overlaps the tier before it; up_to must grow"
                    ));
                }
                below = Some(u);
            }
            (None, true) => {}
        }
        let unit_price = t.unit_price.get();
        let flat_price = t.flat_price.map_or(Decimal::ZERO, money::Dec::get);
        if unit_price < Decimal::ZERO || flat_price < Decimal::ZERO {
            return Err(format!("tiers[{i}] has a negative price"));
        }
        out.push(Tier {
            up_to: t.up_to.map(Decimal::from),
            unit_price,
            flat_price,
        });
    }
    Ok(out)
}

fn grants(
    credits: &[CreditConfig],
    customers: &BTreeMap<String, Customer>,
    plans: &[Plan],
) -> Result<Vec<Grant>, ConfigError> {
    let mut out: Vec<Grant> = Vec::with_capacity(credits.len());
    let mut per_tenant: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, c) in credits.iter().enumerate() {
        let n = per_tenant.entry(c.tenant.as_str()).or_default();
        *n += 1;
        let id = c.id.clone().unwrap_or_else(|| format!("{}-{n}", c.tenant));
        let fail = |reason: String| ConfigError {
            entry: entry("credits", i, &id),
            reason,
        };
        let customer = customers
            .get(&c.tenant)
            .ok_or_else(|| fail(format!("tenant {:?} is not a customer", c.tenant)))?;
        let amount = c.amount.get();
        if amount <= Decimal::ZERO {
            return Err(fail("amount must be above zero".to_owned()));
        }
        let currency = plans.get(customer.plan).map(|p| p.currency);
        if let Some(currency) = currency
            && currency.round(amount) != amount
        {
            return Err(fail(format!(
                "amount {amount} has finer units than {}",
                currency.code()
            )));
        }
        if out.iter().any(|g| g.id == id) {
            return Err(fail(format!("a second grant with id {id:?}")));
        }
        out.push(Grant {
            id,
            tenant: c.tenant.clone(),
            amount,
            expires: c.expires,
            priority: c.priority,
        });
    }
    Ok(out)
}

impl TokenPrices {
    fn of(e: &PriceEntry) -> TokenPrices {
        TokenPrices {
            input_per_million: e.input_per_million.get(),
            output_per_million: e.output_per_million.get(),
            cached_input_per_million: e.cached_input().get(),
            cache_write_per_million: e.cache_write().get(),
        }
    }
}
