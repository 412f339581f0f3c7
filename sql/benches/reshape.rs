//! Criterion benches of reshape (`sluice_sql::reshape::reshape`) on 65,536 rows of the seed
//! table `metrics_events`: a batch already in the registered shape (the common case: only
//! checks, no copies), and one a client sent differently (columns in reverse order, text as
//! `large_utf8`, a nullable column missing), which costs casts, a reorder and a null fill.
//! Throughput is in rows. `cargo bench -p sluice-sql --bench reshape`.

use std::hint::black_box;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const ROWS: usize = 65_536;

fn reshape(c: &mut Criterion) {
    let table = sluice_test_support::batches::seed("metrics_events");
    let batch = sluice_test_support::batches::sample(&table, ROWS, 3);

    // The same rows as a client might send them.
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (f, col) in batch.schema().fields().iter().zip(batch.columns()).rev() {
        if f.name() == "trace_id" {
            continue;
        }
        if f.data_type() == &DataType::Utf8 {
            fields.push(Field::new(f.name(), DataType::LargeUtf8, f.is_nullable()));
            columns.push(arrow::compute::cast(col, &DataType::LargeUtf8).expect("cast"));
        } else {
            fields.push(f.as_ref().clone());
            columns.push(col.clone());
        }
    }
    let different = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch");

    let mut group = c.benchmark_group("reshape");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("as_registered/metrics_events", |b| {
        b.iter(|| sluice_sql::reshape::reshape(&table, black_box(&batch)).expect("reshapes"))
    });
    group.bench_function("reordered_cast_missing/metrics_events", |b| {
        b.iter(|| sluice_sql::reshape::reshape(&table, black_box(&different)).expect("reshapes"))
    });
    group.finish();
}

criterion_group!(benches, reshape);
criterion_main!(benches);
