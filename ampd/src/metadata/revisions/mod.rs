//! Physical tables of a dataset manifest and their revisions (storage locations), one of which is
//! active.
//!
//! A revision's path is `<namespace>/<name>/<table>/<uuid v7>`, relative to the data directory.
//! A revision is active iff its table's `active_revision_id` names it: activating one replaces the
//! previous one in the same transaction, and an active revision cannot be deleted.
//!
//! # A revision's life
//! 1. *Written*: [`create_revision`] with a job's claim creates it while that attempt is RUNNING;
//!    files are registered into it ([`crate::metadata::files::register`]) while it has never been
//!    active nor scheduled for garbage collection.
//! 2. *Active*: the attempt's completion activates it in the completion's transaction
//!    ([`crate::metadata::jobs::mark_completed`]); an attempt that was fenced off never gets there.
//!    Later, [`activate()`] may make it active again (a roll back).
//! 3. *Retired*: the revision it replaced is scheduled for garbage collection after a grace period
//!    ([`crate::metadata::files::schedule_gc`]); so is an abandoned one ([`list_abandoned`]), at
//!    once. A retired revision accepts no file; activating it cancels the schedule while it has not
//!    expired, and is refused after.
//! 4. *Gone*: the collector deletes the expired files and forgets them, then removes what is left
//!    ([`list_emptied`], [`delete`]).
//!
//! The module keeps its state in the revision's `metadata` under the keys of
//! [`RESERVED_METADATA_KEYS`]: `job_id`, `attempt` and `node_id` of the writer, `activated_at` (the
//! last activation) and `gc_expires_at` (while retired).
mod activate;
mod gc;
mod physical_tables;

pub(crate) use activate::activate_output;
pub use activate::{Activated, activate};
pub use gc::{list_abandoned, list_emptied, lock_emptied};
pub use physical_tables::{
    get_table, list_tables, list_tables_of_manifest, list_tables_with_active, register_table,
};

use entity::{JobStatus, jobs, physical_table_revisions as revisions, physical_tables as tables};
use sea_orm::sea_query::{Expr, ExprTrait, IntoColumnRef, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, TransactionSession, TransactionTrait,
};

use super::error::Assignment;
use super::jobs::JobClaim;
use super::{Error, Result, workers};

/// A column of `physical_table_revisions`, named with its table (for correlated subqueries).
fn revision(column: revisions::Column) -> (revisions::Entity, revisions::Column) {
    (revisions::Entity, column)
}

/// True for the rows whose revision (the column `revision_id`) is some table's active one.
pub(crate) fn is_active(revision_id: impl IntoColumnRef) -> Expr {
    Expr::exists(
        Query::select()
            .expr(Expr::cust("1"))
            .from(tables::Entity)
            .and_where(
                Expr::col((tables::Entity, tables::Column::ActiveRevisionId)).equals(revision_id),
            )
            .to_owned(),
    )
}

/// Keys of a revision's `metadata` that this module maintains; a caller's metadata must not use
/// them.
pub const RESERVED_METADATA_KEYS: [&str; 5] = [
    "job_id",
    "attempt",
    "node_id",
    "activated_at",
    "gc_expires_at",
];

/// Creates a revision of table `table_id` at a new path `<namespace>/<name>/<table>/<uuid v7>`.
/// With `writer`, the revision is written by that claim's attempt: the job must be RUNNING on the
/// claim's node and attempt (`Fenced` / `StateConflict` otherwise), `writer` is set to the job and
/// `metadata` records `job_id`, `attempt` and `node_id`, so that only that attempt's completion can
/// activate it ([`crate::metadata::jobs::mark_completed`]) and the garbage collector can tell when
/// it was abandoned ([`list_abandoned`]). `NotFound` for an unknown table or job; `InvalidInput`
/// when `metadata` is not an object or uses a [`RESERVED_METADATA_KEYS`] key.
#[tracing::instrument(skip(db, metadata), err)]
pub async fn create_revision<C>(
    db: &C,
    table_id: i64,
    writer: Option<&JobClaim>,
    metadata: serde_json::Value,
) -> Result<revisions::Model>
where
    C: ConnectionTrait + TransactionTrait,
{
    let serde_json::Value::Object(mut metadata) = metadata else {
        return Err(Error::InvalidInput(
            "revision metadata must be a JSON object".into(),
        ));
    };
    if let Some(key) = RESERVED_METADATA_KEYS
        .iter()
        .find(|k| metadata.contains_key(**k))
    {
        return Err(Error::InvalidInput(format!(
            "revision metadata key {key:?} is maintained by ampd and cannot be set"
        )));
    }
    let tx = db.begin().await?;
    if let Some(claim) = writer {
        hold_writer(&tx, claim).await?;
        metadata.insert("job_id".into(), claim.job_id.into());
        metadata.insert("attempt".into(), claim.attempt.into());
        metadata.insert("node_id".into(), claim.node_id.clone().into());
    }
    let table = tables::Entity::find_by_id(table_id)
        .one(&tx)
        .await?
        .ok_or_else(|| Error::not_found("physical table", table_id))?;
    let path = format!(
        "{}/{}/{}/{}",
        table.dataset_namespace,
        table.dataset_name,
        table.table_name,
        uuid::Uuid::now_v7()
    );
    let created = revisions::Entity::insert(revisions::ActiveModel {
        physical_table_id: Set(table_id),
        path: Set(path),
        writer: Set(writer.map(|c| c.job_id)),
        metadata: Set(serde_json::Value::Object(metadata)),
        ..Default::default()
    })
    .exec_with_returning(&tx)
    .await
    .map_err(|e| {
        // The table was deleted meanwhile.
        Error::from(e).missing_if(
            "physical_table_revisions_physical_table_id_fkey",
            "physical table",
            table_id,
        )
    })?;
    tx.commit().await?;
    Ok(created)
}

/// Locks the job `claim` names `FOR SHARE`, so that it cannot change status or attempt until the
/// caller's transaction ends, and checks that the claim's attempt is RUNNING ([`check_running`]).
async fn hold_writer<C: ConnectionTrait>(tx: &C, claim: &JobClaim) -> Result<()> {
    let job = jobs::Entity::find_by_id(claim.job_id)
        .lock_shared()
        .one(tx)
        .await?
        .ok_or_else(|| Error::not_found("job", claim.job_id))?;
    let node_epoch = workers::get(tx, &claim.node_id)
        .await?
        .map(|w| w.claim_epoch);
    check_running(&job, node_epoch, claim)
}

/// `Fenced` unless `job` is on `claim`'s node and attempt, was started through `claim`'s epoch,
/// and that epoch is still its node's (`node_epoch`); `StateConflict` unless it is RUNNING.
fn check_running(job: &jobs::Model, node_epoch: Option<i64>, claim: &JobClaim) -> Result<()> {
    let current = job.claim_epoch.is_none_or(|e| e == claim.epoch);
    let actual = Assignment {
        node_id: job.node_id.clone(),
        attempt: job.attempt,
        epoch: if current { node_epoch } else { job.claim_epoch },
    };
    let expected = Assignment {
        node_id: Some(claim.node_id.clone()),
        attempt: claim.attempt,
        epoch: Some(claim.epoch),
    };
    if actual != expected {
        return Err(Error::Fenced {
            job_id: job.id,
            expected,
            actual,
        });
    }
    let status = job
        .job_status()
        .map_err(|e| Error::InvalidInput(format!("job {}: {e}", job.id)))?;
    if status != JobStatus::Running {
        return Err(Error::StateConflict {
            expected: vec![JobStatus::Running],
            actual: status,
        });
    }
    Ok(())
}

/// The revision `revision_id`, if it exists.
pub async fn get<C>(db: &C, revision_id: i64) -> Result<Option<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(revisions::Entity::find_by_id(revision_id).one(db).await?)
}

/// Whether every one of `revision_ids` is the active revision of its table.
pub async fn are_active<C>(db: &C, revision_ids: &[i64]) -> Result<bool>
where
    C: ConnectionTrait,
{
    let active = tables::Entity::find()
        .filter(tables::Column::ActiveRevisionId.is_in(revision_ids.iter().copied()))
        .count(db)
        .await?;
    Ok(active == revision_ids.len() as u64)
}

/// The active revision of table `table_id`, if it has one.
pub async fn active<C>(db: &C, table_id: i64) -> Result<Option<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(revisions::Entity::find()
        .inner_join(tables::Entity)
        .filter(tables::Column::Id.eq(table_id))
        .filter(
            Expr::col((tables::Entity, tables::Column::ActiveRevisionId))
                .equals((revisions::Entity, revisions::Column::Id)),
        )
        .one(db)
        .await?)
}

/// The revisions of table `table_id`, oldest first.
pub async fn list<C>(db: &C, table_id: i64) -> Result<Vec<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(revisions::Entity::find()
        .filter(revisions::Column::PhysicalTableId.eq(table_id))
        .order_by_asc(revisions::Column::Id)
        .all(db)
        .await?)
}

/// The revisions of every table of manifest `manifest_hash` of dataset `namespace/name`, by table
/// id and, within one, oldest first. One statement, whatever the number of tables
/// (`idx_physical_table_revisions_table_id`).
pub async fn list_of_manifest<C>(
    db: &C,
    namespace: &str,
    name: &str,
    manifest_hash: &str,
) -> Result<Vec<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(revisions::Entity::find()
        .inner_join(tables::Entity)
        .filter(tables::Column::DatasetNamespace.eq(namespace))
        .filter(tables::Column::DatasetName.eq(name))
        .filter(tables::Column::ManifestHash.eq(manifest_hash))
        .order_by_asc(revisions::Column::PhysicalTableId)
        .order_by_asc(revisions::Column::Id)
        .all(db)
        .await?)
}

/// Deletes revision `revision_id` with its files and gc entries. `Conflict` while it is active;
/// `NotFound` when it does not exist.
#[tracing::instrument(skip(db), err)]
pub async fn delete<C>(db: &C, revision_id: i64) -> Result<()>
where
    C: ConnectionTrait + TransactionTrait,
{
    let tx = db.begin().await?;
    lock_inactive(&tx, revision_id).await?;
    revisions::Entity::delete_by_id(revision_id)
        .exec(&tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Locks revision `revision_id` (`FOR UPDATE`, which an activation's foreign key check waits for)
/// and checks that it is not active: `NotFound`, `Conflict`, or the revision. For a transaction.
pub(crate) async fn lock_inactive<C>(db: &C, revision_id: i64) -> Result<revisions::Model>
where
    C: ConnectionTrait,
{
    let revision = revisions::Entity::find_by_id(revision_id)
        .lock_exclusive()
        .one(db)
        .await?
        .ok_or_else(|| Error::not_found("revision", revision_id))?;
    let active = tables::Entity::find()
        .filter(tables::Column::ActiveRevisionId.eq(revision_id))
        .one(db)
        .await?;
    if let Some(table) = active {
        return Err(Error::Conflict(format!(
            "revision {revision_id} is the active revision of table {} ({}); activate another \
             revision first",
            table.id, table.table_name
        )));
    }
    Ok(revision)
}
