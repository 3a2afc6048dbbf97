//! The services' real work, each side by side with its floor in the same run: materializing a
//! 1 000 000-row CSV (against DuckDB), serving that table (against `cat`), the admin API's
//! `GET /jobs/{id}` under load (against pgbench running the route's query), and the time from a
//! deploy to its first served row, with its breakdown.
//!
//! The services run as separate release `ampd` processes (controller, server, one worker) on one
//! new database and one data directory, as in production. Every polling interval of theirs is set
//! to ten minutes, so a step that waited for one would show it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use super::{
    Ctx, Databases, Res, Transport, clean_env, first_statement, median, pgbench, run_tool,
};

/// Rows of the materialization's CSV.
pub const CSV_ROWS: u64 = 1_000_000;
/// Every polling interval of the services, so that nothing measured can be a poll.
const POLL_MS: u64 = 600_000;
/// Connections of the admin API's load (oha) and clients of its floor (pgbench).
const LOAD_CONNECTIONS: usize = 8;
/// Deploys of the 10-row dataset whose times are taken.
const FIRST_ROW_RUNS: usize = 7;
/// Materializations (and DuckDB conversions) of the CSV.
const MATERIALIZE_RUNS: usize = 3;

/// The tools the floors need, installed by `.ci/bench-tools`.
pub struct Tools {
    python: PathBuf,
    oha: PathBuf,
}

/// Runs `.ci/bench-tools` (installs the pinned DuckDB and oha once) and reads their paths.
pub fn tools() -> Res<Tools> {
    let script = super::workspace_root().join(".ci/bench-tools");
    eprintln!(
        "checking the services' floors' tools ({}) ...",
        script.display()
    );
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed", script.display()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let path = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(PathBuf::from)
            .ok_or(format!("{} did not print {name}=", script.display()))
    };
    Ok(Tools {
        python: path("duckdb")?,
        oha: path("oha")?,
    })
}

/// A figure of ampd's next to its floor's.
pub struct Row {
    pub what: String,
    pub ampd: String,
    pub floor: String,
    pub ratio: Option<f64>,
    /// `≥ x` goals only (higher is better), as (x, verdict text).
    pub goal: Option<f64>,
    pub note: String,
}

/// One step of the deploy-to-first-row breakdown, median over the runs.
pub struct Step {
    pub what: &'static str,
    pub median_ms: f64,
    pub max_ms: f64,
}

/// What [`measure`] found.
pub struct Services {
    pub rows: Vec<Row>,
    pub first_row: Vec<Step>,
    pub setup: String,
}

/// The services running on one database and data directory.
struct Stack {
    dir: PathBuf,
    admin: SocketAddr,
    served: SocketAddr,
    controller: Child,
    server: Child,
    worker: Child,
    http: reqwest::Client,
}

const NODE: &str = "bench-worker";

impl Stack {
    async fn start(ctx: &Ctx<'_>, url: &str, dir: &Path) -> Res<Stack> {
        for sub in ["data", "sources"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{sub}: {e}"))?;
        }
        let (admin, served) = (free_addr(), free_addr());
        let common = format!(
            "[metadata_db]\nurl = {url:?}\nconnect_timeout_secs = 30\n\n[storage]\ndata_dir = {:?}\n\n",
            dir.join("data").display().to_string()
        );
        let write = |name: &str, text: String| -> Res<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{name}: {e}"))?;
            Ok(path)
        };
        let controller = write(
            "controller.toml",
            format!(
                "{common}[controller]\nadmin_addr = \"{admin}\"\nreconcile_interval_ms = {POLL_MS}\n"
            ),
        )?;
        let server = write(
            "server.toml",
            format!("{common}[server]\naddr = \"{served}\"\nreconcile_interval_ms = {POLL_MS}\n"),
        )?;
        let worker = write(
            "worker.toml",
            format!(
                "{common}[worker]\nsources_dir = {:?}\nreconcile_interval_ms = {POLL_MS}\n\
                 gc_interval_ms = {POLL_MS}\n",
                dir.join("sources").display().to_string()
            ),
        )?;
        let spawn = |name: &str, config: &Path, args: &[&str]| -> Res<Child> {
            let log = std::fs::File::create(dir.join(format!("{name}.log")))
                .map_err(|e| format!("{name}.log: {e}"))?;
            let mut cmd = Command::new(&ctx.bins.ampd);
            cmd.arg("--config").arg(config).args(args);
            clean_env(&mut cmd);
            cmd.env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .map_err(|e| format!("start {name}: {e}"))
        };
        let mut stack = Stack {
            dir: dir.to_owned(),
            admin,
            served,
            controller: spawn("controller", &controller, &["controller"])?,
            server: spawn("server", &server, &["server"])?,
            worker: spawn("worker", &worker, &["worker", "--node-id", NODE])?,
            http: tests::api::client(),
        };
        for addr in [admin, served] {
            stack.wait_healthy(addr).await?;
        }
        let db = tests::connect(url, 1).await;
        let started = Instant::now();
        while super::scalar(
            &db,
            &format!("SELECT count(*) FROM workers WHERE node_id = '{NODE}'"),
        )
        .await?
            == 0
        {
            stack.check_alive()?;
            if started.elapsed() > Duration::from_secs(30) {
                return Err("the worker did not register within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = db.close().await;
        Ok(stack)
    }

    fn check_alive(&mut self) -> Res<()> {
        for (name, child) in [
            ("controller", &mut self.controller),
            ("server", &mut self.server),
            ("worker", &mut self.worker),
        ] {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                return Err(format!("the {name} exited ({status}): {}", log.trim()));
            }
        }
        Ok(())
    }

    async fn wait_healthy(&mut self, addr: SocketAddr) -> Res<()> {
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("http://{addr}/healthz")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            self.check_alive()?;
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("{addr} was not healthy within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn rows_url(&self, name: &str, version: &str, table: &str) -> String {
        format!(
            "http://{}/datasets/bench/{name}/versions/{version}/tables/{table}",
            self.served
        )
    }

    async fn post(&self, path: &str, body: Option<&serde_json::Value>) -> Res<serde_json::Value> {
        // A body-less POST names its client (the admin API refuses what a browser could send).
        let mut request = self
            .http
            .post(self.admin_url(path))
            .header("X-Ampd-Client", "ampd-bench");
        if let Some(body) = body {
            request = request.json(body);
        }
        let r = request
            .send()
            .await
            .map_err(|e| format!("POST {path}: {e}"))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| format!("POST {path}: {e}"))?;
        if !status.is_success() {
            return Err(format!("POST {path}: {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("POST {path}: {e}: {text}"))
    }

    /// Registers version `version` of dataset `bench/<name>` with `manifest`.
    async fn register(&self, name: &str, version: &str, manifest: serde_json::Value) -> Res<()> {
        let body = serde_json::json!({
            "namespace": "bench", "name": name, "version": version, "manifest": manifest,
        });
        self.post("/datasets", Some(&body)).await.map(|_| ())
    }

    /// Deploys a registered version; the job's id.
    async fn deploy(&self, name: &str, version: &str) -> Res<i64> {
        let reply = self
            .post(
                &format!("/datasets/bench/{name}/versions/{version}/deploy"),
                None,
            )
            .await?;
        if reply["outcome"] != "created" {
            return Err(format!(
                "deploy of {name} {version} made no new job: {reply}"
            ));
        }
        reply["job_id"]
            .as_i64()
            .ok_or(format!("deploy answered without a job id: {reply}"))
    }

    /// The worker's peak resident set (`VmHWM`), KiB.
    fn worker_peak_kib(&self) -> Res<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.worker.id()))
            .map_err(|e| format!("the worker's /proc status: {e}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| "no VmHWM in the worker's /proc status".to_owned())
    }

    fn stop(mut self) {
        for child in [&mut self.controller, &mut self.server, &mut self.worker] {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for child in [&mut self.controller, &mut self.server, &mut self.worker] {
            let _ = child.wait();
        }
    }
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], tests::services::free_port()))
}

/// Waits until job `id` is COMPLETED (by its row; a FATAL or ERROR job fails the bench).
async fn wait_completed(db: &DatabaseConnection, stack: &mut Stack, id: i64) -> Res<()> {
    let started = Instant::now();
    loop {
        let status = super::text(db, &format!("SELECT status FROM jobs WHERE id = {id}")).await?;
        match status.as_str() {
            "COMPLETED" => return Ok(()),
            "FATAL" | "ERROR" => {
                let detail = super::text(
                    db,
                    &format!("SELECT coalesce(detail::text, '') FROM jobs WHERE id = {id}"),
                )
                .await?;
                return Err(format!("job {id} ended {status}: {detail}"));
            }
            _ => {}
        }
        stack.check_alive()?;
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("job {id} did not complete within 10 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// When job `id` last had event `to`, in ms since the Unix epoch (the database's clock).
async fn event_ms(db: &DatabaseConnection, id: i64, to: &str) -> Res<f64> {
    let sql = format!(
        "SELECT (extract(epoch FROM max(created_at)) * 1000000)::bigint FROM job_events \
         WHERE job_id = {id} AND event_type = '{to}'"
    );
    Ok(super::scalar(db, &sql).await? as f64 / 1000.0)
}

fn epoch_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

const COLUMNS: [(&str, &str); 5] = [
    ("id", "int64"),
    ("symbol", "string"),
    ("price", "float64"),
    ("active", "bool"),
    ("at", "timestamp"),
];

/// Writes the CSV of [`CSV_ROWS`] rows of mixed types.
fn write_csv(path: &Path) -> Res<u64> {
    use std::io::Write as _;
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let header: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
    let mut line = header.join(",");
    line.push('\n');
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let io = |e: std::io::Error| format!("write {}: {e}", path.display());
    out.write_all(line.as_bytes()).map_err(io)?;
    for i in 0..CSV_ROWS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let price = (state % 10_000_000) as f64 / 1000.0;
        let secs = 1_700_000_000 + (state % 50_000_000) as i64;
        let at = chrono::DateTime::from_timestamp(secs, 0)
            .ok_or("timestamp out of range")?
            .format("%Y-%m-%dT%H:%M:%SZ");
        writeln!(
            out,
            "{i},SYM{:04},{price},{},{at}",
            state % 5000,
            state & 1 == 0
        )
        .map_err(io)?;
    }
    out.flush().map_err(io)?;
    Ok(std::fs::metadata(path).map_err(io)?.len())
}

/// DuckDB converting `csv` to JSON Lines on one thread, timed inside Python (start-up and import
/// excluded): seconds.
fn duckdb(tools: &Tools, csv: &Path, out: &Path) -> Res<f64> {
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|(n, t)| {
            let t = match *t {
                "int64" => "BIGINT",
                "string" => "VARCHAR",
                "float64" => "DOUBLE",
                "bool" => "BOOLEAN",
                _ => "TIMESTAMPTZ",
            };
            format!("'{n}': '{t}'")
        })
        .collect();
    let script = format!(
        "import duckdb, time\n\
         con = duckdb.connect()\n\
         con.execute(\"SET threads = 1\")\n\
         t = time.perf_counter()\n\
         con.execute(\"COPY (SELECT * FROM read_csv('{csv}', header = true, columns = {{{cols}}})) \
         TO '{out}' (FORMAT json)\")\n\
         print(time.perf_counter() - t)\n",
        csv = csv.display(),
        out = out.display(),
        cols = columns.join(", "),
    );
    run_tool("duckdb", Command::new(&tools.python).arg("-c").arg(&script))?
        .trim()
        .parse()
        .map_err(|e| format!("duckdb's time: {e}"))
}

/// Bytes of the body of `GET url` and how long the whole response took.
async fn download(http: &reqwest::Client, url: &str) -> Res<(u64, Duration)> {
    let started = Instant::now();
    let mut r = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("GET {url}: {}", r.status()));
    }
    let mut bytes = 0u64;
    while let Some(chunk) = r.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
        bytes += chunk.len() as u64;
    }
    Ok((bytes, started.elapsed()))
}

/// The files of the revision job `id` wrote.
async fn revision_files(db: &DatabaseConnection, data_dir: &Path, id: i64) -> Res<Vec<PathBuf>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT r.path || '/' || f.file_name FROM physical_table_revisions r \
                 JOIN file_metadata f ON f.revision_id = r.id WHERE r.writer = {id} \
                 ORDER BY f.file_name"
            ),
        ))
        .await
        .map_err(|e| format!("revision files: {e}"))?;
    rows.iter()
        .map(|r| {
            r.try_get_by_index::<String>(0)
                .map(|p| data_dir.join(p))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// `cat files > /dev/null`: seconds.
fn cat(files: &[PathBuf]) -> Res<f64> {
    let started = Instant::now();
    let status = Command::new("cat")
        .args(files)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("run cat: {e}"))?;
    if !status.success() {
        return Err(format!("cat failed: {status}"));
    }
    Ok(started.elapsed().as_secs_f64())
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

/// oha's requests per second, p50 and p99 (ms) against `url` for `secs` with
/// [`LOAD_CONNECTIONS`] connections; every answer must be a 200.
fn oha(tools: &Tools, url: &str, secs: u64) -> Res<(f64, f64, f64)> {
    let out = run_tool(
        "oha",
        Command::new(&tools.oha)
            .args(["--no-tui", "--output-format", "json", "-c"])
            .arg(LOAD_CONNECTIONS.to_string())
            .arg("-z")
            .arg(format!("{secs}s"))
            .arg(url),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("oha's JSON: {e}"))?;
    let codes = &v["statusCodeDistribution"];
    if let Some(map) = codes.as_object()
        && map.keys().any(|k| k != "200")
    {
        return Err(format!("oha saw answers other than 200: {codes}"));
    }
    let rps = v["summary"]["requestsPerSec"]
        .as_f64()
        .ok_or(format!("no requestsPerSec in oha's output: {v}"))?;
    let pct = |p: &str| {
        v["latencyPercentiles"][p]
            .as_f64()
            .map(|s| s * 1000.0)
            .ok_or(format!("no {p} in oha's output"))
    };
    Ok((rps, pct("p50")?, pct("p99")?))
}

/// Measures everything on a new database of `transport`'s server.
pub async fn measure(
    ctx: &Ctx<'_>,
    transport: &Transport,
    tools: &Tools,
    secs: u64,
) -> Res<Services> {
    let mut dbs = Databases::new(transport).await;
    let (name, url) = dbs.create().await?;
    ctx.ampd_migrate(&url, None)?;
    let dir = ctx.tmp.join("services");
    let _ = std::fs::remove_dir_all(&dir);
    let mut stack = Stack::start(ctx, &url, &dir).await?;
    let result = measure_on(ctx, &mut stack, &url, tools, secs).await;
    stack.stop();
    let _ = std::fs::remove_dir_all(&dir);
    dbs.drop(&name).await?;
    let mut services = result?;
    services.setup = format!(
        "`ampd controller`, `ampd server` and `ampd worker` as separate release processes on one new \
         database ({}) and one data directory, every polling interval (`reconcile_interval_ms`, \
         `gc_interval_ms`) set to {} s",
        transport.label,
        POLL_MS / 1000
    );
    Ok(services)
}

async fn measure_on(
    ctx: &Ctx<'_>,
    stack: &mut Stack,
    url: &str,
    tools: &Tools,
    secs: u64,
) -> Res<Services> {
    let db = tests::connect(url, 2).await;
    let mut rows = Vec::new();

    // Deploy to first row: a 10-row dataset, a new version per run.
    eprintln!("services: deploy to first row ...");
    // Each version's rows differ: the same manifest again would be the same (completed) job.
    let small = |run: usize| {
        let ten: Vec<serde_json::Value> = (0..10)
            .map(|i| serde_json::json!([i, format!("s{i}-{run}")]))
            .collect();
        serde_json::json!({
            "kind": "static",
            "tables": {"t": {
                "columns": [{"name": "n", "type": "int64"}, {"name": "s", "type": "string"}],
                "rows": ten,
            }},
        })
    };
    let names = [
        "deploy request → SCHEDULED (controller)",
        "SCHEDULED → RUNNING (worker woken by notification)",
        "RUNNING → COMPLETED (job run, revision activated with the completion)",
        "COMPLETED → first row served (server picks up the revision change)",
        "total: deploy request → first row",
    ];
    let mut steps: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for run in 0..=FIRST_ROW_RUNS {
        let version = format!("0.0.{run}");
        stack.register("small", &version, small(run)).await?;
        let rows_url = stack.rows_url("small", &version, "t");
        let (t0, started) = (epoch_ms(), Instant::now());
        let id = stack.deploy("small", &version).await?;
        loop {
            let r = stack.http.get(&rows_url).send().await;
            if let Ok(r) = r
                && r.status().is_success()
            {
                let body = r.text().await.map_err(|e| format!("GET rows: {e}"))?;
                if body.lines().count() == 10 {
                    break;
                }
            }
            stack.check_alive()?;
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!("version {version} was not served within 60 s"));
            }
            // Asked again after 1 ms: the pick-up is known to that much.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let first = t0 + started.elapsed().as_secs_f64() * 1000.0;
        let scheduled = event_ms(&db, id, "SCHEDULED").await?;
        let running = event_ms(&db, id, "RUNNING").await?;
        let completed = event_ms(&db, id, "COMPLETED").await?;
        // The first run warms every process up; it is not counted.
        if run > 0 {
            for (i, v) in [
                scheduled - t0,
                running - scheduled,
                completed - running,
                first - completed,
                first - t0,
            ]
            .into_iter()
            .enumerate()
            {
                steps[i].push(v);
            }
        }
    }
    let first_row: Vec<Step> = names
        .iter()
        .zip(steps)
        .map(|(what, v)| Step {
            what,
            max_ms: v.iter().copied().fold(f64::MIN, f64::max),
            median_ms: median(v),
        })
        .collect();

    // Materialization of the CSV, against DuckDB; then serving it, against cat.
    eprintln!("services: writing a CSV of {CSV_ROWS} rows ...");
    let csv = stack.dir.join("sources").join("big.csv");
    let csv_bytes = write_csv(&csv)?;
    // Each version reads its own name of the CSV (a hard link): the same manifest again would be
    // the same (completed) job.
    let sources = stack.dir.join("sources");
    let big = |run: usize| -> Res<serde_json::Value> {
        let name = format!("big-{run}.csv");
        std::fs::hard_link(&csv, sources.join(&name)).map_err(|e| format!("link {name}: {e}"))?;
        Ok(serde_json::json!({
            "kind": "static",
            "tables": {"big": {
                "columns": COLUMNS.iter().map(|(n, t)| serde_json::json!({"name": n, "type": t})).collect::<Vec<_>>(),
                "csv": name,
            }},
        }))
    };
    let (mut ampd_secs, mut duck_secs) = (Vec::new(), Vec::new());
    let mut last_job = 0;
    for run in 0..MATERIALIZE_RUNS {
        let version = format!("1.0.{run}");
        let manifest = big(run)?;
        stack.register("big", &version, manifest).await?;
        eprintln!("services: materialize {version} ...");
        let started = Instant::now();
        let id = stack.deploy("big", &version).await?;
        wait_completed(&db, stack, id).await?;
        ampd_secs.push(started.elapsed().as_secs_f64());
        last_job = id;
        let out = ctx.tmp.join("duckdb.jsonl");
        duck_secs.push(duckdb(tools, &csv, &out)?);
        let _ = std::fs::remove_file(&out);
    }
    let peak_kib = stack.worker_peak_kib()?;
    let (ampd_rate, duck_rate) = (
        CSV_ROWS as f64 / median(ampd_secs),
        CSV_ROWS as f64 / median(duck_secs),
    );
    rows.push(Row {
        what: format!(
            "materialization: CSV of {CSV_ROWS} rows ({:.0} MB; int64, string, float64, bool, \
             timestamp) → JSON Lines, deploy → COMPLETED",
            csv_bytes as f64 / 1e6
        ),
        ampd: format!("{ampd_rate:.0} rows/s"),
        floor: format!("DuckDB (`duckdb` 2.0.0, `SET threads = 1`, `COPY … TO … (FORMAT json)`): {duck_rate:.0} rows/s"),
        ratio: Some(ampd_rate / duck_rate),
        goal: Some(0.8),
        note: format!("medians of {MATERIALIZE_RUNS}; DuckDB timed inside Python (start-up excluded)"),
    });
    let peak_mib = peak_kib as f64 / 1024.0;
    rows.push(Row {
        what: "peak RSS of the worker process (`VmHWM`), through all the runs".into(),
        ampd: format!("{peak_mib:.1} MiB"),
        floor: "—".into(),
        ratio: None,
        goal: None,
        note: format!(
            "goal ≤ 64 MiB: {}",
            if peak_mib <= 64.0 {
                "met".to_owned()
            } else {
                format!("**missed** by {:.0}%", (peak_mib / 64.0 - 1.0) * 100.0)
            }
        ),
    });

    eprintln!("services: serving ...");
    let data_dir = stack.dir.join("data");
    let files = revision_files(&db, &data_dir, last_job).await?;
    let file_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let version = format!("1.0.{}", MATERIALIZE_RUNS - 1);
    let rows_url = stack.rows_url("big", &version, "big");
    let (mut served, mut floor) = (Vec::new(), Vec::new());
    let mut served_bytes = 0;
    // Warm-up of both (page cache, the server's first read), then alternating runs.
    download(&stack.http, &rows_url).await?;
    cat(&files)?;
    for _ in 0..5 {
        let (bytes, took) = download(&stack.http, &rows_url).await?;
        served_bytes = bytes;
        served.push(mb_per_s(bytes, took.as_secs_f64()));
        floor.push(mb_per_s(file_bytes, cat(&files)?));
    }
    let (served, floor) = (median(served), median(floor));
    rows.push(Row {
        what: format!(
            "serving: `GET …/tables/big` (JSON Lines, {:.0} MB) over HTTP",
            served_bytes as f64 / 1e6
        ),
        ampd: format!("{served:.0} MB/s"),
        floor: format!(
            "`cat` of the revision's {} files ({:.0} MB) to /dev/null: {floor:.0} MB/s",
            files.len(),
            file_bytes as f64 / 1e6
        ),
        ratio: Some(served / floor),
        goal: Some(0.5),
        note: "medians of 5, page cache warm for both".into(),
    });

    // The admin API under load, against pgbench running the route's query.
    eprintln!("services: admin API under load, {secs} s per run ...");
    let get_sql =
        first_statement(|db| async move { ampd::metadata::jobs::get(&db, super::JOB_MARK).await })
            .await?;
    let script = format!(
        "{};\n",
        get_sql.replace(&super::JOB_MARK.to_string(), &last_job.to_string())
    );
    let job_url = stack.admin_url(&format!("/jobs/{last_job}"));
    let (mut rps, mut p50, mut p99, mut floor) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    oha(tools, &job_url, 1)?;
    for round in 0..2 {
        for side in 0..2 {
            if (round + side) % 2 == 0 {
                let (r, a, b) = oha(tools, &job_url, secs)?;
                rps.push(r);
                p50.push(a);
                p99.push(b);
            } else {
                floor.push(pgbench(ctx, url, &script, secs)?);
            }
        }
    }
    // The same load on a route that does no database work: what the HTTP stack and oha itself
    // leave of the two cores, the ceiling of any route.
    let health_url = stack.admin_url("/healthz");
    let mut health = Vec::new();
    for _ in 0..2 {
        health.push(oha(tools, &health_url, secs)?.0);
    }
    let (rps, floor, health) = (median(rps), median(floor), median(health));
    rows.push(Row {
        what: format!("admin API: `GET /jobs/{{id}}`, {LOAD_CONNECTIONS} connections (oha 1.16.0)"),
        ampd: format!(
            "{rps:.0} req/s (p50 {:.2} ms, p99 {:.2} ms)",
            median(p50),
            median(p99)
        ),
        floor: format!(
            "`pgbench -c {LOAD_CONNECTIONS} -j 2` running the route's query: {floor:.0} tx/s"
        ),
        ratio: Some(rps / floor),
        goal: Some(0.5),
        note: format!(
            "two {secs} s runs of each side, interleaved; the query: `{}`",
            get_sql.trim()
        ),
    });
    rows.push(Row {
        what: format!(
            "admin API: `GET /healthz` (no database work), {LOAD_CONNECTIONS} connections (oha 1.16.0)"
        ),
        ampd: format!("{health:.0} req/s"),
        floor: format!("the same pgbench floor: {floor:.0} tx/s"),
        ratio: Some(health / floor),
        goal: None,
        note: "two runs: the ceiling the HTTP stack and the load generator leave for any route".into(),
    });
    let _ = db.close().await;
    Ok(Services {
        rows,
        first_row,
        setup: String::new(),
    })
}

/// The report's section.
pub fn markdown(s: &Services) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "\n## The services' work\n");
    let _ = writeln!(md, "{}.\n", s.setup);
    let _ = writeln!(md, "| measurement | ampd | floor | ratio | goal | | how |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for r in &s.rows {
        let (ratio, goal, verdict) = match (r.ratio, r.goal) {
            (Some(ratio), Some(goal)) => (
                format!("{ratio:.2}"),
                format!("≥ {goal}"),
                if ratio >= goal {
                    "met".to_owned()
                } else {
                    format!("**missed** by {:.0}%", (1.0 - ratio / goal) * 100.0)
                },
            ),
            (Some(ratio), None) => (format!("{ratio:.2}"), "—".into(), String::new()),
            _ => ("—".into(), "—".into(), String::new()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {ratio} | {goal} | {verdict} | {} |",
            r.what, r.ampd, r.floor, r.note
        );
    }
    let _ = writeln!(
        md,
        "\nDeploy to first row: `POST …/deploy` of a 10-row dataset (a new version each time) until \
         `GET …/tables/t` answers its 10 rows (asked again 1 ms after every other answer); steps from the \
         job's events (`job_events.created_at`, the database's clock, the same machine's), medians of \
         {FIRST_ROW_RUNS} runs after one warm-up. No goal; every polling interval is {} s, so a step \
         that waited for a poll would take seconds.\n",
        POLL_MS / 1000
    );
    let _ = writeln!(md, "| step | median | max |");
    let _ = writeln!(md, "|---|---|---|");
    for step in &s.first_row {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            step.what,
            super::ms(step.median_ms),
            super::ms(step.max_ms)
        );
    }
    md
}
