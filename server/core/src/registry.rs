//! The schema registry: registered tables, their versions, and where they are kept.
//!
//! Registrations come in from Flight actions and HTTP; every one is validated, checked
//! against the current version ([`flight_schema::check_evolution`]) and appended to a
//! [`RegistryStore`]. An identical re-registration returns the current version without
//! writing anything, so concurrent registrations of the same table do not create
//! duplicate versions. The embedded store ([`FileRegistryStore`]) is an append-only JSON
//! lines file in the data directory; the PostgreSQL store
//! (`PgRegistryStore` in `sluice-sinks`) keeps `table_registry` and may be
//! shared by several sluice processes.
//!
//! # Several processes, one store
//! Each [`Registry`] caches the versions it has seen. Before deciding, `register` reads
//! the table's versions from the store again, and the store's `append` refuses a version
//! that is not the next one ([`Appended::Conflict`]); the registry then re-reads and
//! decides again, so a registration raced from two processes ends with one new version:
//! the first gets it, the second finds it identical (or evolves it further).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use flight_schema::seeds::seed_tables;
use flight_schema::{check_evolution, ResolvedTable, TableSchema};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One stored version of one table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredVersion {
    pub version: u64,
    pub registered_at: String,
    pub schema: TableSchema,
}

/// What [`RegistryStore::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The version is stored durably.
    Stored,
    /// Nothing was written: the store already holds this version of the table (or a
    /// later one), registered by another registry sharing the store. Re-read the table
    /// ([`RegistryStore::load_table`]) and decide again.
    Conflict,
}

/// Where registered versions are persisted.
#[async_trait::async_trait]
pub trait RegistryStore: Send + Sync {
    /// Every stored version, in any order.
    async fn load(&self) -> Result<Vec<StoredVersion>>;
    /// Every stored version of one table, in any order.
    async fn load_table(&self, name: &str) -> Result<Vec<StoredVersion>> {
        let mut all = self.load().await?;
        all.retain(|v| v.schema.name == name);
        Ok(all)
    }
    /// Durably adds a version, which must be the table's next one (1 for a new table).
    /// Returns [`Appended::Conflict`], writing nothing, if that (name, version) already
    /// exists.
    async fn append(&self, version: &StoredVersion) -> Result<Appended>;

    /// Forgets the versions `keep` says no longer (table, version). A store other
    /// processes share (PostgreSQL) keeps everything: their WALs may still need them.
    async fn compact(&self, _keep: &(dyn for<'a> Fn(&'a str, u64) -> bool + Sync)) -> Result<()> {
        Ok(())
    }
}

/// The embedded store: `registry/tables.jsonl` in the data directory, fsynced per append.
pub struct FileRegistryStore {
    path: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl FileRegistryStore {
    pub fn open(data_dir: &Path) -> Result<Self> {
        let dir = data_dir.join("registry");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self {
            path: dir.join("tables.jsonl"),
            lock: tokio::sync::Mutex::new(()),
        })
    }
}

#[async_trait::async_trait]
impl RegistryStore for FileRegistryStore {
    async fn load(&self) -> Result<Vec<StoredVersion>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(Error::Internal(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )))
            }
        };
        let mut out = Vec::new();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<StoredVersion>(line) {
                Ok(v) => out.push(v),
                // A torn last line is an append that never returned: ignore it.
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                    tracing::warn!(path = %self.path.display(), "ignoring a torn last registry line");
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), line = i + 1, error = %e,
                        "an unreadable registry line is left out");
                }
            }
        }
        Ok(out)
    }

    async fn compact(&self, keep: &(dyn for<'a> Fn(&'a str, u64) -> bool + Sync)) -> Result<()> {
        let _guard = self.lock.lock().await;
        let kept: Vec<StoredVersion> = self
            .load()
            .await?
            .into_iter()
            .filter(|v| keep(&v.schema.name, v.version))
            .collect();
        let mut body = Vec::new();
        for v in &kept {
            body.extend(serde_json::to_vec(v).map_err(Error::internal)?);
            body.push(b'\n');
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let tmp = path.with_extension("jsonl.tmp");
            std::fs::write(&tmp, &body)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(Error::internal)?
        .map_err(|e| Error::Internal(format!("cannot rewrite the registry: {e}")))
    }

    async fn append(&self, version: &StoredVersion) -> Result<Appended> {
        let _guard = self.lock.lock().await;
        let existing = self.load_table(&version.schema.name).await?;
        if existing.iter().any(|v| v.version >= version.version) {
            return Ok(Appended::Conflict);
        }
        let mut line = serde_json::to_vec(version).map_err(Error::internal)?;
        line.push(b'\n');
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // Drop a torn tail first so the new line starts on its own line.
            if let Ok(existing) = std::fs::read(&path) {
                if !existing.is_empty() && !existing.ends_with(b"\n") {
                    let keep = existing
                        .iter()
                        .rposition(|b| *b == b'\n')
                        .map_or(0, |p| p + 1);
                    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                    f.set_len(keep as u64)?;
                }
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            f.write_all(&line)?;
            f.sync_data()
        })
        .await
        .map_err(Error::internal)?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::StorageFull {
                Error::InsufficientStorage(format!("cannot write the registry: {e}"))
            } else {
                Error::Internal(format!("cannot write the registry: {e}"))
            }
        })?;
        Ok(Appended::Stored)
    }
}

/// A table's PostgreSQL `retention` must be an interval PostgreSQL reads the same way:
/// `<n> <unit>` pairs (`30 days`, `1 week 2 days`, `12 hours`).
fn check_retention(table: &ResolvedTable) -> Result<()> {
    let Some(r) = &table.definition.retention else {
        return Ok(());
    };
    const UNITS: &[&str] = &["second", "minute", "hour", "day", "week", "month", "year"];
    let words: Vec<&str> = r.split_whitespace().collect();
    let ok = !words.is_empty()
        && words.len().is_multiple_of(2)
        && r.len() <= 100
        && words.chunks(2).all(|p| {
            p[0].parse::<u32>().is_ok_and(|n| n > 0) && {
                let u = p[1].to_ascii_lowercase();
                UNITS.contains(&u.strip_suffix('s').unwrap_or(&u))
            }
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "table '{}': retention '{r}' is not an interval like '30 days' or '1 week 12 hours' \
             (units: {})",
            table.name(),
            UNITS.join(", ")
        )))
    }
}

/// How often `register` re-reads and retries after losing a race for the next version.
const MAX_REGISTER_ATTEMPTS: usize = 16;

/// Registered tables with every version, backed by a [`RegistryStore`].
/// A check a store adds to every registration: `Err` names what the store cannot take
/// (the ClickHouse sink checks `order_by`, `partition_by` and `ttl` this way).
pub type TableCheck = Box<
    dyn Fn(&ResolvedTable) -> std::result::Result<(), flight_schema::SchemaError> + Send + Sync,
>;

pub struct Registry {
    store: Box<dyn RegistryStore>,
    /// Checks of the stores, run on every new version ([`Registry::add_check`]).
    checks: Vec<TableCheck>,
    tables: RwLock<BTreeMap<String, Vec<Arc<ResolvedTable>>>>,
    register_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Adds a store's check to every registration from now on (see [`TableCheck`]).
    pub fn add_check(&mut self, check: TableCheck) {
        self.checks.push(check);
    }

    /// Loads every stored version and registers the seed tables that are missing.
    pub async fn open(store: Box<dyn RegistryStore>) -> Result<Self> {
        let mut stored = store.load().await?;
        stored.sort_by(|a, b| (&a.schema.name, a.version).cmp(&(&b.schema.name, b.version)));
        let mut tables: BTreeMap<String, Vec<Arc<ResolvedTable>>> = BTreeMap::new();
        for v in stored {
            // An entry that does not validate (written by hand, or by a bug) leaves its
            // table out instead of stopping every start; a WAL record that needs it
            // stops the replay with a message naming it.
            let resolved = match v.schema.validate(v.version) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(table = %v.schema.name, version = v.version, error = %e,
                        "a stored registry entry is invalid; its table is left out");
                    continue;
                }
            };
            let versions = tables.entry(v.schema.name.clone()).or_default();
            if versions.last().is_some_and(|l| l.version == v.version) {
                continue;
            }
            versions.push(Arc::new(resolved));
        }
        let registry = Self {
            store,
            checks: Vec::new(),
            tables: RwLock::new(tables),
            register_lock: tokio::sync::Mutex::new(()),
        };
        for seed in seed_tables() {
            if registry.get(&seed.name).is_none() {
                registry.register(seed).await?;
            }
        }
        Ok(registry)
    }

    /// Registers a table or a new version of it.
    ///
    /// Returns the resolved table and whether a new version was created. An identical
    /// definition returns the current version unchanged.
    pub async fn register(&self, schema: TableSchema) -> Result<(Arc<ResolvedTable>, bool)> {
        let _guard = self.register_lock.lock().await;
        // Another process sharing the store may have registered versions since: decide
        // against the store's current version. If it cannot be read, the cached one
        // still answers an identical registration; a new version needs the store anyway.
        if let Err(e) = self.reload_table(&schema.name).await {
            tracing::warn!(table = %schema.name, error = %e, "cannot re-read the registry; using the cached versions");
        }
        if self.get(&schema.name).is_none() {
            if let Some(why) = flight_schema::reserved_name(&schema.name) {
                return Err(Error::InvalidArgument(format!(
                    "table '{}' cannot be registered: {why}",
                    schema.name
                )));
            }
        }
        for _ in 0..MAX_REGISTER_ATTEMPTS {
            let current = self.get(&schema.name);
            let version = current.as_ref().map_or(1, |c| c.version + 1);
            let resolved = schema.validate(version)?;
            sluice_sql::reshape::check_defaults(&resolved)?;
            for check in &self.checks {
                check(&resolved)?;
            }
            check_retention(&resolved)?;
            if let Some(cur) = &current {
                if cur.definition == resolved.definition {
                    return Ok((cur.clone(), false));
                }
                check_evolution(cur, &resolved)?;
            }
            let stored = StoredVersion {
                version,
                registered_at: chrono::Utc::now().to_rfc3339(),
                schema: resolved.definition.clone(),
            };
            match self.store.append(&stored).await? {
                Appended::Stored => {
                    let resolved = Arc::new(resolved);
                    self.insert_version(&schema.name, resolved.clone());
                    tracing::info!(table = %schema.name, version, "table registered");
                    return Ok((resolved, true));
                }
                Appended::Conflict => {
                    tracing::debug!(table = %schema.name, version, "version registered elsewhere first; re-reading");
                    self.reload_table(&schema.name).await?;
                }
            }
        }
        Err(Error::Unavailable(format!(
            "table '{}': registration kept losing races with other registrations; try again",
            schema.name
        )))
    }

    /// Drops the versions no record still in the WAL was written at (`oldest`: the oldest
    /// version per table among the WAL's records), from memory and from the embedded
    /// store; the two newest versions of each table always stay (a batch may be on its
    /// way to the WAL at the one before a registration that just happened). Without this
    /// every version of a table stayed loaded forever. Returns how many were dropped.
    pub async fn compact(&self, oldest: &BTreeMap<String, u64>) -> Result<usize> {
        let mut keep: BTreeMap<String, u64> = BTreeMap::new();
        let mut dropped = 0;
        {
            let mut tables = self.tables.write().expect("registry lock");
            for (name, versions) in tables.iter_mut() {
                let newest_two = versions
                    .len()
                    .checked_sub(2)
                    .map_or(0, |i| versions[i].version);
                let floor = oldest
                    .get(name)
                    .copied()
                    .unwrap_or(u64::MAX)
                    .min(newest_two);
                let before = versions.len();
                versions.retain(|v| v.version >= floor);
                dropped += before - versions.len();
                keep.insert(name.clone(), floor);
            }
        }
        if dropped > 0 {
            let keep_fn = |name: &str, version: u64| keep.get(name).is_none_or(|f| version >= *f);
            self.store.compact(&keep_fn).await?;
            tracing::info!(
                dropped,
                "registry versions no WAL record needs any more were dropped"
            );
        }
        Ok(dropped)
    }

    /// Adds the store's versions of every table that this registry has not seen (other
    /// processes sharing the store may have registered some).
    pub async fn refresh(&self) -> Result<()> {
        let stored = self.store.load().await?;
        self.add_unseen(stored)
    }

    /// Adds the store's versions of `name` that this registry has not seen.
    pub async fn reload_table(&self, name: &str) -> Result<()> {
        let stored = self.store.load_table(name).await?;
        self.add_unseen(stored)
    }

    fn add_unseen(&self, mut stored: Vec<StoredVersion>) -> Result<()> {
        stored.sort_by(|a, b| (&a.schema.name, a.version).cmp(&(&b.schema.name, b.version)));
        for v in stored {
            let name = v.schema.name.clone();
            if self.get_version(&name, v.version).is_some() {
                continue;
            }
            // Below the oldest version kept here: compacted away, not new.
            let oldest = self
                .tables
                .read()
                .expect("registry lock")
                .get(&name)
                .and_then(|vs| vs.first().map(|t| t.version));
            if oldest.is_some_and(|o| v.version < o) {
                continue;
            }
            let resolved = match v.schema.validate(v.version) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(table = %name, version = v.version, error = %e,
                        "a stored registry entry is invalid; it is left out");
                    continue;
                }
            };
            tracing::debug!(table = %name, version = v.version, "table version read from the registry store");
            self.insert_version(&name, Arc::new(resolved));
        }
        Ok(())
    }

    /// Inserts a version, keeping the table's versions in order.
    fn insert_version(&self, name: &str, table: Arc<ResolvedTable>) {
        let mut tables = self.tables.write().expect("registry lock");
        let versions = tables.entry(name.to_string()).or_default();
        match versions.binary_search_by_key(&table.version, |t| t.version) {
            Ok(i) => versions[i] = table,
            Err(i) => versions.insert(i, table),
        }
    }

    /// The current version of a table.
    pub fn get(&self, name: &str) -> Option<Arc<ResolvedTable>> {
        self.tables
            .read()
            .expect("registry lock")
            .get(name)
            .and_then(|v| v.last().cloned())
    }

    /// A specific version of a table (WAL replay decodes with the version it was written at).
    pub fn get_version(&self, name: &str, version: u64) -> Option<Arc<ResolvedTable>> {
        self.tables
            .read()
            .expect("registry lock")
            .get(name)
            .and_then(|v| v.iter().find(|t| t.version == version).cloned())
    }

    /// Current versions of all tables, by name.
    pub fn list(&self) -> Vec<Arc<ResolvedTable>> {
        self.tables
            .read()
            .expect("registry lock")
            .values()
            .filter_map(|v| v.last().cloned())
            .collect()
    }
}

/// The JSON form of a registered table returned by `get_table`, `list_tables` and
/// `GET /schema`: the definition plus its `version`.
pub fn table_json(t: &ResolvedTable) -> serde_json::Value {
    let mut v = serde_json::to_value(&t.definition).expect("schema serializes");
    if let Some(o) = v.as_object_mut() {
        o.insert("version".into(), t.version.into());
        o.insert("time_column".into(), t.time_column.clone().into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(extra: &str) -> TableSchema {
        TableSchema::from_json(
            format!(
                r#"{{"name":"cpu","columns":[{{"name":"time","type":"timestamp"}},{{"name":"value","type":"double"}}{extra}]}}"#
            )
            .as_bytes(),
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn versions_no_wal_record_needs_are_compacted_in_memory_and_on_disk() {
        // Issue 10: every version was kept; 10 versions of a large schema made 1.3 GB RSS
        // and a 5 s restart.
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Box::new(FileRegistryStore::open(dir.path()).unwrap()))
            .await
            .unwrap();
        let mut extra = String::new();
        for i in 0..10 {
            if i > 0 {
                extra.push_str(&format!(r#",{{"name":"c{i}","type":"string"}}"#));
            }
            reg.register(cpu(&extra)).await.unwrap();
        }
        assert_eq!(reg.get("cpu").unwrap().version, 10);
        // The WAL still holds records of version 7 and later: 1..=6 go.
        let oldest = BTreeMap::from([("cpu".to_string(), 7)]);
        assert_eq!(reg.compact(&oldest).await.unwrap(), 6);
        assert!(reg.get_version("cpu", 6).is_none());
        assert!(reg.get_version("cpu", 7).is_some());
        // No record of it at all: the two newest stay.
        assert_eq!(reg.compact(&BTreeMap::new()).await.unwrap(), 2);
        assert!(reg.get_version("cpu", 8).is_none());
        assert!(reg.get_version("cpu", 9).is_some());
        drop(reg);
        // The embedded store was rewritten: a restart loads only what is left.
        let reg = Registry::open(Box::new(FileRegistryStore::open(dir.path()).unwrap()))
            .await
            .unwrap();
        let versions: Vec<u64> = (1..=10)
            .filter(|v| reg.get_version("cpu", *v).is_some())
            .collect();
        assert_eq!(versions, vec![9, 10]);
        // And the next registration still gets the next number.
        extra.push_str(r#",{"name":"c10","type":"string"}"#);
        assert_eq!(reg.register(cpu(&extra)).await.unwrap().0.version, 11);
    }

    #[tokio::test]
    async fn versions_persist_and_identical_registration_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Box::new(FileRegistryStore::open(dir.path()).unwrap()))
            .await
            .unwrap();
        assert!(
            reg.get("logs_events").is_some(),
            "seed tables are pre-registered"
        );
        let (t, created) = reg.register(cpu("")).await.unwrap();
        assert_eq!((t.version, created), (1, true));
        let (t, created) = reg.register(cpu("")).await.unwrap();
        assert_eq!((t.version, created), (1, false));
        let (t, _) = reg
            .register(cpu(r#",{"name":"host","type":"string"}"#))
            .await
            .unwrap();
        assert_eq!(t.version, 2);
        let e = reg
            .register(cpu(r#",{"name":"host","type":"int64"}"#))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("column 'host' changes type from string to int64"),
            "{e}"
        );
        drop(reg);

        let reg = Registry::open(Box::new(FileRegistryStore::open(dir.path()).unwrap()))
            .await
            .unwrap();
        assert_eq!(reg.get("cpu").unwrap().version, 2);
        assert_eq!(
            reg.get_version("cpu", 1)
                .unwrap()
                .arrow_schema
                .fields()
                .len(),
            2
        );
        assert_eq!(
            reg.list()
                .iter()
                .filter(|t| t.name() == "logs_events")
                .count(),
            1
        );

        // The store refuses a version it already holds, writing nothing.
        let store = FileRegistryStore::open(dir.path()).unwrap();
        let before = store.load().await.unwrap().len();
        let v1 = store.load_table("cpu").await.unwrap().remove(0);
        assert_eq!(v1.version, 1);
        assert_eq!(store.append(&v1).await.unwrap(), Appended::Conflict);
        assert_eq!(store.load().await.unwrap().len(), before);
    }
}
