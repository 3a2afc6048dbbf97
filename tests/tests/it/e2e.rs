//! The services together, run as a user runs them: `ampd controller`, `ampd server` and `ampd
//! worker`s as separate processes on one PostgreSQL database and one data directory, each with its
//! config file, driven over HTTP only (the admin API, the server's rows). The database is read only
//! to show what a refused request did not change.
//!
//! - datasets registered, deployed, served as JSON Lines and CSV, a new version, a version run
//!   again (a new revision replaces the old one in its table), a roll back while the old files
//!   exist, and the replaced revision's files deleted after `[worker] gc_grace_secs`;
//! - a worker killed with SIGKILL in the middle of a job: the other worker completes it, and the
//!   job never has two attempts running;
//! - PostgreSQL restarted under the running services: none exits, and a deploy afterwards works;
//! - bad input to every route (beyond `controller_api.rs` and `server_rows.rs`), and CSV sources
//!   that go bad after registration: a 4xx or a FATAL job, and nothing changes or is served;
//! - services started together on an empty database migrate it once (`auto_migrate`), and refuse a
//!   stale one without it;
//! - the served OpenAPI document passes `openapi-spec-validator`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::TestDb;
use tests::api::{Api, Body, eventually, snapshot};
use tests::cli::TempDir;
use tests::cluster::OwnCluster;
use tests::services::{Service, Workspace, free_addr};

/// Generous bound on anything a test waits for.
const WAIT: Duration = Duration::from_secs(120);

/// What a stack is configured with besides what every stack has.
struct Setup {
    /// The controller's `[worker] liveness_window_ms`: a worker silent this long is lost.
    liveness_window_ms: u64,
    /// The controller's `[worker] gc_grace_secs`: how long the files of a revision that a roll back
    /// replaced are kept.
    rollback_grace_secs: u64,
    /// More `[controller]` keys.
    controller: String,
    /// The workers: each one's node id and more `[worker]` keys.
    workers: Vec<(String, String)>,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            liveness_window_ms: 10_000,
            rollback_grace_secs: 3600,
            controller: String::new(),
            workers: Vec::new(),
        }
    }
}

/// A controller, a server and workers, each an `ampd` process with its config file in one
/// workspace (one data directory, one sources directory), on one database.
struct Stack {
    // Dropped first (each process killed) when a test fails, so that none writes into the
    // workspace while it is removed.
    services: Vec<(String, Service)>,
    ws: Workspace,
    /// The controller's admin API.
    admin: Api,
    /// The server.
    rows: Api,
}

/// Starts `ampd <args...>` with `config`, migrating on startup.
fn start(name: &str, config: &Path, args: &[&str]) -> Service {
    Service::start(
        name,
        config,
        args,
        &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
    )
}

/// The last `n` lines of `log`.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Stack {
    /// Starts the stack on database `url` in a new workspace, and waits until every service is up.
    async fn start(url: &str, setup: Setup) -> Stack {
        let ws = Workspace::new();
        let (admin, served) = (free_addr(), free_addr());
        let controller = ws.config(
            "controller.toml",
            url,
            &format!(
                "[controller]\nadmin_addr = \"{admin}\"\nreconcile_interval_ms = 200\n{}\n\n\
                 [worker]\nliveness_window_ms = {}\ngc_grace_secs = {}\n",
                setup.controller, setup.liveness_window_ms, setup.rollback_grace_secs
            ),
        );
        let server = ws.config(
            "server.toml",
            url,
            &format!("[server]\naddr = \"{served}\"\n"),
        );
        let mut services = vec![
            (
                "controller".to_owned(),
                start("controller", &controller, &["controller"]),
            ),
            ("server".to_owned(), start("server", &server, &["server"])),
        ];
        for (node, extra) in &setup.workers {
            let config = ws.config(
                &format!("{node}.toml"),
                url,
                &format!(
                    "[worker]\nheartbeat_interval_ms = 200\ngc_interval_ms = 200\n\
                     reconcile_interval_ms = 500\n{extra}\n"
                ),
            );
            services.push((
                node.clone(),
                start(node, &config, &["worker", "--node-id", node]),
            ));
        }
        services[0].1.wait_healthy(admin).await;
        services[1].1.wait_healthy(served).await;
        for (_, worker) in &mut services[2..] {
            worker
                .wait_for_log(WAIT, |log| log.contains("worker started"))
                .await;
        }
        Stack {
            ws,
            admin: Api::new(admin, None),
            rows: Api::new(served, None),
            services,
        }
    }

    /// The last lines of every service's log, for a failure message.
    fn logs(&self) -> String {
        self.services
            .iter()
            .map(|(name, s)| format!("\n--- {name}:\n{}", tail(&s.log(), 40)))
            .collect()
    }

    fn position(&self, name: &str) -> usize {
        self.services
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// Service `name`.
    fn service(&mut self, name: &str) -> &mut Service {
        let at = self.position(name);
        &mut self.services[at].1
    }

    /// Takes service `name` out of the stack (to kill or stop it).
    fn take(&mut self, name: &str) -> Service {
        let at = self.position(name);
        self.services.remove(at).1
    }

    /// Asserts that every service still runs.
    fn assert_running(&mut self) {
        let mut exited = Vec::new();
        for (name, service) in &mut self.services {
            if !service.is_running() {
                exited.push(name.clone());
            }
        }
        assert!(exited.is_empty(), "{exited:?} exited:{}", self.logs());
    }

    /// Stops every service with SIGTERM; each must exit 0.
    async fn stop_all(self) {
        for (name, service) in self.services {
            let exit = service.stop().await;
            assert_eq!(exit.code, Some(0), "{name}:\n{}", exit.log);
        }
    }

    /// `POST /datasets`: registers `manifest` as `ns/name@version`; returns its hash.
    async fn register(&self, dataset: &str, version: &str, manifest: &Value) -> String {
        let (ns, name) = dataset.split_once('/').expect("ns/name");
        let reply = self
            .admin
            .post(
                "/datasets",
                json!({"namespace": ns, "name": name, "version": version, "manifest": manifest}),
            )
            .await;
        reply.ok(201)["hash"].as_str().expect("a hash").to_owned()
    }

    /// `POST .../deploy` of `dataset@reference`, on `node` when given; returns the answer.
    async fn deploy(&self, dataset: &str, reference: &str, node: Option<&str>) -> Value {
        let body = match node {
            Some(node) => Body::Json(json!({"node_id": node})),
            None => Body::None,
        };
        let path = format!("/datasets/{dataset}/versions/{reference}/deploy");
        let reply = self.admin.call(Method::POST, &path, body).await;
        reply.ok(202).clone()
    }

    /// Deploys `dataset@reference` (on `node` when given) and returns the new job's id.
    async fn deploy_new(&self, dataset: &str, reference: &str, node: Option<&str>) -> i64 {
        let deployed = self.deploy(dataset, reference, node).await;
        assert_eq!(deployed["outcome"], "created", "{deployed}");
        if let Some(node) = node {
            assert_eq!(deployed["node_id"], node, "{deployed}");
        }
        deployed["job_id"].as_i64().expect("a job id")
    }

    /// `GET /jobs/{id}`.
    async fn job(&self, id: i64) -> Value {
        self.admin.get(&format!("/jobs/{id}")).await.ok(200).clone()
    }

    /// Waits until job `id` is `status`; panics with the logs if it ends otherwise.
    async fn wait_job(&self, id: i64, status: &str) -> Value {
        let started = Instant::now();
        loop {
            let job = self.job(id).await;
            let now = job["status"].as_str().unwrap_or_default().to_owned();
            if now == status {
                return job;
            }
            assert!(
                !["COMPLETED", "STOPPED", "ERROR", "FATAL"].contains(&now.as_str()),
                "job {id} ended {now} ({}), not {status}:{}",
                job["detail"],
                self.logs()
            );
            assert!(
                started.elapsed() < WAIT,
                "job {id} is still {now}, not {status}:{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `GET /jobs/{id}/events`: each event's type, node and detail, oldest first.
    async fn events(&self, id: i64) -> Vec<(String, Option<String>, Value)> {
        let reply = self.admin.get(&format!("/jobs/{id}/events")).await;
        reply.ok(200)["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| {
                (
                    e["event_type"].as_str().expect("a type").to_owned(),
                    e["node_id"].as_str().map(str::to_owned),
                    e["detail"].clone(),
                )
            })
            .collect()
    }

    /// The (only) table of `dataset@reference`, from `GET .../tables`.
    async fn table(&self, dataset: &str, reference: &str) -> Value {
        let path = format!("/datasets/{dataset}/versions/{reference}/tables");
        let tables = self.admin.get(&path).await.ok(200).clone();
        let all = tables["tables"].as_array().expect("tables");
        assert_eq!(all.len(), 1, "{tables}");
        all[0].clone()
    }

    /// `GET` of a table's rows from the server: status, content type and body.
    async fn fetch(&self, path: &str) -> (u16, String, String) {
        let response = self
            .rows
            .http()
            .get(self.rows.url(path))
            .send()
            .await
            .expect("the server answers");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, content_type, response.text().await.expect("a body"))
    }

    /// Waits until the server answers table `table` of `dataset@reference` with exactly `rows`,
    /// as JSON Lines and as CSV (it follows a new revision a notification's round trip after its
    /// job completed).
    async fn wait_rows(&self, dataset: &str, reference: &str, table: &str, rows: &Rows) {
        let path = format!("/datasets/{dataset}/versions/{reference}/tables/{table}");
        for (query, expected, media) in [
            ("", rows.jsonl.as_str(), "application/x-ndjson"),
            ("?format=csv", rows.csv.as_str(), "text/csv; charset=utf-8"),
        ] {
            let url = format!("{path}{query}");
            let started = Instant::now();
            loop {
                let (status, content_type, body) = self.fetch(&url).await;
                if status == 200 && body == expected {
                    assert_eq!(content_type, media, "{url}");
                    break;
                }
                assert!(
                    started.elapsed() < WAIT,
                    "{url} answers {status} {body:?}, not {expected:?}:{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}

/// The ids of `table`'s revisions (from `GET .../tables`).
fn revision_ids(table: &Value) -> Vec<i64> {
    table["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .map(|r| r["id"].as_i64().expect("an id"))
        .collect()
}

/// Revision `id` of `table` (from `GET .../tables`).
fn revision(table: &Value, id: i64) -> &Value {
    table["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no revision {id} in {table}"))
}

/// A static manifest of one table `table` with `columns` (`name:type`) and `source` (`"rows"` or
/// `"csv"`) set to `value`.
fn manifest(table: &str, columns: &[&str], source: &str, value: Value) -> Value {
    let columns: Vec<Value> = columns
        .iter()
        .map(|c| {
            let (name, ty) = c.split_once(':').expect("name:type");
            json!({"name": name, "type": ty})
        })
        .collect();
    json!({"kind": "static", "tables": {table: {"columns": columns, source: value}}})
}

fn prices(rows: Value) -> Value {
    manifest("prices", &["symbol:string", "price:float64"], "rows", rows)
}

const TRADE_COLUMNS: [&str; 5] = [
    "id:int64",
    "symbol:string",
    "price:float64",
    "buy:bool",
    "at:timestamp",
];

fn lines(rows: &[&str]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

/// What the server must answer for a table: its JSON Lines and its CSV.
struct Rows {
    jsonl: String,
    csv: String,
}

/// [`Rows`] of these lines (each without its `\n`).
fn rows(jsonl: &[&str], csv: &[&str]) -> Rows {
    Rows {
        jsonl: lines(jsonl),
        csv: lines(csv),
    }
}

/// How long since `since`, in seconds with two decimals, for the figures a test prints.
fn secs(since: Instant) -> String {
    format!("{:.2} s", since.elapsed().as_secs_f64())
}

#[tokio::test]
async fn datasets_are_served_replaced_rolled_back_and_collected() {
    let db = TestDb::migrated().await;
    // Two workers: a job completed on `keep` keeps the revision it replaces for an hour, one
    // completed on `drop` lets it be deleted at once. Deploys name the worker, so which grace
    // applies never depends on timing.
    let keep = tests::unique_name("keep");
    let drop = tests::unique_name("drop");
    let s = Stack::start(
        db.url(),
        Setup {
            workers: vec![
                (keep.clone(), "gc_grace_secs = 3600".to_owned()),
                (drop.clone(), "gc_grace_secs = 0".to_owned()),
            ],
            ..Setup::default()
        },
    )
    .await;
    let started = Instant::now();

    // Version 1.0.0 of a dataset with inline rows, and one of a dataset read from a CSV.
    let manifest_v1 = prices(json!([["ETH", 3100.5], ["BTC", 91000.0]]));
    let prices_v1 = rows(
        &[
            r#"{"symbol":"ETH","price":3100.5}"#,
            r#"{"symbol":"BTC","price":91000.0}"#,
        ],
        &["symbol,price", "ETH,3100.5", "BTC,91000.0"],
    );
    std::fs::create_dir_all(s.ws.sources_dir().join("trades")).expect("mkdir");
    let csv_path = s.ws.sources_dir().join("trades/2024-05.csv");
    std::fs::write(
        &csv_path,
        "id,symbol,price,buy,at\n\
         1,ETH,3100.5,true,2024-05-01T12:00:00Z\n\
         2,\"BTC, wrapped\",91000,false,2024-05-01T14:00:01.5+02:00\n",
    )
    .expect("write the CSV");
    let trades_v1 = rows(
        &[
            r#"{"id":1,"symbol":"ETH","price":3100.5,"buy":true,"at":"2024-05-01T12:00:00Z"}"#,
            r#"{"id":2,"symbol":"BTC, wrapped","price":91000.0,"buy":false,"at":"2024-05-01T12:00:01.500Z"}"#,
        ],
        &[
            "id,symbol,price,buy,at",
            "1,ETH,3100.5,true,2024-05-01T12:00:00Z",
            "2,\"BTC, wrapped\",91000.0,false,2024-05-01T12:00:01.500Z",
        ],
    );
    let trades = manifest("trades", &TRADE_COLUMNS, "csv", json!("trades/2024-05.csv"));
    s.register("demo/prices", "1.0.0", &manifest_v1).await;
    s.register("demo/trades", "1.0.0", &trades).await;
    let prices_job = s.deploy_new("demo/prices", "1.0.0", None).await;
    let trades_job = s.deploy_new("demo/trades", "1.0.0", None).await;
    for id in [prices_job, trades_job] {
        s.wait_job(id, "COMPLETED").await;
        let events: Vec<String> = s.events(id).await.into_iter().map(|e| e.0).collect();
        assert_eq!(events, ["SCHEDULED", "RUNNING", "COMPLETED"], "job {id}");
    }
    for reference in ["1.0.0", "latest", "dev"] {
        s.wait_rows("demo/prices", reference, "prices", &prices_v1)
            .await;
        s.wait_rows("demo/trades", reference, "trades", &trades_v1)
            .await;
    }
    let v1_took = secs(started);

    // Version 2.0.0 with other rows: `latest` moves to it, 1.0.0 still gives its own rows.
    let manifest_v2 = prices(json!([["ETH", 3200.25], ["SOL", 150.0], ["BTC", 95000.5]]));
    s.register("demo/prices", "2.0.0", &manifest_v2).await;
    let v2_job = s.deploy_new("demo/prices", "2.0.0", None).await;
    s.wait_job(v2_job, "COMPLETED").await;
    let prices_v2 = rows(
        &[
            r#"{"symbol":"ETH","price":3200.25}"#,
            r#"{"symbol":"SOL","price":150.0}"#,
            r#"{"symbol":"BTC","price":95000.5}"#,
        ],
        &["symbol,price", "ETH,3200.25", "SOL,150.0", "BTC,95000.5"],
    );
    for reference in ["2.0.0", "latest"] {
        s.wait_rows("demo/prices", reference, "prices", &prices_v2)
            .await;
    }
    s.wait_rows("demo/prices", "1.0.0", "prices", &prices_v1)
        .await;

    // The same version again, on `keep`, after its CSV changed: delete the completed job and
    // deploy again. A new revision replaces the old one in the same table; the old one's files
    // stay (for an hour).
    let before = s.table("demo/trades", "1.0.0").await;
    let first = before["active_revision"]["id"].as_i64().expect("active");
    let first_dir =
        s.ws.data_dir()
            .join(before["active_revision"]["path"].as_str().expect("a path"));
    assert!(first_dir.join("part-00000.jsonl").is_file());
    std::fs::write(
        &csv_path,
        "id,symbol,price,buy,at\n3,ETH,3300,true,2024-05-02T00:00:00Z\n",
    )
    .expect("write the CSV");
    let trades_v1b = rows(
        &[r#"{"id":3,"symbol":"ETH","price":3300.0,"buy":true,"at":"2024-05-02T00:00:00Z"}"#],
        &[
            "id,symbol,price,buy,at",
            "3,ETH,3300.0,true,2024-05-02T00:00:00Z",
        ],
    );
    // A completed job is the version's job: deploying it again returns it, and does nothing.
    let again = s.deploy("demo/trades", "1.0.0", None).await;
    assert_eq!(
        (&again["job_id"], &again["outcome"]),
        (&json!(trades_job), &json!("existing"))
    );
    assert_eq!(
        s.admin.delete(&format!("/jobs/{trades_job}")).await.status,
        204
    );
    let second_job = s.deploy_new("demo/trades", "1.0.0", Some(&keep)).await;
    s.wait_job(second_job, "COMPLETED").await;
    s.wait_rows("demo/trades", "1.0.0", "trades", &trades_v1b)
        .await;
    let after = s.table("demo/trades", "1.0.0").await;
    assert_eq!(after["table_id"], before["table_id"], "the same table");
    let second = after["active_revision"]["id"].as_i64().expect("active");
    assert_ne!(second, first);
    assert!(
        revision(&after, first)["gc_expires_at"].is_string(),
        "{after}"
    );
    assert!(first_dir.join("part-00000.jsonl").is_file());

    // Roll back to the first revision while its files exist: its rows are served again, its
    // deletion is cancelled, and the revision it replaces is kept for the controller's grace.
    let rolled = s
        .admin
        .call(
            Method::POST,
            &format!("/revisions/{first}/activate"),
            Body::None,
        )
        .await;
    let rolled = rolled.ok(200);
    assert_eq!(rolled["previous_revision_id"], second);
    assert_eq!(rolled["table"]["active_revision"]["id"], first);
    s.wait_rows("demo/trades", "1.0.0", "trades", &trades_v1)
        .await;
    let rolled_back = s.table("demo/trades", "1.0.0").await;
    assert_eq!(revision(&rolled_back, first)["gc_expires_at"], Value::Null);
    assert!(revision(&rolled_back, second)["gc_expires_at"].is_string());

    // Once more, on `drop` (grace 0): the revision it replaces (the first) is deleted by the
    // garbage collector, files and row; the second, kept for an hour, stays.
    std::fs::write(
        &csv_path,
        "id,symbol,price,buy,at\n4,SOL,150.75,false,2024-05-03T00:00:00Z\n",
    )
    .expect("write the CSV");
    assert_eq!(
        s.admin.delete(&format!("/jobs/{second_job}")).await.status,
        204
    );
    let third_job = s.deploy_new("demo/trades", "1.0.0", Some(&drop)).await;
    s.wait_job(third_job, "COMPLETED").await;
    let third_done = Instant::now();
    let trades_v1c = rows(
        &[r#"{"id":4,"symbol":"SOL","price":150.75,"buy":false,"at":"2024-05-03T00:00:00Z"}"#],
        &[
            "id,symbol,price,buy,at",
            "4,SOL,150.75,false,2024-05-03T00:00:00Z",
        ],
    );
    s.wait_rows("demo/trades", "1.0.0", "trades", &trades_v1c)
        .await;
    eventually(
        "the first revision is collected",
        WAIT,
        || s.logs(),
        || async {
            let table = s.table("demo/trades", "1.0.0").await;
            !revision_ids(&table).contains(&first) && !first_dir.exists()
        },
    )
    .await;
    let collected_after = secs(third_done);
    let last = s.table("demo/trades", "1.0.0").await;
    let third = last["active_revision"]["id"].as_i64().expect("active");
    assert_eq!(revision_ids(&last), [second, third]);
    let second_path = revision(&last, second)["path"].as_str().expect("a path");
    assert!(
        s.ws.data_dir()
            .join(second_path)
            .join("part-00000.jsonl")
            .is_file(),
        "the second revision's files are kept for an hour"
    );
    // Gone is gone: no roll back to it.
    s.admin
        .call(
            Method::POST,
            &format!("/revisions/{first}/activate"),
            Body::None,
        )
        .await
        .error(404, "not_found");
    // And the other dataset's versions were never touched.
    s.wait_rows("demo/prices", "1.0.0", "prices", &prices_v1)
        .await;
    s.wait_rows("demo/prices", "latest", "prices", &prices_v2)
        .await;
    eprintln!(
        "e2e: v1 of two datasets registered, deployed and served in {v1_took}; the replaced \
         revision collected {collected_after} after its replacement completed (gc_grace_secs = \
         0, gc_interval_ms = 200); whole test {}",
        secs(started)
    );
    s.stop_all().await;
}

/// Writes a CSV of `rows` rows with header `id,symbol,price` to `path`; returns its bytes'
/// sha256 and the sha256 and length of the JSON Lines a materialization writes for it.
fn big_csv(path: &Path, rows: u64) -> (String, String, u64) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut csv = Sha256::new();
    let mut jsonl = Sha256::new();
    let mut jsonl_len = 0u64;
    let header = "id,symbol,price\n";
    out.write_all(header.as_bytes()).expect("write");
    csv.update(header);
    for i in 0..rows {
        let (symbol, price) = (format!("s{}", i % 1000), format!("{}.5", i % 10_000));
        let line = format!("{i},{symbol},{price}\n");
        out.write_all(line.as_bytes()).expect("write");
        csv.update(&line);
        let json = format!("{{\"id\":{i},\"symbol\":\"{symbol}\",\"price\":{price}}}\n");
        jsonl_len += json.len() as u64;
        jsonl.update(&json);
    }
    out.flush().expect("flush");
    (
        hex::encode(csv.finalize()),
        hex::encode(jsonl.finalize()),
        jsonl_len,
    )
}

/// The length and sha256 of the body of `GET path` from the server, streamed.
async fn digest(s: &Stack, path: &str) -> (u64, String) {
    let mut response = s
        .rows
        .http()
        .get(s.rows.url(path))
        .send()
        .await
        .expect("the server answers");
    assert_eq!(response.status().as_u16(), 200, "{path}");
    let (mut len, mut hasher) = (0u64, Sha256::new());
    while let Some(chunk) = response.chunk().await.expect("a chunk") {
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (len, hex::encode(hasher.finalize()))
}

/// The part files on disk under `dir` (a table's directory: revision directories of files).
fn part_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for revision in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(revision.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push(file.path());
        }
    }
    out
}

#[tokio::test]
async fn a_job_whose_worker_is_killed_completes_on_the_other_and_never_runs_twice() {
    const ROWS: u64 = 2_000_000;
    let db = TestDb::migrated().await;
    let (a, b) = (tests::unique_name("a"), tests::unique_name("b"));
    let mut s = Stack::start(
        db.url(),
        Setup {
            liveness_window_ms: 3000,
            workers: vec![
                (a.clone(), "rows_per_file = 20000".to_owned()),
                (b.clone(), "rows_per_file = 20000".to_owned()),
            ],
            ..Setup::default()
        },
    )
    .await;
    let (csv_sha, jsonl_sha, jsonl_len) = big_csv(&s.ws.sources_dir().join("big.csv"), ROWS);
    let columns = ["id:int64", "symbol:string", "price:float64"];
    s.register(
        "demo/big",
        "1.0.0",
        &manifest("big", &columns, "csv", json!("big.csv")),
    )
    .await;
    let deployed_at = Instant::now();
    let id = s.deploy_new("demo/big", "1.0.0", Some(&a)).await;

    // The job runs on `a`, which has written part of it.
    let table_dir = s.ws.data_dir().join("demo/big/big");
    eventually(
        "the job runs on a and has written a file",
        WAIT,
        || s.logs(),
        || async { s.job(id).await["status"] == "RUNNING" && !part_files(&table_dir).is_empty() },
    )
    .await;
    let running = s.job(id).await;
    assert_eq!(
        (&running["node_id"], &running["attempt"]),
        (&json!(a), &json!(1))
    );
    let kill_after = secs(deployed_at);
    let killed = s.take(&a).kill().await;
    assert_eq!(killed.code, None, "killed by a signal");
    let killed_at = Instant::now();

    // Follow the job until it completes. Each look must be a step along the recovery, never back:
    // attempt 1 is RUNNING on `a` until the controller fails it; only then is attempt 2 scheduled
    // on `b` and run there.
    let path: [(&str, &str, i64); 5] = [
        ("RUNNING", &a, 1),
        ("ERROR", &a, 1),
        ("SCHEDULED", &b, 2),
        ("RUNNING", &b, 2),
        ("COMPLETED", &b, 2),
    ];
    let (mut step, mut looks) = (0, 0);
    let (mut failed_after, mut rerun_after) = (None, None);
    loop {
        let job = s.job(id).await;
        let look = (
            job["status"].as_str().unwrap_or_default().to_owned(),
            job["node_id"].as_str().unwrap_or_default().to_owned(),
            job["attempt"].as_i64().unwrap_or_default(),
        );
        looks += 1;
        let at = path
            .iter()
            .position(|(st, node, attempt)| (*st, *node, *attempt) == (&look.0, &look.1, look.2))
            .unwrap_or_else(|| panic!("job {id} left the recovery path: {job}{}", s.logs()));
        assert!(
            at >= step,
            "job {id} went back from {:?} to {look:?}",
            path[step]
        );
        step = at;
        if at >= 1 && failed_after.is_none() {
            failed_after = Some(secs(killed_at));
        }
        if at >= 3 && rerun_after.is_none() {
            rerun_after = Some(secs(killed_at));
        }
        if at == path.len() - 1 {
            break;
        }
        assert!(
            killed_at.elapsed() < WAIT,
            "job {id} still {look:?}:{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let completed_after = secs(killed_at);

    // Its events tell the same story, with the reason, and no two RUNNING without an end between.
    let events = s.events(id).await;
    let story: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|(t, node, _)| (t.as_str(), node.as_deref()))
        .collect();
    assert_eq!(
        story,
        [
            ("SCHEDULED", Some(a.as_str())),
            ("RUNNING", Some(a.as_str())),
            ("ERROR", Some(a.as_str())),
            ("SCHEDULED", Some(b.as_str())),
            ("RUNNING", Some(b.as_str())),
            ("COMPLETED", Some(b.as_str())),
        ]
    );
    assert_eq!(events[2].2, json!({"reason": "worker_lost", "node_id": a}));
    let mut running_now = 0;
    for (event, _, _) in &events {
        match event.as_str() {
            "RUNNING" => running_now += 1,
            "ERROR" | "COMPLETED" | "FATAL" | "STOPPED" => running_now -= 1,
            _ => {}
        }
        assert!(running_now <= 1, "two attempts running: {story:?}");
    }

    // Every row is served, exactly: JSON Lines as the materialization writes them, and CSV the
    // very bytes of the source.
    let rows = "/datasets/demo/big/versions/1.0.0/tables/big";
    assert_eq!(digest(&s, rows).await, (jsonl_len, jsonl_sha));
    let source_len = std::fs::metadata(s.ws.sources_dir().join("big.csv"))
        .expect("the CSV")
        .len();
    assert_eq!(
        digest(&s, &format!("{rows}?format=csv")).await,
        (source_len, csv_sha)
    );
    // The first attempt's partial revision is collected; only the completed one is left.
    eventually(
        "the first attempt's revision is collected",
        WAIT,
        || s.logs(),
        || async {
            let table = s.table("demo/big", "1.0.0").await;
            let active = table["active_revision"]["id"].as_i64();
            active.is_some()
                && revision_ids(&table) == [active.unwrap_or_default()]
                && std::fs::read_dir(&table_dir).map(|d| d.count()).ok() == Some(1)
        },
    )
    .await;
    let table = s.table("demo/big", "1.0.0").await;
    assert_eq!(table["active_revision"]["rows"], ROWS);
    eprintln!(
        "e2e: {ROWS} rows; worker killed {} after the deploy; job ERROR (worker_lost) {} after \
         the kill, RUNNING on the other worker {}, COMPLETED {} ({looks} looks at the job)",
        kill_after,
        failed_after.unwrap_or_default(),
        rerun_after.unwrap_or_default(),
        completed_after,
    );
    s.stop_all().await;
}

#[tokio::test]
async fn services_ride_out_a_postgresql_restart_and_deploy_afterwards() {
    // Dropped in reverse order: the services, then PostgreSQL, then its directory.
    let pg_dir = TempDir::new();
    let mut pg = OwnCluster::start(pg_dir.path(), &[]).await;
    let admin = tests::connect(&pg.url("postgres"), 1).await;
    admin
        .execute_unprepared("CREATE DATABASE amp")
        .await
        .expect("create the database");
    admin.close().await.expect("close");
    let node = tests::unique_name("w");
    let mut s = Stack::start(
        &pg.url("amp"),
        Setup {
            workers: vec![(node.clone(), String::new())],
            ..Setup::default()
        },
    )
    .await;
    s.register("demo/prices", "1.0.0", &prices(json!([["ETH", 1.5]])))
        .await;
    let job = s.deploy_new("demo/prices", "1.0.0", None).await;
    s.wait_job(job, "COMPLETED").await;
    let v1 = rows(
        &[r#"{"symbol":"ETH","price":1.5}"#],
        &["symbol,price", "ETH,1.5"],
    );
    s.wait_rows("demo/prices", "1.0.0", "prices", &v1).await;

    // Restart PostgreSQL. The controller notices (not ready) while it is down.
    let down = Instant::now();
    pg.stop().await;
    let stopped = secs(down);
    eventually(
        "the controller is not ready while PostgreSQL is down",
        WAIT,
        || s.logs(),
        || async { s.admin.get("/readyz").await.status == 503 },
    )
    .await;
    s.assert_running();
    pg.start_again().await;
    let restarted = Instant::now();
    let outage = secs(down);
    eventually(
        "the controller is ready again",
        WAIT,
        || s.logs(),
        || async { s.admin.get("/readyz").await.status == 200 },
    )
    .await;
    let ready_after = secs(restarted);
    s.service(&node)
        .wait_for_log(WAIT, |log| log.contains("node id claimed again"))
        .await;
    let reclaimed_after = secs(restarted);
    s.assert_running();

    // Nothing was lost, and a deploy after the restart completes and is served.
    s.wait_rows("demo/prices", "1.0.0", "prices", &v1).await;
    s.register(
        "demo/prices",
        "2.0.0",
        &prices(json!([["ETH", 2.5], ["BTC", 3.5]])),
    )
    .await;
    let job = s.deploy_new("demo/prices", "2.0.0", None).await;
    s.wait_job(job, "COMPLETED").await;
    let v2 = rows(
        &[
            r#"{"symbol":"ETH","price":2.5}"#,
            r#"{"symbol":"BTC","price":3.5}"#,
        ],
        &["symbol,price", "ETH,2.5", "BTC,3.5"],
    );
    for reference in ["2.0.0", "latest"] {
        s.wait_rows("demo/prices", reference, "prices", &v2).await;
    }
    let served_after = secs(restarted);
    s.assert_running();
    eprintln!(
        "e2e: PostgreSQL stopped in {stopped}, down for {outage}; after its restart the \
         controller was ready in {ready_after}, the worker had claimed its node id again in \
         {reclaimed_after}, and a new version was deployed and served in {served_after}"
    );
    s.stop_all().await;
}

/// The metadata tables' rows and the data directory's files of `s` on `conn`.
async fn state(s: &Stack, conn: &DatabaseConnection) -> String {
    snapshot(conn, &s.ws.data_dir()).await
}

#[tokio::test]
async fn bad_input_to_every_route_gets_its_4xx_and_changes_nothing() {
    // What `controller_api.rs` and `server_rows.rs` do not already send.
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let w = tests::unique_name("w");
    let s = Stack::start(
        db.url(),
        Setup {
            controller: "max_body_bytes = 4096".to_owned(),
            workers: vec![(w.clone(), "gc_grace_secs = 3600".to_owned())],
            ..Setup::default()
        },
    )
    .await;
    // A version run twice (an inactive revision that may be rolled back to), a version of another
    // dataset, and a version never deployed.
    let hash = s
        .register("demo/prices", "1.0.0", &prices(json!([["ETH", 1.0]])))
        .await;
    let first_job = s.deploy_new("demo/prices", "1.0.0", None).await;
    s.wait_job(first_job, "COMPLETED").await;
    let first = s.table("demo/prices", "1.0.0").await["active_revision"]["id"]
        .as_i64()
        .expect("active");
    assert_eq!(
        s.admin.delete(&format!("/jobs/{first_job}")).await.status,
        204
    );
    let job = s.deploy_new("demo/prices", "1.0.0", None).await;
    s.wait_job(job, "COMPLETED").await;
    let other = s
        .register("demo/other", "1.0.0", &prices(json!([["BTC", 2.0]])))
        .await;
    s.register("demo/prices", "2.0.0", &prices(json!([["SOL", 3.0]])))
        .await;
    let served = rows(
        &[r#"{"symbol":"ETH","price":1.0}"#],
        &["symbol,price", "ETH,1.0"],
    );
    s.wait_rows("demo/prices", "1.0.0", "prices", &served).await;
    let before = state(&s, &conn).await;

    let json = "application/json";
    let malformed = || Body::Raw("{".to_owned(), json);
    let too_large = || Body::Raw(format!("{{\"node_id\": \"{}\"}}", "w".repeat(8000)), json);
    let activate = format!("/revisions/{first}/activate");
    let deploy = "/datasets/demo/prices/versions/2.0.0/deploy";
    let out_of_range = "99999999999999999999";
    #[rustfmt::skip]
    let requests: Vec<(&str, Method, String, Body, u16)> = vec![
        // Routes that take no body still refuse a malformed one, and act on nothing.
        ("roll back, malformed JSON", Method::POST, activate.clone(), malformed(), 400),
        ("roll back, a field", Method::POST, activate.clone(), Body::Json(json!({"force": true})), 422),
        ("roll back, a form", Method::POST, activate.clone(), Body::Raw("force=1".into(), "application/x-www-form-urlencoded"), 415),
        ("roll back, over max_body_bytes", Method::POST, activate.clone(), too_large(), 413),
        ("roll back, an id out of range", Method::POST, format!("/revisions/{out_of_range}/activate"), Body::None, 400),
        ("stop, malformed JSON", Method::PUT, format!("/jobs/{job}/stop"), malformed(), 400),
        ("stop, an id out of range", Method::PUT, format!("/jobs/{out_of_range}/stop"), Body::None, 400),
        ("delete a job, malformed JSON", Method::DELETE, format!("/jobs/{job}"), malformed(), 400),
        ("delete a version, malformed JSON", Method::DELETE, "/datasets/demo/prices/versions/2.0.0".into(), malformed(), 400),
        // Deploy: a misspelt field is not ignored; a body that is no object; one too large.
        ("deploy, a misspelt field", Method::POST, deploy.into(), Body::Json(json!({"node": w})), 422),
        ("deploy, null", Method::POST, deploy.into(), Body::Raw("null".into(), json), 422),
        ("deploy, an array", Method::POST, deploy.into(), Body::Json(json!([w])), 422),
        ("deploy, over max_body_bytes", Method::POST, deploy.into(), too_large(), 413),
        // A manifest hash of another dataset names nothing here.
        ("deploy, another dataset's hash", Method::POST, format!("/datasets/demo/prices/versions/{other}/deploy"), Body::None, 404),
        ("tables, another dataset's hash", Method::GET, format!("/datasets/demo/prices/versions/{other}/tables"), Body::None, 404),
        ("a version, another dataset's hash", Method::GET, format!("/datasets/demo/other/versions/{hash}"), Body::None, 404),
        // Jobs: ids out of range, repeated or fractional query values.
        ("a job, an id out of range", Method::GET, format!("/jobs/{out_of_range}"), Body::None, 400),
        ("events, an id out of range", Method::GET, format!("/jobs/{out_of_range}/events"), Body::None, 400),
        ("jobs, limit twice", Method::GET, "/jobs?limit=2&limit=3".into(), Body::None, 400),
        ("jobs, a fractional limit", Method::GET, "/jobs?limit=1.5".into(), Body::None, 400),
        ("jobs, a fractional after", Method::GET, "/jobs?after=1.5".into(), Body::None, 400),
        ("jobs, an empty status", Method::GET, "/jobs?status=".into(), Body::None, 400),
        // Register: the request's own fields.
        ("register, a misspelt field", Method::POST, "/datasets".into(), Body::Json(json!({"namespace": "demo", "name": "x", "version": "1.0.0", "manifest": prices(json!([])), "tag": "stable"})),
            422,
        ),
        ("register, an array", Method::POST, "/datasets".into(), Body::Json(json!(["demo", "x"])), 422),
        ("register, an empty body", Method::POST, "/datasets".into(), Body::Raw(String::new(), json), 400),
    ];
    for (what, method, path, request, status) in requests {
        let reply = s.admin.call(method, &path, request).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        let code = match status {
            400 => "invalid_request",
            404 => "not_found",
            413 => "payload_too_large",
            415 => "unsupported_media_type",
            _ => "invalid_body",
        };
        reply.error(status, code);
        assert_eq!(state(&s, &conn).await, before, "{what} changed something");
    }

    // Manifests that can never be materialized, none of which another test sends.
    let n = ["n:int64"];
    let one = |columns: &[&str], source: &str, value: Value| manifest("t", columns, source, value);
    #[rustfmt::skip]
    let manifests: Vec<(&str, Value, &str)> = vec![
        ("not an object", json!([1, 2]), "kind"),
        ("no tables", json!({"kind": "static", "tables": {}}), "tables"),
        ("neither rows nor csv", json!({"kind": "static", "tables": {"t": {"columns": [{"name": "n", "type": "int64"}]}}}), "tables.t"),
        ("rows and csv", json!({"kind": "static", "tables": {"t": {"columns": [{"name": "n", "type": "int64"}], "rows": [], "csv": "a.csv"}}}), "tables.t"),
        ("no columns", one(&[], "rows", json!([])), "tables.t.columns"),
        ("a bad table name", manifest("Prices", &n, "rows", json!([])), "tables.Prices"),
        ("a bad column name", one(&["1n:int64"], "rows", json!([])), "tables.t.columns[0]"),
        ("a column twice", one(&["n:int64", "n:string"], "rows", json!([])), "tables.t.columns[1]"),
        ("a row too long", one(&n, "rows", json!([[1, 2]])), "tables.t.rows[0]"),
        ("a row that is no array", one(&n, "rows", json!([1])), "tables.t.rows[0]"),
        ("an int64 out of range", one(&n, "rows", json!([[9_223_372_036_854_775_808u64]])), "tables.t.rows[0][0]"),
        ("a fraction as int64", one(&n, "rows", json!([[1.5]])), "tables.t.rows[0][0]"),
        ("a null", one(&n, "rows", json!([[null]])), "tables.t.rows[0][0]"),
        ("a bad timestamp", one(&["at:timestamp"], "rows", json!([["yesterday"]])), "tables.t.rows[0][0]"),
        ("a CSV path with .", one(&n, "csv", json!("./a.csv")), "tables.t.csv"),
        ("an empty CSV path", one(&n, "csv", json!("")), "tables.t.csv"),
    ];
    for (what, manifest, place) in manifests {
        let reply = s
            .admin
            .post(
                "/datasets",
                json!({"namespace": "demo", "name": "x", "version": "1.0.0", "manifest": manifest}),
            )
            .await;
        assert_eq!(reply.status, 422, "{what}: {}", reply.body);
        reply.error(422, "invalid_manifest").says(place);
        assert_eq!(state(&s, &conn).await, before, "{what} changed something");
    }

    // The server: a table name in another case, a format twice, a prerelease that was never
    // registered, another dataset's hash, other methods.
    for (path, status) in [
        (
            "/datasets/demo/prices/versions/1.0.0/tables/Prices".to_owned(),
            404,
        ),
        (
            "/datasets/demo/prices/versions/1.0.0/tables/prices?format=csv&format=jsonl".to_owned(),
            400,
        ),
        (
            "/datasets/demo/prices/versions/1.0.0-rc.1/tables/prices".to_owned(),
            404,
        ),
        (
            format!("/datasets/demo/prices/versions/{other}/tables/prices"),
            404,
        ),
        (
            "/datasets/demo/prices/versions/1.0.0/tables/".to_owned(),
            404,
        ),
    ] {
        let reply = s.rows.get(&path).await;
        let code = if status == 404 {
            "not_found"
        } else {
            "invalid_request"
        };
        reply.error(status, code);
    }
    for method in [Method::DELETE, Method::PUT, Method::PATCH] {
        let reply = s
            .rows
            .call(
                method.clone(),
                "/datasets/demo/prices/versions/1.0.0/tables/prices",
                Body::None,
            )
            .await;
        reply.error(405, "method_not_allowed");
    }
    assert_eq!(
        state(&s, &conn).await,
        before,
        "the server changed something"
    );
    // The table is served as before.
    s.wait_rows("demo/prices", "1.0.0", "prices", &served).await;
    s.stop_all().await;
}

#[tokio::test]
async fn csv_sources_that_go_bad_after_registration_end_the_job_fatal_and_nothing_is_served() {
    let db = TestDb::migrated().await;
    let w = tests::unique_name("w");
    let s = Stack::start(
        db.url(),
        Setup {
            // Two rows per file: the bad row comes after files of the revision are written.
            workers: vec![(w.clone(), "rows_per_file = 2".to_owned())],
            ..Setup::default()
        },
    )
    .await;
    let sources = s.ws.sources_dir();
    let columns = ["id:int64", "symbol:string", "price:float64"];
    let good = "id,symbol,price\n1,ETH,1.5\n";
    // Each is registered while good (the controller checks the header), then changed.
    for name in ["row", "header", "link"] {
        std::fs::write(sources.join(format!("{name}.csv")), good).expect("write");
        let manifest = manifest("t", &columns, "csv", json!(format!("{name}.csv")));
        s.register(&format!("bad/{name}"), "1.0.0", &manifest).await;
    }
    // A bad row on line 6: the header is line 1, the third row's quoted field spans lines 4-5.
    std::fs::write(
        sources.join("row.csv"),
        "id,symbol,price\n1,ETH,1.5\n2,BTC,2.5\n3,\"multi\nline\",3.5\n4,SOL,oops\n5,DOT,5.5\n",
    )
    .expect("write");
    std::fs::write(sources.join("header.csv"), "id,price,symbol\n1,1.5,ETH\n").expect("write");
    // A symbolic link leading out of the sources directory, to a CSV that would be valid.
    let outside = s.ws.path().join("outside.csv");
    std::fs::write(&outside, good).expect("write");
    std::fs::remove_file(sources.join("link.csv")).expect("remove");
    std::os::unix::fs::symlink(&outside, sources.join("link.csv")).expect("symlink");

    for (name, reason) in [
        ("row", "bad_csv_row"),
        ("header", "bad_csv_header"),
        ("link", "source_outside"),
    ] {
        let dataset = format!("bad/{name}");
        let id = s.deploy_new(&dataset, "1.0.0", None).await;
        let job = s.wait_job(id, "FATAL").await;
        let detail = &job["detail"];
        assert_eq!(detail["reason"], reason, "{name}: {detail}");
        assert_eq!(detail["table"], "t", "{name}: {detail}");
        if name == "row" {
            assert_eq!(detail["row"], 6, "{detail}");
            assert_eq!(detail["column"], "price", "{detail}");
            // The file, line and column are named; the file's contents are not echoed.
            assert!(
                detail["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("line 6, column price") && !m.contains("oops")),
                "{detail}"
            );
        }
        let events: Vec<String> = s.events(id).await.into_iter().map(|e| e.0).collect();
        assert_eq!(events, ["SCHEDULED", "RUNNING", "FATAL"], "{name}");
        // Nothing activated, nothing served; what was written is collected.
        let (status, _, body) = s
            .fetch(&format!("/datasets/{dataset}/versions/1.0.0/tables/t"))
            .await;
        assert_eq!(status, 404, "{name}: {body}");
        eventually(
            &format!("{name}: the partial revision is collected"),
            WAIT,
            || s.logs(),
            || async {
                let table = s.table(&dataset, "1.0.0").await;
                table["active_revision"].is_null() && revision_ids(&table).is_empty()
            },
        )
        .await;
    }
    // Only the manifests are left in the data directory.
    let left: Vec<String> = std::fs::read_dir(s.ws.data_dir())
        .expect("the data directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "manifests")
        .flat_map(|ns| tests::api::list_files(&s.ws.data_dir().join(ns)))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    s.stop_all().await;
}

/// Starts a controller, a server and a worker at once on `url`, `auto_migrate` as given.
fn start_three(ws: &Workspace, url: &str, auto_migrate: bool) -> Vec<(String, Service)> {
    let (admin, served) = (free_addr(), free_addr());
    let node = tests::unique_name("w");
    let extra =
        format!("[controller]\nadmin_addr = \"{admin}\"\n\n[server]\naddr = \"{served}\"\n");
    let config = ws.config("config.toml", url, &extra);
    let env = [(
        "AMP_CONFIG_METADATA_DB__AUTO_MIGRATE",
        if auto_migrate { "true" } else { "false" },
    )];
    vec![
        (
            format!("controller {admin}"),
            Service::start("controller", &config, &["controller"], &env),
        ),
        (
            format!("server {served}"),
            Service::start("server", &config, &["server"], &env),
        ),
        (
            node.clone(),
            Service::start("worker", &config, &["worker", "--node-id", &node], &env),
        ),
    ]
}

#[tokio::test]
async fn services_started_together_on_an_empty_database_migrate_it_once_and_come_up() {
    let db = TestDb::empty().await;
    let ws = Workspace::new();
    let started = Instant::now();
    let mut services = start_three(&ws, db.url(), true);
    for (name, service) in &mut services {
        match name.split_once(' ') {
            Some((_, addr)) => {
                service
                    .wait_healthy(addr.parse().expect("an address"))
                    .await
            }
            None => {
                service
                    .wait_for_log(WAIT, |log| log.contains("worker started"))
                    .await
            }
        }
    }
    let up = secs(started);
    let conn = db.connect().await;
    let count = |table: &str| {
        let sql = format!("SELECT count(*) FROM {table}");
        let conn = &conn;
        async move { tests::sql::count(conn, &sql).await as usize }
    };
    let migrations = tests::schema_migration_count();
    assert_eq!(count("seaql_migrations").await, migrations);
    assert_eq!(count("ampd_migrations").await, migrations);
    let applied = format!("applied {migrations} migrations");
    let appliers: Vec<&str> = services
        .iter()
        .filter(|(_, s)| s.log().contains(&applied))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(appliers.len(), 1, "exactly one applies: {appliers:?}");
    let admin = services[0].0.split_once(' ').expect("controller").1;
    let ready = Api::new(admin.parse().expect("an address"), None);
    assert_eq!(
        ready.get("/readyz").await.ok(200),
        &json!({"status": "ready"})
    );
    eprintln!("e2e: three services on an empty database, all up in {up}");
    for (name, service) in services {
        let exit = service.stop().await;
        assert_eq!(exit.code, Some(0), "{name}:\n{}", exit.log);
    }
}

#[tokio::test]
async fn without_auto_migrate_each_service_refuses_a_stale_database_with_the_hint() {
    let db = TestDb::empty().await;
    let ws = Workspace::new();
    let hint = format!(
        "error: the metadata database is not migrated ({} pending migration(s)): run `ampd \
         migrate` first, or set metadata_db.auto_migrate = true",
        tests::schema_migration_count()
    );
    for (name, service) in start_three(&ws, db.url(), false) {
        let exit = service.wait().await;
        assert_eq!(exit.code, Some(1), "{name}:\n{}", exit.log);
        let errors: Vec<&str> = exit
            .log
            .lines()
            .filter(|l| l.starts_with("error:") || l.contains("caused by"))
            .collect();
        assert_eq!(errors, [hint.as_str()], "{name}:\n{}", exit.log);
        assert!(!exit.log.contains("panicked"), "{name}:\n{}", exit.log);
    }
    let conn = db.connect().await;
    assert!(
        tests::catalog::tables(&conn).await.is_empty(),
        "nothing was created"
    );
}

/// Runs `validator` on `doc` written to `file`: whether it passes, and what it said.
fn validate(validator: &Path, file: &Path, doc: &str) -> (bool, String) {
    std::fs::write(file, doc).expect("write the document");
    let out = std::process::Command::new(validator)
        .arg(file)
        .output()
        .expect("run openapi-spec-validator");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test]
async fn the_served_openapi_document_passes_an_independent_validator() {
    let test = "e2e::the_served_openapi_document_passes_an_independent_validator";
    let Some(validator) = tests::pinned_tool("openapi-validator", test) else {
        return;
    };
    let db = TestDb::migrated().await;
    let s = Stack::start(db.url(), Setup::default()).await;
    let response = s
        .admin
        .http()
        .get(s.admin.url("/openapi.json"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.expect("the document");
    let file = s.ws.path().join("openapi.json");
    let (valid, said) = validate(&validator, &file, &text);
    assert!(valid, "the served document is invalid: {said}");
    assert!(said.contains("OK"), "{said}");

    // The validator does look: the same document without a required part is refused.
    let doc: Value = serde_json::from_str(&text).expect("JSON");
    let mut no_info = doc.clone();
    no_info.as_object_mut().expect("an object").remove("info");
    let mut no_description = doc.clone();
    no_description["paths"]["/healthz"]["get"]["responses"]["200"]
        .as_object_mut()
        .expect("a response")
        .remove("description");
    for (what, broken) in [
        ("no info", no_info),
        ("a response without description", no_description),
    ] {
        let (valid, said) = validate(&validator, &file, &broken.to_string());
        assert!(!valid, "{what} passed: {said}");
    }
    s.stop_all().await;
}
