use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};
use tokio::sync::{Notify, mpsc};
use tower::discover::Change;

use super::{next_backoff, publish};

/// Re-resolution after a connection failure waits at least this long, so a
/// dead endpoint cannot turn every call into a DNS query.
const MIN_RERESOLVE: Duration = Duration::from_secs(1);

fn build(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut options = ResolverOpts::default();
    // The mesh re-resolves on its own schedule; a cache would hide changes.
    options.cache_size = 0;
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    let builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut ns.connections {
                connection.port = addr.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => Resolver::builder_tokio().map_err(|e| e.to_string())?,
    };
    builder
        .with_options(options)
        .build()
        .map_err(|e| e.to_string())
}

pub(super) async fn resolve_forever(
    server: Option<SocketAddr>,
    host: String,
    port: u16,
    refresh: Duration,
    reresolve: Arc<Notify>,
    tx: mpsc::Sender<Change<SocketAddr, ()>>,
) {
    let resolver = match build(server) {
        Ok(resolver) => resolver,
        Err(e) => {
            tracing::error!(%host, "cannot build a DNS resolver: {e}");
            return;
        }
    };
    let mut current = BTreeSet::new();
    let mut backoff = Duration::ZERO;
    loop {
        let wait = match resolver.lookup_ip(host.as_str()).await {
            Ok(found) => {
                backoff = Duration::ZERO;
                let next = found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                if !publish(&mut current, next, &tx).await {
                    return;
                }
                refresh
            }
            Err(e) if e.is_no_records_found() => {
                // An authoritative "no such name": the service has no endpoints now.
                backoff = Duration::ZERO;
                if !publish(&mut current, BTreeSet::new(), &tx).await {
                    return;
                }
                refresh
            }
            Err(e) => {
                backoff = next_backoff(backoff);
                tracing::warn!(%host, retry_in = ?backoff, "DNS resolution failed, keeping {} endpoints: {e}", current.len());
                backoff
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = reresolve.notified() => tokio::time::sleep(MIN_RERESOLVE).await,
            _ = tx.closed() => return,
        }
    }
}
