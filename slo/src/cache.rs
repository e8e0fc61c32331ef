//! Each SLO's valid and good events kept counted in memory, so `GET /v1/slos` reads its
//! windows from memory and the store only for what is not kept. This is how TimescaleDB's
//! real-time aggregates combine materialized buckets with raw rows, with the bookkeeping done
//! by meterd itself, because SLO filters are any SQL over `events` columns, which no rollup's
//! dimensions can answer. Two kinds of counts are kept:
//!
//! - **Hours counted in the store.** Each whole hour of an SLO's window is counted once by a
//!   statement in the background, and kept with the store position it was counted at
//!   (`as_of`, read before the statement: every event of a log record at or below it was in
//!   the store). Every accepted batch is reported to [`Observed`] with its log position, by
//!   event type and hour of event time. A kept hour is used only while no batch touched it
//!   after `as_of`; otherwise it is counted raw, and counted again in the background. Events in
//!   the store before the process started are below any position read since, so they are in
//!   every count kept.
//! - **Minutes counted as events are accepted.** [`Observed`] evaluates every SLO's filters on
//!   each accepted event (as the SLO event counters do, with the stores' three-valued logic) and
//!   counts it in its minute of event time, for the last [`RECENT`] of event time. Those counts
//!   are the store's for every minute after the latest event time the store held when it was
//!   first asked (at the first refresh, after ingest opened, so after the log's replay, whose
//!   events the observer never sees): every event of those minutes was accepted, and so seen,
//!   by this process.
//!
//! A window `[start, end)` is read as its minutes from the second kind from the latest whole
//! hour they cover, kept hours that still hold before that, and raw events for the rest. Once
//! the first refresh has answered, windows of a day or more read nothing from the store;
//! shorter ones once the process has run for [`RECENT`] (at once on an empty store). An SLO
//! past the entry limits, and hours late events changed since they were counted, are read from
//! raw events.
//!
//! An answer counts every event acknowledged before the request; one batch being committed
//! meanwhile may be counted in part (it is in the store before it is observed).
//!
//! Only a store this process alone writes may be read this way: late events another node
//! delivers would never be reported here. The binary uses it for the embedded store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meterd_billing::usage::{UsageError, UsageSource};
use meterd_ingest::ChangeObserver;
use meterd_ingest::log::Lsn;
use meterd_ingest::metrics::Map;
use meterd_schemas::{EventType, StoredEvent};

use crate::{Counts, MAX_WINDOW, Slo, SloScope, WINDOWS};

/// An hour and a minute in µs.
pub const HOUR_US: i64 = 3_600_000_000;
pub const MINUTE_US: i64 = 60_000_000;

/// How far back in event time accepted events are counted by minute: past the longest burn
/// window shorter than a day (6h), so those windows are read whole from these counts.
pub const RECENT: Duration = Duration::from_secs(7 * 3_600);

/// Touched hours remembered before the oldest are dropped, then all of them (see
/// [`Observed::changed`]).
const MAX_TOUCHED_HOURS: usize = 100_000;

/// Tenant entries kept per SLO, in hours and in minutes apart (an hour or minute of an SLO over
/// all tenants is one entry; of a per-tenant SLO, one per tenant with events). Past it the SLO
/// keeps none of that kind and is counted raw instead.
const MAX_ENTRIES: usize = 500_000;

/// Hours counted by one statement: few enough that a per-tenant SLO's rows stay well under the
/// usage row limit (24 hours x 4,000 tenants).
const HOURS_PER_STATEMENT: usize = 24;
const HOURS_PER_STATEMENT_ALL_TENANTS: usize = 24 * 31;

/// Where the store SLOs are counted in has got to: every event of a log record at or below it
/// is visible to its queries.
pub type Position = Arc<dyn Fn() -> Lsn + Send + Sync>;

fn floor_to(time_us: i64, unit: i64) -> i64 {
    time_us.div_euclid(unit) * unit
}

fn ceil_to(time_us: i64, unit: i64) -> i64 {
    floor_to(time_us.saturating_add(unit - 1), unit)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn recent_us() -> i64 {
    i64::try_from(RECENT.as_micros()).unwrap_or(i64::MAX)
}

/// Counts by tenant (`""` for an SLO that is not per tenant); tenants without events absent.
type ByTenant = HashMap<Arc<str>, Counts>;

fn add_to(into: &mut ByTenant, tenant: &str, counts: Counts) -> bool {
    match into.get_mut(tenant) {
        Some(c) => {
            c.valid += counts.valid;
            c.good += counts.good;
            false
        }
        None => {
            into.insert(Arc::from(tenant), counts);
            true
        }
    }
}

/// What the change observer keeps: touched hours and recent minutes.
#[derive(Debug, Default)]
struct ObservedState {
    /// For each event type and hour of event time, the log position of the last accepted batch
    /// with an event there.
    touched: Map<(EventType, i64), Lsn>,
    /// Every hour counts as touched at this position (set when `touched` had to be emptied).
    all_touched: Lsn,
    /// By SLO: valid and good accepted events by minute of event time (shared with readers,
    /// copied on write while one holds a minute).
    minutes: Vec<BTreeMap<i64, Arc<ByTenant>>>,
    /// Minutes before this one have been forgotten (it only grows, whatever the clock does).
    forgotten_before: i64,
    /// Tenant entries in `minutes`, by SLO.
    minute_entries: Vec<usize>,
    /// By SLO: too many entries, minutes not kept.
    minutes_off: Vec<bool>,
    /// The minutes from this one on are the store's whole content (see the module doc); `None`
    /// until the startup statement has answered.
    exact_from: Option<i64>,
}

impl ObservedState {
    /// Minutes are the store's from here on, for SLO `index` (`i64::MAX`: not kept), in whole
    /// hours so the hours before are kept ones.
    fn minutes_from(&self, index: usize, now_us: i64) -> i64 {
        match self.exact_from {
            Some(exact) if !self.minutes_off[index] => ceil_to(
                exact.max(now_us - recent_us()).max(self.forgotten_before),
                HOUR_US,
            ),
            _ => i64::MAX,
        }
    }

    fn touched_at(&self, event_type: EventType, hour: i64) -> Lsn {
        self.touched
            .get(&(event_type, hour))
            .copied()
            .unwrap_or(0)
            .max(self.all_touched)
    }
}

/// Told of every accepted batch: keeps which hours each batch touched, and each SLO's events
/// of the last [`RECENT`] by minute.
#[derive(Debug)]
pub struct Observed {
    slos: Arc<Vec<Slo>>,
    state: Mutex<ObservedState>,
}

impl Observed {
    pub fn new(slos: Arc<Vec<Slo>>) -> Self {
        let n = slos.len();
        Self {
            slos,
            state: Mutex::new(ObservedState {
                minutes: vec![BTreeMap::new(); n],
                minute_entries: vec![0; n],
                minutes_off: vec![false; n],
                ..ObservedState::default()
            }),
        }
    }
}

impl ChangeObserver for Observed {
    fn changed(&self, end: Lsn, events: &[StoredEvent]) {
        let now_us = chrono::Utc::now().timestamp_micros();
        // Kept an hour longer than read (see `minutes_from`), so an event accepted a while ago
        // counts.
        let oldest_minute = floor_to(now_us - recent_us() - HOUR_US, MINUTE_US);
        let mut hours: Vec<(EventType, i64)> = Vec::new();
        // (SLO, minute, tenant) to counts, so the lock is taken once a batch.
        let mut counted: Map<(usize, i64, &str), Counts> = Map::default();
        for e in events {
            let event_type = e.event.data.event_type();
            let key = (event_type, floor_to(e.event.time_us, HOUR_US));
            if hours.last() != Some(&key) {
                hours.push(key);
            }
            let minute = floor_to(e.event.time_us, MINUTE_US);
            if minute < oldest_minute {
                continue;
            }
            for (i, slo) in self.slos.iter().enumerate() {
                if let Some((tenant, good)) = slo.counts(e) {
                    let c = counted.entry((i, minute, tenant)).or_default();
                    c.valid += 1;
                    c.good += u64::from(good);
                }
            }
        }
        hours.sort_unstable_by_key(|(t, h)| (t.as_str(), *h));
        hours.dedup();
        let mut st = lock(&self.state);
        for key in hours {
            let at = st.touched.entry(key).or_insert(0);
            *at = (*at).max(end);
        }
        if st.touched.len() > MAX_TOUCHED_HOURS {
            // Hours older than any SLO's window can no longer be read.
            let oldest = now_us - i64::try_from(MAX_WINDOW.as_micros()).unwrap_or(i64::MAX);
            st.touched.retain(|(_, hour), _| *hour >= oldest - HOUR_US);
            if st.touched.len() > MAX_TOUCHED_HOURS {
                // Events spread over more hours than remembered: every kept hour is counted
                // again.
                st.touched.clear();
                st.all_touched = end;
            }
        }
        let st = &mut *st;
        st.forgotten_before = st.forgotten_before.max(oldest_minute);
        let oldest_minute = st.forgotten_before;
        for ((i, minute, tenant), counts) in counted {
            if st.minutes_off[i] || minute < oldest_minute {
                continue;
            }
            let cell = Arc::make_mut(st.minutes[i].entry(minute).or_default());
            st.minute_entries[i] += usize::from(add_to(cell, tenant, counts));
        }
        for i in 0..self.slos.len() {
            // Forget the minutes no window reads any more.
            while let Some(entry) = st.minutes[i].first_entry() {
                if *entry.key() >= oldest_minute {
                    break;
                }
                st.minute_entries[i] -= entry.remove().len();
            }
            if st.minute_entries[i] > MAX_ENTRIES {
                tracing::warn!(
                    slo = %self.slos[i].name,
                    "the SLO has more tenant minutes than are kept ({MAX_ENTRIES}); its recent windows are counted from raw events"
                );
                st.minutes[i].clear();
                st.minute_entries[i] = 0;
                st.minutes_off[i] = true;
            }
        }
    }
}

/// One SLO's kept hours.
#[derive(Debug, Default)]
struct Kept {
    hours: BTreeMap<i64, Hour>,
    /// Tenant entries in `hours`.
    entries: usize,
    /// Too many entries: the SLO is counted raw.
    off: bool,
}

#[derive(Debug)]
struct Hour {
    /// The store position the counts were taken at.
    as_of: Lsn,
    counts: ByTenant,
}

/// What [`SloCache::read`] found for one SLO.
#[derive(Debug, Default)]
pub struct KeptCounts {
    /// For each window (in the order of [`Slo::windows_us`]), the ranges `[from, to)` the
    /// counts below cover, ascending and apart.
    pub covered: [Vec<(i64, i64)>; WINDOWS],
    /// By tenant (`""` for an SLO that is not per tenant), for each window: its counts over
    /// the covered ranges.
    pub by_tenant: HashMap<Arc<str>, [Counts; WINDOWS]>,
}

impl KeptCounts {
    fn add(&mut self, window: usize, counts: &ByTenant, tenant: Option<&str>) {
        for (t, c) in counts {
            if tenant.is_some_and(|want| want != &**t) {
                continue;
            }
            let sums = self
                .by_tenant
                .entry(Arc::clone(t))
                .or_insert([Counts::default(); WINDOWS]);
            sums[window].valid += c.valid;
            sums[window].good += c.good;
        }
    }

    fn cover(&mut self, window: usize, from: i64, to: i64) {
        let ranges = &mut self.covered[window];
        match ranges.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => ranges.push((from, to)),
        }
    }
}

/// The kept counts of every SLO, and what tells whether they still hold.
pub struct SloCache {
    slos: Arc<Vec<Slo>>,
    observed: Arc<Observed>,
    position: Position,
    kept: Vec<Mutex<Kept>>,
    /// `meterd_slo_kept_seconds{slo}` (whole hours kept that still hold, in seconds), set after
    /// each refresh.
    kept_seconds: prometheus::IntGaugeVec,
}

impl std::fmt::Debug for SloCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SloCache")
            .field("slos", &self.slos.len())
            .finish_non_exhaustive()
    }
}

impl SloCache {
    /// Kept counts for the SLOs of `observed`, which must be told of every batch the store at
    /// `position` receives from before the store is first read; `kept_seconds` (label `slo`)
    /// tells how much event time each SLO keeps counted by hour.
    pub fn new(
        observed: Arc<Observed>,
        position: Position,
        kept_seconds: prometheus::IntGaugeVec,
    ) -> Self {
        let slos = Arc::clone(&observed.slos);
        let kept = slos.iter().map(|_| Mutex::default()).collect();
        Self {
            slos,
            observed,
            position,
            kept,
            kept_seconds,
        }
    }

    /// What is kept of SLO `index` for its windows `bounds` (from [`Slo::bounds`], at `now_us`),
    /// only `tenant`'s with a tenant (of a per-tenant SLO): the ranges covered and their counts.
    /// The writer's lock is held only to copy what is needed; the sums are made after.
    pub fn read(
        &self,
        index: usize,
        now_us: i64,
        bounds: &[(i64, i64); WINDOWS],
        tenant: Option<&str>,
    ) -> KeptCounts {
        let mut out = KeptCounts::default();
        let (Some(slo), Some(kept)) = (self.slos.get(index), self.kept.get(index)) else {
            return out;
        };
        let earliest = bounds.iter().map(|b| b.0).min().unwrap_or(now_us);
        let end = bounds.iter().map(|b| b.1).max().unwrap_or(now_us);
        let kept = lock(kept);
        // Under the writer's lock: which kept hours still hold, and the minutes' counts.
        let (split, holding, minutes) = {
            let observed = lock(&self.observed.state);
            let split = observed.minutes_from(index, now_us);
            let holding: Vec<i64> = if kept.off {
                Vec::new()
            } else {
                kept.hours
                    .range(earliest..split.min(end).max(earliest))
                    .filter(|(h, k)| {
                        **h + HOUR_US <= split
                            && observed.touched_at(slo.event_type, **h) <= k.as_of
                    })
                    .map(|(h, _)| *h)
                    .collect()
            };
            let minutes: Vec<(i64, Arc<ByTenant>)> = if split < end {
                observed.minutes[index]
                    .range(split..end)
                    .map(|(m, c)| (*m, Arc::clone(c)))
                    .collect()
            } else {
                Vec::new()
            };
            (split, holding, minutes)
        };
        for (window, &(start, end)) in bounds.iter().enumerate() {
            let split = split.clamp(start, end);
            for &hour in holding
                .iter()
                .filter(|h| **h >= start && **h + HOUR_US <= split)
            {
                if let Some(kept_hour) = kept.hours.get(&hour) {
                    out.add(window, &kept_hour.counts, tenant);
                    out.cover(window, hour, hour + HOUR_US);
                }
            }
            if split < end {
                for (_, counts) in minutes.iter().filter(|(m, _)| *m >= split && *m < end) {
                    out.add(window, counts, tenant);
                }
                out.cover(window, split, end);
            }
        }
        out
    }

    /// Finds, once, the latest event time the store holds (minutes after it are counted from
    /// accepted events); then counts, for every SLO, the whole hours of its window that are not
    /// kept or no longer hold and whose events the store has all received, and forgets hours
    /// older than the window.
    pub async fn refresh(&self, source: &dyn UsageSource, now_us: i64) -> Result<(), UsageError> {
        if lock(&self.observed.state).exact_from.is_none() {
            let latest = latest_time(source).await?;
            let exact = match latest {
                Some(t) => floor_to(t, MINUTE_US) + MINUTE_US,
                None => i64::MIN,
            };
            lock(&self.observed.state).exact_from = Some(exact);
        }
        for (index, slo) in self.slos.iter().enumerate() {
            match self.refresh_hours(source, index, slo, now_us).await {
                Ok(()) => {}
                Err(UsageError::TooManyRows(rows)) => {
                    tracing::warn!(
                        slo = %slo.name,
                        rows,
                        "the SLO's hours by tenant are more rows than a statement may answer; its long windows are counted from raw events"
                    );
                    *lock(&self.kept[index]) = Kept {
                        off: true,
                        ..Kept::default()
                    };
                    self.kept_seconds.with_label_values(&[&slo.name]).set(0);
                }
                // The others are still counted; this one is tried again next round.
                Err(e) => {
                    tracing::warn!(slo = %slo.name, error = %e, "counting the SLO's hours failed")
                }
            }
        }
        Ok(())
    }

    async fn refresh_hours(
        &self,
        source: &dyn UsageSource,
        index: usize,
        slo: &Slo,
        now_us: i64,
    ) -> Result<(), UsageError> {
        let position = (self.position)();
        // Every window's whole hours (a burn window may be longer than the SLO's).
        let earliest = slo
            .bounds(now_us)
            .iter()
            .map(|b| b.0)
            .min()
            .unwrap_or(now_us);
        let from = ceil_to(earliest, HOUR_US);
        // Hours read from the minutes' counts need no count of their own (until they are older).
        let to =
            floor_to(now_us, HOUR_US).min(lock(&self.observed.state).minutes_from(index, now_us));
        let need: Vec<i64> = {
            let mut kept = lock(&self.kept[index]);
            if kept.off {
                return Ok(());
            }
            let stale: Vec<i64> = kept.hours.range(..from).map(|(h, _)| *h).collect();
            for h in stale {
                if let Some(gone) = kept.hours.remove(&h) {
                    kept.entries -= gone.counts.len();
                }
            }
            let observed = lock(&self.observed.state);
            (from..to)
                .step_by(HOUR_US as usize)
                .filter(|h| {
                    let at = observed.touched_at(slo.event_type, *h);
                    let holds = kept.hours.get(h).is_some_and(|k| at <= k.as_of);
                    !holds && at <= position
                })
                .collect()
        };
        let per_statement = if slo.scope == SloScope::PerTenant {
            HOURS_PER_STATEMENT
        } else {
            HOURS_PER_STATEMENT_ALL_TENANTS
        };
        for chunk in need.chunks(per_statement) {
            let mut counted = count_hours(source, slo, chunk).await?;
            let mut kept = lock(&self.kept[index]);
            for &hour in chunk {
                let counts = counted.remove(&hour).unwrap_or_default();
                let added = counts.len();
                let before = kept
                    .hours
                    .insert(
                        hour,
                        Hour {
                            as_of: position,
                            counts,
                        },
                    )
                    .map_or(0, |h| h.counts.len());
                kept.entries = kept.entries - before + added;
            }
            if kept.entries > MAX_ENTRIES {
                tracing::warn!(
                    slo = %slo.name,
                    entries = kept.entries,
                    "the SLO has more tenant hours than are kept ({MAX_ENTRIES}); its long windows are counted from raw events"
                );
                *kept = Kept {
                    off: true,
                    ..Kept::default()
                };
                break;
            }
        }
        let hours = {
            let kept = lock(&self.kept[index]);
            let observed = lock(&self.observed.state);
            kept.hours
                .iter()
                .filter(|(h, k)| observed.touched_at(slo.event_type, **h) <= k.as_of)
                .count()
        };
        self.kept_seconds.with_label_values(&[&slo.name]).set(
            i64::try_from(hours)
                .unwrap_or(i64::MAX)
                .saturating_mul(3_600),
        );
        Ok(())
    }
}

/// The latest event time (µs) in the store; `None` when it holds no event.
async fn latest_time(source: &dyn UsageSource) -> Result<Option<i64>, UsageError> {
    let d = source.dialect();
    let sql = format!(
        "SELECT {} AS c0 FROM {}",
        d.integer_text(&format!("max({})", d.time_us())),
        d.events()
    );
    let rows = source.rows(&sql).await?;
    match rows.first().and_then(|r| r.first()).cloned().flatten() {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| UsageError::Value {
                store: source.name().to_owned(),
                value: text,
            }),
    }
}

/// Counts SLO `slo`'s valid and good events in each of `hours` (starts, ascending), by tenant
/// for a per-tenant SLO: hour start to tenant counts, hours and tenants without events absent.
async fn count_hours(
    source: &dyn UsageSource,
    slo: &Slo,
    hours: &[i64],
) -> Result<HashMap<i64, ByTenant>, UsageError> {
    let Some(&base) = hours.first() else {
        return Ok(HashMap::new());
    };
    let d = source.dialect();
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for &h in hours {
        match ranges.last_mut() {
            Some(last) if last.1 == h => last.1 = h + HOUR_US,
            _ => ranges.push((h, h + HOUR_US)),
        }
    }
    let per_tenant = slo.scope == SloScope::PerTenant;
    let hour = d.int_div(&format!("{} - {base}", d.time_us()), &HOUR_US.to_string());
    let tenant = if per_tenant {
        d.text("tenant")
    } else {
        d.text_literal("")
    };
    let good = slo.good.render(d);
    let sql = format!(
        "SELECT {tenant} AS c0, {} AS c1, {} AS c2, {} AS c3 FROM {} WHERE {} GROUP BY {}{hour}",
        d.integer_text(&hour),
        d.count(),
        d.sum(&format!("CASE WHEN {good} THEN 1 ELSE 0 END")),
        d.events(),
        crate::conditions(d, slo, None, &ranges),
        if per_tenant {
            format!("{}, ", d.column("tenant"))
        } else {
            String::new()
        },
    );
    let rows = source.rows(&sql).await?;
    let bad_value = |value: Option<String>| UsageError::Value {
        store: source.name().to_owned(),
        value: value.unwrap_or_default(),
    };
    let mut out: HashMap<i64, ByTenant> = HashMap::new();
    for row in rows {
        let cell = |i: usize| row.get(i).cloned().flatten();
        let number =
            |i: usize| crate::read_count(cell(i).as_deref()).ok_or_else(|| bad_value(cell(i)));
        let offset: i64 = cell(1)
            .as_deref()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| bad_value(cell(1)))?;
        let counts = Counts {
            valid: number(2)?,
            good: number(3)?,
        };
        if counts.valid == 0 {
            continue;
        }
        let hour = offset
            .checked_mul(HOUR_US)
            .and_then(|o| base.checked_add(o))
            .filter(|h| hours.binary_search(h).is_ok())
            .ok_or_else(|| bad_value(cell(1)))?;
        let tenant = cell(0).unwrap_or_default();
        add_to(out.entry(hour).or_default(), &tenant, counts);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_to_whole_units_also_before_1970() {
        assert_eq!(floor_to(0, HOUR_US), 0);
        assert_eq!(floor_to(HOUR_US - 1, HOUR_US), 0);
        assert_eq!(floor_to(HOUR_US, HOUR_US), HOUR_US);
        assert_eq!(floor_to(-1, HOUR_US), -HOUR_US);
        assert_eq!(ceil_to(1, MINUTE_US), MINUTE_US);
        assert_eq!(ceil_to(MINUTE_US, MINUTE_US), MINUTE_US);
        assert_eq!(ceil_to(-1, MINUTE_US), 0);
    }
}
