//! A worker under adversarial timing: two processes with one node id, a start whose answer was
//! lost, a stalled node-claim connection, a stalled listener, a stalled pool, and a job paused
//! between creating its revision row and its directory while the revision is collected. Pauses inside a worker process are failpoints
//! (`ampd::failpoint`), never sleeps.

use std::time::{Duration, Instant};

use ampd::manifest;
use ampd::metadata::jobs::{self, JobClaim};
use ampd::metadata::notifications::LISTENER_APPLICATION_NAME;
use ampd::metadata::{Error, datasets, revisions, workers};
use ampd::service::controller::{self, Policy};
use ampd::service::gc;
use entity::JobStatus;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};
use tests::TestDb;
use tests::proxy::{Fault, FaultProxy};
use tests::rows::{self, job};
use tests::services::{Service, Workspace, eventually};

/// The failpoint between a job's revision row and its directory.
const BEFORE_REVISION_DIR: &str = "worker::before_revision_dir";

/// Claims `node_id`, polling while a session that is going away still holds it.
async fn claim_once_free(
    cfg: &ampd::config::MetadataDbConfig,
    node_id: &str,
) -> workers::NodeClaim {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match workers::claim(cfg, node_id).await {
            Ok(claim) => return claim,
            Err(Error::Conflict(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("{node_id} is still claimed 20 s after its holder went: {e}"),
        }
    }
}

/// Ends the node claim sessions of this test's database (the old process's claim dies).
async fn kill_claim_sessions(conn: &DatabaseConnection) {
    conn.execute_unprepared(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = '{}'",
        workers::CLAIM_APPLICATION_NAME
    ))
    .await
    .expect("terminate the claim's session");
}

#[tokio::test]
async fn a_second_process_with_the_node_id_fences_the_first_in_both_orders() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let node = tests::unique_name("w");
    for first_b in [true, false] {
        // Process A holds the node id and registers; its claim's session dies; process B claims
        // the node id before A notices.
        let a = claim_once_free(&db.config(), &node).await;
        workers::register(&conn, &node, json!({})).await.unwrap();
        let scheduled = rows::scheduled(&conn, &format!("t{first_b}"), Some(&node)).await;
        kill_claim_sessions(&conn).await;
        let b = claim_once_free(&db.config(), &node).await;
        assert!(b.epoch() > a.epoch(), "a new claim raises the epoch");
        let claim_a = JobClaim::by(&scheduled, a.epoch()).unwrap();
        let claim_b = JobClaim::by(&scheduled, b.epoch()).unwrap();
        assert_ne!(claim_a, claim_b, "the epoch is part of the fencing token");

        if first_b {
            jobs::mark_running(&conn, &claim_b)
                .await
                .expect("B starts it");
        }
        let err = jobs::mark_running(&conn, &claim_a)
            .await
            .expect_err("A's start is fenced");
        assert!(matches!(err, Error::Fenced { .. }), "{err:?}");
        if !first_b {
            jobs::mark_running(&conn, &claim_b)
                .await
                .expect("B starts it");
        }
        // A's runner, refused, looks at the job again: it is not A's any more, so A drops it
        // (and its other writes are fenced too) instead of failing B's attempt.
        let now = job(&conn, scheduled.id).await;
        assert!(!claim_a.holds(&now), "{now:?}");
        assert!(claim_b.holds(&now), "{now:?}");
        let err = jobs::mark_error(&conn, &claim_a, json!({"reason": "refused"}))
            .await
            .expect_err("A cannot fail B's attempt");
        assert!(matches!(err, Error::Fenced { .. }), "{err:?}");
        let table = rows::manifest_with_tables(&conn, format!("{first_b}").as_bytes(), &["x"])
            .await
            .1
            .remove(0);
        let err = revisions::create_revision(&conn, table.id, Some(&claim_a), json!({}))
            .await
            .expect_err("A cannot write B's attempt's output");
        assert!(matches!(err, Error::Fenced { .. }), "{err:?}");

        let now = job(&conn, scheduled.id).await;
        assert_eq!(now.job_status().unwrap(), JobStatus::Running);
        assert_eq!(now.claim_epoch, Some(b.epoch()));
        assert_eq!(
            rows::event_types(&conn, scheduled.id).await,
            ["SCHEDULED", "RUNNING"]
        );
        drop(a);
        b.release().await.unwrap();
    }
}

#[tokio::test]
async fn a_retried_start_whose_answer_was_lost_succeeds_for_the_same_claim_only() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    workers::register(&conn, "w1", json!({})).await.unwrap();
    let scheduled = rows::scheduled(&conn, "blocks", Some("w1")).await;
    let claim = JobClaim::of(&scheduled).unwrap();
    let first = jobs::mark_running(&conn, &claim).await.expect("start");
    // The first commit succeeded; its answer was lost; the worker tries again.
    let again = jobs::mark_running(&conn, &claim)
        .await
        .expect("the same claim's retry succeeds");
    assert_eq!(again, first, "the job is left as the first start made it");
    assert_eq!(
        rows::event_types(&conn, scheduled.id).await,
        ["SCHEDULED", "RUNNING"],
        "no second event"
    );
    assert_eq!(again.attempt, scheduled.attempt, "no attempt wasted");
}

#[tokio::test]
async fn a_retried_start_through_another_claim_epoch_is_refused() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let node = tests::unique_name("w");
    let a = claim_once_free(&db.config(), &node).await;
    workers::register(&conn, &node, json!({})).await.unwrap();
    let scheduled = rows::scheduled(&conn, "blocks", Some(&node)).await;
    let claim_a = JobClaim::by(&scheduled, a.epoch()).unwrap();
    jobs::mark_running(&conn, &claim_a)
        .await
        .expect("A starts it");
    kill_claim_sessions(&conn).await;
    let b = claim_once_free(&db.config(), &node).await;
    // A's retry (its answer was lost) and B's start: neither passes any more.
    let err = jobs::mark_running(&conn, &claim_a)
        .await
        .expect_err("A no longer holds the node id");
    assert!(matches!(err, Error::Fenced { .. }), "{err:?}");
    let claim_b = JobClaim::by(&scheduled, b.epoch()).unwrap();
    let err = jobs::mark_running(&conn, &claim_b)
        .await
        .expect_err("B did not start it");
    assert!(matches!(err, Error::StateConflict { .. }), "{err:?}");
    assert_eq!(
        rows::event_types(&conn, scheduled.id).await,
        ["SCHEDULED", "RUNNING"]
    );
    b.release().await.unwrap();
}

/// A static manifest of one table `prices` with two rows.
fn manifest() -> Value {
    json!({"kind": "static", "tables": {"prices": {
        "columns": [{"name": "n", "type": "int64"}], "rows": [[1], [2]]}}})
}

/// Registers [`manifest`] as the controller does, in `ws`'s data directory, and schedules its
/// materialization on `node`; returns the job's id.
async fn deploy(conn: &DatabaseConnection, ws: &Workspace, name: &str, node: &str) -> i64 {
    let bytes = serde_json::to_vec(&manifest()).unwrap();
    let hash = datasets::manifest_hash(&bytes);
    let path = manifest::manifest_path(&hash);
    let file = ws.data_dir().join(&path);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, &bytes).unwrap();
    datasets::register_manifest(conn, manifest::STATIC, &bytes, &path)
        .await
        .unwrap();
    datasets::link(conn, "eth", name, &hash).await.unwrap();
    let descriptor = json!({"namespace": "eth", "name": name, "manifest_hash": hash});
    let (job, _) = jobs::schedule(conn, manifest::MATERIALIZE_STATIC, descriptor, Some(node))
        .await
        .unwrap();
    job.id
}

/// Waits until job `id` is `status`.
async fn wait_status(conn: &DatabaseConnection, worker: &Service, id: i64, status: JobStatus) {
    eventually(&format!("job {id} {status}:\n{}", worker.log()), || async {
        job(conn, id).await.job_status().unwrap() == status
    })
    .await;
}

/// Starts `ampd worker --node-id <node>` on `url` with failpoint [`BEFORE_REVISION_DIR`] paused.
async fn paused_worker(ws: &Workspace, url: &str, node: &str, worker_toml: &str) -> Service {
    let config = ws.config(
        &format!("{node}.toml"),
        url,
        &format!("[worker]\n{worker_toml}\n"),
    );
    let mut worker = Service::start_with_failpoints(
        node,
        &config,
        &["worker", "--node-id", node],
        &[],
        &format!("{BEFORE_REVISION_DIR}=pause"),
    )
    .await;
    worker
        .wait_for_log(Duration::from_secs(60), |log| {
            log.contains("worker started")
        })
        .await;
    worker
}

/// Whether `log` shows failpoint `name` reached.
fn reached(log: &str, name: &str) -> bool {
    log.lines()
        .any(|l| l.contains("failpoint reached") && l.contains(name))
}

#[tokio::test]
async fn a_stalled_claim_connection_neither_stops_the_heartbeat_nor_fails_the_running_job() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let proxy = FaultProxy::start(db.url()).await;
    let ws = Workspace::new();
    let node = tests::unique_name("w");
    let mut worker = paused_worker(
        &ws,
        proxy.url(),
        &node,
        "heartbeat_interval_ms = 100\nreconcile_interval_ms = 500\ngc_interval_ms = 600000",
    )
    .await;
    let id = deploy(&conn, &ws, "stalled", &node).await;
    // The job is RUNNING, held at the failpoint, while the claim connection stalls.
    worker
        .wait_for_log(Duration::from_secs(60), |log| {
            reached(log, BEFORE_REVISION_DIR)
        })
        .await;
    proxy.set_for(workers::CLAIM_APPLICATION_NAME, Fault::Stall);
    let window = Duration::from_secs(2);
    let policy = Policy {
        liveness_window: window,
        retry_base_delay: Duration::from_secs(3600),
        retry_max_delay: Duration::from_secs(3600),
        max_attempts: 5,
    };
    let started = Instant::now();
    let mut oldest = 0f64;
    // Until the claim check has given up on the stalled connection (after its 10 s timeout): the
    // heartbeat stays within the liveness window, and the controller's recovery (run here, with
    // that window) leaves the job alone.
    while !worker.log().contains("the node claim was lost") {
        let age: f64 = tests::sql::value(
            &conn,
            &format!(
                "SELECT extract(epoch FROM now() - heartbeat_at)::float8 FROM workers \
                 WHERE node_id = '{node}'"
            ),
        )
        .await;
        oldest = oldest.max(age);
        assert!(
            age < window.as_secs_f64(),
            "heartbeat {age:.1} s old after {:?} of stalled claim connection:\n{}",
            started.elapsed(),
            worker.log()
        );
        controller::reconcile(&conn, &policy).await.unwrap();
        let now = job(&conn, id).await;
        assert_eq!(
            now.job_status().unwrap(),
            JobStatus::Running,
            "{:?}\n{}",
            now.detail,
            worker.log()
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the claim check never gave up:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "claim connection stalled {:?}; oldest heartbeat seen {oldest:.2} s",
        started.elapsed()
    );
    // The partition heals: the worker claims its node id again (the same epoch: nobody else
    // claimed it) and the job completes.
    proxy.clear_for(workers::CLAIM_APPLICATION_NAME);
    worker.failpoint(BEFORE_REVISION_DIR, "off").await;
    wait_status(&conn, &worker, id, JobStatus::Completed).await;
    worker
        .wait_for_log(Duration::from_secs(60), |log| {
            log.contains("node id claimed again")
        })
        .await;
    assert!(worker.is_running(), "{}", worker.log());
    assert_eq!(
        rows::event_types(&conn, id).await,
        ["SCHEDULED", "RUNNING", "COMPLETED"]
    );
    worker.stop().await;
}

/// The directories under `data_dir` at revision depth (`<ns>/<name>/<table>/<revision>`).
fn revision_dirs(data_dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut level = vec![data_dir.to_path_buf()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in level {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.path().is_dir() {
                    next.push(entry.path());
                }
            }
        }
        level = next;
    }
    for dir in level {
        found.push(dir.strip_prefix(data_dir).unwrap().display().to_string());
    }
    found
}

#[tokio::test]
async fn a_revision_collected_while_its_writer_paused_gets_no_directory() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let ws = Workspace::new();
    let node = tests::unique_name("w");
    // No reconcile during the test (the job's failure is not noticed before the writer resumes),
    // and no collection by the worker (the test collects).
    let mut worker = paused_worker(
        &ws,
        db.url(),
        &node,
        "reconcile_interval_ms = 600000\ngc_interval_ms = 600000",
    )
    .await;
    let id = deploy(&conn, &ws, "orphan", &node).await;
    worker
        .wait_for_log(Duration::from_secs(60), |log| {
            reached(log, BEFORE_REVISION_DIR)
        })
        .await;
    // The revision row exists; its directory does not yet.
    let running = job(&conn, id).await;
    let table = revisions::list_tables(&conn, "eth", "orphan")
        .await
        .unwrap()
        .remove(0);
    let revision = revisions::list(&conn, table.id).await.unwrap().remove(0);
    assert!(!ws.data_dir().join(&revision.path).exists());
    // Meanwhile the job is failed as lost (as the controller does once the liveness window has
    // passed; here with no window) and the collector removes the abandoned revision.
    jobs::fail_lost(&conn, &running, Duration::ZERO)
        .await
        .expect("failed as lost");
    let collected = gc::collect(&conn, &ws.data_dir()).await.expect("collect");
    assert_eq!((collected.abandoned, collected.revisions), (1, 1));
    assert!(revisions::get(&conn, revision.id).await.unwrap().is_none());
    // The writer resumes: it must not leave a directory no row names.
    worker.failpoint(BEFORE_REVISION_DIR, "off").await;
    worker
        .wait_for_log(Duration::from_secs(60), |log| {
            log.contains("failpoint passed")
                && ["job already ended", "job has moved on", "job left as it is"]
                    .iter()
                    .any(|end| log.contains(end))
        })
        .await;
    assert_eq!(
        revision_dirs(&ws.data_dir()),
        Vec::<String>::new(),
        "no directory without a row:\n{}",
        worker.log()
    );
    worker.stop().await;
}

/// Waits until the worker's connection named `application` is open on the test's database.
async fn wait_for_session(conn: &DatabaseConnection, worker: &Service, application: &str) {
    eventually(
        &format!("{application}'s session:\n{}", worker.log()),
        || async {
            tests::sql::count(
                conn,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = '{application}'"
                ),
            )
            .await
                > 0
        },
    )
    .await;
}

#[tokio::test]
async fn a_worker_whose_listener_stalls_starts_new_jobs_within_its_reconcile_interval() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let proxy = FaultProxy::start(db.url()).await;
    let ws = Workspace::new();
    let node = tests::unique_name("w");
    let interval = Duration::from_millis(1000);
    let config = ws.config(
        &format!("{node}.toml"),
        proxy.url(),
        &format!(
            "[worker]\nreconcile_interval_ms = {}\nheartbeat_interval_ms = 200\n\
             gc_interval_ms = 600000\n",
            interval.as_millis()
        ),
    );
    let mut worker = Service::start(&node, &config, &["worker", "--node-id", &node], &[]);
    worker
        .wait_for_log(Duration::from_secs(60), |log| {
            log.contains("worker started")
        })
        .await;
    // The listener's connection is open, then frozen: the START notifications of the deploys
    // below never reach the worker.
    wait_for_session(&conn, &worker, LISTENER_APPLICATION_NAME).await;
    proxy.set_for(LISTENER_APPLICATION_NAME, Fault::Stall);
    // Bounds a start by the reconcile interval, with room for a loaded machine's scheduling.
    let bound = interval + Duration::from_millis(1000);
    let mut slowest = Duration::ZERO;
    for n in 0..3 {
        let deployed = Instant::now();
        let id = deploy(&conn, &ws, &format!("listener{n}"), &node).await;
        eventually(&format!("job {id} starts:\n{}", worker.log()), || async {
            job(&conn, id).await.job_status().unwrap() != JobStatus::Scheduled
        })
        .await;
        let took = deployed.elapsed();
        slowest = slowest.max(took);
        assert!(
            took <= bound,
            "job {id} started {took:?} after its deploy, past the reconcile interval \
             ({interval:?}):\n{}",
            worker.log()
        );
        wait_status(&conn, &worker, id, JobStatus::Completed).await;
        assert_eq!(
            rows::event_types(&conn, id).await,
            ["SCHEDULED", "RUNNING", "COMPLETED"]
        );
        // The next deploy falls elsewhere in the reconcile cycle.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "with the listener stalled, the slowest of 3 jobs started {slowest:?} after its deploy"
    );
    assert!(worker.is_running(), "{}", worker.log());
    proxy.clear_for(LISTENER_APPLICATION_NAME);
    worker.stop().await;
}

/// The hex sha256 of the file at `path`.
fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest as _;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex::encode(sha2::Sha256::digest(&bytes))
}

#[tokio::test]
async fn a_pool_stalled_past_the_liveness_window_loses_no_job_and_runs_none_twice() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let proxy = FaultProxy::start(db.url()).await;
    let ws = Workspace::new();
    let node = tests::unique_name("w");
    let mut worker = paused_worker(
        &ws,
        proxy.url(),
        &node,
        "heartbeat_interval_ms = 100\nreconcile_interval_ms = 300\ngc_interval_ms = 200\n\
         gc_grace_secs = 0\nrows_per_file = 1",
    )
    .await;
    let window = Duration::from_secs(1);
    let policy = Policy {
        liveness_window: window,
        retry_base_delay: Duration::from_millis(100),
        retry_max_delay: Duration::from_millis(100),
        max_attempts: 5,
    };
    let id = deploy(&conn, &ws, "pool", &node).await;
    // Attempt 1 is RUNNING and has created its revision's row, held at the failpoint.
    worker
        .wait_for_log(Duration::from_secs(60), |log| {
            reached(log, BEFORE_REVISION_DIR)
        })
        .await;
    let table = revisions::list_tables(&conn, "eth", "pool")
        .await
        .unwrap()
        .remove(0);
    let first = revisions::list(&conn, table.id).await.unwrap().remove(0);

    // The pool stalls (the claim and the listener do not); the job goes on into it. The
    // heartbeat, through the pool, stops: the controller fails the job as `worker_lost`.
    proxy.set_for_pool(Fault::Stall);
    worker.failpoint(BEFORE_REVISION_DIR, "off").await;
    let stalled = Instant::now();
    eventually(
        &format!("job {id} failed as lost:\n{}", worker.log()),
        || async {
            controller::reconcile(&conn, &policy).await.unwrap();
            job(&conn, id).await.job_status().unwrap() == JobStatus::Error
        },
    )
    .await;
    // A while longer, then the stall ends: the attempt's writes held in it now reach the database.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.clear_pool();
    let stall = stalled.elapsed();
    // The worker is live again, the controller retries the job there, attempt 2 completes.
    eventually(
        &format!("job {id} completes:\n{}", worker.log()),
        || async {
            controller::reconcile(&conn, &policy).await.unwrap();
            job(&conn, id).await.job_status().unwrap() == JobStatus::Completed
        },
    )
    .await;

    let done = job(&conn, id).await;
    assert_eq!(done.attempt, 2, "{done:?}");
    assert_eq!(
        rows::event_types(&conn, id).await,
        [
            "SCHEDULED",
            "RUNNING",
            "ERROR",
            "SCHEDULED",
            "RUNNING",
            "COMPLETED"
        ],
        "one attempt lost, one run to completion, nothing twice"
    );
    // The active revision is attempt 2's, with every file it registered on disk as registered;
    // attempt 1 wrote nothing into it.
    let active = rows::active_revision(&conn, table.id)
        .await
        .expect("an active revision");
    assert_ne!(active.id, first.id);
    assert_eq!(active.metadata["attempt"], 2, "{:?}", active.metadata);
    assert_eq!(active.metadata["job_id"], id, "{:?}", active.metadata);
    let files = ampd::metadata::files::list(&conn, active.id).await.unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.file_name.as_str()).collect();
    assert_eq!(names, ["part-00000.jsonl", "part-00001.jsonl"]);
    let dir = ws.data_dir().join(&active.path);
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(
        on_disk, names,
        "the revision's directory holds its files only"
    );
    for file in &files {
        let path = dir.join(&file.file_name);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            file.object_size as u64
        );
        assert_eq!(
            file.metadata["sha256"].as_str(),
            Some(sha256_of(&path).as_str())
        );
    }
    // Attempt 1's revision is abandoned and collected, row and directory.
    eventually(
        &format!("attempt 1's revision collected:\n{}", worker.log()),
        || async {
            revisions::get(&conn, first.id).await.unwrap().is_none()
                && revision_dirs(&ws.data_dir()) == [active.path.clone()]
        },
    )
    .await;
    // The worker recovered: it beats again and runs a new job once.
    assert!(worker.is_running(), "{}", worker.log());
    let age: f64 = tests::sql::value(
        &conn,
        &format!(
            "SELECT extract(epoch FROM now() - heartbeat_at)::float8 FROM workers \
             WHERE node_id = '{node}'"
        ),
    )
    .await;
    assert!(age < window.as_secs_f64(), "heartbeat {age:.1} s old");
    let next = deploy(&conn, &ws, "after", &node).await;
    wait_status(&conn, &worker, next, JobStatus::Completed).await;
    assert_eq!(
        rows::event_types(&conn, next).await,
        ["SCHEDULED", "RUNNING", "COMPLETED"]
    );
    eprintln!("pool stalled {stall:?}; the job was retried and completed once");
    worker.stop().await;
}
