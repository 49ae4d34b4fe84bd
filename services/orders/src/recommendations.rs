//! Telling the recommendations service about confirmed orders.
//!
//! Best effort, by design: recommendations are an optional dependency, so
//! a confirmation never waits for it or fails because of it. Each
//! confirmed order is sent once, in the background, within a budget
//! (`RecordOrder` is idempotent by order id, so the mesh's retries are
//! safe); an order it misses (service down, budget spent) is counted in
//! `mesh_fallbacks_total{peer="recommendations"}` and logged, and only
//! makes recommendations a little staler.

use std::time::Duration;

use mesh_client::{MeshChannel, optional::Optional};
use shop_api::{
    orders::v1::Order,
    recommendations::v1::{
        RecordOrderRequest, recommendations_service_client::RecommendationsServiceClient,
    },
};

const RECORD_ORDER: &str = "/mesh.recommendations.v1.RecommendationsService/RecordOrder";

/// Not user-facing: more time than the gateway's 50 ms, still bounded.
const BUDGET: Duration = Duration::from_secs(2);

/// Sends confirmed orders to recommendations (cheap to clone).
#[derive(Clone)]
pub struct Teller {
    client: RecommendationsServiceClient<MeshChannel>,
    optional: Optional,
}

impl Teller {
    /// Tells the service on `channel`.
    pub fn new(channel: MeshChannel) -> Self {
        Self {
            client: RecommendationsServiceClient::new(channel),
            optional: Optional::new("recommendations", BUDGET),
        }
    }

    /// Sends `order` in the background.
    pub fn tell(&self, order: &Order) {
        let mut products: Vec<String> = order.items.iter().map(|i| i.product_id.clone()).collect();
        products.sort();
        products.dedup();
        let mut request = tonic::Request::new(RecordOrderRequest {
            order_id: order.order_id.clone(),
            product_ids: products,
        });
        request.set_timeout(BUDGET);
        let (mut client, optional, order_id) = (
            self.client.clone(),
            self.optional.clone(),
            order.order_id.clone(),
        );
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            if let Err(fallback) = optional
                .call(RECORD_ORDER, client.record_order(request))
                .await
            {
                tracing::info!(
                    %order_id,
                    reason = fallback.reason.as_str(),
                    "recommendations not told about a confirmed order"
                );
            }
        }));
    }
}
