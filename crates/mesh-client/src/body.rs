use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures::future::Either;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

pin_project! {
    /// A response body that reports how the call ended when its stream
    /// ends: `Ok` with the gRPC status of its trailers, `Err` with the code
    /// the caller sees for a body error (the stream broke: a reset, a
    /// connection lost under it).
    ///
    /// Generic over the report rather than boxing it: two layers wrap
    /// every call's body, and a box each was two allocations per call.
    pub(crate) struct ObservedBody<B, F> {
        #[pin]
        inner: B,
        report: Option<F>,
        // Reported for a stream that ends without trailers.
        missing: Code,
    }
}

impl<B, F: FnOnce(Result<Code, Code>)> ObservedBody<B, F> {
    /// Reports `Code::Internal` for a stream that ends without trailers
    /// (a broken stream).
    pub(crate) fn new(inner: B, report: F) -> Self {
        Self::ending_without_trailers_as(inner, Code::Internal, report)
    }

    /// Reports `missing` for a stream that ends without trailers.
    pub(crate) fn ending_without_trailers_as(inner: B, missing: Code, report: F) -> Self {
        Self {
            inner,
            report: Some(report),
            missing,
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get(crate::headers::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

impl<B, F> Body for ObservedBody<B, F>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + 'static,
    F: FnOnce(Result<Code, Code>),
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // Only a trailers frame ends the call; data frames leave the report armed.
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(report) = this.report.take()
                {
                    report(Ok(grpc_status(trailers).unwrap_or(Code::Unknown)));
                }
            }
            Poll::Ready(Some(Err(error))) => {
                if let Some(report) = this.report.take() {
                    // tonic hands a body's `Status` to the caller as it is.
                    let code = crate::caused_by::<tonic::Status>(error)
                        .map_or(Code::Unknown, tonic::Status::code);
                    report(Err(code));
                }
            }
            Poll::Ready(None) => {
                if let Some(report) = this.report.take() {
                    // A gRPC response always ends in trailers; none is a broken stream.
                    report(Ok(*this.missing));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Response header (value `1`) on a trailers-only `RESOURCE_EXHAUSTED`
/// that the mesh's own server-side load shedding answered (the process at
/// its concurrency limit), as opposed to a service refusing a caller (a
/// rate limit, a cap, a message too large): only a marked answer raises
/// the client balancer's penalty for the endpoint, so a caller cannot skew
/// load away from a replica by provoking refusals. Servers outside this
/// crate that shed load may set it too; the mesh server removes it from
/// any answer its service gives (a status passed on from an upstream).
pub const SHED_HEADER: &str = "mesh-shed";

/// tonic's text for a call shed at a connection's concurrency limit
/// (`ServerConfig::concurrency_limit_per_connection`), which it answers
/// outside the mesh's layers, so unmarked: taken as the mesh's shedding too.
pub(crate) const TONIC_CONNECTION_SHED: &str = "Too many active requests for the connection";

/// Whether a trailers-only response is a shed answer of a mesh server
/// (see [`SHED_HEADER`]).
pub(crate) fn is_marked_shed(response: &http::Response<tonic::body::Body>) -> bool {
    header_status(response) == Some(Code::ResourceExhausted)
        && (response
            .headers()
            .get(SHED_HEADER)
            .is_some_and(|v| v == "1")
            // Decoded: on the wire `grpc-message` is percent-encoded
            // (`Too%20many...`), so the raw header never equals the text.
            || tonic::Status::from_header_map(response.headers())
                .is_some_and(|status| status.message() == TONIC_CONNECTION_SHED))
}

/// A trailers-only response with `code` and no message, as a layer below
/// would answer (for the layers' unit tests).
#[cfg(test)]
pub(crate) fn trailers_only(code: Code) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::empty());
    response
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from(code as i32));
    response
}

/// The status in a response's headers (a trailers-only response).
pub(crate) fn header_status(response: &http::Response<tonic::body::Body>) -> Option<Code> {
    grpc_status(response.headers())
}

/// The code a tonic client reports for a response that ended with no
/// `grpc-status` at all (a proxy's or a plain HTTP server's answer), by
/// its HTTP status: gRPC's mapping (`doc/http-grpc-status-mapping.md`),
/// written out because tonic keeps its own (`infer_grpc_status`) private.
pub(crate) fn code_without_status(status: http::StatusCode) -> Code {
    match status {
        http::StatusCode::BAD_REQUEST => Code::Internal,
        http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        http::StatusCode::FORBIDDEN => Code::PermissionDenied,
        http::StatusCode::NOT_FOUND => Code::Unimplemented,
        http::StatusCode::TOO_MANY_REQUESTS
        | http::StatusCode::BAD_GATEWAY
        | http::StatusCode::SERVICE_UNAVAILABLE
        | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Tells a call's request body that the caller gave up on the response.
struct Abandon(Option<tokio::sync::oneshot::Sender<()>>);

impl Abandon {
    /// The response ended normally: nothing to cancel.
    fn disarm(&mut self) {
        self.0 = None;
    }

    fn fire(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        self.fire();
    }
}

pin_project! {
    /// A client's response body that holds the call to its deadline and
    /// cancels the call when it is given up on.
    ///
    /// - The deadline layer's timer covers only the wait for the response
    ///   headers; without this a stream whose server has sent its headers
    ///   and then stalls outlives its deadline forever (the interop case
    ///   `timeout_on_sleeping_server`). It fails with `DEADLINE_EXCEEDED`.
    /// - Dropped before its trailers (the caller cancelled), or expired, it
    ///   makes the request body fail with `CANCEL` ([`CancellableBody`]), so
    ///   the server gets RST_STREAM(CANCEL) at once. Without it hyper keeps
    ///   sending an abandoned bidirectional call's requests, and when the
    ///   caller then drops its request stream the server sees a half-close:
    ///   a normal end, not a cancellation (`cancel_after_first_response`).
    pub(crate) struct DeadlineBody<B> {
        #[pin]
        inner: B,
        // When the deadline passes; its timer is made only once the body
        // has to wait (a unary response is usually whole when first
        // polled, and an unpolled `Sleep` still costs a runtime handle).
        at: Option<tokio::time::Instant>,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        budget: std::time::Duration,
        expired: bool,
        abandon: Abandon,
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            match &frame {
                None => this.abandon.disarm(),
                Some(Ok(f)) if f.is_trailers() => this.abandon.disarm(),
                Some(Ok(_)) => {}
                Some(Err(_)) => this.abandon.fire(),
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some(at) = *this.at
            && this.sleep.is_none()
        {
            this.sleep.set(Some(tokio::time::sleep_until(at)));
        }
        if let Some(sleep) = this.sleep.as_mut().as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            *this.expired = true;
            this.abandon.fire();
            return Poll::Ready(Some(Ok(Frame::trailers(deadline_trailers(*this.budget)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The trailers a response ends with when its deadline passed first.
///
/// Trailers, not a body error: a proxy in front (the gateway) passes
/// DEADLINE_EXCEEDED on as such, where a body error would reach its caller
/// as an INTERNAL stream reset, and telemetry records the code.
fn deadline_trailers(budget: std::time::Duration) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(
        crate::headers::GRPC_STATUS,
        http::HeaderValue::from(tonic::Code::DeadlineExceeded as i32),
    );
    // Printable ASCII only, so no percent-encoding is needed.
    let message = format!(
        "the response did not end within the call's deadline of {} ms",
        budget.as_millis()
    );
    if let Ok(value) = http::HeaderValue::from_str(&message) {
        trailers.insert(crate::headers::GRPC_MESSAGE, value);
    }
    trailers
}

/// Response extension: the response's body is released at this instant
/// whether or not it is read ([`ReleasedBody`]), so a layer above that
/// sees it dropped unread after then knows the deadline ended the call,
/// not the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReleasedAt(pub(crate) tokio::time::Instant);

/// A response body released at its deadline whether or not it is read
/// (a call marked [`crate::deadline::ReleaseUnread`]).
///
/// A timer task of its own drops the inner body at the deadline, which
/// resets the stream upstream (its [`Abandon`] fires); a reader that comes
/// back gets `DEADLINE_EXCEEDED` trailers. A task, not the body's own timer:
/// a body nobody polls never sees its timer fire. The lock is taken by the
/// reader on every poll and by the task once, at the deadline, so it is
/// never waited on in practice.
pub(crate) struct ReleasedBody<B> {
    slot: std::sync::Arc<Slot<B>>,
    release: tokio::task::AbortHandle,
    budget: std::time::Duration,
    // The inner body ended (its trailers, its end or an error was read).
    ended: bool,
}

/// What a [`ReleasedBody`] shares with its release task.
struct Slot<B> {
    body: std::sync::Mutex<Option<Pin<Box<B>>>>,
    /// The reader parked on the body: dropping the body wakes nobody (h2
    /// wakes only its connection task), so the release wakes the reader.
    reader: futures::task::AtomicWaker,
}

impl<B: Body + Send + 'static> ReleasedBody<B> {
    pub(crate) fn new(inner: B, at: tokio::time::Instant, budget: std::time::Duration) -> Self {
        let slot = std::sync::Arc::new(Slot {
            body: std::sync::Mutex::new(Some(Box::pin(inner))),
            reader: futures::task::AtomicWaker::new(),
        });
        let weak = std::sync::Arc::downgrade(&slot);
        let release = tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(slot) = weak.upgrade() {
                let unread = lock(&slot.body).take();
                // After the take: a reader registers under the lock, so it
                // either saw the body gone or is woken here.
                slot.reader.wake();
                // Dropped outside the lock: the drop resets the stream.
                drop(unread);
            }
        })
        .abort_handle();
        Self {
            slot,
            release,
            budget,
            ended: false,
        }
    }
}

/// The slot's lock; a panic elsewhere while it was held leaves a body that
/// is still safe to drop or poll.
fn lock<T>(slot: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<B> Drop for ReleasedBody<B> {
    fn drop(&mut self) {
        self.release.abort();
    }
}

impl<B> Body for ReleasedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let mut slot = lock(&this.slot.body);
        let Some(inner) = slot.as_mut() else {
            this.ended = true;
            return Poll::Ready(Some(Ok(Frame::trailers(deadline_trailers(this.budget)))));
        };
        let Poll::Ready(polled) = inner.as_mut().poll_frame(cx) else {
            this.slot.reader.register(cx.waker());
            return Poll::Pending;
        };
        if !matches!(&polled, Some(Ok(frame)) if frame.is_data()) {
            // Over: the task has nothing left to release.
            this.ended = true;
            let done = slot.take();
            drop(slot);
            drop(done);
            this.release.abort();
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || lock(&self.slot.body)
                .as_ref()
                .is_some_and(|inner| inner.is_end_stream())
    }
}

pin_project! {
    /// A client's request body that fails with the HTTP/2 error `CANCEL`
    /// once its response was given up on ([`DeadlineBody`]); hyper then
    /// resets the stream with that code.
    pub(crate) struct CancellableBody<B> {
        #[pin]
        inner: B,
        abandoned: Option<tokio::sync::oneshot::Receiver<()>>,
    }
}

impl<B> Body for CancellableBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Some(abandoned) = this.abandoned.as_mut() {
            match Pin::new(abandoned).poll(cx) {
                Poll::Ready(Ok(())) => {
                    *this.abandoned = None;
                    let cancel: crate::BoxError = Box::new(h2::Error::from(h2::Reason::CANCEL));
                    return Poll::Ready(Some(Err(cancel)));
                }
                // The response ended normally.
                Poll::Ready(Err(_)) => *this.abandoned = None,
                Poll::Pending => {}
            }
        }
        let frame = ready!(this.inner.poll_frame(cx));
        // The response may have been given up on while the inner body was
        // polled (another thread dropped both halves at once): a reset, not
        // an end of stream the server would take for a finished request.
        if frame.is_none()
            && let Some(mut abandoned) = this.abandoned.take()
            && abandoned.try_recv().is_ok()
        {
            let cancel: crate::BoxError = Box::new(h2::Error::from(h2::Reason::CANCEL));
            return Poll::Ready(Some(Err(cancel)));
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Client layer under the deadline layer: holds the whole response body,
/// not only its headers, to the `grpc-timeout` the deadline layer set, and
/// cancels the call (RST_STREAM `CANCEL`) when its response is dropped
/// unfinished or expires ([`DeadlineBody`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct BodyDeadlineLayer;

impl<S> tower::Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyDeadline { inner }
    }
}

/// The service made by [`BodyDeadlineLayer`].
#[derive(Clone, Debug)]
pub(crate) struct BodyDeadline<S> {
    inner: S,
}

impl<S, RB> tower::Service<http::Request<tonic::body::Body>> for BodyDeadline<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<crate::BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BodyDeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let budget = crate::deadline::header_timeout(req.headers());
        // The deadline layer's own instant when it set one: no clock read,
        // and the body ends exactly at the call's deadline.
        let at = match req.extensions().get::<crate::deadline::CallExpiry>() {
            Some(expiry) if budget.is_some() => Some(expiry.0),
            _ => budget.map(|b| tokio::time::Instant::now() + b),
        };
        let release_unread = req
            .extensions()
            .get::<crate::deadline::ReleaseUnread>()
            .is_some();
        let (abandon, abandoned) = tokio::sync::oneshot::channel();
        let req = req.map(|inner| {
            tonic::body::Body::new(CancellableBody {
                inner,
                abandoned: Some(abandoned),
            })
        });
        BodyDeadlineFuture {
            inner: self.inner.call(req),
            armed: Some((at, budget.unwrap_or_default(), abandon)),
            release_unread,
        }
    }
}

pin_project! {
    /// Response future of [`BodyDeadline`]: the inner one's response with
    /// its body held to the deadline. A named future, not a boxed one:
    /// every call goes through it.
    pub(crate) struct BodyDeadlineFuture<F> {
        #[pin]
        inner: F,
        // When the deadline passes, the budget (for the message), and
        // the request body's cancel switch. Dropped unsent (the call
        // failed or was dropped before its headers), it cancels nothing.
        armed: Option<(
            Option<tokio::time::Instant>,
            std::time::Duration,
            tokio::sync::oneshot::Sender<()>,
        )>,
        // Released at the deadline even unread (`deadline::ReleaseUnread`).
        release_unread: bool,
    }
}

impl<F, RB, E> Future for BodyDeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<crate::BoxError>,
{
    type Output = Result<http::Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let (at, budget, abandon) = this.armed.take().expect("polled after completion");
        // A trailers-only answer (END_STREAM on its headers) holds no
        // stream worth a release task.
        let release_at = at.filter(|_| *this.release_unread && !response.body().is_end_stream());
        let mut response = response;
        if let Some(at) = release_at {
            response.extensions_mut().insert(ReleasedAt(at));
        }
        Poll::Ready(Ok(response.map(|inner| {
            let body = DeadlineBody {
                inner,
                at,
                sleep: None,
                budget,
                expired: false,
                abandon: Abandon(Some(abandon)),
            };
            match release_at {
                Some(at) => tonic::body::Body::new(ReleasedBody::new(body, at, budget)),
                None => tonic::body::Body::new(body),
            }
        })))
    }
}

/// What a server answers when a call's deadline passes.
fn deadline_exceeded(budget: std::time::Duration) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("the call's deadline of {budget:?} passed"))
}

/// The one timer of a server call with a deadline, shared by the wait for
/// the handler and its response body: created only when one of them has
/// to wait (a handler that answers at once and a body that is ready when
/// polled need none), and moved from the first to the second, so a call
/// registers at most one timer in tokio's wheel (a registration and its
/// removal each take the wheel's lock, which every worker shares).
struct CallTimer {
    at: tokio::time::Instant,
    budget: std::time::Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl CallTimer {
    /// Whether the deadline has passed; if not, `cx` is woken when it does.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let at = self.at;
        self.sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }
}

pin_project! {
    /// A server's response body that, once the call's deadline passes,
    /// ends with trailers saying `DEADLINE_EXCEEDED` (dropping the
    /// handler's stream, which cancels it), as the reference servers do.
    pub(crate) struct ServerDeadlineBody<B> {
        #[pin]
        inner: B,
        timer: CallTimer,
        done: bool,
    }
}

impl<B> Body for ServerDeadlineBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.timer.poll_expired(cx) {
            *this.done = true;
            let status = deadline_exceeded(this.timer.budget);
            let trailers = status.into_http::<()>().into_parts().0.headers;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A server's request body on which the client's cancellation is an
    /// error. tonic's decoder turns a request stream that fails with
    /// `CANCELLED` (the client's RST_STREAM(CANCEL)) into a clean end of
    /// stream, so a handler took a cancelled upload for a complete one
    /// (the interop case `cancel_after_first_response` against a mesh
    /// server). The cancellation reaches the handler as `UNKNOWN` with a
    /// message saying so, the one code tonic lets through.
    pub(crate) struct CancelVisibleBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B> Body for CancelVisibleBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx).map(|frame| {
            frame.map(|f| {
                f.map_err(|e| {
                    let status = tonic::Status::from_error(e.into());
                    if status.code() == Code::Cancelled {
                        tonic::Status::unknown(format!(
                            "the client cancelled the call ({})",
                            status.message()
                        ))
                    } else {
                        status
                    }
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Server layer: captures a call's `grpc-timeout` for the calls its
/// handler makes and holds the call to it.
///
/// - The inbound deadline, cut to a maximum so a caller cannot hand the
///   whole chain behind this server a deadline of its choosing, is scoped
///   around the handler (as [`crate::deadline::InboundDeadlineLayer`]
///   does; one layer here so the header is read once per call).
/// - A call still running when its `grpc-timeout` passes ends with
///   `DEADLINE_EXCEEDED`, whether the handler has not answered yet or is
///   streaming its response, as gRPC's reference servers do. Without it
///   tonic answers a late handler with `CANCELLED` ("Timeout expired") and
///   never ends a stream whose handler stalls. One timer covers both
///   ([`CallTimer`]).
///
/// It also makes a client's cancellation visible to the handler
/// ([`CancelVisibleBody`]).
///
/// The deadline is taken 1 ms early so this answer, not tonic's own timer
/// around the same call, is the one sent; the caller's deadline began
/// before the request crossed the network, so the server still ends the
/// call no earlier than the caller gives up.
#[derive(Clone, Debug)]
pub(crate) struct ServerDeadlineLayer {
    max_inbound: std::time::Duration,
}

impl ServerDeadlineLayer {
    /// Propagates inbound deadlines of at most `max_inbound` from arrival.
    pub(crate) fn new(max_inbound: std::time::Duration) -> Self {
        Self { max_inbound }
    }
}

impl<S> tower::Layer<S> for ServerDeadlineLayer {
    type Service = ServerDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerDeadline {
            inner,
            max_inbound: self.max_inbound,
        }
    }
}

/// The service made by [`ServerDeadlineLayer`].
#[derive(Clone, Debug)]
pub(crate) struct ServerDeadline<S> {
    inner: S,
    max_inbound: std::time::Duration,
}

impl<S, B> tower::Service<http::Request<B>> for ServerDeadline<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ServerDeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let budget = crate::deadline::header_timeout(req.headers());
        let req = req.map(|inner| tonic::body::Body::new(CancelVisibleBody { inner }));
        let fut = self.inner.call(req);
        let Some(budget) = budget else {
            return ServerDeadlineFuture {
                inner: Some(Either::Right(fut)),
                timer: None,
            };
        };
        let now = tokio::time::Instant::now();
        let inherited = now + budget.min(self.max_inbound);
        let early = budget.saturating_sub(std::time::Duration::from_millis(1));
        ServerDeadlineFuture {
            inner: Some(Either::Left(crate::deadline::scope_inbound(inherited, fut))),
            timer: Some(CallTimer {
                at: now + early,
                budget,
                sleep: None,
            }),
        }
    }
}

pin_project! {
    /// Response future of [`ServerDeadline`]: the handler's answer (with
    /// its body held to the deadline), or `DEADLINE_EXCEEDED` once the
    /// deadline passes first. A named future, not a boxed one: every call
    /// goes through it.
    pub(crate) struct ServerDeadlineFuture<F> {
        // `None` once the deadline passed: the handler is dropped, which
        // cancels it.
        #[pin]
        inner: Option<Either<tokio::task::futures::TaskLocalFuture<tokio::time::Instant, F>, F>>,
        timer: Option<CallTimer>,
    }
}

impl<F, E> Future for ServerDeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let inner = this
            .inner
            .as_mut()
            .as_pin_mut()
            .expect("polled after completion");
        if let Poll::Ready(result) = inner.poll(cx) {
            this.inner.set(None);
            let response = result?;
            return Poll::Ready(Ok(match this.timer.take() {
                None => response,
                Some(timer) => response.map(|inner| {
                    tonic::body::Body::new(ServerDeadlineBody {
                        inner,
                        timer,
                        done: false,
                    })
                }),
            }));
        }
        if let Some(timer) = this.timer.as_mut()
            && timer.poll_expired(cx)
        {
            this.inner.set(None);
            return Poll::Ready(Ok(deadline_exceeded(timer.budget).into_http()));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod shed_tests {
    use super::*;

    #[test]
    fn tonic_s_connection_shed_is_recognised_as_it_arrives_percent_encoded() {
        // As tonic writes it on the wire: the message percent-encoded.
        let response = tonic::Status::resource_exhausted(TONIC_CONNECTION_SHED).into_http();
        let raw = response.headers().get("grpc-message").unwrap();
        assert_ne!(raw, TONIC_CONNECTION_SHED, "encoded on the wire: {raw:?}");
        assert!(is_marked_shed(&response));
        // A service's own refusal, unmarked, is not shedding.
        let refusal = tonic::Status::resource_exhausted("too many login attempts").into_http();
        assert!(!is_marked_shed(&refusal));
        let mut marked = trailers_only(Code::ResourceExhausted);
        marked
            .headers_mut()
            .insert(SHED_HEADER, http::HeaderValue::from_static("1"));
        assert!(is_marked_shed(&marked));
    }
}

#[cfg(test)]
mod released_tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::Duration,
    };

    use http_body_util::BodyExt;

    use super::*;

    /// A body that never yields (its server stalls, or it is never read)
    /// and records being dropped.
    struct Held(Arc<AtomicBool>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Body for Held {
        type Data = Bytes;
        type Error = crate::BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_body_is_released_at_its_deadline_and_then_reads_as_expired() {
        let dropped = Arc::new(AtomicBool::new(false));
        let at = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut body = ReleasedBody::new(Held(dropped.clone()), at, Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(1999)).await;
        assert!(
            !dropped.load(Ordering::SeqCst),
            "released before the deadline"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        // Nobody polled the body; its task released it.
        assert!(
            dropped.load(Ordering::SeqCst),
            "still held after the deadline"
        );
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "4");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_parked_on_the_body_is_woken_by_the_release() {
        let dropped = Arc::new(AtomicBool::new(false));
        let at = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut body = ReleasedBody::new(Held(dropped.clone()), at, Duration::from_secs(2));
        // The inner body never wakes anyone; only the release can.
        let (woken, waker) = futures_test_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(dropped.load(Ordering::SeqCst));
        assert!(
            woken.load(Ordering::SeqCst),
            "the parked reader was never woken"
        );
        let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) else {
            panic!("a woken reader finds the trailers");
        };
        assert_eq!(frame.into_trailers().unwrap()["grpc-status"], "4");
    }

    /// A waker that records being woken.
    fn futures_test_waker() -> (Arc<AtomicBool>, std::task::Waker) {
        struct Flag(Arc<AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let woken = Arc::new(AtomicBool::new(false));
        (woken.clone(), Arc::new(Flag(woken)).into())
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_read_to_its_end_is_passed_on_whole_and_not_released_later() {
        let at = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let inner = http_body_util::StreamBody::new(futures::stream::iter([
            Ok::<_, crate::BoxError>(Frame::data(Bytes::from_static(b"answer"))),
            Ok(Frame::trailers(trailers)),
        ]));
        let mut body = ReleasedBody::new(inner, at, Duration::from_secs(2));
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, "answer");
        let end = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(end["grpc-status"], "0");
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Past the deadline: ended, not expired.
        assert!(body.frame().await.is_none());
    }
}
