//! The rollup's state: per series, the buckets that have points not yet written
//! ([`RollupState`]), what a flush takes from it ([`FlushRow`]), and the checkpoint file
//! that holds it across restarts ([`Checkpoint`]).
//!
//! A point `(time, metric_name, labels, value)` goes into one bucket per configured
//! interval: `floor(time / interval) * interval`, in seconds since 1970 (UTC). A bucket
//! keeps the sum, count, minimum and maximum of its points, with PostgreSQL's `avg`, `min`
//! and `max` semantics for NaN (NaN sorts above every number), so the row written to
//! ClickHouse equals what PostgreSQL computes over the same points in `metrics_points`.
//! A bucket is written once no point came to it for `delay` (wall clock, whatever the
//! points' own times); a point that comes later starts the bucket again and is written as
//! one more row for it, so readers sum rows per bucket (`metrics_1m_merged`).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, TimeUnit, TimestampMicrosecondType};

use super::labels;

/// One configured rollup interval and the ClickHouse table its rows go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    /// As configured (`"1m"`, `"1h"`): the table is `metrics_<name>`.
    pub name: String,
    pub secs: i64,
}

impl Interval {
    pub fn table(&self) -> String {
        format!("metrics_{}", self.name)
    }
}

/// Sum, count, minimum and maximum of a bucket's points.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub sum: f64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
}

impl Agg {
    fn of(v: f64) -> Self {
        Self {
            sum: v,
            count: 1,
            min: v,
            max: v,
        }
    }

    /// PostgreSQL's float order: NaN is greater than every number.
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.count += 1;
        if v.is_nan() {
            self.max = v;
        } else {
            if self.min.is_nan() || v < self.min {
                self.min = v;
            }
            if !self.max.is_nan() && v > self.max {
                self.max = v;
            }
        }
    }

    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// A bucket with points not yet written.
#[derive(Debug, Clone)]
struct Open {
    interval: u8,
    bucket: i64,
    agg: Agg,
    /// When its last point arrived (ms on the state's clock).
    last_arrival_ms: u64,
}

struct Series {
    name: Arc<str>,
    labels: Arc<str>,
    open: Vec<Open>,
}

/// One row a flush writes: a bucket's aggregate of the points it got since it was last
/// written.
#[derive(Debug, Clone, PartialEq)]
pub struct FlushRow {
    /// Index into the intervals the state was made with.
    pub interval: u8,
    pub bucket: i64,
    pub metric_name: Arc<str>,
    pub labels: Arc<str>,
    pub agg: Agg,
}

/// What [`RollupState::add_batch`] did with a batch's rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Added {
    pub points: u64,
    /// Per interval: points that came for a bucket already behind the watermark.
    pub late: Vec<u64>,
    /// Points that cannot be rolled up, by reason, with the first one's message.
    pub refused: Vec<(&'static str, u64, String)>,
}

impl Added {
    fn refuse(&mut self, reason: &'static str, message: impl FnOnce() -> String) {
        match self.refused.iter_mut().find(|r| r.0 == reason) {
            Some(r) => r.1 += 1,
            None => self.refused.push((reason, 1, message())),
        }
    }
}

/// Buckets with points not yet written, per series; see the module doc.
pub struct RollupState {
    intervals: Vec<Interval>,
    lateness_secs: i64,
    series: Vec<Series>,
    /// `metric_name \xff labels` as received -> series.
    by_raw: HashMap<Box<[u8]>, u32, foldhash::fast::RandomState>,
    /// (metric_name, canonical labels) -> series: label texts that differ only in key
    /// order or spacing are one series.
    by_canonical: HashMap<(Arc<str>, Arc<str>), u32, foldhash::fast::RandomState>,
    /// Series with open buckets (each once).
    active: Vec<u32>,
    open_buckets: usize,
    /// The latest point time seen, seconds.
    max_event_secs: Option<i64>,
    scratch: Vec<u8>,
}

/// Latest second a DateTime column holds.
const MAX_DATETIME: i64 = u32::MAX as i64;

impl RollupState {
    pub fn new(intervals: Vec<Interval>, lateness_secs: i64) -> Self {
        assert!(intervals.len() <= u8::MAX as usize, "at most 255 intervals");
        Self {
            intervals,
            lateness_secs,
            series: Vec::new(),
            by_raw: HashMap::default(),
            by_canonical: HashMap::default(),
            active: Vec::new(),
            open_buckets: 0,
            max_event_secs: None,
            scratch: Vec::new(),
        }
    }

    pub fn intervals(&self) -> &[Interval] {
        &self.intervals
    }

    pub fn open_buckets(&self) -> usize {
        self.open_buckets
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Adds the points of a `metrics` batch (`time`, `metric_name`, `labels`, `value`)
    /// that arrived at `now_ms`.
    pub fn add_batch(&mut self, batch: &RecordBatch, now_ms: u64) -> Added {
        let mut added = Added {
            late: vec![0; self.intervals.len()],
            ..Added::default()
        };
        let rows = batch.num_rows();
        let (Some(time), Some(names), Some(values)) = (
            batch.column_by_name("time"),
            batch.column_by_name("metric_name"),
            batch.column_by_name("value"),
        ) else {
            for _ in 0..rows {
                added.refuse("columns", || {
                    "the metrics table needs time, metric_name and value columns".into()
                });
            }
            return added;
        };
        let time = match time.data_type() {
            DataType::Timestamp(TimeUnit::Microsecond, _) => time.clone(),
            _ => {
                match arrow::compute::cast(time, &DataType::Timestamp(TimeUnit::Microsecond, None))
                {
                    Ok(t) => t,
                    Err(e) => {
                        for _ in 0..rows {
                            added.refuse("columns", || format!("metrics.time: {e}"));
                        }
                        return added;
                    }
                }
            }
        };
        let (Some(time), Some(names), Some(values)) = (
            time.as_primitive_opt::<TimestampMicrosecondType>(),
            names.as_string_opt::<i32>(),
            values.as_primitive_opt::<Float64Type>(),
        ) else {
            for _ in 0..rows {
                added.refuse("columns", || {
                    "metrics.metric_name must be a string and metrics.value a double".into()
                });
            }
            return added;
        };
        let labels = batch
            .column_by_name("labels")
            .and_then(|l| l.as_string_opt::<i32>());
        let watermark = self.event_watermark();
        let mut prev: Option<(usize, u32)> = None;
        for row in 0..rows {
            if names.is_null(row) || time.is_null(row) || values.is_null(row) {
                added.refuse("null", || {
                    format!("row {row}: metric_name, time or value is null")
                });
                continue;
            }
            let secs = time.value(row).div_euclid(1_000_000);
            if !(0..=MAX_DATETIME).contains(&secs) {
                added.refuse("time_range", || {
                    format!(
                        "row {row}: time {secs} s since 1970 is outside ClickHouse DateTime's range (1970 to 2106)"
                    )
                });
                continue;
            }
            let label_text = labels.and_then(|l| (!l.is_null(row)).then(|| l.value(row)));
            // Rows of one series often follow each other.
            let same = prev.is_some_and(|(p, _)| {
                names.value(p) == names.value(row)
                    && labels.map(|l| (l.is_null(p), l.value(p)))
                        == labels.map(|l| (l.is_null(row), l.value(row)))
            });
            let series = if same {
                prev.expect("checked").1
            } else {
                match self.series_of(names.value(row), label_text) {
                    Ok(s) => s,
                    Err(e) => {
                        added.refuse("labels", || format!("row {row}: labels are not JSON: {e}"));
                        continue;
                    }
                }
            };
            prev = Some((row, series));
            let v = values.value(row);
            let s = &mut self.series[series as usize];
            let was_idle = s.open.is_empty();
            for (i, iv) in self.intervals.iter().enumerate() {
                let bucket = secs - secs.rem_euclid(iv.secs);
                if watermark.is_some_and(|w| bucket + iv.secs <= w) {
                    added.late[i] += 1;
                }
                match s
                    .open
                    .iter_mut()
                    .find(|o| o.bucket == bucket && o.interval as usize == i)
                {
                    Some(o) => {
                        o.agg.add(v);
                        o.last_arrival_ms = now_ms;
                    }
                    None => {
                        s.open.push(Open {
                            interval: i as u8,
                            bucket,
                            agg: Agg::of(v),
                            last_arrival_ms: now_ms,
                        });
                        self.open_buckets += 1;
                    }
                }
            }
            if was_idle {
                self.active.push(series);
            }
            self.max_event_secs = Some(self.max_event_secs.map_or(secs, |m| m.max(secs)));
            added.points += 1;
        }
        added
    }

    /// The series of a (metric_name, labels as received) pair, made on first sight.
    fn series_of(&mut self, name: &str, labels: Option<&str>) -> Result<u32, serde_json::Error> {
        self.scratch.clear();
        self.scratch.extend_from_slice(name.as_bytes());
        match labels {
            // 0xff never occurs in UTF-8: the two parts cannot run into each other.
            Some(l) => {
                self.scratch.push(0xff);
                self.scratch.extend_from_slice(l.as_bytes());
            }
            None => self.scratch.extend_from_slice(&[0xff, 0xff]),
        }
        if let Some(&s) = self.by_raw.get(self.scratch.as_slice()) {
            return Ok(s);
        }
        let canonical = labels::canonical(labels)?;
        let s = self.series_for(name, &canonical);
        self.by_raw
            .insert(self.scratch.clone().into_boxed_slice(), s);
        Ok(s)
    }

    /// The series of a (metric_name, canonical labels) pair, made on first sight.
    fn series_for(&mut self, name: &str, canonical: &str) -> u32 {
        let key: (Arc<str>, Arc<str>) = (Arc::from(name), Arc::from(canonical));
        if let Some(&s) = self.by_canonical.get(&key) {
            return s;
        }
        let s = u32::try_from(self.series.len()).expect("fewer than 2^32 series");
        self.series.push(Series {
            name: key.0.clone(),
            labels: key.1.clone(),
            open: Vec::new(),
        });
        self.by_canonical.insert(key, s);
        s
    }

    /// The latest point time less the lateness: buckets ending at or before it are
    /// complete unless a point later than the lateness comes.
    fn event_watermark(&self) -> Option<i64> {
        self.max_event_secs.map(|m| m - self.lateness_secs)
    }

    /// Per interval, the start of the first bucket that may still change: the earliest
    /// open bucket, or the latest point time less the lateness (rounded down to the
    /// interval), whichever is earlier. `None` before any point.
    pub fn watermarks(&self) -> Vec<Option<i64>> {
        let event = self.event_watermark();
        let mut out: Vec<Option<i64>> = self
            .intervals
            .iter()
            .map(|iv| event.map(|w| w - w.rem_euclid(iv.secs)))
            .collect();
        for &s in &self.active {
            for o in &self.series[s as usize].open {
                let w = &mut out[o.interval as usize];
                *w = Some(w.map_or(o.bucket, |w| w.min(o.bucket)));
            }
        }
        out
    }

    /// Takes the buckets whose last point arrived `delay_ms` or more before `now_ms` (all
    /// of them with `all`), in a stable order (interval, bucket, metric, labels).
    pub fn take_due(&mut self, now_ms: u64, delay_ms: u64, all: bool) -> Vec<FlushRow> {
        let mut rows = Vec::new();
        let mut still = Vec::with_capacity(self.active.len());
        for &s in &self.active {
            let series = &mut self.series[s as usize];
            series.open.retain(|o| {
                let due = all || now_ms.saturating_sub(o.last_arrival_ms) >= delay_ms;
                if due {
                    rows.push(FlushRow {
                        interval: o.interval,
                        bucket: o.bucket,
                        metric_name: series.name.clone(),
                        labels: series.labels.clone(),
                        agg: o.agg,
                    });
                }
                !due
            });
            if !series.open.is_empty() {
                still.push(s);
            }
        }
        self.active = still;
        self.open_buckets -= rows.len();
        sort_rows(&mut rows);
        rows
    }

    /// Forgets series that have no open bucket, when they are most of those known (their
    /// names come back on their next point), so a stream of short-lived series does not
    /// grow memory for ever.
    pub fn forget_idle_series(&mut self) {
        if self.series.len() < 1024 || self.active.len() * 4 > self.series.len() {
            return;
        }
        let keep: Vec<u32> = self.active.clone();
        let old = std::mem::take(&mut self.series);
        let mut old: Vec<Option<Series>> = old.into_iter().map(Some).collect();
        for s in keep {
            let series = old[s as usize].take().expect("active series once");
            self.series.push(series);
        }
        self.active = (0..self.series.len() as u32).collect();
        self.by_raw.clear();
        self.by_canonical = self
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.name.clone(), s.labels.clone()), i as u32))
            .collect();
    }

    /// The open buckets, for a checkpoint.
    fn open_rows(&self) -> Vec<(FlushRow, u64)> {
        let mut rows = Vec::with_capacity(self.open_buckets);
        for &s in &self.active {
            let series = &self.series[s as usize];
            for o in &series.open {
                rows.push((
                    FlushRow {
                        interval: o.interval,
                        bucket: o.bucket,
                        metric_name: series.name.clone(),
                        labels: series.labels.clone(),
                        agg: o.agg,
                    },
                    o.last_arrival_ms,
                ));
            }
        }
        rows
    }

    /// Puts a checkpoint's open buckets back, as if their points had just arrived.
    fn restore(&mut self, rows: Vec<FlushRow>, max_event_secs: Option<i64>, now_ms: u64) {
        for r in rows {
            let s = self.series_for(&r.metric_name, &r.labels);
            let series = &mut self.series[s as usize];
            if series.open.is_empty() {
                self.active.push(s);
            }
            match series
                .open
                .iter_mut()
                .find(|o| o.interval == r.interval && o.bucket == r.bucket)
            {
                Some(o) => o.agg = merge(o.agg, r.agg),
                None => {
                    series.open.push(Open {
                        interval: r.interval,
                        bucket: r.bucket,
                        agg: r.agg,
                        last_arrival_ms: now_ms,
                    });
                    self.open_buckets += 1;
                }
            }
        }
        self.max_event_secs = max_event_secs;
    }
}

/// Two aggregates of one bucket as one.
fn merge(a: Agg, b: Agg) -> Agg {
    let mut out = a;
    out.sum += b.sum;
    out.count += b.count;
    for v in [b.min, b.max] {
        if v.is_nan() {
            out.max = v;
        } else {
            if out.min.is_nan() || v < out.min {
                out.min = v;
            }
            if !out.max.is_nan() && v > out.max {
                out.max = v;
            }
        }
    }
    out
}

fn sort_rows(rows: &mut [FlushRow]) {
    rows.sort_by(|a, b| {
        (a.interval, a.bucket, &a.metric_name, &a.labels).cmp(&(
            b.interval,
            b.bucket,
            &b.metric_name,
            &b.labels,
        ))
    });
}

/// A flush written to the checkpoint before its INSERTs, so that after a crash the same
/// rows go out again under the same deduplication tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Flush {
    pub id: u64,
    pub rows: Vec<FlushRow>,
}

/// What the checkpoint file holds: the state after every record up to `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub wal_id: String,
    pub seq: u64,
    pub next_flush_id: u64,
    pub max_event_secs: Option<i64>,
    /// The interval names the rows' indexes refer to.
    pub intervals: Vec<String>,
    pub open: Vec<FlushRow>,
    pub inflight: Option<Flush>,
}

const MAGIC: &[u8; 8] = b"SLROLL01";

impl Checkpoint {
    /// The state's open buckets as a checkpoint.
    pub fn of(
        state: &RollupState,
        wal_id: &str,
        seq: u64,
        next_flush_id: u64,
        inflight: Option<Flush>,
    ) -> Self {
        Self {
            wal_id: wal_id.to_string(),
            seq,
            next_flush_id,
            max_event_secs: state.max_event_secs,
            intervals: state.intervals.iter().map(|i| i.name.clone()).collect(),
            open: state.open_rows().into_iter().map(|(r, _)| r).collect(),
            inflight,
        }
    }

    /// Moves the open buckets into `state` (whose intervals are the configured ones) and
    /// brings the flush to send again to the same interval indexes; returns the rows of
    /// intervals no longer configured, which are left out of both.
    pub fn restore_into(&mut self, state: &mut RollupState, now_ms: u64) -> Vec<FlushRow> {
        let map: Vec<Option<u8>> = self
            .intervals
            .iter()
            .map(|n| {
                state
                    .intervals
                    .iter()
                    .position(|i| &i.name == n)
                    .map(|p| p as u8)
            })
            .collect();
        let remap = |rows: Vec<FlushRow>| {
            let (mut kept, mut gone) = (Vec::new(), Vec::new());
            for mut r in rows {
                match map.get(r.interval as usize).copied().flatten() {
                    Some(i) => {
                        r.interval = i;
                        kept.push(r);
                    }
                    None => gone.push(r),
                }
            }
            (kept, gone)
        };
        let (kept, mut gone) = remap(std::mem::take(&mut self.open));
        state.restore(kept, self.max_event_secs, now_ms);
        // The flush to send again names intervals by the same old indexes.
        if let Some(f) = self.inflight.as_mut() {
            let (kept, more) = remap(std::mem::take(&mut f.rows));
            f.rows = kept;
            gone.extend(more);
        }
        gone
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.open.len() * 64);
        out.extend_from_slice(MAGIC);
        put_str(&mut out, &self.wal_id);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.next_flush_id.to_le_bytes());
        out.extend_from_slice(&self.max_event_secs.unwrap_or(i64::MIN).to_le_bytes());
        out.extend_from_slice(&(self.intervals.len() as u32).to_le_bytes());
        for i in &self.intervals {
            put_str(&mut out, i);
        }
        put_rows(&mut out, &self.open);
        match &self.inflight {
            None => out.push(0),
            Some(f) => {
                out.push(1);
                out.extend_from_slice(&f.id.to_le_bytes());
                put_rows(&mut out, &f.rows);
            }
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a rollup checkpoint (wrong magic)".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32(body).to_le_bytes() != crc {
            return Err("checksum mismatch: the file is damaged".into());
        }
        let mut r = Reader {
            b: &body[MAGIC.len()..],
        };
        let wal_id = r.str()?;
        let seq = r.u64()?;
        let next_flush_id = r.u64()?;
        let max_event = r.u64()? as i64;
        let n = r.u32()? as usize;
        let mut intervals = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            intervals.push(r.str()?);
        }
        let open = r.rows()?;
        let inflight = match r.u8()? {
            0 => None,
            1 => {
                let id = r.u64()?;
                Some(Flush {
                    id,
                    rows: r.rows()?,
                })
            }
            x => return Err(format!("bad inflight flag {x}")),
        };
        if !r.b.is_empty() {
            return Err(format!("{} bytes after the end", r.b.len()));
        }
        Ok(Self {
            wal_id,
            seq,
            next_flush_id,
            max_event_secs: (max_event != i64::MIN).then_some(max_event),
            intervals,
            open,
            inflight,
        })
    }
}

fn crc32(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(b);
    h.finalize()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Rows with their series names written once each.
fn put_rows(out: &mut Vec<u8>, rows: &[FlushRow]) {
    let mut names: HashMap<(&str, &str), u32> = HashMap::new();
    let mut order: Vec<(&str, &str)> = Vec::new();
    let ids: Vec<u32> = rows
        .iter()
        .map(|r| {
            let k = (&*r.metric_name, &*r.labels);
            *names.entry(k).or_insert_with(|| {
                order.push(k);
                order.len() as u32 - 1
            })
        })
        .collect();
    out.extend_from_slice(&(order.len() as u32).to_le_bytes());
    for (n, l) in &order {
        put_str(out, n);
        put_str(out, l);
    }
    out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    for (r, id) in rows.iter().zip(ids) {
        out.extend_from_slice(&id.to_le_bytes());
        out.push(r.interval);
        out.extend_from_slice(&r.bucket.to_le_bytes());
        out.extend_from_slice(&r.agg.sum.to_le_bytes());
        out.extend_from_slice(&r.agg.count.to_le_bytes());
        out.extend_from_slice(&r.agg.min.to_le_bytes());
        out.extend_from_slice(&r.agg.max.to_le_bytes());
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.b.len() < n {
            return Err("truncated".into());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn f64(&mut self) -> Result<f64, String> {
        Ok(f64::from_bits(self.u64()?))
    }
    fn str(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a name is not UTF-8".into())
    }
    fn rows(&mut self) -> Result<Vec<FlushRow>, String> {
        let n = self.u32()? as usize;
        if n > self.b.len() / 8 {
            return Err("series count past the file's size".into());
        }
        let mut series = Vec::with_capacity(n);
        for _ in 0..n {
            let name: Arc<str> = self.str()?.into();
            let labels: Arc<str> = self.str()?.into();
            series.push((name, labels));
        }
        let rows = self.u32()? as usize;
        if rows > self.b.len() / 45 {
            return Err("row count past the file's size".into());
        }
        let mut out = Vec::with_capacity(rows);
        for _ in 0..rows {
            let id = self.u32()? as usize;
            let (metric_name, labels) = series
                .get(id)
                .cloned()
                .ok_or_else(|| format!("series {id} out of range"))?;
            let interval = self.u8()?;
            let bucket = self.u64()? as i64;
            let agg = Agg {
                sum: self.f64()?,
                count: self.u64()?,
                min: self.f64()?,
                max: self.f64()?,
            };
            out.push(FlushRow {
                interval,
                bucket,
                metric_name,
                labels,
                agg,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};

    fn intervals() -> Vec<Interval> {
        vec![
            Interval {
                name: "1m".into(),
                secs: 60,
            },
            Interval {
                name: "1h".into(),
                secs: 3600,
            },
        ]
    }

    fn batch(rows: &[(i64, &str, Option<&str>, f64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("metric_name", DataType::Utf8, false),
            Field::new("labels", DataType::Utf8, true),
            Field::new("value", DataType::Float64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(
                    TimestampMicrosecondArray::from(
                        rows.iter().map(|r| r.0 * 1_000_000).collect::<Vec<_>>(),
                    )
                    .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    #[test]
    fn points_aggregate_per_bucket_and_series_whatever_the_label_key_order() {
        let mut s = RollupState::new(intervals(), 600);
        let b = batch(&[
            (60, "cpu", Some(r#"{"h":"a","dc":"x"}"#), 1.0),
            (119, "cpu", Some(r#"{"dc":"x", "h":"a"}"#), 3.0),
            (120, "cpu", Some(r#"{"h":"a","dc":"x"}"#), 10.0),
            (61, "cpu", None, 5.0),
        ]);
        let added = s.add_batch(&b, 0);
        assert_eq!(added.points, 4);
        assert!(added.refused.is_empty());
        assert_eq!(s.series_count(), 2);
        // Not due yet.
        assert!(s.take_due(999, 1000, false).is_empty());
        let rows = s.take_due(1000, 1000, false);
        type Row<'a> = (u8, i64, &'a str, &'a str, u64, f64, f64, f64);
        let got: Vec<Row> = rows
            .iter()
            .map(|r| {
                (
                    r.interval,
                    r.bucket,
                    &*r.metric_name,
                    &*r.labels,
                    r.agg.count,
                    r.agg.sum,
                    r.agg.min,
                    r.agg.max,
                )
            })
            .collect();
        let l = r#"{"h": "a", "dc": "x"}"#;
        assert_eq!(
            got,
            vec![
                (0, 60, "cpu", l, 2, 4.0, 1.0, 3.0),
                (0, 60, "cpu", "{}", 1, 5.0, 5.0, 5.0),
                (0, 120, "cpu", l, 1, 10.0, 10.0, 10.0),
                (1, 0, "cpu", l, 3, 14.0, 1.0, 10.0),
                (1, 0, "cpu", "{}", 1, 5.0, 5.0, 5.0),
            ]
        );
        assert_eq!(s.open_buckets(), 0);
    }

    #[test]
    fn nan_sorts_above_every_number_as_in_postgres() {
        let mut a = Agg::of(2.0);
        a.add(f64::NAN);
        a.add(1.0);
        assert_eq!(a.min, 1.0);
        assert!(a.max.is_nan() && a.sum.is_nan());
        let mut b = Agg::of(f64::NAN);
        b.add(f64::NAN);
        assert!(b.min.is_nan() && b.max.is_nan());
        b.add(-1.0);
        assert_eq!(b.min, -1.0);
        let m = merge(Agg::of(3.0), b);
        assert_eq!((m.count, m.min), (4, -1.0));
        assert!(m.max.is_nan());
    }

    #[test]
    fn a_bucket_is_due_delay_after_its_own_last_point_and_late_points_are_counted() {
        let mut s = RollupState::new(intervals()[..1].to_vec(), 120);
        s.add_batch(&batch(&[(60, "m", None, 1.0)]), 0);
        s.add_batch(&batch(&[(125, "m", None, 1.0)]), 500);
        // The bucket at 60 got its last point at 0, the one at 120 at 500.
        let due = s.take_due(1000, 1000, false);
        assert_eq!(due.iter().map(|r| r.bucket).collect::<Vec<_>>(), vec![60]);
        assert_eq!(s.watermarks(), vec![Some(0)]);
        // Far ahead in time: the watermark moves; a point for 60 is late now.
        s.add_batch(&batch(&[(1000, "m", None, 1.0)]), 600);
        let added = s.add_batch(&batch(&[(70, "m", None, 4.0)]), 700);
        assert_eq!(added.late, vec![1]);
        assert_eq!(s.watermarks(), vec![Some(60)]);
        let all = s.take_due(700, 1000, true);
        assert_eq!(
            all.iter()
                .map(|r| (r.bucket, r.agg.count))
                .collect::<Vec<_>>(),
            vec![(60, 1), (120, 1), (960, 1)]
        );
        assert_eq!(s.watermarks(), vec![Some(840)]);
    }

    #[test]
    fn refused_points_are_counted_with_the_first_message() {
        let mut s = RollupState::new(intervals(), 0);
        let added = s.add_batch(
            &batch(&[
                (-1, "m", None, 1.0),
                (60, "m", Some("{bad"), 1.0),
                (1 << 33, "m", None, 1.0),
                (60, "m", Some("{}"), 2.0),
            ]),
            0,
        );
        assert_eq!(added.points, 1);
        assert_eq!(added.refused.len(), 2);
        assert_eq!(added.refused[0].0, "time_range");
        assert_eq!(added.refused[0].1, 2);
        assert!(
            added.refused[0].2.starts_with("row 0: time -1 s"),
            "{:?}",
            added.refused
        );
        assert_eq!(added.refused[1].0, "labels");
        assert!(added.refused[1].2.starts_with("row 1: labels are not JSON"));
    }

    #[test]
    fn a_checkpoint_round_trips_and_restores_the_open_buckets() {
        let mut s = RollupState::new(intervals(), 60);
        s.add_batch(
            &batch(&[(60, "a", Some(r#"{"x":"1"}"#), 1.0), (3700, "b", None, 2.0)]),
            0,
        );
        let due = s.take_due(0, 0, true);
        s.add_batch(&batch(&[(60, "a", Some(r#"{"x":"1"}"#), 5.0)]), 0);
        let cp = Checkpoint::of(
            &s,
            "wal-1",
            42,
            7,
            Some(Flush {
                id: 6,
                rows: due.clone(),
            }),
        );
        let bytes = cp.encode();
        let mut back = Checkpoint::decode(&bytes).unwrap();
        assert_eq!(back, cp);
        // Only 1h configured now: the 1m rows are handed back as gone, the open bucket
        // and the flush's 1m row alike, and the flush's 1h rows now name interval 0.
        let mut fresh = RollupState::new(intervals()[1..].to_vec(), 60);
        let gone = back.restore_into(&mut fresh, 10);
        assert_eq!(
            gone.iter()
                .map(|r| (r.interval, r.bucket))
                .collect::<Vec<_>>(),
            vec![(0, 60), (0, 60), (0, 3660)]
        );
        let resend = back.inflight.as_ref().unwrap();
        assert_eq!(
            resend
                .rows
                .iter()
                .map(|r| (r.interval, r.bucket))
                .collect::<Vec<_>>(),
            vec![(0, 0), (0, 3600)]
        );
        let rows = fresh.take_due(10, 0, false);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].interval, rows[0].bucket, rows[0].agg.sum),
            (0, 0, 5.0)
        );
        // Damage anywhere is found.
        for i in [0, 9, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {i}");
        }
        assert!(Checkpoint::decode(&bytes[..bytes.len() - 5]).is_err());
    }

    #[test]
    fn idle_series_are_forgotten_and_come_back() {
        let mut s = RollupState::new(intervals()[..1].to_vec(), 0);
        let names: Vec<String> = (0..2000).map(|i| format!("m{i}")).collect();
        let rows: Vec<(i64, &str, Option<&str>, f64)> =
            names.iter().map(|n| (60, n.as_str(), None, 1.0)).collect();
        s.add_batch(&batch(&rows), 0);
        s.take_due(0, 0, true);
        s.add_batch(&batch(&[(60, "m7", None, 2.0)]), 0);
        s.forget_idle_series();
        assert_eq!(s.series_count(), 1);
        s.add_batch(&batch(&[(60, "m7", None, 3.0), (60, "m8", None, 1.0)]), 0);
        let rows = s.take_due(0, 0, true);
        assert_eq!(
            rows.iter()
                .map(|r| (&*r.metric_name, r.agg.sum))
                .collect::<Vec<_>>(),
            vec![("m7", 5.0), ("m8", 1.0)]
        );
    }
}
