//! Physical tables of a dataset manifest and their revisions (storage locations), one of which is
//! active.
//!
//! A revision's path is `<namespace>/<name>/<table>/<uuid v7>`, relative to the data directory.
//! A revision is active iff its table's `active_revision_id` names it: activating one replaces the
//! previous one in the same update, and an active revision cannot be deleted.

use entity::{physical_table_revisions as revisions, physical_tables as tables};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, Set, Statement, TransactionSession, TransactionTrait, Value,
};

use super::notifications::{RevisionChange, notify_revision_change};
use super::{Error, Result, validate_dataset_part};

/// Table names: non-empty, and a single path segment (no `/`, not `.` or `..`).
fn validate_table_name(table_name: &str) -> Result<()> {
    if table_name.is_empty()
        || table_name == "."
        || table_name == ".."
        || table_name.contains(['/', '\\', '\0'])
    {
        return Err(Error::InvalidInput(format!(
            "table name {table_name:?} is invalid: it must be a non-empty path segment"
        )));
    }
    Ok(())
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
    validate_table_name(table_name)?;
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
    .map_err(Error::from);
    let inserted = match inserted {
        Err(e) if e.constraint() == Some("physical_tables_manifest_hash_fkey") => {
            return Err(Error::not_found("manifest", manifest_hash));
        }
        other => other?,
    };
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

/// Creates a revision of table `table_id` at a new path `<namespace>/<name>/<table>/<uuid v7>`,
/// written by job `writer` (if any). One statement, which reads the path's parts from the table.
/// `NotFound` for an unknown table or writer job.
#[tracing::instrument(skip(db, metadata), err)]
pub async fn create_revision<C>(
    db: &C,
    table_id: i64,
    writer: Option<i64>,
    metadata: serde_json::Value,
) -> Result<revisions::Model>
where
    C: ConnectionTrait,
{
    let id = uuid::Uuid::now_v7().to_string();
    let sql = "INSERT INTO physical_table_revisions (physical_table_id, path, writer, metadata) \
         SELECT id, dataset_namespace || '/' || dataset_name || '/' || table_name || '/' || $2, \
             $3, $4::jsonb \
         FROM physical_tables WHERE id = $1 \
         RETURNING *";
    let created = revisions::Model::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [
            Value::from(table_id),
            Value::from(id),
            Value::from(writer),
            Value::from(metadata),
        ],
    ))
    .one(db)
    .await
    .map_err(Error::from);
    match created {
        Err(e) if e.constraint() == Some("physical_table_revisions_writer_fkey") => Err(
            Error::not_found("job", writer.map_or_else(String::new, |w| w.to_string())),
        ),
        other => other?.ok_or_else(|| Error::not_found("physical table", table_id)),
    }
}

/// The revision `revision_id`, if it exists.
pub async fn get<C>(db: &C, revision_id: i64) -> Result<Option<revisions::Model>>
where
    C: ConnectionTrait,
{
    Ok(revisions::Entity::find_by_id(revision_id).one(db).await?)
}

/// What [`activate`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activated {
    /// The table, with its new `active_revision_id`.
    pub table: tables::Model,
    /// The revision that was active before (the one activated, if it already was; `None` if none
    /// was).
    pub previous: Option<i64>,
}

/// Makes `revision_id` the active revision of table `table_id`, replacing the previous one in the
/// same update, and sends a `revision_changes` notification (delivered on commit). `NotFound` for
/// an unknown table or revision; `Conflict` when the revision belongs to another table.
///
/// A transaction (three statements): the table row is locked first, so concurrent activations of one
/// table take turns and each reports the revision it replaced.
#[tracing::instrument(skip(db), err)]
pub async fn activate<C>(db: &C, table_id: i64, revision_id: i64) -> Result<Activated>
where
    C: ConnectionTrait + TransactionTrait,
{
    let tx = db.begin().await?;
    let table = tables::Entity::find_by_id(table_id)
        .lock_exclusive()
        .one(&tx)
        .await?
        .ok_or_else(|| Error::not_found("physical table", table_id))?;
    let revision = revisions::Entity::find_by_id(revision_id)
        .one(&tx)
        .await?
        .ok_or_else(|| Error::not_found("revision", revision_id))?;
    if revision.physical_table_id != table_id {
        return Err(Error::Conflict(format!(
            "revision {revision_id} belongs to table {}, not to table {table_id}",
            revision.physical_table_id
        )));
    }
    let previous = table.active_revision_id;
    // A guarded update: the revision must still belong to the table (and so still exist) when the
    // row is written.
    let updated = tables::Model::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE physical_tables SET active_revision_id = $2, updated_at = now() \
         WHERE id = $1 AND EXISTS ( \
             SELECT 1 FROM physical_table_revisions WHERE id = $2 AND physical_table_id = $1) \
         RETURNING *",
        [Value::from(table_id), Value::from(revision_id)],
    ))
    .one(&tx)
    .await
    .map_err(|e| match Error::from(e) {
        // The revision was deleted (by a transaction that committed meanwhile).
        e if e.constraint() == Some("physical_tables_active_revision_id_fkey") => {
            Error::not_found("revision", revision_id)
        }
        e => e,
    })?
    .ok_or_else(|| Error::not_found("revision", revision_id))?;
    notify_revision_change(
        &tx,
        &RevisionChange {
            physical_table_id: table_id,
            revision_id,
        },
    )
    .await?;
    tx.commit().await?;
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
