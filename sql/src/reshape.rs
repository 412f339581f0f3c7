//! Reshape: brings every incoming Arrow batch to the schema of its registered table.
//!
//! What flows through it: a [`RecordBatch`] as a client sent it (any column order, maybe
//! missing or extra columns, maybe other but compatible Arrow types) and the
//! [`ResolvedTable`] it is addressed to. Out comes a batch with exactly
//! `table.arrow_schema` (the same `Arc`): the registered columns in registered order,
//! each with its registered Arrow type and field metadata. Or a [`ReshapeError`] naming
//! the table, the column, the problem and, for bad values, the first bad row (0-based,
//! within the batch) and its value. Nothing of a refused batch is kept; [`reshape`] is a
//! pure function.
//!
//! A batch that already has the registered schema (schema-level metadata aside) is passed
//! through without copying, after checking nulls in non-null columns and that `jsonb`
//! columns hold valid JSON.
//!
//! # Columns
//! - Matched by exact name and put in registered order.
//! - Missing: filled with the column's `default` if it has one, else with nulls if the
//!   column is nullable, else refused. A missing time column is always refused.
//! - Unknown: refused, or dropped when the table says `extra_columns: drop`.
//! - Nulls in a non-null column are refused (first null row named).
//!
//! # Conversions
//! Dictionary arrays (any key type) are unpacked first; an all-null column of Arrow type
//! `Null` becomes nulls of any type. Then only these conversions are made; each one is
//! exact or checked value by value (a value that does not convert exactly refuses the
//! batch, naming it):
//!
//! | column type | accepted Arrow input |
//! |---|---|
//! | `string` | Utf8, LargeUtf8, Utf8View |
//! | `int32`, `int64` | any integer (range checked); strings holding integers (checked). Not floats or decimals |
//! | `float` | Float16, Float32, Int8, Int16, UInt8, UInt16; strings holding numbers |
//! | `double` | any float; any integer (Int64/UInt64 only up to ±2^53); strings holding numbers |
//! | `bool` | Boolean; strings `true`/`false` (any case) |
//! | `timestamp*` | Timestamp of any unit, any or no time zone (no zone = UTC; a coarser unit truncates towards the past); Date32, Date64; RFC 3339 / ISO 8601 strings (no offset = UTC). Not plain integers |
//! | `date` | Date32, Date64; `YYYY-MM-DD` strings |
//! | `uuid` | FixedSizeBinary(16); Binary, LargeBinary, BinaryView of 16 bytes; 8-4-4-4-12 hex strings |
//! | `decimal(p,s)` | Decimal32/64/128/256 of scale <= s (precision checked); integers (checked); decimal strings with at most s significant fractional digits (an exponent is allowed) |
//! | `jsonb` | strings holding valid JSON; Struct, Map, List, LargeList, FixedSizeList, ListView rows serialized to JSON text |
//! | `map` | Map with string keys and any values (non-string values as their JSON text), rebuilt with the registered field names; strings holding JSON objects; Struct (field name → value) |
//! | `string[]` | List, LargeList, FixedSizeList, ListView, LargeListView of any string type |
//! | `double[]` | the same lists of floats or integers (checked as for `double`) |
//!
//! Anything else is refused as `cannot convert <Arrow type> to <column type>`.
//!
//! When rows are written as JSON (`jsonb` from nested arrays, `map` values that are not
//! strings): timestamps become RFC 3339 strings in UTC, dates `YYYY-MM-DD`, decimals
//! strings holding the exact decimal, map keys strings; nulls inside a value become JSON
//! `null` while a null row stays a null. NaN and infinite floats have no JSON form and
//! are refused.

// A `ReshapeError` is built at most once per refused batch; its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use arrow::array::{
    new_null_array, Array, ArrayBuilder, ArrayRef, AsArray, BooleanArray, Date32Array,
    Decimal128Array, FixedSizeBinaryArray, Float32Array, Float64Array, Int32Array, Int64Array,
    ListArray, MapArray, StringArray, StringBuilder, StructArray, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray, UInt32Array,
    UInt64Array,
};
use arrow::buffer::{Buffer, NullBuffer, OffsetBuffer};
use arrow::compute::kernels::cast_utils::string_to_datetime;
use arrow::compute::{cast, cast_with_options, take, CastOptions};
use arrow::datatypes::{
    DataType, Date32Type, Date64Type, Decimal128Type, Float16Type, Float32Type, Float64Type,
    Int16Type, Int32Type, Int64Type, Int8Type, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow::error::ArrowError;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, Utc};
use flight_schema::{ColumnType, ExtraColumns, ResolvedTable};
use serde_json::Value as Json;

/// Why a batch does not fit its table. Every variant is a user error (the batch is wrong,
/// retrying it unchanged fails again); map them to `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReshapeError {
    /// The batch has columns the table does not (and the table rejects extra columns).
    #[error("table '{table}': {}", unknown_columns_message(.columns, .known))]
    UnknownColumns {
        table: String,
        /// The unknown columns, in batch order.
        columns: Vec<String>,
        /// The table's columns, in registered order.
        known: Vec<String>,
    },
    /// The batch has a column name twice.
    #[error("table '{table}', column '{column}': the batch has this column more than once")]
    DuplicateColumn { table: String, column: String },
    /// The batch lacks the time column.
    #[error("table '{table}', column '{column}': missing time column")]
    MissingTimeColumn { table: String, column: String },
    /// The batch lacks a column that is not nullable and has no default.
    #[error("table '{table}', column '{column}': missing column (it is not nullable and has no default)")]
    MissingColumn { table: String, column: String },
    /// A null in a column that does not accept nulls.
    #[error("table '{table}', column '{column}', row {row}: null in a non-null column")]
    NullInNonNullColumn {
        table: String,
        column: String,
        row: usize,
    },
    /// A value that cannot be converted exactly to the column's type.
    #[error(
        "table '{table}', column '{column}', row {row}: cannot convert {from} value {value} to {to}{}",
        parenthesized(.reason)
    )]
    Value {
        table: String,
        column: String,
        row: usize,
        /// The Arrow type of the batch's column.
        from: String,
        /// The offending value as text (strings quoted).
        value: String,
        /// The contract type of the column.
        to: String,
        reason: Option<String>,
    },
    /// An Arrow type that is never converted to the column's type.
    #[error("table '{table}', column '{column}': cannot convert {from} to {to}{}", parenthesized(.hint))]
    Unsupported {
        table: String,
        column: String,
        from: String,
        to: String,
        hint: Option<String>,
    },
    /// The column's registered default cannot be turned into a value of its type.
    #[error(
        "table '{table}', column '{column}': default {default} does not fit type {to}: {reason}"
    )]
    BadDefault {
        table: String,
        column: String,
        default: String,
        to: String,
        reason: String,
    },
    /// Anything else (e.g. a column too large for 32-bit offsets).
    #[error("table '{table}', column '{column}': {reason}")]
    Invalid {
        table: String,
        column: String,
        reason: String,
    },
}

impl ReshapeError {
    /// The column the error is about, if it is about one.
    pub fn column(&self) -> Option<&str> {
        match self {
            Self::UnknownColumns { .. } => None,
            Self::DuplicateColumn { column, .. }
            | Self::MissingTimeColumn { column, .. }
            | Self::MissingColumn { column, .. }
            | Self::NullInNonNullColumn { column, .. }
            | Self::Value { column, .. }
            | Self::Unsupported { column, .. }
            | Self::BadDefault { column, .. }
            | Self::Invalid { column, .. } => Some(column),
        }
    }

    /// The first bad row, for errors about values.
    pub fn row(&self) -> Option<usize> {
        match self {
            Self::NullInNonNullColumn { row, .. } | Self::Value { row, .. } => Some(*row),
            _ => None,
        }
    }
}

fn unknown_columns_message(columns: &[String], known: &[String]) -> String {
    let quoted: Vec<String> = columns.iter().map(|c| format!("'{c}'")).collect();
    let (noun, pronoun) = if columns.len() == 1 {
        ("column", "it")
    } else {
        ("columns", "them")
    };
    format!(
        "unknown {noun} {} (the table has: {}; register {pronoun} or set extra_columns: drop)",
        quoted.join(", "),
        known.join(", ")
    )
}

fn parenthesized(text: &Option<String>) -> String {
    text.as_ref().map(|t| format!(" ({t})")).unwrap_or_default()
}

/// Brings `batch` to the schema of `table`; see the module documentation for the rules.
///
/// The result has exactly `table.arrow_schema` (the same `Arc`) and as many rows as
/// `batch`.
pub fn reshape(table: &ResolvedTable, batch: &RecordBatch) -> Result<RecordBatch, ReshapeError> {
    reshape_inner(table, batch, false)
}

/// [`reshape`], except that a null in a column with a default takes the default, as a
/// missing column does: for row formats (JSON) where a field left out of some rows and
/// a null read the same.
pub fn reshape_nulls_as_defaults(
    table: &ResolvedTable,
    batch: &RecordBatch,
) -> Result<RecordBatch, ReshapeError> {
    reshape_inner(table, batch, true)
}

fn reshape_inner(
    table: &ResolvedTable,
    batch: &RecordBatch,
    nulls_as_defaults: bool,
) -> Result<RecordBatch, ReshapeError> {
    let name = table.name();
    let target = &table.arrow_schema;
    let rows = batch.num_rows();
    let schema = batch.schema();

    let column_type = |column: &str| {
        table
            .column(column)
            .map(|c| c.column_type)
            .ok_or_else(|| ReshapeError::Invalid {
                table: name.to_string(),
                column: column.to_string(),
                reason: "the table's Arrow schema and its definition disagree".into(),
            })
    };

    let default_of = |column: &str| {
        table
            .column(column)
            .and_then(|c| c.default.as_ref())
            .filter(|d| !d.is_null())
    };
    let bad_default =
        |column: &str, default: &Json, ty: ColumnType, reason| ReshapeError::BadDefault {
            table: name.to_string(),
            column: column.to_string(),
            default: default.to_string(),
            to: ty.name(),
            reason,
        };
    let defaults_to_fill = nulls_as_defaults
        && schema
            .fields()
            .iter()
            .zip(batch.columns())
            .any(|(f, a)| a.null_count() > 0 && default_of(f.name()).is_some());

    // Fast path: the batch already has the registered schema.
    if schema.fields() == target.fields() && !defaults_to_fill {
        for (field, array) in target.fields().iter().zip(batch.columns()) {
            if column_type(field.name())? == ColumnType::Jsonb {
                validate_json(array).map_err(|f| {
                    fail_to_error(f, name, field.name(), array.data_type(), ColumnType::Jsonb)
                })?;
            }
            check_nulls(name, field.name(), field.is_nullable(), array.as_ref())?;
        }
        return finish(table, batch.columns().to_vec(), rows);
    }

    // Unknown and duplicate columns.
    let mut unknown = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for field in schema.fields() {
        if target.field_with_name(field.name()).is_err() {
            unknown.push(field.name().clone());
        } else if !seen.insert(field.name().as_str()) {
            return Err(ReshapeError::DuplicateColumn {
                table: name.to_string(),
                column: field.name().clone(),
            });
        }
    }
    if !unknown.is_empty() && table.definition.extra_columns == ExtraColumns::Reject {
        return Err(ReshapeError::UnknownColumns {
            table: name.to_string(),
            columns: unknown,
            known: target.fields().iter().map(|f| f.name().clone()).collect(),
        });
    }

    let mut columns = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        let column = field.name();
        let ty = column_type(column)?;
        let array = match schema.index_of(column) {
            Ok(index) => {
                let input = batch.column(index);
                let array = convert(input, ty, field.data_type())
                    .map_err(|f| fail_to_error(f, name, column, input.data_type(), ty))?;
                match default_of(column) {
                    Some(default) if nulls_as_defaults && array.null_count() > 0 => {
                        let one = default_value(ty, default, field.data_type())
                            .map_err(|reason| bad_default(column, default, ty, reason))?;
                        let valid = arrow::compute::is_not_null(array.as_ref())
                            .map_err(|e| bad_default(column, default, ty, e.to_string()))?;
                        arrow::compute::kernels::zip::zip(
                            &valid,
                            &array,
                            &arrow::array::Scalar::new(one),
                        )
                        .map_err(|e| bad_default(column, default, ty, e.to_string()))?
                    }
                    _ => array,
                }
            }
            Err(_) if *column == table.time_column => {
                return Err(ReshapeError::MissingTimeColumn {
                    table: name.to_string(),
                    column: column.clone(),
                })
            }
            Err(_) => match default_of(column) {
                Some(default) => default_array(ty, default, field.data_type(), rows)
                    .map_err(|reason| bad_default(column, default, ty, reason))?,
                _ if field.is_nullable() => new_null_array(field.data_type(), rows),
                _ => {
                    return Err(ReshapeError::MissingColumn {
                        table: name.to_string(),
                        column: column.clone(),
                    })
                }
            },
        };
        check_nulls(name, column, field.is_nullable(), array.as_ref())?;
        columns.push(array);
    }
    finish(table, columns, rows)
}

/// The calendar range every store and the archive can place a timestamp in: chrono's
/// dates, years -262143 to 262142 (the archive partitions by date and hour; PostgreSQL and
/// ClickHouse, with narrower ranges, send rows beyond theirs to their dead letters). An
/// Arrow timestamp in microseconds, milliseconds or seconds reaches further (i64::MIN
/// microseconds is year -290308); such values are refused here, naming row and value.
fn timestamp_bounds(unit: TimeUnit) -> Option<(i64, i64)> {
    let lo = chrono::NaiveDate::MIN.and_hms_opt(0, 0, 0)?.and_utc();
    let hi = chrono::NaiveDate::MAX
        .and_hms_nano_opt(23, 59, 59, 999_999_999)?
        .and_utc();
    match unit {
        // i64 nanoseconds span 1677-2262 only: always in range.
        TimeUnit::Nanosecond => None,
        TimeUnit::Second => Some((lo.timestamp(), hi.timestamp())),
        TimeUnit::Millisecond => Some((lo.timestamp_millis(), hi.timestamp_millis())),
        TimeUnit::Microsecond => Some((lo.timestamp_micros(), hi.timestamp_micros())),
    }
}

fn check_timestamp_range(
    table: &ResolvedTable,
    field: &arrow::datatypes::Field,
    array: &dyn Array,
) -> Result<(), ReshapeError> {
    let DataType::Timestamp(unit, _) = field.data_type() else {
        return Ok(());
    };
    let Some((lo, hi)) = timestamp_bounds(*unit) else {
        return Ok(());
    };
    let values = cast(array, &DataType::Int64).map_err(|e| ReshapeError::Invalid {
        table: table.name().to_string(),
        column: field.name().clone(),
        reason: e.to_string(),
    })?;
    let values = values.as_primitive::<Int64Type>();
    let (min, max) = (
        arrow::compute::min(values).unwrap_or(0),
        arrow::compute::max(values).unwrap_or(0),
    );
    if min >= lo && max <= hi {
        return Ok(());
    }
    let row = (0..values.len())
        .find(|&r| values.is_valid(r) && !(lo..=hi).contains(&values.value(r)))
        .unwrap_or(0);
    Err(ReshapeError::Value {
        table: table.name().to_string(),
        column: field.name().clone(),
        row,
        from: field.data_type().to_string(),
        value: values.value(row).to_string(),
        to: table
            .column(field.name())
            .map_or_else(|| "timestamp".into(), |c| c.column_type.name()),
        reason: Some("outside the calendar range Sluice stores, years -262143 to 262142".into()),
    })
}

fn finish(
    table: &ResolvedTable,
    columns: Vec<ArrayRef>,
    rows: usize,
) -> Result<RecordBatch, ReshapeError> {
    for (field, array) in table.arrow_schema.fields().iter().zip(&columns) {
        check_timestamp_range(table, field, array.as_ref())?;
    }
    RecordBatch::try_new_with_options(
        table.arrow_schema.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(|e| ReshapeError::Invalid {
        table: table.name().to_string(),
        column: String::new(),
        reason: format!("internal error building the reshaped batch: {e}"),
    })
}

fn check_nulls(
    table: &str,
    column: &str,
    nullable: bool,
    array: &dyn Array,
) -> Result<(), ReshapeError> {
    if nullable {
        return Ok(());
    }
    if let Some(nulls) = array.logical_nulls() {
        if let Some(row) = (0..array.len()).find(|&i| nulls.is_null(i)) {
            return Err(ReshapeError::NullInNonNullColumn {
                table: table.to_string(),
                column: column.to_string(),
                row,
            });
        }
    }
    Ok(())
}

/// A failed column conversion, before the table and column are known.
#[derive(Debug)]
enum Fail {
    Unsupported {
        hint: Option<String>,
    },
    Value {
        row: usize,
        value: String,
        reason: Option<String>,
    },
    Invalid(String),
}

impl From<ArrowError> for Fail {
    fn from(e: ArrowError) -> Self {
        Fail::Invalid(e.to_string())
    }
}

type Conv<T> = Result<T, Fail>;

fn fail_to_error(
    fail: Fail,
    table: &str,
    column: &str,
    from: &DataType,
    to: ColumnType,
) -> ReshapeError {
    let (table, column) = (table.to_string(), column.to_string());
    match fail {
        Fail::Unsupported { hint } => ReshapeError::Unsupported {
            table,
            column,
            from: from.to_string(),
            to: to.name(),
            hint,
        },
        Fail::Value { row, value, reason } => ReshapeError::Value {
            table,
            column,
            row,
            from: from.to_string(),
            value,
            to: to.name(),
            reason,
        },
        Fail::Invalid(reason) => ReshapeError::Invalid {
            table,
            column,
            reason,
        },
    }
}

fn unsupported() -> Fail {
    Fail::Unsupported { hint: None }
}

fn unsupported_hint(hint: impl Into<String>) -> Fail {
    Fail::Unsupported {
        hint: Some(hint.into()),
    }
}

fn value_fail(array: &dyn Array, row: usize, reason: impl Into<String>) -> Fail {
    Fail::Value {
        row,
        value: render(array, row),
        reason: Some(reason.into()),
    }
}

/// The value at `row` as text for an error message: strings quoted, long values cut.
fn render(array: &dyn Array, row: usize) -> String {
    const MAX: usize = 80;
    if array.is_null(row) {
        return "null".into();
    }
    let cut = |s: &str| -> String {
        if s.chars().count() > MAX {
            format!("{}...", s.chars().take(MAX).collect::<String>())
        } else {
            s.to_string()
        }
    };
    match string_at(array, row) {
        Some(s) => format!("{:?}", cut(s)),
        None => ArrayFormatter::try_new(array, &FormatOptions::default())
            .and_then(|f| f.value(row).try_to_string())
            .or_else(|_| {
                // E.g. a timestamp beyond chrono's range: show the raw number.
                let raw = cast(&array.slice(row, 1), &DataType::Int64)?;
                Ok::<_, ArrowError>(raw.as_primitive::<Int64Type>().value(0).to_string())
            })
            .map(|s| cut(&s))
            .unwrap_or_else(|_| "?".into()),
    }
}

/// The string at `row` of a Utf8 / LargeUtf8 / Utf8View array (None for other types).
fn string_at(array: &dyn Array, row: usize) -> Option<&str> {
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(row)),
        DataType::Utf8View => Some(array.as_string_view().value(row)),
        _ => None,
    }
}

fn is_integer(dt: &DataType) -> bool {
    dt.is_integer()
}

/// Replaces a dictionary array by its values (any key type); other arrays pass through.
fn unpack_dictionary(array: &ArrayRef) -> Conv<ArrayRef> {
    match array.data_type() {
        DataType::Dictionary(_, _) => {
            let dict = array.as_any_dictionary();
            let values = take(dict.values().as_ref(), dict.keys(), None)?;
            unpack_dictionary(&values)
        }
        _ => Ok(array.clone()),
    }
}

/// Any string array as Utf8, or None if it is not a string array.
fn to_utf8(array: &ArrayRef) -> Conv<Option<ArrayRef>> {
    Ok(match array.data_type() {
        DataType::Utf8 => Some(array.clone()),
        DataType::LargeUtf8 | DataType::Utf8View => Some(cast(array, &DataType::Utf8)?),
        DataType::Dictionary(_, _) => return to_utf8(&unpack_dictionary(array)?),
        _ => None,
    })
}

/// Casts with `safe: true` and refuses the batch if any non-null value became null.
fn checked_cast(array: &ArrayRef, to: &DataType, reason: &str) -> Conv<ArrayRef> {
    let out = cast_with_options(
        array,
        to,
        &CastOptions {
            safe: true,
            ..Default::default()
        },
    )?;
    if out.null_count() != array.null_count() || out.logical_nulls() != array.logical_nulls() {
        let out_nulls = out.logical_nulls();
        let in_nulls = array.logical_nulls();
        let lost = (0..array.len()).find(|&i| {
            out_nulls.as_ref().is_some_and(|n| n.is_null(i))
                && in_nulls.as_ref().is_none_or(|n| n.is_valid(i))
        });
        if let Some(row) = lost {
            return Err(value_fail(array.as_ref(), row, reason));
        }
    }
    Ok(out)
}

/// Maps every non-null row through `f`; nulls become `T::default()` and keep their
/// null bit. The first `Err` refuses the batch at that row.
fn map_rows<T: Default>(
    array: &dyn Array,
    mut f: impl FnMut(usize) -> Result<T, String>,
) -> Conv<(Vec<T>, Option<NullBuffer>)> {
    let nulls = array.logical_nulls();
    let mut out = Vec::with_capacity(array.len());
    for row in 0..array.len() {
        if nulls.as_ref().is_some_and(|n| n.is_null(row)) {
            out.push(T::default());
            continue;
        }
        match f(row) {
            Ok(v) => out.push(v),
            Err(reason) => return Err(value_fail(array, row, reason)),
        }
    }
    Ok((out, nulls))
}

/// Converts one column to the Arrow type `target` of contract type `ty`.
fn convert(array: &ArrayRef, ty: ColumnType, target: &DataType) -> Conv<ArrayRef> {
    if array.data_type() == &DataType::Null {
        return Ok(new_null_array(target, array.len()));
    }
    let array = unpack_dictionary(array)?;
    if array.data_type() == &DataType::Null {
        return Ok(new_null_array(target, array.len()));
    }
    if array.data_type() == target {
        if ty == ColumnType::Jsonb {
            validate_json(&array)?;
        }
        return Ok(array);
    }
    match ty {
        ColumnType::Bool => to_bool(&array),
        ColumnType::Int32 | ColumnType::Int64 => to_int(&array, target),
        ColumnType::Float => to_float32(&array),
        ColumnType::Double => to_float64(&array),
        ColumnType::String => to_utf8(&array)?.ok_or_else(unsupported),
        ColumnType::Timestamp(unit) => to_timestamp(&array, unit),
        ColumnType::Date => to_date(&array),
        ColumnType::Uuid => to_uuid(&array),
        ColumnType::Decimal { precision, scale } => to_decimal(&array, precision, scale),
        ColumnType::Jsonb => to_jsonb(&array),
        ColumnType::Map => to_map(&array, target),
        ColumnType::StringArray => to_list(&array, target, ColumnType::String),
        ColumnType::DoubleArray => to_list(&array, target, ColumnType::Double),
        ColumnType::TimestampNsArray => to_list(
            &array,
            target,
            ColumnType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond),
        ),
        ColumnType::MapArray => to_list(&array, target, ColumnType::Map),
    }
}

fn to_bool(array: &ArrayRef) -> Conv<ArrayRef> {
    let Some(strings) = to_utf8(array)? else {
        return Err(unsupported());
    };
    let s = strings.as_string::<i32>();
    let (values, nulls) = map_rows(strings.as_ref(), |row| {
        let v = s.value(row);
        if v.eq_ignore_ascii_case("true") {
            Ok(true)
        } else if v.eq_ignore_ascii_case("false") {
            Ok(false)
        } else {
            Err("not 'true' or 'false'".into())
        }
    })?;
    Ok(Arc::new(BooleanArray::new(values.into(), nulls)))
}

fn to_int(array: &ArrayRef, target: &DataType) -> Conv<ArrayRef> {
    let dt = array.data_type();
    if is_integer(dt) {
        return checked_cast(array, target, "out of range");
    }
    if let Some(strings) = to_utf8(array)? {
        return checked_cast(&strings, target, "not an integer in range");
    }
    if dt.is_floating()
        || matches!(
            dt,
            DataType::Decimal32(..)
                | DataType::Decimal64(..)
                | DataType::Decimal128(..)
                | DataType::Decimal256(..)
        )
    {
        return Err(unsupported_hint(
            "fractional numbers are not converted to integers; send integers or register the column as double",
        ));
    }
    Err(unsupported())
}

fn to_float32(array: &ArrayRef) -> Conv<ArrayRef> {
    match array.data_type() {
        DataType::Float16
        | DataType::Int8
        | DataType::Int16
        | DataType::UInt8
        | DataType::UInt16 => Ok(cast(array, &DataType::Float32)?),
        DataType::Float64
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt32
        | DataType::UInt64 => Err(unsupported_hint(
            "not every value of this type fits a 32-bit float exactly; send float32 or register the column as double",
        )),
        _ => match to_utf8(array)? {
            Some(strings) => checked_cast(&strings, &DataType::Float32, "not a number"),
            None => Err(unsupported()),
        },
    }
}

/// Largest integer magnitude a double holds exactly together with all smaller ones.
const MAX_EXACT_DOUBLE_INT: u64 = 1 << 53;

fn to_float64(array: &ArrayRef) -> Conv<ArrayRef> {
    let reason = "beyond ±2^53, not exact as a double";
    match array.data_type() {
        DataType::Float16
        | DataType::Float32
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => Ok(cast(array, &DataType::Float64)?),
        DataType::Int64 => {
            let ints = array.as_primitive::<Int64Type>();
            let (values, nulls) = map_rows(array.as_ref(), |row| {
                let v = ints.value(row);
                if v.unsigned_abs() <= MAX_EXACT_DOUBLE_INT {
                    Ok(v as f64)
                } else {
                    Err(reason.into())
                }
            })?;
            Ok(Arc::new(Float64Array::new(values.into(), nulls)))
        }
        DataType::UInt64 => {
            let ints = array.as_primitive::<UInt64Type>();
            let (values, nulls) = map_rows(array.as_ref(), |row| {
                let v = ints.value(row);
                if v <= MAX_EXACT_DOUBLE_INT {
                    Ok(v as f64)
                } else {
                    Err(reason.into())
                }
            })?;
            Ok(Arc::new(Float64Array::new(values.into(), nulls)))
        }
        _ => match to_utf8(array)? {
            Some(strings) => checked_cast(&strings, &DataType::Float64, "not a number"),
            None => Err(unsupported()),
        },
    }
}

fn per_second(unit: TimeUnit) -> i64 {
    match unit {
        TimeUnit::Second => 1,
        TimeUnit::Millisecond => 1_000,
        TimeUnit::Microsecond => 1_000_000,
        TimeUnit::Nanosecond => 1_000_000_000,
    }
}

/// A timestamp value in another unit; a coarser unit truncates towards the past.
fn rescale_timestamp(v: i64, from: TimeUnit, to: TimeUnit) -> Option<i64> {
    let (f, t) = (per_second(from), per_second(to));
    if t >= f {
        v.checked_mul(t / f)
    } else {
        Some(v.div_euclid(f / t))
    }
}

fn datetime_to_unit(dt: DateTime<Utc>, unit: TimeUnit) -> Option<i64> {
    let per = per_second(unit);
    let sub = i64::from(dt.timestamp_subsec_nanos()) / (1_000_000_000 / per);
    dt.timestamp().checked_mul(per)?.checked_add(sub)
}

fn unit_to_datetime(v: i64, unit: TimeUnit) -> Option<DateTime<Utc>> {
    let per = per_second(unit);
    let nanos = v.rem_euclid(per) * (1_000_000_000 / per);
    DateTime::from_timestamp(v.div_euclid(per), nanos as u32)
}

fn timestamp_array(unit: TimeUnit, values: Vec<i64>, nulls: Option<NullBuffer>) -> ArrayRef {
    const UTC: &str = "UTC";
    match unit {
        TimeUnit::Second => {
            Arc::new(TimestampSecondArray::new(values.into(), nulls).with_timezone(UTC))
        }
        TimeUnit::Millisecond => {
            Arc::new(TimestampMillisecondArray::new(values.into(), nulls).with_timezone(UTC))
        }
        TimeUnit::Microsecond => {
            Arc::new(TimestampMicrosecondArray::new(values.into(), nulls).with_timezone(UTC))
        }
        TimeUnit::Nanosecond => {
            Arc::new(TimestampNanosecondArray::new(values.into(), nulls).with_timezone(UTC))
        }
    }
}

fn to_timestamp(array: &ArrayRef, unit: TimeUnit) -> Conv<ArrayRef> {
    let out_of_range = "out of the range of the column's unit";
    let (values, nulls) = match array.data_type() {
        DataType::Timestamp(from, _) => {
            let from = *from;
            let raw = cast(array, &DataType::Int64)?;
            let raw = raw.as_primitive::<Int64Type>();
            map_rows(array.as_ref(), |row| {
                rescale_timestamp(raw.value(row), from, unit).ok_or_else(|| out_of_range.into())
            })?
        }
        DataType::Date32 => {
            let days = array.as_primitive::<Date32Type>();
            map_rows(array.as_ref(), |row| {
                i64::from(days.value(row))
                    .checked_mul(86_400 * per_second(unit))
                    .ok_or_else(|| out_of_range.into())
            })?
        }
        DataType::Date64 => {
            let ms = array.as_primitive::<Date64Type>();
            map_rows(array.as_ref(), |row| {
                rescale_timestamp(ms.value(row), TimeUnit::Millisecond, unit)
                    .ok_or_else(|| out_of_range.into())
            })?
        }
        dt if is_integer(dt) => {
            return Err(unsupported_hint(
                "integers are not taken as timestamps, their unit would be a guess; send an Arrow timestamp or RFC 3339 strings",
            ))
        }
        _ => {
            let Some(strings) = to_utf8(array)? else {
                return Err(unsupported());
            };
            let s = strings.as_string::<i32>();
            map_rows(strings.as_ref(), |row| {
                let dt = string_to_datetime(&Utc, s.value(row))
                    .map_err(|_| "not an RFC 3339 / ISO 8601 timestamp".to_string())?;
                datetime_to_unit(dt, unit).ok_or_else(|| out_of_range.into())
            })?
        }
    };
    Ok(timestamp_array(unit, values, nulls))
}

/// Days since 1970-01-01 of a strict `YYYY-MM-DD` string.
fn parse_date(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(
        s[0..4].parse().ok()?,
        s[5..7].parse().ok()?,
        s[8..10].parse().ok()?,
    )?;
    Some(date.num_days_from_ce() - EPOCH_DAYS_FROM_CE)
}

/// `NaiveDate::from_ymd(1970, 1, 1).num_days_from_ce()`.
const EPOCH_DAYS_FROM_CE: i32 = 719_163;

fn to_date(array: &ArrayRef) -> Conv<ArrayRef> {
    let (values, nulls) = match array.data_type() {
        DataType::Date64 => {
            let ms = array.as_primitive::<Date64Type>();
            map_rows(array.as_ref(), |row| {
                i32::try_from(ms.value(row).div_euclid(86_400_000))
                    .map_err(|_| "out of range".to_string())
            })?
        }
        DataType::Timestamp(..) => {
            return Err(unsupported_hint(
                "a timestamp would lose its time of day; send dates or 'YYYY-MM-DD' strings",
            ))
        }
        _ => {
            let Some(strings) = to_utf8(array)? else {
                return Err(unsupported());
            };
            let s = strings.as_string::<i32>();
            map_rows(strings.as_ref(), |row| {
                parse_date(s.value(row)).ok_or_else(|| "not a 'YYYY-MM-DD' date".to_string())
            })?
        }
    };
    Ok(Arc::new(Date32Array::new(values.into(), nulls)))
}

/// The bytes of a UUID in the canonical 8-4-4-4-12 hex form (either case).
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut high: Option<u8> = None;
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let d = (c as char).to_digit(16)? as u8;
        match high.take() {
            None => high = Some(d),
            Some(h) => {
                out[n] = (h << 4) | d;
                n += 1;
            }
        }
    }
    Some(out)
}

fn to_uuid(array: &ArrayRef) -> Conv<ArrayRef> {
    let (values, nulls) = match array.data_type() {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            let bin = cast(array, &DataType::Binary)?;
            let b = bin.as_binary::<i32>();
            map_rows(array.as_ref(), |row| {
                <[u8; 16]>::try_from(b.value(row))
                    .map_err(|_| format!("{} bytes, a uuid has 16", b.value(row).len()))
            })?
        }
        _ => {
            let Some(strings) = to_utf8(array)? else {
                return Err(unsupported());
            };
            let s = strings.as_string::<i32>();
            map_rows(strings.as_ref(), |row| {
                parse_uuid(s.value(row))
                    .ok_or_else(|| "not a uuid in 8-4-4-4-12 hex form".to_string())
            })?
        }
    };
    let bytes: Vec<u8> = values.into_iter().flatten().collect();
    Ok(Arc::new(FixedSizeBinaryArray::try_new(
        16,
        Buffer::from_vec(bytes),
        nulls,
    )?))
}

fn pow10(n: u32) -> Option<i128> {
    10i128.checked_pow(n)
}

/// Parses a decimal string (`-12.50`, `+3`, `.5`, `1.2e3`) to the unscaled value of
/// `decimal(precision, scale)`. Refuses significant digits beyond the scale.
fn parse_decimal(s: &str, precision: u8, scale: i8) -> Result<i128, String> {
    let bad = || "not a decimal number".to_string();
    let overflow = || format!("out of range for decimal({precision},{scale})");
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(p) => (&rest[..p], rest[p + 1..].parse::<i32>().map_err(|_| bad())?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|c| c.is_ascii_digit())
        || !frac.bytes().all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|c| c - b'0').collect();
    // value = digits * 10^(exponent - frac.len()); unscaled = value * 10^scale
    let shift = i64::from(exponent) - frac.len() as i64 + i64::from(scale);
    if shift < 0 {
        let keep = digits.len().saturating_sub(shift.unsigned_abs() as usize);
        if digits[keep..].iter().any(|&d| d != 0) {
            return Err(format!("more fractional digits than the scale {scale}"));
        }
        digits.truncate(keep);
    }
    let mut v: i128 = 0;
    for d in digits {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(d)))
            .ok_or_else(overflow)?;
    }
    if shift > 0 && v != 0 {
        let m = u32::try_from(shift)
            .ok()
            .and_then(pow10)
            .ok_or_else(overflow)?;
        v = v.checked_mul(m).ok_or_else(overflow)?;
    }
    if v.unsigned_abs() >= pow10(u32::from(precision)).unwrap_or(i128::MAX) as u128 {
        return Err(overflow());
    }
    Ok(if negative { -v } else { v })
}

fn decimal_scale(dt: &DataType) -> Option<i8> {
    match dt {
        DataType::Decimal32(_, s)
        | DataType::Decimal64(_, s)
        | DataType::Decimal128(_, s)
        | DataType::Decimal256(_, s) => Some(*s),
        _ => None,
    }
}

fn to_decimal(array: &ArrayRef, precision: u8, scale: i8) -> Conv<ArrayRef> {
    let dt = array.data_type();
    let limit = pow10(u32::from(precision)).unwrap_or(i128::MAX);
    let overflow = format!("out of range for decimal({precision},{scale})");
    // Integers and decimals: widen to Decimal128(38, from_scale) exactly, then rescale.
    let from_scale = match (decimal_scale(dt), is_integer(dt)) {
        (Some(s), _) if s > scale => {
            return Err(unsupported_hint(format!(
                "{dt} has more fractional digits than the column's scale {scale}"
            )))
        }
        (Some(s), _) => Some(s),
        (None, true) => Some(0),
        (None, false) => None,
    };
    let (values, nulls) = if let Some(from_scale) = from_scale {
        let wide = checked_cast(array, &DataType::Decimal128(38, from_scale), &overflow)?;
        let wide = wide.as_primitive::<Decimal128Type>();
        let factor = pow10((i32::from(scale) - i32::from(from_scale)) as u32);
        map_rows(array.as_ref(), |row| {
            factor
                .and_then(|f| wide.value(row).checked_mul(f))
                .filter(|v| v.unsigned_abs() < limit as u128)
                .ok_or_else(|| overflow.clone())
        })?
    } else if dt.is_floating() {
        return Err(unsupported_hint(
            "floating-point values are inexact; send decimals, integers or strings",
        ));
    } else {
        let Some(strings) = to_utf8(array)? else {
            return Err(unsupported());
        };
        let s = strings.as_string::<i32>();
        map_rows(strings.as_ref(), |row| {
            parse_decimal(s.value(row), precision, scale)
        })?
    };
    Ok(Arc::new(
        Decimal128Array::new(values.into(), nulls).with_precision_and_scale(precision, scale)?,
    ))
}

/// Checks that every non-null value of a string array is valid JSON.
fn validate_json(array: &ArrayRef) -> Conv<()> {
    let Some(strings) = to_utf8(array)? else {
        return Err(unsupported());
    };
    let s = strings.as_string::<i32>();
    map_rows(strings.as_ref(), |row| {
        serde_json::from_str::<Json>(s.value(row))
            .map(|_| ())
            .map_err(|e| format!("not valid JSON: {e}"))
    })?;
    Ok(())
}

fn is_nested(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Struct(_)
            | DataType::Map(..)
            | DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::ListView(_)
            | DataType::LargeListView(_)
    )
}

fn to_jsonb(array: &ArrayRef) -> Conv<ArrayRef> {
    if is_nested(array.data_type()) {
        let mut out = StringBuilder::new();
        for row in 0..array.len() {
            if array.is_null(row) {
                out.append_null();
            } else {
                let v = json_value(array.as_ref(), row)
                    .map_err(|r| value_fail(array.as_ref(), row, r))?;
                out.append_value(v.to_string());
            }
        }
        return Ok(Arc::new(out.finish()));
    }
    let Some(strings) = to_utf8(array)? else {
        return Err(unsupported());
    };
    validate_json(&strings)?;
    Ok(strings)
}

/// The integer at `row` of an integer array, as usize (dictionary keys).
fn index_at(keys: &dyn Array, row: usize) -> Option<usize> {
    let v: i128 = match keys.data_type() {
        DataType::Int8 => keys.as_primitive::<Int8Type>().value(row).into(),
        DataType::Int16 => keys.as_primitive::<Int16Type>().value(row).into(),
        DataType::Int32 => keys.as_primitive::<Int32Type>().value(row).into(),
        DataType::Int64 => keys.as_primitive::<Int64Type>().value(row).into(),
        DataType::UInt8 => keys.as_primitive::<UInt8Type>().value(row).into(),
        DataType::UInt16 => keys.as_primitive::<UInt16Type>().value(row).into(),
        DataType::UInt32 => keys.as_primitive::<UInt32Type>().value(row).into(),
        DataType::UInt64 => keys.as_primitive::<UInt64Type>().value(row).into(),
        _ => return None,
    };
    usize::try_from(v).ok()
}

fn float_json(v: f64) -> Result<Json, String> {
    serde_json::Number::from_f64(v)
        .map(Json::Number)
        .ok_or_else(|| format!("{v} has no JSON form"))
}

/// One Arrow value as JSON (see the module documentation for the rendering).
fn json_value(array: &dyn Array, row: usize) -> Result<Json, String> {
    if array.is_null(row) {
        return Ok(Json::Null);
    }
    Ok(match array.data_type() {
        DataType::Null => Json::Null,
        DataType::Boolean => Json::Bool(array.as_boolean().value(row)),
        DataType::Int8 => array.as_primitive::<Int8Type>().value(row).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(row).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(row).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(row).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(row).into(),
        // Through the shortest decimal text so 0.1f32 stays 0.1, not 0.10000000149.
        DataType::Float16 => float_json(
            array
                .as_primitive::<Float16Type>()
                .value(row)
                .to_string()
                .parse()
                .unwrap_or(f64::NAN),
        )?,
        DataType::Float32 => float_json(
            array
                .as_primitive::<Float32Type>()
                .value(row)
                .to_string()
                .parse()
                .unwrap_or(f64::NAN),
        )?,
        DataType::Float64 => float_json(array.as_primitive::<Float64Type>().value(row))?,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            Json::String(string_at(array, row).unwrap_or_default().to_string())
        }
        DataType::Timestamp(unit, _) => {
            let v = match unit {
                TimeUnit::Second => array.as_primitive::<TimestampSecondType>().value(row),
                TimeUnit::Millisecond => {
                    array.as_primitive::<TimestampMillisecondType>().value(row)
                }
                TimeUnit::Microsecond => {
                    array.as_primitive::<TimestampMicrosecondType>().value(row)
                }
                TimeUnit::Nanosecond => array.as_primitive::<TimestampNanosecondType>().value(row),
            };
            let dt =
                unit_to_datetime(v, *unit).ok_or_else(|| format!("timestamp {v} out of range"))?;
            Json::String(dt.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        }
        DataType::Date32 | DataType::Date64 => {
            let days = match array.data_type() {
                DataType::Date32 => i64::from(array.as_primitive::<Date32Type>().value(row)),
                _ => array
                    .as_primitive::<Date64Type>()
                    .value(row)
                    .div_euclid(86_400_000),
            };
            let date = i32::try_from(days)
                .ok()
                .and_then(|d| d.checked_add(EPOCH_DAYS_FROM_CE))
                .and_then(NaiveDate::from_num_days_from_ce_opt)
                .ok_or_else(|| format!("date {days} out of range"))?;
            Json::String(date.format("%Y-%m-%d").to_string())
        }
        DataType::Dictionary(_, _) => {
            let dict = array.as_any_dictionary();
            let key = index_at(dict.keys(), row).ok_or("bad dictionary key")?;
            json_value(dict.values().as_ref(), key)?
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut object = serde_json::Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                object.insert(field.name().clone(), json_value(column.as_ref(), row)?);
            }
            Json::Object(object)
        }
        DataType::Map(..) => {
            let m = array.as_map();
            let entries = m.value(row);
            let (keys, values) = (entries.column(0), entries.column(1));
            let mut object = serde_json::Map::new();
            for j in 0..entries.len() {
                let key = match json_value(keys.as_ref(), j)? {
                    Json::String(s) => s,
                    Json::Null => return Err("null map key".into()),
                    other => other.to_string(),
                };
                object.insert(key, json_value(values.as_ref(), j)?);
            }
            Json::Object(object)
        }
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(..)
        | DataType::ListView(_)
        | DataType::LargeListView(_) => {
            let items = match array.data_type() {
                DataType::List(_) => array.as_list::<i32>().value(row),
                DataType::LargeList(_) => array.as_list::<i64>().value(row),
                DataType::FixedSizeList(..) => array.as_fixed_size_list().value(row),
                DataType::ListView(_) => array.as_list_view::<i32>().value(row),
                _ => array.as_list_view::<i64>().value(row),
            };
            Json::Array(
                (0..items.len())
                    .map(|j| json_value(items.as_ref(), j))
                    .collect::<Result<_, _>>()?,
            )
        }
        // Decimals (exact text), times, durations, binaries...: their display text.
        _ => Json::String(
            ArrayFormatter::try_new(array, &FormatOptions::default())
                .map_err(|e| e.to_string())?
                .value(row)
                .to_string(),
        ),
    })
}

/// A value as map-value text: strings as they are, other values as their JSON text.
fn text_of(array: &dyn Array, row: usize) -> Result<Option<String>, String> {
    Ok(match json_value(array, row)? {
        Json::Null => None,
        Json::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

/// Builds a registered-shape map array row by row.
struct MapAccum {
    offsets: Vec<i32>,
    keys: StringBuilder,
    values: StringBuilder,
    valid: Vec<bool>,
}

impl MapAccum {
    fn new(rows: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Self {
            offsets,
            keys: StringBuilder::new(),
            values: StringBuilder::new(),
            valid: Vec::with_capacity(rows),
        }
    }

    fn entry(&mut self, key: &str, value: Option<&str>) {
        self.keys.append_value(key);
        self.values.append_option(value);
    }

    fn end_row(&mut self, valid: bool) -> Conv<()> {
        let end = i32::try_from(self.keys.len())
            .map_err(|_| Fail::Invalid("too many map entries in one batch".into()))?;
        self.offsets.push(end);
        self.valid.push(valid);
        Ok(())
    }

    fn finish(mut self, target: &DataType) -> Conv<ArrayRef> {
        let DataType::Map(entries_field, sorted) = target else {
            return Err(Fail::Invalid(format!("registered map type is {target}")));
        };
        let DataType::Struct(kv_fields) = entries_field.data_type() else {
            return Err(Fail::Invalid(format!("registered map type is {target}")));
        };
        let entries = StructArray::try_new(
            kv_fields.clone(),
            vec![
                Arc::new(self.keys.finish()) as ArrayRef,
                Arc::new(self.values.finish()),
            ],
            None,
        )?;
        let nulls = if self.valid.iter().all(|v| *v) {
            None
        } else {
            Some(NullBuffer::from(std::mem::take(&mut self.valid)))
        };
        Ok(Arc::new(MapArray::try_new(
            entries_field.clone(),
            OffsetBuffer::new(self.offsets.into()),
            entries,
            nulls,
            *sorted,
        )?))
    }
}

fn map_entries_from_json(accum: &mut MapAccum, object: &serde_json::Map<String, Json>) {
    for (key, value) in object {
        match value {
            Json::Null => accum.entry(key, None),
            Json::String(s) => accum.entry(key, Some(s)),
            other => accum.entry(key, Some(&other.to_string())),
        }
    }
}

fn to_map(array: &ArrayRef, target: &DataType) -> Conv<ArrayRef> {
    let rows = array.len();
    let mut accum = MapAccum::new(rows);
    match array.data_type() {
        DataType::Map(..) => {
            let m = array.as_map();
            let keys = unpack_dictionary(m.keys())?;
            let values = unpack_dictionary(m.values())?;
            if !matches!(
                keys.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) {
                return Err(unsupported_hint("map keys must be strings"));
            }
            let offsets = m.value_offsets();
            for row in 0..rows {
                if m.is_null(row) {
                    accum.end_row(false)?;
                    continue;
                }
                for j in offsets[row] as usize..offsets[row + 1] as usize {
                    let key = string_at(keys.as_ref(), j)
                        .filter(|_| keys.is_valid(j))
                        .ok_or_else(|| value_fail(array.as_ref(), row, "null map key"))?;
                    let value = text_of(values.as_ref(), j)
                        .map_err(|r| value_fail(array.as_ref(), row, r))?;
                    accum.entry(key, value.as_deref());
                }
                accum.end_row(true)?;
            }
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            for row in 0..rows {
                if s.is_null(row) {
                    accum.end_row(false)?;
                    continue;
                }
                for (field, column) in fields.iter().zip(s.columns()) {
                    let value = text_of(column.as_ref(), row)
                        .map_err(|r| value_fail(array.as_ref(), row, r))?;
                    accum.entry(field.name(), value.as_deref());
                }
                accum.end_row(true)?;
            }
        }
        _ => {
            let Some(strings) = to_utf8(array)? else {
                return Err(unsupported());
            };
            let s = strings.as_string::<i32>();
            for row in 0..rows {
                if s.is_null(row) {
                    accum.end_row(false)?;
                    continue;
                }
                match serde_json::from_str::<Json>(s.value(row)) {
                    Ok(Json::Object(object)) => map_entries_from_json(&mut accum, &object),
                    Ok(_) => return Err(value_fail(strings.as_ref(), row, "not a JSON object")),
                    Err(e) => {
                        return Err(value_fail(
                            strings.as_ref(),
                            row,
                            format!("not valid JSON: {e}"),
                        ))
                    }
                }
                accum.end_row(true)?;
            }
        }
    }
    accum.finish(target)
}

/// Any list array as (row offsets from 0, the referenced child values in row order).
/// Null rows get no elements. None if `array` is not a list.
fn flatten_list(array: &ArrayRef) -> Conv<Option<(Vec<i32>, ArrayRef)>> {
    let rows = array.len();
    let (ranges, values): (Vec<(usize, usize)>, &ArrayRef) = match array.data_type() {
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            let o = l.value_offsets();
            (
                (0..rows)
                    .map(|i| (o[i] as usize, (o[i + 1] - o[i]) as usize))
                    .collect(),
                l.values(),
            )
        }
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            let o = l.value_offsets();
            (
                (0..rows)
                    .map(|i| (o[i] as usize, (o[i + 1] - o[i]) as usize))
                    .collect(),
                l.values(),
            )
        }
        DataType::FixedSizeList(_, size) => {
            let l = array.as_fixed_size_list();
            let size = *size as usize;
            (
                (0..rows)
                    .map(|i| (l.value_offset(i) as usize, size))
                    .collect(),
                l.values(),
            )
        }
        DataType::ListView(_) => {
            let l = array.as_list_view::<i32>();
            let (o, s) = (l.value_offsets(), l.value_sizes());
            (
                (0..rows).map(|i| (o[i] as usize, s[i] as usize)).collect(),
                l.values(),
            )
        }
        DataType::LargeListView(_) => {
            let l = array.as_list_view::<i64>();
            let (o, s) = (l.value_offsets(), l.value_sizes());
            (
                (0..rows).map(|i| (o[i] as usize, s[i] as usize)).collect(),
                l.values(),
            )
        }
        _ => return Ok(None),
    };
    let nulls = array.logical_nulls();
    let ranges: Vec<(usize, usize)> = ranges
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if nulls.as_ref().is_some_and(|n| n.is_null(i)) {
                (r.0, 0)
            } else {
                r
            }
        })
        .collect();
    let too_long = || Fail::Invalid("a list column with more than 2^31 elements".into());
    let mut offsets = Vec::with_capacity(rows + 1);
    offsets.push(0i32);
    let mut total = 0usize;
    for &(_, len) in &ranges {
        total += len;
        offsets.push(i32::try_from(total).map_err(|_| too_long())?);
    }
    let non_empty: Vec<(usize, usize)> = ranges.iter().copied().filter(|r| r.1 > 0).collect();
    let contiguous = non_empty.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0);
    let flat = match non_empty.first() {
        None => values.slice(0, 0),
        Some(&(start, _)) if contiguous => values.slice(start, total),
        Some(_) => {
            let indices = UInt64Array::from(
                non_empty
                    .iter()
                    .flat_map(|&(start, len)| (start as u64)..(start + len) as u64)
                    .collect::<Vec<u64>>(),
            );
            take(values.as_ref(), &indices, None)?
        }
    };
    Ok(Some((offsets, flat)))
}

fn to_list(array: &ArrayRef, target: &DataType, item: ColumnType) -> Conv<ArrayRef> {
    let DataType::List(item_field) = target else {
        return Err(Fail::Invalid(format!("registered list type is {target}")));
    };
    let Some((offsets, values)) = flatten_list(array)? else {
        return Err(unsupported());
    };
    let converted = match convert(&values, item, item_field.data_type()) {
        Ok(v) => v,
        Err(Fail::Value { row, value, reason }) => {
            // `row` is an element index; report the list row holding it.
            let list_row = offsets
                .partition_point(|&o| o as usize <= row)
                .saturating_sub(1);
            return Err(Fail::Value {
                row: list_row,
                value,
                reason: Some(match reason {
                    Some(r) => format!("list element {}: {r}", row - offsets[list_row] as usize),
                    None => format!("list element {}", row - offsets[list_row] as usize),
                }),
            });
        }
        Err(e) => return Err(e),
    };
    Ok(Arc::new(ListArray::try_new(
        item_field.clone(),
        OffsetBuffer::new(offsets.into()),
        converted,
        array.logical_nulls(),
    )?))
}

/// Whether `table`'s registered defaults all convert to their columns' types (checked
/// at registration: a default that does not would refuse every later batch lacking its
/// column). The error names the column, the default and why.
pub fn check_defaults(table: &ResolvedTable) -> Result<(), ReshapeError> {
    for field in table.arrow_schema.fields() {
        let Some(column) = table.column(field.name()) else {
            continue;
        };
        if let Some(default) = column.default.as_ref().filter(|d| !d.is_null()) {
            default_array(column.column_type, default, field.data_type(), 1).map_err(|reason| {
                ReshapeError::BadDefault {
                    table: table.name().to_string(),
                    column: field.name().clone(),
                    default: default.to_string(),
                    to: column.column_type.name(),
                    reason,
                }
            })?;
        }
    }
    Ok(())
}

/// A column of `rows` copies of the registered default.
fn default_array(
    ty: ColumnType,
    default: &Json,
    target: &DataType,
    rows: usize,
) -> Result<ArrayRef, String> {
    let one = default_value(ty, default, target)?;
    let rows = u32::try_from(rows).map_err(|_| "batch too long".to_string())?;
    let indices = UInt32Array::from(vec![0u32; rows as usize]);
    take(one.as_ref(), &indices, None).map_err(|e| e.to_string())
}

/// The registered default as a one-row array of the column's type.
fn default_value(ty: ColumnType, default: &Json, target: &DataType) -> Result<ArrayRef, String> {
    let mismatch = || format!("expected a value of type {ty}");
    // Converts a one-row string array with the batch rules.
    let from_string = |s: &str| -> Result<ArrayRef, String> {
        let one: ArrayRef = Arc::new(StringArray::from(vec![s]));
        convert(&one, ty, target).map_err(|f| match f {
            Fail::Value { reason, .. } => reason.unwrap_or_else(mismatch),
            Fail::Unsupported { .. } => mismatch(),
            Fail::Invalid(r) => r,
        })
    };
    Ok(match (ty, default) {
        (_, Json::Null) => new_null_array(target, 1),
        (ColumnType::Bool, Json::Bool(b)) => Arc::new(BooleanArray::from(vec![*b])),
        (ColumnType::Int32, Json::Number(n)) => Arc::new(Int32Array::from(vec![n
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(mismatch)?])),
        (ColumnType::Int64, Json::Number(n)) => {
            Arc::new(Int64Array::from(vec![n.as_i64().ok_or_else(mismatch)?]))
        }
        (ColumnType::Float, Json::Number(n)) => Arc::new(Float32Array::from(vec![n
            .as_f64()
            .ok_or_else(mismatch)?
            as f32])),
        (ColumnType::Double, Json::Number(n)) => {
            Arc::new(Float64Array::from(vec![n.as_f64().ok_or_else(mismatch)?]))
        }
        (ColumnType::Timestamp(unit), Json::Number(n)) => {
            timestamp_array(unit, vec![n.as_i64().ok_or_else(mismatch)?], None)
        }
        (ColumnType::Decimal { precision, scale }, Json::Number(n)) => Arc::new(
            Decimal128Array::from(vec![parse_decimal(&n.to_string(), precision, scale)?])
                .with_precision_and_scale(precision, scale)
                .map_err(|e| e.to_string())?,
        ),
        (
            ColumnType::String
            | ColumnType::Timestamp(_)
            | ColumnType::Date
            | ColumnType::Uuid
            | ColumnType::Decimal { .. },
            Json::String(s),
        ) => from_string(s)?,
        (ColumnType::Jsonb, v) => Arc::new(StringArray::from(vec![v.to_string()])),
        (ColumnType::Map, Json::Object(object)) => {
            let mut accum = MapAccum::new(1);
            map_entries_from_json(&mut accum, object);
            accum
                .end_row(true)
                .and_then(|_| accum.finish(target))
                .map_err(|_| mismatch())?
        }
        (ColumnType::StringArray | ColumnType::DoubleArray, Json::Array(items)) => {
            let DataType::List(item_field) = target else {
                return Err(mismatch());
            };
            let values: ArrayRef = if ty == ColumnType::StringArray {
                let v: Vec<Option<&str>> = items
                    .iter()
                    .map(|i| match i {
                        Json::Null => Ok(None),
                        Json::String(s) => Ok(Some(s.as_str())),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<_, _>>()?;
                Arc::new(StringArray::from(v))
            } else {
                let v: Vec<Option<f64>> = items
                    .iter()
                    .map(|i| match i {
                        Json::Null => Ok(None),
                        Json::Number(n) => n.as_f64().map(Some).ok_or_else(mismatch),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<_, _>>()?;
                Arc::new(Float64Array::from(v))
            };
            let len = i32::try_from(values.len()).map_err(|e| e.to_string())?;
            Arc::new(
                ListArray::try_new(
                    item_field.clone(),
                    OffsetBuffer::new(vec![0, len].into()),
                    values,
                    None,
                )
                .map_err(|e| e.to_string())?,
            )
        }
        // Lists of timestamps or maps: the empty list only (registration checks that).
        (ColumnType::TimestampNsArray | ColumnType::MapArray, Json::Array(items))
            if items.is_empty() =>
        {
            let DataType::List(item_field) = target else {
                return Err(mismatch());
            };
            Arc::new(ListArray::new(
                item_field.clone(),
                OffsetBuffer::new(vec![0, 0].into()),
                arrow::array::new_empty_array(item_field.data_type()),
                None,
            ))
        }
        _ => return Err(mismatch()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Date64Array, DictionaryArray, Int16Array, Int8Array, LargeListBuilder, LargeStringArray,
        LargeStringBuilder, MapBuilder, MapFieldNames, StringViewArray, UInt64Array,
    };
    use arrow::datatypes::{Field, Fields, Int8Type, Schema};
    use flight_schema::types::map_type;
    use flight_schema::TableSchema;
    use std::collections::HashMap;

    fn table(columns: &str) -> ResolvedTable {
        table_with(columns, "")
    }

    fn table_with(columns: &str, extra: &str) -> ResolvedTable {
        let json = format!(r#"{{"columns": [{columns}]{extra}}}"#);
        TableSchema::from_json(json.as_bytes(), Some("cpu"))
            .unwrap()
            .validate(1)
            .unwrap()
    }

    fn cpu() -> ResolvedTable {
        table(
            r#"{"name": "time", "type": "timestamp"},
               {"name": "value", "type": "double"},
               {"name": "labels", "type": "jsonb"}"#,
        )
    }

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns).unwrap()
    }

    fn times(values: Vec<i64>) -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
    }

    fn err(t: &ResolvedTable, b: &RecordBatch) -> String {
        reshape(t, b).unwrap_err().to_string()
    }

    fn strings(a: &ArrayRef) -> Vec<Option<String>> {
        a.as_string::<i32>()
            .iter()
            .map(|s| s.map(String::from))
            .collect()
    }

    type MapRow = Option<Vec<(String, Option<String>)>>;

    fn map_values(a: &ArrayRef) -> Vec<MapRow> {
        assert_eq!(a.data_type(), &map_type());
        let m = a.as_map();
        (0..m.len())
            .map(|i| {
                if m.is_null(i) {
                    return None;
                }
                let e = m.value(i);
                let (k, v) = (
                    e.column(0).as_string::<i32>(),
                    e.column(1).as_string::<i32>(),
                );
                Some(
                    (0..e.len())
                        .map(|j| {
                            (
                                k.value(j).to_string(),
                                v.is_valid(j).then(|| v.value(j).to_string()),
                            )
                        })
                        .collect(),
                )
            })
            .collect()
    }

    fn entry(k: &str, v: Option<&str>) -> (String, Option<String>) {
        (k.to_string(), v.map(String::from))
    }

    #[test]
    fn exact_schema_passes_through_without_copying() {
        let t = cpu();
        let value: ArrayRef = Arc::new(Float64Array::from(vec![Some(1.5), None]));
        let labels: ArrayRef = Arc::new(StringArray::from(vec![Some(r#"{"a":1}"#), None]));
        let time = times(vec![1, 2]);
        // Schema-level metadata does not matter.
        let schema = Arc::new(Schema::new_with_metadata(
            t.arrow_schema.fields().clone(),
            HashMap::from([("k".to_string(), "v".to_string())]),
        ));
        let b = RecordBatch::try_new(schema, vec![time.clone(), value.clone(), labels.clone()])
            .unwrap();
        let out = reshape(&t, &b).unwrap();
        assert!(Arc::ptr_eq(&out.schema(), &t.arrow_schema));
        assert!(Arc::ptr_eq(out.column(0), &time));
        assert!(Arc::ptr_eq(out.column(1), &value));
        assert!(Arc::ptr_eq(out.column(2), &labels));
    }

    #[test]
    fn exact_schema_still_checks_json() {
        let t = cpu();
        let b = RecordBatch::try_new(
            t.arrow_schema.clone(),
            vec![
                times(vec![1, 2]),
                Arc::new(Float64Array::from(vec![1.0, 2.0])),
                Arc::new(StringArray::from(vec![Some("{}"), Some("{nope")])),
            ],
        )
        .unwrap();
        let e = err(&t, &b);
        assert!(
            e.starts_with(
                r#"table 'cpu', column 'labels', row 1: cannot convert Utf8 value "{nope" to jsonb (not valid JSON"#
            ),
            "{e}"
        );
    }

    #[test]
    fn reorders_to_registered_order_and_keeps_field_metadata() {
        let t = cpu();
        let b = batch(vec![
            (
                "labels",
                Arc::new(StringArray::from(vec![r#"{"a":1}"#])) as ArrayRef,
            ),
            ("value", Arc::new(Float64Array::from(vec![2.5]))),
            ("time", times(vec![7])),
        ]);
        let out = reshape(&t, &b).unwrap();
        assert!(Arc::ptr_eq(&out.schema(), &t.arrow_schema));
        assert_eq!(
            out.schema()
                .field(2)
                .metadata()
                .get("ARROW:extension:name")
                .unwrap(),
            "arrow.json"
        );
        assert_eq!(
            out.column(0)
                .as_primitive::<TimestampMicrosecondType>()
                .value(0),
            7
        );
        assert_eq!(out.column(1).as_primitive::<Float64Type>().value(0), 2.5);
        assert_eq!(strings(out.column(2)), vec![Some(r#"{"a":1}"#.to_string())]);
    }

    #[test]
    fn missing_nullable_column_becomes_nulls() {
        let t = cpu();
        let b = batch(vec![("time", times(vec![1, 2, 3]))]);
        let out = reshape(&t, &b).unwrap();
        assert_eq!(out.num_rows(), 3);
        assert_eq!(out.column(1).null_count(), 3);
        assert_eq!(out.column(2).null_count(), 3);
        assert_eq!(out.column(1).data_type(), &DataType::Float64);
    }

    #[test]
    fn missing_columns_are_filled_with_defaults() {
        let t = table(
            r#"{"name": "time", "type": "timestamp"},
               {"name": "b", "type": "bool", "default": true, "nullable": false},
               {"name": "i", "type": "int32", "default": 3},
               {"name": "l", "type": "int64", "default": -7},
               {"name": "f", "type": "float", "default": 0.5},
               {"name": "d", "type": "double", "default": 2.25},
               {"name": "s", "type": "string", "default": "eu-1"},
               {"name": "ts", "type": "timestamp_ms", "default": "2024-01-02T03:04:05.678Z"},
               {"name": "tn", "type": "timestamp_ns", "default": 42},
               {"name": "dt", "type": "date", "default": "2024-02-29"},
               {"name": "u", "type": "uuid", "default": "0123456789ab-cdef-0123-4567-89abcdef0123"},
               {"name": "u2", "type": "uuid", "default": "01234567-89ab-cdef-0123-456789ABCDEF"},
               {"name": "dec", "type": "decimal(6,2)", "default": "12.5"},
               {"name": "dec2", "type": "decimal(6,2)", "default": 3},
               {"name": "j", "type": "jsonb", "default": {"a": [1, null]}},
               {"name": "m", "type": "map", "default": {"k": "v"}},
               {"name": "sa", "type": "string[]", "default": ["x", null]},
               {"name": "da", "type": "double[]", "default": [1.5, 2]}"#,
        );
        // The badly formed uuid default is caught when it is needed.
        let b = batch(vec![
            ("time", times(vec![1, 2])),
            (
                "u",
                Arc::new(
                    FixedSizeBinaryArray::try_from_iter(vec![[0u8; 16], [1u8; 16]].into_iter())
                        .unwrap(),
                ) as ArrayRef,
            ),
        ]);
        let out = reshape(&t, &b).unwrap();
        let col = |n: &str| out.column(t.arrow_schema.index_of(n).unwrap()).clone();
        assert_eq!(
            col("b").as_boolean().iter().collect::<Vec<_>>(),
            vec![Some(true); 2]
        );
        assert_eq!(
            col("i").as_primitive::<Int32Type>().values().to_vec(),
            vec![3, 3]
        );
        assert_eq!(
            col("l").as_primitive::<Int64Type>().values().to_vec(),
            vec![-7, -7]
        );
        assert_eq!(
            col("f").as_primitive::<Float32Type>().values().to_vec(),
            vec![0.5, 0.5]
        );
        assert_eq!(
            col("d").as_primitive::<Float64Type>().values().to_vec(),
            vec![2.25, 2.25]
        );
        assert_eq!(strings(&col("s")), vec![Some("eu-1".to_string()); 2]);
        assert_eq!(
            col("ts")
                .as_primitive::<TimestampMillisecondType>()
                .values()
                .to_vec(),
            vec![1_704_164_645_678; 2]
        );
        assert_eq!(
            col("ts").data_type(),
            &ColumnType::Timestamp(TimeUnit::Millisecond).to_arrow()
        );
        assert_eq!(
            col("tn")
                .as_primitive::<TimestampNanosecondType>()
                .values()
                .to_vec(),
            vec![42, 42]
        );
        assert_eq!(
            col("dt").as_primitive::<Date32Type>().values().to_vec(),
            vec![19782, 19782]
        );
        assert_eq!(
            col("u2").as_fixed_size_binary().value(1),
            &[
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ]
        );
        assert_eq!(
            col("dec")
                .as_primitive::<Decimal128Type>()
                .values()
                .to_vec(),
            vec![1250, 1250]
        );
        assert_eq!(
            col("dec2")
                .as_primitive::<Decimal128Type>()
                .values()
                .to_vec(),
            vec![300, 300]
        );
        assert_eq!(
            strings(&col("j")),
            vec![Some(r#"{"a":[1,null]}"#.to_string()); 2]
        );
        assert_eq!(
            map_values(&col("m")),
            vec![Some(vec![entry("k", Some("v"))]); 2]
        );
        let sa = col("sa");
        let sa = sa.as_list::<i32>();
        assert_eq!(sa.value_offsets(), &[0, 2, 4]);
        assert_eq!(
            strings(sa.values()),
            vec![Some("x".to_string()), None, Some("x".to_string()), None]
        );
        let da = col("da");
        assert_eq!(
            da.as_list::<i32>()
                .values()
                .as_primitive::<Float64Type>()
                .values()
                .to_vec(),
            vec![1.5, 2.0, 1.5, 2.0]
        );

        // A default that does not parse is reported when it is used.
        let b = batch(vec![("time", times(vec![1]))]);
        let e = err(&t, &b);
        assert_eq!(
            e,
            "table 'cpu', column 'u': default \"0123456789ab-cdef-0123-4567-89abcdef0123\" does not fit type uuid: not a uuid in 8-4-4-4-12 hex form"
        );
    }

    #[test]
    fn unknown_columns_are_refused_or_dropped() {
        let b = batch(vec![
            ("time", times(vec![1])),
            ("hots", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
        ]);
        assert_eq!(
            err(&cpu(), &b),
            "table 'cpu': unknown column 'hots' (the table has: time, value, labels; register it or set extra_columns: drop)"
        );
        let b2 = batch(vec![
            ("x", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
            ("time", times(vec![1])),
            ("y", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
        ]);
        assert_eq!(
            err(&cpu(), &b2),
            "table 'cpu': unknown columns 'x', 'y' (the table has: time, value, labels; register them or set extra_columns: drop)"
        );
        let t = table_with(
            r#"{"name": "time", "type": "timestamp"}, {"name": "value", "type": "double"}"#,
            r#", "extra_columns": "drop""#,
        );
        let out = reshape(&t, &b).unwrap();
        assert_eq!(out.num_columns(), 2);
        assert!(Arc::ptr_eq(&out.schema(), &t.arrow_schema));
    }

    #[test]
    fn nulls_in_non_null_columns_name_the_row() {
        let t = table(
            r#"{"name": "time", "type": "timestamp"},
               {"name": "host", "type": "string", "nullable": false}"#,
        );
        let b = batch(vec![
            ("time", times(vec![1, 2, 3])),
            (
                "host",
                Arc::new(StringArray::from(vec![Some("a"), Some("b"), None])) as ArrayRef,
            ),
        ]);
        assert_eq!(
            err(&t, &b),
            "table 'cpu', column 'host', row 2: null in a non-null column"
        );
        let time: ArrayRef =
            Arc::new(TimestampMicrosecondArray::from(vec![None, Some(1)]).with_timezone("UTC"));
        let b = batch(vec![
            (
                "host",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
            ("time", time),
        ]);
        assert_eq!(
            err(&t, &b),
            "table 'cpu', column 'time', row 0: null in a non-null column"
        );
        // Missing non-null column without default.
        let b = batch(vec![("time", times(vec![1]))]);
        assert_eq!(
            err(&t, &b),
            "table 'cpu', column 'host': missing column (it is not nullable and has no default)"
        );
    }

    #[test]
    fn missing_time_column() {
        let b = batch(vec![(
            "value",
            Arc::new(Float64Array::from(vec![1.0])) as ArrayRef,
        )]);
        let e = reshape(&cpu(), &b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "table 'cpu', column 'time': missing time column"
        );
        assert!(matches!(e, ReshapeError::MissingTimeColumn { .. }));
    }

    #[test]
    fn duplicate_column_is_refused() {
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("time", t_us(), false),
                Field::new("time", t_us(), false),
            ])),
            vec![times(vec![1]), times(vec![2])],
        )
        .unwrap();
        assert_eq!(
            err(&cpu(), &b),
            "table 'cpu', column 'time': the batch has this column more than once"
        );
    }

    fn t_us() -> DataType {
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    }

    fn ints_table() -> ResolvedTable {
        table(
            r#"{"name": "time", "type": "timestamp"},
               {"name": "a", "type": "int32"},
               {"name": "b", "type": "int64"}"#,
        )
    }

    #[test]
    fn integers_widen() {
        let b = batch(vec![
            ("time", times(vec![1, 2])),
            (
                "a",
                Arc::new(Int16Array::from(vec![Some(-3), None])) as ArrayRef,
            ),
            (
                "b",
                Arc::new(UInt32Array::from(vec![u32::MAX, 0])) as ArrayRef,
            ),
        ]);
        let out = reshape(&ints_table(), &b).unwrap();
        let a = out.column(1).as_primitive::<Int32Type>();
        assert_eq!((a.value(0), a.is_null(1)), (-3, true));
        assert_eq!(
            out.column(2).as_primitive::<Int64Type>().values().to_vec(),
            vec![4_294_967_295, 0]
        );
        // Strings holding integers are parsed.
        let b = batch(vec![
            ("time", times(vec![1])),
            ("b", Arc::new(StringArray::from(vec!["-12"])) as ArrayRef),
        ]);
        let out = reshape(&ints_table(), &b).unwrap();
        assert_eq!(out.column(2).as_primitive::<Int64Type>().value(0), -12);
        let b = batch(vec![
            ("time", times(vec![1, 2])),
            (
                "b",
                Arc::new(StringArray::from(vec!["1", "1.5"])) as ArrayRef,
            ),
        ]);
        assert_eq!(
            err(&ints_table(), &b),
            "table 'cpu', column 'b', row 1: cannot convert Utf8 value \"1.5\" to int64 (not an integer in range)"
        );
    }

    #[test]
    fn int64_to_int32_out_of_range_names_the_row() {
        let b = batch(vec![
            ("time", times(vec![1, 2, 3])),
            (
                "a",
                Arc::new(Int64Array::from(vec![Some(1), None, Some(3_000_000_000)])) as ArrayRef,
            ),
        ]);
        assert_eq!(
            err(&ints_table(), &b),
            "table 'cpu', column 'a', row 2: cannot convert Int64 value 3000000000 to int32 (out of range)"
        );
    }

    #[test]
    fn uint64_overflow_is_refused() {
        let b = batch(vec![
            ("time", times(vec![1, 2])),
            (
                "b",
                Arc::new(UInt64Array::from(vec![5, u64::MAX])) as ArrayRef,
            ),
        ]);
        let e = reshape(&ints_table(), &b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "table 'cpu', column 'b', row 1: cannot convert UInt64 value 18446744073709551615 to int64 (out of range)"
        );
        assert_eq!((e.column(), e.row()), (Some("b"), Some(1)));
    }

    #[test]
    fn floats_are_not_turned_into_integers() {
        let b = batch(vec![
            ("time", times(vec![1])),
            ("a", Arc::new(Float64Array::from(vec![1.0])) as ArrayRef),
        ]);
        assert_eq!(
            err(&ints_table(), &b),
            "table 'cpu', column 'a': cannot convert Float64 to int32 (fractional numbers are not converted to integers; send integers or register the column as double)"
        );
    }

    #[test]
    fn double_and_float_rules() {
        let t = table(
            r#"{"name": "time", "type": "timestamp"},
               {"name": "f", "type": "float"},
               {"name": "d", "type": "double"}"#,
        );
        let b = batch(vec![
            ("time", times(vec![1, 2])),
            ("f", Arc::new(Int8Array::from(vec![-1, 2])) as ArrayRef),
            (
                "d",
                Arc::new(Int64Array::from(vec![1 << 53, -(1 << 53)])) as ArrayRef,
            ),
        ]);
        let out = reshape(&t, &b).unwrap();
        assert_eq!(
            out.column(1)
                .as_primitive::<Float32Type>()
                .values()
                .to_vec(),
            vec![-1.0, 2.0]
        );
        assert_eq!(
            out.column(2)
                .as_primitive::<Float64Type>()
                .values()
                .to_vec(),
            vec![9_007_199_254_740_992.0, -9_007_199_254_740_992.0]
        );
        let b = batch(vec![
            ("time", times(vec![1, 2])),
            (
                "d",
                Arc::new(Int64Array::from(vec![0, (1 << 53) + 1])) as ArrayRef,
            ),
        ]);
        assert_eq!(
            err(&t, &b),
            "table 'cpu', column 'd', row 1: cannot convert Int64 value 9007199254740993 to double (beyond ±2^53, not exact as a double)"
        );
        let b = batch(vec![
            ("time", times(vec![1])),
            ("f", Arc::new(Float64Array::from(vec![0.1])) as ArrayRef),
        ]);
        assert!(
            err(&t, &b).starts_with("table 'cpu', column 'f': cannot convert Float64 to float (")
        );
        let b = batch(vec![
            ("time", times(vec![1, 2, 3, 4])),
            (
                "d",
                Arc::new(StringArray::from(vec!["1.5", "-2e3", "x", "4"])) as ArrayRef,
            ),
        ]);
        assert_eq!(
            err(&t, &b),
            "table 'cpu', column 'd', row 2: cannot convert Utf8 value \"x\" to double (not a number)"
        );
    }

    #[test]
    fn bool_from_strings() {
        let t = table(r#"{"name": "time", "type": "timestamp"}, {"name": "ok", "type": "bool"}"#);
        let b = batch(vec![
            ("time", times(vec![1, 2, 3])),
            (
                "ok",
                Arc::new(StringArray::from(vec![Some("true"), None, Some("False")])) as ArrayRef,
            ),
        ]);
        let out = reshape(&t, &b).unwrap();
        assert_eq!(
            out.column(1).as_boolean().iter().collect::<Vec<_>>(),
            vec![Some(true), None, Some(false)]
        );
        let b = batch(vec![
            ("time", times(vec![1])),
            ("ok", Arc::new(StringArray::from(vec!["yes"])) as ArrayRef),
        ]);
        assert_eq!(
            err(&t, &b),
            "table 'cpu', column 'ok', row 0: cannot convert Utf8 value \"yes\" to bool (not 'true' or 'false')"
        );
    }

    #[test]
    fn timestamp_with_offset_zone_becomes_utc_micros() {
        let t = cpu();
        let ns: ArrayRef = Arc::new(
            TimestampNanosecondArray::from(vec![Some(1_700_000_000_123_456_789), None, Some(-1)])
                .with_timezone("+02:00"),
        );
        let out = reshape(&t, &batch(vec![("time", ns)]));
        // The time column is not nullable.
        assert_eq!(
            out.unwrap_err().to_string(),
            "table 'cpu', column 'time', row 1: null in a non-null column"
        );
        let ns: ArrayRef = Arc::new(
            TimestampNanosecondArray::from(vec![1_700_000_000_123_456_789, -1])
                .with_timezone("+02:00"),
        );
        let out = reshape(&t, &batch(vec![("time", ns)])).unwrap();
        assert_eq!(out.column(0).data_type(), &t_us());
        // Same instant, truncated to µs (towards the past).
        assert_eq!(
            out.column(0)
                .as_primitive::<TimestampMicrosecondType>()
                .values()
                .to_vec(),
            vec![1_700_000_000_123_456, -1]
        );
    }

    #[test]
    fn timestamp_without_zone_is_utc() {
        let ms: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![1_700_000_000_123]));
        let out = reshape(&cpu(), &batch(vec![("time", ms)])).unwrap();
        assert_eq!(
            out.column(0)
                .as_primitive::<TimestampMicrosecondType>()
                .value(0),
            1_700_000_000_123_000
        );
        let secs: ArrayRef = Arc::new(TimestampSecondArray::from(vec![i64::MAX]));
        assert_eq!(
            err(&cpu(), &batch(vec![("time", secs)])),
            "table 'cpu', column 'time', row 0: cannot convert Timestamp(s) value 9223372036854775807 to timestamp (out of the range of the column's unit)"
        );
    }

    #[test]
    fn timestamps_beyond_the_calendar_are_refused_naming_row_and_value() {
        // Regression (issue 10): one acked row at i64::MIN microseconds made every archive
        // flush fail for good ("hour -2562047789 out of range").
        for (v, row) in [(i64::MIN, 1usize), (i64::MAX, 1)] {
            let us: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from(vec![0, v]).with_timezone("UTC"));
            let e = err(&cpu(), &batch(vec![("time", us)]));
            assert!(
                e.starts_with(&format!(
                    "table 'cpu', column 'time', row {row}: cannot convert"
                )),
                "{e}"
            );
            assert!(e.contains(&v.to_string()), "{e}");
            assert!(e.contains("years -262143 to 262142"), "{e}");
        }
        // The last and first representable instants pass, in every unit.
        let (lo, hi) = timestamp_bounds(TimeUnit::Microsecond).unwrap();
        let us: ArrayRef =
            Arc::new(TimestampMicrosecondArray::from(vec![lo, hi]).with_timezone("UTC"));
        assert!(reshape(&cpu(), &batch(vec![("time", us)])).is_ok());
        let (lo, hi) = timestamp_bounds(TimeUnit::Millisecond).unwrap();
        let ms: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![lo - 1, hi]));
        assert!(err(&cpu(), &batch(vec![("time", ms)])).contains("row 0"));
    }

    #[test]
    fn timestamps_from_dates_and_not_from_integers() {
        let d: ArrayRef = Arc::new(Date32Array::from(vec![1]));
        let out = reshape(&cpu(), &batch(vec![("time", d)])).unwrap();
        assert_eq!(
            out.column(0)
                .as_primitive::<TimestampMicrosecondType>()
                .value(0),
            86_400_000_000
        );
        let d: ArrayRef = Arc::new(Date64Array::from(vec![86_400_000]));
        let out = reshape(&cpu(), &batch(vec![("time", d)])).unwrap();
        assert_eq!(
            out.column(0)
                .as_primitive::<TimestampMicrosecondType>()
                .value(0),
            86_400_000_000
        );
        let i: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        let e = err(&cpu(), &batch(vec![("time", i)]));
        assert!(e.starts_with("table 'cpu', column 'time': cannot convert Int64 to timestamp (integers are not taken as timestamps"), "{e}");
    }

    #[test]
    fn timestamps_from_strings() {
        let s: ArrayRef = Arc::new(StringArray::from(vec![
            "2024-01-02T03:04:05.123456Z",
            "2024-01-02T05:04:05.123456+02:00",
            "2024-01-02 03:04:05.123456789",
            "2024-01-02",
        ]));
        let out = reshape(&cpu(), &batch(vec![("time", s)])).unwrap();
        let day = 1_704_153_600_000_000i64;
        let at = day + (3 * 3600 + 4 * 60 + 5) * 1_000_000 + 123_456;
        assert_eq!(
            out.column(0)
                .as_primitive::<TimestampMicrosecondType>()
                .values()
                .to_vec(),
            vec![at, at, at, day]
        );
        let s: ArrayRef = Arc::new(StringArray::from(vec!["2024-01-02T03:04:05Z", "yesterday"]));
        assert_eq!(
            err(&cpu(), &batch(vec![("time", s)])),
            "table 'cpu', column 'time', row 1: cannot convert Utf8 value \"yesterday\" to timestamp (not an RFC 3339 / ISO 8601 timestamp)"
        );
    }

    fn strings_table() -> ResolvedTable {
        table(r#"{"name": "time", "type": "timestamp"}, {"name": "host", "type": "string"}"#)
    }

    #[test]
    fn dictionaries_and_other_string_types_become_utf8() {
        let dict: DictionaryArray<Int8Type> = vec![Some("a"), None, Some("b"), Some("a")]
            .into_iter()
            .collect();
        let b = batch(vec![
            ("time", times(vec![1, 2, 3, 4])),
            ("host", Arc::new(dict) as ArrayRef),
        ]);
        let out = reshape(&strings_table(), &b).unwrap();
        assert_eq!(out.column(1).data_type(), &DataType::Utf8);
        assert_eq!(
            strings(out.column(1)),
            vec![Some("a".into()), None, Some("b".into()), Some("a".into())]
        );
        for a in [
            Arc::new(LargeStringArray::from(vec![Some("x"), None])) as ArrayRef,
            Arc::new(StringViewArray::from(vec![Some("x"), None])) as ArrayRef,
        ] {
            let out = reshape(
                &strings_table(),
                &batch(vec![("time", times(vec![1, 2])), ("host", a)]),
            )
            .unwrap();
            assert_eq!(strings(out.column(1)), vec![Some("x".into()), None]);
        }
        // An all-null column of Arrow type Null.
        let nulls = new_null_array(&DataType::Null, 2);
        let out = reshape(
            &strings_table(),
            &batch(vec![("time", times(vec![1, 2])), ("host", nulls)]),
        )
        .unwrap();
        assert_eq!(strings(out.column(1)), vec![None, None]);
        // Numbers are not strings.
        let b = batch(vec![
            ("time", times(vec![1])),
            ("host", Arc::new(Int32Array::from(vec![1])) as ArrayRef),
        ]);
        assert_eq!(
            err(&strings_table(), &b),
            "table 'cpu', column 'host': cannot convert Int32 to string"
        );
    }

    fn jsonb_table() -> ResolvedTable {
        table(r#"{"name": "time", "type": "timestamp"}, {"name": "j", "type": "jsonb"}"#)
    }

    #[test]
    fn json_text_to_jsonb() {
        let j: ArrayRef = Arc::new(LargeStringArray::from(vec![
            Some(r#"{"a": 1}"#),
            None,
            Some("[1,2]"),
        ]));
        let out = reshape(
            &jsonb_table(),
            &batch(vec![("time", times(vec![1, 2, 3])), ("j", j)]),
        )
        .unwrap();
        assert_eq!(
            strings(out.column(1)),
            vec![Some(r#"{"a": 1}"#.into()), None, Some("[1,2]".into())]
        );
        let j: ArrayRef = Arc::new(StringArray::from(vec!["1", "\"s\"", "{\"a\":", "null"]));
        let e = err(
            &jsonb_table(),
            &batch(vec![("time", times(vec![1, 2, 3, 4])), ("j", j)]),
        );
        assert!(
            e.starts_with("table 'cpu', column 'j', row 2: cannot convert Utf8 value \"{\\\"a\\\":\" to jsonb (not valid JSON: "),
            "{e}"
        );
    }

    #[test]
    fn struct_to_jsonb() {
        let fields = Fields::from(vec![
            Field::new("a", DataType::Int32, true),
            Field::new("b", DataType::Utf8, true),
            Field::new("c", t_us(), true),
            Field::new("d", DataType::Float32, true),
        ]);
        let s = StructArray::try_new(
            fields,
            vec![
                Arc::new(Int32Array::from(vec![Some(1), None, Some(3)])),
                Arc::new(StringArray::from(vec![Some("x"), Some("y"), None])),
                times(vec![1_704_153_600_000_000, 0, 1_500_000]),
                Arc::new(Float32Array::from(vec![0.1, 1.0, 2.5])),
            ],
            Some(NullBuffer::from(vec![true, true, false])),
        )
        .unwrap();
        let out = reshape(
            &jsonb_table(),
            &batch(vec![
                ("time", times(vec![1, 2, 3])),
                ("j", Arc::new(s) as ArrayRef),
            ]),
        )
        .unwrap();
        assert_eq!(
            strings(out.column(1)),
            vec![
                Some(r#"{"a":1,"b":"x","c":"2024-01-02T00:00:00Z","d":0.1}"#.into()),
                Some(r#"{"a":null,"b":"y","c":"1970-01-01T00:00:00Z","d":1.0}"#.into()),
                None,
            ]
        );
    }

    type MapRows<'a> = Vec<Option<Vec<(&'a str, Option<&'a str>)>>>;

    fn utf8_map(rows: MapRows) -> MapArray {
        let mut m = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        for row in rows {
            match row {
                None => m.append(false).unwrap(),
                Some(entries) => {
                    for (k, v) in entries {
                        m.keys().append_value(k);
                        m.values().append_option(v);
                    }
                    m.append(true).unwrap();
                }
            }
        }
        m.finish()
    }

    #[test]
    fn map_to_jsonb() {
        let m = utf8_map(vec![
            Some(vec![("k1", Some("v1")), ("k2", None)]),
            None,
            Some(vec![]),
        ]);
        let out = reshape(
            &jsonb_table(),
            &batch(vec![
                ("time", times(vec![1, 2, 3])),
                ("j", Arc::new(m) as ArrayRef),
            ]),
        )
        .unwrap();
        assert_eq!(
            strings(out.column(1)),
            vec![
                Some(r#"{"k1":"v1","k2":null}"#.into()),
                None,
                Some("{}".into())
            ]
        );
        // Lists too, with nested nulls.
        let l: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
            Some(vec![Some(1), None]),
            None,
        ]));
        let out = reshape(
            &jsonb_table(),
            &batch(vec![("time", times(vec![1, 2])), ("j", l)]),
        )
        .unwrap();
        assert_eq!(strings(out.column(1)), vec![Some("[1,null]".into()), None]);
    }

    fn map_table() -> ResolvedTable {
        table(r#"{"name": "time", "type": "timestamp"}, {"name": "m", "type": "map"}"#)
    }

    #[test]
    fn pyarrow_like_map_with_large_values_is_rebuilt() {
        let names = MapFieldNames {
            entry: "entries".into(),
            key: "key".into(),
            value: "value".into(),
        };
        let mut m = MapBuilder::new(Some(names), StringBuilder::new(), LargeStringBuilder::new());
        m.keys().append_value("a");
        m.values().append_value("1");
        m.keys().append_value("b");
        m.values().append_null();
        m.append(true).unwrap();
        m.append(false).unwrap();
        m.keys().append_value("c");
        m.values().append_value("3");
        m.append(true).unwrap();
        let m: ArrayRef = Arc::new(m.finish());
        let out = reshape(
            &map_table(),
            &batch(vec![("time", times(vec![1, 2, 3])), ("m", m)]),
        )
        .unwrap();
        assert_eq!(
            map_values(out.column(1)),
            vec![
                Some(vec![entry("a", Some("1")), entry("b", None)]),
                None,
                Some(vec![entry("c", Some("3"))]),
            ]
        );
        // Other field names (arrow-rs' defaults "keys"/"values") are rebuilt too, and a
        // sliced input keeps its rows.
        let m: ArrayRef = Arc::new(utf8_map(vec![
            Some(vec![("x", Some("0"))]),
            Some(vec![("y", Some("1"))]),
        ]));
        assert_ne!(m.data_type(), &map_type());
        let out = reshape(
            &map_table(),
            &batch(vec![("time", times(vec![1])), ("m", m.slice(1, 1))]),
        )
        .unwrap();
        assert_eq!(
            map_values(out.column(1)),
            vec![Some(vec![entry("y", Some("1"))])]
        );
    }

    #[test]
    fn json_objects_and_structs_to_map() {
        let s: ArrayRef = Arc::new(StringArray::from(vec![
            Some(r#"{"a": "x", "b": 1, "c": {"d": true}, "e": null}"#),
            None,
            Some("{}"),
        ]));
        let out = reshape(
            &map_table(),
            &batch(vec![("time", times(vec![1, 2, 3])), ("m", s)]),
        )
        .unwrap();
        assert_eq!(
            map_values(out.column(1)),
            vec![
                Some(vec![
                    entry("a", Some("x")),
                    entry("b", Some("1")),
                    entry("c", Some(r#"{"d":true}"#)),
                    entry("e", None),
                ]),
                None,
                Some(vec![]),
            ]
        );
        let s: ArrayRef = Arc::new(StringArray::from(vec!["{}", "[1]"]));
        assert_eq!(
            err(&map_table(), &batch(vec![("time", times(vec![1, 2])), ("m", s)])),
            "table 'cpu', column 'm', row 1: cannot convert Utf8 value \"[1]\" to map (not a JSON object)"
        );
        let st = StructArray::try_new(
            Fields::from(vec![
                Field::new("host", DataType::Utf8, true),
                Field::new("port", DataType::Int32, true),
            ]),
            vec![
                Arc::new(StringArray::from(vec![Some("a"), None])),
                Arc::new(Int32Array::from(vec![80, 81])),
            ],
            None,
        )
        .unwrap();
        let out = reshape(
            &map_table(),
            &batch(vec![
                ("time", times(vec![1, 2])),
                ("m", Arc::new(st) as ArrayRef),
            ]),
        )
        .unwrap();
        assert_eq!(
            map_values(out.column(1)),
            vec![
                Some(vec![entry("host", Some("a")), entry("port", Some("80"))]),
                Some(vec![entry("host", None), entry("port", Some("81"))]),
            ]
        );
    }

    fn uuid_table() -> ResolvedTable {
        table(r#"{"name": "time", "type": "timestamp"}, {"name": "id", "type": "uuid"}"#)
    }

    #[test]
    fn uuid_from_strings_and_binary() {
        let s: ArrayRef = Arc::new(StringArray::from(vec![
            Some("00112233-4455-6677-8899-aabbccddeeff"),
            None,
        ]));
        let out = reshape(
            &uuid_table(),
            &batch(vec![("time", times(vec![1, 2])), ("id", s)]),
        )
        .unwrap();
        let u = out.column(1).as_fixed_size_binary();
        assert_eq!(
            u.value(0),
            &[
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert!(u.is_null(1));
        let s: ArrayRef = Arc::new(StringArray::from(vec![
            "00112233-4455-6677-8899-aabbccddeeff",
            "00112233445566778899aabbccddeeff",
        ]));
        assert_eq!(
            err(&uuid_table(), &batch(vec![("time", times(vec![1, 2])), ("id", s)])),
            "table 'cpu', column 'id', row 1: cannot convert Utf8 value \"00112233445566778899aabbccddeeff\" to uuid (not a uuid in 8-4-4-4-12 hex form)"
        );
        let bin: ArrayRef = Arc::new(arrow::array::BinaryArray::from(vec![
            &[7u8; 16][..],
            &[1u8; 3][..],
        ]));
        assert_eq!(
            err(&uuid_table(), &batch(vec![("time", times(vec![1, 2])), ("id", bin.clone())])),
            "table 'cpu', column 'id', row 1: cannot convert Binary value 010101 to uuid (3 bytes, a uuid has 16)"
        );
        let out = reshape(
            &uuid_table(),
            &batch(vec![("time", times(vec![1])), ("id", bin.slice(0, 1))]),
        )
        .unwrap();
        assert_eq!(out.column(1).as_fixed_size_binary().value(0), &[7u8; 16]);
    }

    fn decimal_table() -> ResolvedTable {
        table(r#"{"name": "time", "type": "timestamp"}, {"name": "price", "type": "decimal(5,2)"}"#)
    }

    fn decimals(a: &ArrayRef) -> Vec<Option<i128>> {
        assert_eq!(a.data_type(), &DataType::Decimal128(5, 2));
        a.as_primitive::<Decimal128Type>().iter().collect()
    }

    #[test]
    fn decimals_from_integers_strings_and_decimals() {
        let i: ArrayRef = Arc::new(Int32Array::from(vec![Some(1), None, Some(-999)]));
        let out = reshape(
            &decimal_table(),
            &batch(vec![("time", times(vec![1, 2, 3])), ("price", i)]),
        )
        .unwrap();
        assert_eq!(
            decimals(out.column(1)),
            vec![Some(100), None, Some(-99_900)]
        );
        let i: ArrayRef = Arc::new(Int32Array::from(vec![1, 999, 1000]));
        assert_eq!(
            err(&decimal_table(), &batch(vec![("time", times(vec![1, 2, 3])), ("price", i)])),
            "table 'cpu', column 'price', row 2: cannot convert Int32 value 1000 to decimal(5,2) (out of range for decimal(5,2))"
        );
        let s: ArrayRef = Arc::new(StringArray::from(vec![
            "1.25", "-0.5", "1.250", "+.5", "1e2", "125e-2",
        ]));
        let out = reshape(
            &decimal_table(),
            &batch(vec![("time", times(vec![1; 6])), ("price", s)]),
        )
        .unwrap();
        assert_eq!(
            decimals(out.column(1)),
            vec![
                Some(125),
                Some(-50),
                Some(125),
                Some(50),
                Some(10_000),
                Some(125)
            ]
        );
        let s: ArrayRef = Arc::new(StringArray::from(vec!["1.25", "1.255"]));
        assert_eq!(
            err(&decimal_table(), &batch(vec![("time", times(vec![1, 2])), ("price", s)])),
            "table 'cpu', column 'price', row 1: cannot convert Utf8 value \"1.255\" to decimal(5,2) (more fractional digits than the scale 2)"
        );
        let d: ArrayRef = Arc::new(
            Decimal128Array::from(vec![15, 10000])
                .with_precision_and_scale(10, 1)
                .unwrap(),
        );
        assert_eq!(
            err(&decimal_table(), &batch(vec![("time", times(vec![1, 2])), ("price", d.clone())])),
            "table 'cpu', column 'price', row 1: cannot convert Decimal128(10, 1) value 1000.0 to decimal(5,2) (out of range for decimal(5,2))"
        );
        let out = reshape(
            &decimal_table(),
            &batch(vec![("time", times(vec![1])), ("price", d.slice(0, 1))]),
        )
        .unwrap();
        assert_eq!(decimals(out.column(1)), vec![Some(150)]);
        let d: ArrayRef = Arc::new(
            Decimal128Array::from(vec![1])
                .with_precision_and_scale(10, 3)
                .unwrap(),
        );
        assert_eq!(
            err(&decimal_table(), &batch(vec![("time", times(vec![1])), ("price", d)])),
            "table 'cpu', column 'price': cannot convert Decimal128(10, 3) to decimal(5,2) (Decimal128(10, 3) has more fractional digits than the column's scale 2)"
        );
        let f: ArrayRef = Arc::new(Float64Array::from(vec![1.5]));
        assert!(err(
            &decimal_table(),
            &batch(vec![("time", times(vec![1])), ("price", f)])
        )
        .starts_with("table 'cpu', column 'price': cannot convert Float64 to decimal(5,2) ("));
    }

    #[test]
    fn dates() {
        let t = table(r#"{"name": "time", "type": "timestamp"}, {"name": "day", "type": "date"}"#);
        let s: ArrayRef = Arc::new(StringArray::from(vec![
            Some("1970-01-02"),
            None,
            Some("1969-12-31"),
        ]));
        let out = reshape(&t, &batch(vec![("time", times(vec![1, 2, 3])), ("day", s)])).unwrap();
        assert_eq!(
            out.column(1)
                .as_primitive::<Date32Type>()
                .iter()
                .collect::<Vec<_>>(),
            vec![Some(1), None, Some(-1)]
        );
        let d: ArrayRef = Arc::new(Date64Array::from(vec![2 * 86_400_000]));
        let out = reshape(&t, &batch(vec![("time", times(vec![1])), ("day", d)])).unwrap();
        assert_eq!(out.column(1).as_primitive::<Date32Type>().value(0), 2);
        let s: ArrayRef = Arc::new(StringArray::from(vec!["2024-02-30"]));
        assert_eq!(
            err(&t, &batch(vec![("time", times(vec![1])), ("day", s)])),
            "table 'cpu', column 'day', row 0: cannot convert Utf8 value \"2024-02-30\" to date (not a 'YYYY-MM-DD' date)"
        );
        assert!(err(
            &t,
            &batch(vec![("time", times(vec![1])), ("day", times(vec![1]))])
        )
        .starts_with("table 'cpu', column 'day': cannot convert Timestamp(µs, \"UTC\") to date ("));
    }

    fn arrays_table() -> ResolvedTable {
        table(
            r#"{"name": "time", "type": "timestamp"},
               {"name": "tags", "type": "string[]"},
               {"name": "xs", "type": "double[]"}"#,
        )
    }

    #[test]
    fn string_list_from_large_list_of_large_strings() {
        let mut l = LargeListBuilder::new(LargeStringBuilder::new());
        l.values().append_value("a");
        l.values().append_null();
        l.append(true);
        l.append(false);
        l.values().append_value("b");
        l.append(true);
        let l: ArrayRef = Arc::new(l.finish());
        let out = reshape(
            &arrays_table(),
            &batch(vec![("time", times(vec![1, 2, 3])), ("tags", l.clone())]),
        )
        .unwrap();
        let tags = out.column(1).as_list::<i32>();
        assert_eq!(
            out.column(1).data_type(),
            &ColumnType::StringArray.to_arrow()
        );
        assert_eq!(tags.value_offsets(), &[0, 2, 2, 3]);
        assert!(tags.is_null(1));
        assert_eq!(
            strings(tags.values()),
            vec![Some("a".into()), None, Some("b".into())]
        );
        // Sliced input.
        let out = reshape(
            &arrays_table(),
            &batch(vec![("time", times(vec![1])), ("tags", l.slice(2, 1))]),
        )
        .unwrap();
        let tags = out.column(1).as_list::<i32>();
        assert_eq!(tags.value_offsets(), &[0, 1]);
        assert_eq!(strings(tags.values()), vec![Some("b".into())]);
    }

    #[test]
    fn double_list_from_int_list() {
        let l: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
            Some(vec![Some(1), None, Some(-2)]),
            None,
            Some(vec![]),
        ]));
        let out = reshape(
            &arrays_table(),
            &batch(vec![("time", times(vec![1, 2, 3])), ("xs", l)]),
        )
        .unwrap();
        let xs = out.column(2).as_list::<i32>();
        assert_eq!(
            out.column(2).data_type(),
            &ColumnType::DoubleArray.to_arrow()
        );
        assert_eq!(xs.value_offsets(), &[0, 3, 3, 3]);
        assert_eq!(
            xs.values()
                .as_primitive::<Float64Type>()
                .iter()
                .collect::<Vec<_>>(),
            vec![Some(1.0), None, Some(-2.0)]
        );
        assert!(xs.is_null(1) && xs.is_valid(2));
        let l: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
            Some(vec![Some(1)]),
            Some(vec![Some(2), Some((1 << 53) + 1)]),
        ]));
        assert_eq!(
            err(&arrays_table(), &batch(vec![("time", times(vec![1, 2])), ("xs", l)])),
            "table 'cpu', column 'xs', row 1: cannot convert List(Int64) value 9007199254740993 to double[] (list element 1: beyond ±2^53, not exact as a double)"
        );
        let l: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
            Some(vec![Some(1)]),
        ]));
        assert_eq!(
            err(
                &arrays_table(),
                &batch(vec![("time", times(vec![1])), ("tags", l)])
            ),
            "table 'cpu', column 'tags': cannot convert List(Int32) to string[]"
        );
    }

    #[test]
    fn other_list_layouts_to_string_list() {
        use arrow::array::{FixedSizeListArray, ListViewArray};
        let item = Arc::new(Field::new("item", DataType::Utf8, true));
        let fixed = FixedSizeListArray::try_new(
            item,
            2,
            Arc::new(StringArray::from(vec!["a", "b", "junk", "junk", "c", "d"])),
            Some(NullBuffer::from(vec![true, false, true])),
        )
        .unwrap();
        let out = reshape(
            &arrays_table(),
            &batch(vec![
                ("time", times(vec![1, 2, 3])),
                ("tags", Arc::new(fixed) as ArrayRef),
            ]),
        )
        .unwrap();
        let tags = out.column(1).as_list::<i32>();
        assert_eq!(tags.value_offsets(), &[0, 2, 2, 4]);
        assert!(tags.is_null(1));
        assert_eq!(
            strings(tags.values()),
            vec![
                Some("a".into()),
                Some("b".into()),
                Some("c".into()),
                Some("d".into())
            ]
        );
        // A list view whose rows point backwards into a Utf8View child.
        let view = ListViewArray::try_new(
            Arc::new(Field::new("item", DataType::Utf8View, true)),
            vec![2, 0].into(),
            vec![1, 2].into(),
            Arc::new(StringViewArray::from(vec!["x", "y", "z"])),
            None,
        )
        .unwrap();
        let out = reshape(
            &arrays_table(),
            &batch(vec![
                ("time", times(vec![1, 2])),
                ("tags", Arc::new(view) as ArrayRef),
            ]),
        )
        .unwrap();
        let tags = out.column(1).as_list::<i32>();
        assert_eq!(tags.value_offsets(), &[0, 1, 3]);
        assert_eq!(
            strings(tags.values()),
            vec![Some("z".into()), Some("x".into()), Some("y".into())]
        );
    }

    #[test]
    fn nan_has_no_json_form() {
        let s = StructArray::try_new(
            Fields::from(vec![Field::new("x", DataType::Float64, true)]),
            vec![Arc::new(Float64Array::from(vec![1.0, f64::NAN]))],
            None,
        )
        .unwrap();
        assert_eq!(
            err(
                &jsonb_table(),
                &batch(vec![("time", times(vec![1, 2])), ("j", Arc::new(s) as ArrayRef)])
            ),
            "table 'cpu', column 'j', row 1: cannot convert Struct(\"x\": Float64) value {x: NaN} to jsonb (NaN has no JSON form)"
        );
    }

    #[test]
    fn zero_row_batches() {
        let t = table(
            r#"{"name": "time", "type": "timestamp"},
               {"name": "value", "type": "double"},
               {"name": "n", "type": "int64", "default": 1, "nullable": false},
               {"name": "m", "type": "map"}"#,
        );
        let b = batch(vec![
            (
                "value",
                Arc::new(Int32Array::from(Vec::<i32>::new())) as ArrayRef,
            ),
            (
                "time",
                Arc::new(TimestampNanosecondArray::from(Vec::<i64>::new())) as ArrayRef,
            ),
            (
                "m",
                Arc::new(StringArray::from(Vec::<&str>::new())) as ArrayRef,
            ),
        ]);
        let out = reshape(&t, &b).unwrap();
        assert_eq!(out.num_rows(), 0);
        assert!(Arc::ptr_eq(&out.schema(), &t.arrow_schema));
        let out = reshape(&t, &RecordBatch::new_empty(t.arrow_schema.clone())).unwrap();
        assert_eq!(out.num_rows(), 0);
    }

    #[test]
    fn decimal_string_parser() {
        assert_eq!(parse_decimal("0", 1, 0), Ok(0));
        assert_eq!(parse_decimal("-0.00", 1, 0), Ok(0));
        assert_eq!(parse_decimal("99999", 5, 0), Ok(99_999));
        assert!(parse_decimal("100000", 5, 0).is_err());
        assert_eq!(parse_decimal("0e999", 5, 2), Ok(0));
        assert!(parse_decimal("1e999", 38, 0).is_err());
        assert!(parse_decimal("", 5, 0).is_err());
        assert!(parse_decimal(".", 5, 0).is_err());
        assert!(parse_decimal("1.2.3", 5, 0).is_err());
        assert!(parse_decimal("1e", 5, 0).is_err());
        assert!(parse_decimal(" 1", 5, 0).is_err());
        assert_eq!(
            parse_decimal("12345678901234567890123456789012345678", 38, 0),
            Ok(12_345_678_901_234_567_890_123_456_789_012_345_678)
        );
    }
}
