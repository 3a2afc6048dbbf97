//! The transitions a worker makes on the job it holds a [`JobClaim`] on.

use std::time::Duration;

use entity::{JobStatus, jobs};
use sea_orm::{ConnectionTrait, EntityTrait, QuerySelect, TransactionSession, TransactionTrait};

use super::JobClaim;
use super::transition::{Change, already_made, refused, transition};
use crate::metadata::revisions::{self, Activated};
use crate::metadata::workers;
use crate::metadata::{Error, Result};

/// SCHEDULED → RUNNING, by the worker holding `claim` (the job must be assigned to its node, on its
/// attempt, and the node's claim epoch be the claim's), recording the claim's epoch on the job. A
/// job already RUNNING through this same claim (a retry whose first commit's answer was lost) is
/// returned as it is; through another claim epoch it is refused.
#[tracing::instrument(skip(db), err)]
pub async fn mark_running<C>(db: &C, claim: &JobClaim) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    transition(db, claim.job_id, Change::claimed(JobStatus::Running, claim)).await
}

/// What [`mark_completed`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    /// The job, now COMPLETED.
    pub job: jobs::Model,
    /// The revisions it activated, each with the one it replaced.
    pub activated: Vec<Activated>,
}

/// RUNNING → COMPLETED by the worker holding `claim`, and the job's output made visible in the same
/// transaction: each of `revisions` (written by this attempt, see [`revisions::create_revision`])
/// becomes the active revision of its table, the revision it replaces is scheduled for garbage
/// collection `gc_grace` from now, and a `revision_changes` notification is sent for each (all
/// delivered on commit). `Fenced` when the job has moved to another node or attempt, and then
/// nothing is activated: an output revision of a fenced-off attempt is never made visible.
/// `Conflict` when a revision was not written by this attempt or is already scheduled for
/// garbage collection. A job already COMPLETED through this same claim with these revisions active
/// (a retry whose first commit's answer was lost) is returned as it is, with nothing activated.
#[tracing::instrument(skip(db), err)]
pub async fn mark_completed<C>(
    db: &C,
    claim: &JobClaim,
    revisions: &[i64],
    gc_grace: Duration,
) -> Result<Completed>
where
    C: ConnectionTrait + TransactionTrait,
{
    let change = Change::claimed(JobStatus::Completed, claim);
    if revisions.is_empty() {
        // Nothing to make visible: the one guarded statement, as every other transition.
        let job = transition(db, claim.job_id, change).await?;
        return Ok(Completed {
            job,
            activated: Vec::new(),
        });
    }
    let tx = db.begin().await?;
    // The job row first: every other transition of this job waits for this transaction.
    let job = jobs::Entity::find_by_id(claim.job_id)
        .lock_exclusive()
        .one(&tx)
        .await?
        .ok_or_else(|| Error::not_found("job", claim.job_id))?;
    let node_epoch = workers::get(&tx, &claim.node_id)
        .await?
        .map(|w| w.claim_epoch);
    if already_made(&job, node_epoch, &change) && revisions::are_active(&tx, revisions).await? {
        // Completed by this claim already, with these revisions (a retry whose answer was
        // lost): they were activated then.
        tx.commit().await?;
        return Ok(Completed {
            job,
            activated: Vec::new(),
        });
    }
    refused(&job, node_epoch, &change)?;
    let mut activated = Vec::with_capacity(revisions.len());
    for &revision_id in revisions {
        activated.push(revisions::activate_output(&tx, claim, revision_id, gc_grace).await?);
    }
    let job = transition(&tx, claim.job_id, change).await?;
    tx.commit().await?;
    Ok(Completed { job, activated })
}

/// STOP_REQUESTED → STOPPING: the worker holding `claim` has acknowledged the stop request.
#[tracing::instrument(skip(db), err)]
pub async fn mark_stopping<C>(db: &C, claim: &JobClaim) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    transition(
        db,
        claim.job_id,
        Change::claimed(JobStatus::Stopping, claim),
    )
    .await
}

/// STOPPING → STOPPED, by the worker holding `claim`.
#[tracing::instrument(skip(db), err)]
pub async fn mark_stopped<C>(db: &C, claim: &JobClaim) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    transition(db, claim.job_id, Change::claimed(JobStatus::Stopped, claim)).await
}

/// SCHEDULED or RUNNING → ERROR (recoverable; see
/// [`list_due_for_retry`](super::list_due_for_retry)) by the worker holding `claim`, with `detail`
/// as the job's and the event's detail.
#[tracing::instrument(skip(db, detail), err)]
pub async fn mark_error<C>(
    db: &C,
    claim: &JobClaim,
    detail: serde_json::Value,
) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    fail(db, claim, JobStatus::Error, detail).await
}

/// SCHEDULED or RUNNING → FATAL (never retried automatically) by the worker holding `claim`, with
/// `detail`.
#[tracing::instrument(skip(db, detail), err)]
pub async fn mark_fatal<C>(
    db: &C,
    claim: &JobClaim,
    detail: serde_json::Value,
) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    fail(db, claim, JobStatus::Fatal, detail).await
}

/// [`mark_error`] and [`mark_fatal`]: SCHEDULED or RUNNING → `to` with `detail`.
async fn fail<C>(
    db: &C,
    claim: &JobClaim,
    to: JobStatus,
    detail: serde_json::Value,
) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut change = Change::claimed(to, claim);
    change.detail = Some(detail);
    transition(db, claim.job_id, change).await
}
