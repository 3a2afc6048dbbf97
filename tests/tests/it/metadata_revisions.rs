//! `metadata::revisions`: physical tables, their revisions, and the one active revision.

use std::sync::Arc;
use std::time::Duration;

use ampd::metadata::jobs::JobClaim;
use ampd::metadata::notifications::{Listener, Notification, RevisionChange};
use ampd::metadata::{Error, files, jobs, revisions, workers};
use entity::{physical_table_revisions, physical_tables};
use sea_orm::DatabaseConnection;
use serde_json::json;
use tests::TestDb;
use tests::rows;
use tests::sql::{count, next_notification};

/// Grace period of a replaced revision's files: long, so nothing here expires.
const GRACE: Duration = Duration::from_secs(3600);

struct Fixture {
    hash: String,
    blocks: physical_tables::Model,
    logs: physical_tables::Model,
}

async fn fixture(db: &DatabaseConnection) -> Fixture {
    let (hash, tables) = rows::manifest_with_tables(db, b"manifest", &["blocks", "logs"]).await;
    let [blocks, logs] = <[_; 2]>::try_from(tables).expect("two tables");
    Fixture { hash, blocks, logs }
}

async fn revision(db: &DatabaseConnection, table: &physical_tables::Model) -> i64 {
    rows::revision(db, table.id).await.id
}

#[tokio::test]
async fn register_table_is_idempotent() {
    let (_db, conn, f) = rows::setup(fixture).await;

    let again = revisions::register_table(&conn, "eth", "mainnet", &f.hash, "blocks")
        .await
        .unwrap();
    assert_eq!(again, f.blocks);
    assert_ne!(f.blocks.id, f.logs.id);
    assert_eq!(
        revisions::list_tables(&conn, "eth", "mainnet")
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn register_table_needs_a_registered_manifest() {
    let (_db, conn, _) = rows::setup(fixture).await;
    let err = revisions::register_table(&conn, "eth", "mainnet", &"f".repeat(64), "blocks")
        .await
        .expect_err("unknown manifest");
    assert!(
        matches!(
            err,
            Error::NotFound {
                entity: "manifest",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn register_table_refuses_invalid_names() {
    let (_db, conn, f) = rows::setup(fixture).await;
    for (ns, name, table) in [("Eth", "m", "t"), ("eth", "m", "a/b"), ("eth", "m", "")] {
        let err = revisions::register_table(&conn, ns, name, &f.hash, table)
            .await
            .expect_err("invalid");
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    }
}

#[tokio::test]
async fn create_revision_gets_a_uuid_v7_path_under_its_table() {
    let (_db, conn, f) = rows::setup(fixture).await;
    workers::register(&conn, "w1", json!({})).await.unwrap();
    let (job, _) = jobs::schedule(
        &conn,
        "materialize-static",
        json!({"namespace": "eth", "name": "mainnet", "manifest_hash": f.hash}),
        Some("w1"),
    )
    .await
    .unwrap();
    let claim = JobClaim::of(&job).unwrap();
    jobs::mark_running(&conn, &claim).await.unwrap();

    let rev = revisions::create_revision(&conn, f.blocks.id, Some(&claim), json!({"rows": 1}))
        .await
        .unwrap();

    let uuid = rev
        .path
        .strip_prefix("eth/mainnet/blocks/")
        .unwrap_or_else(|| panic!("path {}", rev.path));
    let uuid = uuid::Uuid::parse_str(uuid).expect("a uuid");
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(rev.writer, Some(job.id));
    assert_eq!(
        rev.metadata,
        json!({"rows": 1, "job_id": job.id, "attempt": 1, "node_id": "w1"}),
        "the caller's metadata and the writing attempt"
    );
    let second = revision(&conn, &f.blocks).await;
    assert_ne!(second, rev.id);

    let err = revisions::create_revision(&conn, 999_999, None, json!({}))
        .await
        .expect_err("unknown table");
    assert!(
        matches!(
            err,
            Error::NotFound {
                entity: "physical table",
                ..
            }
        ),
        "{err:?}"
    );
    let unknown = JobClaim {
        job_id: 999_999,
        ..claim.clone()
    };
    let err = revisions::create_revision(&conn, f.blocks.id, Some(&unknown), json!({}))
        .await
        .expect_err("unknown writer");
    assert!(
        matches!(err, Error::NotFound { entity: "job", .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn activate_replaces_the_previous_active_revision_and_notifies() {
    let (db, conn, f) = rows::setup(fixture).await;
    let first = revision(&conn, &f.blocks).await;
    let second = revision(&conn, &f.blocks).await;
    let mut listener = Listener::connect(&db.config()).await.expect("listener");

    let a = revisions::activate(&conn, f.blocks.id, first, GRACE)
        .await
        .unwrap();
    assert_eq!(a.previous, None);
    assert_eq!(a.table.active_revision_id, Some(first));
    let b = revisions::activate(&conn, f.blocks.id, second, GRACE)
        .await
        .unwrap();
    assert_eq!(b.previous, Some(first));
    assert_eq!(
        rows::active_revision_id(&conn, f.blocks.id).await,
        Some(second)
    );
    assert_eq!(rows::active_revision_id(&conn, f.logs.id).await, None);

    for expected in [first, second] {
        let got = next_notification(&mut listener, "delivered").await;
        assert_eq!(
            got,
            Notification::RevisionChange(RevisionChange {
                physical_table_id: f.blocks.id,
                revision_id: expected,
            })
        );
    }
}

#[tokio::test]
async fn active_is_the_revision_its_table_points_at() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let first = revision(&conn, &f.blocks).await;
    let second = revision(&conn, &f.blocks).await;
    assert_eq!(
        revisions::active(&conn, f.blocks.id).await.unwrap(),
        None,
        "none before an activation"
    );

    for id in [first, second] {
        revisions::activate(&conn, f.blocks.id, id, GRACE)
            .await
            .unwrap();
    }

    let active = revisions::active(&conn, f.blocks.id).await.unwrap();
    assert_eq!(active.as_ref().map(|r| r.id), Some(second));
    assert_eq!(active, rows::active_revision(&conn, f.blocks.id).await);
    assert_eq!(revisions::active(&conn, f.logs.id).await.unwrap(), None);
    assert_eq!(revisions::active(&conn, 999_999).await.unwrap(), None);
}

#[tokio::test]
async fn activating_a_revision_of_another_table_is_a_conflict() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let blocks_rev = revision(&conn, &f.blocks).await;
    let logs_rev = revision(&conn, &f.logs).await;
    revisions::activate(&conn, f.blocks.id, blocks_rev, GRACE)
        .await
        .unwrap();

    let err = revisions::activate(&conn, f.blocks.id, logs_rev, GRACE)
        .await
        .expect_err("other table");

    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(
        rows::active_revision_id(&conn, f.blocks.id).await,
        Some(blocks_rev)
    );
    assert_eq!(rows::active_revision_id(&conn, f.logs.id).await, None);
}

#[tokio::test]
async fn activating_an_unknown_table_or_revision_is_not_found() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let rev = revision(&conn, &f.blocks).await;
    let err = revisions::activate(&conn, 999_999, rev, GRACE)
        .await
        .expect_err("no table");
    assert!(
        matches!(
            err,
            Error::NotFound {
                entity: "physical table",
                ..
            }
        ),
        "{err:?}"
    );
    let err = revisions::activate(&conn, f.blocks.id, 999_999, GRACE)
        .await
        .expect_err("no revision");
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
}

#[tokio::test]
async fn two_tasks_racing_to_activate_revisions_of_one_table_leave_exactly_one_active() {
    let db = TestDb::migrated().await;
    let conn = tests::connect(db.url(), 4).await;
    let f = fixture(&conn).await;
    for round in 0..10 {
        let a = revision(&conn, &f.blocks).await;
        let b = revision(&conn, &f.blocks).await;
        let before = rows::active_revision_id(&conn, f.blocks.id).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let race = |rev: i64| {
            let conn = conn.clone();
            let barrier = barrier.clone();
            let table = f.blocks.id;
            tokio::spawn(async move {
                barrier.wait().await;
                revisions::activate(&conn, table, rev, GRACE).await
            })
        };
        let (ta, tb) = (race(a), race(b));
        let ra = ta.await.unwrap().expect("activate a");
        let rb = tb.await.unwrap().expect("activate b");

        let active = rows::active_revision_id(&conn, f.blocks.id).await;
        assert!(active == Some(a) || active == Some(b), "round {round}");
        // They took turns: the loser of the race replaced the winner's revision.
        let (first, second) = if active == Some(b) {
            (ra, rb)
        } else {
            (rb, ra)
        };
        assert_eq!(first.previous, before, "round {round}");
        assert_eq!(
            second.previous, first.table.active_revision_id,
            "round {round}"
        );
        // Exactly one of the table's revisions is active, read from the tables themselves: one
        // pointer, of any table, leads to a revision of this table, and it is one of the racers'.
        let pointed_at = count(
            &conn,
            &format!(
                "SELECT count(*) FROM physical_table_revisions r \
                 JOIN physical_tables t ON t.active_revision_id = r.id \
                 WHERE r.physical_table_id = {}",
                f.blocks.id
            ),
        )
        .await;
        assert_eq!(pointed_at, 1, "round {round}");
        let racers_active = count(
            &conn,
            &format!("SELECT count(*) FROM physical_tables WHERE active_revision_id IN ({a}, {b})"),
        )
        .await;
        assert_eq!(
            racers_active, 1,
            "round {round}: one of {a} and {b} is active"
        );
    }
}

#[tokio::test]
async fn deleting_the_active_revision_is_a_conflict_and_an_inactive_one_goes() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let old = revision(&conn, &f.blocks).await;
    let current = revision(&conn, &f.blocks).await;
    revisions::activate(&conn, f.blocks.id, current, GRACE)
        .await
        .unwrap();
    files::register(&conn, old, "a.parquet", 10, None, None, json!({}))
        .await
        .unwrap();

    let err = revisions::delete(&conn, current).await.expect_err("active");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert!(revisions::get(&conn, current).await.unwrap().is_some());
    assert_eq!(
        rows::active_revision_id(&conn, f.blocks.id).await,
        Some(current)
    );

    revisions::delete(&conn, old).await.expect("inactive");
    assert!(revisions::get(&conn, old).await.unwrap().is_none());
    assert!(files::list(&conn, old).await.unwrap().is_empty());
    let left: Vec<i64> = revisions::list(&conn, f.blocks.id)
        .await
        .unwrap()
        .iter()
        .map(|r: &physical_table_revisions::Model| r.id)
        .collect();
    assert_eq!(left, [current]);

    let err = revisions::delete(&conn, old).await.expect_err("gone");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn every_table_is_listed_with_its_active_revision_and_only_active_revisions_files() {
    let (_db, conn, f) = rows::setup(fixture).await;
    let traces = revisions::register_table(&conn, "eth", "mainnet", &f.hash, "traces")
        .await
        .unwrap();
    // blocks: `old`, then `new` active; logs: `only` active; traces: never anything active.
    let old = revision(&conn, &f.blocks).await;
    let new = revision(&conn, &f.blocks).await;
    let only = revision(&conn, &f.logs).await;
    for (rev, name) in [(old, "a"), (new, "c"), (only, "d"), (new, "b")] {
        files::register(&conn, rev, name, 1, None, None, json!({}))
            .await
            .unwrap();
    }
    for (table, rev) in [(&f.blocks, old), (&f.logs, only), (&f.blocks, new)] {
        revisions::activate(&conn, table.id, rev, GRACE)
            .await
            .unwrap();
    }

    let listed: Vec<(i64, Option<i64>, Option<i64>)> = revisions::list_tables_with_active(&conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(t, r)| (t.id, t.active_revision_id, r.map(|r| r.id)))
        .collect();
    assert_eq!(
        listed,
        [
            (f.blocks.id, Some(new), Some(new)),
            (f.logs.id, Some(only), Some(only)),
            (traces.id, None, None),
        ]
    );
    let active_files: Vec<(i64, String)> = files::list_active(&conn)
        .await
        .unwrap()
        .into_iter()
        .map(|file| (file.revision_id, file.file_name))
        .collect();
    assert_eq!(
        active_files,
        [
            (new, "c".to_owned()),
            (new, "b".to_owned()),
            (only, "d".to_owned()),
        ]
    );
}
