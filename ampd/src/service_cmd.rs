//! `ampd controller|server|worker|solo`: run until Ctrl-C or SIGTERM.

use crate::config::Config;
use crate::migrate::MigrationSet;
use crate::service::{self, controller, server, worker};

type Result = std::result::Result<(), Box<dyn std::error::Error>>;

async fn until_shutdown(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

pub async fn controller(config: Config, migrations: fn() -> MigrationSet) -> Result {
    let db = service::connect(&config, false, migrations).await?;
    controller::run(
        db,
        config.controller.clone(),
        config.worker.clone(),
        service::shutdown_signal(),
    )
    .await?;
    Ok(())
}

pub async fn server(config: Config, migrations: fn() -> MigrationSet) -> Result {
    let db = service::connect(&config, false, migrations).await?;
    server::run(db, &config, service::shutdown_signal()).await?;
    Ok(())
}

pub async fn worker(config: Config, node_id: String, migrations: fn() -> MigrationSet) -> Result {
    let db = service::connect(&config, false, migrations).await?;
    worker::run(db, &config, &node_id, service::shutdown_signal()).await?;
    Ok(())
}

pub async fn solo(config: Config, node_id: String, migrations: fn() -> MigrationSet) -> Result {
    let db = service::connect(&config, true, migrations).await?;
    let (rx, fire) = service::shared_shutdown();
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
