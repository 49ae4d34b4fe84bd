//! An endpoint's HTTP/2 connection, driven by hyper's client directly.
//!
//! tonic's `Channel` puts a `tower::Buffer` in front of hyper: every call
//! is a hop over an mpsc queue to a worker task and a oneshot back, and the
//! worker serialises `poll_ready`/`call` for all callers. The balancer
//! already decides which endpoint is fit for a call, so that queue buys the
//! mesh nothing. Here a call takes the connection's lock only to hand its
//! request to hyper's [`SendRequest`] (which queues it straight to the
//! connection's own task) and then waits on hyper's response future.
//!
//! States: `Idle` (no connection yet, or the last dial failed),
//! `Connecting` (one dial in progress, shared by every call that arrives
//! meanwhile), `Ready` (a live [`SendRequest`]). A `Ready` connection whose
//! hyper side has closed (EOF, keepalive timeout, I/O error, or a GOAWAY
//! noticed) is found closed by the next call, which dials again; calls
//! already on the old connection finish there (a GOAWAY lets the streams it
//! names complete). Nothing is dialled before the first call or health
//! watch, and an idle connection holds no task.
//!
//! Over TLS a connection retires shortly before the earlier of its two
//! certificates expires ([`retire_at`]): the next call dials a new one
//! (with the renewed certificate) and the old one closes when its calls
//! are done, before the server would cut it at the expiry.
//!
//! Failures map as a tonic `Channel`'s did, so the balancer and the retry
//! layer classify them unchanged: a failed dial fails its calls with a
//! [`tonic::ConnectError`] (the balancer's cue for the endpoint's reconnect
//! backoff, the retry layer's "never sent"); a stream the server refused
//! is hyper's error over `h2`'s `REFUSED_STREAM`; a request hyper never
//! wrote because its connection had closed is hyper's "canceled". hyper
//! hands that last request back, so it provably never left: it fails as
//! [`Unsent`], carrying the request, and the balancer sends it once more
//! to an endpoint it picks, avoiding this one (a request racing a drain's
//! GOAWAY then costs no retry, charges the endpoint nothing, and does not
//! go back to the draining address).
//!
//! A connection that closes without ever answering a call (a server that
//! closes right after every handshake) hands its requests back marked
//! with its dial number ([`dead_dial`]): the balancer charges that once,
//! as a failed dial, so the endpoint backs off instead of costing a dial
//! per call.
//!
//! hyper queues calls beyond the server's stream limit, and a call that
//! gives up stays in hyper's queue until a stream frees. Past
//! [`MAX_QUEUED_REQUESTS`] queued a call is refused at once, unsent
//! ([`QueueFull`]: load, not a failure), while the connection's streams go
//! on: its server is busy. Only a full queue that no request left for its
//! [`stall_window`] (a server that answers pings but opens no streams)
//! gets the connection cut: its socket fails (so hyper frees the queue),
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

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use http::{HeaderValue, Uri, uri::Authority};
use hyper::client::conn::{
    TrySendError,
    http2::{Builder, SendRequest},
};
use hyper_util::rt::TokioTimer;
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
/// server's `SETTINGS_MAX_CONCURRENT_STREAMS` bounds us, and hyper queues
/// calls beyond it until a stream closes (at most [`MAX_PENDING_CALLS`]
/// live calls per connection, and [`MAX_QUEUED_REQUESTS`] live or
/// abandoned ones in hyper's queue).
pub(crate) const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Request bytes buffered per stream before the sender waits (hyper's default).
pub(crate) const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams the server may make us reset for its protocol errors before we
/// close the connection (hyper's default flood guard).
pub(crate) const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The `user-agent` of calls that set none.
const USER_AGENT: &str = concat!("mesh-client/", env!("CARGO_PKG_VERSION"));

/// One dial: a connected, handshaken HTTP/2 sender whose connection task
/// is already running, its socket behind the given [`Link`]'s switch.
type Dial =
    Box<dyn Fn(Arc<Link>) -> BoxFuture<'static, Result<SendRequest<Body>, BoxError>> + Send + Sync>;

/// One dial in progress, awaited by every call that needs it.
type Attempt = Shared<BoxFuture<'static, Result<Live, DialError>>>;

/// A live connection: hyper's sender and the connection's [`Link`].
#[derive(Clone)]
struct Live {
    send: SendRequest<Body>,
    link: Arc<Link>,
}

/// hyper's response future on a live connection; gives the request back
/// if hyper never wrote it.
type Sent = Pin<
    Box<
        dyn Future<Output = Result<http::Response<hyper::body::Incoming>, TrySendError<Request>>>
            + Send,
    >,
>;

type Request = http::Request<Body>;

pin_project_lite::pin_project! {
    /// hyper's response body, telling its end without h2's lock.
    ///
    /// `is_end_stream` on hyper's body takes the connection's stream lock,
    /// which its connection task holds while it reads and writes frames;
    /// every layer that wraps a body in `tonic::body::Body::new` asks it,
    /// so a call took that lock (often contended: a futex wait) once per
    /// layer. This answers from what it saw instead: the end known when
    /// the headers came (hyper's own check then), and a `None` or the
    /// trailers read since. Answering `false` early is within the
    /// `http_body` contract: the reader polls once more and gets the end.
    struct Received {
        #[pin]
        inner: hyper::body::Incoming,
        ended: bool,
    }
}

/// A response from hyper as the mesh's layers take it (see [`Received`]).
fn received(response: http::Response<hyper::body::Incoming>) -> http::Response<Body> {
    let (parts, inner) = response.into_parts();
    // Without `content-length`, hyper's exact hint of 0 is its check of
    // h2 at the headers (the stream had already ended); with one, a zero
    // length may still be followed by trailers, so h2 is asked.
    let ended = if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        http_body::Body::is_end_stream(&inner)
    } else {
        http_body::Body::size_hint(&inner).exact() == Some(0)
    };
    http::Response::from_parts(parts, Body::new(Received { inner, ended }))
}

impl http_body::Body for Received {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = &polled {
            *this.ended = true;
        }
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.is_trailers()
        {
            *this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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

/// Runs hyper's client futures on tokio, each in a box of its own.
///
/// hyper spawns one or two futures per call (the wait for the response,
/// and the request body's pipe to h2 when h2 cannot take the body at
/// once) and one per connection (the connection itself), all variants of
/// one enum as large as its largest, the connection: spawned as they
/// are, each call copied that size into task cells and back out (perf:
/// `memmove` under tokio's `Cell::new` and `set_stage`; 2.5 → 1.7 µs a
/// call boxed). Boxed, the copy is of the future itself, once, and the
/// task holds a pointer, as under tonic's own executor.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        drop(tokio::spawn(Box::pin(fut)));
    }
}

/// The HTTP/2 settings of every client connection: the keepalive of
/// `settings` and the explicit limits above.
pub(crate) fn http2_builder(settings: &EndpointConfig) -> Builder<BoxingExecutor> {
    let mut builder = Builder::new(BoxingExecutor);
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        // A connection with no call in flight still carries the health
        // watch; a dead peer must be found without waiting for a call.
        .keep_alive_while_idle(true)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_stream_window_size(STREAM_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .max_send_buf_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
    builder
}

impl ClientConn {
    /// A connection to `authority` that dials with `connect` (TCP, and
    /// TLS when the mesh has an identity) and then shakes hands with the
    /// HTTP/2 settings of [`http2_builder`]. The connect timeout of
    /// `settings` bounds the dial and the handshake together. Nothing is
    /// dialled until the first call.
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
        let builder = http2_builder(settings);
        let retire_at_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let retire = retire_at_ms.clone();
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let busy = pending.clone();
        let dial: Dial = Box::new(move |link| {
            let io = connect();
            let builder = builder.clone();
            let retire = retire.clone();
            let busy = busy.clone();
            Box::pin(async move {
                let (io, expires) = io.await?;
                let io = Severable {
                    io,
                    link,
                    busy,
                    // The preface is written before any read: not put off.
                    armed: false,
                    deferred: false,
                };
                let (send, conn) = builder.handshake::<_, Body>(io).await?;
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
                // hyper's request dispatcher; the HTTP/2 connection itself
                // runs on a task hyper spawns. Both end when the connection
                // does (or when every sender and call is gone).
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("HTTP/2 client connection ended: {e}");
                    }
                });
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
            State::Ready(live) if live.send.is_closed() || self.inner.retired() => {
                ConnState::Closed
            }
            State::Ready(_) => ConnState::Ready,
        }
    }

    /// When the live connection stops taking new calls (its certificates
    /// are about to expire), if it was made over TLS.
    pub(crate) fn retire_at(&self) -> Option<std::time::SystemTime> {
        self.inner.retire_time()
    }

    /// Requests handed to hyper on the live connection and not yet taken
    /// off its queue (by opening a stream, or discarded as abandoned).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        match &*self.inner.lock() {
            State::Ready(live) => live.link.queued(),
            _ => 0,
        }
    }

    /// Sends `req` on the connection, dialling first if there is none.
    pub(crate) fn call(&self, mut req: Request) -> ResponseFuture {
        use std::sync::atomic::Ordering::Relaxed;
        // hyper queues calls beyond the server's stream limit without
        // bound; a peer that stops opening streams (and still answers
        // pings) would hold every call until its deadline. Past the bound
        // a call fails at once, unsent, and may go elsewhere.
        if self.inner.pending.fetch_add(1, Relaxed) >= MAX_PENDING_CALLS {
            self.inner.pending.fetch_sub(1, Relaxed);
            return ResponseFuture {
                kind: Kind::Refused(Some(Box::new(Unsent::refused(req, QueueFull::Calls)))),
                _pending: None,
            };
        }
        let pending = PendingCall(self.inner.clone());
        self.set_origin(&mut req);
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
                    if live.link.queued() >= MAX_QUEUED_REQUESTS
                        && !live
                            .link
                            .stalled(tokio::time::Instant::now(), (self.inner.stall_window)()) =>
                {
                    // The queue is full but moves: the server's streams are
                    // busy (it is saturated, not stuck), and hyper drops
                    // abandoned requests only as streams free up. This call
                    // is refused unsent; the calls on the connection go on.
                    return ResponseFuture {
                        kind: Kind::Refused(Some(Box::new(Unsent::refused(req, QueueFull::Queue)))),
                        _pending: None,
                    };
                }
                State::Ready(live) if live.link.queued() >= MAX_QUEUED_REQUESTS => {
                    // Full, and nothing left hyper's queue for a whole
                    // stall window: the server opens no streams, and calls
                    // that gave up still sit there. Cut the connection: its
                    // queue is freed, its live calls fail as a stalled
                    // connection (never sent), and the balancer backs the
                    // endpoint off.
                    let link = live.link.clone();
                    *state = State::Idle;
                    drop(state);
                    tracing::warn!(authority = %self.inner.authority, "{}", Stalled);
                    link.sever();
                    return ResponseFuture {
                        kind: Kind::Refused(Some(link.stalled_error())),
                        _pending: None,
                    };
                }
                // A retired connection is replaced below: dropping its
                // sender lets hyper close it once its calls are done.
                State::Ready(live) if !live.send.is_closed() && !self.inner.retired() => {
                    // The fast path: hyper queues the request to the
                    // connection's dispatcher; no task of ours in between.
                    let req = live.link.enqueue(req);
                    return ResponseFuture {
                        kind: Kind::Sent {
                            fut: Box::pin(live.send.try_send_request(req)),
                            link: live.link.clone(),
                        },
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
            kind: Kind::Dialling(Box::pin(async move {
                let Live { mut send, link } = attempt
                    .await
                    .map_err(|e| -> BoxError { Box::new(tonic::ConnectError(Box::new(e))) })?;
                let req = link.enqueue(req);
                match send.try_send_request(req).await {
                    Ok(response) => {
                        link.answered();
                        Ok(received(response))
                    }
                    Err(e) => Err(handed_back(e, &link)),
                }
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
        let link = Arc::new(Link::new(number));
        let dial = (self.inner.dial)(link.clone());
        let limit = self.inner.connect_timeout;
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let result = match tokio::time::timeout(limit, dial).await {
                Ok(Ok(send)) => Ok(Live { send, link }),
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

    /// hyper sends `:scheme` and `:authority` from the URI; tonic's
    /// clients give only the path.
    fn set_origin(&self, req: &mut Request) {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.inner.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
        req.headers_mut()
            .entry(http::header::USER_AGENT)
            .or_insert(HeaderValue::from_static(USER_AGENT));
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

/// The response of one call: sent on a live connection, or waiting for
/// the dial first. An enum rather than one boxed future so the fast path
/// allocates only hyper's own future.
pub(crate) struct ResponseFuture {
    kind: Kind,
    /// Counts the call against [`MAX_PENDING_CALLS`] until it ends.
    _pending: Option<PendingCall>,
}

/// Calls one connection holds at once (sent, queued in hyper for a
/// stream, or waiting on the dial), as tonic's `Channel` buffer bounded
/// them; past it a call fails at once with [`QueueFull`], unsent.
pub(crate) const MAX_PENDING_CALLS: usize = 1024;

/// Requests one connection's hyper queue may hold (handed to hyper, no
/// stream opened for them yet), live or abandoned: hyper drops a request
/// whose caller gave up only when it takes it off the queue, which it does
/// only as streams open. Without a bound the queue would grow with the
/// call rate while a server opens no streams (or while its streams are
/// busy and callers give up fast: short deadlines, losing hedges,
/// per-attempt timeouts). Past it a call is refused at once, unsent
/// ([`QueueFull::Queue`]); only a queue that also stopped moving for
/// its [`stall_window`] gets its connection cut (see [`Stalled`]).
pub(crate) const MAX_QUEUED_REQUESTS: usize = 2 * MAX_PENDING_CALLS;

/// How long a full queue must go without a single request leaving it (a
/// stream opening, or an abandoned request discarded) before its
/// connection is taken for stuck and cut. A healthy server whose streams
/// are all busy frees one at the latest when the call holding it ends,
/// and every mesh call ends by its deadline (the client resets the stream
/// then): so the window is the longest deadline a call may have,
/// `longest_deadline` (the config's longest `maxTimeout`), plus the
/// keepalive's time to find a dead peer (interval + timeout, 8 s by
/// default). A keepalive-sized window alone (3-8 s) would let an outside
/// caller behind a gateway hold a replica's streams with any call slower
/// than that, fill the queue with calls that give up at once, and get the
/// connection cut, its calls failed and the replica backed off; with this
/// one it must hold every stream past its own deadline, which the mesh
/// does not allow. A stuck server is cut this much later than at the
/// bound, and meanwhile costs its callers nothing but fast refusals.
pub(crate) fn stall_window(longest_deadline: Duration, settings: &EndpointConfig) -> Duration {
    longest_deadline
        .saturating_add(settings.keepalive_interval)
        .saturating_add(settings.keepalive_timeout)
}

/// The stall window of the default config (30 s + 5 s + 3 s).
#[cfg(test)]
pub(crate) const STALL_WINDOW: Duration =
    crate::config::DEFAULT_MAX_TIMEOUT.saturating_add(Duration::from_secs(8));

/// What one connection shares with its requests and its socket: how many
/// of its requests hyper still queues, and the switch that cuts it.
struct Link {
    /// The connection's dial number (see [`failed_dial`]).
    dial: u64,
    /// Requests handed to hyper and not yet taken off its queue (low 32
    /// bits), and how many were taken off so far (high 32 bits, wrapping):
    /// each request carries a [`Queued`] token, which hyper drops with the
    /// request's extensions when it gives the stream to h2 or discards the
    /// request. One word, so a token's drop is one relaxed add, as a bare
    /// count's would be: whether the queue moves is judged from the count
    /// of departures when the queue is full (see [`Link::stalled`]), and
    /// no clock is read per request.
    queue: std::sync::atomic::AtomicU64,
    /// The departures seen when the queue was last found full, and when:
    /// read only then, under the connection's state lock.
    full_since: Mutex<Option<(u32, tokio::time::Instant)>>,
    /// Set by the first response: a connection that hands requests back
    /// without ever answering one is a failed dial (see [`dead_dial`]).
    answered: std::sync::atomic::AtomicBool,
    severed: std::sync::atomic::AtomicBool,
    /// The connection task's read, woken when the link is severed.
    reader: futures::task::AtomicWaker,
}

/// One departure in [`Link::queue`]'s high half.
const DEPARTED: u64 = 1 << 32;

impl Link {
    fn new(dial: u64) -> Self {
        Self {
            dial,
            queue: std::sync::atomic::AtomicU64::new(0),
            full_since: Mutex::new(None),
            answered: std::sync::atomic::AtomicBool::new(false),
            severed: std::sync::atomic::AtomicBool::new(false),
            reader: futures::task::AtomicWaker::new(),
        }
    }

    /// Requests hyper still queues on this connection.
    fn queued(&self) -> usize {
        (self.queue.load(std::sync::atomic::Ordering::Relaxed) & u64::from(u32::MAX)) as usize
    }

    /// Whether the (full) queue has stood still for `window` as of `now`:
    /// no request left it since it was first found full without
    /// one leaving. The first look at a full queue, and any look after a
    /// departure, starts the window anew, so a server is cut only after
    /// a whole window watched without progress (at most a window later
    /// than if each departure were timed, and no clock read per request).
    fn stalled(&self, now: tokio::time::Instant, window: Duration) -> bool {
        let departed = (self.queue.load(std::sync::atomic::Ordering::Relaxed) >> 32) as u32;
        let mut full_since = self
            .full_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *full_since {
            Some((seen, since)) if seen == departed => {
                now.saturating_duration_since(since) >= window
            }
            _ => {
                *full_since = Some((departed, now));
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

    /// Counts `req` as queued on this connection until hyper lets go of it.
    fn enqueue(self: &Arc<Self>, mut req: Request) -> Request {
        self.queue
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        req.extensions_mut().insert(Queued(self.clone()));
        req
    }

    /// Cuts the connection: its socket fails every read and write from
    /// now on, so hyper ends the connection and frees its queue.
    fn sever(&self) {
        self.severed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.reader.wake();
    }

    fn is_severed(&self) -> bool {
        self.severed.load(std::sync::atomic::Ordering::SeqCst)
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

/// A request's place in its connection's hyper queue (see [`Link`]).
struct Queued(Arc<Link>);

/// `http::Extensions` needs `Clone`; a copy is a place of its own, so
/// every token's drop takes back exactly what it added (a derived clone
/// would decrement twice and wrap the count).
impl Clone for Queued {
    fn clone(&self) -> Self {
        self.0
            .queue
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(self.0.clone())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        // One queued fewer, one departure more: the token's own add made
        // the low half at least 1, so nothing borrows from the high half.
        self.0
            .queue
            .fetch_add(DEPARTED - 1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a connection was cut: hyper held [`MAX_QUEUED_REQUESTS`] requests
/// and none left its queue for its [`stall_window`]. Its calls never left, so
/// they may go to another endpoint; the endpoint is backed off as after a
/// failed dial.
#[derive(Debug)]
pub(crate) struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection cut: {MAX_QUEUED_REQUESTS} requests queued and none taken for a stream for longer than any call's deadline and keepalive"
        )
    }
}

impl std::error::Error for Stalled {}

/// A connection's socket behind its [`Link`]'s switch: once severed,
/// every read and write fails, which ends hyper's connection at once
/// (its streams fail, its queue is dropped, the socket is closed).
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
        if self.link.is_severed() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, Stalled));
        }
        Ok(())
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

/// One call counted against the connection's [`MAX_PENDING_CALLS`].
struct PendingCall(Arc<Inner>);

impl Drop for PendingCall {
    fn drop(&mut self) {
        self.0
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a call was refused before it was sent: its connection is busy,
/// not broken. It comes back [`Unsent`] (so it may go elsewhere), and the
/// balancer counts it as load, never as a failure: a saturated server is
/// not ejected or backed off for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueFull {
    /// The connection already holds [`MAX_PENDING_CALLS`] live calls.
    Calls,
    /// hyper's queue holds [`MAX_QUEUED_REQUESTS`] (live or abandoned),
    /// and it still moves (else the connection is cut, [`Stalled`]).
    Queue,
}

impl std::fmt::Display for QueueFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueFull::Calls => write!(
                f,
                "the connection already holds {MAX_PENDING_CALLS} calls (the server opens no more streams); not sent"
            ),
            QueueFull::Queue => write!(
                f,
                "{MAX_QUEUED_REQUESTS} requests wait for one of the connection's streams (the server's streams are busy); not sent"
            ),
        }
    }
}

impl std::error::Error for QueueFull {}

enum Kind {
    Sent {
        fut: Sent,
        /// The connection it was handed to.
        link: Arc<Link>,
    },
    Dialling(BoxFuture<'static, Result<http::Response<Body>, BoxError>>),
    /// Refused before it was sent ([`QueueFull`], [`Stalled`]).
    Refused(Option<BoxError>),
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Sent { fut, link } => Poll::Ready(match ready!(fut.as_mut().poll(cx)) {
                Ok(response) => {
                    link.answered();
                    Ok(received(response))
                }
                Err(e) => Err(handed_back(e, link)),
            }),
            Kind::Dialling(fut) => fut.as_mut().poll(cx),
            Kind::Refused(err) => {
                Poll::Ready(Err(err.take().expect("a refused call is polled once")))
            }
        }
    }
}

/// The error of a call hyper failed: a request it hands back unsent (its
/// connection closed before it was written: a GOAWAY or EOF hyper had not
/// yet noticed when it was queued) becomes [`Unsent`], holding the request
/// for the balancer to send once more, to an endpoint it picks; one from a
/// connection cut for stalling fails as [`Stalled`] (never sent there again).
fn handed_back(mut e: TrySendError<Request>, link: &Link) -> BoxError {
    match e.take_message() {
        Some(_) if link.is_severed() => link.stalled_error(),
        Some(mut req) => {
            req.extensions_mut().remove::<Queued>();
            tracing::debug!(
                "connection closed before the request was sent: {}",
                e.error()
            );
            Box::new(Unsent {
                request: Mutex::new(Some(req)),
                source: Box::new(e.into_error()),
                // A server that closes every connection before answering
                // (right after the handshake, say) would otherwise cost a
                // dial per call and never be charged: the connection
                // worked no better than a failed dial.
                dead_dial: (!link.answered.load(std::sync::atomic::Ordering::Relaxed))
                    .then_some(link.dial),
            })
        }
        // Without the request: hyper wrote it, or had passed it to h2 and
        // lost it there. The one request hyper's dispatcher holds waiting
        // for a stream when the connection ends (a GOAWAY, say) fails as
        // "dispatch task is gone" and cannot come back: hyper 1.x gave its
        // head to h2 (`SendRequest::send_request` turns it into a HEADERS
        // frame and clears its extensions) and drops its body with the
        // dispatcher, so there is no request left to hand back. Nor is it
        // provably unsent: h2 may open that stream (write its HEADERS)
        // when a slot frees in the same pass of the connection task that
        // reads the GOAWAY, before the dispatcher runs again and drops it,
        // and a GOAWAY naming a higher last stream lets the server process
        // it. So it stays a failure that may have reached the server; a
        // drain costs at most this one request per connection.
        None => e.into_error().into(),
    }
}

/// A request hyper handed back unwritten because its connection had
/// closed, or one refused before it was handed to hyper ([`QueueFull`]):
/// provably never sent (see [`never_processed`]), and still whole, so the
/// balancer sends it once more without charging anyone (see
/// [`take_unsent`]).
pub(crate) struct Unsent {
    /// Taken by the one who sends it again.
    request: Mutex<Option<Request>>,
    /// hyper's "canceled", or the [`QueueFull`] bound that refused it.
    source: BoxError,
    /// The dial number of a connection that closed without answering a
    /// single call (see [`dead_dial`]).
    dead_dial: Option<u64>,
}

impl Unsent {
    fn refused(req: Request, why: QueueFull) -> Self {
        Self {
            request: Mutex::new(Some(req)),
            source: Box::new(why),
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
    Link::new(dial).stalled_error()
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
/// hyper never wrote the request (its connection had closed: "canceled").
/// A failed dial is told apart by its [`tonic::ConnectError`].
pub(crate) fn never_processed(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::caused_by::<h2::Error>(err).is_some_and(|h2| {
        h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote())
    }) || crate::caused_by::<hyper::Error>(err).is_some_and(hyper::Error::is_canceled)
        || is_unsent(err)
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
    //! real hyper HTTP/2 server, with tokio's clock paused: every wait
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

    /// A server of raw HTTP/2 frames: reads the client's preface and
    /// frames up to its first HEADERS, then sends SETTINGS and a GOAWAY
    /// whose last stream is 0 (RFC 9113 6.8: stream 1 was not processed),
    /// and holds the socket open.
    async fn go_away_after_first_request(mut io: DuplexStream) -> io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await?;
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
        const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
        // Length 8, type GOAWAY, stream 0; last stream 0, NO_ERROR.
        const GOAWAY: [u8; 17] = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        io.write_all(&SETTINGS).await?;
        io.write_all(&GOAWAY).await?;
        io.flush().await?;
        std::future::pending().await
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

        // The server goes away: hyper's side closes, and the state says so.
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

        // hyper hands back the request it could not send on the GOAWAY'd
        // connection: it fails unsent, carrying the request, for the
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
    async fn a_stream_a_goaway_leaves_unprocessed_fails_as_never_processed() {
        let bed = Bed::new([Peer::GoesAway, Peer::Serves]);
        let conn = bed.conn(&EndpointConfig::default());
        let err = conn.call(request()).await.unwrap_err();
        // hyper had written the request, so it is not sent again here; the
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

    /// Hands `conn` calls that give up at once (a deadline passed, say)
    /// until one is refused: hyper queues each, and an abandoned one stays
    /// queued until a stream frees. The refusal's error.
    fn fill_the_queue(conn: &ClientConn) -> BoxError {
        for _ in 0..3 * MAX_QUEUED_REQUESTS {
            let mut call = conn.call(request());
            if let Some(result) = (&mut call).now_or_never() {
                return result.expect_err("refused");
            }
            assert!(conn.queued() <= MAX_QUEUED_REQUESTS, "{}", conn.queued());
            drop(call);
        }
        panic!("never refused: {} queued", conn.queued());
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
        // queue is full, so a reload after the dial counts.
        let longest = Arc::new(std::sync::Mutex::new(crate::config::DEFAULT_MAX_TIMEOUT));
        let window: StallWindow = {
            let longest = longest.clone();
            Arc::new(move || stall_window(*longest.lock().unwrap(), &EndpointConfig::default()))
        };
        let conn = conn.with_stall_window(window);
        let _live = tokio::spawn(conn.call(request()));
        settle(&conn, ConnState::Ready).await;
        *longest.lock().unwrap() = Duration::from_secs(120);
        let err = fill_the_queue(&conn);
        assert_eq!(queue_full(&err), Some(QueueFull::Queue), "{err}");
        // Past the default window a call may still hold a stream (its
        // deadline is up to 120 s): refused, not cut.
        tokio::time::sleep(STALL_WINDOW + Duration::from_secs(1)).await;
        let err = conn.call(request()).await.unwrap_err();
        assert_eq!(queue_full(&err), Some(QueueFull::Queue), "{err}");
        assert_eq!(conn.state(), ConnState::Ready);
        // Past 120 s + keepalive: stuck, and cut.
        tokio::time::sleep(Duration::from_secs(128) - STALL_WINDOW).await;
        let err = conn.call(request()).await.unwrap_err();
        assert!(crate::caused_by::<Stalled>(&*err).is_some(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_server_opens_no_streams_is_cut_once_its_full_queue_stands_still() {
        let (conn, server) = holding_server(0, &EndpointConfig::default());
        // A live call that waits (the server admits no stream).
        let live = tokio::spawn(conn.call(request()));
        settle(&conn, ConnState::Ready).await;
        // Full: refused at once, unsent, and the connection kept (its
        // queue has not yet been watched standing still).
        let err = fill_the_queue(&conn);
        assert_eq!(queue_full(&err), Some(QueueFull::Queue), "{err}");
        assert!(!is_connect_error(&err), "{err}");
        assert!(never_processed(&*err), "{err}");
        assert!(take_unsent(&*err).is_some(), "the request comes back");
        assert_eq!(conn.queued(), MAX_QUEUED_REQUESTS);
        // Nothing leaves the queue; short of the window, still refused.
        tokio::time::sleep(STALL_WINDOW - Duration::from_secs(1)).await;
        let err = conn.call(request()).await.unwrap_err();
        assert_eq!(queue_full(&err), Some(QueueFull::Queue), "{err}");
        assert_eq!(conn.state(), ConnState::Ready);
        // A whole window without a departure: stuck, and cut.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let err = conn.call(request()).await.unwrap_err();
        assert!(crate::caused_by::<Stalled>(&*err).is_some(), "{err}");
        assert!(is_connect_error(&err), "backed off as a failed dial: {err}");
        assert_eq!(failed_dial(&*err), Some(1));
        // The live call ends with the connection (how depends on where it
        // was: refused by the server before its SETTINGS arrived, waiting
        // in h2 for a stream, or in hyper's queue, handed back as Stalled).
        tokio::time::timeout(Duration::from_secs(30), live)
            .await
            .expect("the live call ends with the connection")
            .unwrap()
            .unwrap_err();
        // The server sees the connection end (its queue went with it).
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
    async fn a_saturated_server_s_excess_is_refused_unsent_and_its_streams_live_on() {
        // A healthy server at its stream limit: four streams, all busy.
        let (conn, server) = holding_server(4, &EndpointConfig::default());
        let live: Vec<_> = (0..5).map(|_| tokio::spawn(conn.call(request()))).collect();
        for _ in 0..1000 {
            if server.admitted.load(Ordering::SeqCst) == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.admitted.load(Ordering::SeqCst), 4);
        // A burst of calls that give up at once fills hyper's queue: the
        // excess is refused at once, unsent, as load, not as a failure.
        let err = fill_the_queue(&conn);
        assert_eq!(queue_full(&err), Some(QueueFull::Queue), "{err}");
        assert!(!is_connect_error(&err), "{err}");
        assert_eq!(failed_dial(&*err), None, "nothing to back off");
        assert!(never_processed(&*err), "{err}");
        let back = take_unsent(&*err).expect("the request comes back whole");
        assert_eq!(back.uri().path(), "/test.Echo/Unary");
        assert_eq!(conn.state(), ConnState::Ready);
        // A stream frees: hyper drops the abandoned requests, and the
        // queue fills with the next burst; refused again, never cut.
        server.release.add_permits(1);
        live_answered(&live, 1).await;
        let err = fill_the_queue(&conn);
        assert_eq!(queue_full(&err), Some(QueueFull::Queue), "{err}");
        // Every live call is answered on the one connection.
        server.release.add_permits(4);
        for call in live {
            let response = tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .expect("answered")
                .unwrap()
                .expect("the in-flight streams survived");
            assert_eq!(response.headers()["grpc-status"], "0");
        }
        assert_eq!(server.dials.load(Ordering::SeqCst), 1, "never cut");
        assert_eq!(server.ended.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_counts_as_stalled_only_after_a_whole_window_without_a_departure() {
        let link = Link::new(1);
        let t0 = tokio::time::Instant::now();
        // First found full: the window starts.
        assert!(!link.stalled(t0, STALL_WINDOW));
        assert!(!link.stalled(t0 + STALL_WINDOW - Duration::from_millis(1), STALL_WINDOW));
        // A request leaves (and another takes its place) just before the
        // window ends: the window starts over from the next look.
        link.queue
            .fetch_add(DEPARTED, std::sync::atomic::Ordering::Relaxed);
        assert!(!link.stalled(t0 + STALL_WINDOW, STALL_WINDOW));
        assert!(!link.stalled(
            t0 + 2 * STALL_WINDOW - Duration::from_millis(1),
            STALL_WINDOW
        ));
        // A whole window watched without a departure: stalled.
        assert!(link.stalled(t0 + 2 * STALL_WINDOW, STALL_WINDOW));
    }

    /// Waits (bounded) until `n` of the `live` calls have finished.
    async fn live_answered(
        live: &[tokio::task::JoinHandle<Result<http::Response<Body>, BoxError>>],
        n: usize,
    ) {
        for _ in 0..1000 {
            if live.iter().filter(|c| c.is_finished()).count() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} live calls finished");
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
            link: Arc::new(Link::new(1)),
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
