//! A throwaway PostgreSQL for tests.
//!
//! [`PgServer::start`] gives each test its own database: a fresh database in the server at
//! `SLUICE_TEST_PG_URL` when that is set, otherwise its own cluster (initdb + pg_ctl, as
//! `/work/shared/INFRA.md` describes) on a free loopback port, stopped and deleted on drop.
//! Tests that stop PostgreSQL mid-stream ([`PgServer::stop`], [`PgServer::restart`]) need
//! their own cluster: use [`PgServer::start_local`], which ignores `SLUICE_TEST_PG_URL`.
//!
//! Every PostgreSQL test runs on two flavors ([`Flavor`], [`pg_test!`]): Debian's
//! PostgreSQL, and the same with TimescaleDB from `../shared/timescaledb` (its
//! `install-tree` lays out a private tree under /tmp; `SLUICE_TEST_TIMESCALEDB_URL`
//! names a server instead). Where that folder is absent the TimescaleDB variants are
//! compiled `#[ignore]`d (`server/build.rs`), so they show as ignored, never as passed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::free_port;

/// Which PostgreSQL a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Postgres,
    Timescale,
}

impl Flavor {
    fn env_var(self) -> &'static str {
        match self {
            Flavor::Postgres => "SLUICE_TEST_PG_URL",
            Flavor::Timescale => "SLUICE_TEST_TIMESCALEDB_URL",
        }
    }

    fn bin(self) -> PathBuf {
        match self {
            Flavor::Postgres => bin_dir(),
            Flavor::Timescale => timescaledb_bin(),
        }
    }

    fn options(self) -> &'static str {
        match self {
            Flavor::Postgres => "",
            Flavor::Timescale => {
                " -c shared_preload_libraries=timescaledb -c timescaledb.telemetry_level=off \
                 -c max_worker_processes=32 -c timescaledb.max_background_workers=16"
            }
        }
    }
}

/// Defines a test twice: `name::postgres` and `name::timescaledb` (ignored where
/// `../shared/timescaledb` is absent). The body gets the [`Flavor`] as `$flavor`.
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

/// One test's PostgreSQL. `url` is `postgresql://postgres@127.0.0.1:PORT/DB`.
pub struct PgServer {
    pub url: String,
    kind: Kind,
}

enum Kind {
    /// A database created in the server at `SLUICE_TEST_PG_URL`; `admin_url` reaches it.
    External { admin_url: String, database: String },
    /// Our own cluster in `dir` (`dir/data`, socket in `dir`, log `dir/server.log`).
    Local {
        dir: tempfile::TempDir,
        bin: PathBuf,
        port: u16,
        options: &'static str,
    },
}

impl PgServer {
    /// A fresh database: in `SLUICE_TEST_PG_URL`'s server if set, else in a new cluster.
    #[allow(dead_code)]
    pub fn start() -> PgServer {
        Self::start_on(Flavor::Postgres)
    }

    /// A fresh database of `flavor`: in the server its variable names if set, else in a
    /// new cluster.
    pub fn start_on(flavor: Flavor) -> PgServer {
        match std::env::var(flavor.env_var()) {
            Ok(url) if !url.trim().is_empty() => Self::external(url.trim()),
            _ => Self::start_local_on(flavor),
        }
    }

    /// A new cluster of our own (initdb, pg_ctl start), whatever the environment says.
    #[allow(dead_code)]
    pub fn start_local() -> PgServer {
        Self::start_local_on(Flavor::Postgres)
    }

    /// A new cluster of `flavor` of our own, whatever the environment says.
    pub fn start_local_on(flavor: Flavor) -> PgServer {
        Self::start_cluster(None, flavor)
    }

    /// A cluster of our own that takes only TLS over TCP (`ssl = on` with this certificate
    /// and key; `pg_hba.conf` rejects unencrypted TCP): role `pw` (password `secret`) logs
    /// in with SCRAM, everyone else is trusted.
    #[allow(dead_code)] // for the TLS tests
    pub fn start_local_tls(cert: &Path, key: &Path) -> PgServer {
        Self::start_cluster(Some((cert, key)), Flavor::Postgres)
    }

    fn start_cluster(tls: Option<(&Path, &Path)>, flavor: Flavor) -> PgServer {
        let bin = flavor.bin();
        let options = flavor.options();
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
            text.push_str(
                "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
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
        // A free port can be taken by a parallel test between our check and the server's
        // bind: try a few.
        for attempt in 0.. {
            let port = free_port();
            if pg_ctl_start(&bin, dir.path(), port, options)
                .status
                .success()
            {
                return PgServer {
                    url: format!("postgresql://postgres@127.0.0.1:{port}/postgres"),
                    kind: Kind::Local {
                        dir,
                        bin,
                        port,
                        options,
                    },
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

    fn external(admin_url: &str) -> PgServer {
        let database = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
        admin_sql(admin_url, format!("CREATE DATABASE {database}"));
        PgServer {
            url: with_database(admin_url, &database),
            kind: Kind::External {
                admin_url: admin_url.to_string(),
                database,
            },
        }
    }

    /// Connects to [`PgServer::url`].
    pub async fn client(&self) -> tokio_postgres::Client {
        sluice::postgres::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
    }

    /// Stops the server (`pg_ctl -m fast`); [`PgServer::restart`] brings it back on the
    /// same port with the same data. Only for clusters of our own.
    #[allow(dead_code)] // for the tests that stop PostgreSQL mid-stream
    pub fn stop(&self) {
        let (dir, bin, _, _) = self.local("stop");
        pg_ctl_stop(bin, dir, "fast");
    }

    /// Stops the server if it runs (`-m fast`) and starts it again on the same port and
    /// data directory.
    #[allow(dead_code)] // for the tests that stop PostgreSQL mid-stream
    pub fn restart(&self) {
        let (dir, bin, port, options) = self.local("restart");
        if pg_ctl(bin, dir)
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            pg_ctl_stop(bin, dir, "fast");
        }
        // The port was ours a moment ago; give the kernel a few tries if it lingers.
        for attempt in 0.. {
            if pg_ctl_start(bin, dir, port, options).status.success() {
                return;
            }
            if attempt == 20 {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                panic!("PostgreSQL did not restart on port {port}; server.log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn local(&self, what: &str) -> (&Path, &Path, u16, &'static str) {
        match &self.kind {
            Kind::Local {
                dir,
                bin,
                port,
                options,
            } => (dir.path(), bin, *port, options),
            Kind::External { .. } => panic!(
                "cannot {what} the PostgreSQL at SLUICE_TEST_PG_URL: use PgServer::start_local()"
            ),
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Local { dir, bin, .. } => {
                let _ = pg_ctl(bin, dir.path())
                    .args(["-m", "immediate", "-w", "stop"])
                    .output();
                // The TempDir removes the directory after this.
            }
            Kind::External {
                admin_url,
                database,
            } => {
                let sql = format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
                let url = admin_url.clone();
                // Best effort: never panic in drop.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    rt.block_on(async {
                        let client = sluice::postgres::connect(&url).await.ok()?;
                        client.batch_execute(&sql).await.ok()
                    })
                })
                .join();
            }
        }
    }
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

/// The bindir of a private PostgreSQL tree with TimescaleDB, laid out once by
/// `../shared/timescaledb/install-tree` under /tmp (the `postgres` user must read it).
fn timescaledb_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
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
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
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

fn pg_ctl_stop(bin: &Path, dir: &Path, mode: &str) {
    run(pg_ctl(bin, dir).args(["-m", mode, "-w", "-t", "60", "stop"]));
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

/// Runs one SQL statement against `url` on a thread of its own (so this works both inside
/// and outside a tokio runtime).
fn admin_sql(url: &str, sql: String) {
    let url = url.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = sluice::postgres::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connect to SLUICE_TEST_PG_URL ({url}): {e}"));
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        })
    })
    .join()
    .expect("admin SQL thread");
}

/// `url` pointing at `database` instead (URL or `key=value` connection string).
fn with_database(url: &str, database: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut parsed = url::Url::parse(url).expect("SLUICE_TEST_PG_URL is a valid URL");
        parsed.set_path(&format!("/{database}"));
        parsed.to_string()
    } else {
        format!("{url} dbname={database}")
    }
}
