//! REST JSON writes: `POST /write/{table}` (and the seed's `/write/metrics` and
//! `/write/logs`).
//!
//! # What flows through it
//! A request body (a JSON array of objects, or NDJSON: one object per line), maybe gzip or
//! zstd compressed, at most `server.max_body_size` bytes as received and again once
//! decompressed. [`split_records`] finds each record's bytes and the line it starts on,
//! without parsing values; records go straight into arrow-json's decoder against a schema
//! made from the registered table ([`input_schema`]), column by column, never through maps
//! of values. The decoded batches are brought to the registered schema by the same reshape
//! as Flight's, and only when every record of the request fits are they handed to
//! [`Ingest::submit`](sluice_ingest::Ingest::submit): one WAL record per batch of at most
//! [`BATCH_ROWS`] rows / [`BATCH_BYTES`] bytes of JSON. The answer, `{"rows": n}`, comes once
//! all of them are durable. A refused request stores nothing, and its error names the
//! line (1-based, of the decompressed body), the field and what was wrong. A request
//! waits at most [`MEMORY_WAIT`] for room in the memory budget, then is answered 429.
//!
//! # JSON to columns
//! - `timestamp*` columns take RFC 3339 strings (no offset = UTC) or integers, which are
//!   milliseconds since 1970 (the friendly form of `/write/metrics`).
//! - `jsonb` and `map` columns take an object (or array, for `jsonb`) as it is, or a
//!   string holding one; every other column takes the JSON value of its type (numbers for
//!   numeric columns, strings for strings, dates, UUIDs and decimals; decimals also as
//!   numbers, kept digit for digit).
//! - A field that is absent or null takes the column's default, if it has one; else it is
//!   null (refused where the column is not nullable). Fields the table does not have are
//!   refused, unless the table says `extra_columns: drop`.
//! - `/write/metrics` writes the `metrics` table and accepts `name` for `metric_name`
//!   (`{"name", "labels": {...}, "value", "time"}`); `/write/logs` writes `logs_events`.

use std::io::Read;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, TimestampNanosecondArray};
use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flight_schema::{ColumnType, ExtraColumns, ResolvedTable};
use tracing::Instrument;

use crate::edge::HttpError;
use crate::state::AppState;
use sluice_core::error::{Error, Result};
use sluice_ingest::MemoryWait;

/// Most rows of one batch (one WAL record) a request is cut into.
pub const BATCH_ROWS: usize = 65_536;
/// Most bytes of JSON records one batch is decoded from.
pub const BATCH_BYTES: usize = 16 << 20;
/// How long a request waits for room in the memory budget before it is answered 429
/// (`Retry-After`), so the client sends it again rather than hold the request open.
pub const MEMORY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Deepest nesting of objects and arrays a record may have (the record itself is level
/// 1). arrow-json describes a value it cannot take recursively, so a deeper one would
/// overflow the stack; `jsonb` values are parsed with serde_json, which stops at 128.
pub const MAX_DEPTH: usize = 100;

/// Table names the seed routes stand for.
fn table_of(route: &str) -> &str {
    match route {
        "logs" => "logs_events",
        other => other,
    }
}

/// Fields a route accepts under another name: (field, column).
fn renames_of(table: &str) -> &'static [(&'static str, &'static str)] {
    match table {
        "metrics" => &[("name", "metric_name")],
        _ => &[],
    }
}

/// `POST /write/{table}`.
pub async fn write(
    State(state): State<Arc<AppState>>,
    Path(route): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, HttpError> {
    let table = table_of(&route).to_string();
    let span = tracing::info_span!("write", protocol = "rest", %table);
    async move {
        // The table first: a body for a table that cannot be written is not read.
        state.ingest.check_table(&table).await?;
        let resolved = state.registry.get(&table).ok_or_else(|| {
            Error::internal(format!(
                "table '{table}' passed the check but is not in the registry"
            ))
        })?;
        let body = read_body(body, &headers, state.max_body_size).await?;
        let batches = tokio::task::spawn_blocking(move || decode(&resolved, &body))
            .await
            .map_err(Error::internal)??;
        let (batches, lines): (Vec<_>, Vec<_>) = batches
            .into_iter()
            .map(|(b, line)| ((table.as_str(), b), line))
            .unzip();
        let rows = submit_all(&state, batches, "rest", |i| format!("line {}", lines[i])).await?;
        Ok(Json(serde_json::json!({ "rows": rows })).into_response())
    }
    .instrument(span)
    .await
    .map_err(HttpError)
}

/// Submits a request's batches (all of them decoded and reshaped already; each with its
/// table, so that a request touching several tables acks once all are durable) and waits
/// until every one is durable; returns the rows. Each waits at most [`MEMORY_WAIT`] for memory.
/// If a later batch is refused after earlier ones were submitted (a disk that filled
/// meanwhile), the error says what was stored: "the records before `start(i)`".
pub(crate) async fn submit_all(
    state: &AppState,
    batches: Vec<(&str, RecordBatch)>,
    protocol: &str,
    start: impl Fn(usize) -> String,
) -> Result<u64> {
    let mut pending = Vec::with_capacity(batches.len());
    for (i, (table, batch)) in batches.into_iter().enumerate() {
        let wait = MemoryWait::AtMost(MEMORY_WAIT);
        match state
            .ingest
            .submit(table, batch, None, protocol, wait)
            .await
        {
            Ok(p) => pending.push(p),
            // Batches already submitted stay: say which were stored.
            Err(e) if !pending.is_empty() => {
                let mut stored = 0;
                for p in pending {
                    stored += p.rows;
                    p.durable().await?;
                }
                let from = start(i);
                return Err(e.context(&format!(
                    "the records before {from} ({stored} rows) were stored; send the rest again from {from}"
                )));
            }
            Err(e) => return Err(e),
        }
    }
    let mut rows = 0;
    for p in pending {
        rows += p.rows;
        p.durable().await?;
    }
    Ok(rows)
}

/// Reads the body (at most `limit` bytes) and undoes its `Content-Encoding` (the result
/// at most `limit` bytes as well).
pub(crate) async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes> {
    let too_large = |what: &str| {
        Error::PayloadTooLarge(format!(
            "the request body is larger than {limit} bytes{what} (server.max_body_size): split it"
        ))
    };
    let raw: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large("")
        } else {
            Error::InvalidArgument(format!("cannot read the request body: {e}"))
        }
    })?;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    let mut out = Vec::new();
    let read = match encoding.as_deref() {
        None | Some("") | Some("identity") => return Ok(raw),
        Some("gzip") | Some("x-gzip") => flate2::read::MultiGzDecoder::new(&raw[..])
            .take(limit as u64 + 1)
            .read_to_end(&mut out),
        Some("zstd") => zstd::stream::read::Decoder::new(&raw[..])
            .and_then(|d| d.take(limit as u64 + 1).read_to_end(&mut out)),
        Some(other) => {
            return Err(Error::UnsupportedMediaType(format!(
                "Content-Encoding '{other}' is not supported: send gzip, zstd or none"
            )))
        }
    };
    read.map_err(|e| {
        Error::InvalidArgument(format!(
            "the body is not valid {} data: {e}",
            encoding.as_deref().unwrap_or("")
        ))
    })?;
    if out.len() > limit {
        return Err(too_large(" once decompressed"));
    }
    Ok(Bytes::from(out))
}

/// One record of a body: where its bytes are and the line it starts on (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub start: usize,
    pub end: usize,
    pub line: usize,
}

/// A body that is not a JSON array of objects or NDJSON: what is wrong and on which line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct BodyError {
    pub line: usize,
    pub message: String,
}

/// A cursor over a body that counts lines and skips JSON values without parsing them.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    line: usize,
}

impl Scan<'_> {
    fn fail<T>(&self, message: impl Into<String>) -> std::result::Result<T, BodyError> {
        Err(BodyError {
            line: self.line,
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                b'\n' => self.line += 1,
                b' ' | b'\t' | b'\r' => {}
                _ => break,
            }
            self.i += 1;
        }
    }

    /// Past a string (the cursor is on its opening quote).
    fn string(&mut self) -> std::result::Result<(), BodyError> {
        let line = self.line;
        self.i += 1;
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'"' => return Ok(()),
                b'\\' => self.i += 1,
                b'\n' => self.line += 1,
                _ => {}
            }
        }
        Err(BodyError {
            line,
            message: "a string is not terminated".into(),
        })
    }

    /// Past one JSON value; its syntax inside is left to the decoder.
    fn value(&mut self) -> std::result::Result<(), BodyError> {
        match self.peek() {
            None => self.fail("a value is missing at the end of the body"),
            Some(b'"') => self.string(),
            Some(b'{' | b'[') => {
                let line = self.line;
                let mut depth = 0usize;
                while let Some(c) = self.peek() {
                    match c {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => {
                            depth += 1;
                            if depth > MAX_DEPTH {
                                return self.fail(format!(
                                    "objects and arrays nested more than {MAX_DEPTH} deep"
                                ));
                            }
                        }
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Ok(());
                            }
                        }
                        b'\n' => self.line += 1,
                        _ => {}
                    }
                    self.i += 1;
                }
                Err(BodyError {
                    line,
                    message: "an object or array is not closed".into(),
                })
            }
            Some(b'}' | b']' | b',' | b':') => {
                let c = self.peek().unwrap_or(b'?') as char;
                self.fail(format!("unexpected '{c}'"))
            }
            Some(_) => {
                let start = self.i;
                while let Some(c) = self.peek() {
                    if matches!(
                        c,
                        b',' | b']' | b'}' | b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[' | b'"'
                    ) {
                        break;
                    }
                    self.i += 1;
                }
                if self.i == start {
                    return self.fail("unexpected byte");
                }
                Ok(())
            }
        }
    }

    /// One record: must be an object.
    fn record(&mut self) -> std::result::Result<Record, BodyError> {
        let (start, line) = (self.i, self.line);
        if self.peek() != Some(b'{') {
            let end = (start + 40).min(self.b.len());
            let got = String::from_utf8_lossy(&self.b[start..end]);
            return self.fail(format!("expected a JSON object, got {got}"));
        }
        self.value()?;
        Ok(Record {
            start,
            end: self.i,
            line,
        })
    }
}

/// The records of a body: a JSON array of objects, or objects one after another
/// (NDJSON, or any whitespace between them).
pub fn split_records(body: &[u8]) -> std::result::Result<Vec<Record>, BodyError> {
    let mut s = Scan {
        b: body,
        i: 0,
        line: 1,
    };
    // A byte order mark is tolerated.
    if body.starts_with(b"\xEF\xBB\xBF") {
        s.i = 3;
    }
    let mut records = Vec::new();
    s.ws();
    if s.peek() == Some(b'[') {
        s.i += 1;
        s.ws();
        if s.peek() == Some(b']') {
            s.i += 1;
        } else {
            loop {
                s.ws();
                records.push(s.record()?);
                s.ws();
                match s.peek() {
                    Some(b',') => s.i += 1,
                    Some(b']') => {
                        s.i += 1;
                        break;
                    }
                    None => return s.fail("the array is not closed"),
                    Some(c) => {
                        return s.fail(format!(
                            "expected ',' or ']' after a record, got '{}'",
                            c as char
                        ))
                    }
                }
            }
        }
        s.ws();
        if s.peek().is_some() {
            return s.fail("unexpected data after the array");
        }
        return Ok(records);
    }
    loop {
        s.ws();
        if s.peek().is_none() {
            return Ok(records);
        }
        records.push(s.record()?);
    }
}

/// How each column is read from JSON (see the module doc): the registered columns, all
/// nullable, timestamps as text (RFC 3339 or integer milliseconds, converted after).
pub fn input_schema(table: &ResolvedTable) -> SchemaRef {
    let fields: Vec<Field> = table
        .arrow_schema
        .fields()
        .iter()
        .map(|f| {
            let ty = match table.column(f.name()).map(|c| c.column_type) {
                Some(
                    ColumnType::Timestamp(_)
                    | ColumnType::Date
                    | ColumnType::Uuid
                    | ColumnType::Decimal { .. }
                    | ColumnType::Jsonb
                    | ColumnType::Map
                    | ColumnType::String,
                ) => DataType::Utf8,
                _ => f.data_type().clone(),
            };
            Field::new(f.name(), ty, true)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// Columns whose objects are taken as JSON text (`jsonb`, `map`).
fn nested_as_text(table: &ResolvedTable) -> Vec<String> {
    table
        .definition
        .columns
        .iter()
        .filter(|c| matches!(c.column_type, ColumnType::Jsonb | ColumnType::Map))
        .map(|c| c.name.clone())
        .collect()
}

/// Rewrites one record for the decoder: renamed fields get their column's name, and an
/// object or array under a `jsonb`/`map` column becomes a string holding its JSON text.
fn rewrite_record(
    rec: &[u8],
    line: usize,
    nested: &[String],
    renames: &[(&str, &str)],
    out: &mut Vec<u8>,
) -> std::result::Result<(), BodyError> {
    let mut s = Scan { b: rec, i: 1, line };
    out.push(b'{');
    let mut first = true;
    loop {
        s.ws();
        match s.peek() {
            Some(b'}') => break,
            Some(b',') if !first => {
                s.i += 1;
                s.ws();
            }
            _ if first => {}
            _ => return s.fail("expected ',' or '}' in an object"),
        }
        if s.peek() != Some(b'"') {
            return s.fail("expected a field name in quotes");
        }
        let key_start = s.i;
        s.string()?;
        let raw_key = &rec[key_start..s.i];
        // Most names have no escapes: read them in place; decode the others.
        let plain = std::str::from_utf8(&raw_key[1..raw_key.len() - 1])
            .ok()
            .filter(|k| !k.contains('\\'));
        let key: std::borrow::Cow<str> = match plain {
            Some(k) => k.into(),
            None => serde_json::from_slice::<String>(raw_key)
                .map_err(|e| BodyError {
                    line: s.line,
                    message: format!("bad field name: {e}"),
                })?
                .into(),
        };
        s.ws();
        if s.peek() != Some(b':') {
            return s.fail(format!("expected ':' after field \"{key}\""));
        }
        s.i += 1;
        s.ws();
        let value_start = s.i;
        s.value()?;
        let value = &rec[value_start..s.i];
        if !first {
            out.push(b',');
        }
        first = false;
        let column = renames
            .iter()
            .find(|(from, _)| *from == key)
            .map_or(&*key, |(_, to)| to);
        if column == key {
            out.extend_from_slice(raw_key);
        } else {
            out.extend_from_slice(
                serde_json::to_string(column)
                    .expect("a string serializes")
                    .as_bytes(),
            );
        }
        out.push(b':');
        if nested.iter().any(|n| n == column) && matches!(value.first(), Some(b'{' | b'[')) {
            let text = std::str::from_utf8(value).map_err(|_| BodyError {
                line: s.line,
                message: format!("field \"{key}\" is not valid UTF-8"),
            })?;
            serde_json::to_writer(&mut *out, text).expect("a string serializes");
        } else {
            out.extend_from_slice(value);
        }
    }
    out.push(b'}');
    Ok(())
}

/// Decodes a whole body into batches of the registered schema, each with the line its
/// first record starts on, or refuses it (nothing of it kept) naming the line, the field
/// and the problem.
pub fn decode(table: &ResolvedTable, body: &[u8]) -> Result<Vec<(RecordBatch, usize)>> {
    let invalid = |m: String| Error::InvalidArgument(format!("table '{}': {m}", table.name()));
    let records = split_records(body).map_err(|e| invalid(e.to_string()))?;
    if records.is_empty() {
        return Err(invalid("the body holds no records".into()));
    }
    let nested = nested_as_text(table);
    let renames = renames_of(table.name());
    let rewrite = !nested.is_empty() || !renames.is_empty();
    let schema = input_schema(table);
    let strict = table.definition.extra_columns != ExtraColumns::Drop;
    let mut batches = Vec::new();
    let mut scratch = Vec::new();
    let mut from = 0;
    while from < records.len() {
        // One batch: up to BATCH_ROWS records or BATCH_BYTES of them.
        let mut to = from;
        let mut bytes = 0;
        while to < records.len() && to - from < BATCH_ROWS && (bytes < BATCH_BYTES || to == from) {
            bytes += records[to].end - records[to].start;
            to += 1;
        }
        let chunk = &records[from..to];
        scratch.clear();
        let mut spans = Vec::with_capacity(chunk.len());
        for r in chunk {
            let start = scratch.len();
            if rewrite {
                rewrite_record(
                    &body[r.start..r.end],
                    r.line,
                    &nested,
                    renames,
                    &mut scratch,
                )
                .map_err(|e| invalid(e.to_string()))?;
            } else {
                scratch.extend_from_slice(&body[r.start..r.end]);
            }
            spans.push((start, scratch.len()));
            scratch.push(b'\n');
        }
        let batch = decode_chunk(&schema, strict, &scratch, &spans, chunk)
            .map_err(|(line, m)| invalid(format!("line {line}: {m}")))?;
        let batch = times_from_json(table, batch, chunk).map_err(invalid)?;
        let batch = sluice_sql::reshape::reshape_nulls_as_defaults(table, &batch).map_err(|e| {
            let message = e.to_string();
            match e.row() {
                Some(row) => {
                    let line = chunk.get(row).map_or(0, |r| r.line);
                    Error::InvalidArgument(message.replacen(
                        &format!(", row {row}:"),
                        &format!(", line {line}:"),
                        1,
                    ))
                }
                None => Error::InvalidArgument(message),
            }
        })?;
        batches.push((batch, chunk[0].line));
        from = to;
    }
    Ok(batches)
}

/// Decodes the records of one batch (`spans` into `scratch`); on failure, the line of the
/// first record that fails alone and the decoder's message.
fn decode_chunk(
    schema: &SchemaRef,
    strict: bool,
    scratch: &[u8],
    spans: &[(usize, usize)],
    chunk: &[Record],
) -> std::result::Result<RecordBatch, (usize, String)> {
    let decoder = || {
        arrow::json::ReaderBuilder::new(schema.clone())
            // One more than the records: decode() stops early once it has a batch.
            .with_batch_size(spans.len() + 1)
            .with_coerce_primitive(true)
            .with_strict_mode(strict)
            .build_decoder()
            .map_err(|e| (0, e.to_string()))
    };
    let whole = (|| {
        let mut d = decoder()?;
        let used = d.decode(scratch).map_err(|e| (0, e.to_string()))?;
        if used != scratch.len() || d.has_partial_record() {
            return Err((0, "a record is incomplete".to_string()));
        }
        d.flush()
            .map_err(|e| (0, e.to_string()))?
            .ok_or((0, "no records".to_string()))
    })();
    let Err((_, whole_error)) = whole else {
        return whole;
    };
    // Which record: each alone.
    for (&(start, end), r) in spans.iter().zip(chunk) {
        let mut d = decoder()?;
        let alone = d
            .decode(&scratch[start..end])
            .and_then(|_| d.flush())
            .map(|_| ())
            .map_err(|e| e.to_string())
            .and_then(|()| {
                if d.has_partial_record() {
                    Err("the record is incomplete".to_string())
                } else {
                    Ok(())
                }
            });
        if let Err(m) = alone {
            return Err((r.line, clean_json_error(&m)));
        }
    }
    Err((
        chunk.first().map_or(0, |r| r.line),
        clean_json_error(&whole_error),
    ))
}

/// arrow-json's messages without their "Json error: " prefix, field names said as ours,
/// and cut short (they quote the value, which may be huge).
fn clean_json_error(m: &str) -> String {
    const MAX: usize = 300;
    let m = m.strip_prefix("Json error: ").unwrap_or(m);
    let mut m = m
        .replace("whilst decoding field", "field")
        .replace("missing from schema", "is not a column of the table");
    if m.len() > MAX {
        let mut cut = MAX;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push_str("...");
    }
    m
}

/// Timestamp columns were read as text: integers become milliseconds since 1970, other
/// text is parsed as RFC 3339 (all to nanoseconds; reshape brings them to the column's
/// unit). A column holding no integer is left as text for reshape.
fn times_from_json(
    table: &ResolvedTable,
    batch: RecordBatch,
    chunk: &[Record],
) -> std::result::Result<RecordBatch, String> {
    let schema = batch.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| (**f).clone()).collect();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    let mut changed = false;
    for (i, f) in schema.fields().iter().enumerate() {
        if !matches!(
            table.column(f.name()).map(|c| c.column_type),
            Some(ColumnType::Timestamp(_))
        ) {
            continue;
        }
        let text = columns[i].as_string::<i32>();
        let is_int = |s: &str| {
            let digits = s.strip_prefix('-').unwrap_or(s);
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
        };
        if !text.iter().flatten().any(is_int) {
            continue;
        }
        let mut values = Vec::with_capacity(text.len());
        for (row, v) in text.iter().enumerate() {
            let Some(v) = v else {
                values.push(None);
                continue;
            };
            let line = chunk.get(row).map_or(0, |r| r.line);
            let ns = if is_int(v) {
                v.parse::<i64>()
                    .ok()
                    .and_then(|ms| ms.checked_mul(1_000_000))
                    .ok_or_else(|| {
                        format!(
                            "line {line}, field '{}': {v} milliseconds since 1970 is out of range",
                            f.name()
                        )
                    })?
            } else {
                string_to_timestamp_nanos(v).map_err(|_| {
                    format!(
                        "line {line}, field '{}': {v:?} is neither an RFC 3339 time nor milliseconds since 1970",
                        f.name()
                    )
                })?
            };
            values.push(Some(ns));
        }
        let array = TimestampNanosecondArray::from(values).with_timezone("UTC");
        fields[i] = Field::new(f.name(), array.data_type().clone(), true);
        columns[i] = Arc::new(array);
        changed = true;
    }
    if !changed {
        return Ok(batch);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(json: &str) -> ResolvedTable {
        flight_schema::TableSchema::from_json(json.as_bytes(), None)
            .unwrap()
            .validate(1)
            .unwrap()
    }

    const EVENTS: &str = r#"{"name":"ev","columns":[
        {"name":"time","type":"timestamp"},
        {"name":"host","type":"string"},
        {"name":"n","type":"int64","nullable":false},
        {"name":"v","type":"double"},
        {"name":"labels","type":"jsonb"},
        {"name":"tags","type":"map"},
        {"name":"region","type":"string","default":"eu"}]}"#;

    #[test]
    fn arrays_and_ndjson_split_with_their_lines() {
        let body = b"[\n {\"a\": \"x,]}\"},\n\n {\"b\": [1,{\"c\":2}]}\n]\n";
        let r = split_records(body).unwrap();
        assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(&body[r[0].start..r[0].end], b"{\"a\": \"x,]}\"}");
        let nd = b"{\"a\":1}\n{\"a\":\n2}\r\n\n{\"a\":3}";
        let r = split_records(nd).unwrap();
        assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 2, 5]);
        assert!(split_records(b"").unwrap().is_empty());
        assert!(split_records(b"[]").unwrap().is_empty());
    }

    #[test]
    fn malformed_bodies_name_their_line() {
        for (body, line, what) in [
            (&b"[{\"a\":1},\n{\"a\":2}"[..], 2, "not closed"),
            (b"{\"a\":1}\n{\"a\": \"x", 2, "not terminated"),
            (b"{\"a\":1}\n\n7", 3, "expected a JSON object"),
            (b"[{\"a\":1} {\"a\":2}]", 1, "expected ',' or ']'"),
            (b"[{\"a\":1}] x", 1, "after the array"),
            (b"{\"a\":{\"b\":1}", 1, "not closed"),
        ] {
            let e = split_records(body).unwrap_err();
            assert_eq!(e.line, line, "{e}");
            assert!(e.message.contains(what), "{e}");
        }
    }

    #[test]
    fn records_decode_column_by_column_with_defaults_times_and_json_text() {
        let t = table(EVENTS);
        let body = br#"[
            {"time": "2026-12-01T10:00:00Z", "host": "a", "n": 1, "v": 1.5,
             "labels": {"k": [1, {"x": null}]}, "tags": {"env": "prod", "n": 3}},
            {"time": 1796119200123, "n": 2, "labels": "{\"s\":1}", "tags": "{\"a\":\"b\"}"}
        ]"#;
        let batches = decode(&t, body).unwrap();
        assert_eq!(batches.len(), 1);
        let b = &batches[0].0;
        assert_eq!(b.schema(), t.arrow_schema);
        let time = b
            .column_by_name("time")
            .unwrap()
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(time.value(0), 1_796_119_200_000_000);
        assert_eq!(time.value(1), 1_796_119_200_123_000);
        let labels = b.column_by_name("labels").unwrap().as_string::<i32>();
        let l0: serde_json::Value = serde_json::from_str(labels.value(0)).unwrap();
        assert_eq!(l0, serde_json::json!({"k": [1, {"x": null}]}));
        let l1: serde_json::Value = serde_json::from_str(labels.value(1)).unwrap();
        assert_eq!(l1, serde_json::json!({"s": 1}));
        let host = b.column_by_name("host").unwrap().as_string::<i32>();
        assert!(host.is_null(1));
        let region = b.column_by_name("region").unwrap().as_string::<i32>();
        assert_eq!((region.value(0), region.value(1)), ("eu", "eu"));
        let tags = b.column_by_name("tags").unwrap().as_map();
        let keys = tags.value(0);
        assert_eq!(keys.column(0).as_string::<i32>().value(1), "n");
        assert_eq!(keys.column(1).as_string::<i32>().value(1), "3");
    }

    #[test]
    fn a_bad_value_refuses_the_request_naming_line_and_field() {
        let t = table(EVENTS);
        let cases: [(&[u8], &str); 5] = [
            (
                b"{\"time\":1,\"n\":1}\n{\"time\":2,\"n\":\"x\"}\n",
                "line 2: field 'n'",
            ),
            (b"{\"time\":1,\"n\":1}\n\n{\"time\":2}\n", "line 3:"),
            (
                b"{\"time\":1,\"n\":1,\"nope\":2}",
                "line 1: column 'nope' is not a column of the table",
            ),
            (
                b"{\"time\":1,\"n\":1}\n{\"time\":\"yesterday\",\"n\":1}",
                "line 2, field 'time'",
            ),
            (
                b"[{\"time\":1,\"n\":1},\n {\"time\":2,\"n\":1,\"v\":\"a\"}]",
                "line 2",
            ),
        ];
        for (body, expected) in cases {
            let e = decode(&t, body).unwrap_err().to_string();
            assert!(e.contains(expected), "{e} (expected {expected})");
            assert!(e.contains("table 'ev'"), "{e}");
        }
        // A null in the non-null column, named by line and column.
        let e = decode(&t, b"{\"time\":1,\"n\":1}\n{\"time\":1,\"n\":null}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("column 'n', line 2: null"), "{e}");
    }

    #[test]
    fn hostile_records_get_short_errors_and_no_crash() {
        let t = table(EVENTS);
        // A deeply nested value where a string belongs, and one under a jsonb column.
        let deep = format!(
            "{{\"time\":1,\"n\":1,\"host\":{}{}}}",
            "[".repeat(200_000),
            "]".repeat(200_000)
        );
        let e = decode(&t, deep.as_bytes()).unwrap_err().to_string();
        assert!(
            e.contains("line 1: objects and arrays nested more than 100 deep"),
            "{}",
            &e[..e.len().min(2000)]
        );
        // At the limit it is decoded, and refused for its type.
        let ok_depth = format!(
            "{{\"time\":1,\"n\":1,\"host\":{}{}}}",
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        let e = decode(&t, ok_depth.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("line 1: field 'host'") && e.len() < 1000, "{e}");
    }

    #[test]
    fn hostile_deep_jsonb() {
        let t = table(EVENTS);
        let deep = format!(
            "{{\"time\":1,\"n\":1,\"labels\":{}{}}}",
            "[".repeat(200_000),
            "]".repeat(200_000)
        );
        let e = decode(&t, deep.as_bytes()).unwrap_err().to_string();
        assert!(
            e.contains("nested more than 100 deep"),
            "{}",
            &e[..e.len().min(2000)]
        );
    }

    #[test]
    fn hostile_garbage() {
        let t = table(EVENTS);
        // Garbage bytes.
        for body in [&b"\xff\xfe{\"a\""[..], b"{\"time\":\xff}", b"}{", b"{{{{"] {
            assert!(decode(&t, body).is_err());
        }
    }

    #[test]
    fn absent_or_null_fields_take_the_default() {
        let t = table(EVENTS);
        let body = b"{\"time\":1,\"n\":1,\"region\":\"us\"}\n{\"time\":2,\"n\":2}\n{\"time\":3,\"n\":3,\"region\":null}";
        let b = &decode(&t, body).unwrap()[0].0;
        let region = b.column_by_name("region").unwrap().as_string::<i32>();
        let got: Vec<_> = region.iter().collect();
        assert_eq!(got, vec![Some("us"), Some("eu"), Some("eu")]);
    }

    #[test]
    fn metrics_take_the_friendly_form() {
        let metrics = flight_schema::seeds::seed_tables()
            .into_iter()
            .find(|t| t.name == "metrics")
            .unwrap()
            .validate(1)
            .unwrap();
        let body =
            br#"{"name": "cpu", "labels": {"host": "a"}, "value": 0.5, "time": 1796119200000}
{"name": "cpu", "labels": {"host": "b"}, "value": 2, "time": "2026-12-01T10:00:00.5Z"}
{"na\u006de": "mem", "lab\u0065ls": {"h\"ost": "c"}, "value": 3, "time": 1796119200000}"#;
        let b = &decode(&metrics, body).unwrap()[0].0;
        assert_eq!(b.num_rows(), 3);
        let names = b.column_by_name("metric_name").unwrap().as_string::<i32>();
        assert_eq!(names.value(1), "cpu");
        // Escaped field names are decoded before the rename and the column match.
        assert_eq!(names.value(2), "mem");
        let labels = b.column_by_name("labels").unwrap().as_string::<i32>();
        assert_eq!(labels.value(2), r#"{"h\"ost": "c"}"#);
        let v = b
            .column_by_name("value")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!((v.value(0), v.value(1)), (0.5, 2.0));
    }

    #[test]
    fn large_bodies_are_cut_into_batches() {
        let t = table(EVENTS);
        let mut body = Vec::new();
        for i in 0..(BATCH_ROWS + 10) {
            body.extend_from_slice(format!("{{\"time\":{i},\"n\":{i}}}\n").as_bytes());
        }
        let batches = decode(&t, &body).unwrap();
        let rows: Vec<usize> = batches.iter().map(|(b, _)| b.num_rows()).collect();
        assert_eq!(rows, vec![BATCH_ROWS, 10]);
    }
}
