//! `metadata::files`: data files of revisions and their garbage collection.

use std::time::Duration;

use ampd::metadata::{Error, files, revisions};
use entity::{file_metadata, gc_manifest, physical_table_revisions};
use sea_orm::{DatabaseConnection, EntityTrait, PaginatorTrait};
use serde_json::json;
use tests::rows;

struct Fixture {
    table_id: i64,
    active: physical_table_revisions::Model,
    old: physical_table_revisions::Model,
}

/// A table with two revisions: `old`, and `active`, which [`activate`] makes active (once the test
/// has registered its files: an active revision accepts none).
async fn fixture(db: &DatabaseConnection) -> Fixture {
    let table_id = rows::manifest_with_tables(db, b"manifest", &["blocks"])
        .await
        .1[0]
        .id;
    let old = rows::revision(db, table_id).await;
    let active = rows::revision(db, table_id).await;
    Fixture {
        table_id,
        active,
        old,
    }
}

async fn activate(db: &DatabaseConnection, f: &Fixture) {
    revisions::activate(db, f.table_id, f.active.id, Duration::from_secs(3600))
        .await
        .unwrap();
}

async fn file(db: &DatabaseConnection, revision_id: i64, name: &str) -> file_metadata::Model {
    files::register(
        db,
        revision_id,
        name,
        100,
        Some("etag"),
        None,
        json!({"rows": 1}),
    )
    .await
    .unwrap_or_else(|e| panic!("register {name}: {e}"))
}

#[tokio::test]
async fn register_is_idempotent_on_revision_and_file_name() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let first = file(&conn, f.old.id, "a.parquet").await;
    assert_eq!(first.object_size, 100);
    assert_eq!(first.object_e_tag.as_deref(), Some("etag"));
    assert_eq!(first.metadata, json!({"rows": 1}));

    let again = files::register(
        &conn,
        f.old.id,
        "a.parquet",
        999,
        None,
        Some("v2"),
        json!({}),
    )
    .await
    .unwrap();

    assert_eq!(again, first, "the existing row, unchanged");
    let same_name_elsewhere = file(&conn, f.active.id, "a.parquet").await;
    assert_ne!(same_name_elsewhere.id, first.id);
    assert_eq!(file_metadata::Entity::find().count(&conn).await.unwrap(), 2);
}

#[tokio::test]
async fn register_needs_an_existing_revision() {
    let (_db, conn, _) = rows::setup(fixture).await;
    let err = files::register(&conn, 999_999, "a.parquet", 1, None, None, json!({}))
        .await
        .expect_err("unknown revision");
    assert!(
        matches!(
            err,
            Error::NotFound {
                entity: "revision",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(file_metadata::Entity::find().count(&conn).await.unwrap(), 0);
}

#[tokio::test]
async fn register_refuses_invalid_file_names_and_sizes() {
    let (_db, conn, f) = rows::setup(fixture).await;
    for (name, size) in [("", 1), ("a/b.parquet", 1), ("..", 1), ("a.parquet", -1)] {
        let err = files::register(&conn, f.old.id, name, size, None, None, json!({}))
            .await
            .expect_err("invalid");
        assert!(matches!(err, Error::InvalidInput(_)), "{name:?}: {err:?}");
    }
    assert_eq!(file_metadata::Entity::find().count(&conn).await.unwrap(), 0);
}

#[tokio::test]
async fn list_returns_the_files_of_one_revision_in_registration_order() {
    let (_db, conn, f) = rows::setup(fixture).await;
    for name in ["c", "a", "b"] {
        file(&conn, f.old.id, name).await;
    }
    file(&conn, f.active.id, "x").await;
    let names: Vec<String> = files::list(&conn, f.old.id)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.file_name)
        .collect();
    assert_eq!(names, ["c", "a", "b"]);
}

#[tokio::test]
async fn schedule_gc_of_the_active_revision_is_a_conflict() {
    let (_db, conn, f) = rows::setup(fixture).await;
    file(&conn, f.active.id, "a.parquet").await;
    activate(&conn, &f).await;

    let err = files::schedule_gc(&conn, f.active.id, Duration::ZERO)
        .await
        .expect_err("active");

    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(gc_manifest::Entity::find().count(&conn).await.unwrap(), 0);
    let err = files::schedule_gc(&conn, 999_999, Duration::ZERO)
        .await
        .expect_err("unknown");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn schedule_gc_schedules_every_file_with_its_path_once() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let a = file(&conn, f.old.id, "a.parquet").await;
    let b = file(&conn, f.old.id, "b.parquet").await;
    file(&conn, f.active.id, "c.parquet").await;
    activate(&conn, &f).await;

    let scheduled = files::schedule_gc(&conn, f.old.id, Duration::from_secs(3600))
        .await
        .unwrap();

    assert_eq!(scheduled, 2);
    let entries = gc_manifest::Entity::find().all(&conn).await.unwrap();
    let mut paths: Vec<(i64, String)> = entries
        .iter()
        .map(|e| (e.file_id, e.file_path.clone()))
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            (a.id, format!("{}/a.parquet", f.old.path)),
            (b.id, format!("{}/b.parquet", f.old.path)),
        ]
    );
    assert!(entries.iter().all(|e| e.revision_id == f.old.id));
    let in_an_hour = chrono::Utc::now() + chrono::Duration::minutes(59);
    assert!(entries.iter().all(|e| e.expiration > in_an_hour));

    let again = files::schedule_gc(&conn, f.old.id, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(again, 0, "already scheduled");
    let unchanged = gc_manifest::Entity::find().all(&conn).await.unwrap();
    assert_eq!(unchanged.len(), 2);
    assert!(
        unchanged.iter().all(|e| e.expiration > in_an_hour),
        "first expiration kept"
    );
    assert!(
        files::list_expired(&conn, 10).await.unwrap().is_empty(),
        "nothing expired yet"
    );
}

#[tokio::test]
async fn list_expired_returns_expired_entries_up_to_the_limit() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let newer = revisions::create_revision(&conn, f.table_id, None, json!({}))
        .await
        .unwrap();
    for name in ["a", "b", "c"] {
        file(&conn, f.old.id, name).await;
    }
    file(&conn, newer.id, "later").await;
    files::schedule_gc(&conn, f.old.id, Duration::ZERO)
        .await
        .unwrap();
    files::schedule_gc(&conn, newer.id, Duration::from_secs(3600))
        .await
        .unwrap();

    let expired = files::list_expired(&conn, 10).await.unwrap();
    assert_eq!(expired.len(), 3);
    assert!(expired.iter().all(|e| e.revision_id == f.old.id));
    assert_eq!(files::list_expired(&conn, 2).await.unwrap().len(), 2);
}

#[tokio::test]
async fn forget_deletes_scheduled_files_with_their_entries_and_leaves_the_others() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let a = file(&conn, f.old.id, "a").await;
    let b = file(&conn, f.old.id, "b").await;
    let live = file(&conn, f.active.id, "live").await;
    activate(&conn, &f).await;
    files::schedule_gc(&conn, f.old.id, Duration::ZERO)
        .await
        .unwrap();

    let forgotten = files::forget(&conn, &[a.id, live.id, 999_999])
        .await
        .unwrap();

    assert_eq!(forgotten, 1, "only the scheduled file");
    let left: Vec<i64> = file_metadata::Entity::find()
        .all(&conn)
        .await
        .unwrap()
        .iter()
        .map(|f| f.id)
        .collect();
    assert!(!left.contains(&a.id));
    assert!(left.contains(&b.id) && left.contains(&live.id));
    let entries: Vec<i64> = gc_manifest::Entity::find()
        .all(&conn)
        .await
        .unwrap()
        .iter()
        .map(|e| e.file_id)
        .collect();
    assert_eq!(entries, [b.id]);
    assert_eq!(files::forget(&conn, &[]).await.unwrap(), 0);
}
