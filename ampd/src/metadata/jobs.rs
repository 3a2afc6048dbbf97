//! Jobs: idempotent scheduling, the guarded transitions of SCHEMA.md's state machine, assignment
//! to worker nodes, and the queries the controller needs (orphaned jobs, jobs due for a retry).
//!
//! # Attempts
//! `attempt` counts (re)schedules: a new job starts at 1, and every move back to SCHEDULED
//! ([`schedule`] of a stopped or failed job's key, [`reschedule`]) adds one. So `attempt` is the
//! number of the run the job is on.
//!
//! # Events
//! Every transition appends one `job_events` row in the same statement: `event_type` the new
//! status, `node_id` the job's node after the transition, `detail` the descriptor for SCHEDULED,
//! the error payload for ERROR and FATAL, NULL otherwise. [`reassign`] changes no status and
//! appends no event.
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

use entity::{JobStatus, job_events, jobs};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QueryResult, QuerySelect, Statement, Value,
};
use sha2::{Digest, Sha256};

use super::notifications::Action;
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

/// `$from, $from+1, ...` placeholders, one per status, and the statuses as values.
fn status_params(first: usize, statuses: &[JobStatus]) -> (String, Vec<Value>) {
    let placeholders = (first..first + statuses.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let values = statuses.iter().map(|s| Value::from(s.as_str())).collect();
    (placeholders, values)
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
    let (retry_from, retry_values) = status_params(5, &JobStatus::Scheduled.predecessors());
    let sql = format!(
        "WITH created AS ( \
            INSERT INTO jobs (idempotency_key, kind, node_id, descriptor, status, attempt) \
            VALUES ($1, $2, $3, $4::jsonb, 'SCHEDULED', 1) \
            ON CONFLICT (idempotency_key) DO NOTHING \
            RETURNING *), \
        rescheduled AS ( \
            UPDATE jobs SET status = 'SCHEDULED', attempt = attempt + 1, descriptor = $4::jsonb, \
                detail = NULL, node_id = $3, updated_at = now() \
            WHERE idempotency_key = $1 AND status IN ({retry_from}) \
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
        SELECT jobs.*, 'existing', jobs.descriptor = $4::jsonb, 0::bigint FROM jobs \
        WHERE idempotency_key = $1 AND NOT EXISTS (SELECT 1 FROM changed)",
        notify = notify_cte("changed", "'START'"),
    );
    let mut values = vec![
        Value::from(key),
        Value::from(kind),
        Value::from(node_id.map(str::to_owned)),
        Value::from(descriptor),
    ];
    values.extend(retry_values);

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

/// What a transition changes besides the status.
struct Change<'a> {
    to: JobStatus,
    /// `Some(node)`: set `node_id` to `node` (NULL for `None`); `None`: keep it.
    node: Option<Option<&'a str>>,
    /// The new `detail` (NULL when `None`).
    detail: Option<serde_json::Value>,
    /// `attempt = attempt + 1`.
    next_attempt: bool,
    /// Send this `job_actions` notification to the job's node, if it has one.
    notify: Option<Action>,
}

impl Change<'_> {
    fn to(to: JobStatus) -> Self {
        Change {
            to,
            node: None,
            detail: None,
            next_attempt: false,
            notify: None,
        }
    }
}

/// Applies one guarded transition in one statement: `UPDATE jobs ... WHERE id = $1 AND status IN
/// (<predecessors of the target>)`, its event, its notification, and the current row when the guard
/// did not match (to tell `NotFound` from `StateConflict`).
async fn transition<C>(db: &C, job_id: i64, change: Change<'_>) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let expected = change.to.predecessors();
    let mut values = vec![
        Value::from(job_id),
        Value::from(change.to.as_str()),
        Value::from(change.detail),
    ];
    let mut set = String::new();
    if let Some(node) = change.node {
        values.push(Value::from(node.map(str::to_owned)));
        set.push_str(&format!(", node_id = ${}", values.len()));
    }
    if change.next_attempt {
        set.push_str(", attempt = attempt + 1");
    }
    let (from, from_values) = status_params(values.len() + 1, &expected);
    values.extend(from_values);
    let (notify_cte, notified) = match change.notify {
        Some(action) => {
            values.push(Value::from(action.as_str()));
            let param = format!("${}::text", values.len());
            (
                format!(", {}", notify_cte("updated", &param)),
                "(SELECT count(*) FROM notified)",
            )
        }
        None => (String::new(), "0::bigint"),
    };
    let sql = format!(
        "WITH updated AS ( \
            UPDATE jobs SET status = $2, detail = $3::jsonb, updated_at = now(){set} \
            WHERE id = $1 AND status IN ({from}) \
            RETURNING *), \
        event AS ( \
            INSERT INTO job_events (job_id, node_id, event_type, detail) \
            SELECT id, node_id, status, \
                CASE WHEN status = 'SCHEDULED' THEN descriptor ELSE detail END \
            FROM updated){notify_cte} \
        SELECT updated.*, TRUE AS applied, {notified} AS notified FROM updated \
        UNION ALL \
        SELECT jobs.*, FALSE, 0::bigint FROM jobs \
        WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM updated)"
    );
    let node = change.node.flatten();
    for _ in 0..RACE_RETRIES {
        let row = db
            .query_one_raw(stmt(sql.clone(), values.clone()))
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
        let actual = status_of(&job)?;
        if expected.contains(&actual) {
            // The guard lost a race with a concurrent transition that committed after this
            // statement's snapshot (which the fallback SELECT still shows): look again.
            continue;
        }
        return Err(Error::StateConflict { expected, actual });
    }
    Err(Error::Conflict(format!(
        "job {job_id} kept changing concurrently; try again"
    )))
}

/// SCHEDULED → RUNNING: `node_id` (a registered worker) runs the job and becomes its node.
#[tracing::instrument(skip(db), err)]
pub async fn mark_running<C>(db: &C, job_id: i64, node_id: &str) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    validate_node_id(node_id)?;
    let mut change = Change::to(JobStatus::Running);
    change.node = Some(Some(node_id));
    transition(db, job_id, change).await
}

/// RUNNING → COMPLETED.
#[tracing::instrument(skip(db), err)]
pub async fn mark_completed<C>(db: &C, job_id: i64) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    transition(db, job_id, Change::to(JobStatus::Completed)).await
}

/// SCHEDULED or RUNNING → STOP_REQUESTED, and a `job_actions` STOP notification to the job's node
/// when it has one (in the same statement).
#[tracing::instrument(skip(db), err)]
pub async fn request_stop<C>(db: &C, job_id: i64) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut change = Change::to(JobStatus::StopRequested);
    change.notify = Some(Action::Stop);
    transition(db, job_id, change).await
}

/// STOP_REQUESTED → STOPPING: the worker has acknowledged the stop request.
#[tracing::instrument(skip(db), err)]
pub async fn mark_stopping<C>(db: &C, job_id: i64) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    transition(db, job_id, Change::to(JobStatus::Stopping)).await
}

/// STOPPING → STOPPED.
#[tracing::instrument(skip(db), err)]
pub async fn mark_stopped<C>(db: &C, job_id: i64) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    transition(db, job_id, Change::to(JobStatus::Stopped)).await
}

/// SCHEDULED or RUNNING → ERROR (recoverable; see [`list_due_for_retry`]), with `detail` as the
/// job's and the event's detail.
#[tracing::instrument(skip(db, detail), err)]
pub async fn mark_error<C>(db: &C, job_id: i64, detail: serde_json::Value) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut change = Change::to(JobStatus::Error);
    change.detail = Some(detail);
    transition(db, job_id, change).await
}

/// SCHEDULED or RUNNING → FATAL (never retried automatically), with `detail`.
#[tracing::instrument(skip(db, detail), err)]
pub async fn mark_fatal<C>(db: &C, job_id: i64, detail: serde_json::Value) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let mut change = Change::to(JobStatus::Fatal);
    change.detail = Some(detail);
    transition(db, job_id, change).await
}

/// ERROR, STOPPED or FATAL → SCHEDULED (a retry or a re-deploy): `attempt + 1`, no detail, assigned
/// to `node_id` (or to no node), and a `job_actions` START notification when it has a node.
#[tracing::instrument(skip(db), err)]
pub async fn reschedule<C>(db: &C, job_id: i64, node_id: Option<&str>) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    if let Some(node) = node_id {
        validate_node_id(node)?;
    }
    let mut change = Change::to(JobStatus::Scheduled);
    change.node = Some(node_id);
    change.next_attempt = true;
    change.notify = Some(Action::Start);
    transition(db, job_id, change).await
}

/// Moves an active job from node `from_node` (`None`: unassigned) to `to_node` (`None`: unassign),
/// in one statement guarded on both: `StateConflict` when the job is not active, `Conflict` when its
/// node is not `from_node` (someone else moved it first). The new node gets a `job_actions`
/// notification: STOP for a job being stopped, START otherwise. The status does not change and no
/// event is appended.
#[tracing::instrument(skip(db), err)]
pub async fn reassign<C>(
    db: &C,
    job_id: i64,
    from_node: Option<&str>,
    to_node: Option<&str>,
) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    if let Some(node) = to_node {
        validate_node_id(node)?;
    }
    let mut values = vec![
        Value::from(job_id),
        Value::from(from_node.map(str::to_owned)),
        Value::from(to_node.map(str::to_owned)),
    ];
    let (active, active_values) = status_params(4, &ACTIVE);
    values.extend(active_values);
    let sql = format!(
        "WITH updated AS ( \
            UPDATE jobs SET node_id = $3, updated_at = now() \
            WHERE id = $1 AND node_id IS NOT DISTINCT FROM $2 AND status IN ({active}) \
            RETURNING *), \
        {notify} \
        SELECT updated.*, TRUE AS applied, (SELECT count(*) FROM notified) AS notified \
        FROM updated \
        UNION ALL \
        SELECT jobs.*, FALSE, 0::bigint FROM jobs \
        WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM updated)",
        notify = notify_cte(
            "updated",
            "CASE WHEN status IN ('STOP_REQUESTED', 'STOPPING') THEN 'STOP' ELSE 'START' END",
        ),
    );
    for _ in 0..RACE_RETRIES {
        let row = db
            .query_one_raw(stmt(sql.clone(), values.clone()))
            .await
            .map_err(Error::from)
            .map_err(unknown_worker(to_node))?;
        let Some(row) = row else {
            return Err(Error::not_found("job", job_id));
        };
        let job = model(&row)?;
        if row.try_get::<bool>("", "applied")? {
            return Ok(job);
        }
        let actual = status_of(&job)?;
        if !ACTIVE.contains(&actual) {
            return Err(Error::StateConflict {
                expected: ACTIVE.to_vec(),
                actual,
            });
        }
        if job.node_id.as_deref() != from_node {
            return Err(Error::Conflict(format!(
                "job {job_id} is assigned to {}, not {}",
                job.node_id.as_deref().unwrap_or("no node"),
                from_node.unwrap_or("no node"),
            )));
        }
        // The snapshot's row still matched the guard: a concurrent change won. Look again.
    }
    Err(Error::Conflict(format!(
        "job {job_id} kept changing concurrently; try again"
    )))
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

/// A page of jobs by ascending id: those with `status` (any status for `None`) and an id above
/// `after_id` (keyset pagination: pass the last id of the previous page), at most `limit`.
pub async fn list<C>(
    db: &C,
    status: Option<JobStatus>,
    after_id: Option<i64>,
    limit: u64,
) -> Result<Vec<jobs::Model>>
where
    C: ConnectionTrait,
{
    let mut query = jobs::Entity::find();
    if let Some(status) = status {
        query = query.filter(jobs::Column::Status.eq(status.as_str()));
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
    let (active, mut values) = status_params(2, &ACTIVE);
    values.insert(0, Value::from(window));
    let sql = format!(
        "SELECT jobs.* FROM jobs LEFT JOIN workers ON workers.node_id = jobs.node_id \
         WHERE jobs.status IN ({active}) \
           AND (jobs.node_id IS NULL \
                OR workers.heartbeat_at <= now() - $1 * interval '1 microsecond') \
         ORDER BY jobs.id"
    );
    Ok(jobs::Model::find_by_statement(stmt(sql, values))
        .all(db)
        .await?)
}

/// ERROR jobs whose backoff has passed, oldest failure first, at most `limit`: those with
/// `updated_at + min(base * 2^(attempt - 1), max) <= now()`, computed by the database clock
/// (exponential backoff, capped at `max`). Whether and where to retry them is the caller's choice.
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
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // The exponent is capped at 62 so that power() stays finite for absurd attempt counts; the
    // LEAST with `max` caps the delay anyway.
    let sql = "SELECT * FROM jobs \
         WHERE status = 'ERROR' \
           AND updated_at + LEAST($1 * power(2::float8, LEAST(GREATEST(attempt - 1, 0), 62)), $2) \
                 * interval '1 microsecond' <= now() \
         ORDER BY updated_at, id \
         LIMIT $3";
    Ok(jobs::Model::find_by_statement(stmt(
        sql.to_owned(),
        vec![Value::from(base), Value::from(max), Value::from(limit)],
    ))
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
