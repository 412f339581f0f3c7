//! TLS to PostgreSQL, set the way libpq users already know: `sslmode` and `sslrootcert` in
//! `postgres.url`.
//!
//! # What flows through it
//! [`super::connect`] hands the connection string here. [`ConnOptions::parse`] takes out the
//! two TLS settings tokio-postgres does not know (`sslmode=verify-ca|verify-full` and
//! `sslrootcert`) and gives back the rest for tokio-postgres, with `sslmode` reduced to
//! `disable`, `prefer` or `require`. [`ConnOptions::connector`] builds a rustls connector
//! (ring, already in the build through reqwest) whose certificate check follows libpq:
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | never | – |
//! | `allow`, `prefer` (default) | if the server offers it | only when `sslrootcert` is given: chain |
//! | `require` | always | only when `sslrootcert` is given: chain |
//! | `verify-ca` | always | chain |
//! | `verify-full` | always | chain and host name |
//!
//! The chain is checked against the PEM file `sslrootcert` names, or the system's roots when
//! it is absent or `system` (libpq would read `~/.postgresql/root.crt`). The stream offers
//! `tls-server-end-point` channel binding, so SCRAM logins use `SCRAM-SHA-256-PLUS`.
//! Client certificates (`sslcert`, `sslkey`) are refused with a clear error: not supported.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// What is wrong with a connection string's TLS settings or syntax.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("sslmode `{0}` is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error("{0}: client certificates are not supported; authenticate with a password (SCRAM over TLS is channel-bound) or trust")]
    ClientCertificate(String),
    #[error("connection string: `{0}` has no `=value`")]
    NoValue(String),
    #[error("connection string: `{0}`'s quote is not closed")]
    OpenQuote(String),
    #[error("connection URL: bad percent escape in `{0}`")]
    PercentEscape(String),
    #[error("connection URL: `{0}` is not UTF-8")]
    NotUtf8(String),
    #[error("no system CA certificates could be loaded ({0}); set sslrootcert to a PEM file")]
    NoSystemRoots(String),
    #[error("sslrootcert {}: {source}", .path.display())]
    RootCertFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("sslrootcert {}: {source}", .path.display())]
    RootCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("sslrootcert {}: no PEM certificate (BEGIN CERTIFICATE) in it", .0.display())]
    NoRootCert(PathBuf),
    #[error("sslrootcert: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    #[error("TLS setup: {0}")]
    Tls(#[source] rustls::Error),
    /// What is left once the TLS settings are taken out is no connection string.
    #[error("is not a PostgreSQL connection string (postgresql://user:pass@host:port/db)")]
    NotPostgres(#[source] tokio_postgres::Error),
}

/// `sslmode` as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, OptionsError> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(OptionsError::SslMode(other.to_string())),
        })
    }

    /// What tokio-postgres is told: whether to ask for TLS and whether it must get it.
    fn for_tokio_postgres(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            // libpq's `allow` tries plain text first; tokio-postgres cannot, so TLS is asked
            // for and plain text taken when the server has none (as `prefer`).
            Self::Allow | Self::Prefer => "prefer",
            Self::Require | Self::VerifyCa | Self::VerifyFull => "require",
        }
    }
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The system's store (rustls-native-certs: `SSL_CERT_FILE`/`SSL_CERT_DIR` or the OS).
    System,
    /// A PEM file of CA certificates.
    File(PathBuf),
}

/// The TLS part of a connection string, and the rest of it for tokio-postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnOptions {
    pub mode: SslMode,
    /// `sslrootcert`, if given.
    pub root_cert: Option<Roots>,
    /// The connection string tokio-postgres gets.
    pub rest: String,
}

impl ConnOptions {
    /// Splits a `postgresql://` URL or a `key=value` connection string.
    pub fn parse(conn: &str) -> Result<Self, OptionsError> {
        let is_url = conn.starts_with("postgresql://") || conn.starts_with("postgres://");
        let mut pairs = if is_url {
            url_params(conn)?
        } else {
            keyword_pairs(conn)?
        };
        let mut mode = SslMode::Prefer;
        let mut root_cert = None;
        for (key, value) in &pairs {
            match key.as_str() {
                "sslmode" => mode = SslMode::parse(value)?,
                "sslrootcert" if value == "system" => root_cert = Some(Roots::System),
                "sslrootcert" => root_cert = Some(Roots::File(PathBuf::from(value))),
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(OptionsError::ClientCertificate(key.clone()))
                }
                _ => {}
            }
        }
        pairs.retain(|(k, _)| k != "sslmode" && k != "sslrootcert");
        pairs.push(("sslmode".to_string(), mode.for_tokio_postgres().to_string()));
        let rest = if is_url {
            let base = conn.split_once('?').map_or(conn, |(base, _)| base);
            let query: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
                .collect();
            format!("{base}?{}", query.join("&"))
        } else {
            let parts: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
                .collect();
            parts.join(" ")
        };
        Ok(Self {
            mode,
            root_cert,
            rest,
        })
    }

    /// The rustls connector for these options (the certificate check of the table above).
    pub fn connector(&self) -> Result<RustlsConnect, OptionsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let check = match (self.mode, &self.root_cert) {
            (SslMode::VerifyFull, _) => Check::Full,
            (SslMode::VerifyCa, _) | (_, Some(_)) => Check::Chain,
            _ => Check::None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = if check == Check::None {
            Arc::new(NoCheck(provider.clone()))
        } else {
            let roots = load_roots(self.root_cert.as_ref().unwrap_or(&Roots::System))?;
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(OptionsError::Verifier)?;
            Arc::new(WebPki {
                inner: webpki,
                check_name: check == Check::Full,
            })
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(OptionsError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // PostgreSQL 17's direct TLS (`sslnegotiation=direct`) requires this ALPN name;
        // older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(RustlsConnect {
            config: Arc::new(config),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Chain,
    Full,
}

fn load_roots(roots: &Roots) -> Result<Arc<RootCertStore>, OptionsError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(OptionsError::NoSystemRoots(
                    found
                        .errors
                        .first()
                        .map_or("none found".to_string(), |e| e.to_string()),
                ));
            }
        }
        Roots::File(path) => {
            let file_err = |source| OptionsError::RootCertFile {
                path: path.clone(),
                source,
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(file_err)? {
                store
                    .add(cert.map_err(file_err)?)
                    .map_err(|source| OptionsError::RootCert {
                        path: path.clone(),
                        source,
                    })?;
            }
            if store.is_empty() {
                return Err(OptionsError::NoRootCert(path.clone()));
            }
        }
    }
    Ok(Arc::new(store))
}

/// `prefer`/`require` without a root certificate: encrypted, the server not authenticated
/// (libpq's behaviour). The handshake signature is still checked against the certificate.
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (chain only) and `verify-full` (chain and host name).
#[derive(Debug)]
struct WebPki {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for WebPki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // webpki checks the name after the chain: a name error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// tokio-postgres' `MakeTlsConnect` over rustls.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnectOne, io::Error> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{host}` is not a host name TLS can check: {e}"),
            )
        })?;
        Ok(RustlsConnectOne {
            config: self.config.clone(),
            name,
        })
    }
}

/// One connection's handshake.
pub struct RustlsConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// An encrypted connection to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// RFC 5929 `tls-server-end-point`: the hash of the server's certificate, with the hash
    /// of its signature algorithm (SHA-256 for MD5, SHA-1 and SHA-256).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, conn) = self.0.get_ref();
        match conn.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => {
                let digest = ring::digest::digest(signature_hash(cert), cert);
                ChannelBinding::tls_server_end_point(digest.as_ref().to_vec())
            }
            None => ChannelBinding::none(),
        }
    }
}

/// The digest RFC 5929 asks for, from the certificate's `signatureAlgorithm` OID.
fn signature_hash(cert: &[u8]) -> &'static ring::digest::Algorithm {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE
    // { algorithm OID, ... }, signature BIT STRING }
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let oid = der(cert, 0x30)
        .and_then(|(body, _)| der(body, 0x30))
        .and_then(|(_tbs, rest)| der(rest, 0x30))
        .and_then(|(alg, _)| der(alg, 0x06))
        .map(|(oid, _)| oid);
    match oid {
        Some(o) if SHA384.contains(&o) => &ring::digest::SHA384,
        Some(o) if SHA512.contains(&o) => &ring::digest::SHA512,
        _ => &ring::digest::SHA256,
    }
}

/// One DER element of tag `tag` at the start of `b`: (its content, what follows it).
fn der(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = b.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    if t != tag {
        return None;
    }
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes.iter().fold(0usize, |acc, &x| (acc << 8) | x as usize)
    };
    rest.split_at_checked(len)
}

/// `key=value&...` of a URL, percent-decoded.
fn url_params(url: &str) -> Result<Vec<(String, String)>, OptionsError> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(Vec::new());
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// `key=value key='quoted value'` pairs of a libpq keyword/value string.
fn keyword_pairs(conn: &str) -> Result<Vec<(String, String)>, OptionsError> {
    let mut pairs = Vec::new();
    let mut chars = conn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(OptionsError::NoValue(key));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(OptionsError::OpenQuote(key)),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn percent_decode(s: &str) -> Result<String, OptionsError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| OptionsError::PercentEscape(s.to_string()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| OptionsError::NotUtf8(s.to_string()))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_are_taken_out_and_the_rest_kept() {
        let o = ConnOptions::parse(
            "postgresql://u:p%40ss@h:5432/db?application_name=a%20b&sslmode=verify-full\
             &sslrootcert=%2Ftmp%2Fca%20x.pem",
        )
        .unwrap();
        assert_eq!(o.mode, SslMode::VerifyFull);
        assert_eq!(o.root_cert, Some(Roots::File("/tmp/ca x.pem".into())));
        assert_eq!(
            o.rest,
            "postgresql://u:p%40ss@h:5432/db?application_name=a%20b&sslmode=require"
        );
        let cfg: tokio_postgres::Config = o.rest.parse().unwrap();
        assert_eq!(cfg.get_application_name(), Some("a b"));
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn default_is_prefer_and_disable_stays_disable() {
        let o = ConnOptions::parse("postgresql://postgres@127.0.0.1:5432/postgres").unwrap();
        assert_eq!((o.mode, o.root_cert), (SslMode::Prefer, None));
        assert_eq!(
            o.rest,
            "postgresql://postgres@127.0.0.1:5432/postgres?sslmode=prefer"
        );
        let o = ConnOptions::parse("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(o.mode, SslMode::Disable);
        assert_eq!(o.rest, "postgres://h/db?sslmode=disable");
        let o = ConnOptions::parse("postgres://h/db?sslmode=allow&sslrootcert=system").unwrap();
        assert_eq!((o.mode, o.root_cert), (SslMode::Allow, Some(Roots::System)));
        assert_eq!(o.rest, "postgres://h/db?sslmode=prefer");
    }

    #[test]
    fn keyword_strings_are_parsed_with_quotes() {
        let o = ConnOptions::parse(
            "host=127.0.0.1 user = postgres password='it\\'s a secret' sslmode=verify-ca \
             sslrootcert='/etc/my ca.pem'",
        )
        .unwrap();
        assert_eq!(o.mode, SslMode::VerifyCa);
        assert_eq!(o.root_cert, Some(Roots::File("/etc/my ca.pem".into())));
        let cfg: tokio_postgres::Config = o.rest.parse().unwrap();
        assert_eq!(cfg.get_password(), Some(&b"it's a secret"[..]));
        assert_eq!(cfg.get_user(), Some("postgres"));
        assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn bad_options_are_named() {
        let e = ConnOptions::parse("postgres://h/db?sslmode=verify").unwrap_err();
        assert!(
            matches!(e, OptionsError::SslMode(ref m) if m == "verify"),
            "{e:?}"
        );
        assert!(e.to_string().contains("sslmode `verify`"), "{e}");
        let e = ConnOptions::parse("postgres://h/db?sslcert=/c.pem").unwrap_err();
        assert!(
            e.to_string()
                .contains("sslcert: client certificates are not supported"),
            "{e}"
        );
        let e = ConnOptions::parse("host=h password='open").unwrap_err();
        assert!(
            e.to_string().contains("`password`'s quote is not closed"),
            "{e}"
        );
        let e =
            ConnOptions::parse("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent.pem")
                .unwrap()
                .connector()
                .err()
                .unwrap();
        assert!(matches!(e, OptionsError::RootCertFile { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("sslrootcert /nonexistent.pem:"),
            "{e}"
        );
        assert!(
            std::error::Error::source(&e).is_some(),
            "the io cause is kept"
        );
    }

    #[test]
    fn channel_binding_hash_follows_the_signature_algorithm() {
        // A minimal DER skeleton: SEQUENCE { SEQUENCE {} , SEQUENCE { OID } }.
        let cert = |oid: &[u8]| {
            let mut alg = vec![0x06, oid.len() as u8];
            alg.extend_from_slice(oid);
            let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
            body.extend(alg);
            let mut c = vec![0x30, body.len() as u8];
            c.extend(body);
            c
        };
        let sha384_rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
        let sha256_rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
        let ecdsa512 = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
        assert_eq!(
            signature_hash(&cert(&sha384_rsa)).output_len(),
            48,
            "sha384WithRSAEncryption"
        );
        assert_eq!(signature_hash(&cert(&sha256_rsa)).output_len(), 32);
        assert_eq!(signature_hash(&cert(&ecdsa512)).output_len(), 64);
        assert_eq!(signature_hash(b"not der").output_len(), 32);
    }
}
