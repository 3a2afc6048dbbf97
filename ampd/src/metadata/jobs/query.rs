//! Reading jobs and their events, and deleting finished ones.

use std::time::Duration;

use entity::{JobStatus, job_events, jobs, workers};
use sea_orm::sea_query::extension::postgres::PgExpr;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Statement,
};

use super::{ACTIVE, TERMINAL, WORKER_LOST, WORKER_SHUTDOWN, status_of};
use crate::metadata::{Error, Result, micros};

/// The job `job_id`, if it exists.
pub async fn get<C>(db: &C, job_id: i64) -> Result<Option<jobs::Model>>
where
    C: ConnectionTrait,
{
    Ok(jobs::Entity::find_by_id(job_id).one(db).await?)
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

/// The active jobs (SCHEDULED, RUNNING, STOP_REQUESTED, STOPPING) assigned to any of `node_ids`,
/// by node and, within one, by id. One statement, whatever the number of nodes.
pub async fn list_active_for_nodes<C>(db: &C, node_ids: &[String]) -> Result<Vec<jobs::Model>>
where
    C: ConnectionTrait,
{
    if node_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(jobs::Entity::find()
        .filter(jobs::Column::NodeId.is_in(node_ids.iter().cloned()))
        .filter(jobs::Column::Status.is_in(names(&ACTIVE)))
        .order_by_asc(jobs::Column::NodeId)
        .order_by_asc(jobs::Column::Id)
        .all(db)
        .await?)
}

/// The orphaned jobs: active, and assigned to no node or to a worker whose last heartbeat is
/// `window` old or older (by the database clock). By id.
///
/// One statement that reads the active jobs and the live workers only (a hashed `NOT IN` over
/// `idx_workers_heartbeat_at`), not every worker ever registered.
pub async fn list_orphaned<C>(db: &C, window: Duration) -> Result<Vec<jobs::Model>>
where
    C: ConnectionTrait,
{
    let stmt = list_orphaned_statement(window)?;
    Ok(jobs::Entity::find().from_raw_sql(stmt).all(db).await?)
}

/// The statement [`list_orphaned`] runs (to `EXPLAIN` it).
pub fn list_orphaned_statement(window: Duration) -> Result<Statement> {
    let window = micros("liveness window", window)?;
    let live = Query::select()
        .column(workers::Column::NodeId)
        .from(workers::Entity)
        .and_where(
            Expr::col(workers::Column::HeartbeatAt).gt(Expr::cust_with_values(
                "now() - $1 * interval '1 microsecond'",
                [window],
            )),
        )
        .to_owned();
    Ok(jobs::Entity::find()
        .filter(jobs::Column::Status.is_in(names(&ACTIVE)))
        .filter(
            Condition::any()
                .add(jobs::Column::NodeId.is_null())
                .add(jobs::Column::NodeId.not_in_subquery(live)),
        )
        .order_by_asc(jobs::Column::Id)
        .build(DbBackend::Postgres))
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
    // Custom SQL: interval arithmetic with LEAST and power() reads plainly only as SQL. The
    // exponent is capped at 62 so that power() stays finite for absurd attempt counts; the LEAST
    // with `max` caps the delay anyway.
    let backoff_passed = Expr::cust_with_values(
        "updated_at + LEAST($1 * power(2::float8, LEAST(GREATEST(attempt - 1, 0), 62)), $2) \
         * interval '1 microsecond' <= now()",
        [base, max],
    );
    let worker_gone = Expr::col(jobs::Column::Detail)
        .cast_json_field("reason")
        .is_in([WORKER_LOST, WORKER_SHUTDOWN]);
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

/// A page of the events of job `job_id`, oldest first: those with an id above `after_id` (keyset
/// pagination: pass the last id of the previous page), at most `limit`. One statement, walking
/// `idx_job_events_job_id_id`.
pub async fn list_events_page<C>(
    db: &C,
    job_id: i64,
    after_id: Option<i64>,
    limit: u64,
) -> Result<Vec<job_events::Model>>
where
    C: ConnectionTrait,
{
    let mut query = job_events::Entity::find().filter(job_events::Column::JobId.eq(job_id));
    if let Some(after) = after_id {
        query = query.filter(job_events::Column::Id.gt(after));
    }
    Ok(query
        .order_by_asc(job_events::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
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
