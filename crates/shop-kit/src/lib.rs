//! What every shop service shares, so each service crate holds only its
//! domain: the process entry point (config parsing with exit code 64, logs,
//! signals), database pools with migrations for SQLite and PostgreSQL, input
//! validation of shared shapes, time conversions, and the local check of
//! end users' tokens.

#![forbid(unsafe_code)]

pub mod certify;
pub mod db;
mod entry;
pub mod mesh;
pub mod policy;
pub mod sa_token;
pub mod site;
pub mod time;
pub mod token;
pub mod validate;

pub use entry::{ServiceConfig, service_main, shutdown_signal};
pub use mesh::MeshArgs;

/// Why a shop process stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// TLS material, the mesh policy or the admin port could not be used.
    #[error("{0}")]
    Setup(#[from] mesh::SetupError),
    /// The configuration is inconsistent in ways only the service can
    /// tell: every problem, one per entry, each naming its flag.
    #[error("invalid configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The value of `flag` could not be used.
    #[error("{flag}: {source}")]
    Flag {
        /// The flag, for example `--public-tls-dir`.
        flag: &'static str,
        /// Why its value is unusable.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// The mesh or the server failed.
    #[error(transparent)]
    Mesh(#[from] mesh_client::MeshError),
}

/// Exit code for bad configuration (`EX_CONFIG`-style usage error, sysexits 64).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// Serves `server` until `shutdown`, reporting NOT_SERVING while the
/// service's database is unreachable.
pub async fn serve(
    server: mesh_client::server::MeshServer,
    pool: sqlx::AnyPool,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), mesh_client::MeshError> {
    let readiness = tokio::spawn(db::watch_readiness(
        pool,
        server.health_reporter(),
        server.service_names().to_vec(),
        server.draining(),
    ));
    let result = server.serve(listener, shutdown).await;
    readiness.abort();
    result
}

/// The token of an `authorization: Bearer <token>` value (`value` is the
/// header as text, `None` when absent), or `UNAUTHENTICATED` saying what
/// to send.
pub fn bearer_token(value: Option<&str>) -> Result<&str, tonic::Status> {
    let value = value.ok_or_else(|| {
        tonic::Status::unauthenticated(
            "missing authorization metadata; send `authorization: Bearer <token>` with a token from mesh.auth.v1.AuthService/Login",
        )
    })?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            tonic::Status::unauthenticated("authorization metadata must be `Bearer <token>`")
        })
}
