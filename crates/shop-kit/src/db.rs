//! One database layer for SQLite (the embedded default) and PostgreSQL
//! (production), through sqlx's `Any` driver so every query is written once.
//!
//! Portable SQL rules the services follow: `$1`-style placeholders (SQLite
//! accepts them too), `BIGINT` and `TEXT` columns only, times as Unix
//! milliseconds, `CAST(SUM(..) AS BIGINT)` since PostgreSQL sums to NUMERIC.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    AnyPool, Executor,
    any::{AnyConnectOptions, AnyPoolOptions},
    error::ErrorKind,
    migrate::Migrator,
};
use tonic::Status;

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is neither `sqlite:` nor `postgres://`.
    #[error(transparent)]
    InvalidUrl(#[from] UnsupportedUrl),
    /// Connecting failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL with any password removed.
        url: String,
        /// What sqlx reported.
        #[source]
        source: sqlx::Error,
    },
    /// Applying migrations failed.
    #[error("migrating {url} failed: {source}")]
    Migrate {
        /// The URL with any password removed.
        url: String,
        /// What sqlx reported.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// Creating the SQLite file (mode 0600) failed.
    #[error("cannot create the database file {path}: {source}")]
    CreateFile {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Creating the SQLite file's directory failed.
    #[error("cannot create the directory for {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Which database a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A database URL for a backend the shop does not support.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("database URL {redacted:?} must start with sqlite: or postgres://")]
pub struct UnsupportedUrl {
    /// The URL as given, secrets removed ([`redact`]).
    pub redacted: String,
}

/// Checks a database URL names a supported backend.
pub fn backend(url: &str) -> Result<Backend, UnsupportedUrl> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(UnsupportedUrl {
            redacted: redact(url),
        })
    }
}

/// The URL without its secrets, for logs and errors: the password of the
/// user info (`user:***@host`) and the value of every query parameter whose
/// name says it is a secret (`password`, `sslpassword`, anything with
/// `pass`, `secret` or `token` in its name, any case).
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &base[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &base[..scheme_end + 3],
                    &userinfo[..colon],
                    &base[at..]
                ),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if is_secret_param(name) => format!("{name}=***"),
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token"]
        .iter()
        .any(|word| name.contains(word))
}

/// Opens a pool and applies `migrator`.
///
/// SQLite files (and their directory) are created if missing, use WAL and a
/// busy timeout, and get one connection: SQLite has one writer anyway, and a
/// single connection avoids `SQLITE_BUSY` on transaction upgrades.
pub async fn connect(url: &str, migrator: &Migrator) -> Result<AnyPool, DbError> {
    sqlx::any::install_default_drivers();
    let shown = redact(url);
    let backend = backend(url)?;
    let url = match backend {
        Backend::Sqlite => sqlite_url(url)?,
        Backend::Postgres => url.to_owned(),
    };
    let options = AnyConnectOptions::from_str(&url).map_err(|source| DbError::Connect {
        url: shown.clone(),
        source,
    })?;
    let pool_options = AnyPoolOptions::new()
        // An unreachable database must fail calls fast (UNAVAILABLE), not
        // hold them until their deadline.
        .acquire_timeout(Duration::from_secs(1))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; \
                         PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
                    )
                    .await?;
                }
                Ok(())
            })
        });
    let pool_options = match backend {
        Backend::Sqlite => pool_options.max_connections(1),
        Backend::Postgres => pool_options.max_connections(8),
    };
    let pool = pool_options
        .connect_with(options)
        .await
        .map_err(|source| DbError::Connect {
            url: shown.clone(),
            source,
        })?;
    migrator
        .run(&pool)
        .await
        .map_err(|source| DbError::Migrate { url: shown, source })?;
    Ok(pool)
}

fn sqlite_url(url: &str) -> Result<String, DbError> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = rest.split('?').next().unwrap_or_default();
    let dir = Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && path != ":memory:");
    if let Some(dir) = dir {
        create_private_dir(dir).map_err(|source| DbError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let in_memory = path.is_empty() || path.starts_with(':') || url.contains("mode=memory");
    let may_create = !url.contains("mode=") || url.contains("mode=rwc");
    if !in_memory && may_create {
        create_private_file(Path::new(path)).map_err(|source| DbError::CreateFile {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(if url.contains("mode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    })
}

/// Creates `dir` and its missing parents with mode 0700 (the data of one
/// service is nobody else's business); existing directories are left as
/// they are.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Creates an empty database file with mode 0600 if there is none, before
/// SQLite opens it: SQLite would create it with 0644 (less the umask), and
/// its `-wal` and `-shm` files take the main file's mode.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Keeps health in step with the database: NOT_SERVING (for `""` and each
/// of `services`) while `SELECT 1` fails, SERVING again once it answers.
/// Stops when `stop` is cancelled (the server drains).
pub async fn watch_readiness(
    pool: AnyPool,
    reporter: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tonic_health::ServingStatus;
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let ok = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&pool),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if ok == healthy && ok {
            continue;
        }
        if stop.is_cancelled() {
            return;
        }
        if !ok && healthy {
            tracing::warn!("database unreachable: reporting NOT_SERVING until it is back");
        } else if ok {
            tracing::info!("database reachable again: SERVING");
        }
        healthy = ok;
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        for service in &services {
            reporter.set_service_status(*service, status).await;
        }
    }
}

/// Whether the error is a unique-constraint violation.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.kind() == ErrorKind::UniqueViolation)
}

/// Whether the error is a CHECK-constraint violation.
pub fn is_check_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.kind() == ErrorKind::CheckViolation)
}

/// The one mapping of an unexpected database error to a gRPC status: an
/// unreachable database is `UNAVAILABLE` (retryable), anything else is
/// logged and answered `INTERNAL` without leaking details.
pub fn status(err: sqlx::Error) -> Status {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => {
            tracing::warn!("database unavailable: {err}");
            Status::unavailable("the service's database is unavailable; retry later")
        }
        sqlx::Error::Database(ref db) if db.message().contains("database is locked") => {
            tracing::warn!("database busy: {err}");
            Status::unavailable("the service's database is busy; retry later")
        }
        // PostgreSQL going away: connection exceptions (08xxx) and operator
        // intervention such as a shutdown (57Pxx).
        sqlx::Error::Database(ref db)
            if db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) =>
        {
            tracing::warn!("database unavailable: {err}");
            Status::unavailable("the service's database is unavailable; retry later")
        }
        sqlx::Error::Protocol(_) => {
            tracing::warn!("database connection broke: {err}");
            Status::unavailable("the service's database is unavailable; retry later")
        }
        other => {
            tracing::error!("database error: {other}");
            Status::internal("internal error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://shop:s3cret@db:5432/orders"),
            "postgres://shop:***@db:5432/orders"
        );
        assert_eq!(redact("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
        assert_eq!(
            redact("sqlite:///tmp/a.db?mode=rwc"),
            "sqlite:///tmp/a.db?mode=rwc"
        );
    }

    #[test]
    fn redacts_secrets_in_the_query() {
        assert_eq!(
            redact("postgres://db:5432/orders?user=shop&password=s3cret"),
            "postgres://db:5432/orders?user=shop&password=***"
        );
        assert_eq!(
            redact(
                "postgresql://shop:pw@db/orders?sslmode=verify-full&sslpassword=k3y&PassWord=x&application_name=a@b"
            ),
            "postgresql://shop:***@db/orders?sslmode=verify-full&sslpassword=***&PassWord=***&application_name=a@b"
        );
        // An `@` in the query is not the end of the user info.
        assert_eq!(
            redact("postgres://db/orders?application_name=x@y&auth_token=t"),
            "postgres://db/orders?application_name=x@y&auth_token=***"
        );
        for url in [
            "postgres://u:topsecret@h/d?password=topsecret",
            "postgres://h/d?sslpassword=topsecret&client_secret=topsecret",
        ] {
            assert!(!redact(url).contains("topsecret"), "{}", redact(url));
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn creates_sqlite_files_private() {
        use std::os::unix::fs::PermissionsExt;
        static MIGRATOR: Migrator = Migrator::DEFAULT;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let file = data.join("shop.db");
        let pool = connect(&format!("sqlite://{}", file.display()), &MIGRATOR)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x BIGINT)")
            .execute(&pool)
            .await
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&file), 0o600);
        // WAL mode: SQLite gives -wal and -shm the main file's mode.
        for suffix in ["-wal", "-shm"] {
            let side = data.join(format!("shop.db{suffix}"));
            assert_eq!(mode(&side), 0o600, "{}", side.display());
        }
        pool.close().await;
    }

    #[test]
    fn recognises_backends() {
        assert_eq!(backend("sqlite:a.db"), Ok(Backend::Sqlite));
        assert_eq!(backend("postgresql://x/y"), Ok(Backend::Postgres));
        assert!(
            backend("mysql://x")
                .unwrap_err()
                .to_string()
                .contains("must start with")
        );
    }
}
