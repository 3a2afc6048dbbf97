//! `ampd controller|server|worker|solo`: run until Ctrl-C or SIGTERM. Each listens for the
//! signals first, so one that arrives while it is still connecting or migrating stops it (exit 0).

use sea_orm::DatabaseConnection;

use crate::config::Config;
use crate::migrate::MigrationSet;
use crate::service::{self, Shutdown, controller, server, worker};

type Result = std::result::Result<(), Box<dyn std::error::Error>>;

/// Listens for the stop signals, then connects (migrating first when configured to). `None` when a
/// signal arrived before the service was connected.
async fn start(
    config: &Config,
    auto_migrate_default: bool,
    migrations: fn() -> MigrationSet,
) -> std::result::Result<Option<(DatabaseConnection, Shutdown)>, Box<dyn std::error::Error>> {
    let mut shutdown = Shutdown::install()?;
    let connect = service::connect(config, auto_migrate_default, migrations);
    let db = shutdown.unless_requested(connect).await.transpose()?;
    Ok(db.map(|db| (db, shutdown)))
}

async fn until_shutdown(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

pub async fn controller(config: Config, migrations: fn() -> MigrationSet) -> Result {
    let Some((db, mut shutdown)) = start(&config, false, migrations).await? else {
        return Ok(());
    };
    controller::run(
        db,
        config.controller.clone(),
        config.worker.clone(),
        shutdown.requested(),
    )
    .await?;
    Ok(())
}

pub async fn server(config: Config, migrations: fn() -> MigrationSet) -> Result {
    let Some((db, mut shutdown)) = start(&config, false, migrations).await? else {
        return Ok(());
    };
    server::run(db, &config, shutdown.requested()).await?;
    Ok(())
}

pub async fn worker(config: Config, node_id: String, migrations: fn() -> MigrationSet) -> Result {
    let Some((db, mut shutdown)) = start(&config, false, migrations).await? else {
        return Ok(());
    };
    worker::run(db, &config, &node_id, shutdown.requested()).await?;
    Ok(())
}

pub async fn solo(config: Config, node_id: String, migrations: fn() -> MigrationSet) -> Result {
    let Some((db, shutdown)) = start(&config, true, migrations).await? else {
        return Ok(());
    };
    let (rx, fire) = shutdown.shared();
    tokio::spawn(fire);
    let (c, s, w) = tokio::join!(
        controller::run(
            db.clone(),
            config.controller.clone(),
            config.worker.clone(),
            until_shutdown(rx.clone())
        ),
        server::run(db.clone(), &config, until_shutdown(rx.clone())),
        worker::run(db.clone(), &config, &node_id, until_shutdown(rx)),
    );
    c?;
    s?;
    w?;
    Ok(())
}
