//! The revisions the garbage collector looks for: abandoned output, and revisions emptied of
//! their files.

use entity::{JobStatus, file_metadata, jobs, physical_table_revisions as revisions};
use sea_orm::sea_query::extension::postgres::PgExpr;
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::{is_active, revision};
use crate::metadata::Result;

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
/// registered) and its row. The collector locks each ([`lock_emptied`]), removes the directory,
/// then the row ([`delete`](super::delete)). Never an active revision. By id, at most `limit`.
pub async fn list_emptied<C>(db: &C, limit: u64) -> Result<Vec<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(emptied()
        .order_by_asc(revisions::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Locks revision `revision_id` (`FOR UPDATE SKIP LOCKED`) if it is still one [`list_emptied`]
/// lists, for the transaction that removes its directory and then its row: `None` when it no longer
/// is (a roll back cancelled its schedule since it was listed) or another transaction holds it.
/// "Due" is tested on the locked row itself, so a roll back that commits while this statement runs
/// is seen too (as in [`crate::metadata::files::list_expired`]); once it is locked, an activation
/// waits for the removal and then finds no revision.
pub async fn lock_emptied<C>(tx: &C, revision_id: i64) -> Result<Option<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(emptied()
        .filter(revisions::Column::Id.eq(revision_id))
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
        .one(tx)
        .await?)
}

/// The revisions that are due, without files, and not active.
fn emptied() -> sea_orm::Select<revisions::Entity> {
    revisions::Entity::find()
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
}
