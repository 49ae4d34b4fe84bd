//! Recommendations at the edge, as an optional dependency.
//!
//! `RecommendationsService/Recommend` is answered by the gateway itself:
//! after the route's token check and rate limits it asks the
//! recommendations service over the mesh within a small budget
//! (`--recommendations-budget-ms`, 50 ms by default) and, when that
//! service is slow, failing, ejected or absent, answers at once without
//! recommendations, `fallback: true`, counted in `mesh_fallbacks_total`
//! (see `mesh_client::optional`). A user's call never fails or waits
//! longer than the budget because of it, and after
//! [`BREAKER_OPEN_AFTER`] fallbacks in a row it is not asked at all for
//! [`BREAKER_OPEN_FOR`] (then one call probes it), so a hung or slow
//! service costs users nothing at all. The user is the token's subject,
//! never a value the caller sent.

use std::time::Duration;

use mesh_client::{MeshChannel, optional::Optional};
use shop_api::recommendations::v1::{
    RecommendRequest, RecommendResponse, RecordOrderRequest, RecordOrderResponse,
    recommendations_service_client::RecommendationsServiceClient,
    recommendations_service_server::{RecommendationsService, RecommendationsServiceServer},
};
use shop_kit::token::VERIFIED_SUBJECT_HEADER;
use tonic::{Request, Response, Status, body::Body};
use tower::ServiceExt;

/// The path the gateway answers itself.
pub const RECOMMEND_PATH: &str = "/mesh.recommendations.v1.RecommendationsService/Recommend";

/// Fallbacks in a row after which recommendations is not asked for a while.
pub const BREAKER_OPEN_AFTER: u32 = 5;
/// How long it is then not asked, before one call probes it.
pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(1);

/// Limits of a `RecommendRequest`, as the contract documents them.
const MAX_PRODUCTS: usize = 100;
const MAX_ID_CHARS: usize = 128;
const MAX_RESULTS: i32 = 20;

/// The gateway's `RecommendationsService` (cheap to clone).
#[derive(Clone)]
pub struct Recommender {
    client: RecommendationsServiceClient<MeshChannel>,
    optional: Optional,
}

impl Recommender {
    /// Asks the recommendations service on `channel` within `budget`.
    pub fn new(channel: MeshChannel, budget: Duration) -> Self {
        Self {
            client: RecommendationsServiceClient::new(channel),
            optional: Optional::new("recommendations", budget)
                .with_breaker(BREAKER_OPEN_AFTER, BREAKER_OPEN_FOR),
        }
    }

    /// Serves one routed call (an HTTP/2 gRPC request for
    /// [`RECOMMEND_PATH`] that passed the route's checks).
    pub async fn serve(&self, req: http::Request<Body>) -> http::Response<Body> {
        let Ok(response) = RecommendationsServiceServer::new(self.clone())
            .oneshot(req)
            .await;
        response
    }
}

/// Bad input is the caller's to fix: a precise status, not a fallback.
fn validate(request: &RecommendRequest) -> Result<(), Status> {
    let mut problems = Vec::new();
    if request.product_ids.len() > MAX_PRODUCTS {
        problems.push(format!(
            "product_ids: must list 0 to {MAX_PRODUCTS}, got {}",
            request.product_ids.len()
        ));
    }
    if let Some((i, id)) = request
        .product_ids
        .iter()
        .enumerate()
        .find(|(_, id)| id.is_empty() || id.chars().count() > MAX_ID_CHARS)
    {
        problems.push(format!(
            "product_ids[{i}]: must be 1 to {MAX_ID_CHARS} characters, got {}",
            id.chars().count()
        ));
    }
    if let Some((i, _)) = request
        .product_ids
        .iter()
        .enumerate()
        .find(|(_, id)| id.chars().any(char::is_control))
    {
        problems.push(format!(
            "product_ids[{i}]: must not contain control characters"
        ));
    }
    if !(0..=MAX_RESULTS).contains(&request.max_results) {
        problems.push(format!(
            "max_results: must be 0 to {MAX_RESULTS}, got {}",
            request.max_results
        ));
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(Status::invalid_argument(problems.join("; "))),
    }
}

#[tonic::async_trait]
impl RecommendationsService for Recommender {
    async fn recommend(
        &self,
        request: Request<RecommendRequest>,
    ) -> Result<Response<RecommendResponse>, Status> {
        // Set by the route's token check (a caller's own value was dropped).
        let user_id = request
            .metadata()
            .get(VERIFIED_SUBJECT_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("a valid token is required"))?
            .to_owned();
        let mut message = request.into_inner();
        validate(&message)?;
        message.user_id = user_id;
        let mut outbound = Request::new(message);
        // The callee stops working for a caller that has given up.
        outbound.set_timeout(self.optional.budget());
        let mut client = self.client.clone();
        match self
            .optional
            .call(RECOMMEND_PATH, client.recommend(outbound))
            .await
        {
            Ok(answer) => Ok(Response::new(RecommendResponse {
                product_ids: answer.into_inner().product_ids,
                fallback: false,
            })),
            Err(fallback) => {
                tracing::debug!(
                    reason = fallback.reason.as_str(),
                    status = ?fallback.status.as_ref().map(|s| (s.code(), s.message().to_owned())),
                    "recommendations fell back"
                );
                Ok(Response::new(RecommendResponse {
                    product_ids: Vec::new(),
                    fallback: true,
                }))
            }
        }
    }

    async fn record_order(
        &self,
        _request: Request<RecordOrderRequest>,
    ) -> Result<Response<RecordOrderResponse>, Status> {
        // Not routed (internal to the shop); the route table refuses it
        // before it gets here.
        Err(Status::permission_denied(
            "mesh.recommendations.v1.RecommendationsService/RecordOrder is internal to the shop and not reachable through the gateway",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(products: usize, id_len: usize, max_results: i32) -> RecommendRequest {
        RecommendRequest {
            user_id: String::new(),
            product_ids: vec!["p".repeat(id_len); products],
            max_results,
        }
    }

    #[test]
    fn bad_input_gets_a_status_naming_the_field() {
        assert!(validate(&request(0, 1, 0)).is_ok());
        assert!(validate(&request(100, 128, 20)).is_ok());
        for (bad, needle) in [
            (
                request(101, 1, 0),
                "product_ids: must list 0 to 100, got 101",
            ),
            (
                request(1, 0, 0),
                "product_ids[0]: must be 1 to 128 characters, got 0",
            ),
            (
                request(1, 129, 0),
                "product_ids[0]: must be 1 to 128 characters, got 129",
            ),
            (request(1, 1, 21), "max_results: must be 0 to 20, got 21"),
            (request(1, 1, -1), "max_results: must be 0 to 20, got -1"),
        ] {
            let status = validate(&bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(needle), "{}", status.message());
        }
    }
}
