//! An endpoint's HTTP/2 connection, driven through the `h2` crate directly.
//!
//! tonic's `Channel` puts a `tower::Buffer` in front of hyper, and hyper's
//! HTTP/2 client puts a dispatcher of its own in front of `h2`: every call
//! is a hop over an mpsc queue to the connection's task, a task spawned
//! for the wait on its response, and a oneshot back (about 6 µs a call on
//! this machine's loopback, measured against a bare `h2` client in
//! `docs/benchmarks.md`). The balancer already decides which endpoint is
//! fit for a call, so none of that buys the mesh anything. Here a call
//! opens its stream from its own task: it takes the connection's gate (a
//! fair async lock over h2's [`SendRequest`], held only while the stream
//! is opened), writes its request body in place (a unary body is whole on
//! its first poll) and waits on h2's response future. Only a request body
//! still streaming when the response head arrives gets a task of its own.
//!
//! States: `Idle` (no connection yet, or the last dial failed),
//! `Connecting` (one dial in progress, shared by every call that arrives
//! meanwhile), `Ready` (a live connection). A `Ready` connection whose h2
//! side has closed (EOF, keepalive timeout, I/O error, or a GOAWAY noticed)
//! is found closed by the next call, which dials again; calls already on
//! the old connection finish there (a GOAWAY lets the streams it names
//! complete). Nothing is dialled before the first call or health watch,
//! and an idle connection holds one task (its h2 connection and keepalive).
//!
//! Over TLS a connection retires shortly before the earlier of its two
//! certificates expires ([`retire_at`]): the next call dials a new one
//! (with the renewed certificate) and the old one closes when its calls
//! are done, before the server would cut it at the expiry.
//!
//! Failures map so the balancer and the retry layer classify them as they
//! did a tonic `Channel`'s: a failed dial fails its calls with a
//! [`tonic::ConnectError`] (the balancer's cue for the endpoint's reconnect
//! backoff, the retry layer's "never sent"); a stream the server refused
//! is h2's `REFUSED_STREAM`; a request whose connection had closed (h2
//! refuses to open its stream) fails as [`Unsent`], carrying the request:
//! it provably never left, and the balancer sends it once more to an
//! endpoint it picks, avoiding this one (a request racing a drain's
//! GOAWAY then costs no retry, charges the endpoint nothing, and does not
//! go back to the draining address).
//!
//! A dial is done once the server has sent its first bytes (an HTTP/2
//! server's SETTINGS, which it sends first; any bytes count, and a server
//! that sends something else is caught as below): one that closes
//! without a word is a failed dial. A connection that closes without ever answering a call
//! (a server that closes right after its SETTINGS) hands its requests back marked
//! with its dial number ([`dead_dial`]): the balancer charges that once,
//! as a failed dial, so the endpoint backs off instead of costing a dial
//! per call.
//!
//! Calls beyond the server's stream limit wait at the gate in arrival
//! order, at most [`MAX_PENDING_CALLS`] live calls per connection (past it
//! a call is refused at once, unsent: [`QueueFull`], load, not a failure);
//! a call that gives up leaves the line at once and costs the server
//! nothing. Only a line of [`STALL_WAITERS`] or more through which no
//! stream opened for a whole [`stall_window`] (a server that answers
//! pings but opens no streams) gets the connection cut: its socket fails,
//! and its calls fail with a [`tonic::ConnectError`] over [`Stalled`],
//! unsent, which backs the endpoint off as a failed dial would.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use http::{HeaderValue, Uri, uri::Authority};
use hyper_util::rt::TokioIo;
use tonic::body::Body;

use crate::{BoxError, config::EndpointConfig};
/// HTTP/2 connection flow-control window we advertise: 32 streams'
/// worth of [`STREAM_WINDOW`]. h2 gives connection window back only as a
/// stream's data is read, so streams nobody reads (an outside caller
/// behind the gateway that stops reading) take their share of it until
/// released: with hyper's 5 MiB, three unread 2 MiB streams stalled every
/// other stream of the connection until their deadline; now it takes 32.
/// Not more: unread data is buffered here, and the connection window is
/// what one connection may hold (a gateway caps its callers' calls in
/// flight well below 32 each).
pub(crate) const CONNECTION_WINDOW: u32 = 32 * STREAM_WINDOW;
/// Per-stream flow-control window we advertise: what one unread stream
/// may hold in this process. 256 KiB keeps a stream at hundreds of MB/s
/// at LAN round trips (hyper's 2 MiB let each unread stream hold 2 MiB).
pub(crate) const STREAM_WINDOW: u32 = 256 * 1024;
/// Largest frame payload we accept (the HTTP/2 minimum, hyper's default).
pub(crate) const MAX_FRAME_SIZE: u32 = 16 * 1024;
/// Largest response header list we accept, in HPACK-decoded bytes
/// (hyper's default): a server sending more gets the stream reset.
pub(crate) const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams opened before the server's SETTINGS say how many it allows
/// (the RFC's recommended minimum, hyper's default); after that the
/// server's `SETTINGS_MAX_CONCURRENT_STREAMS` bounds us, and calls beyond
/// it wait at the connection's gate until a stream closes (at most
/// [`MAX_PENDING_CALLS`] live calls per connection).
pub(crate) const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Request bytes h2 buffers per stream beyond its flow-control window
/// before a streaming request body is read further (hyper's default).
pub(crate) const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams the server may make us reset for its protocol errors before we
/// close the connection (hyper's default flood guard).
pub(crate) const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Request body bytes written to h2 before the body's pipe waits for
/// flow-control window: a unary message (whole in memory already) goes
/// out without a round of window bookkeeping; a longer stream is read
/// only as fast as the server takes it.
const EAGER_BODY_BYTES: usize = 64 * 1024;
/// Headers (besides `connection`) that are about one HTTP/1 hop and are malformed in an HTTP/2
/// request (RFC 9113 8.2.2): h2 refuses a request carrying one, so they
/// are dropped, as hyper drops them (a gateway's HTTP/1 caller may send them).
const CONNECTION_HEADERS: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// The `user-agent` of calls that set none.
const USER_AGENT: &str = concat!("mesh-client/", env!("CARGO_PKG_VERSION"));

/// h2's handle for opening streams on one connection.
type Sender = h2::client::SendRequest<Bytes>;

/// One dial: a connected, handshaken HTTP/2 sender whose connection task
/// is already running, its socket behind the given [`Link`]'s switch.
type Dial = Box<dyn Fn(Arc<Link>) -> BoxFuture<'static, Result<Sender, BoxError>> + Send + Sync>;

/// One dial in progress, awaited by every call that needs it.
type Attempt = Shared<BoxFuture<'static, Result<Live, DialError>>>;

/// A live connection: its gate and its [`Link`].
#[derive(Clone)]
struct Live {
    /// The one handle streams are opened through, one call at a time: h2
    /// lets a handle have one stream waiting for a slot (the server's
    /// stream limit reached), so the calls behind it wait here, in order,
    /// and one that gives up leaves at once instead of opening a stream
    /// for nothing. Held only while a stream is opened.
    gate: Arc<tokio::sync::Mutex<Sender>>,
    link: Arc<Link>,
}

type Request = http::Request<Body>;

/// A response body read from h2: gives the flow-control window back as
/// its data is read (a stream nobody reads holds only its own window),
/// and tells its end from what it saw, without h2's lock (every layer
/// that wraps a body in `tonic::body::Body::new` asks; the connection
/// task holds that lock while it reads and writes frames): the end known
/// when the headers came, and a `None` or the trailers read since.
/// Answering `false` early is within the `http_body` contract: the reader
/// polls once more and gets the end.
struct Received {
    recv: h2::RecvStream,
    /// All data frames read; the trailers (or the end) come next.
    data_done: bool,
    ended: bool,
    /// The request body's pipe, if it was still streaming when the
    /// response head came: a caller done with the response is done with
    /// the call, so the pipe stops (and the stream is reset) with it.
    _pipe: Option<AbortOnDrop>,
}

/// A response from h2 as the mesh's layers take it (see [`Received`]).
fn received(
    response: http::Response<h2::RecvStream>,
    pipe: Option<AbortOnDrop>,
) -> http::Response<Body> {
    let (parts, recv) = response.into_parts();
    let ended = recv.is_end_stream();
    http::Response::from_parts(
        parts,
        Body::new(Received {
            recv,
            data_done: ended,
            ended,
            _pipe: pipe,
        }),
    )
}

impl http_body::Body for Received {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read, so the server may send as much again.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(e)) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(transport_error(e))));
                }
                None => self.data_done = true,
            }
        }
        let trailers = ready!(self.recv.poll_trailers(cx));
        self.ended = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(http_body::Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(transport_error(e))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// A call's h2 error as the layers above take it: a connection that
/// failed under the call (an I/O error, EOF, a keepalive or stall cut)
/// is `UNAVAILABLE`, as gRPC's HTTP/2 mapping and hyper's keepalive error
/// made it (tonic maps h2's I/O errors to `UNKNOWN`, which a caller must
/// not retry blindly); the h2 error stays its source, so the balancer and
/// the retry layer classify it as before. Stream errors (a reset, a
/// GOAWAY's refusal) go up as h2's, which tonic maps by their reason.
fn transport_error(e: h2::Error) -> BoxError {
    if !e.is_io() {
        return Box::new(e);
    }
    let mut status = tonic::Status::unavailable(format!("connection lost: {e}"));
    status.set_source(Arc::new(e));
    Box::new(status)
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A request body on its way into h2: written frame by frame, the first
/// [`EAGER_BODY_BYTES`] at once, the rest as the stream's flow-control
/// window opens (so a long stream is read from its source only as fast as
/// the server takes it, as hyper's pipe does). It stops when the body
/// ends, fails (the stream is reset), or the server resets the stream.
struct Pipe {
    body: Body,
    stream: h2::SendStream<Bytes>,
    /// Body bytes handed to h2 so far (up to the eager allowance).
    written: usize,
}

impl Pipe {
    /// Writes what the body has; `Ready` once the pipe is done.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use http_body::Body as _;
        loop {
            if self.written >= EAGER_BODY_BYTES && self.stream.capacity() == 0 {
                self.stream.reserve_capacity(1);
                match self.stream.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(0))) => continue,
                    Poll::Ready(Some(Ok(_))) => {}
                    // The stream or its connection is gone.
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return self.poll_reset(cx),
                }
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => return self.poll_reset(cx),
            };
            match frame {
                None => {
                    let _ = self.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Some(Err(e)) => {
                    // The server must not take a cut-off body for a whole one.
                    tracing::debug!("request body failed, stream reset: {e}");
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.body.is_end_stream();
                        self.written = self.written.saturating_add(data.len());
                        if self.stream.send_data(data, end).is_err() || end {
                            return Poll::Ready(());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = self.stream.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
            }
        }
    }

    /// `Ready` if the server reset the stream (nothing more to write),
    /// else `Pending` with the reset watched.
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.stream.poll_reset(cx).map(|_| ())
    }
}
/// Where a connection is, for tests and diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// No connection: never dialled, or the last dial failed.
    Idle,
    /// A dial is in progress.
    Connecting,
    /// Connected; new calls go on this connection.
    Ready,
    /// The connection closed (EOF, keepalive timeout, GOAWAY); the next
    /// call dials again.
    Closed,
}

enum State {
    Idle,
    Connecting(Attempt),
    Ready(Live),
}

struct Inner {
    state: Mutex<State>,
    dial: Dial,
    /// Dials started so far; each dial's number tells the calls that
    /// shared its failure apart from those of the next one.
    dials: std::sync::atomic::AtomicU64,
    /// Calls handed to this connection and not yet answered or dropped;
    /// shared with the socket, which coalesces its writes while it is more
    /// than one (see [`Severable`]).
    pending: Arc<std::sync::atomic::AtomicUsize>,
    connect_timeout: Duration,
    authority: Authority,
    /// When the live connection stops taking new calls (ms since the Unix
    /// epoch; 0: never): a certificate it was made with, ours or the
    /// peer's, is about to expire. See [`retire_at`].
    retire_at_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The task that releases the live connection when it retires: one
    /// per connection object, the previous one aborted when a new dial
    /// starts its own (a server that closes after every handshake would
    /// otherwise leave a task per dial, each asleep until its retirement).
    retire_task: Mutex<Option<tokio::task::AbortHandle>>,
    /// How long a full queue must stand still before the connection is
    /// cut (see [`stall_window`]); read only when the queue is full.
    stall_window: StallWindow,
}

/// A connection's stall window, read when its queue is full: a function,
/// so a config reload that raises a `maxTimeout` widens it for the
/// connections already made.
pub(crate) type StallWindow = Arc<dyn Fn() -> Duration + Send + Sync>;

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self
            .retire_task
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// How long before the earlier of the two certificates' expiry a
/// connection stops taking new calls, so the calls still on it finish
/// before the peer cuts it (a server closes a connection when its client's
/// certificate expires).
pub(crate) const RETIRE_BEFORE_EXPIRY: Duration = Duration::from_secs(5);

/// The most a connection's retirement is moved earlier at random, so
/// the connections made with one certificate (to every endpoint, and in
/// every client whose certificates were issued together) do not all dial
/// again in the same instant: a tenth of the time left, at most a minute.
pub(crate) const RETIRE_SPREAD: Duration = Duration::from_secs(60);

/// When a connection made at `now`, whose certificates (ours and the
/// peer's) expire at `expires`, stops taking new calls:
/// [`RETIRE_BEFORE_EXPIRY`] plus `draw` (in `[0, 1)`) of the spread
/// before. At expiry itself when that moment has passed already (the
/// certificate was not renewed: a new connection would carry the same
/// one, so redialling early buys nothing and would dial on every call);
/// never when the certificate has expired already (clocks disagree with
/// the peer's, who accepted it: the peer cuts the connection when it sees
/// the expiry, and retiring at once would dial on every call).
pub(crate) fn retire_at(
    expires: std::time::SystemTime,
    now: std::time::SystemTime,
    draw: f64,
) -> Option<std::time::SystemTime> {
    let left = expires.duration_since(now).ok().filter(|d| !d.is_zero())?;
    let spread = (left / 10).min(RETIRE_SPREAD).mul_f64(draw.clamp(0.0, 1.0));
    match expires.checked_sub(RETIRE_BEFORE_EXPIRY + spread) {
        Some(early) if early > now => Some(early),
        _ => Some(expires),
    }
}

fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(1, |d| (d.as_millis() as u64).max(1))
}

/// One HTTP/2 connection to one address, (re)made on demand.
#[derive(Clone)]
pub(crate) struct ClientConn {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClientConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConn")
            .field("authority", &self.inner.authority)
            .field("state", &self.state())
            .finish()
    }
}

/// The HTTP/2 settings of every client connection: the explicit limits
/// above, as hyper's client set them (server push off).
fn http2_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_window_size(STREAM_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .enable_push(false);
    builder
}

/// Runs one connection's h2 side until it ends, pinging the peer every
/// `interval` (busy or idle: a connection with no call in flight still
/// carries the health watch, and a dead peer must be found without
/// waiting for a call). A ping unanswered within `timeout` cuts the
/// connection: its socket fails, so its streams fail at once.
///
/// A peer that ends the connection with GOAWAY `ENHANCE_YOUR_CALM` and
/// debug data "too_many_pings" (what gRPC servers send a client that
/// pings more often than they permit) after this connection pinged it
/// doubles `interval` for this endpoint's connections from then on, as
/// gRPC's keepalive design (A8) has clients do; up to
/// [`MAX_KEEPALIVE_INTERVAL`]. The same code for another reason (h2's
/// "too_many_resets", after a burst of cancelled calls) leaves it alone:
/// a longer interval finds a dead peer later.
async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    link: Arc<Link>,
    interval: Arc<KeepaliveInterval>,
    timeout: Duration,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let pings = conn.ping_pong();
    let pinged = std::sync::atomic::AtomicBool::new(false);
    let keepalive = {
        let (interval, pinged) = (&interval, &pinged);
        async move {
            let Some(mut pings) = pings else {
                return std::future::pending().await;
            };
            loop {
                // Read anew each time: a drained connection's successor
                // learns of a doubling that came after it was dialled.
                tokio::time::sleep(interval.get()).await;
                pinged.store(true, std::sync::atomic::Ordering::Relaxed);
                match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    // The connection is ending; it tells why itself.
                    Ok(Err(_)) => return std::future::pending().await,
                    Err(_) => return,
                }
            }
        }
    };
    tokio::select! {
        ended = &mut conn => {
            if let Err(e) = ended {
                tracing::debug!("HTTP/2 client connection ended: {e}");
                if pinged.load(std::sync::atomic::Ordering::Relaxed) && too_many_pings(&e) {
                    let was = interval.get();
                    let doubled = interval.double();
                    tracing::warn!(
                        "the peer ended the connection with ENHANCE_YOUR_CALM \"too_many_pings\": \
                         keepalive PINGs to it now every {doubled:?} (was {was:?})"
                    );
                }
            }
        }
        () = keepalive => {
            tracing::debug!("HTTP/2 client connection cut: no PING answer within {timeout:?}");
            link.sever(Cut::Keepalive(timeout));
            let _ = conn.await;
        }
    }
    link.hear(Err(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the connection ended",
    )));
    link.close();
}

/// Whether `e` is a peer's GOAWAY `ENHANCE_YOUR_CALM` with debug data
/// "too_many_pings" (gRPC's signal that the client pings too often). h2
/// shows a GOAWAY's debug data only in the error's text.
fn too_many_pings(e: &h2::Error) -> bool {
    e.is_go_away()
        && e.is_remote()
        && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
        && e.to_string().contains("too_many_pings")
}

/// The longest interval a peer's `ENHANCE_YOUR_CALM` can stretch the
/// keepalive to: a dead peer is still found within the hour.
const MAX_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3600);

/// The keepalive interval of one endpoint's connections, which a peer that
/// finds the pings too frequent doubles (see [`drive`]); kept across
/// reconnects, so a redial does not start over at the short interval.
struct KeepaliveInterval(std::sync::atomic::AtomicU64);

impl KeepaliveInterval {
    fn new(interval: Duration) -> Self {
        // At least 1 ms: a sub-millisecond interval would round to no
        // wait at all, and zero never doubles.
        Self(std::sync::atomic::AtomicU64::new(
            interval.as_millis().clamp(1, u128::from(u64::MAX)) as u64,
        ))
    }

    fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Doubles the interval, to at most [`MAX_KEEPALIVE_INTERVAL`] (one
    /// configured longer stays as it is); returns the new interval.
    fn double(&self) -> Duration {
        let max = MAX_KEEPALIVE_INTERVAL.as_millis() as u64;
        let doubled = |ms: u64| ms.saturating_mul(2).min(max.max(ms));
        let previous = self
            .0
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |ms| Some(doubled(ms)),
            )
            .unwrap_or_else(|ms| ms);
        Duration::from_millis(doubled(previous))
    }
}

impl ClientConn {
    /// A connection to `authority` that dials with `connect` (TCP, and
    /// TLS when the mesh has an identity) and then shakes hands with the
    /// HTTP/2 settings of [`http2_builder`]. The connect timeout of
    /// `settings` bounds the dial, the handshake and the wait for the
    /// server's first bytes together. Nothing is dialled until the first
    /// call.
    pub(crate) fn new<F, Fut, T>(
        authority: Authority,
        settings: &EndpointConfig,
        connect: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<T>> + Send + 'static,
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        Self::expiring(authority, settings, move || {
            let io = connect();
            async move { io.await.map(|io| (io, None)) }
        })
    }

    /// As [`ClientConn::new`], for connections that are valid only until
    /// a moment `connect` reports with each one (its certificates'
    /// expiry): from [`retire_at`] on, new calls go on a new connection
    /// and the old one closes once its calls are done.
    pub(crate) fn expiring<F, Fut, T>(
        authority: Authority,
        settings: &EndpointConfig,
        connect: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<(T, Option<std::time::SystemTime>)>> + Send + 'static,
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let builder = http2_builder();
        let interval = Arc::new(KeepaliveInterval::new(settings.keepalive_interval));
        let timeout = settings.keepalive_timeout;
        let retire_at_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let retire = retire_at_ms.clone();
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let busy = pending.clone();
        let dial: Dial = Box::new(move |link| {
            let io = connect();
            let builder = builder.clone();
            let interval = interval.clone();
            let retire = retire.clone();
            let busy = busy.clone();
            Box::pin(async move {
                let (io, expires) = io.await?;
                let io = Severable {
                    io,
                    link: link.clone(),
                    busy,
                    // The preface is written before any read: not put off.
                    armed: false,
                    deferred: false,
                };
                let io = Hearing {
                    io: TokioIo::new(io),
                    link: link.clone(),
                    heard: false,
                };
                let (send, conn) = builder.handshake::<_, Bytes>(io).await?;
                // Written before the dial's outcome becomes the state
                // (under the state's lock), so a call that finds this
                // connection Ready reads its own retirement time.
                let now = std::time::SystemTime::now();
                retire.store(
                    expires
                        .and_then(|at| retire_at(at, now, rand::random::<f64>()))
                        .map_or(0, unix_ms),
                    std::sync::atomic::Ordering::Relaxed,
                );
                // Ends when the connection does, or once every handle and
                // stream is gone (h2 then says GOAWAY and closes).
                tokio::spawn(drive(conn, link.clone(), interval, timeout));
                // An HTTP/2 server speaks first (its SETTINGS, RFC 9113
                // 3.4), as grpc-go's client also waits for: one that
                // closes without a word (a proxy with nothing behind it,
                // a TLS server refusing the client's certificate) is a
                // failed dial, backed off as one, not a connection every
                // call meets broken after its request may have left.
                link.server_spoke().await?;
                Ok(send)
            })
        });
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::Idle),
                dial,
                dials: std::sync::atomic::AtomicU64::new(0),
                pending,
                connect_timeout: settings.connect_timeout,
                authority,
                retire_at_ms,
                retire_task: Mutex::new(None),
                stall_window: {
                    let window = stall_window(crate::config::DEFAULT_MAX_TIMEOUT, settings);
                    Arc::new(move || window)
                },
            }),
        }
    }

    /// This connection with its stall window computed by `window` (the
    /// longest deadline its calls may have, from the live config) instead
    /// of from the default `maxTimeout`.
    pub(crate) fn with_stall_window(mut self, window: StallWindow) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("set before the connection is shared")
            .stall_window = window;
        self
    }

    /// A connection that can never be made (`why` says so to its calls):
    /// for endpoints that are only modelled and never called.
    pub(crate) fn unconnectable(addr: SocketAddr, why: &'static str) -> Self {
        Self::new(
            authority_of(addr),
            &EndpointConfig::default(),
            move || async move {
                Err::<hyper_util::rt::TokioIo<tokio::net::TcpStream>, _>(io::Error::other(why))
            },
        )
    }

    /// Where the connection is now.
    pub(crate) fn state(&self) -> ConnState {
        match &*self.inner.lock() {
            State::Idle => ConnState::Idle,
            State::Connecting(_) => ConnState::Connecting,
            State::Ready(live) if live.closed() || self.inner.retired() => ConnState::Closed,
            State::Ready(_) => ConnState::Ready,
        }
    }

    /// When the live connection stops taking new calls (its certificates
    /// are about to expire), if it was made over TLS.
    pub(crate) fn retire_at(&self) -> Option<std::time::SystemTime> {
        self.inner.retire_time()
    }

    /// Calls waiting at the live connection's gate for their stream.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        match &*self.inner.lock() {
            State::Ready(live) => live.link.waiting(),
            _ => 0,
        }
    }

    /// Sends `req` on the connection, dialling first if there is none.
    pub(crate) fn call(&self, mut req: Request) -> ResponseFuture {
        use std::sync::atomic::Ordering::Relaxed;
        // Calls beyond the server's stream limit wait at the gate; a peer
        // that stops opening streams (and still answers pings) would hold
        // every call until its deadline. Past the bound a call fails at
        // once, unsent, and may go elsewhere.
        if self.inner.pending.fetch_add(1, Relaxed) >= MAX_PENDING_CALLS {
            self.inner.pending.fetch_sub(1, Relaxed);
            return ResponseFuture {
                kind: Kind::Refused(Some(Box::new(Unsent::refused(req)))),
                _pending: None,
            };
        }
        let pending = PendingCall(self.inner.clone());
        self.prepare(&mut req);
        let mut response = self.send(req);
        response._pending = Some(pending);
        response
    }

    /// Sends `req` (its origin set) on the live connection or a new one.
    fn send(&self, req: Request) -> ResponseFuture {
        let attempt = {
            let mut state = self.inner.lock();
            // A dial whose task ended without recording its outcome (it
            // panicked, or its runtime went away) must not hold every
            // later call to its result.
            if let State::Connecting(attempt) = &*state
                && let Some(outcome) = attempt.peek()
            {
                *state = match outcome {
                    Ok(live) => State::Ready(live.clone()),
                    Err(_) => State::Idle,
                };
            }
            match &mut *state {
                State::Ready(live)
                    if live.link.waiting() >= STALL_WAITERS
                        && live
                            .link
                            .stalled(tokio::time::Instant::now(), (self.inner.stall_window)()) =>
                {
                    // A line at the gate, and no stream opened through it
                    // for a whole stall window: the server opens no
                    // streams. Cut the connection: its calls fail as a
                    // stalled connection (never sent), and the balancer
                    // backs the endpoint off.
                    let link = live.link.clone();
                    *state = State::Idle;
                    drop(state);
                    tracing::warn!(authority = %self.inner.authority, "{}", Stalled);
                    link.sever(Cut::Stalled);
                    return ResponseFuture {
                        kind: Kind::Refused(Some(link.stalled_error())),
                        _pending: None,
                    };
                }
                // A retired connection is replaced below: dropping its
                // gate lets h2 close it once its calls are done.
                State::Ready(live) if !live.link.is_closed() && !self.inner.retired() => {
                    // The fast path: the call opens its own stream.
                    return ResponseFuture {
                        kind: Kind::Call(Box::pin(exchange(live.clone(), req))),
                        _pending: None,
                    };
                }
                State::Connecting(attempt) => attempt.clone(),
                State::Ready(_) | State::Idle => {
                    let attempt = self.start_dial();
                    *state = State::Connecting(attempt.clone());
                    attempt
                }
            }
        };
        ResponseFuture {
            _pending: None,
            kind: Kind::Call(Box::pin(async move {
                let live = attempt
                    .await
                    .map_err(|e| -> BoxError { Box::new(tonic::ConnectError(Box::new(e))) })?;
                exchange(live, req).await
            })),
        }
    }

    /// A dial on its own task, bounded by the connect timeout; its outcome
    /// becomes the connection's state whether or not a call still waits.
    fn start_dial(&self) -> Attempt {
        let number = 1 + self
            .inner
            .dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let link = Arc::new(Link::new(number, (self.inner.stall_window)()));
        let dial = (self.inner.dial)(link.clone());
        let limit = self.inner.connect_timeout;
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let result = match tokio::time::timeout(limit, dial).await {
                Ok(Ok(send)) => Ok(Live {
                    gate: Arc::new(tokio::sync::Mutex::new(send)),
                    link,
                }),
                Ok(Err(e)) => Err(DialError::from_box(e, number)),
                Err(_) => Err(DialError(
                    Arc::new(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within the connect timeout of {limit:?}"),
                    )),
                    number,
                )),
            };
            if let Some(inner) = weak.upgrade() {
                let mut state = inner.lock();
                if matches!(*state, State::Connecting(_)) {
                    *state = match &result {
                        Ok(live) => State::Ready(live.clone()),
                        Err(_) => State::Idle,
                    };
                }
                drop(state);
                if result.is_ok() {
                    release_when_retired(weak, number);
                }
            }
            result
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(DialError(
                    Arc::new(io::Error::other(format!(
                        "the connection attempt was lost: {e}"
                    ))),
                    number,
                ))
            })
        }
        .boxed()
        .shared()
    }

    /// Makes `req` an HTTP/2 request to this connection's origin: h2
    /// sends `:scheme` and `:authority` from the URI (tonic's clients give
    /// only the path), refuses hop-by-hop headers, and every call names
    /// its client.
    fn prepare(&self, req: &mut Request) {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.inner.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
        strip_connection_headers(req.headers_mut());
        req.headers_mut()
            .entry(http::header::USER_AGENT)
            .or_insert(HeaderValue::from_static(USER_AGENT));
    }
}

/// Drops the headers an HTTP/2 request must not carry (RFC 9113 8.2.2),
/// as hyper's client does: the hop-by-hop ones, those a `connection`
/// header names, and a `te` other than `trailers`.
fn strip_connection_headers(headers: &mut http::HeaderMap) {
    if let Some(named) = headers.remove(http::header::CONNECTION)
        && let Ok(named) = named.to_str()
    {
        for name in named.split(',') {
            headers.remove(name.trim());
        }
    }
    for name in CONNECTION_HEADERS {
        headers.remove(name);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|te| te != "trailers")
    {
        headers.remove(http::header::TE);
    }
}

impl Live {
    /// Whether new calls can no longer open streams here: the connection
    /// ended, or h2 refuses new streams (a GOAWAY came, or an error),
    /// asked of h2 when no call holds the gate.
    fn closed(&self) -> bool {
        if self.link.is_closed() {
            return true;
        }
        let Ok(mut send) = self.gate.try_lock() else {
            return false;
        };
        // Nobody waits on the gate's handle (its last stream is open:
        // every call holds the gate until its stream opens), so a waker
        // that wakes nothing loses no wake-up.
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        if let Poll::Ready(Err(_)) = send.poll_ready(&mut cx) {
            release_waiting_stream(&mut send);
            self.link.close();
            return true;
        }
        false
    }
}

/// Lets go of the stream a handle holds as "waiting for a slot" once
/// h2 refuses the handle (a GOAWAY came, the connection failed): h2
/// clears it only on a ready handle, so after a GOAWAY it would stay
/// referenced for the connection's life and never be reset when its
/// caller gives up. A clone holds none; the callers' own references keep
/// their streams.
fn release_waiting_stream(send: &mut Sender) {
    let fresh = send.clone();
    *send = fresh;
}

/// One call on a live connection: opens its stream through the gate,
/// writes its request body in place, and waits for the response head.
async fn exchange(live: Live, req: Request) -> Result<http::Response<Body>, BoxError> {
    let Live { gate, link } = live;
    let waiting = Waiting::new(&link);
    let mut send = match gate.try_lock() {
        Ok(send) => send,
        Err(_) => gate.lock().await,
    };
    // Ready at once unless h2 takes no new stream here (a GOAWAY, the
    // connection gone): then the request never left, and goes back whole.
    if let Err(e) = std::future::poll_fn(|cx| send.poll_ready(cx)).await {
        release_waiting_stream(&mut send);
        drop(send);
        link.close();
        return Err(handed_back(req, e, &link));
    }
    let (parts, body) = req.into_parts();
    let end = http_body::Body::is_end_stream(&body);
    let (response, stream) = match send.send_request(http::Request::from_parts(parts, ()), end) {
        Ok(sent) => sent,
        Err(e) => {
            // The connection failed between the check and the send (its
            // head is h2's now): a GOAWAY's error says "never processed".
            release_waiting_stream(&mut send);
            drop(send);
            link.close();
            return Err(transport_error(e));
        }
    };
    // A stream h2 holds for a slot (the server's stream limit reached)
    // is waited for with the gate held: the calls behind it wait in order
    // at the gate, not in h2, and one that gives up costs the server
    // nothing. A call that gives up itself while its stream waits leaves
    // it to the gate's handle, and [`Orphan`] sees that h2 resets it once
    // it opens: so callers who give up at a saturated server leave at
    // most one stream behind at a time, however many they are. (h2 marks
    // a stream as holding the handle only once the server's limit is
    // counted reached; streams sent in one burst before the connection
    // task opens any go into h2's own queue unmarked, at most one burst.)
    let mut orphan = Orphan {
        gate: &gate,
        send: Some(send),
        wait: link.stall_window,
    };
    let opened = std::future::poll_fn(|cx| {
        orphan
            .send
            .as_mut()
            .expect("held until the wait ends")
            .poll_ready(cx)
    })
    .await;
    let mut send = orphan.send.take().expect("held until the wait ends");
    if opened.is_err() {
        release_waiting_stream(&mut send);
    }
    drop(send);
    drop(waiting);
    match opened {
        Ok(()) => link.opened(),
        // h2 takes no new streams here (a GOAWAY, the connection failing),
        // which says nothing of this one: a graceful drain's GOAWAY leaves
        // every stream below its last one to finish, and h2 fails a
        // stream above it with the GOAWAY's error (never processed). So
        // the call goes on; its response says what became of it.
        Err(_) => link.close(),
    }
    let mut pipe = (!end).then_some(Pipe {
        body,
        stream,
        written: 0,
    });
    let mut response = response;
    let head = std::future::poll_fn(|cx| {
        if let Some(writing) = pipe.as_mut()
            && writing.poll_write(cx).is_ready()
        {
            pipe = None;
        }
        Pin::new(&mut response).poll(cx)
    })
    .await;
    let head = match head {
        Ok(head) => head,
        Err(e) => {
            if e.is_go_away() || e.is_io() {
                link.close();
            }
            return Err(transport_error(e));
        }
    };
    link.answered();
    // A body still streaming (client or bidirectional streaming) goes on
    // in a task of its own, bounded by the response's life.
    let pipe = pipe.map(|mut writing| {
        AbortOnDrop(
            tokio::spawn(std::future::poll_fn(move |cx| writing.poll_write(cx))).abort_handle(),
        )
    });
    Ok(received(head, pipe))
}

/// The gate held while a call's stream waits to open. If the call gives
/// up meanwhile, the handle still holds its stream (so the next call
/// waits for it instead of sending past the server's limit), and nobody
/// would let go of it once it opens (its HEADERS out, no body, never
/// reset): a task takes the gate, waits for the stream to open, and so
/// clears it from the handle, and h2 resets it. It waits at most `wait`
/// (the stall window: by then a healthy server has freed a slot), then
/// lets go of the stream unopened: a server that opens no streams
/// (`SETTINGS_MAX_CONCURRENT_STREAMS` 0) would otherwise keep the task,
/// the gate and the connection for good, even after its endpoint is gone.
struct Orphan<'a> {
    gate: &'a Arc<tokio::sync::Mutex<Sender>>,
    send: Option<tokio::sync::MutexGuard<'a, Sender>>,
    wait: Duration,
}

impl Drop for Orphan<'_> {
    fn drop(&mut self) {
        if self.send.is_none() {
            return;
        }
        let gate = self.gate.clone();
        let wait = self.wait;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Runs once this guard's lock is released, just after.
            drop(runtime.spawn(async move {
                let mut send = gate.lock().await;
                let opened =
                    tokio::time::timeout(wait, std::future::poll_fn(|cx| send.poll_ready(cx)))
                        .await;
                if !matches!(opened, Ok(Ok(()))) {
                    release_waiting_stream(&mut send);
                }
            }));
        }
    }
}

/// A call counted as waiting at its connection's gate until its stream
/// opens or it gives up (see [`Link::waiting`]).
struct Waiting<'a>(&'a Link);

impl<'a> Waiting<'a> {
    fn new(link: &'a Link) -> Self {
        link.waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(link)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
/// Drops connection `number`'s sender when it retires, if no call has
/// replaced it by then: an idle connection (no health watch, no calls)
/// then closes before its certificates expire, instead of waiting for the
/// peer to cut it.
fn release_when_retired(weak: Weak<Inner>, number: u64) {
    let Some(inner) = weak.upgrade() else {
        return;
    };
    // The previous connection's task goes whether or not this one retires
    // (a connection with no retire time would leave it asleep till then).
    let mut slot = inner
        .retire_task
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(previous) = slot.take() {
        previous.abort();
    }
    let Some(at) = inner.retire_time() else {
        return;
    };
    let task = tokio::spawn(async move {
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(left).await;
        if let Some(inner) = weak.upgrade() {
            let mut state = inner.lock();
            if matches!(&*state, State::Ready(live) if live.link.dial == number) {
                *state = State::Idle;
            }
        }
    });
    *slot = Some(task.abort_handle());
}

impl Inner {
    /// When the live connection retires, if it was made over TLS.
    fn retire_time(&self) -> Option<std::time::SystemTime> {
        match self.retire_at_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Whether the live connection's certificates are about to expire.
    fn retired(&self) -> bool {
        match self.retire_at_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => false,
            at => unix_ms(std::time::SystemTime::now()) >= at,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every write of the state is one assignment: a panic elsewhere
        // while it was held cannot have left it half-changed.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a dial failed, shared by every call that waited on it, with the
/// dial's number on its connection (from 1).
#[derive(Clone, Debug)]
pub(crate) struct DialError(Arc<io::Error>, u64);

impl DialError {
    fn from_box(e: BoxError, dial: u64) -> Self {
        match e.downcast::<io::Error>() {
            Ok(io) => Self(Arc::new(*io), dial),
            Err(other) => Self(Arc::new(io::Error::other(other)), dial),
        }
    }
}

/// The number of the failed dial behind `err`, if a dial's failure is
/// what `err` is: every call that waited on one dial gets the same one.
pub(crate) fn failed_dial(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    crate::caused_by::<DialError>(err).map(|d| d.1)
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DialError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The response of one call: sent on a live connection (or waiting for
/// the dial first), or refused before it was sent.
pub(crate) struct ResponseFuture {
    kind: Kind,
    /// Counts the call against [`MAX_PENDING_CALLS`] until it ends.
    _pending: Option<PendingCall>,
}

/// Calls one connection holds at once (on a stream, waiting at the gate
/// for one, or waiting on the dial), as tonic's `Channel` buffer bounded
/// them; past it a call fails at once with [`QueueFull`], unsent.
pub(crate) const MAX_PENDING_CALLS: usize = 1024;

/// Calls waiting at the gate before a connection's progress is judged
/// (see [`stall_window`]): a few callers waiting on a server at its
/// stream limit are load, not a sign of a stuck server.
pub(crate) const STALL_WAITERS: usize = 16;

/// How long [`STALL_WAITERS`] or more calls must wait at the gate with
/// not one stream opening before the connection is taken for stuck and
/// cut. A healthy server whose streams are all busy frees one at the
/// latest when the call holding it ends, and every mesh call ends by its
/// deadline (the client resets the stream then): so the window is the
/// longest deadline a call may have, `longest_deadline` (the config's
/// longest `maxTimeout`), plus the keepalive's time to find a dead peer
/// (interval + timeout, 8 s by default). A keepalive-sized window alone
/// (3-8 s) would let an outside caller behind a gateway hold a replica's
/// streams with any call slower than that and get the connection cut,
/// its calls failed and the replica backed off; with this one it must
/// hold every stream past its own deadline, which the mesh does not
/// allow. A stuck server is cut this much later than at first sight, and
/// meanwhile its callers wait for their deadlines or are refused at
/// [`MAX_PENDING_CALLS`].
pub(crate) fn stall_window(longest_deadline: Duration, settings: &EndpointConfig) -> Duration {
    longest_deadline
        .saturating_add(settings.keepalive_interval)
        .saturating_add(settings.keepalive_timeout)
}

/// The stall window of the default config (30 s + 5 s + 3 s).
#[cfg(test)]
pub(crate) const STALL_WINDOW: Duration =
    crate::config::DEFAULT_MAX_TIMEOUT.saturating_add(Duration::from_secs(8));

/// What one connection shares with its calls and its socket: how many
/// wait at its gate, how many streams opened, and the switch that cuts it.
struct Link {
    /// The connection's dial number (see [`failed_dial`]).
    dial: u64,
    /// The [`stall_window`] when it was dialled: how long a stream whose
    /// caller gave up may wait for a slot (see [`Orphan`]).
    stall_window: Duration,
    /// Calls waiting at the gate or for their stream to open.
    waiting: std::sync::atomic::AtomicUsize,
    /// Streams opened through the gate so far (wrapping): whether the
    /// line moves is judged from it when the line is long (see
    /// [`Link::stalled`]), so no clock is read per call.
    opened: std::sync::atomic::AtomicU64,
    /// The streams opened when the line was last found long, and when:
    /// read only then, under the connection's state lock.
    long_since: Mutex<Option<(u64, tokio::time::Instant)>>,
    /// Set by the first response: a connection that hands requests back
    /// without ever answering one is a failed dial (see [`dead_dial`]).
    answered: std::sync::atomic::AtomicBool,
    /// Set once h2 takes no new streams here (the connection ended, a
    /// GOAWAY came, it was cut).
    closed: std::sync::atomic::AtomicBool,
    /// Why the connection was cut, once it is.
    cut: std::sync::OnceLock<Cut>,
    /// The connection task's read, woken when the link is cut.
    reader: futures::task::AtomicWaker,
    /// What the connection's first read found: bytes (`Ok`), or the end
    /// or error it met instead (see [`Link::server_spoke`]).
    heard: std::sync::OnceLock<Result<(), (io::ErrorKind, String)>>,
    /// Wakes the dial waiting for `heard`.
    hearing: tokio::sync::Notify,
}

/// Why a connection was cut.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// A long line at the gate stood still for the stall window.
    Stalled,
    /// A PING went unanswered for this long.
    Keepalive(Duration),
}

impl Link {
    fn new(dial: u64, stall_window: Duration) -> Self {
        Self {
            dial,
            stall_window,
            waiting: std::sync::atomic::AtomicUsize::new(0),
            opened: std::sync::atomic::AtomicU64::new(0),
            long_since: Mutex::new(None),
            answered: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
            cut: std::sync::OnceLock::new(),
            reader: futures::task::AtomicWaker::new(),
            heard: std::sync::OnceLock::new(),
            hearing: tokio::sync::Notify::new(),
        }
    }

    /// Records what the connection's first read found (only the first
    /// word counts) and wakes the dial waiting on it.
    fn hear(&self, read: io::Result<()>) {
        let _ = self.heard.set(read.map_err(|e| (e.kind(), e.to_string())));
        self.hearing.notify_waiters();
    }

    /// Waits for the server's first bytes: `Err` if the connection ended
    /// or failed before it said anything.
    async fn server_spoke(&self) -> io::Result<()> {
        loop {
            let notified = self.hearing.notified();
            let mut notified = std::pin::pin!(notified);
            // Enabled before the look, so a word heard in between wakes.
            notified.as_mut().enable();
            if let Some(heard) = self.heard.get() {
                return heard.clone().map_err(|(kind, e)| {
                    io::Error::new(
                        kind,
                        format!("the server closed the connection before sending anything: {e}"),
                    )
                });
            }
            notified.await;
        }
    }

    /// Calls waiting at the gate or for their stream to open.
    fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a stream opened through the gate.
    fn opened(&self) {
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the (long) line has stood still for `window` as of `now`:
    /// no stream opened since it was first found long without one
    /// opening. The first look at a long line, and any look after a
    /// stream opened, starts the window anew, so a server is cut only
    /// after a whole window watched without progress (at most a window
    /// later than if each opening were timed, and no clock read per call).
    fn stalled(&self, now: tokio::time::Instant, window: Duration) -> bool {
        let opened = self.opened.load(std::sync::atomic::Ordering::Relaxed);
        let mut long_since = self
            .long_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *long_since {
            Some((seen, since)) if seen == opened => now.saturating_duration_since(since) >= window,
            _ => {
                *long_since = Some((opened, now));
                false
            }
        }
    }

    /// Notes a response on this connection (a load first, so the line is
    /// written once per connection, not once per call).
    fn answered(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.answered.load(Relaxed) {
            self.answered.store(true, Relaxed);
        }
    }

    /// Marks the connection as taking no new calls: the next one dials.
    fn close(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.closed.load(Relaxed) {
            self.closed.store(true, Relaxed);
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Cuts the connection: its socket fails every read and write from
    /// now on, so h2 ends the connection and fails its streams.
    fn sever(&self, why: Cut) {
        let _ = self.cut.set(why);
        self.close();
        self.reader.wake();
    }

    /// Why the connection was cut, if it was.
    fn cut(&self) -> Option<Cut> {
        self.cut.get().copied()
    }

    /// The error of the calls a cut connection fails: a connect error of
    /// this connection's dial, so the balancer backs the endpoint off once
    /// and the retry layer may send the call elsewhere.
    fn stalled_error(&self) -> BoxError {
        let io = io::Error::new(io::ErrorKind::ConnectionAborted, Stalled);
        Box::new(tonic::ConnectError(Box::new(DialError(
            Arc::new(io),
            self.dial,
        ))))
    }
}

/// Why a connection was cut: [`STALL_WAITERS`] or more calls waited at
/// its gate and no stream opened for its [`stall_window`]. Its calls
/// never left, so they may go to another endpoint; the endpoint is backed
/// off as after a failed dial.
#[derive(Debug)]
pub(crate) struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection cut: {STALL_WAITERS} or more calls waited for a stream and none opened for longer than any call's deadline and keepalive"
        )
    }
}

impl std::error::Error for Stalled {}

/// Why a connection was cut by its keepalive: its peer did not answer a
/// PING in time (a dead or blackholed peer).
#[derive(Debug)]
struct KeepaliveTimeout(Duration);

impl std::fmt::Display for KeepaliveTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection cut: the peer did not answer a keepalive PING within {:?}",
            self.0
        )
    }
}

impl std::error::Error for KeepaliveTimeout {}

/// A connection's socket behind its [`Link`]'s switch: once severed,
/// every read and write fails, which ends h2's connection at once (its
/// streams fail, the calls at its gate are handed back, the socket is
/// closed).
///
/// It also coalesces writes while calls crowd the connection: the first
/// write of each wake-up of the connection task is put off by one turn of
/// the scheduler (the task wakes itself and yields), so the callers
/// already woken queue their requests first and one `writev` carries them
/// all. On loopback a `writev` costs about 7 µs (it runs the receiver's
/// network stack too), and without this the connection task wrote about
/// 0.8 times per call at 32 in flight; Netty's `FlushConsolidationHandler`
/// does the same. A wake-up is the task's read running dry (h2 reads
/// until the socket has nothing, then writes): the one after a deferral
/// does not count, so a write is put off at most once per outside wake-up
/// however many frames follow (h2 flushes after every DATA frame of 256
/// bytes or more), and never while at most one call waits on the
/// connection.
struct Severable<T> {
    io: T,
    link: Arc<Link>,
    /// The connection's calls waiting for their answers ([`Inner::pending`]).
    busy: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether the next write may be put off (set when a read runs dry).
    armed: bool,
    /// Set by a deferral: the next dry read is the task's own re-poll, and
    /// does not arm again.
    deferred: bool,
}

impl<T> Severable<T> {
    fn check(&self) -> io::Result<()> {
        match self.link.cut() {
            None => Ok(()),
            Some(Cut::Stalled) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, Stalled)),
            Some(Cut::Keepalive(waited)) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                KeepaliveTimeout(waited),
            )),
        }
    }

    /// Whether to put this write off by one turn (see [`Severable`]).
    fn defer(&mut self, cx: &mut Context<'_>) -> bool {
        if !std::mem::take(&mut self.armed)
            || self.busy.load(std::sync::atomic::Ordering::Relaxed) < 2
        {
            return false;
        }
        self.deferred = true;
        cx.waker().wake_by_ref();
        true
    }

    /// A read that found nothing: the task's writes follow, once per
    /// wake-up (see [`Severable`]).
    fn ran_dry(&mut self) {
        self.armed = !std::mem::take(&mut self.deferred);
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Severable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // Registered before the check, so a sever in between still wakes.
        self.link.reader.register(cx.waker());
        self.check()?;
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if read.is_pending() {
            self.ran_dry();
        }
        read
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Severable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        if self.defer(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        if self.defer(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// The connection's socket as h2 sees it, telling the dial what its first
/// read found (see [`Link::server_spoke`]). A wrapper of its own because
/// only tokio's read buffer shows how much a read filled.
struct Hearing<T> {
    io: T,
    link: Arc<Link>,
    heard: bool,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Hearing<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if !self.heard
            && let Poll::Ready(result) = &read
        {
            self.heard = true;
            let heard = match result {
                Ok(()) if buf.filled().len() > before => Ok(()),
                Ok(()) => Err(io::ErrorKind::UnexpectedEof.into()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            self.link.hear(heard);
        }
        read
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Hearing<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// One call counted against the connection's [`MAX_PENDING_CALLS`].
struct PendingCall(Arc<Inner>);

impl Drop for PendingCall {
    fn drop(&mut self) {
        self.0
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a call was refused before it was sent: its connection already
/// holds [`MAX_PENDING_CALLS`] live calls (its server opens no more
/// streams). The call comes back [`Unsent`] (so it may go elsewhere), and
/// the balancer counts it as load, never as a failure: a saturated server
/// is not ejected or backed off for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueFull;

impl std::fmt::Display for QueueFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the connection already holds {MAX_PENDING_CALLS} calls (the server opens no more streams); not sent"
        )
    }
}

impl std::error::Error for QueueFull {}

enum Kind {
    /// On a live connection, or waiting for the dial first.
    Call(BoxFuture<'static, Result<http::Response<Body>, BoxError>>),
    /// Refused before it was sent ([`QueueFull`], [`Stalled`]).
    Refused(Option<BoxError>),
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Call(fut) => fut.as_mut().poll(cx),
            Kind::Refused(err) => {
                Poll::Ready(Err(err.take().expect("a refused call is polled once")))
            }
        }
    }
}

/// The error of a call whose stream h2 would not open: its connection
/// had closed (a GOAWAY or EOF noticed after the call found it live), so
/// the request never left and becomes [`Unsent`], holding the request for
/// the balancer to send once more, to an endpoint it picks; one of a
/// connection cut for stalling fails as [`Stalled`] (never sent there
/// again).
fn handed_back(req: Request, e: h2::Error, link: &Link) -> BoxError {
    if let Some(Cut::Stalled) = link.cut() {
        return link.stalled_error();
    }
    tracing::debug!("connection closed before the request was sent: {e}");
    Box::new(Unsent {
        request: Mutex::new(Some(req)),
        source: Box::new(e),
        // A server that closes every connection before answering (right
        // after the handshake, say) would otherwise cost a dial per call
        // and never be charged: the connection worked no better than a
        // failed dial.
        dead_dial: (!link.answered.load(std::sync::atomic::Ordering::Relaxed)).then_some(link.dial),
    })
}

/// A request whose stream h2 would not open because its connection had
/// closed, or one refused before it reached the gate ([`QueueFull`]):
/// provably never sent (see [`never_processed`]), and still whole, so the
/// balancer sends it once more without charging anyone (see
/// [`take_unsent`]).
pub(crate) struct Unsent {
    /// Taken by the one who sends it again.
    request: Mutex<Option<Request>>,
    /// h2's refusal to open the stream, or the [`QueueFull`] bound.
    source: BoxError,
    /// The dial number of a connection that closed without answering a
    /// single call (see [`dead_dial`]).
    dead_dial: Option<u64>,
}

impl Unsent {
    fn refused(req: Request) -> Self {
        Self {
            request: Mutex::new(Some(req)),
            source: Box::new(QueueFull),
            dead_dial: None,
        }
    }
}

/// The dial number of the connection behind an [`Unsent`] `err` if that
/// connection closed without ever answering a call: as good as a failed
/// dial, to be charged to the endpoint once (as [`failed_dial`]'s are),
/// while its request goes elsewhere unharmed.
pub(crate) fn dead_dial(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    crate::caused_by::<Unsent>(err)?.dead_dial
}

impl std::fmt::Debug for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsent")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.source.is::<QueueFull>() {
            write!(f, "refused before it was sent")
        } else {
            write!(f, "the connection closed before the request was sent")
        }
    }
}

impl std::error::Error for Unsent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Whether `err` is a request that never left ([`Unsent`]): handed back
/// by its closing connection, or refused by a busy one.
pub(crate) fn is_unsent(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::caused_by::<Unsent>(err).is_some()
}

/// The error a connection of dial `dial` cut as [`Stalled`] fails its
/// calls with (for tests of the layers above).
#[cfg(test)]
pub(crate) fn stalled_for_tests(dial: u64) -> BoxError {
    Link::new(dial, STALL_WINDOW).stalled_error()
}

/// An [`Unsent`] error holding `req`, as a closing connection hands it
/// back (for tests of the layers above).
#[cfg(test)]
pub(crate) fn unsent_for_tests(req: Request) -> BoxError {
    Box::new(Unsent {
        request: Mutex::new(Some(req)),
        source: "connection closed".into(),
        dead_dial: None,
    })
}

/// Whether `err` is a call its busy connection refused ([`QueueFull`]):
/// load to steer away from, not a failure of the endpoint.
pub(crate) fn is_queue_full(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::caused_by::<QueueFull>(err).is_some()
}

/// Whether `err` is a connection cut for standing still ([`Stalled`]).
pub(crate) fn is_stalled(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::caused_by::<Stalled>(err).is_some()
}

/// The request of an [`Unsent`] error, if `err` is one and nobody took it
/// yet: it never left, so it may go to another endpoint as it is.
pub(crate) fn take_unsent(err: &(dyn std::error::Error + 'static)) -> Option<Request> {
    crate::caused_by::<Unsent>(err)?
        .request
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

/// Whether an error of a call sent on a connection proves the server never
/// processed the request, so even a non-idempotent call may go again: the
/// server refused the stream (`REFUSED_STREAM`), its GOAWAY named a lower
/// stream (RFC 9113 section 6.8: those streams were not processed), or
/// the stream was never opened ([`Unsent`], [`QueueFull`]).
/// A failed dial is told apart by its [`tonic::ConnectError`].
pub(crate) fn never_processed(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::caused_by::<h2::Error>(err).is_some_and(|h2| {
        h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote())
    }) || is_unsent(err)
        || is_queue_full(err)
}

/// The URI authority of a socket address.
pub(crate) fn authority_of(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string()).expect("a socket address is a valid URI authority")
}

/// A tower service over the connection, for tonic clients of the
/// endpoint itself (the health watch). A request handed back [`Unsent`]
/// goes once more on this connection (redialled): these calls are about
/// this endpoint, so there is no other to pick.
impl tower::Service<Request> for ClientConn {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let first = ClientConn::call(self, req);
        let conn = self.clone();
        Box::pin(async move {
            match first.await {
                Err(err) => match take_unsent(&*err) {
                    Some(req) => conn.call(req).await,
                    None => Err(err),
                },
                done => done,
            }
        })
    }
}

#[cfg(test)]
impl ClientConn {
    /// A plain-TCP connection to `addr` with the default settings.
    pub(crate) fn tcp_for_tests(addr: SocketAddr) -> Self {
        Self::new(
            authority_of(addr),
            &EndpointConfig::default(),
            move || async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                Ok(hyper_util::rt::TokioIo::new(tcp))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    //! The connection's state machine over in-memory connections to a
    //! real hyper (or h2) HTTP/2 server, with tokio's clock paused: every wait
    //! below is virtual time, so the bounds asserted are exact, not races.

    use std::{
        collections::VecDeque,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use bytes::Bytes;
    use hyper_util::rt::TokioIo;
    use tokio::{
        io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
        sync::Notify,
        time::Instant,
    };

    use super::*;
    use crate::endpoint::Endpoint;

    /// What the next dial meets.
    enum Peer {
        /// A server that answers every call with OK.
        Serves,
        /// Connection refused.
        Refuses,
        /// TCP is up but the peer never reads: the HTTP/2 preface cannot
        /// be written, so the handshake never completes.
        NeverReads,
        /// A server that goes silent (reads and answers nothing, socket
        /// open) once the flag is set.
        Freezes(Arc<AtomicBool>),
        /// A server that drains when told: GOAWAY, then the calls it has
        /// finish, then it closes.
        Drains(Arc<Notify>),
        /// A server that answers the first request with a GOAWAY naming
        /// no stream: the request provably was not processed.
        GoesAway,
        /// A server of one stream at a time that starts a graceful drain
        /// (GOAWAY naming the highest stream id: no new streams, but every
        /// stream already sent may finish) while a second call waits for
        /// the slot, then answers both (see [`drain_at_the_stream_limit`]).
        DrainsAtTheLimit,
        /// A server that answers every call with OK and, at the first
        /// PING, says how long into the connection it came (into the log)
        /// and ends the connection with GOAWAY `ENHANCE_YOUR_CALM` and
        /// this debug data: "too_many_pings" is what a gRPC server sends a
        /// client that pings too often.
        CallsDownPings(Arc<Mutex<Vec<Duration>>>, &'static [u8]),
        /// A server that allows no streams at all
        /// (`SETTINGS_MAX_CONCURRENT_STREAMS` 0) and answers PINGs.
        OpensNoStreams,
    }

    #[derive(Default)]
    struct Bed {
        plan: Mutex<VecDeque<Peer>>,
        dials: AtomicUsize,
        servers: Mutex<Vec<tokio::task::AbortHandle>>,
        held: Mutex<Vec<DuplexStream>>,
        /// `/test.Echo/Slow` calls: each says it arrived, then waits for
        /// a release.
        arrived: Arc<Notify>,
        release: Arc<Notify>,
        /// Server connections that ended.
        closed: Arc<AtomicUsize>,
    }

    impl Bed {
        fn new(plan: impl IntoIterator<Item = Peer>) -> Arc<Self> {
            Arc::new(Self {
                plan: Mutex::new(plan.into_iter().collect()),
                ..Self::default()
            })
        }

        fn conn(self: &Arc<Self>, settings: &EndpointConfig) -> ClientConn {
            let bed = self.clone();
            ClientConn::new(authority_of(addr()), settings, move || {
                let bed = bed.clone();
                async move { bed.dial() }
            })
        }

        fn dial(&self) -> io::Result<TokioIo<Frozen<DuplexStream>>> {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let peer = self
                .plan
                .lock()
                .unwrap()
                .pop_front()
                .expect("a planned dial");
            let (frozen, drain) = match peer {
                Peer::Refuses => return Err(io::ErrorKind::ConnectionRefused.into()),
                Peer::NeverReads => {
                    let (client, server) = tokio::io::duplex(8);
                    self.held.lock().unwrap().push(server);
                    return Ok(TokioIo::new(Frozen::new(client, Arc::default())));
                }
                Peer::GoesAway => {
                    let (client, server) = tokio::io::duplex(64 * 1024);
                    let task = tokio::spawn(go_away_after_first_request(server));
                    self.servers.lock().unwrap().push(task.abort_handle());
                    return Ok(TokioIo::new(Frozen::new(client, Arc::default())));
                }
                Peer::DrainsAtTheLimit => {
                    let (client, server) = tokio::io::duplex(64 * 1024);
                    let task = tokio::spawn(drain_at_the_stream_limit(
                        server,
                        self.arrived.clone(),
                        self.release.clone(),
                    ));
                    self.servers.lock().unwrap().push(task.abort_handle());
                    return Ok(TokioIo::new(Frozen::new(client, Arc::default())));
                }
                Peer::CallsDownPings(log, debug) => {
                    let (client, server) = tokio::io::duplex(64 * 1024);
                    let task = tokio::spawn(call_down_the_first_ping(server, log, debug));
                    self.servers.lock().unwrap().push(task.abort_handle());
                    return Ok(TokioIo::new(Frozen::new(client, Arc::default())));
                }
                Peer::OpensNoStreams => {
                    let (client, server) = tokio::io::duplex(64 * 1024);
                    let task = tokio::spawn(open_no_streams(server));
                    self.servers.lock().unwrap().push(task.abort_handle());
                    return Ok(TokioIo::new(Frozen::new(client, Arc::default())));
                }
                Peer::Serves => (Arc::default(), None),
                Peer::Freezes(flag) => (flag, None),
                Peer::Drains(drain) => (Arc::default(), Some(drain)),
            };
            let (client, server) = tokio::io::duplex(64 * 1024);
            let server = Frozen::new(server, frozen);
            let (arrived, release, closed) = (
                self.arrived.clone(),
                self.release.clone(),
                self.closed.clone(),
            );
            let task = tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let slow = req.uri().path() == "/test.Echo/Slow";
                    let with_body = req.uri().path() == "/test.Echo/Body";
                    let (arrived, release) = (arrived.clone(), release.clone());
                    async move {
                        if slow {
                            arrived.notify_one();
                            release.notified().await;
                        }
                        let response =
                            http::Response::builder().header("content-type", "application/grpc");
                        // A message and trailers, or trailers-only.
                        let response = if with_body {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", HeaderValue::from_static("0"));
                            let frames = [
                                http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
                                http_body::Frame::trailers(trailers),
                            ];
                            response.body(http_body_util::Either::Left(
                                http_body_util::StreamBody::new(futures::stream::iter(
                                    frames.map(Ok::<_, std::convert::Infallible>),
                                )),
                            ))
                        } else {
                            response
                                .header("grpc-status", "0")
                                .body(http_body_util::Either::Right(
                                    http_body_util::Empty::<Bytes>::new(),
                                ))
                        };
                        Ok::<_, std::convert::Infallible>(response.unwrap())
                    }
                });
                let conn =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(server), service);
                let mut conn = std::pin::pin!(conn);
                match drain {
                    None => {
                        let _ = conn.await;
                    }
                    Some(drain) => {
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            _ = drain.notified() => {
                                conn.as_mut().graceful_shutdown();
                                let _ = conn.await;
                            }
                        }
                    }
                }
                closed.fetch_add(1, Ordering::SeqCst);
            });
            self.servers.lock().unwrap().push(task.abort_handle());
            Ok(TokioIo::new(Frozen::new(client, Arc::default())))
        }

        /// Every server so far goes away (its socket closes).
        fn close_servers(&self) {
            for server in self.servers.lock().unwrap().drain(..) {
                server.abort();
            }
        }
    }

    /// A server of raw HTTP/2 frames: reads the client's preface, sends
    /// its SETTINGS, reads frames up to the first HEADERS, then sends a
    /// GOAWAY whose last stream is 0 (RFC 9113 6.8: stream 1 was not processed),
    /// and holds the socket open.
    async fn go_away_after_first_request(mut io: DuplexStream) -> io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await?;
        io.write_all(&SETTINGS).await?;
        io.flush().await?;
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            io.read_exact(&mut payload).await?;
            const HEADERS: u8 = 0x1;
            if head[3] == HEADERS {
                break;
            }
        }
        // Length 8, type GOAWAY, stream 0; last stream 0, NO_ERROR.
        const GOAWAY: [u8; 17] = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        io.write_all(&GOAWAY).await?;
        io.flush().await?;
        std::future::pending().await
    }

    /// Reads one HTTP/2 frame: its type, flags, stream and payload.
    async fn read_frame(io: &mut DuplexStream) -> io::Result<(u8, u8, u32, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        io.read_exact(&mut payload).await?;
        Ok((head[3], head[4], stream, payload))
    }

    /// A server of raw HTTP/2 frames that admits one stream at a time:
    /// says `arrived` when stream 1's HEADERS come, sends a GOAWAY naming
    /// the highest stream id on the first `release` (a graceful drain's
    /// first step: streams already sent may finish), answers stream 1 OK
    /// on the second, and stream 3 OK when its HEADERS come.
    async fn drain_at_the_stream_limit(
        mut io: DuplexStream,
        arrived: Arc<Notify>,
        release: Arc<Notify>,
    ) -> io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const HEADERS: u8 = 0x1;
        const SETTINGS: u8 = 0x4;
        const PING: u8 = 0x6;
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await?;
        // SETTINGS_MAX_CONCURRENT_STREAMS = 1.
        io.write_all(&[0, 0, 6, SETTINGS, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1])
            .await?;
        let answer = trailers_only_ok;
        loop {
            let (kind, flags, stream, payload) = read_frame(&mut io).await?;
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    io.write_all(&[0, 0, 0, SETTINGS, 1, 0, 0, 0, 0]).await?;
                }
                PING if flags & 1 == 0 => {
                    let mut pong = vec![0, 0, 8, PING, 1, 0, 0, 0, 0];
                    pong.extend_from_slice(&payload);
                    io.write_all(&pong).await?;
                }
                HEADERS if stream == 1 => {
                    arrived.notify_one();
                    release.notified().await;
                    // GOAWAY, last stream 2^31-1, NO_ERROR.
                    io.write_all(&[
                        0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0,
                    ])
                    .await?;
                    io.flush().await?;
                    release.notified().await;
                    io.write_all(&answer(1)).await?;
                }
                HEADERS => io.write_all(&answer(stream)).await?,
                _ => {}
            }
            io.flush().await?;
        }
    }

    /// A trailers-only OK answer to `stream`, as one raw HEADERS frame:
    /// `:status: 200` (static 8), `content-type: application/grpc` (static
    /// name 31), `grpc-status: 0` (literal).
    fn trailers_only_ok(stream: u32) -> Vec<u8> {
        const HEADERS: u8 = 0x1;
        let mut block = vec![0x88, 0x0f, 0x10, 16];
        block.extend_from_slice(b"application/grpc");
        block.extend_from_slice(&[0x00, 11]);
        block.extend_from_slice(b"grpc-status");
        block.extend_from_slice(&[1, b'0']);
        let mut frame = (block.len() as u32).to_be_bytes()[1..].to_vec();
        // END_STREAM | END_HEADERS.
        frame.extend_from_slice(&[HEADERS, 0x5]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(&block);
        frame
    }

    /// A server of raw HTTP/2 frames that answers every call OK and, at
    /// the first PING, logs how long into the connection it came, sends
    /// GOAWAY `ENHANCE_YOUR_CALM` with `debug` (grpc-go's and C-core's
    /// servers say "too_many_pings" to a client that pings too often) and
    /// closes.
    async fn call_down_the_first_ping(
        mut io: DuplexStream,
        log: Arc<Mutex<Vec<Duration>>>,
        debug: &'static [u8],
    ) -> io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const HEADERS: u8 = 0x1;
        const SETTINGS: u8 = 0x4;
        const PING: u8 = 0x6;
        let opened = tokio::time::Instant::now();
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await?;
        io.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]).await?;
        let mut last_stream = 0u32;
        loop {
            let (kind, flags, stream, _) = read_frame(&mut io).await?;
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    io.write_all(&[0, 0, 0, SETTINGS, 1, 0, 0, 0, 0]).await?;
                }
                HEADERS => {
                    last_stream = stream;
                    io.write_all(&trailers_only_ok(stream)).await?;
                }
                PING if flags & 1 == 0 => {
                    log.lock().unwrap().push(opened.elapsed());
                    let mut goaway = ((8 + debug.len()) as u32).to_be_bytes()[1..].to_vec();
                    goaway.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
                    goaway.extend_from_slice(&last_stream.to_be_bytes());
                    // ENHANCE_YOUR_CALM.
                    goaway.extend_from_slice(&0xbu32.to_be_bytes());
                    goaway.extend_from_slice(debug);
                    io.write_all(&goaway).await?;
                    io.flush().await?;
                    return Ok(());
                }
                _ => {}
            }
            io.flush().await?;
        }
    }

    /// A server of raw HTTP/2 frames that allows no streams
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS` 0): it acknowledges SETTINGS,
    /// answers PINGs and ignores everything else.
    async fn open_no_streams(mut io: DuplexStream) -> io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SETTINGS: u8 = 0x4;
        const PING: u8 = 0x6;
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await?;
        io.write_all(&[0, 0, 6, SETTINGS, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0])
            .await?;
        loop {
            let (kind, flags, _, payload) = read_frame(&mut io).await?;
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    io.write_all(&[0, 0, 0, SETTINGS, 1, 0, 0, 0, 0]).await?;
                }
                PING if flags & 1 == 0 => {
                    let mut pong = vec![0, 0, 8, PING, 1, 0, 0, 0, 0];
                    pong.extend_from_slice(&payload);
                    io.write_all(&pong).await?;
                }
                _ => {}
            }
            io.flush().await?;
        }
    }

    /// An in-memory socket that stops reading once its flag is set.
    struct Frozen<T> {
        inner: T,
        frozen: Arc<AtomicBool>,
    }

    impl<T> Frozen<T> {
        fn new(inner: T, frozen: Arc<AtomicBool>) -> Self {
            Self { inner, frozen }
        }
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Frozen<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.frozen.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Frozen<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 50051))
    }

    fn request() -> http::Request<Body> {
        http::Request::builder()
            .method("POST")
            .uri("/test.Echo/Unary")
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap()
    }

    fn slow_request() -> http::Request<Body> {
        let mut req = request();
        *req.uri_mut() = Uri::from_static("/test.Echo/Slow");
        req
    }

    /// Lets the connection tasks run until `conn` is in `want` (bounded).
    async fn settle(conn: &ClientConn, want: ConnState) {
        for _ in 0..1000 {
            if conn.state() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the connection stayed {:?}, not {want:?}", conn.state());
    }

    fn is_connect_error(err: &BoxError) -> bool {
        crate::caused_by::<tonic::ConnectError>(&**err).is_some()
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_tells_its_end_as_h2_would() {
        use http_body::Body as _;
        use http_body_util::BodyExt;
        let bed = Bed::new([Peer::Serves]);
        let conn = bed.conn(&EndpointConfig::default());
        // Trailers-only: the stream ended with its headers.
        let response = conn.call(request()).await.unwrap();
        assert!(response.body().is_end_stream(), "a trailers-only answer");

        // A message and trailers: not at its end until the trailers are
        // read, even once h2 holds the whole stream, so a reader (a
        // proxy's server, tonic's decoder) asks for them.
        let mut req = request();
        *req.uri_mut() = Uri::from_static("/test.Echo/Body");
        let mut body = conn.call(req).await.unwrap().into_body();
        assert!(!body.is_end_stream(), "a message is on its way");
        let data = body.frame().await.unwrap().unwrap();
        assert_eq!(data.into_data().unwrap(), Bytes::from_static(b"\0\0\0\0\0"));
        tokio::task::yield_now().await;
        assert!(!body.is_end_stream(), "the trailers are still to be read");
        let trailers = body.frame().await.unwrap().unwrap();
        assert_eq!(trailers.trailers_ref().unwrap()["grpc-status"], "0");
        assert!(body.is_end_stream(), "read to its end");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn connects_on_first_call_reconnects_after_close_and_backs_off_a_refusal() {
        let bed = Bed::new([Peer::Serves, Peer::Refuses, Peer::Serves]);
        let settings = EndpointConfig::default();
        let endpoint = Endpoint::new(addr(), bed.conn(&settings));
        let conn = endpoint.conn();
        assert_eq!(
            conn.state(),
            ConnState::Idle,
            "no dial before the first call"
        );

        let call = conn.call(request());
        assert_eq!(conn.state(), ConnState::Connecting);
        // A second call meanwhile shares the dial.
        let second = conn.call(request());
        let (first, second) = tokio::join!(call, second);
        assert_eq!(first.unwrap().headers()["grpc-status"], "0");
        assert_eq!(second.unwrap().headers()["grpc-status"], "0");
        assert_eq!(conn.state(), ConnState::Ready);
        assert_eq!(
            bed.dials.load(Ordering::SeqCst),
            1,
            "one dial for both calls"
        );
        // Calls on a ready connection dial nothing.
        conn.call(request()).await.unwrap();
        assert_eq!(bed.dials.load(Ordering::SeqCst), 1);

        // The server goes away: h2's side closes, and the state says so.
        bed.close_servers();
        settle(conn, ConnState::Closed).await;

        // The next call dials again; the refusal is a connect error (the
        // balancer's cue to back off, the retry layer's "never sent").
        let err = conn.call(request()).await.unwrap_err();
        assert!(is_connect_error(&err), "{err}");
        assert_eq!(
            crate::caused_by::<io::Error>(&*err).map(io::Error::kind),
            Some(io::ErrorKind::ConnectionRefused)
        );
        assert_eq!(conn.state(), ConnState::Idle);
        assert_eq!(bed.dials.load(Ordering::SeqCst), 2);
        let now = Instant::now();
        let wait = endpoint.record_connect_failure(now, &settings, err.to_string());
        assert!(!endpoint.is_eligible(now), "backing off");
        assert!(endpoint.is_reconnecting(now));

        // After the backoff, a call reconnects.
        tokio::time::sleep(wait).await;
        assert!(endpoint.is_eligible(Instant::now()));
        let response = conn.call(request()).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "0");
        endpoint.record_success(Instant::now());
        assert!(!endpoint.is_reconnecting(Instant::now()));
        assert_eq!(conn.state(), ConnState::Ready);
        assert_eq!(bed.dials.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_that_never_completes_fails_at_the_connect_timeout() {
        let bed = Bed::new([Peer::NeverReads, Peer::Serves]);
        let settings = EndpointConfig::default();
        let conn = bed.conn(&settings);
        let started = Instant::now();
        let err = conn.call(request()).await.unwrap_err();
        let took = started.elapsed();
        assert!(is_connect_error(&err), "{err}");
        assert_eq!(
            crate::caused_by::<io::Error>(&*err).map(io::Error::kind),
            Some(io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(
            took >= settings.connect_timeout && took < settings.connect_timeout * 2,
            "{took:?}"
        );
        assert_eq!(conn.state(), ConnState::Idle);
        // The next dial is a fresh one.
        conn.call(request()).await.unwrap();
        assert_eq!(conn.state(), ConnState::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_is_found_by_keepalive() {
        let silent = Arc::new(AtomicBool::new(false));
        let bed = Bed::new([Peer::Freezes(silent.clone()), Peer::Serves]);
        let settings = EndpointConfig::default();
        let conn = bed.conn(&settings);
        conn.call(request()).await.unwrap();
        assert_eq!(conn.state(), ConnState::Ready);

        // The peer goes silent with its socket open (a blackholed node):
        // no EOF, no RST, only unanswered pings.
        silent.store(true, Ordering::SeqCst);
        let frozen_at = Instant::now();
        let stuck = conn.call(request());
        let err = stuck.await.unwrap_err();
        let took = frozen_at.elapsed();
        assert!(
            !is_connect_error(&err),
            "a call sent on the connection is not a connect failure: {err}"
        );
        // gRPC's rule for an expired keepalive PING: UNAVAILABLE.
        assert_eq!(
            tonic::Status::from_error(err).code(),
            tonic::Code::Unavailable
        );
        let bound = settings.keepalive_interval + settings.keepalive_timeout;
        assert!(
            took >= settings.keepalive_timeout && took <= bound + Duration::from_secs(1),
            "found after {took:?}, bound {bound:?}"
        );
        settle(&conn, ConnState::Closed).await;
        // The next call gets a new connection.
        conn.call(request()).await.unwrap();
        assert_eq!(conn.state(), ConnState::Ready);
        assert_eq!(bed.dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_goaway_sends_new_calls_to_a_new_connection_while_old_ones_finish() {
        let drain = Arc::new(Notify::new());
        let bed = Bed::new([Peer::Drains(drain.clone()), Peer::Serves]);
        let conn = bed.conn(&EndpointConfig::default());
        conn.call(request()).await.unwrap();

        // A call in progress on the first connection when its server drains.
        let slow = tokio::spawn(conn.call(slow_request()));
        bed.arrived.notified().await;
        drain.notify_one();
        // Let the GOAWAY reach the client (virtual time: every task idles).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(bed.closed.load(Ordering::SeqCst), 0, "the drain waits");

        // h2 opens no stream for a request on the GOAWAY'd connection: it
        // fails unsent, carrying the request, for the
        // balancer to send to an endpoint it picks (not resent here: this
        // address may be draining).
        let err = conn.call(request()).await.unwrap_err();
        assert!(never_processed(&*err), "{err}");
        assert!(!is_connect_error(&err), "{err}");
        assert_eq!(bed.dials.load(Ordering::SeqCst), 1, "nothing dialled");
        let again = take_unsent(&*err).expect("the request comes back whole");
        assert!(take_unsent(&*err).is_none(), "once");
        assert_eq!(again.uri().path(), "/test.Echo/Unary");
        // Sent again here, it goes on a new connection.
        let response = conn.call(again).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "0");
        assert_eq!(bed.dials.load(Ordering::SeqCst), 2);
        assert_eq!(conn.state(), ConnState::Ready);
        assert!(!slow.is_finished(), "the old call still runs");

        // The old call finishes on the old connection, which then closes.
        bed.release.notify_one();
        let old = slow.await.unwrap().unwrap();
        assert_eq!(old.headers()["grpc-status"], "0");
        for _ in 0..100 {
            if bed.closed.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            bed.closed.load(Ordering::SeqCst),
            1,
            "the drained server closed"
        );
        // New calls stay on the new connection.
        conn.call(request()).await.unwrap();
        assert_eq!(bed.dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waiting_for_a_slot_lives_through_a_graceful_drain_and_is_answered() {
        let bed = Bed::new([Peer::DrainsAtTheLimit]);
        let conn = bed.conn(&EndpointConfig::default());
        let first = tokio::spawn(conn.call(request()));
        bed.arrived.notified().await;
        // The server's limit of one stream is known; the second call's
        // stream waits for the slot.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = tokio::spawn(conn.call(request()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(conn.queued(), 1, "the second call waits for the slot");
        // The drain's first GOAWAY lets every stream sent so far finish:
        // the waiting call must not fail as never processed (it would be
        // sent elsewhere while its stream still opens here: twice).
        bed.release.notify_one();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "{:?}", second.await);
        // The first call's answer frees the slot; the second's stream
        // opens and is answered on the draining connection.
        bed.release.notify_one();
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.headers()["grpc-status"], "0");
        let second = tokio::time::timeout(Duration::from_secs(2), second)
            .await
            .expect("answered")
            .unwrap()
            .expect("the waiting call lived through the drain");
        assert_eq!(second.headers()["grpc-status"], "0");
        assert_eq!(bed.dials.load(Ordering::SeqCst), 1);
        assert_eq!(conn.state(), ConnState::Closed, "no new streams there");
    }

    /// Dials `bed` three times, each connection ending at its peer's first
    /// PING, and returns how long into each connection that PING came.
    async fn first_pings_of_three_connections(
        debug: &'static [u8],
        settings: &EndpointConfig,
    ) -> Vec<Duration> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let bed = Bed::new([
            Peer::CallsDownPings(log.clone(), debug),
            Peer::CallsDownPings(log.clone(), debug),
            Peer::CallsDownPings(log.clone(), debug),
        ]);
        let conn = bed.conn(settings);
        for dial in 1..=3 {
            conn.call(request()).await.expect("answered");
            // The peer ends the connection at its first PING.
            tokio::time::timeout(Duration::from_secs(600), async {
                while conn.state() != ConnState::Closed {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the peer ended the connection");
            assert_eq!(bed.dials.load(Ordering::SeqCst), dial);
        }
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 3, "{log:?}");
        log
    }

    fn within(took: Duration, want: Duration) -> bool {
        took >= want && took < want + Duration::from_millis(100)
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_calls_the_pings_too_many_gets_them_half_as_often() {
        let settings = EndpointConfig::default();
        let log = first_pings_of_three_connections(b"too_many_pings", &settings).await;
        // Each connection's first PING came after twice the wait of the
        // one before (gRPC A8), from the configured interval on.
        let interval = settings.keepalive_interval;
        assert!(within(log[0], interval), "{log:?}");
        assert!(within(log[1], 2 * interval), "{log:?}");
        assert!(within(log[2], 4 * interval), "{log:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_calm_for_another_reason_leaves_the_keepalive_as_it_was() {
        // h2 servers send ENHANCE_YOUR_CALM "too_many_resets" after a burst
        // of cancelled calls: nothing to do with pings.
        let settings = EndpointConfig::default();
        let log = first_pings_of_three_connections(b"too_many_resets", &settings).await;
        let interval = settings.keepalive_interval;
        assert!(log.iter().all(|took| within(*took, interval)), "{log:?}");
    }

    #[test]
    fn a_calmed_keepalive_stops_doubling_at_its_bound() {
        let interval = KeepaliveInterval::new(Duration::from_secs(5));
        assert_eq!(interval.double(), Duration::from_secs(10));
        assert_eq!(interval.get(), Duration::from_secs(10));
        for _ in 0..20 {
            interval.double();
        }
        assert_eq!(interval.get(), MAX_KEEPALIVE_INTERVAL);
        // One configured longer than the bound is left as it is.
        let long = KeepaliveInterval::new(2 * MAX_KEEPALIVE_INTERVAL);
        assert_eq!(long.double(), 2 * MAX_KEEPALIVE_INTERVAL);
        // A sub-millisecond one waits a millisecond, and can double.
        let short = KeepaliveInterval::new(Duration::from_micros(500));
        assert_eq!(short.get(), Duration::from_millis(1));
        assert_eq!(short.double(), Duration::from_millis(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_given_up_at_a_server_that_opens_none_is_let_go_after_the_stall_window() {
        let bed = Bed::new([Peer::OpensNoStreams]);
        let conn = bed.conn(&EndpointConfig::default());
        // The call's stream waits for a slot that never comes, and its
        // caller gives up.
        let call = tokio::time::timeout(Duration::from_secs(1), conn.call(request())).await;
        assert!(call.is_err(), "no stream opens");
        let gate = match &*conn.inner.state.lock().unwrap() {
            State::Ready(live) => live.gate.clone(),
            _ => panic!("connected"),
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(gate.try_lock().is_err(), "a task waits with the stream");
        tokio::time::sleep(STALL_WINDOW).await;
        assert!(gate.try_lock().is_ok(), "and lets go of it at the window");
        assert_eq!(bed.dials.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_a_goaway_leaves_unprocessed_fails_as_never_processed() {
        let bed = Bed::new([Peer::GoesAway, Peer::Serves]);
        let conn = bed.conn(&EndpointConfig::default());
        let err = conn.call(request()).await.unwrap_err();
        // h2 had written the request, so it is not sent again here; the
        // GOAWAY says the server never processed it.
        assert_eq!(bed.dials.load(Ordering::SeqCst), 1);
        assert!(!is_connect_error(&err), "{err}");
        let h2 = crate::caused_by::<h2::Error>(&*err).expect("an h2 error");
        assert!(h2.is_go_away() && h2.is_remote(), "{h2:?}");
        assert!(never_processed(&*err), "{err}");
        settle(&conn, ConnState::Closed).await;
        conn.call(request()).await.unwrap();
        assert_eq!(bed.dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_pending_bound_fail_at_once_unsent() {
        let conn = ClientConn::unconnectable(addr(), "never");
        let held: Vec<_> = (0..MAX_PENDING_CALLS)
            .map(|_| conn.call(request()))
            .collect();
        let err = conn.call(request()).await.unwrap_err();
        assert!(crate::caused_by::<QueueFull>(&*err).is_some(), "{err}");
        assert!(never_processed(&*err), "unsent, so it may go elsewhere");
        drop(held);
        let err = conn.call(request()).await.unwrap_err();
        assert!(
            crate::caused_by::<QueueFull>(&*err).is_none(),
            "room again: {err}"
        );
    }

    #[test]
    fn a_connection_retires_before_its_certificates_expire_but_never_before_it_is_made() {
        use std::time::SystemTime;
        let now = SystemTime::now();
        let far = now + Duration::from_secs(3600);
        assert_eq!(retire_at(far, now, 0.0), Some(far - RETIRE_BEFORE_EXPIRY));
        // Spread over at most a minute (a tenth of the time left).
        let spread = (far - RETIRE_BEFORE_EXPIRY)
            .duration_since(retire_at(far, now, 0.999).unwrap())
            .unwrap();
        assert!(
            spread > Duration::from_secs(59) && spread <= RETIRE_SPREAD,
            "{spread:?}"
        );
        let soon = now + Duration::from_secs(105);
        let spread = (soon - RETIRE_BEFORE_EXPIRY)
            .duration_since(retire_at(soon, now, 0.999).unwrap())
            .unwrap();
        assert!(spread <= Duration::from_millis(10_500), "{spread:?}");
        // Within the margin already (not renewed): retiring at once would
        // dial on every call with the same certificate; keep it to expiry.
        let near = now + Duration::from_secs(2);
        assert_eq!(retire_at(near, now, 0.5), Some(near));
        // Expired already by our clock, yet accepted: never retire (the
        // peer cuts it), or every call would dial.
        assert_eq!(retire_at(now - Duration::from_secs(1), now, 0.5), None);
        assert_eq!(retire_at(now, now, 0.5), None);
    }

    /// A real HTTP/2 server (the `h2` crate) behind each dial of the
    /// returned connection, over an in-memory socket so tokio's paused
    /// clock holds: it admits at most `streams` streams at once (0: none
    /// at all, though it completes the handshake and answers pings), holds
    /// each, and answers the oldest held one OK per `release` permit.
    fn holding_server(streams: u32, settings: &EndpointConfig) -> (ClientConn, Arc<Holding>) {
        let holding = Arc::new(Holding {
            dials: AtomicUsize::new(0),
            admitted: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
            release: tokio::sync::Semaphore::new(0),
        });
        let server = holding.clone();
        let conn = ClientConn::new(authority_of(addr()), settings, move || {
            let server = server.clone();
            async move {
                server.dials.fetch_add(1, Ordering::SeqCst);
                let (client, io) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    if let Ok(mut conn) = h2::server::Builder::new()
                        .max_concurrent_streams(streams)
                        .handshake::<_, Bytes>(io)
                        .await
                    {
                        let mut held = VecDeque::new();
                        loop {
                            tokio::select! {
                                stream = conn.accept() => match stream {
                                    Some(Ok((_, respond))) => {
                                        server.admitted.fetch_add(1, Ordering::SeqCst);
                                        held.push_back(respond);
                                    }
                                    _ => break,
                                },
                                permit = server.release.acquire() => {
                                    permit.expect("never closed").forget();
                                    if let Some(mut respond) = held.pop_front() {
                                        let ok = http::Response::builder()
                                            .header("content-type", "application/grpc")
                                            .header("grpc-status", "0")
                                            .body(())
                                            .unwrap();
                                        let _ = respond.send_response(ok, true);
                                    }
                                }
                            }
                        }
                    }
                    server.ended.fetch_add(1, Ordering::SeqCst);
                });
                Ok(TokioIo::new(client))
            }
        });
        (conn, holding)
    }

    /// What a [`holding_server`] counts, and its release.
    struct Holding {
        dials: AtomicUsize,
        admitted: AtomicUsize,
        ended: AtomicUsize,
        release: tokio::sync::Semaphore,
    }

    /// Starts `n` calls on `conn` that wait (the server admits no more
    /// streams) and lets them reach the gate's line (bounded).
    async fn wait_in_line(
        conn: &ClientConn,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<http::Response<Body>, BoxError>>> {
        let before = conn.queued();
        let live: Vec<_> = (0..n).map(|_| tokio::spawn(conn.call(request()))).collect();
        for _ in 0..1000 {
            if conn.queued() >= before + n {
                return live;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} of {n} calls waiting", conn.queued() - before);
    }

    /// Lets a new connection's SETTINGS reach the client, so the server's
    /// stream limit holds for the calls that follow.
    async fn connected(conn: &ClientConn) {
        settle(conn, ConnState::Ready).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn queue_full(err: &BoxError) -> Option<QueueFull> {
        crate::caused_by::<QueueFull>(&**err).copied()
    }

    /// A server answering every call with 4 MiB of data, and `/reader`
    /// calls with 64 KiB, over HTTP/2 (the h2 crate itself).
    fn bulk_server() -> ClientConn {
        ClientConn::new(authority_of(addr()), &EndpointConfig::default(), || async {
            let (client, io) = tokio::io::duplex(1 << 20);
            tokio::spawn(async move {
                let mut h2 = h2::server::handshake(io).await.unwrap();
                while let Some(Ok((req, mut respond))) = h2.accept().await {
                    let bytes = if req.uri().path() == "/reader" {
                        64 << 10
                    } else {
                        4 << 20
                    };
                    tokio::spawn(async move {
                        let head = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(head, false).unwrap();
                        // Queued beyond the window; h2 sends it as the
                        // client gives window back.
                        let _ = send.send_data(Bytes::from(vec![0u8; bytes]), false);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let _ = send.send_trailers(trailers);
                        // Held until the client is done with the stream.
                        let _ = futures::future::poll_fn(|cx| send.poll_reset(cx)).await;
                    });
                }
            });
            Ok(TokioIo::new(client))
        })
    }

    #[tokio::test]
    async fn streams_nobody_reads_do_not_stall_the_other_streams_of_their_connection() {
        use http_body_util::BodyExt;
        let conn = bulk_server();
        // Eight answers of 4 MiB each, never read: each holds its stream
        // window of the connection's.
        let mut unread = Vec::new();
        for _ in 0..8 {
            let response = tokio::time::timeout(Duration::from_secs(20), conn.call(request()))
                .await
                .expect("the headers came")
                .unwrap();
            unread.push(response);
        }
        // Another call on the same connection still gets its data.
        let mut reader = request();
        *reader.uri_mut() = "/reader".parse().unwrap();
        let response = conn.call(reader).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(20), response.into_body().collect())
            .await
            .expect("the reader's data was stalled behind unread streams")
            .unwrap();
        assert_eq!(read.to_bytes().len(), 64 << 10);
        drop(unread);
    }

    #[tokio::test(start_paused = true)]
    async fn a_longer_max_timeout_widens_the_stall_window_of_connections_already_made() {
        let (conn, _server) = holding_server(0, &EndpointConfig::default());
        // As the channel gives it: read from the live config when the
        // line is long, so a reload after the dial counts.
        let longest = Arc::new(std::sync::Mutex::new(crate::config::DEFAULT_MAX_TIMEOUT));
        let window: StallWindow = {
            let longest = longest.clone();
            Arc::new(move || stall_window(*longest.lock().unwrap(), &EndpointConfig::default()))
        };
        let conn = conn.with_stall_window(window);
        let _first = tokio::spawn(conn.call(request()));
        connected(&conn).await;
        let _live = wait_in_line(&conn, STALL_WAITERS).await;
        *longest.lock().unwrap() = Duration::from_secs(120);
        // The first look at the long line starts its window.
        let mut call = conn.call(request());
        assert!((&mut call).now_or_never().is_none(), "it waits in line");
        // Past the default window a call may still hold a stream (its
        // deadline is up to 120 s): the connection is kept.
        tokio::time::sleep(STALL_WINDOW + Duration::from_secs(1)).await;
        let mut call = conn.call(request());
        assert!((&mut call).now_or_never().is_none(), "it waits in line");
        assert_eq!(conn.state(), ConnState::Ready);
        // Past 120 s + keepalive: stuck, and cut.
        tokio::time::sleep(Duration::from_secs(128) - STALL_WINDOW).await;
        let err = conn.call(request()).await.unwrap_err();
        assert!(crate::caused_by::<Stalled>(&*err).is_some(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_server_opens_no_streams_is_cut_once_its_line_stands_still() {
        let (conn, server) = holding_server(0, &EndpointConfig::default());
        // A call that waits (the server admits no stream), and a line.
        let first = tokio::spawn(conn.call(request()));
        connected(&conn).await;
        let mut live = wait_in_line(&conn, STALL_WAITERS).await;
        live.push(first);
        // The first look at the long line starts its window; a call then
        // joins the line.
        let mut call = conn.call(request());
        assert!((&mut call).now_or_never().is_none(), "it waits in line");
        drop(call);
        // Nothing opens; short of the window, the connection is kept.
        tokio::time::sleep(STALL_WINDOW - Duration::from_secs(1)).await;
        let mut call = conn.call(request());
        assert!((&mut call).now_or_never().is_none(), "it waits in line");
        drop(call);
        assert_eq!(conn.state(), ConnState::Ready);
        // A whole window without a stream opening: stuck, and cut.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let err = conn.call(request()).await.unwrap_err();
        assert!(crate::caused_by::<Stalled>(&*err).is_some(), "{err}");
        assert!(is_connect_error(&err), "backed off as a failed dial: {err}");
        assert_eq!(failed_dial(&*err), Some(1));
        // The calls in line end with the connection, as a stalled
        // connection's (never sent), but for the one whose stream h2 held
        // for a slot: it fails as the cut socket (its request was h2's).
        let mut stalled = 0;
        for call in live {
            let err = tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .expect("the waiting call ends with the connection")
                .unwrap()
                .unwrap_err();
            if crate::caused_by::<Stalled>(&*err).is_some() {
                stalled += 1;
            }
        }
        assert!(stalled >= STALL_WAITERS - 1, "{stalled} failed as stalled");
        // The server sees the connection end.
        for _ in 0..1000 {
            if server.ended.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            server.ended.load(Ordering::SeqCst),
            1,
            "the socket was closed"
        );
        assert_eq!(server.dials.load(Ordering::SeqCst), 1);
        assert_eq!(conn.state(), ConnState::Idle, "the next call dials anew");
    }

    #[tokio::test(start_paused = true)]
    async fn a_saturated_server_s_callers_wait_in_line_and_those_who_give_up_cost_it_nothing() {
        // A healthy server at its stream limit: four streams, all busy.
        let (conn, server) = holding_server(4, &EndpointConfig::default());
        let first = tokio::spawn(conn.call(request()));
        connected(&conn).await;
        let mut live = vec![first];
        live.extend((0..4).map(|_| tokio::spawn(conn.call(request()))));
        for _ in 0..1000 {
            if server.admitted.load(Ordering::SeqCst) == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(server.admitted.load(Ordering::SeqCst), 4);
        // A burst of calls that give up at once (a deadline passed, say)
        // leaves the line at once: of all of them, only the first one's
        // stream (h2 held it for a slot) is left behind.
        for _ in 0..3 * STALL_WAITERS {
            let mut call = conn.call(request());
            assert!((&mut call).now_or_never().is_none());
            drop(call);
        }
        assert_eq!(conn.queued(), 0, "none of them waits");
        // Past the bound of live calls, the excess is refused at once,
        // unsent, as load, not as a failure.
        let held: Vec<_> = (0..MAX_PENDING_CALLS - live.len())
            .map(|_| conn.call(request()))
            .collect();
        let err = conn.call(request()).await.unwrap_err();
        assert_eq!(queue_full(&err), Some(QueueFull), "{err}");
        assert!(!is_connect_error(&err), "{err}");
        assert_eq!(failed_dial(&*err), None, "nothing to back off");
        assert!(never_processed(&*err), "{err}");
        let back = take_unsent(&*err).expect("the request comes back whole");
        assert_eq!(back.uri().path(), "/test.Echo/Unary");
        assert_eq!(conn.state(), ConnState::Ready);
        drop(held);
        // Every live call is answered on the one connection; besides
        // them the server saw the one stream left behind. (A permit the
        // server takes with no stream held is lost: one at a time.)
        for _ in 0..2 * live.len() {
            server.release.add_permits(1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for call in live {
            let response = tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .expect("answered")
                .unwrap()
                .expect("the in-flight streams survived");
            assert_eq!(response.headers()["grpc-status"], "0");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(server.admitted.load(Ordering::SeqCst), 6);
        assert_eq!(server.dials.load(Ordering::SeqCst), 1, "never cut");
        assert_eq!(server.ended.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_line_counts_as_stalled_only_after_a_whole_window_without_a_stream_opening() {
        let link = Link::new(1, STALL_WINDOW);
        let t0 = tokio::time::Instant::now();
        // First found long: the window starts.
        assert!(!link.stalled(t0, STALL_WINDOW));
        assert!(!link.stalled(t0 + STALL_WINDOW - Duration::from_millis(1), STALL_WINDOW));
        // A stream opens just before the window ends: the window starts
        // over from the next look.
        link.opened();
        assert!(!link.stalled(t0 + STALL_WINDOW, STALL_WINDOW));
        assert!(!link.stalled(
            t0 + 2 * STALL_WINDOW - Duration::from_millis(1),
            STALL_WINDOW
        ));
        // A whole window watched without a stream opening: stalled.
        assert!(link.stalled(t0 + 2 * STALL_WINDOW, STALL_WINDOW));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_dial_without_a_retire_time_ends_the_last_one_s_retire_task() {
        // The first connection expires (over TLS, say); the next has no
        // expiry. The first one's retirement task must not outlive it.
        let dials = Arc::new(AtomicUsize::new(0));
        let counted = dials.clone();
        let conn = ClientConn::expiring(
            authority_of(addr()),
            &EndpointConfig::default(),
            move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    let (client, io) = tokio::io::duplex(64 * 1024);
                    tokio::spawn(async move {
                        if let Ok(mut conn) = h2::server::handshake(io).await {
                            while let Some(Ok((_, mut respond))) = conn.accept().await {
                                let ok = http::Response::builder()
                                    .header("grpc-status", "0")
                                    .body(())
                                    .unwrap();
                                let _ = respond.send_response(ok, true);
                            }
                        }
                    });
                    let expires =
                        (n == 0).then(|| std::time::SystemTime::now() + Duration::from_secs(3600));
                    Ok((TokioIo::new(client), expires))
                }
            },
        );
        conn.call(request()).await.unwrap();
        let first = conn
            .inner
            .retire_task
            .lock()
            .unwrap()
            .clone()
            .expect("the expiring connection's retirement task");
        // The connection is replaced (it closed, say).
        *conn.inner.lock() = State::Idle;
        conn.call(request()).await.unwrap();
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        tokio::task::yield_now().await;
        assert!(first.is_finished(), "the old retirement task was ended");
        assert!(conn.inner.retire_task.lock().unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_whose_task_panicked_does_not_hold_the_connection() {
        // The first dial's connector panics (its task never records an
        // outcome); later calls must dial again, not reuse that result.
        let dials = Arc::new(AtomicUsize::new(0));
        let counted = dials.clone();
        let conn = ClientConn::new(
            authority_of(addr()),
            &EndpointConfig::default(),
            move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        panic!("connector bug");
                    }
                    Err::<TokioIo<tokio::net::TcpStream>, _>(io::Error::other("refused"))
                }
            },
        );
        let first = conn.call(request()).await.unwrap_err();
        assert!(
            first.to_string().contains("lost") || format!("{first:?}").contains("lost"),
            "{first:?}"
        );
        let second = conn.call(request()).await.unwrap_err();
        assert_eq!(dials.load(Ordering::SeqCst), 2, "a new dial: {second:?}");
        assert!(format!("{second:?}").contains("refused"), "{second:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_whose_caller_gave_up_still_becomes_the_connection() {
        let bed = Bed::new([Peer::Serves]);
        let conn = bed.conn(&EndpointConfig::default());
        // The call is dropped at once (its deadline passed, say).
        drop(conn.call(request()));
        assert_eq!(conn.state(), ConnState::Connecting);
        settle(&conn, ConnState::Ready).await;
        conn.call(request()).await.unwrap();
        assert_eq!(bed.dials.load(Ordering::SeqCst), 1, "no second dial");
    }

    #[test]
    fn what_proves_a_request_unprocessed() {
        let refused: BoxError = Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM));
        assert!(never_processed(&*refused));
        let cancelled: BoxError = Box::new(h2::Error::from(h2::Reason::CANCEL));
        assert!(!never_processed(&*cancelled));
        let io: BoxError = Box::new(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(!never_processed(&*io));
    }

    /// Counts the wakes of the task that polls with it.
    struct CountWakes(AtomicUsize);

    impl futures::task::ArcWake for CountWakes {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn a_crowded_connection_puts_off_its_first_write_once_per_wake_up() {
        use hyper::rt::{Read as _, Write as _};
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let busy = Arc::new(AtomicUsize::new(2));
        let mut io = Severable {
            io: TokioIo::new(near),
            link: Arc::new(Link::new(1, STALL_WINDOW)),
            busy: busy.clone(),
            armed: false,
            deferred: false,
        };
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        type Io = Severable<TokioIo<DuplexStream>>;
        fn write(io: &mut Io, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<usize> {
            Pin::new(io)
                .poll_write(cx, bytes)
                .map(|r| r.expect("duplex write"))
        }
        // The connection task's read finding nothing (the peer sent nothing).
        fn ran_dry(io: &mut Io, cx: &mut Context<'_>) {
            let mut buf = [std::mem::MaybeUninit::uninit(); 16];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut buf);
            assert!(Pin::new(io).poll_read(cx, buf.unfilled()).is_pending());
        }
        let woken = || wakes.0.load(Ordering::Relaxed);

        // The preface, written before anything is read: at once.
        assert_eq!(write(&mut io, &mut cx, b"a"), Poll::Ready(1));
        // One call waiting: at once.
        busy.store(1, Ordering::Relaxed);
        ran_dry(&mut io, &mut cx);
        assert_eq!(write(&mut io, &mut cx, b"b"), Poll::Ready(1));
        // Several waiting: the wake-up's first write waits one turn (the
        // task wakes itself), then goes; so do the writes after it,
        // flushes between them or not (h2 flushes after each large DATA
        // frame).
        busy.store(2, Ordering::Relaxed);
        ran_dry(&mut io, &mut cx);
        assert_eq!(write(&mut io, &mut cx, b"c"), Poll::Pending);
        assert_eq!(woken(), 1, "it woke itself");
        assert_eq!(write(&mut io, &mut cx, b"c"), Poll::Ready(1));
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(write(&mut io, &mut cx, b"d"), Poll::Ready(1));
        // The task's own re-poll is no new wake-up: nothing waits again.
        ran_dry(&mut io, &mut cx);
        assert_eq!(write(&mut io, &mut cx, b"e"), Poll::Ready(1));
        // The next wake-up from outside waits once again.
        ran_dry(&mut io, &mut cx);
        assert_eq!(write(&mut io, &mut cx, b"f"), Poll::Pending);
        assert_eq!(write(&mut io, &mut cx, b"f"), Poll::Ready(1));
        assert_eq!(woken(), 2);

        // Every byte arrived once, in order.
        let mut got = [0u8; 6];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"abcdef");
    }
}
