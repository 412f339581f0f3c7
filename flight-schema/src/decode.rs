//! Decoding the Arrow IPC messages of a DoPut stream.
//!
//! What flows through it: the `(data_header, data_body)` of each FlightData message, in
//! order: the schema message first, then dictionary batches and record batches. Out come
//! the record batches, each with its raw message when it stands alone (no dictionary
//! columns), which the WAL can then keep as received without encoding it again.
//!
//! Unlike arrow-flight's decoder, which copies a whole message body that is not 64-byte
//! aligned (tonic's are not), this lets the IPC reader copy only the fixed-width buffers
//! that are misaligned (offsets, numbers); string data stays in the received message.
//!
//! Every input is untrusted: [`PutDecoder::decode`] answers a malformed message (truncated,
//! garbage, lying about its buffers) with an error naming what is wrong, never with a
//! panic: arrow's decoder is run under `catch_unwind` as a last line, and a panic caught
//! there is reported as a malformed message too. The fuzz target in `fuzz/` feeds it
//! arbitrary message sequences.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::ipc::MessageHeader;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;

/// Why a message could not be decoded. Every variant is the sender's error (the message is
/// malformed or out of order); when the WAL decodes its own records, it reports a failure
/// as damage or a bug of its own.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The header is not an Arrow IPC message at all.
    /// (flatbuffers' verifier's message: arrow does not re-export its error type.)
    #[error("not an Arrow IPC message: {0}")]
    NotIpc(String),
    /// A batch or dictionary came before the stream's schema message.
    #[error("a {0} came before the schema")]
    BeforeSchema(&'static str),
    /// The header says it is a `kind` message but does not hold one.
    #[error("bad {0} message")]
    BadHeader(&'static str),
    /// arrow's reader refused the message.
    #[error("bad {kind}: {source}")]
    Arrow {
        kind: &'static str,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// The header claims what its body cannot hold (buffers past its end, more rows than
    /// it has bytes for, a decompressed size past [`MAX_DECOMPRESSED`]).
    #[error("{0}")]
    Lies(String),
    /// arrow's decoder panicked on the message (caught; the decoder starts over).
    #[error("malformed Arrow IPC message (the decoder failed: {0})")]
    Panicked(String),
    /// A message type a DoPut stream does not carry (tensors, sparse tensors).
    #[error("unexpected IPC message type {0}")]
    Unexpected(String),
}

impl crate::Classify for DecodeError {
    fn class(&self) -> crate::ErrorClass {
        crate::ErrorClass::InvalidInput
    }
}

/// A record batch from a DoPut stream.
#[derive(Debug)]
pub struct Decoded {
    pub batch: RecordBatch,
    /// The message it came in, `(header, body)`, when it stands alone.
    pub raw: Option<(Bytes, Bytes)>,
}

/// Decodes the messages of one DoPut stream; see the module doc.
#[derive(Debug, Default)]
pub struct PutDecoder {
    schema: Option<SchemaRef>,
    dictionaries: HashMap<i64, ArrayRef>,
}

impl PutDecoder {
    /// A decoder that already knows the schema (its stream's schema message was read
    /// before, or the schema is known otherwise, as for the WAL's records).
    pub fn with_schema(schema: SchemaRef) -> Self {
        Self {
            schema: Some(schema),
            dictionaries: HashMap::new(),
        }
    }

    /// The batch a message carries, or `None` for schema, dictionary and empty messages.
    /// A malformed message is an error naming the problem; nothing panics.
    pub fn decode(&mut self, header: Bytes, body: Bytes) -> Result<Option<Decoded>, DecodeError> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decode_unguarded(header, body)
        })) {
            Ok(result) => result,
            Err(panic) => {
                // The decoder's state is unknown now: start over (the call ends anyway).
                *self = Self::default();
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(DecodeError::Panicked(why))
            }
        }
    }

    /// [`PutDecoder::decode`] without the panic guard.
    pub fn decode_unguarded(
        &mut self,
        header: Bytes,
        body: Bytes,
    ) -> Result<Option<Decoded>, DecodeError> {
        let message =
            arrow::ipc::root_as_message(&header).map_err(|e| DecodeError::NotIpc(e.to_string()))?;
        match message.header_type() {
            MessageHeader::NONE => Ok(None),
            MessageHeader::Schema => {
                let schema = arrow::ipc::convert::try_schema_from_flatbuffer_bytes(&header)
                    .map_err(|source| DecodeError::Arrow {
                        kind: "schema message",
                        source,
                    })?;
                self.schema = Some(Arc::new(schema));
                self.dictionaries.clear();
                Ok(None)
            }
            MessageHeader::DictionaryBatch => {
                let schema = self
                    .schema
                    .as_ref()
                    .ok_or(DecodeError::BeforeSchema("dictionary batch"))?;
                let batch = message
                    .header_as_dictionary_batch()
                    .ok_or(DecodeError::BadHeader("dictionary batch"))?;
                if let Some(data) = batch.data() {
                    check_buffers(
                        data.buffers()
                            .map(|b| b.iter().map(|b| (b.offset(), b.length()))),
                        body.len(),
                    )?;
                    if data.compression().is_some() {
                        check_decompressed(
                            data.buffers()
                                .map(|b| b.iter().map(|b| (b.offset(), b.length()))),
                            &body,
                        )?;
                    }
                }
                arrow::ipc::reader::read_dictionary(
                    &Buffer::from(body),
                    batch,
                    schema,
                    &mut self.dictionaries,
                    &message.version(),
                )
                .map_err(|source| DecodeError::Arrow {
                    kind: "dictionary batch",
                    source,
                })?;
                Ok(None)
            }
            MessageHeader::RecordBatch => {
                let schema = self
                    .schema
                    .clone()
                    .ok_or(DecodeError::BeforeSchema("record batch"))?;
                let rb = message
                    .header_as_record_batch()
                    .ok_or(DecodeError::BadHeader("record batch"))?;
                check_buffers(
                    rb.buffers()
                        .map(|b| b.iter().map(|b| (b.offset(), b.length()))),
                    body.len(),
                )?;
                if rb.compression().is_some() {
                    check_decompressed(
                        rb.buffers()
                            .map(|b| b.iter().map(|b| (b.offset(), b.length()))),
                        &body,
                    )?;
                }
                check_lengths(
                    rb.length(),
                    rb.nodes().map(|n| n.iter().map(|n| n.length())),
                    body.len(),
                )?;
                let batch = arrow::ipc::reader::read_record_batch(
                    &Buffer::from(body.clone()),
                    rb,
                    schema.clone(),
                    &self.dictionaries,
                    None,
                    &message.version(),
                )
                .map_err(|source| DecodeError::Arrow {
                    kind: "record batch",
                    source,
                })?;
                // The message stands alone unless a column refers to dictionaries sent in
                // other messages.
                let uses_dictionaries = schema
                    .fields()
                    .iter()
                    .any(|f| matches!(f.data_type(), DataType::Dictionary(..)));
                Ok(Some(Decoded {
                    batch,
                    raw: (!uses_dictionaries).then_some((header, body)),
                }))
            }
            other => Err(DecodeError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Row counts a body of `body` bytes can hold: every row takes at least one bit of some
/// buffer (a registered table has a time column, which takes 8 bytes), so a header that
/// claims more lies, and believing it would have the reader (or a later step filling a
/// column with nulls) allocate for rows that are not there.
fn check_lengths(
    rows: i64,
    nodes: Option<impl Iterator<Item = i64>>,
    body: usize,
) -> Result<(), DecodeError> {
    let most = (body as i64).saturating_mul(8).saturating_add(64);
    if !(0..=most).contains(&rows) {
        return Err(DecodeError::Lies(format!(
            "bad record batch: it claims {rows} rows, more than its body of {body} bytes can hold"
        )));
    }
    for (i, n) in nodes.into_iter().flatten().enumerate() {
        if !(0..=most).contains(&n) {
            return Err(DecodeError::Lies(format!(
                "bad record batch: field node {i} claims {n} values, more than its body of {body} bytes can hold"
            )));
        }
    }
    Ok(())
}

/// Most bytes the compressed buffers of one message may say they hold once decompressed.
pub const MAX_DECOMPRESSED: i64 = 1 << 30;

/// A compressed buffer starts with its decompressed length (little-endian i64; -1: stored
/// as it is). arrow's reader allocates that much before decompressing, so a message that
/// claims terabytes would abort the process (an allocation failure is no panic to catch).
/// Call after [`check_buffers`].
fn check_decompressed(
    buffers: Option<impl Iterator<Item = (i64, i64)>>,
    body: &[u8],
) -> Result<(), DecodeError> {
    let mut total: i64 = 0;
    for (i, (offset, length)) in buffers.into_iter().flatten().enumerate() {
        if length == 0 {
            continue;
        }
        let start = offset as usize;
        let Some(prefix) = body.get(start..start + 8).filter(|_| length >= 8) else {
            return Err(DecodeError::Lies(format!(
                "compressed buffer {i} is {length} bytes long, too short for its length prefix"
            )));
        };
        let n = i64::from_le_bytes(prefix.try_into().expect("8 bytes"));
        if n == -1 {
            continue;
        }
        total = total.saturating_add(n);
        if n < 0 || total > MAX_DECOMPRESSED {
            return Err(DecodeError::Lies(format!(
                "compressed buffer {i} claims {n} bytes once decompressed; a message may hold \
                 at most {MAX_DECOMPRESSED} bytes decompressed"
            )));
        }
    }
    Ok(())
}

/// Every buffer a message header names must lie within its body: arrow's reader would
/// panic slicing past the end.
fn check_buffers(
    buffers: Option<impl Iterator<Item = (i64, i64)>>,
    body: usize,
) -> Result<(), DecodeError> {
    for (i, (offset, length)) in buffers.into_iter().flatten().enumerate() {
        let end = offset.checked_add(length);
        if offset < 0 || length < 0 || end.is_none_or(|e| e as u128 > body as u128) {
            return Err(DecodeError::Lies(format!(
                "buffer {i} (offset {offset}, length {length}) lies outside the message body of {body} bytes"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};

    /// The messages of a stream of `batch`: schema, then the batch.
    pub(crate) fn messages(batch: &RecordBatch) -> Vec<(Bytes, Bytes)> {
        messages_with(batch, IpcWriteOptions::default())
    }

    fn messages_with(batch: &RecordBatch, options: IpcWriteOptions) -> Vec<(Bytes, Bytes)> {
        let gen = IpcDataGenerator::default();
        let mut tracker = DictionaryTracker::new(false);
        let schema =
            gen.schema_to_bytes_with_dictionary_tracker(batch.schema_ref(), &mut tracker, &options);
        let (dicts, data) = gen
            .encode(batch, &mut tracker, &options, &mut Default::default())
            .unwrap();
        let mut out = vec![(Bytes::from(schema.ipc_message), Bytes::new())];
        out.extend(
            dicts
                .into_iter()
                .chain([data])
                .map(|d| (Bytes::from(d.ipc_message), Bytes::from(d.arrow_data))),
        );
        out
    }

    fn sample() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])),
                Arc::new(StringArray::from(vec![Some("a"), Some("bb"), None])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_compressed_buffer_claiming_terabytes_is_refused_not_allocated() {
        // Found by the fuzzer: arrow's reader allocates a compressed buffer's claimed
        // length first, and a failed allocation aborts the process.
        let options = IpcWriteOptions::default()
            .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
            .unwrap();
        let batch = sample();
        let mut msgs = messages_with(&batch, options);
        // Compressed and intact: decoded.
        let mut d = PutDecoder::default();
        let got: Vec<RecordBatch> = msgs
            .iter()
            .filter_map(|(h, b)| d.decode(h.clone(), b.clone()).unwrap())
            .map(|x| x.batch)
            .collect();
        assert_eq!(got, vec![batch]);
        // The first compressed buffer now claims 4 TiB.
        let (header, body) = msgs.pop().unwrap();
        let offset = {
            let message = arrow::ipc::root_as_message(&header).unwrap();
            let rb = message.header_as_record_batch().unwrap();
            let b = rb
                .buffers()
                .unwrap()
                .iter()
                .find(|b| b.length() >= 8)
                .unwrap();
            b.offset() as usize
        };
        let mut body = body.to_vec();
        body[offset..offset + 8].copy_from_slice(&(1i64 << 42).to_le_bytes());
        let mut d = PutDecoder::default();
        for (h, b) in msgs {
            d.decode(h, b).unwrap();
        }
        let e = d.decode(header, Bytes::from(body)).unwrap_err();
        assert!(matches!(e, DecodeError::Lies(_)), "{e:?}");
        assert!(e.to_string().contains("once decompressed"), "{e}");
    }

    #[test]
    fn decodes_what_arrow_encodes() {
        let batch = sample();
        let mut d = PutDecoder::default();
        let mut got = Vec::new();
        for (h, b) in messages(&batch) {
            if let Some(x) = d.decode(h, b).unwrap() {
                assert!(x.raw.is_some());
                got.push(x.batch);
            }
        }
        assert_eq!(got, vec![batch]);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let batch = sample();
        let msgs = messages(&batch);
        let (schema_h, _) = msgs[0].clone();
        let (batch_h, batch_b) = msgs[1].clone();
        // Garbage header, a body cut short, a body of zeros, a header cut short, and a
        // record batch before any schema.
        let cases: Vec<Vec<(Bytes, Bytes)>> = vec![
            vec![(Bytes::from_static(b"\xff\xff\xff\xffgarbage"), Bytes::new())],
            vec![
                (schema_h.clone(), Bytes::new()),
                (batch_h.clone(), batch_b.slice(..batch_b.len() / 2)),
            ],
            vec![
                (schema_h.clone(), Bytes::new()),
                (batch_h.clone(), Bytes::from(vec![0u8; batch_b.len()])),
            ],
            vec![
                (schema_h.clone(), Bytes::new()),
                (batch_h.slice(..batch_h.len() / 2), batch_b.clone()),
            ],
            vec![(batch_h.clone(), batch_b.clone())],
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let mut d = PutDecoder::default();
            let mut failed = false;
            for (h, b) in case {
                match d.decode(h, b) {
                    Ok(_) => {}
                    Err(e) => {
                        assert!(!e.to_string().is_empty());
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed, "case {i} was taken as valid");
        }
        // Each byte of the batch header flipped in turn: an error or a batch, never a
        // panic reaching the caller.
        for i in 0..batch_h.len() {
            let mut h = batch_h.to_vec();
            h[i] ^= 0xff;
            let mut d = PutDecoder::default();
            d.decode(schema_h.clone(), Bytes::new()).unwrap();
            let _ = d.decode(Bytes::from(h), batch_b.clone());
        }
    }
}
