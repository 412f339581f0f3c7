//! Rows a store refuses for good, kept where an operator can find and replay them.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::SinkError;

/// Rows a store refused for good, kept as Parquet beside the archive:
/// `_deadletter/<sink>/<table>/<first seq>-<last seq>.parquet`, with the table's
/// columns plus `_sluice_wal_seq` and `_sluice_error` (the store's message). Writing the
/// same range again replaces the file, so a retried chunk does not duplicate them.
pub struct DeadLetter {
    store: Arc<dyn ObjectStore>,
}

/// One refused row (or run of rows refused with the same error).
pub struct Refused {
    pub seq: u64,
    pub rows: RecordBatch,
    pub error: String,
}

impl DeadLetter {
    /// Dead letters kept in `store` (the archive's object store).
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self { store }
    }

    pub fn path(sink: &str, table: &str, first: u64, last: u64) -> String {
        format!("_deadletter/{sink}/{table}/{first:020}-{last:020}.parquet")
    }

    /// Writes the refused rows of a chunk (if any) and logs where they went; returns how
    /// many rows were dead-lettered.
    pub async fn record(
        &self,
        sink: &str,
        table: &str,
        first: u64,
        last: u64,
        refused: &[Refused],
    ) -> Result<u64, SinkError> {
        if refused.is_empty() {
            return Ok(0);
        }
        let n: u64 = refused.iter().map(|r| r.rows.num_rows() as u64).sum();
        let path = self.write(sink, table, first, last, refused).await?;
        tracing::warn!(sink, %table, rows = n, %path, first_error = %refused[0].error,
            "the store refused rows; they are in the dead-letter file");
        Ok(n)
    }

    /// Writes the refused rows of one chunk; returns the file's path.
    pub async fn write(
        &self,
        sink: &str,
        table: &str,
        first: u64,
        last: u64,
        refused: &[Refused],
    ) -> Result<String, SinkError> {
        let path = Self::path(sink, table, first, last);
        let Some(first_batch) = refused.first() else {
            return Err(SinkError::Unexpected(format!(
                "{path}: no rows to dead-letter"
            )));
        };
        let base = first_batch.rows.schema();
        let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("_sluice_wal_seq", DataType::Int64, false));
        fields.push(Field::new("_sluice_error", DataType::Utf8, false));
        let schema = Arc::new(Schema::new(fields));
        let mut batches = Vec::new();
        for r in refused {
            let n = r.rows.num_rows();
            let mut cols: Vec<ArrayRef> = r.rows.columns().to_vec();
            cols.push(Arc::new(Int64Array::from(vec![r.seq as i64; n])));
            cols.push(Arc::new(StringArray::from(vec![r.error.as_str(); n])));
            batches.push(
                RecordBatch::try_new(schema.clone(), cols)
                    .map_err(|e| SinkError::arrow(format!("dead letters {path}"), e))?,
            );
        }
        let parquet_err = |source| SinkError::Parquet {
            context: format!("dead letters {path}"),
            source,
        };
        let mut w =
            parquet::arrow::ArrowWriter::try_new(Vec::new(), schema, None).map_err(parquet_err)?;
        for b in &batches {
            w.write(b).map_err(parquet_err)?;
        }
        let data = w.into_inner().map_err(parquet_err)?;
        self.store
            .put(&ObjPath::from(path.as_str()), PutPayload::from(data))
            .await
            .map_err(|source| SinkError::ObjectStore {
                context: format!("dead-letter write {path}"),
                source,
            })?;
        Ok(path)
    }
}
