//! The gateway's one service: every call that reaches it is checked
//! against the route table, authenticated and rate limited as its route
//! says, and forwarded over the mesh to the service that owns it.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    num::NonZeroU32,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use ipnet::IpNet;
use mesh_client::{MeshChannel, tls::PeerInfo};
use orders::VERIFIED_SUBJECT_HEADER;
use tonic::{Status, body::Body};
use tower::{Service, ServiceExt};

use crate::{
    keys::KeyCache,
    routes::{AuthMode, RouteTable},
};

/// Per-caller request rate limit.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Requests allowed at once above the sustained rate.
    pub burst: NonZeroU32,
}

/// The proxy service (cheap to clone).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    routes: RouteTable,
    upstreams: HashMap<&'static str, MeshChannel>,
    keys: KeyCache,
    limiter: DefaultKeyedRateLimiter<String>,
    limit: RateLimit,
    trusted: Vec<IpNet>,
}

impl Gateway {
    /// A gateway sending routed calls to `upstreams` (by upstream name),
    /// believing `x-forwarded-for` only from `trusted` proxies.
    pub fn new(
        routes: RouteTable,
        upstreams: HashMap<&'static str, MeshChannel>,
        keys: KeyCache,
        limit: RateLimit,
        trusted: Vec<IpNet>,
    ) -> Self {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        Self {
            inner: Arc::new(Inner {
                routes,
                upstreams,
                keys,
                limiter: RateLimiter::keyed(quota),
                limit,
                trusted,
            }),
        }
    }

    /// Forgets callers idle long enough to have a full bucket again, so the
    /// limiter's memory follows the active callers, not all callers ever.
    pub fn forget_idle_callers(&self) {
        self.inner.limiter.retain_recent();
        self.inner.limiter.shrink_to_fit();
    }

    /// The key cache, to refresh it in the background.
    pub fn keys(&self) -> &KeyCache {
        &self.inner.keys
    }
}

impl Service<http::Request<Body>> for Gateway {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            Ok(inner
                .forward(req)
                .await
                .unwrap_or_else(|status| status.into_http()))
        })
    }
}

impl Inner {
    /// Who an anonymous caller is for rate limiting: the TCP peer, or the
    /// client a trusted proxy names in `x-forwarded-for` (the rightmost
    /// address that is not itself a trusted proxy). IPv6 clients count per
    /// /64, which one host can otherwise fill with addresses.
    fn client_key<B>(&self, req: &http::Request<B>) -> String {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote_addr)
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let trusted = |ip: &IpAddr| self.trusted.iter().any(|net| net.contains(ip));
        let mut client = peer;
        if trusted(&peer) {
            let forwarded: Vec<IpAddr> = req
                .headers()
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|a| a.trim().parse().ok())
                .collect();
            if let Some(first_untrusted) = forwarded.iter().rev().find(|ip| !trusted(ip)) {
                client = *first_untrusted;
            }
        }
        match client {
            IpAddr::V4(v4) => format!("address {v4}"),
            IpAddr::V6(v6) => {
                let net = ipnet::Ipv6Net::new(v6, 64)
                    .expect("64 is a valid prefix")
                    .trunc();
                format!("network {net}")
            }
        }
    }

    /// Takes one request from `caller`'s bucket, or says when to retry.
    fn check(&self, caller: &str) -> Result<(), Status> {
        self.limiter
            .check_key(&caller.to_owned())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                rate_limited(caller, self.limit, wait)
            })
    }

    async fn forward(&self, mut req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let path = req.uri().path().to_owned();
        let method = path.trim_start_matches('/');
        let Some(route) = self.routes.get(&path).cloned() else {
            return Err(if self.routes.is_known(&path) {
                Status::permission_denied(format!(
                    "{method} is internal to the shop and not reachable through the gateway"
                ))
            } else {
                Status::unimplemented(format!("the gateway does not serve {method}"))
            });
        };
        // Only the gateway says who the user is; a caller's own claim is dropped.
        req.headers_mut().remove(VERIFIED_SUBJECT_HEADER);
        let address = self.client_key(&req);
        let caller = match route.auth {
            AuthMode::Required => {
                let header = req.headers().get(http::header::AUTHORIZATION);
                // A header that is not text reads as a malformed one.
                let verified =
                    match shop_kit::bearer_token(header.map(|v| v.to_str().unwrap_or(""))) {
                        Ok(token) => self.keys.verify(token).await,
                        Err(status) => Err(status),
                    };
                let claims = match verified {
                    Ok(claims) => claims,
                    Err(status) => {
                        // Refused tokens count against the sender's address,
                        // so a flood of bad tokens is throttled too.
                        self.check(&address)?;
                        return Err(status);
                    }
                };
                let value = http::HeaderValue::from_str(&claims.sub).map_err(|_| {
                    Status::unauthenticated("the token's subject is not a valid header value")
                })?;
                req.headers_mut().insert(VERIFIED_SUBJECT_HEADER, value);
                format!("user {}", claims.sub)
            }
            AuthMode::None => address,
        };
        self.check(&caller)?;
        let channel = self
            .upstreams
            .get(route.upstream)
            .expect("routes name only configured upstreams")
            .clone();
        let response = channel
            .oneshot(req)
            .await
            .map_err(|e| for_outside(route.upstream, method, e))?;
        if let Some(by) = response
            .headers()
            .get(mesh_client::authz::REFUSED_BY_HEADER)
        {
            // The upstream's mesh refused the gateway itself (its policy
            // does not list the gateway): a fault of the shop, and the
            // denial names the gateway's identity.
            let detail = response.headers().get("grpc-message");
            tracing::warn!(
                upstream = route.upstream,
                method,
                ?by,
                ?detail,
                "the upstream's mesh refused the gateway"
            );
            return Err(Status::internal(format!(
                "{} could not serve the call; this is a fault of the shop, not of the call",
                route.upstream
            )));
        }
        Ok(response)
    }
}

/// A mesh or transport failure as an outside caller sees it: its code and
/// a generic message. The mesh's own message names pod addresses, targets
/// and SPIFFE identities, which stay in the gateway's log. (A status the
/// upstream service answered with is a response, not an error, and passes
/// through unchanged.)
fn for_outside(upstream: &str, method: &str, error: mesh_client::BoxError) -> Status {
    let status = Status::from_error(error);
    match status.code() {
        // Mostly the caller's own doing (its deadline, its hang-up), and
        // counted in the metrics: not a line per call an outsider can force.
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            tracing::debug!(upstream, method, code = ?status.code(), "call into the mesh failed: {}", status.message())
        }
        _ => {
            tracing::warn!(upstream, method, code = ?status.code(), "call into the mesh failed: {}", status.message())
        }
    }
    let message = match status.code() {
        tonic::Code::DeadlineExceeded => {
            format!("{upstream} did not answer within the call's deadline")
        }
        tonic::Code::Cancelled => format!("the call to {upstream} was cancelled"),
        tonic::Code::ResourceExhausted => format!("{upstream} is overloaded; retry shortly"),
        _ => format!("{upstream} is temporarily unavailable; retry shortly"),
    };
    Status::new(status.code(), message)
}

/// `RESOURCE_EXHAUSTED` with when to come back, in the standard
/// `retry-after` (seconds) and gRPC's `grpc-retry-pushback-ms`.
fn rate_limited(caller: &str, limit: RateLimit, wait: Duration) -> Status {
    let mut status = Status::resource_exhausted(format!(
        "rate limit of {}/s (burst {}) exceeded for {caller}; retry in {} ms",
        limit.per_second,
        limit.burst,
        wait.as_millis().max(1)
    ));
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if let Ok(v) = seconds.max(1).to_string().parse() {
        status.metadata_mut().insert("retry-after", v);
    }
    if let Ok(v) = wait.as_millis().max(1).to_string().parse() {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    status
}
