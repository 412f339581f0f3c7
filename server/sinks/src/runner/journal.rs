//! The plan journal of a store whose exactly-once rests on writing the same chunk again
//! after a crash (ClickHouse's deduplication tokens).

use std::path::PathBuf;
use std::sync::Mutex;

use super::CommittedRanges;
use crate::error::SinkError;

/// What a plan journal holds at start.
#[derive(Debug, Default)]
pub struct Journaled {
    /// Chunks the store took.
    pub done: CommittedRanges,
    /// Chunks planned and not known to be done, in the order they were planned.
    pub plans: Vec<Plan>,
}

/// A chunk as it was planned: its table and the WAL seqs of its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub table: String,
    pub seqs: Vec<u64>,
}

/// A sink's plan journal: JSON lines `{"plan": table, "seqs": [...]}` written (and
/// fsynced) before a chunk is sent, `{"done": table, "first": n, "last": n}` after the
/// store took it. After a crash, done chunks are skipped and planned ones are formed again
/// from exactly the same records, so a store that deduplicates by a token derived from
/// the chunk's WAL range drops what it already had.
pub struct PlanJournal {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum JournalLine {
    Plan { plan: String, seqs: Vec<u64> },
    Done { done: String, first: u64, last: u64 },
}

impl PlanJournal {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: Mutex::new(None),
        }
    }

    fn io_err(&self) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
        |source| SinkError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn append(&self, line: &JournalLine, sync: bool) -> Result<(), SinkError> {
        use std::io::Write;
        let mut text = serde_json::to_vec(line).expect("a journal line serializes");
        text.push(b'\n');
        let mut f = self.file.lock().expect("journal");
        if f.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| SinkError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            *f = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .map_err(self.io_err())?,
            );
        }
        let file = f.as_mut().expect("open journal");
        file.write_all(&text)
            .and_then(|_| if sync { file.sync_data() } else { Ok(()) })
            .map_err(self.io_err())
    }

    pub fn plan(&self, table: &str, seqs: &[u64]) -> Result<(), SinkError> {
        self.append(
            &JournalLine::Plan {
                plan: table.to_string(),
                seqs: seqs.to_vec(),
            },
            true,
        )
    }

    pub fn done(&self, table: &str, first: u64, last: u64) -> Result<(), SinkError> {
        self.append(
            &JournalLine::Done {
                done: table.to_string(),
                first,
                last,
            },
            false,
        )
    }

    /// Done ranges and the plans not known to be done, in the order they were planned.
    /// A torn last line (a crash mid-append) is ignored.
    pub fn load(&self) -> Result<Journaled, SinkError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(self.io_err()(e)),
        };
        let mut done = CommittedRanges::default();
        let mut plans: Vec<Plan> = Vec::new();
        let mut done_keys = std::collections::HashSet::new();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<JournalLine>(line) {
                Ok(JournalLine::Plan { plan, seqs }) => plans.push(Plan { table: plan, seqs }),
                Ok(JournalLine::Done {
                    done: t,
                    first,
                    last,
                }) => {
                    done.add(&t, first, last);
                    done_keys.insert((t, first));
                }
                Err(_) if i + 1 == lines.len() => {}
                Err(source) => {
                    return Err(SinkError::Journal {
                        path: self.path.clone(),
                        line: i + 1,
                        source,
                    })
                }
            }
        }
        plans.retain(|p| !p.seqs.is_empty() && !done_keys.contains(&(p.table.clone(), p.seqs[0])));
        Ok(Journaled { done, plans })
    }

    /// The highest sequence number any plan or done range names (0 without a journal): a
    /// WAL that lost its newest records must number new ones above it, or ClickHouse's
    /// deduplication would take a new insert for one it has.
    pub fn highest_seq(&self) -> Result<u64, SinkError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io_err()(e)),
        };
        Ok(text
            .lines()
            .filter_map(|l| match serde_json::from_str::<JournalLine>(l) {
                Ok(JournalLine::Plan { seqs, .. }) => seqs.last().copied(),
                Ok(JournalLine::Done { last, .. }) => Some(last),
                Err(_) => None,
            })
            .max()
            .unwrap_or(0))
    }

    /// Rewrites the journal without entries wholly below `seq` (no longer in the WAL).
    pub fn compact(&self, below: u64) -> Result<(), SinkError> {
        let mut f = self.file.lock().expect("journal");
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(_) => return Ok(()),
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| match serde_json::from_str::<JournalLine>(l) {
                Ok(JournalLine::Plan { seqs, .. }) => seqs.last().is_some_and(|s| *s >= below),
                Ok(JournalLine::Done { last, .. }) => last >= below,
                Err(_) => false,
            })
            .collect();
        let tmp = self.path.with_extension("tmp");
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(self.io_err())?;
        *f = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_keeps_plans_not_done_and_names_a_damaged_line() {
        let dir = tempfile::tempdir().unwrap();
        let j = PlanJournal::new(dir.path().join("sub").join("ch.plans"));
        assert_eq!(j.highest_seq().unwrap(), 0, "no journal yet");
        j.plan("logs", &[3, 4, 5]).unwrap();
        j.plan("spans", &[6]).unwrap();
        j.done("logs", 3, 5).unwrap();
        let state = j.load().unwrap();
        assert!(state.done.contains("logs", 4));
        assert_eq!(
            state.plans,
            vec![Plan {
                table: "spans".into(),
                seqs: vec![6]
            }]
        );
        assert_eq!(j.highest_seq().unwrap(), 6);
        j.compact(6).unwrap();
        let state = j.load().unwrap();
        assert!(!state.done.contains("logs", 4), "compacted away");
        assert_eq!(state.plans.len(), 1);

        // A torn last line is a crash mid-append and ignored; a bad line before it is not.
        let path = dir.path().join("sub").join("ch.plans");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}{{\"plan\": \"t\", \"se")).unwrap();
        assert_eq!(j.load().unwrap().plans.len(), 1);
        std::fs::write(&path, format!("garbage\n{text}")).unwrap();
        let e = j.load().unwrap_err();
        assert!(matches!(e, SinkError::Journal { line: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("ch.plans line 1"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
