//! The controller service.
use std::future::Future;

use sea_orm::DatabaseConnection;

use crate::config::{ControllerConfig, WorkerConfig};

use super::ServiceError;

pub async fn run(
    _db: DatabaseConnection,
    _config: ControllerConfig,
    _workers: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    shutdown.await;
    Ok(())
}
