//! The foreign keys behave as SCHEMA.md says: cascades, SET NULL, and refusals.

use entity::{
    dataset_manifests, file_metadata, gc_manifest, job_events, jobs, manifest_files,
    physical_table_revisions, physical_tables, tags, workers,
};
use sea_orm::{ActiveModelTrait, DatabaseConnection, EntityTrait, ModelTrait, PaginatorTrait, Set};
use serde_json::json;
use tests::TestDb;
use tests::rows;

const HASH: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// A worker, a job with two events, a manifest linked and tagged, a table with two revisions (the
/// second active and written by the job), a file of each revision and a gc entry for the first.
struct Fixture {
    job: jobs::Model,
    table: physical_tables::Model,
    old_revision: physical_table_revisions::Model,
    active_revision: physical_table_revisions::Model,
    old_file: file_metadata::Model,
}

async fn fixture(db: &DatabaseConnection) -> Fixture {
    workers::ActiveModel {
        node_id: Set("w1".into()),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("worker");
    let job = jobs::ActiveModel {
        kind: Set("materialize-static".into()),
        node_id: Set(Some("w1".into())),
        descriptor: Set(json!({})),
        idempotency_key: Set("k1".into()),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("job");
    for status in ["SCHEDULED", "RUNNING"] {
        job_events::ActiveModel {
            job_id: Set(job.id),
            event_type: Set(status.into()),
            ..Default::default()
        }
        .insert(db)
        .await
        .expect("event");
    }
    manifest_files::ActiveModel {
        hash: Set(HASH.into()),
        kind: Set("static".into()),
        path: Set("m.json".into()),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("manifest");
    rows::insert_link(db, "eth", "blocks", HASH).await;
    rows::insert_tag(db, "eth", "blocks", "latest", HASH).await;
    let table = rows::insert_blocks_table(db, HASH).await;
    let mut revisions = Vec::new();
    for (i, writer) in [(1, None), (2, Some(job.id))] {
        revisions.push(
            physical_table_revisions::ActiveModel {
                physical_table_id: Set(table.id),
                path: Set(format!("eth/blocks/blocks/{i}")),
                writer: Set(writer),
                ..Default::default()
            }
            .insert(db)
            .await
            .expect("revision"),
        );
    }
    let active_revision = revisions.pop().expect("two revisions");
    let old_revision = revisions.pop().expect("two revisions");
    let table = rows::set_active(db, table, active_revision.id).await;
    let mut files = Vec::new();
    for rev in [&old_revision, &active_revision] {
        files.push(
            file_metadata::ActiveModel {
                revision_id: Set(rev.id),
                file_name: Set("f.parquet".into()),
                object_size: Set(1),
                ..Default::default()
            }
            .insert(db)
            .await
            .expect("file"),
        );
    }
    let old_file = files.swap_remove(0);
    rows::insert_gc_entry(db, &old_file, "eth/blocks/blocks/1/f.parquet").await;
    Fixture {
        job,
        table,
        old_revision,
        active_revision,
        old_file,
    }
}

#[tokio::test]
async fn deleting_a_job_cascades_to_its_events_and_nulls_the_writer_of_its_revisions() {
    let (_db, conn, f) = rows::setup(fixture).await;
    assert_eq!(job_events::Entity::find().count(&conn).await.unwrap(), 2);

    f.job.delete(&conn).await.expect("delete job");

    assert_eq!(job_events::Entity::find().count(&conn).await.unwrap(), 0);
    let rev = physical_table_revisions::Entity::find_by_id(f.active_revision.id)
        .one(&conn)
        .await
        .unwrap()
        .expect("the revision itself stays");
    assert_eq!(rev.writer, None);
}

#[tokio::test]
async fn deleting_the_active_revision_nulls_the_tables_active_revision_id() {
    let (_db, conn, f) = rows::setup(fixture).await;
    assert_eq!(f.table.active_revision_id, Some(f.active_revision.id));

    f.active_revision
        .delete(&conn)
        .await
        .expect("delete revision");

    assert_eq!(rows::active_revision_id(&conn, f.table.id).await, None);
    assert_eq!(
        file_metadata::Entity::find().count(&conn).await.unwrap(),
        1,
        "its file went with it"
    );
}

#[tokio::test]
async fn deleting_a_revision_cascades_to_its_files_and_gc_entries() {
    let (_db, conn, f) = rows::setup(fixture).await;

    f.old_revision.delete(&conn).await.expect("delete revision");

    assert!(
        file_metadata::Entity::find_by_id(f.old_file.id)
            .one(&conn)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(gc_manifest::Entity::find().count(&conn).await.unwrap(), 0);
    assert_eq!(file_metadata::Entity::find().count(&conn).await.unwrap(), 1);
}

#[tokio::test]
async fn deleting_a_file_cascades_to_its_gc_entry() {
    let (_db, conn, f) = rows::setup(fixture).await;
    f.old_file.delete(&conn).await.expect("delete file");
    assert_eq!(gc_manifest::Entity::find().count(&conn).await.unwrap(), 0);
}

#[tokio::test]
async fn deleting_a_manifest_cascades_to_links_tags_tables_revisions_and_files() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let _f = fixture(&conn).await;

    manifest_files::Entity::delete_by_id(HASH.to_owned())
        .exec(&conn)
        .await
        .expect("delete manifest");

    assert_eq!(
        dataset_manifests::Entity::find()
            .count(&conn)
            .await
            .unwrap(),
        0
    );
    assert_eq!(tags::Entity::find().count(&conn).await.unwrap(), 0);
    assert_eq!(
        physical_tables::Entity::find().count(&conn).await.unwrap(),
        0
    );
    assert_eq!(
        physical_table_revisions::Entity::find()
            .count(&conn)
            .await
            .unwrap(),
        0
    );
    assert_eq!(file_metadata::Entity::find().count(&conn).await.unwrap(), 0);
    assert_eq!(gc_manifest::Entity::find().count(&conn).await.unwrap(), 0);
    assert_eq!(
        jobs::Entity::find().count(&conn).await.unwrap(),
        1,
        "jobs are not part of a manifest"
    );
}

#[tokio::test]
async fn deleting_a_worker_unlinks_its_jobs_and_keeps_their_history() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let f = fixture(&conn).await;
    let deleted = workers::Entity::delete_many()
        .exec(&conn)
        .await
        .expect("jobs_node_id_fkey is ON DELETE SET NULL");
    assert_eq!(deleted.rows_affected, 1);
    let job = jobs::Entity::find_by_id(f.job.id)
        .one(&conn)
        .await
        .unwrap()
        .expect("the job stays");
    assert_eq!(job.node_id, None);
    assert_eq!(
        f.job
            .find_related(job_events::Entity)
            .count(&conn)
            .await
            .unwrap(),
        2,
        "its events stay"
    );
}

#[tokio::test]
async fn a_job_cannot_name_an_unregistered_worker_nor_a_tag_an_unlinked_manifest() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let _f = fixture(&conn).await;
    let err = jobs::ActiveModel {
        kind: Set("k".into()),
        node_id: Set(Some("ghost".into())),
        descriptor: Set(json!({})),
        idempotency_key: Set("k2".into()),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect_err("unknown worker");
    assert!(err.to_string().contains("jobs_node_id_fkey"), "{err}");

    let err = tags::ActiveModel {
        namespace: Set("eth".into()),
        name: Set("other".into()),
        version: Set("latest".into()),
        hash: Set(HASH.into()),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect_err("tag of a manifest not linked to that dataset");
    assert!(
        err.to_string().contains("tags_dataset_manifest_fkey"),
        "{err}"
    );
}
