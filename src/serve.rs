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
use backon::Retryable;
use meterd_ingest::Ingest;
use meterd_ingest::sink::SinkStatus;
use meterd_query::{EventsSource, QueryService};
use meterd_schemas::{EventsSnapshot, Principal, SnapshotPin};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{CLICKHOUSE_SINK, POSTGRES_SINK, Scope, Settings, SqlSource};
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

/// The status of each external store that is configured.
#[derive(Debug, Clone, Default)]
pub struct Stores {
    pub postgres: Option<Arc<SinkStatus>>,
    pub clickhouse: Option<Arc<SinkStatus>>,
}

/// The status code is public, for load balancers and orchestrators; the detail (log sizes,
/// store errors) only for a valid API key when keys are configured.
async fn readyz(State(state): State<Readiness>, headers: header::HeaderMap) -> Response {
    let r = state.ingest.readiness();
    let mut ready = r.ready;
    let mut body = json!({ "ingest": r });
    if let Some(pg) = &state.stores.postgres {
        ready &= pg.connected();
        body["postgres"] = json!({
            "connected": pg.connected(),
            "delivered_lsn": pg.delivered(),
            "last_error": pg.last_error(),
            "rollup_refresher_error": pg.refresher_error(),
        });
    }
    if let Some(ch) = &state.stores.clickhouse {
        ready &= ch.connected();
        body["clickhouse"] = json!({
            "connected": ch.connected(),
            "delivered_lsn": ch.delivered(),
            "last_error": ch.last_error(),
        });
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

async fn openapi_json() -> impl IntoResponse {
    axum::Json(openapi::document(chrono::Utc::now()))
}

/// Builds the whole HTTP surface.
pub fn router(
    ingest: Arc<Ingest>,
    query: &Arc<QueryService>,
    stores: Stores,
    settings: &Settings,
) -> Router {
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
    Router::new()
        .merge(meterd_ingest::http::router(Arc::clone(&ingest)).route_layer(guard(Scope::Ingest)))
        .merge(query.router().route_layer(guard(Scope::Query)))
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
fn store_query(store: &str, query: anyhow::Result<Arc<QueryService>>) -> Option<Arc<QueryService>> {
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

/// SQL over ClickHouse's `meterd` database, its tables created first so they exist.
async fn clickhouse_query(
    ch: &meterd_ingest::clickhouse::ClickHouseConfig,
    settings: &Settings,
) -> anyhow::Result<Arc<QueryService>> {
    let client = meterd_ingest::clickhouse::client(ch);
    // The sink creates or migrates the same tables at the same time; the migration guard makes
    // one wait for the other. A failure (the server not up yet) is retried.
    (|| meterd_ingest::clickhouse::schema::ensure(&client, ch))
        .retry(
            backon::ConstantBuilder::default()
                .with_delay(std::time::Duration::from_millis(500))
                .with_max_times(2),
        )
        .await
        .context("creating meterd's ClickHouse tables")?;
    QueryService::with_clickhouse(client, &ch.database, STORE_TABLES, settings.query.clone())
        .await
        .context("reading the ClickHouse tables")
}

/// SQL over PostgreSQL's `meterd` schema, migrated first so the relations exist.
async fn postgres_query(
    pg: &meterd_ingest::postgres::PostgresConfig,
    settings: &Settings,
) -> anyhow::Result<Arc<QueryService>> {
    let mut client = meterd_ingest::postgres::connect(pg)
        .await
        .context("connecting to PostgreSQL")?;
    meterd_ingest::postgres::migrate(&mut client, pg)
        .await
        .context("migrating PostgreSQL")?;
    drop(client);
    let mut config: tokio_postgres::Config =
        pg.url.parse().context("parsing the PostgreSQL URL")?;
    // As the sink's connections: give up connecting after 10 s, notice a dead peer in a minute.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(std::time::Duration::from_secs(60));
    }
    config.keepalives_idle(std::time::Duration::from_secs(30));
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(settings.query.threads.max(1) * 4)
        .build()
        .context("building the PostgreSQL pool")?;
    QueryService::with_postgres(pool, "meterd", STORE_TABLES, settings.query.clone())
        .await
        .context("registering PostgreSQL tables")
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let ingest_config = settings.ingest.clone();
    let ingest = tokio::task::spawn_blocking(move || Ingest::open(ingest_config))
        .await
        .context("opening ingest panicked")?
        .with_context(|| {
            format!(
                "opening the data directory {}",
                settings.ingest.data_dir.display()
            )
        })?;
    // Stores stop after ingest has drained, so they can still take its last batches.
    let stores_stop = CancellationToken::new();
    let postgres = match &settings.postgres {
        Some(pg) => {
            let consumer = ingest
                .sink_consumer(POSTGRES_SINK)
                .context("the PostgreSQL log consumer is not registered")?;
            Some(meterd_ingest::postgres::spawn(
                Arc::clone(ingest.log()),
                consumer,
                ingest.node_id().to_owned(),
                pg.clone(),
                stores_stop.clone(),
            ))
        }
        None => None,
    };
    let clickhouse = match &settings.clickhouse {
        Some(ch) => {
            let consumer = ingest
                .sink_consumer(CLICKHOUSE_SINK)
                .context("the ClickHouse log consumer is not registered")?;
            Some(meterd_ingest::clickhouse::spawn(
                Arc::clone(ingest.log()),
                consumer,
                ingest.node_id().to_owned(),
                ingest.config().data_dir.clone(),
                ch.clone(),
                stores_stop.clone(),
            ))
        }
        None => None,
    };
    let query = match (
        settings.sql_source,
        &settings.postgres,
        &settings.clickhouse,
    ) {
        (SqlSource::Postgres, Some(pg), _) => {
            store_query("PostgreSQL", postgres_query(pg, &settings).await)
        }
        (SqlSource::Clickhouse, _, Some(ch)) => {
            store_query("ClickHouse", clickhouse_query(ch, &settings).await)
        }
        _ => None,
    };
    let query = match query {
        Some(query) => query,
        None => embedded_query(&ingest, &settings).await?,
    };
    let app = router(
        Arc::clone(&ingest),
        &query,
        Stores {
            postgres: postgres.as_ref().map(|p| Arc::clone(&p.status)),
            clickhouse: clickhouse.as_ref().map(|c| Arc::clone(&c.status)),
        },
        &settings,
    );

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
        if let Some(pg) = postgres {
            pg.join().await;
        }
        if let Some(ch) = clickhouse {
            ch.join().await;
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
