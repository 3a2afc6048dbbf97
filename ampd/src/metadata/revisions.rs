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
//!    Later, [`activate`] may make it active again (a roll back).
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

use std::time::Duration;

use entity::{
    JobStatus, file_metadata, gc_manifest, jobs, physical_table_revisions as revisions,
    physical_tables as tables,
};
use sea_orm::sea_query::extension::postgres::PgExpr;
use sea_orm::sea_query::{Expr, ExprTrait, IntoColumnRef, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    TransactionSession, TransactionTrait,
};

use super::error::Assignment;
use super::files;
use super::jobs::JobClaim;
use super::notifications::{RevisionChange, notify_revision_change};
use super::{Error, Result, validate_dataset_part, validate_path_segment};

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

/// Registers table `table_name` of manifest `manifest_hash` of dataset `namespace/name`, or returns
/// it if it is registered. `NotFound` when the manifest is not registered.
#[tracing::instrument(skip(db), err)]
pub async fn register_table<C>(
    db: &C,
    namespace: &str,
    name: &str,
    manifest_hash: &str,
    table_name: &str,
) -> Result<tables::Model>
where
    C: ConnectionTrait,
{
    validate_dataset_part("namespace", namespace)?;
    validate_dataset_part("name", name)?;
    validate_path_segment("table name", table_name)?;
    let inserted = tables::Entity::insert(tables::ActiveModel {
        dataset_namespace: Set(namespace.to_owned()),
        dataset_name: Set(name.to_owned()),
        manifest_hash: Set(manifest_hash.to_owned()),
        table_name: Set(table_name.to_owned()),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([
        tables::Column::DatasetNamespace,
        tables::Column::DatasetName,
        tables::Column::ManifestHash,
        tables::Column::TableName,
    ])
    .exec_with_returning_many(db)
    .await
    .map_err(|e| {
        Error::from(e).missing_if(
            "physical_tables_manifest_hash_fkey",
            "manifest",
            manifest_hash,
        )
    })?;
    // On a conflict, PostgreSQL returns no row (SeaORM reports that as `Inserted(vec![])` or
    // `Conflicted`): read the existing one.
    if let sea_orm::TryInsertResult::Inserted(rows) = inserted
        && let Some(table) = rows.into_iter().next()
    {
        return Ok(table);
    }
    tables::Entity::find()
        .filter(tables::Column::DatasetNamespace.eq(namespace))
        .filter(tables::Column::DatasetName.eq(name))
        .filter(tables::Column::ManifestHash.eq(manifest_hash))
        .filter(tables::Column::TableName.eq(table_name))
        .one(db)
        .await?
        .ok_or_else(|| {
            Error::Conflict(format!(
                "table {table_name} of {namespace}/{name} was deleted while registering it; try \
                 again"
            ))
        })
}

/// The physical table `table_id`, if it exists.
pub async fn get_table<C>(db: &C, table_id: i64) -> Result<Option<tables::Model>>
where
    C: ConnectionTrait,
{
    Ok(tables::Entity::find_by_id(table_id).one(db).await?)
}

/// The physical tables of dataset `namespace/name` (all its manifests), by id.
pub async fn list_tables<C>(db: &C, namespace: &str, name: &str) -> Result<Vec<tables::Model>>
where
    C: ConnectionTrait,
{
    Ok(tables::Entity::find()
        .filter(tables::Column::DatasetNamespace.eq(namespace))
        .filter(tables::Column::DatasetName.eq(name))
        .order_by_asc(tables::Column::Id)
        .all(db)
        .await?)
}

/// The tables of manifest `manifest_hash` of dataset `namespace/name`, by table name.
pub async fn list_tables_of_manifest<C>(
    db: &C,
    namespace: &str,
    name: &str,
    manifest_hash: &str,
) -> Result<Vec<tables::Model>>
where
    C: ConnectionTrait,
{
    Ok(tables::Entity::find()
        .filter(tables::Column::DatasetNamespace.eq(namespace))
        .filter(tables::Column::DatasetName.eq(name))
        .filter(tables::Column::ManifestHash.eq(manifest_hash))
        .order_by_asc(tables::Column::TableName)
        .all(db)
        .await?)
}

/// Every physical table with its active revision (`None` while it has none), by table id, in one
/// statement: what a reader that keeps a view of every served table loads at once.
pub async fn list_tables_with_active<C>(
    db: &C,
) -> Result<Vec<(tables::Model, Option<revisions::Model>)>>
where
    C: ConnectionTrait,
{
    Ok(tables::Entity::find()
        .find_also_related(revisions::Entity)
        .order_by_asc(tables::Column::Id)
        .all(db)
        .await?)
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
        // FOR SHARE: the job cannot change status or attempt until this revision is recorded.
        let job = jobs::Entity::find_by_id(claim.job_id)
            .lock_shared()
            .one(&tx)
            .await?
            .ok_or_else(|| Error::not_found("job", claim.job_id))?;
        check_running(&job, claim)?;
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

/// `Fenced` unless `job` is on `claim`'s node and attempt, `StateConflict` unless it is RUNNING.
fn check_running(job: &jobs::Model, claim: &JobClaim) -> Result<()> {
    let actual = Assignment {
        node_id: job.node_id.clone(),
        attempt: job.attempt,
    };
    let expected = Assignment {
        node_id: Some(claim.node_id.clone()),
        attempt: claim.attempt,
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

/// What an activation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activated {
    /// The table, with its new `active_revision_id`.
    pub table: tables::Model,
    /// The revision that was active before (the one activated, if it already was; `None` if none
    /// was). When it was another one, its files are now scheduled for garbage collection.
    pub previous: Option<i64>,
}

/// Makes `revision_id` the active revision of table `table_id` again (a roll back), replacing the
/// previous one in the same transaction, schedules the replaced revision's files for garbage
/// collection `gc_grace` from now, and sends a `revision_changes` notification (delivered on
/// commit). `NotFound` for an unknown table or revision; `Conflict` when the revision belongs to
/// another table, or was written by a job that never completed it (only a completion activates a
/// job's output the first time), or its files are due for deletion.
///
/// Garbage collection: activating a revision whose files are scheduled for garbage collection
/// *cancels* that schedule while it has not expired (no collector may touch them yet: see
/// [`crate::metadata::files::list_expired`]); once it has expired the files may be gone, and the
/// activation is refused.
///
/// Locks the table row, then the revision row, so concurrent activations of one table take turns
/// and each reports the revision it replaced.
#[tracing::instrument(skip(db), err)]
pub async fn activate<C>(
    db: &C,
    table_id: i64,
    revision_id: i64,
    gc_grace: Duration,
) -> Result<Activated>
where
    C: ConnectionTrait + TransactionTrait,
{
    let tx = db.begin().await?;
    let table = lock_table(&tx, table_id).await?;
    let locked = lock_revision(&tx, revision_id).await?;
    if locked.revision.physical_table_id != table_id {
        return Err(Error::Conflict(format!(
            "revision {revision_id} belongs to table {}, not to table {table_id}",
            locked.revision.physical_table_id
        )));
    }
    let meta = &locked.revision.metadata;
    if meta.get("job_id").is_some() && meta.get("activated_at").is_none() {
        return Err(Error::Conflict(format!(
            "revision {revision_id} was written by job {} and never completed: only the \
             completion of the attempt that wrote it can make it active",
            meta["job_id"]
        )));
    }
    match locked.gc_due {
        Some(true) => {
            return Err(Error::Conflict(format!(
                "revision {revision_id}'s files are due for deletion (scheduled for {}); it can no \
                 longer be activated",
                meta.get("gc_expires_at")
                    .unwrap_or(&serde_json::Value::Null)
            )));
        }
        Some(false) => cancel_gc(&tx, revision_id).await?,
        None => {}
    }
    let activated = switch_active(&tx, table, revision_id, gc_grace).await?;
    tx.commit().await?;
    Ok(activated)
}

/// Activates `revision_id`, written by `claim`'s attempt, as part of that attempt's completion
/// (inside its transaction): `Conflict` when another attempt wrote it or it is scheduled for
/// garbage collection.
pub(crate) async fn activate_output<C>(
    tx: &C,
    claim: &JobClaim,
    revision_id: i64,
    gc_grace: Duration,
) -> Result<Activated>
where
    C: ConnectionTrait,
{
    let table_id = revisions::Entity::find_by_id(revision_id)
        .one(tx)
        .await?
        .ok_or_else(|| Error::not_found("revision", revision_id))?
        .physical_table_id;
    let table = lock_table(tx, table_id).await?;
    let locked = lock_revision(tx, revision_id).await?;
    let meta = &locked.revision.metadata;
    let written_by_claim = locked.revision.writer == Some(claim.job_id)
        && meta.get("attempt") == Some(&claim.attempt.into());
    if !written_by_claim {
        return Err(Error::Conflict(format!(
            "revision {revision_id} was not written by attempt {} of job {}",
            claim.attempt, claim.job_id
        )));
    }
    if locked.gc_due.is_some() {
        return Err(Error::Conflict(format!(
            "revision {revision_id} is scheduled for garbage collection; it cannot be activated"
        )));
    }
    switch_active(tx, table, revision_id, gc_grace).await
}

async fn lock_table<C: ConnectionTrait>(tx: &C, table_id: i64) -> Result<tables::Model> {
    tables::Entity::find_by_id(table_id)
        .lock_exclusive()
        .one(tx)
        .await?
        .ok_or_else(|| Error::not_found("physical table", table_id))
}

/// A revision row locked `FOR UPDATE`, and whether its garbage collection is due (`None`: not
/// scheduled).
struct LockedRevision {
    revision: revisions::Model,
    gc_due: Option<bool>,
}

async fn lock_revision<C: ConnectionTrait>(tx: &C, revision_id: i64) -> Result<LockedRevision> {
    let revision = revisions::Entity::find_by_id(revision_id)
        .lock_exclusive()
        .one(tx)
        .await?
        .ok_or_else(|| Error::not_found("revision", revision_id))?;
    // A statement of its own, after the lock is held: a collector that held the revision while
    // deleting its files has committed by now, and `clock_timestamp()` is the time now, not when
    // the transaction began.
    let due = Query::select()
        .expr_as(
            Expr::col(revisions::Column::Metadata)
                .cast_json_field("gc_expires_at")
                .cast_as("timestamptz")
                .lte(Expr::cust("clock_timestamp()")),
            "due",
        )
        .from(revisions::Entity)
        .and_where(Expr::col(revisions::Column::Id).eq(revision_id))
        .to_owned();
    let gc_due = tx
        .query_one(&due)
        .await?
        .map(|row| row.try_get::<Option<bool>>("", "due"))
        .transpose()?
        .flatten();
    Ok(LockedRevision { revision, gc_due })
}

/// Removes the garbage collection schedule of a revision (its gc entries and its
/// `gc_expires_at`). For a transaction holding the revision's lock.
async fn cancel_gc<C: ConnectionTrait>(tx: &C, revision_id: i64) -> Result<()> {
    gc_manifest::Entity::delete_many()
        .filter(gc_manifest::Column::RevisionId.eq(revision_id))
        .exec(tx)
        .await?;
    revisions::Entity::update_many()
        .col_expr(
            revisions::Column::Metadata,
            Expr::cust("metadata - 'gc_expires_at'"),
        )
        .filter(revisions::Column::Id.eq(revision_id))
        .exec(tx)
        .await?;
    Ok(())
}

/// Points `table` (locked) at `revision_id` (locked, belonging to it), records the activation time
/// in the revision's metadata, schedules the replaced revision's files for garbage collection
/// `gc_grace` from now, and sends the notification.
async fn switch_active<C: ConnectionTrait>(
    tx: &C,
    table: tables::Model,
    revision_id: i64,
    gc_grace: Duration,
) -> Result<Activated> {
    let previous = table.active_revision_id;
    let updated = tables::Entity::update_many()
        .col_expr(tables::Column::ActiveRevisionId, Expr::value(revision_id))
        .col_expr(tables::Column::UpdatedAt, Expr::current_timestamp())
        .filter(tables::Column::Id.eq(table.id))
        .exec_with_returning(tx)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::not_found("physical table", table.id))?;
    revisions::Entity::update_many()
        .col_expr(
            revisions::Column::Metadata,
            Expr::cust("metadata || jsonb_build_object('activated_at', now())"),
        )
        .col_expr(revisions::Column::UpdatedAt, Expr::current_timestamp())
        .filter(revisions::Column::Id.eq(revision_id))
        .exec(tx)
        .await?;
    if let Some(old) = previous.filter(|old| *old != revision_id) {
        files::schedule_gc_in(tx, old, gc_grace).await?;
    }
    notify_revision_change(
        tx,
        &RevisionChange {
            physical_table_id: table.id,
            revision_id,
        },
    )
    .await?;
    Ok(Activated {
        table: updated,
        previous,
    })
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

/// Revisions written by a job attempt that is over without having completed them (the job is no
/// longer RUNNING, STOP_REQUESTED or STOPPING on the attempt recorded in the revision, or was
/// deleted), never activated and not yet scheduled for garbage collection: a fenced-off, failed or
/// stopped attempt's partial output, which the garbage collector schedules for deletion at once.
/// By id, at most `limit`.
pub async fn list_abandoned<C>(db: &C, limit: u64) -> Result<Vec<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(revisions::Entity::find()
        // Custom SQL for the key tests only: sea-query has no jsonb `?` operator.
        .filter(Expr::cust(
            "metadata ? 'attempt' AND NOT (metadata ? 'activated_at') \
             AND NOT (metadata ? 'gc_expires_at')",
        ))
        .filter(Expr::not_exists(
            Query::select()
                .expr(Expr::cust("1"))
                .from(jobs::Entity)
                .and_where(
                    Expr::col((jobs::Entity, jobs::Column::Id))
                        .equals(revision(revisions::Column::Writer)),
                )
                .and_where(
                    Expr::col((jobs::Entity, jobs::Column::Attempt)).eq(Expr::col(revision(
                        revisions::Column::Metadata,
                    ))
                    .cast_json_field("attempt")
                    .cast_as("int")),
                )
                .and_where(
                    Expr::col((jobs::Entity, jobs::Column::Status)).is_in(
                        [
                            JobStatus::Running,
                            JobStatus::StopRequested,
                            JobStatus::Stopping,
                        ]
                        .map(JobStatus::as_str),
                    ),
                )
                .to_owned(),
        ))
        .order_by_asc(revisions::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Revisions whose garbage collection is due and whose files have all been deleted and forgotten:
/// what is left is the revision's directory (which may still hold files a writer never
/// registered) and its row. The collector removes the directory, then the row ([`delete`]).
/// Never an active revision. By id, at most `limit`.
pub async fn list_emptied<C>(db: &C, limit: u64) -> Result<Vec<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(revisions::Entity::find()
        .filter(
            Expr::col(revision(revisions::Column::Metadata))
                .cast_json_field("gc_expires_at")
                .cast_as("timestamptz")
                .lte(Expr::current_timestamp()),
        )
        .filter(Expr::not_exists(
            Query::select()
                .expr(Expr::cust("1"))
                .from(file_metadata::Entity)
                .and_where(
                    Expr::col((file_metadata::Entity, file_metadata::Column::RevisionId))
                        .equals(revision(revisions::Column::Id)),
                )
                .to_owned(),
        ))
        .filter(is_active(revision(revisions::Column::Id)).not())
        .order_by_asc(revisions::Column::Id)
        .limit(limit)
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
