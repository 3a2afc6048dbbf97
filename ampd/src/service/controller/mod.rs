//! The controller service: the admin API and the scheduler loop ([`scheduler`]).

pub mod scheduler;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

use super::ServiceError;
pub use scheduler::{Placement, Policy, reconcile};

/// Runs the controller until `shutdown` is cancelled.
pub async fn run(
    db: DatabaseConnection,
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let policy = Policy::new(&config.controller, &config.worker);
    let interval = Duration::from_millis(config.controller.reconcile_interval_ms);
    tracing::info!("controller started");
    scheduler::run(db, policy, interval, shutdown).await;
    tracing::info!("controller stopped");
    Ok(())
}
