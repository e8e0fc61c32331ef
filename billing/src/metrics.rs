//! Billing's Prometheus families: `meterd_usage_cost_total{tenant,currency}` (every accepted
//! llm.usage event at the price book's list price) and the invoices closed.

use meterd_ingest::metrics::{AcceptedObserver, BatchLabels, CappedFamily, Map};
use meterd_schemas::{EventData, StoredEvent};
use prometheus::{CounterVec, IntCounter, Opts, Registry};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use crate::invoice::{Closing, InvoiceError};
use crate::rate::{TokenPrices, Tokens, token_cost};
use crate::{PriceBook, PriceEntry};

/// Registered in billing's own registry; the binary gathers every crate's.
#[derive(Debug, Clone)]
pub struct BillingMetrics {
    registry: Registry,
    cost: CounterVec,
    closed: IntCounter,
    close_failures: IntCounter,
}

impl BillingMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let cost = CounterVec::new(
            Opts::new(
                "meterd_usage_cost_total",
                "List cost of accepted llm.usage events by the price book in force at each \
                 event's time, before plans, markups and credits, by tenant and currency \
                 (events of unpriced models add nothing; invoices are the exact amounts)",
            ),
            &["tenant", "currency"],
        )?;
        let closed = IntCounter::new(
            "meterd_billing_invoices_closed_total",
            "Invoices closed (by the close endpoint or automatically)",
        )?;
        let close_failures = IntCounter::new(
            "meterd_billing_close_failures_total",
            "Failed attempts to close an invoice, asked for or automatic (automatic closing \
             tries a failing invoice again every minute)",
        )?;
        registry.register(Box::new(cost.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        registry.register(Box::new(close_failures.clone()))?;
        Ok(Self {
            registry,
            cost,
            closed,
            close_failures,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts the outcomes of closing invoices.
    pub fn closings<'a>(
        &self,
        outcomes: impl IntoIterator<Item = &'a Result<Closing, InvoiceError>>,
    ) {
        for o in outcomes {
            match o {
                Ok(Closing::Closed(_)) => self.closed.inc(),
                Ok(Closing::AlreadyClosed(_) | Closing::NotEnded) => {}
                Err(_) => self.close_failures.inc(),
            }
        }
    }

    /// The observer that counts cost as events are accepted, in at most `max_series` label
    /// combinations (past it a new tenant counts under "other").
    pub fn cost_observer(&self, prices: PriceBook, max_series: usize) -> CostObserver {
        CostObserver {
            prices,
            cost: CappedFamily::new(self.cost.clone(), &[true, false], max_series),
        }
    }
}

/// Adds each accepted llm.usage event's list cost to `meterd_usage_cost_total`.
#[derive(Debug)]
pub struct CostObserver {
    prices: PriceBook,
    cost: CappedFamily<CounterVec>,
}

impl AcceptedObserver for CostObserver {
    fn accepted(&self, events: &[StoredEvent], labels: &BatchLabels<'_>) {
        debug_assert_eq!(events.len(), labels.len(), "labels for every event");
        // Each of the batch's models is looked up in the price book once.
        let prices: Vec<Option<&[PriceEntry]>> = labels
            .models()
            .iter()
            .map(|(provider, model)| self.prices.entries(provider, model))
            .collect();
        // Tokens by tenant label and price entry (the model's number and the entry's index in
        // its list): each entry's prices apply once a batch.
        let mut sums: Map<(usize, usize, usize), (&PriceEntry, [u64; 4])> = Map::default();
        for ((e, (tenant, _)), model) in events
            .iter()
            .zip(labels.per_event())
            .zip(labels.models_per_event())
        {
            let (Some(model), EventData::LlmUsage(u)) = (model, &e.event.data) else {
                continue;
            };
            let Some(list) = prices.get(model).copied().flatten() else {
                continue;
            };
            let Some(i) = list
                .iter()
                .rposition(|p| p.effective_from.timestamp_micros() <= e.event.time_us)
            else {
                continue;
            };
            let (_, sum) = sums.entry((tenant, model, i)).or_insert((&list[i], [0; 4]));
            for (s, t) in sum.iter_mut().zip(u.priced_tokens()) {
                *s = s.saturating_add(t);
            }
        }
        for ((tenant, _, _), (entry, [input, output, cached, cache_write])) in sums {
            let tenant = labels.value(tenant);
            let tokens = Tokens {
                input: Decimal::from(input),
                output: Decimal::from(output),
                cached_input: Decimal::from(cached),
                cache_write_input: Decimal::from(cache_write),
            };
            let prices = TokenPrices {
                input_per_million: entry.input_per_million.get(),
                output_per_million: entry.output_per_million.get(),
                cached_input_per_million: entry.cached_input().get(),
                cache_write_per_million: entry.cache_write().get(),
            };
            match token_cost(&tokens, &prices, Decimal::ZERO)
                .ok()
                .and_then(|c| c.to_f64())
            {
                Some(cost) => self
                    .cost
                    .with(&[tenant, entry.currency()], |c| c.inc_by(cost)),
                // Past Decimal's range (about 7.9e28): such token counts are a client's error.
                None => tracing::warn!(
                    tenant,
                    provider = entry.provider,
                    model = entry.model,
                    "the list cost of a batch's tokens is out of range; not counted"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use meterd_ingest::metrics::{LabelLimits, UsageMetrics};
    use meterd_schemas::{Event, LlmUsage};

    use super::*;

    const PRICES: &str = r#"
        [[prices]]
        provider = "openai"
        model = "gpt-4o"
        effective_from = "2026-01-01T00:00:00Z"
        input_per_million = "1"
        output_per_million = "2"

        [[prices]]
        provider = "openai"
        model = "gpt-4o"
        effective_from = "2026-02-01T00:00:00Z"
        input_per_million = "10"
        output_per_million = "20"

        [[prices]]
        provider = "mistral"
        model = "large"
        effective_from = "2026-01-01T00:00:00Z"
        currency = "EUR"
        input_per_million = "3"
        output_per_million = "6"
    "#;

    fn llm(tenant: &str, model: (&str, &str), time: &str, tokens: [i64; 2]) -> StoredEvent {
        let time_us = chrono::DateTime::parse_from_rfc3339(time)
            .expect("a time")
            .timestamp_micros();
        StoredEvent {
            ingested_at_us: time_us,
            event: Event {
                tenant: tenant.to_owned(),
                id: "x".to_owned(),
                time_us,
                subject: None,
                source: None,
                dimensions: BTreeMap::new(),
                data: EventData::LlmUsage(LlmUsage {
                    provider: model.0.to_owned(),
                    model: model.1.to_owned(),
                    input_tokens: tokens[0],
                    output_tokens: tokens[1],
                    cached_input_tokens: None,
                    cache_write_input_tokens: None,
                    reasoning_tokens: None,
                    latency_ms: None,
                    status: None,
                    run_id: None,
                }),
            },
        }
    }

    /// The cost family's values by (tenant, currency).
    fn costs(registry: &Registry) -> BTreeMap<(String, String), f64> {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "meterd_usage_cost_total")
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                (
                    (label("tenant"), label("currency")),
                    m.get_counter().get_value(),
                )
            })
            .collect()
    }

    #[test]
    fn each_event_costs_the_price_in_force_at_its_time_under_its_tenant_label() {
        #[derive(serde::Deserialize)]
        struct Prices {
            prices: Vec<PriceEntry>,
        }
        let prices: Prices = toml::from_str(PRICES).expect("prices");
        let book = PriceBook::new(&prices.prices).expect("a price book");
        let billing = BillingMetrics::new().expect("families");
        let observer = billing.cost_observer(book, 500);
        let usage = UsageMetrics::new(
            &Registry::new(),
            &LabelLimits {
                tenant_allowlist: Some(BTreeSet::from(["acme".to_owned()])),
                ..LabelLimits::default()
            },
        )
        .expect("usage families");
        let gpt = ("openai", "gpt-4o");
        let large = ("mistral", "large");
        let batches = [
            vec![
                // The first price: 1 per million input.
                llm("acme", gpt, "2026-01-15T00:00:00Z", [1_000_000, 0]),
                // Before any price: nothing.
                llm("acme", gpt, "2025-12-31T23:59:59Z", [1_000_000, 0]),
                // The second price, under "other": 20 per million output.
                llm("initech", gpt, "2026-02-15T00:00:00Z", [0, 1_000_000]),
                llm("acme", large, "2026-01-15T00:00:00Z", [1_000_000, 0]),
                // Unpriced: nothing.
                llm("acme", ("openai", "gpt-9"), "2026-02-15T00:00:00Z", [5, 5]),
                // The second price, from its first microsecond.
                llm("acme", gpt, "2026-02-01T00:00:00Z", [1_000_000, 0]),
            ],
            vec![
                llm("initech", large, "2026-02-15T00:00:00Z", [0, 1_000_000]),
                llm("acme", gpt, "2026-02-15T00:00:00Z", [500_000, 0]),
            ],
        ];
        for batch in &batches {
            let labels = usage.accepted(batch.iter().map(|s| &s.event));
            observer.accepted(batch, &labels);
        }
        let expected: BTreeMap<(String, String), f64> = [
            (("acme", "USD"), 1.0 + 10.0 + 5.0),
            (("acme", "EUR"), 3.0),
            (("other", "USD"), 20.0),
            (("other", "EUR"), 6.0),
        ]
        .into_iter()
        .map(|((t, c), v)| ((t.to_owned(), c.to_owned()), v))
        .collect();
        assert_eq!(costs(billing.registry()), expected);
    }
}
