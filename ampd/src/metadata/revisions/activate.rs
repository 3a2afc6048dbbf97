//! Making a revision its table's active one: a roll back ([`activate`]) or a job's output
//! ([`activate_output`]), both under the table's and the revision's locks.

use std::time::Duration;

use entity::{gc_manifest, physical_table_revisions as revisions, physical_tables as tables};
use sea_orm::sea_query::extension::postgres::PgExpr;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, TransactionSession,
    TransactionTrait,
};

use crate::metadata::jobs::JobClaim;
use crate::metadata::notifications::{RevisionChange, notify_revision_change};
use crate::metadata::{Error, Result, files};

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
