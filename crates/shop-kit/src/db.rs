//! One database layer for SQLite (the embedded default) and PostgreSQL
//! (production), through sqlx's `Any` driver so every query is written once.
//!
//! Portable SQL rules the services follow: `$1`-style placeholders (SQLite
//! accepts them too), `BIGINT` and `TEXT` columns only, times as Unix
//! milliseconds, `CAST(SUM(..) AS BIGINT)` since PostgreSQL sums to NUMERIC.
//!
//! ## A database that goes silent
//!
//! A PostgreSQL server behind a partition sends no RST: a statement
//! already on the wire waits for TCP, and TCP retransmits for about 15
//! minutes. sqlx 0.9 sets no TCP keepalive or `TCP_USER_TIMEOUT` on its
//! sockets (and offers no hook to set them: sqlx#3540), so the bounds are
//! the application's and the server's, each an explicit constant here:
//!
//! - the pool's acquire timeout ([`ACQUIRE_TIMEOUT`]) bounds waiting for a
//!   connection, connecting and the ping of an idle one (SQLite's one
//!   connection gets the longer [`SQLITE_ACQUIRE_TIMEOUT`]: waiting for it
//!   is a queue, not an outage);
//! - readiness ([`watch_readiness`]) probes PostgreSQL over a connection
//!   of its own (pool exhaustion is not an outage) every
//!   [`PROBE_INTERVAL`], each probe bounded by [`PROBE_TIMEOUT`]; a failed
//!   probe reports NOT_SERVING, and [`FAILED_PROBES_TO_CUT`] silent ones in
//!   a row (no answer in time, or the host unreachable; a refusal such as
//!   PostgreSQL's connection limit is an answer) fail the calls then in
//!   flight in a [`guard`]ed service that are
//!   older than [`PROBE_TIMEOUT`] with `UNAVAILABLE`, so a call whose
//!   statement went out into the silence ends within a few seconds, not at
//!   its deadline. One lost probe (a dropped packet, a GC pause of the
//!   server) cuts nothing, and a call younger than a probe may still be
//!   answered: its statement went out while the probe was already waiting;
//! - a connection handed back to the pool must answer a ping within
//!   [`RELEASE_PING_TIMEOUT`] or is closed, so the silent ones do not hold
//!   pool slots until TCP gives up (sqlx's own release ping has no timeout);
//! - the server ends a session on its side ([`SESSION_SETTINGS`]): a
//!   statement after [`STATEMENT_TIMEOUT`], a transaction left idle (its
//!   COMMIT lost) after [`IDLE_IN_TRANSACTION_TIMEOUT`], a client gone
//!   silent after its TCP keepalives and user timeout. A transaction whose
//!   client vanished rolls back and frees its locks instead of blocking
//!   the retries of the same order after the heal; a COMMIT whose answer
//!   was lost either happened or not, and the callers' idempotency keys
//!   and the orders saga's recovery make both outcomes converge.

use std::{path::Path, str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    AnyConnection, AnyPool, Connection, Executor,
    any::{AnyConnectOptions, AnyPoolOptions},
    error::ErrorKind,
    migrate::Migrator,
};
use tokio::{sync::watch, time::Instant};
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

/// Longest wait for a pooled PostgreSQL connection (including connecting
/// and the ping of an idle one) before a call fails `UNAVAILABLE`: a
/// server that does not answer in this long is taken for unreachable.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for SQLite's one pooled connection before a call fails
/// `UNAVAILABLE`. A local file cannot be unreachable: the wait is a queue
/// behind this process's other statements, which a burst of calls on a
/// busy machine (certificate renewals, a whole shop starting at once)
/// stretches past a second without anything being wrong. The callers'
/// deadlines bound it sooner; this bounds a queue that does not move.
pub const SQLITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a PostgreSQL statement may run on the server
/// (`statement_timeout`): the shop's statements take milliseconds, so one
/// running this long waits on a lock or an overloaded server.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A session idle inside a transaction this long is ended by the server
/// (`idle_in_transaction_session_timeout`): the services' transactions
/// never pause between statements, so its client is gone and its locks
/// must go with it.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often readiness probes the database.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long one readiness probe (connecting if needed, then `SELECT 1`)
/// may take before the database counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many PostgreSQL probes in a row must meet silence before the calls in flight
/// in [`guard`]ed services are failed (health goes NOT_SERVING at the first).
pub const FAILED_PROBES_TO_CUT: u32 = 2;
/// How long a PostgreSQL connection handed back to the pool may take to
/// answer a ping before it is closed instead of kept.
pub const RELEASE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Session settings every PostgreSQL connection asks the server for (as
/// `options[NAME]=VALUE` of the URL) unless the URL sets them itself:
/// the statement and idle-transaction limits above, and TCP keepalives
/// (after 5 s idle, every 2 s, 3 probes) with a 10 s user timeout on the
/// server's socket, so the server notices a client gone silent.
pub const SESSION_SETTINGS: [(&str, &str); 6] = [
    ("statement_timeout", "5s"),
    ("idle_in_transaction_session_timeout", "10s"),
    ("tcp_keepalives_idle", "5"),
    ("tcp_keepalives_interval", "2"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "10000"),
];

/// `url` with each of [`SESSION_SETTINGS`] it does not name added.
fn with_session_settings(url: &str) -> String {
    let mut out = url.to_owned();
    for (name, value) in SESSION_SETTINGS {
        if url.contains(name) {
            continue;
        }
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(&format!("options[{name}]={value}"));
    }
    out
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
        Backend::Postgres => with_session_settings(url),
    };
    let options = AnyConnectOptions::from_str(&url).map_err(|source| DbError::Connect {
        url: shown.clone(),
        source,
    })?;
    let pool_options = AnyPoolOptions::new()
        // An unreachable database must fail calls fast (UNAVAILABLE), not
        // hold them until their deadline.
        .acquire_timeout(acquire_timeout(backend))
        // sqlx pings every released connection without a timeout: one whose
        // server went silent (a call dropped mid-statement) would hold its
        // slot until TCP gives up. Closed instead when the ping is late.
        .after_release(|conn, _meta| {
            Box::pin(async move {
                if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                    return Ok(true);
                }
                let answered = tokio::time::timeout(RELEASE_PING_TIMEOUT, conn.ping())
                    .await
                    .is_ok_and(|r| r.is_ok());
                if !answered {
                    tracing::warn!("a database connection did not answer a ping; closing it");
                }
                Ok(answered)
            })
        })
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

/// How long a call waits for a pooled connection of `backend`.
fn acquire_timeout(backend: Backend) -> Duration {
    match backend {
        Backend::Sqlite => SQLITE_ACQUIRE_TIMEOUT,
        Backend::Postgres => ACQUIRE_TIMEOUT,
    }
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

/// Calls in flight in a [`guard`]ed service that started at or before the
/// instant sent here are failed: this process's database stopped
/// answering. One per process, like its database.
static DATABASE_LOST: std::sync::LazyLock<watch::Sender<Option<Instant>>> =
    std::sync::LazyLock::new(|| watch::Sender::new(None));

/// What one readiness probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `SELECT 1` came back within [`PROBE_TIMEOUT`].
    Answered,
    /// PostgreSQL itself answered, with an error instead of a result (too
    /// many clients, starting up, shutting down, ...): the server is there,
    /// so a statement in flight on one of its sessions gets its own answer.
    Refused,
    /// Nothing came back within [`PROBE_TIMEOUT`], or the connection failed
    /// below PostgreSQL (refused, reset, unreachable): statements already
    /// on the wire may wait for TCP. A refusal or reset proves nothing of
    /// the database's host, since something else may have sent it (a
    /// Service with no ready endpoint rejects new connections while the
    /// established ones to the dead pod go unanswered).
    Silent,
}

impl Answer {
    /// Classifies a probe that ended with `err` before its timeout.
    fn of_error(err: &sqlx::Error) -> Answer {
        match err {
            sqlx::Error::Database(_) => Answer::Refused,
            _ => Answer::Silent,
        }
    }
}

/// Counts silent probes in a row and says when to cut calls in flight.
#[derive(Debug, Default)]
struct Outage {
    silent: u32,
}

impl Outage {
    /// Records a probe that ended at `now`; after [`FAILED_PROBES_TO_CUT`]
    /// silent ones in a row (and after each further one), the instant at or
    /// before which a call in flight started to be failed. PostgreSQL's own
    /// refusal is no silence: the server answers, so it restarts the count
    /// (a pool at PostgreSQL's connection limit must not cut the calls it
    /// is serving).
    fn probed(&mut self, answer: Answer, now: Instant) -> Option<Instant> {
        if answer != Answer::Silent {
            self.silent = 0;
            return None;
        }
        self.silent = self.silent.saturating_add(1);
        if self.silent < FAILED_PROBES_TO_CUT {
            return None;
        }
        now.checked_sub(PROBE_TIMEOUT)
    }
}

/// How readiness asks the database whether it answers.
struct Probe {
    pool: AnyPool,
    /// PostgreSQL: a connection of the probe's own, so a pool busy with
    /// slow calls does not read as an outage. SQLite: the pool (a file
    /// cannot go silent; its one connection is the truth).
    own: Option<Arc<AnyConnectOptions>>,
    conn: Option<AnyConnection>,
}

impl Probe {
    fn new(pool: AnyPool) -> Probe {
        let postgres = !pool
            .connect_options()
            .database_url
            .scheme()
            .starts_with("sqlite");
        Probe {
            own: postgres.then(|| pool.connect_options()),
            pool,
            conn: None,
        }
    }

    /// Whether the database answered `SELECT 1` within [`PROBE_TIMEOUT`],
    /// and if not, whether it refused or stayed silent.
    async fn answers(&mut self) -> Answer {
        let Some(options) = self.own.clone() else {
            // Queued behind the calls for the one connection: a long queue
            // is load, not an outage, so only the pool's own acquire
            // timeout (or an error) makes the file unhealthy.
            let probe = sqlx::query("SELECT 1").execute(&self.pool);
            let bound = SQLITE_ACQUIRE_TIMEOUT + PROBE_TIMEOUT;
            return match tokio::time::timeout(bound, probe).await {
                Ok(Ok(_)) => Answer::Answered,
                Ok(Err(e)) => Answer::of_error(&e),
                Err(_) => Answer::Silent,
            };
        };
        let conn = &mut self.conn;
        let attempt = async move {
            if conn.is_none() {
                *conn = Some(AnyConnection::connect_with(&options).await?);
            }
            match conn.as_mut() {
                Some(c) => sqlx::query("SELECT 1").execute(c).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let answer = match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Ok(Ok(())) => Answer::Answered,
            Ok(Err(e)) => Answer::of_error(&e),
            Err(_) => Answer::Silent,
        };
        if answer != Answer::Answered {
            // Silent or broken: the next probe connects afresh.
            self.conn = None;
        }
        answer
    }

    /// Whether a failed probe means calls in flight wait on silence.
    fn fails_calls(&self) -> bool {
        self.own.is_some()
    }
}

/// Keeps health in step with the database: NOT_SERVING (for `""` and each
/// of `services`) while its probe fails (module docs), SERVING again once
/// it answers. From the [`FAILED_PROBES_TO_CUT`]th PostgreSQL probe in a
/// row that met silence (not a refusal), each also fails the calls in
/// flight in [`guard`]ed services that started more than [`PROBE_TIMEOUT`]
/// before it ended. Stops when `stop` is cancelled (the server drains).
pub async fn watch_readiness(
    pool: AnyPool,
    reporter: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tonic_health::ServingStatus;
    let mut probe = Probe::new(pool);
    let mut outage = Outage::default();
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
        let answer = probe.answers().await;
        let ok = answer == Answer::Answered;
        if probe.fails_calls()
            && let Some(started_by) = outage.probed(answer, Instant::now())
        {
            DATABASE_LOST.send_replace(Some(started_by));
        }
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

/// `service` with its calls in flight failed `UNAVAILABLE` when this
/// process's readiness probe finds PostgreSQL silent
/// [`FAILED_PROBES_TO_CUT`] times in a row, those older than
/// [`PROBE_TIMEOUT`] then (module docs): a
/// statement on a silent connection would otherwise wait for TCP until
/// the call's deadline. What the call did meanwhile is what a lost answer
/// leaves: the callers' idempotency keys make a retry safe. Wrap each
/// tonic service of a process that runs [`watch_readiness`].
pub fn guard<S>(service: S) -> Guarded<S> {
    Guarded {
        inner: service,
        lost: DATABASE_LOST.subscribe(),
    }
}

/// A service wrapped by [`guard`].
#[derive(Clone, Debug)]
pub struct Guarded<S> {
    inner: S,
    /// Where the readiness probe says which calls to fail.
    lost: watch::Receiver<Option<Instant>>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Guarded<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let call = self.inner.call(request);
        let started = Instant::now();
        let mut lost = self.lost.clone();
        // Only a cut made from now on concerns this call.
        lost.mark_unchanged();
        Box::pin(async move {
            tokio::pin!(call);
            loop {
                tokio::select! {
                    biased;
                    response = &mut call => return response,
                    changed = lost.changed() => {
                        let cut = match changed {
                            Ok(()) => *lost.borrow_and_update(),
                            // No probe any more (the process is ending).
                            Err(_) => return call.await,
                        };
                        if cut.is_some_and(|started_by| started <= started_by) {
                            tracing::warn!("database stopped answering: failing a call in flight");
                            return Ok(Status::unavailable(
                                "the service's database stopped answering; retry later",
                            )
                            .into_http());
                        }
                    }
                }
            }
        })
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
        // No connection came free within the pool's wait: on SQLite a
        // queue behind the one connection, on PostgreSQL a full pool or
        // an unreachable server; either way, later may serve.
        sqlx::Error::PoolTimedOut => {
            tracing::warn!("database connection wait timed out: {err}");
            Status::unavailable(
                "the service's database is busy or unreachable (no connection came free in time); retry later",
            )
        }
        sqlx::Error::Io(_)
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
        // PostgreSQL going away: connection exceptions (08xxx), operator
        // intervention such as a shutdown (57Pxx) or the statement timeout
        // (57014), a lock not granted in time (55P03).
        sqlx::Error::Database(ref db)
            if db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57") || c == "55P03") =>
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

    /// A statement queued behind SQLite's one connection for longer than
    /// PostgreSQL's acquire timeout is served once the connection is
    /// free, and readiness stays SERVING meanwhile: on a busy machine the
    /// queue is load, not an outage (with a 1 s bound the shop failed
    /// calls and refused to start under CI's load).
    #[tokio::test]
    async fn a_queue_for_sqlites_connection_longer_than_a_second_is_served() {
        static MIGRATOR: Migrator = Migrator::DEFAULT;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("queue.db").display());
        let pool = connect(&url, &MIGRATOR).await.unwrap();
        let held = pool.acquire().await.unwrap();
        let queued = tokio::spawn({
            let pool = pool.clone();
            async move { sqlx::query("SELECT 1").execute(&pool).await.map(|_| ()) }
        });
        let mut probe = Probe::new(pool.clone());
        assert!(!probe.fails_calls());
        let probed = tokio::spawn(async move { probe.answers().await });
        tokio::time::sleep(ACQUIRE_TIMEOUT * 2).await;
        assert!(!queued.is_finished(), "the queued statement gave up");
        drop(held);
        queued
            .await
            .unwrap()
            .expect("the queued statement is served");
        assert_eq!(probed.await.unwrap(), Answer::Answered);
        pool.close().await;
    }

    #[test]
    fn postgres_urls_ask_for_the_session_limits_unless_they_set_them() {
        use std::str::FromStr;
        let url = with_session_settings("postgres://shop@db:5432/orders");
        let options = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
        let sent = options.get_options().unwrap_or_default().to_owned();
        for (name, value) in SESSION_SETTINGS {
            assert!(sent.contains(&format!("-c {name}={value}")), "{sent}");
        }
        // A URL's own choice stays; the others are added after its query.
        let url = with_session_settings("postgres://db/orders?options[statement_timeout]=30s");
        assert!(url.starts_with("postgres://db/orders?options[statement_timeout]=30s&"));
        assert!(!url.contains("statement_timeout]=5s"), "{url}");
        assert!(url.contains("options[tcp_user_timeout]=10000"), "{url}");
    }

    /// A call that never ends by itself, as one whose statement went out
    /// into a silent network.
    #[derive(Clone)]
    struct Hangs;

    impl tonic::server::NamedService for Hangs {
        const NAME: &'static str = "test.Hangs";
    }

    impl tonic::codegen::Service<tonic::codegen::http::Request<()>> for Hangs {
        type Response = tonic::codegen::http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = futures::future::Pending<Result<Self::Response, Self::Error>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: tonic::codegen::http::Request<()>) -> Self::Future {
            futures::future::pending()
        }
    }

    #[test]
    fn only_the_second_failed_probe_in_a_row_cuts_and_only_calls_older_than_a_probe() {
        let mut outage = Outage::default();
        let t0 = Instant::now() + Duration::from_secs(100);
        assert_eq!(
            outage.probed(Answer::Silent, t0),
            None,
            "one lost probe cuts nothing"
        );
        assert_eq!(outage.probed(Answer::Answered, t0 + PROBE_INTERVAL), None);
        assert_eq!(
            outage.probed(Answer::Silent, t0 + 2 * PROBE_INTERVAL),
            None,
            "the count restarted"
        );
        let at = t0 + 3 * PROBE_INTERVAL;
        assert_eq!(outage.probed(Answer::Silent, at), Some(at - PROBE_TIMEOUT));
        assert_eq!(
            outage.probed(Answer::Silent, at + PROBE_INTERVAL),
            Some(at + PROBE_INTERVAL - PROBE_TIMEOUT)
        );
    }

    #[test]
    fn refusals_never_cut_however_many_in_a_row() {
        let mut outage = Outage::default();
        let t0 = Instant::now() + Duration::from_secs(100);
        for i in 0..10 {
            assert_eq!(
                outage.probed(Answer::Refused, t0 + i * PROBE_INTERVAL),
                None
            );
        }
        assert_eq!(
            outage.probed(Answer::Silent, t0 + 10 * PROBE_INTERVAL),
            None
        );
        assert_eq!(
            outage.probed(Answer::Refused, t0 + 11 * PROBE_INTERVAL),
            None,
            "a refusal between two silent probes restarts the count"
        );
        assert_eq!(
            outage.probed(Answer::Silent, t0 + 12 * PROBE_INTERVAL),
            None
        );
    }

    /// A probe of PostgreSQL at `addr`, over a connection of its own.
    fn probe_at(addr: std::net::SocketAddr) -> Probe {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .connect_lazy(&format!("postgres://probe@{addr}/probe"))
            .unwrap();
        let probe = Probe::new(pool);
        assert!(probe.fails_calls());
        probe
    }

    /// A peer speaking PostgreSQL's wire protocol as a server at its
    /// connection limit does: it declines TLS, reads the startup message
    /// and answers FATAL 53300 "too many clients".
    async fn at_its_connection_limit() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    loop {
                        let len = socket.read_u32().await? as usize;
                        let mut body = vec![0; len.saturating_sub(4)];
                        socket.read_exact(&mut body).await?;
                        // SSLRequest: 80877103; anything else is the startup.
                        if body.len() == 4 && body[..] == 80877103u32.to_be_bytes() {
                            socket.write_all(b"N").await?;
                            continue;
                        }
                        let fields =
                            b"SFATAL\0VFATAL\0C53300\0Msorry, too many clients already\0\0";
                        let mut error = vec![b'E'];
                        error.extend_from_slice(&(4 + fields.len() as u32).to_be_bytes());
                        error.extend_from_slice(fields);
                        socket.write_all(&error).await?;
                        return Ok::<_, std::io::Error>(());
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn postgres_refusing_is_a_refusal_and_a_refused_port_or_a_mute_peer_is_silence() {
        let full = at_its_connection_limit().await;
        assert_eq!(probe_at(full).answers().await, Answer::Refused);

        // A port nobody listens on: the RST may come from anything on the
        // way (a Service without endpoints), so it proves no server.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        assert_eq!(probe_at(closed).answers().await, Answer::Silent);

        // Accepts the connection and never says a word, like a server
        // behind a partition whose SYN-ACK got through.
        let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = mute.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (socket, _) = mute.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(socket);
        });
        assert_eq!(probe_at(addr).answers().await, Answer::Silent);
        held.abort();
    }

    /// The same refusal from a real PostgreSQL server (CI starts one): a
    /// database that does not exist is FATAL 3D000, an answer.
    #[tokio::test]
    async fn a_real_postgres_refusal_is_a_refusal() {
        let Ok(url) = std::env::var("MESH_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var("MESH_TEST_REQUIRE_ALL").is_err(),
                "MESH_TEST_POSTGRES_URL is not set and MESH_TEST_REQUIRE_ALL=1"
            );
            return;
        };
        sqlx::any::install_default_drivers();
        let (base, query) = url.split_once('?').unwrap_or((&url, ""));
        let (server, _database) = base.rsplit_once('/').unwrap();
        let url = format!("{server}/no_such_database_for_the_probe?{query}");
        let pool = AnyPoolOptions::new().connect_lazy(&url).unwrap();
        assert_eq!(Probe::new(pool).answers().await, Answer::Refused);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_fails_the_calls_older_than_a_probe_and_spares_the_younger() {
        use tonic::codegen::Service;
        let (lost, rx) = watch::channel(None);
        let mut service = Guarded {
            inner: Hangs,
            lost: rx,
        };
        let old = tokio::spawn(service.call(tonic::codegen::http::Request::new(())));
        tokio::time::sleep(PROBE_TIMEOUT + Duration::from_secs(1)).await;
        let young = tokio::spawn(service.call(tonic::codegen::http::Request::new(())));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut outage = Outage::default();
        for _ in 0..FAILED_PROBES_TO_CUT {
            if let Some(started_by) = outage.probed(Answer::Silent, Instant::now()) {
                lost.send_replace(Some(started_by));
            }
        }
        let response = tokio::time::timeout(Duration::from_secs(1), old)
            .await
            .expect("the old call was failed")
            .unwrap()
            .unwrap();
        let status = Status::from_header_map(response.headers()).expect("a grpc-status");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!young.is_finished(), "a call younger than a probe was cut");
    }

    #[tokio::test]
    async fn a_guarded_call_in_flight_fails_unavailable_when_the_probe_finds_the_database_silent() {
        use tonic::codegen::Service;
        let mut service = guard(Hangs);
        let call = tokio::spawn(service.call(tonic::codegen::http::Request::new(())));
        // A cut of calls started by now, until the call has ended.
        let start = std::time::Instant::now();
        while !call.is_finished() && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            DATABASE_LOST.send_replace(Some(Instant::now()));
        }
        let response = call.await.unwrap().unwrap();
        let status = Status::from_header_map(response.headers()).expect("a grpc-status");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("database"), "{status:?}");
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

    #[test]
    fn a_connection_wait_that_times_out_says_busy_or_unreachable_and_is_retryable() {
        let busy = status(sqlx::Error::PoolTimedOut);
        assert_eq!(busy.code(), tonic::Code::Unavailable);
        assert!(
            busy.message().contains("busy or unreachable"),
            "{}",
            busy.message()
        );
        // Other unexpected errors leak nothing.
        let other = status(sqlx::Error::RowNotFound);
        assert_eq!(other.code(), tonic::Code::Internal);
        assert_eq!(other.message(), "internal error");
    }
}
