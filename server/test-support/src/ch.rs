//! Throwaway ClickHouse for tests: a server from the PyPI wheel `chdb-core` (as
//! `/work/shared/INFRA.md` describes; `scripts/test` installs it), started from the
//! repository's `.venv` python (else `python3`): a temp dir with a `config.xml` naming free
//! loopback HTTP and TCP ports, and a Python process whose chdb query keeps the listeners
//! up. It is killed and its directory deleted when dropped, and it exits (deleting its
//! directory) when the test process closes its stdin, i.e. when the process ends.
//!
//! `SLUICE_TEST_CH_URL` (an HTTP URL such as `http://127.0.0.1:8123`) names a server to use
//! instead of starting one. Three ways to get one:
//! - [`TestDb`] (the unit tests): a fresh database on the [`shared`] server of this test
//!   process (`SLUICE_TEST_CH_URL`'s, else a chdb server started on first use), or on a
//!   [`TestServer`] of the test's own ([`TestServer::start`], which can take extra
//!   configuration). Dropped (`DROP DATABASE ... SYNC`) when done.
//! - [`ChServer`] (the end-to-end tests): a fresh database in `SLUICE_TEST_CH_URL`'s server
//!   if set, else a server of its own (database `default`), with `query`/`insert` helpers
//!   over HTTP. Tests that stop ClickHouse mid-stream ([`ChServer::stop`],
//!   [`ChServer::restart`]) need a server of their own: [`ChServer::start_local`] ignores
//!   `SLUICE_TEST_CH_URL`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer `/ping` (the first import of chdb is slow).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The query that keeps a chdb process serving: it opens the listeners, then sleeps a row
/// a second for a day.
const SERVE: &str = "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; \
    SELECT sleepEachRow(1) FROM numbers(86400) SETTINGS max_block_size=1 FORMAT Null";

/// Serves `argv[1]/data` (with `config.xml` from the working directory) until killed, or
/// until stdin closes: then it removes `argv[1]` and exits.
const SCRIPT: &str = r#"
import os, shutil, sys, threading
d = sys.argv[1]
def watch():
    sys.stdin.buffer.read()
    shutil.rmtree(d, ignore_errors=True)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
import chdb._chdb as c
c.query(sys.argv[2], 'CSV', path=os.path.join(d, 'data'))
"#;

// ---------------------------------------------------------------------------------------
// Servers

/// A ClickHouse server: a chdb process of our own, or the one at `SLUICE_TEST_CH_URL`.
/// `url` is its HTTP endpoint, no trailing slash.
pub struct TestServer {
    pub url: String,
    local: Option<Local>,
}

/// Our own chdb process serving from `dir` (`dir/config.xml`, data in `dir/data`, output
/// in `dir/server.log`).
struct Local {
    dir: tempfile::TempDir,
    python: PathBuf,
    http_port: u16,
    process: Mutex<Option<Child>>,
}

impl TestServer {
    /// Starts a chdb server of our own, whatever the environment says; `extra_config` is
    /// XML put inside `<clickhouse>`, and `{dir}` in it is replaced by the server's
    /// directory.
    pub fn start(extra_config: &str) -> TestServer {
        let python = python();
        let dir = tempfile::Builder::new()
            .prefix("sluice-ch-")
            .tempdir()
            .expect("temp dir for ClickHouse");
        // A free port can be taken by a parallel test between our check and the server's
        // bind: try a few.
        for attempt in 0.. {
            let (http_port, tcp_port) = (free_port(), free_port());
            std::fs::write(
                dir.path().join("config.xml"),
                format!(
                    "<clickhouse><http_port>{http_port}</http_port><tcp_port>{tcp_port}</tcp_port>\
                     <listen_host>127.0.0.1</listen_host>{}</clickhouse>\n",
                    extra_config.replace("{dir}", &dir.path().to_string_lossy())
                ),
            )
            .expect("write config.xml");
            match serve(&python, dir.path(), http_port) {
                Ok(child) => {
                    return TestServer {
                        url: format!("http://127.0.0.1:{http_port}"),
                        local: Some(Local {
                            dir,
                            python,
                            http_port,
                            process: Mutex::new(Some(child)),
                        }),
                    };
                }
                Err(log) if attempt == 4 => panic!("ClickHouse (chdb) did not start:\n{log}"),
                Err(_) => {}
            }
        }
        unreachable!()
    }

    /// The server at `SLUICE_TEST_CH_URL`, if that is set.
    fn from_env() -> Option<TestServer> {
        let url = std::env::var("SLUICE_TEST_CH_URL").ok()?;
        let url = url.trim().trim_end_matches('/');
        (!url.is_empty()).then(|| TestServer {
            url: url.to_string(),
            local: None,
        })
    }

    /// The server's directory (None for `SLUICE_TEST_CH_URL`).
    pub fn dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.dir.path())
    }

    /// Kills the server; the data stays and [`TestServer::restart`] serves it again on the
    /// same ports. Only for servers of our own.
    pub fn stop(&self) {
        let local = self.local("stop");
        if let Some(mut child) = local.process.lock().unwrap().take() {
            kill(&mut child);
        }
    }

    /// Stops the server if it runs and starts it again on the same ports and data.
    pub fn restart(&self) {
        self.stop();
        let local = self.local("restart");
        let port = local.http_port;
        // The port was ours a moment ago; give the kernel a few tries if it lingers.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match serve(&local.python, local.dir.path(), port) {
                Ok(child) => {
                    *local.process.lock().unwrap() = Some(child);
                    return;
                }
                Err(log) if Instant::now() > deadline => {
                    panic!("ClickHouse (chdb) did not restart on port {port}:\n{log}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    fn local(&self, what: &str) -> &Local {
        self.local.as_ref().unwrap_or_else(|| {
            panic!("cannot {what} the ClickHouse at SLUICE_TEST_CH_URL: use a server of our own")
        })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(local) = &self.local {
            if let Some(mut child) = local
                .process
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                kill(&mut child);
            }
            // The TempDir removes the directory after this.
        }
    }
}

/// The server shared by this test process: `SLUICE_TEST_CH_URL`, or a chdb server started
/// on first use (it goes away with the process).
pub fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::from_env().unwrap_or_else(|| TestServer::start("")))
}

// ---------------------------------------------------------------------------------------
// A database per test

/// A fresh database on a server, dropped (`DROP DATABASE ... SYNC`, best effort) when this
/// goes away.
pub struct TestDb {
    pub name: String,
    /// The server's HTTP endpoint.
    pub url: String,
}

impl TestDb {
    /// A new database on the [`shared`] server.
    pub async fn new() -> TestDb {
        Self::on(shared()).await
    }

    /// A new database on `server`.
    pub async fn on(server: &TestServer) -> TestDb {
        let url = server.url.clone();
        tokio::task::spawn_blocking(move || TestDb::create(&url))
            .await
            .unwrap_or_else(|e| match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("{e}"),
            })
    }

    /// Creates a database on the server at `url` (blocking).
    fn create(url: &str) -> TestDb {
        let name = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
        blocking(url, "default", format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("ClickHouse at {url}: {e}"));
        TestDb {
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort: never panic in drop.
        let sql = format!("DROP DATABASE IF EXISTS {} SYNC", self.name);
        let _ = blocking(&self.url, "default", sql);
    }
}

// ---------------------------------------------------------------------------------------
// One end-to-end test's ClickHouse

/// One test's ClickHouse. `url` is the HTTP endpoint (`http://127.0.0.1:PORT`, no trailing
/// slash); the test's tables live in [`ChServer::database`].
pub struct ChServer {
    pub url: String,
    database: String,
    kind: Kind,
    http: reqwest::Client,
}

enum Kind {
    /// A database created in the server at `SLUICE_TEST_CH_URL`.
    External { _db: TestDb },
    /// A server of our own.
    Local(TestServer),
}

impl ChServer {
    /// A fresh database: in `SLUICE_TEST_CH_URL`'s server if set, else in a new server.
    pub fn start() -> ChServer {
        match TestServer::from_env() {
            Some(server) => {
                let db = TestDb::create(&server.url);
                ChServer {
                    url: server.url.clone(),
                    database: db.name.clone(),
                    kind: Kind::External { _db: db },
                    http: reqwest::Client::new(),
                }
            }
            None => Self::start_local(),
        }
    }

    /// A new server of our own, whatever the environment says. Its database is `default`.
    pub fn start_local() -> ChServer {
        let server = TestServer::start("");
        ChServer {
            url: server.url.clone(),
            database: "default".into(),
            kind: Kind::Local(server),
            http: reqwest::Client::new(),
        }
    }

    /// The database this test's tables live in.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Runs `sql` in [`ChServer::database`] over HTTP and returns the answer's body; panics
    /// with the server's message if it fails.
    pub async fn query(&self, sql: &str) -> String {
        self.post(&[], sql.as_bytes().to_vec())
            .await
            .unwrap_or_else(|e| panic!("{sql}\n{e}"))
    }

    /// Runs `sql` (an `INSERT ... FORMAT X`) with `body` as its data; panics with the
    /// server's message if it fails.
    pub async fn insert(&self, sql: &str, body: Vec<u8>) -> String {
        self.post(&[("query", sql)], body)
            .await
            .unwrap_or_else(|e| panic!("{sql}\n{e}"))
    }

    /// Like [`ChServer::insert`], but returns the server's refusal instead of panicking.
    pub async fn try_insert(&self, sql: &str, body: Vec<u8>) -> Result<String, String> {
        self.post(&[("query", sql)], body).await
    }

    async fn post(&self, params: &[(&str, &str)], body: Vec<u8>) -> Result<String, String> {
        let send = || {
            self.http
                .post(format!("{}/", self.url))
                .query(&[
                    ("database", self.database.as_str()),
                    // What a stock server defaults to (chdb's own default is CSV).
                    ("default_format", "TabSeparated"),
                ])
                .query(params)
                .body(body.clone())
                .send()
        };
        // A pooled keep-alive connection the server closed fails before the request is
        // taken (the CI flake of local_server_keeps_its_data_across_stop_and_restart):
        // one more try, on a new connection.
        let response = match send().await {
            Err(e) if e.is_request() || e.is_connect() => send().await,
            other => other,
        }
        .map_err(|e| format!("POST {}: {e}", self.url))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("read the answer of {}: {e}", self.url))?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("ClickHouse answered {status}: {text}"))
        }
    }

    /// Kills the server; the data stays and [`ChServer::restart`] serves it again on the
    /// same ports. Only for servers of our own.
    pub fn stop(&self) {
        self.server("stop").stop();
    }

    /// Stops the server if it runs and starts it again on the same ports and data.
    pub fn restart(&self) {
        self.server("restart").restart();
    }

    fn server(&self, what: &str) -> &TestServer {
        match &self.kind {
            Kind::Local(server) => server,
            Kind::External { .. } => panic!(
                "cannot {what} the ClickHouse at SLUICE_TEST_CH_URL: use ChServer::start_local()"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The chdb process

/// The virtualenv's Python (`<repo>/.venv/bin/python`), else `python3`.
fn python() -> PathBuf {
    // The repository: the folder holding Cargo.lock above this crate.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .unwrap_or(manifest);
    let venv = root.join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Starts chdb serving `dir/data` with `dir/config.xml` and waits until `/ping` on
/// `http_port` answers. On failure the process is gone and the error holds its output.
fn serve(python: &Path, dir: &Path, http_port: u16) -> Result<Child, String> {
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).expect("create server.log");
    let mut child = Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir)
        .arg(SERVE)
        .current_dir(dir)
        // Closed when this process ends: the server then exits and removes `dir`.
        .stdin(Stdio::piped())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ping(http_port) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = read_log();
            if log.contains("No module named 'chdb") {
                panic!(
                    "{} cannot import chdb: pip install chdb-core into .venv (scripts/test does)\n{log}",
                    python.display()
                );
            }
            return Err(format!("chdb exited ({status}):\n{log}"));
        }
        if Instant::now() > deadline {
            kill(&mut child);
            return Err(format!(
                "no answer on 127.0.0.1:{http_port}/ping within {START_TIMEOUT:?}:\n{}",
                read_log()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether ClickHouse answers `GET /ping` on `port` (plain blocking HTTP/1.0, so this works
/// inside and outside a tokio runtime).
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    stream
        .write_all(b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .and_then(|_| stream.read_to_string(&mut answer))
        .is_ok()
        && answer.starts_with("HTTP/1.")
        && answer.contains(" 200 ")
        && answer.ends_with("Ok.\n")
}

/// Runs one statement against `url` on a thread of its own, with a runtime of its own (so
/// this works inside and outside a tokio runtime, and after the test's is gone).
fn blocking(url: &str, database: &str, sql: String) -> Result<String, String> {
    let (url, database) = (url.to_string(), database.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let response = reqwest::Client::new()
                .post(format!("{url}/"))
                .query(&[("database", database.as_str())])
                .body(sql.clone())
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .map_err(|e| format!("{sql}: {e}"))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(text)
            } else {
                Err(format!("{sql}: ClickHouse answered {status}: {text}"))
            }
        })
    })
    .join()
    .map_err(|_| "the admin thread panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_server_keeps_its_data_across_stop_and_restart() {
        let ch = ChServer::start_local();
        ch.query("CREATE TABLE kept (x UInt32) ENGINE = MergeTree ORDER BY x")
            .await;
        ch.insert("INSERT INTO kept FORMAT TSV", b"1\n2\n".to_vec())
            .await;
        ch.stop();
        assert!(ch
            .try_insert("INSERT INTO kept FORMAT TSV", b"3\n".to_vec())
            .await
            .is_err());
        ch.restart();
        assert_eq!(ch.query("SELECT sum(x) FROM kept").await.trim(), "3");
        let e = ch
            .try_insert("INSERT INTO nope FORMAT TSV", b"1\n".to_vec())
            .await;
        assert!(
            e.unwrap_err().contains("nope"),
            "the server's message is kept"
        );
    }
}
