//! Rows the data-access tests start from, written through `ampd::metadata` where it writes them,
//! and through the entities where a test needs rows the data-access layer would not write (a
//! revision activated by hand, a gc entry with an expiration of its own), so that a test reads as
//! what it checks.

use ampd::metadata::{datasets, jobs, revisions, workers};
use entity::{
    dataset_manifests, file_metadata, gc_manifest, physical_table_revisions, physical_tables, tags,
};
use sea_orm::{ActiveModelTrait, ConnectionTrait, DatabaseConnection, EntityTrait, Set};
use serde_json::{Value, json};

use crate::TestDb;

/// A new migrated database, a connection pool on it ([`TestDb::connect`]), and what `rows` wrote
/// in it (a test's fixture): the start of most data-access tests.
pub async fn setup<T>(
    rows: impl AsyncFnOnce(&DatabaseConnection) -> T,
) -> (TestDb, DatabaseConnection, T) {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let fixture = rows(&conn).await;
    (db, conn, fixture)
}

/// Registers a worker for each of `nodes`, with empty worker info.
pub async fn workers(db: &DatabaseConnection, nodes: &[&str]) {
    for node in nodes {
        workers::register(db, node, json!({}))
            .await
            .unwrap_or_else(|e| panic!("register worker {node}: {e}"));
    }
}

/// The active revision of table `table_id`: the revision its `active_revision_id` points at,
/// which must exist and belong to the table. Read from the rows, not through `revisions::active`,
/// so that a test of the data-access layer does not check it against itself.
pub async fn active_revision<C: ConnectionTrait>(
    db: &C,
    table_id: i64,
) -> Option<physical_table_revisions::Model> {
    let id = active_revision_id(db, table_id).await?;
    let revision = physical_table_revisions::Entity::find_by_id(id)
        .one(db)
        .await
        .expect("read the active revision")
        .unwrap_or_else(|| {
            panic!("table {table_id} points at revision {id}, which does not exist")
        });
    assert_eq!(
        revision.physical_table_id, table_id,
        "table {table_id} points at revision {id} of another table"
    );
    Some(revision)
}

/// The id of the active revision of table `table_id` (its `active_revision_id`); the table must
/// exist.
pub async fn active_revision_id<C: ConnectionTrait>(db: &C, table_id: i64) -> Option<i64> {
    physical_tables::Entity::find_by_id(table_id)
        .one(db)
        .await
        .expect("read the table")
        .unwrap_or_else(|| panic!("table {table_id} does not exist"))
        .active_revision_id
}

/// The job kind of the tests' jobs.
pub const KIND: &str = "materialize-static";

/// A job descriptor naming dataset `eth/<name>` with manifest hash `a…a`.
pub fn descriptor(name: &str) -> Value {
    json!({
        "namespace": "eth",
        "name": name,
        "manifest_hash": "a".repeat(64),
    })
}

/// The ids of `jobs`, in order.
pub fn job_ids(jobs: &[entity::jobs::Model]) -> Vec<i64> {
    jobs.iter().map(|j| j.id).collect()
}

/// A job of [`KIND`] for table `eth/<name>` ([`descriptor`]), scheduled on `node` or on none.
pub async fn scheduled<C: ConnectionTrait>(
    db: &C,
    name: &str,
    node: Option<&str>,
) -> entity::jobs::Model {
    let (job, _) = jobs::schedule(db, KIND, descriptor(name), node)
        .await
        .expect("schedule");
    job
}

/// Schedules one job per entry of `nodes` (on that node, or on none), for tables `t0`, `t1`, ...;
/// returns their ids in order.
pub async fn schedule_each(db: &DatabaseConnection, nodes: &[Option<&str>]) -> Vec<i64> {
    let mut ids = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        ids.push(scheduled(db, &format!("t{i}"), *node).await.id);
    }
    ids
}

/// The job `id`, which must exist.
pub async fn job(db: &DatabaseConnection, id: i64) -> entity::jobs::Model {
    jobs::get(db, id).await.expect("get").expect("job exists")
}

/// The event types of job `id`, oldest first.
pub async fn event_types(db: &DatabaseConnection, id: i64) -> Vec<String> {
    jobs::list_events(db, id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.event_type)
        .collect()
}

/// Registers a static manifest of `content` and its tables `names` in dataset `eth/mainnet`;
/// returns the manifest's hash and the tables, in order.
pub async fn manifest_with_tables(
    db: &DatabaseConnection,
    content: &[u8],
    names: &[&str],
) -> (String, Vec<physical_tables::Model>) {
    let hash = datasets::register_manifest(db, "static", content, "m.json")
        .await
        .expect("manifest");
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        tables.push(
            revisions::register_table(db, "eth", "mainnet", &hash, name)
                .await
                .expect("table"),
        );
    }
    (hash, tables)
}

/// A new revision of `table_id` that no job writes, with empty metadata.
pub async fn revision(db: &DatabaseConnection, table_id: i64) -> physical_table_revisions::Model {
    revisions::create_revision(db, table_id, None, json!({}))
        .await
        .expect("create revision")
}

/// Links manifest `hash` to dataset `namespace/name`, as a row.
pub async fn insert_link(db: &DatabaseConnection, namespace: &str, name: &str, hash: &str) {
    dataset_manifests::ActiveModel {
        namespace: Set(namespace.into()),
        name: Set(name.into()),
        hash: Set(hash.into()),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("link");
}

/// Tags manifest `hash` as `version` of `namespace/name`, as a row.
pub async fn insert_tag(
    db: &DatabaseConnection,
    namespace: &str,
    name: &str,
    version: &str,
    hash: &str,
) {
    tags::ActiveModel {
        namespace: Set(namespace.into()),
        name: Set(name.into()),
        version: Set(version.into()),
        hash: Set(hash.into()),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("tag");
}

/// Table `eth/blocks` `blocks` of manifest `hash`, as a row.
pub async fn insert_blocks_table(db: &DatabaseConnection, hash: &str) -> physical_tables::Model {
    physical_tables::ActiveModel {
        dataset_namespace: Set("eth".into()),
        dataset_name: Set("blocks".into()),
        manifest_hash: Set(hash.into()),
        table_name: Set("blocks".into()),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("table")
}

/// Makes `revision_id` the active revision of `table`, behind the data-access layer's back.
pub async fn set_active(
    db: &DatabaseConnection,
    table: physical_tables::Model,
    revision_id: i64,
) -> physical_tables::Model {
    let mut t: physical_tables::ActiveModel = table.into();
    t.active_revision_id = Set(Some(revision_id));
    t.update(db).await.expect("activate")
}

/// A gc entry for `file` at `file_path`, expiring now.
pub async fn insert_gc_entry(
    db: &DatabaseConnection,
    file: &file_metadata::Model,
    file_path: &str,
) {
    gc_manifest::ActiveModel {
        file_id: Set(file.id),
        revision_id: Set(file.revision_id),
        file_path: Set(file_path.into()),
        expiration: Set(chrono::Utc::now().fixed_offset()),
    }
    .insert(db)
    .await
    .expect("gc entry");
}
