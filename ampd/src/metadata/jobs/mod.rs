//! Jobs: idempotent scheduling, the guarded transitions of SCHEMA.md's state machine, assignment
//! to worker nodes, fencing of workers, recovery of a lost worker's jobs, and the queries the
//! controller needs (orphaned jobs, jobs due for a retry).
//!
//! # Attempts
//! `attempt` counts (re)schedules: a new job starts at 1, and every move back to SCHEDULED
//! ([`schedule()`] of a stopped or failed job's key, [`reschedule`]) adds one. So `attempt` is the
//! number of the run the job is on. ([`give_up`] passes through SCHEDULED without a new attempt.)
//!
//! # Fencing
//! A worker acts on a job only through a [`JobClaim`]: the job, its node, its attempt and the
//! claim epoch of the process holding the node id (`workers.claim_epoch`, raised by every claim of
//! the node id by a new process). Every worker-side transition ([`mark_running`],
//! [`mark_completed`], [`mark_error`], [`mark_fatal`], [`mark_stopping`], [`mark_stopped`]) is
//! guarded on all four (the node's epoch read in the same statement) and otherwise refused with
//! [`Error::Fenced`], changing nothing: two processes with one node id never both pass. The
//! transition records the epoch on the job (`jobs.claim_epoch`), so a worker tells its own
//! transition from another process's: a worker-side transition the job has already made through
//! the same claim (node, attempt *and* epoch; a retry whose first commit's answer was lost) returns
//! the job as it is, with no second event, and any other claim is refused. The controller's operations ([`reschedule`], [`reassign`],
//! [`fail_lost`], [`stop_lost`], [`give_up`]) are guarded the same way on the row the controller
//! saw, so two controllers acting on one job never both apply.
//!
//! # A lost worker's jobs
//! Recovery stays inside SCHEMA.md's state machine: a RUNNING job of a worker that stopped
//! heartbeating goes to ERROR with the [`worker_lost`] detail ([`fail_lost`], which checks in the
//! same statement that the worker is still silent), and its retry ([`list_due_for_retry`] offers it
//! at once, [`reschedule`] runs it) is a new attempt on a live worker: the lost worker's claim names
//! the old attempt, so whatever it does if it comes back is refused. A SCHEDULED job that never
//! started moves directly ([`reassign`]); a STOP_REQUESTED or STOPPING job is stopped for it
//! ([`stop_lost`]). A job's status is one column, so two attempts are never RUNNING at once.
//!
//! A worker is lost when its heartbeat is older than `liveness_window_ms` (a worker that shuts down
//! calls `workers::sign_off` and is not live at once). For each active job of a lost worker the
//! controller:
//!
//! | the job is | the controller | events |
//! |---|---|---|
//! | RUNNING | [`fail_lost`]: ERROR with `{"reason": "worker_lost", "node_id": ...}`; [`list_due_for_retry`] offers it at once (no backoff), and [`reschedule`] gives it a new attempt on a live worker | `ERROR` (worker_lost), `SCHEDULED` (attempt + 1, the new node) |
//! | SCHEDULED (or unassigned) | [`reassign`] to a live worker (it never started, so the attempt stays) | `SCHEDULED` (the new node) |
//! | STOP_REQUESTED / STOPPING (also on no node) | [`stop_lost`]: STOPPED through STOPPING | `STOPPING`, `STOPPED`, both with the worker_lost detail |
//!
//! An ERROR job that has failed on `[controller] max_attempts` attempts is given up ([`give_up`]):
//! FATAL with `{"reason": "max_attempts", "attempts": n, "last_error": ...}`. SCHEMA.md has no
//! ERROR → FATAL edge, so this passes through SCHEDULED in the same transaction, unassigned and
//! without a notification (no worker ever sees it) and without a new attempt.
//!
//! # Events
//! Every transition appends one `job_events` row in the same statement: `event_type` the new
//! status, `node_id` the job's node after the transition, `detail` the descriptor for SCHEDULED,
//! the error payload for ERROR and FATAL, NULL otherwise (the lost-worker stops carry the
//! [`worker_lost`] detail). [`reassign`] keeps the status and appends a SCHEDULED event naming the
//! new node.
//!
//! # Why raw SQL here
//! The transitions and [`schedule()`] are hot paths: each is one statement (one round trip), a CTE
//! doing the guarded `UPDATE ... RETURNING` (or the `INSERT ... ON CONFLICT`), the event `INSERT`
//! and the `pg_notify` together, and reading the current row back when the guard did not match, so
//! `NotFound` and `StateConflict` need no second query. Such a statement (data-modifying CTEs,
//! `pg_notify`, a `UNION ALL` fallback) reads and reviews far more plainly as SQL than through
//! sea-query's builder, and the same text is what a pgbench comparison runs, so these are
//! `Statement::from_sql_and_values` with bound parameters; the only text spliced into them is
//! placeholders (`$n`) and fixed SQL fragments, never a value.

mod controller;
mod query;
mod retention;
mod schedule;
mod transition;
mod worker;

pub use controller::{
    fail_lost, give_up, reassign, request_stop, reschedule, stop_lost, worker_lost,
};
pub use query::{
    delete, delete_terminal, get, list, list_active_for_node, list_active_for_nodes,
    list_due_for_retry, list_events, list_events_page, list_orphaned, list_orphaned_statement,
};
pub use retention::{EventsPurged, delete_events_of_finished, delete_finished};
pub use schedule::schedule;
pub use worker::{
    Completed, mark_completed, mark_error, mark_fatal, mark_running, mark_stopped, mark_stopping,
};

use entity::{JobStatus, jobs};
use sea_orm::DbErr;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::Assignment;
use super::{Error, Result};

/// The statuses of a job that is not done: SCHEDULED, RUNNING, STOP_REQUESTED, STOPPING.
pub const ACTIVE: [JobStatus; 4] = [
    JobStatus::Scheduled,
    JobStatus::Running,
    JobStatus::StopRequested,
    JobStatus::Stopping,
];

/// The terminal statuses: COMPLETED, STOPPED, ERROR, FATAL.
pub const TERMINAL: [JobStatus; 4] = [
    JobStatus::Completed,
    JobStatus::Stopped,
    JobStatus::Error,
    JobStatus::Fatal,
];

/// The `reason` of the detail of a job whose worker stopped heartbeating ([`fail_lost`]).
pub const WORKER_LOST: &str = "worker_lost";
/// The `reason` of the detail of a job its worker handed back when shutting down.
pub const WORKER_SHUTDOWN: &str = "worker_shutdown";

/// How many times a statement that lost a race with a concurrent writer is run again before the
/// function gives up with `Conflict`.
const RACE_RETRIES: usize = 8;

/// What [`schedule()`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduled {
    /// No job had this key: a new one was created (SCHEDULED, attempt 1).
    Created,
    /// A job with this key and the same descriptor exists and is active (or COMPLETED): it is
    /// returned unchanged.
    Existing,
    /// The job with this key had stopped or failed (STOPPED, ERROR, FATAL): it was moved back to
    /// SCHEDULED with the new descriptor, `attempt + 1`, no detail, and an event.
    Rescheduled,
}

/// The fields of a descriptor that name what a job runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// Dataset namespace.
    pub namespace: &'a str,
    /// Dataset name.
    pub name: &'a str,
    /// Hash of the dataset manifest.
    pub manifest_hash: &'a str,
}

/// Reads `namespace`, `name` and `manifest_hash` (non-empty strings) from a descriptor.
pub fn target(descriptor: &serde_json::Value) -> Result<Target<'_>> {
    let field = |name: &str| match descriptor.get(name) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.as_str()),
        _ => Err(Error::InvalidInput(format!(
            "a job descriptor needs a non-empty string field {name:?} (it needs namespace, name \
             and manifest_hash)"
        ))),
    };
    Ok(Target {
        namespace: field("namespace")?,
        name: field("name")?,
        manifest_hash: field("manifest_hash")?,
    })
}

/// The idempotency key of a job: hex sha256 of `kind:namespace/name@manifest_hash`.
pub fn idempotency_key(kind: &str, target: &Target<'_>) -> String {
    let text = format!(
        "{kind}:{}/{}@{}",
        target.namespace, target.name, target.manifest_hash
    );
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn status_of(job: &jobs::Model) -> Result<JobStatus> {
    job.job_status()
        .map_err(|e| Error::Db(DbErr::Type(format!("job {}: {e}", job.id))))
}

/// A worker's hold on one attempt of a job: the job, the node it is assigned to, the attempt it
/// is on, and the claim epoch of the process that holds the node id ([`workers::claim`]). Every
/// worker-side transition goes through one and applies only while the job is still assigned to that
/// node on that attempt and the node's claim epoch is still this one ([`Error::Fenced`] otherwise),
/// so neither a worker that stalled while its job moved on nor a second process with the same node
/// id can change it.
///
/// [`workers::claim`]: crate::metadata::workers::claim
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct JobClaim {
    /// The job.
    pub job_id: i64,
    /// The node the job is assigned to.
    pub node_id: String,
    /// The attempt the job is on.
    pub attempt: i32,
    /// The claim epoch of the node id's holder (`workers.claim_epoch`; 0 for a worker that
    /// registered without claiming its node id).
    pub epoch: i64,
}

impl JobClaim {
    /// The claim on `job`'s current attempt by the process holding claim `epoch` of the node the
    /// job is assigned to (`None` when it is assigned to no node).
    pub fn by(job: &jobs::Model, epoch: i64) -> Option<JobClaim> {
        Some(JobClaim {
            job_id: job.id,
            node_id: job.node_id.clone()?,
            attempt: job.attempt,
            epoch,
        })
    }

    /// The claim on `job`'s current attempt by the node it is assigned to, with the claim epoch
    /// that last moved the job (0, that of a worker that never claimed its node id, for a job no
    /// worker has moved yet) (`None` when it is assigned to no node).
    pub fn of(job: &jobs::Model) -> Option<JobClaim> {
        JobClaim::by(job, job.claim_epoch.unwrap_or(0))
    }

    /// Whether `job` is still this claim's: the same node and attempt, and moved by no other
    /// claim epoch than this one.
    pub fn holds(&self, job: &jobs::Model) -> bool {
        job.id == self.job_id
            && job.node_id.as_deref() == Some(self.node_id.as_str())
            && job.attempt == self.attempt
            && job.claim_epoch.is_none_or(|epoch| epoch == self.epoch)
    }

    fn assignment(&self) -> Assignment {
        Assignment {
            node_id: Some(self.node_id.clone()),
            attempt: self.attempt,
            epoch: Some(self.epoch),
        }
    }
}

fn assignment_of(job: &jobs::Model) -> Assignment {
    Assignment {
        node_id: job.node_id.clone(),
        attempt: job.attempt,
        epoch: None,
    }
}
