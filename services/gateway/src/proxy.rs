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
use shop_kit::token::{CLIENT_HEADER, VERIFIED_SUBJECT_HEADER};
use tonic::{Status, body::Body};
use tower::{Service, ServiceExt};

use crate::{
    keys::KeyCache,
    recommend::{RECOMMEND_PATH, Recommender},
    routes::{AuthMode, RouteTable},
};

/// Per-caller request rate limit.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Requests allowed at once above the sustained rate.
    pub burst: NonZeroU32,
    /// Calls a caller may have in flight at once, each counted until its
    /// answer is read to its end or dropped: a rate does not bound what a
    /// caller holds (calls it never reads, watches, request bodies it
    /// never finishes), and what it holds is upstream streams, buffered
    /// answers and the shared connections' windows.
    pub in_flight: NonZeroU32,
}

/// Calls in flight per caller key (see [`RateLimit::in_flight`]).
#[derive(Default)]
struct InFlight {
    calls: std::sync::Mutex<HashMap<String, u32>>,
}

impl InFlight {
    /// A slot for one more call of `caller`, or `None` at `limit`.
    fn admit(self: &Arc<Self>, caller: &str, limit: NonZeroU32) -> Option<Slot> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        match calls.get_mut(caller) {
            Some(count) if *count >= limit.get() => return None,
            Some(count) => *count += 1,
            None => {
                calls.insert(caller.to_owned(), 1);
            }
        }
        Some(Slot {
            table: self.clone(),
            caller: caller.to_owned(),
        })
    }
}

/// One call counted in flight until dropped.
struct Slot {
    table: Arc<InFlight>,
    caller: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut calls = self.table.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = calls.get_mut(&self.caller) {
            *count -= 1;
            // Idle callers cost no memory.
            if *count == 0 {
                calls.remove(&self.caller);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An answer that holds its call's slots until it is read to its end
    /// or dropped.
    struct Counted<B> {
        #[pin]
        inner: B,
        slots: Vec<Slot>,
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The proxy service (cheap to clone).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    routes: RouteTable,
    upstreams: HashMap<&'static str, MeshChannel>,
    /// Channels of their own for calls answered with a stream (see
    /// [`Gateway::with_stream_upstreams`]); by upstream name.
    stream_upstreams: HashMap<&'static str, MeshChannel>,
    keys: KeyCache,
    limiter: DefaultKeyedRateLimiter<String>,
    limit: RateLimit,
    in_flight: Arc<InFlight>,
    trusted: Vec<IpNet>,
    /// Answers Recommend itself, with a fallback (see [`crate::recommend`]).
    recommender: Option<Recommender>,
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
                stream_upstreams: HashMap::new(),
                keys,
                limiter: RateLimiter::keyed(quota),
                limit,
                in_flight: Arc::default(),
                trusted,
                recommender: None,
            }),
        }
    }

    /// Answers routed `Recommend` calls with `recommender` (an optional
    /// dependency with a fallback) instead of forwarding them.
    pub fn with_recommender(mut self, recommender: Recommender) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("set before the gateway is cloned")
            .recommender = Some(recommender);
        self
    }

    /// Sends calls answered with a stream (`WatchOrder`) over `upstreams`
    /// (by upstream name), channels of their own, instead of the ones unary
    /// calls share. A watch may live for minutes, and a server admits only
    /// so many streams per connection: over a shared connection, a few
    /// dozen accounts watching orders would hold every stream of it and
    /// leave `PlaceOrder` waiting. An upstream without one here uses the
    /// shared channel.
    pub fn with_stream_upstreams(mut self, upstreams: HashMap<&'static str, MeshChannel>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("set before the gateway is cloned")
            .stream_upstreams = upstreams;
        self
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
            let mut slots = Vec::with_capacity(2);
            Ok(match inner.forward(req, &mut slots).await {
                // The slots go with the answer: held until it is read or dropped.
                Ok(response) if !slots.is_empty() => {
                    response.map(|inner| Body::new(Counted { inner, slots }))
                }
                Ok(response) => response,
                Err(status) => status.into_http(),
            })
        })
    }
}

impl Inner {
    /// Who the end client is, for rate limiting here and in auth: the TCP
    /// peer, or the client a trusted proxy names in `x-forwarded-for` (see
    /// [`forwarded_client`]), as [`client_key`] spells it.
    fn client_key<B>(&self, req: &http::Request<B>) -> String {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote_addr)
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let hops = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            // A header that is not text is garbage: walking stops there.
            .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
            .collect::<Vec<_>>();
        client_key(forwarded_client(peer, &hops, &self.trusted))
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

    /// Takes one of `caller`'s in-flight slots into `slots`, or refuses.
    fn admit(&self, caller: &str, slots: &mut Vec<Slot>) -> Result<(), Status> {
        let limit = self.limit.in_flight;
        let slot = self.in_flight.admit(caller, limit).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{caller} already has {limit} calls in flight through the gateway, the most allowed; retry once one has finished"
            ))
        })?;
        slots.push(slot);
        Ok(())
    }

    async fn forward(
        &self,
        mut req: http::Request<Body>,
        slots: &mut Vec<Slot>,
    ) -> Result<http::Response<Body>, Status> {
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
        let address = self.client_key(&req);
        // Only what the allow-list names goes in: a client's `x-canary`,
        // mesh metadata, trace context and its own claims of who the user
        // is (`x-verified-subject`) or where it calls from (`x-shop-client`)
        // are dropped; the gateway sets the last two itself.
        crate::headers::filter_request(req.headers_mut());
        debug_assert!(!req.headers().contains_key(VERIFIED_SUBJECT_HEADER));
        // Auth limits logins per end client with it (trusting it only from
        // the gateway's identity). A key is always a valid header value.
        if let Ok(value) = http::HeaderValue::from_str(&address) {
            req.headers_mut().insert(CLIENT_HEADER, value);
        }
        // The address's bucket first, before any token work: one client's
        // flood (good tokens or bad) is throttled before it costs a
        // signature check or waits on a key refresh.
        self.check(&address)?;
        self.admit(&address, slots)?;
        match route.auth {
            AuthMode::Required => {
                let header = req.headers().get(http::header::AUTHORIZATION);
                // A header that is not text reads as a malformed one.
                let verified =
                    match shop_kit::bearer_token(header.map(|v| v.to_str().unwrap_or(""))) {
                        Ok(token) => self.keys.verify(token).await,
                        Err(status) => Err(status),
                    };
                let claims = verified?;
                let value = http::HeaderValue::from_str(&claims.sub).map_err(|_| {
                    Status::unauthenticated("the token's subject is not a valid header value")
                })?;
                req.headers_mut().insert(VERIFIED_SUBJECT_HEADER, value);
                // Both buckets: the address's (taken above), so one client
                // with many accounts gets no more than one address's share,
                // and the user's, so one account spread over many addresses
                // does not either.
                let user = format!("user {}", claims.sub);
                self.check(&user)?;
                self.admit(&user, slots)?;
            }
            AuthMode::None => {}
        }
        if let Some(recommender) = self.recommender.as_ref().filter(|_| path == RECOMMEND_PATH) {
            return Ok(crate::headers::filter_response(
                recommender.serve(req).await,
            ));
        }
        let channel = route
            .streams
            .then(|| self.stream_upstreams.get(route.upstream))
            .flatten()
            .or_else(|| self.upstreams.get(route.upstream))
            .expect("routes name only configured upstreams")
            .clone();
        // The outside caller reads the answer at its own pace, or never:
        // the upstream stream is released at the deadline either way, so
        // one caller that stops reading cannot hold streams of the
        // connection every caller shares.
        req.extensions_mut()
            .insert(mesh_client::deadline::ReleaseUnread);
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
        // Only what the allow-list names comes out (`mesh-*` never).
        Ok(crate::headers::filter_response(response))
    }
}

/// The end client of a call that `peer` sent with `x-forwarded-for` hops
/// `hops` (left to right, as the header lists them).
///
/// Only a peer in `trusted` is believed, and then the list is walked from
/// the right, each hop having been written by the one after it: a trusted
/// proxy's hop is believed and walking goes on, the first untrusted hop is
/// the client. Walking stops at the first hop that is not an address (a
/// forged or mangled entry), so the client is then the last good hop
/// reached and never an address to the left of garbage. A hop may carry a
/// port (`1.2.3.4:5678`, `[::1]:80`), which is dropped; IPv4-mapped IPv6
/// addresses (`::ffff:1.2.3.4`) are their IPv4 address, so they do not all
/// share one IPv6 /64.
pub fn forwarded_client(peer: IpAddr, hops: &[&str], trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = canonical(peer);
    if !is_trusted(&client) {
        return client;
    }
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// One `x-forwarded-for` entry as an address, without its port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })?;
    Some(canonical(ip))
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The rate-limit key of a client address: IPv4 clients per address, IPv6
/// clients per /64, which one host can otherwise fill with addresses.
pub fn client_key(client: IpAddr) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_peer() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            forwarded_client(ip("198.51.100.1"), &["203.0.113.7"], &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &["203.0.113.7"], &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &[], &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn walks_from_the_right_through_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client's own claim (leftmost) is not believed past an
        // untrusted hop.
        let hops = ["1.1.1.1", "203.0.113.7", "10.0.0.2"];
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &hops, &trusted),
            ip("203.0.113.7")
        );
        // All hops trusted: the leftmost one is where the call came from.
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &["10.0.0.3", "10.0.0.2"], &trusted),
            ip("10.0.0.3")
        );
    }

    #[test]
    fn garbage_stops_the_walk_and_never_names_an_address_left_of_it() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        // Before the fix "unknown" was skipped and the attacker's
        // 192.0.2.66 became the client.
        for garbage in ["unknown", "", "not-an-ip", "1.2.3", "[::1", "1.2.3.4:x"] {
            assert_eq!(
                forwarded_client(peer, &["192.0.2.66", garbage], &trusted),
                peer,
                "{garbage:?}"
            );
            assert_eq!(
                forwarded_client(peer, &["192.0.2.66", garbage, "10.0.0.2"], &trusted),
                ip("10.0.0.2"),
                "{garbage:?} behind a trusted hop"
            );
            assert_eq!(
                forwarded_client(peer, &[garbage, "203.0.113.7"], &trusted),
                ip("203.0.113.7"),
                "{garbage:?} left of the client is never reached"
            );
        }
    }

    #[test]
    fn ports_are_stripped() {
        let trusted = nets(&["10.0.0.0/8", "fd00::/8"]);
        let peer = ip("10.0.0.1");
        assert_eq!(
            forwarded_client(peer, &["1.2.3.4:5678"], &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(
            forwarded_client(peer, &["[2001:db8::1]:80"], &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            forwarded_client(peer, &["[2001:db8::1]"], &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            forwarded_client(peer, &[" 1.2.3.4 ", " 10.0.0.9:443"], &trusted),
            ip("1.2.3.4"),
            "a trusted hop with a port is still trusted"
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        let a = forwarded_client(peer, &["::ffff:192.0.2.1"], &trusted);
        let b = forwarded_client(peer, &["::ffff:192.0.2.2"], &trusted);
        assert_eq!(a, ip("192.0.2.1"));
        assert_ne!(client_key(a), client_key(b), "not one ::/64 bucket");
        // A mapped peer is matched against IPv4 trusted ranges too.
        assert_eq!(
            forwarded_client(ip("::ffff:10.0.0.1"), &["203.0.113.7"], &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(client_key(a), "address 192.0.2.1");
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        assert_eq!(
            client_key(ip("2001:db8:1:2:3:4:5:6")),
            "network 2001:db8:1:2::/64"
        );
    }
}
