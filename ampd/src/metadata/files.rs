//! Data files of table revisions, and their garbage collection.
//!
//! A revision that is no longer active can be scheduled for garbage collection: each of its files
//! gets a `gc_manifest` entry with its path (`<revision path>/<file name>`) and an expiration. Once
//! expired, a collector deletes the objects and then [`forget`]s them.

use std::time::Duration;

use entity::{file_metadata, gc_manifest};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Set, Statement, TransactionSession, TransactionTrait, Value,
};

use super::{Error, Result, micros, revisions};

fn validate_file_name(file_name: &str) -> Result<()> {
    if file_name.is_empty()
        || file_name == "."
        || file_name == ".."
        || file_name.contains(['/', '\\', '\0'])
    {
        return Err(Error::InvalidInput(format!(
            "file name {file_name:?} is invalid: it must be a non-empty path segment"
        )));
    }
    Ok(())
}

/// Registers file `file_name` of revision `revision_id`, or returns the row already registered
/// under that name (unchanged, whatever the other arguments say). `NotFound` for an unknown
/// revision.
#[tracing::instrument(skip(db, metadata), err)]
pub async fn register<C>(
    db: &C,
    revision_id: i64,
    file_name: &str,
    object_size: i64,
    e_tag: Option<&str>,
    version: Option<&str>,
    metadata: serde_json::Value,
) -> Result<file_metadata::Model>
where
    C: ConnectionTrait,
{
    validate_file_name(file_name)?;
    if object_size < 0 {
        return Err(Error::InvalidInput(format!(
            "object size {object_size} of {file_name:?} is negative"
        )));
    }
    let inserted = file_metadata::Entity::insert(file_metadata::ActiveModel {
        revision_id: Set(revision_id),
        file_name: Set(file_name.to_owned()),
        object_size: Set(object_size),
        object_e_tag: Set(e_tag.map(str::to_owned)),
        object_version: Set(version.map(str::to_owned)),
        metadata: Set(metadata),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([
        file_metadata::Column::RevisionId,
        file_metadata::Column::FileName,
    ])
    .exec_with_returning_many(db)
    .await
    .map_err(Error::from);
    let inserted = match inserted {
        Err(e) if e.constraint() == Some("file_metadata_revision_id_fkey") => {
            return Err(Error::not_found("revision", revision_id));
        }
        other => other?,
    };
    // On a conflict, PostgreSQL returns no row (SeaORM reports that as `Inserted(vec![])` or
    // `Conflicted`): read the existing one.
    if let sea_orm::TryInsertResult::Inserted(rows) = inserted
        && let Some(file) = rows.into_iter().next()
    {
        return Ok(file);
    }
    file_metadata::Entity::find()
        .filter(file_metadata::Column::RevisionId.eq(revision_id))
        .filter(file_metadata::Column::FileName.eq(file_name))
        .one(db)
        .await?
        .ok_or_else(|| {
            Error::Conflict(format!(
                "file {file_name:?} of revision {revision_id} was deleted while registering it; \
                 try again"
            ))
        })
}

/// The files of revision `revision_id`, by id.
pub async fn list<C>(db: &C, revision_id: i64) -> Result<Vec<file_metadata::Model>>
where
    C: ConnectionTrait,
{
    Ok(file_metadata::Entity::find()
        .filter(file_metadata::Column::RevisionId.eq(revision_id))
        .order_by_asc(file_metadata::Column::Id)
        .all(db)
        .await?)
}

/// Schedules every file of revision `revision_id` for deletion `expiration` from now (database
/// clock), with path `<revision path>/<file name>`. Files already scheduled keep their entry (so
/// scheduling twice is a no-op). Returns how many files were newly scheduled. `Conflict` while the
/// revision is active; `NotFound` when it does not exist. The revision is locked meanwhile, so it
/// cannot be activated half-way.
#[tracing::instrument(skip(db), err)]
pub async fn schedule_gc<C>(db: &C, revision_id: i64, expiration: Duration) -> Result<u64>
where
    C: ConnectionTrait + TransactionTrait,
{
    let expiration = micros("expiration", expiration)?;
    let tx = db.begin().await?;
    revisions::lock_inactive(&tx, revision_id).await?;
    // INSERT ... SELECT ... ON CONFLICT: one statement for all the revision's files.
    let inserted = tx
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO gc_manifest (file_id, revision_id, file_path, expiration) \
             SELECT f.id, f.revision_id, r.path || '/' || f.file_name, \
                 now() + $2 * interval '1 microsecond' \
             FROM file_metadata f JOIN physical_table_revisions r ON r.id = f.revision_id \
             WHERE f.revision_id = $1 \
             ON CONFLICT (file_id) DO NOTHING",
            [Value::from(revision_id), Value::from(expiration)],
        ))
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(inserted)
}

/// Expired gc entries (`expiration <= now()`), soonest expired first, at most `limit`.
pub async fn list_expired<C>(db: &C, limit: u64) -> Result<Vec<gc_manifest::Model>>
where
    C: ConnectionTrait,
{
    Ok(gc_manifest::Entity::find()
        .filter(Expr::col(gc_manifest::Column::Expiration).lte(Expr::current_timestamp()))
        .order_by_asc(gc_manifest::Column::Expiration)
        .order_by_asc(gc_manifest::Column::FileId)
        .limit(limit)
        .all(db)
        .await?)
}

/// Forgets files that were scheduled for garbage collection (their objects deleted): deletes the
/// `file_metadata` rows of those of `file_ids` that have a gc entry, and the entries with them.
/// Ids without a gc entry are left alone. Returns how many files were forgotten.
#[tracing::instrument(skip(db, file_ids), fields(count = file_ids.len()), err)]
pub async fn forget<C>(db: &C, file_ids: &[i64]) -> Result<u64>
where
    C: ConnectionTrait,
{
    if file_ids.is_empty() {
        return Ok(0);
    }
    let scheduled = Query::select()
        .column(gc_manifest::Column::FileId)
        .from(gc_manifest::Entity)
        .and_where(gc_manifest::Column::FileId.is_in(file_ids.iter().copied()))
        .to_owned();
    Ok(file_metadata::Entity::delete_many()
        .filter(file_metadata::Column::Id.in_subquery(scheduled))
        .exec(db)
        .await?
        .rows_affected)
}
