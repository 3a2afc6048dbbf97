//! Data files of table revisions, and their garbage collection.
//!
//! Files are registered into a revision while it is being written: never into one that is or was
//! active, nor one scheduled for garbage collection, nor one whose writing attempt is over.
//!
//! A revision that is no longer active is scheduled for garbage collection ([`schedule_gc`]):
//! each of its files gets a `gc_manifest` entry with its path (`<revision path>/<file name>`) and
//! an expiration. Deleting is two steps, in one transaction of the collector's: [`list_expired`]
//! (which locks the revisions it returns, so no activation can bring them back meanwhile), delete
//! the objects from storage, [`forget`]. A collector that dies in between leaves the rows, and the
//! next run deletes again (a missing object counts as deleted) and forgets them: files are never
//! left behind without a row that names them. Files of an active revision are never listed nor
//! forgotten.

use std::time::Duration;

use entity::{file_metadata, gc_manifest, physical_table_revisions as revisions};
use sea_orm::sea_query::extension::postgres::PgExpr;
use sea_orm::sea_query::{
    Expr, ExprTrait, IntoTableRef, LockBehavior, LockType, OnConflict, Query,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, QueryTrait, Statement, TransactionSession, TransactionTrait, Value,
};

use super::revisions::{self as revision_ops, is_active};
use super::{Error, Result, micros, validate_path_segment};

/// Registers file `file_name` of revision `revision_id`, or returns the row already registered
/// under that name (unchanged, whatever the other arguments say). The revision must be writable:
/// never active, not scheduled for garbage collection, and, when a job attempt writes it, that
/// attempt still RUNNING, started by the process that still holds its node id (the node's claim
/// epoch is the job's) (`Conflict` otherwise, saying which). `NotFound` for an unknown revision.
///
/// One statement: the revision row is locked `FOR SHARE` and its state re-checked under the lock,
/// so a concurrent activation or garbage-collection schedule either sees this file or refuses it.
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
    validate_path_segment("file name", file_name)?;
    if object_size < 0 {
        return Err(Error::InvalidInput(format!(
            "object size {object_size} of {file_name:?} is negative"
        )));
    }
    // Raw SQL: a locking CTE feeding an INSERT ... ON CONFLICT, with the existing row as fallback,
    // is one round trip here and has no sea-query form.
    let sql = format!(
        "WITH writable AS ( \
            SELECT id FROM physical_table_revisions r WHERE id = $1 AND {WRITABLE} FOR SHARE), \
        inserted AS ( \
            INSERT INTO file_metadata \
                (revision_id, file_name, object_size, object_e_tag, object_version, metadata) \
            SELECT id, $2, $3, $4, $5, $6::jsonb FROM writable \
            ON CONFLICT (revision_id, file_name) DO NOTHING \
            RETURNING *) \
        SELECT * FROM inserted \
        UNION ALL \
        SELECT * FROM file_metadata WHERE revision_id = $1 AND file_name = $2 \
            AND NOT EXISTS (SELECT 1 FROM inserted)"
    );
    let row = file_metadata::Model::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [
            Value::from(revision_id),
            Value::from(file_name),
            Value::from(object_size),
            Value::from(e_tag.map(str::to_owned)),
            Value::from(version.map(str::to_owned)),
            Value::from(metadata),
        ],
    ))
    .one(db)
    .await?;
    match row {
        Some(file) => Ok(file),
        None => Err(not_writable(db, revision_id, &format!("file {file_name:?}")).await),
    }
}

/// Whether revision `r` accepts files: never active, not scheduled for garbage collection, and,
/// when a job attempt writes it, that attempt still RUNNING, started by the process that still
/// holds its node id.
const WRITABLE: &str = "NOT (r.metadata ? 'activated_at') AND NOT (r.metadata ? 'gc_expires_at') \
    AND (NOT (r.metadata ? 'attempt') OR EXISTS (SELECT 1 FROM jobs j \
        WHERE j.id = r.writer AND j.attempt = (r.metadata ->> 'attempt')::int \
          AND j.status = 'RUNNING' AND (j.claim_epoch IS NULL OR j.claim_epoch = \
            (SELECT w.claim_epoch FROM workers w WHERE w.node_id = j.node_id))))";

/// Locks revision `revision_id` `FOR SHARE` in the caller's transaction if it accepts files (as
/// [`register`] requires), and returns it: storage for it may be written until the transaction
/// ends, and no garbage-collection schedule (which locks the row `FOR UPDATE`) or activation can
/// come in between. `NotFound` when it no longer exists (it was collected), `Conflict` when it no
/// longer accepts files.
pub async fn hold_writable<C>(tx: &C, revision_id: i64) -> Result<revisions::Model>
where
    C: ConnectionTrait,
{
    let sql =
        format!("SELECT * FROM physical_table_revisions r WHERE id = $1 AND {WRITABLE} FOR SHARE");
    let row = revisions::Model::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [Value::from(revision_id)],
    ))
    .one(tx)
    .await?;
    match row {
        Some(revision) => Ok(revision),
        None => Err(not_writable(tx, revision_id, "storage").await),
    }
}

/// Why `what` cannot be written into `revision_id`.
async fn not_writable<C: ConnectionTrait>(db: &C, revision_id: i64, what: &str) -> Error {
    let revision = match revisions::Entity::find_by_id(revision_id).one(db).await {
        Ok(Some(revision)) => revision,
        Ok(None) => return Error::not_found("revision", revision_id),
        Err(e) => return e.into(),
    };
    let meta = &revision.metadata;
    let why = if meta.get("gc_expires_at").is_some() {
        "it is scheduled for garbage collection"
    } else if meta.get("activated_at").is_some() {
        "it is (or was) active, and what is served never changes"
    } else {
        "the job attempt that writes it is no longer running"
    };
    Error::Conflict(format!(
        "{what} cannot be written into revision {revision_id}: {why}"
    ))
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

/// The files of every active revision, by revision and, within one, by id (the order [`list`]
/// gives), in one statement.
pub async fn list_active<C>(db: &C) -> Result<Vec<file_metadata::Model>>
where
    C: ConnectionTrait,
{
    Ok(file_metadata::Entity::find()
        .filter(is_active((
            file_metadata::Entity,
            file_metadata::Column::RevisionId,
        )))
        .order_by_asc(file_metadata::Column::RevisionId)
        .order_by_asc(file_metadata::Column::Id)
        .all(db)
        .await?)
}

/// The files of the active revisions of every table of manifest `manifest_hash` of dataset
/// `namespace/name`, by revision and, within one, by id (the order [`list`] gives). One statement,
/// whatever the number of tables.
pub async fn list_active_of_manifest<C>(
    db: &C,
    namespace: &str,
    name: &str,
    manifest_hash: &str,
) -> Result<Vec<file_metadata::Model>>
where
    C: ConnectionTrait,
{
    use entity::physical_tables as tables;
    let active = Query::select()
        .column(tables::Column::ActiveRevisionId)
        .from(tables::Entity)
        .and_where(tables::Column::DatasetNamespace.eq(namespace))
        .and_where(tables::Column::DatasetName.eq(name))
        .and_where(tables::Column::ManifestHash.eq(manifest_hash))
        .and_where(tables::Column::ActiveRevisionId.is_not_null())
        .to_owned();
    Ok(file_metadata::Entity::find()
        .filter(file_metadata::Column::RevisionId.in_subquery(active))
        .order_by_asc(file_metadata::Column::RevisionId)
        .order_by_asc(file_metadata::Column::Id)
        .all(db)
        .await?)
}

/// Schedules every file of revision `revision_id` for deletion `expiration` from now (database
/// clock), with path `<revision path>/<file name>`, and marks the revision as scheduled (it then
/// accepts no more files). Files already scheduled keep their entry, and a revision already
/// scheduled keeps its expiration (so scheduling twice is a no-op). Returns how many files were
/// newly scheduled. `Conflict` while the revision is active; `NotFound` when it does not exist.
/// The revision is locked meanwhile, so it cannot be activated half-way.
#[tracing::instrument(skip(db), err)]
pub async fn schedule_gc<C>(db: &C, revision_id: i64, expiration: Duration) -> Result<u64>
where
    C: ConnectionTrait + TransactionTrait,
{
    let tx = db.begin().await?;
    let scheduled = schedule_gc_in(&tx, revision_id, expiration).await?;
    tx.commit().await?;
    Ok(scheduled)
}

/// [`schedule_gc`] inside the caller's transaction.
pub(crate) async fn schedule_gc_in<C>(tx: &C, revision_id: i64, expiration: Duration) -> Result<u64>
where
    C: ConnectionTrait,
{
    let expiration = micros("expiration", expiration)?;
    revision_ops::lock_inactive(tx, revision_id).await?;
    revisions::Entity::update_many()
        .col_expr(
            revisions::Column::Metadata,
            Expr::cust_with_values(
                "CASE WHEN metadata ? 'gc_expires_at' THEN metadata ELSE metadata || \
                 jsonb_build_object('gc_expires_at', now() + $1 * interval '1 microsecond') END",
                [expiration],
            ),
        )
        .filter(revisions::Column::Id.eq(revision_id))
        .exec(tx)
        .await?;
    // INSERT ... SELECT ... ON CONFLICT: one statement for all the revision's files, each expiring
    // with the revision.
    let file = |c: file_metadata::Column| Expr::col((file_metadata::Entity, c));
    let revision = |c: revisions::Column| Expr::col((revisions::Entity, c));
    let files = Query::select()
        .expr(file(file_metadata::Column::Id))
        .expr(file(file_metadata::Column::RevisionId))
        .expr(
            revision(revisions::Column::Path)
                .concatenate("/")
                .concatenate(file(file_metadata::Column::FileName)),
        )
        .expr(
            revision(revisions::Column::Metadata)
                .cast_json_field("gc_expires_at")
                .cast_as("timestamptz"),
        )
        .from(file_metadata::Entity)
        .inner_join(
            revisions::Entity,
            revision(revisions::Column::Id)
                .equals((file_metadata::Entity, file_metadata::Column::RevisionId)),
        )
        .and_where(file(file_metadata::Column::RevisionId).eq(revision_id))
        .to_owned();
    let insert = Query::insert()
        .into_table(gc_manifest::Entity)
        .columns([
            gc_manifest::Column::FileId,
            gc_manifest::Column::RevisionId,
            gc_manifest::Column::FilePath,
            gc_manifest::Column::Expiration,
        ])
        .select_from(files)
        .map_err(|e| Error::Db(DbErr::Custom(e.to_string())))?
        .on_conflict(
            OnConflict::column(gc_manifest::Column::FileId)
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    Ok(tx.execute(&insert).await?.rows_affected())
}

/// Expired gc entries (`expiration <= now()`) of revisions whose garbage collection is due and
/// that are not active, soonest expired first, at most `limit`. Call it inside the transaction that
/// deletes the objects and then [`forget`]s them: it locks the entries' revisions (`FOR NO KEY
/// UPDATE ... SKIP LOCKED`), so an activation of one of them waits until the files are forgotten
/// and then refuses, and concurrent collectors take different revisions.
///
/// "Due" is also read from the revision row itself (its `gc_expires_at`), the row that is locked: a
/// roll back ([`crate::metadata::revisions::activate`]) that cancelled the schedule and committed
/// after this statement took its snapshot changed that row, PostgreSQL re-checks the statement's
/// conditions on the row's latest version once it holds the lock, and the revision's entries are
/// not listed. (The entries and the "not active" test come from the statement's snapshot, so they
/// alone cannot see such a roll back.) A revision that has `gc_expires_at` is never active: an
/// activation cancels the schedule under the revision's lock.
///
/// The index `idx_gc_manifest_expiration_file_id` gives the entries in this order, so a batch
/// reads about `limit` entries, whatever the backlog.
pub async fn list_expired<C>(db: &C, limit: u64) -> Result<Vec<gc_manifest::Model>>
where
    C: ConnectionTrait,
{
    Ok(
        gc_manifest::Model::find_by_statement(list_expired_statement(limit))
            .all(db)
            .await?,
    )
}

/// The statement [`list_expired`] runs (to `EXPLAIN` it).
pub fn list_expired_statement(limit: u64) -> Statement {
    let revision_due = Expr::col((revisions::Entity, revisions::Column::Metadata))
        .cast_json_field("gc_expires_at")
        .cast_as("timestamptz")
        .lte(Expr::current_timestamp());
    let mut query = gc_manifest::Entity::find()
        .inner_join(revisions::Entity)
        .filter(Expr::col(gc_manifest::Column::Expiration).lte(Expr::current_timestamp()))
        .filter(revision_due)
        .filter(is_active((gc_manifest::Entity, gc_manifest::Column::RevisionId)).not())
        .order_by_asc(gc_manifest::Column::Expiration)
        .order_by_asc(gc_manifest::Column::FileId)
        .limit(limit);
    QueryTrait::query(&mut query).lock_with_tables_behavior(
        LockType::NoKeyUpdate,
        [revisions::Entity.into_table_ref()],
        LockBehavior::SkipLocked,
    );
    query.build(DbBackend::Postgres)
}

/// Forgets files that were scheduled for garbage collection (their objects deleted): deletes the
/// `file_metadata` rows of those of `file_ids` that have a gc entry and belong to a revision that is
/// not active, and the entries with them. Other ids are left alone. Returns how many files were
/// forgotten.
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
        .filter(is_active((file_metadata::Entity, file_metadata::Column::RevisionId)).not())
        .exec(db)
        .await?
        .rows_affected)
}
