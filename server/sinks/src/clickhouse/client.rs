//! A small client for ClickHouse's HTTP interface: DDL and queries, table metadata, and
//! streamed `INSERT ... FORMAT Native` bodies.
//!
//! # What flows in and out
//! In: SQL text, or an INSERT target plus a stream of Native-format bytes. Out: the
//! response body (text, or JSON rows) or a [`ChError`] that says whether sending the same
//! request again later can succeed ([`ChError::transient`]).
//!
//! # How requests look
//! Every request is a `POST` of the SQL (or, for inserts, of the data with the statement in
//! the `query` URL parameter) to the configured URL, with the database as the `database`
//! URL parameter and the credentials in the `X-ClickHouse-User` / `X-ClickHouse-Key`
//! headers. Values go into SQL as query parameters (`{name:Type}` placeholders, sent as
//! `param_name`), never pasted into the text. DDL and queries run with
//! `wait_end_of_query=1`, so an exception raised after the first rows still arrives as an
//! HTTP error with its code instead of a `200 OK` that ends in an exception trailer (a
//! trailer is detected as well, should a server ignore the setting).
//!
//! Insert bodies are compressed on the fly, chunk by chunk as they are streamed, with
//! `Content-Encoding: zstd` (a zstd frame, level 1) or `Content-Encoding: lz4` (an LZ4
//! *frame*, the format of the `lz4` command-line tool; ClickHouse decodes it with
//! `LZ4F_decompress`). ClickHouse decompresses request bodies by their `Content-Encoding`
//! without any setting (`enable_http_compression` is only about responses). Verified
//! against ClickHouse 26.9 by this module's tests.
//!
//! # Idempotent inserts
//! [`ChClient::insert_native`] sends `insert_deduplicate=1` and an
//! `insert_deduplication_token`. ClickHouse remembers the token of the blocks it wrote
//! (per table, the last `non_replicated_deduplication_window` inserts of a non-replicated
//! MergeTree; `replicated_deduplication_window` for replicated ones) and drops a block
//! whose token it has seen, answering `200 OK` as if it had written it. The server may cut
//! one INSERT into several blocks (`max_insert_block_size`); it then suffixes the token
//! with the block's number, so a replay of the same body with the same token skips the
//! blocks that were written before a failure and writes the rest.

use std::fmt;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::config::{ClickHouseConfig, HttpCompression};

/// ClickHouse error codes after which the same request can succeed later: the server is
/// busy, short of memory or parts, read-only for a while, or lost its connection to
/// Keeper or another replica; or the outcome of an INSERT is unknown (319), which a
/// retry with the same deduplication token settles.
///
/// Sources: the error codes the official ClickHouse Kafka Connect sink retries (3, 159,
/// 164, 202, 203, 209, 210, 242, 252, 285, 319, 425, 999, 1002), plus codes with the same
/// nature (memory, cancellation by a shutting-down server, replica and Keeper
/// availability, overload). Code numbers checked with `errorCodeToName` on 26.9.
pub const TRANSIENT_CODES: &[u32] = &[
    3,    // UNEXPECTED_END_OF_FILE
    159,  // TIMEOUT_EXCEEDED
    164,  // READONLY
    173,  // CANNOT_ALLOCATE_MEMORY
    201,  // QUOTA_EXCEEDED (quotas are per interval)
    202,  // TOO_MANY_SIMULTANEOUS_QUERIES
    203,  // NO_FREE_CONNECTION
    209,  // SOCKET_TIMEOUT
    210,  // NETWORK_ERROR
    225,  // NO_ZOOKEEPER
    236,  // ABORTED
    241,  // MEMORY_LIMIT_EXCEEDED
    242,  // TABLE_IS_READ_ONLY
    243,  // NOT_ENOUGH_SPACE
    252,  // TOO_MANY_PARTS
    254,  // NO_ACTIVE_REPLICAS
    279,  // ALL_CONNECTION_TRIES_FAILED
    285,  // TOO_FEW_LIVE_REPLICAS
    319,  // UNKNOWN_STATUS_OF_INSERT
    369,  // ALL_REPLICAS_ARE_STALE
    394,  // QUERY_WAS_CANCELLED
    425,  // SYSTEM_ERROR
    439,  // CANNOT_SCHEDULE_TASK
    733,  // TABLE_IS_BEING_RESTARTED
    745,  // SERVER_OVERLOADED
    999,  // KEEPER_EXCEPTION
    1002, // UNKNOWN_EXCEPTION
];

/// An error from ClickHouse or from talking to it.
///
/// `transient` is true when sending the same request again later can succeed:
/// connection failures and timeouts, HTTP 5xx (and 408/429) answers without a ClickHouse
/// error code (a proxy, a server starting up), and the codes in [`TRANSIENT_CODES`].
/// Every other ClickHouse error code is permanent: the statement or the data is wrong
/// (`SYNTAX_ERROR`, `CANNOT_PARSE_*`, `TYPE_MISMATCH`, `NO_SUCH_COLUMN_IN_TABLE`,
/// `UNKNOWN_TABLE`, ...) or the set-up is (`AUTHENTICATION_FAILED`, `ACCESS_DENIED`,
/// `UNKNOWN_DATABASE`), and repeating the request gives the same answer. A failure of the
/// caller's own INSERT body stream is permanent too (its message says so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChError {
    /// The ClickHouse error code (`X-ClickHouse-Exception-Code`, or `Code: N.` in the body).
    pub code: Option<u32>,
    /// ClickHouse's exception text (`Code: 62. DB::Exception: ...`), or what went wrong on
    /// the way.
    pub message: String,
    pub transient: bool,
}

impl fmt::Display for ChError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ChError {}

impl ChError {
    /// A ClickHouse exception with this code (classified by [`TRANSIENT_CODES`]).
    pub fn from_code(code: u32, message: impl Into<String>) -> Self {
        ChError {
            code: Some(code),
            message: message.into(),
            transient: TRANSIENT_CODES.contains(&code),
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        ChError {
            code: None,
            message: message.into(),
            transient: false,
        }
    }

    /// The error of a non-2xx answer: its code from the `X-ClickHouse-Exception-Code`
    /// header, else from the body's `Code: N.` prefix; without a code, 5xx/408/429 are
    /// transient.
    fn from_response(status: reqwest::StatusCode, header_code: Option<u32>, body: &str) -> Self {
        let text = body.trim();
        let code = header_code.or_else(|| parse_code(text));
        let message = if text.is_empty() {
            format!("ClickHouse answered HTTP {status}")
        } else {
            truncate(text, MAX_MESSAGE).to_string()
        };
        match code {
            Some(c) => ChError::from_code(c, message),
            None => ChError {
                code: None,
                message,
                transient: status.is_server_error()
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
            },
        }
    }

    /// A failure to send the request or read the answer: connection refused or reset,
    /// timeout, broken body. Transient unless the request could not even be built.
    fn from_reqwest(url: &str, e: reqwest::Error) -> Self {
        let e = e.without_url();
        let mut message = format!("ClickHouse at {url}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let s_text = s.to_string();
            if !message.contains(&s_text) {
                message.push_str(": ");
                message.push_str(&s_text);
            }
            source = s.source();
        }
        if e.is_timeout() {
            message.push_str(" (clickhouse.request_timeout)");
        }
        ChError {
            code: None,
            message,
            transient: !e.is_builder(),
        }
    }
}

/// Longest error message kept: a parse error can quote a lot of data.
const MAX_MESSAGE: usize = 8 * 1024;

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `Code: 62. DB::Exception: ...` -> 62.
fn parse_code(text: &str) -> Option<u32> {
    let rest = text.strip_prefix("Code: ")?;
    let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit())?];
    digits.parse().ok()
}

/// An exception a server wrote into a `200 OK` body after the first rows had gone out:
/// `\r\n__exception__\r\n<tag>\r\n<message>\n<len> <tag>\r\n__exception__\r\n` (the tag is
/// the `X-ClickHouse-Exception-Tag` header).
fn trailer_exception(body: &str, tag: &str) -> Option<ChError> {
    let marker = format!("__exception__\r\n{tag}\r\n");
    let start = body.rfind(&marker)? + marker.len();
    let rest = &body[start..];
    let end = rest.rfind(&format!(" {tag}\r\n")).unwrap_or(rest.len());
    // Drop the "<len>" before the closing tag.
    let message = rest[..end]
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .trim();
    Some(match parse_code(message) {
        Some(code) => ChError::from_code(code, truncate(message, MAX_MESSAGE)),
        None => ChError::permanent(truncate(message, MAX_MESSAGE)),
    })
}

/// Quotes an identifier for ClickHouse: `` `name` ``, with backslashes and backquotes
/// escaped by a backslash, whatever it holds.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for c in name.chars() {
        if c == '`' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
    out
}

/// A handle on one ClickHouse server's HTTP interface. Cheap to clone: clones share the
/// connection pool.
#[derive(Clone)]
pub struct ChClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// The endpoint, path ending with `/`, without credentials.
    base: url::Url,
    /// `base` for messages.
    shown: String,
    database: String,
    user: String,
    password: String,
    compression: HttpCompression,
}

impl fmt::Debug for ChClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChClient")
            .field("url", &self.inner.shown)
            .field("database", &self.inner.database)
            .field("user", &self.inner.user)
            .field("compression", &self.inner.compression)
            .finish()
    }
}

/// Idle connections are dropped after this long, before ClickHouse's `keep_alive_timeout`
/// (3 s in older servers' configs, 30 s in newer ones) closes them under a request.
const POOL_IDLE: Duration = Duration::from_secs(2);

/// Sends the request `build` makes; if it fails before the server took it (a pooled
/// keep-alive connection the server had closed: "error sending request", a reset), once
/// more on a new connection. For statements and queries, which are idempotent here
/// (`IF NOT EXISTS`, reads, inserts with a deduplication token); streamed inserts are
/// retried by the sink instead.
async fn send_once_more(
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, reqwest::Error> {
    match build().send().await {
        Err(e) if e.is_request() || e.is_connect() => {
            tracing::debug!(error = %e, "ClickHouse request failed before it was taken; trying once more");
            build().send().await
        }
        other => other,
    }
}

impl ChClient {
    /// A client for `cfg.url` (required). Credentials in the URL (`http://u:p@host:8123`)
    /// are used when `user`/`password` are left at their defaults.
    pub fn new(cfg: &ClickHouseConfig) -> Result<Self, ChError> {
        let raw = cfg
            .url
            .as_deref()
            .ok_or_else(|| ChError::permanent("clickhouse.url is not set"))?;
        let mut base = url::Url::parse(raw)
            .map_err(|e| ChError::permanent(format!("clickhouse.url '{raw}': {e}")))?;
        let (mut user, mut password) = (cfg.user.clone(), cfg.password.clone());
        if !base.username().is_empty() {
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            if user == "default" && password.is_empty() {
                user = decode(base.username());
                password = decode(base.password().unwrap_or(""));
            }
            let _ = base.set_username("");
            let _ = base.set_password(None);
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let connect_timeout = cfg.request_timeout.min(Duration::from_secs(10));
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(POOL_IDLE)
            .tcp_nodelay(true);
        if let Some(path) = &cfg.tls_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                ChError::permanent(format!("clickhouse.tls_ca_file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ChError::permanent(format!("clickhouse.tls_ca_file {}: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(ChError::permanent(format!(
                    "clickhouse.tls_ca_file {}: no PEM certificate in it",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ChError::permanent(format!("cannot build the HTTP client: {e}")))?;
        Ok(ChClient {
            inner: Arc::new(Inner {
                http,
                shown: base.to_string(),
                base,
                database: cfg.database.clone(),
                user,
                password,
                compression: cfg.compression,
            }),
        })
    }

    /// The configured database.
    pub fn database(&self) -> &str {
        &self.inner.database
    }

    /// The endpoint, without credentials.
    pub fn url(&self) -> &str {
        &self.inner.shown
    }

    /// How INSERT bodies are compressed.
    pub fn compression(&self) -> HttpCompression {
        self.inner.compression
    }

    /// `GET /ping`: the server is up (it does not check credentials or the database).
    pub async fn ping(&self) -> Result<(), ChError> {
        let url = self
            .inner
            .base
            .join("ping")
            .map_err(|e| ChError::permanent(e.to_string()))?;
        let resp = send_once_more(|| self.inner.http.get(url.clone()))
            .await
            .map_err(|e| ChError::from_reqwest(&self.inner.shown, e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        Err(ChError::from_response(status, None, &body))
    }

    /// Runs one statement in the configured database and returns the response body.
    pub async fn execute(&self, sql: &str) -> Result<String, ChError> {
        self.execute_with_params(sql, &[]).await
    }

    /// [`execute`](Self::execute) with query parameters: `("db", "x")` fills `{db:String}`.
    pub async fn execute_with_params(
        &self,
        sql: &str,
        params: &[(&str, &str)],
    ) -> Result<String, ChError> {
        self.run(sql, params, true, &[]).await
    }

    /// Runs one statement without selecting a database (the server's default for the
    /// user): for `CREATE DATABASE` and for checking that the configured one exists, which
    /// a request naming a missing database cannot do.
    pub(crate) async fn execute_server_wide(
        &self,
        sql: &str,
        params: &[(&str, &str)],
    ) -> Result<String, ChError> {
        self.run(sql, params, false, &[]).await
    }

    /// Runs a query with `FORMAT JSONEachRow` appended and returns its rows. 64-bit
    /// integers and floats come as JSON numbers, not strings.
    pub async fn query_json(&self, sql: &str) -> Result<Vec<serde_json::Value>, ChError> {
        self.query_json_with_params(sql, &[]).await
    }

    /// [`query_json`](Self::query_json) with query parameters.
    pub async fn query_json_with_params(
        &self,
        sql: &str,
        params: &[(&str, &str)],
    ) -> Result<Vec<serde_json::Value>, ChError> {
        self.query_json_in(sql, params, true).await
    }

    async fn query_json_in(
        &self,
        sql: &str,
        params: &[(&str, &str)],
        use_database: bool,
    ) -> Result<Vec<serde_json::Value>, ChError> {
        let sql = format!(
            "{}\nFORMAT JSONEachRow",
            sql.trim_end().trim_end_matches(';')
        );
        let body = self
            .run(
                &sql,
                params,
                use_database,
                &[
                    ("output_format_json_quote_64bit_integers", "0"),
                    ("output_format_json_quote_64bit_floats", "0"),
                ],
            )
            .await?;
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| {
                    ChError::permanent(format!(
                        "ClickHouse sent a JSONEachRow line that is not JSON ({e}): {}",
                        truncate(l, 200)
                    ))
                })
            })
            .collect()
    }

    /// Whether the configured database exists (asked without selecting it).
    pub(crate) async fn database_exists(&self) -> Result<bool, ChError> {
        let rows = self
            .query_json_in(
                "SELECT 1 AS x FROM system.databases WHERE name = {db:String}",
                &[("db", self.database())],
                false,
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// The columns of `table` in the configured database as `(name, type)` in their
    /// order, e.g. `("timestamp", "DateTime64(3, 'UTC')")`; `None` when there is no such
    /// table.
    pub async fn table_columns(
        &self,
        table: &str,
    ) -> Result<Option<Vec<(String, String)>>, ChError> {
        let rows = self
            .query_json_with_params(
                "SELECT name, type FROM system.columns \
                 WHERE database = {db:String} AND table = {t:String} ORDER BY position",
                &[("db", self.database()), ("t", table)],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.iter()
            .map(|r| match (r["name"].as_str(), r["type"].as_str()) {
                (Some(n), Some(t)) => Ok((n.to_string(), t.to_string())),
                _ => Err(ChError::permanent(format!(
                    "unexpected system.columns row: {r}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Streams `body` (Native format: blocks of the given `columns`, in that order) as
    /// `INSERT INTO <db>.<table> (<columns>) FORMAT Native`, compressed on the fly per the
    /// configured compression, with `insert_deduplicate=1` and
    /// `insert_deduplication_token=<dedup_token>` (see the module docs). The body is never
    /// held whole in memory. Returns once ClickHouse has written (or deduplicated) every
    /// block.
    ///
    /// If `body` yields an error the request is aborted and the error is returned as a
    /// permanent [`ChError`] naming it; ClickHouse refuses the truncated body (a block it
    /// had already written before the failure stays, and a replay with the same token
    /// skips it).
    pub async fn insert_native<S>(
        &self,
        table: &str,
        columns: &[String],
        dedup_token: &str,
        body: S,
    ) -> Result<(), ChError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let query = format!(
            "INSERT INTO {}.{} ({}) FORMAT Native",
            quote_ident(self.database()),
            quote_ident(table),
            cols.join(", ")
        );
        // The first error of the caller's stream, to tell it from a network failure.
        let body_error: Arc<Mutex<Option<String>>> = Arc::default();
        let seen = body_error.clone();
        let body = body.inspect(move |item| {
            if let Err(e) = item {
                let mut slot = seen.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert_with(|| e.to_string());
            }
        });
        let compression = self.inner.compression;
        let mut req = self
            .request(true)
            .query(&[
                ("query", query.as_str()),
                ("insert_deduplicate", "1"),
                ("insert_deduplication_token", dedup_token),
                // Deduplication by token is what makes a replay safe; asynchronous
                // inserts (if a profile turned them on) would handle it differently.
                ("async_insert", "0"),
                // One block for the whole insert: ClickHouse then commits all of it when
                // the body ends, or nothing if the body is cut off (sluice crashed or
                // gave up mid-stream), so an insert streamed while its chunk fills never
                // leaves a committed prefix that a replay would deduplicate wrongly.
                ("min_insert_block_size_rows", "1000000000000"),
                ("min_insert_block_size_bytes", "1000000000000000"),
            ])
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
        if let Some(encoding) = content_encoding(compression) {
            req = req.header(reqwest::header::CONTENT_ENCODING, encoding);
        }
        let req = req.body(reqwest::Body::wrap_stream(compress(body, compression)));
        let result = self.finish(req.send().await).await;
        let body_failed = body_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (result, body_failed) {
            (Ok(_), None) => Ok(()),
            (_, Some(e)) => Err(ChError::permanent(format!(
                "INSERT INTO {}: the body stream failed: {e}",
                quote_ident(table)
            ))),
            (Err(e), None) => Err(e),
        }
    }

    fn request(&self, use_database: bool) -> reqwest::RequestBuilder {
        let inner = &self.inner;
        let mut req = inner.http.post(inner.base.clone());
        if use_database {
            req = req.query(&[("database", inner.database.as_str())]);
        }
        if !inner.user.is_empty() {
            req = req
                .header("X-ClickHouse-User", &inner.user)
                .header("X-ClickHouse-Key", &inner.password);
        }
        req
    }

    async fn run(
        &self,
        sql: &str,
        params: &[(&str, &str)],
        use_database: bool,
        settings: &[(&str, &str)],
    ) -> Result<String, ChError> {
        let build = || {
            let mut req = self
                .request(use_database)
                .query(&[("wait_end_of_query", "1")])
                .query(settings);
            for (name, value) in params {
                req = req.query(&[(format!("param_{name}"), value)]);
            }
            req.body(sql.to_string())
        };
        self.finish(send_once_more(build).await).await
    }

    /// Turns an answer into its body text or a [`ChError`].
    async fn finish(
        &self,
        sent: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<String, ChError> {
        let shown = &self.inner.shown;
        let resp = sent.map_err(|e| ChError::from_reqwest(shown, e))?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let code = header("X-ClickHouse-Exception-Code").and_then(|v| v.trim().parse().ok());
        let tag = header("X-ClickHouse-Exception-Tag");
        let body = resp
            .text()
            .await
            .map_err(|e| ChError::from_reqwest(shown, e))?;
        if !status.is_success() {
            return Err(ChError::from_response(status, code, &body));
        }
        if let Some(e) = tag.as_deref().and_then(|t| trailer_exception(&body, t)) {
            return Err(e);
        }
        Ok(body)
    }
}

fn content_encoding(c: HttpCompression) -> Option<&'static str> {
    match c {
        HttpCompression::None => None,
        HttpCompression::Lz4 => Some("lz4"),
        HttpCompression::Zstd => Some("zstd"),
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// A streaming compressor writing into a `Vec` that is drained after every input chunk.
enum Encoder {
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Lz4(Box<lz4_flex::frame::FrameEncoder<Vec<u8>>>),
}

impl Encoder {
    fn new(c: HttpCompression) -> std::io::Result<Option<Self>> {
        Ok(match c {
            HttpCompression::None => None,
            HttpCompression::Zstd => Some(Encoder::Zstd(zstd::stream::write::Encoder::new(
                Vec::new(),
                ZSTD_LEVEL,
            )?)),
            HttpCompression::Lz4 => {
                let info = lz4_flex::frame::FrameInfo::new()
                    .block_size(lz4_flex::frame::BlockSize::Max1MB);
                Some(Encoder::Lz4(Box::new(
                    lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new()),
                )))
            }
        })
    }

    /// Compresses `chunk`; returns what is ready to send (possibly nothing yet).
    fn push(&mut self, chunk: &[u8]) -> std::io::Result<Bytes> {
        match self {
            Encoder::Zstd(e) => {
                e.write_all(chunk)?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
            Encoder::Lz4(e) => {
                e.write_all(chunk)?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
        }
    }

    /// Ends the frame; returns the rest.
    fn finish(self) -> std::io::Result<Bytes> {
        match self {
            Encoder::Zstd(e) => e.finish().map(Bytes::from),
            Encoder::Lz4(e) => e.finish().map(Bytes::from).map_err(std::io::Error::other),
        }
    }
}

/// zstd level 1: several hundred MB/s per core, ample for ClickHouse's insert rate.
const ZSTD_LEVEL: i32 = 1;

/// Compresses a body stream chunk by chunk (nothing is collected whole).
fn compress<S>(body: S, c: HttpCompression) -> ByteStream
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    let encoder = match Encoder::new(c) {
        Ok(None) => return Box::pin(body),
        Ok(Some(e)) => e,
        Err(e) => return Box::pin(futures::stream::once(async move { Err(e) })),
    };
    let body: ByteStream = Box::pin(body);
    Box::pin(futures::stream::unfold(
        (body, Some(encoder)),
        |(mut body, mut encoder)| async move {
            loop {
                let enc = encoder.as_mut()?;
                match body.next().await {
                    Some(Ok(chunk)) => match enc.push(&chunk) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Some((Ok(out), (body, encoder))),
                        Err(e) => return Some((Err(e), (body, None))),
                    },
                    Some(Err(e)) => return Some((Err(e), (body, None))),
                    None => {
                        let enc = encoder.take()?;
                        return Some((enc.finish(), (body, None)));
                    }
                }
            }
        },
    ))
}

/// Clients of the test databases of `sluice-test-support` (which knows no [`ChClient`]),
/// as the tests make them: 60 s per request.
#[cfg(test)]
pub(crate) trait TestClient {
    /// A client of this database with LZ4 insert bodies.
    fn client(&self) -> ChClient {
        self.client_with(HttpCompression::Lz4)
    }

    /// A client of this database with `compression`.
    fn client_with(&self, compression: HttpCompression) -> ChClient;
}

#[cfg(test)]
impl TestClient for sluice_test_support::ch::TestDb {
    fn client_with(&self, compression: HttpCompression) -> ChClient {
        test_client(&self.url, &self.name, compression)
    }
}

/// A client of `database` on the test server at `url` (60 s per request).
#[cfg(test)]
pub(crate) fn test_client(url: &str, database: &str, compression: HttpCompression) -> ChClient {
    ChClient::new(&ClickHouseConfig {
        url: Some(url.to_string()),
        database: database.to_string(),
        compression,
        request_timeout: Duration::from_secs(60),
        ..ClickHouseConfig::default()
    })
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_test_support::ch::TestDb;

    fn put_varuint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        put_varuint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    /// A Native block with one UInt64 column `x`.
    fn native_block(values: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varuint(&mut out, 1);
        put_varuint(&mut out, values.len() as u64);
        put_str(&mut out, "x");
        put_str(&mut out, "UInt64");
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `data` as a stream of small chunks (so the compressors see several writes).
    fn chunked(data: Vec<u8>, size: usize) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = data
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(chunks)
    }

    async fn create_x(client: &ChClient, table: &str) {
        client
            .execute(&format!(
                "CREATE TABLE {} (x UInt64) ENGINE = MergeTree ORDER BY x \
                 SETTINGS non_replicated_deduplication_window = 100",
                quote_ident(table)
            ))
            .await
            .unwrap();
    }

    async fn xs(client: &ChClient, table: &str) -> Vec<u64> {
        client
            .query_json(&format!("SELECT x FROM {} ORDER BY x", quote_ident(table)))
            .await
            .unwrap()
            .iter()
            .map(|r| r["x"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("logs"), "`logs`");
        assert_eq!(quote_ident("a`b"), "`a\\`b`");
        assert_eq!(quote_ident("a\\b"), "`a\\\\b`");
    }

    #[test]
    fn codes_and_trailers_parse() {
        assert_eq!(parse_code("Code: 62. DB::Exception: x"), Some(62));
        assert_eq!(parse_code("oops"), None);
        let body = "{\"a\":1}\n\r\n__exception__\r\nabcd\r\nCode: 395. DB::Exception: boom. (X) (version 26.9)\n61 abcd\r\n__exception__\r\n";
        let e = trailer_exception(body, "abcd").unwrap();
        assert_eq!(e.code, Some(395));
        assert_eq!(
            e.message,
            "Code: 395. DB::Exception: boom. (X) (version 26.9)"
        );
        assert!(trailer_exception("{\"a\":1}\n", "abcd").is_none());
        let e = ChError::from_response(reqwest::StatusCode::BAD_GATEWAY, None, "");
        assert!(e.transient && e.code.is_none(), "{e:?}");
        let e = ChError::from_response(reqwest::StatusCode::FORBIDDEN, None, "denied");
        assert!(!e.transient);
        let e = ChError::from_response(
            reqwest::StatusCode::INTERNAL_SERVER_ERROR,
            Some(241),
            "Code: 241. DB::Exception: Memory limit exceeded",
        );
        assert!(e.transient && e.code == Some(241));
        let e = ChError::from_response(
            reqwest::StatusCode::INTERNAL_SERVER_ERROR,
            None,
            "Code: 53. DB::Exception: Type mismatch",
        );
        assert!(!e.transient && e.code == Some(53));
    }

    #[tokio::test]
    async fn execute_query_json_and_ping() {
        let db = TestDb::new().await;
        let c = &db.client();
        c.ping().await.unwrap();
        assert_eq!(c.execute("SELECT 1 + 1").await.unwrap(), "2\n");
        let rows = c
            .query_json("SELECT number AS n, toString(number) AS s, 1.5 AS f FROM numbers(3);")
            .await
            .unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2]["n"], serde_json::json!(2));
        assert_eq!(rows[2]["s"], serde_json::json!("2"));
        assert_eq!(rows[2]["f"], serde_json::json!(1.5));
        // Parameters are values, not SQL.
        let rows = c
            .query_json_with_params("SELECT {v:String} AS v", &[("v", "it's `odd`; --")])
            .await
            .unwrap();
        assert_eq!(rows[0]["v"], serde_json::json!("it's `odd`; --"));
        // The configured database is the session's.
        let rows = c.query_json("SELECT currentDatabase() AS d").await.unwrap();
        assert_eq!(rows[0]["d"], serde_json::json!(db.name));
        assert!(c.database_exists().await.unwrap());
        // An exception after rows went out is still an error with its code.
        let e = c
            .query_json(
                "SELECT number, throwIf(number = 150000) FROM numbers(200000) \
                 SETTINGS max_block_size = 1000",
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, Some(395), "{e}");
        assert!(!e.transient);
    }

    #[tokio::test]
    async fn table_columns_in_position_order() {
        let db = TestDb::new().await;
        let c = &db.client();
        assert_eq!(c.table_columns("nope").await.unwrap(), None);
        c.execute(
            "CREATE TABLE t (b String, a DateTime64(3, 'UTC'), m Map(String, String)) \
             ENGINE = MergeTree ORDER BY a",
        )
        .await
        .unwrap();
        let cols = c.table_columns("t").await.unwrap().unwrap();
        assert_eq!(
            cols,
            vec![
                ("b".to_string(), "String".to_string()),
                ("a".to_string(), "DateTime64(3, 'UTC')".to_string()),
                ("m".to_string(), "Map(String, String)".to_string()),
            ]
        );
        let odd = "we`ird\\ 'name";
        c.execute(&format!(
            "CREATE TABLE {} ({} UInt8) ENGINE = Memory",
            quote_ident(odd),
            quote_ident("c`ol")
        ))
        .await
        .unwrap();
        assert_eq!(
            c.table_columns(odd).await.unwrap(),
            Some(vec![("c`ol".to_string(), "UInt8".to_string())])
        );
        // Another database's table of the same name is not this one's.
        let other = TestDb::new().await;
        assert_eq!(other.client().table_columns("t").await.unwrap(), None);
    }

    #[tokio::test]
    async fn native_inserts_with_each_compression_and_dedup() {
        let db = TestDb::new().await;
        for (i, compression) in [
            HttpCompression::None,
            HttpCompression::Lz4,
            HttpCompression::Zstd,
        ]
        .into_iter()
        .enumerate()
        {
            let c = db.client_with(compression);
            let table = format!("x{i}");
            create_x(&c, &table).await;
            let block = native_block(&[1, 2, 3]);
            c.insert_native(&table, &["x".into()], "tok-1", chunked(block.clone(), 5))
                .await
                .unwrap_or_else(|e| panic!("{compression:?}: {e}"));
            assert_eq!(xs(&c, &table).await, vec![1, 2, 3], "{compression:?}");
            // The same token again: ClickHouse drops the replay.
            c.insert_native(&table, &["x".into()], "tok-1", chunked(block.clone(), 7))
                .await
                .unwrap();
            assert_eq!(xs(&c, &table).await, vec![1, 2, 3], "{compression:?} dedup");
            // Another token: the same rows land again.
            c.insert_native(&table, &["x".into()], "tok-2", chunked(block, 1 << 20))
                .await
                .unwrap();
            assert_eq!(xs(&c, &table).await, vec![1, 1, 2, 2, 3, 3]);
        }
    }

    #[tokio::test]
    async fn large_compressed_bodies_stream() {
        // Several compressed frames' worth of blocks in many chunks.
        let db = TestDb::new().await;
        for compression in [HttpCompression::Lz4, HttpCompression::Zstd] {
            let c = db.client_with(compression);
            let table = format!("big_{compression:?}");
            create_x(&c, &table).await;
            let mut body = Vec::new();
            for b in 0..20u64 {
                let values: Vec<u64> = (b * 50_000..(b + 1) * 50_000).collect();
                body.extend(native_block(&values));
            }
            c.insert_native(&table, &["x".into()], "big", chunked(body, 256 * 1024))
                .await
                .unwrap();
            let r = c
                .query_json(&format!(
                    "SELECT count() AS n, sum(x) AS s FROM {}",
                    quote_ident(&table)
                ))
                .await
                .unwrap();
            assert_eq!(
                r[0]["n"],
                serde_json::json!(1_000_000u64),
                "{compression:?}"
            );
            assert_eq!(r[0]["s"], serde_json::json!(499_999_500_000u64));
        }
    }

    #[tokio::test]
    async fn errors_are_classified() {
        let db = TestDb::new().await;
        let c = &db.client();
        let e = c.execute("SELEC 1").await.unwrap_err();
        assert_eq!(e.code, Some(62));
        assert!(!e.transient);
        assert!(
            e.to_string()
                .starts_with("Code: 62. DB::Exception: Syntax error"),
            "{e}"
        );
        let e = c.execute("SELECT * FROM no_such_table").await.unwrap_err();
        assert_eq!((e.code, e.transient), (Some(60), false));

        // Bad data: not Native, or the wrong column type.
        create_x(c, "t").await;
        let e = c
            .insert_native("t", &["x".into()], "a", chunked(b"garbage".to_vec(), 3))
            .await
            .unwrap_err();
        assert!(e.code.is_some() && !e.transient, "{e:?}");
        let mut wrong = Vec::new();
        put_varuint(&mut wrong, 1);
        put_varuint(&mut wrong, 1);
        put_str(&mut wrong, "x");
        put_str(&mut wrong, "String");
        put_str(&mut wrong, "abc");
        let e = c
            .insert_native("t", &["x".into()], "b", chunked(wrong, 100))
            .await
            .unwrap_err();
        assert!(e.code.is_some() && !e.transient, "{e:?}");
        let e = c
            .insert_native("t", &["nope".into()], "c", chunked(native_block(&[1]), 100))
            .await
            .unwrap_err();
        assert_eq!(e.code, Some(16), "{e}"); // NO_SUCH_COLUMN_IN_TABLE
        assert!(!e.transient);
        // The same with a body far larger than what the server reads before it answers:
        // the answer still carries the code.
        for compression in [HttpCompression::None, HttpCompression::Lz4] {
            let values: Vec<u64> = (0..4_000_000).collect();
            let e = db
                .client_with(compression)
                .insert_native(
                    "t",
                    &["nope".into()],
                    "c",
                    chunked(native_block(&values), 1 << 20),
                )
                .await
                .unwrap_err();
            assert_eq!((e.code, e.transient), (Some(16), false), "{e}");
        }

        // The caller's body failing mid-way: a permanent error naming it, no rows.
        let failing = futures::stream::iter(vec![
            Ok(Bytes::from(native_block(&[7, 8]))),
            Err(std::io::Error::other("disk on fire")),
        ]);
        let e = c
            .insert_native("t", &["x".into()], "d", failing)
            .await
            .unwrap_err();
        assert!(!e.transient && e.message.contains("disk on fire"), "{e:?}");
        assert_eq!(xs(c, "t").await, Vec::<u64>::new());

        // Nobody listening: transient.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let closed = ChClient::new(&ClickHouseConfig {
            url: Some(format!("http://127.0.0.1:{port}")),
            ..ClickHouseConfig::default()
        })
        .unwrap();
        let e = closed.execute("SELECT 1").await.unwrap_err();
        assert!(e.transient && e.code.is_none(), "{e:?}");
        assert!(closed.ping().await.unwrap_err().transient);
        let e = closed
            .insert_native("t", &["x".into()], "e", chunked(native_block(&[1]), 100))
            .await
            .unwrap_err();
        assert!(e.transient, "{e:?}");

        // A missing database is permanent; so are wrong credentials.
        let mut cfg = ClickHouseConfig {
            url: Some(c.url().to_string()),
            database: "no_such_db_sluice".into(),
            ..ClickHouseConfig::default()
        };
        let e = ChClient::new(&cfg)
            .unwrap()
            .execute("SELECT 1")
            .await
            .unwrap_err();
        assert_eq!((e.code, e.transient), (Some(81), false));
        assert!(!ChClient::new(&cfg)
            .unwrap()
            .database_exists()
            .await
            .unwrap());
        cfg.database = "default".into();
        cfg.user = "no_such_user".into();
        let e = ChClient::new(&cfg)
            .unwrap()
            .execute("SELECT 1")
            .await
            .unwrap_err();
        assert!(e.code.is_some() && !e.transient, "{e:?}");

        let as_error =
            crate::error::SinkError::clickhouse("x", ChError::from_code(252, "Too many parts"));
        assert!(flight_schema::Classify::is_retryable(&as_error));
    }

    #[test]
    fn url_credentials_and_path() {
        let c = ChClient::new(&ClickHouseConfig {
            url: Some("http://bob:s%40cret@localhost:8123".into()),
            ..ClickHouseConfig::default()
        })
        .unwrap();
        assert_eq!(c.url(), "http://localhost:8123/");
        assert_eq!(
            (c.inner.user.as_str(), c.inner.password.as_str()),
            ("bob", "s@cret")
        );
        let c = ChClient::new(&ClickHouseConfig {
            url: Some("http://proxy/clickhouse".into()),
            ..ClickHouseConfig::default()
        })
        .unwrap();
        assert_eq!(
            c.inner.base.join("ping").unwrap().path(),
            "/clickhouse/ping"
        );
        assert!(ChClient::new(&ClickHouseConfig::default()).is_err());
    }
}
