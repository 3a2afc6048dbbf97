//! `ampd server` as a user runs it: the rows of a table's active revision served as JSON Lines and
//! as CSV, new revisions and roll backs served without a restart, 404s and 400s, paths that try
//! to leave the data directory refused, large tables streamed in constant memory, and requests
//! that complete on their revision while the garbage collector deletes its files.
//!
//! Revisions are produced through `ampd::metadata` directly, as a worker does: a manifest, a table,
//! a job claim (a registered worker, `schedule`, `mark_running`), `create_revision`, part files
//! under `<data_dir>/<revision path>/`, `files::register`, `mark_completed`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ampd::manifest::{
    Column, ColumnType, FORMAT_JSONL, FileMeta, MATERIALIZE_STATIC, RevisionMeta, RowEncoder,
    manifest_path, part_file_name,
};
use ampd::metadata::jobs::{self, JobClaim};
use ampd::metadata::{datasets, files, revisions, workers};
use ampd::service::gc;
use entity::physical_table_revisions;
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::json;
use sha2::{Digest, Sha256};
use tests::TestDb;
use tests::services::{Service, Workspace, free_addr};

const NS: &str = "eth";
const HOUR: Duration = Duration::from_secs(3600);
/// A re-read interval longer than any test: only notifications (or requests) move the view.
const NEVER_MS: u64 = 3_600_000;

/// An `ampd server` on a fresh database and workspace.
struct Served {
    // Dropped in this order: the process first, the database last.
    server: Service,
    addr: SocketAddr,
    client: reqwest::Client,
    db: DatabaseConnection,
    ws: Workspace,
    _db: TestDb,
}

impl Served {
    /// Starts the server (auto_migrate on) re-reading every table each `reconcile_ms`, and waits
    /// for `/healthz`.
    async fn start(reconcile_ms: u64) -> Served {
        let test_db = TestDb::migrated().await;
        let db = test_db.connect().await;
        let ws = Workspace::new();
        let addr = free_addr();
        let config = ws.config(
            "server.toml",
            test_db.url(),
            &format!("[server]\naddr = \"{addr}\"\nreconcile_interval_ms = {reconcile_ms}\n"),
        );
        let mut server = Service::start(
            "server",
            &config,
            &["server"],
            &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
        );
        server.wait_healthy(addr).await;
        Served {
            server,
            addr,
            client: reqwest::Client::new(),
            db,
            ws,
            _db: test_db,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn rows_url(&self, name: &str, reference: &str, table: &str) -> String {
        self.url(&format!(
            "/datasets/{NS}/{name}/versions/{reference}/tables/{table}"
        ))
    }

    async fn get(&self, url: &str, accept: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(url);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.send().await.expect("request")
    }

    /// Status and body of `GET url`.
    async fn text(&self, url: &str) -> (StatusCode, String) {
        let response = self.get(url, None).await;
        (response.status(), response.text().await.expect("body"))
    }

    /// Waits (at most 20 s) until `GET url` answers 200 with `expected`.
    async fn wait_for_body(&self, url: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.text(url).await;
            if status == StatusCode::OK && body == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{url} still answers {status} {body:?}, not {expected:?}:\n{}",
                self.server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts that `GET url` answers `status` with a JSON error body, and returns the body.
    async fn error(&self, url: &str, status: StatusCode) -> serde_json::Value {
        let response = self.get(url, None).await;
        assert_eq!(response.status(), status, "{url}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(content_type, "application/json", "{url}");
        let body: serde_json::Value = response.json().await.expect("JSON error body");
        assert!(
            body["error_code"].is_string() && body["error_message"].is_string(),
            "{url}: {body}"
        );
        body
    }
}

fn columns() -> Vec<Column> {
    [
        ("symbol", ColumnType::String),
        ("price", ColumnType::Float64),
        ("volume", ColumnType::Int64),
        ("listed", ColumnType::Bool),
        ("at", ColumnType::Timestamp),
    ]
    .into_iter()
    .map(|(name, ty)| Column {
        name: name.to_owned(),
        ty,
    })
    .collect()
}

/// The JSON Lines a materialization writes for `rows` of [`columns`].
fn jsonl(rows: &[serde_json::Value]) -> String {
    let encoder = RowEncoder::new(&columns());
    let mut out = Vec::new();
    for row in rows {
        let values = row.as_array().expect("a row is an array");
        encoder.encode_json(values, &mut out).expect("row fits");
    }
    String::from_utf8(out).expect("utf-8")
}

/// Registers a static manifest with table `table` of [`columns`], links it to `eth/<name>` and
/// tags it `version`. Returns its hash.
async fn dataset(db: &DatabaseConnection, name: &str, version: &str, table: &str) -> String {
    let manifest = json!({"kind": "static", "tables": {table: {"columns": columns(), "rows": []}}});
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let hash = datasets::manifest_hash(&bytes);
    datasets::register_manifest(db, "static", &bytes, &manifest_path(&hash))
        .await
        .unwrap();
    datasets::link(db, NS, name, &hash).await.unwrap();
    datasets::tag(db, NS, name, version, &hash).await.unwrap();
    hash
}

/// A revision being written by a running job attempt.
struct Writing {
    claim: JobClaim,
    revision: physical_table_revisions::Model,
    files: usize,
}

/// Starts writing table `table` of manifest `hash` of `eth/<name>` as a worker does: the job that
/// materializes the manifest (a new one when the last one completed), running on worker `w1`, and
/// a new revision of the table.
async fn begin(db: &DatabaseConnection, name: &str, hash: &str, table: &str) -> Writing {
    workers::register(db, "w1", json!({})).await.unwrap();
    let descriptor = json!({"namespace": NS, "name": name, "manifest_hash": hash});
    let (mut job, _) = jobs::schedule(db, MATERIALIZE_STATIC, descriptor.clone(), Some("w1"))
        .await
        .unwrap();
    if job.status == "COMPLETED" {
        jobs::delete(db, job.id).await.unwrap();
        job = jobs::schedule(db, MATERIALIZE_STATIC, descriptor, Some("w1"))
            .await
            .unwrap()
            .0;
    }
    let claim = JobClaim::of(&job).unwrap();
    jobs::mark_running(db, &claim).await.unwrap();
    let table = revisions::register_table(db, NS, name, hash, table)
        .await
        .unwrap();
    let meta = RevisionMeta {
        format: FORMAT_JSONL.to_owned(),
        columns: columns(),
        rows: 0,
    };
    let revision = revisions::create_revision(
        db,
        table.id,
        Some(&claim),
        serde_json::to_value(meta).unwrap(),
    )
    .await
    .unwrap();
    Writing {
        claim,
        revision,
        files: 0,
    }
}

impl Writing {
    /// The path of the next part file under `data_dir`, its directory created.
    fn next_path(&self, data_dir: &Path) -> PathBuf {
        let dir = data_dir.join(&self.revision.path);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(part_file_name(self.files))
    }

    /// Registers the next part file, already written at [`Writing::next_path`].
    async fn register(&mut self, db: &DatabaseConnection, data_dir: &Path, rows: u64) {
        let path = self.next_path(data_dir);
        let bytes = std::fs::read(&path).unwrap();
        let meta = FileMeta {
            rows,
            sha256: hex::encode(Sha256::digest(&bytes)),
        };
        files::register(
            db,
            self.revision.id,
            &part_file_name(self.files),
            bytes.len() as i64,
            None,
            None,
            serde_json::to_value(meta).unwrap(),
        )
        .await
        .unwrap();
        self.files += 1;
    }

    /// Writes and registers `content` as the next part file.
    async fn part(&mut self, db: &DatabaseConnection, data_dir: &Path, content: &str) {
        std::fs::write(self.next_path(data_dir), content).unwrap();
        self.register(db, data_dir, content.lines().count() as u64)
            .await;
    }

    /// Completes the job: the revision becomes active, the one it replaces is collected after
    /// `grace`. Returns the revision's id.
    async fn complete(self, db: &DatabaseConnection, grace: Duration) -> i64 {
        jobs::mark_completed(db, &self.claim, &[self.revision.id], grace)
            .await
            .unwrap();
        self.revision.id
    }
}

/// Materializes table `table` with `parts` as its files (see [`begin`]). Returns the revision's id.
async fn materialize(served: &Served, name: &str, hash: &str, table: &str, parts: &[&str]) -> i64 {
    let mut writing = begin(&served.db, name, hash, table).await;
    for part in parts {
        writing.part(&served.db, &served.ws.data_dir(), part).await;
    }
    writing.complete(&served.db, HOUR).await
}

async fn table_id(db: &DatabaseConnection, hash: &str, table: &str) -> i64 {
    revisions::list_tables_of_manifest(db, NS, "prices", hash)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.table_name == table)
        .expect("table registered")
        .id
}

#[tokio::test]
async fn rows_are_served_as_json_lines_and_as_csv_across_part_files() {
    let served = Served::start(NEVER_MS).await;
    let hash = dataset(&served.db, "prices", "1.0.0", "quotes").await;
    let parts = [
        jsonl(&[
            json!(["ETH", 3100.5, 12, true, "2024-05-01T12:00:00Z"]),
            json!(["BTC", 91000.0, -3, false, "2024-05-01T14:00:01+02:00"]),
        ]),
        jsonl(&[json!([
            "a, \"quoted\"\nline",
            0.25,
            0,
            true,
            "2024-05-02T00:00:00Z"
        ])]),
    ];
    materialize(&served, "prices", &hash, "quotes", &[&parts[0], &parts[1]]).await;
    let expected_jsonl = parts.concat();
    let expected_csv = "symbol,price,volume,listed,at\n\
                        ETH,3100.5,12,true,2024-05-01T12:00:00Z\n\
                        BTC,91000.0,-3,false,2024-05-01T12:00:01Z\n\
                        \"a, \"\"quoted\"\"\nline\",0.25,0,true,2024-05-02T00:00:00Z\n";

    for reference in ["1.0.0", "latest", "dev", hash.as_str()] {
        let url = served.rows_url("prices", reference, "quotes");
        let response = served.get(&url, None).await;
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        assert_eq!(
            response.headers()["content-type"],
            "application/x-ndjson",
            "{url}"
        );
        assert_eq!(
            response.headers()["content-length"],
            expected_jsonl.len().to_string().as_str(),
            "{url}"
        );
        assert_eq!(response.text().await.unwrap(), expected_jsonl, "{url}");
    }

    let url = served.rows_url("prices", "1.0.0", "quotes");
    for (url, accept) in [
        (format!("{url}?format=csv"), None),
        (url.clone(), Some("text/csv")),
        (url.clone(), Some("text/csv;q=0.9, */*;q=0.1")),
    ] {
        let response = served.get(&url, accept).await;
        assert_eq!(response.status(), StatusCode::OK, "{url} {accept:?}");
        assert_eq!(
            response.headers()["content-type"],
            "text/csv; charset=utf-8",
            "{url} {accept:?}"
        );
        assert_eq!(
            response.text().await.unwrap(),
            expected_csv,
            "{url} {accept:?}"
        );
    }
    // The query wins over Accept.
    let response = served
        .get(&format!("{url}?format=jsonl"), Some("text/csv"))
        .await;
    assert_eq!(response.text().await.unwrap(), expected_jsonl);

    let exit = served.server.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    assert!(
        exit.log.contains("status=200") && exit.log.contains("path=/datasets/eth/prices"),
        "request logs: {}",
        exit.log
    );
}

#[tokio::test]
async fn a_new_revision_and_a_roll_back_are_served_without_a_restart() {
    let served = Served::start(NEVER_MS).await;
    let hash = dataset(&served.db, "prices", "1.0.0", "quotes").await;
    let url = served.rows_url("prices", "latest", "quotes");
    let v1 = jsonl(&[json!(["ETH", 1.0, 1, true, "2024-05-01T00:00:00Z"])]);
    let first = materialize(&served, "prices", &hash, "quotes", &[&v1]).await;
    served.wait_for_body(&url, &v1).await;

    // A second completed job of the re-created job: its revision replaces the first.
    let v2 = jsonl(&[
        json!(["ETH", 2.0, 2, false, "2024-05-02T00:00:00Z"]),
        json!(["BTC", 3.0, 3, true, "2024-05-03T00:00:00Z"]),
    ]);
    materialize(&served, "prices", &hash, "quotes", &[&v2]).await;
    served.wait_for_body(&url, &v2).await;

    // A roll back to the first revision.
    let table = table_id(&served.db, &hash, "quotes").await;
    revisions::activate(&served.db, table, first, HOUR)
        .await
        .unwrap();
    served.wait_for_body(&url, &v1).await;
    assert!(
        served.server.log().contains("active revision changed"),
        "{}",
        served.server.log()
    );
}

/// Two revisions of table `quotes`, the second one served; then the first one made active again
/// behind the layer's back, so that no notification announces it. Returns the URL and the rows of
/// the first and the second revision.
async fn roll_back_unannounced(served: &Served) -> (String, String, String) {
    let hash = dataset(&served.db, "prices", "1.0.0", "quotes").await;
    let url = served.rows_url("prices", "1.0.0", "quotes");
    let v1 = jsonl(&[json!(["ETH", 1.0, 1, true, "2024-05-01T00:00:00Z"])]);
    let v2 = jsonl(&[json!(["BTC", 2.0, 2, true, "2024-05-02T00:00:00Z"])]);
    let first = materialize(served, "prices", &hash, "quotes", &[&v1]).await;
    materialize(served, "prices", &hash, "quotes", &[&v2]).await;
    served.wait_for_body(&url, &v2).await;
    served
        .db
        .execute_unprepared(&format!(
            "UPDATE physical_tables SET active_revision_id = {first} \
             WHERE active_revision_id IS NOT NULL"
        ))
        .await
        .unwrap();
    (url, v1, v2)
}

#[tokio::test]
async fn the_periodic_re_read_finds_a_change_no_notification_announced() {
    let served = Served::start(200).await;
    let (url, v1, _) = roll_back_unannounced(&served).await;
    served.wait_for_body(&url, &v1).await;
}

#[tokio::test]
async fn a_reconnected_listener_re_reads_the_whole_view() {
    let served = Served::start(NEVER_MS).await;
    // As if the roll back's notification had been lost: the view still names the second revision
    // until the listener's connection is terminated; only the re-read after it reconnects can see
    // the change.
    let (url, v1, v2) = roll_back_unannounced(&served).await;
    let (status, body) = served.text(&url).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, v2.as_str()));
    served
        .db
        .execute_unprepared(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = '{}'",
            ampd::metadata::notifications::LISTENER_APPLICATION_NAME
        ))
        .await
        .unwrap();
    served.wait_for_body(&url, &v1).await;
    assert!(
        served
            .server
            .log()
            .contains("notification listener connected again"),
        "{}",
        served.server.log()
    );
}

#[tokio::test]
async fn unknown_names_are_404_and_bad_references_or_formats_400_all_as_json() {
    let served = Served::start(NEVER_MS).await;
    let hash = dataset(&served.db, "prices", "1.0.0", "quotes").await;
    let rows = jsonl(&[json!(["ETH", 1.0, 1, true, "2024-05-01T00:00:00Z"])]);
    materialize(&served, "prices", &hash, "quotes", &[&rows]).await;
    // A table of the manifest that was never materialized.
    revisions::register_table(&served.db, NS, "prices", &hash, "pending")
        .await
        .unwrap();
    served
        .wait_for_body(&served.rows_url("prices", "1.0.0", "quotes"), &rows)
        .await;

    let other_hash = "b".repeat(64);
    for path in [
        "/datasets/eth/nothing/versions/1.0.0/tables/quotes".to_owned(),
        "/datasets/btc/prices/versions/1.0.0/tables/quotes".to_owned(),
        "/datasets/eth/prices/versions/2.0.0/tables/quotes".to_owned(),
        format!("/datasets/eth/prices/versions/{other_hash}/tables/quotes"),
        "/datasets/eth/prices/versions/1.0.0/tables/nothing".to_owned(),
        "/datasets/eth/prices/versions/1.0.0/tables/pending".to_owned(),
        "/datasets/eth/prices/versions/1.0.0".to_owned(),
        "/nowhere".to_owned(),
    ] {
        let body = served
            .error(&served.url(&path), StatusCode::NOT_FOUND)
            .await;
        assert_eq!(body["error_code"], "not_found", "{path}: {body}");
    }
    let body = served
        .error(
            &served.rows_url("prices", "1.0.0", "pending"),
            StatusCode::NOT_FOUND,
        )
        .await;
    assert!(
        body["error_message"]
            .as_str()
            .unwrap()
            .contains("no active revision"),
        "{body}"
    );

    for path in [
        "/datasets/eth/prices/versions/v1/tables/quotes",
        "/datasets/eth/prices/versions/1.0/tables/quotes",
        "/datasets/eth/prices/versions/LATEST/tables/quotes",
        "/datasets/Eth/prices/versions/1.0.0/tables/quotes",
        "/datasets/eth/prices/versions/1.0.0/tables/quotes?format=xml",
        "/datasets/eth/prices/versions/1.0.0/tables/quotes?format=",
    ] {
        let body = served
            .error(&served.url(path), StatusCode::BAD_REQUEST)
            .await;
        assert_eq!(body["error_code"], "invalid_request", "{path}: {body}");
    }

    let response = served
        .client
        .post(served.rows_url("prices", "1.0.0", "quotes"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_revision_path_that_leaves_the_data_directory_is_refused() {
    let served = Served::start(NEVER_MS).await;
    let outside = served.ws.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = "{\"symbol\":\"SECRET\"}\n";
    std::fs::write(outside.join(part_file_name(0)), secret).unwrap();

    for (name, path) in [
        ("dotdot", "../outside".to_owned()),
        ("absolute", outside.display().to_string()),
        ("inner", "eth/inner/quotes/../../../../outside".to_owned()),
    ] {
        let hash = dataset(&served.db, name, "1.0.0", "quotes").await;
        let mut writing = begin(&served.db, name, &hash, "quotes").await;
        writing
            .part(&served.db, &served.ws.data_dir(), secret)
            .await;
        // Behind the layer's back: the stored path now leads outside the data directory.
        served
            .db
            .execute_unprepared(&format!(
                "UPDATE physical_table_revisions SET path = '{path}' WHERE id = {}",
                writing.revision.id
            ))
            .await
            .unwrap();
        writing.complete(&served.db, HOUR).await;

        let url = served.rows_url(name, "1.0.0", "quotes");
        let (status, body) = served.text(&url).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}: {body}");
        assert!(!body.contains("SECRET"), "{path}: {body}");
        assert!(body.contains("not a plain relative path"), "{path}: {body}");
    }
}

/// `VmHWM` (peak resident set) of process `pid`, in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Reads `response`'s body chunk by chunk: its length and sha256.
async fn digest(mut response: reqwest::Response) -> (u64, String) {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = response.chunk().await.expect("body chunk") {
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (len, hex::encode(hasher.finalize()))
}

#[tokio::test]
async fn a_large_table_streams_in_constant_memory() {
    const FILES: usize = 4;
    const ROWS_PER_FILE: u64 = 360_000;
    let served = Served::start(NEVER_MS).await;
    let hash = dataset(&served.db, "prices", "1.0.0", "quotes").await;
    let mut writing = begin(&served.db, "prices", &hash, "quotes").await;
    let data_dir = served.ws.data_dir();
    let mut whole = Sha256::new();
    let mut total = 0u64;
    let padding = "x".repeat(40);
    for f in 0..FILES {
        let path = writing.next_path(&data_dir);
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..ROWS_PER_FILE {
            let n = f as u64 * ROWS_PER_FILE + i;
            let line = format!(
                "{{\"symbol\":\"S{n:010} {padding}\",\"price\":{n}.5,\"volume\":{n},\"listed\":true,\"at\":\"2024-05-01T00:00:00Z\"}}\n"
            );
            whole.update(line.as_bytes());
            total += line.len() as u64;
            out.write_all(line.as_bytes()).unwrap();
        }
        out.flush().unwrap();
        drop(out);
        writing.register(&served.db, &data_dir, ROWS_PER_FILE).await;
    }
    writing.complete(&served.db, HOUR).await;
    assert!(total > 200_000_000, "{total} bytes");
    let before = peak_rss_kb(served.server.pid());

    let url = served.rows_url("prices", "1.0.0", "quotes");
    let started = Instant::now();
    let response = served.get(&url, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.content_length(), Some(total));
    let (len, sha) = digest(response).await;
    let took = started.elapsed();
    assert_eq!(len, total);
    assert_eq!(sha, hex::encode(whole.finalize()));
    let after_jsonl = peak_rss_kb(served.server.pid());

    let started_csv = Instant::now();
    let response = served.get(&format!("{url}?format=csv"), None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (csv_len, _) = digest(response).await;
    let took_csv = started_csv.elapsed();
    let after_csv = peak_rss_kb(served.server.pid());
    eprintln!(
        "large table: {total} bytes of JSON Lines in {FILES} files; served in {took:?} \
         (CSV: {csv_len} bytes in {took_csv:?}); server peak RSS {before} kB before, \
         {after_jsonl} kB after the JSON Lines download, {after_csv} kB after the CSV one"
    );
    assert!(
        after_csv < 64 * 1024,
        "the server's peak RSS grew to {after_csv} kB serving {total} bytes"
    );
}

/// A part file of about 8 MiB; three of them are far more than the sockets between server and
/// client buffer.
fn eight_mib_part() -> String {
    let line = format!(
        "{{\"symbol\":\"{}\",\"price\":1.0,\"volume\":1,\"listed\":true,\"at\":\"2024-05-01T00:00:00Z\"}}\n",
        "y".repeat(950)
    );
    line.repeat(8 * 1024 * 1024 / line.len())
}

#[tokio::test]
async fn a_request_completes_on_its_revision_while_the_collector_deletes_its_files() {
    let served = Served::start(NEVER_MS).await;
    let hash = dataset(&served.db, "prices", "1.0.0", "quotes").await;
    let data_dir = served.ws.data_dir();
    let part = eight_mib_part();
    let old = materialize(&served, "prices", &hash, "quotes", &[&part, &part, &part]).await;
    let expected = part.repeat(3);
    let url = served.rows_url("prices", "1.0.0", "quotes");

    // Start a request and read only its first chunk: the server has opened every file by then.
    let mut response = served.get(&url, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let first = response.chunk().await.unwrap().expect("a first chunk");

    // A new revision replaces it with no grace period, and the collector deletes its files.
    let new_rows = jsonl(&[json!(["NEW", 1.0, 1, true, "2024-05-01T00:00:00Z"])]);
    let mut writing = begin(&served.db, "prices", &hash, "quotes").await;
    writing.part(&served.db, &data_dir, &new_rows).await;
    writing.complete(&served.db, Duration::ZERO).await;
    let old_dir = data_dir.join(revisions::get(&served.db, old).await.unwrap().unwrap().path);
    let collected = gc::collect(&served.db, &data_dir).await.unwrap();
    assert_eq!(
        (collected.files, collected.revisions),
        (3, 1),
        "{collected:?}"
    );
    assert!(!old_dir.exists(), "the old revision's files are deleted");

    // The request completes, on the old revision, byte for byte.
    let mut body = first.to_vec();
    while let Some(chunk) = response.chunk().await.expect("the rest of the body") {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body.len(), expected.len());
    assert!(body == expected.as_bytes(), "the old revision's rows");

    // New requests get the new revision.
    served.wait_for_body(&url, &new_rows).await;
    let exit = served.server.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
}

#[tokio::test]
async fn a_stop_cuts_off_a_stalled_download_and_exits_0() {
    let served = Served::start(NEVER_MS).await;
    let hash = dataset(&served.db, "prices", "1.0.0", "quotes").await;
    let part = eight_mib_part();
    materialize(&served, "prices", &hash, "quotes", &[&part, &part, &part]).await;
    let total = 3 * part.len();

    // A client that reads one chunk and then nothing more.
    let url = served.rows_url("prices", "1.0.0", "quotes");
    let mut response = served.get(&url, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut read = response
        .chunk()
        .await
        .unwrap()
        .expect("a first chunk")
        .len();

    let exit = served.server.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    assert!(
        exit.took < Duration::from_secs(20),
        "took {:?} to stop:\n{}",
        exit.took,
        exit.log
    );
    assert!(exit.log.contains("cutting them off"), "{}", exit.log);
    eprintln!("stopped in {:?} with a stalled download", exit.took);

    // What the sockets had buffered arrives, then the connection ends before the whole body: the
    // client can tell the response was cut off.
    let ended = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(ended.is_err(), "the body ended cleanly after {read} bytes");
    assert!(read < total, "{read} of {total} bytes");
}

#[tokio::test]
async fn a_stale_view_whose_files_are_gone_re_reads_the_table_or_answers_503() {
    let served = Served::start(NEVER_MS).await;
    let hash = dataset(&served.db, "prices", "1.0.0", "quotes").await;
    let data_dir = served.ws.data_dir();
    let url = served.rows_url("prices", "1.0.0", "quotes");
    let v1 = jsonl(&[json!(["ETH", 1.0, 1, true, "2024-05-01T00:00:00Z"])]);
    let first = materialize(&served, "prices", &hash, "quotes", &[&v1]).await;
    served.wait_for_body(&url, &v1).await;

    // Behind the layer's back (no notification): another revision becomes active and the first
    // one's files disappear. The view still names the first.
    let table = table_id(&served.db, &hash, "quotes").await;
    let second = revisions::create_revision(&served.db, table, None, {
        let meta = RevisionMeta {
            format: FORMAT_JSONL.to_owned(),
            columns: columns(),
            rows: 1,
        };
        serde_json::to_value(meta).unwrap()
    })
    .await
    .unwrap();
    let v2 = jsonl(&[json!(["BTC", 2.0, 2, true, "2024-05-02T00:00:00Z"])]);
    let dir = data_dir.join(&second.path);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(part_file_name(0)), &v2).unwrap();
    files::register(
        &served.db,
        second.id,
        &part_file_name(0),
        v2.len() as i64,
        None,
        None,
        json!({}),
    )
    .await
    .unwrap();
    served
        .db
        .execute_unprepared(&format!(
            "UPDATE physical_tables SET active_revision_id = {} WHERE id = {table}",
            second.id
        ))
        .await
        .unwrap();
    let first_path = revisions::get(&served.db, first)
        .await
        .unwrap()
        .unwrap()
        .path;
    std::fs::remove_dir_all(data_dir.join(first_path)).unwrap();

    // The request finds the first revision's file gone, re-reads the table and serves the second.
    let (status, body) = served.text(&url).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, v2.as_str()));
    assert!(
        served.server.log().contains("re-reading the table"),
        "{}",
        served.server.log()
    );

    // When the current revision's files are gone too: 503, saying so.
    std::fs::remove_dir_all(&dir).unwrap();
    let body = served.error(&url, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["error_code"], "unavailable", "{body}");
    assert!(
        body["error_message"]
            .as_str()
            .unwrap()
            .contains("try again"),
        "{body}"
    );
}

#[tokio::test]
async fn a_port_in_use_is_a_one_line_error_and_exit_1() {
    let test_db = TestDb::migrated().await;
    let ws = Workspace::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = ws.config(
        "server.toml",
        test_db.url(),
        &format!("[server]\naddr = \"{addr}\"\n"),
    );
    let exit = Service::start("server", &config, &["server"], &[])
        .wait()
        .await;
    assert_eq!(exit.code, Some(1), "{}", exit.log);
    let errors: Vec<&str> = exit
        .log
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", exit.log);
    assert!(
        errors[0].contains(&format!("error: cannot listen on {addr} (server.addr): "))
            && errors[0].contains("another process listens there"),
        "{}",
        exit.log
    );
    assert!(!exit.log.contains("caused by"), "{}", exit.log);
    eprintln!("{}", errors[0]);
    drop(taken);
}
