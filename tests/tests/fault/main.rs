//! The randomized fault test: a controller, a server and three workers as `ampd` processes on one
//! database of a PostgreSQL cluster of this test's own, every worker's connections through a fault
//! proxy of its own. A seeded generator draws a schedule of deploys, re-deploys, stops and roll
//! backs (garbage collection runs all along, with a grace of a second) and, meanwhile, faults:
//! SIGKILL (then a restart), SIGSTOP for longer than the liveness window (then SIGCONT), a
//! worker's connections stalled (all of them, its pool, its listener or its node claim) or
//! dropped, and PostgreSQL restarted. When the schedule ends every fault is healed, and a checker
//! asserts on the database, the data directory and the server's answers (see [`check`]).
//!
//! Which seeds run:
//! - `AMPD_FAULT_SEED=<n>`: that seed only (to replay a failure: the seed and this command are
//!   printed when a seed starts and when it fails);
//! - `AMPD_FAULT_SEEDS=<N>`: N new seeds, drawn from the clock; each failing seed is reported and
//!   the run goes on to the next, then fails naming them all;
//! - `AMPD_FAULT_TRACE=1` besides: the schedule of a passing seed is printed too;
//! - neither: [`REGRESSIONS`] (every seed that ever broke an invariant) and [`FIXED`], which is what
//!   `cargo test --workspace` (and so CI) runs.
//!
//! The cluster is the test's own (the harness's shared server is never restarted): one per test
//! process, a new database per seed, seeds one after the other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use entity::JobStatus;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::api::{Api, Body};
use tests::cli::TempDir;
use tests::cluster::OwnCluster;
use tests::proxy::{Fault, FaultProxy};
use tests::services::{Service, Workspace, free_addr};
use tokio::sync::Mutex;

/// Seeds that failed once: they always run.
const REGRESSIONS: &[u64] = &[
    // Both hung the schedule itself: an action's request to the admin API (a roll back) waited
    // on a revision's lock that a worker's collector transaction held while the worker was
    // paused (728286145) or its pool stalled (341059383), so the schedule never went on to heal
    // that worker. Actions now give up after `ACTION_WITHIN`.
    341_059_383,
    728_286_145,
    // Once: 3.5 s after the heal a job was still STOP_REQUESTED on a live worker. The worker,
    // restarted after a SIGKILL, had failed the job's attempt 1 as left running, started attempt
    // 2, and was asked to stop it 20 ms later; it logged nothing more for the job (no stop, no
    // completion). Not reproduced by a replay; the cause is not known yet.
    304_425_964,
];

/// Seeds every run of the test command runs besides [`REGRESSIONS`].
const FIXED: &[u64] = &[1];

/// The services' timing: short, so that a seed takes at most about 30 s.
const HEARTBEAT_MS: u64 = 200;
const LIVENESS_WINDOW_MS: u64 = 1500;
const WORKER_RECONCILE_MS: u64 = 500;
const CONTROLLER_RECONCILE_MS: u64 = 200;
const RETRY_BASE_MS: u64 = 200;
const RETRY_MAX_MS: u64 = 1000;
const MAX_ATTEMPTS: u64 = 8;
const GC_INTERVAL_MS: u64 = 300;
const GC_GRACE_SECS: u64 = 2;

/// The longest the schedule waits for an answer of the admin API before it goes on (the request
/// is dropped): during the faults a request may wait on a lock that a paused or partitioned
/// worker's transaction holds, and the schedule must go on to heal that worker.
const ACTION_WITHIN: Duration = Duration::from_secs(2);
/// The longest the checker waits for an answer of the server: after the heal, a service that
/// answers nothing is a failure (with the schedule and the logs), not a test that waits for ever.
const REQUEST_WITHIN: Duration = Duration::from_secs(15);
/// The longest a seed may take, whatever it waits on.
const SEED_WITHIN: Duration = Duration::from_secs(240);

/// How long the schedule of actions and faults runs.
const SCHEDULE: Duration = Duration::from_secs(10);
/// The workers.
const WORKERS: usize = 3;
/// The datasets, each with [`VERSIONS`] versions.
const DATASETS: usize = 3;
const VERSIONS: [&str; 2] = ["1.0.0", "2.0.0"];

/// The command that runs `seed` alone.
fn replay(seed: u64) -> String {
    format!("AMPD_FAULT_SEED={seed} cargo test -p tests --test fault")
}

/// The seeds this run runs, and whether a failing seed ends the run (only one was asked for).
fn seeds() -> Vec<u64> {
    if let Some(seed) = env_number("AMPD_FAULT_SEED") {
        return vec![seed];
    }
    if let Some(n) = env_number("AMPD_FAULT_SEEDS") {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut draw = StdRng::seed_from_u64(clock ^ u64::from(std::process::id()));
        // Small numbers, easy to type, apart from the fixed ones.
        return (0..n)
            .map(|_| draw.random_range(1000..1_000_000_000))
            .collect();
    }
    REGRESSIONS.iter().chain(FIXED).copied().collect()
}

/// `name`'s value as a number, `None` when unset; a malformed value is an error naming it.
fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty())?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_schedules_of_faults_break_no_invariant() {
    let seeds = seeds();
    let dir = TempDir::new();
    let pg = Arc::new(Mutex::new(OwnCluster::start(dir.path(), &[]).await));
    let mut failed = Vec::new();
    let started = Instant::now();
    for (n, seed) in seeds.iter().copied().enumerate() {
        eprintln!(
            "fault seed {seed} ({} of {}); replay: {}",
            n + 1,
            seeds.len(),
            replay(seed)
        );
        let at = Instant::now();
        // Its own task, so that a failing seed (a panic) is reported and the next one runs.
        let mut task = tokio::spawn(run_seed(seed, pg.clone()));
        let ran = match tokio::time::timeout(SEED_WITHIN, &mut task).await {
            Ok(ran) => ran.map_err(|e| e.to_string()),
            Err(_) => {
                task.abort();
                Err(format!("not finished within {SEED_WITHIN:?}"))
            }
        };
        match ran {
            Ok(summary) => eprintln!(
                "fault seed {seed}: passed in {:.1} s: {summary}",
                at.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!(
                    "fault seed {seed}: FAILED after {:.1} s ({e}); replay: {}",
                    at.elapsed().as_secs_f64(),
                    replay(seed)
                );
                failed.push(seed);
                pg.lock().await.ensure_running().await;
            }
        }
    }
    eprintln!(
        "fault: {} seeds in {:.1} s, {} failed",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "seeds that broke an invariant: {failed:?}; replay each with {}",
        replay(failed[0])
    );
}

/// A dataset version: its manifest's one table and the values of its rows.
#[derive(Clone, Debug)]
struct Version {
    dataset: String,
    version: String,
    table: String,
    values: Vec<i64>,
}

impl Version {
    fn manifest(&self) -> Value {
        let rows: Vec<Value> = self.values.iter().map(|v| json!([v])).collect();
        json!({"kind": "static", "tables": {&self.table: {
            "columns": [{"name": "n", "type": "int64"}], "rows": rows}}})
    }

    /// What the server answers for the table: JSON Lines.
    fn jsonl(&self) -> String {
        self.values
            .iter()
            .map(|v| format!("{{\"n\":{v}}}\n"))
            .collect()
    }

    fn rows_path(&self) -> String {
        format!(
            "/datasets/{}/versions/{}/tables/{}",
            self.dataset, self.version, self.table
        )
    }
}

/// What is wrong with a worker now, and until when.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Trouble {
    None,
    /// Killed; restarted at the instant.
    Killed(Instant),
    /// SIGSTOPped; SIGCONT at the instant.
    Paused(Instant),
    /// Its proxy faulted; healed at the instant.
    Proxy(Instant),
}

/// A worker process, its proxy, and what is wrong with it.
struct Worker {
    node: String,
    config: PathBuf,
    proxy: FaultProxy,
    service: Option<Service>,
    trouble: Trouble,
    /// The logs of its earlier processes.
    past_logs: String,
}

impl Worker {
    fn start(&mut self) {
        self.service = Some(Service::start(
            &self.node,
            &self.config,
            &["worker", "--node-id", &self.node],
            &[],
        ));
    }

    fn log(&self) -> String {
        let now = self.service.as_ref().map(Service::log).unwrap_or_default();
        format!("{}{now}", self.past_logs)
    }

    fn heal_proxy(&self) {
        self.proxy.set(Fault::Pass);
        self.proxy.clear_pool();
    }
}

/// One seed's world: the services, what was deployed, and what happened.
struct World {
    seed: u64,
    rng: StdRng,
    pg: Arc<Mutex<OwnCluster>>,
    database: String,
    ws: Workspace,
    controller: Service,
    server: Service,
    admin: Api,
    rows: Api,
    workers: Vec<Worker>,
    versions: Vec<Version>,
    /// Manifest hash → the version registered with it.
    by_hash: BTreeMap<String, usize>,
    /// Every job a deploy answered with.
    jobs: BTreeSet<i64>,
    /// The job the last deploy answered with, its version and its node.
    last: Option<(i64, usize, Option<String>)>,
    /// What was done, when (seconds since the start), for a failure's message.
    trace: Vec<String>,
    started: Instant,
    pg_restarts: u32,
}

/// The last `n` lines of `log`.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl World {
    fn note(&mut self, what: String) {
        let line = format!("{:6.2} s  {what}", self.started.elapsed().as_secs_f64());
        self.trace.push(line);
    }

    /// The failure message: what went wrong, the seed and how to replay it, the schedule, and the
    /// end of every log.
    fn failure(&self, what: &str) -> String {
        let mut out = format!(
            "fault seed {}: {what}\nreplay: {}\n--- schedule:\n{}",
            self.seed,
            replay(self.seed),
            self.trace.join("\n")
        );
        for (name, log) in [
            ("controller", self.controller.log()),
            ("server", self.server.log()),
        ]
        .into_iter()
        .chain(self.workers.iter().map(|w| (w.node.as_str(), w.log())))
        {
            out.push_str(&format!("\n--- {name}:\n{}", tail(&log, 30)));
        }
        out
    }

    /// Notes the job a deploy of version `v` answered with.
    fn answered(&mut self, v: usize, reply: &Value) {
        if let Some(id) = reply["job_id"].as_i64() {
            self.jobs.insert(id);
            let node = reply["node_id"].as_str().map(str::to_owned);
            self.last = Some((id, v, node));
        }
    }

    fn node_of(&self, index: usize) -> String {
        self.workers[index].node.clone()
    }

    /// A request to the admin API: its status and body; `(0, null)`, noted, when no answer came
    /// within [`ACTION_WITHIN`].
    async fn call(&mut self, method: Method, path: &str, body: Body) -> (u16, Value) {
        let call = self.admin.call(method.clone(), path, body);
        match tokio::time::timeout(ACTION_WITHIN, call).await {
            Ok(reply) => (reply.status, reply.body),
            Err(_) => {
                self.note(format!(
                    "{method} {path}: no answer within {ACTION_WITHIN:?}; going on"
                ));
                (0, Value::Null)
            }
        }
    }
}

/// Runs `seed`: starts the services, plays the schedule, heals, checks. Panics with
/// [`World::failure`] on a broken invariant; returns a summary otherwise.
async fn run_seed(seed: u64, pg: Arc<Mutex<OwnCluster>>) -> String {
    let mut world = start(seed, pg).await;
    play(&mut world).await;
    heal(&mut world).await;
    let summary = check(&mut world).await;
    if std::env::var_os("AMPD_FAULT_TRACE").is_some() {
        eprintln!("fault seed {seed}: schedule:\n{}", world.trace.join("\n"));
    }
    for worker in &mut world.workers {
        if let Some(service) = worker.service.take() {
            service.kill().await;
        }
    }
    let _ = world.server.kill().await;
    let _ = world.controller.kill().await;
    let admin = tests::connect(&world.pg.lock().await.url("postgres"), 1).await;
    let _ = admin
        .execute_unprepared(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            world.database
        ))
        .await;
    summary
}

/// A database for the seed, its services started and their datasets registered.
async fn start(seed: u64, pg: Arc<Mutex<OwnCluster>>) -> World {
    let mut rng = StdRng::seed_from_u64(seed);
    let database = format!("fault_{seed}");
    let url = {
        let pg = pg.lock().await;
        let admin = tests::connect(&pg.url("postgres"), 1).await;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            .await
            .expect("drop the seed's database");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {database}"))
            .await
            .expect("create the seed's database");
        admin.close().await.expect("close");
        pg.url(&database)
    };
    let ws = Workspace::new();
    let (admin_addr, rows_addr) = (free_addr(), free_addr());
    let controller_config = ws.config(
        "controller.toml",
        &url,
        &format!(
            "[controller]\nadmin_addr = \"{admin_addr}\"\n\
             reconcile_interval_ms = {CONTROLLER_RECONCILE_MS}\n\
             retry_base_delay_ms = {RETRY_BASE_MS}\nretry_max_delay_ms = {RETRY_MAX_MS}\n\
             max_attempts = {MAX_ATTEMPTS}\n\n\
             [worker]\nliveness_window_ms = {LIVENESS_WINDOW_MS}\ngc_grace_secs = {GC_GRACE_SECS}\n"
        ),
    );
    let migrate = [("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")];
    let mut controller =
        Service::start("controller", &controller_config, &["controller"], &migrate);
    controller.wait_healthy(admin_addr).await;
    let server_config = ws.config(
        "server.toml",
        &url,
        &format!("[server]\naddr = \"{rows_addr}\"\nreconcile_interval_ms = 500\n"),
    );
    let mut server = Service::start("server", &server_config, &["server"], &migrate);
    server.wait_healthy(rows_addr).await;
    let mut workers = Vec::new();
    for n in 0..WORKERS {
        let node = format!("w{n}");
        let proxy = FaultProxy::start(&url).await;
        let config = ws.config(
            &format!("{node}.toml"),
            proxy.url(),
            &format!(
                "[worker]\nheartbeat_interval_ms = {HEARTBEAT_MS}\n\
                 reconcile_interval_ms = {WORKER_RECONCILE_MS}\ngc_interval_ms = {GC_INTERVAL_MS}\n\
                 gc_grace_secs = {GC_GRACE_SECS}\nrows_per_file = 3\nmax_concurrent_jobs = 2\n"
            ),
        );
        let mut worker = Worker {
            node,
            config,
            proxy,
            service: None,
            trouble: Trouble::None,
            past_logs: String::new(),
        };
        worker.start();
        workers.push(worker);
    }
    for worker in &mut workers {
        if let Some(service) = worker.service.as_mut() {
            service
                .wait_for_log(Duration::from_secs(60), |log| {
                    log.contains("worker started")
                })
                .await;
        }
    }
    let mut versions = Vec::new();
    for d in 0..DATASETS {
        for (v, version) in VERSIONS.iter().enumerate() {
            // Up to 80 files of 3 rows: a job runs long enough for stops and faults to meet it.
            let count = rng.random_range(10..=240);
            let base = (d * 1000 + v * 100) as i64 * 1000;
            versions.push(Version {
                dataset: format!("fault/d{d}"),
                version: (*version).to_owned(),
                table: format!("t{d}"),
                values: (0..count).map(|i| base + i).collect(),
            });
        }
    }
    let admin = Api::new(admin_addr, None);
    let mut by_hash = BTreeMap::new();
    for (n, v) in versions.iter().enumerate() {
        let (ns, name) = v.dataset.split_once('/').expect("ns/name");
        let reply = admin
            .post(
                "/datasets",
                json!({"namespace": ns, "name": name, "version": v.version,
                       "manifest": v.manifest()}),
            )
            .await;
        let hash = reply.ok(201)["hash"].as_str().expect("a hash").to_owned();
        by_hash.insert(hash, n);
    }
    World {
        seed,
        rng,
        pg,
        database,
        ws,
        controller,
        server,
        admin,
        rows: Api::new(rows_addr, None),
        workers,
        versions,
        by_hash,
        jobs: BTreeSet::new(),
        last: None,
        trace: Vec::new(),
        started: Instant::now(),
        pg_restarts: 0,
    }
}

/// The schedule: a step every 50–400 ms until [`SCHEDULE`] has passed, each an action on the
/// admin API or a fault, and the heal of every fault whose time has come.
async fn play(w: &mut World) {
    let end = Instant::now() + SCHEDULE;
    while Instant::now() < end {
        let pause = w.rng.random_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        heal_due(w, false).await;
        let roll = w.rng.random_range(0..100);
        match roll {
            0..35 => deploy(w).await,
            35..48 => redeploy(w).await,
            48..60 => stop(w).await,
            60..75 => roll_back(w).await,
            _ => fault(w).await,
        }
    }
}

/// `POST .../deploy` of a random version, on a random worker one time in five.
async fn deploy(w: &mut World) {
    let v = w.rng.random_range(0..w.versions.len());
    let node = (w.rng.random_range(0..5) == 0).then(|| w.rng.random_range(0..WORKERS));
    let version = w.versions[v].clone();
    let body = match node {
        Some(n) => Body::Json(json!({"node_id": w.node_of(n)})),
        None => Body::None,
    };
    let path = format!(
        "/datasets/{}/versions/{}/deploy",
        version.dataset, version.version
    );
    let (status, reply) = w.call(Method::POST, &path, body).await;
    w.answered(v, &reply);
    w.note(format!(
        "deploy {}@{} on {node:?}: {status} {reply}",
        version.dataset, version.version
    ));
}

/// A known job deleted and its version deployed again (a new revision replaces the old one), when
/// it has ended; else its version deployed again as it is.
async fn redeploy(w: &mut World) {
    let last = w.last.as_ref().map(|l| l.0);
    let id = match last {
        Some(id) if w.rng.random_bool(0.5) => id,
        _ => match pick(&mut w.rng, &w.jobs) {
            Some(id) => id,
            None => return deploy(w).await,
        },
    };
    let (_, job) = w
        .call(Method::GET, &format!("/jobs/{id}"), Body::None)
        .await;
    let (status, _) = w
        .call(Method::DELETE, &format!("/jobs/{id}"), Body::None)
        .await;
    w.note(format!("delete job {id} ({}): {status}", job["status"]));
    if status == 204 {
        w.jobs.remove(&id);
    }
    let Some(hash) = job["descriptor"]["manifest_hash"].as_str() else {
        return deploy(w).await;
    };
    let Some(&v) = w.by_hash.get(hash) else {
        return;
    };
    let version = w.versions[v].clone();
    let path = format!(
        "/datasets/{}/versions/{}/deploy",
        version.dataset, version.version
    );
    let (status, reply) = w.call(Method::POST, &path, Body::None).await;
    w.answered(v, &reply);
    w.note(format!(
        "re-deploy {}@{}: {status} {reply}",
        version.dataset, version.version
    ));
}

/// A random element of `set`.
fn pick(rng: &mut StdRng, set: &BTreeSet<i64>) -> Option<i64> {
    if set.is_empty() {
        return None;
    }
    set.iter().nth(rng.random_range(0..set.len())).copied()
}

/// `PUT /jobs/{id}/stop` of a known job.
async fn stop(w: &mut World) {
    let last = w.last.as_ref().map(|l| l.0);
    let id = match last {
        Some(id) if w.rng.random_bool(0.5) => id,
        _ => match pick(&mut w.rng, &w.jobs) {
            Some(id) => id,
            None => return,
        },
    };
    let (status, reply) = w
        .call(Method::PUT, &format!("/jobs/{id}/stop"), Body::None)
        .await;
    w.note(format!("stop job {id}: {status} {}", reply["status"]));
}

/// `POST /revisions/{id}/activate` of a revision of a random table that is not its active one.
async fn roll_back(w: &mut World) {
    let last = w.last.as_ref().map(|l| l.1);
    let v = match last {
        Some(v) if w.rng.random_bool(0.5) => v,
        _ => w.rng.random_range(0..w.versions.len()),
    };
    let version = w.versions[v].clone();
    let path = format!(
        "/datasets/{}/versions/{}/tables",
        version.dataset, version.version
    );
    let (status, tables) = w.call(Method::GET, &path, Body::None).await;
    let table = &tables["tables"][0];
    let active = table["active_revision"]["id"].as_i64();
    let others: BTreeSet<i64> = table["revisions"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|r| r["id"].as_i64())
                .filter(|id| Some(*id) != active)
                .collect()
        })
        .unwrap_or_default();
    let Some(id) = pick(&mut w.rng, &others) else {
        w.note(format!(
            "roll back {}@{}: no other revision ({status})",
            version.dataset, version.version
        ));
        return;
    };
    let (status, reply) = w
        .call(
            Method::POST,
            &format!("/revisions/{id}/activate"),
            Body::None,
        )
        .await;
    let said = reply["error_code"].as_str().unwrap_or("activated");
    w.note(format!(
        "roll back {}@{} to revision {id} (active {active:?}): {status} {said}",
        version.dataset, version.version
    ));
}

/// A fault on a worker that has none (or PostgreSQL restarted, at most twice a seed).
async fn fault(w: &mut World) {
    let roll = w.rng.random_range(0..100);
    if roll < 6 {
        if w.pg_restarts < 2 {
            restart_postgres(w).await;
        }
        return;
    }
    let last = w.last.as_ref().and_then(|l| l.2.clone());
    let on_last = last.and_then(|node| w.workers.iter().position(|x| x.node == node));
    let n = match on_last {
        Some(n) if w.rng.random_bool(0.5) => n,
        _ => w.rng.random_range(0..WORKERS),
    };
    if w.workers[n].trouble != Trouble::None {
        return;
    }
    let now = Instant::now();
    let millis = |w: &mut World, lo: u64, hi: u64| {
        Instant::now() + Duration::from_millis(w.rng.random_range(lo..hi))
    };
    let window = LIVENESS_WINDOW_MS;
    let (trouble, what) = match roll {
        6..24 => {
            let until = millis(w, 0, 1500);
            if let Some(service) = w.workers[n].service.take() {
                let exit = service.kill().await;
                w.workers[n].past_logs.push_str(&exit.log);
            }
            (Trouble::Killed(until), "SIGKILL".to_owned())
        }
        24..42 => {
            let until = millis(w, window + 300, window + 2000);
            if let Some(service) = &w.workers[n].service {
                service.pause();
            }
            (Trouble::Paused(until), "SIGSTOP".to_owned())
        }
        42..56 => {
            let until = millis(w, 200, 3000);
            w.workers[n].proxy.set(Fault::Stall);
            (Trouble::Proxy(until), "stall every connection".to_owned())
        }
        56..68 => {
            let until = millis(w, 200, 3000);
            w.workers[n].proxy.set_for_pool(Fault::Stall);
            (Trouble::Proxy(until), "stall the pool".to_owned())
        }
        68..76 => {
            let until = millis(w, 200, 3000);
            w.workers[n].proxy.set_for(
                ampd::metadata::notifications::LISTENER_APPLICATION_NAME,
                Fault::Stall,
            );
            (Trouble::Proxy(until), "stall the listener".to_owned())
        }
        76..82 => {
            let until = millis(w, 200, 3000);
            w.workers[n].proxy.set_for(
                ampd::metadata::workers::CLAIM_APPLICATION_NAME,
                Fault::Stall,
            );
            (Trouble::Proxy(until), "stall the node claim".to_owned())
        }
        82..92 => {
            let until = millis(w, 0, 800);
            w.workers[n].proxy.set(Fault::Drop);
            (Trouble::Proxy(until), "drop every connection".to_owned())
        }
        _ => {
            let until = millis(w, 200, 2000);
            let delay = Duration::from_millis(w.rng.random_range(5..100));
            w.workers[n].proxy.set(Fault::Delay(delay));
            (Trouble::Proxy(until), format!("delay by {delay:?}"))
        }
    };
    let until = match trouble {
        Trouble::Killed(t) | Trouble::Paused(t) | Trouble::Proxy(t) => t,
        Trouble::None => now,
    };
    w.workers[n].trouble = trouble;
    let node = w.node_of(n);
    w.note(format!(
        "fault: {what} of {node} for {:.2} s",
        until.duration_since(now).as_secs_f64()
    ));
}

/// PostgreSQL stopped (fast: every session ends) and started again after up to a second.
async fn restart_postgres(w: &mut World) {
    let down = Duration::from_millis(w.rng.random_range(0..1000));
    w.pg_restarts += 1;
    w.note(format!("fault: PostgreSQL stopped for {down:?}"));
    let mut pg = w.pg.lock().await;
    pg.stop().await;
    tokio::time::sleep(down).await;
    pg.start_again().await;
    drop(pg);
    w.note("PostgreSQL started again".to_owned());
}

/// Heals the faults whose time has come (all of them with `all`); restarts a worker that exited
/// by itself, noting how it ended.
async fn heal_due(w: &mut World, all: bool) {
    let now = Instant::now();
    for n in 0..WORKERS {
        let due = |t: Instant| all || t <= now;
        match w.workers[n].trouble {
            Trouble::Killed(t) if due(t) => {
                w.workers[n].start();
                w.note(format!("restart {}", w.node_of(n)));
            }
            Trouble::Paused(t) if due(t) => {
                if let Some(service) = &w.workers[n].service {
                    service.resume();
                }
                w.note(format!("SIGCONT {}", w.node_of(n)));
            }
            Trouble::Proxy(t) if due(t) => {
                w.workers[n].heal_proxy();
                w.note(format!("heal the connections of {}", w.node_of(n)));
            }
            Trouble::None => {
                let exited = match w.workers[n].service.as_mut() {
                    Some(service) => !service.is_running(),
                    None => true,
                };
                if exited {
                    if let Some(service) = w.workers[n].service.take() {
                        let exit = service.wait().await;
                        let line = exit
                            .log
                            .lines()
                            .rev()
                            .find(|l| l.contains("ERROR") || l.contains("Error"))
                            .unwrap_or_default()
                            .to_owned();
                        w.workers[n].past_logs.push_str(&exit.log);
                        w.note(format!(
                            "{} exited by itself ({:?}): {line}",
                            w.node_of(n),
                            exit.code
                        ));
                    }
                    w.workers[n].start();
                    w.note(format!("restart {}", w.node_of(n)));
                }
                continue;
            }
            _ => continue,
        }
        w.workers[n].trouble = Trouble::None;
    }
}

/// Heals every fault, and waits until every worker runs.
async fn heal(w: &mut World) {
    heal_due(w, true).await;
    for _ in 0..5 {
        let mut all_up = true;
        for worker in &mut w.workers {
            if let Some(service) = worker.service.as_mut() {
                let deadline = Instant::now() + Duration::from_secs(30);
                while service.is_running()
                    && !service.log().contains("worker started")
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                all_up &= service.is_running() && service.log().contains("worker started");
            }
        }
        if all_up {
            break;
        }
        // A restarted worker refused while its killed process's claim was still held: again.
        heal_due(w, true).await;
    }
    w.note("every fault healed".to_owned());
}

/// A job row as the checker reads it.
#[derive(Debug)]
struct JobRow {
    id: i64,
    status: String,
    node: Option<String>,
    attempt: i32,
}

async fn jobs(conn: &DatabaseConnection) -> Vec<JobRow> {
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT id, status, node_id, attempt FROM jobs ORDER BY id",
        ))
        .await
        .expect("read the jobs");
    rows.iter()
        .map(|r| JobRow {
            id: r.try_get("", "id").expect("id"),
            status: r.try_get("", "status").expect("status"),
            node: r.try_get("", "node_id").expect("node_id"),
            attempt: r.try_get("", "attempt").expect("attempt"),
        })
        .collect()
}

/// The nodes whose heartbeat is within the liveness window.
async fn live_nodes(conn: &DatabaseConnection) -> BTreeSet<String> {
    tests::sql::column(
        conn,
        &format!(
            "SELECT node_id FROM workers WHERE heartbeat_at > now() - interval '{LIVENESS_WINDOW_MS} \
             milliseconds'"
        ),
    )
    .await
    .into_iter()
    .collect()
}

/// Asserts the invariants (panicking with [`World::failure`]):
/// 1. within liveness window + 2 reconcile intervals + `retry_max_delay` after the last fault,
///    every job is terminal or SCHEDULED/RUNNING on a worker that runs and is live (none on a
///    dead or unknown node, none unassigned, none left STOP_REQUESTED or STOPPING); and then every
///    job ends (COMPLETED, STOPPED or FATAL) within 30 s: the live worker did run it;
/// 2. each job's events follow `JobStatus::can_transition_to`, plus the repeated SCHEDULED of a
///    reassignment;
/// 3. after the garbage collection grace, no file or revision directory on disk that no revision
///    row and file row name;
/// 4. every served table's files exist with their rows' sizes and checksums, are the only files
///    in the revision's directory, are numbered without a gap and hold the revision's rows: no two
///    attempts wrote into it; and the server answers the table's rows, exactly the manifest's.
async fn check(w: &mut World) -> String {
    let url = w.pg.lock().await.url(&w.database);
    let conn = tests::connect(&url, 2).await;
    let healed = Instant::now();

    // 1. Every job settled within the bound.
    let worker_reconcile = WORKER_RECONCILE_MS.max(CONTROLLER_RECONCILE_MS);
    let bound = Duration::from_millis(LIVENESS_WINDOW_MS + 2 * worker_reconcile + RETRY_MAX_MS);
    tokio::time::sleep_until((healed + bound).into()).await;
    let running: BTreeSet<String> = w
        .workers
        .iter_mut()
        .filter_map(|worker| {
            let node = worker.node.clone();
            worker
                .service
                .as_mut()
                .is_some_and(Service::is_running)
                .then_some(node)
        })
        .collect();
    let live = live_nodes(&conn).await;
    let mut wrong = Vec::new();
    for job in jobs(&conn).await {
        let status: JobStatus = job.status.parse().expect("a status");
        if status.is_terminal() {
            continue;
        }
        let on_live = job
            .node
            .as_ref()
            .is_some_and(|n| running.contains(n) && live.contains(n));
        if !matches!(status, JobStatus::Scheduled | JobStatus::Running) || !on_live {
            wrong.push(format!("{job:?}"));
        }
    }
    w.note(format!(
        "checked the jobs {:.2} s after the heal",
        healed.elapsed().as_secs_f64()
    ));
    assert!(
        wrong.is_empty(),
        "{}",
        w.failure(&format!(
            "{bound:?} after the last fault, jobs neither ended nor on a live worker (running \
             {running:?}, live {live:?}): {wrong:?}"
        ))
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = jobs(&conn).await;
        let open: Vec<&JobRow> = all
            .iter()
            .filter(|j| !["COMPLETED", "STOPPED", "FATAL"].contains(&j.status.as_str()))
            .collect();
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            w.failure(&format!(
                "jobs still not ended 30 s after the check: {open:?}"
            ))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = jobs(&conn).await;
    w.note(format!(
        "every job ended {:.2} s after the heal",
        healed.elapsed().as_secs_f64()
    ));

    // 2. The events of every job.
    for job in &ended {
        let events: Vec<String> = tests::sql::column(
            &conn,
            &format!(
                "SELECT event_type FROM job_events WHERE job_id = {} ORDER BY id",
                job.id
            ),
        )
        .await;
        let mut from: Option<JobStatus> = None;
        for event in &events {
            let to: JobStatus = event.parse().expect("a status");
            let legal = match from {
                None => to == JobStatus::Scheduled,
                Some(JobStatus::Scheduled) if to == JobStatus::Scheduled => true,
                Some(from) => from.can_transition_to(to),
            };
            assert!(
                legal,
                "{}",
                w.failure(&format!(
                    "job {} went {from:?} -> {to:?}: events {events:?}",
                    job.id
                ))
            );
            from = Some(to);
        }
        assert_eq!(
            from.map(JobStatus::as_str),
            Some(job.status.as_str()),
            "{}",
            w.failure(&format!(
                "job {}'s last event is not its status: {events:?}",
                job.id
            ))
        );
    }

    // 3. Nothing on disk that no row names, once the grace has passed.
    let data_dir = w.ws.data_dir();
    let deadline = Instant::now() + Duration::from_secs(20);
    tokio::time::sleep(Duration::from_secs(GC_GRACE_SECS)).await;
    loop {
        let strays = strays(&conn, &data_dir).await;
        if strays.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            w.failure(&format!(
                "on disk with no row naming it, 20 s after every job ended: {strays:?}"
            ))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 4. Every served table: its files, and the server's answer.
    let served = served_tables(&conn).await;
    for table in &served {
        let Some(&v) = w.by_hash.get(&table.manifest_hash) else {
            panic!(
                "{}",
                w.failure(&format!("a table of an unknown manifest: {table:?}"))
            );
        };
        let version = w.versions[v].clone();
        if let Err(e) = check_revision(&conn, &data_dir, table, &version).await {
            panic!("{}", w.failure(&e));
        }
        let path = version.rows_path();
        let expected = version.jsonl();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = fetch(&w.rows, &path).await;
            if status == 200 && body == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}",
                w.failure(&format!(
                    "{path} (revision {}) answers {status} {body:?}, not {expected:?}",
                    table.revision_id
                ))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every process is still there, and none panicked.
    for worker in &w.workers {
        assert!(
            !worker.log().contains("panicked"),
            "{}",
            w.failure(&format!("{} panicked", worker.node))
        );
    }
    let controller_up = w.controller.is_running();
    let server_up = w.server.is_running();
    assert!(
        controller_up && server_up,
        "{}",
        w.failure("the controller or the server exited")
    );
    let completed = ended.iter().filter(|j| j.status == "COMPLETED").count();
    let attempts: i32 = ended.iter().map(|j| j.attempt).sum();
    let faults = w.trace.iter().filter(|l| l.contains("fault:")).count();
    format!(
        "{} jobs ({completed} completed, {attempts} attempts), {faults} faults, {} tables served",
        ended.len(),
        served.len()
    )
}

/// `GET path` from the server: its status and body.
async fn fetch(rows: &Api, path: &str) -> (u16, String) {
    let request = rows.http().get(rows.url(path)).timeout(REQUEST_WITHIN);
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// A table with an active revision.
#[derive(Debug)]
struct Served {
    manifest_hash: String,
    revision_id: i64,
    path: String,
    metadata: Value,
}

async fn served_tables(conn: &DatabaseConnection) -> Vec<Served> {
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT t.manifest_hash, r.id, r.path, r.metadata FROM physical_tables t \
             JOIN physical_table_revisions r ON r.id = t.active_revision_id ORDER BY t.id",
        ))
        .await
        .expect("read the served tables");
    rows.iter()
        .map(|r| Served {
            manifest_hash: r.try_get("", "manifest_hash").expect("hash"),
            revision_id: r.try_get("", "id").expect("id"),
            path: r.try_get("", "path").expect("path"),
            metadata: r.try_get("", "metadata").expect("metadata"),
        })
        .collect()
}

/// The registered files of revision `id`: name, size and metadata, by name.
async fn files_of(conn: &DatabaseConnection, id: i64) -> Vec<(String, i64, Value)> {
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!(
                "SELECT file_name, object_size, metadata FROM file_metadata \
                 WHERE revision_id = {id} ORDER BY file_name"
            ),
        ))
        .await
        .expect("read the files");
    rows.iter()
        .map(|r| {
            (
                r.try_get("", "file_name").expect("name"),
                r.try_get("", "object_size").expect("size"),
                r.try_get("", "metadata").expect("metadata"),
            )
        })
        .collect()
}

/// Invariant 4 on disk for `table`'s active revision (`Err` says what is wrong).
async fn check_revision(
    conn: &DatabaseConnection,
    data_dir: &Path,
    table: &Served,
    version: &Version,
) -> Result<(), String> {
    let files = files_of(conn, table.revision_id).await;
    let dir = data_dir.join(&table.path);
    let names: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
    let expected_names: Vec<String> = (0..files.len())
        .map(ampd::manifest::part_file_name)
        .collect();
    if names != expected_names {
        return Err(format!(
            "revision {} has files {names:?}, not one numbered series",
            table.revision_id
        ));
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    on_disk.sort();
    if on_disk != names {
        return Err(format!(
            "revision {}'s directory {} holds {on_disk:?}, its rows name {names:?}",
            table.revision_id,
            dir.display()
        ));
    }
    let mut rows = 0;
    for (name, size, meta) in &files {
        let bytes = std::fs::read(dir.join(name)).map_err(|e| format!("read {name}: {e}"))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        if bytes.len() as i64 != *size || meta["sha256"].as_str() != Some(sha.as_str()) {
            return Err(format!(
                "revision {}'s {name}: {} bytes, sha256 {sha}; its row says {size} bytes, {meta}",
                table.revision_id,
                bytes.len()
            ));
        }
        rows += meta["rows"].as_u64().unwrap_or_default();
    }
    let want = version.values.len() as u64;
    if rows != want || table.metadata["rows"].as_u64() != Some(want) {
        return Err(format!(
            "revision {} holds {rows} rows in its files and says {} in its row; the manifest has \
             {want}",
            table.revision_id, table.metadata["rows"]
        ));
    }
    Ok(())
}

/// What is on disk under `data_dir` (manifests aside) that no row names: a file that is not a
/// registered file of an existing revision, a revision directory with no revision row.
async fn strays(conn: &DatabaseConnection, data_dir: &Path) -> Vec<String> {
    let registered: BTreeSet<String> = tests::sql::column(
        conn,
        "SELECT r.path || '/' || f.file_name FROM file_metadata f \
         JOIN physical_table_revisions r ON r.id = f.revision_id",
    )
    .await
    .into_iter()
    .collect();
    let revisions: BTreeSet<String> =
        tests::sql::column(conn, "SELECT path FROM physical_table_revisions")
            .await
            .into_iter()
            .collect();
    let mut out = Vec::new();
    for entry in walk(data_dir) {
        let relative = entry
            .strip_prefix(data_dir)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if relative.starts_with("manifests/") || relative == "manifests" {
            continue;
        }
        let depth = relative.split('/').count();
        if entry.is_dir() {
            // <namespace>/<name>/<table>/<revision>
            if depth == 4 && !revisions.contains(&relative) {
                out.push(format!("{relative}/ (no revision row)"));
            }
        } else if !registered.contains(&relative) {
            out.push(relative);
        }
    }
    out
}

/// Every file and directory under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}
