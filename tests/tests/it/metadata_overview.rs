//! `metadata::overview`: what the controller's `/metrics` reads of the database.

use std::collections::BTreeMap;
use std::time::Duration;

use ampd::metadata::overview;
use entity::JobStatus;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tests::TestDb;

async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn jobs_by_status(db: &DatabaseConnection) -> BTreeMap<String, i64> {
    overview::read(db, Duration::from_secs(60))
        .await
        .expect("overview")
        .jobs
}

/// `n` jobs of `status`, keys starting with `prefix`.
async fn insert_jobs(db: &DatabaseConnection, prefix: &str, status: JobStatus, n: i64) {
    exec(
        db,
        &format!(
            "INSERT INTO jobs (idempotency_key, kind, descriptor, status, attempt) \
             SELECT '{prefix}-' || g, 'test', '{{}}', '{}', 1 FROM generate_series(1, {n}) AS g",
            status.as_str()
        ),
    )
    .await;
}

#[tokio::test]
async fn jobs_are_counted_exactly_by_status_and_statuses_without_jobs_are_absent() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    assert_eq!(jobs_by_status(&conn).await, BTreeMap::new());

    // A different count for each status but STOPPING, which has none.
    let mut expected = BTreeMap::new();
    for (i, status) in JobStatus::ALL.into_iter().enumerate() {
        if status == JobStatus::Stopping {
            continue;
        }
        let n = 100 + i as i64;
        insert_jobs(&conn, status.as_str(), status, n).await;
        expected.insert(status.as_str().to_owned(), n);
    }
    assert_eq!(jobs_by_status(&conn).await, expected, "before VACUUM");

    // After VACUUM the counts may come from the index alone (the visibility map); they stay exact,
    // and a row changed since (its page no longer all-visible) is counted where it is now.
    exec(&conn, "VACUUM ANALYZE jobs").await;
    assert_eq!(jobs_by_status(&conn).await, expected, "after VACUUM");
    exec(
        &conn,
        "UPDATE jobs SET status = 'STOPPING' WHERE id IN \
         (SELECT id FROM jobs WHERE status = 'STOP_REQUESTED' ORDER BY id LIMIT 3)",
    )
    .await;
    *expected.get_mut("STOP_REQUESTED").unwrap() -= 3;
    expected.insert("STOPPING".to_owned(), 3);
    assert_eq!(jobs_by_status(&conn).await, expected, "after an update");
}
