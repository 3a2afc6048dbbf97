//! Physical tables: registering a manifest's tables and listing them.

use entity::{physical_table_revisions as revisions, physical_tables as tables};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set};

use crate::metadata::{Error, Result, validate_dataset, validate_path_segment};

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
    validate_dataset(namespace, name)?;
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
