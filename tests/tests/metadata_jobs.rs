//! `metadata::jobs`: idempotent scheduling, every transition of the state machine (legal and
//! illegal), assignment, orphans, retry backoff, clean-up.

use std::time::Duration;

use ampd::metadata::jobs::{self, Scheduled};
use ampd::metadata::notifications::{Action, JobAction, Listener, Notification};
use ampd::metadata::{Error, workers};
use entity::{JobStatus, job_events, jobs as job_rows};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait, Statement,
    TransactionTrait, Value,
};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use tests::TestDb;

const KIND: &str = "materialize-static";

fn descriptor(name: &str) -> Json {
    json!({
        "namespace": "eth",
        "name": name,
        "manifest_hash": "a".repeat(64),
    })
}

async fn exec(db: &DatabaseConnection, sql: &str, values: Vec<Value>) {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        values,
    ))
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Puts a job into `status` behind the state machine's back (ERROR and FATAL with a detail).
async fn force_status(db: &DatabaseConnection, job_id: i64, status: JobStatus) {
    let detail = matches!(status, JobStatus::Error | JobStatus::Fatal).then(|| json!({"e": 1}));
    exec(
        db,
        "UPDATE jobs SET status = $1, detail = $2 WHERE id = $3",
        vec![status.as_str().into(), detail.into(), job_id.into()],
    )
    .await;
}

async fn events(db: &DatabaseConnection, job_id: i64) -> Vec<job_events::Model> {
    jobs::list_events(db, job_id).await.expect("events")
}

async fn job(db: &DatabaseConnection, job_id: i64) -> job_rows::Model {
    jobs::get(db, job_id)
        .await
        .expect("get")
        .expect("job exists")
}

/// Applies the operation whose target status is `to`.
async fn move_to(
    db: &DatabaseConnection,
    job_id: i64,
    to: JobStatus,
) -> Result<job_rows::Model, Error> {
    match to {
        JobStatus::Scheduled => jobs::reschedule(db, job_id, Some("w1")).await,
        JobStatus::Running => jobs::mark_running(db, job_id, "w1").await,
        JobStatus::Completed => jobs::mark_completed(db, job_id).await,
        JobStatus::StopRequested => jobs::request_stop(db, job_id).await,
        JobStatus::Stopping => jobs::mark_stopping(db, job_id).await,
        JobStatus::Stopped => jobs::mark_stopped(db, job_id).await,
        JobStatus::Error => jobs::mark_error(db, job_id, json!({"error": "boom"})).await,
        JobStatus::Fatal => jobs::mark_fatal(db, job_id, json!({"error": "fatal"})).await,
    }
}

async fn setup() -> (TestDb, DatabaseConnection) {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    workers::register(&conn, "w1", json!({})).await.expect("w1");
    (db, conn)
}

/// A job in status `from`, one per (from, to) pair so that every case starts afresh.
async fn job_in(db: &DatabaseConnection, from: JobStatus, to: JobStatus) -> job_rows::Model {
    let name = format!("{}_{}", from.as_str(), to.as_str()).to_lowercase();
    let (job, _) = jobs::schedule(db, KIND, descriptor(&name), Some("w1"))
        .await
        .expect("schedule");
    force_status(db, job.id, from).await;
    self::job(db, job.id).await
}

#[tokio::test]
async fn every_transition_schema_md_lists_applies_and_every_other_is_a_state_conflict() {
    use JobStatus::{
        Completed, Error as Failed, Fatal, Running, Scheduled, StopRequested, Stopped, Stopping,
    };
    // SCHEMA.md's table of legal transitions, written out: (from, to).
    const LEGAL: [(JobStatus, JobStatus); 13] = [
        (Scheduled, Running),
        (Scheduled, StopRequested),
        (Scheduled, Failed),
        (Scheduled, Fatal),
        (Running, Completed),
        (Running, StopRequested),
        (Running, Failed),
        (Running, Fatal),
        (StopRequested, Stopping),
        (Stopping, Stopped),
        (Failed, Scheduled),
        (Stopped, Scheduled),
        (Fatal, Scheduled),
    ];
    const STATUSES: [JobStatus; 8] = [
        Scheduled,
        Running,
        Completed,
        StopRequested,
        Stopping,
        Stopped,
        Failed,
        Fatal,
    ];
    let (_db, conn) = setup().await;
    let (mut legal, mut illegal) = (0, 0);
    for from in STATUSES {
        for to in STATUSES {
            let before = job_in(&conn, from, to).await;
            let events_before = events(&conn, before.id).await;
            let result = move_to(&conn, before.id, to).await;

            if !LEGAL.contains(&(from, to)) {
                // Illegal: a state conflict naming what `to` may follow and what the job is; the
                // row and its history unchanged.
                match result {
                    Err(Error::StateConflict { expected, actual }) => {
                        let mut predecessors: Vec<&str> = LEGAL
                            .iter()
                            .filter(|(_, t)| *t == to)
                            .map(|(f, _)| f.as_str())
                            .collect();
                        let mut expected: Vec<&str> = expected.iter().map(|s| s.as_str()).collect();
                        predecessors.sort_unstable();
                        expected.sort_unstable();
                        assert_eq!(expected, predecessors, "{from} -> {to}");
                        assert_eq!(actual, from, "{from} -> {to}");
                    }
                    other => panic!("{from} -> {to}: expected a state conflict, got {other:?}"),
                }
                assert_eq!(
                    job(&conn, before.id).await,
                    before,
                    "{from} -> {to}: row unchanged"
                );
                assert_eq!(
                    events(&conn, before.id).await,
                    events_before,
                    "{from} -> {to}: no event"
                );
                illegal += 1;
                continue;
            }

            // Legal: applied, stored, and recorded by exactly one event.
            let after = result.unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            assert_eq!(after.status, to.as_str(), "{from} -> {to}");
            assert_eq!(job(&conn, before.id).await, after, "returned row is stored");
            let events = events(&conn, before.id).await;
            assert_eq!(
                events.len(),
                events_before.len() + 1,
                "{from} -> {to}: one event"
            );
            let event = events.last().expect("an event");
            assert_eq!(event.event_type, to.as_str());
            assert_eq!(event.node_id.as_deref(), Some("w1"));
            match to {
                Failed | Fatal => {
                    assert!(after.detail.is_some(), "{to} keeps its detail");
                    assert_eq!(event.detail, after.detail);
                }
                Scheduled => {
                    assert_eq!(after.detail, None);
                    assert_eq!(
                        after.attempt,
                        before.attempt + 1,
                        "a retry is a new attempt"
                    );
                    assert_eq!(event.detail.as_ref(), Some(&after.descriptor));
                }
                _ => {
                    assert_eq!(after.detail, None);
                    assert_eq!(after.attempt, before.attempt);
                    assert_eq!(event.detail, None);
                }
            }
            legal += 1;
        }
    }
    assert_eq!((legal, illegal), (13, 64 - 13), "every (from, to) pair");
}

#[tokio::test]
async fn transitions_of_a_missing_job_are_not_found() {
    let (_db, conn) = setup().await;
    for to in JobStatus::ALL {
        let err = move_to(&conn, 4242, to).await.expect_err("no such job");
        assert!(
            matches!(&err, Error::NotFound { entity: "job", key } if key == "4242"),
            "{to}: {err:?}"
        );
    }
    let err = jobs::reassign(&conn, 4242, None, Some("w1"))
        .await
        .expect_err("no such job");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(job_events::Entity::find().count(&conn).await.unwrap(), 0);
}

#[tokio::test]
async fn mark_running_by_an_unregistered_worker_is_not_found_and_changes_nothing() {
    let (_db, conn) = setup().await;
    let (job, _) = jobs::schedule(&conn, KIND, descriptor("blocks"), None)
        .await
        .unwrap();
    let err = jobs::mark_running(&conn, job.id, "ghost")
        .await
        .expect_err("unknown worker");
    assert!(
        matches!(&err, Error::NotFound { entity: "worker", key } if key == "ghost"),
        "{err:?}"
    );
    assert_eq!(self::job(&conn, job.id).await, job);
    let err = jobs::mark_running(&conn, job.id, "9bad")
        .await
        .expect_err("invalid node id");
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
}

#[tokio::test]
async fn schedule_creates_a_scheduled_job_at_attempt_one_keyed_by_its_target() {
    let (_db, conn) = setup().await;
    let (job, outcome) = jobs::schedule(&conn, KIND, descriptor("blocks"), None)
        .await
        .expect("schedule");

    assert_eq!(outcome, Scheduled::Created);
    assert_eq!(job.status, "SCHEDULED");
    assert_eq!(job.attempt, 1);
    assert_eq!(job.node_id, None);
    assert_eq!(job.detail, None);
    let text = format!("{KIND}:eth/blocks@{}", "a".repeat(64));
    assert_eq!(job.idempotency_key, hex::encode(Sha256::digest(text)));
    let events = events(&conn, job.id).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "SCHEDULED");
    assert_eq!(events[0].detail.as_ref(), Some(&job.descriptor));
}

#[tokio::test]
async fn schedule_with_the_same_descriptor_while_active_returns_the_same_job() {
    let (_db, conn) = setup().await;
    let (first, _) = jobs::schedule(&conn, KIND, descriptor("blocks"), None)
        .await
        .unwrap();
    for status in [
        JobStatus::Scheduled,
        JobStatus::Running,
        JobStatus::Stopping,
    ] {
        force_status(&conn, first.id, status).await;
        let (again, outcome) = jobs::schedule(&conn, KIND, descriptor("blocks"), Some("w1"))
            .await
            .expect("schedule again");
        assert_eq!(outcome, Scheduled::Existing, "{status}");
        assert_eq!(again.id, first.id);
        assert_eq!(again.status, status.as_str(), "left as it was");
        assert_eq!(again.node_id, None, "not reassigned");
    }
    assert_eq!(job_rows::Entity::find().count(&conn).await.unwrap(), 1);
    assert_eq!(events(&conn, first.id).await.len(), 1, "no new event");
}

#[tokio::test]
async fn schedule_with_another_descriptor_while_active_is_a_conflict() {
    let (_db, conn) = setup().await;
    let (first, _) = jobs::schedule(&conn, KIND, descriptor("blocks"), None)
        .await
        .unwrap();
    let mut other = descriptor("blocks");
    other["options"] = json!({"parallelism": 4});

    let err = jobs::schedule(&conn, KIND, other, None)
        .await
        .expect_err("conflict");

    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(job(&conn, first.id).await, first, "unchanged");
}

#[tokio::test]
async fn schedule_after_a_stopped_or_failed_run_reschedules_with_the_next_attempt() {
    let (_db, conn) = setup().await;
    let (first, _) = jobs::schedule(&conn, KIND, descriptor("blocks"), None)
        .await
        .unwrap();
    let mut attempt = first.attempt;
    for terminal in [JobStatus::Error, JobStatus::Stopped, JobStatus::Fatal] {
        force_status(&conn, first.id, terminal).await;
        let mut new = descriptor("blocks");
        new["options"] = json!({"after": terminal.as_str()});

        let (job, outcome) = jobs::schedule(&conn, KIND, new.clone(), Some("w1"))
            .await
            .expect("reschedule");

        attempt += 1;
        assert_eq!(outcome, Scheduled::Rescheduled, "after {terminal}");
        assert_eq!(job.id, first.id);
        assert_eq!(job.status, "SCHEDULED");
        assert_eq!(job.attempt, attempt);
        assert_eq!(job.descriptor, new, "descriptor replaced");
        assert_eq!(job.detail, None);
        assert_eq!(job.node_id.as_deref(), Some("w1"));
        let last = events(&conn, job.id).await.pop().expect("event");
        assert_eq!(last.event_type, "SCHEDULED");
        assert_eq!(last.detail, Some(new));
    }
    assert_eq!(events(&conn, first.id).await.len(), 4);
}

#[tokio::test]
async fn schedule_of_a_completed_jobs_key_returns_it_and_never_runs_it_again() {
    let (_db, conn) = setup().await;
    let (first, _) = jobs::schedule(&conn, KIND, descriptor("blocks"), None)
        .await
        .unwrap();
    force_status(&conn, first.id, JobStatus::Completed).await;

    let (again, outcome) = jobs::schedule(&conn, KIND, descriptor("blocks"), None)
        .await
        .unwrap();
    assert_eq!(outcome, Scheduled::Existing);
    assert_eq!(again.status, "COMPLETED");
    assert_eq!(again.attempt, 1);

    let mut other = descriptor("blocks");
    other["options"] = json!(1);
    let err = jobs::schedule(&conn, KIND, other, None)
        .await
        .expect_err("conflict");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
}

#[tokio::test]
async fn schedule_of_a_descriptor_without_its_target_fields_is_invalid_input() {
    let (_db, conn) = setup().await;
    for bad in [
        json!({"name": "blocks", "manifest_hash": "x"}),
        json!({"namespace": "eth", "manifest_hash": "x"}),
        json!({"namespace": "eth", "name": "blocks"}),
        json!({"namespace": "eth", "name": 7, "manifest_hash": "x"}),
        json!("eth/blocks"),
    ] {
        let err = jobs::schedule(&conn, KIND, bad.clone(), None)
            .await
            .expect_err("invalid");
        assert!(matches!(err, Error::InvalidInput(_)), "{bad}: {err:?}");
    }
    assert_eq!(job_rows::Entity::find().count(&conn).await.unwrap(), 0);
}

#[tokio::test]
async fn sixteen_concurrent_schedules_of_one_key_create_exactly_one_job() {
    let db = TestDb::migrated().await;
    let conn = tests::connect(db.url(), 16).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            jobs::schedule(&conn, KIND, descriptor("blocks"), None).await
        }));
    }
    let mut ids = Vec::new();
    let mut created = 0;
    for task in tasks {
        let (job, outcome) = task.await.expect("task").expect("schedule");
        ids.push(job.id);
        if outcome == Scheduled::Created {
            created += 1;
        }
    }
    assert_eq!(created, 1, "one task created it, the others found it");
    ids.dedup();
    assert_eq!(ids.len(), 1, "all got the same job");
    assert_eq!(job_rows::Entity::find().count(&conn).await.unwrap(), 1);
    assert_eq!(job_events::Entity::find().count(&conn).await.unwrap(), 1);
}

#[tokio::test]
async fn schedule_with_a_node_assigns_it_and_sends_start_on_commit() {
    let (db, conn) = setup().await;
    let mut listener = Listener::connect(db.url()).await.expect("listener");

    let tx = conn.begin().await.unwrap();
    let (job, _) = jobs::schedule(&tx, KIND, descriptor("blocks"), Some("w1"))
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(early.is_err(), "nothing is delivered before the commit");
    tx.commit().await.unwrap();

    let got = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("delivered")
        .expect("recv");
    assert_eq!(
        got,
        Notification::JobAction(JobAction {
            node_id: "w1".into(),
            job_id: job.id,
            action: Action::Start,
        })
    );
    assert_eq!(job.node_id.as_deref(), Some("w1"));
}

#[tokio::test]
async fn schedule_in_a_rolled_back_transaction_leaves_no_job_and_no_event() {
    let (_db, conn) = setup().await;
    let tx = conn.begin().await.unwrap();
    jobs::schedule(&tx, KIND, descriptor("blocks"), Some("w1"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(job_rows::Entity::find().count(&conn).await.unwrap(), 0);
    assert_eq!(job_events::Entity::find().count(&conn).await.unwrap(), 0);
}

#[tokio::test]
async fn schedule_to_an_unregistered_node_is_not_found() {
    let (_db, conn) = setup().await;
    let err = jobs::schedule(&conn, KIND, descriptor("blocks"), Some("ghost"))
        .await
        .expect_err("unknown worker");
    assert!(
        matches!(
            &err,
            Error::NotFound {
                entity: "worker",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(job_rows::Entity::find().count(&conn).await.unwrap(), 0);
}

#[tokio::test]
async fn request_stop_of_an_assigned_job_sends_stop_to_its_node() {
    let (db, conn) = setup().await;
    let (job, _) = jobs::schedule(&conn, KIND, descriptor("blocks"), Some("w1"))
        .await
        .unwrap();
    jobs::mark_running(&conn, job.id, "w1").await.unwrap();
    let mut listener = Listener::connect(db.url()).await.expect("listener");

    jobs::request_stop(&conn, job.id).await.unwrap();

    let got = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("delivered")
        .expect("recv");
    assert_eq!(
        got,
        Notification::JobAction(JobAction {
            node_id: "w1".into(),
            job_id: job.id,
            action: Action::Stop,
        })
    );
}

#[tokio::test]
async fn list_pages_by_id_and_filters_by_status() {
    let (_db, conn) = setup().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (job, _) = jobs::schedule(&conn, KIND, descriptor(&format!("t{i}")), None)
            .await
            .unwrap();
        ids.push(job.id);
    }
    jobs::mark_running(&conn, ids[1], "w1").await.unwrap();
    jobs::mark_running(&conn, ids[3], "w1").await.unwrap();

    let page1 = jobs::list(&conn, None, None, 2).await.unwrap();
    let page2 = jobs::list(&conn, None, page1.last().map(|j| j.id), 2)
        .await
        .unwrap();
    let page3 = jobs::list(&conn, None, page2.last().map(|j| j.id), 2)
        .await
        .unwrap();
    let paged: Vec<i64> = [page1, page2, page3]
        .concat()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(paged, ids);

    let running: Vec<i64> = jobs::list(&conn, Some(JobStatus::Running), None, 10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(running, [ids[1], ids[3]]);
    let after: Vec<i64> = jobs::list(&conn, Some(JobStatus::Scheduled), Some(ids[2]), 10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(after, [ids[4]]);
}

#[tokio::test]
async fn list_active_for_node_lists_only_that_nodes_unfinished_jobs() {
    let (_db, conn) = setup().await;
    workers::register(&conn, "w2", json!({})).await.unwrap();
    let mut ids = Vec::new();
    for (i, node) in ["w1", "w1", "w1", "w2"].into_iter().enumerate() {
        let (job, _) = jobs::schedule(&conn, KIND, descriptor(&format!("t{i}")), Some(node))
            .await
            .unwrap();
        ids.push(job.id);
    }
    jobs::mark_running(&conn, ids[1], "w1").await.unwrap();
    jobs::mark_running(&conn, ids[2], "w1").await.unwrap();
    jobs::mark_completed(&conn, ids[2]).await.unwrap();

    let active: Vec<i64> = jobs::list_active_for_node(&conn, "w1")
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(active, [ids[0], ids[1]]);
}

#[tokio::test]
async fn orphaned_jobs_of_a_dead_worker_are_found_and_reassigned_to_a_live_one() {
    let (db, conn) = setup().await;
    workers::register(&conn, "w2", json!({})).await.unwrap();
    let (dead_running, _) = jobs::schedule(&conn, KIND, descriptor("a"), Some("w1"))
        .await
        .unwrap();
    jobs::mark_running(&conn, dead_running.id, "w1")
        .await
        .unwrap();
    let (unassigned, _) = jobs::schedule(&conn, KIND, descriptor("b"), None)
        .await
        .unwrap();
    let (live, _) = jobs::schedule(&conn, KIND, descriptor("c"), Some("w2"))
        .await
        .unwrap();
    let (done, _) = jobs::schedule(&conn, KIND, descriptor("d"), Some("w1"))
        .await
        .unwrap();
    jobs::mark_running(&conn, done.id, "w1").await.unwrap();
    jobs::mark_completed(&conn, done.id).await.unwrap();
    // w1 last beat a minute ago; w2 just now.
    exec(
        &conn,
        "UPDATE workers SET heartbeat_at = now() - interval '60 seconds' WHERE node_id = 'w1'",
        vec![],
    )
    .await;
    workers::heartbeat(&conn, "w2").await.unwrap();

    let orphans: Vec<i64> = jobs::list_orphaned(&conn, Duration::from_secs(5))
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(orphans, [dead_running.id, unassigned.id]);
    assert!(!orphans.contains(&live.id));

    let mut listener = Listener::connect(db.url()).await.expect("listener");
    let moved = jobs::reassign(&conn, dead_running.id, Some("w1"), Some("w2"))
        .await
        .expect("reassign");
    assert_eq!(moved.node_id.as_deref(), Some("w2"));
    assert_eq!(moved.status, "RUNNING", "status unchanged");
    let got = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("delivered")
        .expect("recv");
    assert_eq!(
        got,
        Notification::JobAction(JobAction {
            node_id: "w2".into(),
            job_id: dead_running.id,
            action: Action::Start,
        })
    );
    jobs::reassign(&conn, unassigned.id, None, Some("w2"))
        .await
        .expect("assign the unassigned one");

    let orphans = jobs::list_orphaned(&conn, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(orphans.is_empty(), "{orphans:?}");
}

#[tokio::test]
async fn reassign_from_a_node_the_job_is_not_on_is_a_conflict() {
    let (_db, conn) = setup().await;
    workers::register(&conn, "w2", json!({})).await.unwrap();
    let (job, _) = jobs::schedule(&conn, KIND, descriptor("a"), Some("w2"))
        .await
        .unwrap();
    let err = jobs::reassign(&conn, job.id, Some("w1"), Some("w1"))
        .await
        .expect_err("guarded on the current node");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(self::job(&conn, job.id).await, job);
}

#[tokio::test]
async fn reassign_of_a_finished_job_is_a_state_conflict() {
    let (_db, conn) = setup().await;
    let (job, _) = jobs::schedule(&conn, KIND, descriptor("a"), Some("w1"))
        .await
        .unwrap();
    jobs::mark_fatal(&conn, job.id, json!({})).await.unwrap();
    let err = jobs::reassign(&conn, job.id, Some("w1"), None)
        .await
        .expect_err("not active");
    match err {
        Error::StateConflict { expected, actual } => {
            assert_eq!(expected, jobs::ACTIVE);
            assert_eq!(actual, JobStatus::Fatal);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn jobs_due_for_retry_follow_a_capped_exponential_backoff() {
    let (_db, conn) = setup().await;
    // attempt -> backoff with base 10 s, max 60 s: 1 -> 10 s, 2 -> 20 s, 3 -> 40 s, 10 -> 60 s.
    let mut by_attempt = Vec::new();
    for attempt in [1, 2, 3, 10] {
        let (job, _) = jobs::schedule(&conn, KIND, descriptor(&format!("a{attempt}")), None)
            .await
            .unwrap();
        jobs::mark_error(&conn, job.id, json!({"e": attempt}))
            .await
            .unwrap();
        exec(
            &conn,
            "UPDATE jobs SET attempt = $1 WHERE id = $2",
            vec![attempt.into(), job.id.into()],
        )
        .await;
        by_attempt.push((attempt, job.id));
    }
    // A fatal job failed long ago: never due.
    let (fatal, _) = jobs::schedule(&conn, KIND, descriptor("fatal"), None)
        .await
        .unwrap();
    jobs::mark_fatal(&conn, fatal.id, json!({})).await.unwrap();

    let due_after = |secs: i64| {
        let conn = conn.clone();
        async move {
            exec(
                &conn,
                "UPDATE jobs SET updated_at = now() - $1 * interval '1 second'",
                vec![secs.into()],
            )
            .await;
            let mut due: Vec<i64> = jobs::list_due_for_retry(
                &conn,
                Duration::from_secs(10),
                Duration::from_secs(60),
                100,
            )
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
            due.sort();
            due
        }
    };
    let ids = |attempts: &[i32]| -> Vec<i64> {
        by_attempt
            .iter()
            .filter(|(a, _)| attempts.contains(a))
            .map(|(_, id)| *id)
            .collect()
    };
    assert_eq!(due_after(5).await, ids(&[]));
    assert_eq!(due_after(15).await, ids(&[1]));
    assert_eq!(due_after(30).await, ids(&[1, 2]));
    assert_eq!(due_after(50).await, ids(&[1, 2, 3]));
    assert_eq!(due_after(61).await, ids(&[1, 2, 3, 10]), "capped at 60 s");
    assert_eq!(due_after(100_000).await, ids(&[1, 2, 3, 10]));

    let limited = jobs::list_due_for_retry(&conn, Duration::ZERO, Duration::ZERO, 2)
        .await
        .unwrap();
    assert_eq!(limited.len(), 2, "limit");
}

#[tokio::test]
async fn delete_terminal_deletes_finished_jobs_with_their_events_and_keeps_active_ones() {
    let (_db, conn) = setup().await;
    let mut ids = Vec::new();
    for (i, status) in [
        JobStatus::Completed,
        JobStatus::Error,
        JobStatus::Running,
        JobStatus::Scheduled,
    ]
    .into_iter()
    .enumerate()
    {
        let (job, _) = jobs::schedule(&conn, KIND, descriptor(&format!("t{i}")), None)
            .await
            .unwrap();
        force_status(&conn, job.id, status).await;
        ids.push(job.id);
    }
    exec(
        &conn,
        "UPDATE jobs SET updated_at = now() - interval '2 hours' WHERE id = $1",
        vec![ids[0].into()],
    )
    .await;

    let old = jobs::delete_terminal(&conn, Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(old, 1, "only the job finished two hours ago");
    assert!(jobs::get(&conn, ids[0]).await.unwrap().is_none());
    assert!(
        events(&conn, ids[0]).await.is_empty(),
        "its events went too"
    );

    let rest = jobs::delete_terminal(&conn, None).await.unwrap();
    assert_eq!(rest, 1);
    let left: Vec<i64> = jobs::list(&conn, None, None, 10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(left, [ids[2], ids[3]]);
}

#[tokio::test]
async fn list_events_returns_a_jobs_history_in_order() {
    let (_db, conn) = setup().await;
    let (job, _) = jobs::schedule(&conn, KIND, descriptor("a"), Some("w1"))
        .await
        .unwrap();
    jobs::mark_running(&conn, job.id, "w1").await.unwrap();
    jobs::mark_error(&conn, job.id, json!({"e": 1}))
        .await
        .unwrap();
    jobs::reschedule(&conn, job.id, None).await.unwrap();
    let types: Vec<String> = events(&conn, job.id)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(types, ["SCHEDULED", "RUNNING", "ERROR", "SCHEDULED"]);
    let job = self::job(&conn, job.id).await;
    assert_eq!(job.attempt, 2);
    assert_eq!(job.node_id, None, "rescheduled to no node");
}

#[tokio::test]
async fn schedule_waiting_on_an_uncommitted_schedule_of_the_same_key_returns_that_job() {
    let (_db, conn) = setup().await;
    let tx = conn.begin().await.unwrap();
    let (created, outcome) = jobs::schedule(&tx, KIND, descriptor("blocks"), None)
        .await
        .unwrap();
    assert_eq!(outcome, Scheduled::Created);

    // The second schedule's INSERT waits on the first transaction's row; once that commits, the
    // statement's snapshot does not show the row, so it must look again.
    let waiting = {
        let conn = conn.clone();
        tokio::spawn(async move { jobs::schedule(&conn, KIND, descriptor("blocks"), None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "blocked by the uncommitted insert");
    tx.commit().await.unwrap();

    let (found, outcome) = waiting.await.unwrap().expect("schedule");
    assert_eq!(outcome, Scheduled::Existing);
    assert_eq!(found.id, created.id);
    assert_eq!(job_rows::Entity::find().count(&conn).await.unwrap(), 1);
}

#[tokio::test]
async fn a_transition_waiting_on_a_concurrent_one_reports_the_status_that_won() {
    let (_db, conn) = setup().await;
    let (job, _) = jobs::schedule(&conn, KIND, descriptor("blocks"), None)
        .await
        .unwrap();
    let tx = conn.begin().await.unwrap();
    jobs::mark_running(&tx, job.id, "w1").await.unwrap();

    // The waiting statement's snapshot shows SCHEDULED, from which RUNNING is legal; when it gets
    // the row, the row is RUNNING and the guard fails. The error must report RUNNING, not the
    // snapshot's SCHEDULED.
    let waiting = {
        let conn = conn.clone();
        tokio::spawn(async move { jobs::mark_running(&conn, job.id, "w1").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "blocked by the uncommitted transition"
    );
    tx.commit().await.unwrap();

    let err = waiting.await.unwrap().expect_err("already running");
    match err {
        Error::StateConflict { expected, actual } => {
            assert_eq!(expected, [JobStatus::Scheduled]);
            assert_eq!(actual, JobStatus::Running);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(events(&conn, job.id).await.len(), 2, "SCHEDULED, RUNNING");
}
