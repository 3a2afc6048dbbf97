//! Long-running services. Each is a function that takes its shutdown token and returns once it is
//! cancelled (or on a fatal error): [`controller::run`], [`server::run`], [`worker::run`].
//!
//! Every service command listens for SIGINT and SIGTERM before it does anything else
//! ([`stop_on_signals`]), so a signal at any moment, even while connecting or migrating, stops it
//! promptly with exit 0. Several services in one process ([`supervise`], as in `solo`) share the
//! token: when one fails, the others are stopped and the failure is the process's error.

pub mod controller;
pub mod gc;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod server;
pub mod storage;
pub mod worker;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metadata;
use crate::migrate::{self, MigrateError, MigrationSet};

/// Why a service could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Migrating on startup (`metadata_db.auto_migrate`) failed.
    #[error("migration on startup failed: {0}")]
    Migrate(#[from] MigrateError),
    /// Without `metadata_db.auto_migrate`, the schema is not at this binary's head (or could not
    /// be read): nothing was migrated, so the message does not speak of a migration.
    #[error(transparent)]
    NotMigrated(MigrateError),
    /// The metadata database could not be reached.
    #[error(transparent)]
    Connect(#[from] crate::db::ConnectError),
    /// A data-access call failed in a way the service cannot recover from (an invalid or already
    /// claimed node id, a lost claim, ...).
    #[error(transparent)]
    Metadata(#[from] crate::metadata::Error),
    /// An HTTP service could not listen on its address.
    #[error(transparent)]
    Bind(#[from] http::BindError),
    /// A file or directory the service needs could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A component stopped although no stop was asked for.
    #[error("{0} stopped unexpectedly")]
    Stopped(&'static str),
}

/// A token cancelled by the first SIGINT (Ctrl-C) or SIGTERM. Call it first: from then on a
/// signal never kills the process by its default action, it asks for a clean stop.
pub fn stop_on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let stop = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("shutdown requested");
            stop.cancel();
        });
    }
    #[cfg(not(unix))]
    {
        let stop = token.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
    }
    Ok(token)
}

/// Runs `pass` at once and then every `interval` (a late tick is not made up) until `shutdown` is
/// cancelled. A pass in progress is dropped then, so a stop never waits on a database that does
/// not answer (a transaction the pass had open never commits).
pub async fn every<F, Fut>(interval: Duration, shutdown: &CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if until_stopped(shutdown, pass()).await.is_none() {
            return;
        }
    }
}

/// `work`'s output, or `None` when `shutdown` is cancelled first (the work is dropped).
pub async fn until_stopped<F: Future>(shutdown: &CancellationToken, work: F) -> Option<F::Output> {
    tokio::select! {
        out = work => Some(out),
        () = shutdown.cancelled() => None,
    }
}

/// A service run as one component of a process.
pub type Component = (
    &'static str,
    Pin<Box<dyn Future<Output = Result<(), ServiceError>> + Send>>,
);

/// Runs `components` at once until `shutdown` is cancelled and all have returned. When one fails
/// (or returns before a stop was asked for), `shutdown` is cancelled so the others stop too, and the
/// first failure is returned once they have.
pub async fn supervise(
    shutdown: CancellationToken,
    components: Vec<Component>,
) -> Result<(), ServiceError> {
    let mut set = tokio::task::JoinSet::new();
    for (name, task) in components {
        set.spawn(async move { (name, task.await) });
    }
    let mut first: Option<ServiceError> = None;
    while let Some(joined) = set.join_next().await {
        let (name, result) = match joined {
            Ok(done) => done,
            Err(e) => (
                "a component",
                Err(ServiceError::Io {
                    what: "a service task panicked or was aborted".into(),
                    source: std::io::Error::other(e.to_string()),
                }),
            ),
        };
        let result = match result {
            Ok(()) if !shutdown.is_cancelled() => Err(ServiceError::Stopped(name)),
            other => other,
        };
        if let Err(e) = result {
            if first.is_none() {
                tracing::error!(component = name, error = %e, "stopping the other services");
                first = Some(e);
            }
            shutdown.cancel();
        }
    }
    first.map_or(Ok(()), Err)
}

/// How long [`retrying`] keeps trying, attempts included.
pub const RETRY_WITHIN: Duration = Duration::from_secs(60);

/// Runs `op` until it succeeds or fails with an error that is not retryable
/// ([`metadata::Error::is_retryable`]): a briefly unavailable database, a lost connection, a
/// deadlock, a lock or statement timeout are retried with exponential backoff (100 ms doubling to
/// 5 s, jittered) until [`RETRY_WITHIN`] has passed since the first attempt — an attempt still
/// waiting then (on the pool, on a frozen connection) is given up as unavailable — each retry
/// logged with `what`. (An HTTP request is bounded sooner, by `[http] request_timeout_secs`.)
pub async fn retrying<T, F, Fut>(what: &str, mut op: F) -> Result<T, metadata::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, metadata::Error>>,
{
    let backoff = crate::retry::Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(5),
        within: RETRY_WITHIN,
        jitter: true,
    };
    backoff
        .run(
            |left| {
                let attempt = op();
                async move {
                    tokio::time::timeout(left.max(Duration::from_millis(100)), attempt)
                        .await
                        .unwrap_or_else(|_| Err(metadata::Error::timed_out()))
                }
            },
            metadata::Error::is_retryable,
            |e, delay| {
                tracing::warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "{what} failed; retrying"
                );
            },
        )
        .await
}

/// Connects the service's pool, first migrating when `metadata_db.auto_migrate` is true (or unset
/// and `auto_migrate_default` is true, as in solo mode). Migration uses the same entry point as
/// `ampd migrate`, so concurrent starts are safe.
///
/// A database that a newer ampd migrated is accepted when every migration this binary does not
/// know is recorded as compatible with it (a warning names them), and refused otherwise
/// (`migrate::verify_for_service`).
///
/// Before a service starts it proves that its URLs can carry what it sends: the pool's URL keeps
/// prepared statements (a pooler in transaction mode must track them), and the session URL
/// (`direct_url`, default `url`), used for LISTEN and node-id claims, gives a session of its own.
pub async fn connect(
    config: &Config,
    auto_migrate_default: bool,
    migrations: fn() -> MigrationSet,
) -> Result<DatabaseConnection, ServiceError> {
    let db = &config.metadata_db;
    let auto_migrate = db.auto_migrate.unwrap_or(auto_migrate_default);
    if auto_migrate {
        match migrate::migrate_for_service(db, &migrations()).await? {
            migrate::ServiceStart::Migrated(report) => {
                let durations: Vec<Duration> = report.applied.iter().map(|a| a.duration).collect();
                crate::metrics::migrations_applied(&durations);
                tracing::info!("{}", report.summary())
            }
            migrate::ServiceStart::Newer(names) => migrate::warn_newer(&names),
        }
    }
    let pool = crate::db::connect(db, db.max_connections).await?;
    crate::db::check_prepared_statements(db).await?;
    crate::db::require_session(db, "LISTEN and node-id claims").await?;
    if !auto_migrate {
        let newer = migrate::verify_for_service(&pool, &migrations())
            .await
            .map_err(ServiceError::NotMigrated)?;
        migrate::warn_newer(&newer);
    }
    Ok(pool)
}
