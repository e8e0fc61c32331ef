//! The SLOs' event counters of `/metrics`: `meterd_slo_events_total{slo,tenant,kind}` counts
//! each SLO's valid and good events as they are accepted, so Prometheus can compute burn rates
//! itself (`rate()` of bad over valid), as Sloth and Pyrra generate them.

use std::collections::HashMap;

use meterd_ingest::metrics::{AcceptedObserver, TenantLabels};
use meterd_schemas::StoredEvent;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::{Slo, SloScope};

/// Counts every SLO's valid and good events once per accepted event, by evaluating its filters
/// on the event (the same three-valued logic the stores' counts use).
#[derive(Debug)]
pub struct SloCounters {
    slos: Vec<Slo>,
    events: IntCounterVec,
}

impl SloCounters {
    /// Registers the family in `registry`. An SLO that is not per tenant has its two series
    /// from the start (at 0), so `rate()` sees its first events.
    pub fn new(registry: &Registry, slos: Vec<Slo>) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "meterd_slo_events_total",
                "Accepted events an SLO counts, by kind: valid (of the SLO's type, scope and \
                 valid filter) and good (valid and good); tenant as in the SLO gauges: empty for \
                 an SLO over every tenant (per tenant, those beyond the usage metrics' limits \
                 are \"other\")",
            ),
            &["slo", "tenant", "kind"],
        )?;
        registry.register(Box::new(events.clone()))?;
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
        Ok(Self { slos, events })
    }
}

impl AcceptedObserver for SloCounters {
    fn accepted(&self, events: &[StoredEvent], tenants: &TenantLabels<'_>) {
        // (SLO, tenant label) to (valid, good), so each series moves once a batch.
        let mut counts: HashMap<(usize, &str), (u64, u64)> = HashMap::new();
        for e in events {
            for (i, slo) in self.slos.iter().enumerate() {
                if e.event.data.event_type() != slo.event_type {
                    continue;
                }
                let tenant = match &slo.scope {
                    SloScope::All => "",
                    SloScope::Tenant(t) if *t == e.event.tenant => t.as_str(),
                    SloScope::Tenant(_) => continue,
                    SloScope::PerTenant => tenants.get(&e.event.tenant),
                };
                if slo.valid.as_ref().is_some_and(|v| v.eval(e) != Some(true)) {
                    continue;
                }
                let (valid, good) = counts.entry((i, tenant)).or_default();
                *valid += 1;
                *good += u64::from(slo.good.eval(e) == Some(true));
            }
        }
        for ((i, tenant), (valid, good)) in counts {
            let name = &self.slos[i].name;
            self.events
                .with_label_values(&[name, tenant, "valid"])
                .inc_by(valid);
            self.events
                .with_label_values(&[name, tenant, "good"])
                .inc_by(good);
        }
    }
}
