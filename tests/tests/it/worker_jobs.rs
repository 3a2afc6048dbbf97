//! `ampd worker` runs the jobs assigned to its node, as a user runs it: a process with a config
//! file, on a database of its own, jobs scheduled through `ampd::metadata` the way the controller
//! schedules them. Each test waits on evidence (a job's status, a registered file, a log line).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use ampd::manifest::{self, FileMeta, RevisionMeta};
use ampd::metadata::{datasets, files, jobs, revisions, workers};
use entity::{JobStatus, jobs as job_rows};
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::services::{Service, Workspace};
use tests::{TestDb, rows};

/// Generous bound on anything a test waits for.
const WAIT: Duration = Duration::from_secs(120);

/// Looking for evidence again and again, for at most [`WAIT`].
struct Poll(Instant);

impl Poll {
    fn new() -> Poll {
        Poll(Instant::now())
    }

    /// Waits a little before the next look; panics with `why` once [`WAIT`] has passed.
    async fn again(&self, why: impl FnOnce() -> String) {
        assert!(self.0.elapsed() < WAIT, "{}", why());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A test's database, workspace and connection.
struct Setup {
    db: TestDb,
    conn: DatabaseConnection,
    ws: Workspace,
}

impl Setup {
    async fn new() -> Setup {
        let db = TestDb::migrated().await;
        let conn = db.connect().await;
        Setup {
            db,
            conn,
            ws: Workspace::new(),
        }
    }

    /// Starts `ampd worker --node-id <node>` with `[worker]` keys `worker_toml` (auto-migrating,
    /// as a fresh deployment does).
    fn spawn_worker(&self, node: &str, worker_toml: &str) -> Service {
        let config = self.ws.config(
            &format!("{node}.toml"),
            self.db.url(),
            &format!("[worker]\n{worker_toml}\n"),
        );
        Service::start(
            node,
            &config,
            &["worker", "--node-id", node],
            &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
        )
    }

    /// [`Setup::spawn_worker`], then waits until it follows its jobs.
    async fn worker(&self, node: &str, worker_toml: &str) -> Service {
        let mut worker = self.spawn_worker(node, worker_toml);
        worker
            .wait_for_log(WAIT, |log| log.contains("worker started"))
            .await;
        worker
    }

    /// Registers `node` as a worker (so jobs can be assigned to it before its process starts).
    async fn register(&self, node: &str) {
        workers::register(&self.conn, node, json!({}))
            .await
            .unwrap();
    }

    /// Registers `manifest` as the controller does (its bytes at `<data_dir>/manifests/<hash>.json`,
    /// registered and linked to `ns/name`) and schedules its materialization on `node`.
    async fn deploy(&self, ns: &str, name: &str, manifest: &Value, node: &str) -> i64 {
        let bytes = serde_json::to_vec_pretty(manifest).unwrap();
        let hash = datasets::manifest_hash(&bytes);
        let path = manifest::manifest_path(&hash);
        let file = self.ws.data_dir().join(&path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &bytes).unwrap();
        datasets::register_manifest(&self.conn, manifest::STATIC, &bytes, &path)
            .await
            .unwrap();
        datasets::link(&self.conn, ns, name, &hash).await.unwrap();
        let descriptor = json!({"namespace": ns, "name": name, "manifest_hash": hash});
        let (job, _) = jobs::schedule(
            &self.conn,
            manifest::MATERIALIZE_STATIC,
            descriptor,
            Some(node),
        )
        .await
        .unwrap();
        job.id
    }

    /// Waits until job `id` is `status`; panics with the worker's log if it ends otherwise.
    async fn wait_job(&self, worker: &Service, id: i64, status: JobStatus) -> job_rows::Model {
        let poll = Poll::new();
        loop {
            let job = jobs::get(&self.conn, id)
                .await
                .unwrap()
                .expect("job exists");
            let now = job.job_status().unwrap();
            if now == status {
                return job;
            }
            assert!(
                !now.is_terminal(),
                "job {id} ended {now} ({:?}), not {status}:\n{}",
                job.detail,
                worker.log()
            );
            poll.again(|| format!("job {id} is still {now}, not {status}:\n{}", worker.log()))
                .await;
        }
    }

    /// The event types of job `id`, oldest first.
    async fn events(&self, id: i64) -> Vec<String> {
        tests::rows::event_types(&self.conn, id).await
    }

    /// The physical table `table` of dataset `ns/name`.
    async fn table(&self, ns: &str, name: &str, table: &str) -> entity::physical_tables::Model {
        revisions::list_tables(&self.conn, ns, name)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.table_name == table)
            .unwrap_or_else(|| panic!("table {ns}/{name}/{table} is registered"))
    }

    /// Waits until some revision of a table of `ns/name` has a registered file: the job is writing.
    async fn wait_first_file(&self, worker: &Service, ns: &str, name: &str) {
        let poll = Poll::new();
        loop {
            for table in revisions::list_tables(&self.conn, ns, name).await.unwrap() {
                for revision in revisions::list(&self.conn, table.id).await.unwrap() {
                    if !files::list(&self.conn, revision.id)
                        .await
                        .unwrap()
                        .is_empty()
                    {
                        return;
                    }
                }
            }
            poll.again(|| format!("no file registered for {ns}/{name}:\n{}", worker.log()))
                .await;
        }
    }

    /// Checks the active revision of table `table` of `ns/name`: its metadata, and each of its
    /// files on disk against its registration (name in order, size, rows, sha256), with nothing
    /// else in the revision's directory. Returns the rows of each file, and the files' text.
    async fn check_output(&self, ns: &str, name: &str, table: &str) -> (Vec<u64>, String) {
        let physical = self.table(ns, name, table).await;
        let revision = rows::active_revision(&self.conn, physical.id)
            .await
            .unwrap_or_else(|| panic!("{table} has an active revision"));
        assert!(
            revision.path.starts_with(&format!("{ns}/{name}/{table}/")),
            "{}",
            revision.path
        );
        let meta: RevisionMeta = serde_json::from_value(revision.metadata.clone()).unwrap();
        assert_eq!(meta.format, "jsonl");
        let dir = self.ws.data_dir().join(&revision.path);
        let registered = files::list(&self.conn, revision.id).await.unwrap();
        let (mut rows, mut text) = (Vec::new(), String::new());
        for (i, file) in registered.iter().enumerate() {
            assert_eq!(file.file_name, format!("part-{i:05}.jsonl"));
            let bytes = std::fs::read(dir.join(&file.file_name)).unwrap();
            let file_meta: FileMeta = serde_json::from_value(file.metadata.clone()).unwrap();
            assert_eq!(file.object_size, bytes.len() as i64, "{}", file.file_name);
            assert_eq!(file_meta.sha256, hex::encode(Sha256::digest(&bytes)));
            let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64;
            assert_eq!(file_meta.rows, lines, "{}", file.file_name);
            rows.push(lines);
            text.push_str(std::str::from_utf8(&bytes).unwrap());
        }
        assert_eq!(meta.rows, rows.iter().sum::<u64>(), "the revision's rows");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let names: Vec<String> = registered.iter().map(|f| f.file_name.clone()).collect();
        assert_eq!(
            on_disk, names,
            "the revision's directory holds its files only"
        );
        (rows, text)
    }

    /// The one value `sql` selects.
    async fn scalar<T: sea_orm::TryGetable>(&self, sql: String) -> T {
        tests::sql::value(&self.conn, &sql).await
    }

    /// Whether any table of `ns/name` has an active revision.
    async fn anything_active(&self, ns: &str, name: &str) -> bool {
        revisions::list_tables(&self.conn, ns, name)
            .await
            .unwrap()
            .iter()
            .any(|t| t.active_revision_id.is_some())
    }
}

fn lines(rows: &[&str]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

/// A static manifest of one table `table` with `columns` (`name:type`) and `source` (`"rows"` or
/// `"csv"`) set to `value`.
fn single_table(table: &str, columns: &[&str], source: &str, value: Value) -> Value {
    let columns: Vec<Value> = columns
        .iter()
        .map(|c| {
            let (name, ty) = c.split_once(':').unwrap();
            json!({"name": name, "type": ty})
        })
        .collect();
    json!({"kind": "static", "tables": {table: {"columns": columns, source: value}}})
}

/// Writes a CSV with header `id,symbol,price` and `rows` rows to `path`.
fn big_csv(path: &Path, rows: u64) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(out, "id,symbol,price").unwrap();
    for i in 0..rows {
        writeln!(out, "{i},s{},{}.5", i % 1000, i % 10_000).unwrap();
    }
    out.flush().unwrap();
}

const BIG_COLUMNS: [&str; 3] = ["id:int64", "symbol:string", "price:float64"];

#[tokio::test]
async fn inline_and_csv_manifests_complete_with_exactly_their_rows_in_registered_files() {
    let s = Setup::new().await;
    // A long reconcile interval: the jobs start on their START notification.
    let worker = s
        .worker("w-complete", "reconcile_interval_ms = 600000")
        .await;

    let inline = json!({"kind": "static", "tables": {"prices": {
        "columns": [{"name": "symbol", "type": "string"}, {"name": "price", "type": "float64"}],
        "rows": [["ETH", 3100.5], ["BTC", 91000.0]]}}});
    let inline_job = s.deploy("demo", "prices", &inline, "w-complete").await;

    std::fs::create_dir_all(s.ws.sources_dir().join("sub")).unwrap();
    std::fs::write(
        s.ws.sources_dir().join("sub/people.csv"),
        "id,name,score,ok,at\n\
         1,alice,1.5,true,2024-05-01T12:00:00Z\n\
         -2,\"bob \"\"the\"\" builder\",1e3,false,2024-05-01T14:00:00+02:00\n\
         3,\"multi\nline\",0,true,2024-05-01T12:00:00.250Z\n",
    )
    .unwrap();
    let csv = single_table(
        "people",
        &[
            "id:int64",
            "name:string",
            "score:float64",
            "ok:bool",
            "at:timestamp",
        ],
        "csv",
        json!("sub/people.csv"),
    );
    let csv_job = s.deploy("demo", "people", &csv, "w-complete").await;

    for id in [inline_job, csv_job] {
        let job = s.wait_job(&worker, id, JobStatus::Completed).await;
        assert_eq!(job.node_id.as_deref(), Some("w-complete"));
        assert_eq!(
            s.events(id).await,
            ["SCHEDULED", "RUNNING", "COMPLETED"],
            "job {id}"
        );
    }
    let (rows, text) = s.check_output("demo", "prices", "prices").await;
    assert_eq!(rows, [2]);
    assert_eq!(
        text,
        lines(&[
            r#"{"symbol":"ETH","price":3100.5}"#,
            r#"{"symbol":"BTC","price":91000.0}"#,
        ])
    );
    let (rows, text) = s.check_output("demo", "people", "people").await;
    assert_eq!(rows, [3]);
    assert_eq!(
        text,
        lines(&[
            r#"{"id":1,"name":"alice","score":1.5,"ok":true,"at":"2024-05-01T12:00:00Z"}"#,
            r#"{"id":-2,"name":"bob \"the\" builder","score":1000.0,"ok":false,"at":"2024-05-01T12:00:00Z"}"#,
            r#"{"id":3,"name":"multi\nline","score":0.0,"ok":true,"at":"2024-05-01T12:00:00.250Z"}"#,
        ])
    );
    let meta: RevisionMeta = serde_json::from_value(
        rows::active_revision(&s.conn, s.table("demo", "people", "people").await.id)
            .await
            .expect("people has an active revision")
            .metadata,
    )
    .unwrap();
    let types: Vec<&str> = meta.columns.iter().map(|c| c.ty.as_str()).collect();
    assert_eq!(types, ["int64", "string", "float64", "bool", "timestamp"]);

    let exit = worker.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
}

#[tokio::test]
async fn rows_per_file_bounds_every_file_and_no_file_is_empty() {
    let s = Setup::new().await;
    let worker = s.worker("w-split", "rows_per_file = 3").await;
    std::fs::write(
        s.ws.sources_dir().join("six.csv"),
        "n\n10\n11\n12\n13\n14\n15\n",
    )
    .unwrap();
    let manifest = json!({"kind": "static", "tables": {
        "seven": {"columns": [{"name": "n", "type": "int64"}],
                  "rows": [[1], [2], [3], [4], [5], [6], [7]]},
        "six": {"columns": [{"name": "n", "type": "int64"}], "csv": "six.csv"},
        "none": {"columns": [{"name": "n", "type": "int64"}], "rows": []}}});
    let id = s.deploy("demo", "split", &manifest, "w-split").await;
    s.wait_job(&worker, id, JobStatus::Completed).await;

    let (rows, text) = s.check_output("demo", "split", "seven").await;
    assert_eq!(rows, [3, 3, 1]);
    assert_eq!(
        text,
        lines(&[
            r#"{"n":1}"#,
            r#"{"n":2}"#,
            r#"{"n":3}"#,
            r#"{"n":4}"#,
            r#"{"n":5}"#,
            r#"{"n":6}"#,
            r#"{"n":7}"#
        ])
    );
    let (rows, text) = s.check_output("demo", "split", "six").await;
    assert_eq!(rows, [3, 3]);
    assert_eq!(
        text,
        lines(&[
            r#"{"n":10}"#,
            r#"{"n":11}"#,
            r#"{"n":12}"#,
            r#"{"n":13}"#,
            r#"{"n":14}"#,
            r#"{"n":15}"#
        ])
    );
    let (rows, text) = s.check_output("demo", "split", "none").await;
    assert!(rows.is_empty() && text.is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn a_bad_csv_row_ends_fatal_naming_its_line_and_column_and_activates_nothing() {
    let s = Setup::new().await;
    let worker = s.worker("w-badrow", "").await;
    // The bad row starts on line 5: line 1 is the header, and the quoted field spans lines 3-4.
    std::fs::write(
        s.ws.sources_dir().join("prices.csv"),
        "symbol,price\nETH,3100.5\n\"multi\nline\",1\nBTC,oops\nSOL,1\n",
    )
    .unwrap();
    let manifest = json!({"kind": "static", "tables": {
        "a_first": {"columns": [{"name": "n", "type": "int64"}], "rows": [[1]]},
        "prices": {"columns": [{"name": "symbol", "type": "string"},
                               {"name": "price", "type": "float64"}],
                   "csv": "prices.csv"}}});
    let id = s.deploy("demo", "bad", &manifest, "w-badrow").await;
    let job = s.wait_job(&worker, id, JobStatus::Fatal).await;
    let detail = job.detail.unwrap();
    assert_eq!(detail["reason"], "bad_csv_row", "{detail}");
    assert_eq!(detail["table"], "prices", "{detail}");
    assert_eq!(detail["row"], 5, "{detail}");
    assert_eq!(detail["column"], "price", "{detail}");
    // The file, line and column are named; the file's contents are not echoed.
    let message = detail["message"].as_str().unwrap();
    assert!(
        message.contains("line 5, column price") && !message.contains("oops"),
        "{detail}"
    );
    assert_eq!(s.events(id).await, ["SCHEDULED", "RUNNING", "FATAL"]);
    assert!(!s.anything_active("demo", "bad").await);
    worker.stop().await;
}

#[tokio::test]
async fn csv_paths_outside_the_sources_directory_end_fatal_and_nothing_is_read() {
    let s = Setup::new().await;
    let worker = s.worker("w-paths", "").await;
    // A valid CSV outside the sources directory: read, it would make the job complete.
    let outside = s.ws.path().join("outside.csv");
    std::fs::write(&outside, "n\n1\n").unwrap();
    std::os::unix::fs::symlink(&outside, s.ws.sources_dir().join("link.csv")).unwrap();

    let cases = [
        (
            "absolute",
            json!(outside.display().to_string()),
            "invalid_manifest",
        ),
        ("dotdot", json!("../outside.csv"), "invalid_manifest"),
        ("symlink", json!("link.csv"), "source_outside"),
        ("missing", json!("missing.csv"), "source_unreadable"),
    ];
    let mut started = Vec::new();
    for (name, path, _) in &cases {
        let manifest = single_table("t", &["n:int64"], "csv", path.clone());
        started.push(s.deploy("paths", name, &manifest, "w-paths").await);
    }
    for ((name, path, reason), id) in cases.iter().zip(started) {
        let job = s.wait_job(&worker, id, JobStatus::Fatal).await;
        let detail = job.detail.unwrap();
        assert_eq!(detail["reason"], *reason, "{name} {path}: {detail}");
        assert!(
            revisions::list_tables(&s.conn, "paths", name)
                .await
                .unwrap()
                .is_empty(),
            "{name}: nothing registered, nothing written"
        );
    }
    assert_eq!(
        std::fs::read_dir(s.ws.data_dir()).unwrap().count(),
        1,
        "only manifests/ in the data directory"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_stop_request_ends_stopped_and_the_partial_revision_is_never_activated() {
    let s = Setup::new().await;
    let worker = s
        .worker("w-stop", "rows_per_file = 1000\ngc_interval_ms = 200")
        .await;
    big_csv(&s.ws.sources_dir().join("big.csv"), 2_000_000);
    let manifest = single_table("big", &BIG_COLUMNS, "csv", json!("big.csv"));
    let id = s.deploy("demo", "stop", &manifest, "w-stop").await;
    s.wait_first_file(&worker, "demo", "stop").await;

    jobs::request_stop(&s.conn, id).await.unwrap();
    s.wait_job(&worker, id, JobStatus::Stopped).await;
    assert_eq!(
        s.events(id).await,
        [
            "SCHEDULED",
            "RUNNING",
            "STOP_REQUESTED",
            "STOPPING",
            "STOPPED"
        ]
    );
    let table = s.table("demo", "stop", "big").await;
    assert_eq!(rows::active_revision_id(&s.conn, table.id).await, None);

    // The partial revision is abandoned: the garbage collector deletes its files and its row.
    let poll = Poll::new();
    loop {
        let left = revisions::list(&s.conn, table.id).await.unwrap();
        let dir = s.ws.data_dir().join("demo/stop/big");
        let files_left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        if left.is_empty() && files_left == 0 {
            break;
        }
        poll.again(|| format!("partial revision not collected: {left:?}\n{}", worker.log()))
            .await;
    }
    let exit = worker.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
}

#[tokio::test]
async fn sigterm_hands_a_running_job_back_and_exits_0_within_10_s() {
    let s = Setup::new().await;
    let worker = s.worker("w-term", "rows_per_file = 1000").await;
    big_csv(&s.ws.sources_dir().join("big.csv"), 2_000_000);
    let manifest = single_table("big", &BIG_COLUMNS, "csv", json!("big.csv"));
    let id = s.deploy("demo", "term", &manifest, "w-term").await;
    s.wait_first_file(&worker, "demo", "term").await;

    let exit = worker.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    assert!(exit.took < Duration::from_secs(10), "took {:?}", exit.took);

    let job = jobs::get(&s.conn, id).await.unwrap().unwrap();
    assert_eq!(job.status, "ERROR", "{}", exit.log);
    assert_eq!(
        job.detail,
        Some(json!({"reason": "worker_shutdown", "node_id": "w-term"}))
    );
    assert_eq!(s.events(id).await, ["SCHEDULED", "RUNNING", "ERROR"]);
    assert!(!s.anything_active("demo", "term").await);
    // Signed off: not live any more, whatever the liveness window.
    let live = workers::list_live(&s.conn, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(live.iter().all(|w| w.node_id != "w-term"), "{live:?}");
    // And the node id is free.
    let claim = workers::claim(&s.db.config(), "w-term").await.unwrap();
    claim.release().await.unwrap();
}

#[tokio::test]
async fn a_second_worker_with_the_same_node_id_exits_1_and_the_first_runs_on() {
    let s = Setup::new().await;
    let first = s.worker("w-twice", "").await;
    let second = s.spawn_worker("w-twice", "").wait().await;
    assert_eq!(second.code, Some(1), "{}", second.log);
    assert!(
        second
            .log
            .contains("node id \"w-twice\" is claimed by another process"),
        "{}",
        second.log
    );
    let manifest = single_table("t", &["n:int64"], "rows", json!([[1]]));
    let id = s.deploy("demo", "twice", &manifest, "w-twice").await;
    s.wait_job(&first, id, JobStatus::Completed).await;
    let exit = first.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
}

#[tokio::test]
async fn max_concurrent_jobs_bounds_the_jobs_running_at_once() {
    let s = Setup::new().await;
    s.register("w-slots").await;
    big_csv(&s.ws.sources_dir().join("medium.csv"), 50_000);
    let mut ids = Vec::new();
    for i in 0..5 {
        let manifest = single_table("t", &BIG_COLUMNS, "csv", json!("medium.csv"));
        ids.push(
            s.deploy("slots", &format!("d{i}"), &manifest, "w-slots")
                .await,
        );
    }
    let worker = s
        .worker("w-slots", "max_concurrent_jobs = 2\nrows_per_file = 1000")
        .await;
    for id in &ids {
        s.wait_job(&worker, *id, JobStatus::Completed).await;
    }
    // Replay every event in the order they were recorded: at most two jobs were RUNNING at once,
    // and two were at some point.
    let mut events = Vec::new();
    for id in &ids {
        events.extend(jobs::list_events(&s.conn, *id).await.unwrap());
    }
    events.sort_by_key(|e| e.id);
    let (mut running, mut most) = (0, 0);
    for e in &events {
        match e.event_type.as_str() {
            "RUNNING" => running += 1,
            "COMPLETED" => running -= 1,
            _ => {}
        }
        most = most.max(running);
    }
    assert_eq!(most, 2, "{events:?}");
    worker.stop().await;
}

#[tokio::test]
async fn a_job_left_running_by_an_earlier_process_of_the_node_fails_as_worker_lost() {
    let s = Setup::new().await;
    s.register("w-earlier").await;
    let manifest = single_table("t", &["n:int64"], "rows", json!([[1]]));
    let id = s.deploy("demo", "earlier", &manifest, "w-earlier").await;
    let job = jobs::get(&s.conn, id).await.unwrap().unwrap();
    jobs::mark_running(&s.conn, &jobs::JobClaim::of(&job).unwrap())
        .await
        .unwrap();

    let worker = s.worker("w-earlier", "").await;
    let job = s.wait_job(&worker, id, JobStatus::Error).await;
    assert_eq!(
        job.detail,
        Some(json!({"reason": "worker_lost", "node_id": "w-earlier"}))
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_stop_requested_before_the_job_started_is_completed_by_its_worker() {
    let s = Setup::new().await;
    s.register("w-prestop").await;
    let manifest = single_table("t", &["n:int64"], "rows", json!([[1]]));
    let id = s.deploy("demo", "prestop", &manifest, "w-prestop").await;
    jobs::request_stop(&s.conn, id).await.unwrap();

    let worker = s.worker("w-prestop", "").await;
    s.wait_job(&worker, id, JobStatus::Stopped).await;
    assert_eq!(
        s.events(id).await,
        ["SCHEDULED", "STOP_REQUESTED", "STOPPING", "STOPPED"]
    );
    assert!(
        revisions::list_tables(&s.conn, "demo", "prestop")
            .await
            .unwrap()
            .is_empty()
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_job_of_an_unknown_kind_ends_fatal() {
    let s = Setup::new().await;
    let worker = s.worker("w-kind", "").await;
    let descriptor = json!({"namespace": "demo", "name": "kind", "manifest_hash": "0".repeat(64)});
    let (job, _) = jobs::schedule(&s.conn, "evm-rpc-sync", descriptor, Some("w-kind"))
        .await
        .unwrap();
    let job = s.wait_job(&worker, job.id, JobStatus::Fatal).await;
    let detail = job.detail.unwrap();
    assert_eq!(detail["reason"], "unknown_kind", "{detail}");
    assert!(
        detail["message"].as_str().unwrap().contains("evm-rpc-sync"),
        "{detail}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_lost_claim_is_claimed_again_and_a_node_id_taken_meanwhile_stops_the_worker() {
    let s = Setup::new().await;
    let mut worker = s
        .worker(
            "w-claim",
            "heartbeat_interval_ms = 2000\nrows_per_file = 1000",
        )
        .await;
    // The claim's connection, found by its application name in this test's database only.
    let of_claim = format!(
        "FROM pg_stat_activity WHERE datname = '{}' AND application_name = 'ampd-node-claim'",
        s.db.name()
    );
    let terminated = || {
        s.scalar::<i64>(format!(
            "SELECT count(pg_terminate_backend(pid)) {of_claim}"
        ))
    };
    // When the claim's connection last turned idle: the end of a claim check.
    let claim_checked = || {
        s.scalar::<String>(format!(
            "SELECT COALESCE(max(state_change)::text, '') {of_claim} AND state = 'idle'"
        ))
    };

    // The claim's connection is lost (as in a database restart): the worker claims the node id
    // again and runs on.
    assert_eq!(terminated().await, 1);
    worker
        .wait_for_log(WAIT, |log| log.contains("node id claimed again"))
        .await;

    // A job runs; the claim is lost again, and this time another process takes the node id first.
    big_csv(&s.ws.sources_dir().join("big.csv"), 2_000_000);
    let manifest = single_table("big", &BIG_COLUMNS, "csv", json!("big.csv"));
    let id = s.deploy("demo", "claim", &manifest, "w-claim").await;
    s.wait_first_file(&worker, "demo", "claim").await;
    // Right after a claim check (its connection turns idle again), so that the next check comes
    // after the test has taken the node id.
    let last = claim_checked().await;
    let poll = Poll::new();
    loop {
        let now = claim_checked().await;
        if !now.is_empty() && now != last {
            break;
        }
        poll.again(|| format!("no claim check:\n{}", worker.log()))
            .await;
    }
    assert_eq!(terminated().await, 1);
    let poll = Poll::new();
    let taken = loop {
        match workers::claim(&s.db.config(), "w-claim").await {
            Ok(claim) => break claim,
            Err(e) => poll.again(|| e.to_string()).await,
        }
    };
    let exit = worker.wait().await;
    assert_eq!(exit.code, Some(1), "{}", exit.log);
    assert!(
        exit.log
            .contains("node id \"w-claim\" is claimed by another process"),
        "{}",
        exit.log
    );
    // It could not hand its job back: the node id's new holder (a higher claim epoch) fences
    // every write of the old process. The job is left RUNNING for the new holder, which fails it
    // as left running by an earlier process of the node (the controller then retries it).
    let job = jobs::get(&s.conn, id).await.unwrap().unwrap();
    assert_eq!(job.status, "RUNNING", "{}", exit.log);
    assert!(job.claim_epoch < Some(taken.epoch()), "{job:?}");
    let claim = jobs::JobClaim::by(&job, taken.epoch()).unwrap();
    let failed = jobs::mark_error(&s.conn, &claim, jobs::worker_lost(Some("w-claim")))
        .await
        .expect("the new holder fails it");
    assert_eq!(failed.status, "ERROR");
    taken.release().await.unwrap();
}

/// The worker's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number");
    kb * 1024
}

#[tokio::test]
async fn a_million_row_csv_is_materialized_in_flat_memory() {
    const ROWS: u64 = 1_000_000;
    let s = Setup::new().await;
    let worker = s.worker("w-million", "").await;
    // Rows of about 80 bytes: the CSV is ~80 MB, its JSON Lines ~130 MB; either held in memory
    // would show.
    let path = s.ws.sources_dir().join("million.csv");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        writeln!(out, "id,symbol,price,ok,at").unwrap();
        for i in 0..ROWS {
            writeln!(
                out,
                "{i},SYM-{i:07}-abcdefghijklmnopqrstuvwxyz,{}.25,{},2024-05-01T12:{:02}:{:02}Z",
                i % 100_000,
                i % 2 == 0,
                (i / 60) % 60,
                i % 60
            )
            .unwrap();
        }
        out.flush().unwrap();
    }
    let csv_bytes = std::fs::metadata(&path).unwrap().len();
    let before = peak_rss(worker.pid());

    let manifest = single_table(
        "million",
        &[
            "id:int64",
            "symbol:string",
            "price:float64",
            "ok:bool",
            "at:timestamp",
        ],
        "csv",
        json!("million.csv"),
    );
    let id = s.deploy("demo", "million", &manifest, "w-million").await;
    s.wait_job(&worker, id, JobStatus::Completed).await;
    let after = peak_rss(worker.pid());

    let (rows, _) = s.check_output("demo", "million", "million").await;
    assert_eq!(rows, [100_000; 10]);
    let events = jobs::list_events(&s.conn, id).await.unwrap();
    let at = |t: &str| {
        events
            .iter()
            .find(|e| e.event_type == t)
            .unwrap()
            .created_at
    };
    let secs = (at("COMPLETED") - at("RUNNING")).num_milliseconds() as f64 / 1000.0;
    let mut report = String::new();
    let _ = write!(
        report,
        "{ROWS} rows ({} MB of CSV) in {secs:.2} s: {:.0} rows/s; worker peak RSS {:.1} MB \
         before, {:.1} MB after",
        csv_bytes / 1_000_000,
        ROWS as f64 / secs,
        before as f64 / 1e6,
        after as f64 / 1e6
    );
    eprintln!("{report}");
    assert!(after < 200_000_000, "{report}");
    assert!(
        after - before < 64_000_000,
        "peak memory grew with the file: {report}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_csv_record_over_the_limit_ends_fatal_and_a_nul_filled_file_costs_bounded_memory() {
    const LIMIT: usize = 64 * 1024;
    let s = Setup::new().await;
    let worker = s
        .worker("w-long", &format!("max_csv_record_bytes = {LIMIT}"))
        .await;
    // A record twice the limit, and a header followed by 64 MiB of NUL bytes (no newline): read
    // whole, the NULs alone would cost the worker 64 MiB and their JSON line six times that.
    let mut long = b"a\n".to_vec();
    long.extend(std::iter::repeat_n(b'x', 2 * LIMIT));
    std::fs::write(s.ws.sources_dir().join("long.csv"), &long).unwrap();
    {
        let mut out = std::fs::File::create(s.ws.sources_dir().join("nul.csv")).unwrap();
        out.write_all(b"a\n").unwrap();
        let block = vec![0u8; 1024 * 1024];
        for _ in 0..64 {
            out.write_all(&block).unwrap();
        }
    }
    let before = peak_rss(worker.pid());
    for name in ["long", "nul"] {
        let manifest = single_table("t", &["a:string"], "csv", json!(format!("{name}.csv")));
        let id = s.deploy("records", name, &manifest, "w-long").await;
        let job = s.wait_job(&worker, id, JobStatus::Fatal).await;
        let detail = job.detail.unwrap();
        assert_eq!(detail["reason"], "record_too_long", "{name}: {detail}");
        assert_eq!(detail["row"], 2, "{name}: {detail}");
        let message = detail["message"].as_str().unwrap();
        assert!(
            message.contains(&LIMIT.to_string()) && message.contains("max_csv_record_bytes"),
            "{name}: {detail}"
        );
    }
    let grown = peak_rss(worker.pid()).saturating_sub(before);
    assert!(
        grown < 16 * 1024 * 1024,
        "the worker's peak RSS grew by {grown} bytes reading records over a {LIMIT}-byte limit"
    );
}

#[tokio::test]
async fn files_and_directories_a_job_writes_are_private_to_the_service_user() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new().await;
    let worker = s.worker("w-private", "").await;
    let manifest = single_table("t", &["a:int64"], "rows", json!([[1], [2]]));
    let id = s.deploy("private", "t", &manifest, "w-private").await;
    s.wait_job(&worker, id, JobStatus::Completed).await;
    // Everything under the dataset's directory was created by the worker.
    let mut pending = vec![s.ws.data_dir().join("private")];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let meta = std::fs::metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
        seen += 1;
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(
        seen >= 5,
        "only {seen} entries under the dataset's directory"
    );
}
