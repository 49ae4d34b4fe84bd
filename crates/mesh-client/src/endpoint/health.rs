//! Client-side health watching: `grpc.health.v1.Health/Watch` on each
//! endpoint's own connection. `NOT_SERVING` (a draining server) takes the
//! endpoint out of rotation before its connection closes; `UNIMPLEMENTED`
//! means the server has no health service, and watching stops.

use std::{sync::Weak, time::Duration};

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::Endpoint;

const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Watches `endpoint` until it is dropped or the server has no health service.
pub(crate) async fn watch_health(endpoint: Weak<Endpoint>) {
    let mut backoff = RETRY_START;
    loop {
        // The endpoint's own connection: the watch dials it if no call has.
        let Some(conn) = endpoint.upgrade().map(|e| e.conn().clone()) else {
            return;
        };
        let mut client = HealthClient::new(conn);
        match client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(response) => {
                let mut stream = response.into_inner();
                // The stream ends (or errs) when the server drains or goes away.
                while let Ok(Some(update)) = stream.message().await {
                    let Some(ep) = endpoint.upgrade() else { return };
                    let serving = update.status() == ServingStatus::Serving;
                    if ep.is_not_serving() == serving {
                        tracing::debug!(addr = %ep.addr, serving, "endpoint health changed");
                    }
                    ep.set_serving(serving);
                    backoff = RETRY_START;
                }
                if let Some(ep) = endpoint.upgrade() {
                    ep.set_serving(false);
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                if let Some(ep) = endpoint.upgrade() {
                    ep.set_serving(true);
                }
                return;
            }
            Err(_) => {
                // Unreachable: the connection backoff decides eligibility; keep trying.
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}
