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
        let mut client = HealthClient::new(conn.clone());
        let watched = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        // Read once the watch is on a connection: that connection's.
        let retire_at = conn.retire_at();
        match watched {
            Ok(response) => {
                let mut stream = response.into_inner();
                // A connection whose certificates are about to expire takes
                // no new calls; the watch moves to the next connection too,
                // or it alone would hold the old one open until the server
                // cuts it at the expiry.
                let retired = until(retire_at);
                tokio::pin!(retired);
                let mut moved = false;
                // The stream ends (or errs) when the server drains or goes away.
                loop {
                    let update = tokio::select! {
                        update = stream.message() => update,
                        () = &mut retired => {
                            moved = true;
                            break;
                        }
                    };
                    let Ok(Some(update)) = update else {
                        if let Some(ep) = endpoint.upgrade() {
                            ep.set_serving(false);
                        }
                        break;
                    };
                    let Some(ep) = endpoint.upgrade() else { return };
                    let serving = update.status() == ServingStatus::Serving;
                    if ep.is_not_serving() == serving {
                        tracing::debug!(addr = %ep.addr, serving, "endpoint health changed");
                    }
                    ep.set_serving(serving);
                    backoff = RETRY_START;
                }
                if moved {
                    // Not a failure: no backoff growth, only a short pause
                    // so a watch that landed on a retired connection
                    // cannot spin.
                    tokio::time::sleep(RETRY_START).await;
                    continue;
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

/// Waits until the wall-clock time `at` (at once if it has passed),
/// forever if `None`.
async fn until(at: Option<std::time::SystemTime>) {
    match at {
        Some(at) => {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left).await
        }
        None => std::future::pending().await,
    }
}
