//! Accepting connections with bounds, for both doors (HTTP and gRPC).
//!
//! What flows through it: TCP connections, from the listeners to hyper (HTTP) and tonic
//! (gRPC). Each takes a slot of [`Connections`] (`server.max_connections`, shared by the
//! two doors, so file descriptors stay for the WAL, the archive and the stores); when none
//! is free, accepting waits and new clients queue in the kernel's backlog. Each is
//! wrapped in [`IdleIo`], which closes it after `server.idle_timeout` without a byte read
//! or written, whatever the protocol state (an idle keep-alive, a client that never sends
//! its request or the HTTP/2 preface). HTTP adds a limit on the time to send the request
//! headers (`server.header_timeout`) and the body (`server.body_timeout`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// File descriptors kept back from connections, for the WAL, the archive, the stores'
/// connections, spill files and the like.
pub const FD_RESERVE: u64 = 512;

/// Raises the soft limit of open files to the hard one; returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit on a struct of ours.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        lim.rlim_cur
    }
    #[cfg(not(unix))]
    1024
}

/// Connection slots shared by the HTTP and gRPC listeners.
#[derive(Clone, Debug)]
pub struct Connections {
    slots: Arc<Semaphore>,
    pub max: usize,
    pub idle_timeout: Duration,
}

impl Connections {
    /// `configured` (0: derived from the open-file limit, keeping [`FD_RESERVE`] back).
    pub fn new(configured: usize, idle_timeout: Duration) -> Self {
        let fds = raise_fd_limit();
        let room = fds.saturating_sub(FD_RESERVE).max(16) as usize;
        let max = if configured == 0 {
            room.min(4096)
        } else {
            if configured > room {
                tracing::warn!(
                    configured,
                    open_file_limit = fds,
                    "server.max_connections leaves fewer than {FD_RESERVE} file descriptors for the WAL and the stores; using {room}"
                );
            }
            configured.min(room)
        };
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            idle_timeout,
        }
    }

    /// Waits for a free slot, then for a connection; transient accept errors (out of file
    /// descriptors, a connection reset before it was taken) are waited out.
    pub async fn accept(&self, listener: &TcpListener) -> (IdleIo<TcpStream>, SocketAddr) {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (IdleIo::new(stream, self.idle_timeout, permit), addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// The gRPC listener's connections as a stream for tonic.
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> impl futures::Stream<Item = io::Result<IdleIo<TcpStream>>> + Send + 'static {
        futures::stream::unfold((self, listener), |(conns, listener)| async move {
            let (io, _) = conns.accept(&listener).await;
            Some((Ok(io), (conns, listener)))
        })
    }
}

/// A connection closed after `timeout` with no byte read or written; holds its slot of
/// [`Connections`] while open.
pub struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl<T> IdleIo<T> {
    fn new(inner: T, timeout: Duration, slot: OwnedSemaphorePermit) -> Self {
        Self {
            inner,
            timeout,
            idle: Box::pin(tokio::time::sleep(timeout)),
            _slot: slot,
        }
    }

    fn progressed(&mut self) {
        let at = tokio::time::Instant::now() + self.timeout;
        self.idle.as_mut().reset(at);
    }

    /// `Pending` until the idle time is up, then the error that closes the connection.
    /// A write's outcome: bytes written restart the idle clock; a write that waits fails
    /// once the connection has been idle too long.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.progressed();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.idle_error(cx).map(Err),
        }
    }

    fn idle_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle past server.idle_timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle_error(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for IdleIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// HTTP timeouts (from `[server]`).
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// Time to send the request line and headers.
    pub header: Duration,
    /// Time to send the body.
    pub body: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish (the caller bounds how long it waits).
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    conns: Connections,
    timeouts: HttpTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        timeouts.body,
    ));
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (io, _) = tokio::select! {
            c = conns.accept(&listener) => c,
            _ = &mut shutdown => break,
        };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
