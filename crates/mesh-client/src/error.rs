use std::net::SocketAddr;

/// Why the mesh could not build a channel or a server.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The target string is not one the mesh understands.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid mesh config: {field}: {reason}")]
    InvalidConfig {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server failed while serving connections.
    #[error("server on {addr} failed: {source}")]
    Serve {
        /// The address the server was listening on.
        addr: SocketAddr,
        /// The underlying transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// An I/O error, for example reading the listener's local address.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
