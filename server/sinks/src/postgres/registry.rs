//! The schema registry kept in PostgreSQL: a [`RegistryStore`] over `table_registry`.
//!
//! # What flows in and out
//! In: versions the [`sluice_core::registry::Registry`] decided to add. Out: every version
//! stored, for a registry opening. Each version is a row of `sluice.table_registry_versions`
//! (`schema` = the registered definition as JSON); `table_registry` (the seed's table,
//! plus `version` and `updated_at`) holds each table's current definition for people and
//! dashboards that read it.
//!
//! Several sluice processes may share one database. [`PgRegistryStore::append`] takes a
//! per-table advisory lock and adds a version only if it is the table's next one; a
//! process that lost the race gets [`Appended::Conflict`] and its registry re-reads the
//! table and decides again, so no version is ever duplicated or skipped.

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use flight_schema::TableSchema;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use tokio_postgres::Client;

use super::migrate::{connect_error, pg_error};
use sluice_core::error::{Error, Result};
use sluice_core::registry::{Appended, RegistryStore, StoredVersion};

/// The registry store in PostgreSQL. Holds one connection, remade when it breaks.
pub struct PgRegistryStore {
    url: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl PgRegistryStore {
    /// Connects to `url` (a database `sluice migrate` has set up).
    pub async fn connect(url: &str) -> Result<Self> {
        let client = open(url).await?;
        Ok(Self {
            url: url.to_string(),
            client: tokio::sync::Mutex::new(Some(client)),
        })
    }

    /// The connection, remade if it has closed.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(open(&self.url).await?);
        }
        Ok(guard)
    }
}

async fn open(url: &str) -> Result<Client> {
    super::connect(url).await.map_err(|e| {
        connect_error("cannot connect to PostgreSQL for the schema registry", e).into()
    })
}

fn stored_version(
    name: &str,
    version: i64,
    at: SystemTime,
    schema: serde_json::Value,
) -> Result<StoredVersion> {
    let schema: TableSchema = serde_json::from_value(schema).map_err(|e| {
        Error::Internal(format!(
            "table_registry_versions: {name} version {version} does not hold a table schema: {e}"
        ))
    })?;
    Ok(StoredVersion {
        version: version as u64,
        registered_at: DateTime::<Utc>::from(at).to_rfc3339_opts(SecondsFormat::Micros, true),
        schema,
    })
}

const SELECT: &str =
    "SELECT table_name, version, registered_at, schema FROM sluice.table_registry_versions";

/// The stored versions; a row that does not hold a table schema is left out with an
/// error in the log (one such row must not stop every start).
fn rows_to_versions(rows: &[tokio_postgres::Row]) -> Result<Vec<StoredVersion>> {
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            stored_version(&name, r.get(1), r.get(2), r.get(3))
                .map_err(|e| tracing::error!(error = %e, "an unreadable registry row is left out"))
                .ok()
        })
        .collect())
}

#[async_trait::async_trait]
impl RegistryStore for PgRegistryStore {
    async fn load(&self) -> Result<Vec<StoredVersion>> {
        let guard = self.client().await?;
        let client = guard.as_ref().expect("connected");
        let rows = client
            .query(&format!("{SELECT} ORDER BY table_name, version"), &[])
            .await
            .map_err(|e| pg_error("cannot read the schema registry", e))?;
        rows_to_versions(&rows)
    }

    async fn load_table(&self, name: &str) -> Result<Vec<StoredVersion>> {
        let guard = self.client().await?;
        let client = guard.as_ref().expect("connected");
        let rows = client
            .query(
                &format!("{SELECT} WHERE table_name = $1 ORDER BY version"),
                &[&name],
            )
            .await
            .map_err(|e| pg_error("cannot read the schema registry", e))?;
        rows_to_versions(&rows)
    }

    async fn append(&self, v: &StoredVersion) -> Result<Appended> {
        let name = v.schema.name.as_str();
        let version = i64::try_from(v.version).map_err(|_| {
            Error::Internal(format!(
                "table '{name}': version {} is too large",
                v.version
            ))
        })?;
        let schema = serde_json::to_value(&v.schema).map_err(Error::internal)?;
        let registered_at: SystemTime = DateTime::parse_from_rfc3339(&v.registered_at)
            .map(|t| t.with_timezone(&Utc).into())
            .unwrap_or_else(|_| SystemTime::now());
        let what = |e| {
            pg_error(
                &format!("cannot register table '{name}' version {version}"),
                e,
            )
        };

        let mut guard = self.client().await?;
        let client = guard.as_mut().expect("connected");
        let tx = client.transaction().await.map_err(what)?;
        // Registrations of one table take turns, across processes.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('sluice.registry'), hashtext($1))",
            &[&name],
        )
        .await
        .map_err(what)?;
        let latest: i64 = tx
            .query_one(
                "SELECT COALESCE(max(version), 0) FROM sluice.table_registry_versions WHERE table_name = $1",
                &[&name],
            )
            .await
            .map_err(what)?
            .get(0);
        if latest >= version {
            tx.rollback().await.map_err(what)?;
            return Ok(Appended::Conflict);
        }
        if latest + 1 != version {
            tx.rollback().await.map_err(what)?;
            return Err(Error::Internal(format!(
                "table '{name}': the registry in PostgreSQL is at version {latest}, cannot add version {version}"
            )));
        }
        let inserted = tx
            .execute(
                "INSERT INTO sluice.table_registry_versions (table_name, version, schema, registered_at)
                 VALUES ($1, $2, $3, $4)",
                &[&name, &version, &Json(&schema), &registered_at],
            )
            .await;
        match inserted {
            Ok(_) => {}
            // Only possible if something wrote without the lock; still a lost race.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tx.rollback().await.map_err(what)?;
                return Ok(Appended::Conflict);
            }
            Err(e) => return Err(what(e).into()),
        }
        tx.execute(
            "INSERT INTO table_registry (table_name, schema, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (table_name) DO UPDATE
               SET schema = EXCLUDED.schema, version = EXCLUDED.version, updated_at = now()",
            &[&name, &Json(&schema), &version, &registered_at],
        )
        .await
        .map_err(what)?;
        tx.commit().await.map_err(what)?;
        Ok(Appended::Stored)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::super::migrate::migrate;
    use super::*;
    use sluice_core::registry::Registry;
    use sluice_test_support::pg::TestDb;
    use sluice_test_support::pg_test;

    fn table(name: &str, extra: usize) -> TableSchema {
        let mut cols = vec![
            r#"{"name":"time","type":"timestamp"}"#.to_string(),
            r#"{"name":"value","type":"double"}"#.to_string(),
        ];
        cols.extend((0..extra).map(|i| format!(r#"{{"name":"c{i}","type":"string"}}"#)));
        TableSchema::from_json(
            format!(r#"{{"name":"{name}","columns":[{}]}}"#, cols.join(",")).as_bytes(),
            None,
        )
        .unwrap()
    }

    async fn migrated(db: &TestDb) {
        migrate(&mut db.client().await).await.unwrap();
    }

    async fn registry(db: &TestDb) -> Registry {
        Registry::open(Box::new(PgRegistryStore::connect(&db.url).await.unwrap()))
            .await
            .unwrap()
    }

    /// A store that counts the races it reported lost.
    struct Counting(PgRegistryStore, Arc<AtomicUsize>);

    #[async_trait::async_trait]
    impl RegistryStore for Counting {
        async fn load(&self) -> Result<Vec<StoredVersion>> {
            self.0.load().await
        }
        async fn load_table(&self, name: &str) -> Result<Vec<StoredVersion>> {
            self.0.load_table(name).await
        }
        async fn append(&self, v: &StoredVersion) -> Result<Appended> {
            let r = self.0.append(v).await?;
            if r == Appended::Conflict {
                self.1.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r)
        }
    }

    async fn counted_registry(db: &TestDb, conflicts: &Arc<AtomicUsize>) -> Registry {
        let store = PgRegistryStore::connect(&db.url).await.unwrap();
        Registry::open(Box::new(Counting(store, conflicts.clone())))
            .await
            .unwrap()
    }

    /// Every stored version per table, checked to be 1..n without gaps or duplicates.
    async fn stored_versions(db: &TestDb) -> BTreeMap<String, u64> {
        let client = db.client().await;
        let mut out = BTreeMap::new();
        for r in client
            .query(
                "SELECT table_name, array_agg(version ORDER BY version) FROM sluice.table_registry_versions GROUP BY 1",
                &[],
            )
            .await
            .unwrap()
        {
            let name: String = r.get(0);
            let versions: Vec<i64> = r.get(1);
            let n = versions.len() as i64;
            assert_eq!(versions, (1..=n).collect::<Vec<_>>(), "{name}");
            let current: i64 = client
                .query_one(
                    "SELECT version FROM table_registry WHERE table_name = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(current, n, "table_registry holds {name}'s latest version");
            out.insert(name, n as u64);
        }
        out
    }

    pg_test! {
    #[tokio::test]
    async fn versions_persist_across_reopen(flavor) {
        let db = TestDb::on(flavor).await;
        migrated(&db).await;
        let reg = registry(&db).await;
        assert!(
            reg.get("logs_events").is_some(),
            "seed tables are registered"
        );
        assert_eq!(reg.register(table("cpu", 0)).await.unwrap().0.version, 1);
        let (t, created) = reg.register(table("cpu", 0)).await.unwrap();
        assert_eq!((t.version, created), (1, false));
        assert_eq!(reg.register(table("cpu", 1)).await.unwrap().0.version, 2);
        let e = reg.register(table("cpu", 0)).await.unwrap_err();
        assert!(
            e.to_string().contains("c0"),
            "dropping a column is refused: {e}"
        );
        drop(reg);

        let reg = registry(&db).await;
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
            reg.get_version("cpu", 2).unwrap().definition,
            table("cpu", 1)
        );
        let seeds = flight_schema::seeds::seed_tables().len();
        let stored = stored_versions(&db).await;
        assert_eq!(stored.len(), seeds + 1, "seeds were not registered twice");
        assert_eq!(stored["cpu"], 2);

        // The current definition is readable as plain JSON in the seed's table.
        let client = db.client().await;
        let row = client
            .query_one(
                "SELECT schema->>'name', jsonb_array_length(schema->'columns'), version
                 FROM table_registry WHERE table_name = 'cpu'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (
                row.get::<_, String>(0),
                row.get::<_, i32>(1),
                row.get::<_, i64>(2)
            ),
            ("cpu".to_string(), 3, 2)
        );

        // A store whose version is taken answers Conflict and writes nothing.
        let store = PgRegistryStore::connect(&db.url).await.unwrap();
        let v1 = store.load_table("cpu").await.unwrap();
        assert_eq!(v1.len(), 2);
        assert_eq!(store.append(&v1[0]).await.unwrap(), Appended::Conflict);
        let mut gap = v1[1].clone();
        gap.version = 4;
        assert!(store.append(&gap).await.is_err(), "a gap is refused");
        assert_eq!(stored_versions(&db).await["cpu"], 2);
    }
    }

    pg_test! {
    #[tokio::test]
    async fn a_store_without_migrations_says_so(flavor) {
        let db = TestDb::on(flavor).await;
        let store = PgRegistryStore::connect(&db.url).await.unwrap();
        let e = store.load().await.unwrap_err();
        assert!(
            matches!(&e, Error::FailedPrecondition(m) if m.contains("sluice migrate")),
            "{e}"
        );
        let e = PgRegistryStore::connect("postgresql://postgres@127.0.0.1:1/x")
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
    }
    }

    pg_test! {
    #[tokio::test]
    async fn two_processes_register_concurrently_without_duplicates_or_gaps(flavor) {
        let db = TestDb::on(flavor).await;
        migrated(&db).await;
        // Both open at once on an empty registry: both register the seeds.
        let conflicts = Arc::new(AtomicUsize::new(0));
        let (a, b) = tokio::join!(
            counted_registry(&db, &conflicts),
            counted_registry(&db, &conflicts)
        );
        let seeds = stored_versions(&db).await;
        assert!(seeds.values().all(|v| *v == 1), "{seeds:?}");

        for round in 0..20 {
            // A new table, registered by both at once.
            let name = format!("t{round}");
            let (ra, rb) = tokio::join!(a.register(table(&name, 0)), b.register(table(&name, 0)));
            let (ta, ca) = ra.unwrap();
            let (tb, cb) = rb.unwrap();
            assert_eq!((ta.version, tb.version), (1, 1), "round {round}");
            assert!(
                ca ^ cb,
                "exactly one created it (round {round}: {ca}, {cb})"
            );

            // The same compatible evolution of one shared table, raced from both.
            let (ra, rb) = tokio::join!(
                a.register(table("shared", round)),
                b.register(table("shared", round))
            );
            let (ta, ca) = ra.unwrap();
            let (tb, cb) = rb.unwrap();
            let want = round as u64 + 1;
            assert_eq!((ta.version, tb.version), (want, want), "round {round}");
            assert!(ca ^ cb, "exactly one created version {want}");
            assert_eq!(ta.definition, tb.definition);
        }
        // One side ahead: b has not seen the last version yet, registers a further
        // evolution and gets the next number.
        let (t, created) = a.register(table("shared", 20)).await.unwrap();
        assert_eq!((t.version, created), (21, true));
        let (t, created) = b.register(table("shared", 21)).await.unwrap();
        assert_eq!((t.version, created), (22, true));
        assert_eq!(
            b.get_version("shared", 21).unwrap().definition,
            table("shared", 20)
        );
        // ...and a stale, identical registration on a returns the store's current version.
        let (t, created) = a.register(table("shared", 21)).await.unwrap();
        assert_eq!((t.version, created), (22, false));

        // The races were real: the store turned versions away and the registries retried.
        assert!(
            conflicts.load(Ordering::Relaxed) >= 20,
            "only {} conflicts",
            conflicts.load(Ordering::Relaxed)
        );
        let stored = stored_versions(&db).await;
        assert_eq!(stored["shared"], 22);
        for round in 0..20 {
            assert_eq!(stored[&format!("t{round}")], 1);
        }
        // A third process sees the same history.
        let c = registry(&db).await;
        assert_eq!(c.get("shared").unwrap().version, 22);
        for v in 1..=22u64 {
            assert_eq!(
                c.get_version("shared", v).unwrap().definition,
                table("shared", v as usize - 1)
            );
        }
    }
    }
}
