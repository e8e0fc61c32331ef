//! `meterd serve` settings from flags, `METERD_*` environment variables and a TOML file, in
//! that order of precedence. Unknown keys in the file are errors, so a typo never silently
//! falls back to a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use meterd_ingest::{EmbeddedOptions, IngestConfig};
use meterd_query::QueryConfig;
use meterd_store_clickhouse::{self as clickhouse, ClickHouseConfig};
use meterd_store_postgres::{PostgresConfig, TimescaleMode};
use serde::{Deserialize, Serialize};

/// Every setting of `meterd serve`, defined once: each field is a flag, its `METERD_*`
/// environment variable (clap reads both) and the key of the same name in the TOML file
/// (serde). Flags and variables take precedence over the file ([`Settings::resolve`] layers
/// them with figment). Unknown keys in the file are errors. A few are flags only (`config`,
/// the store URLs, which the file gives as `url` in its store's table) and a few file only
/// (`[[api_keys]]` and the stores' tables).
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "METERD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080]; port 0 picks a free port.
    #[arg(long, env = "METERD_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Directory for the log, the dedup index and the embedded store [default: ./meterd-data].
    #[arg(long, env = "METERD_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Largest request body in bytes, also after gzip inflation [default: 10 MiB].
    #[arg(long, env = "METERD_MAX_BODY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Log bytes not yet confirmed by every store before ingest answers 503 [default: 2 GiB].
    #[arg(long, env = "METERD_MAX_LOG_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_log_bytes: Option<u64>,
    /// How far in the future an event's time may be, in seconds [default: 300].
    #[arg(long, env = "METERD_MAX_FUTURE_SKEW_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_future_skew_secs: Option<u64>,
    /// How old an event may be, in days [default: 400].
    #[arg(long, env = "METERD_MAX_EVENT_AGE_DAYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_event_age_days: Option<u64>,
    /// How long (by event time) dedup keys are kept, in days [default: 400].
    #[arg(long, env = "METERD_DEDUP_HORIZON_DAYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_horizon_days: Option<u64>,
    /// Flush the embedded store's in-memory tail at least this often, in ms [default: 5000].
    #[arg(long, env = "METERD_FLUSH_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_interval_ms: Option<u64>,
    /// SQL query timeout in seconds [default: 30].
    #[arg(long, env = "METERD_QUERY_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_timeout_secs: Option<f64>,
    /// Most rows a SQL answer may have [default: 100000].
    #[arg(long, env = "METERD_QUERY_MAX_ROWS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_max_rows: Option<usize>,
    /// Memory a SQL query may use, in bytes [default: 512 MiB].
    #[arg(long, env = "METERD_QUERY_MEMORY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_memory_bytes: Option<usize>,
    /// Largest SQL response, in bytes [default: 256 MiB].
    #[arg(long, env = "METERD_QUERY_MAX_RESPONSE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_max_response_bytes: Option<usize>,
    /// Threads of the dedicated SQL runtime [default: 1].
    #[arg(long, env = "METERD_QUERY_THREADS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_threads: Option<usize>,
    /// Log format on stderr: text or json [default: text].
    #[arg(long, env = "METERD_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Where `POST /v1/sql` reads: auto (ClickHouse if configured, else PostgreSQL if
    /// configured, else the embedded store), embedded, postgres or clickhouse [default: auto].
    #[arg(long, env = "METERD_SQL_SOURCE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sql_source: Option<SqlSource>,
    /// Hours after a billing period ends in a customer's zone before it is closed
    /// automatically; 0 turns automatic closing off [default: 72].
    #[arg(long, env = "METERD_CLOSE_GRACE_HOURS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_grace_hours: Option<u64>,
    /// Count every accepted event into the per-tenant metrics of `/metrics` (usage, cost,
    /// SLO events); `false` leaves ingest without per-event counting [default: true].
    #[arg(long, env = "METERD_USAGE_METRICS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_metrics: Option<bool>,
    /// Tenants with series of their own in the usage metrics; the rest are "other" [default: 20].
    #[arg(long, env = "METERD_METRICS_TOP_TENANTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_top_tenants: Option<usize>,
    /// Providers, models and agents with series of their own in the usage metrics, each
    /// [default: 10].
    #[arg(long, env = "METERD_METRICS_TOP_VALUES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_top_values: Option<usize>,
    /// The most series one usage metric family may have [default: 500].
    #[arg(long, env = "METERD_METRICS_MAX_SERIES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_max_series: Option<usize>,
    /// `metrics_tenants = [...]`: exactly these tenants get series of their own (file only).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_tenants: Option<Vec<String>>,
    /// Deadline for a graceful shutdown, in seconds [default: 30].
    #[arg(long, env = "METERD_SHUTDOWN_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Most HTTP connections open at once; lowered to fit the process's file descriptor
    /// limit [default: 1024].
    #[arg(long, env = "METERD_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Seconds a client may take to send a request's headers; also how long an idle
    /// keep-alive connection stays open [default: 10].
    #[arg(long, env = "METERD_HEADER_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout_secs: Option<u64>,
    /// Seconds a request body may go without sending more, and a response without being
    /// read, before the connection is closed; past them a body must bring 1 KiB/s in every
    /// such span [default: 30].
    #[arg(long, env = "METERD_BODY_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_timeout_secs: Option<u64>,
    /// PostgreSQL/TimescaleDB to fill, `postgres://user:password@host:port/database`; further
    /// settings under `[postgres]` in the config file.
    #[arg(long, env = "METERD_POSTGRES_URL")]
    #[serde(skip)]
    pub postgres_url: Option<String>,
    /// ClickHouse to fill, its HTTP interface `http://host:8123`; database, credentials and
    /// batching under `[clickhouse]` in the config file.
    #[arg(long, env = "METERD_CLICKHOUSE_URL")]
    #[serde(skip)]
    pub clickhouse_url: Option<String>,
    /// `[[api_keys]]`: the API keys (file only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKeyConfig>,
    /// `[postgres]`: the PostgreSQL/TimescaleDB store (file only; `--postgres-url` gives its URL).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresFileConfig>,
    /// `[clickhouse]`: the ClickHouse store (file only; `--clickhouse-url` gives its URL).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clickhouse: Option<ClickHouseFileConfig>,
    /// `[[prices]]`: the price book (file only; see docs/billing.md).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prices: Vec<meterd_billing::config::PriceEntry>,
    /// `[[meters]]`: named aggregations over events (file only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meters: Vec<meterd_billing::config::MeterConfig>,
    /// `[[plans]]`: base fee, minimum and charges (file only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<meterd_billing::config::PlanConfig>,
    /// `[[customers]]`: each tenant's plan and zone (file only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customers: Vec<meterd_billing::config::CustomerConfig>,
    /// `[[credits]]`: prepaid credit grants (file only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credits: Vec<meterd_billing::config::CreditConfig>,
    /// `[[slos]]`: service level objectives over events (file only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slos: Vec<meterd_slo::SloConfig>,
}

/// Flags of `meterd migrate`.
#[derive(Debug, Clone, Default, Args)]
pub struct MigrateArgs {
    /// TOML configuration file (its `[postgres]` table is used).
    #[arg(long, env = "METERD_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL; overrides `[postgres] url`.
    #[arg(long, env = "METERD_POSTGRES_URL")]
    pub postgres_url: Option<String>,
}

impl MigrateArgs {
    /// The PostgreSQL settings to migrate with; an error when none are configured.
    pub fn resolve(&self) -> Result<PostgresConfig, ConfigError> {
        let file = layered(&ServeArgs {
            config: self.config.clone(),
            ..ServeArgs::default()
        })?;
        let max_age = meterd_schemas::Limits::default().max_age.num_days();
        let max_age = file.max_event_age_days.map_or(max_age, clamp_i64);
        postgres_config(self.postgres_url.clone(), file.postgres, max_age)?.ok_or_else(|| {
            ConfigError::Invalid(
                "no PostgreSQL configured: give --postgres-url, METERD_POSTGRES_URL or [postgres] url"
                    .to_owned(),
            )
        })
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where `POST /v1/sql` reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqlSource {
    /// ClickHouse if configured, else PostgreSQL if configured, else the embedded store.
    #[default]
    Auto,
    Embedded,
    Postgres,
    Clickhouse,
}

impl SqlSource {
    /// The name of the store SQL is served from (`None`: the embedded store).
    pub fn store_name(self) -> Option<&'static str> {
        match self {
            SqlSource::Auto | SqlSource::Embedded => None,
            SqlSource::Postgres => Some(POSTGRES_SINK),
            SqlSource::Clickhouse => Some(CLICKHOUSE_SINK),
        }
    }
}

/// `[clickhouse]`: the ClickHouse store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseFileConfig {
    /// HTTP interface URL; `--clickhouse-url` / `METERD_CLICKHOUSE_URL` take precedence.
    pub url: Option<String>,
    /// The database meterd creates and fills [default: meterd].
    pub database: Option<String>,
    pub user: Option<String>,
    /// The password, or `password_env`: the environment variable holding it.
    pub password: Option<String>,
    pub password_env: Option<String>,
    /// An insert is sent at this many events [default: 100000; at most 1000000]...
    pub batch_rows: Option<usize>,
    /// ...or this many bytes of log records [default: 67108864]...
    pub batch_bytes: Option<usize>,
    /// ...or when its first event has waited this long, in seconds [default: 1].
    pub batch_period_secs: Option<f64>,
    /// Drop raw events older than this many days (whole months dropped by meterd, and a TTL
    /// on servers that have it); at least `max_event_age_days` [default: keep everything].
    pub retention_days: Option<u32>,
}

/// `[postgres]`: the PostgreSQL/TimescaleDB store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresFileConfig {
    /// Connection URL; `--postgres-url` / `METERD_POSTGRES_URL` take precedence.
    pub url: Option<String>,
    /// `auto` (use TimescaleDB when it can be enabled), `require` or `off` [default: auto].
    pub timescaledb: Option<TimescaleSetting>,
    /// Events per COPY transaction [default: 10000].
    pub batch_rows: Option<usize>,
    /// TimescaleDB: compress chunks older than this many days; 0 turns compression off
    /// [default: 7].
    pub compress_after_days: Option<u32>,
    /// Drop raw events older than this many days; at least `max_event_age_days`, so no late
    /// event can land in a dropped day [default: keep everything].
    pub retention_days: Option<u32>,
    /// Plain PostgreSQL: seconds between rollup refreshes [default: 30].
    pub refresh_interval_secs: Option<f64>,
    /// Plain PostgreSQL: days of partitions created ahead [default: 3].
    pub partitions_ahead_days: Option<u32>,
}

/// The `timescaledb` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimescaleSetting {
    Auto,
    Require,
    Off,
}

/// One API key, as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for logs; the key itself is never logged.
    pub name: String,
    /// The secret, sent as `Authorization: Bearer <key>`. Give `key` or `key_env`.
    pub key: Option<String>,
    /// Name of an environment variable holding the secret.
    pub key_env: Option<String>,
    /// Bind the key to a tenant: it may only send (and later see) that tenant's events.
    pub tenant: Option<String>,
    /// What the key may do: `ingest`, `query` [default: both].
    #[serde(default = "all_scopes")]
    pub scopes: Vec<Scope>,
}

/// A permission of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /v1/events`
    Ingest,
    /// `POST /v1/sql`
    Query,
}

fn all_scopes() -> Vec<Scope> {
    vec![Scope::Ingest, Scope::Query]
}

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A resolved API key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub secret: String,
    pub tenant: Option<String>,
    pub scopes: Vec<Scope>,
}

/// Everything `meterd serve` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub ingest: IngestConfig,
    pub query: QueryConfig,
    pub api_keys: Vec<ApiKey>,
    pub log_format: LogFormat,
    pub shutdown_timeout: Duration,
    /// The most HTTP connections open at once, before the descriptor limit lowers it.
    pub max_connections: usize,
    /// Time to send request headers, and idle time of a keep-alive connection.
    pub header_timeout: Duration,
    /// Time a request body may stall, and a response write may wait for the client.
    pub body_timeout: Duration,
    /// Where `POST /v1/sql` reads, resolved: never `Auto`, and only a configured store.
    pub sql_source: SqlSource,
    /// The PostgreSQL store, when configured.
    pub postgres: Option<PostgresConfig>,
    /// The ClickHouse store, when configured.
    pub clickhouse: Option<ClickHouseConfig>,
    /// Meters, prices, plans, customers and credits, checked.
    pub billing: Arc<meterd_billing::Billing>,
    /// SLOs, checked.
    pub slos: Arc<Vec<meterd_slo::Slo>>,
    /// How long after a period ends it is closed automatically; `None`: never.
    pub close_grace: Option<chrono::Duration>,
}

impl Settings {
    /// Resolves flags (which clap already merged with the environment) over the file over
    /// the defaults.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let given = layered(args)?;
        let listen = given
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let data_dir = given
            .data_dir
            .unwrap_or_else(|| PathBuf::from("meterd-data"));
        let mut ingest = IngestConfig::new(data_dir);
        if let Some(v) = given.max_body_bytes {
            ingest.max_body_bytes = positive(v, "max_body_bytes")?;
        }
        let defaults = meterd_ingest::metrics::LabelLimits::default();
        let at_most_1000 = |v: usize, name: &str| {
            if v > 1_000 {
                Err(ConfigError::Invalid(format!(
                    "{name} {v} is more than 1000 (each value is a set of series)"
                )))
            } else {
                Ok(v)
            }
        };
        ingest.metric_labels = meterd_ingest::metrics::LabelLimits {
            top_tenants: at_most_1000(
                given.metrics_top_tenants.unwrap_or(defaults.top_tenants),
                "metrics_top_tenants",
            )?,
            top_values: at_most_1000(
                given.metrics_top_values.unwrap_or(defaults.top_values),
                "metrics_top_values",
            )?,
            tenant_allowlist: given
                .metrics_tenants
                .clone()
                .map(|t| t.into_iter().collect()),
            max_series: positive(
                given.metrics_max_series.unwrap_or(defaults.max_series),
                "metrics_max_series",
            )?,
        };
        ingest.usage_metrics = given.usage_metrics.unwrap_or(true);
        if let Some(v) = given.max_log_bytes {
            ingest.max_log_bytes = v;
            // The log frees whole segments only: keep several per budget, so a store that caught
            // up brings the log back under its limit.
            ingest.segment_bytes = (v / 8).clamp(64 * 1024, 64 * 1024 * 1024);
        }
        if let Some(v) = given.max_future_skew_secs {
            ingest.limits.max_future_skew = chrono::Duration::seconds(clamp_i64(v));
        }
        if let Some(v) = given.max_event_age_days {
            ingest.limits.max_age =
                chrono::Duration::days(positive(clamp_i64(v), "max_event_age_days")?);
        }
        if let Some(v) = given.dedup_horizon_days {
            ingest.dedup_horizon = chrono::Duration::days(clamp_i64(v));
        }
        if ingest.dedup_horizon < ingest.limits.max_age {
            return Err(ConfigError::Invalid(format!(
                "dedup_horizon_days ({}) must be at least max_event_age_days ({}): otherwise an old event could be counted twice",
                ingest.dedup_horizon.num_days(),
                ingest.limits.max_age.num_days()
            )));
        }
        if let Some(v) = given.flush_interval_ms {
            ingest.embedded = EmbeddedOptions {
                flush_interval: Duration::from_millis(v),
                ..ingest.embedded
            };
        }
        let mut query = QueryConfig::default();
        if let Some(v) = given.query_timeout_secs {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::Invalid(format!(
                    "query_timeout_secs must be a positive number, got {v}"
                )));
            }
            query.timeout = Duration::try_from_secs_f64(v).map_err(|_| {
                ConfigError::Invalid(format!("query_timeout_secs {v} is too large"))
            })?;
        }
        if let Some(v) = given.query_max_rows {
            query.max_rows = positive(v, "query_max_rows")?;
        }
        if let Some(v) = given.query_memory_bytes {
            query.memory_limit_bytes = positive(v, "query_memory_bytes")?;
        }
        if let Some(v) = given.query_max_response_bytes {
            query.max_response_bytes = positive(v, "query_max_response_bytes")?;
        }
        if let Some(v) = given.query_threads {
            query.threads = positive(v, "query_threads")?;
        }
        let api_keys = given
            .api_keys
            .iter()
            .map(resolve_key)
            .collect::<Result<Vec<_>, _>>()?;
        if api_keys.is_empty() && !listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {listen} without API keys: configure [[api_keys]] in the config file, or listen on a loopback address"
            )));
        }
        let postgres = postgres_config(
            given.postgres_url.clone(),
            given.postgres.clone(),
            ingest.limits.max_age.num_days(),
        )?;
        if postgres.is_some() {
            ingest.sinks.push(POSTGRES_SINK.to_owned());
        }
        let clickhouse = clickhouse_config(
            given.clickhouse_url.clone(),
            given.clickhouse.clone(),
            ingest.limits.max_age.num_days(),
        )?;
        if clickhouse.is_some() {
            ingest.sinks.push(CLICKHOUSE_SINK.to_owned());
        }
        let sql_source = match given.sql_source.unwrap_or_default() {
            SqlSource::Auto if clickhouse.is_some() => SqlSource::Clickhouse,
            SqlSource::Auto if postgres.is_some() => SqlSource::Postgres,
            SqlSource::Auto => SqlSource::Embedded,
            SqlSource::Postgres if postgres.is_none() => {
                return Err(ConfigError::Invalid(
                    "sql_source = postgres, but no PostgreSQL is configured".to_owned(),
                ));
            }
            SqlSource::Clickhouse if clickhouse.is_none() => {
                return Err(ConfigError::Invalid(
                    "sql_source = clickhouse, but no ClickHouse is configured".to_owned(),
                ));
            }
            other => other,
        };
        let billing = meterd_billing::Billing::new(&meterd_billing::BillingConfig {
            prices: given.prices.clone(),
            meters: given.meters.clone(),
            plans: given.plans.clone(),
            customers: given.customers.clone(),
            credits: given.credits.clone(),
        })
        .map_err(|e| ConfigError::Invalid(format!("billing: {e}")))?;
        let slos =
            meterd_slo::Slo::all(&given.slos).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let close_grace = match given.close_grace_hours.unwrap_or(72) {
            0 => None,
            hours => Some(
                i64::try_from(hours)
                    .ok()
                    .and_then(chrono::Duration::try_hours)
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!("close_grace_hours {hours} is too large"))
                    })?,
            ),
        };
        Ok(Self {
            billing: Arc::new(billing),
            slos: Arc::new(slos),
            close_grace,
            listen,
            ingest,
            query,
            api_keys,
            postgres,
            clickhouse,
            sql_source,
            log_format: given.log_format.unwrap_or_default(),
            shutdown_timeout: Duration::from_secs(given.shutdown_timeout_secs.unwrap_or(30)),
            max_connections: positive(given.max_connections.unwrap_or(1024), "max_connections")?,
            header_timeout: Duration::from_secs(positive(
                given.header_timeout_secs.unwrap_or(10),
                "header_timeout_secs",
            )?),
            body_timeout: Duration::from_secs(positive(
                given.body_timeout_secs.unwrap_or(30),
                "body_timeout_secs",
            )?),
        })
    }
}

/// The log consumer name of the PostgreSQL store.
pub const POSTGRES_SINK: &str = "postgres";

/// The PostgreSQL settings, if a URL is given by flag, environment or file.
pub fn postgres_config(
    url: Option<String>,
    file: Option<PostgresFileConfig>,
    max_event_age_days: i64,
) -> Result<Option<PostgresConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let Some(url) = url.or(file.url) else {
        return Ok(None);
    };
    let mut pg = PostgresConfig::new(url);
    if let Some(mode) = file.timescaledb {
        pg.timescaledb = match mode {
            TimescaleSetting::Auto => TimescaleMode::Auto,
            TimescaleSetting::Require => TimescaleMode::Require,
            TimescaleSetting::Off => TimescaleMode::Off,
        };
    }
    if let Some(v) = file.batch_rows {
        pg.batch_rows = positive(v, "postgres.batch_rows")?;
    }
    if let Some(days) = file.compress_after_days {
        pg.compress_after = (days > 0).then(|| format!("{days} days"));
    }
    if let Some(days) = file.retention_days {
        if i64::from(days) < max_event_age_days {
            return Err(ConfigError::Invalid(format!(
                "postgres.retention_days ({days}) must be at least max_event_age_days \
                 ({max_event_age_days}): otherwise a late event could land in a dropped day"
            )));
        }
        pg.retention = Some(format!("{days} days"));
    }
    if let Some(v) = file.refresh_interval_secs {
        if !(v.is_finite() && v > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "postgres.refresh_interval_secs must be a positive number, got {v}"
            )));
        }
        pg.refresh_interval = Duration::try_from_secs_f64(v).map_err(|_| {
            ConfigError::Invalid(format!("postgres.refresh_interval_secs {v} is too large"))
        })?;
    }
    if let Some(v) = file.partitions_ahead_days {
        pg.partitions_ahead_days = v;
    }
    Ok(Some(pg))
}

/// The log consumer name of the ClickHouse store.
pub const CLICKHOUSE_SINK: &str = "clickhouse";

/// The ClickHouse settings, if a URL is given by flag, environment or file.
pub fn clickhouse_config(
    url: Option<String>,
    file: Option<ClickHouseFileConfig>,
    max_event_age_days: i64,
) -> Result<Option<ClickHouseConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let Some(url) = url.or(file.url) else {
        return Ok(None);
    };
    let mut ch = ClickHouseConfig::new(url);
    if let Some(db) = file.database {
        if !clickhouse::valid_database_name(&db) {
            return Err(ConfigError::Invalid(format!(
                "clickhouse.database {db:?} must be letters, digits and _ (not starting with a digit)"
            )));
        }
        ch.database = db;
    }
    ch.user = file.user;
    ch.password = match (file.password, file.password_env) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::Invalid(
                "clickhouse: give password or password_env, not both".to_owned(),
            ));
        }
        (Some(p), None) => Some(p),
        (None, Some(var)) => Some(std::env::var(&var).map_err(|_| {
            ConfigError::Invalid(format!(
                "clickhouse.password_env: environment variable {var} is not set"
            ))
        })?),
        (None, None) => None,
    };
    if let Some(v) = file.batch_rows {
        let v = positive(v, "clickhouse.batch_rows")?;
        if v > 1_000_000 {
            return Err(ConfigError::Invalid(format!(
                "clickhouse.batch_rows ({v}) must be at most 1000000: a batch month is sent as \
                 one block, which must fit ClickHouse's max_insert_block_size"
            )));
        }
        ch.batch_rows = v;
    }
    if let Some(v) = file.batch_bytes {
        ch.batch_bytes = positive(v, "clickhouse.batch_bytes")?;
    }
    if let Some(v) = file.batch_period_secs {
        if !(v.is_finite() && v >= 0.0) {
            return Err(ConfigError::Invalid(format!(
                "clickhouse.batch_period_secs must be a number >= 0, got {v}"
            )));
        }
        ch.batch_period = Duration::try_from_secs_f64(v).map_err(|_| {
            ConfigError::Invalid(format!("clickhouse.batch_period_secs {v} is too large"))
        })?;
    }
    if let Some(days) = file.retention_days {
        if i64::from(days) < max_event_age_days {
            return Err(ConfigError::Invalid(format!(
                "clickhouse.retention_days ({days}) must be at least max_event_age_days \
                 ({max_event_age_days}): otherwise a late event could land in a dropped month"
            )));
        }
        ch.retention_days = Some(days);
    }
    Ok(Some(ch))
}

/// The settings of `args` over those of its config file, if it names one: flags and
/// environment variables (already in `args`) win, then the file.
pub fn layered(args: &ServeArgs) -> Result<ServeArgs, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = &args.config {
        // `file_exact`: a missing file is an error, not an empty configuration.
        figment = figment.merge(Toml::file_exact(path));
    }
    let mut merged: ServeArgs = figment
        .merge(Serialized::defaults(args))
        .extract()
        .map_err(|source| ConfigError::Parse {
            path: args
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from("(none; flags and environment)")),
            source: Box::new(source),
        })?;
    // Flag-only settings are not part of the file's layer.
    merged.config.clone_from(&args.config);
    merged.postgres_url.clone_from(&args.postgres_url);
    merged.clickhouse_url.clone_from(&args.clickhouse_url);
    Ok(merged)
}

fn resolve_key(k: &ApiKeyConfig) -> Result<ApiKey, ConfigError> {
    let secret = match (&k.key, &k.key_env) {
        (Some(s), None) => s.clone(),
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            ConfigError::Invalid(format!(
                "api key {:?}: environment variable {var} is not set",
                k.name
            ))
        })?,
        _ => {
            return Err(ConfigError::Invalid(format!(
                "api key {:?}: give exactly one of key or key_env",
                k.name
            )));
        }
    };
    if secret.len() < 16 {
        return Err(ConfigError::Invalid(format!(
            "api key {:?}: the secret must be at least 16 bytes",
            k.name
        )));
    }
    if k.scopes.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "api key {:?}: scopes must not be empty",
            k.name
        )));
    }
    if k.tenant.is_some() && k.scopes.contains(&Scope::Query) {
        // The SQL API does not filter by tenant yet; a tenant-bound key must not read others' rows.
        return Err(ConfigError::Invalid(format!(
            "api key {:?}: a tenant-bound key cannot have the query scope yet (SQL is not tenant-filtered); use scopes = [\"ingest\"]",
            k.name
        )));
    }
    Ok(ApiKey {
        name: k.name.clone(),
        secret,
        tenant: k.tenant.clone(),
        scopes: k.scopes.clone(),
    })
}

fn positive<T: PartialOrd + Default + std::fmt::Display>(
    v: T,
    name: &str,
) -> Result<T, ConfigError> {
    if v > T::default() {
        Ok(v)
    } else {
        Err(ConfigError::Invalid(format!(
            "{name} must be positive, got {v}"
        )))
    }
}

fn clamp_i64(v: u64) -> i64 {
    // Durations this large are nonsensical; clamping keeps chrono from overflowing.
    i64::try_from(v).unwrap_or(i64::MAX).min(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn postgres_settings_resolve_and_retention_covers_the_event_age() {
        let f = file(
            "[postgres]\nurl = \"postgres://m@db/x\"\ncompress_after_days = 0\n\
             retention_days = 500\nbatch_rows = 5000\n",
        );
        let args = ServeArgs {
            config: Some(f.path().to_owned()),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(&args).expect("resolve");
        let pg = s.postgres.expect("postgres configured");
        assert_eq!(pg.url, "postgres://m@db/x");
        assert_eq!(pg.compress_after, None);
        assert_eq!(pg.retention.as_deref(), Some("500 days"));
        assert_eq!(pg.batch_rows, 5000);
        assert_eq!(s.ingest.sinks, vec![POSTGRES_SINK.to_owned()]);
        // The flag wins over the file.
        let args = ServeArgs {
            postgres_url: Some("postgres://flag/y".to_owned()),
            ..args
        };
        let s = Settings::resolve(&args).expect("resolve");
        assert_eq!(s.postgres.expect("configured").url, "postgres://flag/y");

        let short = file("[postgres]\nurl = \"postgres://m@db/x\"\nretention_days = 30\n");
        let args = ServeArgs {
            config: Some(short.path().to_owned()),
            ..ServeArgs::default()
        };
        let err = Settings::resolve(&args).expect_err("retention shorter than the event age");
        assert!(err.to_string().contains("retention_days (30)"), "{err}");
        assert!(
            Settings::resolve(&ServeArgs::default())
                .expect("defaults")
                .postgres
                .is_none()
        );
    }

    #[test]
    fn clickhouse_settings_resolve_and_bad_ones_are_refused() {
        let f = file(
            "[clickhouse]\nurl = \"http://ch:8123\"\ndatabase = \"metering\"\nuser = \"m\"\n\
             password = \"p\"\nbatch_rows = 5000\nbatch_bytes = 1000000\n\
             batch_period_secs = 0.25\nretention_days = 400\n",
        );
        let args = ServeArgs {
            config: Some(f.path().to_owned()),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(&args).expect("resolve");
        let ch = s.clickhouse.expect("clickhouse configured");
        assert_eq!(ch.url, "http://ch:8123");
        assert_eq!(ch.database, "metering");
        assert_eq!(
            (ch.user.as_deref(), ch.password.as_deref()),
            (Some("m"), Some("p"))
        );
        assert_eq!((ch.batch_rows, ch.batch_bytes), (5000, 1_000_000));
        assert_eq!(ch.batch_period, Duration::from_millis(250));
        assert_eq!(ch.retention_days, Some(400));
        assert_eq!(s.ingest.sinks, vec![CLICKHOUSE_SINK.to_owned()]);
        // The flag wins over the file; both stores can be configured together.
        let args = ServeArgs {
            clickhouse_url: Some("http://flag:8123".to_owned()),
            postgres_url: Some("postgres://m@db/x".to_owned()),
            ..args
        };
        let s = Settings::resolve(&args).expect("resolve");
        assert_eq!(s.clickhouse.expect("configured").url, "http://flag:8123");
        assert_eq!(
            s.ingest.sinks,
            vec![POSTGRES_SINK.to_owned(), CLICKHOUSE_SINK.to_owned()]
        );

        for (bad, reason) in [
            ("database = \"a-b\"", "clickhouse.database"),
            ("batch_rows = 2000000", "at most 1000000"),
            ("batch_rows = 0", "clickhouse.batch_rows"),
            ("batch_period_secs = -1.0", "batch_period_secs"),
            ("retention_days = 30", "retention_days (30)"),
            ("password = \"x\"\npassword_env = \"Y\"", "not both"),
            ("colour = \"red\"", "unknown field"),
        ] {
            let f = file(&format!("[clickhouse]\nurl = \"http://ch:8123\"\n{bad}\n"));
            let args = ServeArgs {
                config: Some(f.path().to_owned()),
                ..ServeArgs::default()
            };
            let err = Settings::resolve(&args).expect_err(bad);
            assert!(err.to_string().contains(reason), "{bad}: {err}");
        }
    }

    #[test]
    fn defaults_need_nothing() {
        let s = Settings::resolve(&ServeArgs::default()).expect("defaults");
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.ingest.data_dir, PathBuf::from("meterd-data"));
        assert_eq!(s.ingest.max_body_bytes, 10 * 1024 * 1024);
    }

    #[test]
    fn flags_beat_the_file() {
        let f = file(
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/from-file\"\nquery_max_rows = 5\n",
        );
        let args = ServeArgs {
            config: Some(f.path().to_owned()),
            listen: Some("127.0.0.1:9100".parse().expect("addr")),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(&args).expect("resolve");
        assert_eq!(s.listen.port(), 9100);
        assert_eq!(s.ingest.data_dir, PathBuf::from("/tmp/from-file"));
        assert_eq!(s.query.max_rows, 5);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let f = file("listn = \"127.0.0.1:9000\"\n");
        let err = Settings::resolve(&ServeArgs {
            config: Some(f.path().to_owned()),
            ..ServeArgs::default()
        })
        .expect_err("typo");
        assert!(err.to_string().contains("listn"), "{err}");
    }

    /// Flag-only settings are not file keys; a missing file is an error, not an empty one.
    #[test]
    fn flag_only_keys_and_missing_files_are_errors() {
        for key in ["config = \"x.toml\"", "postgres_url = \"postgres://x\""] {
            let f = file(&format!("{key}\n"));
            let err = Settings::resolve(&ServeArgs {
                config: Some(f.path().to_owned()),
                ..ServeArgs::default()
            })
            .expect_err(key);
            assert!(err.to_string().contains("unknown field"), "{key}: {err}");
        }
        let err = Settings::resolve(&ServeArgs {
            config: Some(PathBuf::from("/nonexistent/meterd.toml")),
            ..ServeArgs::default()
        })
        .expect_err("missing file");
        assert!(
            err.to_string().contains("/nonexistent/meterd.toml"),
            "{err}"
        );
        // The URL flag wins over `[postgres] url`, and the table's other keys stay.
        let f = file("[postgres]\nurl = \"postgres://file/db\"\nbatch_rows = 7\n");
        let s = Settings::resolve(&ServeArgs {
            config: Some(f.path().to_owned()),
            postgres_url: Some("postgres://flag/db".to_owned()),
            ..ServeArgs::default()
        })
        .expect("resolve");
        let pg = s.postgres.expect("postgres");
        assert_eq!((pg.url.as_str(), pg.batch_rows), ("postgres://flag/db", 7));
    }

    #[test]
    fn non_loopback_needs_api_keys() {
        let args = ServeArgs {
            listen: Some("0.0.0.0:8080".parse().expect("addr")),
            ..ServeArgs::default()
        };
        assert!(
            Settings::resolve(&args)
                .expect_err("open to the world")
                .to_string()
                .contains("API keys")
        );
        let f = file(
            "[[api_keys]]\nname = \"ingest\"\nkey = \"0123456789abcdef0123\"\ntenant = \"acme\"\nscopes = [\"ingest\"]\n",
        );
        let args = ServeArgs {
            config: Some(f.path().to_owned()),
            ..args
        };
        let s = Settings::resolve(&args).expect("with a key");
        assert_eq!(s.api_keys[0].tenant.as_deref(), Some("acme"));
        assert_eq!(s.api_keys[0].scopes, vec![Scope::Ingest]);
    }

    #[test]
    fn tenant_bound_keys_cannot_query() {
        let f = file(
            "[[api_keys]]\nname = \"bot\"\nkey = \"0123456789abcdef0123\"\ntenant = \"acme\"\n",
        );
        let err = Settings::resolve(&ServeArgs {
            config: Some(f.path().to_owned()),
            ..ServeArgs::default()
        })
        .expect_err("query scope by default");
        assert!(err.to_string().contains("query scope"), "{err}");
    }

    #[test]
    fn horizon_must_cover_history() {
        let args = ServeArgs {
            dedup_horizon_days: Some(10),
            ..ServeArgs::default()
        };
        assert!(
            Settings::resolve(&args)
                .expect_err("too short")
                .to_string()
                .contains("dedup_horizon_days")
        );
    }
}
