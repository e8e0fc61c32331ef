//! The `events` table: a fresh snapshot of the embedded store at every scan, read as the union
//! of its Parquet files and its not-yet-flushed in-memory batches.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::object_store::ObjectStoreExt;
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path as ObjectPath;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};

use crate::EventsSource;

/// How many Parquet footers' sizes are looked up at once when planning a scan.
const CONCURRENT_FILE_LOOKUPS: usize = 16;

/// `events` as DataFusion sees it.
#[derive(Debug)]
pub(crate) struct EventsTable {
    source: Arc<dyn EventsSource>,
    schema: SchemaRef,
    /// Where the files are read from: the source's root directory under its own URL, so a plan
    /// names a file by its path below the root, or the local file system.
    files: Option<(ObjectStoreUrl, PathBuf)>,
}

/// The URL the embedded store's root directory is registered under.
const ROOT_URL: &str = "meterd://events/";

impl EventsTable {
    /// The table over `source`; registers the source's root directory, if it has one, with
    /// `ctx`'s object stores.
    pub(crate) fn new(source: Arc<dyn EventsSource>, ctx: &SessionContext) -> Result<Self> {
        let files = match source.parquet_root() {
            Some(root) => {
                let url = ObjectStoreUrl::parse(ROOT_URL)?;
                let store = LocalFileSystem::new_with_prefix(&root).map_err(|e| {
                    DataFusionError::External(Box::new(e))
                        .context(format!("the events directory {}", root.display()))
                })?;
                ctx.register_object_store(url.as_ref(), Arc::new(store));
                Some((url, root))
            }
            None => None,
        };
        Ok(Self {
            source,
            schema: meterd_schemas::events_schema(),
            files,
        })
    }

    /// Where `path` is read from: below the root if there is one, else the file system's root.
    fn location(&self, path: &std::path::Path) -> Result<ObjectPath> {
        let located = match &self.files {
            Some((_, root)) => path
                .strip_prefix(root)
                .map_err(|e| DataFusionError::External(Box::new(e)))
                .map(|relative| {
                    ObjectPath::from_iter(
                        relative
                            .iter()
                            .map(|part| part.to_string_lossy().into_owned()),
                    )
                }),
            None => ObjectPath::from_absolute_path(path)
                .map_err(|e| DataFusionError::External(Box::new(e))),
        };
        located.map_err(|e| {
            let shown = match &self.files {
                Some((_, root)) => path.strip_prefix(root).unwrap_or(path),
                None => path,
            };
            e.context(format!("events file {}", shown.display()))
        })
    }

    /// DataFusion's own Parquet scan over the snapshot's files. Filters are not applied here:
    /// they arrive as a `FilterExec` above the union, and DataFusion's physical filter pushdown
    /// moves them through the union into the Parquet source, where they prune row groups by
    /// statistics (and pages, with the page index).
    async fn parquet_scan(
        &self,
        state: &dyn Session,
        files: &[std::path::PathBuf],
        projection: Option<&Vec<usize>>,
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let url = match &self.files {
            Some((url, _)) => url.clone(),
            None => ObjectStoreUrl::local_filesystem(),
        };
        let store = state.runtime_env().object_store(&url)?;
        // The real size and modification time matter: the reader finds the footer from the
        // size, and the footer cache is keyed on both, so a rewritten file is never read with
        // a stale footer.
        let partitioned: Vec<PartitionedFile> = futures::stream::iter(files.to_vec())
            .map(|path| {
                let store = Arc::clone(&store);
                let location = self.location(&path);
                async move {
                    let location = location?;
                    let meta = store.head(&location).await?;
                    Ok::<_, DataFusionError>(PartitionedFile::new_from_meta(meta))
                }
            })
            .buffered(CONCURRENT_FILE_LOOKUPS)
            .try_collect()
            .await?;

        // Footers (and page indexes) come from the runtime's metadata cache, bounded by its
        // size limit, instead of being read again by every query: with a file per day and
        // flush, opening footers was most of a short query's time.
        let metadata_cache = state.runtime_env().cache_manager.get_file_metadata_cache();
        let source = Arc::new(
            ParquetSource::new(Arc::clone(&self.schema)).with_parquet_file_reader_factory(
                Arc::new(CachedParquetFileReaderFactory::new(store, metadata_cache)),
            ),
        );
        let config = FileScanConfigBuilder::new(url, source)
            .with_file_group(FileGroup::new(partitioned))
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }

    /// The in-memory batches, spread over up to `target_partitions` partitions so several
    /// query threads can work on them.
    fn memory_scan(
        &self,
        state: &dyn Session,
        batches: Vec<RecordBatch>,
        projection: Option<&Vec<usize>>,
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let partition_count = state
            .config()
            .target_partitions()
            .clamp(1, batches.len().max(1));
        let mut partitions = vec![Vec::new(); partition_count];
        for (i, batch) in batches.into_iter().enumerate() {
            partitions[i % partition_count].push(batch);
        }
        let source = MemorySourceConfig::try_new(
            &partitions,
            Arc::clone(&self.schema),
            projection.cloned(),
        )?
        .with_limit(limit);
        Ok(DataSourceExec::from_data_source(source))
    }
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Inexact: the Parquet source prunes with them, and DataFusion still filters the rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snapshot = self.source.snapshot();
        let mut inputs = Vec::with_capacity(2);
        if !snapshot.parquet_files.is_empty() {
            inputs.push(
                self.parquet_scan(state, &snapshot.parquet_files, projection, limit)
                    .await?,
            );
        }
        // An empty memory scan also stands in for an empty table.
        if !snapshot.batches.is_empty() || inputs.is_empty() {
            inputs.push(self.memory_scan(state, snapshot.batches, projection, limit)?);
        }
        UnionExec::try_new(inputs)
    }
}
