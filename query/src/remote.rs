//! The scan of a relation in an external SQL store, shared by every store: the table provider
//! (schema, which filters go to the store, the `SELECT` of a projection, its filters and limit)
//! and the execution plan that streams the store's answer. A store brings a [`Dialect`]: its
//! columns, how a filter translates exactly, its select list, and how it runs a statement.
//!
//! Only scans go to the store: aggregates and joins run in DataFusion over the scanned rows,
//! where meterd's exactness rules (sums that never wrap, byte-order string comparison,
//! microsecond time bounds) hold whatever the store. docs/architecture.md ("SQL answers") says
//! why not `datafusion-federation`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{internal_datafusion_err, internal_err};
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use tokio::sync::mpsc::Sender;

/// Batches a scan may have fetched ahead of its consumer.
const PREFETCH_BATCHES: usize = 2;

/// What a SQL store brings to a remote scan.
pub trait Dialect: fmt::Debug + Send + Sync + 'static {
    /// A column as the store reads it.
    type Column: fmt::Debug + Clone + Send + Sync + 'static;
    /// What translating filters gathers besides their SQL (PostgreSQL's bind parameters).
    type Params: fmt::Debug + Default + Send + Sync + 'static;

    /// The scan's name in plans (`PostgresScanExec`).
    const EXEC_NAME: &'static str;

    /// A condition selecting exactly the rows `expr` keeps, or `None` if there is none.
    fn predicate(
        columns: &[Self::Column],
        expr: &Expr,
        params: &mut Self::Params,
    ) -> Option<String>;

    /// `SELECT <columns> FROM <relation>`, valid also without columns (for `count(*)`).
    fn select(columns: &[Self::Column], relation: &str) -> String;

    /// The parameters for EXPLAIN (`$1='acme'`), if the store binds any.
    fn params_display(params: &Self::Params) -> Option<String>;

    /// Runs `scan` and sends its rows to `tx`, until the result ends or the receiver is gone.
    fn fetch(
        &self,
        scan: &Scan<Self>,
        tx: &Sender<Result<RecordBatch>>,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// One statement to run: its SQL, parameters, the columns it reads and their schema.
#[derive(Debug)]
pub struct Scan<D: Dialect + ?Sized> {
    pub sql: String,
    pub params: D::Params,
    pub columns: Vec<D::Column>,
    pub schema: SchemaRef,
    pub batch_size: usize,
}

/// A relation of an external store as a DataFusion table.
#[derive(Debug)]
pub struct RemoteTable<D: Dialect> {
    pub dialect: Arc<D>,
    /// The quoted, qualified name.
    pub relation: String,
    pub columns: Arc<[D::Column]>,
    pub schema: SchemaRef,
    pub table_type: TableType,
}

#[async_trait]
impl<D: Dialect> TableProvider for RemoteTable<D> {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        self.table_type
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|filter| {
                if D::predicate(&self.columns, filter, &mut D::Params::default()).is_some() {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Only filters this table called `Exact` arrive here, so each one translates; the
        // limit may then go to the store too, as nothing is filtered after it.
        let mut params = D::Params::default();
        let mut conditions = Vec::with_capacity(filters.len());
        for filter in filters {
            let condition = D::predicate(&self.columns, filter, &mut params).ok_or_else(|| {
                internal_datafusion_err!("filter {filter} was pushed down but does not translate")
            })?;
            conditions.push(condition);
        }
        let indices: Vec<usize> = match projection {
            Some(indices) => indices.clone(),
            None => (0..self.columns.len()).collect(),
        };
        let mut columns = Vec::with_capacity(indices.len());
        for &i in &indices {
            let column = self
                .columns
                .get(i)
                .ok_or_else(|| internal_datafusion_err!("projection index {i} is out of range"))?;
            columns.push(column.clone());
        }
        let mut sql = D::select(&columns, &self.relation);
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        if let Some(limit) = limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        let schema = Arc::new(self.schema.project(&indices)?);
        Ok(Arc::new(RemoteScanExec::new(
            Arc::clone(&self.dialect),
            Scan {
                sql,
                params,
                columns,
                schema,
                batch_size: state.config().batch_size(),
            },
        )))
    }
}

/// Streams the result of one `SELECT` on a store as record batches. Dropping the stream aborts
/// the fetching task, which ends the statement (each dialect says how); the store's own time
/// limit bounds one it is still running.
#[derive(Debug)]
pub struct RemoteScanExec<D: Dialect> {
    dialect: Arc<D>,
    scan: Arc<Scan<D>>,
    properties: Arc<PlanProperties>,
}

impl<D: Dialect> RemoteScanExec<D> {
    fn new(dialect: Arc<D>, scan: Scan<D>) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&scan.schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            dialect,
            scan: Arc::new(scan),
            properties: Arc::new(properties),
        }
    }
}

impl<D: Dialect> DisplayAs for RemoteScanExec<D> {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params = D::params_display(&self.scan.params);
        match t {
            DisplayFormatType::Default | DisplayFormatType::Verbose => {
                write!(f, "{}: sql={}", D::EXEC_NAME, self.scan.sql)?;
                match params {
                    Some(params) => write!(f, ", params=[{params}]"),
                    None => Ok(()),
                }
            }
            DisplayFormatType::TreeRender => {
                write!(f, "sql={}", self.scan.sql)?;
                match params {
                    Some(params) => write!(f, "\nparams=[{params}]"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl<D: Dialect> ExecutionPlan for RemoteScanExec<D> {
    fn name(&self) -> &str {
        D::EXEC_NAME
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            internal_err!("{} has no children", D::EXEC_NAME)
        }
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return internal_err!("{} has one partition, not {}", D::EXEC_NAME, partition + 1);
        }
        let mut builder =
            RecordBatchReceiverStream::builder(Arc::clone(&self.scan.schema), PREFETCH_BATCHES);
        let tx = builder.tx();
        let dialect = Arc::clone(&self.dialect);
        let scan = Arc::clone(&self.scan);
        builder.spawn(async move {
            let result = dialect.fetch(&scan, &tx).await;
            if let Err(e) = &result {
                tracing::debug!(scan = D::EXEC_NAME, error = %e, "remote scan failed");
            }
            result
        });
        Ok(builder.build())
    }
}
