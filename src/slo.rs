//! `GET /v1/slos`: each SLO's SLI, error budget, burn rates and alerts, counted by the store
//! that serves SQL at the time of the request.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meterd_billing::UsageSource;
use meterd_schemas::Principal;
use meterd_slo::cache::SloCache;
use meterd_slo::{Slo, SloScope, SloStatus};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone)]
struct SloState {
    slos: Arc<Vec<Slo>>,
    source: Arc<dyn UsageSource>,
    /// Whole hours already counted, when the store allows keeping them.
    cache: Option<Arc<SloCache>>,
    /// How long one request may count, all its SLOs together.
    deadline: std::time::Duration,
}

/// The SLO routes, with their state applied.
pub fn router(
    slos: Arc<Vec<Slo>>,
    source: Arc<dyn UsageSource>,
    cache: Option<Arc<SloCache>>,
    deadline: std::time::Duration,
) -> Router {
    Router::new()
        .route("/v1/slos", get(slos_handler))
        .with_state(SloState {
            slos,
            source,
            cache,
            deadline,
        })
}

#[derive(Debug, Deserialize)]
struct SloParams {
    name: Option<String>,
    tenant: Option<String>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn slos_handler(
    State(state): State<SloState>,
    principal: Option<axum::Extension<Principal>>,
    params: Result<Query<SloParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let bound = principal.as_deref().and_then(|p| p.tenant.clone());
    let tenant = match (params.tenant, bound) {
        (Some(t), _) if t.is_empty() => {
            return error(
                StatusCode::BAD_REQUEST,
                "tenant: empty; leave it out for every SLO",
            );
        }
        (Some(t), _) if t.len() > 128 => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("tenant: {} bytes, more than 128", t.len()),
            );
        }
        (Some(t), Some(b)) if t != b => {
            return error(
                StatusCode::FORBIDDEN,
                format!("this API key is bound to another tenant than {t:?}"),
            );
        }
        (t, b) => t.or(b),
    };
    if let Some(name) = params.name.as_deref().filter(|n| !n.is_empty())
        && !state.slos.iter().any(|s| s.name == name)
    {
        return error(
            StatusCode::NOT_FOUND,
            format!("name: there is no SLO named {name:?}"),
        );
    }
    let chosen: Vec<(usize, &Slo)> = state
        .slos
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            params
                .name
                .as_deref()
                .is_none_or(|n| n.is_empty() || s.name == n)
        })
        // With a tenant, the SLOs that can speak of it: per tenant, or of that tenant.
        .filter(|(_, s)| match (&s.scope, tenant.as_deref()) {
            (_, None) => true,
            (SloScope::PerTenant, Some(_)) => true,
            (SloScope::Tenant(own), Some(t)) => own == t,
            (SloScope::All, Some(_)) => false,
        })
        .collect();
    let now_us = chrono::Utc::now().timestamp_micros();
    let work = async {
        let mut out: Vec<SloStatus> = Vec::new();
        for (index, slo) in chosen {
            let kept = state.cache.as_deref().map(|c| (c, index));
            out.extend(
                meterd_slo::evaluate(state.source.as_ref(), slo, now_us, tenant.as_deref(), kept)
                    .await?,
            );
        }
        Ok::<_, meterd_billing::UsageError>(out)
    };
    match tokio::time::timeout(state.deadline, work).await {
        Ok(Ok(slos)) => axum::Json(json!({ "slos": slos })).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("counting took longer than {}s", state.deadline.as_secs()),
        ),
    }
}

/// The SLO gauges of `/metrics`: `meterd_slo_sli`, `meterd_slo_error_budget_remaining_ratio`,
/// `meterd_slo_burn_rate{window}` and the window's `meterd_slo_valid_events` and
/// `meterd_slo_good_events` (labels `slo`, `tenant`), as of the last evaluation.
#[derive(Debug, Clone)]
pub struct SloGauges {
    registry: prometheus::Registry,
    sli: prometheus::GaugeVec,
    remaining: prometheus::GaugeVec,
    burn: prometheus::GaugeVec,
    valid: prometheus::GaugeVec,
    good: prometheus::GaugeVec,
    updated: prometheus::GaugeVec,
    kept_seconds: prometheus::IntGaugeVec,
    /// The tenants each SLO has samples for, so those no longer there can be removed.
    shown: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>>,
}

impl SloGauges {
    pub fn new() -> prometheus::Result<Self> {
        let registry = prometheus::Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = prometheus::GaugeVec::new(prometheus::Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        Ok(Self {
            sli: gauge(
                "meterd_slo_sli",
                "Good over valid events in the SLO's window (no sample without valid events)",
                &["slo", "tenant"],
            )?,
            remaining: gauge(
                "meterd_slo_error_budget_remaining_ratio",
                "What is left of the SLO's error budget, as a share of it (negative once spent)",
                &["slo", "tenant"],
            )?,
            burn: gauge(
                "meterd_slo_burn_rate",
                "The bad share of a trailing window over (1 - objective)",
                &["slo", "tenant", "window"],
            )?,
            valid: gauge(
                "meterd_slo_valid_events",
                "Valid events in the SLO's window",
                &["slo", "tenant"],
            )?,
            good: gauge(
                "meterd_slo_good_events",
                "Good events in the SLO's window",
                &["slo", "tenant"],
            )?,
            updated: gauge(
                "meterd_slo_last_evaluation_timestamp_seconds",
                "When the SLO's gauges were last counted (a store that does not answer leaves them as they were)",
                &["slo"],
            )?,
            kept_seconds: {
                let g = prometheus::IntGaugeVec::new(
                    prometheus::Opts::new(
                        "meterd_slo_kept_seconds",
                        "Event time of the SLO's windows counted by whole hours and kept in \
                         memory (as of the last count, every 10 s); the rest, and kept hours late \
                         events changed since, are counted from accepted events by minute or \
                         from raw events",
                    ),
                    &["slo"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            shown: Arc::default(),
            registry,
        })
    }

    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// `meterd_slo_kept_seconds{slo}`, for the SLO cache to set.
    pub fn kept_seconds(&self) -> prometheus::IntGaugeVec {
        self.kept_seconds.clone()
    }

    /// Replaces the samples of SLO `slo` with `statuses`: the new values are set first, then
    /// the tenants no longer there removed, so a scrape never finds the SLO without samples.
    fn set(&self, slo: &str, statuses: &[SloStatus], now: f64) {
        let mut tenants = Vec::with_capacity(statuses.len());
        for s in statuses {
            let tenant = s.tenant.as_deref().unwrap_or("");
            tenants.push(tenant.to_owned());
            let labels = [slo, tenant];
            match s.sli {
                Some(sli) => self.sli.with_label_values(&labels).set(sli),
                None => {
                    let _ = self.sli.remove_label_values(&labels);
                }
            }
            self.remaining
                .with_label_values(&labels)
                .set(s.error_budget.remaining_ratio);
            self.valid
                .with_label_values(&labels)
                .set(s.valid_events as f64);
            self.good
                .with_label_values(&labels)
                .set(s.good_events as f64);
            for (window, rate) in s.burn_rates.each() {
                self.burn
                    .with_label_values(&[slo, tenant, window])
                    .set(rate);
            }
        }
        self.updated.with_label_values(&[slo]).set(now);
        let mut shown = self
            .shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = shown
            .insert(slo.to_owned(), tenants.clone())
            .unwrap_or_default();
        for gone in before.iter().filter(|t| !tenants.contains(t)) {
            let labels = [slo, gone.as_str()];
            // Absent already is fine: nothing to remove.
            for g in [&self.sli, &self.remaining, &self.valid, &self.good] {
                let _ = g.remove_label_values(&labels);
            }
            for (window, _) in meterd_slo::BURN_WINDOWS {
                let _ = self.burn.remove_label_values(&[slo, gone.as_str(), window]);
            }
        }
    }
}

/// Evaluates every SLO now and every `every` until `stop`, into `gauges`; a per-tenant SLO
/// keeps the `top` tenants with the most valid events (the series stay bounded). A store that
/// does not answer leaves the last values and is tried again at the next round.
pub fn spawn_slo_metrics(
    slos: Arc<Vec<Slo>>,
    source: Arc<dyn UsageSource>,
    cache: Option<Arc<SloCache>>,
    gauges: SloGauges,
    every: std::time::Duration,
    top: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if slos.is_empty() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (index, slo) in slos.iter().enumerate() {
                let now = chrono::Utc::now();
                let kept = cache.as_deref().map(|c| (c, index));
                match meterd_slo::evaluate(source.as_ref(), slo, now.timestamp_micros(), None, kept)
                    .await
                {
                    Ok(mut statuses) => {
                        if slo.scope == SloScope::PerTenant {
                            statuses.sort_by_key(|s| std::cmp::Reverse(s.valid_events));
                            statuses.truncate(top);
                        }
                        let seconds = now.timestamp_micros() as f64 / 1e6;
                        gauges.set(&slo.name, &statuses, seconds);
                    }
                    Err(e) => {
                        tracing::warn!(slo = %slo.name, error = %e, "evaluating the SLO for /metrics failed; trying again next round");
                    }
                }
            }
        }
    }))
}

/// How often the kept SLO hours are brought up to date.
const SLO_CACHE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps `cache` up to date now and every 10 s until `stop`: the hours that closed, and those
/// late events changed once the store holds them. A store that does not answer is tried again
/// at the next round (meanwhile those hours are counted from raw events).
pub fn spawn_slo_cache(
    cache: Arc<SloCache>,
    source: Arc<dyn UsageSource>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SLO_CACHE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now_us = chrono::Utc::now().timestamp_micros();
            let refresh = cache.refresh(source.as_ref(), now_us);
            tokio::select! {
                () = stop.cancelled() => return,
                done = refresh => if let Err(e) = done {
                    tracing::warn!(error = %e, "counting SLO hours failed; trying again next round");
                },
            }
        }
    })
}
