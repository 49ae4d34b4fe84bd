use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::Either;
use http::HeaderValue;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Timeout};
use tower::{Layer, Service};

use super::{INBOUND_DEADLINE, grpc_timeout_header, inbound_deadline};
use crate::{BoxError, headers::GRPC_TIMEOUT};

/// The default timeout of a call, by gRPC path.
pub type TimeoutPolicy = Arc<dyn Fn(&str) -> Duration + Send + Sync>;

/// The default and the longest deadline of a call, by gRPC path.
pub type DeadlinePolicy = Arc<dyn Fn(&str) -> CallDeadline + Send + Sync>;

pub use crate::config::DEFAULT_MAX_TIMEOUT;

/// What bounds one call's deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallDeadline {
    /// The deadline of a call that has neither its own nor an inherited one.
    pub default: Duration,
    /// The longest deadline the call may have from now, whoever asked for
    /// a longer one.
    pub max: Duration,
}

/// The instant a call's deadline passes, as a request extension that
/// [`DeadlineLayer`] sets on every call it sends on.
///
/// The layers below read it to send each attempt with the time actually
/// left (the retry layer rewrites `grpc-timeout` from it for every retry
/// and hedge), so a server is never told it has longer than the caller
/// will wait. Only the deadline layer's own value counts: it overwrites any
/// a caller set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallExpiry(pub Instant);

impl CallExpiry {
    /// `grpc-timeout` for an attempt sent now: the time left, 0 if none.
    pub fn header_value(&self) -> HeaderValue {
        grpc_timeout_header(self.0.saturating_duration_since(Instant::now()))
    }
}

/// Client layer: gives every call a deadline, sends it as `grpc-timeout`, and
/// fails the call with `DEADLINE_EXCEEDED` when it passes.
///
/// The deadline is the earliest of the call's own (`grpc-timeout`, as
/// `Request::set_timeout` sets it) and the inherited inbound one; with
/// neither, the method's default from now. Whichever it is, it is cut to
/// the method's maximum from now (a [`CallDeadline`] request extension,
/// when a layer above set one, instead of the policy's): the explicit and the inherited deadline
/// may come from an outside caller (`grpc-timeout: 99999999H` through a
/// gateway), and must not override what the mesh config allows.
#[derive(Clone)]
pub struct DeadlineLayer {
    policy: DeadlinePolicy,
}

impl std::fmt::Debug for DeadlineLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineLayer").finish_non_exhaustive()
    }
}

impl DeadlineLayer {
    /// A layer whose calls without a deadline get `default`; no call gets
    /// more than [`DEFAULT_MAX_TIMEOUT`] or `default`, whichever is longer.
    pub fn new(default: Duration) -> Self {
        let max = default.max(DEFAULT_MAX_TIMEOUT);
        Self::with_limits(Arc::new(move |_: &str| CallDeadline { default, max }))
    }

    /// A layer whose calls without a deadline get `policy(path)`; no call
    /// gets more than [`DEFAULT_MAX_TIMEOUT`] or its default, whichever is
    /// longer.
    pub fn with_policy(policy: TimeoutPolicy) -> Self {
        Self::with_limits(Arc::new(move |path: &str| {
            let default = policy(path);
            CallDeadline {
                default,
                max: default.max(DEFAULT_MAX_TIMEOUT),
            }
        }))
    }

    /// A layer whose calls get the default and the maximum `policy(path)`.
    pub fn with_limits(policy: DeadlinePolicy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    policy: DeadlinePolicy,
}

impl<S, B, RB> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let now = Instant::now();
        // A layer above may have decided this call's limits (the mesh's
        // router, for a route's timeout).
        let limits = match req.extensions().get::<CallDeadline>() {
            Some(limits) => *limits,
            None => (self.policy)(req.uri().path()),
        };
        // Cut before adding: `99999999H` from now is no instant to compute with.
        let explicit =
            crate::deadline::header_timeout(req.headers()).map(|d| now + d.min(limits.max));
        let deadline = match (explicit, inbound_deadline()) {
            (Some(a), Some(b)) => a.min(b),
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => now + limits.default,
        }
        .min(now + limits.max);
        let budget = deadline.saturating_duration_since(now);
        if budget.is_zero() {
            return DeadlineFuture {
                state: State::Expired,
                budget,
            };
        }
        req.headers_mut()
            .insert(GRPC_TIMEOUT, grpc_timeout_header(budget));
        req.extensions_mut().insert(CallExpiry(deadline));
        DeadlineFuture {
            state: State::Running {
                fut: tokio::time::timeout_at(deadline, self.inner.call(req)),
            },
            budget,
        }
    }
}

pin_project! {
    /// Response future of [`Deadline`].
    pub struct DeadlineFuture<F> {
        #[pin]
        state: State<F>,
        budget: Duration,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] fut: Timeout<F> },
        Expired,
    }
}

impl<F, T, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Expired => Poll::Ready(Err(tonic::Status::deadline_exceeded(
                "deadline expired before the call was sent",
            )
            .into())),
            StateProj::Running { fut } => match fut.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(result)) => Poll::Ready(result.map_err(Into::into)),
                Poll::Ready(Err(_elapsed)) => {
                    Poll::Ready(Err(tonic::Status::deadline_exceeded(format!(
                        "no response within the call's deadline of {:?}",
                        this.budget
                    ))
                    .into()))
                }
            },
        }
    }
}

/// Server layer: captures the inbound `grpc-timeout` so outbound calls made
/// while handling the request inherit the remaining time, cut to a
/// maximum so a caller cannot hand the whole chain behind this server a
/// deadline of its choosing.
///
/// Only what is propagated is cut; the `grpc-timeout` header itself is left
/// as it came (tonic's server honours it for the handler, which only ever
/// makes the call end sooner).
#[derive(Clone, Debug)]
pub struct InboundDeadlineLayer {
    max: Duration,
}

impl Default for InboundDeadlineLayer {
    /// Inbound deadlines cut to [`DEFAULT_MAX_TIMEOUT`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_TIMEOUT)
    }
}

impl InboundDeadlineLayer {
    /// Propagates inbound deadlines of at most `max` from arrival.
    pub fn new(max: Duration) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for InboundDeadlineLayer {
    type Service = InboundDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InboundDeadline {
            inner,
            max: self.max,
        }
    }
}

/// The service made by [`InboundDeadlineLayer`].
#[derive(Clone, Debug)]
pub struct InboundDeadline<S> {
    inner: S,
    max: Duration,
}

impl<S, B> Service<http::Request<B>> for InboundDeadline<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<tokio::task::futures::TaskLocalFuture<Instant, S::Future>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout =
            crate::deadline::header_timeout(req.headers()).map(|timeout| timeout.min(self.max));
        let fut = self.inner.call(req);
        match timeout {
            Some(timeout) => Either::Left(INBOUND_DEADLINE.scope(Instant::now() + timeout, fut)),
            None => Either::Right(fut),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tower::ServiceExt;

    use super::*;

    const HUGE: &str = "99999999H";

    /// A backend that never answers and remembers the `grpc-timeout` it got.
    fn black_hole() -> (
        Arc<Mutex<Option<Duration>>>,
        tower::util::BoxCloneSyncService<http::Request<()>, http::Response<()>, BoxError>,
    ) {
        let seen = Arc::new(Mutex::new(None));
        let sink = seen.clone();
        let svc = tower::service_fn(move |req: http::Request<()>| {
            *sink.lock().unwrap() = crate::deadline::header_timeout(req.headers());
            futures::future::pending::<Result<http::Response<()>, BoxError>>()
        });
        (seen, tower::util::BoxCloneSyncService::new(svc))
    }

    fn limits(default: Duration, max: Duration) -> DeadlineLayer {
        DeadlineLayer::with_limits(Arc::new(move |_: &str| CallDeadline { default, max }))
    }

    fn request(timeout: Option<&str>) -> http::Request<()> {
        let mut req = http::Request::builder().uri("/a.S/M").body(()).unwrap();
        if let Some(t) = timeout {
            req.headers_mut()
                .insert(GRPC_TIMEOUT, HeaderValue::from_str(t).unwrap());
        }
        req
    }

    /// Runs one call against a black hole; returns the `grpc-timeout` sent
    /// and how long (in paused tokio time) until DEADLINE_EXCEEDED.
    async fn cut_after(layer: DeadlineLayer, req: http::Request<()>) -> (Duration, Duration) {
        let (seen, backend) = black_hole();
        let start = Instant::now();
        let err = layer.layer(backend).oneshot(req).await.unwrap_err();
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
        let sent = seen.lock().unwrap().expect("grpc-timeout sent");
        (sent, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_explicit_deadline_is_cut_to_the_maximum() {
        let max = Duration::from_secs(5);
        let layer = limits(Duration::from_secs(1), max);
        let (sent, waited) = cut_after(layer, request(Some(HUGE))).await;
        assert!(sent <= max, "sent {sent:?}");
        assert_eq!(waited, max);
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_inherited_deadline_is_cut_to_the_maximum() {
        let max = Duration::from_secs(5);
        let far = Instant::now() + Duration::from_secs(10 * 365 * 86_400);
        let (sent, waited) = super::super::with_deadline(
            far,
            cut_after(limits(Duration::from_secs(1), max), request(None)),
        )
        .await;
        assert!(sent <= max, "sent {sent:?}");
        assert_eq!(waited, max);
    }

    #[tokio::test(start_paused = true)]
    async fn a_default_over_the_maximum_is_cut_too() {
        let max = Duration::from_secs(2);
        let (sent, waited) = cut_after(limits(Duration::from_secs(60), max), request(None)).await;
        assert!(sent <= max, "sent {sent:?}");
        assert_eq!(waited, max);
    }

    #[tokio::test(start_paused = true)]
    async fn shorter_deadlines_are_kept() {
        let layer = limits(Duration::from_secs(10), Duration::from_secs(30));
        let (_, waited) = cut_after(layer.clone(), request(Some("2S"))).await;
        assert_eq!(waited, Duration::from_secs(2));
        let inherited = Instant::now() + Duration::from_secs(3);
        let (_, waited) =
            super::super::with_deadline(inherited, cut_after(layer.clone(), request(Some(HUGE))))
                .await;
        assert_eq!(waited, Duration::from_secs(3));
        let (_, waited) = cut_after(layer, request(None)).await;
        assert_eq!(waited, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn the_legacy_constructors_cap_at_30s() {
        let (sent, waited) = cut_after(
            DeadlineLayer::new(Duration::from_secs(1)),
            request(Some(HUGE)),
        )
        .await;
        assert!(sent <= DEFAULT_MAX_TIMEOUT, "sent {sent:?}");
        assert_eq!(waited, DEFAULT_MAX_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_server_propagates_at_most_its_maximum() {
        let max = Duration::from_secs(30);
        let handler = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, BoxError>(super::super::remaining())
        });
        let server = InboundDeadlineLayer::new(max).layer(handler);
        let left = server.clone().oneshot(request(Some(HUGE))).await.unwrap();
        assert_eq!(left, Some(max));
        let left = server.clone().oneshot(request(Some("5S"))).await.unwrap();
        assert_eq!(left, Some(Duration::from_secs(5)));
        let left = server.oneshot(request(None)).await.unwrap();
        assert_eq!(left, None, "no inbound deadline, none invented");
    }

    /// The deadline layer over a `tower-test` mock, with limits 10 s / 30 s.
    fn over_mock() -> (
        Deadline<tower_test::mock::Mock<http::Request<()>, http::Response<()>>>,
        tower_test::mock::Handle<http::Request<()>, http::Response<()>>,
    ) {
        let (mock, handle) = tower_test::mock::pair();
        let layer = limits(Duration::from_secs(10), Duration::from_secs(30));
        (layer.layer(mock), handle)
    }

    fn sent_timeout(req: &http::Request<()>) -> Duration {
        crate::deadline::header_timeout(req.headers()).expect("grpc-timeout sent")
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_inherits_what_is_left_of_the_inbound_deadline_and_expires_with_it() {
        let (svc, mut handle) = over_mock();
        let start = Instant::now();
        let inbound = start + Duration::from_secs(3);
        let call = tokio::spawn(super::super::with_deadline(inbound, async move {
            // A second of the handler's own work first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            svc.oneshot(request(None)).await
        }));
        let (req, _never_answered) = handle.next_request().await.unwrap();
        assert_eq!(sent_timeout(&req), Duration::from_secs(2), "what is left");
        let err = call.await.unwrap().unwrap_err();
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(3),
            "at the inbound deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_inherited_deadline_has_passed_is_never_sent() {
        let (svc, mut handle) = over_mock();
        let past = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        let err = super::super::with_deadline(past, svc.clone().oneshot(request(Some("5S"))))
            .await
            .unwrap_err();
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status.message().contains("before the call was sent"),
            "{status}"
        );
        let next = tokio::time::timeout(Duration::from_secs(1), handle.next_request()).await;
        assert!(next.is_err(), "nothing reached the service below");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_within_the_deadline_passes_through_untouched() {
        let (svc, mut handle) = over_mock();
        let call = tokio::spawn(svc.oneshot(request(Some("500m"))));
        let (req, answer) = handle.next_request().await.unwrap();
        assert_eq!(sent_timeout(&req), Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(499)).await;
        answer.send_response(http::Response::builder().status(200).body(()).unwrap());
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
}
