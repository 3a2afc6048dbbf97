//! The controller service: on every tick, recovers the jobs of lost workers and retries failed
//! jobs whose backoff has passed, giving up after `max_attempts`. The policy lives here; the
//! mechanisms (`jobs::fail_lost`, `jobs::reassign`, `jobs::stop_lost`, `jobs::reschedule`,
//! `jobs::give_up`) in the data-access layer, each guarded on the row the controller saw, so any
//! number of controllers may run at once and each job still gets exactly one new attempt.

use std::future::Future;
use std::time::Duration;

use entity::JobStatus;
use sea_orm::DatabaseConnection;

use crate::config::{ControllerConfig, WorkerConfig};
use crate::metadata::{self, jobs, workers};

use super::ServiceError;

/// At most this many jobs are retried per tick.
const RETRY_BATCH: u64 = 100;

/// What a reconcile pass goes by.
#[derive(Clone, Debug)]
pub struct Policy {
    /// A worker without a heartbeat for this long is lost.
    pub liveness_window: Duration,
    /// First retry delay of the exponential backoff.
    pub retry_base_delay: Duration,
    /// Backoff cap.
    pub retry_max_delay: Duration,
    /// A job that has failed on this many attempts is given up (FATAL).
    pub max_attempts: i32,
}

impl Policy {
    /// The policy of a controller configured with `controller` and `worker`.
    pub fn new(controller: &ControllerConfig, worker: &WorkerConfig) -> Policy {
        Policy {
            liveness_window: Duration::from_millis(worker.liveness_window_ms),
            retry_base_delay: Duration::from_millis(controller.retry_base_delay_ms),
            retry_max_delay: Duration::from_millis(controller.retry_max_delay_ms),
            max_attempts: i32::try_from(controller.max_attempts).unwrap_or(i32::MAX),
        }
    }
}

/// Runs the controller until `shutdown` completes. Database errors are logged and retried at the
/// next tick; they never stop the controller.
pub async fn run(
    db: DatabaseConnection,
    config: ControllerConfig,
    worker_config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let policy = Policy::new(&config, &worker_config);
    let mut tick = tokio::time::interval(Duration::from_millis(config.reconcile_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("controller started");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                if let Err(e) = reconcile(&db, &policy).await {
                    tracing::warn!(error = %e, "reconcile failed; retrying at the next tick");
                }
            }
        }
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// Whether `err` only says that someone else acted on the job first (another controller, the
/// worker itself), so there is nothing left to do.
fn lost_race(err: &metadata::Error) -> bool {
    matches!(
        err,
        metadata::Error::Fenced { .. }
            | metadata::Error::StateConflict { .. }
            | metadata::Error::Conflict(_)
    )
}

/// One pass. Jobs of lost workers: RUNNING ones fail with `worker_lost` (and are retried below, at
/// once, as a new attempt); SCHEDULED ones (and unassigned ones) move to a live worker; stops the lost
/// worker was asked for complete without it. Then ERROR jobs due for a retry get a new attempt on a
/// live worker (their previous node when it is live, else the next one round-robin), or are given
/// up once they have failed `max_attempts` times.
pub async fn reconcile(db: &DatabaseConnection, policy: &Policy) -> Result<(), metadata::Error> {
    let window = policy.liveness_window;
    let live: Vec<String> = workers::list_live(db, window)
        .await?
        .into_iter()
        .map(|w| w.node_id)
        .collect();
    let mut next = live.iter().cycle();
    for job in jobs::list_orphaned(db, window).await? {
        let done = match job.job_status() {
            Ok(JobStatus::Running) => jobs::fail_lost(db, &job, window).await,
            Ok(JobStatus::Scheduled) => match next.next() {
                Some(to) => jobs::reassign(db, &job, Some(to)).await,
                None => continue,
            },
            Ok(JobStatus::StopRequested | JobStatus::Stopping) => {
                jobs::stop_lost(db, &job, window).await
            }
            _ => continue,
        };
        match done {
            Ok(moved) => tracing::info!(
                job_id = job.id,
                lost_node = ?job.node_id,
                status = %moved.status,
                node = ?moved.node_id,
                "recovered a job of a lost worker"
            ),
            Err(e) if lost_race(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let due = jobs::list_due_for_retry(
        db,
        policy.retry_base_delay,
        policy.retry_max_delay,
        RETRY_BATCH,
    )
    .await?;
    for job in due {
        let done = if job.attempt >= policy.max_attempts {
            let detail = serde_json::json!({
                "reason": "max_attempts",
                "attempts": job.attempt,
                "last_error": job.detail,
            });
            jobs::give_up(db, &job, detail).await
        } else {
            let node = match &job.node_id {
                Some(node) if live.contains(node) => Some(node.as_str()),
                _ => next.next().map(String::as_str),
            };
            let Some(node) = node else { continue };
            jobs::reschedule(db, &job, Some(node)).await
        };
        match done {
            Ok(j) => tracing::info!(
                job_id = j.id,
                status = %j.status,
                attempt = j.attempt,
                node = ?j.node_id,
                "retried a failed job"
            ),
            Err(e) if lost_race(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
