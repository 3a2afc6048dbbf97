//! The one-statement guarded transition every job state change goes through, and the pieces of
//! raw SQL it shares with [`schedule`](fn@super::schedule): bound parameters, the `job_actions`
//! notification, reading a job row back.

use entity::{JobStatus, jobs};
use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult, QueryResult, Statement, Value};

use super::{JobClaim, RACE_RETRIES, assignment_of, status_of};
use crate::metadata::error::Assignment;
use crate::metadata::notifications::{Action, JOB_ACTIONS, JobAction};
use crate::metadata::{Error, Result};

pub(super) fn stmt(sql: String, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

pub(super) fn model(row: &QueryResult) -> Result<jobs::Model> {
    Ok(jobs::Model::from_query_result(row, "")?)
}

/// A foreign key violation of `jobs.node_id` means the node never registered.
pub(super) fn unknown_worker(node_id: Option<&str>) -> impl Fn(Error) -> Error + '_ {
    move |err| match node_id {
        Some(node) => err.missing_if("jobs_node_id_fkey", "worker", node),
        None => err,
    }
}

/// `job_actions` notification for every row of CTE `changed` that has a node, `action` an SQL
/// expression over that row. Referenced from the final SELECT (an unreferenced SELECT CTE is not
/// run).
pub(super) fn notify_cte(changed: &str, action: &str) -> String {
    format!(
        "notified AS (SELECT pg_notify('{JOB_ACTIONS}', {}) FROM {changed} WHERE node_id IS NOT NULL)",
        JobAction::sql("node_id", "id", action)
    )
}

/// Bound parameters of a statement being written: [`Params::push`] adds a value and gives its
/// placeholder, so no `$n` is ever numbered by hand.
#[derive(Default)]
pub(super) struct Params(pub(super) Vec<Value>);

impl Params {
    pub(super) fn push(&mut self, value: impl Into<Value>) -> String {
        self.0.push(value.into());
        format!("${}", self.0.len())
    }

    pub(super) fn list(&mut self, statuses: &[JobStatus]) -> String {
        statuses
            .iter()
            .map(|s| self.push(s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a transition changes, and what it must find to apply.
pub(super) struct Change<'a> {
    pub(super) to: JobStatus,
    /// The statuses it may start from (the target's predecessors unless narrowed).
    pub(super) from: Vec<JobStatus>,
    /// The job must still be assigned to this node on this attempt (a claim, or what the caller saw).
    pub(super) guard: Option<Assignment>,
    /// The job's node must not have sent a heartbeat within this window (microseconds).
    pub(super) node_dead_for: Option<i64>,
    /// `Some(node)`: set `node_id` to `node` (NULL for `None`); `None`: keep it.
    pub(super) node: Option<Option<&'a str>>,
    /// The new `detail` (NULL when `None`).
    pub(super) detail: Option<serde_json::Value>,
    /// The event's detail, when it is not the default (the descriptor for SCHEDULED, else `detail`).
    pub(super) event_detail: Option<serde_json::Value>,
    /// `attempt = attempt + 1`.
    pub(super) next_attempt: bool,
    /// Send this `job_actions` notification to the job's node, if it has one.
    pub(super) notify: Option<Action>,
}

impl<'a> Change<'a> {
    pub(super) fn to(to: JobStatus) -> Self {
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

    pub(super) fn claimed(to: JobStatus, claim: &JobClaim) -> Self {
        Change {
            guard: Some(claim.assignment()),
            ..Change::to(to)
        }
    }

    pub(super) fn seen(to: JobStatus, seen: &jobs::Model) -> Self {
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
pub(super) async fn transition<C>(db: &C, job_id: i64, change: Change<'_>) -> Result<jobs::Model>
where
    C: ConnectionTrait,
{
    let query = statement(job_id, &change);
    let node = change.node.flatten();
    for _ in 0..RACE_RETRIES {
        let row = db
            .query_one_raw(query.clone())
            .await
            .map_err(Error::from)
            .map_err(unknown_worker(node))?;
        let Some(row) = row else {
            return Err(Error::not_found("job", job_id));
        };
        let job = model(&row)?;
        if row.try_get::<bool>("", "applied")? {
            crate::metrics::job_transition(change.to.as_str());
            return Ok(job);
        }
        let node_epoch: Option<i64> = row.try_get("", "node_epoch")?;
        if already_made(&job, node_epoch, &change) {
            return Ok(job);
        }
        refused(&job, node_epoch, &change)?;
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

/// Whether `job` (its current row, its node's claim epoch `node_epoch`) is already where a claimed
/// `change` takes it, through the same claim instance: the same node and attempt, the job last moved
/// with the claim's epoch, and that epoch still the node's. Such a change is a retry whose first
/// commit succeeded (its answer lost): it succeeds again, changing nothing.
pub(super) fn already_made(
    job: &jobs::Model,
    node_epoch: Option<i64>,
    change: &Change<'_>,
) -> bool {
    let Some(guard) = &change.guard else {
        return false;
    };
    let Some(epoch) = guard.epoch else {
        return false;
    };
    job.status == change.to.as_str()
        && job.node_id == guard.node_id
        && job.attempt == guard.attempt
        && job.claim_epoch == Some(epoch)
        && node_epoch == Some(epoch)
}

/// Why a guarded change of `job` (its current row; `node_epoch` its node's claim epoch) does not
/// apply: `Fenced` when the job's assignment is not the guarded one or its node's claim epoch is
/// not the claim's, `StateConflict` when its status is not one the change may start from; `Ok` when
/// all hold.
pub(super) fn refused(
    job: &jobs::Model,
    node_epoch: Option<i64>,
    change: &Change<'_>,
) -> Result<()> {
    let mut actual = assignment_of(job);
    if let Some(expected) = &change.guard {
        if expected.epoch.is_some() {
            actual.epoch = node_epoch;
        }
        if *expected != actual {
            return Err(Error::Fenced {
                job_id: job.id,
                expected: expected.clone(),
                actual,
            });
        }
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

/// The one statement of [`transition`]: the guarded `UPDATE`, its event and notification, and the
/// job's current row (with whether its node is dead) when the guard did not match.
fn statement(job_id: i64, change: &Change<'_>) -> Statement {
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
    let epoch = change.guard.as_ref().and_then(|a| a.epoch);
    if let Some(epoch) = epoch {
        // The claim that moves the job, recorded so its holder knows its own transitions.
        set.push_str(&format!(", claim_epoch = {}", p.push(epoch)));
    } else if change.next_attempt || change.node.is_some() {
        // A new attempt, or another node: no worker has moved it yet.
        set.push_str(", claim_epoch = NULL");
    }
    let mut guard = format!("status IN ({})", p.list(&change.from));
    if let Some(a) = &change.guard {
        guard.push_str(&format!(
            " AND node_id IS NOT DISTINCT FROM {} AND attempt = {}",
            p.push(a.node_id.clone()),
            p.push(a.attempt)
        ));
    }
    // The node's claim epoch, read in this statement: a process whose node id has since been
    // claimed by another (a higher epoch) is refused. (The claim's `UPDATE` of the epoch and this
    // read need no lock between them: once the new epoch is committed, every later statement of
    // the old process sees it.)
    let node_epoch = "(SELECT w.claim_epoch FROM workers w WHERE w.node_id = jobs.node_id)";
    if let Some(epoch) = epoch {
        guard.push_str(&format!(" AND {node_epoch} = {}", p.push(epoch)));
    }
    // A job on no node (never placed, or its worker removed) has no worker that could act on it:
    // it counts as lost, whatever the window.
    let node_dead = match change.node_dead_for {
        Some(window) => format!(
            "(jobs.node_id IS NULL OR EXISTS (SELECT 1 FROM workers w \
             WHERE w.node_id = jobs.node_id \
             AND w.heartbeat_at <= now() - {} * interval '1 microsecond'))",
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
        SELECT updated.*, TRUE AS applied, TRUE AS node_dead, {notified} AS notified, \
            NULL::bigint AS node_epoch \
        FROM updated \
        UNION ALL \
        SELECT jobs.*, FALSE, {node_dead}, 0::bigint, {node_epoch} FROM jobs \
        WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM updated)"
    );
    stmt(sql, p.0)
}
