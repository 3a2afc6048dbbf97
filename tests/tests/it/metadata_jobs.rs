//! `metadata::jobs`: idempotent scheduling, every transition of the state machine (legal and
//! illegal), assignment, orphans, retry backoff, clean-up.

use std::time::Duration;

use ampd::metadata::jobs::{self, JobClaim, Scheduled};
use ampd::metadata::notifications::{self, Action, JobAction, Listener, Notification};
use ampd::metadata::{Error, workers};
use entity::{JobStatus, job_events, jobs as job_rows};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait, Statement,
    TransactionTrait, Value,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tests::TestDb;
use tests::rows::{self, KIND, descriptor, job, job_ids, schedule_each, scheduled};
use tests::sql::next_notification;

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

/// A job row that is not in the database (for operations on a missing job).
fn phantom(job_id: i64) -> job_rows::Model {
    let now = chrono::Utc::now().fixed_offset();
    job_rows::Model {
        id: job_id,
        kind: KIND.into(),
        node_id: Some("w1".into()),
        status: "ERROR".into(),
        descriptor: descriptor("phantom"),
        detail: None,
        attempt: 1,
        created_at: now,
        updated_at: now,
        idempotency_key: "0".repeat(64),
        claim_epoch: None,
    }
}

/// The claim of the worker the job is assigned to, on its current attempt.
fn claim(job: &job_rows::Model) -> JobClaim {
    JobClaim::of(job).expect("the job is assigned to a node")
}

/// Applies the operation whose target status is `to`, as worker w1 (holding the job's current
/// attempt) or the controller would.
async fn move_to(
    db: &DatabaseConnection,
    job_id: i64,
    to: JobStatus,
) -> Result<job_rows::Model, Error> {
    let seen = jobs::get(db, job_id)
        .await
        .expect("get")
        .unwrap_or_else(|| phantom(job_id));
    let claim = JobClaim {
        job_id,
        node_id: "w1".into(),
        attempt: seen.attempt,
        epoch: 0,
    };
    match to {
        JobStatus::Scheduled => jobs::reschedule(db, &seen, Some("w1")).await,
        JobStatus::Running => jobs::mark_running(db, &claim).await,
        JobStatus::Completed => jobs::mark_completed(db, &claim, &[], Duration::ZERO)
            .await
            .map(|done| done.job),
        JobStatus::StopRequested => jobs::request_stop(db, job_id).await,
        JobStatus::Stopping => jobs::mark_stopping(db, &claim).await,
        JobStatus::Stopped => jobs::mark_stopped(db, &claim).await,
        JobStatus::Error => jobs::mark_error(db, &claim, json!({"error": "boom"})).await,
        JobStatus::Fatal => jobs::mark_fatal(db, &claim, json!({"error": "fatal"})).await,
    }
}

/// SCHEDULED → RUNNING by the job's node.
async fn start(db: &DatabaseConnection, job_id: i64) -> job_rows::Model {
    let seen = job(db, job_id).await;
    jobs::mark_running(db, &claim(&seen))
        .await
        .expect("running")
}

/// RUNNING → COMPLETED by the job's node, with no output.
async fn complete(db: &DatabaseConnection, job_id: i64) -> job_rows::Model {
    let seen = job(db, job_id).await;
    jobs::mark_completed(db, &claim(&seen), &[], Duration::ZERO)
        .await
        .expect("completed")
        .job
}

/// Worker `w1`, registered: the node the tests' jobs are scheduled on.
async fn worker_w1(db: &DatabaseConnection) {
    rows::workers(db, &["w1"]).await;
}

/// A job in status `from`, one per (from, to) pair so that every case starts afresh.
async fn job_in(db: &DatabaseConnection, from: JobStatus, to: JobStatus) -> job_rows::Model {
    let name = format!("{}_{}", from.as_str(), to.as_str()).to_lowercase();
    let job = scheduled(db, &name, Some("w1")).await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    for to in JobStatus::ALL {
        let err = move_to(&conn, 4242, to).await.expect_err("no such job");
        assert!(
            matches!(&err, Error::NotFound { entity: "job", key } if key == "4242"),
            "{to}: {err:?}"
        );
    }
    let err = jobs::reassign(&conn, &phantom(4242), Some("w1"))
        .await
        .expect_err("no such job");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(job_events::Entity::find().count(&conn).await.unwrap(), 0);
}

#[tokio::test]
async fn mark_running_with_a_claim_of_another_node_or_attempt_is_fenced_and_changes_nothing() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    workers::register(&conn, "w2", json!({})).await.unwrap();
    let job = scheduled(&conn, "blocks", Some("w1")).await;
    let events_before = events(&conn, job.id).await;
    let foreign = [
        ("w2", job.attempt),
        ("w1", job.attempt + 1),
        ("ghost", job.attempt),
    ];
    for (node, attempt) in foreign {
        let claim = JobClaim {
            job_id: job.id,
            node_id: node.into(),
            attempt,
            epoch: 0,
        };
        let err = jobs::mark_running(&conn, &claim)
            .await
            .expect_err("not this claim's job");
        match err {
            Error::Fenced {
                job_id,
                expected,
                actual,
            } => {
                assert_eq!(job_id, job.id);
                assert_eq!(expected.node_id.as_deref(), Some(node));
                assert_eq!(expected.attempt, attempt);
                assert_eq!(actual.node_id.as_deref(), Some("w1"));
                assert_eq!(actual.attempt, job.attempt);
            }
            other => panic!("{node}/{attempt}: expected Fenced, got {other:?}"),
        }
        assert_eq!(self::job(&conn, job.id).await, job, "row unchanged");
        assert_eq!(events(&conn, job.id).await, events_before, "no event");
    }
}

#[tokio::test]
async fn schedule_creates_a_scheduled_job_at_attempt_one_keyed_by_its_target() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let first = scheduled(&conn, "blocks", None).await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let first = scheduled(&conn, "blocks", None).await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let first = scheduled(&conn, "blocks", None).await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let first = scheduled(&conn, "blocks", None).await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
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
    let (db, conn, ()) = rows::setup(worker_w1).await;
    let mut listener = Listener::connect(&db.config()).await.expect("listener");

    let tx = conn.begin().await.unwrap();
    let job = scheduled(&tx, "blocks", Some("w1")).await;
    // A marker committed after the uncommitted START: notifications arrive in commit order, so
    // the listener must see the marker first if nothing leaked before the commit.
    let marker = JobAction {
        node_id: "marker".into(),
        job_id: -1,
        action: Action::Stop,
    };
    notifications::notify_job_action(&conn, &marker)
        .await
        .unwrap();
    let first = next_notification(&mut listener, "marker delivered").await;
    assert_eq!(
        first,
        Notification::JobAction(marker),
        "nothing is delivered before the commit"
    );
    tx.commit().await.unwrap();

    let got = next_notification(&mut listener, "delivered").await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
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
    let (db, conn, ()) = rows::setup(worker_w1).await;
    let job = scheduled(&conn, "blocks", Some("w1")).await;
    start(&conn, job.id).await;
    let mut listener = Listener::connect(&db.config()).await.expect("listener");

    jobs::request_stop(&conn, job.id).await.unwrap();

    let got = next_notification(&mut listener, "delivered").await;
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
async fn list_pages_by_id() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let ids = schedule_each(&conn, &[Some("w1"); 5]).await;
    start(&conn, ids[1]).await;
    start(&conn, ids[3]).await;

    let page1 = jobs::list(&conn, &[], None, 2).await.unwrap();
    let page2 = jobs::list(&conn, &[], page1.last().map(|j| j.id), 2)
        .await
        .unwrap();
    let page3 = jobs::list(&conn, &[], page2.last().map(|j| j.id), 2)
        .await
        .unwrap();
    let paged = job_ids(&[page1, page2, page3].concat());
    assert_eq!(paged, ids);
}

#[tokio::test]
async fn list_filters_by_status() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let ids = schedule_each(&conn, &[Some("w1"); 5]).await;
    start(&conn, ids[1]).await;
    start(&conn, ids[3]).await;

    let running = job_ids(
        &jobs::list(&conn, &[JobStatus::Running], None, 10)
            .await
            .unwrap(),
    );
    assert_eq!(running, [ids[1], ids[3]]);
    let after = job_ids(
        &jobs::list(&conn, &[JobStatus::Scheduled], Some(ids[2]), 10)
            .await
            .unwrap(),
    );
    assert_eq!(after, [ids[4]]);
}

#[tokio::test]
async fn list_active_for_node_lists_only_that_nodes_unfinished_jobs() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    workers::register(&conn, "w2", json!({})).await.unwrap();
    let ids = schedule_each(&conn, &[Some("w1"), Some("w1"), Some("w1"), Some("w2")]).await;
    start(&conn, ids[1]).await;
    start(&conn, ids[2]).await;
    complete(&conn, ids[2]).await;

    let active = job_ids(&jobs::list_active_for_node(&conn, "w1").await.unwrap());
    assert_eq!(active, [ids[0], ids[1]]);
}

#[tokio::test]
async fn orphaned_jobs_of_a_dead_worker_are_found_and_recovered_within_the_state_machine() {
    let (db, conn, ()) = rows::setup(worker_w1).await;
    workers::register(&conn, "w2", json!({})).await.unwrap();
    let dead_running = scheduled(&conn, "a", Some("w1")).await;
    start(&conn, dead_running.id).await;
    let unassigned = scheduled(&conn, "b", None).await;
    let live = scheduled(&conn, "c", Some("w2")).await;
    let done = scheduled(&conn, "d", Some("w1")).await;
    start(&conn, done.id).await;
    complete(&conn, done.id).await;
    let dead_scheduled = scheduled(&conn, "e", Some("w1")).await;
    // w1 last beat a minute ago; w2 just now.
    exec(
        &conn,
        "UPDATE workers SET heartbeat_at = now() - interval '60 seconds' WHERE node_id = 'w1'",
        vec![],
    )
    .await;
    workers::heartbeat(&conn, "w2").await.unwrap();
    let window = Duration::from_secs(5);

    let orphans = jobs::list_orphaned(&conn, window).await.unwrap();
    let ids = job_ids(&orphans);
    assert_eq!(ids, [dead_running.id, unassigned.id, dead_scheduled.id]);
    assert!(!ids.contains(&live.id));

    // A RUNNING job never moves to another node as it is: it fails with worker_lost, and its
    // retry is a new attempt.
    let running = &orphans[0];
    let err = jobs::reassign(&conn, running, Some("w2"))
        .await
        .expect_err("a started job is not reassigned");
    assert!(matches!(err, Error::StateConflict { .. }), "{err:?}");
    let failed = jobs::fail_lost(&conn, running, window)
        .await
        .expect("fail_lost");
    assert_eq!(failed.status, "ERROR");
    assert_eq!(failed.detail, Some(jobs::worker_lost(Some("w1"))));
    assert_eq!(failed.attempt, running.attempt);

    // SCHEDULED jobs (unassigned, or on the dead node) move to a live one, with START and an event.
    let mut listener = Listener::connect(&db.config()).await.expect("listener");
    let moved = jobs::reassign(&conn, &orphans[2], Some("w2"))
        .await
        .expect("reassign");
    assert_eq!(moved.node_id.as_deref(), Some("w2"));
    assert_eq!(moved.status, "SCHEDULED");
    assert_eq!(moved.attempt, dead_scheduled.attempt);
    let got = next_notification(&mut listener, "delivered").await;
    assert_eq!(
        got,
        Notification::JobAction(JobAction {
            node_id: "w2".into(),
            job_id: dead_scheduled.id,
            action: Action::Start,
        })
    );
    let last = events(&conn, dead_scheduled.id).await.pop().expect("event");
    assert_eq!(
        (last.event_type.as_str(), last.node_id.as_deref()),
        ("SCHEDULED", Some("w2"))
    );
    jobs::reassign(&conn, &orphans[1], Some("w2"))
        .await
        .expect("assign the unassigned one");

    let orphans = jobs::list_orphaned(&conn, window).await.unwrap();
    assert!(orphans.is_empty(), "{orphans:?}");
}

#[tokio::test]
async fn fail_lost_of_a_job_whose_worker_is_alive_is_refused() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let job = scheduled(&conn, "a", Some("w1")).await;
    let running = start(&conn, job.id).await;
    workers::heartbeat(&conn, "w1").await.unwrap();
    let err = jobs::fail_lost(&conn, &running, Duration::from_secs(60))
        .await
        .expect_err("w1 is live");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(self::job(&conn, job.id).await, running, "unchanged");
}

#[tokio::test]
async fn reassign_of_a_job_that_moved_since_it_was_seen_is_fenced() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    workers::register(&conn, "w2", json!({})).await.unwrap();
    let seen = scheduled(&conn, "a", Some("w1")).await;
    let moved = jobs::reassign(&conn, &seen, Some("w2")).await.unwrap();
    let err = jobs::reassign(&conn, &seen, Some("w1"))
        .await
        .expect_err("guarded on the node it was seen on");
    assert!(matches!(err, Error::Fenced { .. }), "{err:?}");
    assert_eq!(self::job(&conn, seen.id).await, moved);
}

#[tokio::test]
async fn reassign_of_a_finished_job_is_a_state_conflict() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let job = scheduled(&conn, "a", Some("w1")).await;
    jobs::mark_fatal(&conn, &claim(&job), json!({}))
        .await
        .unwrap();
    let fatal = self::job(&conn, job.id).await;
    let err = jobs::reassign(&conn, &fatal, None)
        .await
        .expect_err("not scheduled");
    match err {
        Error::StateConflict { expected, actual } => {
            assert_eq!(expected, [JobStatus::Scheduled]);
            assert_eq!(actual, JobStatus::Fatal);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn jobs_due_for_retry_follow_a_capped_exponential_backoff() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    // attempt -> backoff with base 10 s, max 60 s: 1 -> 10 s, 2 -> 20 s, 3 -> 40 s, 10 -> 60 s.
    let mut by_attempt = Vec::new();
    for attempt in [1, 2, 3, 10] {
        let job = scheduled(&conn, &format!("a{attempt}"), Some("w1")).await;
        jobs::mark_error(&conn, &claim(&job), json!({"e": attempt}))
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
    let fatal = scheduled(&conn, "fatal", Some("w1")).await;
    jobs::mark_fatal(&conn, &claim(&fatal), json!({}))
        .await
        .unwrap();

    let due_after = |secs: i64| {
        let conn = conn.clone();
        async move {
            exec(
                &conn,
                "UPDATE jobs SET updated_at = now() - $1 * interval '1 second'",
                vec![secs.into()],
            )
            .await;
            let mut due = job_ids(
                &jobs::list_due_for_retry(
                    &conn,
                    Duration::from_secs(10),
                    Duration::from_secs(60),
                    100,
                )
                .await
                .unwrap(),
            );
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
    let (_db, conn, ()) = rows::setup(worker_w1).await;
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
        let job = scheduled(&conn, &format!("t{i}"), None).await;
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
    let left = job_ids(&jobs::list(&conn, &[], None, 10).await.unwrap());
    assert_eq!(left, [ids[2], ids[3]]);
}

#[tokio::test]
async fn list_events_returns_a_jobs_history_in_order() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let job = scheduled(&conn, "a", Some("w1")).await;
    let running = start(&conn, job.id).await;
    let failed = jobs::mark_error(&conn, &claim(&running), json!({"e": 1}))
        .await
        .unwrap();
    jobs::reschedule(&conn, &failed, None).await.unwrap();
    let types = tests::rows::event_types(&conn, job.id).await;
    assert_eq!(types, ["SCHEDULED", "RUNNING", "ERROR", "SCHEDULED"]);
    let job = self::job(&conn, job.id).await;
    assert_eq!(job.attempt, 2);
    assert_eq!(job.node_id, None, "rescheduled to no node");
}

#[tokio::test]
async fn schedule_waiting_on_an_uncommitted_schedule_of_the_same_key_returns_that_job() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
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
    blocked_on_a_lock(&conn).await;
    assert!(!waiting.is_finished(), "blocked by the uncommitted insert");
    tx.commit().await.unwrap();

    let (found, outcome) = waiting.await.unwrap().expect("schedule");
    assert_eq!(outcome, Scheduled::Existing);
    assert_eq!(found.id, created.id);
    assert_eq!(job_rows::Entity::find().count(&conn).await.unwrap(), 1);
}

#[tokio::test]
async fn a_transition_waiting_on_a_concurrent_one_reports_the_status_that_won() {
    let (_db, conn, ()) = rows::setup(worker_w1).await;
    let job = scheduled(&conn, "blocks", Some("w1")).await;
    let tx = conn.begin().await.unwrap();
    jobs::mark_running(&tx, &claim(&job)).await.unwrap();

    // The waiting statement's snapshot shows SCHEDULED, from which a reassignment is legal; when it
    // gets the row, the row is RUNNING and the guard fails. The error must report RUNNING, not the
    // snapshot's SCHEDULED. (A second `mark_running` through the same claim would succeed: it is
    // that claim's retry.)
    let waiting = {
        let conn = conn.clone();
        let seen = job.clone();
        tokio::spawn(async move { jobs::reassign(&conn, &seen, Some("w1")).await })
    };
    blocked_on_a_lock(&conn).await;
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

/// Waits until a backend of this test's database is waiting for a lock (the spawned statement has
/// reached the row the open transaction holds).
async fn blocked_on_a_lock(conn: &DatabaseConnection) {
    let within = Duration::from_secs(30);
    tests::sql::lock_waiter(
        conn,
        "a statement waits for a lock: not within 30 s",
        within,
    )
    .await;
}
