//! The SLOs' event counters of `/metrics`: `meterd_slo_events_total{slo,tenant,kind}` counts
//! each SLO's valid and good events as they are accepted, so Prometheus can compute burn rates
//! itself (`rate()` of bad over valid), as Sloth and Pyrra generate them.

use meterd_ingest::metrics::{AcceptedObserver, BatchLabels, CappedFamily, Map, OTHER, add};
use meterd_schemas::StoredEvent;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::{Slo, SloScope};

/// Counts every SLO's valid and good events once per accepted event, by evaluating its filters
/// on the event (the same three-valued logic the stores' counts use).
#[derive(Debug)]
pub struct SloCounters {
    slos: Vec<Slo>,
    events: CappedFamily<IntCounterVec>,
}

impl SloCounters {
    /// Registers the family in `registry`, at most `max_series` label combinations (past it a
    /// new tenant of a per-tenant SLO counts under "other"). An SLO that is not per tenant has
    /// its two series from the start (at 0), so `rate()` sees its first events.
    pub fn new(registry: &Registry, slos: Vec<Slo>, max_series: usize) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "meterd_slo_events_total",
                "Accepted events an SLO counts, by kind: valid (of the SLO's type, scope and \
                 valid filter) and good (valid and good); tenant: empty for an SLO over every \
                 tenant, the tenant of a one-tenant SLO, and for a per-tenant SLO the tenant \
                 labels of the usage metrics (tenants beyond their limits are \"other\")",
            ),
            &["slo", "tenant", "kind"],
        )?;
        for s in &slos {
            let tenant = match &s.scope {
                SloScope::All => "",
                SloScope::Tenant(t) => t,
                SloScope::PerTenant => continue,
            };
            for kind in ["valid", "good"] {
                events.with_label_values(&[&s.name, tenant, kind]);
            }
        }
        registry.register(Box::new(events.clone()))?;
        let events = CappedFamily::new(events, &[false, true, false], max_series);
        Ok(Self { slos, events })
    }
}

impl AcceptedObserver for SloCounters {
    fn accepted(&self, events: &[StoredEvent], labels: &BatchLabels<'_>) {
        debug_assert_eq!(events.len(), labels.len(), "labels for every event");
        // (SLO, tenant label number of a per-tenant SLO) to (valid, good), so each series
        // moves once a batch.
        let mut counts: Map<(usize, Option<usize>), (u64, u64)> = Map::default();
        for (e, (label, _)) in events.iter().zip(labels.per_event()) {
            for (i, slo) in self.slos.iter().enumerate() {
                let Some((_, good)) = slo.counts(e) else {
                    continue;
                };
                // Only a per-tenant SLO is counted by tenant.
                let label = matches!(slo.scope, SloScope::PerTenant).then_some(label);
                let (valid, goods) = counts.entry((i, label)).or_default();
                *valid += 1;
                *goods += u64::from(good);
            }
        }
        for ((i, label), (valid, good)) in counts {
            let slo = &self.slos[i];
            let name = &slo.name;
            let tenant = match &slo.scope {
                SloScope::All => "",
                SloScope::Tenant(t) => t.as_str(),
                SloScope::PerTenant => label.map_or(OTHER, |n| labels.value(n)),
            };
            self.events
                .with(&[name, tenant, "valid"], |c| add(c, valid));
            self.events.with(&[name, tenant, "good"], |c| add(c, good));
        }
    }
}
