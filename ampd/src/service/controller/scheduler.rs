//! The controller's scheduler loop: on every tick it recovers the jobs of lost workers, places
//! unassigned jobs, and retries failed jobs whose backoff has passed, giving up after
//! `max_attempts`. The policy lives here; the mechanisms (`jobs::fail_lost`, `jobs::reassign`,
//! `jobs::stop_lost`, `jobs::reschedule`, `jobs::give_up`) in the data-access layer, each guarded
//! on the row the controller saw, so any number of controllers may run at once and each job still
//! gets exactly one new attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use entity::JobStatus;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::config::{ControllerConfig, WorkerConfig};
use crate::metadata::{self, jobs, workers};

/// At most this many jobs are retried per pass.
const RETRY_BATCH: u64 = 100;
/// At most this many passes follow one another in one tick while each leaves work for the next.
const MAX_PASSES_PER_TICK: usize = 50;

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

/// Runs the scheduler loop until `shutdown` is cancelled. Database errors are logged and retried
/// at the next tick; they never stop the loop.
pub async fn run(
    db: DatabaseConnection,
    policy: Policy,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let (db, policy, stop) = (&db, &policy, &shutdown);
    crate::service::every(interval, stop, || async move {
        // A pass that left work for the next one (a full retry batch) is followed at once by
        // another, so a backlog (every job of a lost worker) does not wait a tick per batch.
        for _ in 0..MAX_PASSES_PER_TICK {
            let started = std::time::Instant::now();
            let result = pass(db, policy).await;
            crate::metrics::scheduling_pass(started.elapsed(), result.is_ok());
            match result {
                Ok(More::Yes) if !stop.is_cancelled() => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "scheduling pass failed; retrying at the next tick"
                ),
            }
            break;
        }
    })
    .await;
}

/// The live workers, each with its number of active jobs: where to place a job (the least loaded,
/// ties broken by node id).
#[derive(Clone, Debug, Default)]
pub struct Placement {
    load: BTreeMap<String, i64>,
}

impl Placement {
    /// The live workers (heartbeat within `window`) and their loads, read now.
    pub async fn read(
        db: &DatabaseConnection,
        window: Duration,
    ) -> Result<Placement, metadata::Error> {
        let load = workers::list_live_load(db, window)
            .await?
            .into_iter()
            .collect();
        Ok(Placement { load })
    }

    /// Counts `node` as lost from now on: its heartbeat, live when the placement was read, has
    /// since aged past the window (one of its jobs was just found orphaned).
    pub fn forget(&mut self, node: &str) {
        self.load.remove(node);
    }

    /// Whether `node` is live.
    pub fn is_live(&self, node: &str) -> bool {
        self.load.contains_key(node)
    }

    /// The least-loaded live worker, counting the job about to be placed on it; `None` when no
    /// worker is live.
    pub fn pick(&mut self) -> Option<String> {
        let (node, load) = self.load.iter_mut().min_by_key(|(_, load)| **load)?;
        *load += 1;
        Some(node.clone())
    }
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
/// once, as a new attempt); SCHEDULED ones (and unassigned ones) move to the least-loaded live
/// worker; stops the lost worker was asked for complete without it. Then ERROR jobs due for a retry
/// get a new attempt on a live worker (their previous node when it is live, else the least-loaded
/// one), or are given up once they have failed `max_attempts` times.
///
/// Its statements do not grow with the number of workers or of finished jobs: three reads (the
/// live workers with their loads, the orphaned jobs, the jobs due for a retry) and one statement
/// per job it changes; the reads do not grow with the workers ever registered nor with the
/// finished jobs either (they read the live workers and the active jobs through their indexes).
pub async fn reconcile(db: &DatabaseConnection, policy: &Policy) -> Result<(), metadata::Error> {
    pass(db, policy).await.map(|_| ())
}

/// Whether a pass left work for the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum More {
    Yes,
    No,
}

/// [`reconcile`], telling whether it left jobs due for a retry for the next pass (its batch was
/// full).
async fn pass(db: &DatabaseConnection, policy: &Policy) -> Result<More, metadata::Error> {
    let mut placement = Placement::read(db, policy.liveness_window).await?;
    recover_orphans(db, policy.liveness_window, &mut placement).await?;
    retry_due(db, policy, &mut placement).await
}

/// The first half of [`reconcile`]: the jobs of lost workers (and unassigned ones).
async fn recover_orphans(
    db: &DatabaseConnection,
    window: Duration,
    placement: &mut Placement,
) -> Result<(), metadata::Error> {
    for job in jobs::list_orphaned(db, window).await? {
        // The placement was read a moment before the orphans: a node whose heartbeat aged past
        // the window in between is lost, and must get neither this job nor its retry.
        if let Some(lost) = &job.node_id {
            placement.forget(lost);
        }
        let done = match job.job_status() {
            Ok(JobStatus::Running) => jobs::fail_lost(db, &job, window).await,
            Ok(JobStatus::Scheduled) => match placement.pick() {
                Some(to) => jobs::reassign(db, &job, Some(&to)).await,
                None => continue,
            },
            Ok(JobStatus::StopRequested | JobStatus::Stopping) => {
                jobs::stop_lost(db, &job, window).await
            }
            _ => continue,
        };
        match done {
            Ok(moved) => {
                crate::metrics::orphan_recovered();
                tracing::info!(
                    job_id = job.id,
                    lost_node = ?job.node_id,
                    status = %moved.status,
                    node = ?moved.node_id,
                    "recovered a job of a lost worker"
                )
            }
            Err(e) if lost_race(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The second half of [`reconcile`]: ERROR jobs due for a retry, retried or given up.
async fn retry_due(
    db: &DatabaseConnection,
    policy: &Policy,
    placement: &mut Placement,
) -> Result<More, metadata::Error> {
    let due = jobs::list_due_for_retry(
        db,
        policy.retry_base_delay,
        policy.retry_max_delay,
        RETRY_BATCH,
    )
    .await?;
    let full = due.len() as u64 == RETRY_BATCH;
    let mut changed = 0;
    for job in due {
        let give_up = job.attempt >= policy.max_attempts;
        let done = if give_up {
            let detail = serde_json::json!({
                "reason": "max_attempts",
                "attempts": job.attempt,
                "last_error": job.detail,
            });
            jobs::give_up(db, &job, detail).await
        } else {
            let node = match &job.node_id {
                Some(node) if placement.is_live(node) => Some(node.clone()),
                _ => placement.pick(),
            };
            let Some(node) = node else { continue };
            jobs::reschedule(db, &job, Some(&node)).await
        };
        match done {
            Ok(j) => {
                changed += 1;
                if give_up {
                    crate::metrics::job_given_up();
                } else {
                    crate::metrics::job_retried();
                }
                tracing::info!(
                    job_id = j.id,
                    status = %j.status,
                    attempt = j.attempt,
                    node = ?j.node_id,
                    "retried a failed job"
                )
            }
            Err(e) if lost_race(&e) => {}
            Err(e) => return Err(e),
        }
    }
    // Only when this pass made progress: jobs it could not place (no live worker) stay first in
    // line and would otherwise fill every batch again.
    Ok(if full && changed > 0 {
        More::Yes
    } else {
        More::No
    })
}
