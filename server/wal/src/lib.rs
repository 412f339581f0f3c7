//! # sluice-wal
//!
//! The write-ahead log: every accepted batch is appended here, and made durable, before
//! its ack is sent.
//!
//! # What flows through it
//! Callers hand over an IPC-encoded batch ([`WalEntry`]); one writer thread takes all
//! entries waiting at that moment, gives them consecutive sequence numbers, appends them
//! to the current segment and fsyncs once for the whole group (group commit). Then, in
//! sequence order, it tells the [`Subscriber`]s what became durable (the pipeline puts the
//! batch in the recent buffer there, so buffer order is WAL order) and answers its caller
//! with the sequence number. On start, [`Wal::open`] reads every segment back ([`scan`]): an
//! incomplete record at the end of the last one, left by a crash mid-write, is cut off (it
//! was never acknowledged); any other damage, a missing segment or a missing `ID` stops
//! the start with a message naming the records it costs, and `sluice wal check|repair`
//! ([`scan::repair`]) deal with it. [`Wal::replay`] reads the records back. Segments are
//! deleted by [`Wal::release_upto`] once every sink has made their records durable; the
//! last sequence number deleted is kept in `wal/RELEASED` first, so a segment missing at
//! the front is noticed too. Sequence numbers never go backwards: the segment being
//! written is never deleted, and a start begins after the highest of the WAL's records,
//! `RELEASED` and the floor the caller gives (the archive's position).
//!
//! # Format
//! Segment files `wal/<first seq, 20 digits>.wal`: a header (format 2: `SLWAL002`, the
//! WAL's 16-byte id, the first seq, a crc32; format 1, still read: `SLWAL001` alone),
//! then records `[u32 payload length][u32 crc32 of payload][payload]`, payload =
//! `[u64 seq][u64 schema version][u16 table length][table][u32 header length]
//! [Arrow IPC message header][Arrow IPC body]`, integers little-endian. Segments are
//! written with direct I/O where possible ([`crate::io`]): the one being written, or
//! one a crash left open, may end in fewer than 4096 zero bytes of padding, which the scan
//! at start trims.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot};

pub mod io;

use crate::io::SegmentFile;

mod metrics;
pub use metrics::WalMetrics;

pub mod scan;

use scan::{read_record, Tail, HEADER_V2};

const RECORD_HEADER: usize = 8;

/// zstd level of compressed WAL records.
pub const WAL_ZSTD_LEVEL: i32 = 1;

/// Encodes a batch (of a registered schema: no dictionaries) as one Arrow IPC message,
/// `(header, body)`, its buffers compressed with `compression`: the form a [`WalEntry`]
/// carries.
pub fn encode_ipc(
    batch: &RecordBatch,
    compression: Option<arrow::ipc::CompressionType>,
) -> Result<(Vec<u8>, Vec<u8>), arrow::error::ArrowError> {
    use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
    let mut tracker = DictionaryTracker::new(false);
    let mut options = IpcWriteOptions::default().try_with_compression(compression)?;
    if compression == Some(arrow::ipc::CompressionType::ZSTD) {
        // The WAL wants speed: zstd's fastest regular level still shrinks log-like
        // batches about 4x.
        options = options.try_with_compression_level(Some(WAL_ZSTD_LEVEL))?;
    }
    let (dicts, data) = IpcDataGenerator::default().encode(
        batch,
        &mut tracker,
        &options,
        &mut Default::default(),
    )?;
    if !dicts.is_empty() {
        return Err(arrow::error::ArrowError::InvalidArgumentError(
            "registered schemas have no dictionary columns".into(),
        ));
    }
    Ok((data.ipc_message, data.arrow_data))
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("WAL segment {path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        path: String,
        offset: u64,
        #[source]
        reason: RecordDamage,
    },
    /// A tail reader asked for a record the WAL had already released (every sink was
    /// past it): a bug in whoever set the positions.
    #[error("record {seq} was released before this reader took it (oldest on disk: {oldest})")]
    Released { seq: u64, oldest: u64 },
    /// A record's IPC message does not decode with its table version's schema, though
    /// its checksum is good: damage the checksum missed, or a bug.
    #[error("WAL record {seq} of '{table}' does not decode: {source}")]
    Decode {
        seq: u64,
        table: String,
        #[source]
        source: flight_schema::DecodeError,
    },
    /// A record whose IPC message holds no record batch.
    #[error("WAL record {seq} of '{table}' holds no record batch")]
    NoBatch { seq: u64, table: String },
    #[error("the WAL is closed")]
    Closed,
    /// Damage that costs acknowledged records, found at start.
    #[error("{0}")]
    Damaged(String),
}

/// What is wrong with the bytes where a record should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordDamage {
    #[error("truncated record header")]
    TruncatedHeader,
    #[error("record length {0} is too small")]
    TooShort(usize),
    #[error("truncated record of {0} bytes")]
    Truncated(usize),
    #[error("checksum mismatch")]
    Checksum,
    #[error("bad table length")]
    TableLength,
    #[error("table name is not UTF-8")]
    TableNotUtf8,
    #[error("bad header length")]
    HeaderLength,
}

impl flight_schema::Classify for WalError {
    /// A full disk and a closing WAL pass; damage and I/O failures need an operator; a
    /// record that does not decode is damage or a bug.
    fn class(&self) -> flight_schema::ErrorClass {
        use flight_schema::ErrorClass;
        match self {
            WalError::Closed => ErrorClass::Unavailable,
            e if e.is_disk_full() => ErrorClass::Unavailable,
            _ => ErrorClass::Internal,
        }
    }
}

impl WalError {
    /// Whether this is a full disk (or quota): the write may succeed once space is freed.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, WalError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Options of the WAL (from `[wal]`).
#[derive(Debug, Clone)]
pub struct WalOptions {
    pub dir: PathBuf,
    pub fsync: bool,
    pub segment_size: u64,
    pub max_group_bytes: u64,
    /// Most bytes of recent durable batches kept decoded in memory for tail readers
    /// ([`WalTail`]): a sink that keeps up takes them from there instead of reading,
    /// decompressing and decoding them again. 0 turns it off.
    pub feed_bytes: u64,
    /// Write segments with `O_DIRECT` where the file system allows it ([`crate::io`]).
    pub direct_io: bool,
}

/// A batch to append.
pub struct WalEntry {
    pub table: Arc<str>,
    pub version: u64,
    /// Arrow IPC message header (flatbuffer) of the batch.
    pub ipc_header: bytes::Bytes,
    /// Arrow IPC message body.
    pub ipc_body: bytes::Bytes,
    /// The batch itself (what the IPC message decodes to), handed to tail readers from
    /// memory once durable.
    pub batch: Option<RecordBatch>,
    /// Whatever the writer wants its [`Subscriber`] to get back with the record once it is
    /// durable (the pipeline's memory charge and counts); the WAL never looks inside.
    pub ticket: Option<Box<dyn std::any::Any + Send>>,
    pub reply: oneshot::Sender<Result<u64, WalError>>,
}

impl WalEntry {
    fn payload_len(&self) -> usize {
        8 + 8 + 2 + self.table.len() + 4 + self.ipc_header.len() + self.ipc_body.len()
    }
}

/// A record that has just become durable, as [`Subscriber`]s hear of it.
pub struct Durable {
    pub seq: u64,
    pub table: Arc<str>,
    pub version: u64,
    /// The batch, when the writer handed it over ([`WalEntry::batch`]).
    pub batch: Option<RecordBatch>,
    /// The entry's [`WalEntry::ticket`], untouched.
    pub ticket: Option<Box<dyn std::any::Any + Send>>,
}

/// Hears of every record as it becomes durable: on the writer thread, in sequence order,
/// before the record's writer is answered. Whoever keeps state that must follow WAL
/// order (the recent buffer) subscribes with [`Wal::subscribe`]; the call must be quick,
/// as the next group waits for it. Subscribers are called in the order they subscribed,
/// and one may take the batch or the ticket out of the record.
pub trait Subscriber: Send + Sync {
    fn durable(&self, record: &mut Durable);
}

/// A record read back from the WAL.
pub struct WalRecord {
    pub seq: u64,
    pub table: String,
    pub version: u64,
    pub ipc_header: bytes::Bytes,
    pub ipc_body: bytes::Bytes,
    /// Set when the record came from the in-memory feed: the decoded batch (the IPC
    /// fields are then empty).
    pub batch: Option<RecordBatch>,
}

impl WalRecord {
    /// Decodes the batch with the schema of the version it was written at. A record is
    /// checked like any untrusted message (`flight_schema::decode`): damage that its
    /// checksum missed is an error, not a panic.
    pub fn decode(&self, schema: arrow::datatypes::SchemaRef) -> Result<RecordBatch, WalError> {
        if let Some(b) = &self.batch {
            return Ok(b.clone());
        }
        flight_schema::decode::PutDecoder::with_schema(schema)
            .decode(self.ipc_header.clone(), self.ipc_body.clone())
            .map_err(|source| WalError::Decode {
                seq: self.seq,
                table: self.table.clone(),
                source,
            })?
            .map(|d| d.batch)
            .ok_or_else(|| WalError::NoBatch {
                seq: self.seq,
                table: self.table.clone(),
            })
    }
}

#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    /// `first_seq - 1` while empty.
    last_seq: u64,
    size: u64,
    /// Bytes before the first record.
    header_len: u64,
    /// The oldest schema version of each table among its records.
    versions: std::collections::BTreeMap<Arc<str>, u64>,
}

/// A durable record kept decoded in the [`Feed`].
struct FedRecord {
    seq: u64,
    table: Arc<str>,
    version: u64,
    batch: RecordBatch,
    /// [`flight_schema::data_size`] of the batch.
    size: usize,
}

/// Recent durable records, decoded, in sequence order without gaps (see
/// [`WalOptions::feed_bytes`]).
struct Feed {
    records: VecDeque<FedRecord>,
    bytes: usize,
    cap: usize,
    /// One past the last record pushed, if it was kept (0: unknown); a reader asking for
    /// this seq is at the end of what is durable, even when taken records were dropped.
    end: u64,
    /// The next seq of every live tail reader: records all of them have passed are
    /// dropped, and without readers nothing is kept.
    readers: Vec<std::sync::Weak<AtomicU64>>,
}

impl Feed {
    /// Drops records every reader has taken (and everything, without readers).
    fn trim(&mut self) {
        self.readers.retain(|r| r.strong_count() > 0);
        let lowest = self
            .readers
            .iter()
            .filter_map(|r| r.upgrade())
            .map(|p| p.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        while self.records.front().is_some_and(|r| r.seq < lowest) {
            let r = self.records.pop_front().expect("front");
            self.bytes -= r.size;
        }
    }

    /// Appends a durable record; a record without its batch breaks the run, so the
    /// feed starts over after it (readers then take the gap from disk).
    fn push(&mut self, seq: u64, table: &Arc<str>, version: u64, batch: Option<&RecordBatch>) {
        self.trim();
        let Some(batch) = batch.filter(|_| self.cap > 0 && !self.readers.is_empty()) else {
            self.records.clear();
            self.bytes = 0;
            self.end = 0;
            return;
        };
        if self.end != seq {
            self.records.clear();
            self.bytes = 0;
        }
        let size = flight_schema::data_size(batch);
        self.records.push_back(FedRecord {
            seq,
            table: table.clone(),
            version,
            batch: batch.clone(),
            size,
        });
        self.bytes += size;
        self.end = seq + 1;
        while self.bytes > self.cap {
            match self.records.pop_front() {
                Some(r) => self.bytes -= r.size,
                None => break,
            }
        }
    }

    /// Records from `seq` on, up to about `max_bytes`, and their size. `None` if the feed
    /// does not hold `seq`; empty if `seq` is the next record to come (the reader is at
    /// the end).
    fn take_from(&self, seq: u64, max_bytes: usize) -> Option<(Vec<WalRecord>, usize)> {
        if seq == self.end {
            return Some((Vec::new(), 0));
        }
        let (front, back) = (self.records.front()?.seq, self.records.back()?.seq);
        if seq < front || seq > back {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in self.records.range((seq - front) as usize..) {
            if bytes >= max_bytes {
                break;
            }
            bytes += r.size;
            out.push(WalRecord {
                seq: r.seq,
                table: r.table.to_string(),
                version: r.version,
                ipc_header: bytes::Bytes::new(),
                ipc_body: bytes::Bytes::new(),
                batch: Some(r.batch.clone()),
            });
        }
        Some((out, bytes))
    }
}

struct Shared {
    /// Recent durable records for tail readers.
    feed: Mutex<Feed>,
    segments: Mutex<VecDeque<Segment>>,
    last_seq: AtomicU64,
    metrics: WalMetrics,
    /// Told of every durable record, in order ([`Wal::subscribe`]).
    subscribers: Mutex<Vec<Arc<dyn Subscriber>>>,
    /// Woken after every group commit (tail readers wait on it).
    durable: tokio::sync::Notify,
    /// Per sink: every record with `seq <=` this is durable in that sink (or not routed
    /// to it). Segments are released up to the lowest.
    positions: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    dir: PathBuf,
    /// Serialises releases (the archive and the store sinks release concurrently).
    release_lock: Mutex<()>,
    /// The last group's failure, until a group succeeds: the message, and whether the
    /// disk (or quota) is full.
    write_error: Mutex<Option<(String, bool)>>,
    /// `wal.fsync`: the small state files are synced as the segments are.
    fsync: bool,
}

impl Shared {
    fn publish_sizes(&self, segs: &VecDeque<Segment>) {
        self.metrics.segments.set(segs.len() as i64);
        self.metrics
            .bytes
            .set(segs.iter().map(|s| s.size).sum::<u64>() as i64);
    }
}

/// Handle to the WAL; cheap to clone.
#[derive(Clone)]
pub struct Wal {
    tx: Arc<Mutex<Option<mpsc::UnboundedSender<WalEntry>>>>,
    shared: Arc<Shared>,
    old_segments: Arc<Vec<Segment>>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    id: Arc<str>,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

fn parse_payload(payload: &[u8]) -> Result<WalRecord, RecordDamage> {
    let u64_at = |o: usize| u64::from_le_bytes(payload[o..o + 8].try_into().unwrap());
    let seq = u64_at(0);
    let version = u64_at(8);
    let tlen = u16::from_le_bytes(payload[16..18].try_into().unwrap()) as usize;
    let mut o = 18;
    let table = std::str::from_utf8(payload.get(o..o + tlen).ok_or(RecordDamage::TableLength)?)
        .map_err(|_| RecordDamage::TableNotUtf8)?
        .to_string();
    o += tlen;
    let hlen = u32::from_le_bytes(
        payload
            .get(o..o + 4)
            .ok_or(RecordDamage::HeaderLength)?
            .try_into()
            .unwrap(),
    ) as usize;
    o += 4;
    let ipc_header =
        bytes::Bytes::copy_from_slice(payload.get(o..o + hlen).ok_or(RecordDamage::HeaderLength)?);
    o += hlen;
    let ipc_body = bytes::Bytes::copy_from_slice(&payload[o..]);
    Ok(WalRecord {
        seq,
        table,
        version,
        ipc_header,
        ipc_body,
        batch: None,
    })
}

impl Wal {
    /// Opens the WAL in `opts.dir`: reads every segment back ([`scan::scan_dir`]) and
    /// refuses to start when records are damaged or missing (the error lists them and
    /// names `sluice wal check|repair`); cuts an incomplete record off the end of the last
    /// segment; and starts the writer on a new segment after the highest of the last
    /// record, `RELEASED` and `floor` (the highest sequence number the archive recorded),
    /// so sequence numbers never go backwards.
    pub fn open(opts: WalOptions, metrics: WalMetrics, floor: u64) -> Result<Self, WalError> {
        let dir = opts.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let scan = scan::scan_dir(&dir)?;
        let problems = scan.problems();
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
            return Err(WalError::Damaged(format!(
                "the WAL in {d} is damaged, so sluice does not start (starting would skip \
                 acknowledged records without a word):\n{}\n`sluice wal check` prints this \
                 report; `sluice wal repair` keeps every intact record, moves the damaged \
                 bytes to {d}/{} and records the sequence numbers that are gone in {d}/{}",
                list.join("\n"),
                scan::DAMAGED_DIR,
                scan::LOST_FILE,
                d = dir.display(),
            )));
        }
        let fresh = scan.is_fresh();
        let id = scan
            .id()
            .unwrap_or_else(|| *uuid::Uuid::new_v4().as_bytes());
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let damaged = dir.join(scan::DAMAGED_DIR).join(stamp.to_string());
        let released = scan.released.unwrap_or(0);
        let mut removed = false;
        let mut empty = Vec::new();
        let mut segments = Vec::new();
        for seg in &scan.segments {
            let cut = match &seg.tail {
                Tail::Clean => None,
                Tail::Padding { offset } => Some(*offset),
                Tail::Torn {
                    offset,
                    complete: true,
                    seq,
                    reason,
                    ..
                } => {
                    scan::keep_torn_tail(&seg.path, *offset, &damaged)?;
                    tracing::warn!(path = %seg.path.display(), offset, claimed_seq = ?seq, %reason,
                        kept_in = %damaged.display(),
                        "the last record of the WAL fails its checksum: a write a crash cut off \
                         before its fsync (never acknowledged), or damage to an acknowledged \
                         record; it is not replayed, its bytes are kept");
                    Some(*offset)
                }
                Tail::Torn { offset, reason, .. } => {
                    tracing::warn!(path = %seg.path.display(), offset, %reason,
                        "cutting off an incomplete record at the end of a WAL segment (a write \
                         a crash or a full disk cut off before its fsync; it was never \
                         acknowledged)");
                    Some(*offset)
                }
            };
            if let Some(at) = cut {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .map_err(io_err(&seg.path))?;
                f.set_len(at.max(seg.header_len))
                    .map_err(io_err(&seg.path))?;
                f.sync_all().map_err(io_err(&seg.path))?;
            }
            // Segments every sink had, whose deletion a crash interrupted, go; empty ones
            // too, once the writer has made its segment (often under the same name).
            match (seg.first_seq(), seg.last_seq()) {
                (Some(first), Some(last)) if last > released => segments.push(Segment {
                    path: seg.path.clone(),
                    first_seq: first,
                    last_seq: last,
                    size: seg.data_end(),
                    header_len: seg.header_len,
                    versions: seg
                        .versions
                        .iter()
                        .map(|(t, v)| (Arc::from(t.as_str()), *v))
                        .collect(),
                }),
                (Some(_), Some(_)) => {
                    std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
                    removed = true;
                }
                _ => empty.push(seg.path.clone()),
            }
        }
        if removed {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&dir))?;
        }
        // After a cut tail the next number is skipped: the cut record (number last + 1)
        // may have been an acknowledged one that was damaged, and a store may hold it.
        let after_cut = scan
            .segments
            .iter()
            .filter(|s| matches!(s.tail, Tail::Torn { .. }))
            .map(|s| s.last_seq().unwrap_or(s.name_seq.saturating_sub(1)) + 1)
            .max();
        let in_wal = scan
            .last_record_seq()
            .unwrap_or(0)
            .max(released)
            .max(
                scan.segments
                    .last()
                    .map_or(0, |s| s.name_seq.saturating_sub(1)),
            )
            .max(after_cut.unwrap_or(0));
        if floor > in_wal {
            tracing::warn!(wal_last = in_wal, archive_last = floor,
                "the archive holds records the WAL does not (lost with fsync off?); new records start after the archive's");
        }
        let last_seq = in_wal.max(floor);
        let shared = Arc::new(Shared {
            feed: Mutex::new(Feed {
                records: VecDeque::new(),
                bytes: 0,
                cap: opts.feed_bytes as usize,
                readers: Vec::new(),
                end: 0,
            }),
            segments: Mutex::new(segments.iter().cloned().collect()),
            last_seq: AtomicU64::new(last_seq),
            metrics,
            subscribers: Mutex::new(Vec::new()),
            durable: tokio::sync::Notify::new(),
            positions: Mutex::new(Default::default()),
            dir: dir.clone(),
            release_lock: Mutex::new(()),
            write_error: Mutex::new(None),
            fsync: opts.fsync,
        });
        shared.metrics.last_seq.set(last_seq as i64);
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer::start(opts, shared.clone(), last_seq, id)?;
        let writing = segment_path(&dir, last_seq + 1);
        for path in empty.iter().filter(|p| **p != writing) {
            std::fs::remove_file(path).map_err(io_err(path))?;
        }
        // The ID file after the first segment: an ID without segments means they were lost.
        if scan.id_file != Some(id) {
            if !fresh {
                tracing::warn!(dir = %dir.display(), "wal/ID was missing; restored from the segment headers");
            }
            scan::write_atomic(&dir, scan::ID_FILE, scan::format_id(&id).as_bytes(), true)?;
        }
        let handle = std::thread::Builder::new()
            .name("sluice-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| WalError::Io {
                path: "wal writer thread".into(),
                source: e,
            })?;
        Ok(Self {
            tx: Arc::new(Mutex::new(Some(tx))),
            shared,
            old_segments: Arc::new(segments),
            writer: Arc::new(Mutex::new(Some(handle))),
            id: scan::format_id(&id).into(),
        })
    }

    /// The last write's failure, until a write succeeds: the message, and whether the disk
    /// (or quota) is full.
    pub fn write_error(&self) -> Option<(String, bool)> {
        self.shared.write_error.lock().expect("wal error").clone()
    }

    /// Bytes free for an unprivileged writer on the file system holding the WAL.
    pub fn disk_free(&self) -> Option<u64> {
        let path = std::ffi::CString::new(self.shared.dir.as_os_str().as_encoded_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: a NUL-terminated path and a buffer statvfs fills on success.
        let ok = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } == 0;
        ok.then(|| {
            // SAFETY: statvfs returned 0, so it filled the struct.
            let st = unsafe { st.assume_init() };
            st.f_bavail.saturating_mul(st.f_frsize)
        })
    }

    /// The WAL's identity (32 hex digits, kept in `wal/ID` and in every segment header):
    /// the key of this WAL's ranges in a store's offsets.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends an entry; the entry's `reply` answers with its sequence number once durable.
    pub fn append(&self, entry: WalEntry) -> Result<(), WalError> {
        match self.tx.lock().expect("wal sender").as_ref() {
            Some(tx) => tx.send(entry).map_err(|_| WalError::Closed),
            None => Err(WalError::Closed),
        }
    }

    /// Adds `subscriber` to those told of every record that becomes durable from now on
    /// (see [`Subscriber`]); subscribe before the first append to hear of every record.
    pub fn subscribe(&self, subscriber: Arc<dyn Subscriber>) {
        self.shared
            .subscribers
            .lock()
            .expect("wal subscribers")
            .push(subscriber);
    }

    /// The last durable sequence number.
    pub fn last_seq(&self) -> u64 {
        self.shared.last_seq.load(Ordering::Acquire)
    }

    /// Reads every record that was in the WAL when it was opened, in sequence order.
    pub fn replay(&self) -> impl Iterator<Item = Result<WalRecord, WalError>> + Send + 'static {
        let segments = self.old_segments.clone();
        let mut idx = 0usize;
        let mut current: Option<(BufReader<File>, u64, PathBuf)> = None;
        let mut payload = Vec::new();
        std::iter::from_fn(move || loop {
            if current.is_none() {
                let seg = segments.get(idx)?;
                idx += 1;
                let file = match File::open(&seg.path) {
                    Ok(f) => f,
                    // Released since the WAL opened: every sink had its records.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Some(Err(io_err(&seg.path)(e))),
                };
                let mut r = BufReader::with_capacity(1 << 20, file);
                if let Err(e) = r.seek(SeekFrom::Start(seg.header_len)) {
                    return Some(Err(io_err(&seg.path)(e)));
                }
                current = Some((r, seg.size.saturating_sub(seg.header_len), seg.path.clone()));
            }
            let (reader, remaining, path) = current.as_mut().unwrap();
            if *remaining == 0 {
                current = None;
                continue;
            }
            let result = read_record(reader, &mut payload, *remaining)
                .and_then(|()| parse_payload(&payload))
                .map_err(|reason| WalError::Corrupt {
                    path: path.display().to_string(),
                    offset: 0,
                    reason,
                });
            *remaining = remaining.saturating_sub((RECORD_HEADER + payload.len()) as u64);
            if result.is_err() {
                *remaining = 0;
            }
            return Some(result);
        })
    }

    /// Deletes closed segments whose records all have `seq <= durable_seq` in every sink.
    /// The last sequence number deleted is written to `wal/RELEASED` first, so that a
    /// start can tell a released segment from a lost one.
    pub fn release_upto(&self, durable_seq: u64) {
        let _one_at_a_time = self.shared.release_lock.lock().expect("wal release");
        let upto = {
            let segs = self.shared.segments.lock().expect("wal segments");
            // The last segment is the one being written: never delete it.
            segs.iter()
                .take(segs.len().saturating_sub(1))
                .take_while(|s| s.last_seq <= durable_seq)
                .last()
                .map(|s| s.last_seq)
        };
        let Some(upto) = upto else {
            return;
        };
        if let Err(e) = scan::write_atomic(
            &self.shared.dir,
            scan::RELEASED_FILE,
            upto.to_string().as_bytes(),
            self.shared.fsync,
        ) {
            tracing::warn!(error = %e, "cannot record the WAL's release position; keeping the segments");
            return;
        }
        let mut segs = self.shared.segments.lock().expect("wal segments");
        while segs.len() > 1 && segs[0].last_seq <= upto {
            let seg = segs.pop_front().expect("a segment");
            match std::fs::remove_file(&seg.path) {
                Ok(()) => tracing::debug!(path = %seg.path.display(), "WAL segment released"),
                Err(e) => {
                    tracing::warn!(path = %seg.path.display(), error = %e, "cannot delete WAL segment");
                    segs.push_front(seg);
                    break;
                }
            }
        }
        self.shared.publish_sizes(&segs);
    }

    /// The oldest schema version of each table that a record still in the WAL was written
    /// at: older versions can no longer be needed to read a record back.
    pub fn oldest_versions(&self) -> std::collections::BTreeMap<String, u64> {
        let segs = self.shared.segments.lock().expect("wal segments");
        let mut out = std::collections::BTreeMap::new();
        for s in segs.iter() {
            for (t, v) in &s.versions {
                out.entry(t.to_string())
                    .and_modify(|o: &mut u64| *o = (*o).min(*v))
                    .or_insert(*v);
            }
        }
        out
    }

    /// Number of segment files and their total size.
    pub fn disk_usage(&self) -> (usize, u64) {
        let segs = self.shared.segments.lock().expect("wal segments");
        (segs.len(), segs.iter().map(|s| s.size).sum())
    }

    /// The sequence number of the oldest record still on disk (or the next one to be
    /// written when the WAL holds none).
    pub fn first_seq(&self) -> u64 {
        let segs = self.shared.segments.lock().expect("wal segments");
        segs.front().map_or(self.last_seq() + 1, |s| s.first_seq)
    }

    /// Registers a sink, starting at `seq` (every record up to it is durable there).
    /// Segments are only released past the lowest position of all registered sinks.
    pub fn register_sink(&self, sink: &'static str, seq: u64) {
        self.shared
            .positions
            .lock()
            .expect("wal positions")
            .insert(sink, seq);
    }

    /// Forgets a sink (or a hold on the segments, such as the replay's), releasing the
    /// segments it alone kept.
    pub fn unregister_sink(&self, sink: &'static str) {
        let min = {
            let mut p = self.shared.positions.lock().expect("wal positions");
            p.remove(sink);
            p.values().copied().min()
        };
        if let Some(min) = min {
            self.release_upto(min);
        }
    }

    /// Records that every record with `seq <= position` is durable in `sink`, and
    /// deletes the segments every sink is done with.
    pub fn set_sink_position(&self, sink: &'static str, position: u64) {
        let min = {
            let mut p = self.shared.positions.lock().expect("wal positions");
            let e = p.entry(sink).or_insert(position);
            *e = (*e).max(position);
            p.values().copied().min().unwrap_or(position)
        };
        self.release_upto(min);
    }

    /// Every sink's position, and the sink furthest behind.
    pub fn sink_positions(&self) -> Vec<(&'static str, u64)> {
        self.shared
            .positions
            .lock()
            .expect("wal positions")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// A reader of the records after `after_seq`, as they become durable.
    pub fn tail(&self, after_seq: u64) -> WalTail {
        let position = Arc::new(AtomicU64::new(after_seq + 1));
        self.shared
            .feed
            .lock()
            .expect("wal feed")
            .readers
            .push(Arc::downgrade(&position));
        WalTail {
            shared: self.shared.clone(),
            next_seq: after_seq + 1,
            position,
            current: None,
            payload: Vec::new(),
        }
    }

    /// Waits until a group commit after this call, or `timeout`.
    pub async fn wait_durable(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.durable.notified()).await;
    }

    /// Stops accepting entries, lets the writer finish and fsync what it has, and waits
    /// for it (blocking).
    pub fn close(&self) {
        self.tx.lock().expect("wal sender").take();
        if let Some(h) = self.writer.lock().expect("wal writer").take() {
            let _ = h.join();
        }
    }
}

/// Reads WAL records in sequence order as they become durable; what a sink that keeps
/// its own position (PostgreSQL, ClickHouse) reads from. Reads only the committed (fsynced)
/// part of each segment, so it never sees a partial record.
pub struct WalTail {
    shared: Arc<Shared>,
    next_seq: u64,
    /// `next_seq` as the feed sees it (records before it are dropped from the feed).
    position: Arc<AtomicU64>,
    /// Open segment: reader, its first seq, bytes consumed so far (from the file start).
    current: Option<(BufReader<Committed>, u64, u64, PathBuf)>,
    payload: Vec<u8>,
}

impl WalTail {
    /// The sequence number of the next record this reader returns.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reads durable records, up to about `max_bytes` of them; an empty result means the
    /// reader is at the end of what is durable (wait with [`Wal::wait_durable`]).
    /// Blocking: call from a blocking thread.
    pub fn read(&mut self, max_bytes: usize) -> Result<Vec<WalRecord>, WalError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while bytes < max_bytes {
            // Recent records come from memory when the feed still holds them.
            let fed = {
                let mut feed = self.shared.feed.lock().expect("wal feed");
                self.position.store(self.next_seq, Ordering::Release);
                feed.trim();
                feed.take_from(self.next_seq, max_bytes - bytes)
            };
            if let Some((fed, fed_bytes)) = fed {
                let Some(last) = fed.last() else {
                    // At the end of what is durable.
                    break;
                };
                self.next_seq = last.seq + 1;
                self.shared
                    .metrics
                    .tail_records
                    .with_label_values(&["memory"])
                    .inc_by(fed.len() as u64);
                // The file reader is behind now; reopened (and skipped forward) if the
                // feed ever loses the thread.
                self.current = None;
                bytes += fed_bytes;
                out.extend(fed);
                continue;
            }
            // Where the current segment ends now, and whether a later segment exists.
            let (limit, has_next, next_first) = {
                let segs = self.shared.segments.lock().expect("wal segments");
                if self.current.is_none() {
                    let first = segs.front().map_or(u64::MAX, |s| s.first_seq);
                    if self.next_seq < first && first != u64::MAX {
                        return Err(WalError::Released {
                            seq: self.next_seq,
                            oldest: first,
                        });
                    }
                    // The segment holding next_seq: the last one starting at or before it.
                    let Some(seg) = segs.iter().rev().find(|s| s.first_seq <= self.next_seq) else {
                        return Ok(out);
                    };
                    let file = File::open(&seg.path).map_err(io_err(&seg.path))?;
                    let r = BufReader::with_capacity(
                        1 << 20,
                        Committed {
                            file,
                            pos: seg.header_len,
                            limit: seg.size,
                        },
                    );
                    self.current = Some((r, seg.first_seq, seg.header_len, seg.path.clone()));
                }
                let first = self.current.as_ref().unwrap().1;
                let idx = segs.iter().position(|s| s.first_seq == first);
                match idx {
                    Some(i) => (
                        segs[i].size,
                        i + 1 < segs.len(),
                        segs.get(i + 1).map(|s| s.first_seq),
                    ),
                    // Released while we read it: everything in it was taken by every sink.
                    None => (0, true, segs.front().map(|s| s.first_seq)),
                }
            };
            let (reader, _, consumed, path) = self.current.as_mut().unwrap();
            reader.get_mut().limit = limit;
            if *consumed >= limit {
                if has_next {
                    self.current = None;
                    if let Some(n) = next_first {
                        self.next_seq = self.next_seq.max(n);
                    }
                    continue;
                }
                break;
            }
            read_record(reader, &mut self.payload, limit - *consumed).map_err(|reason| {
                WalError::Corrupt {
                    path: path.display().to_string(),
                    offset: *consumed,
                    reason,
                }
            })?;
            *consumed += (RECORD_HEADER + self.payload.len()) as u64;
            let rec = parse_payload(&self.payload).map_err(|reason| WalError::Corrupt {
                path: path.display().to_string(),
                offset: *consumed,
                reason,
            })?;
            if rec.seq < self.next_seq {
                continue;
            }
            self.next_seq = rec.seq + 1;
            bytes += self.payload.len();
            self.shared
                .metrics
                .tail_records
                .with_label_values(&["disk"])
                .inc();
            out.push(rec);
        }
        self.position.store(self.next_seq, Ordering::Release);
        Ok(out)
    }
}

/// A segment read only up to its committed size, so that a reader's buffer never holds
/// bytes past it: direct writes rewrite the zero padding there with the next records.
struct Committed {
    file: File,
    pos: u64,
    limit: u64,
}

impl Read for Committed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.limit.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = std::os::unix::fs::FileExt::read_at(&self.file, &mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

struct Writer {
    opts: WalOptions,
    shared: Arc<Shared>,
    file: SegmentFile,
    seg_index_first: u64,
    next_seq: u64,
    id: [u8; 16],
    /// Set after a failed write: the next group starts a new segment rather than trust
    /// the state of the file that failed (a full disk, an I/O error).
    needs_roll: bool,
}

impl Writer {
    fn start(
        opts: WalOptions,
        shared: Arc<Shared>,
        last_seq: u64,
        id: [u8; 16],
    ) -> Result<Self, WalError> {
        let first = last_seq + 1;
        let file = Self::create_segment(&opts, &shared, first, &id)?;
        Ok(Self {
            opts,
            shared,
            file,
            seg_index_first: first,
            next_seq: first,
            id,
            needs_roll: false,
        })
    }

    fn create_segment(
        opts: &WalOptions,
        shared: &Shared,
        first: u64,
        id: &[u8; 16],
    ) -> Result<SegmentFile, WalError> {
        let path = segment_path(&opts.dir, first);
        let made = (|| {
            let mut file = SegmentFile::create(&path, opts.direct_io)?;
            if opts.direct_io && !file.is_direct() {
                tracing::debug!(path = %path.display(), "the file system refuses O_DIRECT; WAL writes go through the page cache");
            }
            file.append(&scan::header_v2(id, first))?;
            file.flush()?;
            if opts.fsync {
                file.sync()?;
                File::open(&opts.dir)?.sync_all()?;
            }
            Ok(file)
        })();
        let file = match made {
            Ok(f) => f,
            Err(e) => {
                // A half-made segment (a full disk) is no segment.
                let _ = std::fs::remove_file(&path);
                return Err(io_err(&path)(e));
            }
        };
        // Which segment is being written, for a start to notice if it goes missing.
        scan::write_atomic(
            &opts.dir,
            scan::WRITING_FILE,
            first.to_string().as_bytes(),
            opts.fsync,
        )?;
        let mut segs = shared.segments.lock().expect("wal segments");
        segs.push_back(Segment {
            path,
            first_seq: first,
            last_seq: first - 1,
            size: HEADER_V2 as u64,
            header_len: HEADER_V2 as u64,
            versions: Default::default(),
        });
        shared.publish_sizes(&segs);
        Ok(file)
    }

    /// Closes the open segment at its committed size and starts a new one at `seq`.
    fn roll(&mut self, seq: u64) -> Result<(), WalError> {
        let path = segment_path(&self.opts.dir, self.seg_index_first);
        let (open, committed) = {
            let segs = self.shared.segments.lock().expect("wal segments");
            match segs.back() {
                // After a failed roll the open file is no longer in the list.
                Some(s) if s.first_seq == self.seg_index_first => (true, s.size),
                _ => (false, 0),
            }
        };
        if open && committed <= HEADER_V2 as u64 {
            // Nothing in it (a failed first write): it is made again.
            self.shared
                .segments
                .lock()
                .expect("wal segments")
                .pop_back();
        } else if open {
            self.file.finish(committed).map_err(io_err(&path))?;
        }
        self.file = Self::create_segment(&self.opts, &self.shared, seq, &self.id)?;
        self.seg_index_first = seq;
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<WalEntry>) {
        let mut group: Vec<WalEntry> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.payload_len() as u64;
            group.push(first);
            while bytes < self.opts.max_group_bytes {
                match rx.try_recv() {
                    Ok(e) => {
                        bytes += e.payload_len() as u64;
                        group.push(e);
                    }
                    Err(_) => break,
                }
            }
            let result = self.write_group(&mut group, &mut buf);
            let (first_seq, durable, failure) = match result {
                Ok(first) => {
                    *self.shared.write_error.lock().expect("wal error") = None;
                    (first, group.len(), None)
                }
                Err((err, committed)) => {
                    if !self.needs_roll {
                        self.cut_back();
                    }
                    self.needs_roll = true;
                    *self.shared.write_error.lock().expect("wal error") =
                        Some((err.to_string(), err.is_disk_full()));
                    (self.next_seq - committed as u64, committed, Some(err))
                }
            };
            if durable > 0 {
                let mut feed = self.shared.feed.lock().expect("wal feed");
                for (i, e) in group[..durable].iter().enumerate() {
                    let seq = first_seq + i as u64;
                    feed.push(seq, &e.table, e.version, e.batch.as_ref());
                }
            }
            let subscribers = self
                .shared
                .subscribers
                .lock()
                .expect("wal subscribers")
                .clone();
            for (i, e) in group.drain(..durable).enumerate() {
                let seq = first_seq + i as u64;
                let reply = e.reply;
                let mut record = Durable {
                    seq,
                    table: e.table,
                    version: e.version,
                    batch: e.batch,
                    ticket: e.ticket,
                };
                for s in &subscribers {
                    s.durable(&mut record);
                }
                self.shared.last_seq.store(seq, Ordering::Release);
                let _ = reply.send(Ok(seq));
            }
            self.shared
                .metrics
                .last_seq
                .set(self.shared.last_seq.load(Ordering::Acquire) as i64);
            self.shared.durable.notify_waiters();
            if let Some(err) = failure {
                tracing::error!(error = %err, "WAL write failed; failing the group");
                let msg = err.to_string();
                let kind = match &err {
                    WalError::Io { source, .. } => source.raw_os_error(),
                    _ => None,
                };
                for e in group.drain(..) {
                    let source = match kind {
                        Some(code) => std::io::Error::from_raw_os_error(code),
                        None => std::io::Error::other(msg.clone()),
                    };
                    let _ = e.reply.send(Err(WalError::Io {
                        path: self.opts.dir.display().to_string(),
                        source,
                    }));
                }
            }
        }
        // Every group was flushed and synced; only the direct writes' padding is left.
        if self.needs_roll {
            // The open file failed a write and was cut back (or is gone): nothing to trim.
        } else if let Err(e) = self.file.finish(self.committed_size()) {
            tracing::warn!(error = %e, "cannot trim the last WAL segment; the next start will");
        }
        self.shared.durable.notify_waiters();
    }

    /// Writes a group and fsyncs it; returns the first sequence number used. On failure,
    /// also says how many entries of the group a segment roll had already made durable.
    fn write_group(
        &mut self,
        group: &mut [WalEntry],
        buf: &mut Vec<u8>,
    ) -> Result<u64, (WalError, usize)> {
        let first_seq = self.next_seq;
        let mut committed = 0usize;
        macro_rules! w {
            ($e:expr) => {
                $e.map_err(|e| (e, committed))?
            };
        }
        if self.needs_roll {
            w!(self.roll(first_seq));
            self.needs_roll = false;
        }
        let path = segment_path(&self.opts.dir, self.seg_index_first);
        let mut written = 0u64;
        let mut seg_bytes = 0u64;
        for (i, e) in group.iter().enumerate() {
            let seq = first_seq + i as u64;
            let cur_size = {
                let segs = self.shared.segments.lock().expect("wal segments");
                segs.back().map_or(0, |s| s.size)
            } + seg_bytes;
            if cur_size >= self.opts.segment_size && cur_size > HEADER_V2 as u64 {
                // Roll: make the old segment durable, then start a new one at `seq`.
                w!(self.file.flush().map_err(io_err(&path)));
                if self.opts.fsync {
                    w!(self.file.sync().map_err(io_err(&path)));
                }
                self.commit_sizes(seg_bytes, seq - 1);
                committed = i;
                self.next_seq = seq;
                seg_bytes = 0;
                w!(self.roll(seq));
            }
            buf.clear();
            let payload_len = e.payload_len();
            buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
            buf.extend_from_slice(&[0u8; 4]);
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(&e.version.to_le_bytes());
            buf.extend_from_slice(&(e.table.len() as u16).to_le_bytes());
            buf.extend_from_slice(e.table.as_bytes());
            buf.extend_from_slice(&(e.ipc_header.len() as u32).to_le_bytes());
            buf.extend_from_slice(&e.ipc_header);
            let mut h = crc32fast::Hasher::new();
            h.update(&buf[RECORD_HEADER..]);
            h.update(&e.ipc_body);
            let crc = h.finalize();
            buf[4..8].copy_from_slice(&crc.to_le_bytes());
            let cur_path = segment_path(&self.opts.dir, self.seg_index_first);
            w!(self.file.append(buf).map_err(io_err(&cur_path)));
            w!(self.file.append(&e.ipc_body).map_err(io_err(&cur_path)));
            // Noted before the write is durable: a version kept a little longer than
            // needed costs nothing, one dropped too early would.
            self.note_version(&e.table, e.version);
            let n = (RECORD_HEADER + payload_len) as u64;
            seg_bytes += n;
            written += n;
        }
        let cur_path = segment_path(&self.opts.dir, self.seg_index_first);
        w!(self.file.flush().map_err(io_err(&cur_path)));
        if self.opts.fsync {
            w!(self.file.sync().map_err(io_err(&cur_path)));
        }
        let last = first_seq + group.len() as u64 - 1;
        self.commit_sizes(seg_bytes, last);
        self.next_seq = last + 1;
        self.shared.metrics.written_bytes.inc_by(written);
        self.shared.metrics.fsyncs.inc();
        Ok(first_seq)
    }

    /// After a failed write: cuts the current segment back to what was committed, so
    /// the next group does not follow a partial record.
    fn cut_back(&mut self) {
        let path = segment_path(&self.opts.dir, self.seg_index_first);
        if let Err(e) = self.file.reset_to(self.committed_size()) {
            tracing::error!(path = %path.display(), error = %e, "cannot cut the WAL segment back after a failed write");
        }
    }

    /// Bytes of the open segment that groups have committed.
    fn committed_size(&self) -> u64 {
        let segs = self.shared.segments.lock().expect("wal segments");
        segs.back().map_or(HEADER_V2 as u64, |s| s.size)
    }

    fn note_version(&self, table: &Arc<str>, version: u64) {
        let mut segs = self.shared.segments.lock().expect("wal segments");
        if let Some(s) = segs.back_mut() {
            s.versions
                .entry(table.clone())
                .and_modify(|v| *v = (*v).min(version))
                .or_insert(version);
        }
    }

    fn commit_sizes(&self, added: u64, last_seq: u64) {
        let mut segs = self.shared.segments.lock().expect("wal segments");
        if let Some(s) = segs.back_mut() {
            s.size += added;
            if last_seq >= s.first_seq {
                s.last_seq = last_seq;
            }
        }
        self.shared.publish_sizes(&segs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::io::Write;

    fn schema() -> arrow::datatypes::SchemaRef {
        Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]))
    }

    fn append(wal: &Wal, values: Vec<i64>) -> oneshot::Receiver<Result<u64, WalError>> {
        let batch =
            RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(values))]).unwrap();
        let (h, b) =
            crate::encode_ipc(&batch, Some(arrow::ipc::CompressionType::LZ4_FRAME)).unwrap();
        let (tx, rx) = oneshot::channel();
        wal.append(WalEntry {
            table: Arc::from("t"),
            version: 1,
            ipc_header: h.into(),
            ipc_body: b.into(),
            batch: Some(batch),
            ticket: None,
            reply: tx,
        })
        .unwrap();
        rx
    }

    fn opts(dir: &Path, segment_size: u64) -> WalOptions {
        WalOptions {
            dir: dir.to_path_buf(),
            fsync: true,
            segment_size,
            max_group_bytes: 1 << 20,
            feed_bytes: 0,
            direct_io: true,
        }
    }

    fn replayed(wal: &Wal) -> Vec<(u64, Vec<i64>)> {
        wal.replay()
            .map(|r| {
                let r = r.unwrap();
                let b = r.decode(schema()).unwrap();
                let v = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec();
                (r.seq, v)
            })
            .collect()
    }

    #[test]
    fn appends_replay_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0).unwrap();
        let rxs: Vec<_> = (0..5).map(|i| append(&wal, vec![i, i + 100])).collect();
        let seqs: Vec<u64> = rxs
            .into_iter()
            .map(|rx| rx.blocking_recv().unwrap().unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        wal.close();
        drop(wal);

        // A crash mid-write leaves half a record at the end of the last segment.
        let seg = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
        drop(f);

        let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0).unwrap();
        let got = replayed(&wal);
        assert_eq!(got.len(), 5);
        assert_eq!(got[4], (5, vec![4, 104]));
        // New writes continue after the last durable sequence number, skipping the cut
        // record's number (it might have been an acknowledged record a store holds).
        assert_eq!(append(&wal, vec![7]).blocking_recv().unwrap().unwrap(), 7);
        wal.close();
    }

    #[test]
    fn many_small_batches_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 1 << 30), m.clone(), 0).unwrap();
        let rxs: Vec<_> = (0..500).map(|i| append(&wal, vec![i])).collect();
        let seqs: Vec<u64> = rxs
            .into_iter()
            .map(|rx| rx.blocking_recv().unwrap().unwrap())
            .collect();
        assert_eq!(seqs, (1..=500).collect::<Vec<u64>>());
        let fsyncs = m.fsyncs.get();
        assert!(
            fsyncs < 100,
            "500 queued appends took {fsyncs} group commits"
        );
        wal.close();
    }

    #[test]
    fn segments_roll_and_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        // Tiny segments: every record starts a new one.
        let wal = Wal::open(opts(dir.path(), 16), m.clone(), 0).unwrap();
        for i in 0..4 {
            append(&wal, vec![i]).blocking_recv().unwrap().unwrap();
        }
        assert_eq!(wal.disk_usage().0, 4);
        wal.release_upto(2);
        assert_eq!(wal.disk_usage().0, 2);
        wal.close();
        drop(wal);
        let wal = Wal::open(opts(dir.path(), 16), m, 0).unwrap();
        let got: Vec<u64> = replayed(&wal).into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, vec![3, 4]);
        wal.close();
    }

    #[test]
    fn direct_io_padding_left_by_a_crash_is_trimmed_in_any_segment() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        // Tiny segments: every record rolls to a new one.
        let wal = Wal::open(opts(dir.path(), 16), m.clone(), 0).unwrap();
        for i in 0..3 {
            append(&wal, vec![i]).blocking_recv().unwrap().unwrap();
        }
        let last = wal.last_seq();
        wal.close();
        drop(wal);
        // A crash between a direct write and the trim leaves zeros after the last record:
        // in the last segment and, when it struck during a roll, in an earlier one.
        let pad = |seq: u64, n: usize| {
            let path = segment_path(dir.path(), seq);
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(&vec![0u8; n]).unwrap();
            std::fs::metadata(&path).unwrap().len()
        };
        let padded_first = pad(1, 4095);
        let padded_last = pad(last, 100);
        let wal = Wal::open(opts(dir.path(), 16), m.clone(), 0).unwrap();
        let got = replayed(&wal);
        assert_eq!(
            got,
            vec![(1, vec![0]), (2, vec![1]), (3, vec![2])],
            "every record is read back, none is taken for a torn one"
        );
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 1))
                .unwrap()
                .len(),
            padded_first - 4095
        );
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), last))
                .unwrap()
                .len(),
            padded_last - 100
        );
        assert_eq!(append(&wal, vec![9]).blocking_recv().unwrap().unwrap(), 4);
        wal.close();
        drop(wal);
        // A whole block of zeros is no padding a direct write leaves, but after the last
        // record of a segment that the next one continues, it costs no record: cut off.
        let len1 = std::fs::metadata(segment_path(dir.path(), 1))
            .unwrap()
            .len();
        pad(1, 4096);
        let wal = Wal::open(opts(dir.path(), 16), m, 0).unwrap();
        assert_eq!(replayed(&wal).len(), 4);
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 1))
                .unwrap()
                .len(),
            len1
        );
        wal.close();
    }

    #[test]
    fn many_groups_through_one_segment_read_back_while_written() {
        // Each group ends in a padded block that the next group rewrites; a disk reader
        // in between must never take that padding for records.
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 1 << 30), m, 0).unwrap();
        let mut tail = wal.tail(0);
        let mut seen = Vec::new();
        for i in 0..200i64 {
            append(&wal, vec![i, -i]).blocking_recv().unwrap().unwrap();
            if i % 7 == 0 {
                seen.extend(tail.read(1 << 20).unwrap().iter().map(values));
            }
        }
        seen.extend(tail.read(1 << 20).unwrap().iter().map(values));
        let expect: Vec<Vec<i64>> = (0..200).map(|i| vec![i, -i]).collect();
        assert_eq!(seen, expect);
        wal.close();
    }

    #[test]
    fn corruption_before_the_last_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 16), m.clone(), 0).unwrap();
        for i in 0..3 {
            append(&wal, vec![i]).blocking_recv().unwrap().unwrap();
        }
        wal.close();
        drop(wal);
        let seg = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0xff;
        std::fs::write(&seg, bytes).unwrap();
        let err = Wal::open(opts(dir.path(), 16), m, 0)
            .err()
            .expect("corrupt");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    fn values(r: &WalRecord) -> Vec<i64> {
        let b = r.decode(schema()).unwrap();
        let a = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        a.values().to_vec()
    }

    #[test]
    fn tail_reads_recent_records_from_memory_and_the_rest_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        // Room for about three one-value batches (each counts 8 + 64 bytes).
        let o = WalOptions {
            feed_bytes: 3 * 72,
            ..opts(dir.path(), 1 << 20)
        };
        let wal = Wal::open(o.clone(), m.clone(), 0).unwrap();
        // Without a reader the feed keeps nothing.
        append(&wal, vec![0]).blocking_recv().unwrap().unwrap();
        assert!(wal.shared.feed.lock().unwrap().records.is_empty());
        let mut tail = wal.tail(1);
        for i in 1..=6 {
            append(&wal, vec![i]).blocking_recv().unwrap().unwrap();
        }
        // 1..=3 were pushed out of the feed, so they come from disk, 4..=6 from memory;
        // all in order, none twice.
        let got = tail.read(1 << 20).unwrap();
        let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5, 6, 7]);
        let from_memory: Vec<bool> = got.iter().map(|r| r.batch.is_some()).collect();
        assert_eq!(from_memory, vec![false, false, false, true, true, true]);
        assert_eq!(
            got.iter().map(values).collect::<Vec<_>>(),
            (1..=6).map(|i| vec![i]).collect::<Vec<_>>()
        );
        // What the reader took is dropped from the feed.
        assert!(wal.shared.feed.lock().unwrap().records.is_empty());
        // At the end: nothing, and new records come from memory.
        assert!(tail.read(1 << 20).unwrap().is_empty());
        append(&wal, vec![7]).blocking_recv().unwrap().unwrap();
        let got = tail.read(1 << 20).unwrap();
        assert_eq!((got[0].seq, got[0].batch.is_some()), (8, true));
        // A reader that fell behind the feed goes back to disk and catches up.
        for i in 8..=12 {
            append(&wal, vec![i]).blocking_recv().unwrap().unwrap();
        }
        let got = tail.read(1 << 20).unwrap();
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![9, 10, 11, 12, 13]
        );
        assert_eq!(got.iter().filter(|r| r.batch.is_none()).count(), 2);
        drop(tail);
        wal.close();
        drop(wal);

        // After a restart the feed is empty: old records from disk, new ones from memory.
        let wal = Wal::open(o, m, 0).unwrap();
        let mut tail = wal.tail(10);
        append(&wal, vec![13]).blocking_recv().unwrap().unwrap();
        let got = tail.read(1 << 20).unwrap();
        assert_eq!(
            got.iter()
                .map(|r| (r.seq, r.batch.is_some()))
                .collect::<Vec<_>>(),
            vec![(11, false), (12, false), (13, false), (14, true)]
        );
        wal.close();
    }

    /// Appends `n` one-value batches (values = their index) and returns their seqs.
    fn fill(wal: &Wal, from: i64, n: i64) -> Vec<u64> {
        (from..from + n)
            .map(|i| append(wal, vec![i]).blocking_recv().unwrap().unwrap())
            .collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "wal"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn restarts_without_writes_keep_the_open_segment_and_the_numbers() {
        // Regression (issue 10): after the archive caught up, two restarts with no
        // writes between them left the writer appending to a deleted file, and the
        // numbers started again at 1.
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0).unwrap();
        wal.register_sink("archive", 0);
        assert_eq!(fill(&wal, 0, 3), vec![1, 2, 3]);
        wal.set_sink_position("archive", 3);
        wal.close();
        drop(wal);
        for _ in 0..3 {
            let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 3).unwrap();
            wal.register_sink("archive", 3);
            wal.set_sink_position("archive", 3);
            assert!(replayed(&wal).is_empty());
            wal.close();
        }
        let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 3).unwrap();
        assert_eq!(fill(&wal, 10, 2), vec![4, 5]);
        // The file being written is on disk, under the name it is written as.
        let files = segment_files(dir.path());
        assert_eq!(files, vec![segment_path(dir.path(), 4)]);
        assert!(std::fs::metadata(&files[0]).unwrap().len() > HEADER_V2 as u64);
        drop(wal); // no close: as after kill -9
        let wal = Wal::open(opts(dir.path(), 1 << 20), m, 0).unwrap();
        assert_eq!(replayed(&wal), vec![(4, vec![10]), (5, vec![11])]);
        wal.close();
    }

    #[test]
    fn numbers_start_above_the_floor() {
        // A WAL directory removed while the archive kept its position: new records must
        // not be numbered at or below what the archive holds.
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 1 << 20), m, 41).unwrap();
        assert_eq!(fill(&wal, 0, 1), vec![42]);
        wal.close();
    }

    #[test]
    fn a_flipped_byte_costs_only_its_record_after_repair() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0).unwrap();
        fill(&wal, 0, 10);
        wal.close();
        drop(wal);
        let seg = segment_path(dir.path(), 1);
        let scan = scan::scan_dir(dir.path()).unwrap();
        let fifth = scan.segments[0].records[4];
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[(fifth.offset + fifth.len - 2) as usize] ^= 0x10;
        std::fs::write(&seg, bytes).unwrap();
        // The start refuses, naming the record and the commands.
        let err = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0)
            .err()
            .expect("damage stops the start")
            .to_string();
        assert!(err.contains("records 5 are unreadable"), "{err}");
        assert!(err.contains("sluice wal repair"), "{err}");
        assert!(!err.contains("never acknowledged"), "{err}");
        let report = scan::repair(dir.path(), false, 0).unwrap();
        assert_eq!(
            report
                .lost
                .iter()
                .map(|l| (l.from, l.to))
                .collect::<Vec<_>>(),
            vec![(5, 5)]
        );
        assert_eq!(report.moved.len(), 1);
        let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0).unwrap();
        let got: Vec<u64> = replayed(&wal).into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
        assert_eq!(fill(&wal, 0, 1), vec![11]);
        wal.close();
        drop(wal);
        // What repair accepted stays accepted.
        let wal = Wal::open(opts(dir.path(), 1 << 20), m, 0).unwrap();
        assert_eq!(replayed(&wal).len(), 10);
        wal.close();
    }

    #[test]
    fn a_missing_segment_is_reported_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 16), m.clone(), 0).unwrap();
        fill(&wal, 0, 5);
        wal.close();
        drop(wal);
        std::fs::remove_file(segment_path(dir.path(), 3)).unwrap();
        let err = Wal::open(opts(dir.path(), 16), m.clone(), 0)
            .err()
            .expect("a missing segment stops the start")
            .to_string();
        assert!(err.contains("records 3 are missing"), "{err}");
        scan::repair(dir.path(), false, 0).unwrap();
        let wal = Wal::open(opts(dir.path(), 16), m, 0).unwrap();
        let got: Vec<u64> = replayed(&wal).into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, vec![1, 2, 4, 5]);
        wal.close();
    }

    #[test]
    fn a_missing_first_segment_is_told_from_a_released_one() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 16), m.clone(), 0).unwrap();
        wal.register_sink("archive", 0);
        fill(&wal, 0, 5);
        wal.set_sink_position("archive", 2);
        wal.close();
        drop(wal);
        // Released: fine.
        assert!(scan::scan_dir(dir.path()).unwrap().problems().is_empty());
        // The oldest one left, deleted by hand: records 3 are gone.
        std::fs::remove_file(segment_path(dir.path(), 3)).unwrap();
        let err = Wal::open(opts(dir.path(), 16), m, 0)
            .err()
            .expect("a missing first segment stops the start")
            .to_string();
        assert!(err.contains("records 3 are missing"), "{err}");
    }

    #[test]
    fn a_missing_id_is_restored_from_the_segment_headers() {
        let dir = tempfile::tempdir().unwrap();
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0).unwrap();
        let id = wal.id().to_string();
        fill(&wal, 0, 2);
        wal.close();
        drop(wal);
        std::fs::remove_file(dir.path().join(scan::ID_FILE)).unwrap();
        let wal = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0).unwrap();
        assert_eq!(wal.id(), id);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(scan::ID_FILE)).unwrap(),
            id
        );
        wal.close();
        drop(wal);
        // Every segment gone while the ID stays: reported, not started afresh.
        for f in segment_files(dir.path()) {
            std::fs::remove_file(f).unwrap();
        }
        let err = Wal::open(opts(dir.path(), 1 << 20), m.clone(), 0)
            .err()
            .expect("no segments")
            .to_string();
        assert!(
            err.contains("records 1 and every later one are missing"),
            "{err}"
        );
        // Repair keeps the id (the stores' positions stay valid) and numbers new records
        // above the floor, the highest number a store has seen.
        let report = scan::repair(dir.path(), false, 7).unwrap();
        assert!(report.new_id.is_none());
        assert_eq!(
            report
                .lost
                .iter()
                .map(|l| (l.from, l.to))
                .collect::<Vec<_>>(),
            vec![(1, 7)]
        );
        let wal = Wal::open(opts(dir.path(), 1 << 20), m, 0).unwrap();
        assert_eq!(wal.id(), id);
        assert_eq!(fill(&wal, 0, 1), vec![8]);
        wal.close();
    }

    /// A tmpfs of `size` bytes, unmounted on drop (needs root, as CI runs).
    pub(crate) struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        pub(crate) fn mount(size: u64) -> Tmpfs {
            let dir = tempfile::tempdir().unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .output()
                .expect("mount");
            assert!(
                out.status.success(),
                "this test mounts a small tmpfs to fill it and needs root (CI runs as root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Tmpfs(dir)
        }

        pub(crate) fn path(&self) -> &Path {
            self.0.path()
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_fails_the_group_and_writes_go_on_once_space_is_back() {
        let mnt = Tmpfs::mount(256 * 1024);
        let m = WalMetrics::unregistered();
        let wal = Wal::open(opts(mnt.path(), 1 << 30), m.clone(), 0).unwrap();
        let filler = mnt.path().join("filler");
        // Fill the file system.
        let _ = std::fs::write(&filler, vec![1u8; 256 * 1024]);
        let mut failed = None;
        let mut ok = Vec::new();
        for i in 0..200 {
            let batch = vec![i; 512];
            match append(&wal, batch).blocking_recv().unwrap() {
                Ok(seq) => ok.push(seq),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let err = failed.expect("the full disk fails a write");
        assert!(err.is_disk_full(), "{err}");
        assert!(wal.write_error().is_some_and(|(_, full)| full));
        std::fs::remove_file(&filler).unwrap();
        let seq = append(&wal, vec![7]).blocking_recv().unwrap().unwrap();
        assert_eq!(seq, ok.last().copied().unwrap_or(0) + 1);
        assert!(wal.write_error().is_none());
        wal.close();
        drop(wal);
        let wal = Wal::open(opts(mnt.path(), 1 << 30), m, 0).unwrap();
        let got: Vec<u64> = replayed(&wal).into_iter().map(|(s, _)| s).collect();
        let mut expect = ok.clone();
        expect.push(seq);
        assert_eq!(got, expect, "every acked record, once");
        wal.close();
    }

    mod damage {
        //! The WAL damage generator: random byte flips, truncations, deleted and
        //! duplicated segments and a missing ID, after which every acknowledged record
        //! whose bytes are still intact must be recovered exactly once.
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Hurt {
            Flip { file: usize, at: usize, bit: u8 },
            Truncate { file: usize, keep: usize },
            Delete { file: usize },
            Duplicate { file: usize, as_seq: u64 },
            Garbage { file: usize, bytes: Vec<u8> },
            DeleteId,
        }

        fn hurt() -> impl Strategy<Value = Hurt> {
            prop_oneof![
                4 => (0..8usize, 0..4096usize, 0..8u8)
                    .prop_map(|(file, at, bit)| Hurt::Flip { file, at, bit }),
                2 => (0..8usize, 0..4096usize).prop_map(|(file, keep)| Hurt::Truncate { file, keep }),
                2 => (0..8usize).prop_map(|file| Hurt::Delete { file }),
                1 => (0..8usize, 1..80u64).prop_map(|(file, as_seq)| Hurt::Duplicate { file, as_seq }),
                1 => (0..8usize, proptest::collection::vec(any::<u8>(), 1..200))
                    .prop_map(|(file, bytes)| Hurt::Garbage { file, bytes }),
                1 => Just(Hurt::DeleteId),
            ]
        }

        fn apply(dir: &Path, h: &Hurt) {
            let files = segment_files(dir);
            let pick = |i: usize| files.get(i % files.len().max(1)).cloned();
            match h {
                Hurt::Flip { file, at, bit } => {
                    if let Some(p) = pick(*file) {
                        let mut b = std::fs::read(&p).unwrap();
                        if !b.is_empty() {
                            let n = b.len();
                            b[at % n] ^= 1 << bit;
                            std::fs::write(&p, b).unwrap();
                        }
                    }
                }
                Hurt::Truncate { file, keep } => {
                    if let Some(p) = pick(*file) {
                        let len = std::fs::metadata(&p).unwrap().len() as usize;
                        let f = OpenOptions::new().write(true).open(&p).unwrap();
                        f.set_len((keep % (len + 1)) as u64).unwrap();
                    }
                }
                Hurt::Delete { file } => {
                    if let Some(p) = pick(*file) {
                        std::fs::remove_file(p).unwrap();
                    }
                }
                Hurt::Duplicate { file, as_seq } => {
                    if let Some(p) = pick(*file) {
                        std::fs::copy(p, segment_path(dir, *as_seq)).unwrap();
                    }
                }
                Hurt::Garbage { file, bytes } => {
                    if let Some(p) = pick(*file) {
                        let mut f = OpenOptions::new().append(true).open(p).unwrap();
                        f.write_all(bytes).unwrap();
                    }
                }
                Hurt::DeleteId => {
                    let _ = std::fs::remove_file(dir.join(scan::ID_FILE));
                }
            }
        }

        /// Found by the generator: an empty segment whose torn tail was benign (nothing
        /// after it) stayed as it was, then the repair renamed a later record's copy to
        /// a segment after it, which made the tail cost a record, and the WAL would not
        /// open after its repair.
        #[test]
        fn a_repair_keeps_no_torn_tail_even_a_benign_one() {
            let dir = tempfile::tempdir().unwrap();
            let m = WalMetrics::unregistered();
            let o = WalOptions {
                fsync: false,
                direct_io: false,
                ..opts(dir.path(), 300)
            };
            let wal = Wal::open(o.clone(), m.clone(), 0).unwrap();
            wal.register_sink("archive", 0);
            fill(&wal, 1000, 4);
            wal.set_sink_position("archive", 2);
            wal.close();
            drop(wal);
            // Records 3 and 4 in 3.wal; a copy as 1.wal whose record 3 is then flipped;
            // 3.wal cut to its header and one byte.
            for h in [
                Hurt::Duplicate { file: 0, as_seq: 1 },
                Hurt::Truncate { file: 1, keep: 560 },
                Hurt::Flip {
                    file: 2,
                    at: 1076,
                    bit: 0,
                },
            ] {
                apply(dir.path(), &h);
            }
            let report = scan::repair(dir.path(), false, 0).unwrap();
            assert!(
                report
                    .moved
                    .iter()
                    .any(|p| p.ends_with(format!("{:020}.wal", 3))),
                "the torn 3.wal is kept for inspection: {report:?}"
            );
            assert_eq!(scan::scan_dir(dir.path()).unwrap().problems(), vec![]);
            let wal = Wal::open(o, m, 0).unwrap();
            assert_eq!(replayed(&wal), vec![(4, vec![1003])]);
            wal.close();
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
            #[test]
            fn every_intact_acked_record_is_recovered_exactly_once(
                n in 1..60i64,
                segment_size in prop_oneof![Just(16u64), Just(300), Just(2000), Just(1 << 20)],
                released in 0..40u64,
                hurts in proptest::collection::vec(hurt(), 1..5),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let m = WalMetrics::unregistered();
                let o = WalOptions { fsync: false, direct_io: false, ..opts(dir.path(), segment_size) };
                let wal = Wal::open(o.clone(), m.clone(), 0).unwrap();
                wal.register_sink("archive", 0);
                let seqs = fill(&wal, 1000, n);
                wal.set_sink_position("archive", released.min(n as u64));
                wal.close();
                drop(wal);
                // Each acked record's exact bytes, to tell which are still intact.
                let mut record_bytes = std::collections::BTreeMap::new();
                for seg in scan::scan_dir(dir.path()).unwrap().segments {
                    let b = std::fs::read(&seg.path).unwrap();
                    for r in seg.records {
                        record_bytes.insert(r.seq, b[r.offset as usize..(r.offset + r.len) as usize].to_vec());
                    }
                }
                let id_before = std::fs::read_to_string(dir.path().join(scan::ID_FILE)).unwrap();
                let released_at = std::fs::read_to_string(dir.path().join(scan::RELEASED_FILE))
                    .ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0);
                for h in &hurts {
                    apply(dir.path(), h);
                }
                // Whether the ID file or a segment header still tells the id.
                let id_known = scan::scan_dir(dir.path()).unwrap().id().is_some();
                let contents: Vec<Vec<u8>> = segment_files(dir.path())
                    .iter().map(|p| std::fs::read(p).unwrap()).collect();
                let intact: Vec<u64> = seqs.iter().copied()
                    .filter(|s| *s > released_at)
                    .filter(|s| record_bytes.get(s).is_some_and(|rb|
                        contents.iter().any(|c| c.windows(rb.len()).any(|w| w == rb.as_slice()))))
                    .collect();
                let wal = match Wal::open(o.clone(), m.clone(), 0) {
                    Ok(w) => w,
                    Err(WalError::Damaged(msg)) => {
                        prop_assert!(msg.contains("sluice wal repair"), "{}", msg);
                        if let Err(e) = scan::repair(dir.path(), false, 0) {
                            // The ID file and every header that carried the id are gone:
                            // only the operator can accept a new id.
                            prop_assert!(!id_known, "{}", e);
                            scan::repair(dir.path(), true, 0).unwrap();
                        }
                        Wal::open(o.clone(), m.clone(), 0)
                            .unwrap_or_else(|e| panic!("opens after repair: {e}"))
                    }
                    Err(e) => panic!("{e}"),
                };
                let got = replayed(&wal);
                let got_seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
                let mut dedup = got_seqs.clone();
                dedup.dedup();
                prop_assert_eq!(&dedup, &got_seqs, "a record replayed twice or out of order");
                for s in &intact {
                    prop_assert!(got_seqs.contains(s), "intact record {} lost; got {:?}", s, got_seqs);
                }
                for (s, v) in &got {
                    prop_assert_eq!(v.clone(), vec![1000 + *s as i64 - 1]);
                }
                // Numbers go on above everything seen, or, where the newest records are
                // gone with their segment, under a new id (so no store skips a record).
                let next = fill(&wal, 5000, 1)[0];
                prop_assert!(next > released_at);
                prop_assert!(next > *got_seqs.last().unwrap_or(&0));
                // The newest record's number is taken again only when that record is
                // gone under the same id (a truncated newest segment cannot tell how
                // far it went: the server's floor from the stores covers that case).
                let last_acked = *seqs.last().unwrap();
                let id_after = std::fs::read_to_string(dir.path().join(scan::ID_FILE)).unwrap();
                if id_known {
                    prop_assert_eq!(id_after, id_before, "the WAL keeps its id");
                }
                if intact.contains(&last_acked) {
                    prop_assert!(next > last_acked, "record {} numbered again", next);
                }
                wal.close();
            }
        }
    }
}
