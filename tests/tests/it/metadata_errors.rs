//! Errors that mean "try again" are told apart from the rest: each retryable condition is produced
//! for real against PostgreSQL, through a data-access call, and must come back as
//! `Error::Unavailable` with its SQLSTATE.

use std::time::Duration;

use ampd::metadata::{Error, jobs, workers};
use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, IsolationLevel,
    TransactionTrait,
};
use serde_json::json;
use tests::TestDb;

async fn two_jobs(db: &DatabaseConnection) -> (i64, i64) {
    workers::register(db, "w1", json!({})).await.unwrap();
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let descriptor = json!({"namespace": "eth", "name": name, "manifest_hash": "a".repeat(64)});
        let (job, _) = jobs::schedule(db, "materialize-static", descriptor, Some("w1"))
            .await
            .unwrap();
        ids.push(job.id);
    }
    (ids[0], ids[1])
}

async fn lock_job(tx: &DatabaseTransaction, id: i64) {
    tx.execute_unprepared(&format!("SELECT 1 FROM jobs WHERE id = {id} FOR UPDATE"))
        .await
        .unwrap();
}

fn sqlstate(err: &Error) -> Option<&str> {
    match err {
        Error::Unavailable { sqlstate, .. } => sqlstate.as_deref(),
        _ => None,
    }
}

#[tokio::test]
async fn a_deadlock_is_retryable_with_its_sqlstate() {
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 4).await;
    let (a, b) = two_jobs(&db).await;
    let (t1, t2) = (db.begin().await.unwrap(), db.begin().await.unwrap());
    lock_job(&t1, a).await;
    lock_job(&t2, b).await;
    // Each now wants the other's row: PostgreSQL aborts one of them.
    let first = tokio::spawn(async move {
        let r = jobs::request_stop(&t1, b).await;
        (r, t1)
    });
    let second = tokio::spawn(async move {
        let r = jobs::request_stop(&t2, a).await;
        (r, t2)
    });
    let (r1, t1) = first.await.unwrap();
    let (r2, t2) = second.await.unwrap();
    let errors: Vec<Error> = [r1, r2].into_iter().filter_map(Result::err).collect();
    assert_eq!(errors.len(), 1, "one of the two is chosen as the victim");
    assert_eq!(sqlstate(&errors[0]), Some("40P01"), "{:?}", errors[0]);
    assert!(errors[0].is_retryable());
    let _ = (t1.rollback().await, t2.rollback().await);
}

#[tokio::test]
async fn lock_and_statement_timeouts_are_retryable_with_their_sqlstates() {
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 4).await;
    let (a, _) = two_jobs(&db).await;
    let holder = db.begin().await.unwrap();
    lock_job(&holder, a).await;
    for (setting, code) in [("lock_timeout", "55P03"), ("statement_timeout", "57014")] {
        let tx = db.begin().await.unwrap();
        tx.execute_unprepared(&format!("SET LOCAL {setting} = '100ms'"))
            .await
            .unwrap();
        let err = jobs::request_stop(&tx, a).await.expect_err(setting);
        assert_eq!(sqlstate(&err), Some(code), "{setting}: {err:?}");
        assert!(err.is_retryable());
        tx.rollback().await.unwrap();
    }
    holder.rollback().await.unwrap();
    assert_eq!(
        jobs::get(&db, a).await.unwrap().unwrap().status,
        "SCHEDULED"
    );
}

#[tokio::test]
async fn a_serialization_failure_is_retryable_with_its_sqlstate() {
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 4).await;
    let (a, _) = two_jobs(&db).await;
    let tx = db
        .begin_with_config(
            Some(IsolationLevel::RepeatableRead),
            Some(AccessMode::ReadWrite),
        )
        .await
        .unwrap();
    // The snapshot is taken at the first statement.
    jobs::get(&tx, a).await.unwrap();
    jobs::request_stop(&db, a).await.unwrap();
    let err = jobs::request_stop(&tx, a)
        .await
        .expect_err("changed since the snapshot");
    assert_eq!(sqlstate(&err), Some("40001"), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_call_whose_backend_is_terminated_is_retryable_and_the_next_call_works() {
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 4).await;
    let (a, _) = two_jobs(&db).await;
    let holder = db.begin().await.unwrap();
    lock_job(&holder, a).await;
    let call = {
        let db = db.clone();
        tokio::spawn(async move { jobs::request_stop(&db, a).await })
    };
    // The call's backend, found by what it waits for, in this database only.
    let pid = tests::sql::lock_waiter(&db, "the call never waited", Duration::from_secs(20)).await;
    db.execute_unprepared(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .unwrap();

    let err = call
        .await
        .unwrap()
        .expect_err("its connection was terminated");
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    holder.rollback().await.unwrap();
    // The pool replaces the connection: trying again succeeds.
    let stopped = jobs::request_stop(&db, a).await.expect("retry");
    assert_eq!(stopped.status, "STOP_REQUESTED");
}
