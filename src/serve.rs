//! `meterd serve`: opens the ingest path and the query service, serves them on one listener,
//! and shuts down in order: stop taking requests, let in-flight batches finish, flush the
//! embedded store, exit; all within a deadline.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meterd_ingest::Ingest;
use meterd_ingest::sink::SinkStatus;
use meterd_query::{EventsSource, QueryService};
use meterd_schemas::{EventsSnapshot, Principal, SnapshotPin};
use meterd_store::{SinkStart, Store};
use meterd_store_clickhouse::ClickHouseStore;
use meterd_store_postgres::PostgresStore;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Scope, Settings};
use crate::listener::{self, ConnectionLimits, connection_cap};
use crate::openapi;

/// The embedded store seen through the query crate's interface.
#[derive(Debug)]
struct EmbeddedSource(Arc<Ingest>);

impl EventsSource for EmbeddedSource {
    fn snapshot(&self) -> EventsSnapshot {
        self.0.store().snapshot()
    }

    fn pin(&self) -> SnapshotPin {
        self.0.store().pin()
    }

    fn parquet_root(&self) -> Option<std::path::PathBuf> {
        Some(self.0.store().dir().to_owned())
    }
}

/// API keys by secret.
#[derive(Debug, Default)]
struct Keys(HashMap<String, (Principal, Vec<Scope>)>);

impl Keys {
    /// The key sent as `Authorization: Bearer <key>`, if it is one of ours. The scheme is
    /// case-insensitive (RFC 9110 section 11.1), so `bearer` and `BEARER` work too.
    fn presented(&self, headers: &header::HeaderMap) -> Option<&(Principal, Vec<Scope>)> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, key) = value.trim().split_once([' ', '\t'])?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.0.get(key.trim())
    }
}

#[derive(Debug, Clone)]
struct AuthState {
    keys: Arc<Keys>,
    scope: Scope,
}

async fn authenticate(State(auth): State<AuthState>, mut request: Request, next: Next) -> Response {
    if auth.keys.0.is_empty() {
        // No keys configured: meterd only listens on loopback (checked at startup).
        return next.run(request).await;
    }
    let Some((principal, scopes)) = auth.keys.presented(request.headers()) else {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            axum::Json(
                json!({"error": "missing or unknown API key; send Authorization: Bearer <key>"}),
            ),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    };
    if !scopes.contains(&auth.scope) {
        let scope = match auth.scope {
            Scope::Ingest => "ingest",
            Scope::Query => "query",
        };
        return (StatusCode::FORBIDDEN, axum::Json(json!({"error": format!("API key {:?} lacks the {scope} scope", principal.key_name)})))
            .into_response();
    }
    request.extensions_mut().insert(principal.clone());
    next.run(request).await
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// What `/readyz` looks at.
#[derive(Debug, Clone)]
struct Readiness {
    ingest: Arc<Ingest>,
    stores: Stores,
    keys: Arc<Keys>,
}

/// Each external store that is configured, with the status of its sink.
#[derive(Debug, Clone, Default)]
pub struct Stores(pub Vec<(Arc<dyn Store>, Arc<SinkStatus>)>);

/// The status code is public, for load balancers and orchestrators; the detail (log sizes,
/// store errors) only for a valid API key when keys are configured.
async fn readyz(State(state): State<Readiness>, headers: header::HeaderMap) -> Response {
    let r = state.ingest.readiness();
    let mut ready = r.ready;
    let mut body = json!({ "ingest": r });
    for (store, status) in &state.stores.0 {
        ready &= status.connected();
        body[store.name()] = store.readiness(status);
    }
    body["ready"] = json!(ready);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !state.keys.0.is_empty() && state.keys.presented(&headers).is_none() {
        body = json!({ "ready": ready });
    }
    (status, axum::Json(body)).into_response()
}

/// `meterd_http_requests_total{method,route,code}` and
/// `meterd_http_request_duration_seconds{route}`: every request, by its route's pattern (not
/// its path, so the label values are the routes meterd has), method and status code.
#[derive(Clone)]
struct HttpMetrics {
    registry: prometheus::Registry,
    requests: prometheus::IntCounterVec,
    duration: prometheus::HistogramVec,
}

impl HttpMetrics {
    fn new() -> prometheus::Result<Self> {
        let registry = prometheus::Registry::new();
        let requests = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "meterd_http_requests_total",
                "HTTP requests answered, by method, route pattern and status code",
            ),
            &["method", "route", "code"],
        )?;
        let duration = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "meterd_http_request_duration_seconds",
                "How long requests took to answer, by route pattern",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            registry,
            requests,
            duration,
        })
    }
}

async fn count_requests(
    State(m): State<HttpMetrics>,
    matched: Option<axum::extract::MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    // Methods are any token a client sends: the known ones, else "other".
    let method = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    m.requests
        .with_label_values(&[method, &route, response.status().as_str()])
        .inc();
    m.duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// How often the SLO gauges of `/metrics` are counted again.
const SLO_METRICS_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Seconds from `at_us` (µs since 1970) to now; 0 for an instant ahead of the clock.
fn age_seconds(at_us: i64) -> f64 {
    let age = chrono::Utc::now()
        .timestamp_micros()
        .saturating_sub(at_us)
        .max(0);
    #[allow(clippy::cast_precision_loss)] // µs of an age: exact below 2^53 (285 years)
    let seconds = age as f64 / 1e6;
    seconds
}

/// What `GET /metrics` gathers: each crate keeps its families in a registry of its own.
#[derive(Clone)]
struct Metrics {
    ingest: Arc<Ingest>,
    query: Arc<QueryService>,
    /// Registries of other crates (SLO gauges and counters, billing).
    more: Vec<prometheus::Registry>,
    stores: StoreGauges,
    http: prometheus::Registry,
}

/// Each external store's delivery: `meterd_store_delivery_lag_bytes` (the log not yet
/// confirmed by it) and `_events` and `_seconds`, `meterd_store_connected`,
/// `meterd_store_delivery_errors_total`.
#[derive(Clone)]
struct StoreGauges {
    registry: prometheus::Registry,
    lag: prometheus::IntGaugeVec,
    lag_events: prometheus::IntGaugeVec,
    backlog: Option<Arc<meterd_ingest::backlog::Backlog>>,
    lag_seconds: prometheus::GaugeVec,
    refresh_lag: prometheus::GaugeVec,
    connected: prometheus::IntGaugeVec,
    errors: prometheus::IntCounterVec,
    stores: Arc<Stores>,
    /// Each store's error count as last read: scrapes add what is new, one at a time.
    seen_errors: Arc<std::sync::Mutex<HashMap<&'static str, u64>>>,
    /// Each store's first unconfirmed record and when it was accepted (µs), so a scrape reads
    /// the log only when the store's position moved.
    oldest: Arc<std::sync::Mutex<HashMap<&'static str, (u64, i64)>>>,
}

impl StoreGauges {
    fn new(
        stores: Stores,
        backlog: Option<Arc<meterd_ingest::backlog::Backlog>>,
    ) -> prometheus::Result<Self> {
        let registry = prometheus::Registry::new();
        let lag_events = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "meterd_store_delivery_lag_events",
                "Accepted events the store has not confirmed yet; before the store first \
                 connects, every event the log retains (no sample until the log written before \
                 meterd started has been counted)",
            ),
            &["store"],
        )?;
        let lag = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "meterd_store_delivery_lag_bytes",
                "Bytes of the durable log the store has not confirmed yet",
            ),
            &["store"],
        )?;
        let lag_seconds = prometheus::GaugeVec::new(
            prometheus::Opts::new(
                "meterd_store_delivery_lag_seconds",
                "Age of the oldest accepted event the store has not confirmed (since it was \
                 accepted); 0 when the store has everything",
            ),
            &["store"],
        )?;
        let refresh_lag = prometheus::GaugeVec::new(
            prometheus::Opts::new(
                "meterd_store_rollup_refresh_lag_seconds",
                "Seconds since the store's rollups last caught up with its events: the start \
                 of meterd's last successful refresh (plain PostgreSQL), or the end of the \
                 oldest last successful refresh by the continuous aggregates' policies \
                 (TimescaleDB); ClickHouse's views update on insert and have none",
            ),
            &["store"],
        )?;
        let connected = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "meterd_store_connected",
                "1 while the store's sink holds a working connection",
            ),
            &["store"],
        )?;
        let errors = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "meterd_store_delivery_errors_total",
                "Failed delivery attempts to the store (each is retried)",
            ),
            &["store"],
        )?;
        registry.register(Box::new(lag.clone()))?;
        registry.register(Box::new(lag_events.clone()))?;
        registry.register(Box::new(lag_seconds.clone()))?;
        registry.register(Box::new(refresh_lag.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Self {
            registry,
            lag,
            lag_events,
            backlog,
            lag_seconds,
            refresh_lag,
            connected,
            errors,
            stores: Arc::new(stores),
            seen_errors: Arc::default(),
            oldest: Arc::default(),
        })
    }

    /// When the record at `lsn` was accepted (µs), read from the log once per position (no
    /// lock is held while reading).
    fn accepted_at(
        &self,
        log: &Arc<meterd_ingest::log::LogShared>,
        store: &'static str,
        lsn: u64,
    ) -> meterd_ingest::Result<Option<i64>> {
        let cached = self
            .oldest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(store)
            .copied();
        if let Some((at_lsn, at)) = cached
            && at_lsn == lsn
        {
            return Ok(Some(at));
        }
        let mut payload = Vec::new();
        let Some((start, _)) = log.reader(lsn)?.next_record(&mut payload)? else {
            return Ok(None);
        };
        let at = meterd_ingest::decode_record(start, &payload)?
            .first()
            .map(|e| e.ingested_at_us);
        if let Some(at) = at {
            self.oldest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(store, (lsn, at));
        }
        Ok(at)
    }

    /// The registry with the stores' state read now.
    fn read(&self, ingest: &Ingest) -> &prometheus::Registry {
        let log = ingest.log();
        let end = log.durable_end();
        for (store, status) in &self.stores.0 {
            let name = [store.name()];
            // Before a sink first connects it has confirmed nothing it knows of; what the log
            // still retains is then the most it can lag.
            let lag = end
                .saturating_sub(status.delivered())
                .min(log.retained_bytes());
            self.lag
                .with_label_values(&name)
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
            if let Some(events) = self
                .backlog
                .as_ref()
                .and_then(|b| b.events_after(status.delivered()))
            {
                self.lag_events
                    .with_label_values(&name)
                    .set(i64::try_from(events).unwrap_or(i64::MAX));
            }
            let from = status.delivered().max(log.start());
            let oldest = if from >= end {
                Ok(None)
            } else {
                self.accepted_at(log, store.name(), from)
            };
            match oldest {
                Ok(at) => self
                    .lag_seconds
                    .with_label_values(&name)
                    .set(at.map_or(0.0, age_seconds)),
                // The gauge keeps its last value.
                Err(e) => tracing::warn!(
                    store = store.name(),
                    error = %e,
                    "reading the log for the delivery lag"
                ),
            }
            if let Some(at) = status.rollups_refreshed_at_us() {
                self.refresh_lag
                    .with_label_values(&name)
                    .set(age_seconds(at));
            }
            self.connected
                .with_label_values(&name)
                .set(i64::from(status.connected()));
            let errors = status.errors();
            let mut seen_errors = self
                .seen_errors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let seen = seen_errors.entry(store.name()).or_default();
            self.errors
                .with_label_values(&name)
                .inc_by(errors.saturating_sub(*seen));
            *seen = (*seen).max(errors);
        }
        &self.registry
    }
}

/// `GET /metrics`: the Prometheus text exposition of every family. Its labels name every
/// tenant with a series of its own, so a key bound to one tenant may not read it.
async fn metrics(
    State(m): State<Metrics>,
    principal: Option<axum::Extension<Principal>>,
) -> Response {
    if principal.as_deref().is_some_and(|p| p.tenant.is_some()) {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({ "error": "the metrics name every tenant: they are for keys not bound to a tenant" })),
        )
            .into_response();
    }
    let mut families = m.ingest.metrics_registry().gather();
    families.extend(m.query.metrics_registry().gather());
    for r in &m.more {
        families.extend(r.gather());
    }
    // The stores' delivery lag may read a record of the log: off the async threads.
    let (stores, ingest) = (m.stores.clone(), Arc::clone(&m.ingest));
    match tokio::task::spawn_blocking(move || stores.read(&ingest).gather()).await {
        Ok(f) => families.extend(f),
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({ "error": format!("reading the stores' state: {e}") })),
            )
                .into_response();
        }
    }
    families.extend(m.http.gather());
    let mut body = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&families, &mut body) {
        Ok(()) => (
            [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({ "error": format!("encoding the metrics: {e}") })),
        )
            .into_response(),
    }
}

async fn openapi_json() -> impl IntoResponse {
    axum::Json(openapi::document(chrono::Utc::now()))
}

/// The families `/metrics` exports beside ingest's, SQL's, the stores' and HTTP's.
#[derive(Debug)]
pub struct Exported {
    /// Other crates' registries (SLO gauges and counters, billing).
    pub registries: Vec<prometheus::Registry>,
    /// Billing's families, also counted by the close endpoint.
    pub billing: meterd_billing::metrics::BillingMetrics,
    /// The log's event counts, for the stores' lag in events (with external stores).
    pub backlog: Option<Arc<meterd_ingest::backlog::Backlog>>,
}

/// Where invoices and SLOs read usage.
#[derive(Debug)]
pub struct Usage {
    /// The store that serves SQL.
    pub source: Arc<dyn meterd_billing::UsageSource>,
    /// The SLO counts kept in memory, when that store allows it.
    pub slo_cache: Option<Arc<meterd_slo::cache::SloCache>>,
}

/// Builds the whole HTTP surface.
pub fn router(
    ingest: Arc<Ingest>,
    query: &Arc<QueryService>,
    usage: Usage,
    closed: Arc<dyn meterd_billing::ClosedStore>,
    stores: Stores,
    exported: Exported,
    settings: &Settings,
) -> anyhow::Result<Router> {
    let Usage {
        source: usage,
        slo_cache,
    } = usage;
    let Exported {
        registries,
        billing: billing_metrics,
        backlog,
    } = exported;
    let mut keys = Keys::default();
    for k in &settings.api_keys {
        keys.0.insert(
            k.secret.clone(),
            (
                Principal {
                    key_name: k.name.clone(),
                    tenant: k.tenant.clone(),
                },
                k.scopes.clone(),
            ),
        );
    }
    let keys = Arc::new(keys);
    let http = HttpMetrics::new().context("registering the HTTP metrics")?;
    let guard = |scope| {
        axum::middleware::from_fn_with_state(
            AuthState {
                keys: Arc::clone(&keys),
                scope,
            },
            authenticate,
        )
    };
    // `route_layer`, not `layer`: a path that matches no route is a 404 for everyone, not a
    // 401 that tells a prober nothing and a client with a typo the wrong thing.
    let app = Router::new()
        .merge(meterd_ingest::http::router(Arc::clone(&ingest)).route_layer(guard(Scope::Ingest)))
        .merge(query.router().route_layer(guard(Scope::Query)))
        .merge(
            crate::billing::router(
                Arc::clone(&settings.billing),
                Arc::clone(&usage),
                closed,
                billing_metrics,
                // Several statements per invoice, each within the SQL timeout.
                settings.query.timeout.saturating_mul(4),
            )
            .route_layer(guard(Scope::Query)),
        )
        .merge(
            crate::slo::router(
                Arc::clone(&settings.slos),
                usage,
                slo_cache,
                settings.query.timeout.saturating_mul(4),
            )
            .route_layer(guard(Scope::Query)),
        )
        .merge(
            Router::new()
                .route(
                    "/metrics",
                    get(metrics).with_state(Metrics {
                        ingest: Arc::clone(&ingest),
                        query: Arc::clone(query),
                        more: registries,
                        stores: StoreGauges::new(stores.clone(), backlog)
                            .context("registering the stores' metrics")?,
                        http: http.registry.clone(),
                    }),
                )
                .route_layer(guard(Scope::Query)),
        )
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(readyz).with_state(Readiness {
                ingest,
                stores,
                keys: Arc::clone(&keys),
            }),
        )
        .route("/openapi.json", get(openapi_json))
        .layer(axum::middleware::from_fn_with_state(http, count_requests));
    Ok(app)
}

/// SQL over the embedded store.
async fn embedded_query(
    ingest: &Arc<Ingest>,
    settings: &Settings,
) -> anyhow::Result<Arc<QueryService>> {
    QueryService::new(
        Arc::new(EmbeddedSource(Arc::clone(ingest))),
        settings.query.clone(),
    )
    .await
    .context("starting the query service")
}

/// The relations `POST /v1/sql` serves from PostgreSQL or ClickHouse.
const STORE_TABLES: &[&str] = &["events", "usage_hourly", "usage_daily"];

/// The query service of a store, or `None` (logged) when the store is not ready: SQL is then
/// served from the embedded store until the next restart.
fn served_from(store: &str, query: anyhow::Result<Arc<QueryService>>) -> Option<Arc<QueryService>> {
    match query {
        Ok(query) => {
            tracing::info!(store, "SQL is served from {store}");
            Some(query)
        }
        Err(e) => {
            tracing::warn!(
                store,
                error = %format!("{e:#}"),
                "{store} is not ready; SQL is served from the embedded store until restart"
            );
            None
        }
    }
}

/// SQL over an external store's relations.
async fn store_query(store: &dyn Store, settings: &Settings) -> anyhow::Result<Arc<QueryService>> {
    let tables = store.tables(STORE_TABLES, &settings.query).await?;
    QueryService::with_tables(tables, settings.query.clone())
        .with_context(|| format!("registering the {} tables", store.display_name()))
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    // Counted as events are accepted: each SLO's valid and good events, and list cost.
    let slo_counters = prometheus::Registry::new();
    let billing_metrics = meterd_billing::metrics::BillingMetrics::new()
        .context("registering the billing metrics")?;
    let mut ingest_config = settings.ingest.clone();
    // SLOs are kept counted when SQL reads the embedded store, which only this process writes:
    // told of every batch, the counts know each event that reaches the store.
    let slo_observed = (settings.sql_source.store_name().is_none() && !settings.slos.is_empty())
        .then(|| Arc::new(meterd_slo::cache::Observed::new(Arc::clone(&settings.slos))));
    if let Some(observed) = &slo_observed {
        ingest_config.changes.0.push(Arc::clone(observed) as _);
    }
    // Each external store's lag in events: the log's records counted as they are written.
    let backlog = (settings.postgres.is_some() || settings.clickhouse.is_some())
        .then(|| Arc::new(meterd_ingest::backlog::Backlog::default()));
    if let Some(backlog) = &backlog {
        ingest_config.changes.0.push(Arc::clone(backlog) as _);
    }
    if ingest_config.usage_metrics {
        let max_series = ingest_config.metric_labels.max_series;
        ingest_config.observers.0.push(Arc::new(
            meterd_slo::metrics::SloCounters::new(
                &slo_counters,
                settings.slos.as_ref().clone(),
                max_series,
            )
            .context("registering the SLO counters")?,
        ));
        ingest_config.observers.0.push(Arc::new(
            billing_metrics.cost_observer(settings.billing.prices.clone(), max_series),
        ));
    }
    let ingest = tokio::task::spawn_blocking(move || Ingest::open(ingest_config))
        .await
        .context("opening ingest panicked")?
        .with_context(|| {
            format!(
                "opening the data directory {}",
                settings.ingest.data_dir.display()
            )
        })?;
    if let Some(backlog) = &backlog {
        // Nothing is accepted before the listener starts: the log up to here was written by
        // earlier runs.
        let (backlog, log) = (Arc::clone(backlog), Arc::clone(ingest.log()));
        let end = log.durable_end();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = backlog.count_existing(&log, end) {
                tracing::warn!(error = %e, "counting the events of the log for the stores' lag; meterd_store_delivery_lag_events stays absent");
            }
        });
    }
    // Stores stop after ingest has drained, so they can still take its last batches.
    let stores_stop = CancellationToken::new();
    let mut configured: Vec<Arc<dyn Store>> = Vec::new();
    if let Some(pg) = &settings.postgres {
        configured.push(Arc::new(PostgresStore::new(pg.clone())));
    }
    if let Some(ch) = &settings.clickhouse {
        configured.push(Arc::new(ClickHouseStore::new(ch.clone())));
    }
    let mut sinks = Vec::with_capacity(configured.len());
    for store in &configured {
        let consumer = ingest.sink_consumer(store.name()).with_context(|| {
            format!(
                "the {} log consumer is not registered",
                store.display_name()
            )
        })?;
        let handle = store.start(SinkStart {
            log: Arc::clone(ingest.log()),
            consumer,
            node_id: ingest.node_id().to_owned(),
            data_dir: ingest.config().data_dir.clone(),
            shutdown: stores_stop.clone(),
        });
        sinks.push((Arc::clone(store), handle));
    }
    if let Some(backlog) = &backlog {
        backlog.watch(sinks.iter().map(|(_, h)| Arc::clone(&h.status)).collect());
    }
    let sql_store = settings
        .sql_source
        .store_name()
        .and_then(|name| configured.iter().find(|s| s.name() == name));
    let query = match sql_store {
        Some(store) => served_from(
            store.display_name(),
            store_query(store.as_ref(), &settings).await,
        )
        .map(|query| (query, store)),
        None => None,
    };
    // Invoices read usage where SQL does: the store runs each meter's aggregation itself.
    let (query, usage): (_, Arc<dyn meterd_billing::UsageSource>) = match query {
        Some((query, store)) => {
            let usage = store
                .usage(&settings.query)
                .await
                .with_context(|| format!("reading usage from {}", store.display_name()))?;
            (query, usage)
        }
        None => {
            let query = embedded_query(&ingest, &settings).await?;
            let usage = Arc::new(crate::billing::EmbeddedUsage(Arc::clone(&query)));
            (query, usage)
        }
    };
    // Closed invoices where every node sees them (PostgreSQL), else under the data directory.
    let mut closed: Option<Arc<dyn meterd_billing::ClosedStore>> = None;
    for store in &configured {
        if closed.is_none() {
            closed = store
                .closed_invoices(&settings.query)
                .with_context(|| format!("keeping closed invoices in {}", store.display_name()))?;
        }
    }
    let closed = closed.unwrap_or_else(|| {
        Arc::new(meterd_billing::FileClosedStore::new(
            settings.ingest.data_dir.join("billing").join("closed"),
        ))
    });
    let auto_close = settings.close_grace.map(|grace| {
        crate::billing::spawn_auto_close(
            Arc::clone(&settings.billing),
            Arc::clone(&usage),
            Arc::clone(&closed),
            billing_metrics.clone(),
            grace,
            stores_stop.clone(),
        )
    });
    let slo_gauges = crate::slo::SloGauges::new().context("registering the SLO metrics")?;
    let slo_cache = match (slo_observed, sql_store) {
        (Some(observed), None) => {
            let store = Arc::clone(ingest.store());
            Some(Arc::new(meterd_slo::cache::SloCache::new(
                observed,
                Arc::new(move || store.visible_lsn()),
                slo_gauges.kept_seconds(),
            )))
        }
        _ => None,
    };
    let slo_cache_task = slo_cache.as_ref().map(|cache| {
        crate::slo::spawn_slo_cache(Arc::clone(cache), Arc::clone(&usage), stores_stop.clone())
    });
    let slo_metrics = crate::slo::spawn_slo_metrics(
        Arc::clone(&settings.slos),
        Arc::clone(&usage),
        slo_cache.clone(),
        slo_gauges.clone(),
        SLO_METRICS_EVERY,
        settings.ingest.metric_labels.top_tenants,
        stores_stop.clone(),
    );
    let app = router(
        Arc::clone(&ingest),
        &query,
        Usage {
            source: usage,
            slo_cache,
        },
        closed,
        Stores(
            sinks
                .iter()
                .map(|(store, handle)| (Arc::clone(store), Arc::clone(&handle.status)))
                .collect(),
        ),
        Exported {
            registries: vec![
                slo_gauges.registry().clone(),
                slo_counters,
                billing_metrics.registry().clone(),
            ],
            billing: billing_metrics,
            backlog: backlog.clone(),
        },
        &settings,
    )?;

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%addr, data_dir = %settings.ingest.data_dir.display(), "meterd listening");
    // Scripts and tests read the bound address (port 0 picks one) from this line on stdout.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "meterd listening on http://{addr}").context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;

    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    let limits = ConnectionLimits {
        header_timeout: settings.header_timeout,
        body_timeout: settings.body_timeout,
        write_timeout: settings.body_timeout,
        max_connections: connection_cap(settings.max_connections),
    };
    let serving = tokio::spawn(listener::serve(listener, app, limits, shutdown.clone()));
    let deadline = settings.shutdown_timeout;
    shutdown.cancelled().await;
    tracing::info!(
        deadline_secs = deadline.as_secs(),
        "shutting down: finishing in-flight requests"
    );
    let drained = tokio::time::timeout(deadline, async {
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "http server task failed");
        }
        let flushed = tokio::task::spawn_blocking(move || ingest.shutdown()).await;
        stores_stop.cancel();
        for (_, handle) in sinks {
            handle.join().await;
        }
        if let Some(task) = auto_close
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "the billing closer task failed");
        }
        if let Some(task) = slo_metrics
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "the SLO metrics task failed");
        }
        if let Some(task) = slo_cache_task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "the SLO hours task failed");
        }
        flushed
    })
    .await;
    drop(query);
    match drained {
        Ok(Ok(Ok(()))) => {
            tracing::info!("shut down cleanly");
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(anyhow::Error::new(e)
            .context("flushing on shutdown (acknowledged events are safe in the log)")),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("shutdown task panicked")),
        Err(_) => anyhow::bail!(
            "shutdown took longer than {}s; acknowledged events are safe in the log",
            deadline.as_secs()
        ),
    }
}

async fn watch_signals(token: CancellationToken) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
    token.cancel();
}
