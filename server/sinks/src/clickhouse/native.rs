//! ClickHouse Native format encoding, straight from Arrow, column by column.
//!
//! # What flows through it
//! In: a [`RecordBatch`] and the target ClickHouse column of each of its columns (name and
//! [`ChType`], usually from [`ch_type_for`] or parsed from `system.columns` with
//! [`ChType::parse`]). Out: one Native block, appended to a byte buffer by [`encode_block`],
//! ready to be the body (or part of the body) of `INSERT INTO t (cols) FORMAT Native` over
//! HTTP. A body may hold any number of blocks back to back.
//!
//! # The block
//! ```text
//! varuint columns, varuint rows,
//! per column: String name, String type, [prefix, data]      (prefix and data only if rows > 0)
//! ```
//! `String` is a varuint byte length and the bytes; varuints are LEB128. Over HTTP (client
//! protocol version 0, the default) there is no block-info header and no per-column
//! "custom serialization" byte: checked against ClickHouse 26.9, whose own
//! `SELECT ... FORMAT Native` output has exactly this layout and whose `INSERT` accepts it.
//! A block with zero rows carries no column data at all (what ClickHouse itself writes).
//!
//! # Column data
//! | ChType | Arrow | bytes per row |
//! |---|---|---|
//! | `String` | Utf8, LargeUtf8, Utf8View, Dictionary(_, any of those) | varuint length + UTF-8 |
//! | `LowCardinality(String)`, `LowCardinality(Nullable(String))` | the same | see below |
//! | `Nullable(T)` | whatever fills `T` | a UInt8 null map for all rows, then `T`'s data |
//! | `Array(T)` | List, LargeList | UInt64 end offsets for all rows, then the items as `T` |
//! | `Map(K, V)` | Map; or strings holding JSON objects (for string-filled `K`, `V`) | offsets, all keys as `K`, all values as `V` |
//! | `DateTime64(p)` | Timestamp (any unit, any zone) | Int64 ticks of 10^-p s |
//! | `DateTime` | Timestamp | UInt32 seconds |
//! | `Date`, `Date32` | Date32, Date64 | UInt16 / Int32 days since 1970-01-01 |
//! | `Int8`..`Int64`, `UInt8`..`UInt64` | any Arrow integer (range-checked per value) | little-endian |
//! | `Float32`, `Float64` | Float16, Float32 (and Float64 for `Float64`) | IEEE 754 little-endian |
//! | `Bool` | Boolean | UInt8 0/1 |
//! | `UUID` | FixedSizeBinary(16) (RFC 4122 byte order) | two little-endian UInt64, high half first |
//! | `Decimal(p, s)` | Decimal32, Decimal64, Decimal128 | Int32 (p ≤ 9), Int64 (≤ 18), Int128 (≤ 38), Int256 |
//!
//! **Nulls.** A `Nullable(T)` column writes `1` in the null map and `T`'s default (zero,
//! empty string) in the data at each null row. A null in a column that is not `Nullable`
//! becomes the type's default as well, as ClickHouse does itself with
//! `input_format_null_as_default`: empty string, zero, empty array, empty map. Map values
//! that are null in Arrow become empty strings. A column of Arrow type Null is all defaults.
//!
//! **LowCardinality.** Every block carries its own dictionary. The column's prefix is the
//! keys serialization version (UInt64 `1`, shared dictionaries with additional keys); its
//! data is the index type (UInt64: key width 0..3 for UInt8..UInt64, plus
//! `HasAdditionalKeysBit` 1<<9 and `NeedUpdateDictionary` 1<<10), the number of keys
//! (UInt64), the keys as a plain `String` column, the number of rows (UInt64) and one index
//! per row. Key 0 is always the empty string: for `LowCardinality(Nullable(String))` it
//! stands for NULL (ClickHouse reads key 0 as NULL when the inner type is Nullable), for
//! `LowCardinality(String)` it is the default that null rows take. An Arrow dictionary array
//! is written as it is, its dictionary becoming keys `1..` and its keys shifted by one,
//! without looking at the values; plain strings are deduplicated by hashing. The prefix of
//! every LowCardinality inside a column comes before all of that column's data (so for
//! `Array(LowCardinality(String))` the version precedes the offsets), as ClickHouse writes
//! it.
//!
//! **Timestamps.** Ticks are scaled exactly when the column is finer than the Arrow unit
//! (an overflow of Int64 is a value error) and rounded down with floor division when it is
//! coarser: -1 ns into `DateTime64(6)` is -1 µs, the instant just before.
//!
//! **Maps from JSON text.** A string column filling a `Map` holds one JSON object per row
//! (`{"k":"v",...}`), whose members become entries in their order (duplicates kept). String
//! values are written decoded; other values (numbers, booleans, null, arrays, objects) as
//! their JSON text, verbatim (`1.50` stays `1.50`, whitespace inside arrays stays). Text
//! that is not a JSON object is a value error naming column and row.
//!
//! Errors name the column, and the row for bad values; on error nothing is appended.
//! Encoding is columnar: a type check and one typed loop per column, no per-row structs.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use arrow::array::{
    Array, ArrayAccessor, ArrayBuilder, ArrayRef, AsArray, OffsetSizeTrait, RecordBatch,
    StringBuilder, UInt64Array,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{
    DataType, Int16Type, Int32Type, Int64Type, Int8Type, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use flight_schema::{ColumnType, Role};
use serde::de::{IgnoredAny, MapAccess, Visitor};

/// A ClickHouse column type that [`encode_block`] can write.
///
/// [`fmt::Display`] gives ClickHouse's canonical spelling, as `system.columns` shows it
/// (`LowCardinality(Nullable(String))`, `DateTime64(3, 'UTC')`, `Decimal(12, 3)`), and
/// [`ChType::parse`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChType {
    String,
    /// Only `LowCardinality(String)` and `LowCardinality(Nullable(String))` can be encoded;
    /// other inner types parse and print.
    LowCardinality(Box<ChType>),
    Nullable(Box<ChType>),
    Array(Box<ChType>),
    Map(Box<ChType>, Box<ChType>),
    /// Precision (0..=9 decimal digits of a second) and optional time zone.
    DateTime64(u8, Option<String>),
    DateTime(Option<String>),
    Date,
    Date32,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float32,
    Float64,
    Bool,
    Uuid,
    /// `Decimal(precision, scale)`, 1 <= precision <= 76, scale <= precision. Stored as
    /// Int32, Int64, Int128 or Int256 by precision (ClickHouse's Decimal32..Decimal256).
    Decimal(u8, u8),
}

impl ChType {
    /// Parses a type as ClickHouse prints it in `system.columns` (and the usual aliases
    /// `Boolean`, `Decimal32(s)` .. `Decimal256(s)`, `Decimal(p)`).
    pub fn parse(s: &str) -> Result<ChType, NativeError> {
        let invalid = |reason: TypeSyntax| NativeError::InvalidType {
            type_name: s.to_string(),
            reason,
        };
        let mut parser = TypeParser { s, pos: 0 };
        let ty = parser.parse_type().map_err(invalid)?;
        parser.skip_ws();
        if parser.pos != s.len() {
            return Err(invalid(TypeSyntax::Trailing(s[parser.pos..].to_string())));
        }
        Ok(ty)
    }

    /// Whether the type is `Nullable(_)` (`LowCardinality(Nullable(_))` counts too).
    pub fn is_nullable(&self) -> bool {
        match self {
            Self::Nullable(_) => true,
            Self::LowCardinality(inner) => inner.is_nullable(),
            _ => false,
        }
    }

    /// Bytes per row of a fixed-width type.
    fn fixed_width(&self) -> Option<usize> {
        Some(match self {
            Self::Int8 | Self::UInt8 | Self::Bool => 1,
            Self::Int16 | Self::UInt16 | Self::Date => 2,
            Self::Int32 | Self::UInt32 | Self::Float32 | Self::Date32 | Self::DateTime(_) => 4,
            Self::Int64 | Self::UInt64 | Self::Float64 | Self::DateTime64(..) => 8,
            Self::Uuid => 16,
            Self::Decimal(p, _) => decimal_width(*p),
            _ => return None,
        })
    }
}

/// Same as [`ChType::parse`].
pub fn parse(s: &str) -> Result<ChType, NativeError> {
    ChType::parse(s)
}

impl FromStr for ChType {
    type Err = NativeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChType::parse(s)
    }
}

impl fmt::Display for ChType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::String => f.write_str("String"),
            Self::LowCardinality(t) => write!(f, "LowCardinality({t})"),
            Self::Nullable(t) => write!(f, "Nullable({t})"),
            Self::Array(t) => write!(f, "Array({t})"),
            Self::Map(k, v) => write!(f, "Map({k}, {v})"),
            Self::DateTime64(p, None) => write!(f, "DateTime64({p})"),
            Self::DateTime64(p, Some(tz)) => write!(f, "DateTime64({p}, {})", Quoted(tz)),
            Self::DateTime(None) => f.write_str("DateTime"),
            Self::DateTime(Some(tz)) => write!(f, "DateTime({})", Quoted(tz)),
            Self::Date => f.write_str("Date"),
            Self::Date32 => f.write_str("Date32"),
            Self::Int8 => f.write_str("Int8"),
            Self::Int16 => f.write_str("Int16"),
            Self::Int32 => f.write_str("Int32"),
            Self::Int64 => f.write_str("Int64"),
            Self::UInt8 => f.write_str("UInt8"),
            Self::UInt16 => f.write_str("UInt16"),
            Self::UInt32 => f.write_str("UInt32"),
            Self::UInt64 => f.write_str("UInt64"),
            Self::Float32 => f.write_str("Float32"),
            Self::Float64 => f.write_str("Float64"),
            Self::Bool => f.write_str("Bool"),
            Self::Uuid => f.write_str("UUID"),
            Self::Decimal(p, s) => write!(f, "Decimal({p}, {s})"),
        }
    }
}

/// A single-quoted ClickHouse string literal.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("'")?;
        for c in self.0.chars() {
            if c == '\'' || c == '\\' {
                f.write_str("\\")?;
            }
            write!(f, "{c}")?;
        }
        f.write_str("'")
    }
}

/// The ClickHouse type sluice creates a column of `column_type` with.
///
/// `string` is `LowCardinality(String)` for tags, `String` otherwise; timestamps are
/// `DateTime64(3|6|9, 'UTC')` by unit; `date` is `Date32` (1900..2299, wider than `Date`);
/// `jsonb` is `String` holding the JSON text; `map` is `Map(String, String)`. Nullable
/// columns are `Nullable(T)`, except `LowCardinality(Nullable(String))` for tags and
/// `Map`/`Array`, which ClickHouse cannot wrap in `Nullable` (a null row lands as empty).
pub fn ch_type_for(column_type: &ColumnType, nullable: bool, role: Option<Role>) -> ChType {
    let base = match column_type {
        ColumnType::Bool => ChType::Bool,
        ColumnType::Int32 => ChType::Int32,
        ColumnType::Int64 => ChType::Int64,
        ColumnType::Float => ChType::Float32,
        ColumnType::Double => ChType::Float64,
        ColumnType::String if role == Some(Role::Tag) => {
            let inner = if nullable {
                ChType::Nullable(Box::new(ChType::String))
            } else {
                ChType::String
            };
            return ChType::LowCardinality(Box::new(inner));
        }
        ColumnType::String | ColumnType::Jsonb => ChType::String,
        ColumnType::Timestamp(unit) => ChType::DateTime64(unit_digits(*unit), Some("UTC".into())),
        ColumnType::Date => ChType::Date32,
        ColumnType::Uuid => ChType::Uuid,
        ColumnType::Decimal { precision, scale } => {
            ChType::Decimal(*precision, (*scale).max(0) as u8)
        }
        ColumnType::Map => ChType::Map(Box::new(ChType::String), Box::new(ChType::String)),
        ColumnType::StringArray => ChType::Array(Box::new(ChType::String)),
        ColumnType::DoubleArray => ChType::Array(Box::new(ChType::Float64)),
        ColumnType::TimestampNsArray => {
            ChType::Array(Box::new(ChType::DateTime64(9, Some("UTC".into()))))
        }
        ColumnType::MapArray => ChType::Array(Box::new(ChType::Map(
            Box::new(ChType::String),
            Box::new(ChType::String),
        ))),
    };
    match base {
        ChType::Map(..) | ChType::Array(_) => base,
        _ if nullable => ChType::Nullable(Box::new(base)),
        _ => base,
    }
}

/// What is wrong with a type string.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TypeSyntax {
    #[error("unterminated string literal")]
    UnterminatedString,
    #[error("bad number '{0}'")]
    BadNumber(String),
    #[error("expected a type at byte {0}")]
    ExpectedType(usize),
    #[error("expected ',' or ')' at byte {0}")]
    ExpectedSeparator(usize),
    #[error("unexpected '{0}' after the type")]
    Trailing(String),
    #[error("bad arguments for {0}")]
    BadArguments(String),
    #[error("Decimal({0}, {1}) needs 1 <= precision <= 76 and scale <= precision")]
    DecimalRange(u64, u64),
    #[error("unknown type '{0}'")]
    Unknown(String),
}

/// Why a type could not be parsed or a batch could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NativeError {
    /// A type string that [`ChType::parse`] does not understand (a ClickHouse type sluice
    /// does not support, or a typo in configuration).
    #[error("unsupported ClickHouse type '{type_name}': {reason}")]
    InvalidType {
        type_name: String,
        #[source]
        reason: TypeSyntax,
    },
    /// Caller bug: one target column per batch column is required.
    #[error("the batch has {columns} columns but {targets} ClickHouse columns were given")]
    ColumnCount { columns: usize, targets: usize },
    /// The column's Arrow type cannot fill its ClickHouse type (a schema mismatch: a bug
    /// upstream or a table changed behind sluice's back, not bad data).
    #[error("column '{column}': Arrow type {arrow} cannot fill ClickHouse type {ch}")]
    TypeMismatch {
        column: String,
        arrow: DataType,
        ch: ChType,
    },
    /// One value cannot be stored (out of range, not a JSON object, ...): invalid input, not
    /// retryable. `row` is the row index within the batch given to [`encode_block`].
    #[error("column '{column}', row {row}: {reason}")]
    Value {
        column: String,
        row: usize,
        reason: String,
    },
    /// An Arrow kernel failed while preparing the column (internal error).
    #[error("column '{column}': {reason}")]
    Internal { column: String, reason: String },
}

impl NativeError {
    /// The row of the batch that holds the bad value, for value errors.
    pub fn row(&self) -> Option<usize> {
        match self {
            Self::Value { row, .. } => Some(*row),
            _ => None,
        }
    }

    /// Whether the data itself is at fault (a bad value: send the rows to the dead-letter
    /// store), rather than the code or the schemas.
    pub fn is_invalid_data(&self) -> bool {
        matches!(self, Self::Value { .. })
    }
}

/// Appends one Native block holding all rows of `batch` to `out`. `columns[i]` is the
/// target column (name, type) that `batch.column(i)` fills; the names are written into the
/// block and must match the `INSERT`'s column list. On error `out` is left as it was.
pub fn encode_block(
    batch: &RecordBatch,
    columns: &[(String, ChType)],
    out: &mut Vec<u8>,
) -> Result<(), NativeError> {
    let start = out.len();
    let result = encode_into(batch, columns, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_into(
    batch: &RecordBatch,
    columns: &[(String, ChType)],
    out: &mut Vec<u8>,
) -> Result<(), NativeError> {
    if batch.num_columns() != columns.len() {
        return Err(NativeError::ColumnCount {
            columns: batch.num_columns(),
            targets: columns.len(),
        });
    }
    let rows = batch.num_rows();
    put_varuint(out, columns.len() as u64);
    put_varuint(out, rows as u64);
    for ((name, ty), array) in columns.iter().zip(batch.columns()) {
        put_str(out, name);
        put_str(out, &ty.to_string());
        let data_start = out.len();
        if rows > 0 {
            write_prefix(ty, out);
        }
        write_data(ty, array.as_ref(), out).map_err(|fail| match fail {
            Fail::Mismatch => NativeError::TypeMismatch {
                column: name.clone(),
                arrow: array.data_type().clone(),
                ch: ty.clone(),
            },
            Fail::Value { row, reason } => NativeError::Value {
                column: name.clone(),
                row,
                reason,
            },
            Fail::Internal(reason) => NativeError::Internal {
                column: name.clone(),
                reason,
            },
        })?;
        debug_assert!(
            rows > 0 || out.len() == data_start,
            "zero rows write no data"
        );
    }
    Ok(())
}

/// Why one column (or a part of it) could not be written; the caller adds the column.
#[derive(Debug)]
enum Fail {
    Mismatch,
    /// `row` indexes the array handed to the failing writer.
    Value {
        row: usize,
        reason: String,
    },
    Internal(String),
}

type Written = Result<(), Fail>;

fn value_error(row: usize, reason: String) -> Fail {
    Fail::Value { row, reason }
}

/// Keys serialization version of LowCardinality: shared dictionaries with additional keys.
const LC_KEYS_VERSION: u64 = 1;
/// LowCardinality index type flag: the keys follow the index type in this granule.
const LC_HAS_ADDITIONAL_KEYS: u64 = 1 << 9;
/// LowCardinality index type flag: the dictionary changed since the previous granule.
const LC_NEED_UPDATE_DICTIONARY: u64 = 1 << 10;

/// Writes the serialization prefix of `ty` (the LowCardinality keys version of every
/// LowCardinality in it, outermost first), which comes before any of the column's data.
fn write_prefix(ty: &ChType, out: &mut Vec<u8>) {
    match ty {
        ChType::LowCardinality(_) => put_u64(out, LC_KEYS_VERSION),
        ChType::Nullable(inner) | ChType::Array(inner) => write_prefix(inner, out),
        ChType::Map(k, v) => {
            write_prefix(k, out);
            write_prefix(v, out);
        }
        _ => {}
    }
}

/// Writes the data of `array` as `ty`: `array.len()` rows, nothing at all for zero rows.
fn write_data(ty: &ChType, array: &dyn Array, out: &mut Vec<u8>) -> Written {
    if *array.data_type() == DataType::Null {
        write_defaults(ty, array.len(), out);
        return Ok(());
    }
    match ty {
        ChType::String => write_strings(array, out),
        ChType::LowCardinality(inner) => write_low_cardinality(inner, array, out),
        ChType::Nullable(inner) => {
            if !matches!(**inner, ChType::String) && inner.fixed_width().is_none() {
                return Err(Fail::Mismatch);
            }
            match array.logical_nulls() {
                None => out.resize(out.len() + array.len(), 0),
                Some(nulls) => out.extend(nulls.iter().map(|valid| u8::from(!valid))),
            }
            write_data(inner, array, out)
        }
        ChType::Array(inner) => write_array(inner, array, out),
        ChType::Map(k, v) => write_map(k, v, array, out),
        ChType::DateTime64(p, _) => {
            write_timestamps(array, u32::from(*p), out, |t| Ok(t.to_le_bytes()))
        }
        ChType::DateTime(_) => write_timestamps(array, 0, out, |t| {
            u32::try_from(t)
                .map(u32::to_le_bytes)
                .map_err(|_| format!("{t} s since 1970 is outside DateTime's range (1970 to 2106)"))
        }),
        ChType::Date => write_dates(array, out, |d| {
            u16::try_from(d)
                .map(u16::to_le_bytes)
                .map_err(|_| format!("{d} days since 1970 is outside Date's range (1970 to 2149)"))
        }),
        ChType::Date32 => write_dates(array, out, |d| Ok(d.to_le_bytes())),
        ChType::Int8 => write_ints::<i8>(array, out),
        ChType::Int16 => write_ints::<i16>(array, out),
        ChType::Int32 => write_ints::<i32>(array, out),
        ChType::Int64 => write_ints::<i64>(array, out),
        ChType::UInt8 => write_ints::<u8>(array, out),
        ChType::UInt16 => write_ints::<u16>(array, out),
        ChType::UInt32 => write_ints::<u32>(array, out),
        ChType::UInt64 => write_ints::<u64>(array, out),
        ChType::Float32 => write_floats(array, false, out),
        ChType::Float64 => write_floats(array, true, out),
        ChType::Bool => {
            let bools = array.as_boolean_opt().ok_or(Fail::Mismatch)?;
            let nulls = array.logical_nulls();
            out.extend(
                (0..bools.len()).map(|i| {
                    u8::from(bools.value(i) && nulls.as_ref().is_none_or(|n| n.is_valid(i)))
                }),
            );
            Ok(())
        }
        ChType::Uuid => write_uuids(array, out),
        ChType::Decimal(p, s) => write_decimals(array, *p, *s, out),
    }
}

/// Writes `n` default values of `ty` (an all-null column).
fn write_defaults(ty: &ChType, n: usize, out: &mut Vec<u8>) {
    match ty {
        ChType::String => out.resize(out.len() + n, 0),
        ChType::LowCardinality(_) => {
            if n > 0 {
                // One key (the empty string, NULL for a Nullable inner type), index 0 everywhere.
                put_u64(out, LC_HAS_ADDITIONAL_KEYS | LC_NEED_UPDATE_DICTIONARY);
                put_u64(out, 1);
                out.push(0);
                put_u64(out, n as u64);
                out.resize(out.len() + n, 0);
            }
        }
        ChType::Nullable(inner) => {
            out.resize(out.len() + n, 1);
            write_defaults(inner, n, out);
        }
        ChType::Array(_) | ChType::Map(..) => out.resize(out.len() + 8 * n, 0),
        fixed => out.resize(out.len() + n * fixed.fixed_width().unwrap_or(0), 0),
    }
}

// ---------------------------------------------------------------------------------------
// Primitive writers.

/// Appends a LEB128 varuint.
fn put_varuint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a Native `String`: varuint length, then the bytes.
#[inline]
fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varuint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

#[inline]
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn is_valid(nulls: Option<&NullBuffer>, i: usize) -> bool {
    nulls.is_none_or(|n| n.is_valid(i))
}

/// Writes fixed-width values: `encode(value)` for valid rows, zeros for null ones.
fn put_fixed<T: Copy, const W: usize>(
    values: &[T],
    nulls: Option<&NullBuffer>,
    out: &mut Vec<u8>,
    encode: impl Fn(T) -> Result<[u8; W], String>,
) -> Written {
    out.reserve(values.len() * W);
    match nulls {
        None => {
            for (i, &v) in values.iter().enumerate() {
                out.extend_from_slice(&encode(v).map_err(|e| value_error(i, e))?);
            }
        }
        Some(nulls) => {
            for (i, &v) in values.iter().enumerate() {
                if nulls.is_valid(i) {
                    out.extend_from_slice(&encode(v).map_err(|e| value_error(i, e))?);
                } else {
                    out.extend_from_slice(&[0; W]);
                }
            }
        }
    }
    Ok(())
}

/// An integer ClickHouse column type, fillable from every Arrow integer type.
trait ChInt:
    Copy
    + TryFrom<i8>
    + TryFrom<i16>
    + TryFrom<i32>
    + TryFrom<i64>
    + TryFrom<u8>
    + TryFrom<u16>
    + TryFrom<u32>
    + TryFrom<u64>
{
    const W: usize;
    const NAME: &'static str;
    fn put(self, out: &mut Vec<u8>);
}

macro_rules! ch_int {
    ($($t:ty => $name:literal),*) => {$(
        impl ChInt for $t {
            const W: usize = std::mem::size_of::<$t>();
            const NAME: &'static str = $name;
            #[inline]
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
ch_int!(i8 => "Int8", i16 => "Int16", i32 => "Int32", i64 => "Int64",
        u8 => "UInt8", u16 => "UInt16", u32 => "UInt32", u64 => "UInt64");

/// Writes any Arrow integer column as `T`, checking that each value fits.
fn write_ints<T: ChInt>(array: &dyn Array, out: &mut Vec<u8>) -> Written {
    let nulls = array.logical_nulls();
    let nulls = nulls.as_ref();
    match array.data_type() {
        DataType::Int8 => put_ints::<_, T>(array.as_primitive::<Int8Type>().values(), nulls, out),
        DataType::Int16 => put_ints::<_, T>(array.as_primitive::<Int16Type>().values(), nulls, out),
        DataType::Int32 => put_ints::<_, T>(array.as_primitive::<Int32Type>().values(), nulls, out),
        DataType::Int64 => put_ints::<_, T>(array.as_primitive::<Int64Type>().values(), nulls, out),
        DataType::UInt8 => put_ints::<_, T>(array.as_primitive::<UInt8Type>().values(), nulls, out),
        DataType::UInt16 => {
            put_ints::<_, T>(array.as_primitive::<UInt16Type>().values(), nulls, out)
        }
        DataType::UInt32 => {
            put_ints::<_, T>(array.as_primitive::<UInt32Type>().values(), nulls, out)
        }
        DataType::UInt64 => {
            put_ints::<_, T>(array.as_primitive::<UInt64Type>().values(), nulls, out)
        }
        _ => Err(Fail::Mismatch),
    }
}

fn put_ints<S: Copy + fmt::Display, T: ChInt + TryFrom<S>>(
    values: &[S],
    nulls: Option<&NullBuffer>,
    out: &mut Vec<u8>,
) -> Written {
    out.reserve(values.len() * T::W);
    for (i, &v) in values.iter().enumerate() {
        if !is_valid(nulls, i) {
            out.resize(out.len() + T::W, 0);
            continue;
        }
        match T::try_from(v) {
            Ok(t) => t.put(out),
            Err(_) => {
                return Err(value_error(
                    i,
                    format!("{v} is out of range for {}", T::NAME),
                ))
            }
        }
    }
    Ok(())
}

/// Float32 from Float16/Float32; Float64 from those and Float64 (widening only).
fn write_floats(array: &dyn Array, double: bool, out: &mut Vec<u8>) -> Written {
    let target = if double {
        DataType::Float64
    } else {
        DataType::Float32
    };
    let widened;
    let array = match array.data_type() {
        DataType::Float16 => {
            widened = cast(array, &target)?;
            widened.as_ref()
        }
        DataType::Float32 if double => {
            widened = cast(array, &target)?;
            widened.as_ref()
        }
        dt if *dt == target => array,
        _ => return Err(Fail::Mismatch),
    };
    let nulls = array.logical_nulls();
    if double {
        let values = array
            .as_primitive::<arrow::datatypes::Float64Type>()
            .values();
        put_fixed(values, nulls.as_ref(), out, |v| Ok(v.to_le_bytes()))
    } else {
        let values = array
            .as_primitive::<arrow::datatypes::Float32Type>()
            .values();
        put_fixed(values, nulls.as_ref(), out, |v| Ok(v.to_le_bytes()))
    }
}

/// One Arrow cast (widening floats, decimals to Decimal128).
fn cast(array: &dyn Array, to: &DataType) -> Result<ArrayRef, Fail> {
    let array = arrow::array::make_array(array.to_data());
    arrow::compute::cast(&array, to).map_err(|e| Fail::Internal(e.to_string()))
}

/// Decimal digits of a second in a time unit.
fn unit_digits(unit: TimeUnit) -> u8 {
    match unit {
        TimeUnit::Second => 0,
        TimeUnit::Millisecond => 3,
        TimeUnit::Microsecond => 6,
        TimeUnit::Nanosecond => 9,
    }
}

/// Writes timestamps as ticks of 10^-`digits` s, each through `encode` (DateTime64: Int64
/// as it is; DateTime: UInt32 seconds, range-checked).
fn write_timestamps<const W: usize>(
    array: &dyn Array,
    digits: u32,
    out: &mut Vec<u8>,
    encode: impl Fn(i64) -> Result<[u8; W], String>,
) -> Written {
    let DataType::Timestamp(unit, _) = array.data_type() else {
        return Err(Fail::Mismatch);
    };
    let values: &[i64] = match unit {
        TimeUnit::Second => array.as_primitive::<TimestampSecondType>().values(),
        TimeUnit::Millisecond => array.as_primitive::<TimestampMillisecondType>().values(),
        TimeUnit::Microsecond => array.as_primitive::<TimestampMicrosecondType>().values(),
        TimeUnit::Nanosecond => array.as_primitive::<TimestampNanosecondType>().values(),
    };
    let from = u32::from(unit_digits(*unit));
    let nulls = array.logical_nulls();
    if digits >= from {
        let factor = 10i64.pow(digits - from);
        put_fixed(values, nulls.as_ref(), out, |v| {
            let ticks = v.checked_mul(factor).ok_or_else(|| {
                format!("timestamp {v} ({unit:?}) overflows Int64 at 10^-{digits} s")
            })?;
            encode(ticks)
        })
    } else {
        let divisor = 10i64.pow(from - digits);
        put_fixed(values, nulls.as_ref(), out, |v| {
            encode(v.div_euclid(divisor))
        })
    }
}

/// Writes days since 1970 from Date32 (as they are) or Date64 (rounded down to the day).
fn write_dates<const W: usize>(
    array: &dyn Array,
    out: &mut Vec<u8>,
    encode: impl Fn(i32) -> Result<[u8; W], String>,
) -> Written {
    let nulls = array.logical_nulls();
    match array.data_type() {
        DataType::Date32 => {
            let values = array
                .as_primitive::<arrow::datatypes::Date32Type>()
                .values();
            put_fixed(values, nulls.as_ref(), out, encode)
        }
        DataType::Date64 => {
            let values = array
                .as_primitive::<arrow::datatypes::Date64Type>()
                .values();
            put_fixed(values, nulls.as_ref(), out, |ms| {
                let days = ms.div_euclid(86_400_000);
                let days =
                    i32::try_from(days).map_err(|_| format!("{days} days is out of range"))?;
                encode(days)
            })
        }
        _ => Err(Fail::Mismatch),
    }
}

/// UUIDs in ClickHouse's order: the RFC 4122 bytes are two big-endian 64-bit halves;
/// ClickHouse stores them as two little-endian UInt64, high half first.
fn write_uuids(array: &dyn Array, out: &mut Vec<u8>) -> Written {
    let DataType::FixedSizeBinary(16) = array.data_type() else {
        return Err(Fail::Mismatch);
    };
    let uuids = array.as_fixed_size_binary();
    let nulls = array.logical_nulls();
    out.reserve(16 * uuids.len());
    for i in 0..uuids.len() {
        if is_valid(nulls.as_ref(), i) {
            let b = uuids.value(i);
            out.extend(b[..8].iter().rev());
            out.extend(b[8..].iter().rev());
        } else {
            out.extend_from_slice(&[0; 16]);
        }
    }
    Ok(())
}

/// Bytes of a `Decimal(p, _)` value.
fn decimal_width(precision: u8) -> usize {
    match precision {
        0..=9 => 4,
        10..=18 => 8,
        19..=38 => 16,
        _ => 32,
    }
}

/// Decimals from Decimal32/64/128 at the column's scale or a smaller one (scaled up
/// exactly), each checked against the column's precision.
fn write_decimals(array: &dyn Array, precision: u8, scale: u8, out: &mut Vec<u8>) -> Written {
    let from_scale = match array.data_type() {
        DataType::Decimal32(_, s) | DataType::Decimal64(_, s) | DataType::Decimal128(_, s) => *s,
        _ => return Err(Fail::Mismatch),
    };
    if from_scale < 0 || from_scale as u8 > scale {
        // Rounding away digits is not this encoder's decision.
        return Err(Fail::Mismatch);
    }
    let widened;
    let array = match array.data_type() {
        DataType::Decimal128(..) => array,
        _ => {
            widened = cast(array, &DataType::Decimal128(38, from_scale))?;
            widened.as_ref()
        }
    };
    let values = array
        .as_primitive::<arrow::datatypes::Decimal128Type>()
        .values();
    let nulls = array.logical_nulls();
    let factor = 10i128.checked_pow(u32::from(scale) - from_scale as u32);
    // Largest magnitude + 1 of the column (none to check past i128's reach).
    let bound = 10i128.checked_pow(u32::from(precision));
    let width = decimal_width(precision);
    out.reserve(values.len() * width);
    for (i, &v) in values.iter().enumerate() {
        if !is_valid(nulls.as_ref(), i) {
            out.resize(out.len() + width, 0);
            continue;
        }
        let scaled = match factor {
            Some(f) => v.checked_mul(f),
            None => (v == 0).then_some(0),
        };
        let fits = |x: i128| bound.is_none_or(|b| -b < x && x < b);
        let Some(x) = scaled.filter(|x| fits(*x)) else {
            return Err(value_error(
                i,
                format!("{v} at scale {from_scale} does not fit Decimal({precision}, {scale})"),
            ));
        };
        match width {
            4 => out.extend_from_slice(&(x as i32).to_le_bytes()),
            8 => out.extend_from_slice(&(x as i64).to_le_bytes()),
            16 => out.extend_from_slice(&x.to_le_bytes()),
            _ => {
                out.extend_from_slice(&x.to_le_bytes());
                let sign = if x < 0 { 0xff } else { 0 };
                out.extend_from_slice(&[sign; 16]);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Strings and LowCardinality.

/// Whether `dt` is one of the plain string layouts.
fn is_plain_string(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// Runs `$body` with `$s` bound to a typed `&str` accessor of `$array` (a plain string
/// array), compiled once per layout so the loops in it are monomorphic; `$other` otherwise.
macro_rules! with_strings {
    ($array:expr, |$s:ident| $body:expr, $other:expr) => {{
        let array: &dyn Array = $array;
        match array.data_type() {
            DataType::Utf8 => {
                let $s = array.as_string::<i32>();
                $body
            }
            DataType::LargeUtf8 => {
                let $s = array.as_string::<i64>();
                $body
            }
            DataType::Utf8View => {
                let $s = array.as_string_view();
                $body
            }
            _ => $other,
        }
    }};
}

/// A dictionary array of strings: row keys (into `values`) and the dictionary.
struct StringDictionary<'a> {
    /// One per row; meaningless at null rows.
    keys: Vec<usize>,
    /// The dictionary (null entries read as empty strings).
    values: Vec<&'a str>,
}

impl<'a> StringDictionary<'a> {
    fn of(array: &'a dyn Array) -> Option<Self> {
        let DataType::Dictionary(_, value_type) = array.data_type() else {
            return None;
        };
        if !is_plain_string(value_type) {
            return None;
        }
        let dict = array.as_any_dictionary();
        let values_array: &'a dyn Array = dict.values().as_ref();
        let values: Vec<&'a str> = with_strings!(
            values_array,
            |s| (0..s.len())
                .map(|i| if s.is_valid(i) { s.value(i) } else { "" })
                .collect(),
            unreachable!("checked above")
        );
        let keys = if values.is_empty() {
            vec![0; array.len()] // every row is null
        } else {
            dict.normalized_keys()
        };
        Some(Self { keys, values })
    }
}

/// Writes strings, an empty one at null rows.
fn write_strings(array: &dyn Array, out: &mut Vec<u8>) -> Written {
    let nulls = array.logical_nulls();
    with_strings!(
        array,
        |s| {
            put_strings(s, nulls.as_ref(), out);
            Ok(())
        },
        {
            let dict = StringDictionary::of(array).ok_or(Fail::Mismatch)?;
            for (i, &k) in dict.keys.iter().enumerate() {
                let s = if is_valid(nulls.as_ref(), i) {
                    dict.values[k]
                } else {
                    ""
                };
                put_str(out, s);
            }
            Ok(())
        }
    )
}

fn put_strings<'a, A: ArrayAccessor<Item = &'a str>>(
    strings: A,
    nulls: Option<&NullBuffer>,
    out: &mut Vec<u8>,
) {
    for i in 0..strings.len() {
        if is_valid(nulls, i) {
            put_str(out, strings.value(i));
        } else {
            out.push(0);
        }
    }
}

/// Writes a LowCardinality(String | Nullable(String)) column (see the module doc).
fn write_low_cardinality(inner: &ChType, array: &dyn Array, out: &mut Vec<u8>) -> Written {
    let nullable = match inner {
        ChType::String => false,
        ChType::Nullable(t) if **t == ChType::String => true,
        _ => return Err(Fail::Mismatch),
    };
    let n = array.len();
    let nulls = array.logical_nulls();
    let nulls = nulls.as_ref();
    with_strings!(
        array,
        |s| {
            if n == 0 {
                return Ok(());
            }
            // Key 0 is NULL (nullable) or the empty string (not nullable, so "" reuses it).
            let mut keys: Vec<&str> = vec![""];
            // foldhash, randomly seeded per process: SipHash was a tenth of the sink's
            // CPU here.
            let mut index: HashMap<&str, u64, foldhash::fast::RandomState> = HashMap::default();
            if !nullable {
                index.insert("", 0);
            }
            // Runs of one value (sorted or bursty data) skip the lookup.
            let mut last: Option<(&str, u64)> = None;
            let rows: Vec<u64> = (0..n)
                .map(|i| {
                    if !is_valid(nulls, i) {
                        return 0;
                    }
                    let v = s.value(i);
                    if let Some((lv, lk)) = last {
                        if lv == v {
                            return lk;
                        }
                    }
                    let k = *index.entry(v).or_insert_with(|| {
                        keys.push(v);
                        keys.len() as u64 - 1
                    });
                    last = Some((v, k));
                    k
                })
                .collect();
            put_low_cardinality(&keys, n, |i| rows[i], out);
            Ok(())
        },
        {
            let dict = StringDictionary::of(array).ok_or(Fail::Mismatch)?;
            if n == 0 {
                return Ok(());
            }
            let mut keys = Vec::with_capacity(dict.values.len() + 1);
            keys.push("");
            keys.extend_from_slice(&dict.values);
            put_low_cardinality(
                &keys,
                n,
                |i| {
                    if is_valid(nulls, i) {
                        dict.keys[i] as u64 + 1
                    } else {
                        0
                    }
                },
                out,
            );
            Ok(())
        }
    )
}

/// Writes LowCardinality data (`rows` > 0): index type, the keys, then `index(i)` per row in
/// the narrowest width that holds every key.
fn put_low_cardinality(
    keys: &[&str],
    rows: usize,
    index: impl Fn(usize) -> u64,
    out: &mut Vec<u8>,
) {
    let (code, width) = match keys.len() as u64 {
        0..=0x100 => (0u64, 1),
        0x101..=0x1_0000 => (1, 2),
        0x1_0001..=0x1_0000_0000 => (2, 4),
        _ => (3, 8),
    };
    put_u64(
        out,
        code | LC_HAS_ADDITIONAL_KEYS | LC_NEED_UPDATE_DICTIONARY,
    );
    put_u64(out, keys.len() as u64);
    for k in keys {
        put_str(out, k);
    }
    put_u64(out, rows as u64);
    out.reserve(rows * width);
    match width {
        1 => out.extend((0..rows).map(|i| index(i) as u8)),
        2 => (0..rows).for_each(|i| out.extend_from_slice(&(index(i) as u16).to_le_bytes())),
        4 => (0..rows).for_each(|i| out.extend_from_slice(&(index(i) as u32).to_le_bytes())),
        _ => (0..rows).for_each(|i| out.extend_from_slice(&index(i).to_le_bytes())),
    }
}

// ---------------------------------------------------------------------------------------
// Arrays and maps.

/// The child items that the rows of a list-like column cover (null rows made empty), and
/// the UInt64 end offsets that ClickHouse wants.
struct Items {
    ends: Vec<u64>,
    /// Contiguous items `start..start + len` of the child...
    start: usize,
    len: usize,
    /// ...or, when a null row covers items, the ones to take.
    take: Option<UInt64Array>,
}

impl Items {
    fn new<O: OffsetSizeTrait>(offsets: &[O], nulls: Option<&NullBuffer>) -> Items {
        let n = offsets.len() - 1;
        let start = offsets[0].as_usize();
        let null_with_items = nulls
            .is_some_and(|nulls| (0..n).any(|i| nulls.is_null(i) && offsets[i] != offsets[i + 1]));
        if !null_with_items {
            return Items {
                ends: offsets[1..]
                    .iter()
                    .map(|o| (o.as_usize() - start) as u64)
                    .collect(),
                start,
                len: offsets[n].as_usize() - start,
                take: None,
            };
        }
        let mut take = Vec::new();
        let mut ends = Vec::with_capacity(n);
        for i in 0..n {
            if is_valid(nulls, i) {
                take.extend(offsets[i].as_usize() as u64..offsets[i + 1].as_usize() as u64);
            }
            ends.push(take.len() as u64);
        }
        Items {
            ends,
            start: 0,
            len: take.len(),
            take: Some(UInt64Array::from(take)),
        }
    }

    /// Writes the end offsets.
    fn write_offsets(&self, out: &mut Vec<u8>) {
        out.reserve(8 * self.ends.len());
        for &e in &self.ends {
            put_u64(out, e);
        }
    }

    /// The covered items of `child`, in order.
    fn of(&self, child: &ArrayRef) -> Result<ArrayRef, Fail> {
        match &self.take {
            None => Ok(child.slice(self.start, self.len)),
            Some(indices) => arrow::compute::take(child, indices, None)
                .map_err(|e| Fail::Internal(e.to_string())),
        }
    }

    /// Writes the covered items of `child` as `ty`, naming the row of a bad item.
    fn write(&self, ty: &ChType, child: &ArrayRef, out: &mut Vec<u8>) -> Written {
        let items = self.of(child)?;
        write_data(ty, items.as_ref(), out).map_err(|fail| match fail {
            Fail::Value { row: item, reason } => {
                let row = self.ends.partition_point(|&e| e <= item as u64);
                Fail::Value {
                    row,
                    reason: format!("item {}: {reason}", item as u64 - self.row_start(row)),
                }
            }
            other => other,
        })
    }

    fn row_start(&self, row: usize) -> u64 {
        if row == 0 {
            0
        } else {
            self.ends[row - 1]
        }
    }
}

/// `Array(T)` from List or LargeList.
fn write_array(inner: &ChType, array: &dyn Array, out: &mut Vec<u8>) -> Written {
    let nulls = array.logical_nulls();
    let (items, child) = match array.data_type() {
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            (
                Items::new(list.value_offsets(), nulls.as_ref()),
                list.values(),
            )
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            (
                Items::new(list.value_offsets(), nulls.as_ref()),
                list.values(),
            )
        }
        _ => return Err(Fail::Mismatch),
    };
    items.write_offsets(out);
    items.write(inner, child, out)
}

/// `Map(K, V)` from an Arrow Map, or from strings holding JSON objects.
fn write_map(k: &ChType, v: &ChType, array: &dyn Array, out: &mut Vec<u8>) -> Written {
    let nulls = array.logical_nulls();
    if let DataType::Map(..) = array.data_type() {
        let map = array.as_map();
        let items = Items::new(map.value_offsets(), nulls.as_ref());
        items.write_offsets(out);
        items.write(k, map.keys(), out)?;
        return items.write(v, map.values(), out);
    }
    // JSON text: parse every row into key and value columns, then write those.
    let mut keys = StringBuilder::new();
    let mut values = StringBuilder::new();
    let mut ends = Vec::with_capacity(array.len());
    with_strings!(
        array,
        |s| {
            for i in 0..s.len() {
                if is_valid(nulls.as_ref(), i) {
                    parse_json_object(s.value(i), &mut keys, &mut values)
                        .map_err(|e| value_error(i, format!("not a JSON object: {e}")))?;
                }
                ends.push(keys.len() as u64);
            }
        },
        return Err(Fail::Mismatch)
    );
    let n = keys.len();
    let items = Items {
        ends,
        start: 0,
        len: n,
        take: None,
    };
    items.write_offsets(out);
    let keys: ArrayRef = std::sync::Arc::new(keys.finish());
    let values: ArrayRef = std::sync::Arc::new(values.finish());
    items.write(k, &keys, out)?;
    items.write(v, &values, out)
}

/// Appends the members of the JSON object `text` to `keys` and `values`: string values
/// decoded, other values as their JSON text, verbatim.
fn parse_json_object(
    text: &str,
    keys: &mut StringBuilder,
    values: &mut StringBuilder,
) -> Result<(), serde_json::Error> {
    // serde_json validates (and words the errors); the scan below then takes each member's
    // text as it is, so that numbers keep their spelling (`1.50`, `1e3`) rather than going
    // through an f64.
    let mut de = serde_json::Deserializer::from_str(text);
    serde::Deserializer::deserialize_map(&mut de, IsObject)?;
    de.end()?;
    let b = text.as_bytes();
    let skip_ws = |mut pos: usize| {
        while b[pos].is_ascii_whitespace() {
            pos += 1;
        }
        pos
    };
    // After the closing quote of the string starting at `pos`.
    let skip_string = |mut pos: usize| {
        pos += 1;
        while b[pos] != b'"' {
            pos += if b[pos] == b'\\' { 2 } else { 1 };
        }
        pos + 1
    };
    let decode = |token: &str| -> Result<String, serde_json::Error> {
        let inner = &token[1..token.len() - 1];
        if inner.contains('\\') {
            serde_json::from_str(token)
        } else {
            Ok(inner.to_string())
        }
    };
    let mut pos = skip_ws(0) + 1; // past '{'
    loop {
        pos = skip_ws(pos);
        if b[pos] == b'}' {
            return Ok(());
        }
        let end = skip_string(pos);
        keys.append_value(decode(&text[pos..end])?);
        pos = skip_ws(skip_ws(end) + 1); // past ':'
        if b[pos] == b'"' {
            let end = skip_string(pos);
            values.append_value(decode(&text[pos..end])?);
            pos = end;
        } else {
            let start = pos;
            let mut depth = 0usize;
            loop {
                match b[pos] {
                    b'"' => pos = skip_string(pos),
                    b'[' | b'{' => {
                        depth += 1;
                        pos += 1;
                    }
                    b']' | b'}' if depth > 0 => {
                        depth -= 1;
                        pos += 1;
                    }
                    b',' | b'}' if depth == 0 => break,
                    _ => pos += 1,
                }
            }
            values.append_value(text[start..pos].trim_end());
        }
        pos = skip_ws(pos);
        if b[pos] == b',' {
            pos += 1;
        }
    }
}

/// A serde visitor that accepts a JSON object (and nothing else) and ignores its members.
struct IsObject;

impl<'de> Visitor<'de> for IsObject {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Type parsing.

/// A recursive-descent parser of ClickHouse type names.
struct TypeParser<'a> {
    s: &'a str,
    pos: usize,
}

/// One argument of a parametric type.
enum TypeArg {
    Type(ChType),
    Number(u64),
    Text(String),
}

impl TypeParser<'_> {
    fn skip_ws(&mut self) {
        let rest = &self.s[self.pos..];
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn word(&mut self) -> &str {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        self.pos += len;
        &rest[..len]
    }

    fn quoted(&mut self) -> Result<String, TypeSyntax> {
        // At the opening quote.
        self.pos += 1;
        let mut text = String::new();
        let mut chars = self.s[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\'' => {
                    self.pos += i + 1;
                    return Ok(text);
                }
                '\\' => match chars.next() {
                    Some((_, escaped)) => text.push(escaped),
                    None => break,
                },
                c => text.push(c),
            }
        }
        Err(TypeSyntax::UnterminatedString)
    }

    fn arg(&mut self) -> Result<TypeArg, TypeSyntax> {
        self.skip_ws();
        match self.peek() {
            Some('\'') => self.quoted().map(TypeArg::Text),
            Some(c) if c.is_ascii_digit() => {
                let word = self.word();
                word.parse()
                    .map(TypeArg::Number)
                    .map_err(|_| TypeSyntax::BadNumber(word.to_string()))
            }
            _ => self.parse_type().map(TypeArg::Type),
        }
    }

    fn parse_type(&mut self) -> Result<ChType, TypeSyntax> {
        let name = self.word().to_string();
        if name.is_empty() {
            return Err(TypeSyntax::ExpectedType(self.pos));
        }
        let mut args = Vec::new();
        if self.eat('(') && !self.eat(')') {
            loop {
                args.push(self.arg()?);
                if self.eat(')') {
                    break;
                }
                if !self.eat(',') {
                    return Err(TypeSyntax::ExpectedSeparator(self.pos));
                }
            }
        }
        type_of(&name, args)
    }
}

/// The type called `name` with `args`.
fn type_of(name: &str, args: Vec<TypeArg>) -> Result<ChType, TypeSyntax> {
    use TypeArg::{Number, Text, Type};
    let bad_args = || TypeSyntax::BadArguments(name.to_string());
    let decimal = |p: u64, s: u64| {
        if (1..=76).contains(&p) && s <= p {
            Ok(ChType::Decimal(p as u8, s as u8))
        } else {
            Err(TypeSyntax::DecimalRange(p, s))
        }
    };
    let mut args = args.into_iter();
    let (a, b, c) = (args.next(), args.next(), args.next());
    if c.is_some() {
        return Err(bad_args());
    }
    let boxed = |t: ChType| Box::new(t);
    Ok(match (name, a, b) {
        ("String", None, None) => ChType::String,
        ("LowCardinality", Some(Type(t)), None) => ChType::LowCardinality(boxed(t)),
        ("Nullable", Some(Type(t)), None) => ChType::Nullable(boxed(t)),
        ("Array", Some(Type(t)), None) => ChType::Array(boxed(t)),
        ("Map", Some(Type(k)), Some(Type(v))) => ChType::Map(boxed(k), boxed(v)),
        ("DateTime64", Some(Number(p)), tz) if p <= 9 => {
            let tz = match tz {
                None => None,
                Some(Text(tz)) => Some(tz),
                _ => return Err(bad_args()),
            };
            ChType::DateTime64(p as u8, tz)
        }
        ("DateTime", None, None) => ChType::DateTime(None),
        ("DateTime", Some(Text(tz)), None) => ChType::DateTime(Some(tz)),
        ("Date", None, None) => ChType::Date,
        ("Date32", None, None) => ChType::Date32,
        ("Int8", None, None) => ChType::Int8,
        ("Int16", None, None) => ChType::Int16,
        ("Int32", None, None) => ChType::Int32,
        ("Int64", None, None) => ChType::Int64,
        ("UInt8", None, None) => ChType::UInt8,
        ("UInt16", None, None) => ChType::UInt16,
        ("UInt32", None, None) => ChType::UInt32,
        ("UInt64", None, None) => ChType::UInt64,
        ("Float32", None, None) => ChType::Float32,
        ("Float64", None, None) => ChType::Float64,
        ("Bool" | "Boolean", None, None) => ChType::Bool,
        ("UUID", None, None) => ChType::Uuid,
        ("Decimal", Some(Number(p)), None) => decimal(p, 0)?,
        ("Decimal", Some(Number(p)), Some(Number(s))) => decimal(p, s)?,
        ("Decimal32", Some(Number(s)), None) => decimal(9, s)?,
        ("Decimal64", Some(Number(s)), None) => decimal(18, s)?,
        ("Decimal128", Some(Number(s)), None) => decimal(38, s)?,
        ("Decimal256", Some(Number(s)), None) => decimal(76, s)?,
        (
            "String" | "LowCardinality" | "Nullable" | "Array" | "Map" | "DateTime64" | "DateTime"
            | "Date" | "Date32" | "Int8" | "Int16" | "Int32" | "Int64" | "UInt8" | "UInt16"
            | "UInt32" | "UInt64" | "Float32" | "Float64" | "Bool" | "Boolean" | "UUID" | "Decimal"
            | "Decimal32" | "Decimal64" | "Decimal128" | "Decimal256",
            _,
            _,
        ) => return Err(bad_args()),
        _ => return Err(TypeSyntax::Unknown(name.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::StringArray;
    use arrow::array::{
        BooleanArray, Date32Array, Decimal128Array, DictionaryArray, FixedSizeBinaryArray,
        Float64Array, Int64Array, Int8Array, LargeStringArray, ListArray, MapBuilder, NullArray,
        StringViewArray, TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray,
        UInt64Array,
    };
    use arrow::datatypes::{Field, Float64Type, Schema};

    use super::*;

    fn t(s: &str) -> ChType {
        ChType::parse(s).unwrap()
    }

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        let fields: Vec<Field> = columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns.into_iter().map(|(_, a)| a).collect(),
        )
        .unwrap()
    }

    /// Encodes one column named `c` of type `ty`.
    fn encode_one(ty: &str, array: ArrayRef) -> Result<Vec<u8>, NativeError> {
        let mut out = Vec::new();
        encode_block(&batch(vec![("c", array)]), &[("c".into(), t(ty))], &mut out)?;
        Ok(out)
    }

    /// The data part of a one-column block (after counts, name and type).
    fn data_of(ty: &str, array: ArrayRef) -> Vec<u8> {
        fn varuint(out: &[u8], pos: &mut usize) -> usize {
            let (mut v, mut shift) = (0u64, 0);
            loop {
                let b = out[*pos];
                *pos += 1;
                v |= u64::from(b & 0x7f) << shift;
                shift += 7;
                if b < 0x80 {
                    return v as usize;
                }
            }
        }
        let out = encode_one(ty, array).unwrap();
        let mut pos = 0;
        assert_eq!(varuint(&out, &mut pos), 1, "one column");
        varuint(&out, &mut pos); // rows
        assert_eq!(varuint(&out, &mut pos), 1, "name length");
        pos += 1;
        let type_len = varuint(&out, &mut pos);
        assert_eq!(&out[pos..pos + type_len], ty.as_bytes());
        out[pos + type_len..].to_vec()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn types_parse_and_print_as_clickhouse_does() {
        for s in [
            "String",
            "LowCardinality(String)",
            "LowCardinality(Nullable(String))",
            "Nullable(String)",
            "Array(String)",
            "Array(Nullable(Float64))",
            "Map(String, String)",
            "Map(LowCardinality(String), Array(UInt64))",
            "DateTime64(3, 'UTC')",
            "DateTime64(9)",
            "DateTime",
            "DateTime('Europe/Berlin')",
            "Date",
            "Date32",
            "Int8",
            "Int16",
            "Int32",
            "Int64",
            "UInt8",
            "UInt16",
            "UInt32",
            "UInt64",
            "Float32",
            "Float64",
            "Bool",
            "UUID",
            "Decimal(12, 3)",
            "Nullable(Decimal(12, 3))",
            "Decimal(76, 10)",
        ] {
            assert_eq!(t(s).to_string(), s);
        }
        assert_eq!(t(" Map( String ,String ) "), t("Map(String, String)"));
        assert_eq!(t("Decimal32(2)"), ChType::Decimal(9, 2));
        assert_eq!(t("Decimal128(4)"), ChType::Decimal(38, 4));
        assert_eq!(t("Boolean"), ChType::Bool);
        assert_eq!(
            t("DateTime64(6, 'UTC')"),
            ChType::DateTime64(6, Some("UTC".into()))
        );
        assert_eq!(
            ChType::DateTime(Some("a'b".into())).to_string(),
            r"DateTime('a\'b')"
        );
        assert_eq!(t(r"DateTime('a\'b')"), ChType::DateTime(Some("a'b".into())));
        for bad in [
            "",
            "Strin",
            "String(1)",
            "Nullable()",
            "Map(String)",
            "DateTime64(10)",
            "DateTime64('UTC')",
            "Decimal(3, 4)",
            "Array(String",
            "String)",
            "DateTime('UTC)",
        ] {
            let e = ChType::parse(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("'{bad}'")), "{e}");
        }
        assert!("Int8".parse::<ChType>().is_ok());
    }

    #[test]
    fn column_types_map_to_what_sluice_creates() {
        use flight_schema::ColumnType as C;
        let cases = [
            (C::Bool, false, None, "Bool"),
            (C::Int32, true, None, "Nullable(Int32)"),
            (C::Int64, false, None, "Int64"),
            (C::Float, false, None, "Float32"),
            (C::Double, true, Some(Role::Field), "Nullable(Float64)"),
            (C::String, true, None, "Nullable(String)"),
            (C::String, false, Some(Role::Tag), "LowCardinality(String)"),
            (
                C::String,
                true,
                Some(Role::Tag),
                "LowCardinality(Nullable(String))",
            ),
            (C::String, false, Some(Role::Message), "String"),
            (
                C::Timestamp(TimeUnit::Microsecond),
                false,
                Some(Role::Time),
                "DateTime64(6, 'UTC')",
            ),
            (
                C::Timestamp(TimeUnit::Millisecond),
                false,
                None,
                "DateTime64(3, 'UTC')",
            ),
            (
                C::Timestamp(TimeUnit::Nanosecond),
                true,
                None,
                "Nullable(DateTime64(9, 'UTC'))",
            ),
            (C::Date, false, None, "Date32"),
            (C::Uuid, true, None, "Nullable(UUID)"),
            (
                C::Decimal {
                    precision: 12,
                    scale: 3,
                },
                true,
                None,
                "Nullable(Decimal(12, 3))",
            ),
            (C::Jsonb, true, None, "Nullable(String)"),
            (C::Map, true, None, "Map(String, String)"),
            (C::StringArray, true, None, "Array(String)"),
            (C::DoubleArray, false, None, "Array(Float64)"),
            (
                C::TimestampNsArray,
                true,
                None,
                "Array(DateTime64(9, 'UTC'))",
            ),
            (C::MapArray, false, None, "Array(Map(String, String))"),
        ];
        for (ct, nullable, role, want) in cases {
            assert_eq!(ch_type_for(&ct, nullable, role).to_string(), want, "{ct:?}");
        }
    }

    #[test]
    fn block_matches_clickhouse_own_native_output() {
        // Bytes of ClickHouse 26.9's answer to
        // SELECT map('a','b') AS m, [1.5, NULL]::Array(Nullable(Float64)) a,
        //   toDecimal64(1.5, 3) d, CAST(1 AS Nullable(Int8)) n, toDateTime64(1, 3, 'UTC') t,
        //   toDate32(1) d32, true b FORMAT Native
        let want = hex(
            "0701 016d 134d 6170 2853 7472 696e 672c 2053 7472 696e 6729 0100 0000 0000 0000
             0161 0162 0161 1841 7272 6179 284e 756c 6c61 626c 6528 466c 6f61 7436 3429 2902
             0000 0000 0000 0000 0100 0000 0000 00f8 3f00 0000 0000 0000 0001 640e 4465 6369
             6d61 6c28 3138 2c20 3329 dc05 0000 0000 0000 016e 0e4e 756c 6c61 626c 6528 496e
             7438 2900 0101 7414 4461 7465 5469 6d65 3634 2833 2c20 2755 5443 2729 e803 0000
             0000 0000 0364 3332 0644 6174 6533 3201 0000 0001 6204 426f 6f6c 01",
        );
        let mut map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        map.keys().append_value("a");
        map.values().append_value("b");
        map.append(true).unwrap();
        let list =
            ListArray::from_iter_primitive::<Float64Type, _, _>([Some(vec![Some(1.5), None])]);
        let b = batch(vec![
            ("m", Arc::new(map.finish())),
            ("a", Arc::new(list)),
            (
                "d",
                Arc::new(
                    Decimal128Array::from(vec![1500])
                        .with_precision_and_scale(18, 3)
                        .unwrap(),
                ),
            ),
            ("n", Arc::new(Int8Array::from(vec![1]))),
            (
                "t",
                Arc::new(TimestampMillisecondArray::from(vec![1000]).with_timezone("UTC")),
            ),
            ("d32", Arc::new(Date32Array::from(vec![1]))),
            ("b", Arc::new(BooleanArray::from(vec![true]))),
        ]);
        let columns: Vec<(String, ChType)> = [
            ("m", "Map(String, String)"),
            ("a", "Array(Nullable(Float64))"),
            ("d", "Decimal(18, 3)"),
            ("n", "Nullable(Int8)"),
            ("t", "DateTime64(3, 'UTC')"),
            ("d32", "Date32"),
            ("b", "Bool"),
        ]
        .into_iter()
        .map(|(n, ty)| (n.to_string(), t(ty)))
        .collect();
        let mut out = vec![0xaa];
        encode_block(&b, &columns, &mut out).unwrap();
        assert_eq!(out[0], 0xaa, "appends");
        assert_eq!(out[1..], want);
    }

    #[test]
    fn uuid_is_two_little_endian_halves() {
        // ClickHouse: toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0') FORMAT Native.
        let uuid = hex("61f0c4045cb311e7907ba6006ad3dba0");
        let array = FixedSizeBinaryArray::try_from_sparse_iter_with_size(
            [Some(uuid.as_slice()), None].into_iter(),
            16,
        )
        .unwrap();
        let data = data_of("UUID", Arc::new(array));
        let mut want = hex("e711b35c04c4f061 a0dbd36a00a67b90");
        want.extend([0; 16]);
        assert_eq!(data, want);
    }

    #[test]
    fn low_cardinality_nullable_matches_clickhouse() {
        // ClickHouse: CAST(arrayJoin([NULL,'a','']) AS LowCardinality(Nullable(String))).
        let want = hex(
            "0100000000000000 0006000000000000 0300000000000000 00 0161 00
             0300000000000000 000102",
        );
        let ty = "LowCardinality(Nullable(String))";
        let plain = StringArray::from(vec![None, Some("a"), Some("")]);
        assert_eq!(data_of(ty, Arc::new(plain)), want);
        // The same from a dictionary array: its dictionary is written as it is, after key 0.
        let dict: DictionaryArray<Int8Type> = vec![None, Some("a"), Some("")].into_iter().collect();
        assert_eq!(data_of(ty, Arc::new(dict)), want);
    }

    #[test]
    fn low_cardinality_from_dictionary_keeps_it_and_shifts_keys() {
        let dict = DictionaryArray::<Int32Type>::try_new(
            arrow::array::Int32Array::from(vec![Some(2), Some(0), None, Some(2), Some(1)]),
            Arc::new(StringArray::from(vec![Some("x"), None, Some("yy")])),
        )
        .unwrap();
        // Rows 2 (null key) and 4 (null value) are null: index 0, the empty string.
        let want = hex(
            "0100000000000000 0006000000000000 0400000000000000 00 0178 00 027979
             0500000000000000 03 01 00 03 00",
        );
        assert_eq!(
            data_of("LowCardinality(String)", Arc::new(dict.clone())),
            want
        );
        // Sliced: the dictionary stays whole, only the rows' keys change.
        let sliced = dict.slice(3, 2);
        let want = hex(
            "0100000000000000 0006000000000000 0400000000000000 00 0178 00 027979
             0200000000000000 03 00",
        );
        assert_eq!(data_of("LowCardinality(String)", Arc::new(sliced)), want);
        // As plain String, values are expanded.
        assert_eq!(
            data_of("String", Arc::new(dict)),
            hex("027979 0178 00 027979 00")
        );
    }

    #[test]
    fn low_cardinality_plain_strings_deduplicate_and_widen_keys() {
        // Not nullable: "" and nulls share key 0.
        let strings = StringArray::from(vec![Some("b"), Some(""), None, Some("b"), Some("c")]);
        let want = hex(
            "0100000000000000 0006000000000000 0300000000000000 00 0162 0163
             0500000000000000 01 00 00 01 02",
        );
        assert_eq!(data_of("LowCardinality(String)", Arc::new(strings)), want);
        // 300 distinct values need UInt16 indexes.
        let many: Vec<String> = (0..300).map(|i| i.to_string()).collect();
        let data = data_of(
            "LowCardinality(String)",
            Arc::new(StringArray::from(many.clone())),
        );
        assert_eq!(data[8..16], (1u64 | 0x600).to_le_bytes());
        assert_eq!(data[16..24], 301u64.to_le_bytes());
        assert_eq!(data[data.len() - 2..], 300u16.to_le_bytes());
        // Zero rows: no data at all, not even the prefix.
        assert_eq!(
            data_of(
                "LowCardinality(String)",
                Arc::new(StringArray::from(Vec::<&str>::new()))
            ),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn strings_from_every_layout() {
        let want = hex("0161 00 03e282ac 00");
        let values = vec![Some("a"), Some(""), Some("€"), None];
        assert_eq!(
            data_of("String", Arc::new(StringArray::from(values.clone()))),
            want
        );
        assert_eq!(
            data_of("String", Arc::new(LargeStringArray::from(values.clone()))),
            want
        );
        assert_eq!(
            data_of("String", Arc::new(StringViewArray::from(values.clone()))),
            want
        );
        let mut nullable = vec![0, 0, 0, 1];
        nullable.extend(&want);
        assert_eq!(
            data_of("Nullable(String)", Arc::new(StringArray::from(values))),
            nullable
        );
        let long = "x".repeat(200);
        assert_eq!(
            data_of("String", Arc::new(StringArray::from(vec![long.as_str()])))[..2],
            [0xc8, 0x01]
        );
    }

    #[test]
    fn nested_low_cardinality_prefix_comes_first() {
        // ClickHouse: CAST(['a','b'] AS Array(LowCardinality(String))).
        let list = ListArray::from_iter_primitive::<Int8Type, _, _>([Some(vec![Some(1)])]);
        let strings = ListArray::new(
            Arc::new(Field::new("item", DataType::Utf8, true)),
            list.offsets().clone(),
            Arc::new(StringArray::from(vec!["a"])),
            None,
        );
        let want = hex(
            "0100000000000000 0100000000000000 0006000000000000 0200000000000000 00 0161
             0100000000000000 01",
        );
        assert_eq!(
            data_of("Array(LowCardinality(String))", Arc::new(strings)),
            want
        );
    }

    #[test]
    fn arrays_respect_offsets_and_empty_null_rows() {
        let list = ListArray::from_iter_primitive::<Float64Type, _, _>([
            Some(vec![Some(1.0)]),
            None,
            Some(vec![]),
            Some(vec![Some(2.0), Some(3.0)]),
        ]);
        let sliced = list.slice(1, 3);
        let mut want = hex("0000000000000000 0000000000000000 0200000000000000");
        want.extend(2.0f64.to_le_bytes());
        want.extend(3.0f64.to_le_bytes());
        assert_eq!(data_of("Array(Float64)", Arc::new(sliced)), want);

        // A null row that covers items (allowed in Arrow) is written empty.
        let values = Float64Array::from(vec![1.0, 2.0, 3.0]);
        let offsets = arrow::buffer::OffsetBuffer::new(vec![0, 1, 3].into());
        let list = ListArray::new(
            Arc::new(Field::new("item", DataType::Float64, true)),
            offsets,
            Arc::new(values),
            Some(NullBuffer::from(vec![false, true])),
        );
        let mut want = hex("0000000000000000 0200000000000000");
        want.extend(2.0f64.to_le_bytes());
        want.extend(3.0f64.to_le_bytes());
        assert_eq!(data_of("Array(Float64)", Arc::new(list)), want);
    }

    #[test]
    fn maps_from_json_text() {
        let json = StringArray::from(vec![
            Some(r#"{"k":"v","n":1.50,"o":{"a":[1, null]},"k":"dup" , "t":true,"z":null }"#),
            None,
            Some("{}"),
            Some(r#" { "é" : "\u00e9\n" } "#),
        ]);
        let data = data_of("Map(String, String)", Arc::new(json));
        let mut want = Vec::new();
        for end in [6u64, 6, 6, 7] {
            want.extend(end.to_le_bytes());
        }
        for k in ["k", "n", "o", "k", "t", "z", "é"] {
            put_str(&mut want, k);
        }
        for v in [
            "v",
            "1.50",
            r#"{"a":[1, null]}"#,
            "dup",
            "true",
            "null",
            "é\n",
        ] {
            put_str(&mut want, v);
        }
        assert_eq!(data, want);

        for (bad, what) in [
            ("{nope", "key must be a string"),
            ("[1]", "a JSON object"),
            ("\"s\"", "a JSON object"),
            ("{} x", "trailing"),
        ] {
            let json = StringArray::from(vec![Some("{}"), Some(bad)]);
            let e = encode_one("Map(String, String)", Arc::new(json)).unwrap_err();
            assert_eq!(e.row(), Some(1), "{e}");
            assert!(e.to_string().contains("column 'c', row 1"), "{e}");
            assert!(e.to_string().contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn timestamps_scale_up_exactly_and_down_with_floor() {
        let ns = TimestampNanosecondArray::from(vec![Some(-1), Some(1_999), None, Some(-1_000)]);
        let want: Vec<u8> = [-1i64, 1, 0, -1]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(data_of("DateTime64(6, 'UTC')", Arc::new(ns)), want);
        let s = TimestampSecondArray::from(vec![-2, 3]);
        let want: Vec<u8> = [-2_000_000_000i64, 3_000_000_000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(data_of("DateTime64(9)", Arc::new(s)), want);
        let big = TimestampSecondArray::from(vec![0, i64::MAX / 10]);
        let e = encode_one("DateTime64(9)", Arc::new(big)).unwrap_err();
        assert_eq!(e.row(), Some(1), "{e}");
        let ms = TimestampMillisecondArray::from(vec![1_999, -1]);
        assert_eq!(
            data_of("DateTime", Arc::new(ms.slice(0, 1))),
            1u32.to_le_bytes()
        );
        let e = encode_one("DateTime('UTC')", Arc::new(ms)).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
    }

    #[test]
    fn integers_range_check_and_widen() {
        let values = Int64Array::from(vec![Some(-128), None, Some(127)]);
        assert_eq!(
            data_of("Nullable(Int8)", Arc::new(values)),
            hex("00 01 00 80 00 7f")
        );
        let e = encode_one("Int8", Arc::new(Int64Array::from(vec![1, 128]))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "column 'c', row 1: 128 is out of range for Int8"
        );
        let e = encode_one("UInt64", Arc::new(Int8Array::from(vec![-1]))).unwrap_err();
        assert!(
            e.to_string().contains("-1 is out of range for UInt64"),
            "{e}"
        );
        assert_eq!(
            data_of("UInt64", Arc::new(UInt64Array::from(vec![u64::MAX]))),
            u64::MAX.to_le_bytes()
        );
        assert_eq!(
            data_of("Int16", Arc::new(Int8Array::from(vec![-2]))),
            (-2i16).to_le_bytes()
        );
    }

    #[test]
    fn decimals_by_width_and_precision() {
        let d = |p, s, v: Vec<Option<i128>>| {
            Arc::new(
                Decimal128Array::from(v)
                    .with_precision_and_scale(p, s)
                    .unwrap(),
            ) as ArrayRef
        };
        assert_eq!(
            data_of("Decimal(9, 2)", d(9, 2, vec![Some(-5), None])),
            hex("fbffffff 00000000")
        );
        // Scale 1 into scale 2: times ten.
        assert_eq!(
            data_of("Decimal(12, 2)", d(12, 1, vec![Some(7)])),
            70i64.to_le_bytes()
        );
        assert_eq!(
            data_of("Decimal(38, 0)", d(38, 0, vec![Some(-1)])),
            [0xff; 16]
        );
        assert_eq!(
            data_of("Decimal(40, 0)", d(38, 0, vec![Some(-1)])),
            [0xff; 32]
        );
        let e = encode_one("Decimal(3, 0)", d(10, 0, vec![Some(999), Some(1000)])).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
        let e = encode_one("Decimal(10, 1)", d(10, 2, vec![Some(1)])).unwrap_err();
        assert!(matches!(e, NativeError::TypeMismatch { .. }), "{e}");
    }

    #[test]
    fn floats_bools_dates_and_nulls() {
        assert_eq!(
            data_of(
                "Float64",
                Arc::new(arrow::array::Float32Array::from(vec![-0.0f32]))
            ),
            (-0.0f64).to_le_bytes()
        );
        assert_eq!(
            data_of(
                "Nullable(Bool)",
                Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)]))
            ),
            hex("000100 010000")
        );
        assert_eq!(
            data_of("Date", Arc::new(Date32Array::from(vec![1, 65535]))),
            hex("0100 ffff")
        );
        let e = encode_one("Date", Arc::new(Date32Array::from(vec![-1]))).unwrap_err();
        assert!(e.to_string().contains("row 0"), "{e}");
        assert_eq!(
            data_of("Nullable(Int32)", Arc::new(NullArray::new(2))),
            hex("0101 00000000 00000000")
        );
        assert_eq!(
            data_of("Array(String)", Arc::new(NullArray::new(1))),
            hex("0000000000000000")
        );
    }

    #[test]
    fn mismatches_name_column_and_both_types() {
        let e = encode_one("Int32", Arc::new(StringArray::from(vec!["1"]))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "column 'c': Arrow type Utf8 cannot fill ClickHouse type Int32"
        );
        assert!(encode_one("LowCardinality(Int32)", Arc::new(Int8Array::from(vec![1]))).is_err());
        assert!(encode_one("Float32", Arc::new(Float64Array::from(vec![1.0]))).is_err());
        // Mismatches are found in empty batches too, and nothing is left in the output.
        let mut out = vec![1, 2];
        let empty = batch(vec![("c", Arc::new(StringArray::from(Vec::<&str>::new())))]);
        let e = encode_block(&empty, &[("c".into(), ChType::Uuid)], &mut out).unwrap_err();
        assert!(matches!(e, NativeError::TypeMismatch { .. }));
        assert_eq!(out, [1, 2]);
        let e = encode_block(&empty, &[], &mut out).unwrap_err();
        assert_eq!(
            e,
            NativeError::ColumnCount {
                columns: 1,
                targets: 0
            }
        );
    }

    #[test]
    fn empty_block_has_names_and_types_only() {
        let empty = batch(vec![("x", Arc::new(Int8Array::from(Vec::<i8>::new())))]);
        let mut out = Vec::new();
        encode_block(&empty, &[("x".into(), ChType::UInt8)], &mut out).unwrap();
        assert_eq!(out, b"\x01\x00\x01x\x05UInt8");
    }
}
