//! The server service. Answering queries is not part of this repository yet; what the server needs
//! from the metadata database is a current view of every table's active revision, which it keeps by
//! following `revision_changes` and, because notifications sent while it is disconnected are lost,
//! by re-reading the tables on a timer.

use std::future::Future;
use std::time::Duration;

use sea_orm::{DatabaseConnection, EntityTrait, PaginatorTrait};

use crate::config::Config;
use crate::metadata::notifications::{Listener, Notification};

use super::ServiceError;

/// How often the server re-reads the tables' active revisions.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Runs the server until `shutdown` completes.
pub async fn run(
    db: DatabaseConnection,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    // LISTEN needs a session of its own: `direct_url`, not a transaction pooler.
    let mut listener = Listener::connect(config.metadata_db.session_url().expose()).await?;
    let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
    tracing::info!("server started");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
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
