//! Ingest's Prometheus families: events by outcome, batches by result, how long a batch takes
//! to be durable, and the log's size against its limit.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

/// Registered in ingest's own registry; the binary gathers every crate's.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    registry: Registry,
    events: IntCounterVec,
    batches: IntCounterVec,
    ack: Histogram,
    pub(crate) log_bytes: IntGauge,
    pub(crate) log_limit_bytes: IntGauge,
    pub(crate) unflushed_rows: IntGauge,
    pub(crate) usage: UsageMetrics,
}

/// Every `outcome` of an event.
const OUTCOMES: [&str; 3] = ["accepted", "duplicate", "conflict"];
/// Every `result` of a batch.
pub(crate) const RESULTS: [&str; 5] = ["ok", "log_full", "overloaded", "shutting_down", "failed"];

impl IngestMetrics {
    pub fn new(limits: &LabelLimits) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let usage = UsageMetrics::new(&registry, limits)?;
        let events = IntCounterVec::new(
            Opts::new(
                "meterd_ingest_events_total",
                "Events submitted, by outcome: accepted (stored for the first time), duplicate \
                 (same id and content as a stored event), conflict (same id, other content)",
            ),
            &["outcome"],
        )?;
        let batches = IntCounterVec::new(
            Opts::new(
                "meterd_ingest_batches_total",
                "Batches of valid events submitted to the log, by result",
            ),
            &["result"],
        )?;
        let ack = Histogram::with_opts(
            HistogramOpts::new(
                "meterd_ingest_ack_duration_seconds",
                "From a batch's submission to its acknowledgement (durable on disk)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let log_bytes = IntGauge::new(
            "meterd_ingest_log_bytes",
            "Bytes the durable log retains (not yet delivered to every store)",
        )?;
        let log_limit_bytes = IntGauge::new(
            "meterd_ingest_log_limit_bytes",
            "Retained bytes past which ingest answers 503",
        )?;
        let unflushed_rows = IntGauge::new(
            "meterd_ingest_unflushed_rows",
            "Events in the embedded store not yet written to Parquet",
        )?;
        for c in [&events, &batches] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(ack.clone()))?;
        for g in [&log_bytes, &log_limit_bytes, &unflushed_rows] {
            registry.register(Box::new(g.clone()))?;
        }
        for o in OUTCOMES {
            events.with_label_values(&[o]);
        }
        for r in RESULTS {
            batches.with_label_values(&[r]);
        }
        Ok(Self {
            registry,
            events,
            batches,
            ack,
            log_bytes,
            log_limit_bytes,
            unflushed_rows,
            usage,
        })
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn batch(&self, result: &str) {
        self.batches.with_label_values(&[result]).inc();
    }

    pub(crate) fn acknowledged(&self, seconds: f64) {
        self.ack.observe(seconds);
    }

    /// Counts a batch's events by outcome, once the writer has decided (and made durable)
    /// them, whether or not its client still waits for the answer.
    pub(crate) fn outcome(&self, outcome: &crate::writer::Outcome) {
        let counts = [
            outcome.accepted,
            outcome.duplicates,
            outcome.conflicts.len(),
        ];
        for (o, n) in OUTCOMES.into_iter().zip(counts) {
            self.events
                .with_label_values(&[o])
                .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        }
    }
}

/// The label value that stands for every value without a series of its own.
pub const OTHER: &str = "other";

/// The label value of an optional field an event leaves out (an empty value would read as no
/// label at all in Prometheus).
pub const NONE: &str = "none";

/// How many label values get series of their own in the usage families; the rest fold into
/// [`OTHER`], so the families' sums stay the true totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelLimits {
    /// Tenants with series of their own (the `tenant` label).
    pub top_tenants: usize,
    /// Providers, models and agents with series of their own, each.
    pub top_values: usize,
    /// If given, exactly these tenants have series of their own.
    pub tenant_allowlist: Option<std::collections::BTreeSet<String>>,
    /// The series one usage family may have; past it new label combinations fold whole (so a
    /// family has at most this many plus one per combination of its closed labels: type,
    /// direction, status).
    pub max_series: usize,
}

impl Default for LabelLimits {
    /// At 10,000 tenants: 21 tenant values, 11 of each other kind, under 2,000 series in all.
    fn default() -> Self {
        Self {
            top_tenants: 20,
            top_values: 10,
            tenant_allowlist: None,
            max_series: 500,
        }
    }
}

/// Events of a label seen before any value is admitted: a value must show its share first.
const WARM_UP: u64 = 1_000;

/// One label's values: which have series of their own, the `top` heaviest by volume.
///
/// Volumes are estimated with the Space-Saving algorithm over `10 x top` counters (memory stays
/// bounded whatever values clients send; any value carrying more than 1/(10 x top) of the
/// events is tracked). After a warm-up, a value carrying at least 1/`top` of the events is
/// admitted while fewer than `top` are; once all slots are taken, a tracked value counted
/// twice as often as the lightest admitted one takes its slot. A value's series only counts
/// while it is admitted: what it carried before, or after losing its slot, is counted under
/// [`OTHER`]. So every counter only grows, and the sum over a label's values is the true
/// total.
// Written here rather than taken from a crate: folding has to keep Prometheus counters
// monotonic and their sums exact, which generic cardinality limiters do not promise.
#[derive(Debug, Default)]
struct Dimension {
    top: usize,
    allow: Option<std::collections::BTreeSet<String>>,
    admitted: std::collections::HashSet<String>,
    /// Space-Saving counters, at most `10 x top` (admitted values among them).
    counts: std::collections::HashMap<String, u64>,
    total: u64,
}

impl Dimension {
    fn new(top: usize, allow: Option<std::collections::BTreeSet<String>>) -> Self {
        Self {
            top,
            allow,
            ..Self::default()
        }
    }

    fn capacity(&self) -> usize {
        self.top.saturating_mul(10).max(1)
    }

    /// The label value to count one event of `value` under.
    fn fold(&mut self, value: &str) -> String {
        self.total = self.total.saturating_add(1);
        if let Some(allow) = &self.allow {
            return if allow.contains(value) { value } else { OTHER }.to_owned();
        }
        if self.top == 0 {
            return OTHER.to_owned();
        }
        let count = self.count(value);
        if self.admitted.contains(value) {
            return value.to_owned();
        }
        let top = u64::try_from(self.top).unwrap_or(u64::MAX);
        if self.total < WARM_UP || count.saturating_mul(top) < self.total {
            return OTHER.to_owned();
        }
        if self.admitted.len() >= self.top {
            // Full: the lightest admitted value gives way to one counted twice as often.
            let lightest = self
                .admitted
                .iter()
                .map(|v| (self.counts.get(v).copied().unwrap_or(0), v.clone()))
                .min();
            match lightest {
                Some((c, v)) if count >= c.saturating_mul(2) => {
                    self.admitted.remove(&v);
                }
                _ => return OTHER.to_owned(),
            }
        }
        self.admitted.insert(value.to_owned());
        value.to_owned()
    }

    /// Space-Saving: counts `value` once; a value not tracked while every counter is taken
    /// replaces the smallest one not admitted (inheriting its count, an overestimate).
    fn count(&mut self, value: &str) -> u64 {
        if let Some(c) = self.counts.get_mut(value) {
            *c = c.saturating_add(1);
            return *c;
        }
        if self.counts.len() < self.capacity() {
            self.counts.insert(value.to_owned(), 1);
            return 1;
        }
        // Admitted values keep their counters. The admitted check (a hash) runs only for a
        // counter smaller than the smallest so far, so the scan costs a comparison a counter.
        let mut smallest: Option<(&String, u64)> = None;
        for (v, c) in &self.counts {
            if smallest.is_none_or(|(_, s)| *c < s) && !self.admitted.contains(v) {
                smallest = Some((v, *c));
            }
        }
        let smallest = smallest.map(|(v, c)| (v.clone(), c));
        match smallest {
            Some((v, c)) => {
                self.counts.remove(&v);
                let c = c.saturating_add(1);
                self.counts.insert(value.to_owned(), c);
                c
            }
            None => 0,
        }
    }
}

/// A usage family's series, capped at [`LabelLimits::max_series`].
#[derive(Debug)]
struct Family {
    counter: IntCounterVec,
    /// Which labels fold whole once the family is full (the others are small closed sets).
    open: Vec<bool>,
    series: std::collections::HashSet<Vec<String>>,
    max: usize,
}

impl Family {
    fn add(&mut self, mut labels: Vec<String>, n: u64) {
        if !self.series.contains(&labels) && self.series.len() >= self.max {
            for (l, open) in labels.iter_mut().zip(&self.open) {
                if *open {
                    *l = OTHER.to_owned();
                }
            }
        }
        let values: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.counter.with_label_values(&values).inc_by(n);
        self.series.insert(labels);
    }
}

#[derive(Debug)]
struct UsageState {
    tenants: Dimension,
    providers: Dimension,
    models: Dimension,
    agents: Dimension,
    events: Family,
    tokens: Family,
    runs: Family,
}

/// The usage families, counted once per accepted event (never for a duplicate or a
/// conflict): `meterd_usage_events_total{tenant,type}`,
/// `meterd_usage_tokens_total{tenant,provider,model,direction}`,
/// `meterd_agent_runs_total{tenant,agent,status}`.
#[derive(Debug, Clone)]
pub struct UsageMetrics(std::sync::Arc<std::sync::Mutex<UsageState>>);

impl UsageMetrics {
    pub fn new(registry: &Registry, limits: &LabelLimits) -> prometheus::Result<Self> {
        let family = |name: &str, help: &str, labels: &[&str], open: &[bool]| {
            let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(counter.clone()))?;
            Ok::<_, prometheus::Error>(Family {
                counter,
                open: open.to_vec(),
                series: Default::default(),
                max: limits.max_series.max(1),
            })
        };
        let state = UsageState {
            tenants: Dimension::new(limits.top_tenants, limits.tenant_allowlist.clone()),
            providers: Dimension::new(limits.top_values, None),
            models: Dimension::new(limits.top_values, None),
            agents: Dimension::new(limits.top_values, None),
            events: family(
                "meterd_usage_events_total",
                "Events accepted, by tenant and type (tenants beyond the limits are \"other\")",
                &["tenant", "type"],
                &[true, false],
            )?,
            tokens: family(
                "meterd_usage_tokens_total",
                "Tokens of accepted llm.usage events, by tenant, provider, model and direction \
                 (input, output, cached_input, cache_write_input)",
                &["tenant", "provider", "model", "direction"],
                &[true, true, true, false],
            )?,
            runs: family(
                "meterd_agent_runs_total",
                "Accepted agent.run events, by tenant, agent and status",
                &["tenant", "agent", "status"],
                &[true, true, false],
            )?,
        };
        Ok(Self(std::sync::Arc::new(std::sync::Mutex::new(state))))
    }

    /// Counts events just made durable.
    pub fn accepted<'a>(&self, events: impl IntoIterator<Item = &'a meterd_schemas::Event>) {
        use meterd_schemas::EventData;
        let mut s = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &mut *s;
        for e in events {
            let tenant = s.tenants.fold(&e.tenant);
            let event_type = e.data.event_type().as_str().to_owned();
            s.events.add(vec![tenant.clone(), event_type], 1);
            match &e.data {
                EventData::LlmUsage(u) => {
                    let provider = s.providers.fold(&u.provider);
                    let model = s.models.fold(&u.model);
                    for (direction, n) in [
                        ("input", Some(u.input_tokens)),
                        ("output", Some(u.output_tokens)),
                        ("cached_input", u.cached_input_tokens),
                        ("cache_write_input", u.cache_write_input_tokens),
                    ] {
                        let n = n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
                        if n > 0 {
                            s.tokens.add(
                                vec![
                                    tenant.clone(),
                                    provider.clone(),
                                    model.clone(),
                                    direction.to_owned(),
                                ],
                                n,
                            );
                        }
                    }
                }
                EventData::AgentRun(r) => {
                    let agent = s.agents.fold(r.agent.as_deref().unwrap_or(NONE));
                    let status = r.status.clone().unwrap_or_else(|| NONE.to_owned());
                    s.runs.add(vec![tenant.clone(), agent, status], 1);
                }
                EventData::ApiRequest(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use meterd_schemas::{AgentRun, Event, EventData, LlmUsage};

    use super::*;

    fn llm(tenant: &str, provider: &str, model: &str, tokens: i64) -> Event {
        Event {
            tenant: tenant.to_owned(),
            id: "x".to_owned(),
            time_us: 0,
            subject: None,
            source: None,
            dimensions: BTreeMap::new(),
            data: EventData::LlmUsage(LlmUsage {
                provider: provider.to_owned(),
                model: model.to_owned(),
                input_tokens: tokens,
                output_tokens: 1,
                cached_input_tokens: Some(2),
                cache_write_input_tokens: None,
                reasoning_tokens: None,
                latency_ms: None,
                status: None,
                run_id: None,
            }),
        }
    }

    fn run(tenant: &str, agent: &str) -> Event {
        Event {
            data: EventData::AgentRun(AgentRun {
                agent: Some(agent.to_owned()),
                run_id: "r".to_owned(),
                parent_run_id: None,
                status: Some("succeeded".to_owned()),
                duration_ms: 5,
                steps: None,
                tool_calls: None,
            }),
            ..llm(tenant, "", "", 0)
        }
    }

    /// Each family's samples: labels to value.
    fn samples(registry: &Registry, family: &str) -> Vec<(HashMap<String, String>, u64)> {
        registry
            .gather()
            .into_iter()
            .filter(|f| f.name() == family)
            .flat_map(|f| {
                f.get_metric()
                    .iter()
                    .map(|m| {
                        let labels = m
                            .get_label()
                            .iter()
                            .map(|l| (l.name().to_owned(), l.value().to_owned()))
                            .collect();
                        (labels, m.get_counter().get_value() as u64)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn ten_thousand_tenants_stay_under_two_thousand_series_and_sum_exactly() {
        let registry = Registry::new();
        let usage = UsageMetrics::new(&registry, &LabelLimits::default()).expect("metrics");
        let mut events = Vec::new();
        let (mut total_events, mut total_input) = (0u64, 0u64);
        // Tenant 0 is heavy throughout; 10,000 tenants, 40 models, 40 agents.
        for i in 0..60_000u64 {
            let tenant = if i % 3 == 0 {
                "heavy".to_owned()
            } else {
                format!("tenant-{}", i % 10_000)
            };
            let e = if i % 2 == 0 {
                total_input += i % 1000;
                llm(
                    &tenant,
                    &format!("p{}", i % 7),
                    &format!("m{}", i % 40),
                    (i % 1000) as i64,
                )
            } else {
                run(&tenant, &format!("agent-{}", i % 40))
            };
            total_events += 1;
            events.push(e);
        }
        usage.accepted(events.iter());
        let families = [
            "meterd_usage_events_total",
            "meterd_usage_tokens_total",
            "meterd_agent_runs_total",
        ];
        let series: usize = families.iter().map(|f| samples(&registry, f).len()).sum();
        assert!(series < 2_000, "{series} series");
        let events_sum: u64 = samples(&registry, families[0]).iter().map(|(_, v)| v).sum();
        assert_eq!(events_sum, total_events);
        let input: u64 = samples(&registry, families[1])
            .iter()
            .filter(|(l, _)| l["direction"] == "input")
            .map(|(_, v)| v)
            .sum();
        assert_eq!(input, total_input);
        let runs: u64 = samples(&registry, families[2]).iter().map(|(_, v)| v).sum();
        assert_eq!(runs, total_events / 2);
        // The heavy tenant has a series of its own; most tenants are "other".
        let tenants: std::collections::BTreeSet<String> = samples(&registry, families[0])
            .into_iter()
            .map(|(l, _)| l["tenant"].clone())
            .collect();
        assert!(tenants.contains("heavy") && tenants.contains(OTHER));
        assert!(tenants.len() <= 21, "{tenants:?}");
    }

    #[test]
    fn an_allowlist_names_exactly_its_tenants() {
        let registry = Registry::new();
        let limits = LabelLimits {
            tenant_allowlist: Some(["acme".to_owned()].into()),
            ..LabelLimits::default()
        };
        let usage = UsageMetrics::new(&registry, &limits).expect("metrics");
        let events = [run("acme", "a"), run("initech", "a"), run("globex", "a")];
        usage.accepted(events.iter());
        let mut got: Vec<(String, u64)> = samples(&registry, "meterd_usage_events_total")
            .into_iter()
            .map(|(l, v)| (l["tenant"].clone(), v))
            .collect();
        got.sort();
        assert_eq!(got, [("acme".to_owned(), 1), (OTHER.to_owned(), 2)]);
    }

    #[test]
    fn a_full_family_folds_new_combinations_whole() {
        let registry = Registry::new();
        let limits = LabelLimits {
            top_tenants: 1_000,
            max_series: 5,
            ..LabelLimits::default()
        };
        let usage = UsageMetrics::new(&registry, &limits).expect("metrics");
        let events: Vec<Event> = (0..5_000)
            .map(|i| run(&format!("t{}", i % 50), "a"))
            .collect();
        usage.accepted(events.iter());
        let s = samples(&registry, "meterd_usage_events_total");
        // At most five combinations, and the folded one.
        assert!(s.len() <= 6, "{s:?}");
        assert!(s.iter().any(|(l, _)| l["tenant"] == OTHER), "{s:?}");
        assert_eq!(s.iter().map(|(_, v)| v).sum::<u64>(), 5_000);
    }

    #[test]
    fn a_tenant_that_grows_late_gets_a_series_and_junk_cannot_fill_the_counters() {
        let registry = Registry::new();
        let usage = UsageMetrics::new(&registry, &LabelLimits::default()).expect("metrics");
        // 20 tenants share the first 20,000 events evenly: each takes a slot.
        let early: Vec<Event> = (0..20_000)
            .map(|i| run(&format!("early-{}", i % 20), "a"))
            .collect();
        usage.accepted(early.iter());
        // 200,000 distinct junk tenants, one event each: the counters stay bounded.
        let junk: Vec<Event> = (0..200_000)
            .map(|i| run(&format!("junk-{i}"), "a"))
            .collect();
        usage.accepted(junk.iter());
        {
            let state = usage.0.lock().expect("lock");
            assert!(
                state.tenants.counts.len() <= 200,
                "{}",
                state.tenants.counts.len()
            );
        }
        // Then a tenant sends half of everything: it takes the lightest slot.
        let late: Vec<Event> = (0..400_000)
            .map(|i| {
                if i % 2 == 0 {
                    run("late", "a")
                } else {
                    run(&format!("early-{}", i % 20), "a")
                }
            })
            .collect();
        usage.accepted(late.iter());
        let s = samples(&registry, "meterd_usage_events_total");
        let late_count = s
            .iter()
            .find(|(l, _)| l["tenant"] == "late")
            .map(|(_, v)| *v)
            .expect("the late tenant has a series");
        assert!(late_count > 150_000, "{late_count}");
        assert_eq!(s.iter().map(|(_, v)| v).sum::<u64>(), 620_000);
        // No junk tenant has one.
        assert!(
            !s.iter().any(|(l, _)| l["tenant"].starts_with("junk-")),
            "{s:?}"
        );
    }
}
