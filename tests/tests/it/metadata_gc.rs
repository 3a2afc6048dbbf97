//! Garbage collection that cannot delete what is served: activation of a revision scheduled for
//! garbage collection, what the collector may list and forget, and a collector that dies half-way.

use std::time::Duration;

use ampd::metadata::{Error, files, revisions};
use ampd::service::gc;
use entity::{file_metadata, gc_manifest, physical_table_revisions};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, TransactionTrait};
use serde_json::json;
use tests::TestDb;
use tests::cli::TempDir;
use tests::rows;

const HOUR: Duration = Duration::from_secs(3600);

async fn table(db: &DatabaseConnection) -> i64 {
    rows::manifest_with_tables(db, b"{}", &["blocks"]).await.1[0].id
}

/// A revision of `table_id` with files `names`, registered (and written under `data`, if given).
async fn revision(
    db: &DatabaseConnection,
    table_id: i64,
    names: &[&str],
    data: Option<&TempDir>,
) -> physical_table_revisions::Model {
    let rev = rows::revision(db, table_id).await;
    for name in names {
        if let Some(data) = data {
            let dir = data.path().join(&rev.path);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), b"{}\n").unwrap();
        }
        files::register(db, rev.id, name, 3, None, None, json!({}))
            .await
            .unwrap();
    }
    rev
}

async fn gc_entries(db: &DatabaseConnection, revision_id: i64) -> usize {
    gc_manifest::Entity::find()
        .all(db)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.revision_id == revision_id)
        .count()
}

/// Makes the garbage collection of `revision_id` due now, as if its grace period had passed.
async fn expire(db: &DatabaseConnection, revision_id: i64) {
    db.execute_unprepared(&format!(
        "UPDATE physical_table_revisions SET metadata = metadata || \
             jsonb_build_object('gc_expires_at', now() - interval '1 second') \
         WHERE id = {revision_id}; \
         UPDATE gc_manifest SET expiration = now() - interval '1 second' \
         WHERE revision_id = {revision_id}"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn activation_cancels_an_unexpired_gc_schedule_and_refuses_an_expired_one() {
    let test_db = TestDb::migrated().await;
    let db = test_db.connect().await;
    let t = table(&db).await;
    let one = revision(&db, t, &["a", "b"], None).await;
    let two = revision(&db, t, &["c"], None).await;
    revisions::activate(&db, t, one.id, HOUR).await.unwrap();
    let replaced = revisions::activate(&db, t, two.id, HOUR).await.unwrap();
    assert_eq!(replaced.previous, Some(one.id));
    assert_eq!(
        gc_entries(&db, one.id).await,
        2,
        "the replaced one is scheduled"
    );

    // Roll back while the grace period runs: the schedule is cancelled, and the revision it
    // replaced is scheduled in turn.
    let back = revisions::activate(&db, t, one.id, HOUR)
        .await
        .expect("roll back");
    assert_eq!(back.previous, Some(two.id));
    assert_eq!(rows::active_revision_id(&db, t).await, Some(one.id));
    assert_eq!(gc_entries(&db, one.id).await, 0, "cancelled");
    let meta = revisions::get(&db, one.id).await.unwrap().unwrap().metadata;
    assert!(meta.get("gc_expires_at").is_none(), "{meta}");
    assert_eq!(gc_entries(&db, two.id).await, 1);

    // Once the schedule has expired, the files may be gone: refused, nothing changes.
    expire(&db, two.id).await;
    let err = revisions::activate(&db, t, two.id, HOUR)
        .await
        .expect_err("due for deletion");
    assert!(
        matches!(&err, Error::Conflict(m) if m.contains("due for deletion")),
        "{err:?}"
    );
    assert_eq!(rows::active_revision_id(&db, t).await, Some(one.id));
    assert_eq!(gc_entries(&db, two.id).await, 1);
}

#[tokio::test]
async fn the_files_of_an_active_revision_are_never_listed_nor_forgotten() {
    let test_db = TestDb::migrated().await;
    let db = test_db.connect().await;
    let t = table(&db).await;
    let served = revision(&db, t, &["a"], None).await;
    let old = revision(&db, t, &["b"], None).await;
    revisions::activate(&db, t, served.id, HOUR).await.unwrap();
    files::schedule_gc(&db, old.id, Duration::ZERO)
        .await
        .unwrap();
    // Expired gc entries for the served revision's files, written behind the layer's back.
    db.execute_unprepared(&format!(
        "INSERT INTO gc_manifest (file_id, revision_id, file_path, expiration) \
         SELECT id, revision_id, 'x/' || file_name, now() - interval '1 hour' \
         FROM file_metadata WHERE revision_id = {}",
        served.id
    ))
    .await
    .unwrap();

    let listed: Vec<i64> = files::list_expired(&db, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.revision_id)
        .collect();
    assert_eq!(listed, [old.id], "only the inactive revision's file");
    let all: Vec<i64> = file_metadata::Entity::find()
        .all(&db)
        .await
        .unwrap()
        .iter()
        .map(|f| f.id)
        .collect();
    let forgotten = files::forget(&db, &all).await.unwrap();
    assert_eq!(forgotten, 1, "the served file stays");
    assert_eq!(files::list(&db, served.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn no_file_is_registered_into_an_active_or_gc_scheduled_revision() {
    let test_db = TestDb::migrated().await;
    let db = test_db.connect().await;
    let t = table(&db).await;
    let served = revision(&db, t, &["a"], None).await;
    let retired = revision(&db, t, &["b"], None).await;
    revisions::activate(&db, t, served.id, HOUR).await.unwrap();
    files::schedule_gc(&db, retired.id, HOUR).await.unwrap();
    for (rev, why) in [
        (served.id, "active"),
        (retired.id, "scheduled for garbage collection"),
    ] {
        let err = files::register(&db, rev, "late", 1, None, None, json!({}))
            .await
            .expect_err(why);
        assert!(
            matches!(&err, Error::Conflict(m) if m.contains(why)),
            "{why}: {err:?}"
        );
        assert_eq!(files::list(&db, rev).await.unwrap().len(), 1, "{why}");
    }
    // A file registered again under a name it already has is still found (idempotent).
    let again = files::register(&db, retired.id, "b", 3, None, None, json!({}))
        .await
        .expect("existing row");
    assert_eq!(again.file_name, "b");
}

#[tokio::test]
async fn a_collector_that_dies_between_deleting_and_forgetting_is_finished_by_the_next_pass() {
    let test_db = TestDb::migrated().await;
    let db = test_db.connect().await;
    let data = TempDir::new();
    let t = table(&db).await;
    let old = revision(&db, t, &["p0", "p1", "p2"], Some(&data)).await;
    let served = revision(&db, t, &["q0"], Some(&data)).await;
    revisions::activate(&db, t, served.id, HOUR).await.unwrap();
    files::schedule_gc(&db, old.id, Duration::ZERO)
        .await
        .unwrap();
    // A file its writer put there but never registered.
    std::fs::write(data.path().join(&old.path).join("unregistered"), b"x").unwrap();

    // The first collector lists the expired files and deletes them from storage, then dies
    // before it forgets them: its transaction never commits. The server rolls back a dead
    // session's transaction; the rollback is awaited here, as a dropped transaction's rollback is
    // only sent later and its row locks would make the next pass skip the rows.
    {
        let tx = db.begin().await.unwrap();
        let expired = files::list_expired(&tx, 100).await.unwrap();
        assert_eq!(expired.len(), 3);
        for entry in &expired {
            std::fs::remove_file(data.path().join(&entry.file_path)).unwrap();
        }
        tx.rollback().await.unwrap();
    }
    assert_eq!(
        files::list(&db, old.id).await.unwrap().len(),
        3,
        "rows remain"
    );

    let done = gc::collect(&db, data.path()).await.expect("next pass");

    assert_eq!(done.files, 3, "forgotten (already deleted from storage)");
    assert_eq!(done.revisions, 1);
    assert!(revisions::get(&db, old.id).await.unwrap().is_none());
    assert!(!data.path().join(&old.path).exists(), "directory removed");
    assert_eq!(gc_manifest::Entity::find().count(&db).await.unwrap(), 0);
    assert!(
        data.path().join(&served.path).join("q0").exists(),
        "the served revision's file stays"
    );
    assert_eq!(
        gc::collect(&db, data.path()).await.unwrap(),
        gc::Collected::default()
    );
}

#[tokio::test]
async fn an_activation_waits_for_a_collector_holding_the_revision_and_then_refuses() {
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 4).await;
    let t = table(&db).await;
    let old = revision(&db, t, &["p0"], None).await;
    let served = revision(&db, t, &["q0"], None).await;
    revisions::activate(&db, t, old.id, HOUR).await.unwrap();
    revisions::activate(&db, t, served.id, HOUR).await.unwrap();
    expire(&db, old.id).await;

    let collector = db.begin().await.unwrap();
    let expired = files::list_expired(&collector, 100).await.unwrap();
    assert_eq!(expired.len(), 1);
    let activation = {
        let db = db.clone();
        tokio::spawn(async move { revisions::activate(&db, t, old.id, HOUR).await })
    };
    // Evidence that it waits: a session of this database waiting for a lock.
    tests::sql::lock_waiter(&db, "the activation never waited", Duration::from_secs(20)).await;
    assert!(!activation.is_finished());
    let ids: Vec<i64> = expired.iter().map(|e| e.file_id).collect();
    files::forget(&collector, &ids).await.unwrap();
    collector.commit().await.unwrap();

    let err = activation.await.unwrap().expect_err("files gone");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(rows::active_revision_id(&db, t).await, Some(served.id));
}

/// Sets the garbage collection of `revision_id` (its `gc_expires_at` and its entries) to expire
/// `after` from now by the database clock, as scheduling it with that grace period does.
async fn expire_in(db: &DatabaseConnection, revision_id: i64, after: Duration) {
    let micros = after.as_micros();
    db.execute_unprepared(&format!(
        "UPDATE physical_table_revisions SET metadata = metadata || jsonb_build_object( \
             'gc_expires_at', clock_timestamp() + {micros} * interval '1 microsecond') \
         WHERE id = {revision_id}; \
         UPDATE gc_manifest g SET expiration = (r.metadata ->> 'gc_expires_at')::timestamptz \
         FROM physical_table_revisions r \
         WHERE r.id = g.revision_id AND g.revision_id = {revision_id}"
    ))
    .await
    .unwrap();
}

/// Waits until the database clock has passed the garbage collection expiry of `revision_id` as
/// the committed rows give it (what a collector starting now reads).
async fn wait_past_expiry(db: &DatabaseConnection, revision_id: i64) {
    let started = std::time::Instant::now();
    let sql = format!(
        "SELECT bool_and(expiration < clock_timestamp()) FROM gc_manifest \
         WHERE revision_id = {revision_id}"
    );
    while !tests::sql::value::<bool>(db, &sql).await {
        assert!(started.elapsed() < Duration::from_secs(20), "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pause inside a statement, between its snapshot and the row locks it takes at the end: in a
/// schema `gate`, a view `table` over `public.table` whose rows are read only when the advisory lock
/// [`GATE_KEY`] is free, in statements whose text contains `marker` (all when it is empty). A
/// session whose `search_path` starts with `gate` reads the table through it; while
/// [`close_gate`]'s transaction holds the lock, such a statement waits (a lock wait the test can
/// see) after taking its snapshot, and goes on with that snapshot when the transaction ends.
/// Nothing else in the statement changes.
const GATE_KEY: i64 = 2_161_001;

async fn install_gate(db: &DatabaseConnection, table: &str, marker: &str) {
    db.execute_unprepared(&format!(
        "CREATE SCHEMA gate; \
         CREATE FUNCTION gate.pass() RETURNS boolean VOLATILE LANGUAGE sql AS \
           $$ SELECT CASE WHEN current_query() LIKE '%{marker}%' \
                THEN pg_advisory_lock_shared({GATE_KEY}) IS NOT NULL \
                     AND pg_advisory_unlock_shared({GATE_KEY}) \
                ELSE true END $$; \
         CREATE VIEW gate.{table} AS SELECT * FROM public.{table} WHERE gate.pass()"
    ))
    .await
    .unwrap();
}

/// A collector pass over `root` whose batch statement takes its snapshot now and then waits at the
/// gate (closed by the returned transaction) before it locks anything; returned once it waits there.
async fn pass_held_at_the_gate(
    db: &DatabaseConnection,
    test_db: &TestDb,
    root: &std::path::Path,
) -> (
    sea_orm::DatabaseTransaction,
    tokio::task::JoinHandle<Result<gc::Collected, gc::GcError>>,
) {
    let gate = close_gate(db).await;
    let collector = gated_collector(test_db).await;
    let root = root.to_owned();
    let pass = tokio::spawn(async move { gc::collect(&collector, &root).await });
    tests::sql::lock_waiter(
        db,
        "the collector never reached the gate",
        Duration::from_secs(20),
    )
    .await;
    (gate, pass)
}

/// A connection of its own for a collector, reading through the gate's views.
async fn gated_collector(test_db: &TestDb) -> DatabaseConnection {
    let collector = tests::connect(test_db.url(), 1).await;
    collector
        .execute_unprepared("SET search_path = gate, public")
        .await
        .unwrap();
    collector
}

/// A transaction that holds the gate closed until it ends.
async fn close_gate(db: &DatabaseConnection) -> sea_orm::DatabaseTransaction {
    let tx = db.begin().await.unwrap();
    tx.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({GATE_KEY})"))
        .await
        .unwrap();
    tx
}

/// Issue 21, item 1: a roll back that locked the revision before its expiry and commits after a
/// collector's statement has taken its snapshot must not lose its files. The collector's
/// statement saw the revision inactive and its entries present; it must re-check, on the row it
/// locks, what the roll back changed.
#[tokio::test]
async fn a_roll_back_committed_during_a_collector_batch_keeps_its_files() {
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 4).await;
    let data = TempDir::new();
    let t = table(&db).await;
    let old = revision(&db, t, &["p0", "p1"], Some(&data)).await;
    let served = revision(&db, t, &["q0"], Some(&data)).await;
    revisions::activate(&db, t, old.id, HOUR).await.unwrap();
    revisions::activate(&db, t, served.id, HOUR).await.unwrap();
    install_gate(&db, "gc_manifest", "").await;

    // The roll back locks `old` while its schedule has not expired (so it cancels the schedule)
    // and holds its transaction open across the expiry. The margin grows if this machine was too
    // slow to get the lock before the expiry.
    let mut margin = Duration::from_millis(400);
    let activation = loop {
        expire_in(&db, old.id, margin).await;
        let tx = db.begin().await.unwrap();
        match revisions::activate(&tx, t, old.id, HOUR).await {
            Ok(done) => {
                assert_eq!(done.previous, Some(served.id));
                break tx;
            }
            Err(Error::Conflict(m)) if m.contains("due for deletion") => {
                tx.rollback().await.unwrap();
                margin *= 4;
                assert!(margin < Duration::from_secs(30), "never activated in time");
            }
            Err(e) => panic!("roll back: {e:?}"),
        }
    };
    wait_past_expiry(&db, old.id).await;

    // A collector pass whose batch statement takes its snapshot now (the roll back not yet
    // committed) and is held at the gate before it locks anything.
    let (gate, pass) = pass_held_at_the_gate(&db, &test_db, data.path()).await;
    activation.commit().await.expect("roll back commits");
    gate.commit().await.unwrap();
    let done = pass.await.unwrap().expect("collector pass");

    assert_eq!(
        rows::active_revision_id(&db, t).await,
        Some(old.id),
        "rolled back"
    );
    assert_eq!(
        done.files, 0,
        "nothing of the active revision was collected: {done:?}"
    );
    assert_eq!(
        files::list(&db, old.id).await.unwrap().len(),
        2,
        "rows stay"
    );
    for name in ["p0", "p1"] {
        assert!(
            data.path().join(&old.path).join(name).exists(),
            "file {name} of the active revision was deleted"
        );
    }
    // The replaced revision is scheduled in turn; nothing of it is due yet.
    assert_eq!(gc_entries(&db, served.id).await, 1);
}

/// Issue 21, item 1, the pass's last step: a roll back of a revision that has no files left (it
/// never had any), committed after the collector listed it as emptied and before the collector
/// removed its directory, keeps its directory (and what a writer left there) and its row.
#[tokio::test]
async fn a_roll_back_committed_after_a_revision_was_listed_as_emptied_keeps_its_directory() {
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 4).await;
    let data = TempDir::new();
    let t = table(&db).await;
    let empty = revision(&db, t, &[], None).await;
    std::fs::create_dir_all(data.path().join(&empty.path)).unwrap();
    std::fs::write(data.path().join(&empty.path).join("unregistered"), b"x").unwrap();
    let served = revision(&db, t, &["q0"], Some(&data)).await;
    revisions::activate(&db, t, empty.id, HOUR).await.unwrap();
    revisions::activate(&db, t, served.id, HOUR).await.unwrap();
    // Only the statement that lists emptied revisions (the one that reads `file_metadata`) waits.
    install_gate(&db, "physical_table_revisions", "file_metadata").await;

    let mut margin = Duration::from_millis(400);
    let activation = loop {
        expire_in(&db, empty.id, margin).await;
        let tx = db.begin().await.unwrap();
        match revisions::activate(&tx, t, empty.id, HOUR).await {
            Ok(_) => break tx,
            Err(Error::Conflict(m)) if m.contains("due for deletion") => {
                tx.rollback().await.unwrap();
                margin *= 4;
                assert!(margin < Duration::from_secs(30), "never activated in time");
            }
            Err(e) => panic!("roll back: {e:?}"),
        }
    };
    let due = format!(
        "SELECT (metadata ->> 'gc_expires_at')::timestamptz < clock_timestamp() \
         FROM physical_table_revisions WHERE id = {}",
        empty.id
    );
    let started = std::time::Instant::now();
    while !tests::sql::value::<bool>(&db, &due).await {
        assert!(started.elapsed() < Duration::from_secs(20), "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (gate, pass) = pass_held_at_the_gate(&db, &test_db, data.path()).await;
    activation.commit().await.expect("roll back commits");
    gate.commit().await.unwrap();
    let done = pass.await.unwrap();

    assert_eq!(
        rows::active_revision_id(&db, t).await,
        Some(empty.id),
        "rolled back"
    );
    assert!(
        data.path().join(&empty.path).join("unregistered").exists(),
        "the active revision's directory was removed (pass: {done:?})"
    );
    let done = done.expect("collector pass");
    assert_eq!(done.revisions, 0, "{done:?}");
    assert!(
        revisions::get(&db, empty.id).await.unwrap().is_some(),
        "row kept"
    );
}

/// Issue 21, item 7: a collector batch reads the soonest expired entries through
/// `idx_gc_manifest_expiration_file_id` and stops after its batch, instead of reading and sorting
/// the whole backlog (what the plan is without the index).
#[tokio::test]
async fn a_collector_batch_reads_its_entries_through_the_index_not_the_whole_backlog() {
    let test_db = TestDb::migrated().await;
    let db = test_db.connect().await;
    let t = table(&db).await;
    // A backlog of 20 000 expired entries: 200 retired revisions of 100 files each.
    db.execute_unprepared(&format!(
        "INSERT INTO physical_table_revisions (physical_table_id, path, metadata) \
         SELECT {t}, 'eth/mainnet/blocks/r' || i, \
                jsonb_build_object('gc_expires_at', now() - interval '1 hour') \
         FROM generate_series(1, 200) i; \
         INSERT INTO file_metadata (revision_id, file_name, object_size) \
         SELECT r.id, 'f' || j, 1 FROM physical_table_revisions r, generate_series(1, 100) j; \
         INSERT INTO gc_manifest (file_id, revision_id, file_path, expiration) \
         SELECT f.id, f.revision_id, r.path || '/' || f.file_name, \
                now() - interval '1 hour' + (f.id % 997) * interval '1 second' \
         FROM file_metadata f JOIN physical_table_revisions r ON r.id = f.revision_id; \
         ANALYZE"
    ))
    .await
    .unwrap();
    let stmt = files::list_expired_statement(100);

    let plan = tests::sql::plan_of(&db, &stmt).await;
    assert!(
        plan.contains("\"Index Name\":\"idx_gc_manifest_expiration_file_id\""),
        "the batch does not read through the index: {plan}"
    );
    assert!(
        !plan.contains("\"Node Type\":\"Sort\""),
        "the batch sorts: {plan}"
    );
    // Without the index (as before the migration that adds it), the whole backlog is sorted.
    let tx = db.begin().await.unwrap();
    tx.execute_unprepared("DROP INDEX idx_gc_manifest_expiration_file_id")
        .await
        .unwrap();
    let before = tests::sql::plan_of(&tx, &stmt).await;
    tx.rollback().await.unwrap();
    assert!(before.contains("\"Node Type\":\"Sort\""), "{before}");

    // And the batch is the soonest expired entries, in order.
    let batch = files::list_expired(&db, 100).await.unwrap();
    let soonest: Vec<i64> = tests::sql::column(
        &db,
        "SELECT file_id FROM gc_manifest ORDER BY expiration, file_id LIMIT 100",
    )
    .await;
    assert_eq!(batch.iter().map(|e| e.file_id).collect::<Vec<_>>(), soonest);
}
