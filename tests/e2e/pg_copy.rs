//! Round trips of the binary COPY encoder against a real PostgreSQL: random Arrow batches
//! with a column of every [`PgType`] (and every Arrow layout that feeds it) are encoded with
//! `sluice::postgres::copy`, sent with `COPY ... FROM STDIN (FORMAT binary)`, read back with
//! a plain SELECT and compared value by value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Date64Array, Decimal128Array, DictionaryArray,
    FixedSizeBinaryArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array,
    LargeListArray, LargeStringArray, ListBuilder, MapBuilder, RecordBatch, StringArray,
    StringBuilder, StringViewArray, StructArray, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Fields, Float64Type, Int16Type, Schema};
use futures::SinkExt;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use sluice::postgres::copy::{encode_batch, pg_type_for_field, PgType, HEADER, TRAILER};
use sluice::postgres::quote_ident;

use sluice_test_support::pg::{Flavor, PgServer};

/// Microseconds since 1970 of 4714-11-26 BC, two days after PostgreSQL's first timestamp.
const MIN_UNIX_MICROS: i64 = -210_866_803_200_000_000 + 2 * DAY_MICROS;
const DAY_MICROS: i64 = 86_400_000_000;
/// Days since 1970 of PostgreSQL's first and (just past) last date, two days inside.
const MIN_UNIX_DAYS: i32 = -2_440_588 + 2;
const END_UNIX_DAYS: i32 = 2_145_042_906 - 2;

/// One generated row; `None` is NULL.
#[derive(Debug, Clone)]
struct Row {
    b: Option<bool>,
    i2: Option<i16>,
    i4: Option<i32>,
    i8: Option<i64>,
    f4: Option<f32>,
    f8: Option<f64>,
    /// Feeds the Utf8 and Utf8View columns.
    t: Option<String>,
    /// Feeds the LargeUtf8 and dictionary columns.
    t2: Option<String>,
    ts_s: Option<i64>,
    ts_ms: Option<i64>,
    ts_us: Option<i64>,
    ts_ns: Option<i64>,
    d: Option<i32>,
    d64: Option<i64>,
    j: Option<Value>,
    m: Option<Vec<(String, Option<String>)>>,
    st: Option<StructRow>,
    u: Option<[u8; 16]>,
    ta: Option<Vec<Option<String>>>,
    fa: Option<Vec<Option<f64>>>,
}

type StructRow = (Option<i64>, Option<String>, Option<bool>, Option<f64>);

/// A batch's rows, its decimal columns (a random `numeric(p,s)` and a `numeric(38,s38)`),
/// and the slice of it that is sent.
#[derive(Debug, Clone)]
struct Case {
    rows: Vec<Row>,
    precision: u8,
    scale: i8,
    n: Vec<Option<i128>>,
    scale38: i8,
    n38: Vec<Option<i128>>,
    slice: (usize, usize),
}

/// Strings with the characters that break naive encoders, never NUL (PostgreSQL text
/// cannot hold it).
fn text() -> impl Strategy<Value = String> {
    let tricky = prop::sample::select(vec![
        '"', '\\', '\n', '\r', '\t', '\'', ',', '{', '}', '[', ']', ':', ' ', 'é', '€', '𝄞',
        '\u{1}', '\u{1f}', '\u{7f}', '\u{2028}',
    ]);
    vec(
        prop_oneof![
            3 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
            2 => tricky,
        ],
        0..12,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn f32s() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => any::<f32>(),
        1 => prop::sample::select(vec![
            f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, f32::MIN_POSITIVE,
            f32::MAX, f32::MIN, 1e-45,
        ]),
    ]
}

fn f64s() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => any::<f64>(),
        1 => prop::sample::select(vec![
            f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 0.0, f64::MIN_POSITIVE,
            f64::MAX, f64::MIN, 5e-324,
        ]),
    ]
}

/// Floats with short exact decimal forms, for JSON (which goes through `numeric`).
fn json_float() -> impl Strategy<Value = f64> {
    any::<i32>().prop_map(|v| f64::from(v) / 8.0)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        json_float().prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((text(), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn extremes(edges: Vec<i64>, range: std::ops::RangeInclusive<i64>) -> impl Strategy<Value = i64> {
    prop_oneof![1 => prop::sample::select(edges), 4 => range]
}

fn timestamps() -> impl Strategy<Value = (i64, i64, i64, i64)> {
    let max_us = i64::MAX - DAY_MICROS;
    (
        extremes(
            vec![0, -1, MIN_UNIX_MICROS / 1_000_000, max_us / 1_000_000],
            MIN_UNIX_MICROS / 1_000_000..=max_us / 1_000_000,
        ),
        extremes(
            vec![0, -1, MIN_UNIX_MICROS / 1_000, max_us / 1_000],
            MIN_UNIX_MICROS / 1_000..=max_us / 1_000,
        ),
        extremes(
            vec![0, -1, MIN_UNIX_MICROS, max_us],
            MIN_UNIX_MICROS..=max_us,
        ),
        extremes(
            vec![0, -1, -999, -1_000, -1_001, i64::MIN, i64::MAX],
            i64::MIN..=i64::MAX,
        ),
    )
}

fn row() -> impl Strategy<Value = Row> {
    let scalars = (
        option::of(any::<bool>()),
        option::of(any::<i16>()),
        option::of(any::<i32>()),
        option::of(any::<i64>()),
        option::of(f32s()),
        option::of(f64s()),
        option::of(text()),
        option::of(text()),
    );
    let time = (
        timestamps(),
        vec(any::<bool>(), 4),
        option::of(MIN_UNIX_DAYS..END_UNIX_DAYS),
        option::of((MIN_UNIX_DAYS..END_UNIX_DAYS, 0..86_400_000i64)),
    );
    let nested = (
        option::of(json_value()),
        option::of(vec((text(), option::of(text())), 0..4)),
        option::of((
            option::of(any::<i64>()),
            option::of(text()),
            option::of(any::<bool>()),
            option::of(json_float()),
        )),
        option::of(any::<[u8; 16]>()),
        option::of(vec(option::of(text()), 0..5)),
        option::of(vec(option::of(f64s()), 0..5)),
    );
    (scalars, time, nested).prop_map(
        |(
            (b, i2, i4, i8, f4, f8, t, t2),
            ((s, ms, us, ns), present, d, d64),
            (j, m, st, u, ta, fa),
        )| {
            let pick = |k: usize, v: i64| present[k].then_some(v);
            Row {
                b,
                i2,
                i4,
                i8,
                f4,
                f8,
                t,
                t2,
                ts_s: pick(0, s),
                ts_ms: pick(1, ms),
                ts_us: pick(2, us),
                ts_ns: pick(3, ns),
                d,
                d64: d64.map(|(days, ms)| i64::from(days) * 86_400_000 + ms),
                j,
                m,
                st,
                u,
                ta,
                fa,
            }
        },
    )
}

/// Unscaled decimals of at most `precision` digits, with the extremes.
fn decimal(precision: u8) -> impl Strategy<Value = i128> {
    let max = 10i128.pow(u32::from(precision)) - 1;
    prop_oneof![
        1 => prop::sample::select(vec![0, 1, -1, max, -max]),
        2 => (-9_999i128..=9_999).prop_map(move |v| v.clamp(-max, max)),
        3 => -max..=max,
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (1u8..=38, -3i8..=38, 0i8..=38, 0usize..200)
        .prop_flat_map(|(precision, scale, scale38, n)| {
            (
                vec(row(), n),
                Just(precision),
                Just(scale.min(precision as i8)),
                vec(option::of(decimal(precision)), n),
                Just(scale38),
                vec(option::of(decimal(38)), n),
                (0..=n, 0..=n),
            )
        })
        .prop_map(|(rows, precision, scale, n, scale38, n38, (a, b))| Case {
            rows,
            precision,
            scale,
            n,
            scale38,
            n38,
            slice: (a.min(b), a.max(b)),
        })
}

fn json_field(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true).with_metadata(HashMap::from([(
        "ARROW:extension:name".to_string(),
        "arrow.json".to_string(),
    )]))
}

fn struct_fields() -> Fields {
    Fields::from(vec![
        Field::new("i", DataType::Int64, true),
        Field::new("s", DataType::Utf8, true),
        Field::new("b", DataType::Boolean, true),
        Field::new("f", DataType::Float64, true),
        Field::new("n", DataType::Null, true),
    ])
}

/// The batch of all rows (`rid` is the row index), every column nullable.
fn build_batch(case: &Case) -> RecordBatch {
    let rows = &case.rows;
    let col = |f: &dyn Fn(&Row) -> Option<i64>| rows.iter().map(f).collect::<Vec<_>>();

    let mut map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let mut ta = ListBuilder::new(StringBuilder::new());
    for r in rows {
        match &r.m {
            Some(entries) => {
                for (k, v) in entries {
                    map.keys().append_value(k);
                    map.values().append_option(v.as_deref());
                }
                map.append(true).unwrap();
            }
            None => map.append(false).unwrap(),
        }
        match &r.ta {
            Some(items) => {
                for item in items {
                    ta.values().append_option(item.as_deref());
                }
                ta.append(true);
            }
            None => ta.append(false),
        }
    }
    fn st(r: &Row) -> Option<&StructRow> {
        r.st.as_ref()
    }
    let strukt = StructArray::try_new(
        struct_fields(),
        vec![
            Arc::new(Int64Array::from_iter(
                rows.iter().map(|r| st(r).and_then(|s| s.0)),
            )),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| st(r).and_then(|s| s.1.clone())),
            )),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| st(r).and_then(|s| s.2)),
            )),
            Arc::new(Float64Array::from_iter(
                rows.iter().map(|r| st(r).and_then(|s| s.3)),
            )),
            Arc::new(arrow::array::NullArray::new(rows.len())),
        ],
        Some(NullBuffer::from_iter(rows.iter().map(|r| r.st.is_some()))),
    )
    .unwrap();

    let columns: Vec<(Field, ArrayRef)> = vec![
        (
            Field::new("rid", DataType::Int64, false),
            Arc::new(Int64Array::from_iter_values(0..rows.len() as i64)),
        ),
        (
            Field::new("b", DataType::Boolean, true),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| r.b))),
        ),
        (
            Field::new("i2", DataType::Int16, true),
            Arc::new(Int16Array::from_iter(rows.iter().map(|r| r.i2))),
        ),
        (
            Field::new("i4", DataType::Int32, true),
            Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.i4))),
        ),
        (
            Field::new("i8", DataType::Int64, true),
            Arc::new(Int64Array::from(col(&|r| r.i8))),
        ),
        (
            Field::new("f4", DataType::Float32, true),
            Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.f4))),
        ),
        (
            Field::new("f8", DataType::Float64, true),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.f8))),
        ),
        (
            Field::new("t", DataType::Utf8, true),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.t.as_deref()))),
        ),
        (
            Field::new("tv", DataType::Utf8View, true),
            Arc::new(StringViewArray::from_iter(
                rows.iter().map(|r| r.t.as_deref()),
            )),
        ),
        (
            Field::new("tl", DataType::LargeUtf8, true),
            Arc::new(LargeStringArray::from_iter(
                rows.iter().map(|r| r.t2.as_deref()),
            )),
        ),
        {
            let dict: DictionaryArray<Int16Type> = rows.iter().map(|r| r.t2.as_deref()).collect();
            (
                Field::new("td", dict.data_type().clone(), true),
                Arc::new(dict),
            )
        },
        {
            let a = TimestampSecondArray::from(col(&|r| r.ts_s)).with_timezone("UTC");
            (Field::new("ts_s", a.data_type().clone(), true), Arc::new(a))
        },
        {
            let a = TimestampMillisecondArray::from(col(&|r| r.ts_ms)).with_timezone("+02:00");
            (
                Field::new("ts_ms", a.data_type().clone(), true),
                Arc::new(a),
            )
        },
        {
            let a = TimestampMicrosecondArray::from(col(&|r| r.ts_us));
            (
                Field::new("ts_us", a.data_type().clone(), true),
                Arc::new(a),
            )
        },
        {
            let a = TimestampNanosecondArray::from(col(&|r| r.ts_ns)).with_timezone("UTC");
            (
                Field::new("ts_ns", a.data_type().clone(), true),
                Arc::new(a),
            )
        },
        (
            Field::new("d", DataType::Date32, true),
            Arc::new(Date32Array::from_iter(rows.iter().map(|r| r.d))),
        ),
        (
            Field::new("d64", DataType::Date64, true),
            Arc::new(Date64Array::from(col(&|r| r.d64))),
        ),
        (
            json_field("j"),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.j.as_ref().map(|j| j.to_string())),
            )),
        ),
        {
            let a = map.finish();
            (Field::new("m", a.data_type().clone(), true), Arc::new(a))
        },
        (
            Field::new("st", strukt.data_type().clone(), true),
            Arc::new(strukt),
        ),
        (
            Field::new("u", DataType::FixedSizeBinary(16), true),
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(rows.iter().map(|r| r.u), 16)
                    .unwrap(),
            ),
        ),
        (
            Field::new("n", DataType::Decimal128(case.precision, case.scale), true),
            Arc::new(
                Decimal128Array::from(case.n.clone())
                    .with_precision_and_scale(case.precision, case.scale)
                    .unwrap(),
            ),
        ),
        (
            Field::new("n38", DataType::Decimal128(38, case.scale38), true),
            Arc::new(
                Decimal128Array::from(case.n38.clone())
                    .with_precision_and_scale(38, case.scale38)
                    .unwrap(),
            ),
        ),
        {
            let a = ta.finish();
            (Field::new("ta", a.data_type().clone(), true), Arc::new(a))
        },
        {
            let a = LargeListArray::from_iter_primitive::<Float64Type, _, _>(
                rows.iter().map(|r| r.fa.clone()),
            );
            (Field::new("fa", a.data_type().clone(), true), Arc::new(a))
        },
    ];
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = columns.into_iter().unzip();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap()
}

/// The PostgreSQL type of every column, from the Arrow schema alone.
fn pg_types(batch: &RecordBatch) -> Vec<PgType> {
    batch
        .schema()
        .fields()
        .iter()
        .map(|f| pg_type_for_field(f).unwrap_or_else(|| panic!("no PgType for {f}")))
        .collect()
}

/// Creates `table` for `batch` and COPYs the batch into it in one binary COPY.
async fn copy_batch(client: &tokio_postgres::Client, table: &str, batch: &RecordBatch) -> u64 {
    let types = pg_types(batch);
    let columns: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .zip(&types)
        .map(|(f, t)| format!("{} {}", quote_ident(f.name()), t.sql_name()))
        .collect();
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} ({})",
            columns.join(", ")
        ))
        .await
        .unwrap();
    let mut data = HEADER.to_vec();
    encode_batch(batch, &types, &mut data).unwrap();
    data.extend_from_slice(TRAILER);
    let sink = client
        .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
        .await
        .unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    sink.as_mut().finish().await.unwrap()
}

const SELECT: &str = "SELECT rid, b, i2, i4, i8, f4, f8, t, tv, tl, td, \
     (extract(epoch FROM ts_s) * 1000000)::int8 AS ts_s, \
     (extract(epoch FROM ts_ms) * 1000000)::int8 AS ts_ms, \
     (extract(epoch FROM ts_us) * 1000000)::int8 AS ts_us, \
     (extract(epoch FROM ts_ns) * 1000000)::int8 AS ts_ns, \
     d - date '1970-01-01' AS d, d64 - date '1970-01-01' AS d64, \
     j, m, st, u, n::text AS n, n38::text AS n38, ta, fa";

/// The decimal text PostgreSQL prints for `value × 10^-scale` at display scale `scale`.
fn decimal_text(value: i128, scale: i8) -> String {
    let digits = value.unsigned_abs().to_string();
    let sign = if value < 0 { "-" } else { "" };
    if scale <= 0 {
        if value == 0 {
            return "0".into();
        }
        return format!(
            "{sign}{digits}{}",
            "0".repeat(usize::from(scale.unsigned_abs()))
        );
    }
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

fn same_f64(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
        (a, b) => a.is_none() && b.is_none(),
    }
}

fn same_f64s(a: &Option<Vec<Option<f64>>>, b: &Option<Vec<Option<f64>>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_f64(*x, *y)),
        (a, b) => a.is_none() && b.is_none(),
    }
}

fn map_json(entries: &[(String, Option<String>)]) -> Value {
    // Later duplicates win, as in jsonb.
    Value::Object(
        entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().map_or(Value::Null, Value::from)))
            .collect(),
    )
}

fn struct_json(s: &StructRow) -> Value {
    json!({"i": s.0, "s": s.1, "b": s.2, "f": s.3, "n": null})
}

/// Sends `case`'s slice and checks every value that comes back.
async fn check(
    client: &tokio_postgres::Client,
    table: &str,
    case: &Case,
) -> Result<(), TestCaseError> {
    let batch = build_batch(case);
    let (a, b) = case.slice;
    let sent = batch.slice(a, b - a);
    let copied = copy_batch(client, table, &sent).await;
    prop_assert_eq!(copied, (b - a) as u64);

    let got = client
        .query(&format!("{SELECT} FROM {table} ORDER BY rid"), &[])
        .await
        .unwrap();
    prop_assert_eq!(got.len(), b - a);
    for (pg, i) in got.iter().zip(a..b) {
        let r = &case.rows[i];
        let at = format!("row {i}");
        prop_assert_eq!(pg.get::<_, i64>("rid"), i as i64);
        prop_assert_eq!(pg.get::<_, Option<bool>>("b"), r.b, "{}", at);
        prop_assert_eq!(pg.get::<_, Option<i16>>("i2"), r.i2, "{}", at);
        prop_assert_eq!(pg.get::<_, Option<i32>>("i4"), r.i4, "{}", at);
        prop_assert_eq!(pg.get::<_, Option<i64>>("i8"), r.i8, "{}", at);
        let f4 = pg.get::<_, Option<f32>>("f4");
        prop_assert!(
            same_f64(f4.map(f64::from), r.f4.map(f64::from)),
            "{}: f4 {:?} != {:?}",
            at,
            f4,
            r.f4
        );
        let f8 = pg.get::<_, Option<f64>>("f8");
        prop_assert!(same_f64(f8, r.f8), "{}: f8 {:?} != {:?}", at, f8, r.f8);
        for (name, want) in [("t", &r.t), ("tv", &r.t), ("tl", &r.t2), ("td", &r.t2)] {
            prop_assert_eq!(&pg.get::<_, Option<String>>(name), want, "{} {}", at, name);
        }
        for (name, want) in [
            ("ts_s", r.ts_s.map(|s| s * 1_000_000)),
            ("ts_ms", r.ts_ms.map(|ms| ms * 1_000)),
            ("ts_us", r.ts_us),
            ("ts_ns", r.ts_ns.map(|ns| ns.div_euclid(1_000))),
        ] {
            prop_assert_eq!(pg.get::<_, Option<i64>>(name), want, "{} {}", at, name);
        }
        prop_assert_eq!(pg.get::<_, Option<i32>>("d"), r.d, "{}", at);
        prop_assert_eq!(
            pg.get::<_, Option<i32>>("d64"),
            r.d64.map(|ms| ms.div_euclid(86_400_000) as i32),
            "{}",
            at
        );
        prop_assert_eq!(&pg.get::<_, Option<Value>>("j"), &r.j, "{}", at);
        prop_assert_eq!(
            pg.get::<_, Option<Value>>("m"),
            r.m.as_deref().map(map_json),
            "{}",
            at
        );
        prop_assert_eq!(
            pg.get::<_, Option<Value>>("st"),
            r.st.as_ref().map(struct_json),
            "{}",
            at
        );
        prop_assert_eq!(
            pg.get::<_, Option<uuid::Uuid>>("u").map(|u| *u.as_bytes()),
            r.u,
            "{}",
            at
        );
        prop_assert_eq!(
            pg.get::<_, Option<String>>("n"),
            case.n[i].map(|v| decimal_text(v, case.scale)),
            "{} numeric({},{})",
            at,
            case.precision,
            case.scale
        );
        prop_assert_eq!(
            pg.get::<_, Option<String>>("n38"),
            case.n38[i].map(|v| decimal_text(v, case.scale38)),
            "{} numeric(38,{})",
            at,
            case.scale38
        );
        prop_assert_eq!(
            &pg.get::<_, Option<Vec<Option<String>>>>("ta"),
            &r.ta,
            "{}",
            at
        );
        let fa = pg.get::<_, Option<Vec<Option<f64>>>>("fa");
        prop_assert!(same_f64s(&fa, &r.fa), "{}: fa {:?} != {:?}", at, fa, r.fa);
    }
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn random_batches_round_trip_through_binary_copy() {
    random_round_trips(Flavor::Postgres);
}

#[test]
#[cfg_attr(
    not(timescaledb_tests),
    ignore = "needs ../shared/timescaledb (TimescaleDB for the tests)"
)]
fn random_batches_round_trip_through_binary_copy_on_timescaledb() {
    random_round_trips(Flavor::Timescale);
}

fn random_round_trips(flavor: Flavor) {
    let pg = PgServer::start_on(flavor);
    let rt = runtime();
    let client = rt.block_on(pg.client());
    let tables = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |case| {
            let table = format!("copy_case_{}", tables.fetch_add(1, Ordering::Relaxed));
            rt.block_on(check(&client, &table, &case))
        })
        .unwrap();
}

#[test]
fn hand_built_batch_of_every_type() {
    hand_built_batch(Flavor::Postgres);
}

#[test]
#[cfg_attr(
    not(timescaledb_tests),
    ignore = "needs ../shared/timescaledb (TimescaleDB for the tests)"
)]
fn hand_built_batch_of_every_type_on_timescaledb() {
    hand_built_batch(Flavor::Timescale);
}

fn hand_built_batch(flavor: Flavor) {
    let max38 = 10i128.pow(38) - 1;
    let row = Row {
        b: Some(true),
        i2: Some(i16::MIN),
        i4: Some(i32::MAX),
        i8: Some(i64::MIN),
        f4: Some(-0.0),
        f8: Some(f64::NAN),
        t: Some("quote \" backslash \\ newline \n tab \t é 𝄞".into()),
        t2: Some("x".into()),
        ts_s: Some(-1),
        ts_ms: Some(1_700_000_000_123),
        ts_us: Some(0),
        ts_ns: Some(-1),
        d: Some(-1),
        d64: Some(-1),
        j: Some(json!({"a": [1, 2.5, null, "s\"\\"], "b": {"c": true}})),
        m: Some(vec![
            ("k\"ey".into(), Some("v\n".into())),
            ("n".into(), None),
        ]),
        st: Some((Some(-7), Some("s".into()), Some(false), Some(0.125))),
        u: Some(
            *uuid::Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8")
                .unwrap()
                .as_bytes(),
        ),
        ta: Some(vec![Some("a".into()), None, Some(String::new())]),
        fa: Some(vec![Some(1.5), None, Some(f64::NEG_INFINITY)]),
    };
    let nulls = Row {
        b: None,
        i2: None,
        i4: None,
        i8: None,
        f4: None,
        f8: None,
        t: None,
        t2: None,
        ts_s: None,
        ts_ms: None,
        ts_us: None,
        ts_ns: None,
        d: None,
        d64: None,
        j: None,
        m: None,
        st: None,
        u: None,
        ta: Some(vec![]),
        fa: None,
    };
    let case = Case {
        rows: vec![row, nulls],
        precision: 10,
        scale: 4,
        n: vec![Some(-123_456_789), None],
        scale38: 10,
        n38: vec![Some(max38), Some(-max38)],
        slice: (0, 2),
    };
    let pg = PgServer::start_on(flavor);
    let rt = runtime();
    rt.block_on(async {
        let client = pg.client().await;
        check(&client, "copy_every_type", &case).await.unwrap();

        // Spot-check the text forms PostgreSQL gives, independently of the helpers above.
        let batch = build_batch(&case);
        copy_batch(&client, "copy_every_type", &batch).await;
        let r = client
            .query_one(
                "SELECT n::text, n38::text, d::text, u::text, m::text, ta::text, fa::text \
                 FROM copy_every_type WHERE rid = 0",
                &[],
            )
            .await
            .unwrap();
        let text = |i: usize| r.get::<_, String>(i);
        assert_eq!(text(0), "-12345.6789");
        assert_eq!(text(1), "9999999999999999999999999999.9999999999");
        assert_eq!(text(2), "1969-12-31");
        assert_eq!(text(3), "67e55044-10b1-426f-9247-bb680e5fe0c8");
        assert_eq!(text(4), r#"{"n": null, "k\"ey": "v\n"}"#);
        assert_eq!(text(5), r#"{a,NULL,""}"#);
        assert_eq!(text(6), "{1.5,NULL,-Infinity}");
        client.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
        let utc = client
            .query_one(
                "SELECT ts_ms::text, ts_ns::text FROM copy_every_type WHERE rid = 0",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(utc.get::<_, String>(0), "2023-11-14 22:13:20.123+00");
        assert_eq!(utc.get::<_, String>(1), "1969-12-31 23:59:59.999999+00");
    });
}
