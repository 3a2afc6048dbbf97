//! Jobs: idempotent scheduling, the guarded transitions of SCHEMA.md's state machine, assignment
//! to worker nodes, fencing of workers, recovery of a lost worker's jobs, and the queries the
//! controller needs (orphaned jobs, jobs due for a retry).
//!
//! # Attempts
//! `attempt` counts (re)schedules: a new job starts at 1, and every move back to SCHEDULED
//! ([`schedule`] of a stopped or failed job's key, [`reschedule`]) adds one. So `attempt` is the
//! number of the run the job is on. ([`give_up`] passes through SCHEDULED without a new attempt.)
//!
//! # Fencing
//! A worker acts on a job only through a [`JobClaim`]: the job, its node and its attempt. Every
//! worker-side transition ([`mark_running`], [`mark_completed`], [`mark_error`], [`mark_fatal`],
//! [`mark_stopping`], [`mark_stopped`]) is guarded on all three and otherwise refused with
//! [`Error::Fenced`], changing nothing. The controller's operations ([`reschedule`], [`reassign`],
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
//! # Events
//! Every transition appends one `job_events` row in the same statement: `event_type` the new
//! status, `node_id` the job's node after the transition, `detail` the descriptor for SCHEDULED,
//! the error payload for ERROR and FATAL, NULL otherwise (the lost-worker stops carry the
//! [`worker_lost`] detail). [`reassign`] keeps the status and appends a SCHEDULED event naming the
//! new node.
//!
//! # Why raw SQL here
//! The transitions and [`schedule`] are hot paths: each is one statement (one round trip), a CTE
//! doing the guarded `UPDATE ... RETURNING` (or the `INSERT ... ON CONFLICT`), the event `INSERT`
//! and the `pg_notify` together, and reading the current row back when the guard did not match, so
//! `NotFound` and `StateConflict` need no second query. Such a statement (data-modifying CTEs,
//! `pg_notify`, a `UNION ALL` fallback) reads and reviews far more plainly as SQL than through
//! sea-query's builder, and the same text is what a pgbench comparison runs, so these are
//! `Statement::from_sql_and_values` with bound parameters; the only text spliced into them is
//! placeholders (`$n`) and fixed SQL fragments, never a value.

use std::time::Duration;

use entity::{JobStatus, job_events, jobs, workers};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult,
    QueryFilter, QueryOrder, QueryResult, QuerySelect, Statement, TransactionSession,
    TransactionTrait, Value,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::Assignment;
use super::notifications::Action;
use super::revisions::{self, Activated};
use super::workers::validate_node_id;
use super::{Error, Result, micros};

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

/// What [`schedule`] did.
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

fn stmt(sql: String, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

fn model(row: &QueryResult) -> Result<jobs::Model> {
    Ok(jobs::Model::from_query_result(row, "")?)
}

fn status_of(job: &jobs::Model) -> Result<JobStatus> {
    job.job_status()
        .map_err(|e| Error::Db(DbErr::Type(format!("job {}: {e}", job.id))))
}

/// A foreign key violation of `jobs.node_id` means the node never registered.
fn unknown_worker(node_id: Option<&str>) -> impl Fn(Error) -> Error + '_ {
    move |err| match (err.constraint(), node_id) {
        (Some("jobs_node_id_fkey"), Some(node)) => Error::not_found("worker", node),
        _ => err,
    }
}

/// `job_actions` notification for every row of CTE `changed` that has a node, `action` an SQL
/// expression over that row. Referenced from the final SELECT (an unreferenced SELECT CTE is not
/// run).
fn notify_cte(changed: &str, action: &str) -> String {
    format!(
        "notified AS ( \
            SELECT pg_notify('job_actions', json_build_object('node_id', node_id, 'job_id', id, \
                'action', {action})::text) \
            FROM {changed} WHERE node_id IS NOT NULL)"
    )
}

/// Schedules a job of `kind` running `descriptor` (which must name `namespace`, `name` and
/// `manifest_hash`), idempotently by its key ([`idempotency_key`]):
/// - no job with the key: creates one (SCHEDULED, attempt 1) → [`Scheduled::Created`];
/// - an active or COMPLETED job with the key and an equal descriptor (compared as `jsonb`): returns
///   it unchanged → [`Scheduled::Existing`]; with another descriptor: `Conflict`;
/// - a STOPPED, ERROR or FATAL job with the key: moves it back to SCHEDULED with this descriptor,
///   `attempt + 1` and no detail → [`Scheduled::Rescheduled`] (COMPLETED never goes back: SCHEMA.md
///   has no COMPLETED → SCHEDULED edge; delete the job to run it again).
///
/// A created or rescheduled job is assigned to `node_id` (or to no node), gets its SCHEDULED event,
/// and, when it has a node, a `job_actions` START notification, all in the one statement; with the
/// caller's transaction, the notification is delivered when that commits. An unknown node is
/// `NotFound`.
///
/// One round trip, unless a concurrent `schedule` of the same key committed after this
/// statement's snapshot was taken: then the statement runs again (the `ON CONFLICT` waited for the
/// other insert, so the next snapshot sees it). Sixteen concurrent calls create one job.
#[tracing::instrument(skip(db, descriptor), err)]
pub async fn schedule<C>(
    db: &C,
    kind: &str,
    descriptor: serde_json::Value,
    node_id: Option<&str>,
) -> Result<(jobs::Model, Scheduled)>
where
    C: ConnectionTrait,
{
    if kind.is_empty() {
        return Err(Error::InvalidInput("a job kind must not be empty".into()));
    }
    if let Some(node) = node_id {
        validate_node_id(node)?;
    }
    let (key, what) = {
        let target = target(&descriptor)?;
        let what = format!(
            "{kind} of {}/{}@{}",
            target.namespace, target.name, target.manifest_hash
        );
        (idempotency_key(kind, &target), what)
    };
    let mut p = Params::default();
    let (key, kind, node, descriptor) = (
        p.push(key),
        p.push(kind),
        p.push(node_id.map(str::to_owned)),
        p.push(descriptor),
    );
    let retry_from = p.list(&JobStatus::Scheduled.predecessors());
    let sql = format!(
        "WITH created AS ( \
            INSERT INTO jobs (idempotency_key, kind, node_id, descriptor, status, attempt) \
            VALUES ({key}, {kind}, {node}, {descriptor}::jsonb, 'SCHEDULED', 1) \
            ON CONFLICT (idempotency_key) DO NOTHING \
            RETURNING *), \
        rescheduled AS ( \
            UPDATE jobs SET status = 'SCHEDULED', attempt = attempt + 1, \
                descriptor = {descriptor}::jsonb, detail = NULL, node_id = {node}, \
                updated_at = now() \
            WHERE idempotency_key = {key} AND status IN ({retry_from}) \
                AND NOT EXISTS (SELECT 1 FROM created) \
            RETURNING *), \
        changed AS ( \
            SELECT *, 'created'::text AS outcome FROM created \
            UNION ALL \
            SELECT *, 'rescheduled'::text FROM rescheduled), \
        event AS ( \
            INSERT INTO job_events (job_id, node_id, event_type, detail) \
            SELECT id, node_id, 'SCHEDULED', descriptor FROM changed), \
        {notify} \
        SELECT changed.*, TRUE AS same_descriptor, (SELECT count(*) FROM notified) AS notified \
        FROM changed \
        UNION ALL \
        SELECT jobs.*, 'existing', jobs.descriptor = {descriptor}::jsonb, 0::bigint FROM jobs \
        WHERE idempotency_key = {key} AND NOT EXISTS (SELECT 1 FROM changed)",
        notify = notify_cte("changed", "'START'"),
    );
    let values = p.0;

    for _ in 0..RACE_RETRIES {
        let row = db
            .query_one_raw(stmt(sql.clone(), values.clone()))
            .await
            .map_err(Error::from)
            .map_err(unknown_worker(node_id))?;
        // No row: the key's job was inserted by a transaction that committed after this
        // statement's snapshot. Run again with a new snapshot.
        let Some(row) = row else { continue };
        let job = model(&row)?;
        let outcome: String = row.try_get("", "outcome")?;
        match outcome.as_str() {
            "created" => return Ok((job, Scheduled::Created)),
            "rescheduled" => return Ok((job, Scheduled::Rescheduled)),
            _ => {}
        }
        let status = status_of(&job)?;
        if status.can_transition_to(JobStatus::Scheduled) {
            // The snapshot showed a stopped or failed job that a concurrent `schedule` has
            // rescheduled meanwhile: look again.
            continue;
        }
        let same: bool = row.try_get("", "same_descriptor")?;
        if !same {
            let advice = if status == JobStatus::Completed {
                "delete the finished job to run it again"
            } else {
                "stop it first, or wait for it to finish"
            };
            return Err(Error::Conflict(format!(
                "job {} ({status}) is the {what} with another descriptor; {advice}",
                job.id
            )));
        }
        return Ok((job, Scheduled::Existing));
    }
    Err(Error::Conflict(format!(
        "scheduling the {what} kept racing with concurrent writers; try again"
    )))
}

/// A worker's hold on one attempt of a job: the job, the node it is assigned to and the attempt it
/// is on. Every worker-side transition goes through one and applies only while the job is still
/// assigned to that node on that attempt ([`Error::Fenced`] otherwise), so a worker that stalled
/// while its job moved on can never change it again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct JobClaim {
    /// The job.
    pub job_id: i64,
    /// The node the job is assigned to.
    pub node_id: String,
    /// The attempt the job is on.
    pub attempt: i32,
}

impl JobClaim {
    /// The claim on `job`'s current attempt by the node it is assigned to (`None` when it is
    /// assigned to no node).
    pub fn of(job: &jobs::Model) -> Option<JobClaim> {
        Some(JobClaim {
            job_id: job.id,
            node_id: job.node_id.clone()?,
            attempt: job.attempt,
        })
    }

    fn assignment(&self) -> Assignment {
        Assignment {
            node_id: Some(self.node_id.clone()),
            attempt: self.attempt,
        }
    }
}

fn assignment_of(job: &jobs::Model) -> Assignment {
    Assignment {
        node_id: job.node_id.clone(),
        attempt: job.attempt,
    }
}

/// Bound parameters of a statement being written: [`Params::push`] adds a value and gives its
/// placeholder, so no `$n` is ever numbered by hand.
#[derive(Default)]
struct Params(Vec<Value>);

impl Params {
    fn push(&mut self, value: impl Into<Value>) -> String {
        self.0.push(value.into());
        format!("${}", self.0.len())
    }

    fn list(&mut self, statuses: &[JobStatus]) -> String {
        statuses
            .iter()
            .map(|s| self.push(s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a transition changes, and what it must find to apply.
struct Change<'a> {
    to: JobStatus,
    /// The statuses it may start from (the target's predecessors unless narrowed).
    from: Vec<JobStatus>,
    /// The job must still be assigned to this node on this attempt (a claim, or what the caller saw).
    guard: Option<Assignment>,
    /// The job's node must not have sent a heartbeat within this window (microseconds).
    node_dead_for: Option<i64>,
    /// `Some(node)`: set `node_id` to `node` (NULL for `None`); `None`: keep it.
    node: Option<Option<&'a str>>,
    /// The new `detail` (NULL when `None`).
    detail: Option<serde_json::Value>,
    /// The event's detail, when it is not the default (the descriptor for SCHEDULED, else `detail`).
    event_detail: Option<serde_json::Value>,
    /// `attempt = attempt + 1`.
    next_attempt: bool,
    /// Send this `job_actions` notification to the job's node, if it has one.
    notify: Option<Action>,
}

impl<'a> Change<'a> {
    fn to(to: JobStatus) -> Self {
        Change {
            to,
            from: to.predecessors(),
            guard: None,
            node_dead_for: None,
            node: None,
            detail: None,
            event_detail: None,
            next_attempt: false,
            notify: None,
        }
    }

    fn claimed(to: JobStatus, claim: &JobClaim) -> Self {
        Change {
            guard: Some(claim.assignment()),
            ..Change::to(to)
        }
    }

    fn seen(to: JobStatus, seen: &jobs::Model) -> Self {
        Change {
            guard: Some(assignment_of(seen)),
            ..Change::to(to)
        }
    }
}

/// Applies one guarded transition in one statement: `UPDATE jobs ... WHERE id = $1 AND status IN
/// (<from>) [AND node_id/attempt as guarded] [AND the node is dead]`, its event, its notification,
/// and the current row when a guard did not match, to tell `NotFound`, `Fenced`, `StateConflict`
/// and a live node apart without a second query.
async fn transition<C>(db: &C, job_id: i64, change: Change<'_>) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut p = Params::default();
    let id = p.push(job_id);
    let mut set = format!(
        "status = {}, detail = {}::jsonb, updated_at = now()",
        p.push(change.to.as_str()),
        p.push(change.detail.clone())
    );
    if let Some(node) = change.node {
        set.push_str(&format!(", node_id = {}", p.push(node.map(str::to_owned))));
    }
    if change.next_attempt {
        set.push_str(", attempt = attempt + 1");
    }
    let mut guard = format!("status IN ({})", p.list(&change.from));
    if let Some(a) = &change.guard {
        guard.push_str(&format!(
            " AND node_id IS NOT DISTINCT FROM {} AND attempt = {}",
            p.push(a.node_id.clone()),
            p.push(a.attempt)
        ));
    }
    let node_dead = match change.node_dead_for {
        Some(window) => format!(
            "EXISTS (SELECT 1 FROM workers w WHERE w.node_id = jobs.node_id \
             AND w.heartbeat_at <= now() - {} * interval '1 microsecond')",
            p.push(window)
        ),
        None => "TRUE".to_owned(),
    };
    let event_detail = p.push(change.event_detail.clone());
    let (notify_cte, notified) = match change.notify {
        Some(action) => {
            let action = format!("{}::text", p.push(action.as_str()));
            (
                format!(", {}", notify_cte("updated", &action)),
                "(SELECT count(*) FROM notified)",
            )
        }
        None => (String::new(), "0::bigint"),
    };
    let sql = format!(
        "WITH updated AS ( \
            UPDATE jobs SET {set} WHERE id = {id} AND {guard} AND {node_dead} RETURNING *), \
        event AS ( \
            INSERT INTO job_events (job_id, node_id, event_type, detail) \
            SELECT id, node_id, status, COALESCE({event_detail}::jsonb, \
                CASE WHEN status = 'SCHEDULED' THEN descriptor ELSE detail END) \
            FROM updated){notify_cte} \
        SELECT updated.*, TRUE AS applied, TRUE AS node_dead, {notified} AS notified \
        FROM updated \
        UNION ALL \
        SELECT jobs.*, FALSE, {node_dead}, 0::bigint FROM jobs \
        WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM updated)"
    );
    let node = change.node.flatten();
    for _ in 0..RACE_RETRIES {
        let row = db
            .query_one_raw(stmt(sql.clone(), p.0.clone()))
            .await
            .map_err(Error::from)
            .map_err(unknown_worker(node))?;
        let Some(row) = row else {
            return Err(Error::not_found("job", job_id));
        };
        let job = model(&row)?;
        if row.try_get::<bool>("", "applied")? {
            return Ok(job);
        }
        refused(&job, &change)?;
        if !row.try_get::<bool>("", "node_dead")? {
            return Err(Error::Conflict(format!(
                "job {job_id}'s node {} has sent a heartbeat within the liveness window: it is \
                 not lost",
                job.node_id.as_deref().unwrap_or("(none)")
            )));
        }
        // Every guard held in this statement's snapshot: a concurrent transition that committed
        // after the snapshot was taken changed the row. Look again.
    }
    Err(Error::Conflict(format!(
        "job {job_id} kept changing concurrently; try again"
    )))
}

/// Why a guarded change of `job` (its current row) does not apply: `Fenced` when the job's
/// assignment is not the guarded one, `StateConflict` when its status is not one the change may
/// start from; `Ok` when both hold.
fn refused(job: &jobs::Model, change: &Change<'_>) -> Result<()> {
    let actual = assignment_of(job);
    if let Some(expected) = &change.guard
        && *expected != actual
    {
        return Err(Error::Fenced {
            job_id: job.id,
            expected: expected.clone(),
            actual,
        });
    }
    let status = status_of(job)?;
    if !change.from.contains(&status) {
        return Err(Error::StateConflict {
            expected: change.from.clone(),
            actual: status,
        });
    }
    Ok(())
}

/// SCHEDULED → RUNNING, by the worker holding `claim` (the job must be assigned to its node, on its
/// attempt).
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
/// garbage collection.
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
    refused(&job, &change)?;
    let mut activated = Vec::with_capacity(revisions.len());
    for &revision_id in revisions {
        activated.push(revisions::activate_output(&tx, claim, revision_id, gc_grace).await?);
    }
    let job = transition(&tx, claim.job_id, change).await?;
    tx.commit().await?;
    Ok(Completed { job, activated })
}

/// SCHEDULED or RUNNING → STOP_REQUESTED, and a `job_actions` STOP notification to the job's node
/// when it has one (in the same statement). Anyone may ask; the worker acknowledges with
/// [`mark_stopping`].
#[tracing::instrument(skip(db), err)]
pub async fn request_stop<C>(db: &C, job_id: i64) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut change = Change::to(JobStatus::StopRequested);
    change.notify = Some(Action::Stop);
    transition(db, job_id, change).await
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

/// SCHEDULED or RUNNING → ERROR (recoverable; see [`list_due_for_retry`]) by the worker holding
/// `claim`, with `detail` as the job's and the event's detail.
#[tracing::instrument(skip(db, detail), err)]
pub async fn mark_error<C>(
    db: &C,
    claim: &JobClaim,
    detail: serde_json::Value,
) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut change = Change::claimed(JobStatus::Error, claim);
    change.detail = Some(detail);
    transition(db, claim.job_id, change).await
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
    let mut change = Change::claimed(JobStatus::Fatal, claim);
    change.detail = Some(detail);
    transition(db, claim.job_id, change).await
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
/// clock, checked in the same statement: `Conflict` if it has). The detail is [`worker_lost`];
/// [`list_due_for_retry`] offers such a job at once, and its retry is a new attempt, which fences
/// off the lost worker should it come back.
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
/// carry the [`worker_lost`] detail.
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

/// The job `job_id`, if it exists.
pub async fn get<C>(db: &C, job_id: i64) -> Result<Option<jobs::Model>>
where
    C: ConnectionTrait,
{
    Ok(jobs::Entity::find_by_id(job_id).one(db).await?)
}

/// The job whose idempotency key is `key`, if any.
pub async fn get_by_key<C>(db: &C, key: &str) -> Result<Option<jobs::Model>>
where
    C: ConnectionTrait,
{
    Ok(jobs::Entity::find()
        .filter(jobs::Column::IdempotencyKey.eq(key))
        .one(db)
        .await?)
}

/// A page of jobs by ascending id: those in one of `statuses` (any status when empty) with an id
/// above `after_id` (keyset pagination: pass the last id of the previous page), at most `limit`.
pub async fn list<C>(
    db: &C,
    statuses: &[JobStatus],
    after_id: Option<i64>,
    limit: u64,
) -> Result<Vec<jobs::Model>>
where
    C: ConnectionTrait,
{
    let mut query = jobs::Entity::find();
    if !statuses.is_empty() {
        query = query.filter(jobs::Column::Status.is_in(names(statuses)));
    }
    if let Some(after) = after_id {
        query = query.filter(jobs::Column::Id.gt(after));
    }
    Ok(query
        .order_by_asc(jobs::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Deletes job `job_id` with its events, if it is terminal (COMPLETED, STOPPED, ERROR, FATAL):
/// `StateConflict` while it is active, `NotFound` when there is no such job. One statement.
#[tracing::instrument(skip(db), err)]
pub async fn delete<C>(db: &C, job_id: i64) -> Result<()>
where
    C: ConnectionTrait,
{
    let deleted = jobs::Entity::delete_many()
        .filter(jobs::Column::Id.eq(job_id))
        .filter(jobs::Column::Status.is_in(names(&TERMINAL)))
        .exec(db)
        .await?;
    if deleted.rows_affected == 1 {
        return Ok(());
    }
    match get(db, job_id).await? {
        None => Err(Error::not_found("job", job_id)),
        Some(job) => Err(Error::StateConflict {
            expected: TERMINAL.to_vec(),
            actual: status_of(&job)?,
        }),
    }
}

/// How many active jobs each node has (nodes without any are absent).
pub async fn count_active_by_node<C>(db: &C) -> Result<Vec<(String, i64)>>
where
    C: ConnectionTrait,
{
    Ok(jobs::Entity::find()
        .select_only()
        .column(jobs::Column::NodeId)
        .column_as(jobs::Column::Id.count(), "active")
        .filter(jobs::Column::Status.is_in(names(&ACTIVE)))
        .filter(jobs::Column::NodeId.is_not_null())
        .group_by(jobs::Column::NodeId)
        .order_by_asc(jobs::Column::NodeId)
        .into_tuple()
        .all(db)
        .await?)
}

fn names(statuses: &[JobStatus]) -> Vec<&'static str> {
    statuses.iter().map(|s| s.as_str()).collect()
}

/// The active jobs (SCHEDULED, RUNNING, STOP_REQUESTED, STOPPING) assigned to `node_id`, by id.
pub async fn list_active_for_node<C>(db: &C, node_id: &str) -> Result<Vec<jobs::Model>>
where
    C: ConnectionTrait,
{
    Ok(jobs::Entity::find()
        .filter(jobs::Column::NodeId.eq(node_id))
        .filter(jobs::Column::Status.is_in(names(&ACTIVE)))
        .order_by_asc(jobs::Column::Id)
        .all(db)
        .await?)
}

/// The orphaned jobs: active, and assigned to no node or to a worker whose last heartbeat is
/// `window` old or older (by the database clock). By id.
pub async fn list_orphaned<C>(db: &C, window: Duration) -> Result<Vec<jobs::Model>>
where
    C: ConnectionTrait,
{
    let window = micros("liveness window", window)?;
    Ok(jobs::Entity::find()
        .left_join(workers::Entity)
        .filter(jobs::Column::Status.is_in(names(&ACTIVE)))
        .filter(Condition::any().add(jobs::Column::NodeId.is_null()).add(
            Expr::col((workers::Entity, workers::Column::HeartbeatAt)).lte(Expr::cust_with_values(
                "now() - $1 * interval '1 microsecond'",
                [window],
            )),
        ))
        .order_by_asc(jobs::Column::Id)
        .all(db)
        .await?)
}

/// ERROR jobs due for a retry, oldest failure first, at most `limit`: at once when their worker was
/// lost or shut down (detail `reason` [`WORKER_LOST`] or [`WORKER_SHUTDOWN`]: nothing is wrong
/// with the job), else once `updated_at + min(base * 2^(attempt - 1), max) <= now()` by the database
/// clock (exponential backoff, capped at `max`). Whether and where to retry them is the caller's
/// choice.
pub async fn list_due_for_retry<C>(
    db: &C,
    base: Duration,
    max: Duration,
    limit: u64,
) -> Result<Vec<jobs::Model>>
where
    C: ConnectionTrait,
{
    let base = micros("retry base delay", base)?;
    let max = micros("retry maximum delay", max)?;
    // The exponent is capped at 62 so that power() stays finite for absurd attempt counts; the
    // LEAST with `max` caps the delay anyway.
    let backoff_passed = Expr::cust_with_values(
        "updated_at + LEAST($1 * power(2::float8, LEAST(GREATEST(attempt - 1, 0), 62)), $2) \
         * interval '1 microsecond' <= now()",
        [base, max],
    );
    let worker_gone = Expr::cust_with_values(
        "detail ->> 'reason' IN ($1, $2)",
        [WORKER_LOST, WORKER_SHUTDOWN],
    );
    Ok(jobs::Entity::find()
        .filter(jobs::Column::Status.eq(JobStatus::Error.as_str()))
        .filter(Condition::any().add(worker_gone).add(backoff_passed))
        .order_by_asc(jobs::Column::UpdatedAt)
        .order_by_asc(jobs::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Deletes the terminal jobs (COMPLETED, STOPPED, ERROR, FATAL), all of them or those last updated
/// `older_than` ago or earlier; their events go with them. Returns how many were deleted.
#[tracing::instrument(skip(db), err)]
pub async fn delete_terminal<C>(db: &C, older_than: Option<Duration>) -> Result<u64>
where
    C: ConnectionTrait,
{
    let mut query =
        jobs::Entity::delete_many().filter(jobs::Column::Status.is_in(names(&TERMINAL)));
    if let Some(age) = older_than {
        let age = micros("age", age)?;
        query = query.filter(
            Expr::col(jobs::Column::UpdatedAt).lte(Expr::cust_with_values(
                "now() - $1 * interval '1 microsecond'",
                [age],
            )),
        );
    }
    Ok(query.exec(db).await?.rows_affected)
}

/// The events of job `job_id`, oldest first (empty for an unknown job).
pub async fn list_events<C>(db: &C, job_id: i64) -> Result<Vec<job_events::Model>>
where
    C: ConnectionTrait,
{
    Ok(job_events::Entity::find()
        .filter(job_events::Column::JobId.eq(job_id))
        .order_by_asc(job_events::Column::Id)
        .all(db)
        .await?)
}
