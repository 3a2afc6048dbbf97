//! The server service. Answering queries is not part of this repository yet; what the server needs
//! from the metadata database is a current view of every table's active revision, which it keeps by
//! following `revision_changes` and, because notifications sent while it is disconnected are lost,
//! by re-reading the tables on a timer.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{DatabaseConnection, EntityTrait, PaginatorTrait};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metadata::notifications::{Listener, Notification};

use super::ServiceError;

/// Runs the server until `shutdown` is cancelled.
pub async fn run(
    db: DatabaseConnection,
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let mut listener = Listener::connect(&config.metadata_db).await?;
    let every = Duration::from_millis(config.server.reconcile_interval_ms);
    let mut reconcile = tokio::time::interval(every);
    tracing::info!("server started");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = reconcile.tick() => {
                match entity::physical_tables::Entity::find().count(&db).await {
                    Ok(tables) => tracing::debug!(tables, "revisions reconciled"),
                    Err(e) => tracing::warn!(error = %e, "reconcile failed; retrying later"),
                }
            }
            received = listener.recv() => match received {
                Ok(Notification::RevisionChange(change)) => tracing::info!(
                    physical_table_id = change.physical_table_id,
                    revision_id = change.revision_id,
                    "active revision changed"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
        }
    }
    tracing::info!("server stopped");
    Ok(())
}
