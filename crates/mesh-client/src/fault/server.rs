//! The server's fault injection layer: the `serverFaults` of the live mesh
//! config, matched on the caller's verified SPIFFE ID and the method.
//!
//! This is what an in-process mesh can do that a client-side proxy rule
//! cannot: fault one caller's calls at the server, whatever client library
//! that caller uses, and leave every other caller untouched. It sits
//! innermost, after authorization (a denied call is not faulted) and
//! inside the call's deadline (a delay longer than the deadline ends
//! `DEADLINE_EXCEEDED` at the deadline). An abort is answered without
//! calling the service, marked with [`crate::fault::FAULT_HEADER`] so the
//! caller's mesh does not charge the endpoint with it.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either};
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt};

use super::layer::{abort_response, delay_within, roll};
use crate::{config::ConfigHandle, telemetry::metrics::Metrics, tls::io::PeerInfo};

/// Server layer applying the live config's `serverFaults`.
#[derive(Clone, Debug)]
pub(crate) struct ServerFaultLayer {
    config: ConfigHandle,
    metrics: Metrics,
}

impl ServerFaultLayer {
    /// Faults by the `serverFaults` `config` holds at each call, counted in
    /// `metrics`.
    pub(crate) fn new(config: ConfigHandle, metrics: Metrics) -> Self {
        Self { config, metrics }
    }
}

impl<S> Layer<S> for ServerFaultLayer {
    type Service = ServerFault<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerFault {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`ServerFaultLayer`].
#[derive(Clone, Debug)]
pub(crate) struct ServerFault<S> {
    inner: S,
    layer: ServerFaultLayer,
}

impl<S> Service<http::Request<Body>> for ServerFault<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let config = self.layer.config.load();
        if config.server_faults.is_empty() {
            return Either::Left(self.inner.call(req));
        }
        let method = req.uri().path().trim_start_matches('/');
        let caller = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.as_ref())
            .map(|id| id.as_str());
        let Some(rule) = config
            .server_faults
            .iter()
            .find(|rule| rule.matches(caller, method))
        else {
            return Either::Left(self.inner.call(req));
        };
        let delay = rule
            .delay
            .as_ref()
            .filter(|d| roll(d.percentage))
            .map(|d| d.fixed_delay);
        let abort = rule
            .abort
            .as_ref()
            .filter(|a| roll(a.percentage))
            .map(|a| a.grpc_status);
        if delay.is_none() && abort.is_none() {
            return Either::Left(self.inner.call(req));
        }
        let name: Arc<str> = Arc::from(rule.name.as_str());
        tracing::debug!(rule = %name, caller = caller.unwrap_or("-"), method, ?delay, ?abort, "injecting a server fault");
        let budget = crate::deadline::header_timeout(req.headers());
        let inner = self.inner.clone();
        let metrics = self.layer.metrics.clone();
        Either::Right(Box::pin(async move {
            if let Some(delay) = delay {
                metrics.server_fault(&name, "delay");
                if let Err(status) = delay_within(delay, budget).await {
                    return Ok(status.into_http());
                }
            }
            if let Some(code) = abort {
                metrics.server_fault(&name, "abort");
                // The rule's name stays in the metric and the log: callers
                // (outside ones too, through the gateway) see only that the
                // mesh injected the failure, not how the operator's rules read.
                return Ok(abort_response(code, "a serverFaults rule"));
            }
            inner.oneshot(req).await
        }))
    }
}
