//! Criterion benches of the store encoders, on the same rows: 65,536 rows of the seed table
//! `metrics_events` (a timestamp, four text tags, JSON labels, a double), encoded as the
//! PostgreSQL binary COPY stream (`postgres::copy::encode_batch`) and as one ClickHouse
//! Native block (`clickhouse::native::encode_block`); and 65,536 rows of `logs_events`
//! encoded as the archive's Parquet file (`archive::encode_partitions`, zstd 3), with
//! Parquet's default dictionaries on every column beside the archive's choice
//! (`archive::plain_columns`: no dictionary for ids, messages, times and numbers).
//! Throughput is in rows; a change to an encoder shows its cost here.
//! `cargo bench -p sluice-sinks --bench encode`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_sinks::archive::{encode_partitions, plain_columns};
use sluice_sinks::clickhouse::native::{ch_type_for, encode_block, ChType};
use sluice_sinks::postgres::copy::{encode_batch, pg_type_for_field, PgType};

const ROWS: usize = 65_536;

fn encoders(c: &mut Criterion) {
    let table = sluice_test_support::batches::seed("metrics_events");
    let batch = sluice_test_support::batches::sample(&table, ROWS, 7);
    let pg_types: Vec<PgType> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| pg_type_for_field(f).expect("a PostgreSQL type for every seed column"))
        .collect();
    let ch_columns: Vec<(String, ChType)> = table
        .definition
        .columns
        .iter()
        .map(|c| {
            let t = ch_type_for(&c.column_type, table.is_nullable(c), c.role);
            (c.name.clone(), t)
        })
        .collect();

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(ROWS as u64));
    let mut out = Vec::with_capacity(32 << 20);
    group.bench_function("postgres_copy/metrics_events", |b| {
        b.iter(|| {
            out.clear();
            encode_batch(black_box(&batch), &pg_types, &mut out).expect("encodes");
            black_box(out.len())
        })
    });
    group.bench_function("clickhouse_native/metrics_events", |b| {
        b.iter(|| {
            out.clear();
            encode_block(black_box(&batch), &ch_columns, &mut out).expect("encodes");
            black_box(out.len())
        })
    });

    let logs = sluice_test_support::batches::seed("logs_events");
    let log_rows = sluice_test_support::batches::sample(&logs, ROWS, 7);
    let plain = plain_columns(&logs);
    for (name, plain) in [("default", Vec::new()), ("plain_columns", plain)] {
        group.bench_function(format!("archive_parquet/logs_events/{name}"), |b| {
            b.iter(|| {
                let files = encode_partitions(
                    black_box(std::slice::from_ref(&log_rows)),
                    &logs.arrow_schema,
                    &logs.time_column,
                    3,
                    1 << 20,
                    &plain,
                )
                .expect("encodes");
                black_box(files.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, encoders);
criterion_main!(benches);
