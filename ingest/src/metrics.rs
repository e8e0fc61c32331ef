//! Ingest's Prometheus families: events by outcome, batches by result, how long a batch takes
//! to be durable, and the log's size against its limit.

use hashbrown::HashTable;
use meterd_schemas::{EventType, StoredEvent};
use prometheus::local::LocalHistogram;
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
    /// None when per-event counting is off.
    usage: Option<UsageMetrics>,
    observers: Observers,
}

/// Every `outcome` of an event.
const OUTCOMES: [&str; 3] = ["accepted", "duplicate", "conflict"];
/// Every `result` of a batch.
pub(crate) const RESULTS: [&str; 5] = ["ok", "log_full", "overloaded", "shutting_down", "failed"];

impl IngestMetrics {
    /// `usage`: count every accepted event into the usage families and tell `observers`.
    pub fn new(
        limits: &LabelLimits,
        usage: bool,
        observers: Observers,
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let usage = usage
            .then(|| UsageMetrics::new(&registry, limits))
            .transpose()?;
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
            observers,
        })
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts events just made durable.
    pub(crate) fn accepted(&self, stored: &[StoredEvent]) {
        let Some(usage) = &self.usage else {
            return;
        };
        let labels = usage.accepted(stored.iter().map(|s| &s.event));
        for o in &self.observers.0 {
            o.accepted(stored, &labels);
        }
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
/// bounded whatever values clients send; any value carrying more than 1/(10 x top) of the events is
/// tracked). After a warm-up, a value carrying at least 1/`top` of the events is admitted while
/// fewer than `top` are; once all slots are taken, a tracked value counted twice as often as the
/// lightest admitted one takes its slot. A batch's candidates are decided heaviest first. A value's
/// series only counts while it is admitted: what it carried before, or after losing its slot, is
/// counted under [`OTHER`]. So every counter only grows, and the sum over a label's values is the
/// true total. Over the process's life at most 5 x `top` values are ever admitted, so a label that
/// keeps changing its heavy values cannot grow the families without end.
// Written here rather than taken from a crate: folding has to keep Prometheus counters
// monotonic and their sums exact, which generic cardinality limiters do not promise.
#[derive(Debug, Default)]
struct Dimension {
    top: usize,
    allow: Option<std::collections::BTreeSet<String>>,
    /// Values are kept by a 64-bit hash (see [`Dimension::key`]): counting a new value
    /// allocates nothing.
    admitted: std::collections::HashSet<u64, foldhash::fast::RandomState>,
    /// Every value admitted so far, at most [`EVER_PER_SLOT`] x `top`: past it no new value is
    /// admitted, so no family's label takes more values over the process's life.
    ever: std::collections::HashSet<u64, foldhash::fast::RandomState>,
    /// Seeded at random per process: label values come from clients, and colliding values
    /// share a volume estimate and an admission.
    hasher: foldhash::fast::RandomState,
    /// Space-Saving counters, at most `10 x top` (admitted values among them).
    counts: std::collections::HashMap<u64, u64, foldhash::fast::RandomState>,
    total: u64,
}

/// One of a batch's distinct label values, for [`Dimension::fold_batch`].
struct Volume<'a> {
    value: &'a str,
    /// Its [`Dimension::key`].
    key: u64,
    /// The batch's events that carry it.
    events: u64,
}

/// How many values per slot a label may ever admit (a value that lost its slot may take one
/// again without counting twice).
const EVER_PER_SLOT: usize = 5;

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

    /// A label value's key: a 64-bit hash under this process's random seed.
    fn key(&self, value: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(value)
    }

    /// The label value to count each of a batch's distinct values under, in the batch's
    /// order. The batch counts toward the volumes before any of its values is decided.
    fn fold_batch<'a>(&mut self, batch: &[Volume<'a>]) -> Vec<&'a str> {
        self.total = batch
            .iter()
            .fold(self.total, |total, v| total.saturating_add(v.events));
        if let Some(allow) = &self.allow {
            return batch
                .iter()
                .map(|v| {
                    if allow.contains(v.value) {
                        v.value
                    } else {
                        OTHER
                    }
                })
                .collect();
        }
        if self.top == 0 {
            return vec![OTHER; batch.len()];
        }
        debug_assert!(
            batch
                .iter()
                .map(|v| v.value)
                .collect::<std::collections::HashSet<_>>()
                .len()
                == batch.len(),
            "a batch's values are distinct"
        );
        debug_assert!(
            batch.iter().all(|v| self.key(v.value) == v.key),
            "each value's key is its own"
        );
        self.count_batch(batch.iter().map(|v| (v.key, v.events)));
        // Values with a slot keep it for this batch. Then the values heavy enough for one are
        // decided heaviest first, so which of two takes the last free slot does not depend on
        // where they stand in the batch.
        let mut labels: Vec<&'a str> = Vec::with_capacity(batch.len());
        let mut candidates: Vec<(u64, usize)> = Vec::new();
        for (i, v) in batch.iter().enumerate() {
            if self.admitted.contains(&v.key) {
                labels.push(v.value);
            } else {
                labels.push(OTHER);
                if self.heavy_enough(v.key) {
                    candidates.push((self.count(v.key), i));
                }
            }
        }
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        for (_, i) in candidates {
            if self.decide(batch[i].key) {
                labels[i] = batch[i].value;
            }
        }
        labels
    }

    /// The estimated events of the value of `key` (0 if it is not tracked).
    fn count(&self, key: u64) -> u64 {
        self.counts.get(&key).copied().unwrap_or(0)
    }

    /// Whether the value of `key` carries enough of the events for a slot: past the warm-up,
    /// at least 1/`top` of them.
    fn heavy_enough(&self, key: u64) -> bool {
        let top = u64::try_from(self.top).unwrap_or(u64::MAX);
        self.total >= WARM_UP && self.count(key).saturating_mul(top) >= self.total
    }

    /// [`Dimension::fold_batch`] for a batch's distinct values and their events.
    fn fold_values<'a>(&mut self, counts: impl Iterator<Item = (&'a str, u64)>) -> Vec<&'a str> {
        let batch: Vec<Volume<'a>> = counts
            .map(|(value, events)| Volume {
                value,
                key: self.key(value),
                events,
            })
            .collect();
        self.fold_batch(&batch)
    }

    /// Whether the value of `key` is counted under its own label, once its events are
    /// counted: admitted values stay admitted until a heavier one takes their slot.
    fn decide(&mut self, key: u64) -> bool {
        if self.admitted.contains(&key) {
            return true;
        }
        if !self.heavy_enough(key) {
            return false;
        }
        let count = self.count(key);
        if !self.ever.contains(&key) && self.ever.len() >= self.top.saturating_mul(EVER_PER_SLOT) {
            return false;
        }
        if self.admitted.len() >= self.top {
            // Full: the lightest admitted value gives way to one counted twice as often.
            let lightest = self.admitted.iter().map(|k| (self.count(*k), *k)).min();
            match lightest {
                Some((c, k)) if count >= c.saturating_mul(2) => {
                    self.admitted.remove(&k);
                }
                _ => return false,
            }
        }
        self.admitted.insert(key);
        self.ever.insert(key);
        true
    }

    /// Space-Saving over a batch of (key, events): tracked values add their events; each
    /// untracked one takes a free counter, else replaces the smallest counter not admitted,
    /// inheriting its count (an overestimate). Newcomers arrive lightest first, so a batch's
    /// heavy values are the last to be replaced. The counters not admitted sit in a min-heap
    /// for the batch, so a replacement costs a heap operation, not a scan.
    fn count_batch(&mut self, batch: impl Iterator<Item = (u64, u64)>) {
        let mut new: Vec<(u64, u64)> = Vec::new();
        for (key, n) in batch {
            match self.counts.get_mut(&key) {
                Some(c) => *c = c.saturating_add(n),
                None => new.push((n, key)),
            }
        }
        // Heaviest first into free counters.
        new.sort_unstable_by(|a, b| b.cmp(a));
        let mut new = new.into_iter();
        while self.counts.len() < self.capacity() {
            let Some((n, key)) = new.next() else {
                return;
            };
            self.counts.insert(key, n);
        }
        let rest = new.as_slice();
        if rest.is_empty() {
            return;
        }
        let admitted = &self.admitted;
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u64)>> = self
            .counts
            .extract_if(|k, _| !admitted.contains(k))
            .map(|(k, c)| std::cmp::Reverse((c, k)))
            .collect();
        for (n, key) in rest.iter().rev() {
            let Some(mut smallest) = heap.peek_mut() else {
                break;
            };
            smallest.0 = (smallest.0.0.saturating_add(*n), *key);
        }
        self.counts
            .extend(heap.into_iter().map(|std::cmp::Reverse((c, k))| (k, c)));
    }
}

/// Maps with a fast hasher: counting runs on the log writer's thread, once per event (for the
/// observers' per-batch tallies too).
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A family's series, capped at a number of label combinations ([`LabelLimits::max_series`]
/// for counters). Each label combination's series handle is kept, so counting one is a lookup,
/// not a registry call.
#[derive(Debug)]
struct Family<V: LabeledVec> {
    vec: V,
    /// Which labels fold whole once the family is full (the others are small closed sets).
    open: Vec<bool>,
    /// Each label combination's series, by the hash of its labels (values that share a
    /// hash share a bucket).
    handles: Map<u64, Vec<Labeled<V>>>,
    /// Label combinations in `handles`.
    len: usize,
    max: usize,
}

/// One label combination of a family and its series.
type Labeled<V> = (Box<[String]>, <V as LabeledVec>::Series);

/// A family of series told apart by labels.
pub trait LabeledVec: prometheus::core::Collector + Clone + 'static {
    type Series: std::fmt::Debug;
    fn series(&self, values: &[&str]) -> Self::Series;
}

impl LabeledVec for prometheus::CounterVec {
    type Series = prometheus::Counter;
    fn series(&self, values: &[&str]) -> Self::Series {
        self.with_label_values(values)
    }
}

/// A family for the crates that count accepted events too (cost, SLO events), capped as the
/// usage families are: past `max` label combinations, new ones fold their `open` labels into
/// [`OTHER`].
#[derive(Debug)]
pub struct CappedFamily<V: LabeledVec>(std::sync::Mutex<Family<V>>);

impl<V: LabeledVec> CappedFamily<V> {
    /// `vec` as registered by the caller.
    pub fn new(vec: V, open: &[bool], max: usize) -> Self {
        Self(std::sync::Mutex::new(Family {
            vec,
            open: open.to_vec(),
            handles: Map::default(),
            len: 0,
            max: max.max(1),
        }))
    }

    /// Runs `f` on the series of `labels` (or of their folded form once the family is full).
    pub fn with<R>(&self, labels: &[&str], f: impl FnOnce(&V::Series) -> R) -> R {
        let mut family = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(family.series(labels))
    }
}

/// Adds `n` to a counter, stopping at its largest value instead of wrapping to a smaller one
/// (token counts come from clients).
pub fn add(counter: &prometheus::IntCounter, n: u64) {
    counter.inc_by(n.min(u64::MAX - counter.get()));
}

impl LabeledVec for IntCounterVec {
    type Series = prometheus::IntCounter;
    fn series(&self, values: &[&str]) -> Self::Series {
        self.with_label_values(values)
    }
}

impl LabeledVec for prometheus::HistogramVec {
    type Series = Histogram;
    fn series(&self, values: &[&str]) -> Self::Series {
        self.with_label_values(values)
    }
}

impl<V: LabeledVec> Family<V> {
    fn new(registry: &Registry, vec: V, open: &[bool], max: usize) -> prometheus::Result<Self> {
        registry.register(Box::new(vec.clone()))?;
        Ok(Self {
            vec,
            open: open.to_vec(),
            handles: Map::default(),
            len: 0,
            max: max.max(1),
        })
    }

    /// The series of `labels`, or of its folded form once the family is full. A label
    /// combination seen before costs a hash and a comparison, no allocation.
    fn series(&mut self, labels: &[&str]) -> &V::Series {
        let key = labels_key(labels);
        let known = self.handles.get(&key).and_then(|bucket| {
            bucket
                .iter()
                .position(|(l, _)| l.iter().map(String::as_str).eq(labels.iter().copied()))
        });
        if let Some(i) = known {
            return &self.handles[&key][i].1;
        }
        if self.len >= self.max {
            let folded: Vec<&str> = labels
                .iter()
                .zip(&self.open)
                .map(|(l, open)| if *open { OTHER } else { *l })
                .collect();
            if folded != labels {
                return self.series(&folded);
            }
        }
        self.len += 1;
        let series = self.vec.series(labels);
        let bucket = self.handles.entry(key).or_default();
        bucket.push((labels.iter().map(|l| (*l).to_owned()).collect(), series));
        &bucket[bucket.len() - 1].1
    }
}

/// A label combination's key in [`Family::handles`].
fn labels_key(labels: &[&str]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x6d65_7465_7264).hash_one(labels)
}

/// The labels a batch of accepted events is counted by in more than one family: each event's
/// `tenant` label value (as every per-event family counts it) and each llm.usage event's
/// provider and model. Both are numbered once a batch, so an observer can tally by number
/// rather than hash each event's strings again.
#[derive(Debug, Default)]
pub struct BatchLabels<'a> {
    /// The batch's tenant label values, each once.
    values: Vec<&'a str>,
    /// Each event's tenant label value, as an index into `values`, in batch order.
    of_event: Vec<usize>,
    /// The batch's distinct (provider, model) pairs, as the events carry them (not folded).
    models: Vec<(&'a str, &'a str)>,
    /// Each event's pair, as an index into `models` (None for an event other than llm.usage).
    model_of_event: Vec<Option<usize>>,
}

impl<'a> BatchLabels<'a> {
    /// Each event's tenant label value and its number (for [`BatchLabels::value`]), in batch
    /// order.
    pub fn per_event(&self) -> impl ExactSizeIterator<Item = (usize, &'a str)> + '_ {
        self.of_event.iter().map(|n| (*n, self.value(*n)))
    }

    /// How many events are labelled: as many as the batch counted.
    pub fn len(&self) -> usize {
        self.of_event.len()
    }

    pub fn is_empty(&self) -> bool {
        self.of_event.is_empty()
    }

    /// The tenant label value numbered `n` ([`OTHER`] for a number not given out).
    pub fn value(&self, n: usize) -> &'a str {
        self.values.get(n).copied().unwrap_or(OTHER)
    }

    /// Each event's (provider, model) number, an index into [`BatchLabels::models`], in batch
    /// order: None for an event other than llm.usage.
    pub fn models_per_event(&self) -> impl ExactSizeIterator<Item = Option<usize>> + '_ {
        self.model_of_event.iter().copied()
    }

    /// The batch's distinct (provider, model) pairs, by number.
    pub fn models(&self) -> &[(&'a str, &'a str)] {
        &self.models
    }
}

/// Counts more of every accepted event than the usage families do (SLO events, cost), in the
/// crates that know how. Called on the log writer's thread once events are durable: keep it
/// to a pass over the batch.
pub trait AcceptedObserver: Send + Sync {
    /// `events` were just accepted; `labels` gives each one's `tenant` label value and model,
    /// by position (it labels exactly these events, in this order).
    fn accepted(&self, events: &[StoredEvent], labels: &BatchLabels<'_>);
}

/// The observers ingest tells of every accepted batch.
#[derive(Clone, Default)]
pub struct Observers(pub Vec<std::sync::Arc<dyn AcceptedObserver>>);

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Observers({})", self.0.len())
    }
}

/// The `direction` of each token count of an llm.usage event, in the order of
/// [`meterd_schemas::LlmUsage::priced_tokens`].
const DIRECTIONS: [&str; 4] = ["input", "output", "cached_input", "cache_write_input"];

/// Buckets of `meterd_usage_api_request_duration_seconds` (Prometheus's defaults).
const API_LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of `meterd_usage_agent_run_duration_seconds`: agent runs take seconds to hours.
const AGENT_DURATION_BUCKETS: [f64; 11] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
];

#[derive(Debug)]
struct UsageState {
    tenants: Dimension,
    providers: Dimension,
    models: Dimension,
    agents: Dimension,
    events: Family<IntCounterVec>,
    tokens: Family<IntCounterVec>,
    runs: Family<IntCounterVec>,
    latency: Family<prometheus::HistogramVec>,
    duration: Family<prometheus::HistogramVec>,
    scratch: Scratch,
}

/// What tallying a batch keeps between batches: the hash tables that number the batch's
/// distinct values (they hold numbers, not the batch's strings, so they outlive it) and the
/// tallies by number. They are cleared, not reallocated, from batch to batch (fresh tables
/// each batch, with their page faults and regrowth, were a tenth of the counting's cost at
/// 10,000 tenants). A table that a batch grew past room for twice [`KEPT_EVENTS`] entries is
/// freed at the next smaller batch (see [`Scratch::reset`]).
#[derive(Debug, Default)]
struct Scratch {
    /// Tenant numbers, by the tenant dimension's [`Dimension::key`].
    tenants: HashTable<usize>,
    /// (provider, model) numbers, by `hasher`.
    models: HashTable<usize>,
    /// (agent, status) numbers, by `hasher`.
    kinds: HashTable<usize>,
    hasher: foldhash::fast::RandomState,
    /// Tokens (input, output, cached input, cache-write input) by tenant number and model
    /// number.
    tokens: Map<(usize, usize), [u64; 4]>,
    /// Runs by tenant number and (agent, status) number.
    runs: Map<(usize, usize), u64>,
    /// The same by folded label numbers.
    folded_tokens: Map<(usize, usize), [u64; 4]>,
    folded_runs: Map<(usize, usize), u64>,
}

/// The batch size [`Scratch`]'s tables keep room for between batches, whatever a larger batch
/// grew them to (the log writer commits up to about 64K events at once). Kept, the tables take
/// about 6 MB at most.
const KEPT_EVENTS: usize = 16 * 1024;

impl Scratch {
    /// Empties the tables for a batch of `len` events. A table with room for more than twice
    /// `len` and [`KEPT_EVENTS`] entries is freed (twice: a table's room doubles as it grows).
    fn reset(&mut self, len: usize) {
        let keep = len.max(KEPT_EVENTS).saturating_mul(2);
        for table in [&mut self.tenants, &mut self.models, &mut self.kinds] {
            table.clear();
            if table.capacity() > keep {
                table.shrink_to(0, |_| 0);
            }
        }
        clear_map(&mut self.tokens, keep);
        clear_map(&mut self.folded_tokens, keep);
        clear_map(&mut self.runs, keep);
        clear_map(&mut self.folded_runs, keep);
    }
}

/// Empties `map`, freeing it if it has room for more than `keep` entries.
fn clear_map<K: Eq + std::hash::Hash, V>(map: &mut Map<K, V>, keep: usize) {
    map.clear();
    if map.capacity() > keep {
        map.shrink_to(0);
    }
}

/// `value`'s number in `values`, its index there, numbering it next if it is new; `table`
/// holds the numbers given out, by `hash`. Each value's hash is kept beside it, for the table
/// to grow by.
fn number<T: Copy + Eq>(
    table: &mut HashTable<usize>,
    values: &mut Vec<(T, u64)>,
    value: T,
    hash: u64,
) -> (usize, bool) {
    let entry = table.entry(
        hash,
        |n| values.get(*n).is_some_and(|(v, _)| *v == value),
        |n| values.get(*n).map_or(0, |(_, h)| *h),
    );
    match entry {
        hashbrown::hash_table::Entry::Occupied(e) => (*e.get(), false),
        hashbrown::hash_table::Entry::Vacant(e) => {
            let n = values.len();
            values.push((value, hash));
            e.insert(n);
            (n, true)
        }
    }
}

/// One batch's events tallied by their raw label values before any folding. Each event's
/// tenant, model (provider and model) and run kind (agent and status) is hashed once, into a
/// number for the batch; the tallies are by number.
struct Tally<'a> {
    /// The batch's distinct tenants, numbered in order of first appearance, each with its
    /// key in the tenant dimension (the hash [`number`] keeps).
    tenants: Vec<(&'a str, u64)>,
    /// Each event's tenant number, in batch order.
    of_event: Vec<usize>,
    /// Events per tenant number, by type (see [`type_index`]).
    events: Vec<[u64; 3]>,
    /// The batch's distinct (provider, model) pairs, each with its hash (as [`number`] keeps
    /// it); the llm.usage events of each; each event's pair.
    models: Vec<((&'a str, &'a str), u64)>,
    model_events: Vec<u64>,
    model_of_event: Vec<Option<usize>>,
    /// The batch's distinct (agent, status) pairs of agent.run events, each with its hash;
    /// the runs of each.
    kinds: Vec<((&'a str, &'a str), u64)>,
    kind_events: Vec<u64>,
    latency: Vec<(usize, f64)>,
    duration: Vec<(usize, f64)>,
}

impl<'a> Tally<'a> {
    /// Tallies a batch into `scratch`'s maps, numbering tenants by `tenant_keys`' keys.
    fn new(
        events: impl ExactSizeIterator<Item = &'a meterd_schemas::Event>,
        tenant_keys: &Dimension,
        scratch: &mut Scratch,
    ) -> Self {
        use meterd_schemas::EventData;
        use std::hash::BuildHasher;
        let len = events.len();
        scratch.reset(len);
        let mut t = Self {
            tenants: Vec::new(),
            of_event: Vec::with_capacity(len),
            events: Vec::new(),
            models: Vec::new(),
            model_events: Vec::new(),
            model_of_event: Vec::with_capacity(len),
            kinds: Vec::new(),
            kind_events: Vec::new(),
            latency: Vec::new(),
            duration: Vec::new(),
        };
        for e in events {
            let tenant = e.tenant.as_str();
            let (n, new) = number(
                &mut scratch.tenants,
                &mut t.tenants,
                tenant,
                tenant_keys.key(tenant),
            );
            if new {
                t.events.push([0; 3]);
            }
            t.of_event.push(n);
            t.events[n][type_index(e.data.event_type())] += 1;
            let mut model = None;
            match &e.data {
                EventData::LlmUsage(u) => {
                    let pair = (u.provider.as_str(), u.model.as_str());
                    let hash = scratch.hasher.hash_one(pair);
                    let (m, new) = number(&mut scratch.models, &mut t.models, pair, hash);
                    if new {
                        t.model_events.push(0);
                    }
                    t.model_events[m] += 1;
                    model = Some(m);
                    let sums = scratch.tokens.entry((n, m)).or_default();
                    for (sum, v) in sums.iter_mut().zip(u.priced_tokens()) {
                        *sum = sum.saturating_add(v);
                    }
                }
                EventData::ApiRequest(a) => t.latency.push((n, seconds(a.latency_ms))),
                EventData::AgentRun(r) => {
                    let kind = (
                        r.agent.as_deref().unwrap_or(NONE),
                        r.status.as_deref().unwrap_or(NONE),
                    );
                    let hash = scratch.hasher.hash_one(kind);
                    let (k, new) = number(&mut scratch.kinds, &mut t.kinds, kind, hash);
                    if new {
                        t.kind_events.push(0);
                    }
                    t.kind_events[k] += 1;
                    *scratch.runs.entry((n, k)).or_default() += 1;
                    t.duration.push((n, seconds(r.duration_ms)));
                }
            }
            t.model_of_event.push(model);
        }
        t
    }
}

/// An event type's index in [`Tally::events`].
fn type_index(t: EventType) -> usize {
    match t {
        EventType::LlmUsage => 0,
        EventType::ApiRequest => 1,
        EventType::AgentRun => 2,
    }
}

/// Numbers the distinct values of `values`, in order of first appearance: each value's
/// number, and the values numbered. For a batch's folded labels, which are few.
fn number_distinct<T: Copy + Eq + std::hash::Hash>(
    values: impl Iterator<Item = T>,
) -> (Vec<usize>, Vec<T>) {
    let mut distinct = Vec::new();
    let mut numbers: Map<T, usize> = Map::default();
    let of = values
        .map(|v| {
            *numbers.entry(v).or_insert_with(|| {
                distinct.push(v);
                distinct.len() - 1
            })
        })
        .collect();
    (of, distinct)
}

/// The label value each distinct value of a batch's pairs folds to in `dimension`, by
/// `events`, the events of each pair: `side` picks the value out of a pair.
fn fold_side<'a>(
    dimension: &mut Dimension,
    pairs: &[((&'a str, &'a str), u64)],
    events: &[u64],
    side: impl Fn((&'a str, &'a str)) -> &'a str,
) -> Map<&'a str, &'a str> {
    let mut volumes: Map<&'a str, u64> = Map::default();
    for ((pair, _), n) in pairs.iter().zip(events) {
        *volumes.entry(side(*pair)).or_default() += n;
    }
    let values: Vec<(&'a str, u64)> = volumes.into_iter().collect();
    let labels = dimension.fold_values(values.iter().copied());
    values.into_iter().map(|(v, _)| v).zip(labels).collect()
}

/// The usage families, counted once per accepted event (never for a duplicate or a
/// conflict): `meterd_usage_events_total{tenant,type}`,
/// `meterd_usage_tokens_total{tenant,provider,model,direction}`,
/// `meterd_agent_runs_total{tenant,agent,status}`, and the histograms
/// `meterd_usage_api_request_duration_seconds{tenant}` (api.request latency) and
/// `meterd_usage_agent_run_duration_seconds{tenant}` (agent.run duration).
#[derive(Debug, Clone)]
pub struct UsageMetrics(std::sync::Arc<std::sync::Mutex<UsageState>>);

impl UsageMetrics {
    pub fn new(registry: &Registry, limits: &LabelLimits) -> prometheus::Result<Self> {
        let max = limits.max_series;
        let counter = |name: &str, help: &str, labels: &[&str], open: &[bool]| {
            Family::new(
                registry,
                IntCounterVec::new(Opts::new(name, help), labels)?,
                open,
                max,
            )
        };
        // A histogram's label combination is a series per bucket and two more.
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Family::new(
                registry,
                prometheus::HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                    &["tenant"],
                )?,
                &[true],
                max / (buckets.len() + 3),
            )
        };
        let state = UsageState {
            tenants: Dimension::new(limits.top_tenants, limits.tenant_allowlist.clone()),
            providers: Dimension::new(limits.top_values, None),
            models: Dimension::new(limits.top_values, None),
            agents: Dimension::new(limits.top_values, None),
            events: counter(
                "meterd_usage_events_total",
                "Events accepted, by tenant and type (tenants beyond the limits are \"other\")",
                &["tenant", "type"],
                &[true, false],
            )?,
            tokens: counter(
                "meterd_usage_tokens_total",
                "Tokens of accepted llm.usage events, by tenant, provider, model and direction \
                 (input, output, cached_input, cache_write_input)",
                &["tenant", "provider", "model", "direction"],
                &[true, true, true, false],
            )?,
            runs: counter(
                "meterd_agent_runs_total",
                "Accepted agent.run events, by tenant, agent and status",
                &["tenant", "agent", "status"],
                &[true, true, false],
            )?,
            latency: histogram(
                "meterd_usage_api_request_duration_seconds",
                "Latency of accepted api.request events (their latency_ms), by tenant",
                &API_LATENCY_BUCKETS,
            )?,
            duration: histogram(
                "meterd_usage_agent_run_duration_seconds",
                "Duration of accepted agent.run events (their duration_ms), by tenant",
                &AGENT_DURATION_BUCKETS,
            )?,
            scratch: Scratch::default(),
        };
        Ok(Self(std::sync::Arc::new(std::sync::Mutex::new(state))))
    }

    /// Counts events just made durable; answers the labels of each.
    ///
    /// The batch is first tallied by raw values, then each distinct value is folded once and
    /// each label combination's counter moves once. The per-event cost: a hash of the tenant;
    /// for llm.usage and agent.run a hash of the (provider, model) or (agent, status) pair and
    /// one of the tenant and pair numbers; for api.request and agent.run a histogram's bucket
    /// search without atomics.
    pub fn accepted<'a>(
        &self,
        events: impl ExactSizeIterator<Item = &'a meterd_schemas::Event>,
    ) -> BatchLabels<'a> {
        let mut s = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &mut *s;
        let t = Tally::new(events, &s.tenants, &mut s.scratch);

        // Fold each distinct value once, by its volume in the batch.
        let volumes: Vec<Volume<'_>> = t
            .tenants
            .iter()
            .zip(&t.events)
            .map(|(&(value, key), by_type)| Volume {
                value,
                key,
                events: by_type.iter().sum(),
            })
            .collect();
        let folded = s.tenants.fold_batch(&volumes);
        // Every count by tenant below is by the number of its label value.
        let (label_of, values) = number_distinct(folded.into_iter());
        let providers = fold_side(&mut s.providers, &t.models, &t.model_events, |p| p.0);
        let models = fold_side(&mut s.models, &t.models, &t.model_events, |p| p.1);
        let (model_label_of, model_labels) = number_distinct(
            t.models
                .iter()
                .map(|((p, m), _)| (label(&providers, p), label(&models, m))),
        );
        let agents = fold_side(&mut s.agents, &t.kinds, &t.kind_events, |k| k.0);
        let (kind_label_of, kind_labels) = number_distinct(
            t.kinds
                .iter()
                .map(|((agent, status), _)| (label(&agents, agent), *status)),
        );

        // Each folded label combination's counter moves once.
        let mut events = vec![[0u64; 3]; values.len()];
        for (n, by_type) in t.events.iter().enumerate() {
            for (sum, count) in events[label_of[n]].iter_mut().zip(by_type) {
                *sum += count;
            }
        }
        for (tenant, by_type) in values.iter().zip(events) {
            for event_type in EventType::ALL {
                let n = by_type[type_index(event_type)];
                if n > 0 {
                    add(s.events.series(&[*tenant, event_type.as_str()]), n);
                }
            }
        }
        let scratch = &mut s.scratch;
        for ((n, m), sums) in &scratch.tokens {
            let key = (label_of[*n], model_label_of[*m]);
            let folded = scratch.folded_tokens.entry(key).or_default();
            for (sum, v) in folded.iter_mut().zip(sums) {
                *sum = sum.saturating_add(*v);
            }
        }
        for ((tenant, model), sums) in &scratch.folded_tokens {
            let (provider, model) = model_labels[*model];
            for (direction, n) in DIRECTIONS.into_iter().zip(sums) {
                if *n > 0 {
                    add(
                        s.tokens
                            .series(&[values[*tenant], provider, model, direction]),
                        *n,
                    );
                }
            }
        }
        for ((n, k), count) in &scratch.runs {
            *scratch
                .folded_runs
                .entry((label_of[*n], kind_label_of[*k]))
                .or_default() += count;
        }
        for ((tenant, kind), n) in &scratch.folded_runs {
            let (agent, status) = kind_labels[*kind];
            add(s.runs.series(&[values[*tenant], agent, status]), *n);
        }
        for (family, observed) in [(&mut s.latency, &t.latency), (&mut s.duration, &t.duration)] {
            // Observed into each label value's local histogram, then added to the shared one
            // once a batch: a bucket search per event, no atomic operations.
            let mut local: Vec<Option<LocalHistogram>> = vec![None; values.len()];
            for (n, secs) in observed {
                let l = label_of[*n];
                local[l]
                    .get_or_insert_with(|| family.series(&[values[l]]).local())
                    .observe(*secs);
            }
            for h in local.into_iter().flatten() {
                h.flush();
            }
        }
        BatchLabels {
            of_event: t.of_event.iter().map(|n| label_of[*n]).collect(),
            values,
            models: t.models.into_iter().map(|(pair, _)| pair).collect(),
            model_of_event: t.model_of_event,
        }
    }
}

/// `value`'s label value in a folded batch.
fn label<'a>(folded: &Map<&'a str, &'a str>, value: &str) -> &'a str {
    folded.get(value).copied().unwrap_or(OTHER)
}

/// Milliseconds as seconds (Prometheus's base unit).
#[allow(clippy::cast_precision_loss)] // exact below 2^53 ms, i.e. 285,000 years
fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
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

    fn api(tenant: &str, latency_ms: i64) -> Event {
        Event {
            data: EventData::ApiRequest(meterd_schemas::ApiRequest {
                route: None,
                method: None,
                status_code: 200,
                latency_ms,
                request_bytes: None,
                response_bytes: None,
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
        let (mut total_events, mut total_input, mut total_runs) = (0u64, 0u64, 0u64);
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
            } else if i % 5 == 0 {
                api(&tenant, (i % 3000) as i64)
            } else {
                run(&tenant, &format!("agent-{}", i % 40))
            };
            total_events += 1;
            total_runs += u64::from(matches!(e.data, EventData::AgentRun(_)));
            events.push(e);
        }
        // As the writer counts them: a batch at a time.
        for batch in events.chunks(1_000) {
            usage.accepted(batch.iter());
        }
        let families = [
            "meterd_usage_events_total",
            "meterd_usage_tokens_total",
            "meterd_agent_runs_total",
        ];
        // Every series rendered, the histograms' buckets, sums and counts included.
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut text)
            .expect("encode");
        let series = text.lines().filter(|l| !l.starts_with('#')).count();
        assert!(series < 2_000, "{series} series");
        assert!(
            text.contains(
                "meterd_usage_api_request_duration_seconds_bucket{tenant=\"heavy\",le=\"0.005\"}"
            ),
            "{text}"
        );
        let events_sum: u64 = samples(&registry, families[0]).iter().map(|(_, v)| v).sum();
        assert_eq!(events_sum, total_events);
        let input: u64 = samples(&registry, families[1])
            .iter()
            .filter(|(l, _)| l["direction"] == "input")
            .map(|(_, v)| v)
            .sum();
        assert_eq!(input, total_input);
        let runs: u64 = samples(&registry, families[2]).iter().map(|(_, v)| v).sum();
        assert_eq!(runs, total_runs);
        // The heavy tenant has a series of its own; most tenants are "other".
        let tenants: std::collections::BTreeSet<String> = samples(&registry, families[0])
            .into_iter()
            .map(|(l, _)| l["tenant"].clone())
            .collect();
        assert!(
            tenants.contains("heavy") && tenants.contains(OTHER),
            "{tenants:?}"
        );
        assert!(tenants.len() <= 21, "{tenants:?}");
    }

    #[test]
    fn heavy_values_that_keep_changing_stop_getting_series() {
        let mut d = Dimension::new(2, None);
        let names: Vec<String> = (0..40).map(|w| format!("wave-{w}")).collect();
        let mut labelled = std::collections::BTreeSet::new();
        // Each wave a new value carrying twice everything before it: each would take a slot.
        for (w, name) in names.iter().enumerate() {
            for label in d.fold_values([(name.as_str(), 1_000u64 << w)].into_iter()) {
                if label != OTHER {
                    labelled.insert(label.to_owned());
                }
            }
        }
        // Five values per slot, then no more.
        assert_eq!(labelled.len(), 10, "{labelled:?}");
        assert!(
            labelled.contains("wave-9") && !labelled.contains("wave-10"),
            "{labelled:?}"
        );
    }

    #[test]
    fn the_heavier_of_two_values_takes_the_last_slot_wherever_it_stands() {
        let mut d = Dimension::new(4, None);
        let three = d.fold_values([("a", 1_000), ("b", 1_000), ("c", 1_000)].into_iter());
        assert_eq!(three, ["a", "b", "c"]);
        // Both carry over a quarter of the 6,201 events; the heavier one is not twice as heavy
        // as a, b or c, so it cannot take a slot that is taken.
        let labels = d.fold_values([("light", 1_600), ("heavy", 1_601)].into_iter());
        assert_eq!(labels, [OTHER, "heavy"]);
    }

    /// Usage families whose allowlist names only the tenant "acme".
    fn acme_only() -> (Registry, UsageMetrics) {
        let registry = Registry::new();
        let limits = LabelLimits {
            tenant_allowlist: Some(["acme".to_owned()].into()),
            ..LabelLimits::default()
        };
        let usage = UsageMetrics::new(&registry, &limits).expect("metrics");
        (registry, usage)
    }

    #[test]
    fn an_allowlist_names_exactly_its_tenants() {
        let (registry, usage) = acme_only();
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
    fn each_event_gets_its_folded_label_and_histograms_count_every_observation() {
        let (registry, usage) = acme_only();
        let events = [
            api("acme", 3),
            api("initech", 30),
            run("acme", "a"),
            api("globex", 300),
            api("acme", 3_000),
        ];
        let labels = usage.accepted(events.iter());
        let got: Vec<(usize, &str)> = labels.per_event().collect();
        let values: Vec<&str> = got.iter().map(|(_, v)| *v).collect();
        assert_eq!(values, ["acme", OTHER, "acme", OTHER, "acme"]);
        // One number per label value.
        assert_eq!(got[0].0, got[2].0);
        assert_eq!(got[0].0, got[4].0);
        assert_eq!(got[1].0, got[3].0);
        assert_ne!(got[0].0, got[1].0);
        // The events family counts under the same labels.
        let mut counted: Vec<(String, String, u64)> =
            samples(&registry, "meterd_usage_events_total")
                .into_iter()
                .map(|(l, v)| (l["tenant"].clone(), l["type"].clone(), v))
                .collect();
        counted.sort();
        let expected = [
            ("acme", "agent.run", 1),
            ("acme", "api.request", 2),
            (OTHER, "api.request", 2),
        ]
        .map(|(t, ty, n)| (t.to_owned(), ty.to_owned(), n));
        assert_eq!(counted, expected);
        // Every observation lands in its label's histogram, in the right bucket.
        let histograms: HashMap<String, (u64, f64, u64)> = registry
            .gather()
            .into_iter()
            .filter(|f| f.name() == "meterd_usage_api_request_duration_seconds")
            .flat_map(|f| f.get_metric().to_vec())
            .map(|m| {
                let h = m.get_histogram();
                let under_10ms = h
                    .get_bucket()
                    .iter()
                    .find(|b| b.upper_bound() == 0.01)
                    .map_or(0, |b| b.cumulative_count());
                (
                    m.get_label()[0].value().to_owned(),
                    (h.get_sample_count(), h.get_sample_sum(), under_10ms),
                )
            })
            .collect();
        for (label, count, sum, under_10ms) in [("acme", 2, 3.003, 1), (OTHER, 2, 0.33, 0)] {
            let (c, s, u) = histograms[label];
            assert!(
                c == count && (s - sum).abs() < 1e-9 && u == under_10ms,
                "{histograms:?}"
            );
        }
    }

    #[test]
    fn each_llm_event_gets_its_model_and_each_batch_is_tallied_afresh() {
        let (registry, usage) = acme_only();
        let first = [
            llm("acme", "openai", "gpt-4o", 10),
            api("acme", 3),
            llm("initech", "anthropic", "claude", 5),
            run("acme", "a"),
            llm("acme", "openai", "gpt-4o", 7),
        ];
        let labels = usage.accepted(first.iter());
        assert_eq!(
            labels.models(),
            [("openai", "gpt-4o"), ("anthropic", "claude")]
        );
        let of: Vec<Option<usize>> = labels.models_per_event().collect();
        assert_eq!(of, [Some(0), None, Some(1), None, Some(0)]);
        drop(labels);
        // The next batch's numbers start over, and its tallies hold only its own events.
        let second = [run("acme", "a"), llm("acme", "anthropic", "claude", 1)];
        let labels = usage.accepted(second.iter());
        assert_eq!(labels.models(), [("anthropic", "claude")]);
        let of: Vec<Option<usize>> = labels.models_per_event().collect();
        assert_eq!(of, [None, Some(0)]);
        let mut input: Vec<(String, u64)> = samples(&registry, "meterd_usage_tokens_total")
            .into_iter()
            .filter(|(l, _)| l["direction"] == "input")
            .map(|(l, v)| (l["tenant"].clone(), v))
            .collect();
        input.sort();
        assert_eq!(input, [("acme".to_owned(), 18), (OTHER.to_owned(), 5)]);
        let runs: u64 = samples(&registry, "meterd_agent_runs_total")
            .into_iter()
            .map(|(_, v)| v)
            .sum();
        assert_eq!(runs, 2);
    }

    #[test]
    fn past_the_warm_up_providers_models_and_agents_get_series_of_their_own() {
        let registry = Registry::new();
        let usage = UsageMetrics::new(&registry, &LabelLimits::default()).expect("families");
        // Each batch: 300 events of each model, 600 runs; past 1,000 events of a label (after
        // the first batch for tenants, the second for the others) values get series.
        let batch: Vec<Event> = (0..1_200)
            .map(|i| match i % 4 {
                0 => llm("acme", "openai", "gpt-4o", 10),
                1 => llm("acme", "anthropic", "claude", 100),
                _ => run("acme", "support"),
            })
            .collect();
        usage.accepted(batch.iter());
        usage.accepted(batch.iter());
        let mut input: Vec<(String, String, String, u64)> =
            samples(&registry, "meterd_usage_tokens_total")
                .into_iter()
                .filter(|(l, _)| l["direction"] == "input")
                .map(|(l, v)| {
                    let get = |k: &str| l[k].clone();
                    (get("tenant"), get("provider"), get("model"), v)
                })
                .collect();
        input.sort();
        let expected = [
            ("acme", "anthropic", "claude", 30_000),
            ("acme", "openai", "gpt-4o", 3_000),
            ("acme", OTHER, OTHER, 33_000),
        ]
        .map(|(t, p, m, v)| (t.to_owned(), p.to_owned(), m.to_owned(), v));
        assert_eq!(input, expected);
        let mut runs: Vec<(String, String, u64)> = samples(&registry, "meterd_agent_runs_total")
            .into_iter()
            .map(|(l, v)| (l["agent"].clone(), l["status"].clone(), v))
            .collect();
        runs.sort();
        let expected = [("other", "succeeded", 600), ("support", "succeeded", 600)]
            .map(|(a, s, v)| (a.to_owned(), s.to_owned(), v));
        assert_eq!(runs, expected);
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
