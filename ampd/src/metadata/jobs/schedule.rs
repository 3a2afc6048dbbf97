//! [`schedule`]: creating a job, or finding or rescheduling the one with its key, in one statement.

use entity::{JobStatus, jobs};
use sea_orm::{ConnectionTrait, Statement};

use super::transition::{Params, model, notify_cte, stmt, unknown_worker};
use super::{RACE_RETRIES, Scheduled, idempotency_key, status_of, target};
use crate::metadata::workers::validate_node_id;
use crate::metadata::{Error, Result};

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
    let query = statement(key, kind, node_id, descriptor);
    for _ in 0..RACE_RETRIES {
        let row = db
            .query_one_raw(query.clone())
            .await
            .map_err(Error::from)
            .map_err(unknown_worker(node_id))?;
        // No row: the key's job was inserted by a transaction that committed after this
        // statement's snapshot. Run again with a new snapshot.
        let Some(row) = row else { continue };
        let job = model(&row)?;
        let outcome: String = row.try_get("", "outcome")?;
        match outcome.as_str() {
            "created" => {
                crate::metrics::job_transition(JobStatus::Scheduled.as_str());
                return Ok((job, Scheduled::Created));
            }
            "rescheduled" => {
                crate::metrics::job_transition(JobStatus::Scheduled.as_str());
                return Ok((job, Scheduled::Rescheduled));
            }
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

/// The one statement of [`schedule`]: insert the job, or reschedule the stopped or failed one with
/// the key, with its event and notification; else read the existing job back.
fn statement(
    key: String,
    kind: &str,
    node_id: Option<&str>,
    descriptor: serde_json::Value,
) -> Statement {
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
                claim_epoch = NULL, updated_at = now() \
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
    stmt(sql, p.0)
}
