//! Discovery: turning a target into a stream of endpoint changes.
//!
//! Resolvers know nothing of balancing: each produces
//! `Change::Insert(addr, ())` / `Change::Remove(addr)` (tower's discovery
//! vocabulary) that the endpoint set consumes. A resolver that fails keeps
//! the last good set and retries with backoff.

mod dns;
mod file;

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use tokio::sync::{Notify, mpsc};
use tower::discover::Change;

use crate::MeshError;

/// A parsed call target.
///
/// Accepted forms:
/// - `static:///10.0.0.1:50052,10.0.0.2:50052`: a fixed list of endpoints;
/// - `http://127.0.0.1:50052` or `127.0.0.1:50052`: one endpoint;
/// - `dns:///inventory.shop.svc.cluster.local:50052`: every A/AAAA record of
///   the name (a Kubernetes headless Service gives one per ready pod),
///   re-resolved periodically and promptly after connection failures, using
///   the system resolver;
/// - `dns://127.0.0.1:5353/name:port`: the same, asking that DNS server;
/// - `file:///etc/mesh/inventory.endpoints`: `ip:port` lines of a file,
///   re-read when it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A fixed set of socket addresses.
    Static(Vec<SocketAddr>),
    /// A DNS name and port, optionally with the DNS server to ask.
    Dns {
        /// The DNS server, if not the system's.
        server: Option<SocketAddr>,
        /// The name to resolve.
        host: String,
        /// The port every endpoint listens on.
        port: u16,
    },
    /// A file of `ip:port` lines.
    File(PathBuf),
}

impl FromStr for Target {
    type Err = MeshError;

    fn from_str(target: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| MeshError::InvalidTarget {
            target: target.to_owned(),
            reason,
        };
        if let Some(rest) = target.strip_prefix("dns://") {
            let (authority, name) = rest.split_once('/').ok_or_else(|| {
                invalid("expected dns:///name:port or dns://server:port/name:port".into())
            })?;
            let server = if authority.is_empty() {
                None
            } else {
                Some(authority.parse::<SocketAddr>().map_err(|_| {
                    invalid(format!(
                        "DNS server {authority:?} is not an IP:port address"
                    ))
                })?)
            };
            let (host, port) = name
                .rsplit_once(':')
                .ok_or_else(|| invalid(format!("{name:?} has no :port")))?;
            let port = port
                .parse()
                .map_err(|_| invalid(format!("port {port:?} is not a number")))?;
            if host.is_empty() || host.parse::<IpAddr>().is_ok() {
                return Err(invalid("a dns target needs a host name".into()));
            }
            return Ok(Target::Dns {
                server,
                host: host.to_owned(),
                port,
            });
        }
        if let Some(path) = target.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(invalid(
                    "a file target needs an absolute path: file:///path".into(),
                ));
            }
            return Ok(Target::File(PathBuf::from(path)));
        }
        let list = if let Some(rest) = target.strip_prefix("static:///") {
            rest
        } else if let Some(rest) = target.strip_prefix("http://") {
            rest.trim_end_matches('/')
        } else if target.contains("://") {
            return Err(invalid(
                "unsupported scheme; use static:///, dns:///, file:/// or http://".into(),
            ));
        } else {
            target
        };
        let addrs = parse_addrs(list).map_err(invalid)?;
        if addrs.is_empty() {
            return Err(invalid("names no endpoint".into()));
        }
        Ok(Target::Static(addrs))
    }
}

pub(crate) fn parse_addrs(list: &str) -> Result<Vec<SocketAddr>, String> {
    list.split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.starts_with('#'))
        .map(|s| {
            s.parse::<SocketAddr>()
                .map_err(|_| format!("{s:?} is not an IP:port socket address"))
        })
        .collect()
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Static(addrs) => {
                f.write_str("static:///")?;
                for (i, addr) in addrs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{addr}")?;
                }
                Ok(())
            }
            Target::Dns { server, host, port } => match server {
                Some(s) => write!(f, "dns://{s}/{host}:{port}"),
                None => write!(f, "dns:///{host}:{port}"),
            },
            Target::File(path) => write!(f, "file://{}", path.display()),
        }
    }
}

/// A stream of endpoint changes for one target.
pub(crate) type Changes = mpsc::Receiver<Change<SocketAddr, ()>>;

/// Starts resolving `target`; `reresolve` is notified after connection
/// failures so DNS can look again at once.
pub(crate) fn spawn(target: Target, refresh: Duration, reresolve: Arc<Notify>) -> Changes {
    let (tx, rx) = mpsc::channel(64);
    match target {
        Target::Static(addrs) => {
            tokio::spawn(async move {
                for addr in addrs {
                    if tx.send(Change::Insert(addr, ())).await.is_err() {
                        return;
                    }
                }
                // Keep the stream open: a closed stream would read as "no endpoints".
                tx.closed().await;
            });
        }
        Target::Dns { server, host, port } => {
            tokio::spawn(dns::resolve_forever(
                server, host, port, refresh, reresolve, tx,
            ));
        }
        Target::File(path) => {
            tokio::spawn(file::watch_forever(path, tx));
        }
    }
    rx
}

/// Sends the changes that turn `current` into `next`; false once the
/// receiver is gone.
pub(crate) async fn publish(
    current: &mut BTreeSet<SocketAddr>,
    next: BTreeSet<SocketAddr>,
    tx: &mpsc::Sender<Change<SocketAddr, ()>>,
) -> bool {
    for gone in current.difference(&next) {
        if tx.send(Change::Remove(*gone)).await.is_err() {
            return false;
        }
    }
    for new in next.difference(current) {
        if tx.send(Change::Insert(*new, ())).await.is_err() {
            return false;
        }
    }
    *current = next;
    true
}

/// Backoff for resolution failures: 1 s doubling to 30 s.
pub(crate) fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_form() {
        let t: Target = "static:///127.0.0.1:1,[::1]:2".parse().unwrap();
        assert!(matches!(&t, Target::Static(a) if a.len() == 2));
        let t: Target = "http://127.0.0.1:5/".parse().unwrap();
        assert_eq!(t.to_string(), "static:///127.0.0.1:5");
        let t: Target = "dns:///inventory.shop.svc.cluster.local:50052"
            .parse()
            .unwrap();
        assert_eq!(
            t.to_string(),
            "dns:///inventory.shop.svc.cluster.local:50052"
        );
        let t: Target = "dns://127.0.0.1:5353/inv.test:7".parse().unwrap();
        assert!(matches!(
            t,
            Target::Dns {
                server: Some(_),
                port: 7,
                ..
            }
        ));
        let t: Target = "file:///etc/eps".parse().unwrap();
        assert_eq!(t, Target::File("/etc/eps".into()));
    }

    #[test]
    fn rejects_bad_targets_with_reason() {
        let err = |t: &str| t.parse::<Target>().unwrap_err().to_string();
        assert!(err("grpc://x").contains("unsupported scheme"));
        assert!(err("static:///localhost:1").contains("\"localhost:1\" is not an IP:port"));
        assert!(err("static:///").contains("names no endpoint"));
        assert!(err("dns:///inventory").contains("has no :port"));
        assert!(err("dns://nope/inv:1").contains("DNS server"));
        assert!(err("file://relative").contains("absolute path"));
    }
}
