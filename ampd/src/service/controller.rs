//! The controller service: on every tick, hands the active jobs of dead workers to live ones and
//! reschedules failed jobs whose retry backoff has passed. The policy lives here; the mechanisms
//! (`jobs::list_orphaned`, `jobs::reassign`, `jobs::list_due_for_retry`, `jobs::reschedule`) in
//! the data-access layer.

use std::future::Future;
use std::time::Duration;

use sea_orm::DatabaseConnection;

use crate::config::{ControllerConfig, WorkerConfig};
use crate::metadata::{self, jobs, workers};

use super::ServiceError;

/// At most this many jobs are retried per tick.
const RETRY_BATCH: u64 = 100;

/// Runs the controller until `shutdown` completes. Database errors are logged and retried at the
/// next tick; they never stop the controller.
pub async fn run(
    db: DatabaseConnection,
    config: ControllerConfig,
    worker_config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let window = Duration::from_millis(worker_config.liveness_window_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(config.reconcile_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("controller started");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                if let Err(e) = reconcile(&db, &config, window).await {
                    tracing::warn!(error = %e, "reconcile failed; retrying at the next tick");
                }
            }
        }
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// One pass: reassign orphaned jobs round-robin over live workers, then reschedule due retries
/// (on their previous node when it is live, else on the next live worker).
pub async fn reconcile(
    db: &DatabaseConnection,
    config: &ControllerConfig,
    window: Duration,
) -> Result<(), metadata::Error> {
    let live: Vec<String> = workers::list_live(db, window)
        .await?
        .into_iter()
        .map(|w| w.node_id)
        .collect();
    let mut next = live.iter().cycle();
    for job in jobs::list_orphaned(db, window).await? {
        let Some(to) = next.next() else { break };
        match jobs::reassign(db, job.id, job.node_id.as_deref(), Some(to)).await {
            Ok(_) => {
                tracing::info!(job_id = job.id, from = ?job.node_id, to = %to, "reassigned job of a dead worker")
            }
            // Someone else moved or finished it first: nothing to do.
            Err(metadata::Error::Conflict(_) | metadata::Error::StateConflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let due = jobs::list_due_for_retry(
        db,
        Duration::from_millis(config.retry_base_delay_ms),
        Duration::from_millis(config.retry_max_delay_ms),
        RETRY_BATCH,
    )
    .await?;
    for job in due {
        let node = match &job.node_id {
            Some(node) if live.contains(node) => Some(node.as_str()),
            _ => next.next().map(String::as_str),
        };
        match jobs::reschedule(db, job.id, node).await {
            Ok(j) => {
                tracing::info!(job_id = j.id, attempt = j.attempt, node = ?j.node_id, "retrying failed job")
            }
            Err(metadata::Error::StateConflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
