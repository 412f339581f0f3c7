//! Sample batches of a registered table's schema, for benches and tests: every column
//! filled by its Arrow type with values like those observability data has (timestamps a
//! millisecond apart, a few hosts and services, longer messages, JSON objects), the same
//! for the same `rows` and `seed`.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Field, TimeUnit};
use arrow::record_batch::RecordBatch;
use flight_schema::ResolvedTable;

/// A small deterministic generator (xorshift), so a bench measures the same rows each run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: &[&str] = &[
    "request",
    "served",
    "in",
    "ms",
    "upstream",
    "timeout",
    "retrying",
    "user",
    "session",
    "cache",
    "miss",
    "hit",
    "GET",
    "POST",
    "/api/v1/items",
    "status",
    "200",
    "503",
    "db",
];

/// The seed table `name` (`flight_schema::seeds`), validated as version 1.
pub fn seed(name: &str) -> ResolvedTable {
    flight_schema::seeds::seed_tables()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no seed table {name}"))
        .validate(1)
        .expect("seed tables validate")
}

/// `rows` rows of `table`'s current schema. Panics on a column type it cannot fill (a
/// bench or test asking for one should add it here).
pub fn sample(table: &ResolvedTable, rows: usize, seed: u64) -> RecordBatch {
    let schema = table.arrow_schema.clone();
    let mut rng = Rng(seed.max(1));
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| column(f, rows, &mut rng))
        .collect();
    RecordBatch::try_new(schema, columns).expect("sample columns match the schema")
}

fn column(field: &Field, rows: usize, rng: &mut Rng) -> ArrayRef {
    let name = field.name().as_str();
    match field.data_type() {
        DataType::Timestamp(unit, _) => {
            // One row a millisecond, from a fixed instant in 2026.
            let ms = |i: usize| 1_780_000_000_000i64 + i as i64;
            let values = Int64Array::from_iter_values((0..rows).map(|i| match unit {
                TimeUnit::Second => ms(i) / 1_000,
                TimeUnit::Millisecond => ms(i),
                TimeUnit::Microsecond => ms(i) * 1_000,
                TimeUnit::Nanosecond => ms(i) * 1_000_000,
            }));
            arrow::compute::cast(&values, field.data_type()).expect("timestamp cast")
        }
        DataType::Float64 => Arc::new(Float64Array::from_iter_values(
            (0..rows).map(|_| (rng.next() % 100_000) as f64 / 100.0),
        )),
        DataType::Int64 => Arc::new(Int64Array::from_iter_values(
            (0..rows).map(|_| (rng.next() % 1_000_000) as i64),
        )),
        DataType::Int32 => Arc::new(Int32Array::from_iter_values(
            (0..rows).map(|_| (rng.next() % 1_000) as i32),
        )),
        DataType::Boolean => Arc::new(BooleanArray::from_iter(
            (0..rows).map(|_| Some(rng.next().is_multiple_of(2))),
        )),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let mut b = StringBuilder::new();
            for _ in 0..rows {
                b.append_value(text(name, rng));
            }
            let values: StringArray = b.finish();
            arrow::compute::cast(&values, field.data_type()).expect("string cast")
        }
        DataType::Map(..) => {
            // Two labels a row, from a few values each (as `labels` text has them).
            let mut b = arrow::array::MapBuilder::new(
                Some(arrow::array::MapFieldNames {
                    entry: "entries".into(),
                    key: "key".into(),
                    value: "value".into(),
                }),
                StringBuilder::new(),
                StringBuilder::new(),
            );
            for _ in 0..rows {
                let n = rng.next();
                b.keys().append_value("region");
                b.values().append_value(format!("eu-{}", n % 3));
                b.keys().append_value("zone");
                b.values().append_value(format!("{}", n % 7));
                b.append(true).expect("map row");
            }
            let map = b.finish();
            arrow::compute::cast(&map, field.data_type()).expect("map cast")
        }
        other => panic!("sample batches cannot fill column '{name}' of type {other}"),
    }
}

/// A value for a text column, by what its name suggests.
fn text(name: &str, rng: &mut Rng) -> String {
    let n = rng.next();
    match name {
        "host" => format!("host-{:02}", n % 20),
        "app" | "service" => format!("svc-{}", n % 8),
        "level" => ["debug", "info", "warn", "error"][(n % 4) as usize].to_string(),
        "trace_id" | "span_id" => format!("{n:016x}"),
        "labels" => format!(r#"{{"region":"eu-{}","zone":"{}"}}"#, n % 3, n % 7),
        _ => {
            let words = 6 + (n % 10) as usize;
            let mut out = String::new();
            for _ in 0..words {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(WORDS[(rng.next() % WORDS.len() as u64) as usize]);
            }
            out
        }
    }
}
