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
        let report = migrate::migrate(db, &migrations()).await?;
        tracing::info!("{}", report.summary());
    }
    let pool = crate::db::connect(db, db.max_connections).await?;
    crate::db::check_prepared_statements(db).await?;
    crate::db::require_session(db, "LISTEN and node-id claims").await?;
    if !auto_migrate {
        migrate::verify_current(&pool, &migrations()).await?;
    }
    Ok(pool)
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
}

/// A shutdown signal that can be awaited by several services at once.
pub fn shared_shutdown() -> (tokio::sync::watch::Receiver<bool>, impl Future<Output = ()>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let fire = async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    };
    (rx, fire)
}
