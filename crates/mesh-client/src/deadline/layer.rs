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

use super::{INBOUND_DEADLINE, decode_grpc_timeout, encode_grpc_timeout, inbound_deadline};
use crate::BoxError;

const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The default timeout of a call, by gRPC path.
pub type TimeoutPolicy = Arc<dyn Fn(&str) -> Duration + Send + Sync>;

/// Client layer: gives every call a deadline, sends it as `grpc-timeout`, and
/// fails the call with `DEADLINE_EXCEEDED` when it passes.
///
/// The deadline is the earliest of the call's own (`Request::set_timeout`)
/// and the inherited inbound one; with neither, the method's default from now.
#[derive(Clone)]
pub struct DeadlineLayer {
    default: TimeoutPolicy,
}

impl std::fmt::Debug for DeadlineLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineLayer").finish_non_exhaustive()
    }
}

impl DeadlineLayer {
    /// A layer whose calls without a deadline get `default`.
    pub fn new(default: Duration) -> Self {
        Self::with_policy(Arc::new(move |_: &str| default))
    }

    /// A layer whose calls without a deadline get `policy(path)`.
    pub fn with_policy(policy: TimeoutPolicy) -> Self {
        Self { default: policy }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            default: self.default.clone(),
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    default: TimeoutPolicy,
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
        let explicit = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(decode_grpc_timeout)
            .map(|d| now + d);
        let deadline = match (explicit, inbound_deadline()) {
            (Some(a), Some(b)) => a.min(b),
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => now + (self.default)(req.uri().path()),
        };
        let budget = deadline.saturating_duration_since(now);
        if budget.is_zero() {
            return DeadlineFuture {
                state: State::Expired,
                budget,
            };
        }
        let value = HeaderValue::try_from(encode_grpc_timeout(budget))
            .expect("an encoded timeout is ASCII");
        req.headers_mut().insert(GRPC_TIMEOUT, value);
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
/// while handling the request inherit the remaining time.
#[derive(Clone, Debug, Default)]
pub struct InboundDeadlineLayer;

impl<S> Layer<S> for InboundDeadlineLayer {
    type Service = InboundDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InboundDeadline { inner }
    }
}

/// The service made by [`InboundDeadlineLayer`].
#[derive(Clone, Debug)]
pub struct InboundDeadline<S> {
    inner: S,
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
        let timeout = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(decode_grpc_timeout);
        let fut = self.inner.call(req);
        match timeout {
            Some(timeout) => Either::Left(INBOUND_DEADLINE.scope(Instant::now() + timeout, fut)),
            None => Either::Right(fut),
        }
    }
}
