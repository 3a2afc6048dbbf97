//! The worker service.
use std::future::Future;

use sea_orm::DatabaseConnection;

use crate::config::Config;

use super::ServiceError;

pub async fn run(
    _db: DatabaseConnection,
    _config: &Config,
    _node_id: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    shutdown.await;
    Ok(())
}
