//! Reading a WAL directory back, finding damage, and repairing it.
//!
//! # What flows through it
//! In: the files of `wal/` (segments, `ID`, `RELEASED`, `LOST`). Out: a [`WalScan`]: every
//! intact record's place (sequence number, offset, length) per segment, and every
//! [`Problem`] found, each naming the file, the offset and the sequence numbers it costs.
//! [`crate::Wal::open`] refuses to start on a problem ([`WalScan::problems`]), so that no
//! acknowledged record is skipped without a word; `sluice wal check` prints the same
//! report and `sluice wal repair` ([`repair`]) keeps every intact record, moves damaged
//! bytes to `wal/damaged/`, and writes the sequence numbers that are gone for good to
//! `wal/LOST`, which later starts accept.
//!
//! # What counts as damage
//! - bytes between two intact records that do not form a record (a flipped byte, a
//!   torn block): the records after them are found again by their length and checksum,
//!   so the damage costs only the records it covers;
//! - a record whose sequence number is not the next one (a gap, or a duplicate, e.g. a
//!   segment copied under another name);
//! - a segment file missing between two others, or before the first one (`RELEASED`
//!   says which records every sink had when segments were last deleted);
//! - a missing `ID` (it is restored from the segment headers, which carry it since
//!   format 2), or an `ID` that disagrees with the segments.
//!
//! Not damage: zero padding after the last record of a segment (left by a direct write,
//! [`crate::io`]), and an incomplete record at the very end of the last segment (a
//! write a crash cut off before its fsync, never acknowledged). A complete last record
//! with a bad checksum could be either that or a damaged acknowledged record: its bytes
//! are kept in `wal/damaged/` and the start says so.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::io::is_padding;
use crate::{io_err, RecordDamage, WalError, RECORD_HEADER};

/// Segment header of format 1: the magic only.
pub(super) const MAGIC_V1: &[u8; 8] = b"SLWAL001";
/// Segment header of format 2: magic, WAL id (16 bytes), first seq (u64 LE), 4 zero
/// bytes, crc32 of the 36 bytes before it.
pub(super) const MAGIC_V2: &[u8; 8] = b"SLWAL002";
pub(super) const HEADER_V2: usize = 40;
/// Smallest payload a record can have: seq, version, table length, header length.
pub(super) const MIN_PAYLOAD: usize = 22;

/// Name of the file holding the WAL's identity.
pub const ID_FILE: &str = "ID";
/// Name of the file holding the last sequence number of the deleted segments.
pub const RELEASED_FILE: &str = "RELEASED";
/// Name of the file holding the first sequence number of the segment being written:
/// a start that finds no segment from there on knows the newest one was lost.
pub const WRITING_FILE: &str = "WRITING";
/// Name of the file listing sequence numbers a repair found gone (JSON lines).
pub const LOST_FILE: &str = "LOST";
/// Folder damaged bytes and replaced segments are moved to.
pub const DAMAGED_DIR: &str = "damaged";

/// The header of a format-2 segment.
pub(super) fn header_v2(id: &[u8; 16], first_seq: u64) -> [u8; HEADER_V2] {
    let mut h = [0u8; HEADER_V2];
    h[..8].copy_from_slice(MAGIC_V2);
    h[8..24].copy_from_slice(id);
    h[24..32].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a WAL id written as 32 hex digits (the `ID` file's form).
pub fn parse_id(text: &str) -> Option<[u8; 16]> {
    let t = text.trim();
    if t.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(t.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The `ID` file's form of an id.
pub fn format_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where one intact record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLoc {
    pub seq: u64,
    /// Offset of the record header in the file.
    pub offset: u64,
    /// Header plus payload.
    pub len: u64,
}

/// What follows the last intact record of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Nothing.
    Clean,
    /// Fewer than a block of zeros: a direct write's padding.
    Padding { offset: u64 },
    /// Bytes that are no record. `complete` when they hold a whole record by its length
    /// field whose checksum fails (damage or a torn write, see the module doc); `seq` is
    /// the sequence number that record claims, unverified.
    Torn {
        offset: u64,
        len: u64,
        complete: bool,
        seq: Option<u64>,
        reason: String,
    },
}

/// Unreadable bytes between intact records of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub len: u64,
    pub reason: String,
}

/// One segment file, read back.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    pub path: PathBuf,
    /// The first sequence number its name says it holds.
    pub name_seq: u64,
    /// 8 (format 1) or 40 (format 2); 0 when the header is unreadable.
    pub header_len: u64,
    pub id: Option<[u8; 16]>,
    /// Why the header is unreadable, if it is.
    pub bad_header: Option<String>,
    pub records: Vec<RecordLoc>,
    /// The oldest schema version of each table among its intact records.
    pub versions: std::collections::BTreeMap<String, u64>,
    pub damage: Vec<Damage>,
    pub tail: Tail,
    pub file_len: u64,
}

impl SegmentScan {
    /// Where the intact data ends (the end of the last record, or the header).
    pub fn data_end(&self) -> u64 {
        self.records
            .last()
            .map_or(self.header_len, |r| r.offset + r.len)
    }

    pub fn first_seq(&self) -> Option<u64> {
        self.records.first().map(|r| r.seq)
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.records.last().map(|r| r.seq)
    }

    fn name(&self) -> String {
        self.path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }
}

/// A range of sequence numbers a repair found gone, as `wal/LOST` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LostRange {
    pub from: u64,
    /// Inclusive; `u64::MAX` when the end is unknown (every segment was gone).
    pub to: u64,
    pub reason: String,
    pub repaired_at: String,
}

/// Something that costs acknowledged records, or makes it unclear which are there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A segment whose header cannot be read.
    BadHeader { path: PathBuf, reason: String },
    /// Bytes that are no record, between intact records (or at the end of a segment
    /// that is not the last).
    Damaged {
        path: PathBuf,
        offset: u64,
        len: u64,
        after: Option<u64>,
        before: Option<u64>,
        reason: String,
    },
    /// Sequence numbers no segment holds (`to` = `u64::MAX`: up to an unknown end).
    Missing { from: u64, to: u64, why: String },
    /// Records held twice (a segment copied, or a record written again).
    Duplicate { path: PathBuf, from: u64, to: u64 },
    /// A segment whose records do not start at the number its name says.
    Misnamed { path: PathBuf, first: u64 },
    /// `ID` is missing and no segment header carries it (format 1 segments).
    IdUnrecoverable,
    /// `ID` and the segment headers disagree.
    IdMismatch {
        file: String,
        path: PathBuf,
        segment: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = |from: u64, to: u64| {
            if to == u64::MAX {
                format!("{from} and every later one")
            } else if from == to {
                format!("{from}")
            } else {
                format!("{from}..={to}")
            }
        };
        match self {
            Problem::BadHeader { path, reason } => {
                write!(f, "{}: unreadable segment header ({reason})", path.display())
            }
            Problem::Damaged {
                path,
                offset,
                len,
                after,
                before,
                reason,
            } => {
                write!(
                    f,
                    "{}: {len} damaged bytes at offset {offset} ({reason})",
                    path.display()
                )?;
                match (after, before) {
                    (Some(a), Some(b)) if b > &(a + 1) => {
                        write!(f, ": records {} are unreadable", range(a + 1, b - 1))
                    }
                    (Some(_), Some(_)) => write!(f, ": no record is lost to them"),
                    (Some(a), None) => write!(f, " after record {a}"),
                    (None, Some(b)) => write!(f, " before record {b}"),
                    (None, None) => Ok(()),
                }
            }
            Problem::Missing { from, to, why } => {
                write!(f, "records {} are missing: {why}", range(*from, *to))
            }
            Problem::Duplicate { path, from, to } => write!(
                f,
                "{}: records {} are there twice",
                path.display(),
                range(*from, *to)
            ),
            Problem::Misnamed { path, first } => write!(
                f,
                "{}: its first record is {first}, not the number in its name",
                path.display()
            ),
            Problem::IdUnrecoverable => write!(
                f,
                "the WAL's ID file is missing and no segment header carries the id (written \
                 before format 2, or damaged): \
                 the stores' positions are kept under that id, so a new one would write the \
                 records still in the WAL to PostgreSQL/ClickHouse again; restore wal/ID, or \
                 run `sluice wal repair --new-id` to accept that"
            ),
            Problem::IdMismatch {
                file,
                path,
                segment,
            } => write!(
                f,
                "wal/ID says {file} but {} belongs to WAL {segment}: segments of two WALs are mixed",
                path.display()
            ),
        }
    }
}

/// A WAL directory, read back.
#[derive(Debug, Clone, Default)]
pub struct WalScan {
    pub dir: PathBuf,
    /// Sorted by the number in their names.
    pub segments: Vec<SegmentScan>,
    /// The `ID` file's content, when it is there (and parses).
    pub id_file: Option<[u8; 16]>,
    /// The `ID` file is there but does not hold an id.
    pub id_file_bad: bool,
    pub released: Option<u64>,
    /// The segment being written when the WAL last started or rolled.
    pub writing: Option<u64>,
    pub lost: Vec<LostRange>,
}

/// The WAL's id without reading its records: `ID`, else the first segment header that
/// carries it. `None` for a fresh directory (or one whose id is lost).
pub fn peek_id(dir: &Path) -> Option<String> {
    if let Some(id) = std::fs::read_to_string(dir.join(ID_FILE))
        .ok()
        .and_then(|t| parse_id(&t))
    {
        return Some(format_id(&id));
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    names.sort();
    names.iter().rev().find_map(|p| {
        let mut head = [0u8; HEADER_V2];
        let f = File::open(p).ok()?;
        (read_up_to(&f, &mut head, 0).ok()? == HEADER_V2
            && &head[..8] == MAGIC_V2
            && crc32fast::hash(&head[..36]) == u32::from_le_bytes(head[36..40].try_into().ok()?))
        .then(|| format_id(&head[8..24].try_into().expect("16 bytes")))
    })
}

/// Reads `wal/` without changing anything.
pub fn scan_dir(dir: &Path) -> Result<WalScan, WalError> {
    let mut scan = WalScan {
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    match std::fs::read_to_string(dir.join(ID_FILE)) {
        Ok(text) => {
            scan.id_file = parse_id(&text);
            scan.id_file_bad = scan.id_file.is_none();
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&dir.join(ID_FILE))(e)),
    }
    match std::fs::read_to_string(dir.join(RELEASED_FILE)) {
        Ok(text) => scan.released = text.trim().parse().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&dir.join(RELEASED_FILE))(e)),
    }
    match std::fs::read_to_string(dir.join(WRITING_FILE)) {
        Ok(text) => scan.writing = text.trim().parse().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&dir.join(WRITING_FILE))(e)),
    }
    match std::fs::read_to_string(dir.join(LOST_FILE)) {
        Ok(text) => {
            scan.lost = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&dir.join(LOST_FILE))(e)),
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(num) = name.strip_suffix(".wal") {
            if num.len() == 20 {
                if let Ok(seq) = num.parse::<u64>() {
                    names.push((seq, entry.path()));
                }
            }
        }
    }
    names.sort();
    for (seq, path) in names {
        scan.segments.push(scan_segment(&path, seq)?);
    }
    Ok(scan)
}

/// Reads one record from `r` into `payload`, checking its length and CRC. `available`:
/// the bytes left where the record starts, so a damaged length field is caught before
/// anything is allocated for it.
pub(super) fn read_record(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
    available: u64,
) -> Result<(), RecordDamage> {
    let mut head = [0u8; RECORD_HEADER];
    if available < RECORD_HEADER as u64 {
        return Err(RecordDamage::TruncatedHeader);
    }
    r.read_exact(&mut head)
        .map_err(|_| RecordDamage::TruncatedHeader)?;
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if len < MIN_PAYLOAD {
        return Err(RecordDamage::TooShort(len));
    }
    if (RECORD_HEADER + len) as u64 > available {
        return Err(RecordDamage::Truncated(len));
    }
    payload.resize(len, 0);
    r.read_exact(payload)
        .map_err(|_| RecordDamage::Truncated(len))?;
    if crc32fast::hash(payload) != crc {
        return Err(RecordDamage::Checksum);
    }
    Ok(())
}

/// The record at the start of `buf`, if one is there whole with a good checksum:
/// `(seq, header + payload length)`.
fn record_in(buf: &[u8]) -> Option<(u64, usize)> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    if len < MIN_PAYLOAD {
        return None;
    }
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    let payload = buf.get(RECORD_HEADER..RECORD_HEADER + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(payload[0..8].try_into().ok()?);
    Some((seq, RECORD_HEADER + len))
}

/// Scans one segment: every intact record, and what is not one.
fn scan_segment(path: &Path, name_seq: u64) -> Result<SegmentScan, WalError> {
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut seg = SegmentScan {
        path: path.to_path_buf(),
        name_seq,
        header_len: 0,
        id: None,
        bad_header: None,
        records: Vec::new(),
        versions: Default::default(),
        damage: Vec::new(),
        tail: Tail::Clean,
        file_len,
    };
    let mut head = [0u8; HEADER_V2];
    let got = read_up_to(&file, &mut head, 0).map_err(io_err(path))?;
    if got >= 8 && &head[..8] == MAGIC_V1 {
        seg.header_len = 8;
    } else if got >= 8 && &head[..8] == MAGIC_V2 {
        if got < HEADER_V2 {
            // The file ends inside its header: made, and cut off (a crash, a full disk)
            // before any record. Empty.
            seg.tail = Tail::Padding { offset: 0 };
            return Ok(seg);
        } else if crc32fast::hash(&head[..36])
            != u32::from_le_bytes(head[36..40].try_into().expect("4 bytes"))
        {
            seg.bad_header = Some("header checksum mismatch".into());
        } else {
            let first = u64::from_le_bytes(head[24..32].try_into().expect("8 bytes"));
            if first != name_seq {
                seg.bad_header = Some(format!(
                    "the header says it starts at record {first}, its name at {name_seq}"
                ));
            }
            seg.id = Some(head[8..24].try_into().expect("16 bytes"));
            seg.header_len = HEADER_V2 as u64;
        }
    } else if got == 0 || head[..got].iter().all(|&b| b == 0) {
        // Created, but its header never reached the disk (a crash right after the
        // file was made): empty.
        seg.bad_header = (file_len >= crate::io::BLOCK as u64)
            .then(|| format!("{file_len} zero bytes instead of a header"));
        if seg.bad_header.is_none() {
            seg.tail = if file_len > 0 {
                Tail::Padding { offset: 0 }
            } else {
                Tail::Clean
            };
            return Ok(seg);
        }
    } else {
        seg.bad_header = Some("not a WAL segment header".into());
    }
    if seg.bad_header.is_some() {
        // Look for records anyway: a damaged header costs no record.
        seg.header_len = 0;
        scan_in_memory(&file, &mut seg, 0, None)?;
        return Ok(seg);
    }
    // The common case: records one after another to the end.
    let mut reader = BufReader::with_capacity(1 << 20, &file);
    std::io::copy(
        &mut (&mut reader).take(seg.header_len),
        &mut std::io::sink(),
    )
    .map_err(io_err(path))?;
    let mut offset = seg.header_len;
    let mut payload = Vec::new();
    while offset < file_len {
        match read_record(&mut reader, &mut payload, file_len - offset) {
            Ok(()) => {
                let seq = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
                let len = (RECORD_HEADER + payload.len()) as u64;
                seg.records.push(RecordLoc { seq, offset, len });
                note_version(&mut seg.versions, &payload);
                offset += len;
            }
            Err(reason) => {
                drop(reader);
                scan_in_memory(&file, &mut seg, offset, Some(reason.to_string()))?;
                return Ok(seg);
            }
        }
    }
    Ok(seg)
}

/// Keeps the oldest schema version of the payload's table in `versions`.
fn note_version(versions: &mut std::collections::BTreeMap<String, u64>, payload: &[u8]) {
    let Some(version) = payload
        .get(8..16)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    else {
        return;
    };
    let tlen = payload
        .get(16..18)
        .map_or(0, |b| u16::from_le_bytes(b.try_into().unwrap()) as usize);
    if let Some(table) = payload
        .get(18..18 + tlen)
        .and_then(|t| std::str::from_utf8(t).ok())
    {
        versions
            .entry(table.to_string())
            .and_modify(|v| *v = (*v).min(version))
            .or_insert(version);
    }
}

/// Reads as many bytes as there are, up to `buf.len()`, from `at`.
fn read_up_to(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Scans from `from` to the end with the rest of the file in memory: after bytes that
/// are no record, looks for the next intact record by its length and checksum.
fn scan_in_memory(
    file: &File,
    seg: &mut SegmentScan,
    from: u64,
    first_reason: Option<String>,
) -> Result<(), WalError> {
    let mut rest = vec![0u8; (seg.file_len - from) as usize];
    let got = read_up_to(file, &mut rest, from).map_err(io_err(&seg.path))?;
    rest.truncate(got);
    let mut pos = 0usize;
    let mut reason = first_reason;
    while pos < rest.len() {
        if let Some((seq, len)) = record_in(&rest[pos..]) {
            seg.records.push(RecordLoc {
                seq,
                offset: from + pos as u64,
                len: len as u64,
            });
            note_version(&mut seg.versions, &rest[pos + RECORD_HEADER..pos + len]);
            pos += len;
            reason = None;
            continue;
        }
        // Not a record here. Zeros to the end, short of a block: padding.
        let tail = &rest[pos..];
        if from + pos as u64 >= seg.header_len.max(8) && is_padding(tail) {
            seg.tail = Tail::Padding {
                offset: from + pos as u64,
            };
            return Ok(());
        }
        let why = reason.take().unwrap_or_else(|| why_not_record(tail));
        // The next place an intact record starts whose number follows the last one.
        let last = seg.records.last().map(|r| r.seq);
        let next = (pos + 1..rest.len())
            .find(|&p| record_in(&rest[p..]).is_some_and(|(seq, _)| last.is_none_or(|l| seq > l)));
        match next {
            Some(p) => {
                seg.damage.push(Damage {
                    offset: from + pos as u64,
                    len: (p - pos) as u64,
                    reason: why,
                });
                pos = p;
            }
            None => {
                let claimed =
                    u32::from_le_bytes(tail.get(0..4).map_or([0; 4], |b| b.try_into().unwrap()))
                        as usize;
                let complete = tail.len() >= RECORD_HEADER + claimed && claimed >= MIN_PAYLOAD;
                let seq = tail
                    .get(RECORD_HEADER..RECORD_HEADER + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
                seg.tail = Tail::Torn {
                    offset: from + pos as u64,
                    len: tail.len() as u64,
                    complete,
                    seq,
                    reason: why,
                };
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Why the bytes at the start of `tail` are not a record.
fn why_not_record(tail: &[u8]) -> String {
    let mut payload = Vec::new();
    match read_record(&mut &tail[..], &mut payload, tail.len() as u64) {
        Err(reason) => reason.to_string(),
        Ok(()) => "not a record".into(),
    }
}

impl WalScan {
    /// Whether the WAL holds nothing at all yet (a fresh directory).
    pub fn is_fresh(&self) -> bool {
        self.segments.is_empty() && self.id_file.is_none() && !self.id_file_bad
    }

    /// The WAL's id: the `ID` file's, else the segment headers'.
    pub fn id(&self) -> Option<[u8; 16]> {
        self.id_file
            .or_else(|| self.segments.iter().rev().find_map(|s| s.id))
    }

    /// The highest sequence number any intact record has.
    pub fn last_record_seq(&self) -> Option<u64> {
        self.segments.iter().filter_map(|s| s.last_seq()).max()
    }

    /// The first sequence number of the segment being written, when no segment from
    /// there on exists and a repair has not accepted that.
    pub fn newest_missing(&self) -> Option<u64> {
        let w = self.writing?;
        let present = self.segments.iter().any(|s| s.name_seq >= w);
        (!present && !self.segments.is_empty() && !self.accepted(w, u64::MAX)).then_some(w)
    }

    /// Whether segment `i`'s torn tail costs no record: no later segment holds a record
    /// (it is the end of the data: a write a crash cut off), or the next record is the one
    /// after its last (a failed write, then a new segment).
    pub fn torn_tail_is_benign(&self, i: usize) -> bool {
        let seg = &self.segments[i];
        match self.segments[i + 1..].iter().find_map(|s| s.first_seq()) {
            None => true,
            Some(next) => seg
                .last_seq()
                .map_or(next == seg.name_seq, |l| next == l + 1),
        }
    }

    /// Whether `from..=to` is listed in `LOST` (a repair accepted it).
    fn accepted(&self, from: u64, to: u64) -> bool {
        let mut at = from;
        loop {
            match self.lost.iter().find(|l| l.from <= at && at <= l.to) {
                Some(l) if l.to >= to => return true,
                Some(l) => at = l.to + 1,
                None => return false,
            }
        }
    }

    /// Everything that costs or hides acknowledged records, leaving out the gaps a repair
    /// accepted. Empty: the WAL can be opened.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        // The last record seen so far, in name order.
        let mut prev: Option<u64> = None;
        let mut prev_why = match self.released {
            Some(r) => {
                format!("the segments up to record {r} were deleted once every sink had them")
            }
            None => "before the first segment".to_string(),
        };
        for (i, seg) in self.segments.iter().enumerate() {
            if let Some(reason) = &seg.bad_header {
                out.push(Problem::BadHeader {
                    path: seg.path.clone(),
                    reason: reason.clone(),
                });
            }
            if let (Some(file), Some(id)) = (self.id_file, seg.id) {
                if file != id {
                    out.push(Problem::IdMismatch {
                        file: format_id(&file),
                        path: seg.path.clone(),
                        segment: format_id(&id),
                    });
                }
            }
            if let Some(first) = seg.first_seq() {
                if first != seg.name_seq {
                    out.push(Problem::Misnamed {
                        path: seg.path.clone(),
                        first,
                    });
                }
            }
            for d in &seg.damage {
                let after = seg
                    .records
                    .iter()
                    .take_while(|r| r.offset < d.offset)
                    .last()
                    .map(|r| r.seq);
                let before = seg
                    .records
                    .iter()
                    .find(|r| r.offset > d.offset)
                    .map(|r| r.seq);
                out.push(Problem::Damaged {
                    path: seg.path.clone(),
                    offset: d.offset,
                    len: d.len,
                    after,
                    before,
                    reason: d.reason.clone(),
                });
            }
            if let Tail::Torn {
                offset,
                len,
                reason,
                ..
            } = &seg.tail
            {
                if !self.torn_tail_is_benign(i) {
                    out.push(Problem::Damaged {
                        path: seg.path.clone(),
                        offset: *offset,
                        len: *len,
                        after: seg.last_seq(),
                        before: None,
                        reason: reason.clone(),
                    });
                }
            }
            // Order of records: each the one after the last; the first one right after
            // what was released.
            let mut dup: Option<(u64, u64)> = None;
            for r in &seg.records {
                let expected = match prev {
                    Some(p) if r.seq <= p => {
                        dup = Some(dup.map_or((r.seq, r.seq), |(a, _)| (a, r.seq)));
                        continue;
                    }
                    Some(p) => p + 1,
                    None => self.released.map_or(r.seq, |rel| (rel + 1).min(r.seq)),
                };
                if r.seq > expected && !self.accepted(expected, r.seq - 1) {
                    out.push(Problem::Missing {
                        from: expected,
                        to: r.seq - 1,
                        why: if r.offset == seg.header_len {
                            format!(
                                "no segment holds them ({prev_why}; {} starts at {})",
                                seg.name(),
                                r.seq
                            )
                        } else {
                            format!("{} skips them", seg.name())
                        },
                    });
                }
                prev = Some(r.seq);
            }
            if let Some((from, to)) = dup {
                out.push(Problem::Duplicate {
                    path: seg.path.clone(),
                    from,
                    to,
                });
            }
            if let Some(l) = seg.last_seq() {
                prev_why = format!("{} ends at {l}", seg.name());
            }
        }
        if let Some(w) = self.newest_missing() {
            out.push(Problem::Missing {
                from: w,
                to: u64::MAX,
                why: format!(
                    "the segment being written, {w:020}.wal, is gone (deleted or lost with \
                     its records)"
                ),
            });
        }
        if self.segments.is_empty() && (self.id_file.is_some() || self.id_file_bad) {
            let from = self.released.map_or(1, |r| r + 1);
            if !self.accepted(from, u64::MAX) {
                out.push(Problem::Missing {
                    from,
                    to: u64::MAX,
                    why: "wal/ID is there but no segment file is: the segments were deleted".into(),
                });
            }
        }
        let any_v2 = self.segments.iter().any(|s| s.id.is_some());
        if self.id_file.is_none() && !self.segments.is_empty() && !any_v2 {
            out.push(Problem::IdUnrecoverable);
        }
        out
    }
}

/// Writes `contents` to `dir/name` through a temporary file and a rename, fsynced
/// unless `sync` is off (`wal.fsync = false`).
pub(super) fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &[u8],
    sync: bool,
) -> Result<(), WalError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, contents)
        .and_then(|_| {
            if sync {
                File::open(&tmp)?.sync_all()
            } else {
                Ok(())
            }
        })
        .and_then(|_| std::fs::rename(&tmp, &path))
        .and_then(|_| {
            if sync {
                File::open(dir)?.sync_all()
            } else {
                Ok(())
            }
        })
        .map_err(io_err(&path))
}

/// What [`repair`] did.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// The problems found before repairing.
    pub problems: Vec<Problem>,
    /// Files moved to `wal/damaged/`.
    pub moved: Vec<PathBuf>,
    /// Segments written anew (only their intact records, once each).
    pub rewritten: Vec<PathBuf>,
    /// Sequence numbers now recorded as lost.
    pub lost: Vec<LostRange>,
    /// Set when the WAL got a new id.
    pub new_id: Option<String>,
}

impl std::fmt::Display for RepairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.problems.is_empty() && self.moved.is_empty() {
            return writeln!(f, "the WAL is intact; nothing to repair");
        }
        for p in &self.problems {
            writeln!(f, "found: {p}")?;
        }
        for p in &self.rewritten {
            writeln!(f, "rewrote {} with its intact records", p.display())?;
        }
        for p in &self.moved {
            writeln!(f, "moved {} (kept for inspection)", p.display())?;
        }
        for l in &self.lost {
            if l.to == u64::MAX {
                writeln!(f, "lost: records {} and later ({})", l.from, l.reason)?;
            } else {
                writeln!(f, "lost: records {}..={} ({})", l.from, l.to, l.reason)?;
            }
        }
        if let Some(id) = &self.new_id {
            writeln!(f, "the WAL has a new id: {id}")?;
        }
        Ok(())
    }
}

/// Repairs `dir` so that it opens: keeps every intact record once, in sequence order
/// (segments that need no change stay as they are; the others are written anew with only
/// their intact records), moves what it replaces to `wal/damaged/<unix time>/`, restores
/// `ID` from the segment headers, and records in `LOST` the sequence numbers no intact
/// record holds. The WAL keeps its id, so the stores' positions stay valid and nothing is
/// written to them twice; `new_id` allows a new id where the old one cannot be recovered
/// (format-1 segments without `ID`). `floor` is the highest sequence number a store or
/// the archive has recorded for this WAL: where the newest records are gone, new records
/// are numbered above it, so that no store takes a new record for one it has. An
/// incomplete record at the end of the last segment is left to the next start, which
/// cuts it off.
pub fn repair(dir: &Path, new_id: bool, floor: u64) -> Result<RepairReport, WalError> {
    let scan = scan_dir(dir)?;
    let problems = scan.problems();
    let mut report = RepairReport {
        problems: problems.clone(),
        ..Default::default()
    };
    if problems.is_empty() {
        return Ok(report);
    }
    if let Some(p) = problems
        .iter()
        .find(|p| matches!(p, Problem::IdMismatch { .. }))
    {
        return Err(WalError::Damaged(format!(
            "{p}; move the segments that do not belong to this WAL out of {} by hand",
            dir.display()
        )));
    }
    let id = match scan.id() {
        Some(id) => id,
        None if new_id
            || scan
                .segments
                .iter()
                .all(|s| s.id.is_none() && s.records.is_empty()) =>
        {
            let id = *uuid::Uuid::new_v4().as_bytes();
            report.new_id = Some(format_id(&id));
            id
        }
        None => return Err(WalError::Damaged(Problem::IdUnrecoverable.to_string())),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let damaged = dir.join(DAMAGED_DIR).join(stamp.to_string());
    let now = chrono::Utc::now().to_rfc3339();

    // Every intact record once: its first copy in name order.
    let mut chosen: std::collections::BTreeMap<u64, (usize, RecordLoc)> = Default::default();
    for (i, seg) in scan.segments.iter().enumerate() {
        for r in &seg.records {
            chosen.entry(r.seq).or_insert((i, *r));
        }
    }
    // Runs of consecutive chosen records from one segment become the new segments.
    let mut runs: Vec<(usize, Vec<RecordLoc>)> = Vec::new();
    for (_, (i, r)) in chosen.iter() {
        match runs.last_mut() {
            Some((j, run)) if *j == *i && run.last().is_some_and(|l| l.offset < r.offset) => {
                run.push(*r)
            }
            _ => runs.push((*i, vec![*r])),
        }
    }
    // A torn tail is benign or not by what follows its segment, and the repair changes
    // that (a record moved in after it): no segment keeps one, benign or not. The
    // original goes to the damaged folder, the records before its tail are written again.
    let torn = |i: usize| matches!(scan.segments[i].tail, Tail::Torn { .. });
    let unchanged = |i: usize, run: &[RecordLoc]| {
        let seg = &scan.segments[i];
        seg.bad_header.is_none()
            && seg.damage.is_empty()
            && !torn(i)
            && seg.records.as_slice() == run
            && seg.name_seq == run[0].seq
    };
    let staging = dir.join("repair.tmp");
    if staging.exists() {
        // Left by a repair that did not finish: its originals are still here.
        std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    // Empty segments with a sound header stay (the writer's new one, for instance).
    let mut kept: Vec<bool> = scan
        .segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.records.is_empty() && s.bad_header.is_none() && s.damage.is_empty() && !torn(i)
        })
        .collect();
    let mut staged = Vec::new();
    let mut names_after: Vec<u64> = Vec::new();
    for (i, run) in &runs {
        names_after.push(run[0].seq);
        if unchanged(*i, run) {
            kept[*i] = true;
            continue;
        }
        // Written to the staging folder first: the new segment may take the name of one
        // that is moved away below.
        std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let path = crate::segment_path(&staging, run[0].seq);
        let src_path = &scan.segments[*i].path;
        let src = File::open(src_path).map_err(io_err(src_path))?;
        let mut out = File::create(&path).map_err(io_err(&path))?;
        out.write_all(&header_v2(&id, run[0].seq))
            .map_err(io_err(&path))?;
        let mut buf = Vec::new();
        for r in run {
            buf.resize(r.len as usize, 0);
            src.read_exact_at(&mut buf, r.offset)
                .map_err(io_err(src_path))?;
            out.write_all(&buf).map_err(io_err(&path))?;
        }
        out.sync_all().map_err(io_err(&path))?;
        staged.push(path);
    }
    names_after.extend(
        scan.segments
            .iter()
            .zip(&kept)
            .filter(|(s, k)| **k && s.records.is_empty())
            .map(|(s, _)| s.name_seq),
    );
    for (i, seg) in scan.segments.iter().enumerate() {
        if !kept[i] {
            std::fs::create_dir_all(&damaged).map_err(io_err(&damaged))?;
            let to = damaged.join(seg.path.file_name().expect("segment file name"));
            std::fs::rename(&seg.path, &to).map_err(io_err(&seg.path))?;
            report.moved.push(to);
        }
    }
    for path in staged {
        let to = dir.join(path.file_name().expect("segment name"));
        std::fs::rename(&path, &to).map_err(io_err(&to))?;
        report.rewritten.push(to);
    }
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }

    // What no intact record holds, between the kept ones.
    let mut lost: Vec<(u64, u64, String)> = Vec::new();
    let mut expected = scan.released.map(|r| r + 1);
    for seq in chosen.keys() {
        if let Some(e) = expected {
            if *seq > e && !scan.accepted(e, seq - 1) {
                lost.push((e, seq - 1, "no intact record holds them".into()));
            }
        }
        expected = Some(seq + 1);
    }
    // Where the newest records are gone (the segment being written, or every segment),
    // the WAL goes on above the floor: numbers up to it are lost, later ones were never
    // seen by any store.
    let newest_gone = match scan.writing {
        Some(w) => !names_after.iter().any(|n| *n >= w) && !scan.accepted(w, u64::MAX),
        None => false,
    } || (chosen.is_empty() && !scan.is_fresh());
    if newest_gone {
        let from = expected.unwrap_or(1);
        let to = chosen
            .keys()
            .next_back()
            .copied()
            .into_iter()
            .chain(scan.segments.iter().map(|s| s.name_seq.saturating_sub(1)))
            .chain([scan.released.unwrap_or(0), floor])
            .chain(scan.writing.map(|w| w.saturating_sub(1)))
            .max()
            .unwrap_or(0);
        if to >= from && !scan.accepted(from, to) {
            lost.push((
                from,
                to,
                format!(
                    "the newest segment was gone: records from {from} on are lost, how many is \
                     unknown; new records are numbered after {to}, above every number a store \
                     or the archive has seen"
                ),
            ));
        }
        // An empty segment to start from, named after the gap.
        let path = crate::segment_path(dir, to + 1);
        if !path.exists() {
            let mut f = File::create(&path).map_err(io_err(&path))?;
            f.write_all(&header_v2(&id, to + 1))
                .map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
            report.rewritten.push(path);
        }
        write_atomic(dir, WRITING_FILE, (to + 1).to_string().as_bytes(), true)?;
    }
    if scan.id_file != Some(id) {
        write_atomic(dir, ID_FILE, format_id(&id).as_bytes(), true)?;
    }
    if !lost.is_empty() {
        let path = dir.join(LOST_FILE);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        for (from, to, reason) in lost {
            let l = LostRange {
                from,
                to,
                reason,
                repaired_at: now.clone(),
            };
            let mut line = serde_json::to_vec(&l).expect("lost range serializes");
            line.push(b'\n');
            f.write_all(&line).map_err(io_err(&path))?;
            report.lost.push(l);
        }
        f.sync_all().map_err(io_err(&path))?;
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(report)
}

/// Copies the bytes from `offset` to the end of `path` into `to_dir`, for inspection.
pub(super) fn keep_torn_tail(path: &Path, offset: u64, to_dir: &Path) -> Result<(), WalError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let Some(tail) = bytes.get(offset as usize..) else {
        return Ok(());
    };
    std::fs::create_dir_all(to_dir).map_err(io_err(to_dir))?;
    let name = format!(
        "{}.{offset}.tail",
        path.file_name().expect("segment name").to_string_lossy()
    );
    let dest = to_dir.join(name);
    std::fs::write(&dest, tail).map_err(io_err(&dest))
}
