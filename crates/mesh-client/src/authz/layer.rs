//! The authorization layer of a mesh server: strips claimed-identity
//! headers, then allows, audits or denies each call by the policy
//! ([`super::AuthorizationPolicy`]) in force at that call.

use std::{
    collections::HashSet,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use tonic::body::Body;
use tower::{Layer, Service};

use super::{AuthorizationPolicy, AuthzMode, IDENTITY_HEADERS, REFUSED_BY_HEADER};
use crate::{
    config::ConfigHandle, methods::RpcPath, telemetry::metrics::Metrics, tls::io::PeerInfo,
};

/// Where a server's policy comes from.
#[derive(Clone, Debug)]
pub(crate) enum PolicySource {
    /// Fixed when the server was built (`None`: no authorization).
    Fixed(Option<Arc<AuthorizationPolicy>>),
    /// The `authorization` of a mesh's live config, read at each call
    /// (a lock-free-in-practice read lock and an `Arc` clone, no allocation).
    Live(ConfigHandle),
}

impl Default for PolicySource {
    fn default() -> Self {
        PolicySource::Fixed(None)
    }
}

/// Server layer: strips claimed-identity headers and enforces the policy.
#[derive(Clone, Debug)]
pub(crate) struct AuthzLayer {
    policy: PolicySource,
    // Paths the server serves: denials of others are counted as `unknown`.
    known: Arc<HashSet<String>>,
    metrics: Metrics,
}

impl AuthzLayer {
    /// Denials are counted in `metrics`.
    pub(crate) fn new(policy: PolicySource, known: Arc<HashSet<String>>, metrics: Metrics) -> Self {
        Self {
            policy,
            known,
            metrics,
        }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

impl<S, B> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        for header in IDENTITY_HEADERS {
            req.headers_mut().remove(*header);
        }
        let method = req.uri().path().trim_start_matches('/');
        let caller = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.as_ref())
            .map(|id| id.as_str());
        tracing::debug!(caller = caller.unwrap_or("-"), method, "inbound call");
        let live;
        let policy = match &self.layer.policy {
            PolicySource::Fixed(policy) => policy.as_deref(),
            PolicySource::Live(config) => {
                live = config.load();
                live.authorization.as_ref()
            }
        };
        let Some(policy) = policy else {
            return Either::Right(self.inner.call(req));
        };
        if policy.allows(caller, method) {
            return Either::Right(self.inner.call(req));
        }
        let path = match self.layer.known.contains(req.uri().path()) {
            true => RpcPath::parse(req.uri().path()),
            false => RpcPath::unknown(),
        };
        self.layer
            .metrics
            .denied(&path, caller, policy.mode == AuthzMode::Audit);
        let who = caller.unwrap_or("an unauthenticated caller (no client certificate identity)");
        match policy.mode {
            AuthzMode::Audit => {
                tracing::warn!(caller = who, method, "authorization audit: would deny");
                Either::Right(self.inner.call(req))
            }
            AuthzMode::Enforce => {
                tracing::info!(caller = who, method, "authorization denied");
                let status = tonic::Status::permission_denied(format!(
                    "{who} is not allowed to call {method}"
                ));
                let mut response: http::Response<Body> = status.into_http();
                response.headers_mut().insert(
                    REFUSED_BY_HEADER,
                    http::HeaderValue::from_static("authorization"),
                );
                Either::Left(ready(Ok(response)))
            }
        }
    }
}
