use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::{Service, ServiceBuilder, util::BoxCloneSyncService};

use crate::{BoxError, MeshConfig, MeshError, Target, deadline::DeadlineLayer};

/// The mesh of one process: its policy, and the factory of its channels.
///
/// Build one per process and share it; channels are cheap to clone.
#[derive(Clone, Debug)]
pub struct Mesh {
    config: Arc<MeshConfig>,
}

impl Mesh {
    /// A mesh with this (already validated) policy.
    pub fn new(config: MeshConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }

    /// The policy in force.
    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// A channel to `target` that any tonic-generated client accepts.
    ///
    /// Connections are made lazily on first use, so this never blocks and
    /// works before the target is up. Must be called inside a tokio runtime.
    pub fn channel(&self, target: &str) -> Result<MeshChannel, MeshError> {
        let parsed: Target = target.parse()?;
        let mut endpoints = parsed
            .addresses()
            .iter()
            .map(|addr| self.endpoint(*addr))
            .collect::<Result<Vec<_>, _>>()?;
        let transport = if endpoints.len() == 1 {
            endpoints.remove(0).connect_lazy()
        } else {
            Channel::balance_list(endpoints.into_iter())
        };
        // Outermost: every call gets a deadline before anything can wait.
        let stack = ServiceBuilder::new()
            .layer(DeadlineLayer::new(self.config.timeout_for(target)))
            .service(transport);
        Ok(MeshChannel {
            inner: BoxCloneSyncService::new(stack),
            target: Arc::from(target),
        })
    }

    fn endpoint(&self, addr: SocketAddr) -> Result<Endpoint, MeshError> {
        let settings = &self.config.endpoint;
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| {
            MeshError::InvalidTarget {
                target: addr.to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(endpoint
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(settings.keepalive_interval)
            .keep_alive_timeout(settings.keepalive_timeout)
            .keep_alive_while_idle(true))
    }
}

/// A channel to one target through the mesh's client layers.
///
/// Pass it to any tonic-generated client: `FooClient::new(channel)`.
#[derive(Clone)]
pub struct MeshChannel {
    inner: BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>,
    target: Arc<str>,
}

impl MeshChannel {
    /// The target this channel calls, as given to [`Mesh::channel`].
    pub fn target(&self) -> &str {
        &self.target
    }
}

impl std::fmt::Debug for MeshChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshChannel")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Service<http::Request<Body>> for MeshChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future =
        <BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError> as Service<
            http::Request<Body>,
        >>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        self.inner.call(req)
    }
}
