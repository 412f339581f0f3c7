//! PostgreSQL binary `COPY` encoding, straight from Arrow, column by column.
//!
//! # What flows through it
//! In: a [`RecordBatch`] and the PostgreSQL type of each of its columns ([`PgType`], usually
//! from [`PgType::from_column_type`] or [`pg_type_for_field`]). Out: the tuples of
//! `COPY t FROM STDIN (FORMAT binary)`, appended to a byte buffer by [`encode_batch`]. A COPY
//! stream is [`HEADER`], the tuples of any number of batches, then [`TRAILER`].
//!
//! # How
//! Encoding is columnar. For a batch of `n` rows, [`encode_batch`]
//! 1. checks once per column that its Arrow type fits its [`PgType`] and picks the loop for
//!    that pair (a few rare types are widened first with one Arrow cast of the column);
//! 2. sizes every row, one tight loop per column adding that column's value lengths;
//! 3. turns the sizes into row start offsets, grows the output once, writes each row's
//!    field count;
//! 4. writes each column in turn, one type-specialised loop per column that puts the value at
//!    each row's cursor and moves it on.
//!
//! No per-row structs, no per-value dynamic dispatch, no text formatting of numbers (the only
//! text produced is JSON for `jsonb` built from Arrow maps, structs and lists, which is written
//! column by column in the same two passes). Nulls come from each array's (logical) null buffer,
//! and offsets are respected, so sliced arrays and batches encode correctly.
//!
//! # Values
//! | PgType | Arrow | bytes |
//! |---|---|---|
//! | `boolean` | Boolean | 1 byte |
//! | `smallint`, `integer`, `bigint` | Int8..Int64, UInt8..UInt32 (widening only) | big-endian |
//! | `real`, `double precision` | Float16, Float32, Float64 (widening only) | IEEE 754 big-endian |
//! | `text` | Utf8, LargeUtf8, Utf8View, Dictionary(_, any of those) | UTF-8 bytes |
//! | `timestamptz` | Timestamp (any unit, any time zone) | i64 µs since 2000-01-01T00:00:00Z |
//! | `date` | Date32, Date64 | i32 days since 2000-01-01 |
//! | `jsonb` | strings (JSON text, passed through unchecked), Map, Struct, List | `1` + JSON text |
//! | `uuid` | FixedSizeBinary(16) | 16 bytes |
//! | `numeric(p,s)` | Decimal32, Decimal64, Decimal128 | PostgreSQL's base-10000 `numeric` |
//! | `text[]`, `double precision[]` | List/LargeList of strings, of Float64 (or Float32/16) | PostgreSQL's array format |
//!
//! A column of Arrow type Null encodes as all-NULL whatever its [`PgType`].

use std::fmt;

use arrow::array::{
    Array, ArrayAccessor, ArrayRef, AsArray, BooleanArray, BooleanBufferBuilder, Date32Array,
    Date64Array, Decimal128Array, FixedSizeBinaryArray, Float32Array, Float64Array, Int16Array,
    Int32Array, Int64Array, OffsetSizeTrait, RecordBatch, StringArray, UInt64Array,
};
use arrow::buffer::{BooleanBuffer, NullBuffer, ScalarBuffer};
use arrow::datatypes::{
    DataType, Decimal128Type, Field, Float32Type, Float64Type, Int64Type, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt64Type,
};
use arrow::downcast_dictionary_array;
use flight_schema::types::{EXTENSION_NAME_KEY, JSON_EXTENSION};
use flight_schema::ColumnType;

/// The binary COPY header: signature `PGCOPY\n\xff\r\n\0`, flags (i32 0) and header
/// extension length (i32 0). Sent once at the start of a COPY.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The binary COPY trailer: a field count of -1. Sent once at the end of a COPY.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// A PostgreSQL column type that [`encode_batch`] can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Text,
    Timestamptz,
    Date,
    Jsonb,
    Uuid,
    /// `numeric(precision, scale)`; values are sent at the Arrow decimal's own scale and
    /// PostgreSQL rounds them to the column's.
    Numeric {
        precision: u8,
        scale: i8,
    },
    TextArray,
    Float8Array,
}

impl PgType {
    /// The type as written in SQL DDL (`"double precision"`, `"numeric(12,3)"`, `"text[]"`).
    pub fn sql_name(&self) -> String {
        match self {
            Self::Bool => "boolean".into(),
            Self::Int2 => "smallint".into(),
            Self::Int4 => "integer".into(),
            Self::Int8 => "bigint".into(),
            Self::Float4 => "real".into(),
            Self::Float8 => "double precision".into(),
            Self::Text => "text".into(),
            Self::Timestamptz => "timestamptz".into(),
            Self::Date => "date".into(),
            Self::Jsonb => "jsonb".into(),
            Self::Uuid => "uuid".into(),
            Self::Numeric { precision, scale } => format!("numeric({precision},{scale})"),
            Self::TextArray => "text[]".into(),
            Self::Float8Array => "double precision[]".into(),
        }
    }

    /// The PostgreSQL type of a registered column type (`map` lands as `jsonb`, every
    /// timestamp unit as `timestamptz`).
    pub fn from_column_type(t: &ColumnType) -> PgType {
        match t {
            ColumnType::Bool => Self::Bool,
            ColumnType::Int32 => Self::Int4,
            ColumnType::Int64 => Self::Int8,
            ColumnType::Float => Self::Float4,
            ColumnType::Double => Self::Float8,
            ColumnType::String => Self::Text,
            ColumnType::Timestamp(_) => Self::Timestamptz,
            ColumnType::Date => Self::Date,
            ColumnType::Uuid => Self::Uuid,
            ColumnType::Decimal { precision, scale } => Self::Numeric {
                precision: *precision,
                scale: *scale,
            },
            // Lists of timestamps or maps land as a JSON array.
            ColumnType::Jsonb
            | ColumnType::Map
            | ColumnType::TimestampNsArray
            | ColumnType::MapArray => Self::Jsonb,
            ColumnType::StringArray => Self::TextArray,
            ColumnType::DoubleArray => Self::Float8Array,
        }
    }
}

impl fmt::Display for PgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sql_name())
    }
}

/// The PostgreSQL type for an Arrow field, from its Arrow type alone (plus the
/// `ARROW:extension:name = arrow.json` metadata that marks JSON text). `None` for types this
/// encoder cannot write (e.g. binary, intervals, lists of anything but strings and floats).
pub fn pg_type_for_field(field: &Field) -> Option<PgType> {
    use DataType as D;
    let json = field
        .metadata()
        .get(EXTENSION_NAME_KEY)
        .is_some_and(|name| name == JSON_EXTENSION);
    Some(match field.data_type() {
        D::Boolean => PgType::Bool,
        D::Int8 | D::Int16 | D::UInt8 => PgType::Int2,
        D::Int32 | D::UInt16 => PgType::Int4,
        D::Int64 | D::UInt32 => PgType::Int8,
        D::Float16 | D::Float32 => PgType::Float4,
        D::Float64 => PgType::Float8,
        dt if is_string(dt) => {
            if json {
                PgType::Jsonb
            } else {
                PgType::Text
            }
        }
        D::Timestamp(_, _) => PgType::Timestamptz,
        D::Date32 | D::Date64 => PgType::Date,
        D::FixedSizeBinary(16) => PgType::Uuid,
        D::Decimal32(p, s) | D::Decimal64(p, s) | D::Decimal128(p, s) => PgType::Numeric {
            precision: *p,
            scale: *s,
        },
        D::Map(_, _) | D::Struct(_) => PgType::Jsonb,
        D::List(item) | D::LargeList(item) => match item.data_type() {
            dt if is_string(dt) => PgType::TextArray,
            D::Float16 | D::Float32 | D::Float64 => PgType::Float8Array,
            _ => return None,
        },
        _ => return None,
    })
}

/// Why a batch could not be encoded. Nothing is appended to the output when this is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyError {
    /// Caller bug: one [`PgType`] per batch column is required.
    #[error("the batch has {columns} columns but {types} PostgreSQL types were given")]
    ColumnCount { columns: usize, types: usize },
    /// Caller bug: more columns than a COPY tuple can hold.
    #[error("{0} columns is more than a COPY tuple can hold")]
    TooManyColumns(usize),
    /// The column's Arrow type does not fit its PostgreSQL type (schema mismatch, a bug
    /// upstream rather than bad data).
    #[error("column '{column}': Arrow type {arrow} cannot be encoded as PostgreSQL {pg}")]
    TypeMismatch {
        column: String,
        arrow: DataType,
        pg: PgType,
    },
    /// One value cannot be stored in PostgreSQL (out of range, too large, ...): invalid input,
    /// not retryable. `row` is the row index within the batch given to [`encode_batch`].
    #[error("column '{column}', row {row}: {reason}")]
    Value {
        column: String,
        row: usize,
        reason: String,
    },
}

impl CopyError {
    /// The row of the batch that holds the bad value, for value errors.
    pub fn row(&self) -> Option<usize> {
        match self {
            Self::Value { row, .. } => Some(*row),
            _ => None,
        }
    }
}

/// Appends one binary COPY tuple per row of `batch` to `out` (no header or trailer).
/// `types[i]` is the PostgreSQL type of column `i`.
///
/// Timestamps become microseconds since 2000-01-01T00:00:00Z: seconds × 1 000 000,
/// milliseconds × 1000, microseconds as they are, and nanoseconds **rounded down** with floor
/// division (`div_euclid(1000)`, so -1 ns becomes -1 µs, as PostgreSQL would store the instant
/// just before the epoch). Values outside PostgreSQL's ranges for `timestamptz` and `date`, or
/// longer than a field can be, are [`CopyError::Value`] naming column and row.
///
/// Not checked here (PostgreSQL refuses them and the whole COPY fails): JSON text that is not
/// valid JSON for `jsonb`, NUL characters in text, decimals wider than the column's precision.
/// On error `out` is left as it was.
pub fn encode_batch(
    batch: &RecordBatch,
    types: &[PgType],
    out: &mut Vec<u8>,
) -> Result<(), CopyError> {
    let start = out.len();
    let result = encode_into(batch, types, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_into(batch: &RecordBatch, types: &[PgType], out: &mut Vec<u8>) -> Result<(), CopyError> {
    let ncols = batch.num_columns();
    if ncols != types.len() {
        return Err(CopyError::ColumnCount {
            columns: ncols,
            types: types.len(),
        });
    }
    let field_count = i16::try_from(ncols).map_err(|_| CopyError::TooManyColumns(ncols))?;
    let schema = batch.schema();
    let name = |c: usize| schema.field(c).name().clone();
    let value_error = |c: usize, e: RowError| CopyError::Value {
        column: name(c),
        row: e.row,
        reason: e.reason,
    };

    let mut columns = Vec::with_capacity(ncols);
    for (c, (array, pg)) in batch.columns().iter().zip(types).enumerate() {
        let column = Column::plan(array, *pg).ok_or_else(|| CopyError::TypeMismatch {
            column: name(c),
            arrow: array.data_type().clone(),
            pg: *pg,
        })?;
        columns.push(column);
    }

    // Pass 1: row sizes (field count, one length word per field, then the values).
    let n = batch.num_rows();
    let mut cursors = vec![2 + 4 * ncols; n];
    for (c, column) in columns.iter_mut().enumerate() {
        column
            .add_sizes(&mut cursors)
            .map_err(|e| value_error(c, e))?;
    }
    // Sizes become row start offsets; the output grows once.
    let mut pos = out.len();
    for cursor in cursors.iter_mut() {
        let size = *cursor;
        *cursor = pos;
        pos += size;
    }
    let end = pos;
    out.resize(end, 0);
    let buf = out.as_mut_slice();
    let count = field_count.to_be_bytes();
    for cursor in cursors.iter_mut() {
        put(buf, cursor, &count);
    }

    // Pass 2: each column writes its values at the rows' cursors.
    for (c, column) in columns.iter().enumerate() {
        column
            .write(buf, &mut cursors)
            .map_err(|e| value_error(c, e))?;
    }
    debug_assert!(cursors.last().is_none_or(|&c| c == end));
    Ok(())
}

/// A bad value found while sizing or writing one column.
#[derive(Debug)]
struct RowError {
    row: usize,
    reason: String,
}

/// Longest value a field can hold (its length is an i32).
const MAX_FIELD: usize = i32::MAX as usize;
/// The length word of a NULL field.
const NULL_FIELD: [u8; 4] = (-1i32).to_be_bytes();
/// Microseconds from 1970-01-01 to PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
/// PostgreSQL's `timestamptz` range in µs since 2000 (`MIN_TIMESTAMP..END_TIMESTAMP`:
/// 4714-11-24 BC to 294277-01-01).
const PG_TIMESTAMPS: std::ops::Range<i64> = -211_813_488_000_000_000..9_223_371_331_200_000_000;
/// PostgreSQL's `date` range in days since 2000 (Julian day 0 to `DATE_END_JULIAN`).
const PG_DATES: std::ops::Range<i32> = -2_451_545..2_145_031_949;
/// Element type OIDs of the arrays.
const TEXT_OID: i32 = 25;
const FLOAT8_OID: i32 = 701;

/// Writes `bytes` at `*cursor` and moves the cursor past them.
#[inline(always)]
fn put(out: &mut [u8], cursor: &mut usize, bytes: &[u8]) {
    out[*cursor..*cursor + bytes.len()].copy_from_slice(bytes);
    *cursor += bytes.len();
}

/// Writes `bytes` at `pos` (filling in a value whose place was kept).
#[inline(always)]
fn put_at(out: &mut [u8], pos: usize, bytes: &[u8]) {
    out[pos..pos + bytes.len()].copy_from_slice(bytes);
}

#[inline(always)]
fn put_i32(out: &mut [u8], cursor: &mut usize, v: i32) {
    put(out, cursor, &v.to_be_bytes());
}

/// Calls `f(i, out, cursor)` for each non-null row `i`; writes a NULL field for the others.
#[inline(always)]
fn for_each_value(
    nulls: Option<&NullBuffer>,
    out: &mut [u8],
    cursors: &mut [usize],
    mut f: impl FnMut(usize, &mut [u8], &mut usize) -> Result<(), RowError>,
) -> Result<(), RowError> {
    match nulls {
        None => {
            for (i, cursor) in cursors.iter_mut().enumerate() {
                f(i, out, cursor)?;
            }
        }
        Some(nulls) => {
            for (i, cursor) in cursors.iter_mut().enumerate() {
                if nulls.is_valid(i) {
                    f(i, out, cursor)?;
                } else {
                    put(out, cursor, &NULL_FIELD);
                }
            }
        }
    }
    Ok(())
}

/// Calls `f(i)` for rows `0..n`, or only for those set in `mask`.
#[inline(always)]
fn for_rows(
    n: usize,
    mask: Option<&BooleanBuffer>,
    mut f: impl FnMut(usize) -> Result<(), RowError>,
) -> Result<(), RowError> {
    match mask {
        None => (0..n).try_for_each(f),
        Some(mask) => mask.set_indices().try_for_each(&mut f),
    }
}

/// Adds `width` to the size of every non-null row.
fn add_fixed(nulls: Option<&NullBuffer>, width: usize, sizes: &mut [usize]) {
    match nulls {
        None => sizes.iter_mut().for_each(|s| *s += width),
        Some(nulls) => nulls.valid_indices().for_each(|i| sizes[i] += width),
    }
}

/// Writes fixed-width values: length word `W`, then `encode(value)`.
fn write_fixed<T: Copy, const W: usize>(
    values: &[T],
    nulls: Option<&NullBuffer>,
    out: &mut [u8],
    cursors: &mut [usize],
    encode: impl Fn(usize, T) -> Result<[u8; W], RowError>,
) -> Result<(), RowError> {
    let len = (W as i32).to_be_bytes();
    for_each_value(nulls, out, cursors, |i, out, cursor| {
        let bytes = encode(i, values[i])?;
        put(out, cursor, &len);
        put(out, cursor, &bytes);
        Ok(())
    })
}

fn check_len(row: usize, len: usize) -> Result<usize, RowError> {
    if len > MAX_FIELD {
        Err(RowError {
            row,
            reason: format!(
                "the value is {len} bytes, over the {MAX_FIELD} bytes a field can hold"
            ),
        })
    } else {
        Ok(len)
    }
}

fn is_string(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, values) => {
            matches!(
                **values,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            )
        }
        _ => false,
    }
}

/// A string array as `with_strings!` takes it: dictionaries get Utf8 values (one cast
/// of the small values array), everything else is returned as it is.
fn normalise_strings(array: &ArrayRef) -> Option<ArrayRef> {
    match array.data_type() {
        DataType::Dictionary(key, values) if **values != DataType::Utf8 => {
            let to = DataType::Dictionary(key.clone(), Box::new(DataType::Utf8));
            arrow::compute::cast(array, &to).ok()
        }
        dt if is_string(dt) => Some(array.clone()),
        _ => None,
    }
}

/// Runs `$body` with `$s` bound to a typed string accessor ([`ArrayAccessor`] with `&str`
/// items) of `$array`, a [`normalise_strings`] array. The body is compiled once per string
/// layout, so its loops are monomorphic.
macro_rules! with_strings {
    ($array:expr, |$s:ident| $body:expr) => {{
        let array: &dyn Array = &**$array;
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
            _ => downcast_dictionary_array!(
                array => {
                    let $s = array
                        .downcast_dict::<StringArray>()
                        .expect("dictionary values are normalised to Utf8");
                    $body
                }
                t => unreachable!("not a normalised string array: {t}")
            ),
        }
    }};
}

/// Adds `extra + len` for each non-null string.
fn text_sizes<'a, A: ArrayAccessor<Item = &'a str>>(
    strings: A,
    nulls: Option<&NullBuffer>,
    extra: usize,
    sizes: &mut [usize],
) -> Result<(), RowError> {
    for_rows(sizes.len(), nulls.map(NullBuffer::inner), |i| {
        sizes[i] += check_len(i, extra + strings.value(i).len())?;
        Ok(())
    })
}

/// Writes each string, after `prefix` (the jsonb version byte, or nothing).
fn text_write<'a, A: ArrayAccessor<Item = &'a str>>(
    strings: A,
    nulls: Option<&NullBuffer>,
    prefix: &[u8],
    out: &mut [u8],
    cursors: &mut [usize],
) -> Result<(), RowError> {
    for_each_value(nulls, out, cursors, |i, out, cursor| {
        let value = strings.value(i).as_bytes();
        put_i32(out, cursor, (prefix.len() + value.len()) as i32);
        put(out, cursor, prefix);
        put(out, cursor, value);
        Ok(())
    })
}

/// List offsets as `usize` (one more than rows), indexing the list's child as it is.
fn list_offsets<O: OffsetSizeTrait>(offsets: &[O]) -> Vec<usize> {
    offsets.iter().map(|o| o.as_usize()).collect()
}

/// A list column and its items, ready for the array encoders.
struct ListColumn<T> {
    offsets: Vec<usize>,
    nulls: Option<NullBuffer>,
    items: T,
    item_nulls: Option<NullBuffer>,
}

impl<T> ListColumn<T> {
    /// `items_of` turns the list's child into what the encoder reads; `None` if it can't.
    fn plan(array: &ArrayRef, items_of: impl Fn(&ArrayRef) -> Option<T>) -> Option<Self> {
        let (offsets, child) = match array.data_type() {
            DataType::List(_) => {
                let list = array.as_list::<i32>();
                (list_offsets(list.value_offsets()), list.values())
            }
            DataType::LargeList(_) => {
                let list = array.as_list::<i64>();
                (list_offsets(list.value_offsets()), list.values())
            }
            _ => return None,
        };
        Some(Self {
            offsets,
            nulls: array.nulls().cloned(),
            items: items_of(child)?,
            item_nulls: child.logical_nulls(),
        })
    }

    fn item_is_null(&self, j: usize) -> bool {
        self.item_nulls.as_ref().is_some_and(|n| n.is_null(j))
    }

    /// Writes one row as a PostgreSQL array of `oid` elements: header, then
    /// `element(j, out, cursor)` for each non-null item (which writes length and bytes).
    fn write(
        &self,
        oid: i32,
        out: &mut [u8],
        cursors: &mut [usize],
        mut element: impl FnMut(usize, &mut [u8], &mut usize),
    ) -> Result<(), RowError> {
        for_each_value(self.nulls.as_ref(), out, cursors, |i, out, cursor| {
            let (a, b) = (self.offsets[i], self.offsets[i + 1]);
            let start = *cursor;
            *cursor += 4; // length word, filled in below
            if a == b {
                put_i32(out, cursor, 0); // no dimensions
                put_i32(out, cursor, 0); // no nulls
                put_i32(out, cursor, oid);
            } else {
                put_i32(out, cursor, 1);
                let has_null = *cursor;
                put_i32(out, cursor, 0);
                put_i32(out, cursor, oid);
                put_i32(out, cursor, (b - a) as i32);
                put_i32(out, cursor, 1); // lower bound
                let mut nulls = false;
                for j in a..b {
                    if self.item_is_null(j) {
                        nulls = true;
                        put(out, cursor, &NULL_FIELD);
                    } else {
                        element(j, out, cursor);
                    }
                }
                if nulls {
                    put_at(out, has_null, &1i32.to_be_bytes());
                }
            }
            let len = (*cursor - start - 4) as i32;
            put_at(out, start, &len.to_be_bytes());
            Ok(())
        })
    }

    /// Adds each non-null row's array size: 12 header bytes, and for a non-empty array 8
    /// dimension bytes and a length word per item plus `item_len(j)` per non-null item.
    fn add_sizes(
        &self,
        sizes: &mut [usize],
        item_len: impl Fn(usize) -> usize,
    ) -> Result<(), RowError> {
        for_rows(
            sizes.len(),
            self.nulls.as_ref().map(NullBuffer::inner),
            |i| {
                let (a, b) = (self.offsets[i], self.offsets[i + 1]);
                let mut size = 12;
                if a != b {
                    size += 8 + 4 * (b - a);
                    for j in a..b {
                        if !self.item_is_null(j) {
                            size += item_len(j);
                        }
                    }
                }
                sizes[i] += check_len(i, size)?;
                Ok(())
            },
        )
    }
}

/// How one column is encoded: its arrays, checked against its [`PgType`] and in the layout
/// the loops read.
enum Column {
    /// Arrow type Null: every row is NULL.
    Null,
    Bool(BooleanArray),
    Int2(Int16Array),
    Int4(Int32Array),
    Int8(Int64Array),
    Float4(Float32Array),
    Float8(Float64Array),
    Timestamp {
        unit: TimeUnit,
        values: ScalarBuffer<i64>,
        nulls: Option<NullBuffer>,
    },
    Date32(Date32Array),
    Date64(Date64Array),
    Uuid(FixedSizeBinaryArray),
    Numeric {
        values: Decimal128Array,
        scale: i8,
    },
    /// `text`, or `jsonb` from JSON text (`jsonb` adds the version byte).
    Text {
        strings: ArrayRef,
        nulls: Option<NullBuffer>,
        jsonb: bool,
    },
    /// `jsonb` built from a map, struct or list; `sizes` holds each row's JSON length
    /// between the two passes.
    Json {
        json: Json,
        nulls: Option<NullBuffer>,
        sizes: Vec<usize>,
    },
    TextArray(ListColumn<ArrayRef>),
    Float8Array(ListColumn<Float64Array>),
}

/// `array` cast to `T` (used only for lossless widening), or `None`.
fn widen<T: arrow::datatypes::ArrowPrimitiveType>(
    array: &ArrayRef,
) -> Option<arrow::array::PrimitiveArray<T>> {
    let cast = arrow::compute::cast(array, &T::DATA_TYPE).ok()?;
    Some(cast.as_primitive::<T>().clone())
}

impl Column {
    /// Checks that `array` fits `pg` and picks its encoder; `None` if it does not fit.
    fn plan(array: &ArrayRef, pg: PgType) -> Option<Column> {
        use DataType as D;
        let dt = array.data_type();
        if *dt == D::Null {
            return Some(Column::Null);
        }
        Some(match (pg, dt) {
            (PgType::Bool, D::Boolean) => Column::Bool(array.as_boolean().clone()),
            (PgType::Int2, D::Int8 | D::Int16 | D::UInt8) => Column::Int2(widen(array)?),
            (PgType::Int4, D::Int8 | D::Int16 | D::Int32 | D::UInt8 | D::UInt16) => {
                Column::Int4(widen(array)?)
            }
            (
                PgType::Int8,
                D::Int8 | D::Int16 | D::Int32 | D::Int64 | D::UInt8 | D::UInt16 | D::UInt32,
            ) => Column::Int8(widen(array)?),
            (PgType::Float4, D::Float16 | D::Float32) => Column::Float4(widen(array)?),
            (PgType::Float8, D::Float16 | D::Float32 | D::Float64) => Column::Float8(widen(array)?),
            (PgType::Text | PgType::Jsonb, dt) if is_string(dt) => Column::Text {
                strings: normalise_strings(array)?,
                nulls: array.logical_nulls(),
                jsonb: pg == PgType::Jsonb,
            },
            (PgType::Jsonb, D::Map(_, _) | D::Struct(_) | D::List(_) | D::LargeList(_)) => {
                Column::Json {
                    json: Json::plan(array)?,
                    nulls: array.nulls().cloned(),
                    sizes: Vec::new(),
                }
            }
            (PgType::Timestamptz, D::Timestamp(unit, _)) => Column::Timestamp {
                unit: *unit,
                values: match unit {
                    TimeUnit::Second => array.as_primitive::<TimestampSecondType>().values(),
                    TimeUnit::Millisecond => {
                        array.as_primitive::<TimestampMillisecondType>().values()
                    }
                    TimeUnit::Microsecond => {
                        array.as_primitive::<TimestampMicrosecondType>().values()
                    }
                    TimeUnit::Nanosecond => {
                        array.as_primitive::<TimestampNanosecondType>().values()
                    }
                }
                .clone(),
                nulls: array.nulls().cloned(),
            },
            (PgType::Date, D::Date32) => Column::Date32(array.as_primitive().clone()),
            (PgType::Date, D::Date64) => Column::Date64(array.as_primitive().clone()),
            (PgType::Uuid, D::FixedSizeBinary(16)) => {
                Column::Uuid(array.as_fixed_size_binary().clone())
            }
            (
                PgType::Numeric { .. },
                D::Decimal32(p, s) | D::Decimal64(p, s) | D::Decimal128(p, s),
            ) => {
                let values = if matches!(dt, D::Decimal128(_, _)) {
                    array.as_primitive::<Decimal128Type>().clone()
                } else {
                    let cast = arrow::compute::cast(array, &D::Decimal128(*p, *s)).ok()?;
                    cast.as_primitive::<Decimal128Type>().clone()
                };
                Column::Numeric { values, scale: *s }
            }
            (PgType::TextArray, D::List(_) | D::LargeList(_)) => {
                Column::TextArray(ListColumn::plan(array, normalise_strings)?)
            }
            (PgType::Float8Array, D::List(_) | D::LargeList(_)) => {
                Column::Float8Array(ListColumn::plan(array, |items| match items.data_type() {
                    D::Float16 | D::Float32 | D::Float64 => widen::<Float64Type>(items),
                    _ => None,
                })?)
            }
            _ => return None,
        })
    }

    /// Pass 1: adds each row's encoded value length to `sizes`.
    fn add_sizes(&mut self, sizes: &mut [usize]) -> Result<(), RowError> {
        match self {
            Column::Null => {}
            Column::Bool(a) => add_fixed(a.nulls(), 1, sizes),
            Column::Int2(a) => add_fixed(a.nulls(), 2, sizes),
            Column::Int4(a) => add_fixed(a.nulls(), 4, sizes),
            Column::Int8(a) => add_fixed(a.nulls(), 8, sizes),
            Column::Float4(a) => add_fixed(a.nulls(), 4, sizes),
            Column::Float8(a) => add_fixed(a.nulls(), 8, sizes),
            Column::Timestamp { nulls, .. } => add_fixed(nulls.as_ref(), 8, sizes),
            Column::Date32(a) => add_fixed(a.nulls(), 4, sizes),
            Column::Date64(a) => add_fixed(a.nulls(), 4, sizes),
            Column::Uuid(a) => add_fixed(a.nulls(), 16, sizes),
            Column::Numeric { values, scale } => {
                let scale = *scale;
                let raw = values.values();
                for_rows(sizes.len(), values.nulls().map(NullBuffer::inner), |i| {
                    sizes[i] += 8 + 2 * Numeric::new(raw[i], scale).ndigits;
                    Ok(())
                })?;
            }
            Column::Text {
                strings,
                nulls,
                jsonb,
            } => {
                let extra = usize::from(*jsonb);
                with_strings!(strings, |s| text_sizes(s, nulls.as_ref(), extra, sizes))?;
            }
            Column::Json {
                json,
                nulls,
                sizes: json_sizes,
            } => {
                let n = sizes.len();
                let mask = nulls.as_ref().map(NullBuffer::inner);
                *json_sizes = vec![0; n];
                json.add_sizes(n, mask, json_sizes)?;
                for_rows(n, mask, |i| {
                    sizes[i] += check_len(i, 1 + json_sizes[i])?;
                    Ok(())
                })?;
            }
            Column::TextArray(list) => {
                with_strings!(&list.items, |s| list.add_sizes(sizes, |j| s.value(j).len()))?;
            }
            Column::Float8Array(list) => list.add_sizes(sizes, |_| 8)?,
        }
        Ok(())
    }

    /// Pass 2: writes each row's field (length word and value) at its cursor.
    fn write(&self, out: &mut [u8], cursors: &mut [usize]) -> Result<(), RowError> {
        match self {
            Column::Null => {
                for cursor in cursors.iter_mut() {
                    put(out, cursor, &NULL_FIELD);
                }
                Ok(())
            }
            Column::Bool(a) => {
                let values = a.values();
                for_each_value(a.nulls(), out, cursors, |i, out, cursor| {
                    put(out, cursor, &[0, 0, 0, 1, u8::from(values.value(i))]);
                    Ok(())
                })
            }
            Column::Int2(a) => write_fixed(a.values(), a.nulls(), out, cursors, |_, v| {
                Ok(v.to_be_bytes())
            }),
            Column::Int4(a) => write_fixed(a.values(), a.nulls(), out, cursors, |_, v| {
                Ok(v.to_be_bytes())
            }),
            Column::Int8(a) => write_fixed(a.values(), a.nulls(), out, cursors, |_, v| {
                Ok(v.to_be_bytes())
            }),
            Column::Float4(a) => write_fixed(a.values(), a.nulls(), out, cursors, |_, v| {
                Ok(v.to_be_bytes())
            }),
            Column::Float8(a) => write_fixed(a.values(), a.nulls(), out, cursors, |_, v| {
                Ok(v.to_be_bytes())
            }),
            Column::Timestamp {
                unit,
                values,
                nulls,
            } => {
                let nulls = nulls.as_ref();
                match unit {
                    TimeUnit::Second => write_timestamps(values, nulls, out, cursors, *unit, |v| {
                        v.checked_mul(1_000_000)
                    }),
                    TimeUnit::Millisecond => {
                        write_timestamps(values, nulls, out, cursors, *unit, |v| {
                            v.checked_mul(1_000)
                        })
                    }
                    TimeUnit::Microsecond => {
                        write_timestamps(values, nulls, out, cursors, *unit, Some)
                    }
                    TimeUnit::Nanosecond => {
                        write_timestamps(values, nulls, out, cursors, *unit, |v| {
                            Some(v.div_euclid(1_000))
                        })
                    }
                }
            }
            Column::Date32(a) => write_fixed(a.values(), a.nulls(), out, cursors, |i, days| {
                pg_date(i, Some(days), days.into())
            }),
            Column::Date64(a) => write_fixed(a.values(), a.nulls(), out, cursors, |i, ms| {
                let days = ms.div_euclid(86_400_000);
                pg_date(i, i32::try_from(days).ok(), days)
            }),
            Column::Uuid(a) => for_each_value(a.nulls(), out, cursors, |i, out, cursor| {
                put_i32(out, cursor, 16);
                put(out, cursor, a.value(i));
                Ok(())
            }),
            Column::Numeric { values, scale } => {
                let raw = values.values();
                for_each_value(values.nulls(), out, cursors, |i, out, cursor| {
                    let numeric = Numeric::new(raw[i], *scale);
                    put_i32(out, cursor, 8 + 2 * numeric.ndigits as i32);
                    numeric.write(out, cursor);
                    Ok(())
                })
            }
            Column::Text {
                strings,
                nulls,
                jsonb,
            } => {
                let prefix: &[u8] = if *jsonb { &[1] } else { &[] };
                with_strings!(strings, |s| text_write(
                    s,
                    nulls.as_ref(),
                    prefix,
                    out,
                    cursors
                ))
            }
            Column::Json { json, nulls, sizes } => {
                for_each_value(nulls.as_ref(), out, cursors, |i, out, cursor| {
                    put_i32(out, cursor, 1 + sizes[i] as i32);
                    put(out, cursor, &[1]);
                    Ok(())
                })?;
                json.write(
                    cursors.len(),
                    nulls.as_ref().map(NullBuffer::inner),
                    out,
                    cursors,
                );
                Ok(())
            }
            Column::TextArray(list) => with_strings!(&list.items, |s| list.write(
                TEXT_OID,
                out,
                cursors,
                |j, out, cursor| {
                    let value = s.value(j).as_bytes();
                    put_i32(out, cursor, value.len() as i32);
                    put(out, cursor, value);
                }
            )),
            Column::Float8Array(list) => {
                let items = list.items.values();
                list.write(FLOAT8_OID, out, cursors, |j, out, cursor| {
                    put_i32(out, cursor, 8);
                    put(out, cursor, &items[j].to_be_bytes());
                })
            }
        }
    }
}

/// Timestamps: `to_micros` converts one unit to µs since 1970 (`None` on overflow), then
/// the value is moved to PostgreSQL's epoch and range-checked.
fn write_timestamps(
    values: &[i64],
    nulls: Option<&NullBuffer>,
    out: &mut [u8],
    cursors: &mut [usize],
    unit: TimeUnit,
    to_micros: impl Fn(i64) -> Option<i64>,
) -> Result<(), RowError> {
    write_fixed(values, nulls, out, cursors, |i, v| {
        to_micros(v)
            .and_then(|us| us.checked_sub(PG_EPOCH_MICROS))
            .filter(|us| PG_TIMESTAMPS.contains(us))
            .map(i64::to_be_bytes)
            .ok_or_else(|| RowError {
                row: i,
                reason: format!(
                    "timestamp {v} ({unit:?} since 1970) is outside PostgreSQL's timestamptz \
                     range (4714-11-24 BC to 294276-12-31)"
                ),
            })
    })
}

/// A date as days since 2000, range-checked; `days` is the value since 1970 for the message.
fn pg_date(row: usize, days_1970: Option<i32>, days: i64) -> Result<[u8; 4], RowError> {
    days_1970
        .and_then(|d| d.checked_sub(PG_EPOCH_DAYS))
        .filter(|d| PG_DATES.contains(d))
        .map(i32::to_be_bytes)
        .ok_or_else(|| RowError {
            row,
            reason: format!(
                "date {days} days since 1970-01-01 is outside PostgreSQL's date range \
                 (4714-11-24 BC to 5874897-12-31)"
            ),
        })
}

/// One value in PostgreSQL's binary `numeric` layout: `ndigits` base-10000 digits (most
/// significant first, no leading or trailing zero digits), the `weight` of the first (its
/// power of 10000), sign and display scale.
struct Numeric {
    digits: [u16; 13],
    ndigits: usize,
    weight: i16,
    negative: bool,
    dscale: u16,
}

impl Numeric {
    /// `value × 10^-scale` (an Arrow decimal's unscaled value and scale).
    fn new(value: i128, scale: i8) -> Numeric {
        let mut numeric = Numeric {
            digits: [0; 13],
            ndigits: 0,
            weight: 0,
            negative: value < 0,
            dscale: scale.max(0) as u16,
        };
        if value == 0 {
            numeric.negative = false;
            return numeric;
        }
        // The least significant decimal digit has exponent -scale: it sits in base-10000
        // digit `floor(-scale / 4)`, `shift` decimal places up inside it.
        let exponent = -i32::from(scale);
        let lowest = exponent.div_euclid(4);
        let shift = exponent.rem_euclid(4) as u32;

        // Little-endian base-10000 digits of |value|, via three 16-decimal-digit u64 chunks
        // (|i128| < 1.8e38 < 10^48), so only two u128 divisions at most.
        const E16: u128 = 10_000_000_000_000_000;
        let abs = value.unsigned_abs();
        let (low, rest) = if abs < E16 {
            (abs as u64, 0)
        } else {
            ((abs % E16) as u64, abs / E16)
        };
        let (mid, high) = if rest < E16 {
            (rest as u64, 0)
        } else {
            ((rest % E16) as u64, (rest / E16) as u64)
        };
        let mut le = [0u32; 13];
        for (k, mut chunk) in [low, mid, high].into_iter().enumerate() {
            for slot in &mut le[4 * k..4 * k + 4] {
                *slot = (chunk % 10_000) as u32;
                chunk /= 10_000;
            }
        }
        // Multiply by 10^shift to align the decimal point with a digit boundary
        // (< 10^42 < 10000^11, so the carry never leaves the array).
        if shift > 0 {
            let m = 10u32.pow(shift);
            let mut carry = 0;
            for slot in le.iter_mut() {
                let v = *slot * m + carry;
                *slot = v % 10_000;
                carry = v / 10_000;
            }
        }
        let top = le.iter().rposition(|&d| d != 0).expect("non-zero value");
        let bottom = le.iter().position(|&d| d != 0).expect("non-zero value");
        numeric.ndigits = top - bottom + 1;
        numeric.weight = (lowest + top as i32) as i16;
        for (out, digit) in numeric.digits.iter_mut().zip(le[bottom..=top].iter().rev()) {
            *out = *digit as u16;
        }
        numeric
    }

    /// Writes the `8 + 2 × ndigits` bytes of the value.
    fn write(&self, out: &mut [u8], cursor: &mut usize) {
        put(out, cursor, &(self.ndigits as i16).to_be_bytes());
        put(out, cursor, &self.weight.to_be_bytes());
        put(
            out,
            cursor,
            &(if self.negative { 0x4000u16 } else { 0 }).to_be_bytes(),
        );
        put(out, cursor, &self.dscale.to_be_bytes());
        for digit in &self.digits[..self.ndigits] {
            put(out, cursor, &digit.to_be_bytes());
        }
    }
}

/// JSON text of an Arrow array, written column by column in the same two passes as COPY:
/// [`Json::add_sizes`] adds each element's JSON length, [`Json::write`] writes each element
/// at its cursor. Both take the element count `n` and an optional mask of the elements that
/// take part (the others are skipped: they belong to null parents).
///
/// Maps become objects (keys must be strings, later duplicates win in `jsonb`), structs
/// objects of their fields, lists arrays; null elements are JSON `null`, non-finite floats too.
enum Json {
    Null,
    Bool(BooleanArray),
    Int(Int64Array),
    UInt(UInt64Array),
    Float32(Float32Array),
    Float64(Float64Array),
    Str {
        strings: ArrayRef,
        nulls: Option<NullBuffer>,
    },
    Object {
        nulls: Option<NullBuffer>,
        /// Each field's `"name":`, escaped.
        keys: Vec<Vec<u8>>,
        fields: Vec<Json>,
    },
    /// A map (`keys` is `Some`) or a list. `offsets` start at 0 and index the sliced
    /// children; `item_sizes` holds each entry's length (with the key and colon) between
    /// the passes.
    Nested {
        nulls: Option<NullBuffer>,
        offsets: Vec<usize>,
        keys: Option<Box<Json>>,
        items: Box<Json>,
        item_sizes: Vec<usize>,
    },
}

impl Json {
    /// The JSON writer for `array`; `None` if some part of its type has no JSON form here.
    fn plan(array: &ArrayRef) -> Option<Json> {
        use DataType as D;
        Some(match array.data_type() {
            D::Null => Json::Null,
            D::Boolean => Json::Bool(array.as_boolean().clone()),
            D::Int8 | D::Int16 | D::Int32 | D::Int64 => Json::Int(widen::<Int64Type>(array)?),
            D::UInt8 | D::UInt16 | D::UInt32 | D::UInt64 => Json::UInt(widen::<UInt64Type>(array)?),
            D::Float16 | D::Float32 => Json::Float32(widen::<Float32Type>(array)?),
            D::Float64 => Json::Float64(array.as_primitive().clone()),
            dt if is_string(dt) => Json::Str {
                strings: normalise_strings(array)?,
                nulls: array.logical_nulls(),
            },
            D::Struct(fields) => {
                let strukt = array.as_struct();
                Json::Object {
                    nulls: strukt.nulls().cloned(),
                    keys: fields
                        .iter()
                        .map(|f| {
                            let mut key = serde_json::to_vec(f.name()).expect("a string");
                            key.push(b':');
                            key
                        })
                        .collect(),
                    fields: strukt
                        .columns()
                        .iter()
                        .map(Json::plan)
                        .collect::<Option<_>>()?,
                }
            }
            D::Map(_, _) => {
                let map = array.as_map();
                let (offsets, first) = rebase(map.value_offsets());
                let entries = map.entries().slice(first, offsets[offsets.len() - 1]);
                let keys = Json::plan(entries.column(0))?;
                if !matches!(keys, Json::Str { .. }) {
                    return None;
                }
                Json::Nested {
                    nulls: map.nulls().cloned(),
                    offsets,
                    keys: Some(Box::new(keys)),
                    items: Box::new(Json::plan(entries.column(1))?),
                    item_sizes: Vec::new(),
                }
            }
            // Times as RFC 3339 text, as arrow prints them (`2026-12-01T10:00:00Z`).
            D::Timestamp(_, _) | D::Date32 | D::Date64 => {
                let text = arrow::compute::cast(array, &D::Utf8).ok()?;
                Json::Str {
                    strings: normalise_strings(&text)?,
                    nulls: array.logical_nulls(),
                }
            }
            D::List(_) => Self::list(array.as_list::<i32>())?,
            D::LargeList(_) => Self::list(array.as_list::<i64>())?,
            _ => return None,
        })
    }

    fn list<O: OffsetSizeTrait>(list: &arrow::array::GenericListArray<O>) -> Option<Json> {
        let (offsets, first) = rebase(list.value_offsets());
        let items = list.values().slice(first, offsets[offsets.len() - 1]);
        Some(Json::Nested {
            nulls: list.nulls().cloned(),
            offsets,
            keys: None,
            items: Box::new(Json::plan(&items)?),
            item_sizes: Vec::new(),
        })
    }

    /// Pass 1: adds the JSON length of each of the `n` elements (in `mask`) to `sizes`.
    fn add_sizes(
        &mut self,
        n: usize,
        mask: Option<&BooleanBuffer>,
        sizes: &mut [usize],
    ) -> Result<(), RowError> {
        match self {
            Json::Null => for_rows(n, mask, |i| {
                sizes[i] += 4;
                Ok(())
            }),
            Json::Bool(a) => for_rows(n, mask, |i| {
                sizes[i] += match (a.is_valid(i), a.value(i)) {
                    (false, _) | (true, true) => 4,
                    (true, false) => 5,
                };
                Ok(())
            }),
            Json::Int(a) => {
                let values = a.values();
                for_rows(n, mask, |i| {
                    sizes[i] += if a.is_null(i) {
                        4
                    } else {
                        let v = values[i];
                        usize::from(v < 0) + decimal_len(v.unsigned_abs())
                    };
                    Ok(())
                })
            }
            Json::UInt(a) => {
                let values = a.values();
                for_rows(n, mask, |i| {
                    sizes[i] += if a.is_null(i) {
                        4
                    } else {
                        decimal_len(values[i])
                    };
                    Ok(())
                })
            }
            Json::Float32(a) => float_sizes(a.values(), a.nulls(), n, mask, sizes),
            Json::Float64(a) => float_sizes(a.values(), a.nulls(), n, mask, sizes),
            Json::Str { strings, nulls } => {
                let nulls = nulls.as_ref();
                with_strings!(strings, |s| for_rows(n, mask, |i| {
                    sizes[i] += if nulls.is_some_and(|x| x.is_null(i)) {
                        4
                    } else {
                        json_str_len(i, s.value(i).as_bytes())?
                    };
                    Ok(())
                }))
            }
            Json::Object {
                nulls,
                keys,
                fields,
            } => {
                let overhead =
                    2 + keys.iter().map(Vec::len).sum::<usize>() + keys.len().saturating_sub(1);
                for_rows(n, mask, |i| {
                    sizes[i] += if nulls.as_ref().is_some_and(|x| x.is_null(i)) {
                        4
                    } else {
                        overhead
                    };
                    Ok(())
                })?;
                let inner = narrow(mask, nulls.as_ref());
                for field in fields {
                    field.add_sizes(n, inner.as_ref(), sizes)?;
                }
                Ok(())
            }
            Json::Nested {
                nulls,
                offsets,
                keys,
                items,
                item_sizes,
            } => {
                let entries = offsets[n];
                let entry_mask = entry_mask(n, mask, nulls.as_ref(), offsets);
                let at_row = |e: RowError| RowError {
                    row: offsets.partition_point(|&o| o <= e.row) - 1,
                    reason: e.reason,
                };
                *item_sizes = vec![usize::from(keys.is_some()); entries]; // the colon
                if let Some(keys) = keys {
                    keys.add_sizes(entries, entry_mask.as_ref(), item_sizes)
                        .map_err(at_row)?;
                }
                items
                    .add_sizes(entries, entry_mask.as_ref(), item_sizes)
                    .map_err(at_row)?;
                for_rows(n, mask, |i| {
                    sizes[i] += if nulls.as_ref().is_some_and(|x| x.is_null(i)) {
                        4
                    } else {
                        let (a, b) = (offsets[i], offsets[i + 1]);
                        2 + (b - a).saturating_sub(1) + item_sizes[a..b].iter().sum::<usize>()
                    };
                    Ok(())
                })
            }
        }
    }

    /// Pass 2: writes each of the `n` elements (in `mask`) at its cursor.
    fn write(&self, n: usize, mask: Option<&BooleanBuffer>, out: &mut [u8], cursors: &mut [usize]) {
        // Every closure below is infallible; `for_rows` is shared with the fallible passes.
        let ok = |r: Result<(), RowError>| r.expect("JSON writing cannot fail");
        match self {
            Json::Null => ok(for_rows(n, mask, |i| {
                put(out, &mut cursors[i], b"null");
                Ok(())
            })),
            Json::Bool(a) => ok(for_rows(n, mask, |i| {
                let text: &[u8] = match (a.is_valid(i), a.value(i)) {
                    (false, _) => b"null",
                    (true, true) => b"true",
                    (true, false) => b"false",
                };
                put(out, &mut cursors[i], text);
                Ok(())
            })),
            Json::Int(a) => {
                let values = a.values();
                ok(for_rows(n, mask, |i| {
                    let cursor = &mut cursors[i];
                    if a.is_null(i) {
                        put(out, cursor, b"null");
                    } else {
                        let v = values[i];
                        if v < 0 {
                            put(out, cursor, b"-");
                        }
                        put_decimal(out, cursor, v.unsigned_abs());
                    }
                    Ok(())
                }))
            }
            Json::UInt(a) => {
                let values = a.values();
                ok(for_rows(n, mask, |i| {
                    if a.is_null(i) {
                        put(out, &mut cursors[i], b"null");
                    } else {
                        put_decimal(out, &mut cursors[i], values[i]);
                    }
                    Ok(())
                }))
            }
            Json::Float32(a) => float_write(a.values(), a.nulls(), n, mask, out, cursors),
            Json::Float64(a) => float_write(a.values(), a.nulls(), n, mask, out, cursors),
            Json::Str { strings, nulls } => {
                let nulls = nulls.as_ref();
                with_strings!(strings, |s| ok(for_rows(n, mask, |i| {
                    if nulls.is_some_and(|x| x.is_null(i)) {
                        put(out, &mut cursors[i], b"null");
                    } else {
                        put_json_str(out, &mut cursors[i], s.value(i).as_bytes());
                    }
                    Ok(())
                })))
            }
            Json::Object {
                nulls,
                keys,
                fields,
            } => {
                let is_null = |i: usize| nulls.as_ref().is_some_and(|x| x.is_null(i));
                ok(for_rows(n, mask, |i| {
                    put(
                        out,
                        &mut cursors[i],
                        if is_null(i) { b"null" } else { b"{" },
                    );
                    Ok(())
                }));
                let inner = narrow(mask, nulls.as_ref());
                for (k, (key, field)) in keys.iter().zip(fields).enumerate() {
                    ok(for_rows(n, inner.as_ref(), |i| {
                        let cursor = &mut cursors[i];
                        if k > 0 {
                            put(out, cursor, b",");
                        }
                        put(out, cursor, key);
                        Ok(())
                    }));
                    field.write(n, inner.as_ref(), out, cursors);
                }
                ok(for_rows(n, inner.as_ref(), |i| {
                    put(out, &mut cursors[i], b"}");
                    Ok(())
                }));
            }
            Json::Nested {
                nulls,
                offsets,
                keys,
                items,
                item_sizes,
            } => {
                let (open, close): (&[u8], &[u8]) = if keys.is_some() {
                    (b"{", b"}")
                } else {
                    (b"[", b"]")
                };
                // Rows: brackets and commas now; each entry's place is known from its size.
                let mut entry_cursors = vec![0; offsets[n]];
                ok(for_rows(n, mask, |i| {
                    let cursor = &mut cursors[i];
                    if nulls.as_ref().is_some_and(|x| x.is_null(i)) {
                        put(out, cursor, b"null");
                        return Ok(());
                    }
                    put(out, cursor, open);
                    for j in offsets[i]..offsets[i + 1] {
                        if j > offsets[i] {
                            put(out, cursor, b",");
                        }
                        entry_cursors[j] = *cursor;
                        *cursor += item_sizes[j];
                    }
                    put(out, cursor, close);
                    Ok(())
                }));
                // Entries: keys, colons, values, column by column.
                let entries = offsets[n];
                let entry_mask = entry_mask(n, mask, nulls.as_ref(), offsets);
                if let Some(keys) = keys {
                    keys.write(entries, entry_mask.as_ref(), out, &mut entry_cursors);
                    ok(for_rows(entries, entry_mask.as_ref(), |j| {
                        put(out, &mut entry_cursors[j], b":");
                        Ok(())
                    }));
                }
                items.write(entries, entry_mask.as_ref(), out, &mut entry_cursors);
            }
        }
    }
}

/// Offsets moved to start at 0, and where they started.
fn rebase<O: OffsetSizeTrait>(offsets: &[O]) -> (Vec<usize>, usize) {
    let first = offsets[0].as_usize();
    (
        offsets.iter().map(|o| o.as_usize() - first).collect(),
        first,
    )
}

/// The rows of `mask` that are also non-null, or `None` for "all rows".
fn narrow(mask: Option<&BooleanBuffer>, nulls: Option<&NullBuffer>) -> Option<BooleanBuffer> {
    match (mask, nulls) {
        (None, None) => None,
        (None, Some(nulls)) => Some(nulls.inner().clone()),
        (Some(mask), None) => Some(mask.clone()),
        (Some(mask), Some(nulls)) => Some(mask & nulls.inner()),
    }
}

/// The entries of the rows in `mask` that are non-null, or `None` for "all entries".
fn entry_mask(
    n: usize,
    mask: Option<&BooleanBuffer>,
    nulls: Option<&NullBuffer>,
    offsets: &[usize],
) -> Option<BooleanBuffer> {
    let rows = narrow(mask, nulls)?;
    let mut entries = BooleanBufferBuilder::new(offsets[n]);
    for i in 0..n {
        entries.append_n(offsets[i + 1] - offsets[i], rows.value(i));
    }
    Some(entries.finish())
}

/// Number of decimal digits of `v`.
fn decimal_len(v: u64) -> usize {
    v.checked_ilog10().map_or(1, |l| l as usize + 1)
}

/// Writes the decimal digits of `v`.
fn put_decimal(out: &mut [u8], cursor: &mut usize, mut v: u64) {
    let len = decimal_len(v);
    for slot in out[*cursor..*cursor + len].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    *cursor += len;
}

/// A float's JSON text (shortest round-trip form, `null` if not finite) in `buf`.
fn float_text<F: serde::Serialize>(v: F, buf: &mut [u8; 32]) -> usize {
    let mut w = &mut buf[..];
    serde_json::to_writer(&mut w, &v).expect("a float fits 32 bytes");
    32 - w.len()
}

fn float_sizes<F: serde::Serialize + Copy>(
    values: &[F],
    nulls: Option<&NullBuffer>,
    n: usize,
    mask: Option<&BooleanBuffer>,
    sizes: &mut [usize],
) -> Result<(), RowError> {
    let mut buf = [0; 32];
    for_rows(n, mask, |i| {
        sizes[i] += if nulls.is_some_and(|x| x.is_null(i)) {
            4
        } else {
            float_text(values[i], &mut buf)
        };
        Ok(())
    })
}

fn float_write<F: serde::Serialize + Copy>(
    values: &[F],
    nulls: Option<&NullBuffer>,
    n: usize,
    mask: Option<&BooleanBuffer>,
    out: &mut [u8],
    cursors: &mut [usize],
) {
    let mut buf = [0; 32];
    for_rows(n, mask, |i| {
        if nulls.is_some_and(|x| x.is_null(i)) {
            put(out, &mut cursors[i], b"null");
        } else {
            let len = float_text(values[i], &mut buf);
            put(out, &mut cursors[i], &buf[..len]);
        }
        Ok(())
    })
    .expect("infallible");
}

/// Extra bytes each byte takes inside a JSON string: 1 for `"`, `\` and the control
/// characters with a short escape, 5 for the other control characters (`\u00XX`).
const JSON_ESCAPE_EXTRA: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = 5;
        b += 1;
    }
    table[b'"' as usize] = 1;
    table[b'\\' as usize] = 1;
    table[0x08] = 1;
    table[0x0c] = 1;
    table[b'\n' as usize] = 1;
    table[b'\r' as usize] = 1;
    table[b'\t' as usize] = 1;
    table
};

/// Length of `s` as a quoted JSON string; a NUL character is an error (`jsonb` refuses
/// `\u0000`).
fn json_str_len(row: usize, s: &[u8]) -> Result<usize, RowError> {
    let extra: usize = s
        .iter()
        .map(|&b| usize::from(JSON_ESCAPE_EXTRA[usize::from(b)]))
        .sum();
    if extra > 0 && s.contains(&0) {
        return Err(RowError {
            row,
            reason: "a string holds a NUL character (\\u0000), which jsonb cannot store".into(),
        });
    }
    Ok(2 + s.len() + extra)
}

/// Writes `s` as a quoted, escaped JSON string.
fn put_json_str(out: &mut [u8], cursor: &mut usize, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    put(out, cursor, b"\"");
    let mut start = 0;
    for (k, &b) in s.iter().enumerate() {
        if JSON_ESCAPE_EXTRA[usize::from(b)] == 0 {
            continue;
        }
        put(out, cursor, &s[start..k]);
        match b {
            b'"' => put(out, cursor, b"\\\""),
            b'\\' => put(out, cursor, b"\\\\"),
            0x08 => put(out, cursor, b"\\b"),
            0x0c => put(out, cursor, b"\\f"),
            b'\n' => put(out, cursor, b"\\n"),
            b'\r' => put(out, cursor, b"\\r"),
            b'\t' => put(out, cursor, b"\\t"),
            _ => put(
                out,
                cursor,
                &[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 15)],
                ],
            ),
        }
        start = k + 1;
    }
    put(out, cursor, &s[start..]);
    put(out, cursor, b"\"");
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use arrow::array::{
        DictionaryArray, Int8Array, LargeStringArray, ListBuilder, MapBuilder, NullArray,
        StringBuilder, StringViewArray, StructArray, TimestampMicrosecondArray,
        TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray,
    };
    use arrow::datatypes::{Fields, Int8Type, Schema};
    use proptest::prelude::*;

    use super::*;

    /// A field: length word and bytes.
    fn field(value: &[u8]) -> Vec<u8> {
        let mut v = (value.len() as i32).to_be_bytes().to_vec();
        v.extend_from_slice(value);
        v
    }

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns).unwrap()
    }

    fn encode(batch: &RecordBatch, types: &[PgType]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_batch(batch, types, &mut out).unwrap();
        out
    }

    /// The bytes of each field of a one-column batch, `None` for NULL.
    fn fields_of(array: ArrayRef, pg: PgType) -> Vec<Option<Vec<u8>>> {
        let out = encode(&batch(vec![("c", array.clone())]), &[pg]);
        let mut fields = Vec::new();
        let mut at = 0;
        while at < out.len() {
            assert_eq!(&out[at..at + 2], &[0, 1], "field count");
            let len = i32::from_be_bytes(out[at + 2..at + 6].try_into().unwrap());
            at += 6;
            if len < 0 {
                fields.push(None);
            } else {
                fields.push(Some(out[at..at + len as usize].to_vec()));
                at += len as usize;
            }
        }
        assert_eq!(fields.len(), array.len());
        fields
    }

    fn one(array: ArrayRef, pg: PgType) -> Vec<u8> {
        fields_of(array, pg).remove(0).expect("not null")
    }

    fn be_i32s(values: &[i32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    fn numeric_bytes(value: i128, scale: i8) -> Vec<u8> {
        let numeric = Numeric::new(value, scale);
        let mut out = vec![0; 8 + 2 * numeric.ndigits];
        let mut cursor = 0;
        numeric.write(&mut out, &mut cursor);
        assert_eq!(cursor, out.len());
        out
    }

    /// ndigits, weight, sign, dscale, digits.
    fn numeric_expected(weight: i16, negative: bool, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(digits.len() as i16).to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&(if negative { 0x4000u16 } else { 0 }).to_be_bytes());
        v.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    fn utc_micros(values: Vec<i64>) -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
    }

    fn json_field() -> Field {
        Field::new("j", DataType::Utf8, true).with_metadata(HashMap::from([(
            EXTENSION_NAME_KEY.to_string(),
            JSON_EXTENSION.to_string(),
        )]))
    }

    #[test]
    fn header_and_trailer() {
        assert_eq!(HEADER.len(), 19);
        assert_eq!(&HEADER[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&HEADER[11..], &[0; 8]);
        assert_eq!(TRAILER, &[0xff, 0xff]);
    }

    #[test]
    fn header_and_one_tuple_of_every_type_byte_exact() {
        let mut text_list = ListBuilder::new(StringBuilder::new());
        text_list.values().append_value("a");
        text_list.values().append_null();
        text_list.append(true);
        let mut float_list = ListBuilder::new(arrow::array::Float64Builder::new());
        float_list.append(true); // empty
        let mut map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        map.keys().append_value("k");
        map.values().append_value("v");
        map.append(true).unwrap();
        let columns: Vec<(&str, ArrayRef, PgType)> = vec![
            ("b", Arc::new(BooleanArray::from(vec![true])), PgType::Bool),
            ("i2", Arc::new(Int16Array::from(vec![-2])), PgType::Int2),
            ("i4", Arc::new(Int32Array::from(vec![7])), PgType::Int4),
            ("i8", Arc::new(Int64Array::from(vec![-1])), PgType::Int8),
            (
                "f4",
                Arc::new(Float32Array::from(vec![1.5])),
                PgType::Float4,
            ),
            (
                "f8",
                Arc::new(Float64Array::from(vec![-0.0])),
                PgType::Float8,
            ),
            ("t", Arc::new(StringArray::from(vec!["hé"])), PgType::Text),
            (
                "ts",
                utc_micros(vec![PG_EPOCH_MICROS + 1]),
                PgType::Timestamptz,
            ),
            ("d", Arc::new(Date32Array::from(vec![10_958])), PgType::Date),
            (
                "j",
                Arc::new(StringArray::from(vec![r#"{"a":1}"#])),
                PgType::Jsonb,
            ),
            ("m", Arc::new(map.finish()), PgType::Jsonb),
            (
                "u",
                Arc::new(
                    FixedSizeBinaryArray::try_from_iter([(0u8..16).collect::<Vec<_>>()].iter())
                        .unwrap(),
                ),
                PgType::Uuid,
            ),
            (
                "n",
                Arc::new(
                    Decimal128Array::from(vec![123_456_789])
                        .with_precision_and_scale(10, 4)
                        .unwrap(),
                ),
                PgType::Numeric {
                    precision: 10,
                    scale: 4,
                },
            ),
            ("ta", Arc::new(text_list.finish()), PgType::TextArray),
            ("fa", Arc::new(float_list.finish()), PgType::Float8Array),
            ("z", Arc::new(NullArray::new(1)), PgType::Int8),
        ];
        let types: Vec<PgType> = columns.iter().map(|c| c.2).collect();
        let b = batch(columns.into_iter().map(|(n, a, _)| (n, a)).collect());

        let mut expected = HEADER.to_vec();
        expected.extend_from_slice(&16i16.to_be_bytes());
        for value in [
            &[1u8][..],
            &(-2i16).to_be_bytes(),
            &7i32.to_be_bytes(),
            &(-1i64).to_be_bytes(),
            &1.5f32.to_be_bytes(),
            &[0x80, 0, 0, 0, 0, 0, 0, 0],
            "hé".as_bytes(),
            &1i64.to_be_bytes(),
            &1i32.to_be_bytes(),
            b"\x01{\"a\":1}",
            b"\x01{\"k\":\"v\"}",
            &(0u8..16).collect::<Vec<_>>(),
            &numeric_expected(1, false, 4, &[1, 2345, 6789]),
            &[be_i32s(&[1, 1, 25, 2, 1, 1]), b"a".to_vec(), be_i32s(&[-1])].concat(),
            &be_i32s(&[0, 0, 701]),
        ] {
            expected.extend_from_slice(&field(value));
        }
        expected.extend_from_slice(&NULL_FIELD);
        expected.extend_from_slice(TRAILER);

        let mut out = HEADER.to_vec();
        encode_batch(&b, &types, &mut out).unwrap();
        out.extend_from_slice(TRAILER);
        assert_eq!(out, expected);
    }

    #[test]
    fn timestamps_of_every_unit() {
        let pg = |us: i64| (us - PG_EPOCH_MICROS).to_be_bytes().to_vec();
        let s: ArrayRef = Arc::new(TimestampSecondArray::from(vec![946_684_800, -1]));
        assert_eq!(
            fields_of(s, PgType::Timestamptz),
            vec![Some(vec![0; 8]), Some(pg(-1_000_000))]
        );
        let ms: ArrayRef = Arc::new(
            TimestampMillisecondArray::from(vec![1_700_000_000_123, -1]).with_timezone("+02:00"),
        );
        assert_eq!(
            fields_of(ms, PgType::Timestamptz),
            vec![Some(pg(1_700_000_000_123_000)), Some(pg(-1_000))]
        );
        assert_eq!(
            one(utc_micros(vec![-7]), PgType::Timestamptz),
            pg(-7),
            "µs as they are"
        );
        // Nanoseconds are floored to microseconds, also below zero.
        let ns: ArrayRef = Arc::new(TimestampNanosecondArray::from(vec![
            1_999,
            -1,
            -1_000,
            -1_001,
            0,
            i64::MIN,
        ]));
        assert_eq!(
            fields_of(ns, PgType::Timestamptz),
            vec![
                Some(pg(1)),
                Some(pg(-1)),
                Some(pg(-1)),
                Some(pg(-2)),
                Some(pg(0)),
                Some(pg(i64::MIN.div_euclid(1000))),
            ]
        );
    }

    #[test]
    fn timestamps_and_dates_out_of_range_name_column_and_row_and_leave_out_alone() {
        let b = batch(vec![(
            "ts",
            Arc::new(TimestampSecondArray::from(vec![0, i64::MAX / 10])) as ArrayRef,
        )]);
        let mut out = b"kept".to_vec();
        let e = encode_batch(&b, &[PgType::Timestamptz], &mut out).unwrap_err();
        assert_eq!(out, b"kept");
        assert_eq!(e.row(), Some(1));
        let msg = e.to_string();
        assert!(msg.starts_with("column 'ts', row 1: timestamp"), "{msg}");

        let b = batch(vec![(
            "d",
            Arc::new(Date32Array::from(vec![i32::MAX])) as ArrayRef,
        )]);
        let e = encode_batch(&b, &[PgType::Date], &mut out).unwrap_err();
        assert!(e.to_string().contains("column 'd', row 0: date"), "{e}");
    }

    #[test]
    fn dates() {
        let d32: ArrayRef = Arc::new(Date32Array::from(vec![0, 10_957, -1]));
        assert_eq!(
            fields_of(d32, PgType::Date),
            vec![
                Some((-10_957i32).to_be_bytes().to_vec()),
                Some(0i32.to_be_bytes().to_vec()),
                Some((-10_958i32).to_be_bytes().to_vec()),
            ]
        );
        let d64: ArrayRef = Arc::new(Date64Array::from(vec![86_400_000 * 10_958, -1]));
        assert_eq!(
            fields_of(d64, PgType::Date),
            vec![
                Some(1i32.to_be_bytes().to_vec()),
                Some((-10_958i32).to_be_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn numerics() {
        assert_eq!(numeric_bytes(0, 2), numeric_expected(0, false, 2, &[]));
        assert_eq!(numeric_bytes(1, 0), numeric_expected(0, false, 0, &[1]));
        assert_eq!(numeric_bytes(-1, 0), numeric_expected(0, true, 0, &[1]));
        assert_eq!(
            numeric_bytes(123_456_789, 4),
            numeric_expected(1, false, 4, &[1, 2345, 6789])
        );
        assert_eq!(numeric_bytes(1, 4), numeric_expected(-1, false, 4, &[1]));
        assert_eq!(
            numeric_bytes(100_000_000, 0),
            numeric_expected(2, false, 0, &[1])
        );
        assert_eq!(
            numeric_bytes(15, 1),
            numeric_expected(0, false, 1, &[1, 5000])
        );
        assert_eq!(
            numeric_bytes(-15, 1),
            numeric_expected(0, true, 1, &[1, 5000])
        );
        // 0.00012 at scale 5, and 12300 from 123 at scale -2.
        assert_eq!(
            numeric_bytes(12, 5),
            numeric_expected(-1, false, 5, &[1, 2000])
        );
        assert_eq!(
            numeric_bytes(123, -2),
            numeric_expected(1, false, 0, &[1, 2300])
        );
        // 38 digits.
        let max38 = 10i128.pow(38) - 1;
        assert_eq!(
            numeric_bytes(max38, 0),
            numeric_expected(
                9,
                false,
                0,
                &[99, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9999]
            )
        );
        assert_eq!(
            numeric_bytes(-max38, 38),
            numeric_expected(
                -1,
                true,
                38,
                &[9999, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9900]
            )
        );
        assert_eq!(
            numeric_bytes(12_345_678_901_234_567_890_123_456_789_012_345_678, 10),
            numeric_expected(
                6,
                false,
                10,
                &[1234, 5678, 9012, 3456, 7890, 1234, 5678, 9012, 3456, 7800]
            )
        );
        // Beyond precision 38, as far as i128 goes.
        assert_eq!(
            numeric_bytes(i128::MIN, 0),
            numeric_expected(
                9,
                true,
                0,
                &[170, 1411, 8346, 469, 2317, 3168, 7303, 7158, 8410, 5728]
            )
        );
        numeric_bytes(i128::MAX, 127);
        numeric_bytes(i128::MIN, -128);

        // Through the column encoder, with a null, from Decimal64 too.
        let d: ArrayRef = Arc::new(
            Decimal128Array::from(vec![Some(15), None])
                .with_precision_and_scale(5, 1)
                .unwrap(),
        );
        assert_eq!(
            fields_of(
                d,
                PgType::Numeric {
                    precision: 5,
                    scale: 1
                }
            ),
            vec![Some(numeric_expected(0, false, 1, &[1, 5000])), None]
        );
        let d64: ArrayRef = Arc::new(
            arrow::array::Decimal64Array::from(vec![-1])
                .with_precision_and_scale(3, 2)
                .unwrap(),
        );
        assert_eq!(
            one(
                d64,
                PgType::Numeric {
                    precision: 3,
                    scale: 2
                }
            ),
            numeric_expected(-1, true, 2, &[100])
        );
    }

    /// The base-10000 digits of a decimal, the slow and obvious way: from its decimal text.
    fn numeric_reference(value: i128, scale: i8) -> Vec<u8> {
        if value == 0 {
            return numeric_expected(0, false, scale.max(0) as u16, &[]);
        }
        let mut digits = value.unsigned_abs().to_string();
        let mut scale = i32::from(scale);
        while scale < 0 {
            digits.push('0');
            scale += 1;
        }
        let (int, frac) = if digits.len() > scale as usize {
            let (i, f) = digits.split_at(digits.len() - scale as usize);
            (i.to_string(), f.to_string())
        } else {
            (
                String::new(),
                format!("{digits:0>width$}", width = scale as usize),
            )
        };
        let int = format!("{int:0>width$}", width = int.len().div_ceil(4) * 4);
        let frac = format!("{frac:0<width$}", width = frac.len().div_ceil(4) * 4);
        let groups: Vec<u16> = format!("{int}{frac}")
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
            .collect();
        let mut weight = (int.len() / 4) as i16 - 1;
        let first = groups.iter().position(|&g| g != 0).unwrap();
        let last = groups.iter().rposition(|&g| g != 0).unwrap();
        weight -= first as i16;
        numeric_expected(
            weight,
            value < 0,
            scale.max(0) as u16,
            &groups[first..=last],
        )
    }

    proptest! {
        #[test]
        fn numeric_matches_the_reference(value in any::<i128>(), scale in -40i8..=40, small in any::<i32>()) {
            prop_assert_eq!(numeric_bytes(value, scale), numeric_reference(value, scale));
            prop_assert_eq!(numeric_bytes(small.into(), scale), numeric_reference(small.into(), scale));
        }
    }

    #[test]
    fn text_from_every_string_layout() {
        let expected = vec![
            Some(b"x".to_vec()),
            None,
            Some("é\"\\\n".as_bytes().to_vec()),
        ];
        let values = vec![Some("x"), None, Some("é\"\\\n")];
        for array in [
            Arc::new(StringArray::from(values.clone())) as ArrayRef,
            Arc::new(LargeStringArray::from(values.clone())),
            Arc::new(StringViewArray::from(values.clone())),
            Arc::new(
                values
                    .iter()
                    .copied()
                    .collect::<DictionaryArray<Int8Type>>(),
            ),
        ] {
            assert_eq!(
                fields_of(array.clone(), PgType::Text),
                expected,
                "{}",
                array.data_type()
            );
        }
        // A dictionary with a null value (not key), and LargeUtf8 values.
        let dict = DictionaryArray::new(
            Int8Array::from(vec![0, 1, 0]),
            Arc::new(LargeStringArray::from(vec![Some("a"), None])),
        );
        assert_eq!(
            fields_of(Arc::new(dict), PgType::Text),
            vec![Some(b"a".to_vec()), None, Some(b"a".to_vec())]
        );
        // jsonb from JSON text: version byte, text as is (not checked).
        assert_eq!(
            one(Arc::new(StringArray::from(vec!["{nope"])), PgType::Jsonb),
            b"\x01{nope"
        );
    }

    #[test]
    fn jsonb_from_map_struct_and_list() {
        let mut map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        map.keys().append_value("a");
        map.values().append_value("x\"y\\z\n\u{1}é");
        map.keys().append_value("q\"");
        map.values().append_null();
        map.append(true).unwrap();
        map.append(false).unwrap(); // NULL row
        map.append(true).unwrap(); // {}
        map.keys().append_value("k");
        map.values().append_value("v");
        map.append(true).unwrap();
        let map: ArrayRef = Arc::new(map.finish());
        let json = |s: &str| Some([b"\x01", s.as_bytes()].concat());
        assert_eq!(
            fields_of(map.clone(), PgType::Jsonb),
            vec![
                json(r#"{"a":"x\"y\\z\n\u0001é","q\"":null}"#),
                None,
                json("{}"),
                json(r#"{"k":"v"}"#),
            ]
        );
        // Sliced: offsets into the entries are respected.
        assert_eq!(
            fields_of(map.slice(2, 2), PgType::Jsonb),
            vec![json("{}"), json(r#"{"k":"v"}"#)]
        );

        let mut tags = ListBuilder::new(StringBuilder::new());
        tags.values().append_value("a");
        tags.values().append_null();
        tags.append(true);
        tags.append(false);
        tags.append(true);
        let tags = tags.finish();
        let inner = StructArray::from(vec![(
            Arc::new(Field::new("x", DataType::Int8, true)),
            Arc::new(Int8Array::from(vec![Some(-5), None, Some(1)])) as ArrayRef,
        )]);
        let strukt = StructArray::try_new(
            Fields::from(vec![
                Field::new("i", DataType::Int64, true),
                Field::new("s", DataType::Utf8, true),
                Field::new("b", DataType::Boolean, true),
                Field::new("n", DataType::Null, true),
                Field::new("f", DataType::Float64, true),
                Field::new("in", inner.data_type().clone(), true),
                Field::new("tags", tags.data_type().clone(), true),
            ]),
            vec![
                Arc::new(Int64Array::from(vec![Some(i64::MIN), Some(7), None])),
                Arc::new(StringArray::from(vec![Some("a\tb"), None, Some("c")])),
                Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
                Arc::new(NullArray::new(3)),
                Arc::new(Float64Array::from(vec![1.5, f64::NAN, -0.25])),
                Arc::new(inner),
                Arc::new(tags),
            ],
            Some(NullBuffer::from(vec![true, false, true])),
        )
        .unwrap();
        assert_eq!(
            fields_of(Arc::new(strukt), PgType::Jsonb),
            vec![
                json(
                    r#"{"i":-9223372036854775808,"s":"a\tb","b":true,"n":null,"f":1.5,"in":{"x":-5},"tags":["a",null]}"#
                ),
                None,
                json(r#"{"i":null,"s":"c","b":null,"n":null,"f":-0.25,"in":{"x":1},"tags":[]}"#),
            ]
        );

        // A NUL character cannot go into jsonb: refused with the map's row.
        let mut map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        map.append(true).unwrap();
        map.keys().append_value("k");
        map.values().append_value("a\0b");
        map.append(true).unwrap();
        let b = batch(vec![("labels", Arc::new(map.finish()) as ArrayRef)]);
        let e = encode_batch(&b, &[PgType::Jsonb], &mut Vec::new()).unwrap_err();
        assert_eq!(e.row(), Some(1), "{e}");
        assert!(e.to_string().contains("column 'labels'"), "{e}");
    }

    #[test]
    fn arrays_with_nulls_and_empties() {
        let mut list = ListBuilder::new(StringBuilder::new());
        list.append(true); // []
        list.append(false); // NULL
        list.values().append_value("é");
        list.values().append_value("");
        list.append(true);
        let fields = fields_of(Arc::new(list.finish()), PgType::TextArray);
        assert_eq!(
            fields,
            vec![
                Some(be_i32s(&[0, 0, 25])),
                None,
                Some(
                    [
                        be_i32s(&[1, 0, 25, 2, 1, 2]),
                        "é".as_bytes().to_vec(),
                        be_i32s(&[0])
                    ]
                    .concat()
                ),
            ]
        );
        let floats = arrow::array::ListArray::from_iter_primitive::<Float64Type, _, _>(vec![
            Some(vec![Some(1.0), None, Some(f64::NAN)]),
            None,
        ]);
        let fields = fields_of(Arc::new(floats), PgType::Float8Array);
        assert_eq!(
            fields[0],
            Some(
                [
                    be_i32s(&[1, 1, 701, 3, 1, 8]),
                    1.0f64.to_be_bytes().to_vec(),
                    be_i32s(&[-1, 8]),
                    f64::NAN.to_be_bytes().to_vec(),
                ]
                .concat()
            )
        );
        assert_eq!(fields[1], None);
    }

    #[test]
    fn sliced_batches_encode_like_the_rows_they_hold() {
        let mut list = ListBuilder::new(StringBuilder::new());
        let mut map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        for i in 0..5 {
            for j in 0..i {
                list.values().append_value(format!("v{j}"));
                map.keys().append_value(format!("k{j}"));
                map.values().append_value(format!("{i}"));
            }
            list.append(i != 3);
            map.append(i != 2).unwrap();
        }
        let ints = Int64Array::from(vec![Some(0), Some(1), None, Some(3), Some(4)]);
        let text = StringArray::from(vec![Some("a"), None, Some("c"), Some("d"), Some("e")]);
        let full = batch(vec![
            ("i", Arc::new(ints) as ArrayRef),
            ("t", Arc::new(text)),
            ("l", Arc::new(list.finish())),
            ("m", Arc::new(map.finish())),
        ]);
        let types = [PgType::Int8, PgType::Text, PgType::TextArray, PgType::Jsonb];
        let rows = |b: &RecordBatch| {
            // Split an encoding of `b` into its tuples by encoding each row alone.
            (0..b.num_rows())
                .map(|i| encode(&b.slice(i, 1), &types))
                .collect::<Vec<_>>()
        };
        let whole = rows(&full);
        for (offset, len) in [(1, 3), (2, 2), (0, 5), (4, 1), (3, 0)] {
            let sliced = full.slice(offset, len);
            assert_eq!(
                encode(&sliced, &types),
                whole[offset..offset + len].concat()
            );
        }
        // Concatenated single rows equal the whole batch.
        assert_eq!(encode(&full, &types), whole.concat());
    }

    #[test]
    fn type_mismatch_names_column_and_both_types() {
        let b = batch(vec![(
            "cores",
            Arc::new(Int64Array::from(vec![1])) as ArrayRef,
        )]);
        let e = encode_batch(&b, &[PgType::Int4], &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "column 'cores': Arrow type Int64 cannot be encoded as PostgreSQL integer"
        );
        let e = encode_batch(&b, &[PgType::Int4, PgType::Text], &mut Vec::new()).unwrap_err();
        assert!(matches!(
            e,
            CopyError::ColumnCount {
                columns: 1,
                types: 2
            }
        ));
        // Widening is fine.
        assert_eq!(
            one(Arc::new(Int8Array::from(vec![-3])), PgType::Int8),
            (-3i64).to_be_bytes()
        );
    }

    #[test]
    fn types_from_contract_and_from_arrow() {
        use flight_schema::ColumnType as C;
        for (name, pg, sql) in [
            ("bool", PgType::Bool, "boolean"),
            ("int32", PgType::Int4, "integer"),
            ("int64", PgType::Int8, "bigint"),
            ("float", PgType::Float4, "real"),
            ("double", PgType::Float8, "double precision"),
            ("string", PgType::Text, "text"),
            ("timestamp_ns", PgType::Timestamptz, "timestamptz"),
            ("date", PgType::Date, "date"),
            ("uuid", PgType::Uuid, "uuid"),
            (
                "decimal(12,3)",
                PgType::Numeric {
                    precision: 12,
                    scale: 3,
                },
                "numeric(12,3)",
            ),
            ("jsonb", PgType::Jsonb, "jsonb"),
            ("map", PgType::Jsonb, "jsonb"),
            ("string[]", PgType::TextArray, "text[]"),
            ("double[]", PgType::Float8Array, "double precision[]"),
        ] {
            let t = C::parse(name, "c").unwrap();
            assert_eq!(PgType::from_column_type(&t), pg, "{name}");
            assert_eq!(pg.sql_name(), sql);
            // The contract's Arrow field maps back to the same PostgreSQL type.
            assert_eq!(
                pg_type_for_field(&t.to_field("c", true)),
                Some(pg),
                "{name}"
            );
        }
        assert_eq!(PgType::Int2.sql_name(), "smallint");
        let f = |dt: DataType| pg_type_for_field(&Field::new("c", dt, true));
        assert_eq!(f(DataType::Int16), Some(PgType::Int2));
        assert_eq!(f(DataType::Utf8View), Some(PgType::Text));
        assert_eq!(pg_type_for_field(&json_field()), Some(PgType::Jsonb));
        assert_eq!(
            f(DataType::Timestamp(TimeUnit::Second, None)),
            Some(PgType::Timestamptz)
        );
        assert_eq!(f(DataType::Binary), None);
        let schema = Schema::new(vec![json_field()]);
        assert_eq!(pg_type_for_field(schema.field(0)), Some(PgType::Jsonb));
    }
}
