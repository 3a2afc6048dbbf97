//! Long-running services. Each is a function that takes its shutdown signal and returns when it
//! fires (or on a fatal error).

pub mod controller;
pub mod server;
pub mod worker;

use std::future::Future;

use sea_orm::DatabaseConnection;

use crate::config::Config;
use crate::migrate::{self, MigrateError, MigrationSet};

/// Why a service could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Migrating on startup (`metadata_db.auto_migrate`) failed.
    #[error("migration on startup failed: {0}")]
    Migrate(#[from] MigrateError),
    /// The metadata database could not be reached.
    #[error(transparent)]
    Connect(#[from] crate::db::ConnectError),
    /// A data-access call failed in a way the service cannot recover from (an invalid or already
    /// claimed node id, a lost claim, ...).
    #[error(transparent)]
    Metadata(#[from] crate::metadata::Error),
}

/// Connects the service's pool, first migrating when `metadata_db.auto_migrate` is true (or unset
/// and `auto_migrate_default` is true, as in solo mode). Migration uses the same entry point as
/// `ampd migrate`, so concurrent starts are safe.
pub async fn connect(
    config: &Config,
    auto_migrate_default: bool,
    migrations: fn() -> MigrationSet,
) -> Result<DatabaseConnection, ServiceError> {
    let db = &config.metadata_db;
    let auto_migrate = db.auto_migrate.unwrap_or(auto_migrate_default);
    if auto_migrate {
        let report = migrate::migrate(db, &migrations()).await?;
        tracing::info!("{}", report.summary());
    }
    let pool = crate::db::connect(db, db.max_connections).await?;
    if !auto_migrate {
        migrate::verify_current(&pool, &migrations()).await?;
    }
    Ok(pool)
}

/// Ctrl-C (SIGINT) and SIGTERM, listened for from the moment this is created: a signal that
/// arrives while the service is still connecting or migrating is kept and stops it, instead of
/// killing the process with the signal's default action. Create it before anything else.
pub struct Shutdown {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    /// Starts listening for SIGINT and SIGTERM (needs the Tokio runtime).
    pub fn install() -> std::io::Result<Shutdown> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Shutdown {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Shutdown {})
    }

    /// Completes when a signal has arrived (at once if one arrived before).
    pub async fn requested(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested");
    }

    /// Runs `work` to completion, or gives `None` if a signal arrives first.
    pub async fn unless_requested<F: Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::select! {
            out = work => Some(out),
            () = self.requested() => None,
        }
    }

    /// A shutdown signal that can be awaited by several services at once: the receiver turns
    /// true once the returned future (spawn it) has seen a signal.
    pub fn shared(mut self) -> (tokio::sync::watch::Receiver<bool>, impl Future<Output = ()>) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let fire = async move {
            self.requested().await;
            let _ = tx.send(true);
        };
        (rx, fire)
    }
}
