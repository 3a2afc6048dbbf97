//! Connecting to the metadata database: retries with backoff within the configured connect timeout,
//! clear errors with the URL redacted, and PostgreSQL error details for callers that need them.
//!
//! Two kinds of connection:
//! - the pool of a service, on `metadata_db.url`, which may be a pooler in transaction mode when it
//!   keeps prepared statements across transactions ([`check_prepared_statements`]);
//! - single connections for work that needs a session of its own (the migration lock and its
//!   transactions, LISTEN, node-id claims), on `metadata_db.direct_url` (default: `url`), which
//!   must be PostgreSQL itself or a session-mode pooler ([`check_session`]).
//!
//! Connections send no settings at startup beyond what every pooler accepts (user, database,
//! application name, and the client encoding, date style and time zone sqlx always sends):
//! PgBouncer refuses a connection with any other startup parameter. Settings a session needs are
//! `SET` after connecting, by the code that needs them.

use std::time::{Duration, Instant};

use std::future::Future;

use sea_orm::sqlx::postgres::{
    PgConnectOptions, PgConnection, PgDatabaseError, PgPoolOptions, PgSslMode,
};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};
use sea_orm::{DatabaseConnection, DbErr, RuntimeErr, SqlxPostgresConnector};

use crate::config::{DatabaseUrl, MetadataDbConfig};

/// Why the metadata database could not be reached, or not used as configured.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server did not accept a connection within the connect timeout (refused, unreachable,
    /// DNS failure, TLS failure, or the server is starting up).
    #[error(
        "failed to connect to metadata database: {cause} ({key} {url}; gave up after {:.1} s)",
        elapsed.as_secs_f64()
    )]
    Unreachable {
        /// The configuration key the URL came from.
        key: &'static str,
        /// The URL, password redacted.
        url: String,
        /// The last error seen.
        cause: String,
        /// Time spent trying.
        elapsed: Duration,
    },
    /// The server answered, but the database named in the URL does not exist.
    #[error(
        "failed to connect to metadata database: database \"{database}\" does not exist ({key} {url}); create it (CREATE DATABASE \"{database}\") or fix {key}"
    )]
    DatabaseMissing {
        /// The configuration key the URL came from.
        key: &'static str,
        /// The URL, password redacted.
        url: String,
        /// The database name the server reported missing.
        database: String,
    },
    /// The server refused the credentials or the role.
    #[error(
        "failed to connect to metadata database: {cause} ({key} {url}); check the user and password in {key}"
    )]
    Rejected {
        /// The configuration key the URL came from.
        key: &'static str,
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
    /// The server (or a pooler in front of it) refused the connection for another reason than the
    /// credentials, e.g. a startup parameter it does not support or a database it does not serve.
    #[error(
        "failed to connect to metadata database: the server refused the connection: {cause} ({key} {url})"
    )]
    Refused {
        /// The configuration key the URL came from.
        key: &'static str,
        /// The URL, password redacted.
        url: String,
        /// The server's message, with its SQLSTATE.
        cause: String,
    },
    /// The URL could not be turned into connection options.
    #[error("failed to connect to metadata database: invalid {key} {url}: {cause}")]
    InvalidUrl {
        /// The configuration key the URL came from.
        key: &'static str,
        /// The URL, password redacted.
        url: String,
        /// Why it is invalid.
        cause: String,
    },
    /// The role may not connect to the database (no CONNECT privilege).
    #[error(
        "failed to connect to metadata database: {message} ({key} {url}): role {role} lacks the \
         CONNECT privilege on database {database}. As an administrator, run: GRANT CONNECT ON \
         DATABASE {database} TO {role};"
    )]
    ConnectDenied {
        /// The configuration key the URL came from.
        key: &'static str,
        /// The URL, password redacted.
        url: String,
        /// The server's message.
        message: String,
        /// The role, quoted.
        role: String,
        /// The database, quoted.
        database: String,
    },
    /// Work that needs a session of its own was pointed at a pooler that shares server sessions
    /// between its clients (transaction or statement mode).
    #[error(
        "{key} ({url}) does not give a connection a session of its own: two connections were served \
         by the same server process (pid {pid}), as a pooler in transaction or statement mode does, so \
         {work} could not stay on one session; nothing was changed. Set metadata_db.direct_url to \
         PostgreSQL itself (or to a pooler in session mode) and keep the transaction-mode pooler in \
         metadata_db.url"
    )]
    NotASession {
        /// The configuration key the URL came from.
        key: &'static str,
        /// The URL, password redacted.
        url: String,
        /// The server process both connections reached.
        pid: i32,
        /// What needed the session.
        work: &'static str,
    },
    /// The pool's URL leads to a pooler that loses prepared statements between transactions.
    #[error(
        "metadata_db.url ({url}) leads to a pooler in transaction mode that does not keep prepared \
         statements across transactions ({cause}); ampd's queries are prepared statements. Use a \
         pooler that tracks them (PgBouncer 1.21 or newer with max_prepared_statements = 200), or \
         pool_mode = session for this database"
    )]
    PreparedStatementsLost {
        /// The URL, password redacted.
        url: String,
        /// What the server answered.
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

/// The `application_name` of a service's pooled connections (a session of its own sets another:
/// the node claim's, the listener's, the migration session's), so they can be told apart in
/// `pg_stat_activity`.
pub const POOL_APPLICATION_NAME: &str = "ampd";

/// Connection options for `url` as ampd uses them everywhere: no startup parameter a pooler could
/// refuse, an IPv6 literal host (`[::1]`) as an address, no TLS request on a Unix socket,
/// statements logged at debug level, application name [`POOL_APPLICATION_NAME`].
fn connect_options(url: &DatabaseUrl, key: &'static str) -> Result<PgConnectOptions, ConnectError> {
    let opts: PgConnectOptions =
        url.expose()
            .parse()
            .map_err(|e: sqlx::Error| ConnectError::InvalidUrl {
                key,
                url: url.redacted(),
                cause: e.to_string(),
            })?;
    // The URL keeps an IPv6 literal in brackets (`[::1]`); as a host name it cannot be resolved.
    let opts = match opts
        .get_host()
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
    {
        Some(address) => {
            let address = address.to_owned();
            opts.host(&address)
        }
        None => opts,
    };
    // PostgreSQL never offers TLS on a Unix socket, and libpq does not ask there; sqlx would, and
    // pay a round trip for the certain "no" before every connection.
    let on_socket = opts.get_socket().is_some() || opts.get_host().starts_with('/');
    let opts = match opts.get_ssl_mode() {
        PgSslMode::Prefer | PgSslMode::Allow if on_socket => opts.ssl_mode(PgSslMode::Disable),
        _ => opts,
    };
    Ok(opts
        .log_statements(log::LevelFilter::Debug)
        .application_name(POOL_APPLICATION_NAME)
        // A startup parameter PgBouncer refuses ("unsupported startup parameter"); PostgreSQL 12+
        // sends floats exactly without it.
        .extra_float_digits(None))
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
    let key = "metadata_db.url";
    let opts = connect_options(url, key)?;
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
    Err(classify(url, key, &opts, err, started, timeout).await)
}

/// The configuration key `url` came from: `metadata_db.direct_url` when it is that URL, else
/// `metadata_db.url` (errors name the key, since the two redacted URLs may look alike).
pub fn key_of(cfg: &MetadataDbConfig, url: &DatabaseUrl) -> &'static str {
    if cfg.direct_url.as_ref() == Some(url) {
        "metadata_db.direct_url"
    } else if cfg.shadow_url.as_ref() == Some(url) {
        "metadata_db.shadow_url"
    } else {
        "metadata_db.url"
    }
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
    /// How one try ended.
    enum Failed {
        /// With this error.
        Error(sqlx::Error),
        /// With no answer to the startup within the time left.
        Silent,
    }
    let key = key_of(cfg, url);
    let opts = connect_options(url, key)?;
    let timeout = Duration::from_secs(cfg.connect_timeout_secs.max(1));
    let started = Instant::now();
    let backoff = crate::retry::Backoff {
        first: Duration::from_millis(50),
        max: Duration::from_secs(1),
        within: timeout,
        jitter: false,
    };
    let tried = backoff
        .run(
            |left| {
                let one = attempt(opts.clone());
                async move {
                    match tokio::time::timeout(left.max(Duration::from_millis(200)), one).await {
                        Ok(result) => result.map_err(Failed::Error),
                        Err(_) => Err(Failed::Silent),
                    }
                }
            },
            // A listener that accepts but never answers gets no second try within the timeout.
            |failed| matches!(failed, Failed::Error(e) if is_transient(e)),
            |failed, _| {
                if let Failed::Error(e) = failed {
                    tracing::debug!(error = %e.to_string(), "connect failed; retrying");
                }
            },
        )
        .await;
    match tried {
        Ok(value) => Ok(value),
        Err(Failed::Error(err)) => Err(classify(url, key, &opts, err, started, timeout).await),
        Err(Failed::Silent) => Err(ConnectError::Unreachable {
            key,
            url: url.redacted(),
            cause: format!(
                "no answer to the connection's startup within {} s (a listener that accepts but \
                 never answers: a frozen network, server or pooler)",
                timeout.as_secs()
            ),
            elapsed: started.elapsed(),
        }),
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
    key: &'static str,
    opts: &PgConnectOptions,
    err: sqlx::Error,
    started: Instant,
    timeout: Duration,
) -> ConnectError {
    if let Some(pg) = pg_error_of_sqlx(&err) {
        return match pg.code.as_str() {
            "3D000" => ConnectError::DatabaseMissing {
                key,
                url: url.redacted(),
                database: url.database().unwrap_or_default(),
            },
            // invalid_password, invalid_authorization_specification.
            "28P01" | "28000" => ConnectError::Rejected {
                key,
                url: url.redacted(),
                cause: pg.message,
            },
            // insufficient_privilege at connect: CONNECT on the database.
            "42501" => ConnectError::ConnectDenied {
                key,
                url: url.redacted(),
                message: pg.message,
                role: quote_ident(opts.get_username()),
                database: quote_ident(opts.get_database().unwrap_or(opts.get_username())),
            },
            _ if is_transient(&err) => ConnectError::Unreachable {
                key,
                url: url.redacted(),
                cause: pg.message,
                elapsed: started.elapsed(),
            },
            code => ConnectError::Refused {
                key,
                url: url.redacted(),
                cause: format!("{} (SQLSTATE {code})", pg.message),
            },
        };
    }
    if !is_transient(&err) {
        return ConnectError::Refused {
            key,
            url: url.redacted(),
            cause: err.to_string(),
        };
    }
    // The pool only says it timed out: one more direct attempt tells why, within what is left of
    // the timeout (so the time the error states is the time it took).
    let cause = match &err {
        sqlx::Error::PoolTimedOut => {
            let left = timeout.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, opts.connect()).await {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {} s", timeout.as_secs()),
            }
        }
        other => other.to_string(),
    };
    ConnectError::Unreachable {
        key,
        url: url.redacted(),
        cause,
        elapsed: started.elapsed(),
    }
}

/// `name` as an SQL identifier, in double quotes.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Opens one plain connection of its own to `url` (no settings applied), with the pool's connect
/// options and retries ([`with_connect_retry`]).
pub async fn open(cfg: &MetadataDbConfig, url: &DatabaseUrl) -> Result<PgConnection, ConnectError> {
    with_connect_retry(url, cfg, |opts| async move { opts.connect().await }).await
}

/// [`open`], with TCP keepalive on the connection's socket ([`crate::keepalive`]).
pub async fn open_with_keepalive(
    cfg: &MetadataDbConfig,
    url: &DatabaseUrl,
) -> Result<PgConnection, ConnectError> {
    let conn = open(cfg, url).await?;
    if let Ok(opts) = connect_options(url, key_of(cfg, url))
        && opts.get_socket().is_none()
        && !opts.get_host().starts_with('/')
    {
        let port = opts.get_port();
        let addresses: Vec<std::net::IpAddr> = tokio::net::lookup_host((opts.get_host(), port))
            .await
            .map(|found| found.map(|a| a.ip()).collect())
            .unwrap_or_default();
        let n = crate::keepalive::enable_to(port, &addresses);
        tracing::debug!(sockets = n, "TCP keepalive on the migration session");
    }
    Ok(conn)
}

/// How long a check's second connection may wait for a server process before the check concludes
/// that a pooler in session mode has none free.
pub const SECOND_CONNECTION_WAIT: Duration = Duration::from_secs(2);

/// The statement that asks which server process serves a connection.
pub const BACKEND_PID_SQL: &str = "SELECT pg_backend_pid()";

/// The server process serving `conn`'s latest statement (asked with the simple protocol, which
/// any pooler passes through whole).
pub async fn backend_pid(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    use sqlx::Row as _;
    sqlx::raw_sql(BACKEND_PID_SQL)
        .fetch_one(conn)
        .await?
        .try_get::<i32, _>(0)
}

/// The configuration key session-bound work takes its URL from.
pub fn session_key(cfg: &MetadataDbConfig) -> &'static str {
    if cfg.direct_url.is_some() {
        "metadata_db.direct_url"
    } else {
        "metadata_db.url"
    }
}

/// Checks that the session URL (`direct_url`, default `url`) gives each connection a session of its own, as `work` needs: a
/// second connection must be served by another server process than `first` (the process that
/// served `first`'s latest statement, `first_pid`). A pooler in transaction or statement mode hands
/// the server process it just released to the next client, so both connections reach the same one.
///
/// A second connection that gets no server process within [`SECOND_CONNECTION_WAIT`] means a
/// pooler in session mode with all its server connections taken (a pooler in transaction mode
/// would have handed it the first connection's, idle meanwhile): the check passes.
pub async fn check_session(
    cfg: &MetadataDbConfig,
    first_pid: i32,
    work: &'static str,
) -> Result<(), ConnectError> {
    let url = session_url(cfg)?;
    let mut second = open(cfg, url).await?;
    let Ok(pid) = tokio::time::timeout(SECOND_CONNECTION_WAIT, backend_pid(&mut second)).await
    else {
        tracing::debug!("no server process for a second connection yet: a full session pool");
        return Ok(());
    };
    let _ = second.close().await;
    let pid = pid.map_err(|e| ConnectError::Refused {
        key: session_key(cfg),
        url: url.redacted(),
        cause: e.to_string(),
    })?;
    if pid == first_pid {
        return Err(ConnectError::NotASession {
            key: session_key(cfg),
            url: url.redacted(),
            pid,
            work,
        });
    }
    Ok(())
}

/// Opens a connection for session-bound `work` and proves it is a session of its own
/// ([`check_session`]); the connection is closed again.
pub async fn require_session(
    cfg: &MetadataDbConfig,
    work: &'static str,
) -> Result<(), ConnectError> {
    let url = session_url(cfg)?;
    let mut first = open(cfg, url).await?;
    let pid = backend_pid(&mut first).await;
    let result = match pid {
        Ok(pid) => check_session(cfg, pid, work).await,
        Err(e) => Err(ConnectError::Refused {
            key: session_key(cfg),
            url: url.redacted(),
            cause: e.to_string(),
        }),
    };
    let _ = first.close().await;
    result
}

/// Checks that the pool's URL keeps prepared statements where ampd's queries expect them. Two
/// connections prepare and run the same statement, twice each, in turn: on PostgreSQL or a pooler
/// in session mode each has a server process of its own; a pooler in transaction mode that does
/// not track prepared statements hands the second connection the first one's server process, where
/// the statement's name is already taken (or later misses it), and the server says so.
pub async fn check_prepared_statements(cfg: &MetadataDbConfig) -> Result<(), ConnectError> {
    let url = cfg.url.as_ref().ok_or(ConnectError::NoUrl)?;
    let mut first = open(cfg, url).await?;
    let mut second = match open(cfg, url).await {
        Ok(conn) => conn,
        Err(e) => {
            let _ = first.close().await;
            return Err(e);
        }
    };
    let mut result = Ok(());
    for turn in 0..4 {
        let conn = if turn % 2 == 0 {
            &mut first
        } else {
            &mut second
        };
        let answer = tokio::time::timeout(
            SECOND_CONNECTION_WAIT,
            sqlx::query_scalar::<_, i32>("SELECT $1::int4")
                .bind(1_i32)
                .fetch_one(conn),
        )
        .await;
        let Ok(answer) = answer else {
            // No server process free for one of them: a full pool in session mode.
            break;
        };
        if let Err(e) = answer {
            result = Err(match pg_error_of_sqlx(&e) {
                // invalid_sql_statement_name, duplicate_prepared_statement, protocol_violation.
                Some(pg) if matches!(pg.code.as_str(), "26000" | "42P05" | "08P01") => {
                    ConnectError::PreparedStatementsLost {
                        url: url.redacted(),
                        cause: format!("{} (SQLSTATE {})", pg.message, pg.code),
                    }
                }
                _ => ConnectError::Refused {
                    key: "metadata_db.url",
                    url: url.redacted(),
                    cause: e.to_string(),
                },
            });
            break;
        }
    }
    let _ = first.close().await;
    let _ = second.close().await;
    result
}
