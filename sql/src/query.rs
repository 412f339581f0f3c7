//! Read-only SQL over each table's recent in-memory buffer plus its archived
//! Parquet files.
//!
//! What flows through here: SQL text comes in from the server, is parsed and
//! checked (only `SELECT`/`WITH`/`VALUES`, `EXPLAIN` of those, `DESCRIBE`,
//! `SHOW TABLES` and `SHOW COLUMNS` pass; DDL, DML, `SET`, `COPY`... are
//! refused), then planned by DataFusion against a catalog whose tables are
//! resolved on demand from a [`SnapshotSource`]. When a query names a table,
//! one [`TableSnapshot`] of it is taken (so every reference to that table in
//! the query sees the same instant) and scanned as the union of
//! 1. the buffered Arrow batches, adapted by column name to the table's
//!    current schema (columns missing from older batches become nulls), and
//! 2. the archived Parquet files, read from the archive object store
//!    (columns missing from files written with an older schema become nulls).
//!
//! The server commits archiving through a manifest, so a row is either in the
//! buffer or in a file of one snapshot, never both; the union does not
//! deduplicate. Arrow record batches flow back out as a stream.

use std::fmt;
use std::sync::Arc;

use arrow::array::{new_null_array, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use async_trait::async_trait;
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, SchemaProvider, Session, TableProvider,
};
use datafusion::common::{project_schema, DataFusionError};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SQLStatement;
use futures::TryStreamExt;
use object_store::{ObjectMeta, ObjectStore};

use crate::limits::{
    check_statement, check_text, guard_plan, install_guards, QueryGuard, QueryLimits, QueryMemory,
    QueryPool, Stopped,
};

/// A consistent view of one table at one instant.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    /// The table's current registered Arrow schema.
    pub schema: SchemaRef,
    /// Recent rows not yet archived. A batch may carry an older schema
    /// version (a subset of the columns, possibly in another order); it is
    /// adapted by column name to `schema`, missing columns become nulls.
    pub batches: Vec<RecordBatch>,
    /// Parquet files in the archive store. Files written with an older
    /// schema version lack newer (nullable) columns; those read as nulls.
    pub files: Vec<ArchivedFile>,
}

/// One archived Parquet file, addressed relative to the archive store's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedFile {
    pub path: object_store::path::Path,
    /// Size in bytes (lets the reader fetch the footer without a HEAD request).
    pub size: u64,
}

/// Implemented by the server: the tables that exist and an atomic snapshot of each.
pub trait SnapshotSource: Send + Sync + 'static {
    fn table_names(&self) -> Vec<String>;
    fn snapshot(&self, table: &str) -> Option<TableSnapshot>;
}

/// Errors returned by [`QueryEngine`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    /// The query is the caller's fault: bad SQL, unknown table or column,
    /// type errors, refused (non read-only) statement.
    #[error("{0}")]
    InvalidArgument(String),
    /// Memory or another resource limit was hit while running the query.
    #[error("resources exhausted: {0}")]
    ResourcesExhausted(String),
    /// Stopped from outside: its time limit passed or its client went away.
    #[error("{0}")]
    Stopped(String),
    /// Anything else (I/O, object store, corrupt file, bug).
    #[error("internal query error: {0}")]
    Internal(String),
}

impl QueryError {
    /// True when the error is caused by the query itself (maps to
    /// InvalidArgument / HTTP 400), false for server-side failures.
    pub fn is_user_error(&self) -> bool {
        matches!(self, QueryError::InvalidArgument(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorClass {
    User,
    Exhausted,
    Internal,
}

fn classify(e: &DataFusionError) -> ErrorClass {
    match e.find_root() {
        DataFusionError::SQL(..)
        | DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Configuration(_) => ErrorClass::User,
        DataFusionError::ArrowError(a, _) => match a.as_ref() {
            ArrowError::DivideByZero
            | ArrowError::CastError(_)
            | ArrowError::ParseError(_)
            | ArrowError::InvalidArgumentError(_)
            | ArrowError::ArithmeticOverflow(_) => ErrorClass::User,
            _ => ErrorClass::Internal,
        },
        DataFusionError::ResourcesExhausted(_) => ErrorClass::Exhausted,
        DataFusionError::Collection(errs) => {
            errs.first().map(classify).unwrap_or(ErrorClass::Internal)
        }
        DataFusionError::Shared(inner) => classify(inner),
        _ => ErrorClass::Internal,
    }
}

/// The [`Stopped`] inside `e`, if a [`QueryGuard`] stopped the query.
fn stopped(e: &DataFusionError) -> Option<&Stopped> {
    match e {
        DataFusionError::External(inner) => inner.downcast_ref::<Stopped>(),
        DataFusionError::Shared(inner) => stopped(inner),
        DataFusionError::Context(_, inner) => stopped(inner),
        DataFusionError::Diagnostic(_, inner) => stopped(inner),
        _ => None,
    }
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        if let Some(s) = stopped(&e).or_else(|| stopped(e.find_root())) {
            return QueryError::Stopped(s.0.clone());
        }
        if let DataFusionError::SQL(inner, _) = e.find_root() {
            if matches!(
                inner.as_ref(),
                datafusion::sql::sqlparser::parser::ParserError::RecursionLimitExceeded
            ) {
                return QueryError::InvalidArgument(
                    "the query nests parentheses, subqueries or function calls deeper than \
                     the SQL parser takes (50 levels)"
                        .into(),
                );
            }
        }
        match classify(&e) {
            // The innermost DataFusion error is what the user needs to see
            // (e.g. the cast that failed, not the optimizer rule that ran it).
            ErrorClass::User => QueryError::InvalidArgument(e.find_root().strip_backtrace()),
            ErrorClass::Exhausted => QueryError::ResourcesExhausted(e.strip_backtrace()),
            ErrorClass::Internal => QueryError::Internal(e.strip_backtrace()),
        }
    }
}

/// Key under which the archive store is registered in DataFusion's object
/// store registry. It is only a lookup key: file locations are handed to the
/// store as they are, i.e. relative to the store's root, whatever the store is.
const ARCHIVE_STORE_URL: &str = "sluice-archive://archive/";

/// Plans and runs read-only SQL over the tables of a [`SnapshotSource`].
///
/// One DataFusion context is shared by all queries (so the Parquet metadata
/// cache survives between them); tables are not registered up front but
/// looked up in the source whenever a query names them.
pub struct QueryEngine {
    ctx: SessionContext,
    store_url: url::Url,
    limits: QueryLimits,
    memory: Arc<QueryMemory>,
}

impl fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryEngine")
            .field("store_url", &self.store_url.as_str())
            .finish_non_exhaustive()
    }
}

impl QueryEngine {
    /// `store` is the archive object store; [`ArchivedFile::path`]s are
    /// relative to its root. `store_url` is where that root lives
    /// (`file:///abs/dir/`, `s3://bucket/prefix/`); it is kept for
    /// diagnostics only, files are always read through `store`.
    pub fn new(
        source: Arc<dyn SnapshotSource>,
        store: Arc<dyn ObjectStore>,
        store_url: url::Url,
    ) -> Self {
        Self::with_config(
            source,
            store,
            store_url,
            SessionConfig::new(),
            QueryLimits::default(),
        )
    }

    /// Like [`QueryEngine::new`] with a custom DataFusion session config
    /// (e.g. target partitions, batch size). Catalog settings are overridden.
    pub fn with_config(
        source: Arc<dyn SnapshotSource>,
        store: Arc<dyn ObjectStore>,
        store_url: url::Url,
        config: SessionConfig,
        limits: QueryLimits,
    ) -> Self {
        let config = config
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true);
        let catalog_name = config.options().catalog.default_catalog.clone();
        let schema_name = config.options().catalog.default_schema.clone();
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_disk_manager_builder(
                datafusion::execution::disk_manager::DiskManagerBuilder::default()
                    .with_max_temp_directory_size(limits.max_spill),
            )
            .build_arc()
            .expect("the default disk manager builds");
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        install_guards(&ctx, limits.memory_per_query);

        let archive_url =
            ObjectStoreUrl::parse(ARCHIVE_STORE_URL).expect("static archive url is valid");
        ctx.runtime_env()
            .register_object_store(archive_url.as_ref(), store);

        let catalog = MemoryCatalogProvider::new();
        catalog
            .register_schema(
                &schema_name,
                Arc::new(SnapshotSchemaProvider {
                    source,
                    archive_url,
                }),
            )
            .expect("memory catalog accepts schemas");
        ctx.register_catalog(catalog_name, Arc::new(catalog));

        let memory = QueryMemory::new(limits.memory_total);
        Self {
            ctx,
            store_url,
            limits,
            memory,
        }
    }

    /// The limits every query runs under.
    pub fn limits(&self) -> &QueryLimits {
        &self.limits
    }

    /// Memory the running queries' operators hold now.
    pub fn memory_used(&self) -> usize {
        self.memory.used()
    }

    /// The archive root this engine was created with.
    pub fn store_url(&self) -> &url::Url {
        &self.store_url
    }

    /// Plans and runs a read-only query. DDL, DML and statements like
    /// SET/COPY are refused with [`QueryError::InvalidArgument`].
    ///
    /// Errors that happen while the returned stream is consumed come out of
    /// the stream as `DataFusionError`s (convert with `QueryError::from`).
    pub async fn sql(
        &self,
        query: &str,
    ) -> Result<(SchemaRef, SendableRecordBatchStream), QueryError> {
        self.sql_guarded(query, QueryGuard::new(None)).await
    }

    /// [`QueryEngine::sql`] under `guard`: every operator of the plan checks it at every
    /// batch, so the query stops within a batch of its deadline or its cancellation.
    pub async fn sql_guarded(
        &self,
        query: &str,
        guard: Arc<QueryGuard>,
    ) -> Result<(SchemaRef, SendableRecordBatchStream), QueryError> {
        check_text(query, &self.limits)?;
        // Each query reserves from its own pool, over the pool all queries share.
        let mut runtime = (*self.ctx.runtime_env()).clone();
        runtime.memory_pool = Arc::new(QueryPool::new(
            self.memory.clone(),
            self.limits.memory_per_query,
        ));
        let state = SessionStateBuilder::new_from_existing(self.ctx.state())
            .with_runtime_env(Arc::new(runtime))
            .build();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(query, &dialect)?;
        check_statement(&statement, &self.limits)?;
        check_read_only(&statement)?;
        let plan = state.statement_to_plan(statement).await?;
        // Defence in depth: e.g. `SELECT ... INTO t` parses as a query but
        // plans as DDL.
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| refused(&e.message()))?;
        let physical = state.create_physical_plan(&plan).await?;
        let physical = guard_plan(physical, &guard)?;
        let stream = datafusion::physical_plan::execute_stream(physical, state.task_ctx())?;
        Ok((stream.schema(), stream))
    }

    /// Like [`QueryEngine::sql`] but collects all result batches.
    pub async fn sql_collect(
        &self,
        query: &str,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        let (schema, stream) = self.sql(query).await?;
        let batches = stream.try_collect::<Vec<_>>().await?;
        Ok((schema, batches))
    }
}

fn refused(what: &str) -> QueryError {
    QueryError::InvalidArgument(format!(
        "statement not allowed: only read-only queries (SELECT, WITH, VALUES, EXPLAIN, \
         DESCRIBE, SHOW TABLES, SHOW COLUMNS) are accepted, got {what}"
    ))
}

/// Leading upper-case keywords of a statement's canonical text, e.g.
/// `CREATE TABLE`, `INSERT INTO`, `SET`.
fn statement_kind(statement: &impl fmt::Display) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text
        .split_whitespace()
        .take_while(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .take(3)
        .collect();
    if words.is_empty() {
        "this statement".to_string()
    } else {
        words.join(" ")
    }
}

fn check_read_only(statement: &DFStatement) -> Result<(), QueryError> {
    match statement {
        DFStatement::Statement(s) => check_sql_read_only(s),
        DFStatement::Explain(explain) => check_read_only(&explain.statement),
        other => Err(refused(&statement_kind(other))),
    }
}

fn check_sql_read_only(statement: &SQLStatement) -> Result<(), QueryError> {
    match statement {
        SQLStatement::Query(_)
        | SQLStatement::ShowTables { .. }
        | SQLStatement::ShowColumns { .. }
        | SQLStatement::ExplainTable { .. } => Ok(()),
        SQLStatement::Explain { statement, .. } => check_sql_read_only(statement),
        other => Err(refused(&statement_kind(other))),
    }
}

/// The default schema of the engine's catalog: resolves table names through
/// the [`SnapshotSource`] at planning time.
struct SnapshotSchemaProvider {
    source: Arc<dyn SnapshotSource>,
    archive_url: ObjectStoreUrl,
}

impl fmt::Debug for SnapshotSchemaProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotSchemaProvider")
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SchemaProvider for SnapshotSchemaProvider {
    fn table_names(&self) -> Vec<String> {
        self.source.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Ok(self.source.snapshot(name).map(|snapshot| {
            Arc::new(SnapshotTable {
                name: name.to_string(),
                snapshot,
                archive_url: self.archive_url.clone(),
            }) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.source.table_names().iter().any(|n| n == name)
    }
}

/// One table as of one snapshot: buffered batches ∪ archived Parquet files.
struct SnapshotTable {
    name: String,
    snapshot: TableSnapshot,
    archive_url: ObjectStoreUrl,
}

impl fmt::Debug for SnapshotTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotTable")
            .field("name", &self.name)
            .field("batches", &self.snapshot.batches.len())
            .field("files", &self.snapshot.files.len())
            .finish()
    }
}

#[async_trait]
impl TableProvider for SnapshotTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.snapshot.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>, DataFusionError> {
        // DataFusion keeps a filter above the scan; the physical optimizer
        // additionally pushes it into the Parquet scan for row group pruning.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let schema = self.schema();
        let target_partitions = state.config().target_partitions().max(1);
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::with_capacity(2);

        // (1) Buffered batches, adapted to the current schema.
        let batches = self
            .snapshot
            .batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| adapt_batch(b, &schema))
            .collect::<Result<Vec<_>, _>>()?;
        if !batches.is_empty() {
            let n = target_partitions.min(batches.len());
            let mut partitions = vec![Vec::new(); n];
            for (i, batch) in batches.into_iter().enumerate() {
                partitions[i % n].push(batch);
            }
            let source =
                MemorySourceConfig::try_new(&partitions, Arc::clone(&schema), projection.cloned())?
                    .with_limit(limit);
            inputs.push(DataSourceExec::from_data_source(source));
        }

        // (2) Archived Parquet files; the default expression adapter fills
        // columns missing from older files with nulls.
        if !self.snapshot.files.is_empty() {
            let format =
                ParquetFormat::default().with_options(state.default_table_options().parquet);
            let file_source = format.file_source(TableSchema::from(Arc::clone(&schema)));
            let files = self
                .snapshot
                .files
                .iter()
                .map(|f| {
                    PartitionedFile::new_from_meta(ObjectMeta {
                        location: f.path.clone(),
                        last_modified: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
                        size: f.size,
                        e_tag: None,
                        version: None,
                    })
                })
                .collect::<Vec<_>>();
            let groups = FileGroup::new(files).split_files(target_partitions);
            let config = FileScanConfigBuilder::new(self.archive_url.clone(), file_source)
                .with_file_groups(groups)
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            inputs.push(format.create_physical_plan(state, config).await?);
        }

        if inputs.is_empty() {
            let projected = project_schema(&schema, projection)?;
            return Ok(Arc::new(EmptyExec::new(projected)));
        }
        UnionExec::try_new(inputs)
    }
}

/// Adapts a batch of an older schema version to `target` (columns are only ever added,
/// nullable): columns are matched by name, missing ones become all-null, extra ones are
/// dropped, differing types are cast. Used for buffered batches here and by the archive
/// before it writes a file.
pub fn adapt_batch(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema_ref() == target {
        return Ok(batch.clone());
    }
    let rows = batch.num_rows();
    let columns = target
        .fields()
        .iter()
        .map(|field| -> Result<ArrayRef, ArrowError> {
            match batch.column_by_name(field.name()) {
                Some(col) if col.data_type() == field.data_type() => Ok(Arc::clone(col)),
                Some(col) => cast(col, field.data_type()),
                None => Ok(new_null_array(field.data_type(), rows)),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(rows));
    RecordBatch::try_new_with_options(Arc::clone(target), columns, &options).map_err(|e| {
        ArrowError::SchemaError(format!(
            "a batch of an older schema version cannot be adapted to the table schema: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::{Path as FsPath, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use arrow::array::{Array, Int64Array, StringArray, TimestampMicrosecondArray, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use object_store::local::LocalFileSystem;
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;

    /// Temp dir removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "sluice-query-test-{}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst),
                nanos
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Default)]
    struct TestSource {
        tables: Mutex<HashMap<String, TableSnapshot>>,
    }
    impl SnapshotSource for TestSource {
        fn table_names(&self) -> Vec<String> {
            let mut names: Vec<_> = self.tables.lock().unwrap().keys().cloned().collect();
            names.sort();
            names
        }
        fn snapshot(&self, table: &str) -> Option<TableSnapshot> {
            self.tables.lock().unwrap().get(table).cloned()
        }
    }

    fn ts_type() -> DataType {
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    }

    /// v1: ts, service, latency_ms
    fn schema_v1() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("ts", ts_type(), false),
            Field::new("service", DataType::Utf8, false),
            Field::new("latency_ms", DataType::Int64, true),
        ]))
    }

    /// v2 adds nullable `region`.
    fn schema_v2() -> SchemaRef {
        let mut fields: Vec<Field> = schema_v1()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("region", DataType::Utf8, true));
        Arc::new(Schema::new(fields))
    }

    const SEC: i64 = 1_000_000;
    /// 2024-01-01T00:00:00Z in microseconds.
    const T0: i64 = 1_704_067_200 * SEC;

    fn ts_array(secs: &[i64]) -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from(secs.iter().map(|s| T0 + s * SEC).collect::<Vec<_>>())
                .with_timezone("UTC"),
        )
    }

    fn batch_v1(secs: &[i64], services: &[&str], latency: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            schema_v1(),
            vec![
                ts_array(secs),
                Arc::new(StringArray::from(services.to_vec())),
                Arc::new(Int64Array::from(latency.to_vec())),
            ],
        )
        .unwrap()
    }

    fn batch_v2(secs: &[i64], services: &[&str], latency: &[i64], regions: &[&str]) -> RecordBatch {
        RecordBatch::try_new(
            schema_v2(),
            vec![
                ts_array(secs),
                Arc::new(StringArray::from(services.to_vec())),
                Arc::new(Int64Array::from(latency.to_vec())),
                Arc::new(StringArray::from(regions.to_vec())),
            ],
        )
        .unwrap()
    }

    fn write_parquet(root: &FsPath, rel: &str, batch: &RecordBatch) -> ArchivedFile {
        let full = root.join(rel);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        let file = std::fs::File::create(&full).unwrap();
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
        ArchivedFile {
            path: object_store::path::Path::from(rel),
            size: std::fs::metadata(&full).unwrap().len(),
        }
    }

    struct Fixture {
        _dir: TempDir,
        engine: QueryEngine,
    }

    /// `logs_events`: 8 rows, latency 10..=80 (sum 360):
    /// - file (v1): ts 0..3, services a,b,a, latency 10,20,30
    /// - file (v2): ts 3..5, services b,c, latency 40,50, region eu,us
    /// - batch (v1): ts 5..7, services a,c, latency 60,70
    /// - batch (v2, columns reordered): ts 7, service b, latency 80, region eu
    ///
    /// `empty_table`: no batches, no files.
    fn fixture() -> Fixture {
        let dir = TempDir::new();
        let f1 = write_parquet(
            &dir.0,
            "logs_events/2024/part-0001.parquet",
            &batch_v1(&[0, 1, 2], &["a", "b", "a"], &[10, 20, 30]),
        );
        let f2 = write_parquet(
            &dir.0,
            "logs_events/2024/part-0002.parquet",
            &batch_v2(&[3, 4], &["b", "c"], &[40, 50], &["eu", "us"]),
        );
        let b1 = batch_v1(&[5, 6], &["a", "c"], &[60, 70]);
        let b2 = {
            let b = batch_v2(&[7], &["b"], &[80], &["eu"]);
            // reorder columns: region, latency_ms, ts, service
            b.project(&[3, 2, 0, 1]).unwrap()
        };

        let source = TestSource::default();
        source.tables.lock().unwrap().insert(
            "logs_events".into(),
            TableSnapshot {
                schema: schema_v2(),
                batches: vec![b1, b2],
                files: vec![f1, f2],
            },
        );
        source.tables.lock().unwrap().insert(
            "empty_table".into(),
            TableSnapshot {
                schema: schema_v2(),
                batches: vec![],
                files: vec![],
            },
        );

        let store = Arc::new(LocalFileSystem::new_with_prefix(&dir.0).unwrap());
        let url = url::Url::from_directory_path(&dir.0).unwrap();
        let engine = QueryEngine::new(Arc::new(source), store, url);
        Fixture { _dir: dir, engine }
    }

    async fn collect(engine: &QueryEngine, sql: &str) -> Vec<RecordBatch> {
        match engine.sql_collect(sql).await {
            Ok((_, batches)) => batches,
            Err(e) => panic!("query {sql:?} failed: {e}"),
        }
    }

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(|b| b.num_rows()).sum()
    }

    /// Single scalar i64 (count/sum) result.
    async fn scalar_i64(engine: &QueryEngine, sql: &str) -> i64 {
        let batches = collect(engine, sql).await;
        assert_eq!(rows(&batches), 1, "{sql}");
        let b = batches.iter().find(|b| b.num_rows() > 0).unwrap();
        let col = b.column(0);
        if let Some(a) = col.as_any().downcast_ref::<Int64Array>() {
            a.value(0)
        } else if let Some(a) = col.as_any().downcast_ref::<UInt64Array>() {
            a.value(0) as i64
        } else {
            panic!("unexpected type {:?} for {sql}", col.data_type())
        }
    }

    fn int_column(batches: &[RecordBatch], idx: usize) -> Vec<Option<i64>> {
        batches
            .iter()
            .flat_map(|b| {
                let a = b.column(idx).as_any().downcast_ref::<Int64Array>().unwrap();
                (0..a.len())
                    .map(|i| a.is_valid(i).then(|| a.value(i)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn str_column(batches: &[RecordBatch], idx: usize) -> Vec<Option<String>> {
        batches
            .iter()
            .flat_map(|b| {
                let col = arrow::compute::cast(b.column(idx), &DataType::Utf8).unwrap();
                let a = col.as_any().downcast_ref::<StringArray>().unwrap().clone();
                (0..a.len())
                    .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[tokio::test]
    async fn count_sums_buffer_and_files() {
        let f = fixture();
        assert_eq!(
            scalar_i64(&f.engine, "SELECT count(*) FROM logs_events").await,
            8
        );
        assert_eq!(
            scalar_i64(&f.engine, "SELECT count(*) FROM \"logs_events\"").await,
            8
        );
        assert_eq!(
            scalar_i64(
                &f.engine,
                "SELECT count(*) FROM datafusion.public.logs_events"
            )
            .await,
            8
        );
        assert_eq!(
            scalar_i64(&f.engine, "SELECT sum(latency_ms) FROM logs_events").await,
            360
        );
        assert_eq!(
            scalar_i64(
                &f.engine,
                "SELECT count(*) FROM logs_events WHERE latency_ms > 35"
            )
            .await,
            5
        );
    }

    #[tokio::test]
    async fn where_filter_and_projection() {
        let f = fixture();
        let batches = collect(
            &f.engine,
            "SELECT latency_ms FROM logs_events WHERE service = 'a' ORDER BY latency_ms",
        )
        .await;
        assert_eq!(batches[0].num_columns(), 1);
        assert_eq!(int_column(&batches, 0), vec![Some(10), Some(30), Some(60)]);

        let (schema, batches) = f
            .engine
            .sql_collect("SELECT service FROM logs_events")
            .await
            .unwrap();
        assert_eq!(schema.fields().len(), 1);
        assert_eq!(schema.field(0).name(), "service");
        let mut services: Vec<_> = str_column(&batches, 0)
            .into_iter()
            .map(Option::unwrap)
            .collect();
        services.sort();
        assert_eq!(services, vec!["a", "a", "a", "b", "b", "b", "c", "c"]);
    }

    #[tokio::test]
    async fn order_by_and_limit() {
        let f = fixture();
        let batches = collect(
            &f.engine,
            "SELECT latency_ms, service FROM logs_events ORDER BY latency_ms DESC LIMIT 3",
        )
        .await;
        assert_eq!(int_column(&batches, 0), vec![Some(80), Some(70), Some(60)]);
        assert_eq!(
            str_column(&batches, 1),
            vec![Some("b".into()), Some("c".into()), Some("a".into())]
        );

        let batches = collect(&f.engine, "SELECT * FROM logs_events LIMIT 3").await;
        assert_eq!(rows(&batches), 3);
        let batches = collect(&f.engine, "SELECT * FROM logs_events LIMIT 100").await;
        assert_eq!(rows(&batches), 8);
    }

    #[tokio::test]
    async fn older_schema_versions_read_as_nulls() {
        let f = fixture();
        // Rows from the v1 file (10,20,30) and the v1 batch (60,70) have no region.
        let batches = collect(
            &f.engine,
            "SELECT latency_ms, region FROM logs_events ORDER BY latency_ms",
        )
        .await;
        assert_eq!(
            int_column(&batches, 0),
            (1..=8).map(|i| Some(i * 10)).collect::<Vec<_>>()
        );
        assert_eq!(
            str_column(&batches, 1),
            vec![
                None,
                None,
                None,
                Some("eu".into()),
                Some("us".into()),
                None,
                None,
                Some("eu".into())
            ]
        );
        assert_eq!(
            scalar_i64(
                &f.engine,
                "SELECT count(*) FROM logs_events WHERE region IS NULL"
            )
            .await,
            5
        );
        assert_eq!(
            scalar_i64(
                &f.engine,
                "SELECT sum(latency_ms) FROM logs_events WHERE region = 'eu'"
            )
            .await,
            120
        );
        // All columns, full schema, from every source.
        let (schema, batches) = f
            .engine
            .sql_collect("SELECT * FROM logs_events")
            .await
            .unwrap();
        assert_eq!(
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>(),
            vec!["ts", "service", "latency_ms", "region"]
        );
        assert_eq!(rows(&batches), 8);
    }

    #[tokio::test]
    async fn timestamp_column() {
        let f = fixture();
        let (schema, batches) = f
            .engine
            .sql_collect("SELECT max(ts) AS m, min(ts) AS n FROM logs_events")
            .await
            .unwrap();
        assert_eq!(schema.field(0).data_type(), &ts_type());
        let b = &batches[0];
        let max = b
            .column(0)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        let min = b
            .column(1)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        assert_eq!(max.value(0), T0 + 7 * SEC);
        assert_eq!(min.value(0), T0);
        assert_eq!(
            scalar_i64(
                &f.engine,
                "SELECT count(*) FROM logs_events WHERE ts >= TIMESTAMP '2024-01-01T00:00:03Z'"
            )
            .await,
            5
        );
    }

    #[tokio::test]
    async fn empty_table() {
        let f = fixture();
        assert_eq!(
            scalar_i64(&f.engine, "SELECT count(*) FROM empty_table").await,
            0
        );
        let (schema, batches) = f
            .engine
            .sql_collect("SELECT * FROM empty_table")
            .await
            .unwrap();
        assert_eq!(schema.fields().len(), 4);
        assert_eq!(rows(&batches), 0);
    }

    #[tokio::test]
    async fn show_tables_and_describe() {
        let f = fixture();
        let batches = collect(&f.engine, "SHOW TABLES").await;
        let all = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(all.contains("logs_events"), "{all}");
        assert!(all.contains("empty_table"), "{all}");
        let batches = collect(&f.engine, "DESCRIBE logs_events").await;
        assert_eq!(rows(&batches), 4);
        let batches = collect(&f.engine, "EXPLAIN SELECT count(*) FROM logs_events").await;
        assert!(rows(&batches) > 0);
    }

    fn assert_user_error(res: Result<(SchemaRef, Vec<RecordBatch>), QueryError>, needle: &str) {
        match res {
            Ok(_) => panic!("expected an error containing {needle:?}"),
            Err(e) => {
                assert!(e.is_user_error(), "not a user error: {e:?}");
                assert!(
                    e.to_string()
                        .to_lowercase()
                        .contains(&needle.to_lowercase()),
                    "{e} does not mention {needle:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn refuses_ddl_dml_and_statements() {
        let f = fixture();
        for (sql, needle) in [
            ("CREATE TABLE x AS SELECT 1", "CREATE TABLE"),
            (
                "INSERT INTO logs_events VALUES (now(), 'a', 1, 'eu')",
                "INSERT INTO",
            ),
            ("DROP TABLE logs_events", "DROP TABLE"),
            ("DELETE FROM logs_events", "DELETE"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            (
                "COPY (SELECT 1) TO '/tmp/sluice-should-not-exist.parquet'",
                "COPY",
            ),
            (
                "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/tmp/'",
                "CREATE EXTERNAL TABLE",
            ),
            ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
            ("EXPLAIN DROP TABLE logs_events", "DROP TABLE"),
            ("SELECT 1 INTO newtab", "not allowed"),
        ] {
            let res = f.engine.sql_collect(sql).await;
            assert_user_error(res, needle);
        }
        // Nothing was created or dropped.
        assert_eq!(
            scalar_i64(&f.engine, "SELECT count(*) FROM logs_events").await,
            8
        );
        assert_user_error(f.engine.sql_collect("SELECT * FROM x").await, "x");
        assert_user_error(f.engine.sql_collect("SELECT * FROM newtab").await, "newtab");
    }

    #[tokio::test]
    async fn user_errors() {
        let f = fixture();
        assert_user_error(
            f.engine.sql_collect("SELECT * FROM nope_table").await,
            "nope_table",
        );
        assert_user_error(f.engine.sql_collect("SELEC 1").await, "SQL");
        assert_user_error(
            f.engine
                .sql_collect("SELECT no_such_column FROM logs_events")
                .await,
            "no_such_column",
        );
        assert_user_error(f.engine.sql_collect("SELECT 1; SELECT 2").await, "");
    }

    #[tokio::test]
    async fn snapshot_is_taken_per_query() {
        let dir = TempDir::new();
        let source = Arc::new(TestSource::default());
        source.tables.lock().unwrap().insert(
            "t".into(),
            TableSnapshot {
                schema: schema_v1(),
                batches: vec![batch_v1(&[0], &["a"], &[1])],
                files: vec![],
            },
        );
        let store = Arc::new(LocalFileSystem::new_with_prefix(&dir.0).unwrap());
        let engine = QueryEngine::new(
            source.clone(),
            store,
            url::Url::from_directory_path(&dir.0).unwrap(),
        );
        assert_eq!(scalar_i64(&engine, "SELECT count(*) FROM t").await, 1);

        // Archive the row, add a new table with a newer schema.
        let file = write_parquet(&dir.0, "t/1.parquet", &batch_v1(&[0], &["a"], &[1]));
        source.tables.lock().unwrap().insert(
            "t".into(),
            TableSnapshot {
                schema: schema_v2(),
                batches: vec![batch_v1(&[1], &["b"], &[2])],
                files: vec![file],
            },
        );
        assert_eq!(scalar_i64(&engine, "SELECT count(*) FROM t").await, 2);
        assert_eq!(scalar_i64(&engine, "SELECT count(region) FROM t").await, 0);
        // Self-join sees one snapshot.
        assert_eq!(
            scalar_i64(&engine, "SELECT count(*) FROM t a JOIN t b ON a.ts = b.ts").await,
            2
        );
    }

    mod generated {
        //! Deep and wide SQL, generated: whatever the parser takes must never overflow a
        //! stack or crash; it is answered or refused with an error.
        use super::*;
        use proptest::prelude::*;

        /// An expression of `depth` nested levels built from `pick`s, over the columns
        /// of `logs_events`.
        fn nested(depth: usize, picks: &[u8]) -> String {
            let mut e = "latency_ms".to_string();
            for i in 0..depth {
                let p = picks[i % picks.len()];
                e = match p % 10 {
                    0 => format!("{e} + {i}"),
                    1 => format!("({e}) * 2"),
                    2 => format!("abs({e})"),
                    3 => format!("CASE WHEN {e} > {i} THEN {e} ELSE {i} END"),
                    4 => format!("coalesce({e}, {i})"),
                    5 => format!("({e} > {i} AND latency_ms < {i}) IS NOT NULL"),
                    6 => format!("CAST({e} AS BIGINT)"),
                    7 => format!("(SELECT {e})"),
                    8 => format!("{e} - (SELECT max(latency_ms) FROM logs_events)"),
                    _ => format!("length(concat(CAST({e} AS VARCHAR), 'x'))"),
                };
                // Keep the text within the limit the engine refuses beyond anyway.
                if e.len() > 200_000 {
                    break;
                }
            }
            e
        }

        /// A chain of `n` terms joined by `sep` (flat text, deep tree).
        fn chain(n: usize, term: &str, sep: &str) -> String {
            vec![term; n.max(1)].join(sep)
        }

        fn shape() -> impl Strategy<Value = String> {
            prop_oneof![
                (1..400usize, proptest::collection::vec(any::<u8>(), 1..8))
                    .prop_map(|(d, p)| format!("SELECT {} AS v FROM logs_events", nested(d, &p))),
                (1..3000usize).prop_map(|n| format!("SELECT {}", chain(n, "1", " + "))),
                (1..3000usize).prop_map(|n| format!(
                    "SELECT count(*) FROM logs_events WHERE {}",
                    chain(n, "latency_ms > 0", " AND ")
                )),
                (1..3000usize).prop_map(|n| format!(
                    "SELECT count(*) FROM logs_events WHERE {}",
                    chain(n, "service = 'a'", " OR ")
                )),
                (1..1000usize).prop_map(|n| chain(
                    n,
                    "SELECT latency_ms FROM logs_events",
                    " UNION ALL "
                )),
                (1..1000usize).prop_map(|n| format!("SELECT {}", chain(n, "'a'", " || "))),
                (1..5000usize).prop_map(|n| format!(
                    "SELECT count(*) FROM logs_events WHERE latency_ms IN ({})",
                    (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
                )),
                (1..3000usize).prop_map(|n| format!(
                    "SELECT {} FROM logs_events",
                    (0..n)
                        .map(|i| format!("latency_ms + {i} AS c{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                (1..200usize).prop_map(|n| format!("SELECT {}1{}", "(".repeat(n), ")".repeat(n))),
                (1..200usize).prop_map(|n| format!("SELECT {}1{}", "-".repeat(n), "")),
                (1..200usize).prop_map(|n| format!(
                    "WITH {} SELECT count(*) FROM w{}",
                    (0..n)
                        .map(|i| if i == 0 {
                            "w0 AS (SELECT latency_ms AS x FROM logs_events)".to_string()
                        } else {
                            format!("w{i} AS (SELECT x + 1 AS x FROM w{})", i - 1)
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    n - 1
                )),
            ]
        }

        /// Runs `sql` as the server does: on a thread with the query runtime's stack.
        fn run(engine: Arc<QueryEngine>, sql: String) -> Result<usize, QueryError> {
            std::thread::Builder::new()
                .stack_size(64 << 20)
                .spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(async move {
                            let (_, batches) = engine.sql_collect(&sql).await?;
                            Ok(batches.iter().map(|b| b.num_rows()).sum())
                        })
                })
                .unwrap()
                .join()
                .expect("the query thread does not panic")
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
            #[test]
            fn deep_and_wide_queries_are_answered_or_refused(sql in shape()) {
                let f = fixture();
                let engine = Arc::new(f.engine);
                match run(engine, sql.clone()) {
                    Ok(_) => {}
                    Err(QueryError::InvalidArgument(_) | QueryError::ResourcesExhausted(_)) => {}
                    Err(e) => prop_assert!(false, "{} ...: {}", &sql[..sql.len().min(120)], e),
                }
            }
        }

        #[test]
        fn the_limits_are_where_they_say() {
            let f = fixture();
            let engine = Arc::new(f.engine);
            let depth = QueryLimits::default().max_depth;
            // A chain of n terms nests n - 1 binary operators under the projection.
            assert!(run(
                engine.clone(),
                format!("SELECT {}", chain(depth - 2, "1", " + "))
            )
            .is_ok());
            let e = run(
                engine.clone(),
                format!("SELECT {}", chain(depth + 1, "1", " + ")),
            )
            .unwrap_err();
            assert!(e.to_string().contains("query.max_depth"), "{e}");
            let e = run(engine.clone(), chain(depth + 1, "SELECT 1", " UNION ALL ")).unwrap_err();
            assert!(e.to_string().contains("query.max_depth"), "{e}");
            let e = run(
                engine.clone(),
                format!("SELECT {}", chain(200_000, "1", ",")),
            )
            .unwrap_err();
            assert!(e.to_string().contains("query.max_sql_bytes"), "{e}");
            // Nested calls of names the parser backtracks on: each level doubled the
            // parse time (a generated case of this test kept a thread busy for minutes).
            let nest = |n: usize| format!("SELECT {}1{}", "coalesce(".repeat(n), ")".repeat(n));
            let max = crate::limits::MAX_FUNCTION_NESTING;
            assert_eq!(run(engine.clone(), nest(max)).unwrap(), 1);
            let e = run(engine, nest(max + 1)).unwrap_err();
            assert!(matches!(e, QueryError::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains("nests function calls"), "{e}");
        }
    }
}
