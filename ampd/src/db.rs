//! Connecting to the metadata database: retries with backoff within the configured connect timeout,
//! clear errors with the URL redacted, and PostgreSQL error details for callers that need them.

use std::time::{Duration, Instant};

use std::future::Future;

use sea_orm::sqlx::postgres::{
    PgConnectOptions, PgConnection, PgDatabaseError, PgPoolOptions, PgSslMode,
};
use sea_orm::sqlx::{self, ConnectOptions as _};
use sea_orm::{DatabaseConnection, DbErr, RuntimeErr, SqlxPostgresConnector};

use crate::config::{DatabaseUrl, MetadataDbConfig};

/// Why the metadata database could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server did not accept a connection within the connect timeout (refused, unreachable,
    /// DNS failure, TLS failure, or the server is starting up).
    #[error(
        "failed to connect to metadata database: {cause} (url {url}; gave up after {:.1} s)",
        elapsed.as_secs_f64()
    )]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// The last error seen.
        cause: String,
        /// Time spent trying.
        elapsed: Duration,
    },
    /// The server answered, but the database named in the URL does not exist.
    #[error(
        "failed to connect to metadata database: database \"{database}\" does not exist (url {url}); create it (CREATE DATABASE \"{database}\") or fix metadata_db.url"
    )]
    DatabaseMissing {
        /// The URL, password redacted.
        url: String,
        /// The database name the server reported missing.
        database: String,
    },
    /// The server refused the credentials or the role.
    #[error(
        "failed to connect to metadata database: {cause} (url {url}); check the user and password in metadata_db.url"
    )]
    Rejected {
        /// The URL, password redacted.
        url: String,
        /// The server's message.
        cause: String,
    },
    /// No URL is configured (`metadata_db.url`).
    #[error(
        "failed to connect to metadata database: no URL is configured (set metadata_db.url or AMP_CONFIG_METADATA_DB__URL)"
    )]
    NoUrl,
    /// The URL could not be turned into connection options.
    #[error("failed to connect to metadata database: invalid url {url}: {cause}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// Why it is invalid.
        cause: String,
    },
}

/// A PostgreSQL error's SQLSTATE and message, when `err` came from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// The five-character SQLSTATE, e.g. `42501`.
    pub code: String,
    /// The server's primary message.
    pub message: String,
    /// The server's detail line, if any.
    pub detail: Option<String>,
    /// The constraint involved, if any.
    pub constraint: Option<String>,
}

/// The server's error inside `err`, if it is one.
pub fn pg_error(err: &DbErr) -> Option<PgError> {
    let runtime = match err {
        DbErr::Exec(e) | DbErr::Query(e) | DbErr::Conn(e) => e,
        _ => return None,
    };
    let RuntimeErr::SqlxError(sqlx_err) = runtime else {
        return None;
    };
    pg_error_of_sqlx(sqlx_err)
}

fn pg_error_of_sqlx(err: &sqlx::Error) -> Option<PgError> {
    let sqlx::Error::Database(db_err) = err else {
        return None;
    };
    let pg = db_err.try_downcast_ref::<PgDatabaseError>()?;
    Some(PgError {
        code: pg.code().to_owned(),
        message: pg.message().to_owned(),
        detail: pg.detail().map(str::to_owned),
        constraint: pg.constraint().map(str::to_owned),
    })
}

/// Whether `err` means the server or the network is not (yet) available, so trying again may help.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(_) => pg_error_of_sqlx(err).is_some_and(|e| {
            // cannot_connect_now (starting up / shutting down), too_many_connections,
            // admin_shutdown / crash_shutdown.
            matches!(e.code.as_str(), "57P03" | "53300" | "57P01" | "57P02")
        }),
        _ => false,
    }
}

/// Options for one pool on `url`, with statement logging at debug level.
fn connect_options(url: &DatabaseUrl) -> Result<PgConnectOptions, ConnectError> {
    let opts: PgConnectOptions =
        url.expose()
            .parse()
            .map_err(|e: sqlx::Error| ConnectError::InvalidUrl {
                url: url.redacted(),
                cause: crate::redact::redact_url(&e.to_string()),
            })?;
    // PostgreSQL never offers TLS on a Unix socket, and libpq does not ask there; sqlx would, and
    // pay a round trip for the certain "no" before every connection.
    let on_socket = opts.get_socket().is_some() || opts.get_host().starts_with('/');
    let opts = match opts.get_ssl_mode() {
        PgSslMode::Prefer | PgSslMode::Allow if on_socket => opts.ssl_mode(PgSslMode::Disable),
        _ => opts,
    };
    Ok(opts
        .log_statements(log::LevelFilter::Debug)
        .application_name("ampd")
        // Let the server notice within a second that a client died in the middle of a statement
        // (a killed `ampd migrate`), so its transaction and locks go with it (PostgreSQL 14+).
        .options([("client_connection_check_interval", "1000")]))
}

/// Opens a pool of at most `max_connections` on the metadata database and proves it works with
/// one connection. sqlx retries a refused connection with exponential backoff until
/// `cfg.connect_timeout_secs` has passed; a missing database or rejected credentials fail at once.
///
/// The pool is built directly on sqlx rather than through `sea_orm::Database::connect`, whose
/// trace-level span would record the URL, password included.
pub async fn connect(
    cfg: &MetadataDbConfig,
    max_connections: u32,
) -> Result<DatabaseConnection, ConnectError> {
    let url = cfg.url.as_ref().ok_or(ConnectError::NoUrl)?;
    let opts = connect_options(url)?;
    let timeout = Duration::from_secs(cfg.connect_timeout_secs.max(1));
    let started = Instant::now();
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(cfg.min_connections.min(max_connections))
        .acquire_timeout(Duration::from_secs(cfg.acquire_timeout_secs.max(1)))
        .idle_timeout(Some(Duration::from_secs(cfg.idle_timeout_secs.max(1))))
        .test_before_acquire(false)
        .connect_lazy_with(opts.clone());
    let err = match tokio::time::timeout(timeout, pool.acquire()).await {
        Ok(Ok(conn)) => {
            drop(conn);
            return Ok(SqlxPostgresConnector::from_sqlx_postgres_pool(pool));
        }
        Ok(Err(e)) => e,
        Err(_) => sqlx::Error::PoolTimedOut,
    };
    pool.close().await;
    Err(classify(url, &opts, err, started.elapsed(), timeout).await)
}

/// The URL for work that needs a real session of its own (LISTEN, node claims):
/// `metadata_db.direct_url`, else `metadata_db.url`.
pub fn session_url(cfg: &MetadataDbConfig) -> Result<&DatabaseUrl, ConnectError> {
    cfg.session_url().ok_or(ConnectError::NoUrl)
}

/// Server settings of a dedicated session: the server probes an idle client every few seconds and
/// drops it when it is gone, so a vanished worker's node claim (an advisory lock held by its session)
/// is released within about half a minute rather than the operating system's two hours. Ignored on
/// a Unix socket, where the kernel tells the server at once.
const SESSION_KEEPALIVES: &str =
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 4";

/// Runs `attempt` (one try at opening something on `url`) until it succeeds, retrying refused or
/// unreachable connections with exponential backoff (50 ms doubling to 1 s) for at most
/// `cfg.connect_timeout_secs`; a missing database, rejected credentials or any other error fail at
/// once. The error is classified as [`connect`]'s is, URL redacted.
pub async fn with_connect_retry<T, F, Fut>(
    url: &DatabaseUrl,
    cfg: &MetadataDbConfig,
    mut attempt: F,
) -> Result<T, ConnectError>
where
    F: FnMut(PgConnectOptions) -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let opts = connect_options(url)?;
    let timeout = Duration::from_secs(cfg.connect_timeout_secs.max(1));
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let err = match tokio::time::timeout(left, attempt(opts.clone())).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e,
            Err(_) => sqlx::Error::PoolTimedOut,
        };
        if !is_transient(&err) || started.elapsed() + delay >= timeout {
            return Err(classify(url, &opts, err, started.elapsed(), timeout).await);
        }
        tracing::debug!(error = %crate::redact::redact_url(&err.to_string()), "connect failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Opens one connection of its own (not from a pool) to `url`, for work that needs a real session
/// (a node claim's advisory lock), with the pool's connect options and retries
/// ([`with_connect_retry`]), named `application_name`, with [`SESSION_KEEPALIVES`] applied.
pub async fn connect_session(
    url: &DatabaseUrl,
    cfg: &MetadataDbConfig,
    application_name: &str,
) -> Result<PgConnection, ConnectError> {
    with_connect_retry(url, cfg, |opts| async move {
        let mut conn = opts.application_name(application_name).connect().await?;
        apply_session_settings(&mut conn).await?;
        Ok(conn)
    })
    .await
}

/// Applies [`SESSION_KEEPALIVES`] on a dedicated connection (or a listener's).
pub async fn apply_session_settings<'c, E>(conn: E) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    conn.execute(SESSION_KEEPALIVES).await.map(|_| ())
}

async fn classify(
    url: &DatabaseUrl,
    opts: &PgConnectOptions,
    err: sqlx::Error,
    elapsed: Duration,
    timeout: Duration,
) -> ConnectError {
    if let Some(pg) = pg_error_of_sqlx(&err) {
        match pg.code.as_str() {
            "3D000" => {
                return ConnectError::DatabaseMissing {
                    url: url.redacted(),
                    database: url.database().unwrap_or_default(),
                };
            }
            "28P01" | "28000" | "42501" => {
                return ConnectError::Rejected {
                    url: url.redacted(),
                    cause: pg.message,
                };
            }
            _ => {}
        }
    }
    if !is_transient(&err) {
        return ConnectError::Rejected {
            url: url.redacted(),
            cause: crate::redact::redact_url(&err.to_string()),
        };
    }
    // The pool only says it timed out: one more direct attempt tells why.
    let cause = match &err {
        sqlx::Error::PoolTimedOut => {
            match tokio::time::timeout(Duration::from_secs(1), opts.connect()).await {
                Ok(Err(e)) => crate::redact::redact_url(&e.to_string()),
                _ => format!("no answer within {} s", timeout.as_secs()),
            }
        }
        other => crate::redact::redact_url(&other.to_string()),
    };
    ConnectError::Unreachable {
        url: url.redacted(),
        cause,
        elapsed,
    }
}
