//! One job's life on a worker, through its claim: `mark_running`, its kind, then
//! `mark_completed` (activating the revisions it wrote), `mark_fatal` (it can never succeed) or
//! `mark_error` (it may, later: the controller retries it).
//!
//! When the job's token is cancelled the reason decides the end:
//! - [`Cancel::Stop`] (the job is STOP_REQUESTED): `mark_stopping` at once, the kind abandons its
//!   work (the file being written is removed), then `mark_stopped`. The partial revision was never
//!   activated; once the job is STOPPED the garbage collector finds it abandoned and deletes it.
//! - [`Cancel::Shutdown`] (the worker is stopping): `mark_error` with `{"reason":
//!   "worker_shutdown", "node_id": ...}`, which the controller retries at once on a live worker; a
//!   job not yet RUNNING stays SCHEDULED for the controller to move.
//! - [`Cancel::Drop`] (the attempt is no longer this worker's): nothing is recorded.
//!
//! A write the database refuses ([`Error::Fenced`], a state conflict, a revision that is no longer
//! writable) makes the runner look at the job again: a stop asked for meanwhile is completed; an
//! attempt that moved on (another node, another attempt, deleted) is dropped at once, its partial
//! revision left to the garbage collector.

use std::sync::{Arc, OnceLock};

use entity::{JobStatus, jobs as job_rows};
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use super::Settings;
use super::kinds::{self, Failure, JobError};
use crate::metadata::jobs::{self, JobClaim};
use crate::metadata::{self, Error};
use crate::service::{retrying, until_stopped};

/// Why a job's token was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// A stop was requested: end STOPPED.
    Stop,
    /// The worker is shutting down: hand the job back (ERROR `worker_shutdown`).
    Shutdown,
    /// The attempt is no longer this worker's: end without recording anything.
    Drop,
}

/// How the worker ends a running job: a token, and the reason it was cancelled (the first one
/// given wins).
#[derive(Clone, Debug, Default)]
pub struct Control {
    token: CancellationToken,
    why: Arc<OnceLock<Cancel>>,
}

impl Control {
    /// Ends the job for `why`, unless it is already ending for another reason.
    pub fn cancel(&self, why: Cancel) {
        let _ = self.why.set(why);
        self.token.cancel();
    }

    fn reason(&self) -> Option<Cancel> {
        self.why.get().copied()
    }
}

/// How an attempt ended, and so what is recorded.
enum End {
    /// Its kind finished: complete the job, activating these revisions.
    Completed(Vec<i64>),
    /// FATAL with this detail.
    Fatal(serde_json::Value),
    /// ERROR with this detail.
    Error(serde_json::Value),
    /// A stop was asked for: STOPPING (if not yet), then STOPPED.
    Stop,
    /// The worker is shutting down: ERROR `worker_shutdown`, retried at once elsewhere.
    HandBack,
    /// Nothing to record.
    Leave,
    /// A write was refused: look at the job again.
    Refused(Error),
}

/// Runs attempt `claim` of `job` until it ends, and records how.
pub async fn run(
    db: DatabaseConnection,
    settings: Arc<Settings>,
    job: job_rows::Model,
    claim: JobClaim,
    control: Control,
) {
    let started = std::time::Instant::now();
    let kind = kinds::find(&job.kind).map_or("unknown", |k| k.name());
    let end = attempt(&db, &settings, job, &claim, &control).await;
    let outcome = end.outcome();
    settle(&db, &settings, &claim, end).await;
    crate::metrics::job_ran(kind, outcome, started.elapsed());
}

impl End {
    /// The `outcome` label of `ampd_job_run_duration_seconds`.
    fn outcome(&self) -> &'static str {
        match self {
            End::Completed(_) => "completed",
            End::Fatal(_) => "fatal",
            End::Error(_) => "error",
            End::Stop => "stopped",
            End::HandBack => "handed_back",
            End::Leave => "left",
            End::Refused(_) => "refused",
        }
    }
}

/// Marks the job RUNNING; `Some(end)` when it did not start, and how the attempt then ends.
async fn start_attempt(
    db: &DatabaseConnection,
    claim: &JobClaim,
    control: &Control,
) -> Option<End> {
    let running = until_stopped(
        &control.token,
        retrying("mark the job running", || jobs::mark_running(db, claim)),
    )
    .await;
    match running {
        None if control.reason() == Some(Cancel::Stop) => Some(End::Stop),
        // Not started: it stays SCHEDULED, for the controller to move (shutdown) or because it is
        // no longer this worker's.
        None => Some(End::Leave),
        Some(Err(e)) if e.is_retryable() => {
            tracing::warn!(error = %e, "could not start the job; trying again at the next reconcile");
            Some(End::Leave)
        }
        Some(Err(e)) => Some(End::Refused(e)),
        Some(Ok(_)) => None,
    }
}

async fn attempt(
    db: &DatabaseConnection,
    settings: &Arc<Settings>,
    job: job_rows::Model,
    claim: &JobClaim,
    control: &Control,
) -> End {
    if let Some(end) = start_attempt(db, claim, control).await {
        return end;
    }
    let Some(kind) = kinds::find(&job.kind) else {
        return End::Fatal(
            Failure::new(
                "unknown_kind",
                format!("this worker runs no job kind {:?}", job.kind),
            )
            .detail(),
        );
    };
    tracing::info!(kind = job.kind, "job started");
    let work = kinds::Job {
        db: db.clone(),
        claim: claim.clone(),
        descriptor: job.descriptor,
        settings: settings.clone(),
        cancel: control.token.clone(),
    };
    let run = kind.run(&work);
    tokio::pin!(run);
    let ran = tokio::select! {
        ran = &mut run => ran,
        () = control.token.cancelled() => {
            if control.reason() == Some(Cancel::Stop) {
                // Acknowledge at once; the kind sees the token and abandons its work.
                if let Err(e) = retrying("mark the job stopping", || jobs::mark_stopping(db, claim)).await {
                    tracing::warn!(error = %e, "could not mark the job stopping");
                }
            }
            run.await
        }
    };
    match ran {
        Ok(revisions) => End::Completed(revisions),
        Err(JobError::Fatal(failure)) => End::Fatal(failure.detail()),
        Err(JobError::Failed(failure)) => End::Error(failure.detail()),
        Err(JobError::Refused(e)) => End::Refused(*e),
        Err(JobError::Cancelled) => match control.reason() {
            Some(Cancel::Stop) => End::Stop,
            Some(Cancel::Shutdown) => End::HandBack,
            Some(Cancel::Drop) | None => End::Leave,
        },
    }
}

/// Records `end`. A refusal makes it look at the job again; any other failure (a database that
/// stays unavailable) leaves the job as it is, for this worker's next reconcile (a RUNNING job it
/// no longer runs is failed as `worker_lost`) or the controller.
async fn settle(db: &DatabaseConnection, settings: &Settings, claim: &JobClaim, end: End) {
    let recorded = match end {
        End::Leave => {
            tracing::info!("job left as it is");
            return;
        }
        End::Stop => return stop(db, claim).await,
        End::Refused(e) => return reconsider(db, claim, e).await,
        End::Completed(revisions) => retrying("complete the job", || {
            jobs::mark_completed(db, claim, &revisions, settings.gc_grace)
        })
        .await
        .map(|done| done.job),
        End::Fatal(detail) => {
            tracing::warn!(%detail, "job failed for good");
            retrying("mark the job fatal", || {
                jobs::mark_fatal(db, claim, detail.clone())
            })
            .await
        }
        End::HandBack => {
            let detail = serde_json::json!({
                "reason": jobs::WORKER_SHUTDOWN,
                "node_id": claim.node_id,
            });
            tracing::info!("handing the job back");
            retrying("hand the job back", || {
                jobs::mark_error(db, claim, detail.clone())
            })
            .await
        }
        End::Error(detail) => {
            tracing::warn!(%detail, "job failed; the controller retries it");
            retrying("mark the job failed", || {
                jobs::mark_error(db, claim, detail.clone())
            })
            .await
        }
    };
    match recorded {
        Ok(job) => tracing::info!(status = %job.status, "job ended"),
        Err(e) if refusal(&e) => reconsider(db, claim, e).await,
        Err(e) => tracing::error!(
            error = %e,
            "could not record how the job ended; it is left to recovery"
        ),
    }
}

/// Whether `err` says the database refused the claim or the write, rather than failed.
fn refusal(err: &Error) -> bool {
    matches!(
        err,
        Error::Fenced { .. }
            | Error::StateConflict { .. }
            | Error::NotFound { .. }
            | Error::Conflict(_)
    )
}

/// A write of attempt `claim` was refused with `err`: completes a stop asked for meanwhile, fails
/// an attempt that still runs here (its output could not be written), and drops one that moved on.
async fn reconsider(db: &DatabaseConnection, claim: &JobClaim, err: Error) {
    let job = match retrying("read the job", || jobs::get(db, claim.job_id)).await {
        Ok(Some(job)) => job,
        Ok(None) => {
            tracing::info!(error = %err, "job was deleted; dropped");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, refused = %err, "cannot read the job; it is left to recovery");
            return;
        }
    };
    if !claim.holds(&job) {
        tracing::info!(
            error = %err,
            node_id = ?job.node_id,
            attempt = job.attempt,
            claim_epoch = ?job.claim_epoch,
            "the job has moved on: this attempt is dropped, its partial output left to the \
             garbage collector"
        );
        return;
    }
    match job.job_status() {
        Ok(JobStatus::StopRequested | JobStatus::Stopping) => stop(db, claim).await,
        Ok(JobStatus::Running) => {
            let detail = Failure::new("refused", kinds::chain(&err)).detail();
            tracing::warn!(%detail, "the job's output was refused; marking it failed");
            match retrying("mark the job failed", || {
                jobs::mark_error(db, claim, detail.clone())
            })
            .await
            {
                Ok(job) => tracing::info!(status = %job.status, "job ended"),
                Err(e) => tracing::error!(error = %e, "could not mark the job failed"),
            }
        }
        Ok(status) => tracing::info!(%status, refused = %err, "job already ended"),
        Err(e) => tracing::warn!(error = %e, "job has an unknown status"),
    }
}

/// Completes a stop through attempt `claim`, retrying while the database is unavailable.
async fn stop(db: &DatabaseConnection, claim: &JobClaim) {
    match retrying("stop the job", || complete_stop(db, claim)).await {
        Ok(()) => tracing::info!("job stopped"),
        Err(e) => tracing::warn!(error = %e, "could not complete the stop"),
    }
}

/// STOP_REQUESTED → STOPPING → STOPPED (or STOPPING → STOPPED) through `claim`: what a worker
/// records for a stop it was asked for, whether it ran the job or not. The attempt's partial
/// output is never activated; the garbage collector deletes it once the job is STOPPED.
pub async fn complete_stop(db: &DatabaseConnection, claim: &JobClaim) -> metadata::Result<()> {
    match jobs::mark_stopping(db, claim).await {
        Ok(_)
        | Err(Error::StateConflict {
            actual: JobStatus::Stopping,
            ..
        }) => {}
        Err(e) => return Err(e),
    }
    jobs::mark_stopped(db, claim).await?;
    Ok(())
}
