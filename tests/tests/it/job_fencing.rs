//! Job and revision safety when workers die, stall or come back: fencing of worker-side
//! transitions, recovery of a lost worker's jobs by the controller, and completion that makes a
//! job's output visible atomically.

use std::sync::Arc;
use std::time::Duration;

use ampd::metadata::jobs::{self, JobClaim};
use ampd::metadata::{Error, files, revisions, workers};
use ampd::service::controller::{self, Policy};
use entity::{JobStatus, physical_tables};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::json;
use tests::TestDb;
use tests::rows::{self, job};

const GRACE: Duration = Duration::from_secs(3600);

fn policy() -> Policy {
    Policy {
        liveness_window: Duration::from_secs(5),
        retry_base_delay: Duration::from_secs(3600),
        retry_max_delay: Duration::from_secs(3600),
        max_attempts: 5,
    }
}

/// Workers `a` and `b`, and a registered manifest with one table, which is returned.
async fn workers_and_a_table(db: &DatabaseConnection) -> physical_tables::Model {
    rows::workers(db, &["a", "b"]).await;
    let (_, mut tables) = rows::manifest_with_tables(db, b"{}", &["blocks"]).await;
    tables.remove(0)
}

/// Makes `node` look lost: its last heartbeat a minute ago.
async fn lose(db: &DatabaseConnection, node: &str) {
    db.execute_unprepared(&format!(
        "UPDATE workers SET heartbeat_at = now() - interval '60 seconds' WHERE node_id = '{node}'"
    ))
    .await
    .expect("age heartbeat");
}

/// A revision written by `claim`, with one registered file.
async fn output(db: &DatabaseConnection, table_id: i64, claim: &JobClaim) -> i64 {
    let rev = revisions::create_revision(db, table_id, Some(claim), json!({}))
        .await
        .expect("create revision");
    files::register(
        db,
        rev.id,
        "part-0.jsonl",
        10,
        None,
        None,
        json!({"rows": 1}),
    )
    .await
    .expect("register file");
    rev.id
}

#[tokio::test]
async fn a_zombie_workers_late_actions_are_refused_and_the_job_completes_on_its_new_attempt() {
    let (_test_db, db, table) = rows::setup(workers_and_a_table).await;
    let scheduled = rows::scheduled(&db, "mainnet", Some("a")).await;
    let claim_a = JobClaim::of(&scheduled).unwrap();
    jobs::mark_running(&db, &claim_a).await.expect("A runs");
    let rev_a = output(&db, table.id, &claim_a).await;

    // A stalls: no heartbeat for a minute. B is live. One controller pass fails A's attempt with
    // worker_lost and retries the job at once on B.
    lose(&db, "a").await;
    workers::heartbeat(&db, "b").await.unwrap();
    controller::reconcile(&db, &policy())
        .await
        .expect("reconcile");
    let retried = job(&db, scheduled.id).await;
    assert_eq!(
        (
            retried.status.as_str(),
            retried.node_id.as_deref(),
            retried.attempt
        ),
        ("SCHEDULED", Some("b"), 2)
    );
    let claim_b = JobClaim::of(&retried).unwrap();
    jobs::mark_running(&db, &claim_b).await.expect("B runs");
    let before = job(&db, scheduled.id).await;
    let events_before = jobs::list_events(&db, scheduled.id).await.unwrap();

    // A comes back. Everything it tries is refused and changes nothing.
    let fenced = |what: &str, err: Error| match err {
        Error::Fenced {
            expected, actual, ..
        } => {
            assert_eq!(
                (expected.node_id.as_deref(), expected.attempt),
                (Some("a"), 1)
            );
            assert_eq!((actual.node_id.as_deref(), actual.attempt), (Some("b"), 2));
        }
        other => panic!("{what}: expected Fenced, got {other:?}"),
    };
    fenced(
        "completion",
        jobs::mark_completed(&db, &claim_a, &[rev_a], GRACE)
            .await
            .expect_err("late completion"),
    );
    fenced(
        "error",
        jobs::mark_error(&db, &claim_a, json!({"e": 1}))
            .await
            .expect_err("late error"),
    );
    fenced(
        "running",
        jobs::mark_running(&db, &claim_a)
            .await
            .expect_err("late mark_running"),
    );
    fenced(
        "new revision",
        revisions::create_revision(&db, table.id, Some(&claim_a), json!({}))
            .await
            .expect_err("late revision"),
    );
    let err = files::register(&db, rev_a, "part-1.jsonl", 1, None, None, json!({}))
        .await
        .expect_err("late file");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(job(&db, scheduled.id).await, before, "job unchanged");
    assert_eq!(
        jobs::list_events(&db, scheduled.id).await.unwrap(),
        events_before,
        "no event"
    );
    assert_eq!(rows::active_revision_id(&db, table.id).await, None);
    assert_eq!(files::list(&db, rev_a).await.unwrap().len(), 1);

    // B completes: its revision becomes active in the same transaction.
    let rev_b = output(&db, table.id, &claim_b).await;
    let done = jobs::mark_completed(&db, &claim_b, &[rev_b], GRACE)
        .await
        .expect("B completes");
    assert_eq!(done.job.status, "COMPLETED");
    assert_eq!(done.activated[0].previous, None);
    assert_eq!(rows::active_revision_id(&db, table.id).await, Some(rev_b));

    let history: Vec<(String, Option<String>, Option<serde_json::Value>)> =
        jobs::list_events(&db, scheduled.id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.event_type, e.node_id, e.detail))
            .collect();
    let steps: Vec<(&str, Option<&str>)> = history
        .iter()
        .map(|(t, n, _)| (t.as_str(), n.as_deref()))
        .collect();
    assert_eq!(
        steps,
        [
            ("SCHEDULED", Some("a")),
            ("RUNNING", Some("a")),
            ("ERROR", Some("a")),
            ("SCHEDULED", Some("b")),
            ("RUNNING", Some("b")),
            ("COMPLETED", Some("b")),
        ]
    );
    assert_eq!(history[2].2, Some(jobs::worker_lost(Some("a"))));

    // A's partial revision was never active: the garbage collector finds it abandoned.
    let abandoned: Vec<i64> = revisions::list_abandoned(&db, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(abandoned, [rev_a]);
}

#[tokio::test]
async fn eight_concurrent_controllers_give_each_of_100_orphaned_jobs_exactly_one_new_attempt() {
    // A pool of its own size: eight controllers run at once.
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 20).await;
    workers_and_a_table(&db).await;
    let mut ids = Vec::new();
    for i in 0..100 {
        let j = rows::scheduled(&db, &format!("t{i}"), Some("a")).await;
        jobs::mark_running(&db, &JobClaim::of(&j).unwrap())
            .await
            .unwrap();
        ids.push(j.id);
    }
    lose(&db, "a").await;
    workers::heartbeat(&db, "b").await.unwrap();

    // Rounds of eight passes at once, until no job waits for a retry (a pass that lost every race
    // leaves work for the next).
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    for _round in 0..5 {
        let passes: Vec<_> = (0..8)
            .map(|_| {
                let db = db.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    controller::reconcile(&db, &policy()).await
                })
            })
            .collect();
        for pass in passes {
            pass.await.unwrap().expect("reconcile");
        }
        let waiting = jobs::list(&db, &[JobStatus::Error], None, 1000)
            .await
            .unwrap();
        if waiting.is_empty() {
            break;
        }
    }

    for id in ids {
        let j = job(&db, id).await;
        assert_eq!(
            (j.status.as_str(), j.node_id.as_deref(), j.attempt),
            ("SCHEDULED", Some("b"), 2),
            "job {id}"
        );
        let types = rows::event_types(&db, id).await;
        assert_eq!(
            types,
            ["SCHEDULED", "RUNNING", "ERROR", "SCHEDULED"],
            "job {id}: one failure, one new attempt"
        );
    }
}

#[tokio::test]
async fn racing_completions_leave_exactly_one_active_revision_that_of_the_winner() {
    // A pool of its own size, for the racing completions.
    let test_db = TestDb::migrated().await;
    let db = tests::connect(test_db.url(), 6).await;
    let table = workers_and_a_table(&db).await;
    for round in 0..10 {
        let j = rows::scheduled(&db, &format!("r{round}"), Some("a")).await;
        let claim_1 = JobClaim::of(&j).unwrap();
        jobs::mark_running(&db, &claim_1).await.unwrap();
        let stale = output(&db, table.id, &claim_1).await;
        // Attempt 1 is declared lost and the job runs again on b; meanwhile the same attempt 2
        // wrote two revisions, as a duplicate of itself would.
        let running = job(&db, j.id).await;
        lose(&db, "a").await;
        let failed = jobs::fail_lost(&db, &running, Duration::from_secs(5))
            .await
            .unwrap();
        let retried = jobs::reschedule(&db, &failed, Some("b")).await.unwrap();
        let claim_2 = JobClaim::of(&retried).unwrap();
        jobs::mark_running(&db, &claim_2).await.unwrap();
        let x = output(&db, table.id, &claim_2).await;
        let y = output(&db, table.id, &claim_2).await;
        workers::heartbeat(&db, "a").await.unwrap();

        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        let complete = |claim: JobClaim, rev: i64| {
            let db = db.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                jobs::mark_completed(&db, &claim, &[rev], GRACE).await
            })
        };
        let results = [
            (stale, complete(claim_1.clone(), stale)),
            (x, complete(claim_2.clone(), x)),
            (y, complete(claim_2.clone(), y)),
        ];
        let mut winners = Vec::new();
        for (rev, task) in results {
            match task.await.unwrap() {
                Ok(done) => {
                    assert_eq!(done.job.attempt, 2, "round {round}");
                    winners.push(rev);
                }
                Err(Error::Fenced { .. } | Error::StateConflict { .. }) => {}
                Err(other) => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: one completion applies");
        assert_ne!(
            winners[0], stale,
            "round {round}: never the fenced-off attempt"
        );
        let active = rows::active_revision_id(&db, table.id).await;
        assert_eq!(active, Some(winners[0]), "round {round}");
        assert_eq!(job(&db, j.id).await.status, "COMPLETED");
    }
}

#[tokio::test]
async fn a_stop_of_a_lost_worker_completes_without_it_and_says_so() {
    let (_test_db, db, _) = rows::setup(workers_and_a_table).await;
    let j = rows::scheduled(&db, "s", Some("a")).await;
    jobs::mark_running(&db, &JobClaim::of(&j).unwrap())
        .await
        .unwrap();
    jobs::request_stop(&db, j.id).await.unwrap();
    lose(&db, "a").await;

    controller::reconcile(&db, &policy())
        .await
        .expect("reconcile");

    let stopped = job(&db, j.id).await;
    assert_eq!(stopped.status, "STOPPED");
    assert_eq!(stopped.detail, None, "STOPPED has no error detail");
    let tail: Vec<(String, Option<serde_json::Value>)> = jobs::list_events(&db, j.id)
        .await
        .unwrap()
        .into_iter()
        .skip(3)
        .map(|e| (e.event_type, e.detail))
        .collect();
    let lost = Some(jobs::worker_lost(Some("a")));
    assert_eq!(
        tail,
        [
            ("STOPPING".to_owned(), lost.clone()),
            ("STOPPED".to_owned(), lost)
        ]
    );
}

#[tokio::test]
async fn a_job_that_used_up_its_attempts_is_given_up_as_fatal_without_a_new_attempt() {
    let (_test_db, db, _) = rows::setup(workers_and_a_table).await;
    workers::heartbeat(&db, "b").await.unwrap();
    let j = rows::scheduled(&db, "g", Some("b")).await;
    let mut policy = policy();
    policy.max_attempts = 2;
    policy.retry_base_delay = Duration::ZERO;
    policy.retry_max_delay = Duration::ZERO;
    // Attempt 1 fails and is retried; attempt 2 fails and is given up.
    for attempt in 1..=2 {
        let current = job(&db, j.id).await;
        assert_eq!(current.attempt, attempt);
        let claim = JobClaim::of(&current).unwrap();
        jobs::mark_running(&db, &claim).await.unwrap();
        jobs::mark_error(&db, &claim, json!({"error": format!("boom {attempt}")}))
            .await
            .unwrap();
        controller::reconcile(&db, &policy)
            .await
            .expect("reconcile");
    }
    let given_up = job(&db, j.id).await;
    assert_eq!(given_up.status, "FATAL");
    assert_eq!(given_up.attempt, 2, "no attempt 3 was made");
    assert_eq!(given_up.node_id, None);
    assert_eq!(
        given_up.detail,
        Some(json!({"reason": "max_attempts", "attempts": 2, "last_error": {"error": "boom 2"}}))
    );
    let types = rows::event_types(&db, j.id).await;
    assert_eq!(
        types,
        [
            "SCHEDULED",
            "RUNNING",
            "ERROR",
            "SCHEDULED",
            "RUNNING",
            "ERROR",
            "SCHEDULED",
            "FATAL"
        ]
    );
}
