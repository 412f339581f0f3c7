//! A throwaway ClickHouse for tests.
//!
//! [`ChServer::start`] gives each test its own database: a fresh database in the server at
//! `SLUICE_TEST_CH_URL` (an HTTP URL such as `http://127.0.0.1:8123`) when that is set,
//! otherwise its own server from the PyPI wheel `chdb-core` (as `/work/shared/INFRA.md`
//! describes): a temp dir with a `config.xml` naming free loopback HTTP and TCP ports, and a
//! Python process whose chdb query keeps the listeners up. Killed and deleted on drop.
//! Tests that stop ClickHouse mid-stream ([`ChServer::stop`], [`ChServer::restart`]) need a
//! server of their own: use [`ChServer::start_local`], which ignores `SLUICE_TEST_CH_URL`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::free_port;

/// How long a fresh server may take to answer `/ping` (the first import of chdb is slow).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The query that keeps a chdb process serving: it opens the listeners, then sleeps a row
/// a second for a day.
const SERVE: &str = "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; \
    SELECT sleepEachRow(1) FROM numbers(86400) SETTINGS max_block_size=1 FORMAT Null";

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
    External,
    /// Our own chdb process serving from `dir` (`dir/config.xml`, data in `dir/data`,
    /// output in `dir/server.log`).
    Local {
        dir: tempfile::TempDir,
        python: PathBuf,
        http_port: u16,
        process: Mutex<Option<Child>>,
    },
}

impl ChServer {
    /// A fresh database: in `SLUICE_TEST_CH_URL`'s server if set, else in a new server.
    pub fn start() -> ChServer {
        match std::env::var("SLUICE_TEST_CH_URL") {
            Ok(url) if !url.trim().is_empty() => Self::external(url.trim()),
            _ => Self::start_local(),
        }
    }

    /// A new server of our own, whatever the environment says. Its database is `default`.
    pub fn start_local() -> ChServer {
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
                     <listen_host>127.0.0.1</listen_host></clickhouse>\n"
                ),
            )
            .expect("write config.xml");
            match serve(&python, dir.path(), http_port) {
                Ok(child) => {
                    return ChServer {
                        url: format!("http://127.0.0.1:{http_port}"),
                        database: "default".into(),
                        kind: Kind::Local {
                            dir,
                            python,
                            http_port,
                            process: Mutex::new(Some(child)),
                        },
                        http: reqwest::Client::new(),
                    };
                }
                Err(log) if attempt == 4 => panic!("ClickHouse (chdb) did not start:\n{log}"),
                Err(_) => {}
            }
        }
        unreachable!()
    }

    fn external(url: &str) -> ChServer {
        let database = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
        let server = ChServer {
            url: url.trim_end_matches('/').to_string(),
            database: database.clone(),
            kind: Kind::External,
            http: reqwest::Client::new(),
        };
        blocking(
            &server.url,
            "default",
            format!("CREATE DATABASE {database}"),
        )
        .unwrap_or_else(|e| panic!("SLUICE_TEST_CH_URL ({url}): {e}"));
        server
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
        let (_, _, _, process) = self.local("stop");
        if let Some(mut child) = process.lock().unwrap().take() {
            kill(&mut child);
        }
    }

    /// Stops the server if it runs and starts it again on the same ports and data.
    pub fn restart(&self) {
        self.stop();
        let (dir, python, port, process) = self.local("restart");
        // The port was ours a moment ago; give the kernel a few tries if it lingers.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match serve(python, dir, port) {
                Ok(child) => {
                    *process.lock().unwrap() = Some(child);
                    return;
                }
                Err(log) if Instant::now() > deadline => {
                    panic!("ClickHouse (chdb) did not restart on port {port}:\n{log}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    fn local(&self, what: &str) -> (&Path, &Path, u16, &Mutex<Option<Child>>) {
        match &self.kind {
            Kind::Local {
                dir,
                python,
                http_port,
                process,
            } => (dir.path(), python, *http_port, process),
            Kind::External => panic!(
                "cannot {what} the ClickHouse at SLUICE_TEST_CH_URL: use ChServer::start_local()"
            ),
        }
    }
}

impl Drop for ChServer {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Local { process, .. } => {
                if let Some(mut child) = process.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    kill(&mut child);
                }
                // The TempDir removes the directory after this.
            }
            Kind::External => {
                // Best effort: never panic in drop.
                let sql = format!("DROP DATABASE IF EXISTS {}", self.database);
                let _ = blocking(&self.url, "default", sql);
            }
        }
    }
}

/// The virtualenv's Python (`<repo>/.venv/bin/python`), else `python3`.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
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
    let data = dir.join("data");
    let script = format!(
        "import chdb._chdb as c; c.query({SERVE:?}, 'CSV', path={:?})",
        data.to_str().expect("UTF-8 temp dir")
    );
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stdin(Stdio::null())
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

/// Runs one statement against `url` on a thread of its own (so this works both inside and
/// outside a tokio runtime).
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
