//! The controller's retention loop: what would otherwise grow forever is deleted once it is old
//! enough (`[controller] events_retention_days`, `jobs_retention_days`, `workers_retention_days`;
//! 0 keeps it), a small batch per statement so that no lock is held for long and the scheduler and
//! the workers' writes go on meanwhile. What may be deleted is decided in the data-access layer
//! (`jobs::delete_events_of_finished`, `jobs::delete_finished`, `workers::delete_gone`); the ages
//! and the pace here. The garbage collection of revisions' files keeps its own rules
//! (`service/gc.rs`).

use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::config::{ControllerConfig, WorkerConfig};
use crate::metadata::{self, jobs, workers};

/// Finished jobs whose events are deleted per statement (all the events of each).
pub const EVENTS_BATCH: u64 = 20;
/// Jobs deleted per statement (with whatever events they still have).
pub const JOBS_BATCH: u64 = 100;
/// Workers deleted per statement.
pub const WORKERS_BATCH: u64 = 100;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The ages after which retention deletes; `None` keeps forever.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The events of a job that finished this long ago.
    pub events: Option<Duration>,
    /// A finished job this old.
    pub jobs: Option<Duration>,
    /// A worker that is not live, holds no active job and was last seen this long ago.
    pub workers: Option<Duration>,
    /// A worker without a heartbeat for this long is not live (`[worker] liveness_window_ms`).
    pub liveness_window: Duration,
}

impl Retention {
    /// The retention of a controller configured with `controller` and `worker`.
    pub fn new(controller: &ControllerConfig, worker: &WorkerConfig) -> Retention {
        let days =
            |n: u64| (n > 0).then(|| DAY.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX)));
        Retention {
            events: days(controller.events_retention_days),
            jobs: days(controller.jobs_retention_days),
            workers: days(controller.workers_retention_days),
            liveness_window: Duration::from_millis(worker.liveness_window_ms),
        }
    }

    /// Whether any retention is on.
    pub fn is_on(&self) -> bool {
        self.events.is_some() || self.jobs.is_some() || self.workers.is_some()
    }
}

/// What one pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Events of old finished jobs.
    pub events: u64,
    /// Old finished jobs.
    pub jobs: u64,
    /// Workers gone for long.
    pub workers: u64,
}

impl Deleted {
    /// Whether the pass deleted anything.
    pub fn any(&self) -> bool {
        self.events + self.jobs + self.workers > 0
    }
}

/// Runs a retention pass every `interval` until `shutdown` is cancelled (the first one at once);
/// returns at once when every retention is off. A pass that deleted something logs one line with
/// the counts; errors are logged and the next pass tries again.
pub async fn run(
    db: DatabaseConnection,
    retention: Retention,
    interval: Duration,
    shutdown: CancellationToken,
) {
    if !retention.is_on() {
        tracing::info!("retention is off");
        return;
    }
    let (db, retention, stop) = (&db, &retention, &shutdown);
    crate::service::every(interval, stop, || async move {
        match pass(db, retention, stop).await {
            Ok(deleted) if deleted.any() => tracing::info!(
                events = deleted.events,
                jobs = deleted.jobs,
                workers = deleted.workers,
                "retention pass deleted old rows"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "retention pass failed; retrying at the next pass"
            ),
        }
    })
    .await;
}

/// One pass: the events of old finished jobs, then old finished jobs, then workers gone for long,
/// each in batches (one statement each) until a batch comes back short or `stop` is cancelled.
pub async fn pass(
    db: &DatabaseConnection,
    retention: &Retention,
    stop: &CancellationToken,
) -> Result<Deleted, metadata::Error> {
    let mut deleted = Deleted::default();
    if let Some(age) = retention.events {
        deleted.events = drain(stop, EVENTS_BATCH, || async move {
            let purged = jobs::delete_events_of_finished(db, age, EVENTS_BATCH).await?;
            Ok((purged.jobs, purged.events))
        })
        .await?;
    }
    if let Some(age) = retention.jobs {
        deleted.jobs = drain(stop, JOBS_BATCH, || async move {
            let n = jobs::delete_finished(db, age, JOBS_BATCH).await?;
            Ok((n, n))
        })
        .await?;
    }
    if let Some(age) = retention.workers {
        let window = retention.liveness_window;
        deleted.workers = drain(stop, WORKERS_BATCH, || async move {
            let n = workers::delete_gone(db, window, age, WORKERS_BATCH).await?;
            Ok((n, n))
        })
        .await?;
    }
    Ok(deleted)
}

/// Runs `batch_op` until a batch comes back short, or `stop` is cancelled; returns how many rows it
/// deleted in all. A batch answers how many of its `batch` units it took (rows, or the jobs whose
/// events it deleted) and how many rows it deleted.
async fn drain<F, Fut>(
    stop: &CancellationToken,
    batch: u64,
    mut batch_op: F,
) -> metadata::Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = metadata::Result<(u64, u64)>>,
{
    let mut total = 0;
    loop {
        let (taken, deleted) = batch_op().await?;
        total += deleted;
        if taken < batch || stop.is_cancelled() {
            return Ok(total);
        }
    }
}
