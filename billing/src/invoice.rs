//! Invoices: usage gathered from the store, rated by the plan, credits applied.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::closed::{ClosedError, ClosedStore};
use crate::config::PriceEntry;
use crate::money::Currency;
use crate::period::Period;
use crate::rate::{self, Available, CreditUse, Step, TokenPrices, Tokens};
use crate::usage::{self, MeterValue, Scope, UsageError, UsageSource};
use crate::{Billing, ChargeKind, Plan, PriceBook};

/// Whether an invoice may still change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The period is open or not yet closed: the invoice follows the events.
    Draft,
    /// Rated under a plan or prices given in a request; nothing was changed.
    Preview,
    /// Frozen: stored when its period was closed and answered byte for byte ever after.
    Closed,
}

/// One line of an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub charge: String,
    pub model: String,
    pub meter: Option<String>,
    /// For an adjustment: the closed period whose usage changed after it was closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjusts: Option<String>,
    pub quantity: Decimal,
    pub included: Decimal,
    pub billable: Decimal,
    /// The one price per unit (per unit, volume) or per package, where there is one.
    pub unit_price: Option<Decimal>,
    /// Tiers or packages, with exact amounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub breakdown: Vec<Step>,
    /// For LLM cost: the model and price entry the line rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmLine>,
    /// Rounded half to even to the currency's minor unit.
    pub amount: Decimal,
}

/// What an LLM cost line rates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    /// The store the events were read from.
    pub source: String,
    pub meters: Vec<MeterInput>,
    pub prices: Vec<PriceInput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterInput {
    pub meter: String,
    /// Events the meter counted (after its filter).
    pub events: u64,
    pub value: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceInput {
    pub provider: String,
    pub model: String,
    pub effective_from: String,
    pub events: u64,
}

/// An invoice of one tenant for one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    pub tenant: String,
    pub period: String,
    pub timezone: String,
    pub period_start: String,
    pub period_end: String,
    pub plan: String,
    pub currency: String,
    pub status: Status,
    /// When the period was closed (closed invoices only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
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
    #[error(transparent)]
    Closed(#[from] ClosedError),
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

/// An invoice as `GET /v1/invoices` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The bytes stored when the period was closed.
    Closed(Vec<u8>),
    /// The period is not closed: computed now.
    Draft(Box<Invoice>),
}

/// What closing a tenant's period did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closing {
    /// Closed now; the stored bytes.
    Closed(Vec<u8>),
    /// Closed before; the bytes stored then.
    AlreadyClosed(Vec<u8>),
    /// The period has not ended in the tenant's zone.
    NotEnded,
}

impl Billing {
    fn customer(&self, tenant: &str) -> Result<(&crate::Customer, &Plan), InvoiceError> {
        let customer = self
            .customers
            .get(tenant)
            .ok_or_else(|| InvoiceError::UnknownTenant(tenant.to_owned()))?;
        let plan = self
            .plans
            .get(customer.plan)
            .ok_or_else(|| InvoiceError::UnknownTenant(tenant.to_owned()))?;
        Ok((customer, plan))
    }

    /// The invoice of `tenant` for `period`: the stored one once the period is closed, else a
    /// draft under the tenant's plan.
    pub async fn invoice(
        &self,
        source: &dyn UsageSource,
        closed: &dyn ClosedStore,
        tenant: &str,
        period: Period,
    ) -> Result<Answer, InvoiceError> {
        let (customer, plan) = self.customer(tenant)?;
        let (stored, history) = History::load(closed, tenant).await?;
        if let Some(body) = stored.get(&period) {
            return Ok(Answer::Closed(body.clone()));
        }
        let terms = Terms {
            plan,
            prices: &self.prices,
            status: Status::Draft,
        };
        let invoice = self
            .draft(source, tenant, customer.timezone, period, terms, &history)
            .await?;
        Ok(Answer::Draft(Box::new(invoice)))
    }

    /// Closes `tenant`'s `period` at `now`: its invoice is stored and never changes again.
    /// Closing a closed period answers the invoice stored then.
    pub async fn close(
        &self,
        source: &dyn UsageSource,
        closed: &dyn ClosedStore,
        tenant: &str,
        period: Period,
        now: DateTime<Utc>,
    ) -> Result<Closing, InvoiceError> {
        self.customer(tenant)?;
        let tenants = [tenant.to_owned()];
        let mut done = self.close_many(source, closed, &tenants, period, now).await;
        match done.pop() {
            Some((_, outcome)) => outcome,
            None => Err(InvoiceError::UnknownTenant(tenant.to_owned())),
        }
    }

    /// Closes `period` for each of `tenants` at `now`, as [`Billing::close`] does one by one,
    /// with the usage of all of them read by one statement per meter (and per price stretch)
    /// and zone (tenant by tenant if those fail). What goes wrong with one tenant (not a
    /// customer, a model without a price, storing its invoice) is that tenant's outcome.
    pub async fn close_many(
        &self,
        source: &dyn UsageSource,
        closed: &dyn ClosedStore,
        tenants: &[String],
        period: Period,
        now: DateTime<Utc>,
    ) -> Vec<(String, Result<Closing, InvoiceError>)> {
        let mut outcomes: Vec<(String, Option<Result<Closing, InvoiceError>>)> = Vec::new();
        let mut open = Vec::new();
        for tenant in tenants {
            let outcome = match self.customer(tenant) {
                Err(e) => Some(Err(e)),
                Ok((customer, _)) if now < period.end(customer.timezone) => {
                    Some(Ok(Closing::NotEnded))
                }
                Ok((customer, plan)) => match History::load(closed, tenant).await {
                    Err(e) => Some(Err(e)),
                    Ok((stored, _)) if stored.contains_key(&period) => Some(Ok(
                        Closing::AlreadyClosed(stored.get(&period).cloned().unwrap_or_default()),
                    )),
                    Ok((_, history)) => {
                        open.push((tenant.as_str(), customer.timezone, plan, history));
                        None
                    }
                },
            };
            outcomes.push((tenant.clone(), outcome));
        }
        let gathered = self.gather_or_each(source, period, &open).await;
        let mut closed_now = Vec::with_capacity(open.len());
        for (tenant, tz, plan, history) in &open {
            let terms = Terms {
                plan,
                prices: &self.prices,
                status: Status::Closed,
            };
            let outcome = async {
                let mut invoice = self
                    .draft_with(
                        source,
                        tenant,
                        *tz,
                        period,
                        terms,
                        history,
                        true,
                        gathered.as_ref(),
                    )
                    .await?;
                invoice.closed_at = Some(instant(now));
                let body = serde_json::to_vec(&invoice).map_err(|e| {
                    InvoiceError::Closed(ClosedError::Store(format!("encoding the invoice: {e}")))
                })?;
                let kept = closed.store(tenant, period, body.clone()).await?;
                Ok(if kept == body {
                    Closing::Closed(kept)
                } else {
                    Closing::AlreadyClosed(kept)
                })
            }
            .await;
            closed_now.push(outcome);
        }
        fill_in(outcomes, closed_now)
    }

    /// Each of `tenants`' invoice for `period`, as [`Billing::invoice`] answers it one by one,
    /// with the usage of all of them read by one statement per meter (and per price stretch)
    /// and zone (tenant by tenant if those fail): the invoice run. What goes wrong with one
    /// tenant (not a customer, a model without a price) is that tenant's outcome.
    pub async fn invoices(
        &self,
        source: &dyn UsageSource,
        closed: &dyn ClosedStore,
        tenants: &[String],
        period: Period,
    ) -> Vec<(String, Result<Answer, InvoiceError>)> {
        let mut outcomes: Vec<(String, Option<Result<Answer, InvoiceError>>)> = Vec::new();
        let mut open = Vec::new();
        for tenant in tenants {
            let outcome = match self.customer(tenant) {
                Err(e) => Some(Err(e)),
                Ok((customer, plan)) => match History::load(closed, tenant).await {
                    Err(e) => Some(Err(e)),
                    Ok((stored, history)) => match stored.get(&period) {
                        Some(body) => Some(Ok(Answer::Closed(body.clone()))),
                        None => {
                            open.push((tenant.as_str(), customer.timezone, plan, history));
                            None
                        }
                    },
                },
            };
            outcomes.push((tenant.clone(), outcome));
        }
        let gathered = self.gather_or_each(source, period, &open).await;
        let mut drafts = Vec::with_capacity(open.len());
        for (tenant, tz, plan, history) in &open {
            let terms = Terms {
                plan,
                prices: &self.prices,
                status: Status::Draft,
            };
            let draft = self
                .draft_with(
                    source,
                    tenant,
                    *tz,
                    period,
                    terms,
                    history,
                    true,
                    gathered.as_ref(),
                )
                .await
                .map(|i| Answer::Draft(Box::new(i)));
            drafts.push(draft);
        }
        fill_in(outcomes, drafts)
    }

    /// [`Billing::gather_many`], or where its statements fail (a timeout over a large month),
    /// `None`: each tenant's usage is then read on its own, as for one invoice, and what fails
    /// there is that tenant's outcome.
    async fn gather_or_each(
        &self,
        source: &dyn UsageSource,
        period: Period,
        open: &[(&str, Tz, &Plan, History)],
    ) -> Option<Gathered> {
        match self.gather_many(source, period, open).await {
            Ok(gathered) => Some(gathered),
            Err(e) => {
                tracing::warn!(
                    %period,
                    tenants = open.len(),
                    error = %e,
                    "reading every tenant's usage at once failed; reading it tenant by tenant"
                );
                None
            }
        }
    }

    /// The usage of `period` (and of the closed periods whose late events it carries) of each
    /// open tenant, read by one statement per meter the plans use, and per price stretch for
    /// tokens, for each zone (a zone gives the period its instants), naming at most
    /// [`usage::MAX_TENANTS_PER_STATEMENT`] tenants at a time.
    async fn gather_many(
        &self,
        source: &dyn UsageSource,
        period: Period,
        open: &[(&str, Tz, &Plan, History)],
    ) -> Result<Gathered, InvoiceError> {
        // (period, zone) -> (zone, tenants, meters, whether tokens are needed)
        type Group<'a> = (Tz, Vec<&'a str>, BTreeSet<usize>, bool);
        let mut groups: BTreeMap<(Period, &str), Group<'_>> = BTreeMap::new();
        for (tenant, tz, plan, history) in open {
            let mut periods = vec![period];
            periods.extend(history.adjusted_by(period));
            for p in periods {
                let group = groups
                    .entry((p, tz.name()))
                    .or_insert_with(|| (*tz, Vec::new(), BTreeSet::new(), false));
                group.1.push(tenant);
                for charge in &plan.charges {
                    match &charge.kind {
                        ChargeKind::Metered { meter, .. } => {
                            group.2.insert(*meter);
                        }
                        ChargeKind::LlmCost { .. } => group.3 = true,
                    }
                }
            }
        }
        let store_error = |message: String| {
            InvoiceError::Usage(UsageError::Store {
                store: source.name().to_owned(),
                message,
            })
        };
        let tenant_column = crate::filter::filter_column("tenant").map_err(store_error)?;
        let mut out = Gathered::new();
        for ((p, _), (tz, mut tenants, meters, tokens)) in groups {
            tenants.sort_unstable();
            tenants.dedup();
            let (start, end) = (p.start(tz), p.end(tz));
            for chunk in tenants.chunks(usage::MAX_TENANTS_PER_STATEMENT) {
                let mut usages: BTreeMap<&str, Usage> =
                    chunk.iter().map(|t| (*t, Usage::default())).collect();
                for &m in &meters {
                    let Some(meter) = self.meters.get(m) else {
                        continue;
                    };
                    let rows = usage::meter_windows(
                        source,
                        usage::UsageQuery {
                            meter,
                            tenants: usage::Tenants::Among(chunk),
                            from_us: micros(start),
                            to_us: micros(end),
                            windows: None,
                            group_by: &[tenant_column],
                        },
                    )
                    .await?;
                    for row in rows {
                        let tenant = row.groups.first().cloned().flatten().unwrap_or_default();
                        if let Some(u) = usages.get_mut(tenant.as_str()) {
                            u.values.insert(m, row.value);
                        }
                    }
                    for u in usages.values_mut() {
                        u.values.entry(m).or_insert_with(|| usage::no_events(meter));
                    }
                }
                if tokens {
                    // One stretch per price in force, as for one tenant.
                    let mut cuts = vec![start];
                    cuts.extend(self.prices.changes_within(start, end));
                    cuts.push(end);
                    for w in cuts.windows(2) {
                        for (tenant, t) in usage::tokens_by_tenant(
                            source,
                            usage::Tenants::Among(chunk),
                            micros(w[0]),
                            micros(w[1]),
                        )
                        .await?
                        {
                            if let Some(u) = usages.get_mut(tenant.as_str()) {
                                u.llm.push((w[0], w[1], t));
                            }
                        }
                    }
                }
                for (tenant, u) in usages {
                    out.insert((tenant.to_owned(), p), u);
                }
            }
        }
        Ok(out)
    }

    /// The invoice of `tenant` for `period` in zone `tz` under `terms` (a plan or prices given
    /// in a request), with the credits and adjustments a draft would have; nothing is stored.
    pub async fn preview(
        &self,
        source: &dyn UsageSource,
        closed: &dyn ClosedStore,
        tenant: &str,
        tz: Tz,
        period: Period,
        terms: Terms<'_>,
    ) -> Result<Invoice, InvoiceError> {
        let (_, history) = History::load(closed, tenant).await?;
        // Credits are granted in the currency of the tenant's plan; they pay only for a plan
        // in that currency.
        let same_currency = self
            .customer(tenant)
            .is_ok_and(|(_, plan)| plan.currency == terms.plan.currency);
        self.draft_with(
            source,
            tenant,
            tz,
            period,
            terms,
            &history,
            same_currency,
            None,
        )
        .await
    }

    /// Gathers the usage of one period from the store, unless `gathered` holds it.
    async fn gather(
        &self,
        source: &dyn UsageSource,
        tenant: &str,
        tz: Tz,
        period: Period,
        terms: Terms<'_>,
        gathered: Option<&Gathered>,
    ) -> Result<Usage, InvoiceError> {
        if let Some(usage) = gathered.and_then(|g| g.get(&(tenant.to_owned(), period))) {
            return Ok(usage.clone());
        }
        let start = period.start(tz);
        let end = period.end(tz);
        let scope = Scope {
            tenant,
            from_us: micros(start),
            to_us: micros(end),
        };
        let mut values: BTreeMap<usize, MeterValue> = BTreeMap::new();
        let mut llm = Vec::new();
        let mut tokens_read = false;
        for charge in &terms.plan.charges {
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
                ChargeKind::LlmCost { .. } if !tokens_read => {
                    tokens_read = true;
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
        Ok(Usage { values, llm })
    }

    /// An open period's invoice: its usage rated, credits at what closed invoices left of them,
    /// and the adjustments of the closed periods whose next open period this is.
    async fn draft(
        &self,
        source: &dyn UsageSource,
        tenant: &str,
        tz: Tz,
        period: Period,
        terms: Terms<'_>,
        history: &History,
    ) -> Result<Invoice, InvoiceError> {
        self.draft_with(source, tenant, tz, period, terms, history, true, None)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn draft_with(
        &self,
        source: &dyn UsageSource,
        tenant: &str,
        tz: Tz,
        period: Period,
        terms: Terms<'_>,
        history: &History,
        with_credits: bool,
        gathered: Option<&Gathered>,
    ) -> Result<Invoice, InvoiceError> {
        let usage = self
            .gather(source, tenant, tz, period, terms, gathered)
            .await?;
        let mut adjustments = Vec::new();
        for closed in history.adjusted_by(period) {
            // The closed period rated again over the events there are now.
            let again = self
                .gather(source, tenant, tz, closed, terms, gathered)
                .await?;
            let rerated = rate_invoice(
                self,
                tenant,
                tz,
                closed,
                terms,
                &again,
                &[],
                Vec::new(),
                source.name(),
            )?;
            adjustments.extend(history.adjustments(closed, &rerated.lines)?);
        }
        let credits = if with_credits {
            self.available_credits(tenant, history, period)
        } else {
            Vec::new()
        };
        rate_invoice(
            self,
            tenant,
            tz,
            period,
            terms,
            &usage,
            &credits,
            adjustments,
            source.name(),
        )
    }

    /// What is left of each of the tenant's grants once the closed invoices (other than
    /// `period`'s) took their part.
    fn available_credits(&self, tenant: &str, history: &History, period: Period) -> Vec<Available> {
        self.grants
            .iter()
            .filter(|g| g.tenant == tenant)
            .map(|g| Available {
                grant: g.id.clone(),
                balance: g.amount - history.used(&g.id, period),
                priority: g.priority,
                expires: g.expires,
            })
            .collect()
    }
}

/// A tenant's closed invoices, read back.
#[derive(Debug, Default)]
struct History {
    invoices: BTreeMap<Period, Invoice>,
}

impl History {
    /// The tenant's closed invoices as stored, and read back.
    async fn load(
        closed: &dyn ClosedStore,
        tenant: &str,
    ) -> Result<(BTreeMap<Period, Vec<u8>>, History), InvoiceError> {
        let stored = closed.load(tenant).await?;
        let history = History::read(&stored)?;
        Ok((stored, history))
    }

    fn read(stored: &BTreeMap<Period, Vec<u8>>) -> Result<History, InvoiceError> {
        let mut invoices = BTreeMap::new();
        for (period, body) in stored {
            let invoice: Invoice = serde_json::from_slice(body).map_err(|e| {
                InvoiceError::Closed(ClosedError::Store(format!(
                    "the closed invoice of {period} does not read back: {e}"
                )))
            })?;
            invoices.insert(*period, invoice);
        }
        Ok(History { invoices })
    }

    /// What the closed invoices of periods other than `except` took of `grant`.
    fn used(&self, grant: &str, except: Period) -> Decimal {
        self.invoices
            .iter()
            .filter(|(p, _)| **p != except)
            .flat_map(|(_, i)| &i.credits_applied)
            .filter(|c| c.grant == grant)
            .map(|c| c.amount)
            .fold(Decimal::ZERO, |a, b| a.saturating_add(b))
    }

    /// The closed periods whose late events `period` carries: those before it with every
    /// period in between closed, so `period` is the first open one after them.
    fn adjusted_by(&self, period: Period) -> Vec<Period> {
        let mut out = Vec::new();
        let mut p = period;
        while let Some(before) = p.previous() {
            if !self.invoices.contains_key(&before) {
                break;
            }
            out.push(before);
            p = before;
        }
        out.reverse();
        out
    }

    /// The lines that bring what was billed for `closed` (its invoice and the adjustments of
    /// later closed invoices) to `rerated`, per charge; none where nothing changed.
    fn adjustments(&self, closed: Period, rerated: &[Line]) -> Result<Vec<Line>, InvoiceError> {
        let tag = closed.to_string();
        let mut billed: BTreeMap<String, (Decimal, Decimal)> = BTreeMap::new();
        let mut add = |line: &Line| -> Result<(), InvoiceError> {
            let entry = billed.entry(line.charge.clone()).or_default();
            entry.0 = rate::add(entry.0, line.quantity).map_err(overflow)?;
            entry.1 = rate::add(entry.1, line.amount).map_err(overflow)?;
            Ok(())
        };
        if let Some(invoice) = self.invoices.get(&closed) {
            for line in invoice.lines.iter().filter(|l| l.adjusts.is_none()) {
                add(line)?;
            }
        }
        for invoice in self.invoices.values() {
            for line in invoice
                .lines
                .iter()
                .filter(|l| l.adjusts.as_deref() == Some(&tag))
            {
                add(line)?;
            }
        }
        let mut now: BTreeMap<String, (Decimal, Decimal, &Line)> = BTreeMap::new();
        for line in rerated {
            let entry =
                now.entry(line.charge.clone())
                    .or_insert((Decimal::ZERO, Decimal::ZERO, line));
            entry.0 = rate::add(entry.0, line.quantity).map_err(overflow)?;
            entry.1 = rate::add(entry.1, line.amount).map_err(overflow)?;
        }
        let mut out = Vec::new();
        for (charge, (quantity, amount, line)) in now {
            let (billed_quantity, billed_amount) = billed.get(&charge).copied().unwrap_or_default();
            let diff = rate::sub(amount, billed_amount).map_err(overflow)?;
            if diff.is_zero() {
                continue;
            }
            let more = rate::sub(quantity, billed_quantity).map_err(overflow)?;
            out.push(Line {
                charge,
                model: line.model.clone(),
                meter: line.meter.clone(),
                adjusts: Some(tag.clone()),
                quantity: more,
                included: Decimal::ZERO,
                billable: more,
                unit_price: None,
                breakdown: Vec::new(),
                llm: None,
                amount: diff,
            });
        }
        Ok(out)
    }
}

fn overflow(source: rate::Overflow) -> InvoiceError {
    InvoiceError::Overflow {
        charge: "an adjustment".to_owned(),
        source,
    }
}

/// The tokens of one provider's model priced by one price entry.
#[derive(Debug)]
struct LlmUse<'a> {
    entry: &'a PriceEntry,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    events: u64,
    tokens: Tokens,
}

/// Each tenant's outcome: the one decided before reading usage, else the next of `computed`,
/// which holds those of the undecided tenants in their order.
fn fill_in<T>(
    decided: Vec<(String, Option<Result<T, InvoiceError>>)>,
    computed: Vec<Result<T, InvoiceError>>,
) -> Vec<(String, Result<T, InvoiceError>)> {
    let mut computed = computed.into_iter();
    decided
        .into_iter()
        .map(|(tenant, outcome)| {
            let outcome = outcome.or_else(|| computed.next()).unwrap_or_else(|| {
                // Every undecided tenant was computed, in order: not reached.
                Err(InvoiceError::UnknownTenant(tenant.clone()))
            });
            (tenant, outcome)
        })
        .collect()
}

/// Usage gathered ahead for many tenant-periods by one statement per meter.
type Gathered = BTreeMap<(String, Period), Usage>;

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
    adjustments: Vec<Line>,
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
                    model: model.as_str().to_owned(),
                    meter: Some(name),
                    adjusts: None,
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
                let overflow = |source| InvoiceError::Overflow {
                    charge: charge.name.clone(),
                    source,
                };
                // One line per provider, model and price entry: the stretches a price change
                // of another model cut are added up before the line is priced and rounded.
                let mut by_entry: BTreeMap<(&str, &str, DateTime<Utc>), LlmUse<'_>> =
                    BTreeMap::new();
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
                    let key = (t.provider.as_str(), t.model.as_str(), entry.effective_from);
                    let used = by_entry.entry(key).or_insert_with(|| LlmUse {
                        entry,
                        from: *from,
                        to: *to,
                        events: 0,
                        tokens: Tokens::default(),
                    });
                    used.from = used.from.min(*from);
                    used.to = used.to.max(*to);
                    used.events = used.events.saturating_add(t.events);
                    let sum = &mut used.tokens;
                    sum.input = rate::add(sum.input, t.tokens.input).map_err(overflow)?;
                    sum.output = rate::add(sum.output, t.tokens.output).map_err(overflow)?;
                    sum.cached_input =
                        rate::add(sum.cached_input, t.tokens.cached_input).map_err(overflow)?;
                    sum.cache_write_input =
                        rate::add(sum.cache_write_input, t.tokens.cache_write_input)
                            .map_err(overflow)?;
                }
                for ((provider, model, _), used) in by_entry {
                    let prices = TokenPrices::of(used.entry);
                    let cost =
                        rate::token_cost(&used.tokens, &prices, *markup).map_err(overflow)?;
                    let effective_from = instant(used.entry.effective_from);
                    if !price_inputs.iter().any(|p| {
                        p.provider == provider
                            && p.model == model
                            && p.effective_from == effective_from
                    }) {
                        price_inputs.push(PriceInput {
                            provider: provider.to_owned(),
                            model: model.to_owned(),
                            effective_from: effective_from.clone(),
                            events: used.events,
                        });
                    }
                    let tokens = &used.tokens;
                    let quantity = rate::total([
                        tokens.input,
                        tokens.output,
                        tokens.cached_input,
                        tokens.cache_write_input,
                    ])
                    .map_err(overflow)?;
                    lines.push(Line {
                        charge: charge.name.clone(),
                        model: "llm_cost".to_owned(),
                        meter: None,
                        adjusts: None,
                        quantity,
                        included: Decimal::ZERO,
                        billable: quantity,
                        unit_price: None,
                        breakdown: Vec::new(),
                        llm: Some(LlmLine {
                            provider: provider.to_owned(),
                            model: model.to_owned(),
                            price_effective_from: effective_from,
                            from: instant(used.from),
                            to: instant(used.to),
                            tokens: used.tokens.clone(),
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
    lines.extend(adjustments);
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
        currency: currency.code().to_owned(),
        status: terms.status,
        closed_at: None,
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
                self.currency.clone(),
                l.charge.clone(),
                l.model.clone(),
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
