//! Retention: the controller deletes the events of jobs that finished long ago, old finished jobs
//! and workers gone for long, in small batches, and never what is still in use. Each rule and each
//! exception on a fresh database whose rows are backdated with SQL; a pass is run in the test's
//! process (`retention::pass`), and once by an `ampd controller` with its defaults.

use std::time::Duration;

use ampd::config::{ControllerConfig, WorkerConfig};
use ampd::metadata::workers;
use ampd::service::controller::retention::{self, Deleted, EVENTS_BATCH, Retention};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tests::TestDb;
use tests::services::{Service, Workspace, eventually, free_addr};
use tests::sql::count;
use tests::wire::StatementCounter;
use tokio_util::sync::CancellationToken;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Retention of `events`, `jobs` and `workers` days (0: off), the liveness window 5 s.
fn retention(events: u64, jobs: u64, workers: u64) -> Retention {
    let controller = ControllerConfig {
        events_retention_days: events,
        jobs_retention_days: jobs,
        workers_retention_days: workers,
        ..ControllerConfig::default()
    };
    Retention::new(&controller, &WorkerConfig::default())
}

async fn pass(db: &DatabaseConnection, retention: &Retention) -> Deleted {
    retention::pass(db, retention, &CancellationToken::new())
        .await
        .expect("retention pass")
}

/// A job `key` in `status` on no node, last updated `days` ago, with `events` events as old.
async fn job(db: &DatabaseConnection, key: &str, status: &str, days: u32, events: u32) -> i64 {
    exec(
        db,
        &format!(
            "WITH j AS (INSERT INTO jobs (idempotency_key, kind, status, descriptor, attempt, \
                 created_at, updated_at) \
             VALUES ('{key}', 'materialize-static', '{status}', \
                 jsonb_build_object('namespace', 'demo', 'name', '{key}', 'manifest_hash', 'h'), 1, \
                 now() - interval '{days} days', now() - interval '{days} days') RETURNING id) \
             INSERT INTO job_events (job_id, event_type, created_at) \
             SELECT j.id, '{status}', now() - interval '{days} days' \
             FROM j, generate_series(1, {events})"
        ),
    )
    .await;
    tests::sql::value(
        db,
        &format!("SELECT id FROM jobs WHERE idempotency_key = '{key}'"),
    )
    .await
}

async fn events_of(db: &DatabaseConnection, job_id: i64) -> i64 {
    count(
        db,
        &format!("SELECT count(*) FROM job_events WHERE job_id = {job_id}"),
    )
    .await
}

async fn job_exists(db: &DatabaseConnection, job_id: i64) -> bool {
    count(
        db,
        &format!("SELECT count(*) FROM jobs WHERE id = {job_id}"),
    )
    .await
        == 1
}

#[tokio::test]
async fn events_of_jobs_finished_before_the_retention_go_in_batches_and_no_others() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    // A batch is the events of EVENTS_BATCH jobs, each job's whole history in one statement.
    let old = job(&conn, "old", "COMPLETED", 40, 2503).await;
    let failed = job(&conn, "failed", "FATAL", 31, 2).await;
    let mut others = Vec::new();
    for i in 0..EVENTS_BATCH {
        others.push(job(&conn, &format!("other{i}"), "STOPPED", 35, 1).await);
    }
    let recent = job(&conn, "recent", "COMPLETED", 10, 2).await;
    // A job finished 10 days ago whose first events are 40 days old: its history stays whole.
    exec(
        &conn,
        &format!(
            "INSERT INTO job_events (job_id, event_type, created_at) \
             VALUES ({recent}, 'SCHEDULED', now() - interval '40 days')"
        ),
    )
    .await;
    let running = job(&conn, "running", "RUNNING", 40, 3).await;

    let counter = StatementCounter::start(db.url()).await;
    let counted = tests::connect(counter.url(), 1).await;
    counter.reset();
    let deleted = pass(&counted, &retention(30, 0, 0)).await;
    assert_eq!(
        deleted,
        Deleted {
            events: 2503 + 2 + EVENTS_BATCH,
            jobs: 0,
            workers: 0
        }
    );
    // EVENTS_BATCH + 2 jobs: two statements, a full batch and a short one, however many events
    // the oldest job has.
    assert_eq!(EVENTS_BATCH, 20);
    assert_eq!(counter.statements(), 2, "{:?}", counter.sent());
    for id in others.iter().chain([&old, &failed]) {
        assert_eq!(events_of(&conn, *id).await, 0, "job {id}'s events go");
    }
    assert_eq!(events_of(&conn, recent).await, 3);
    assert_eq!(events_of(&conn, running).await, 3);
    for id in [old, failed, recent, running] {
        assert!(job_exists(&conn, id).await, "job {id} stays");
    }
    assert_eq!(pass(&conn, &retention(30, 0, 0)).await, Deleted::default());
}

/// A manifest `hash` (64 hex of `c`) linked to dataset `demo/<name>` when `linked`.
async fn manifest(db: &DatabaseConnection, c: char, name: &str, linked: bool) -> String {
    let hash: String = std::iter::repeat_n(c, 64).collect();
    exec(
        db,
        &format!(
            "INSERT INTO manifest_files (hash, kind, path) VALUES ('{hash}', 'static', 'm/{hash}')"
        ),
    )
    .await;
    if linked {
        exec(
            db,
            &format!(
                "INSERT INTO dataset_manifests (namespace, name, hash) VALUES ('demo', '{name}', '{hash}')"
            ),
        )
        .await;
    }
    hash
}

/// Makes job `id` the materialization of `demo/<name>@hash`.
async fn runs(db: &DatabaseConnection, id: i64, name: &str, hash: &str) {
    exec(
        db,
        &format!(
            "UPDATE jobs SET descriptor = jsonb_build_object('namespace', 'demo', 'name', '{name}', \
             'manifest_hash', '{hash}') WHERE id = {id}"
        ),
    )
    .await;
}

/// A table of manifest `hash` with a revision written by job `writer`, active when `active`;
/// returns the revision's id.
async fn revision(db: &DatabaseConnection, hash: &str, writer: i64, active: bool) -> i64 {
    exec(
        db,
        &format!(
            "INSERT INTO physical_tables (dataset_namespace, dataset_name, manifest_hash, table_name) \
             VALUES ('demo', 'tables', '{hash}', 't{writer}');
             INSERT INTO physical_table_revisions (physical_table_id, path, writer) \
             SELECT id, 'demo/tables/t{writer}/r', {writer} FROM physical_tables \
             WHERE table_name = 't{writer}';"
        ),
    )
    .await;
    let id: i64 = tests::sql::value(
        db,
        &format!("SELECT id FROM physical_table_revisions WHERE writer = {writer}"),
    )
    .await;
    if active {
        exec(
            db,
            &format!(
                "UPDATE physical_tables SET active_revision_id = {id} WHERE table_name = 't{writer}'"
            ),
        )
        .await;
    }
    id
}

#[tokio::test]
async fn finished_jobs_past_the_retention_go_but_not_those_in_use() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let unlinked = manifest(&conn, 'a', "gone", false).await;
    let linked = manifest(&conn, 'b', "kept", true).await;

    let completed = job(&conn, "completed", "COMPLETED", 100, 2).await;
    runs(&conn, completed, "gone", &unlinked).await;
    let stopped = job(&conn, "stopped", "STOPPED", 91, 2).await;
    let error = job(&conn, "error", "ERROR", 91, 0).await;
    let fatal = job(&conn, "fatal", "FATAL", 100, 1).await;
    let inactive = revision(&conn, &unlinked, fatal, false).await;
    // Exceptions: too recent; not finished; the COMPLETED job of a version still registered; the
    // writer of a revision that is active.
    let recent = job(&conn, "recent", "COMPLETED", 80, 1).await;
    let running = job(&conn, "running", "RUNNING", 100, 1).await;
    let deployed = job(&conn, "deployed", "COMPLETED", 100, 1).await;
    runs(&conn, deployed, "kept", &linked).await;
    let writer = job(&conn, "writer", "ERROR", 100, 1).await;
    revision(&conn, &unlinked, writer, true).await;

    let deleted = pass(&conn, &retention(0, 90, 0)).await;
    assert_eq!(deleted.jobs, 4, "{deleted:?}");
    assert_eq!(deleted.events, 0, "events retention is off");
    for id in [completed, stopped, error, fatal] {
        assert!(!job_exists(&conn, id).await, "job {id} is deleted");
        assert_eq!(events_of(&conn, id).await, 0, "with its events");
    }
    for id in [recent, running, deployed, writer] {
        assert!(job_exists(&conn, id).await, "job {id} stays");
        assert_eq!(events_of(&conn, id).await, 1, "with its events");
    }
    // The deleted job's revision stays, without its writer.
    let writer_of: Option<i64> = tests::sql::value(
        &conn,
        &format!("SELECT writer FROM physical_table_revisions WHERE id = {inactive}"),
    )
    .await;
    assert_eq!(writer_of, None);

    // Once the version is deleted (its manifest unlinked), its COMPLETED job goes too.
    exec(&conn, "DELETE FROM dataset_manifests").await;
    assert_eq!(pass(&conn, &retention(0, 90, 0)).await.jobs, 1);
    assert!(!job_exists(&conn, deployed).await);
    assert!(job_exists(&conn, writer).await);
}

/// Worker `node` last heartbeating `beat` ago and registered `registered` ago (SQL intervals).
async fn worker(db: &DatabaseConnection, node: &str, beat: &str, registered: &str) {
    exec(
        db,
        &format!(
            "INSERT INTO workers (node_id, heartbeat_at, registered_at, created_at) \
             VALUES ('{node}', {beat}, now() - interval '{registered}', now() - interval '{registered}') \
             ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, \
                 registered_at = EXCLUDED.registered_at"
        ),
    )
    .await;
}

async fn worker_exists(db: &DatabaseConnection, node: &str) -> bool {
    count(
        db,
        &format!("SELECT count(*) FROM workers WHERE node_id = '{node}'"),
    )
    .await
        == 1
}

#[tokio::test]
async fn workers_gone_past_the_retention_go_but_not_live_busy_recent_or_claimed_ones() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let ago = |d: u32| format!("now() - interval '{d} days'");
    worker(&conn, "gone", &ago(8), "8 days").await;
    worker(&conn, "had_jobs", &ago(9), "20 days").await;
    let finished = job(&conn, "finished", "COMPLETED", 1, 0).await;
    exec(
        &conn,
        &format!(
            "UPDATE jobs SET node_id = 'had_jobs' WHERE id = {finished};
             INSERT INTO job_events (job_id, node_id, event_type) VALUES ({finished}, 'had_jobs', 'COMPLETED')"
        ),
    )
    .await;
    // Exceptions: live (registered long ago); holding an active job; seen 3 days ago; signed off
    // (heartbeat at the epoch) a day after starting; its node id claimed by a process.
    worker(&conn, "live", "now()", "30 days").await;
    worker(&conn, "busy", &ago(8), "8 days").await;
    let running = job(&conn, "running", "RUNNING", 8, 0).await;
    exec(
        &conn,
        &format!("UPDATE jobs SET node_id = 'busy' WHERE id = {running}"),
    )
    .await;
    worker(&conn, "recent", &ago(3), "3 days").await;
    worker(&conn, "signed_off", "'epoch'::timestamptz", "1 day").await;
    let claimed = tests::unique_name("claimed");
    let claim = workers::claim(&db.config(), &claimed).await.expect("claim");
    worker(&conn, &claimed, &ago(8), "8 days").await;

    let deleted = pass(&conn, &retention(0, 0, 7)).await;
    assert_eq!(
        deleted,
        Deleted {
            events: 0,
            jobs: 0,
            workers: 2
        }
    );
    assert!(!worker_exists(&conn, "gone").await);
    assert!(!worker_exists(&conn, "had_jobs").await);
    for node in ["live", "busy", "recent", "signed_off", claimed.as_str()] {
        assert!(worker_exists(&conn, node).await, "{node} stays");
    }
    // The finished job stays, without the link; its history still names the node.
    let node: Option<String> = tests::sql::value(
        &conn,
        &format!("SELECT node_id FROM jobs WHERE id = {finished}"),
    )
    .await;
    assert_eq!(node, None);
    let event_node: String = tests::sql::value(
        &conn,
        &format!("SELECT node_id FROM job_events WHERE job_id = {finished}"),
    )
    .await;
    assert_eq!(event_node, "had_jobs");

    // Released, the claimed worker goes at the next pass.
    claim.release().await.expect("release");
    assert_eq!(pass(&conn, &retention(0, 0, 7)).await.workers, 1);
    assert!(!worker_exists(&conn, &claimed).await);
}

#[tokio::test]
async fn retention_is_on_by_default_and_0_turns_each_rule_off() {
    let defaults = Retention::new(&ControllerConfig::default(), &WorkerConfig::default());
    assert_eq!(defaults.events, Some(DAY * 30));
    assert_eq!(defaults.jobs, Some(DAY * 90));
    assert_eq!(defaults.workers, Some(DAY * 7));
    assert!(!retention(0, 0, 0).is_on());

    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let old = job(&conn, "old", "COMPLETED", 400, 2).await;
    worker(&conn, "gone", "now() - interval '400 days'", "400 days").await;
    assert_eq!(pass(&conn, &retention(0, 0, 0)).await, Deleted::default());
    assert_eq!(events_of(&conn, old).await, 2);
    assert!(job_exists(&conn, old).await);
    assert!(worker_exists(&conn, "gone").await);
}

#[tokio::test]
async fn a_controller_with_the_defaults_deletes_old_rows_and_logs_the_counts() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let old = job(&conn, "old", "COMPLETED", 100, 3).await;
    let aging = job(&conn, "aging", "STOPPED", 40, 2).await;
    worker(&conn, "gone", "now() - interval '8 days'", "8 days").await;
    let ws = Workspace::new();
    let addr = free_addr();
    let config = ws.config(
        "controller.toml",
        db.url(),
        &format!("[controller]\nadmin_addr = \"{addr}\"\n"),
    );
    let mut controller = Service::start("controller", &config, &["controller"], &[]);
    controller.wait_healthy(addr).await;
    eventually("the old rows are deleted", || async {
        !job_exists(&conn, old).await
            && events_of(&conn, aging).await == 0
            && !worker_exists(&conn, "gone").await
    })
    .await;
    assert!(job_exists(&conn, aging).await, "a job 40 days old stays");
    controller
        .wait_for_log(Duration::from_secs(10), |log| {
            log.contains("retention pass deleted old rows")
        })
        .await;
    let log = controller.log();
    let line = log
        .lines()
        .find(|l| l.contains("retention pass deleted old rows"))
        .expect("the line");
    // Events first (the 2 of the job 40 days old and the 3 of the one 100 days old), then the job
    // 100 days old, then the worker.
    for count in ["events=5", "jobs=1", "workers=1"] {
        assert!(line.contains(count), "{count} in {line}");
    }
    controller.stop().await;
}
