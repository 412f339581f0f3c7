//! Round trips of the Native encoder against a real ClickHouse: random Arrow batches with a
//! column of every [`ChType`] sluice writes (and every Arrow layout that feeds it) are
//! encoded with `sluice::clickhouse::native`, posted as `INSERT ... FORMAT Native`, read
//! back with `SELECT ... FORMAT JSONEachRow` and compared value by value. Numbers come back
//! through `toString` (JSON output quotes 64-bit integers and cannot carry NaN), floats as
//! their bit patterns, timestamps as raw ticks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, DictionaryArray, FixedSizeBinaryArray,
    Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, Int8Array, LargeListArray,
    LargeStringArray, ListBuilder, MapBuilder, RecordBatch, StringArray, StringBuilder,
    StringViewArray, TimestampMicrosecondArray, TimestampMillisecondArray,
    TimestampNanosecondArray, TimestampSecondArray, UInt16Array, UInt32Array, UInt64Array,
    UInt8Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int16Type, Int32Type, Schema, UInt8Type};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use sluice::clickhouse::native::{encode_block, ChType};

use sluice_test_support::ch::ChServer;

/// One column of a test table: the ClickHouse type, the Arrow array that fills it, the
/// expression that reads it back, and the JSON values that must come back.
struct Col {
    name: String,
    ty: ChType,
    array: ArrayRef,
    select: String,
    expect: Vec<Value>,
}

impl Col {
    /// Reads the column back as it is.
    fn new(name: &str, ty: &str, array: ArrayRef, expect: Vec<Value>) -> Col {
        Col::read(name, ty, array, "{}", expect)
    }

    /// Reads the column back through `select`, where `{}` stands for the column.
    fn read(name: &str, ty: &str, array: ArrayRef, select: &str, expect: Vec<Value>) -> Col {
        assert_eq!(array.len(), expect.len(), "{name}");
        Col {
            name: name.to_string(),
            ty: ChType::parse(ty).unwrap(),
            array,
            select: select.replace("{}", name),
            expect,
        }
    }
}

/// Creates table `table` with `cols` (after a `id UInt32` row number), inserts rows
/// `slice.0 .. slice.0 + slice.1` of them as one Native block, reads them back and compares.
async fn round_trip(
    ch: &ChServer,
    table: &str,
    cols: &[Col],
    slice: (usize, usize),
) -> Result<(), TestCaseError> {
    let n = cols.first().map_or(0, |c| c.expect.len());
    let mut names = vec!["id".to_string()];
    let mut ddl = vec!["id UInt32".to_string()];
    let mut targets = vec![("id".to_string(), ChType::UInt32)];
    let ids: ArrayRef = Arc::new(UInt32Array::from_iter_values(0..n as u32));
    let mut arrays = vec![ids];
    for c in cols {
        names.push(c.name.clone());
        ddl.push(format!("{} {}", c.name, c.ty));
        targets.push((c.name.clone(), c.ty.clone()));
        arrays.push(c.array.clone());
    }
    let fields: Vec<Field> = names
        .iter()
        .zip(&arrays)
        .map(|(name, a)| Field::new(name, a.data_type().clone(), true))
        .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .unwrap()
        .slice(slice.0, slice.1);

    let mut body = Vec::new();
    encode_block(&batch, &targets, &mut body).map_err(|e| TestCaseError::fail(e.to_string()))?;
    ch.query(&format!(
        "CREATE TABLE {table} ({}) ENGINE = MergeTree ORDER BY tuple()",
        ddl.join(", ")
    ))
    .await;
    let insert = format!("INSERT INTO {table} ({}) FORMAT Native", names.join(", "));
    ch.try_insert(&insert, body)
        .await
        .map_err(TestCaseError::fail)?;

    let selects: Vec<String> = cols
        .iter()
        .map(|c| format!("{} AS r_{}", c.select, c.name))
        .collect();
    let answer = ch
        .query(&format!(
            "SELECT id, {} FROM {table} ORDER BY id FORMAT JSONEachRow",
            selects.join(", ")
        ))
        .await;
    let rows: Vec<serde_json::Map<String, Value>> = answer
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON row"))
        .collect();
    prop_assert_eq!(rows.len(), slice.1, "row count");
    for (r, row) in rows.iter().enumerate() {
        let id = slice.0 + r;
        prop_assert_eq!(&row["id"], &json!(id), "row order");
        for c in cols {
            let got = &row[&format!("r_{}", c.name)];
            let want = &c.expect[id];
            prop_assert!(
                got == want,
                "column {} ({}), row {} of the batch ({} of the slice): got {}, want {}",
                c.name,
                c.ty,
                id,
                r,
                got,
                want
            );
        }
    }
    ch.query(&format!("DROP TABLE {table}")).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Generated data.

/// Strings with the characters that break naive encoders, NUL included.
fn text() -> impl Strategy<Value = String> {
    let tricky = prop::sample::select(vec![
        '"', '\\', '\n', '\r', '\t', '\'', '\0', ',', '{', '}', ':', ' ', '/', 'é', '€', '𝄞',
        '\u{1}', '\u{7f}', '\u{2028}',
    ]);
    vec(prop_oneof![3 => any::<char>(), 2 => tricky], 0..12)
        .prop_map(|chars| chars.into_iter().collect())
}

/// Strings from a small pool (so dictionaries repeat), sometimes random ones.
fn tag() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["", "a", "b", "host-1", "é", "x\ny", "'q'", "\0"])
            .prop_map(String::from),
        1 => text(),
    ]
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

/// Integers of a type, with its extremes often.
fn int_edges<T>(edges: Vec<T>) -> impl Strategy<Value = T>
where
    T: Arbitrary + Clone + std::fmt::Debug + 'static,
{
    prop_oneof![3 => any::<T>(), 1 => prop::sample::select(edges)]
}

/// Values in `lo..=hi`, with the ends and 0, -1 (where inside) often.
fn within(lo: i64, hi: i64) -> impl Strategy<Value = i64> {
    let edges: Vec<i64> = [lo, hi, 0, -1]
        .into_iter()
        .filter(|v| (lo..=hi).contains(v))
        .collect();
    prop_oneof![3 => lo..=hi, 1 => prop::sample::select(edges)]
}

/// JSON values for the members of JSON map text (never NaN: JSON has none).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        4 => text().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(Value::Array),
            vec((text(), inner), 0..3).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

type Opt<T> = Vec<Option<T>>;

/// Values of each integer width: Int8, Int16, Int32, Int64, UInt8, UInt16, UInt32, UInt64.
type Ints = (
    Opt<i8>,
    Opt<i16>,
    Opt<i32>,
    Opt<i64>,
    Opt<u8>,
    Opt<u16>,
    Opt<u32>,
    Opt<u64>,
);

#[derive(Debug, Clone)]
struct Data {
    strings: Opt<String>,
    tags: Opt<String>,
    /// Dictionary values and each row's key.
    dict: (Opt<String>, Opt<usize>),
    ints: Ints,
    floats: (Opt<f32>, Opt<f64>),
    /// Seconds, milliseconds, microseconds, nanoseconds since 1970 (each unit's range
    /// limited to what fits Int64 nanoseconds).
    timestamps: (Opt<i64>, Opt<i64>, Opt<i64>, Opt<i64>),
    /// DateTime milliseconds, Date days, Date32 days.
    dates: (Opt<i64>, Opt<i32>, Opt<i32>),
    bools: Opt<bool>,
    uuids: Opt<[u8; 16]>,
    /// Unscaled values of Decimal(9,2), (18,4), (38,10) and (10,1).
    decimals: (Opt<i128>, Opt<i128>, Opt<i128>, Opt<i128>),
    string_lists: Opt<Vec<Option<String>>>,
    float_lists: Opt<Vec<Option<f64>>>,
    maps: Opt<Vec<(String, Option<String>)>>,
    json_maps: Opt<Vec<(String, Value)>>,
    slice: (usize, usize),
}

fn col<T: std::fmt::Debug>(
    n: usize,
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Vec<Option<T>>> {
    vec(option::of(s), n)
}

fn decimal(digits: u32) -> impl Strategy<Value = i128> {
    let max = 10i128.pow(digits) - 1;
    prop_oneof![3 => -max..=max, 1 => prop::sample::select(vec![-max, max, 0, -1])]
}

fn data() -> impl Strategy<Value = Data> {
    (0..200usize).prop_flat_map(|n| {
        let dict = vec(option::of(tag()), 1..8).prop_flat_map(move |values| {
            let len = values.len();
            (Just(values), col(n, 0..len))
        });
        let ints = (
            col(n, int_edges(vec![i8::MIN, i8::MAX, 0, -1])),
            col(n, int_edges(vec![i16::MIN, i16::MAX, 0, -1])),
            col(n, int_edges(vec![i32::MIN, i32::MAX, 0, -1])),
            col(n, int_edges(vec![i64::MIN, i64::MAX, 0, -1])),
            col(n, int_edges(vec![u8::MAX, 0])),
            col(n, int_edges(vec![u16::MAX, 0])),
            col(n, int_edges(vec![u32::MAX, 0])),
            col(n, int_edges(vec![u64::MAX, 0])),
        );
        let max_s = i64::MAX / 1_000_000_000;
        let time = (
            (
                col(n, within(-max_s, max_s)),
                col(n, within(-max_s * 1_000, max_s * 1_000)),
                col(n, within(-max_s * 1_000_000, max_s * 1_000_000)),
                col(n, within(i64::MIN, i64::MAX)),
            ),
            (
                col(n, within(0, i64::from(u32::MAX) * 1000 + 999)),
                col(n, 0..=i32::from(u16::MAX)),
                // Date32's range: 1900-01-01 to 2299-12-31.
                col(n, -25_567..=120_529i32),
            ),
        );
        let rest = (
            col(n, any::<bool>()),
            col(n, any::<[u8; 16]>()),
            (
                col(n, decimal(9)),
                col(n, decimal(18)),
                col(n, decimal(38)),
                col(n, decimal(10)),
            ),
            col(n, vec(option::of(text()), 0..4)),
            col(n, vec(option::of(f64s()), 0..4)),
            col(n, vec((tag(), option::of(text())), 0..4)),
            col(n, vec((text(), json_value()), 0..4)),
            (0..=n).prop_flat_map(move |a| (Just(a), 0..=n - a)),
        );
        (
            (col(n, text()), col(n, tag()), dict),
            ints,
            (col(n, f32s()), col(n, f64s())),
            time,
            rest,
        )
            .prop_map(
                |(
                    (strings, tags, dict),
                    ints,
                    floats,
                    (timestamps, dates),
                    (bools, uuids, decimals, string_lists, float_lists, maps, json_maps, slice),
                )| Data {
                    strings,
                    tags,
                    dict,
                    ints,
                    floats,
                    timestamps,
                    dates,
                    bools,
                    uuids,
                    decimals,
                    string_lists,
                    float_lists,
                    maps,
                    json_maps,
                    slice,
                },
            )
    })
}

// ---------------------------------------------------------------------------------------
// Expected values.

/// JSON of a nullable value through `f`.
fn opt<T>(values: &[Option<T>], f: impl Fn(&T) -> Value) -> Vec<Value> {
    values
        .iter()
        .map(|v| v.as_ref().map_or(Value::Null, &f))
        .collect()
}

/// JSON of a non-nullable column: nulls read back as `default`.
fn or_default<T>(values: &[Option<T>], default: Value, f: impl Fn(&T) -> Value) -> Vec<Value> {
    values
        .iter()
        .map(|v| v.as_ref().map_or(default.clone(), &f))
        .collect()
}

fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

fn shown<T: ToString>(v: &T) -> Value {
    Value::String(v.to_string())
}

/// A Decimal's unscaled value as ClickHouse's `toString` prints it (no trailing zeros).
fn decimal_text(v: i128, scale: u32) -> String {
    let unit = 10u128.pow(scale);
    let (int, frac) = (v.unsigned_abs() / unit, v.unsigned_abs() % unit);
    let sign = if v < 0 { "-" } else { "" };
    if frac == 0 {
        format!("{sign}{int}")
    } else {
        let frac = format!("{frac:0width$}", width = scale as usize);
        format!("{sign}{int}.{}", frac.trim_end_matches('0'))
    }
}

/// Ticks of 10^-`to` s from ticks of 10^-`from` s: exact up, floor down.
fn rescale(v: i64, from: u32, to: u32) -> i64 {
    if to >= from {
        v * 10i64.pow(to - from)
    } else {
        v.div_euclid(10i64.pow(from - to))
    }
}

/// Float bits as ClickHouse's `toString(reinterpretAsUInt64(x))` prints them.
fn bits64(f: &f64) -> Value {
    shown(&f.to_bits())
}

fn strs(values: &[Option<String>]) -> Vec<Option<&str>> {
    values.iter().map(|s| s.as_deref()).collect()
}

fn columns(d: &Data) -> Vec<Col> {
    // Strings in every layout; non-Nullable columns read nulls back as "".
    let mut cols = vec![
        Col::new(
            "s",
            "String",
            Arc::new(StringArray::from(strs(&d.strings))),
            or_default(&d.strings, string(""), |s| string(s)),
        ),
        Col::new(
            "ns",
            "Nullable(String)",
            Arc::new(LargeStringArray::from(strs(&d.strings))),
            opt(&d.strings, |s| string(s)),
        ),
        Col::new(
            "vs",
            "Nullable(String)",
            Arc::new(StringViewArray::from(strs(&d.strings))),
            opt(&d.strings, |s| string(s)),
        ),
    ];

    // LowCardinality from plain strings and from dictionaries of each value layout.
    cols.push(Col::new(
        "lc",
        "LowCardinality(String)",
        Arc::new(StringArray::from(strs(&d.tags))),
        or_default(&d.tags, string(""), |s| string(s)),
    ));
    cols.push(Col::new(
        "lcn",
        "LowCardinality(Nullable(String))",
        Arc::new(StringViewArray::from(strs(&d.tags))),
        opt(&d.tags, |s| string(s)),
    ));
    let (values, keys) = &d.dict;
    let looked_up: Opt<String> = keys
        .iter()
        .map(|k| k.and_then(|k| values[k].clone()))
        .collect();
    let dict_values = strs(values);
    let lcd = DictionaryArray::<Int16Type>::try_new(
        Int16Array::from(keys.iter().map(|k| k.map(|k| k as i16)).collect::<Vec<_>>()),
        Arc::new(StringArray::from(dict_values.clone())),
    )
    .unwrap();
    cols.push(Col::new(
        "lcd",
        "LowCardinality(Nullable(String))",
        Arc::new(lcd),
        opt(&looked_up, |s| string(s)),
    ));
    let lcd2 = DictionaryArray::<UInt8Type>::try_new(
        UInt8Array::from(keys.iter().map(|k| k.map(|k| k as u8)).collect::<Vec<_>>()),
        Arc::new(LargeStringArray::from(dict_values.clone())),
    )
    .unwrap();
    cols.push(Col::new(
        "lcd2",
        "LowCardinality(String)",
        Arc::new(lcd2),
        or_default(&looked_up, string(""), |s| string(s)),
    ));
    let sd = DictionaryArray::<Int32Type>::try_new(
        Int32Array::from(keys.iter().map(|k| k.map(|k| k as i32)).collect::<Vec<_>>()),
        Arc::new(StringViewArray::from(dict_values)),
    )
    .unwrap();
    cols.push(Col::new(
        "sd",
        "Nullable(String)",
        Arc::new(sd),
        opt(&looked_up, |s| string(s)),
    ));

    // Integers of every width, and two widenings.
    let (i8s, i16s, i32s, i64s, u8s, u16s, u32s, u64s) = &d.ints;
    let int = "toString({})";
    cols.push(Col::read(
        "i8",
        "Nullable(Int8)",
        Arc::new(Int8Array::from(i8s.clone())),
        int,
        opt(i8s, shown),
    ));
    cols.push(Col::read(
        "i16",
        "Nullable(Int16)",
        Arc::new(Int16Array::from(i16s.clone())),
        int,
        opt(i16s, shown),
    ));
    cols.push(Col::read(
        "i32",
        "Int32",
        Arc::new(Int32Array::from(i32s.clone())),
        int,
        or_default(i32s, string("0"), shown),
    ));
    cols.push(Col::read(
        "i64",
        "Nullable(Int64)",
        Arc::new(Int64Array::from(i64s.clone())),
        int,
        opt(i64s, shown),
    ));
    cols.push(Col::read(
        "u8",
        "Nullable(UInt8)",
        Arc::new(UInt8Array::from(u8s.clone())),
        int,
        opt(u8s, shown),
    ));
    cols.push(Col::read(
        "u16",
        "Nullable(UInt16)",
        Arc::new(UInt16Array::from(u16s.clone())),
        int,
        opt(u16s, shown),
    ));
    cols.push(Col::read(
        "u32",
        "Nullable(UInt32)",
        Arc::new(UInt32Array::from(u32s.clone())),
        int,
        opt(u32s, shown),
    ));
    cols.push(Col::read(
        "u64",
        "Nullable(UInt64)",
        Arc::new(UInt64Array::from(u64s.clone())),
        int,
        opt(u64s, shown),
    ));
    cols.push(Col::read(
        "w64",
        "Nullable(Int64)",
        Arc::new(Int8Array::from(i8s.clone())),
        int,
        opt(i8s, shown),
    ));
    cols.push(Col::read(
        "wu32",
        "UInt32",
        Arc::new(UInt16Array::from(u16s.clone())),
        int,
        or_default(u16s, string("0"), shown),
    ));

    // Floats, compared by bit pattern (NaN, infinities, -0.0 included).
    let (f32s, f64s) = &d.floats;
    cols.push(Col::read(
        "f32",
        "Nullable(Float32)",
        Arc::new(Float32Array::from(f32s.clone())),
        "toString(reinterpretAsUInt32({}))",
        opt(f32s, |f| shown(&f.to_bits())),
    ));
    cols.push(Col::read(
        "f64",
        "Nullable(Float64)",
        Arc::new(Float64Array::from(f64s.clone())),
        "toString(reinterpretAsUInt64({}))",
        opt(f64s, bits64),
    ));
    cols.push(Col::read(
        "f32w",
        "Float64",
        Arc::new(Float32Array::from(f32s.clone())),
        "toString(reinterpretAsUInt64({}))",
        or_default(f32s, shown(&0u64), |f| bits64(&f64::from(*f))),
    ));

    // Timestamps of every unit into DateTime64 of every precision (read back as raw ticks).
    let (s, ms, us, ns) = &d.timestamps;
    let units: [(&str, u32, &Opt<i64>, ArrayRef); 4] = [
        ("s", 0, s, Arc::new(TimestampSecondArray::from(s.clone()))),
        (
            "ms",
            3,
            ms,
            Arc::new(TimestampMillisecondArray::from(ms.clone()).with_timezone("UTC")),
        ),
        (
            "us",
            6,
            us,
            Arc::new(TimestampMicrosecondArray::from(us.clone()).with_timezone("+02:00")),
        ),
        (
            "ns",
            9,
            ns,
            Arc::new(TimestampNanosecondArray::from(ns.clone())),
        ),
    ];
    for (unit, from, values, array) in units {
        for (p, reader) in [(3, "Milli"), (6, "Micro"), (9, "Nano")] {
            let ticks = |v: &i64| shown(&rescale(*v, from, p));
            let (ty, expect) = if p == 6 {
                (
                    format!("Nullable(DateTime64({p}, 'UTC'))"),
                    opt(values, ticks),
                )
            } else {
                (
                    format!("DateTime64({p}, 'UTC')"),
                    or_default(values, string("0"), ticks),
                )
            };
            cols.push(Col::read(
                &format!("t_{unit}_{p}"),
                &ty,
                array.clone(),
                &format!("toString(toUnixTimestamp64{reader}({{}}))"),
                expect,
            ));
        }
    }
    let (dt_ms, days, days32) = &d.dates;
    cols.push(Col::read(
        "dt",
        "Nullable(DateTime('UTC'))",
        Arc::new(TimestampMillisecondArray::from(dt_ms.clone())),
        "toString(toUnixTimestamp({}))",
        opt(dt_ms, |v| shown(&v.div_euclid(1000))),
    ));
    cols.push(Col::read(
        "d",
        "Nullable(Date)",
        Arc::new(Date32Array::from(days.clone())),
        "toString(toUInt16({}))",
        opt(days, shown),
    ));
    cols.push(Col::read(
        "d32",
        "Date32",
        Arc::new(Date32Array::from(days32.clone())),
        "toString(toInt32({}))",
        or_default(days32, string("0"), shown),
    ));

    cols.push(Col::new(
        "b",
        "Nullable(Bool)",
        Arc::new(BooleanArray::from(d.bools.clone())),
        opt(&d.bools, |b| Value::Bool(*b)),
    ));
    cols.push(Col::read(
        "u",
        "Nullable(UUID)",
        Arc::new(
            FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                d.uuids.iter().map(|u| u.as_ref().map(|u| u.as_slice())),
                16,
            )
            .unwrap(),
        ),
        "toString({})",
        opt(&d.uuids, |u| shown(&uuid::Uuid::from_bytes(*u))),
    ));

    // Decimals of each width; the last one is scaled up from scale 1 to 3.
    let (d9, d18, d38, d10) = &d.decimals;
    let decimals = [
        ("dec9", "Nullable(Decimal(9, 2))", 9, 2, 2, d9),
        ("dec18", "Decimal(18, 4)", 18, 4, 4, d18),
        ("dec38", "Nullable(Decimal(38, 10))", 38, 10, 10, d38),
        ("dec12", "Nullable(Decimal(12, 3))", 10, 1, 3, d10),
    ];
    for (name, ty, p, s, to, values) in decimals {
        let array = Decimal128Array::from(values.clone())
            .with_precision_and_scale(p, s)
            .unwrap();
        let factor = 10i128.pow(to - s as u32);
        let text = |v: &i128| string(&decimal_text(v * factor, to));
        let expect = if ty.starts_with("Nullable") {
            opt(values, text)
        } else {
            or_default(values, string("0"), text)
        };
        cols.push(Col::read(name, ty, Arc::new(array), "toString({})", expect));
    }

    // Arrays: null rows come back empty, null strings as "".
    let mut lists = ListBuilder::new(StringBuilder::new());
    for row in &d.string_lists {
        match row {
            Some(items) => {
                for item in items {
                    lists.values().append_option(item.as_deref());
                }
                lists.append(true);
            }
            None => lists.append(false),
        }
    }
    cols.push(Col::new(
        "sa",
        "Array(String)",
        Arc::new(lists.finish()),
        or_default(&d.string_lists, json!([]), |items| {
            Value::Array(
                items
                    .iter()
                    .map(|s| string(s.as_deref().unwrap_or("")))
                    .collect(),
            )
        }),
    ));
    cols.push(Col::read(
        "fa",
        "Array(Nullable(Float64))",
        Arc::new(LargeListArray::from_iter_primitive::<Float64Type, _, _>(
            d.float_lists.clone(),
        )),
        "arrayMap(x -> toString(reinterpretAsUInt64(x)), {})",
        or_default(&d.float_lists, json!([]), |items| {
            Value::Array(
                items
                    .iter()
                    .map(|f| f.as_ref().map_or(Value::Null, bits64))
                    .collect(),
            )
        }),
    ));

    // Maps from Arrow maps and from JSON text, read back as [key, value] pairs in order.
    let pairs = "arrayMap((k, v) -> [k, v], mapKeys({}), mapValues({}))";
    let mut maps = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    for row in &d.maps {
        if let Some(entries) = row {
            for (k, v) in entries {
                maps.keys().append_value(k);
                maps.values().append_option(v.as_deref());
            }
        }
        maps.append(row.is_some()).unwrap();
    }
    cols.push(Col::read(
        "ma",
        "Map(String, String)",
        Arc::new(maps.finish()),
        pairs,
        or_default(&d.maps, json!([]), |entries| {
            Value::Array(
                entries
                    .iter()
                    .map(|(k, v)| json!([k, v.as_deref().unwrap_or("")]))
                    .collect(),
            )
        }),
    ));
    let json_text: Vec<Option<String>> = d
        .json_maps
        .iter()
        .map(|row| {
            row.as_ref().map(|members| {
                let members: Vec<String> = members
                    .iter()
                    .map(|(k, v)| format!("{}: {v}", Value::from(k.as_str())))
                    .collect();
                format!("{{ {} }}", members.join(", "))
            })
        })
        .collect();
    cols.push(Col::read(
        "mj",
        "Map(String, String)",
        Arc::new(StringArray::from(json_text)),
        pairs,
        or_default(&d.json_maps, json!([]), |members| {
            Value::Array(
                members
                    .iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => json!([k, s]),
                        other => json!([k, other.to_string()]),
                    })
                    .collect(),
            )
        }),
    ));
    cols
}

#[test]
fn random_batches_of_every_type_round_trip_through_clickhouse() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ch = ChServer::start();
    let tables = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 16,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&data(), |d| {
            let table = format!("native_case_{}", tables.fetch_add(1, Ordering::Relaxed));
            rt.block_on(round_trip(&ch, &table, &columns(&d), d.slice))
        })
        .unwrap();
}

#[test]
fn known_values_of_every_type_land_as_written() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ch = ChServer::start();
    let uuid = uuid::Uuid::parse_str("61f0c404-5cb3-11e7-907b-a6006ad3dba0").unwrap();
    let data = Data {
        strings: vec![Some("it's \"quoted\"\n\0é".into()), None],
        tags: vec![Some("web-1".into()), None],
        dict: (
            vec![Some("a".into()), None, Some("".into())],
            vec![Some(2), Some(1)],
        ),
        ints: (
            vec![Some(i8::MIN), None],
            vec![Some(i16::MAX), None],
            vec![Some(i32::MIN), None],
            vec![Some(i64::MIN), Some(i64::MAX)],
            vec![Some(u8::MAX), None],
            vec![Some(u16::MAX), None],
            vec![Some(u32::MAX), None],
            vec![Some(u64::MAX), Some(0)],
        ),
        floats: (
            vec![Some(f32::NAN), Some(-0.0)],
            vec![Some(f64::NEG_INFINITY), Some(1.5)],
        ),
        timestamps: (
            vec![Some(-1), Some(1_700_000_000)],
            vec![Some(-1), Some(1_700_000_000_123)],
            vec![Some(-1), Some(1_700_000_000_123_456)],
            vec![Some(-1), Some(1_700_000_000_123_456_789)],
        ),
        dates: (
            vec![Some(1_700_000_000_999), None],
            vec![Some(19_675), None],
            vec![Some(-25_567), Some(120_529)],
        ),
        bools: vec![Some(true), Some(false)],
        uuids: vec![Some(*uuid.as_bytes()), None],
        decimals: (
            vec![Some(-1), None],
            vec![Some(123_456_789), None],
            vec![Some(-(10i128.pow(38) - 1)), None],
            vec![Some(15), None],
        ),
        string_lists: vec![Some(vec![Some("x".into()), None]), None],
        float_lists: vec![Some(vec![Some(f64::NAN), None]), Some(vec![])],
        maps: vec![
            Some(vec![("k".into(), Some("v".into())), ("k".into(), None)]),
            None,
        ],
        json_maps: vec![
            Some(vec![
                ("a".into(), json!("b")),
                ("n".into(), json!(1.5)),
                ("o".into(), json!({"x": [1, null]})),
            ]),
            None,
        ],
        slice: (0, 2),
    };
    let cols = columns(&data);
    // A few expectations spelled out, so that the test does not only agree with itself.
    let expect = |name: &str| cols.iter().find(|c| c.name == name).unwrap().expect.clone();
    assert_eq!(
        expect("u")[0],
        json!("61f0c404-5cb3-11e7-907b-a6006ad3dba0")
    );
    assert_eq!(expect("t_ns_6")[0], json!("-1"), "-1 ns floors to -1 µs");
    assert_eq!(expect("t_s_9")[1], json!("1700000000000000000"));
    assert_eq!(expect("dec12")[0], json!("1.5"));
    assert_eq!(
        expect("dec38")[0],
        json!("-9999999999999999999999999999.9999999999")
    );
    assert_eq!(expect("dt")[0], json!("1700000000"));
    assert_eq!(expect("lcd"), vec![json!(""), Value::Null]);
    assert_eq!(
        expect("mj")[0],
        json!([["a", "b"], ["n", "1.5"], ["o", "{\"x\":[1,null]}"]])
    );
    assert_eq!(expect("ma")[0], json!([["k", "v"], ["k", ""]]));
    rt.block_on(async {
        round_trip(&ch, "native_known", &cols, (0, 2)).await.unwrap();
        // And the same through ClickHouse's own text rendering of a few of them.
        let mut body = Vec::new();
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("t", DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into())), false),
                Field::new("host", DataType::Utf8, false),
                Field::new("labels", DataType::Utf8, true),
            ])),
            vec![
                Arc::new(TimestampMicrosecondArray::from(vec![1_700_000_000_123_456]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["web-1"])),
                Arc::new(StringArray::from(vec![r#"{"env":"prod","n":1}"#])),
            ],
        )
        .unwrap();
        let targets: Vec<(String, ChType)> = [
            ("t", "DateTime64(6, 'UTC')"),
            ("host", "LowCardinality(String)"),
            ("labels", "Map(String, String)"),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), ChType::parse(t).unwrap()))
        .collect();
        encode_block(&b, &targets, &mut body).unwrap();
        ch.query("CREATE TABLE native_text (t DateTime64(6, 'UTC'), host LowCardinality(String), labels Map(String, String)) ENGINE = MergeTree ORDER BY t").await;
        ch.insert("INSERT INTO native_text (t, host, labels) FORMAT Native", body).await;
        assert_eq!(
            ch.query("SELECT t, host, labels['env'], labels['n'] FROM native_text FORMAT TSV").await,
            "2023-11-14 22:13:20.123456\tweb-1\tprod\t1\n"
        );
        // The types as ClickHouse reports them are what ChType prints.
        let types = ch
            .query(&format!(
                "SELECT type FROM system.columns WHERE database = '{}' AND table = 'native_text' ORDER BY position FORMAT TSVRaw",
                ch.database()
            ))
            .await;
        let printed: Vec<String> = targets.iter().map(|(_, t)| t.to_string()).collect();
        assert_eq!(types.lines().collect::<Vec<_>>(), printed);
    });
}
