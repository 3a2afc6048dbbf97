//! `ampd controller|server|worker`: run until Ctrl-C or SIGTERM (exit 0). Each listens for the
//! signals before anything else, so one that arrives while it is still connecting or migrating
//! stops it cleanly.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::migrate::MigrationSet;
use crate::service::{self, controller, server, worker};

type Result = std::result::Result<(), Box<dyn std::error::Error>>;

/// Listens for the stop signals, then connects (migrating first when configured to). `None` when a
/// signal arrived before the service was connected.
async fn start(
    config: &Config,
    auto_migrate_default: bool,
    migrations: fn() -> MigrationSet,
) -> std::result::Result<Option<(DatabaseConnection, CancellationToken)>, Box<dyn std::error::Error>>
{
    let shutdown = service::stop_on_signals()?;
    let connect = service::connect(config, auto_migrate_default, migrations);
    let db = service::until_stopped(&shutdown, connect)
        .await
        .transpose()?;
    Ok(db.map(|db| (db, shutdown)))
}

pub async fn controller(config: Config, migrations: fn() -> MigrationSet) -> Result {
    // Before connecting: the migrations applied on startup are recorded too.
    if config.controller.metrics {
        crate::metrics::install();
    }
    let Some((db, shutdown)) = start(&config, false, migrations).await? else {
        return Ok(());
    };
    controller::run(db, Arc::new(config), migrations, shutdown).await?;
    Ok(())
}

pub async fn server(config: Config, migrations: fn() -> MigrationSet) -> Result {
    if config.server.metrics {
        crate::metrics::install();
    }
    let Some((db, shutdown)) = start(&config, false, migrations).await? else {
        return Ok(());
    };
    server::run(db, Arc::new(config), shutdown).await?;
    Ok(())
}

pub async fn worker(config: Config, node_id: String, migrations: fn() -> MigrationSet) -> Result {
    if config.worker.metrics_addr.is_some() {
        crate::metrics::install();
    }
    let Some((db, shutdown)) = start(&config, false, migrations).await? else {
        return Ok(());
    };
    worker::run(db, Arc::new(config), node_id, shutdown).await?;
    Ok(())
}
