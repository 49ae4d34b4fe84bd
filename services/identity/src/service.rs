//! `mesh.identity.v1.IdentityService`: token in, certificate out.

use std::{
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _,
};
use mesh_client::tls::{PeerInfo, SpiffeId};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};
use shop_api::identity::v1::{
    CertifyRequest, CertifyResponse, identity_service_server::IdentityService as Api,
};
use tonic::{Request, Response, Status};

use crate::{ca::IssuingCa, tokens::TokenVerifier};

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// At most 10 refusals a second are logged (bursts of 20); all are counted.
const REFUSALS_LOGGED: Quota =
    Quota::per_second(NonZeroU32::new(10).unwrap()).allow_burst(NonZeroU32::new(20).unwrap());

/// A per-key rate: `per_second` sustained, bursts of `burst`.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Largest burst.
    pub burst: NonZeroU32,
}

/// How the service issues.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Trust domain of issued identities.
    pub trust_domain: String,
    /// Lifetime of issued certificates.
    pub ttl: Duration,
    /// `notBefore` is this far in the past, for clocks behind ours.
    pub backdate: Duration,
    /// Certify calls per identity (after the token is verified).
    pub per_identity: Rate,
    /// Certify calls per client address (before any token work).
    pub per_address: Rate,
    /// Identities never issued, whatever token asks: the service's own
    /// (whoever held it could pose as the identity service and collect
    /// every workload's token) and the operator's (all-access in every
    /// policy, and kept out of the cluster).
    pub reserved: Vec<SpiffeId>,
}

/// The issuing CA must outlive an issued leaf by this much: a CA this
/// close to expiry could only issue certificates already about to die.
const CA_EXPIRY_FLOOR: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuedLabels {
    spiffe_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

struct Metrics {
    issued: Family<IssuedLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    duration: Histogram,
}

fn metrics() -> &'static Metrics {
    static METRICS: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| {
        let m = Metrics {
            issued: Family::default(),
            refused: Family::default(),
            duration: Histogram::new(
                [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0],
            ),
        };
        mesh_client::telemetry::metrics().register(|r| {
            r.register(
                "identity_certificates_issued",
                "Workload certificates issued, by SPIFFE ID",
                m.issued.clone(),
            );
            r.register(
                "identity_certify_refused",
                "Certify calls refused, by reason (token, csr, rate_limited, too_large, keys_unavailable)",
                m.refused.clone(),
            );
            r.register(
                "identity_certify_duration_seconds",
                "Time to verify the token and sign, per issued certificate",
                m.duration.clone(),
            );
        });
        m
    })
}

/// The service.
pub struct IdentityService {
    ca: Arc<IssuingCa>,
    tokens: Arc<TokenVerifier>,
    policy: Policy,
    by_identity: DefaultKeyedRateLimiter<String>,
    by_address: DefaultKeyedRateLimiter<String>,
    /// Refusals are logged for the audit trail, at most this often, so a
    /// flood of bad requests cannot flood the log.
    refusal_log: DefaultDirectRateLimiter,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl IdentityService {
    /// A service signing with `ca` for tokens `tokens` accepts.
    pub fn new(ca: Arc<IssuingCa>, tokens: Arc<TokenVerifier>, policy: Policy) -> Arc<Self> {
        let quota = |r: Rate| Quota::per_second(r.per_second).allow_burst(r.burst);
        let _ = metrics();
        Arc::new(Self {
            ca,
            tokens,
            by_identity: RateLimiter::keyed(quota(policy.per_identity)),
            by_address: RateLimiter::keyed(quota(policy.per_address)),
            refusal_log: RateLimiter::direct(REFUSALS_LOGGED),
            policy,
        })
    }

    /// Forgets rate-limit state of idle keys, so the maps stay bounded by
    /// the callers of the last few seconds.
    pub fn prune(&self) {
        self.by_identity.retain_recent();
        self.by_address.retain_recent();
        self.by_identity.shrink_to_fit();
        self.by_address.shrink_to_fit();
    }

    fn refuse(reason: &'static str, status: Status) -> Status {
        metrics()
            .refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
        status
    }

    fn limited(
        limiter: &DefaultKeyedRateLimiter<String>,
        key: &str,
        what: &str,
    ) -> Result<(), Status> {
        limiter.check_key(&key.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            let secs = wait.as_secs().max(1);
            let mut status = Status::resource_exhausted(format!(
                "too many certificate requests for {what}; retry in {secs} s"
            ));
            if let Ok(value) = secs.to_string().parse() {
                status.metadata_mut().insert("retry-after", value);
            }
            Self::refuse("rate_limited", status)
        })
    }

    /// Certify, for the caller at `address` (its IP, the pre-auth limit key).
    pub async fn certify(
        &self,
        address: &str,
        csr: &[u8],
        token: &str,
    ) -> Result<CertifyResponse, Status> {
        let result = self.certify_checked(address, csr, token).await;
        if let Err(status) = &result
            && self.refusal_log.check().is_ok()
        {
            tracing::info!(
                caller = %address,
                code = ?status.code(),
                "refused a Certify call: {}",
                status.message()
            );
        }
        result
    }

    async fn certify_checked(
        &self,
        address: &str,
        csr: &[u8],
        token: &str,
    ) -> Result<CertifyResponse, Status> {
        let started = Instant::now();
        Self::limited(&self.by_address, address, &format!("address {address}"))?;
        if csr.is_empty() {
            return Err(Self::refuse(
                "csr",
                Status::invalid_argument(
                    "csr is empty; send a DER PKCS#10 certificate signing request",
                ),
            ));
        }
        if csr.len() > MAX_CSR_BYTES {
            return Err(Self::refuse(
                "too_large",
                Status::invalid_argument(format!(
                    "csr is {} bytes; at most {MAX_CSR_BYTES}",
                    csr.len()
                )),
            ));
        }
        if token.is_empty() {
            return Err(Self::refuse(
                "token",
                Status::unauthenticated(
                    "token is empty; send the workload's projected ServiceAccount token",
                ),
            ));
        }
        if self.tokens.key_count() == 0 {
            // A cold start that could not reach the issuer's keys yet.
            self.tokens.refresh_if_due().await;
            if self.tokens.key_count() == 0 {
                return Err(Self::refuse(
                    "keys_unavailable",
                    Status::unavailable(
                        "the identity service has not loaded the token issuer's keys yet; retry shortly",
                    ),
                ));
            }
        }
        let proven = self
            .tokens
            .verify(token)
            .await
            .map_err(|e| Self::refuse("token", Status::unauthenticated(e.0)))?;
        let identity = SpiffeId::workload(
            &self.policy.trust_domain,
            &proven.namespace,
            &proven.service_account,
        )
        .map_err(|e| {
            Self::refuse(
                "token",
                Status::unauthenticated(format!(
                    "the token's namespace/serviceaccount make no SPIFFE ID: {e}"
                )),
            )
        })?;
        if self.policy.reserved.contains(&identity) {
            tracing::warn!(%identity, caller = %address, "refused a token for a reserved identity");
            return Err(Self::refuse(
                "reserved",
                Status::permission_denied(format!(
                    "{identity} is reserved and never issued by the identity service; \
                     use a ServiceAccount of its own for this workload"
                )),
            ));
        }
        Self::limited(&self.by_identity, identity.as_str(), identity.as_str())?;
        if self.ca.not_after() <= SystemTime::now() + CA_EXPIRY_FLOOR {
            tracing::error!(
                "the issuing CA expires within {CA_EXPIRY_FLOOR:?}; issuing nothing until it is rotated (docs/identity.md)"
            );
            return Err(Self::refuse(
                "ca_expired",
                Status::failed_precondition(
                    "the identity service's issuing CA has expired or is about to; an operator must rotate it",
                ),
            ));
        }
        let signed = self
            .ca
            .sign(csr, &identity, self.policy.ttl, self.policy.backdate)
            .map_err(|e| Self::refuse("csr", Status::invalid_argument(e.0)))?;
        let not_after = signed
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        metrics()
            .issued
            .get_or_create(&IssuedLabels {
                spiffe_id: identity.to_string(),
            })
            .inc();
        metrics().duration.observe(started.elapsed().as_secs_f64());
        tracing::info!(
            %identity,
            serial = %signed.serial,
            not_after,
            caller = %address,
            "certificate issued"
        );
        Ok(CertifyResponse {
            spiffe_id: identity.to_string(),
            certificate_chain: signed.chain,
            not_after_unix_seconds: not_after,
            serial: signed.serial,
        })
    }
}

/// The gRPC face of an [`IdentityService`].
#[derive(Clone, Debug)]
pub struct Grpc(pub Arc<IdentityService>);

#[tonic::async_trait]
impl Api for Grpc {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let address = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote_addr)
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "unknown".into());
        let request = request.into_inner();
        self.0
            .certify(&address, &request.csr, &request.token)
            .await
            .map(Response::new)
    }
}
