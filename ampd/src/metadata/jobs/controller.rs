//! The controller's operations on a job as it saw it: stop requests, retries, reassignment, and
//! the recovery of a lost worker's jobs.

use std::time::Duration;

use entity::{JobStatus, jobs};
use sea_orm::{ConnectionTrait, TransactionSession, TransactionTrait};

use super::transition::{Change, transition};
use super::{WORKER_LOST, status_of};
use crate::metadata::notifications::Action;
use crate::metadata::workers::validate_node_id;
use crate::metadata::{Result, micros};

/// SCHEDULED or RUNNING → STOP_REQUESTED, and a `job_actions` STOP notification to the job's node
/// when it has one (in the same statement). Anyone may ask; the worker acknowledges with
/// [`mark_stopping`](super::mark_stopping).
#[tracing::instrument(skip(db), err)]
pub async fn request_stop<C>(db: &C, job_id: i64) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut change = Change::to(JobStatus::StopRequested);
    change.notify = Some(Action::Stop);
    transition(db, job_id, change).await
}

/// ERROR, STOPPED or FATAL → SCHEDULED (a retry or a re-deploy) of the job as the caller saw it
/// (`seen`: the same node and attempt, else `Fenced`): `attempt + 1`, no detail, assigned to
/// `node_id` (or to no node), and a `job_actions` START notification when it has a node.
#[tracing::instrument(skip(db, seen), fields(job_id = seen.id), err)]
pub async fn reschedule<C>(db: &C, seen: &jobs::Model, node_id: Option<&str>) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    if let Some(node) = node_id {
        validate_node_id(node)?;
    }
    let mut change = Change::seen(JobStatus::Scheduled, seen);
    change.node = Some(node_id);
    change.next_attempt = true;
    change.notify = Some(Action::Start);
    transition(db, seen.id, change).await
}

/// Moves a SCHEDULED job, as the caller saw it (`seen`: the same node and attempt, else `Fenced`),
/// to node `to_node` (`None`: unassign): a job placed on a worker, or taken from a dead one before
/// it started. Appends a SCHEDULED event naming the new node and sends it START. Only a job that has
/// not started may move: a RUNNING job of a lost worker goes through [`fail_lost`] and a new
/// attempt, so that two workers never run the same attempt.
#[tracing::instrument(skip(db, seen), fields(job_id = seen.id), err)]
pub async fn reassign<C>(db: &C, seen: &jobs::Model, to_node: Option<&str>) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    if let Some(node) = to_node {
        validate_node_id(node)?;
    }
    let mut change = Change::seen(JobStatus::Scheduled, seen);
    change.from = vec![JobStatus::Scheduled];
    change.node = Some(to_node);
    change.notify = Some(Action::Start);
    transition(db, seen.id, change).await
}

/// The detail of a job whose worker was lost: `{"reason": "worker_lost", "node_id": ...}`.
pub fn worker_lost(node_id: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "reason": WORKER_LOST, "node_id": node_id })
}

/// RUNNING → ERROR of a job whose worker is lost: `seen` (the job as the caller saw it, same node
/// and attempt, else `Fenced`) is on a node that has sent no heartbeat for `window` (by the database
/// clock, checked in the same statement: `Conflict` if it has), or on no node at all. The detail is
/// [`worker_lost`]; [`list_due_for_retry`](super::list_due_for_retry) offers such a job at once,
/// and its retry is a new attempt, which fences off the lost worker should it come back.
#[tracing::instrument(skip(db, seen), fields(job_id = seen.id), err)]
pub async fn fail_lost<C>(db: &C, seen: &jobs::Model, window: Duration) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut change = Change::seen(JobStatus::Error, seen);
    change.from = vec![JobStatus::Running];
    change.node_dead_for = Some(micros("liveness window", window)?);
    change.detail = Some(worker_lost(seen.node_id.as_deref()));
    transition(db, seen.id, change).await
}

/// STOP_REQUESTED or STOPPING → STOPPED of a job whose worker is lost (as in [`fail_lost`]), through
/// STOPPING, in one transaction: the stop it was asked for completes without the worker. Both events
/// carry the [`worker_lost`] detail. A job on no node (asked to stop before it was placed) is lost
/// in this sense: no worker will ever acknowledge its stop.
#[tracing::instrument(skip(db, seen), fields(job_id = seen.id), err)]
pub async fn stop_lost<C>(db: &C, seen: &jobs::Model, window: Duration) -> Result<jobs::Model>
where
    C: ConnectionTrait + TransactionTrait,
{
    let window = micros("liveness window", window)?;
    let lost = worker_lost(seen.node_id.as_deref());
    let tx = db.begin().await?;
    if status_of(seen)? == JobStatus::StopRequested {
        let mut change = Change::seen(JobStatus::Stopping, seen);
        change.node_dead_for = Some(window);
        change.event_detail = Some(lost.clone());
        transition(&tx, seen.id, change).await?;
    }
    let mut change = Change::seen(JobStatus::Stopped, seen);
    change.node_dead_for = Some(window);
    change.event_detail = Some(lost);
    let job = transition(&tx, seen.id, change).await?;
    tx.commit().await?;
    Ok(job)
}

/// ERROR → FATAL of a job that will not be retried any more (it has used up its attempts), with
/// `detail`. SCHEMA.md has no ERROR → FATAL edge, so it goes through SCHEDULED, in one transaction,
/// unassigned and without a notification, so no worker ever sees it scheduled; `attempt` is not
/// incremented (no attempt is made). Events: SCHEDULED, then FATAL with `detail`.
#[tracing::instrument(skip(db, seen, detail), fields(job_id = seen.id), err)]
pub async fn give_up<C>(
    db: &C,
    seen: &jobs::Model,
    detail: serde_json::Value,
) -> Result<jobs::Model>
where
    C: ConnectionTrait + TransactionTrait,
{
    let tx = db.begin().await?;
    let mut change = Change::seen(JobStatus::Scheduled, seen);
    change.from = vec![JobStatus::Error];
    change.node = Some(None);
    let scheduled = transition(&tx, seen.id, change).await?;
    let mut change = Change::seen(JobStatus::Fatal, &scheduled);
    change.detail = Some(detail);
    let job = transition(&tx, seen.id, change).await?;
    tx.commit().await?;
    Ok(job)
}
