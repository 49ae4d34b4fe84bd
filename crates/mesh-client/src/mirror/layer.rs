//! The client's mirroring layer: copies a share of calls to a shadow
//! service, fire-and-forget, by a [`MirrorPolicy`].
//!
//! # Why the primary call cannot notice
//!
//! - The copy runs on a task of its own and its answer is read to the end
//!   and thrown away; the primary call never waits for it, and an error or
//!   a hang of the shadow reaches nothing but the metrics.
//! - Copies in flight are bounded by a semaphore of `maxInFlight` permits
//!   taken with `try_acquire`: a call that finds none is simply not copied
//!   (`dropped`), never queued behind a slow shadow.
//! - A copy lives at most the call's own deadline (its `grpc-timeout`) or
//!   [`MAX_COPY_DURATION`], whichever is shorter, so a shadow that hangs
//!   holds a permit for that long and no longer.
//! - Only a request body that fits `maxReplayBytes` is copied, buffered
//!   once and shared (`Bytes`), so a large upload costs neither memory nor
//!   time; a larger one goes to the primary as it came (`too_large`).
//! - Only methods the contracts declare `NO_SIDE_EFFECTS` are copied
//!   (unary or server-streaming, never client-streaming, never a method in
//!   no registered descriptor), unless the policy says `allowSideEffects`.
//!
//! The copy carries the primary's headers (its deadline and trace context)
//! plus [`MIRROR_HEADER`], less the caller's credentials
//! ([`super::DEFAULT_STRIPPED_HEADERS`] unless `keepHeaders` names them)
//! and whatever `stripHeaders` names, and none of its extensions.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{
    TryFutureExt,
    future::{BoxFuture, Either, ErrInto},
};
use http::HeaderValue;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tonic::{Code, body::Body};
use tower::{Layer, Service, ServiceExt, util::BoxCloneSyncService};

use super::MirrorPolicy;
use crate::{
    BoxError,
    fault::layer::roll,
    methods::MethodTable,
    retry::body::{Buffered, buffer},
    telemetry::metrics::Metrics,
};

/// The header every copy carries (defined beside the policy that needs it).
pub use super::MIRROR_HEADER;

/// The longest a copy may run when the call has no deadline of its own
/// (30 s, the mesh's default `maxTimeout`).
pub const MAX_COPY_DURATION: Duration = Duration::from_secs(30);

/// The shadow service, boxed: a [`crate::MeshChannel`] to the mirror's
/// target in a mesh, any HTTP service in a test.
type Shadow = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>;

/// Client layer copying a share of calls to a shadow service.
///
/// One layer is one mirror: its semaphore bounds the copies of every
/// service it makes.
#[derive(Clone)]
pub struct MirrorLayer {
    policy: Arc<MirrorPolicy>,
    shadow: Shadow,
    methods: Arc<MethodTable>,
    max_replay_bytes: usize,
    in_flight: Arc<Semaphore>,
    /// Request headers removed from every copy (resolved once).
    stripped: Arc<[http::HeaderName]>,
    peer: Arc<str>,
    metrics: Metrics,
}

impl std::fmt::Debug for MirrorLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorLayer")
            .field("policy", &self.policy)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl MirrorLayer {
    /// Copies calls by `policy` (validated by the caller, as the config
    /// does) to `shadow`, buffering at most `max_replay_bytes` of a request
    /// body; `methods` says which methods have no side effects. Outcomes
    /// are counted in `metrics` under the peer name `policy.target` (see
    /// [`MirrorLayer::named`]).
    pub fn new<S>(
        policy: MirrorPolicy,
        shadow: S,
        methods: Arc<MethodTable>,
        max_replay_bytes: usize,
        metrics: Metrics,
    ) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let in_flight = Arc::new(Semaphore::new(policy.max_in_flight.max(1) as usize));
        Self {
            peer: Arc::from(policy.target.as_str()),
            stripped: policy.stripped_headers().into(),
            policy: Arc::new(policy),
            shadow: BoxCloneSyncService::new(shadow.map_err(Into::into)),
            methods,
            max_replay_bytes,
            in_flight,
            metrics,
        }
    }

    /// Names the shadow `peer` in metrics.
    pub fn named(mut self, peer: &str) -> Self {
        self.peer = Arc::from(peer);
        self
    }

    /// Whether calls of `path` may be copied at all.
    fn eligible(&self, path: &str) -> bool {
        match self.methods.get(path) {
            None => false,
            Some(info) if info.client_streaming => false,
            Some(_) => self.policy.allow_side_effects || self.methods.has_no_side_effects(path),
        }
    }
}

impl<S> Layer<S> for MirrorLayer {
    type Service = Mirror<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Mirror {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

/// The service made by [`MirrorLayer`].
#[derive(Clone)]
pub struct Mirror<S> {
    inner: S,
    layer: Arc<MirrorLayer>,
}

impl<S> std::fmt::Debug for Mirror<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl<S> Service<http::Request<Body>> for Mirror<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Either<
        ErrInto<S::Future, BoxError>,
        BoxFuture<'static, Result<http::Response<Body>, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let layer = &self.layer;
        if !roll(layer.policy.percentage) {
            return Either::Left(self.inner.call(req).err_into());
        }
        if !layer.eligible(req.uri().path()) {
            layer.metrics.mirrored(&layer.peer, "ineligible");
            return Either::Left(self.inner.call(req).err_into());
        }
        // Drop, never queue: a busy shadow costs the call nothing.
        let Ok(permit) = layer.in_flight.clone().try_acquire_owned() else {
            layer.metrics.mirrored(&layer.peer, "dropped");
            return Either::Left(self.inner.call(req).err_into());
        };
        let inner = self.inner.clone();
        let layer = layer.clone();
        Either::Right(Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = match buffer(body, layer.max_replay_bytes).await {
                Err(status) => return Err(Box::new(status) as BoxError),
                Ok(Buffered::TooLarge(body)) => {
                    drop(permit);
                    layer.metrics.mirrored(&layer.peer, "too_large");
                    return inner
                        .oneshot(http::Request::from_parts(parts, body))
                        .await
                        .map_err(Into::into);
                }
                Ok(Buffered::Whole(bytes)) => bytes,
            };
            let mut copy = http::Request::builder()
                .method(parts.method.clone())
                .uri(parts.uri.clone())
                .version(parts.version)
                .body(Body::new(http_body_util::Full::new(bytes.clone())))
                .expect("parts of a valid request");
            *copy.headers_mut() = parts.headers.clone();
            for name in layer.stripped.iter() {
                copy.headers_mut().remove(name);
            }
            copy.headers_mut()
                .insert(MIRROR_HEADER, HeaderValue::from_static("true"));
            let limit = crate::deadline::header_timeout(&parts.headers)
                .map_or(MAX_COPY_DURATION, |d| d.min(MAX_COPY_DURATION));
            layer.metrics.mirrored(&layer.peer, "sent");
            let (shadow, peer, metrics) = (
                layer.shadow.clone(),
                layer.peer.clone(),
                layer.metrics.clone(),
            );
            tokio::spawn(async move {
                let _permit = permit;
                let outcome = tokio::time::timeout(limit, copy_to_end(shadow, copy)).await;
                if !matches!(outcome, Ok(Code::Ok)) {
                    tracing::debug!(shadow = %peer, ?outcome, "mirrored call failed (its answer is discarded either way)");
                    metrics.mirrored(&peer, "failed");
                }
            });
            let primary =
                http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
            inner.oneshot(primary).await.map_err(Into::into)
        }))
    }
}

/// Sends the copy and reads its answer to the end (so the shadow sees a
/// finished call, not a cancelled one), keeping only its status.
async fn copy_to_end(shadow: Shadow, copy: http::Request<Body>) -> Code {
    let response = match shadow.oneshot(copy).await {
        Ok(response) => response,
        Err(error) => {
            return crate::caused_by::<tonic::Status>(&*error)
                .map_or(Code::Unavailable, |s| s.code());
        }
    };
    let code_of = |headers: &http::HeaderMap| {
        headers
            .get(crate::headers::GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(Code::from_i32)
    };
    if let Some(code) = code_of(response.headers()) {
        return code;
    }
    let mut body = response.into_body();
    let mut code = Code::Unknown;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(found) = frame.trailers_ref().and_then(code_of) {
                    code = found;
                }
            }
            Err(_) => return Code::Unavailable,
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use tower_test::mock;

    use super::*;
    use crate::{endpoint::header_status, methods::MethodInfo};

    type Handle = mock::Handle<http::Request<Body>, http::Response<Body>>;
    type MockService = mock::Mock<http::Request<Body>, http::Response<Body>>;

    const READ: &str = "/t.S/Read";
    const WRITE: &str = "/t.S/Write";
    const UPLOAD: &str = "/t.S/Upload";

    fn methods() -> Arc<MethodTable> {
        let mut table = MethodTable::default();
        let info = |idempotent, client_streaming| MethodInfo {
            idempotent,
            client_streaming,
        };
        table.insert(READ, info(true, false));
        table.insert_no_side_effects(READ);
        table.insert(WRITE, info(false, false));
        table.insert(UPLOAD, info(false, true));
        Arc::new(table)
    }

    fn policy(percentage: f64, max_in_flight: u32, allow_side_effects: bool) -> MirrorPolicy {
        MirrorPolicy {
            target: "static:///127.0.0.1:1".into(),
            percentage,
            max_in_flight,
            allow_side_effects,
            strip_headers: Vec::new(),
            keep_headers: Vec::new(),
        }
    }

    fn request(path: &str, body: &'static [u8]) -> http::Request<Body> {
        let mut req = http::Request::builder()
            .uri(path)
            .body(Body::new(http_body_util::Full::new(
                bytes::Bytes::from_static(body),
            )))
            .unwrap();
        req.headers_mut()
            .insert("grpc-timeout", HeaderValue::from_static("1S"));
        req
    }

    fn ok() -> http::Response<Body> {
        let mut response = http::Response::new(Body::empty());
        response
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_static("0"));
        response
    }

    fn count(metrics: &Metrics, outcome: &str) -> u64 {
        metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with("mesh_client_mirrored_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    struct Bed {
        svc: Mirror<MockService>,
        primary: Handle,
        shadow: Handle,
        metrics: Metrics,
    }

    fn bed(policy: MirrorPolicy, max_replay_bytes: usize) -> Bed {
        let metrics = Metrics::new();
        let (primary_mock, primary) = mock::pair();
        let (shadow_mock, shadow) = mock::pair();
        let layer = MirrorLayer::new(
            policy,
            shadow_mock,
            methods(),
            max_replay_bytes,
            metrics.clone(),
        )
        .named("inventory-shadow");
        Bed {
            svc: layer.layer(primary_mock),
            primary,
            shadow,
            metrics,
        }
    }

    async fn body_of(req: http::Request<Body>) -> bytes::Bytes {
        req.into_body().collect().await.unwrap().to_bytes()
    }

    /// Nothing reaches `handle` for a minute of paused time.
    async fn nothing(handle: &mut Handle) {
        let next = tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await;
        assert!(!matches!(next, Ok(Some(_))), "a request too many");
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_goes_to_the_shadow_and_its_answer_is_discarded() {
        let mut bed = bed(policy(100.0, 4, false), 1024);
        let call = tokio::spawn(bed.svc.clone().oneshot(request(READ, b"\0\0\0\0\x01x")));
        let (primary, answer) = bed.primary.next_request().await.unwrap();
        assert!(primary.headers().get(MIRROR_HEADER).is_none());
        assert_eq!(&body_of(primary).await[..], b"\0\0\0\0\x01x");
        answer.send_response(ok());
        let response = call.await.unwrap().unwrap();
        assert_eq!(
            header_status(&response),
            Some(Code::Ok),
            "the primary's answer"
        );

        let (copy, answer) = bed.shadow.next_request().await.unwrap();
        assert_eq!(copy.uri().path(), READ);
        assert_eq!(copy.headers()[MIRROR_HEADER], "true");
        assert_eq!(copy.headers()["grpc-timeout"], "1S", "the call's deadline");
        assert_eq!(&body_of(copy).await[..], b"\0\0\0\0\x01x");
        answer.send_response(tonic::Status::internal("shadow broke").into_http());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(count(&bed.metrics, "sent"), 1);
        assert_eq!(
            count(&bed.metrics, "failed"),
            1,
            "the shadow's failure is only counted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_carries_no_credentials_unless_the_policy_keeps_them() {
        for (keep, expect_authorization) in [(vec![], false), (vec!["authorization"], true)] {
            let mut policy = policy(100.0, 4, false);
            policy.keep_headers = keep.iter().map(|s| s.to_string()).collect();
            policy.strip_headers = vec!["x-api-key".into()];
            let mut bed = bed(policy, 1024);
            let mut req = request(READ, b"\0\0\0\0\0");
            for (name, value) in [
                ("authorization", "Bearer secret"),
                ("cookie", "session=secret"),
                ("proxy-authorization", "Basic c2VjcmV0"),
                ("x-api-key", "secret"),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ] {
                req.headers_mut()
                    .append(name, HeaderValue::from_static(value));
            }
            req.headers_mut()
                .append("cookie", HeaderValue::from_static("second=secret"));
            let call = tokio::spawn(bed.svc.clone().oneshot(req));
            let (copy, answer) = bed.shadow.next_request().await.unwrap();
            answer.send_response(ok());
            let (primary, answer) = bed.primary.next_request().await.unwrap();
            answer.send_response(ok());
            call.await.unwrap().unwrap();
            let h = copy.headers();
            assert_eq!(
                h.contains_key("authorization"),
                expect_authorization,
                "{keep:?}"
            );
            for name in ["cookie", "proxy-authorization", "x-api-key"] {
                assert!(!h.contains_key(name), "{name} reached the shadow");
            }
            assert!(h.contains_key("traceparent") && h.contains_key("grpc-timeout"));
            let p = primary.headers();
            assert_eq!(
                p.get_all("cookie").iter().count(),
                2,
                "the primary keeps all"
            );
            assert!(p.contains_key("authorization") && p.contains_key("x-api-key"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_shadow_never_slows_the_primary_and_busy_copies_are_dropped_not_queued() {
        let mut bed = bed(policy(100.0, 1, false), 1024);
        for i in 0..3 {
            let started = tokio::time::Instant::now();
            let call = tokio::spawn(bed.svc.clone().oneshot(request(READ, b"\0\0\0\0\0")));
            let (_, answer) = bed.primary.next_request().await.unwrap();
            answer.send_response(ok());
            call.await.unwrap().unwrap();
            assert_eq!(
                started.elapsed(),
                Duration::ZERO,
                "call {i} waited for nothing"
            );
        }
        // The first copy hangs (its answer never sent) and holds the one
        // permit: the other two were dropped.
        let (_, hanging) = bed.shadow.next_request().await.unwrap();
        assert_eq!(count(&bed.metrics, "sent"), 1);
        assert_eq!(count(&bed.metrics, "dropped"), 2);

        // After the call's deadline (1 s) the copy is given up and its
        // permit returned: the next call is copied again.
        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert_eq!(count(&bed.metrics, "failed"), 1);
        drop(hanging);
        let call = tokio::spawn(bed.svc.clone().oneshot(request(READ, b"\0\0\0\0\0")));
        let (_, answer) = bed.primary.next_request().await.unwrap();
        answer.send_response(ok());
        call.await.unwrap().unwrap();
        let (_, answer) = bed.shadow.next_request().await.unwrap();
        answer.send_response(ok());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(count(&bed.metrics, "sent"), 2);
        assert_eq!(count(&bed.metrics, "failed"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shadow_error_changes_nothing_for_the_primary() {
        let mut bed = bed(policy(100.0, 4, false), 1024);
        let call = tokio::spawn(bed.svc.clone().oneshot(request(READ, b"\0\0\0\0\0")));
        let (_, answer) = bed.shadow.next_request().await.unwrap();
        answer.send_error(std::io::Error::other("connection reset"));
        let (_, answer) = bed.primary.next_request().await.unwrap();
        answer.send_response(ok());
        assert_eq!(header_status(&call.await.unwrap().unwrap()), Some(Code::Ok));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(count(&bed.metrics, "failed"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn only_side_effect_free_methods_are_copied_unless_the_policy_allows_more() {
        let mut bed = bed(policy(100.0, 4, false), 1024);
        for path in [WRITE, UPLOAD, "/t.S/Unknown"] {
            let call = tokio::spawn(bed.svc.clone().oneshot(request(path, b"\0\0\0\0\0")));
            let (_, answer) = bed.primary.next_request().await.unwrap();
            answer.send_response(ok());
            call.await.unwrap().unwrap();
        }
        nothing(&mut bed.shadow).await;
        assert_eq!(count(&bed.metrics, "ineligible"), 3);

        let mut bed = self::bed(policy(100.0, 4, true), 1024);
        for path in [WRITE, UPLOAD, "/t.S/Unknown"] {
            let call = tokio::spawn(bed.svc.clone().oneshot(request(path, b"\0\0\0\0\0")));
            let (_, answer) = bed.primary.next_request().await.unwrap();
            answer.send_response(ok());
            call.await.unwrap().unwrap();
        }
        let (copy, answer) = bed.shadow.next_request().await.unwrap();
        assert_eq!(
            copy.uri().path(),
            WRITE,
            "side effects allowed; streams and unknowns never"
        );
        answer.send_response(ok());
        nothing(&mut bed.shadow).await;
        assert_eq!(count(&bed.metrics, "ineligible"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_replay_limit_goes_to_the_primary_whole_and_is_not_copied() {
        let mut bed = bed(policy(100.0, 4, false), 4);
        let call = tokio::spawn(bed.svc.clone().oneshot(request(READ, b"\0\0\0\0\x03abc")));
        let (primary, answer) = bed.primary.next_request().await.unwrap();
        assert_eq!(&body_of(primary).await[..], b"\0\0\0\0\x03abc");
        answer.send_response(ok());
        call.await.unwrap().unwrap();
        nothing(&mut bed.shadow).await;
        assert_eq!(count(&bed.metrics, "too_large"), 1);
        assert_eq!(count(&bed.metrics, "sent"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_configured_share_is_copied() {
        // 4,000 calls at 5 %: within 6 sigma (sigma = 13.8) of 200.
        let mut bed = bed(policy(5.0, 4000, false), 1024);
        let primary = tokio::spawn(async move {
            while let Some((_, send)) = bed.primary.next_request().await {
                send.send_response(ok());
            }
        });
        let shadow = tokio::spawn(async move {
            let mut seen = 0;
            while let Some((_, send)) = bed.shadow.next_request().await {
                send.send_response(ok());
                seen += 1;
            }
            seen
        });
        for _ in 0..4000 {
            bed.svc
                .clone()
                .oneshot(request(READ, b"\0\0\0\0\0"))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let sent = count(&bed.metrics, "sent");
        drop(bed.svc);
        primary.await.unwrap();
        assert!((117..=283).contains(&sent), "{sent} of 4000 copied");
        assert_eq!(shadow.await.unwrap(), sent);
        assert_eq!(count(&bed.metrics, "failed"), 0);
    }
}
