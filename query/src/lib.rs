//! meterd's read-only SQL API: `POST /v1/sql` answers ad-hoc questions about usage with
//! DataFusion over the `events` table, so operators and dashboards can slice events without
//! exporting them first.
//!
//! `events` is read fresh at every query from an [`EventsSource`] (the embedded store's Parquet
//! files plus its not-yet-flushed batches), and the rollups (`usage_hourly`, `usage_daily`) are
//! computed from it. Queries run on their own tokio runtime with a timeout, a memory pool and a
//! row cap, so an expensive question gets a clear 4xx/5xx instead of starving ingest or the
//! process.
//!
//! With PostgreSQL or ClickHouse configured, [`QueryService::with_tables`] serves `events` and
//! the rollup tables from that store instead, through the store's tables built on [`remote`],
//! which push projections, filters and limits into the SQL they send.

mod abandoned;
mod bounded_fns;
mod bounds;
mod budget;
mod checked;
mod coop;
mod error;
mod exact_sum;
mod format;
mod http;
pub mod metrics;
pub mod pushdown;
mod rebatch;
pub mod remote;
mod rollup_table;
mod runtime;
mod sort_keys;
mod statement;
mod table;

use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use futures::StreamExt;

pub use error::{Error, Result};

use budget::ResultBudget;
use format::Format;
use runtime::QueryRuntime;

/// Supplies the current contents of `events` at query time.
pub trait EventsSource: Send + Sync + fmt::Debug + 'static {
    /// A consistent view of the store now: every event is in exactly one of the Parquet files
    /// or the in-memory batches.
    fn snapshot(&self) -> meterd_schemas::EventsSnapshot;

    /// Keeps the files of every snapshot taken from now on readable until dropped. A query
    /// holds one from before it plans until its last batch is read.
    fn pin(&self) -> meterd_schemas::SnapshotPin;

    /// The directory every Parquet file of every snapshot lies under, if there is one. Plans
    /// (`EXPLAIN`) then name files by their paths below it: the SQL API does not tell where the
    /// data directory is.
    fn parquet_root(&self) -> Option<std::path::PathBuf> {
        None
    }
}

/// Limits and resources of the SQL API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryConfig {
    /// How long one request may take, planning, execution and encoding together.
    pub timeout: Duration,
    /// The most rows a result may have; larger results are refused with a 413.
    pub max_rows: usize,
    /// The memory pool shared by all running queries; collected results and encoded
    /// responses count against it too.
    pub memory_limit_bytes: usize,
    /// The largest encoded response; larger answers are refused with a 413.
    pub max_response_bytes: usize,
    /// DataFusion's target partitions, and the worker threads of the dedicated query runtime
    /// (which has one more, see `runtime`).
    pub threads: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_rows: 100_000,
            memory_limit_bytes: 512 * 1024 * 1024,
            max_response_bytes: 256 * 1024 * 1024,
            threads: 1,
        }
    }
}

/// The SQL API: a DataFusion session over `events` on a dedicated runtime.
#[derive(Debug)]
pub struct QueryService {
    engine: Arc<Engine>,
    timeout: Duration,
    metrics: metrics::QueryMetrics,
    /// The embedded store's directory, as given and canonical: never shown in an answer.
    hidden_paths: Vec<String>,
    // Declared last: the runtime is shut down after everything that might still refer to it.
    runtime: QueryRuntime,
}

impl QueryService {
    /// Builds the session (memory pool, `information_schema`, the `events` table and the
    /// rollups computed from it) and starts the query runtime with `config.threads` worker
    /// threads and a spare.
    pub async fn new(source: Arc<dyn EventsSource>, config: QueryConfig) -> Result<Arc<Self>> {
        let (ctx, bounded_functions) = session_context(&config)?;
        ctx.register_table(
            "events",
            Arc::new(table::EventsTable::new(Arc::clone(&source), &ctx).map_err(Error::Setup)?),
        )
        .map_err(Error::Setup)?;
        for rollup in meterd_rollups::ROLLUPS {
            let table = rollup_table::RollupTable::new(&ctx.state(), rollup)
                .await
                .map_err(Error::Setup)?;
            ctx.register_table(rollup.name, Arc::new(table))
                .map_err(Error::Setup)?;
        }
        let hidden_paths = source
            .parquet_root()
            .map(|root| {
                let canonical = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
                // Longest first, so a path inside the other is replaced whole.
                let mut paths = vec![
                    canonical.to_string_lossy().into_owned(),
                    root.to_string_lossy().into_owned(),
                ];
                paths.sort_by_key(|p| std::cmp::Reverse(p.len()));
                paths.dedup();
                paths
            })
            .unwrap_or_default();
        Self::start(ctx, bounded_functions, Some(source), &config, hidden_paths)
    }

    /// The paths an answer must not show.
    pub(crate) fn hidden_paths(&self) -> &[String] {
        &self.hidden_paths
    }

    /// Like [`QueryService::new`], over the relations of an external store (each name with its
    /// table provider, from the store's crate; see [`remote`] for the scan they share).
    pub fn with_tables(
        tables: Vec<(String, Arc<dyn datafusion::catalog::TableProvider>)>,
        config: QueryConfig,
    ) -> Result<Arc<Self>> {
        let (ctx, bounded_functions) = session_context(&config)?;
        for (name, provider) in tables {
            ctx.register_table(name.as_str(), provider)
                .map_err(|source| Error::Table {
                    table: name.clone(),
                    source,
                })?;
        }
        Self::start(ctx, bounded_functions, None, &config, Vec::new())
    }

    /// Starts the query runtime for a session whose tables are registered; `pinned` is the
    /// embedded store whose files each query pins.
    fn start(
        ctx: SessionContext,
        bounded_functions: bounded_fns::BoundedFunctions,
        pinned: Option<Arc<dyn EventsSource>>,
        config: &QueryConfig,
        hidden_paths: Vec<String>,
    ) -> Result<Arc<Self>> {
        let engine = Arc::new(Engine {
            ctx,
            bounded_functions,
            pinned,
            abandoned: Arc::default(),
            timeout: config.timeout,
            max_rows: config.max_rows,
            memory_limit_bytes: config.memory_limit_bytes,
            max_response_bytes: config.max_response_bytes,
        });
        Ok(Arc::new(Self {
            engine,
            timeout: config.timeout,
            metrics: metrics::QueryMetrics::new().map_err(|e| {
                Error::Setup(datafusion::error::DataFusionError::External(Box::new(e)))
            })?,
            hidden_paths,
            runtime: QueryRuntime::new(config.threads.max(1))?,
        }))
    }

    /// The service's Prometheus families (`meterd_sql_*`).
    pub fn metrics_registry(&self) -> &prometheus::Registry {
        self.metrics.registry()
    }

    /// An axum `Router` serving `POST /v1/sql`, with its state applied so the binary can
    /// `.merge()` it.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        http::router(Arc::clone(self))
    }

    /// Runs one read-only statement and returns all its batches, under the same guard, timeout,
    /// memory and row limits as the HTTP API. Must be called from a tokio runtime with time
    /// enabled (the timeout is measured there, not on the possibly busy query runtime).
    pub async fn query(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let sql: Arc<str> = Arc::from(sql);
        self.on_query_runtime(move |engine| {
            let sql = Arc::clone(&sql);
            async move {
                let (schema, batches, _budget) = engine.collect(&sql).await?;
                Ok((schema, batches))
            }
        })
        .await
    }

    /// Runs one statement and encodes its result in `format`, both on the query runtime. The
    /// body holds its share of the memory pool until it is dropped.
    pub(crate) async fn query_encoded(&self, sql: String, format: Format) -> Result<Bytes> {
        let sql: Arc<str> = Arc::from(sql);
        self.on_query_runtime(move |engine| {
            let sql = Arc::clone(&sql);
            async move {
                let (schema, batches, budget) = engine.collect(&sql).await?;
                let mut out = budget::Output::new(
                    &engine.ctx.runtime_env().memory_pool,
                    engine.memory_limit_bytes,
                    engine.max_response_bytes,
                );
                format.encode_into(&schema, &batches, &mut out)?;
                // The rows are in the body now.
                drop((batches, budget));
                Ok(out.into_body())
            }
        })
        .await
    }

    /// Runs `work` on the query runtime within the timeout. On timeout the task is dropped,
    /// which aborts it and drops its DataFusion streams (cancelling their spawned tasks) at its
    /// next yield point. `work` runs again if it was refused memory while an abandoned query
    /// held some (see [`abandoned`]).
    async fn on_query_runtime<T, F, Fut>(&self, work: F) -> Result<T>
    where
        F: Fn(Arc<Engine>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let started = Instant::now();
        let engine = Arc::clone(&self.engine);
        let (running, caller) = engine.abandoned.start();
        let mut task = self.runtime.spawn(async move {
            let _running = running;
            // Twice at most: a query too large for the pool is refused, not run again and again.
            let mut retries = 2;
            loop {
                let mark = engine.abandoned.mark();
                match work(Arc::clone(&engine)).await {
                    Err(e @ Error::MemoryLimit { .. })
                        if retries > 0 && engine.abandoned.any_since(mark) =>
                    {
                        retries -= 1;
                        tracing::debug!(
                            error = %e,
                            "sql query refused memory while an abandoned query held some; \
                             running it again once that one stops"
                        );
                        engine.abandoned.none_running().await;
                    }
                    outcome => return outcome,
                }
            }
        });
        // Declared after the task, so dropped before it when the caller goes away (a client
        // that disconnects): the query counts as abandoned before it is aborted.
        let caller = caller;
        let outcome = match tokio::time::timeout(self.timeout, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join_error)) => Err(Error::Task(join_error)),
            Err(_elapsed) => {
                // Counted as abandoned before it is aborted, so a task that stops at once is
                // counted and uncounted, never missed.
                drop(caller);
                drop(task);
                Err(Error::Timeout {
                    timeout: self.timeout,
                })
            }
        };
        self.metrics
            .observe(&outcome, started.elapsed().as_secs_f64());
        let elapsed_ms = started.elapsed().as_millis();
        match &outcome {
            Ok(_) => tracing::debug!(elapsed_ms, "sql query answered"),
            Err(e) => tracing::debug!(elapsed_ms, error = %e, "sql query failed"),
        }
        outcome
    }
}

/// A session without tables: memory pool, `information_schema`, `config.threads` partitions and
/// the rule that keeps row-multiplying operators cancellable.
fn session_context(
    config: &QueryConfig,
) -> Result<(SessionContext, bounded_fns::BoundedFunctions)> {
    let threads = config.threads.max(1);
    // How many memory consumers a ResourcesExhausted error names.
    let top_consumers = NonZeroUsize::MIN.saturating_add(4);
    let pool =
        TrackConsumersPool::new(FairSpillPool::new(config.memory_limit_bytes), top_consumers);
    let runtime_env = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(pool))
        .build_arc()
        .map_err(Error::Setup)?;
    let mut session = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(threads);
    // meterd's times are UTC: `now()` is a UTC timestamp like `events.time`, not a zoneless one.
    session.options_mut().execution.time_zone = Some("UTC".to_owned());
    let state = SessionStateBuilder::new()
        .with_config(session)
        .with_runtime_env(runtime_env)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(sort_keys::MaterializeSortKeys))
        .with_physical_optimizer_rule(Arc::new(coop::CooperativeMultipliers))
        .with_physical_optimizer_rule(Arc::new(rebatch::SliceLeafBatches))
        .build();
    let ctx = SessionContext::new_with_state(state);
    // Replaces DataFusion's wrapping `sum` (see exact_sum).
    ctx.register_udaf(exact_sum::exact_sum());
    let bounded_functions = bounded_fns::register(&ctx).map_err(Error::Setup)?;
    // It answers the absolute path of the Parquet file a row came from, which tells a reader
    // of the SQL API where the data directory is and nothing about usage.
    ctx.deregister_udf("input_file_name");
    Ok((ctx, bounded_functions))
}

/// When a query must have finished, checked between the steps that cannot be interrupted.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    /// `None`: the timeout is too long to be represented, so never.
    at: Option<Instant>,
    timeout: Duration,
}

impl Deadline {
    fn new(timeout: Duration) -> Self {
        Self {
            at: Instant::now().checked_add(timeout),
            timeout,
        }
    }

    fn check(self) -> Result<()> {
        if self.at.is_some_and(|at| Instant::now() >= at) {
            return Err(Error::Timeout {
                timeout: self.timeout,
            });
        }
        Ok(())
    }
}

/// What the query task needs; shared with it so the task never owns the runtime it runs on.
struct Engine {
    ctx: SessionContext,
    /// Installed in each query's state with the query's own allowance for constants.
    bounded_functions: bounded_fns::BoundedFunctions,
    /// The embedded store, if the tables read it: every query pins its files.
    pinned: Option<Arc<dyn EventsSource>>,
    /// Queries given up on whose tasks still hold their memory.
    abandoned: Arc<abandoned::Abandoned>,
    timeout: Duration,
    max_rows: usize,
    memory_limit_bytes: usize,
    max_response_bytes: usize,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("session_id", &self.ctx.session_id())
            .field("max_rows", &self.max_rows)
            .field("memory_limit_bytes", &self.memory_limit_bytes)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Parses, guards, plans, executes and collects one statement, stopping as soon as the
    /// result passes the row cap or its memory passes the pool. The deadline is checked between
    /// the steps of planning, so a query that times out while planning does not go on to run.
    async fn collect(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>, ResultBudget)> {
        let deadline = Deadline::new(self.timeout);
        // Held until the last batch is read (or the query is dropped on timeout): a compaction
        // meanwhile must not delete a file this query's scans were planned on.
        let _pin = self.pinned.as_ref().map(|source| source.pin());
        let mut state = self.ctx.state();
        self.bounded_functions
            .install(&mut state, self.memory_limit_bytes)
            .map_err(Error::Setup)?;
        let recursion_limit = state.config().options().sql_parser.recursion_limit.get();
        let statement = statement::parse_read_only(sql, recursion_limit)?;
        deadline.check()?;
        let plan = state
            .statement_to_plan(statement)
            .await
            .map_err(Error::Plan)?;
        // Second guard, on the plan: whatever the statement looked like, it may not define,
        // change or configure anything.
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(Error::Plan)?;
        deadline.check()?;
        let plan = state.optimize(&plan).map_err(|e| self.execution_error(e))?;
        deadline.check()?;
        // Constants are copied into every row of a batch that selects them.
        let batch_size = checked::batch_size_for(&plan, state.config().batch_size());
        state.config_mut().options_mut().execution.batch_size =
            datafusion::config::ConfigNonZeroUsize::try_new(batch_size).map_err(Error::Setup)?;
        let planner = Arc::clone(state.query_planner());
        let physical = planner
            .create_physical_plan(&plan, &state)
            .await
            .map_err(|e| self.execution_error(e))?;
        deadline.check()?;

        let mut stream = execute_stream(physical, Arc::new(TaskContext::from(&state)))
            .map_err(|e| self.execution_error(e))?;
        let schema = stream.schema();
        let budget =
            ResultBudget::new(&self.ctx.runtime_env().memory_pool, self.memory_limit_bytes);
        let mut batches = Vec::new();
        let mut rows = 0usize;
        while let Some(batch) = stream.next().await {
            // A stream that is always ready never yields on its own; spending budget here keeps
            // even a fast producer cancellable at the top.
            tokio::task::coop::consume_budget().await;
            let batch = batch.map_err(|e| self.execution_error(e))?;
            rows = rows.saturating_add(batch.num_rows());
            if rows > self.max_rows {
                return Err(Error::TooManyRows {
                    max_rows: self.max_rows,
                });
            }
            if batch.num_rows() > 0 {
                budget.hold(&batch)?;
                batches.push(batch);
            }
        }
        Ok((schema, batches, budget))
    }

    fn execution_error(&self, e: DataFusionError) -> Error {
        if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) {
            Error::MemoryLimit {
                limit_bytes: self.memory_limit_bytes,
                source: e,
            }
        } else {
            Error::Execute(e)
        }
    }
}
