//! Invoices: usage gathered from the store, rated by the plan, credits applied.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::config::PriceEntry;
use crate::money::Currency;
use crate::period::Period;
use crate::rate::{self, Available, CreditUse, Step, TokenPrices, Tokens};
use crate::usage::{self, MeterValue, Scope, UsageError, UsageSource};
use crate::{Billing, ChargeKind, Plan, PriceBook};

/// Whether an invoice may still change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The period is open or not yet closed: the invoice follows the events.
    Draft,
    /// Rated under a plan or prices given in a request; nothing was changed.
    Preview,
}

/// One line of an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub charge: String,
    pub model: &'static str,
    pub meter: Option<String>,
    pub quantity: Decimal,
    pub included: Decimal,
    pub billable: Decimal,
    /// The one price per unit (per unit, volume) or per package, where there is one.
    pub unit_price: Option<Decimal>,
    /// Tiers or packages, with exact amounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breakdown: Vec<Step>,
    /// For LLM cost: the model and price entry the line rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmLine>,
    /// Rounded half to even to the currency's minor unit.
    pub amount: Decimal,
}

/// What an LLM cost line rates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LlmLine {
    pub provider: String,
    pub model: String,
    /// When the price entry used took effect; the line covers `from` to `to` of the period.
    pub price_effective_from: String,
    pub from: String,
    pub to: String,
    pub tokens: Tokens,
    pub prices: TokenPrices,
    pub markup: Decimal,
    /// Exact, before rounding.
    pub cost: Decimal,
}

/// What an invoice was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inputs {
    /// The store the events were read from.
    pub source: String,
    pub meters: Vec<MeterInput>,
    pub prices: Vec<PriceInput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterInput {
    pub meter: String,
    /// Events the meter counted (after its filter).
    pub events: u64,
    pub value: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceInput {
    pub provider: String,
    pub model: String,
    pub effective_from: String,
    pub events: u64,
}

/// An invoice of one tenant for one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invoice {
    pub tenant: String,
    pub period: String,
    pub timezone: String,
    pub period_start: String,
    pub period_end: String,
    pub plan: String,
    pub currency: &'static str,
    pub status: Status,
    pub lines: Vec<Line>,
    pub base_fee: Decimal,
    /// Rounded lines plus the base fee.
    pub subtotal: Decimal,
    pub minimum: Decimal,
    /// What raises the subtotal to the minimum.
    pub minimum_adjustment: Decimal,
    pub credits_applied: Vec<CreditUse>,
    pub total: Decimal,
    pub inputs: Inputs,
}

/// Why no invoice can be given.
#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    #[error("tenant {0:?} is not a customer (no [[customers]] entry)")]
    UnknownTenant(String),
    #[error(
        "{events} llm.usage events of {provider}/{model} from {from} have no price: add a \
         [[prices]] entry in force then"
    )]
    Unpriced {
        provider: String,
        model: String,
        from: String,
        events: u64,
    },
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("charge {charge}: {source}")]
    Overflow {
        charge: String,
        #[source]
        source: rate::Overflow,
    },
}

fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// What an invoice is rated under.
#[derive(Debug, Clone, Copy)]
pub struct Terms<'a> {
    pub plan: &'a Plan,
    pub prices: &'a PriceBook,
    pub status: Status,
}

impl Billing {
    /// The invoice of `tenant` for `period` under the tenant's plan.
    pub async fn invoice(
        &self,
        source: &dyn UsageSource,
        tenant: &str,
        period: Period,
    ) -> Result<Invoice, InvoiceError> {
        let customer = self
            .customers
            .get(tenant)
            .ok_or_else(|| InvoiceError::UnknownTenant(tenant.to_owned()))?;
        let Some(plan) = self.plans.get(customer.plan) else {
            return Err(InvoiceError::UnknownTenant(tenant.to_owned()));
        };
        let terms = Terms {
            plan,
            prices: &self.prices,
            status: Status::Draft,
        };
        self.invoice_under(source, tenant, customer.timezone, period, terms)
            .await
    }

    /// The invoice of `tenant` for `period` in zone `tz`, under `terms`.
    pub async fn invoice_under(
        &self,
        source: &dyn UsageSource,
        tenant: &str,
        tz: Tz,
        period: Period,
        terms: Terms<'_>,
    ) -> Result<Invoice, InvoiceError> {
        let start = period.start(tz);
        let end = period.end(tz);
        let scope = Scope {
            tenant,
            from_us: micros(start),
            to_us: micros(end),
        };
        let plan = terms.plan;
        let mut values: BTreeMap<usize, MeterValue> = BTreeMap::new();
        let mut llm = Vec::new();
        for charge in &plan.charges {
            match &charge.kind {
                ChargeKind::Metered { meter, .. } => {
                    if values.contains_key(meter) {
                        continue;
                    }
                    let Some(m) = self.meters.get(*meter) else {
                        continue;
                    };
                    values.insert(*meter, usage::meter_value(source, m, scope).await?);
                }
                ChargeKind::LlmCost { .. } if llm.is_empty() => {
                    // One stretch per price in force: split the period where any price changes.
                    let mut cuts = vec![start];
                    cuts.extend(terms.prices.changes_within(start, end));
                    cuts.push(end);
                    for w in cuts.windows(2) {
                        let part = Scope {
                            tenant,
                            from_us: micros(w[0]),
                            to_us: micros(w[1]),
                        };
                        for t in usage::model_tokens(source, part).await? {
                            llm.push((w[0], w[1], t));
                        }
                    }
                }
                ChargeKind::LlmCost { .. } => {}
            }
        }
        let usage = Usage { values, llm };
        let credits = self.available_credits(tenant);
        rate_invoice(
            self,
            tenant,
            tz,
            period,
            terms,
            &usage,
            &credits,
            source.name(),
        )
    }

    /// What is left of each of the tenant's grants.
    fn available_credits(&self, tenant: &str) -> Vec<Available> {
        self.grants
            .iter()
            .filter(|g| g.tenant == tenant)
            .map(|g| Available {
                grant: g.id.clone(),
                balance: g.amount,
                priority: g.priority,
                expires: g.expires,
            })
            .collect()
    }
}

/// Usage of one tenant-period, as gathered from a store.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// Per meter index.
    pub values: BTreeMap<usize, MeterValue>,
    /// Per stretch of constant prices: its start, end and each model's tokens.
    pub llm: Vec<(DateTime<Utc>, DateTime<Utc>, usage::ModelTokens)>,
}

/// Rates `usage` into an invoice; pure, so it can be tested without a store.
#[allow(clippy::too_many_arguments)]
pub fn rate_invoice(
    billing: &Billing,
    tenant: &str,
    tz: Tz,
    period: Period,
    terms: Terms<'_>,
    usage: &Usage,
    credits: &[Available],
    source: &str,
) -> Result<Invoice, InvoiceError> {
    let plan = terms.plan;
    let currency: Currency = plan.currency;
    let start = period.start(tz);
    let mut lines = Vec::new();
    let mut meter_inputs = Vec::new();
    let mut price_inputs: Vec<PriceInput> = Vec::new();
    for charge in &plan.charges {
        match &charge.kind {
            ChargeKind::Metered {
                meter,
                model,
                pricing,
                included,
            } => {
                let name = billing
                    .meters
                    .get(*meter)
                    .map(|m| m.name.clone())
                    .unwrap_or_default();
                let value = usage.values.get(meter).cloned().unwrap_or(MeterValue {
                    events: 0,
                    value: None,
                });
                let quantity = value.value.unwrap_or_default();
                if !meter_inputs.iter().any(|m: &MeterInput| m.meter == name) {
                    meter_inputs.push(MeterInput {
                        meter: name.clone(),
                        events: value.events,
                        value: value.value,
                    });
                }
                let priced = rate::price(pricing, quantity, *included).map_err(|source| {
                    InvoiceError::Overflow {
                        charge: charge.name.clone(),
                        source,
                    }
                })?;
                lines.push(Line {
                    charge: charge.name.clone(),
                    model: model.as_str(),
                    meter: Some(name),
                    quantity,
                    included: *included,
                    billable: priced.billable,
                    unit_price: priced.unit_price,
                    breakdown: priced.steps,
                    llm: None,
                    amount: currency.round(priced.exact),
                });
            }
            ChargeKind::LlmCost { markup } => {
                for (from, to, t) in &usage.llm {
                    let entry: &PriceEntry = terms
                        .prices
                        .at(&t.provider, &t.model, *from)
                        .ok_or_else(|| InvoiceError::Unpriced {
                            provider: t.provider.clone(),
                            model: t.model.clone(),
                            from: instant(*from),
                            events: t.events,
                        })?;
                    let prices = TokenPrices::of(entry);
                    let cost = rate::token_cost(&t.tokens, &prices, *markup).map_err(|source| {
                        InvoiceError::Overflow {
                            charge: charge.name.clone(),
                            source,
                        }
                    })?;
                    let effective_from = instant(entry.effective_from);
                    match price_inputs.iter_mut().find(|p| {
                        p.provider == t.provider
                            && p.model == t.model
                            && p.effective_from == effective_from
                    }) {
                        Some(p) => p.events += t.events,
                        None => price_inputs.push(PriceInput {
                            provider: t.provider.clone(),
                            model: t.model.clone(),
                            effective_from: effective_from.clone(),
                            events: t.events,
                        }),
                    }
                    let tokens = &t.tokens;
                    let quantity = rate::total([
                        tokens.input,
                        tokens.output,
                        tokens.cached_input,
                        tokens.cache_write_input,
                    ])
                    .map_err(|source| InvoiceError::Overflow {
                        charge: charge.name.clone(),
                        source,
                    })?;
                    lines.push(Line {
                        charge: charge.name.clone(),
                        model: "llm_cost",
                        meter: None,
                        quantity,
                        included: Decimal::ZERO,
                        billable: quantity,
                        unit_price: None,
                        breakdown: Vec::new(),
                        llm: Some(LlmLine {
                            provider: t.provider.clone(),
                            model: t.model.clone(),
                            price_effective_from: effective_from,
                            from: instant(*from),
                            to: instant(*to),
                            tokens: t.tokens.clone(),
                            prices,
                            markup: *markup,
                            cost,
                        }),
                        amount: currency.round(cost),
                    });
                }
            }
        }
    }
    let overflow = |source| InvoiceError::Overflow {
        charge: "the invoice's total".to_owned(),
        source,
    };
    let base_fee = currency.round(plan.base_fee);
    let subtotal = rate::add(
        rate::total(lines.iter().map(|l| l.amount)).map_err(overflow)?,
        base_fee,
    )
    .map_err(overflow)?;
    let minimum = currency.round(plan.minimum);
    // Both are at most the largest decimal: their difference and sum stay in range.
    let minimum_adjustment = currency.round((minimum - subtotal).max(Decimal::ZERO));
    let due = subtotal + minimum_adjustment;
    let credits_applied = rate::apply_credits(due, credits, start, currency);
    let paid = rate::total(credits_applied.iter().map(|c| c.amount)).map_err(overflow)?;
    let total = currency.round(due - paid);
    Ok(Invoice {
        tenant: tenant.to_owned(),
        period: period.to_string(),
        timezone: tz.name().to_owned(),
        period_start: instant(start),
        period_end: instant(period.end(tz)),
        plan: plan.name.clone(),
        currency: currency.code(),
        status: terms.status,
        lines,
        base_fee,
        subtotal: currency.round(subtotal),
        minimum,
        minimum_adjustment,
        credits_applied,
        total,
        inputs: Inputs {
            source: source.to_owned(),
            meters: meter_inputs,
            prices: price_inputs,
        },
    })
}

impl Invoice {
    /// The lines as CSV (RFC 4180), one row per line.
    pub fn lines_csv(&self) -> String {
        let mut out = String::from(
            "tenant,period,currency,charge,model,meter,provider,llm_model,quantity,included,\
             billable,unit_price,amount\n",
        );
        for l in &self.lines {
            let cells = [
                self.tenant.clone(),
                self.period.clone(),
                self.currency.to_owned(),
                l.charge.clone(),
                l.model.to_owned(),
                l.meter.clone().unwrap_or_default(),
                l.llm
                    .as_ref()
                    .map(|x| x.provider.clone())
                    .unwrap_or_default(),
                l.llm.as_ref().map(|x| x.model.clone()).unwrap_or_default(),
                l.quantity.to_string(),
                l.included.to_string(),
                l.billable.to_string(),
                l.unit_price.map(|p| p.to_string()).unwrap_or_default(),
                l.amount.to_string(),
            ];
            let row: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
            out.push_str(&row.join(","));
            out.push('\n');
        }
        out
    }
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
