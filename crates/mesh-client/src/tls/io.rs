//! Connections: the server's accept loop (TLS handshake with a timeout,
//! peer identity captured) and the client's connector.
//!
//! A TLS listener handshakes at most `max_handshakes` connections at once.
//! At the limit it stops accepting, so new connections wait in the
//! kernel's accept backlog rather than being accepted and closed at once:
//!
//! - a connection waiting in the backlog costs this process nothing (no
//!   file descriptor, no task, no buffers); one accepted only to be closed
//!   costs an accept, a descriptor and a close, which a flood makes the
//!   process do at the flood's rate;
//! - a burst of legitimate reconnects (every client of a restarted
//!   replica at once) is smoothed instead of refused: each waits a moment
//!   for a slot, where closing would fail them all into reconnect backoff
//!   and a log line each;
//! - when the backlog itself is full the kernel refuses or SYN-cookies new
//!   connections, which is its well-tried flood handling.
//!
//! Neither choice tells a slow attacker from a client, so under a sustained
//! flood of idle connections both starve new clients; the handshake timeout
//! bounds how long each slot is held, and waiting clients are served as
//! slots free up, in arrival order.
//!
//! Failed handshakes are logged through a [`LogLimiter`]: a flood of them
//! is a few lines a second with a count of the rest, not a line each.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
    time::Instant,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::{MeshTls, ServerTls, SpiffeId, identity::leaf_info};
use crate::telemetry::metrics::Metrics;

/// Who is on the other end of an inbound connection. Servers built with
/// `MeshServer` put it in every request's extensions.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    /// The peer's verified SPIFFE ID (mTLS only).
    pub identity: Option<SpiffeId>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// The verified SPIFFE ID of the caller of `request`, if any. Identity
/// claimed in request metadata is never consulted.
pub fn caller_identity<T>(request: &tonic::Request<T>) -> Option<&SpiffeId> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.as_ref())
}

/// A connection, plain or TLS: one implementation of the I/O traits for
/// both the server's accepted and the client's dialled connections.
pub(crate) enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    // Vectored writes let HTTP/2 send headers and data in one syscall.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An accepted connection and who is on the other end.
pub(crate) struct MeshStream {
    io: MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>,
    info: PeerInfo,
    /// Fires when the client's certificate expires: the connection is cut
    /// then. TLS checks a certificate once, at the handshake; without this
    /// a connection (and the identity its calls are authorised as) would
    /// outlive the certificate by up to `maxConnectionAge`. Clients retire
    /// their connections a little earlier, so the cut finds none in use.
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The client certificate's notAfter, checked against the wall clock
    /// too: the timer's monotonic clock stops while a VM is suspended.
    not_after: Option<SystemTime>,
    /// Set once the certificate expired; every read and write fails from
    /// then on.
    expired: bool,
}

impl MeshStream {
    /// The error every read and write gives once the client's certificate
    /// has expired.
    fn check_expiry(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.expired {
            let fired = self
                .expires
                .as_mut()
                .is_some_and(|expiry| expiry.as_mut().poll(cx).is_ready())
                || self.not_after.is_some_and(|at| SystemTime::now() >= at);
            if !fired {
                return Ok(());
            }
            self.expired = true;
            tracing::info!(
                peer = ?self.info.identity.as_ref().map(|id| id.to_string()),
                remote = ?self.info.remote_addr,
                "closing a connection: the client's certificate expired"
            );
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the client's certificate expired",
        ))
    }
}

/// A timer that fires at `at` (a wall-clock time), or now if it has
/// passed; none for a certificate valid for more than a year yet (a timer
/// capped there would cut a connection whose certificate is still good,
/// and `maxConnectionAge` ends connections long before).
fn expiry_timer(at: SystemTime) -> Option<Pin<Box<tokio::time::Sleep>>> {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    (left <= Duration::from_secs(365 * 86_400)).then(|| Box::pin(tokio::time::sleep(left)))
}

impl Connected for MeshStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_expiry(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_expiry(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_expiry(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_expiry(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Rate limit of a log line that an outsider can trigger at will: at most
/// `burst` lines per second; the first line after a quiet spell says how
/// many were left out.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    burst: u32,
    state: std::sync::Mutex<LogWindow>,
}

#[derive(Debug)]
struct LogWindow {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// The window lines are counted in.
    const WINDOW: Duration = Duration::from_secs(1);

    pub(crate) fn new(burst: u32) -> Self {
        Self {
            burst,
            state: std::sync::Mutex::new(LogWindow {
                started: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log a line at `now`: `Some(n)` with the number of lines
    /// suppressed since the last one logged, or `None` to stay quiet.
    pub(crate) fn check(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().expect("log limiter lock");
        if w.started
            .is_none_or(|s| now.saturating_duration_since(s) >= Self::WINDOW)
        {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < self.burst {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Handshake failure lines a listener logs per second at most.
const HANDSHAKE_LOG_BURST: u32 = 5;

/// Logs a failed handshake unless too many were logged this second.
fn log_handshake_failure(limiter: &LogLimiter, remote: SocketAddr, what: std::fmt::Arguments<'_>) {
    match limiter.check(Instant::now()) {
        Some(0) => tracing::warn!(%remote, "{what}"),
        Some(suppressed) => tracing::warn!(
            %remote,
            suppressed,
            "{what} ({suppressed} more TLS handshake failures not logged, at most {HANDSHAKE_LOG_BURST} a second)"
        ),
        None => tracing::debug!(%remote, "{what}"),
    }
}

/// Accepts connections until `stop` or until the receiver is dropped,
/// handshaking TLS (bounded by the handshake timeout, at most
/// `max_handshakes` at once; see the module docs) off the accept path.
/// Failed handshakes are counted in `metrics`.
pub(crate) fn accept_loop(
    listener: TcpListener,
    tls: Option<ServerTls>,
    max_handshakes: usize,
    stop: CancellationToken,
    metrics: Metrics,
) -> mpsc::Receiver<io::Result<MeshStream>> {
    let (tx, rx) = mpsc::channel(128);
    let slots = Arc::new(Semaphore::new(max_handshakes));
    let failures = Arc::new(LogLimiter::new(HANDSHAKE_LOG_BURST));
    tokio::spawn(async move {
        loop {
            // With TLS, a handshake slot first: at the limit, new
            // connections wait in the kernel's backlog.
            let slot = match &tls {
                None => None,
                Some(_) => tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    slot = slots.clone().acquire_owned() => Some(slot.expect("the semaphore is never closed")),
                },
            };
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, do not spin.
                        if let Some(suppressed) = failures.check(Instant::now()) {
                            tracing::warn!(suppressed, "accept failed: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                let info = PeerInfo {
                    remote_addr: Some(remote),
                    identity: None,
                    tls: false,
                };
                if tx
                    .send(Ok(MeshStream {
                        io: MaybeTls::Plain(tcp),
                        info,
                        expires: None,
                        not_after: None,
                        expired: false,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let (tx, failures, metrics) = (tx.clone(), failures.clone(), metrics.clone());
            tokio::spawn(async move {
                let acceptor = TlsAcceptor::from(tls.config());
                let handshake =
                    tokio::time::timeout(tls.handshake_timeout(), acceptor.accept(tcp)).await;
                // The slot is for the handshake only, not the connection's life.
                drop(slot);
                match handshake {
                    Ok(Ok(stream)) => {
                        let leaf = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|leaf| leaf_info(leaf).ok());
                        let info = PeerInfo {
                            remote_addr: Some(remote),
                            identity: leaf.as_ref().and_then(|l| l.identity.clone()),
                            tls: true,
                        };
                        let _ = tx
                            .send(Ok(MeshStream {
                                io: MaybeTls::Tls(Box::new(stream)),
                                info,
                                expires: leaf.as_ref().and_then(|l| expiry_timer(l.not_after)),
                                not_after: leaf.map(|l| l.not_after),
                                expired: false,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        metrics.handshake_failed("refused");
                        log_handshake_failure(
                            &failures,
                            remote,
                            format_args!("TLS handshake refused: {e}"),
                        )
                    }
                    Err(_) => {
                        metrics.handshake_failed("timed_out");
                        log_handshake_failure(
                            &failures,
                            remote,
                            format_args!(
                                "TLS handshake timed out after {:?}; connection dropped",
                                tls.handshake_timeout()
                            ),
                        )
                    }
                }
            });
        }
    });
    rx
}

/// Makes a client connection to one endpoint: TCP, then (with TLS) a
/// handshake that presents this workload's certificate and checks the
/// server is `expected`.
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<Arc<MeshTls>>,
    pub(crate) expected: Option<SpiffeId>,
    /// Bounds TCP connect and TLS handshake together. Kept here, not as
    /// tonic's `connect_timeout`: tonic applies that outside its
    /// `ConnectError`, so a connect that timed out (SYNs dropped: a
    /// blackholed node) looked like an error on a sent request (never
    /// retried, `UNKNOWN`, no reconnect backoff) instead of a failed connect.
    pub(crate) connect_timeout: std::time::Duration,
}

/// A dialled connection.
pub(crate) type ClientStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl Connector {
    /// Dials: TCP, then (with TLS) the handshake. Gives the connection and,
    /// over TLS, when the earlier of its two certificates (ours as sent,
    /// the server's as received) expires: the connection is good until then.
    pub(crate) fn dial(
        &self,
    ) -> futures::future::BoxFuture<'static, io::Result<(TokioIo<ClientStream>, Option<SystemTime>)>>
    {
        let this = self.clone();
        let limit = self.connect_timeout;
        let connect = async move {
            let tcp = TcpStream::connect(this.addr).await?;
            tcp.set_nodelay(true)?;
            let Some(tls) = this.tls else {
                return Ok((TokioIo::new(MaybeTls::Plain(tcp)), None));
            };
            // Read before the handshake: a renewal meanwhile only makes the
            // certificate sent later-expiring than this.
            let ours = tls.expires_at();
            let config = tls
                .client_config(this.expected)
                .map_err(|e| io::Error::other(e.to_string()))?;
            // The name is only for SNI; the server is verified by SPIFFE ID.
            let name = rustls::pki_types::ServerName::IpAddress(this.addr.ip().into());
            let stream = tokio::time::timeout(
                tls.handshake_timeout(),
                TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            let theirs = peer_expiry(stream.get_ref().1.peer_certificates());
            let expires = theirs.map_or(ours, |theirs| theirs.min(ours));
            Ok((TokioIo::new(MaybeTls::Tls(Box::new(stream))), Some(expires)))
        };
        Box::pin(async move {
            tokio::time::timeout(limit, connect).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within the connect timeout of {limit:?}"),
                )
            })?
        })
    }
}

/// When the leaf of a verified peer chain expires.
fn peer_expiry(chain: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> Option<SystemTime> {
    chain
        .and_then(|certs| certs.first())
        .and_then(|leaf| leaf_info(leaf).ok())
        .map(|info| info.not_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_limiter_lets_a_burst_through_then_counts_the_rest() {
        let limiter = LogLimiter::new(2);
        let t0 = Instant::now();
        assert_eq!(limiter.check(t0), Some(0));
        assert_eq!(limiter.check(t0), Some(0));
        for i in 1..=1000u64 {
            assert_eq!(limiter.check(t0 + Duration::from_micros(i)), None);
        }
        // The next window's first line reports what was left out.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.check(t1), Some(1000));
        assert_eq!(limiter.check(t1), Some(0));
        assert_eq!(limiter.check(t1), None);
        assert_eq!(limiter.check(t1 + Duration::from_millis(999)), None);
        assert_eq!(limiter.check(t1 + Duration::from_secs(5)), Some(2));
    }

    #[test]
    fn a_flood_logs_at_most_a_burst_a_second() {
        let limiter = LogLimiter::new(HANDSHAKE_LOG_BURST);
        let t0 = Instant::now();
        // 100 000 failures over 10 s.
        let logged = (0..100_000u64)
            .filter(|i| limiter.check(t0 + Duration::from_micros(i * 100)).is_some())
            .count();
        assert!(logged <= 10 * HANDSHAKE_LOG_BURST as usize + 1, "{logged}");
        assert!(logged >= 10, "{logged}");
    }
}
