//! Throwaway PostgreSQL for tests: initdb + pg_ctl clusters (as `/work/shared/INFRA.md`
//! describes) under `/tmp`, on a free loopback port, stopped (`-m immediate`) and deleted
//! when done; run as `postgres` (`runuser`) when the tests run as root.
//!
//! Two ways to get one, each test with a database of its own:
//! - [`TestDb`] (the unit tests): a fresh database in the server `SLUICE_TEST_PG_URL`
//!   (`SLUICE_TEST_TIMESCALEDB_URL` for [`Flavor::Timescale`]) names when that is set,
//!   otherwise in one cluster per [`Flavor`] shared by the tests running at the same time
//!   and stopped when the last of them is done. Dropped with `DROP DATABASE ... (FORCE)`.
//! - [`PgServer`] (the end-to-end tests): a fresh database in the server the same
//!   variables name, otherwise a cluster of its own. Tests that stop PostgreSQL
//!   mid-stream ([`PgServer::stop`], [`PgServer::restart`]) or need TLS
//!   ([`PgServer::start_local_tls`]) always get a cluster of their own
//!   ([`PgServer::start_local`] ignores the variables).
//!
//! Every PostgreSQL test can run on two flavors ([`Flavor`], [`pg_test!`](crate::pg_test)):
//! Debian's PostgreSQL (the newest under `/usr/lib/postgresql`), and the same with
//! TimescaleDB from `../shared/timescaledb` (`SLUICE_TIMESCALEDB_DIR` at build time; its
//! `install-tree` lays out a private tree under /tmp). Where that folder is absent the
//! TimescaleDB variants are compiled `#[ignore]`d (`server/build.rs`, the build script of
//! this crate and of every crate whose tests run on PostgreSQL), so they show as ignored,
//! never as passed. Connections from here are plain (`NoTls`): the servers are on loopback.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// Which PostgreSQL a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Debian's PostgreSQL.
    Postgres,
    /// The same with TimescaleDB, preloaded.
    Timescale,
    /// TimescaleDB installed but not in `shared_preload_libraries`.
    TimescaleNotPreloaded,
}

impl Flavor {
    /// `SLUICE_TEST_PG_URL` / `SLUICE_TEST_TIMESCALEDB_URL`: a server to use instead of a
    /// cluster of our own.
    fn env_url(self) -> Option<String> {
        let var = match self {
            Flavor::Postgres => "SLUICE_TEST_PG_URL",
            Flavor::Timescale => "SLUICE_TEST_TIMESCALEDB_URL",
            Flavor::TimescaleNotPreloaded => return None,
        };
        std::env::var(var)
            .ok()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
    }

    fn bin(self) -> PathBuf {
        match self {
            Flavor::Postgres => bin_dir(),
            Flavor::Timescale | Flavor::TimescaleNotPreloaded => timescaledb_bin(),
        }
    }

    /// Extra server options. A shared cluster holds many test databases, each with a
    /// TimescaleDB job scheduler of its own: room for many.
    fn options(self, shared: bool) -> &'static str {
        match (self, shared) {
            (Flavor::Timescale, true) => {
                " -c shared_preload_libraries=timescaledb -c timescaledb.telemetry_level=off \
                 -c max_worker_processes=64 -c timescaledb.max_background_workers=48"
            }
            (Flavor::Timescale, false) => {
                " -c shared_preload_libraries=timescaledb -c timescaledb.telemetry_level=off \
                 -c max_worker_processes=32 -c timescaledb.max_background_workers=16"
            }
            _ => "",
        }
    }
}

/// Defines a test twice, on PostgreSQL and on TimescaleDB: `name::postgres` and
/// `name::timescaledb` (ignored where `../shared/timescaledb` is absent: the cfg
/// `timescaledb_tests` is the calling crate's, set by `server/build.rs`). The body gets the
/// [`Flavor`](crate::pg::Flavor) as `$flavor`.
///
/// ```text
/// sluice_test_support::pg_test! {
///     #[tokio::test]
///     async fn it_works(flavor) {
///         let db = sluice_test_support::pg::TestDb::on(flavor).await;
///     }
/// }
/// ```
#[macro_export]
macro_rules! pg_test {
    ($(#[$attr:meta])* async fn $name:ident($flavor:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::pg::Flavor;

            async fn body($flavor: Flavor) $body

            $(#[$attr])*
            async fn postgres() {
                body(Flavor::Postgres).await
            }

            $(#[$attr])*
            #[cfg_attr(
                not(timescaledb_tests),
                ignore = "needs ../shared/timescaledb (TimescaleDB for the tests)"
            )]
            async fn timescaledb() {
                body(Flavor::Timescale).await
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// Per-test databases in a shared cluster (or in the server the environment names)

/// One shared cluster per flavor, stopped when its last test is done.
static CLUSTERS: Mutex<[Weak<Cluster>; 3]> = Mutex::new([Weak::new(), Weak::new(), Weak::new()]);

/// A database of its own for one test; dropped (and the shared cluster stopped, if this
/// was its last user) when this goes away.
pub struct TestDb {
    /// `postgresql://postgres@127.0.0.1:PORT/DB` (or the variable's URL with this
    /// database).
    pub url: String,
    // Dropped before the cluster it lives in.
    _database: Database,
    _cluster: Option<Arc<Cluster>>,
}

impl TestDb {
    /// A database on Debian's PostgreSQL.
    pub async fn new() -> TestDb {
        Self::on(Flavor::Postgres).await
    }

    /// A database on the given flavor of PostgreSQL.
    pub async fn on(flavor: Flavor) -> TestDb {
        tokio::task::spawn_blocking(move || Self::on_blocking(flavor))
            .await
            .unwrap_or_else(|e| match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("{e}"),
            })
    }

    fn on_blocking(flavor: Flavor) -> TestDb {
        let (admin_url, cluster) = match flavor.env_url() {
            Some(url) => (url, None),
            None => {
                let cluster = {
                    let mut slots = CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
                    let slot = &mut slots[flavor as usize];
                    match slot.upgrade() {
                        Some(c) => c,
                        None => {
                            let c = Arc::new(Cluster::start(flavor, true, None));
                            *slot = Arc::downgrade(&c);
                            c
                        }
                    }
                };
                (cluster.url(), Some(cluster))
            }
        };
        let database = Database::create(&admin_url);
        TestDb {
            url: database.url.clone(),
            _database: database,
            _cluster: cluster,
        }
    }

    /// Connects to [`TestDb::url`].
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

// ---------------------------------------------------------------------------------------
// A server per test: a cluster of its own, or a database in the server the environment names

/// One test's PostgreSQL. `url` is `postgresql://postgres@127.0.0.1:PORT/DB`.
pub struct PgServer {
    pub url: String,
    kind: Kind,
}

enum Kind {
    /// A database created in the server the environment names.
    External { _database: Database },
    /// Our own cluster.
    Local(Cluster),
}

impl PgServer {
    /// A fresh database: in `SLUICE_TEST_PG_URL`'s server if set, else in a new cluster.
    pub fn start() -> PgServer {
        Self::start_on(Flavor::Postgres)
    }

    /// A fresh database of `flavor`: in the server its variable names if set, else in a
    /// new cluster.
    pub fn start_on(flavor: Flavor) -> PgServer {
        match flavor.env_url() {
            Some(url) => {
                let database = Database::create(&url);
                PgServer {
                    url: database.url.clone(),
                    kind: Kind::External {
                        _database: database,
                    },
                }
            }
            None => Self::start_local_on(flavor),
        }
    }

    /// A new cluster of our own (initdb, pg_ctl start), whatever the environment says.
    pub fn start_local() -> PgServer {
        Self::start_local_on(Flavor::Postgres)
    }

    /// A new cluster of `flavor` of our own, whatever the environment says.
    pub fn start_local_on(flavor: Flavor) -> PgServer {
        Self::local(Cluster::start(flavor, false, None))
    }

    /// A cluster of our own that takes only TLS over TCP (`ssl = on` with this certificate
    /// and key; `pg_hba.conf` rejects unencrypted TCP): role `pw` (password `secret`) logs
    /// in with SCRAM, everyone else is trusted.
    pub fn start_local_tls(cert: &Path, key: &Path) -> PgServer {
        Self::local(Cluster::start(Flavor::Postgres, false, Some((cert, key))))
    }

    fn local(cluster: Cluster) -> PgServer {
        PgServer {
            url: cluster.url(),
            kind: Kind::Local(cluster),
        }
    }

    /// Connects to [`PgServer::url`] (without TLS: not for [`PgServer::start_local_tls`]).
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Stops the server (`pg_ctl -m fast`); [`PgServer::restart`] brings it back on the
    /// same port with the same data. Only for clusters of our own.
    pub fn stop(&self) {
        self.cluster("stop").stop("fast");
    }

    /// Stops the server if it runs (`-m fast`) and starts it again on the same port and
    /// data directory.
    pub fn restart(&self) {
        self.cluster("restart").restart();
    }

    fn cluster(&self, what: &str) -> &Cluster {
        match &self.kind {
            Kind::Local(cluster) => cluster,
            Kind::External { .. } => panic!(
                "cannot {what} the PostgreSQL at SLUICE_TEST_PG_URL: use PgServer::start_local()"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// A cluster of our own

/// A cluster in `dir` (`dir/data`, socket in `dir`, log `dir/server.log`), stopped
/// (`-m immediate`) and deleted on drop.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    options: &'static str,
}

impl Cluster {
    /// initdb and pg_ctl start; `shared`: for the per-test databases of [`TestDb`];
    /// `tls`: the server's certificate and key (TLS only over TCP, see
    /// [`PgServer::start_local_tls`]).
    fn start(flavor: Flavor, shared: bool, tls: Option<(&Path, &Path)>) -> Cluster {
        let bin = flavor.bin();
        let options = flavor.options(shared);
        // Under /tmp: the `postgres` user must reach it (TMPDIR may be private to root),
        // and the socket path must stay short.
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir for PostgreSQL");
        if is_root() {
            // PostgreSQL refuses to run as root: the cluster belongs to `postgres`.
            run(Command::new("chown").arg("postgres:").arg(dir.path()));
        }
        let data = dir.path().join("data");
        run(as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync"));
        if let Some((cert, key)) = tls {
            configure_tls(&data, cert, key);
        }
        // A free port can be taken by a parallel test between our check and the server's
        // bind: try a few.
        for attempt in 0.. {
            let port = free_port();
            if pg_ctl_start(&bin, dir.path(), port, options)
                .status
                .success()
            {
                return Cluster {
                    dir,
                    bin,
                    port,
                    options,
                };
            }
            if attempt == 4 {
                let log =
                    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                panic!("PostgreSQL did not start; server.log:\n{log}");
            }
        }
        unreachable!()
    }

    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn stop(&self, mode: &str) {
        run(pg_ctl(&self.bin, self.dir.path()).args(["-m", mode, "-w", "-t", "60", "stop"]));
    }

    fn restart(&self) {
        let (bin, dir, port) = (&self.bin, self.dir.path(), self.port);
        if pg_ctl(bin, dir)
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            self.stop("fast");
        }
        // The port was ours a moment ago; give the kernel a few tries if it lingers.
        for attempt in 0.. {
            if pg_ctl_start(bin, dir, port, self.options).status.success() {
                return;
            }
            if attempt == 20 {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                panic!("PostgreSQL did not restart on port {port}; server.log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = pg_ctl(&self.bin, self.dir.path())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        // The TempDir removes the directory after this.
    }
}

/// `ssl = on` with `cert` and `key`; `pg_hba.conf`: TLS only over TCP, role `pw` with
/// SCRAM, everyone else trusted.
fn configure_tls(data: &Path, cert: &Path, key: &Path) {
    std::fs::copy(cert, data.join("server.crt")).expect("copy the server certificate");
    std::fs::copy(key, data.join("server.key")).expect("copy the server key");
    run(Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key")));
    if is_root() {
        run(Command::new("chown")
            .arg("postgres:")
            .arg(data.join("server.crt"))
            .arg(data.join("server.key")));
    }
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).expect("postgresql.conf");
    text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, text).expect("write postgresql.conf");
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all pw 127.0.0.1/32 scram-sha-256\n\
         hostssl all all 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 reject\n",
    )
    .expect("write pg_hba.conf");
}

/// `/usr/lib/postgresql/<newest>/bin`.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e} (is PostgreSQL installed?)", root.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            e.path().join("bin/pg_ctl").exists().then_some(version)
        })
        .max()
        .unwrap_or_else(|| panic!("no PostgreSQL under {}", root.display()));
    root.join(newest.to_string()).join("bin")
}

/// The bindir of a private PostgreSQL tree with TimescaleDB, laid out once per machine by
/// `../shared/timescaledb/install-tree` under /tmp (the `postgres` user must read it).
pub fn timescaledb_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let Some(dir) = option_env!("SLUICE_TIMESCALEDB_DIR") else {
            panic!("no TimescaleDB build (../shared/timescaledb): this test should be ignored")
        };
        let out =
            run(Command::new(Path::new(dir).join("install-tree")).arg("/tmp/sluice-timescaledb"));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

/// `program`, run as `postgres` when we are root.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn pg_ctl(bin: &Path, dir: &Path) -> Command {
    let mut cmd = as_postgres(&bin.join("pg_ctl"));
    cmd.arg("-D").arg(dir.join("data"));
    cmd
}

fn pg_ctl_start(bin: &Path, dir: &Path, port: u16, extra: &str) -> Output {
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off{extra}",
        dir.display()
    );
    pg_ctl(bin, dir)
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "60", "-o", &options, "start"])
        .output()
        .expect("run pg_ctl start")
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Runs `cmd` and panics with its output if it fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------
// One test's database in a server

/// A database created in the server at `admin_url`, dropped (`WITH (FORCE)`, best effort)
/// on drop.
struct Database {
    /// `admin_url` with this database.
    url: String,
    admin_url: String,
    name: String,
}

impl Database {
    fn create(admin_url: &str) -> Database {
        let name = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
        admin_sql(admin_url, format!("CREATE DATABASE {name}")).unwrap_or_else(|e| panic!("{e}"));
        Database {
            url: with_database(admin_url, &name),
            admin_url: admin_url.to_string(),
            name,
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // Best effort: never panic in drop.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = admin_sql(&self.admin_url, sql);
    }
}

/// Runs one SQL statement against `url` on a thread of its own, with a runtime of its own
/// (so this works inside and outside a tokio runtime, and after the test's is gone).
fn admin_sql(url: &str, sql: String) -> Result<(), String> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("connect to {url}: {e}"))?;
            let connection = tokio::spawn(connection);
            let done = client
                .batch_execute(&sql)
                .await
                .map_err(|e| format!("{sql}: {e}"));
            drop(client);
            let _ = connection.await;
            done
        })
    })
    .join()
    .map_err(|_| "the admin SQL thread panicked".to_string())?
}

/// Connects to `url` (no TLS) and drives the connection on a task of the current runtime.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `url` pointing at `database` instead (URL or `key=value` connection string).
fn with_database(url: &str, database: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut parsed = url::Url::parse(url).expect("the PostgreSQL URL is a valid URL");
        parsed.set_path(&format!("/{database}"));
        parsed.to_string()
    } else {
        format!("{url} dbname={database}")
    }
}
