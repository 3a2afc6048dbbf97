//! The worker service: claims its node id for as long as it runs (a second process with the same
//! `--node-id` is refused), registers, heartbeats, and follows the job actions addressed to it.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metadata::notifications::{Listener, Notification};
use crate::metadata::{jobs, workers};

use super::ServiceError;

/// What a worker records about itself at registration.
fn info() -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// Runs worker `node_id` until `shutdown` is cancelled.
pub async fn run(
    db: DatabaseConnection,
    config: Arc<Config>,
    node_id: String,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let node_id = node_id.as_str();
    workers::validate_node_id(node_id)?;
    let mut claim = workers::claim(&config.metadata_db, node_id).await?;
    let worker = workers::register(&db, node_id, info()).await?;
    let active = jobs::list_active_for_node(&db, node_id).await?;
    tracing::info!(
        node_id,
        worker_id = worker.id,
        active_jobs = active.len(),
        "worker registered"
    );

    let mut listener = Listener::connect(&config.metadata_db).await?;
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(config.worker.heartbeat_interval_ms));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = heartbeat.tick() => {
                if let Err(e) = workers::heartbeat(&db, node_id).await {
                    tracing::warn!(node_id, error = %e, "heartbeat failed; retrying at the next tick");
                }
                // The claim lives on its own connection: if that connection was lost, another
                // process may now hold the node id, and this one must stop.
                claim.check().await?;
            }
            received = listener.recv() => match received {
                Ok(Notification::JobAction(action)) if action.node_id == node_id => {
                    tracing::info!(node_id, job_id = action.job_id, action = ?action.action, "job action");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node_id, error = %e, "notification listener failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
        }
    }
    let _ = claim.release().await;
    tracing::info!(node_id, "worker stopped");
    Ok(())
}
