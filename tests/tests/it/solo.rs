//! `ampd solo` run as a user runs it: no config file, each test in an amp directory of its own
//! (`AMP_DIR`), the admin API and the server on free ports given by `AMP_CONFIG_CONTROLLER__ADMIN_ADDR`
//! and `AMP_CONFIG_SERVER__ADDR`. Without `metadata_db.url` solo runs its own PostgreSQL in the amp
//! directory; these tests start, stop, kill and restart it, and check what survives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::TestDb;
use tests::cli::{self, TempDir};
use tests::services::{Exit, Service, eventually, free_addr};

/// What solo logs when it runs initdb.
const INITDB_LINE: &str = "creating the managed PostgreSQL cluster (initdb)";

/// An amp directory (`<temp>/amp`, created by solo) in a temporary directory. On drop, a PostgreSQL
/// a failed test left running on it is stopped, so nothing outlives the test.
struct AmpDir {
    temp: TempDir,
}

impl AmpDir {
    fn new() -> AmpDir {
        AmpDir {
            temp: TempDir::new(),
        }
    }

    fn path(&self) -> PathBuf {
        self.temp.path().join("amp")
    }

    fn metadb(&self) -> PathBuf {
        self.path().join("metadb")
    }

    /// The pid `metadb/postmaster.pid` names, if the file exists.
    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.metadb().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn postgres_log(&self) -> String {
        std::fs::read_to_string(self.path().join("postgres.log")).unwrap_or_default()
    }

    /// The managed database's URL, as solo wrote it to `metadb.toml`.
    fn url(&self) -> String {
        let config = ampd::config::Config::load(&self.path().join("metadb.toml"))
            .expect("metadb.toml is a config file");
        let url = config.metadata_db.url.expect("a url");
        url.expose().to_owned()
    }
}

impl Drop for AmpDir {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = ampd::postgres::stop_server(pid, &self.metadb(), Duration::from_secs(5));
        }
    }
}

/// A running `ampd solo`.
struct Solo {
    service: Service,
    admin: SocketAddr,
    server: SocketAddr,
    http: reqwest::Client,
}

impl Solo {
    /// `ampd solo <args>` on `amp`, with `env`, listening on free ports; not waited for.
    fn spawn(amp: &AmpDir, args: &[&str], env: &[(&str, &str)]) -> Solo {
        let (admin, server) = (free_addr(), free_addr());
        let mut cmd = tokio::process::Command::new(cli::ampd());
        cmd.arg("solo").args(args);
        let amp_dir = amp.path().display().to_string();
        let (admin_s, server_s) = (admin.to_string(), server.to_string());
        let mut all = vec![
            ("AMP_DIR", amp_dir.as_str()),
            ("AMP_CONFIG_CONTROLLER__ADMIN_ADDR", admin_s.as_str()),
            ("AMP_CONFIG_SERVER__ADDR", server_s.as_str()),
        ];
        all.extend_from_slice(env);
        Solo {
            service: Service::spawn("ampd solo", cmd, &all),
            admin,
            server,
            http: tests::api::client(),
        }
    }

    /// [`spawn`](Self::spawn), then waits until the admin API and the server answer.
    async fn start(amp: &AmpDir, env: &[(&str, &str)]) -> Solo {
        let mut solo = Solo::spawn(amp, &[], env);
        solo.wait_healthy().await;
        solo
    }

    async fn wait_healthy(&mut self) {
        self.service.wait_healthy(self.admin).await;
        self.service.wait_healthy(self.server).await;
    }

    fn log(&self) -> String {
        self.service.log()
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("http://{}{path}", self.admin));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin API answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.admin(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Registers the example dataset shipped in the repository, as the README's quick start does.
    async fn register_example(&self) {
        let (status, body) = self
            .admin(reqwest::Method::POST, "/datasets", Some(example()))
            .await;
        assert_eq!(status, 201, "register: {body}");
    }

    /// Deploys version `version` of the example and waits until its job has completed; its id.
    async fn deploy(&self, version: &str) -> i64 {
        let path = format!("/datasets/demo/prices/versions/{version}/deploy");
        let (status, body) = self.admin(reqwest::Method::POST, &path, None).await;
        assert_eq!(status, 202, "deploy: {body}");
        let id = body["job_id"].as_i64().expect("a job id");
        eventually(&format!("job {id} completes"), || async {
            self.get(&format!("/jobs/{id}")).await["status"] == "COMPLETED"
        })
        .await;
        id
    }

    /// The rows the server serves for the example's table, one JSON value per row.
    async fn rows(&self, version: &str) -> Vec<Value> {
        let url = format!(
            "http://{}/datasets/demo/prices/versions/{version}/tables/prices",
            self.server
        );
        let response = self.http.get(&url).send().await.expect("server answers");
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let text = response.text().await.expect("rows");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }

    /// Asserts that the example's version 1.0.0 is deployed: `job` completed, with its events,
    /// and the rows are served.
    async fn assert_deployed(&self, job: i64) {
        let history = self.get(&format!("/jobs/{job}")).await;
        assert_eq!(history["status"], "COMPLETED", "{history}");
        let events = self.get(&format!("/jobs/{job}/events")).await;
        assert!(
            events["events"].as_array().is_some_and(|e| e.len() >= 2),
            "the job's events: {events}"
        );
        assert_eq!(self.rows("1.0.0").await, example_rows());
    }

    /// SIGTERM; asserts a clean stop ([`assert_clean_stop`]).
    async fn stop_cleanly(self, amp: &AmpDir) -> Exit {
        let postmaster = amp.postmaster_pid().expect("postmaster.pid while running");
        let exit = self.service.stop().await;
        assert_clean_stop(amp, &exit, postmaster);
        exit
    }
}

/// `examples/prices.json`, the quick start's dataset.
fn example() -> Value {
    let path = cli::workspace_root().join("examples/prices.json");
    let text = std::fs::read_to_string(&path).expect("examples/prices.json");
    serde_json::from_str(&text).expect("the example is JSON")
}

/// The example's rows as the server serves them: objects keyed by column name.
fn example_rows() -> Vec<Value> {
    let table = &example()["manifest"]["tables"]["prices"];
    let columns: Vec<&str> = table["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().expect("a name"))
        .collect();
    table["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| {
            let values = row.as_array().expect("a row");
            Value::Object(
                columns
                    .iter()
                    .zip(values)
                    .map(|(c, v)| ((*c).to_owned(), v.clone()))
                    .collect(),
            )
        })
        .collect()
}

/// Whether process `pid` is running.
fn alive(pid: u32) -> bool {
    ampd::postgres::process::alive(pid)
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process this test started or identified.
    unsafe { libc::kill(pid as i32, signal) };
}

/// The parent of process `pid`.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let (_, rest) = stat.rsplit_once(')').expect("a stat line");
    rest.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("a parent pid")
}

/// The managed cluster's system identifier, which `initdb` chooses anew for every cluster.
async fn system_identifier(url: &str) -> String {
    let db = tests::connect(url, 1).await;
    let id: String = tests::sql::value(
        &db,
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .await;
    let _ = db.close().await;
    id
}

/// Asserts a clean stop: exit 0, the services stopped and the pool closed before PostgreSQL got
/// its fast shutdown, which it completed (no `postmaster.pid` left, the postmaster gone).
fn assert_clean_stop(amp: &AmpDir, exit: &Exit, postmaster: u32) {
    assert_eq!(exit.code, Some(0), "exit 0 after SIGTERM:\n{}", exit.log);
    let services = exit
        .log
        .find("services stopped, database pool closed")
        .unwrap_or_else(|| panic!("the services stopped:\n{}", exit.log));
    let postgres = exit
        .log
        .find("PostgreSQL stopped")
        .unwrap_or_else(|| panic!("PostgreSQL stopped:\n{}", exit.log));
    assert!(services < postgres, "services first:\n{}", exit.log);
    let log = amp.postgres_log();
    assert!(log.contains("received fast shutdown request"), "{log}");
    assert!(
        log.trim_end().ends_with("database system is shut down"),
        "{log}"
    );
    assert!(!amp.metadb().join("postmaster.pid").exists());
    assert!(!alive(postmaster), "postmaster {postmaster} is gone");
}

#[tokio::test]
async fn cold_start_serves_a_deployed_dataset_and_a_warm_start_keeps_everything() {
    let amp = AmpDir::new();
    let started = Instant::now();
    let solo = Solo::start(&amp, &[]).await;
    let cold = started.elapsed();
    let log = solo.log();
    assert!(log.contains(INITDB_LINE), "{log}");
    // The banner says where everything is.
    let url = amp.url();
    for line in [
        format!("amp dir       {}", amp.path().display()),
        format!("database      {url}"),
        format!("admin API     http://{}", solo.admin),
        format!("server        http://{}", solo.server),
        "worker        solo".to_owned(),
        format!("data          {}", amp.path().join("data").display()),
        format!(
            "ampd --config {} migrate status",
            amp.path().join("metadb.toml").display()
        ),
    ] {
        assert!(log.contains(&line), "{line:?} in the banner:\n{log}");
    }
    assert!(amp.metadb().join("PG_VERSION").is_file());
    assert_eq!(solo.get("/readyz").await, json!({"status": "ready"}));
    // The command the banner gives reaches the managed database while solo runs.
    let metadb_toml = amp.path().join("metadb.toml").display().to_string();
    let status = cli::run(
        cli::ampd(),
        &["--config", &metadb_toml, "migrate", "status"],
        &[],
        Duration::from_secs(30),
    )
    .await;
    status.assert_success();
    let counts = format!("{} applied, 0 pending", tests::schema_migration_count());
    status.assert_stdout_contains(&counts);

    let cluster = system_identifier(&url).await;
    solo.register_example().await;
    let job = solo.deploy("1.0.0").await;
    assert_eq!(solo.rows("1.0.0").await, example_rows());
    // One GET /metrics on the admin address shows every service of the process.
    let scrape = format!("http://{}/metrics", solo.admin);
    let metrics = solo
        .http
        .get(scrape)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "ampd_jobs{status=\"COMPLETED\"} 1",
        "ampd_job_run_duration_seconds_count{kind=\"materialize-static\",outcome=\"completed\"} 1",
        "ampd_http_requests_total{service=\"server\",method=\"GET\",route=\"/datasets/",
        "ampd_worker_heartbeat_write_seconds_count{result=\"ok\"}",
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
    let written = amp.path().join("data/manifests");
    assert!(
        std::fs::read_dir(&written).is_ok_and(|mut d| d.next().is_some()),
        "manifests under {}",
        written.display()
    );

    let exit = solo.stop_cleanly(&amp).await;
    eprintln!("cold start to healthy: {cold:?}; stop: {:?}", exit.took);

    let started = Instant::now();
    let solo = Solo::start(&amp, &[]).await;
    eprintln!("warm start to healthy: {:?}", started.elapsed());
    assert!(!solo.log().contains(INITDB_LINE), "{}", solo.log());
    assert_eq!(system_identifier(&url).await, cluster, "the same cluster");
    assert_eq!(
        solo.get("/datasets").await,
        json!([{"namespace": "demo", "name": "prices"}])
    );
    solo.assert_deployed(job).await;
    solo.stop_cleanly(&amp).await;
}

#[tokio::test]
async fn a_killed_solo_loses_no_committed_data_even_with_its_postgres_killed_too() {
    let amp = AmpDir::new();
    let solo = Solo::start(&amp, &[]).await;
    solo.register_example().await;
    let job = solo.deploy("1.0.0").await;

    // kill -9 of ampd alone: the watchdog gives PostgreSQL a fast shutdown.
    let postmaster = amp.postmaster_pid().expect("postmaster.pid");
    let exit = solo.service.kill().await;
    assert_eq!(exit.code, None, "killed by a signal");
    eventually("the watchdog stops PostgreSQL", || async {
        !alive(postmaster)
    })
    .await;
    assert!(
        amp.postgres_log()
            .contains("received fast shutdown request"),
        "{}",
        amp.postgres_log()
    );

    let solo = Solo::start(&amp, &[]).await;
    assert_eq!(solo.rows("1.0.0").await, example_rows());
    // A version committed just before the crash below.
    let mut newer = example();
    newer["version"] = json!("1.1.0");
    let (status, body) = solo
        .admin(reqwest::Method::POST, "/datasets", Some(newer))
        .await;
    assert_eq!(status, 201, "{body}");

    // kill -9 of PostgreSQL's postmaster, then of ampd: postmaster.pid stays, naming a dead pid.
    let postmaster = amp.postmaster_pid().expect("postmaster.pid");
    kill(postmaster, libc::SIGKILL);
    eventually("the postmaster dies", || async { !alive(postmaster) }).await;
    let exit = solo.service.kill().await;
    assert_eq!(exit.code, None, "killed by a signal");
    assert_eq!(
        amp.postmaster_pid(),
        Some(postmaster),
        "a stale postmaster.pid"
    );

    let solo = Solo::start(&amp, &[]).await;
    assert!(!solo.log().contains(INITDB_LINE), "{}", solo.log());
    let log = amp.postgres_log();
    assert!(log.contains("automatic recovery in progress"), "{log}");
    let versions = solo.get("/datasets/demo/prices").await;
    let names: Vec<&str> = versions["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v["version"].as_str())
        .collect();
    assert_eq!(names, ["1.0.0", "1.1.0"], "{versions}");
    solo.assert_deployed(job).await;
    solo.stop_cleanly(&amp).await;
}

#[tokio::test]
async fn a_postgres_left_running_by_a_dead_solo_is_stopped_and_replaced() {
    let amp = AmpDir::new();
    let solo = Solo::start(&amp, &[]).await;
    solo.register_example().await;
    // Kill the watchdog first, then ampd: PostgreSQL is left running with no owner.
    let postmaster = amp.postmaster_pid().expect("postmaster.pid");
    let watchdog = parent_of(postmaster);
    assert_ne!(
        watchdog,
        solo.service.pid(),
        "the watchdog is a process of its own"
    );
    kill(watchdog, libc::SIGKILL);
    let exit = solo.service.kill().await;
    assert_eq!(exit.code, None, "killed by a signal");
    assert!(alive(postmaster), "PostgreSQL still runs");

    let solo = Solo::start(&amp, &[]).await;
    let log = solo.log();
    assert!(
        log.contains("stopping the PostgreSQL an earlier ampd solo left running"),
        "{log}"
    );
    assert!(!alive(postmaster), "the old server is gone");
    assert_ne!(amp.postmaster_pid(), Some(postmaster), "a new server runs");
    assert_eq!(
        solo.get("/datasets").await,
        json!([{"namespace": "demo", "name": "prices"}])
    );
    solo.stop_cleanly(&amp).await;
}

#[tokio::test]
async fn a_postmaster_pid_naming_an_unrelated_live_process_leaves_it_alone() {
    let amp = AmpDir::new();
    let solo = Solo::start(&amp, &[]).await;
    solo.stop_cleanly(&amp).await;

    // A process of PostgreSQL's user (so PostgreSQL itself would take it for a running server),
    // even working in the data directory, whose pid a stale postmaster.pid names.
    let mut sleep = ampd::postgres::as_user(
        ampd::postgres::server_user()
            .expect("a server user")
            .as_deref(),
        Path::new("/bin/sleep"),
    );
    let mut sleep = sleep
        .arg("600")
        .current_dir(amp.metadb())
        .spawn()
        .expect("start sleep");
    let pid_file = amp.metadb().join("postmaster.pid");
    let metadb = amp.metadb().display().to_string();
    std::fs::write(
        &pid_file,
        format!(
            "{}\n{metadb}\n1700000000\n5432\n{metadb}\n\n  5432001         0\nready   \n",
            sleep.id()
        ),
    )
    .expect("write postmaster.pid");

    let solo = Solo::start(&amp, &[]).await;
    let log = solo.log();
    assert!(log.contains("is not this directory's PostgreSQL"), "{log}");
    assert!(matches!(sleep.try_wait(), Ok(None)), "sleep still runs");
    assert_ne!(amp.postmaster_pid(), Some(sleep.id()));
    solo.stop_cleanly(&amp).await;
    assert!(matches!(sleep.try_wait(), Ok(None)), "sleep still runs");
    sleep.kill().expect("stop sleep");
    let _ = sleep.wait();
}

#[tokio::test]
async fn a_second_solo_on_the_same_amp_dir_is_refused_and_the_first_runs_on() {
    let amp = AmpDir::new();
    let first = Solo::start(&amp, &[]).await;
    let second = Solo::spawn(&amp, &[], &[]);
    let exit = second.service.wait().await;
    assert_eq!(exit.code, Some(1), "{}", exit.log);
    let expected = format!(
        "error: another ampd solo is running on {} (it holds {}); stop it first, or give this one \
         another --amp-dir\n",
        amp.path().display(),
        amp.path().join("solo.lock").display()
    );
    assert_eq!(exit.log, expected);
    // The first is unharmed.
    assert_eq!(first.get("/readyz").await, json!({"status": "ready"}));
    assert_eq!(first.get("/datasets").await, json!([]));
    first.stop_cleanly(&amp).await;
}

#[tokio::test]
async fn without_postgresql_programs_solo_says_where_it_looked_and_exits_1() {
    let amp = AmpDir::new();
    let nowhere = TempDir::new();
    let nowhere = nowhere.path().display().to_string();
    let amp_dir = amp.path().display().to_string();
    let out = cli::run(
        cli::ampd(),
        &["solo"],
        &[
            ("AMP_DIR", &amp_dir),
            ("PATH", &nowhere),
            ("AMP_TEST_PG_VERSIONS_DIR", &nowhere),
        ],
        Duration::from_secs(30),
    )
    .await;
    out.assert_code(1);
    let expected = format!(
        "error: PostgreSQL's server programs (initdb, postgres) were not found; \
         looked on PATH, `pg_config --bindir` (no pg_config on PATH) and {nowhere}/<version>/bin; \
         install PostgreSQL 15 or newer (Debian/Ubuntu: apt-get install postgresql; macOS: brew \
         install postgresql) or set metadata_db.url to a database of your own\n"
    );
    assert_eq!(out.stderr, expected);
    assert!(!amp.metadb().exists(), "no cluster directory");
}

#[tokio::test]
async fn with_metadata_db_url_solo_uses_that_database_and_manages_nothing() {
    let db = TestDb::empty().await;
    let amp = AmpDir::new();
    std::fs::create_dir_all(amp.path()).expect("create the amp dir");
    let node = tests::unique_name("solo");
    let (admin, server) = (free_addr(), free_addr());
    // The amp directory's config.toml is read: a key it does not know is an error naming it.
    let config = amp.path().join("config.toml");
    std::fs::write(&config, "[metadata_db]\npool = 3\n").expect("write config.toml");
    let mut cmd = tokio::process::Command::new(cli::ampd());
    cmd.args(["solo", "--node-id", &node]);
    let amp_dir = amp.path().display().to_string();
    let exit = Service::spawn("ampd solo", cmd, &[("AMP_DIR", &amp_dir)])
        .wait()
        .await;
    assert_eq!(exit.code, Some(1), "{}", exit.log);
    assert!(
        exit.log.contains(&format!(
            "error: config file {}: unknown key `metadata_db.pool`",
            config.display()
        )),
        "{}",
        exit.log
    );

    std::fs::write(
        &config,
        format!(
            "[metadata_db]\nurl = {:?}\n[controller]\nadmin_addr = \"{admin}\"\n\
             [server]\naddr = \"{server}\"\n",
            db.url()
        ),
    )
    .expect("write config.toml");
    let mut cmd = tokio::process::Command::new(cli::ampd());
    cmd.args(["solo", "--node-id", &node]);
    let mut solo = Service::spawn("ampd solo", cmd, &[("AMP_DIR", &amp_dir)]);
    solo.wait_healthy(admin).await;
    solo.wait_healthy(server).await;
    let log = solo.log();
    assert!(log.contains(&format!("worker        {node}")), "{log}");
    assert!(!log.contains("starting PostgreSQL"), "{log}");
    assert!(!log.contains(INITDB_LINE), "{log}");
    for managed in ["metadb", "metadb.toml", "postgres.log"] {
        assert!(!amp.path().join(managed).exists(), "no {managed}");
    }
    // auto_migrate defaults to true in solo: the database was migrated.
    let conn = db.connect().await;
    assert!(!tests::catalog::tables(&conn).await.is_empty());
    let exit = solo.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
}

#[tokio::test]
async fn an_explicit_auto_migrate_false_wins_and_a_failed_start_stops_postgres() {
    let amp = AmpDir::new();
    let exit = Solo::spawn(
        &amp,
        &[],
        &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "false")],
    )
    .service
    .wait()
    .await;
    assert_eq!(exit.code, Some(1), "{}", exit.log);
    let refusal = format!(
        "the metadata database is not migrated ({} pending migration(s)): run `ampd migrate` \
         first, or set metadata_db.auto_migrate = true",
        tests::schema_migration_count()
    );
    assert!(exit.log.contains(&refusal), "{}", exit.log);
    assert!(!exit.log.contains("applied migration"), "{}", exit.log);
    // Nothing left running.
    assert!(exit.log.contains("PostgreSQL stopped"), "{}", exit.log);
    assert!(!amp.metadb().join("postmaster.pid").exists());
    let log = amp.postgres_log();
    assert!(
        log.trim_end().ends_with("database system is shut down"),
        "{log}"
    );
}

#[tokio::test]
async fn an_amp_dir_postgres_cannot_reach_is_refused_with_the_reason() {
    if !ampd::postgres::is_root() {
        eprintln!("not run: only root runs PostgreSQL as another user");
        return;
    }
    let outer = TempDir::new();
    let locked = outer.path().join("private");
    std::fs::create_dir_all(&locked).expect("create dir");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let amp_dir = locked.join("amp").display().to_string();
    let out = cli::run(
        cli::ampd(),
        &["solo"],
        &[("AMP_DIR", &amp_dir)],
        Duration::from_secs(30),
    )
    .await;
    out.assert_code(1);
    assert_eq!(
        out.stderr,
        format!(
            "error: PostgreSQL runs as the user `postgres` (it refuses root), \
             which cannot reach {amp_dir}: let it (chmod o+x on the directories above it) or use \
             a directory it can reach\n"
        )
    );
}

#[tokio::test]
async fn an_amp_dir_too_deep_for_a_unix_socket_is_refused_before_initdb() {
    let temp = TempDir::new();
    let amp = temp.path().join("a".repeat(100));
    let amp_dir = amp.display().to_string();
    let out = cli::run(
        cli::ampd(),
        &["solo"],
        &[("AMP_DIR", &amp_dir)],
        Duration::from_secs(30),
    )
    .await;
    out.assert_code(1);
    let socket = amp.join("metadb/.s.PGSQL.5432");
    assert_eq!(
        out.stderr,
        format!(
            "error: the socket path {} is {} bytes, longer than the 107 a Unix socket may have: \
             use a shorter directory\n",
            socket.display(),
            socket.as_os_str().len()
        )
    );
    assert!(!amp.join("metadb").exists(), "no initdb");
}

/// `amp`'s directory, made by the test as solo would make it (mode 0711: private, but PostgreSQL
/// run as `postgres` can pass through it to `metadb/`).
fn make_amp_dir(amp: &AmpDir, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = amp.path();
    std::fs::create_dir_all(&dir).expect("create the amp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
    dir
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o777
}

#[tokio::test]
async fn symbolic_links_planted_in_the_amp_dir_are_never_followed_and_its_files_are_private() {
    use std::os::unix::fs::symlink;
    let amp = AmpDir::new();
    let dir = make_amp_dir(&amp, 0o711);
    let outside = amp.temp.path().join("outside");
    std::fs::create_dir_all(&outside).expect("create outside");
    let (kept_dir, kept_file, kept_log) = (
        outside.join("dir"),
        outside.join("file"),
        outside.join("log"),
    );
    std::fs::create_dir_all(&kept_dir).expect("create");
    std::fs::write(kept_dir.join("precious"), "precious\n").expect("write");
    std::fs::write(&kept_file, "precious\n").expect("write");
    std::fs::write(&kept_log, "precious\n").expect("write");
    symlink(&kept_dir, dir.join("metadb.initdb")).expect("plant");
    symlink(&kept_file, dir.join("metadb.toml.partial")).expect("plant");
    symlink(&kept_log, dir.join("postgres.log")).expect("plant");
    let amp_dir = dir.display().to_string();
    let run = || async {
        cli::run(
            cli::ampd(),
            &["solo"],
            &[("AMP_DIR", amp_dir.as_str())],
            Duration::from_secs(60),
        )
        .await
    };

    // The unfinished cluster's place: nothing removed, nothing made through it.
    let out = run().await;
    out.assert_code(1).assert_stderr_contains(format!(
        "{} is a symbolic link",
        dir.join("metadb.initdb").display()
    ));
    assert!(
        kept_dir.join("precious").is_file(),
        "the linked directory was emptied"
    );
    assert_eq!(std::fs::read_dir(&kept_dir).unwrap().count(), 1);
    std::fs::remove_file(dir.join("metadb.initdb")).expect("remove the link");

    // The server's log: not appended through the link.
    let out = run().await;
    out.assert_code(1).assert_stderr_contains(format!(
        "{} is a symbolic link",
        dir.join("postgres.log").display()
    ));
    assert_eq!(std::fs::read_to_string(&kept_log).unwrap(), "precious\n");
    std::fs::remove_file(dir.join("postgres.log")).expect("remove the link");

    // `metadb.toml.partial`: replaced, not written through.
    let solo = Solo::start(&amp, &[]).await;
    assert_eq!(std::fs::read_to_string(&kept_file).unwrap(), "precious\n");
    assert!(!dir.join("metadb.toml.partial").exists());
    assert!(amp.url().starts_with("postgresql://"));
    // What solo made is its user's alone ([storage] umask 0o077).
    for (path, mode) in [
        (dir.join("postgres.log"), 0o600),
        (dir.join("metadb.toml"), 0o600),
        (dir.join("solo.lock"), 0o600),
        (dir.join("data"), 0o700),
        (dir.join("sources"), 0o700),
    ] {
        assert_eq!(mode_of(&path), mode, "{}", path.display());
    }
    solo.stop_cleanly(&amp).await;
}

#[tokio::test]
async fn an_amp_dir_other_users_may_write_to_is_refused_before_anything_is_made_in_it() {
    let amp = AmpDir::new();
    let dir = make_amp_dir(&amp, 0o777);
    let amp_dir = dir.display().to_string();
    let out = cli::run(
        cli::ampd(),
        &["solo"],
        &[("AMP_DIR", amp_dir.as_str())],
        Duration::from_secs(30),
    )
    .await;
    out.assert_code(1).assert_stderr_contains(format!(
        "refusing the amp directory {amp_dir}: its group or other users may write to it (mode 777)"
    ));
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "solo made something in a directory it refused"
    );
}

#[tokio::test]
async fn a_solo_whose_metadb_links_to_another_solos_cluster_is_refused_and_the_first_runs_on() {
    let first_amp = AmpDir::new();
    let first = Solo::start(&first_amp, &[]).await;
    let postmaster = first_amp.postmaster_pid().expect("the first's server");
    let second_amp = AmpDir::new();
    let dir = make_amp_dir(&second_amp, 0o711);
    std::os::unix::fs::symlink(first_amp.metadb(), dir.join("metadb")).expect("plant");
    let second = Solo::spawn(&second_amp, &[], &[]);
    let exit = second.service.wait().await;
    assert_eq!(exit.code, Some(1), "{}", exit.log);
    assert!(
        exit.log.contains(&format!(
            "{} is a symbolic link",
            dir.join("metadb").display()
        )),
        "{}",
        exit.log
    );
    assert_eq!(first_amp.postmaster_pid(), Some(postmaster));
    assert_eq!(first.get("/readyz").await, json!({"status": "ready"}));
    first.stop_cleanly(&first_amp).await;
}
