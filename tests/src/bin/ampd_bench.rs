//! `ampd-bench`: `ampd migrate` and the data-access layer measured side by side with their floors
//! (what `psql` and `pgbench` take for the same work) on fresh databases, in one run. Prints the
//! medians and ratios and regenerates `BENCHMARKS.md` at the top of the workspace. The services'
//! work (materializing, serving, the admin API, deploy to first row) is measured in [`services`].
//!
//! ```sh
//! cargo run --release -p tests --features bench --bin ampd-bench [-- --runs 15 --secs 10 --out BENCHMARKS.md]
//! ```
//!
//! It builds the release `ampd` and `ampd-fixture` binaries itself (a no-op when they are current),
//! then starts a private PostgreSQL cluster (the test harness's, with `pg_stat_statements` preloaded
//! and, when `openssl` is there, a TLS listener on 127.0.0.1), or uses `AMP_BENCH_DATABASE_URL`
//! (an admin URL that may create databases) when it is set. Both sides of every comparison get the
//! same URL, so the same transport and TLS mode; the PostgreSQL programs are the server's own
//! (`<bindir>/psql`, not Debian's Perl wrapper in `/usr/bin`).
//!
//! Text above the notes marker of `BENCHMARKS.md` is regenerated; the notes below it are kept.

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tests::cluster::{ClusterOptions, PrivateCluster};
use tests::wire::StatementCounter;

#[path = "ampd_bench/memory.rs"]
mod memory;
#[path = "ampd_bench/metrics.rs"]
mod metrics;
#[path = "ampd_bench/scale.rs"]
mod scale;
#[path = "ampd_bench/services.rs"]
mod services;

type Res<T> = Result<T, String>;

/// The line separating the generated part of `BENCHMARKS.md` from the notes kept across runs.
const NOTES_MARKER: &str =
    "<!-- Notes: everything below this line is kept when ampd-bench regenerates the file. -->";

/// History lengths of the scaling measurement.
const HISTORY: [usize; 3] = [1, 100, 1000];

const USAGE: &str = "usage: ampd-bench [--runs N (>= 15, default 15)] [--secs S (throughput run length, default 10)] \
     [--out PATH (default BENCHMARKS.md at the workspace root)] [--no-write] \
     [--only fresh|noop|scaling|throughput|services|memory|metrics|scale (repeatable; implies --no-write)] \
     [--fleet WORKERS,ACTIVE,HISTORY,EVENTS,EVER (scale; default 256,2000,98000,10000000,10000)] \
     [--year JOBS_PER_DAY[,EVENTS_PER_JOB] (scale's simulated year; default 10000,10; \
     0 skips it)]";

#[derive(Debug)]
struct Args {
    runs: usize,
    secs: u64,
    out: PathBuf,
    write: bool,
    /// Measure only these parts (all when empty).
    only: Vec<String>,
    /// The fleet of `scale`.
    fleet: scale::Fleet,
    /// The simulated year of `scale`.
    year: scale::YearPlan,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }

    fn parse() -> Res<Args> {
        let mut args = Args {
            runs: 15,
            secs: 10,
            out: workspace_root().join("BENCHMARKS.md"),
            write: true,
            only: Vec::new(),
            fleet: scale::Fleet::default(),
            year: scale::YearPlan::default(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value; {USAGE}"));
            match arg.as_str() {
                "--runs" => {
                    args.runs = value("--runs")?
                        .parse()
                        .map_err(|e| format!("--runs: {e}"))?;
                }
                "--secs" => {
                    args.secs = value("--secs")?
                        .parse()
                        .map_err(|e| format!("--secs: {e}"))?;
                }
                "--out" => args.out = PathBuf::from(value("--out")?),
                "--fleet" => args.fleet = scale::Fleet::parse(&value("--fleet")?)?,
                "--year" => args.year = scale::YearPlan::parse(&value("--year")?)?,
                "--no-write" => args.write = false,
                "--only" => {
                    let part = value("--only")?;
                    if ![
                        "fresh",
                        "noop",
                        "scaling",
                        "throughput",
                        "services",
                        "memory",
                        "metrics",
                        "scale",
                    ]
                    .contains(&part.as_str())
                    {
                        return Err(format!("--only {part:?}: unknown part; {USAGE}"));
                    }
                    args.only.push(part);
                    args.write = false;
                }
                "-h" | "--help" => return Err(USAGE.to_owned()),
                other => return Err(format!("unknown argument {other:?}; {USAGE}")),
            }
        }
        if args.runs < 15 {
            return Err(format!("--runs must be at least 15; {USAGE}"));
        }
        Ok(args)
    }
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "error: ampd-bench measures release builds: run it as cargo run --release -p tests --features bench --bin ampd-bench"
        );
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

// ---------------------------------------------------------------------------------------------
// Processes and their cost

/// Wall time and peak memory of one process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    /// Maximum resident set size, KiB (`ru_maxrss` of `wait4`).
    max_rss_kib: i64,
}

/// Runs `cmd` to completion (stdout discarded, stderr kept in `log` for error messages) and
/// measures it with `wait4`: wall time from spawn to exit, and the child's peak RSS.
fn measure(cmd: &mut Command, log: &Path) -> Res<Sample> {
    let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    let started = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; zeroed is a valid value for it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our child, not yet reaped (std's `Child` only reaps in `wait`), and both
        // out-pointers point to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4: {err}"));
        }
    }
    let wall = started.elapsed();
    drop(child);
    let status = ExitStatus::from_raw(status);
    if !status.success() {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        return Err(format!(
            "{:?} {:?} failed ({status}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            log.trim()
        ));
    }
    Ok(Sample {
        wall,
        max_rss_kib: usage.ru_maxrss,
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Median, minimum and maximum wall time of `samples`, in ms.
#[derive(Debug, Clone, Copy)]
struct Stats {
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    median_rss_kib: f64,
    max_rss_kib: i64,
}

fn stats(samples: &[Sample]) -> Stats {
    let ms: Vec<f64> = samples
        .iter()
        .map(|s| s.wall.as_secs_f64() * 1000.0)
        .collect();
    Stats {
        median_ms: median(ms.clone()),
        min_ms: ms.iter().copied().fold(f64::INFINITY, f64::min),
        max_ms: ms.iter().copied().fold(0.0, f64::max),
        median_rss_kib: median(samples.iter().map(|s| s.max_rss_kib as f64).collect()),
        max_rss_kib: samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0),
    }
}

/// The binaries under test, built in release mode next to this one.
struct Binaries {
    ampd: PathBuf,
    fixture: PathBuf,
}

fn build_binaries() -> Res<Binaries> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("building release ampd and ampd-fixture ...");
    let status = Command::new(&cargo)
        .args(["build", "--release", "-q", "-p", "ampd", "--bin", "ampd"])
        .args(["-p", "tests", "--bin", "ampd-fixture"])
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("run {cargo}: {e}"))?;
    if !status.success() {
        return Err("cargo build --release -p ampd -p tests failed".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let dir = exe.parent().ok_or("no directory of the current exe")?;
    let bins = Binaries {
        ampd: dir.join("ampd"),
        fixture: dir.join("ampd-fixture"),
    };
    for bin in [&bins.ampd, &bins.fixture] {
        if !bin.exists() {
            return Err(format!("{} was not built", bin.display()));
        }
    }
    Ok(bins)
}

// ---------------------------------------------------------------------------------------------
// The server

/// One way of reaching the server: both sides of a comparison use the same URL.
struct Transport {
    label: String,
    admin_url: String,
}

/// Where the measurements run.
struct Server {
    /// The private cluster, kept alive for the run (`None` with `AMP_BENCH_DATABASE_URL`).
    _cluster: Option<PrivateCluster>,
    transports: Vec<Transport>,
    bindir: PathBuf,
    description: String,
}

async fn start_server(tmp: &Path) -> Res<Server> {
    if let Ok(url) = std::env::var("AMP_BENCH_DATABASE_URL")
        && !url.trim().is_empty()
    {
        let bindir = tests::cluster::find_bindir()?;
        let tls = uses_tls(&bindir, &url, tmp)?;
        let redacted = ampd::redact::redact_url(&url);
        return Ok(Server {
            _cluster: None,
            transports: vec![Transport {
                label: format!(
                    "AMP_BENCH_DATABASE_URL ({})",
                    if tls { "TLS" } else { "no TLS" }
                ),
                admin_url: url,
            }],
            bindir,
            description: format!(
                "the server of AMP_BENCH_DATABASE_URL ({redacted}); psql and ampd both connect with \
                 that URL (TLS in use: {})",
                if tls { "yes" } else { "no" }
            ),
        });
    }
    let bindir = tests::cluster::find_bindir()?;
    let pgss = bindir
        .parent()
        .map(|d| d.join("lib").join("pg_stat_statements.so"))
        .is_some_and(|p| p.exists());
    let tls = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut options = ClusterOptions {
        tcp_tls: tls,
        ..ClusterOptions::default()
    };
    if pgss {
        options.settings.push((
            "shared_preload_libraries".into(),
            "pg_stat_statements".into(),
        ));
    }
    eprintln!("starting a private PostgreSQL cluster ...");
    let cluster = PrivateCluster::start_with(&options)?;
    let mut transports = vec![Transport {
        label: "Unix socket (no TLS)".into(),
        admin_url: cluster.admin_url(),
    }];
    if let Some(url) = cluster.tcp_admin_url() {
        transports.push(Transport {
            label: "TCP 127.0.0.1, TLS (sslmode=require)".into(),
            admin_url: url,
        });
    }
    Ok(Server {
        description: format!(
            "a private cluster started by the bench (initdb + postgres from {}; fsync, \
             synchronous_commit and full_page_writes off, shared_buffers 128MB{}{}); psql, pg_dump \
             and pgbench from the same directory",
            bindir.display(),
            if pgss {
                ", pg_stat_statements preloaded"
            } else {
                ""
            },
            if tls {
                ", TLS on the TCP listener with a self-signed RSA-2048 certificate"
            } else {
                ""
            },
        ),
        _cluster: Some(cluster),
        transports,
        bindir,
    })
}

/// Whether libpq (psql) ends up on TLS with `url`.
fn uses_tls(bindir: &Path, url: &str, tmp: &Path) -> Res<bool> {
    let stdout = run_tool(
        "psql on AMP_BENCH_DATABASE_URL",
        Command::new(bindir.join("psql"))
            .args(["-X", "-A", "-t", "-c"])
            .arg("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .arg(url)
            .current_dir(tmp),
    )?;
    Ok(stdout.trim() == "t")
}

/// Runs a floor's tool to completion and returns its standard output; a failure to start or a
/// non-zero exit is an error naming `what`, with the tool's standard error.
fn run_tool(what: &str, cmd: &mut Command) -> Res<String> {
    let out = cmd.output().map_err(|e| format!("run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `admin_url` with database `name`.
fn database_url(admin_url: &str, name: &str) -> Res<String> {
    let mut url = url::Url::parse(admin_url).map_err(|e| format!("admin URL: {e}"))?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

async fn exec(db: &DatabaseConnection, sql: &str) -> Res<()> {
    db.execute_unprepared(sql)
        .await
        .map(|_| ())
        .map_err(|e| format!("{sql}: {e}"))
}

async fn scalar(db: &DatabaseConnection, sql: &str) -> Res<i64> {
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .map_err(|e| format!("{sql}: {e}"))?
        .ok_or(format!("{sql}: no row"))?
        .try_get_by_index::<i64>(0)
        .map_err(|e| format!("{sql}: {e}"))
}

async fn text(db: &DatabaseConnection, sql: &str) -> Res<String> {
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .map_err(|e| format!("{sql}: {e}"))?
        .ok_or(format!("{sql}: no row"))?
        .try_get_by_index::<String>(0)
        .map_err(|e| format!("{sql}: {e}"))
}

/// Creates and drops the bench's databases on one transport's server.
struct Databases<'a> {
    admin: DatabaseConnection,
    transport: &'a Transport,
    n: usize,
}

impl<'a> Databases<'a> {
    async fn new(transport: &'a Transport) -> Databases<'a> {
        Databases {
            admin: tests::connect(&transport.admin_url, 2).await,
            transport,
            n: 0,
        }
    }

    /// A new empty database: (name, URL).
    async fn create(&mut self) -> Res<(String, String)> {
        self.n += 1;
        let name = format!("ampd_bench_{}_{}", std::process::id(), self.n);
        exec(&self.admin, &format!("CREATE DATABASE \"{name}\"")).await?;
        let url = database_url(&self.transport.admin_url, &name)?;
        Ok((name, url))
    }

    async fn drop(&self, name: &str) -> Res<()> {
        exec(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
        )
        .await
    }

    async fn oid(&self, name: &str) -> Res<i64> {
        scalar(
            &self.admin,
            &format!("SELECT oid::bigint FROM pg_database WHERE datname = '{name}'"),
        )
        .await
    }

    /// Statements the server ran in database `name` while `run` ran (from `pg_stat_statements`,
    /// its own queries excluded), once the run's sessions have ended.
    async fn count_statements(&self, name: &str, run: impl FnOnce() -> Res<Sample>) -> Res<i64> {
        let oid = self.oid(name).await?;
        exec(
            &self.admin,
            &format!("SELECT pg_stat_statements_reset(0, {oid}::oid, 0)"),
        )
        .await?;
        run()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while scalar(
            &self.admin,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datid = {oid}::oid"),
        )
        .await?
            > 0
        {
            if Instant::now() > deadline {
                return Err(format!("sessions on {name} did not end"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        scalar(
            &self.admin,
            &format!(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
                 WHERE dbid = {oid}::oid AND query NOT ILIKE '%pg_stat_statements%'"
            ),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// The commands being compared

struct Ctx<'a> {
    bins: &'a Binaries,
    bindir: &'a Path,
    tmp: &'a Path,
}

impl Ctx<'_> {
    /// ampd's `[metadata_db]` configuration for `url`, defaults otherwise.
    fn config(url: &str) -> Res<ampd::config::MetadataDbConfig> {
        ampd::config::Config::from_parts(
            Path::new("bench.toml"),
            &format!("[metadata_db]\nurl = \"{url}\"\nconnect_timeout_secs = 30\n"),
            Vec::<(String, String)>::new(),
        )
        .map(|c| c.metadata_db)
        .map_err(|e| e.to_string())
    }

    fn log(&self) -> PathBuf {
        self.tmp.join("stderr.log")
    }

    /// `ampd --config <file for url> migrate` (or the fixture binary with migration set `set`).
    fn ampd_migrate(&self, url: &str, set: Option<&str>) -> Res<Sample> {
        let config = self.tmp.join("config.toml");
        std::fs::write(
            &config,
            format!("[metadata_db]\nurl = \"{url}\"\nconnect_timeout_secs = 30\n"),
        )
        .map_err(|e| format!("write config: {e}"))?;
        let bin = if set.is_some() {
            &self.bins.fixture
        } else {
            &self.bins.ampd
        };
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config).arg("migrate");
        clean_env(&mut cmd);
        if let Some(set) = set {
            cmd.env("AMPD_FIXTURE_MIGRATIONS", set);
        }
        measure(&mut cmd, &self.log())
    }

    /// `psql -X <args> <url>` (the server's psql, not a wrapper).
    fn psql(&self, url: &str, args: &[&str]) -> Res<Sample> {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.arg("-X").args(args).arg(url).current_dir(self.tmp);
        clean_env(&mut cmd);
        measure(&mut cmd, &self.log())
    }
}

/// Removes what would change either side's behaviour from the environment: ampd's config
/// variables and log levels, libpq's `PG*` defaults.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("AMP_CONFIG")
            || key == "RUST_LOG"
            || key == "AMPD_FIXTURE_MIGRATIONS"
            || key.starts_with("PG")
        {
            cmd.env_remove(key.as_ref());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// One comparison of ampd with its floor.
struct Comparison {
    what: &'static str,
    transport: String,
    ampd: Stats,
    floor_name: &'static str,
    floor: Stats,
    /// Statements the server ran for one run of each side, when counted.
    statements: Option<(i64, i64)>,
    goal_ratio: f64,
}

impl Comparison {
    fn ratio(&self) -> f64 {
        self.ampd.median_ms / self.floor.median_ms
    }
}

/// Fresh migrate: `ampd migrate` on an empty database vs `psql -1 -f schema.sql`, where
/// schema.sql is `pg_dump --schema-only` of a database ampd migrated.
async fn fresh_migrate(
    ctx: &Ctx<'_>,
    transport: &Transport,
    runs: usize,
    count: bool,
) -> Res<Comparison> {
    let mut dbs = Databases::new(transport).await;
    let (reference, url) = dbs.create().await?;
    ctx.ampd_migrate(&url, None)?;
    let schema = ctx.tmp.join("schema.sql");
    let mut dump = Command::new(ctx.bindir.join("pg_dump"));
    dump.args(["--schema-only", "-f"]).arg(&schema).arg(&url);
    clean_env(&mut dump);
    measure(&mut dump, &ctx.log())?;
    dbs.drop(&reference).await?;
    let schema_arg = schema.to_string_lossy().into_owned();
    let floor_args = [
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-1",
        "-f",
        schema_arg.as_str(),
    ];

    // Warm-up (binaries and the server's caches), then alternate which side goes first.
    for side in 0..2 {
        let (name, url) = dbs.create().await?;
        if side == 0 {
            ctx.ampd_migrate(&url, None)?;
        } else {
            ctx.psql(&url, &floor_args)?;
        }
        dbs.drop(&name).await?;
    }
    let (mut ampd, mut floor) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (a_name, a_url) = dbs.create().await?;
        let (f_name, f_url) = dbs.create().await?;
        if i % 2 == 0 {
            ampd.push(ctx.ampd_migrate(&a_url, None)?);
            floor.push(ctx.psql(&f_url, &floor_args)?);
        } else {
            floor.push(ctx.psql(&f_url, &floor_args)?);
            ampd.push(ctx.ampd_migrate(&a_url, None)?);
        }
        dbs.drop(&a_name).await?;
        dbs.drop(&f_name).await?;
    }
    let statements = if count {
        let (a_name, a_url) = dbs.create().await?;
        let a = dbs
            .count_statements(&a_name, || ctx.ampd_migrate(&a_url, None))
            .await?;
        let (f_name, f_url) = dbs.create().await?;
        let f = dbs
            .count_statements(&f_name, || ctx.psql(&f_url, &floor_args))
            .await?;
        dbs.drop(&a_name).await?;
        dbs.drop(&f_name).await?;
        Some((a, f))
    } else {
        None
    };
    Ok(Comparison {
        what: "fresh migrate",
        transport: transport.label.clone(),
        ampd: stats(&ampd),
        floor_name: "psql -X -q -1 -f schema.sql",
        floor: stats(&floor),
        statements,
        goal_ratio: 1.5,
    })
}

/// No-op migrate: `ampd migrate` on a current database vs `psql -X -c 'select 1'`.
async fn noop_migrate(
    ctx: &Ctx<'_>,
    transport: &Transport,
    runs: usize,
    count: bool,
) -> Res<Comparison> {
    let mut dbs = Databases::new(transport).await;
    let (name, url) = dbs.create().await?;
    ctx.ampd_migrate(&url, None)?;
    let floor_args = ["-c", "select 1"];
    ctx.ampd_migrate(&url, None)?;
    ctx.psql(&url, &floor_args)?;
    let (mut ampd, mut floor) = (Vec::new(), Vec::new());
    for i in 0..runs {
        if i % 2 == 0 {
            ampd.push(ctx.ampd_migrate(&url, None)?);
            floor.push(ctx.psql(&url, &floor_args)?);
        } else {
            floor.push(ctx.psql(&url, &floor_args)?);
            ampd.push(ctx.ampd_migrate(&url, None)?);
        }
    }
    let statements = if count {
        let a = dbs
            .count_statements(&name, || ctx.ampd_migrate(&url, None))
            .await?;
        let f = dbs
            .count_statements(&name, || ctx.psql(&url, &floor_args))
            .await?;
        Some((a, f))
    } else {
        None
    };
    dbs.drop(&name).await?;
    Ok(Comparison {
        what: "no-op migrate",
        transport: transport.label.clone(),
        ampd: stats(&ampd),
        floor_name: "psql -X -c 'select 1'",
        floor: stats(&floor),
        statements,
        goal_ratio: 2.0,
    })
}

/// A no-op run against a database with `n` applied migrations.
struct Scaling {
    n: usize,
    noop: Stats,
    /// Statements the server ran (`pg_stat_statements`), when it is loaded.
    executed: Option<i64>,
    /// `Query` + `Execute` messages ampd sent, counted by a proxy.
    sent: u64,
}

async fn scaling(
    ctx: &Ctx<'_>,
    transport: &Transport,
    runs: usize,
    count: bool,
) -> Res<Vec<Scaling>> {
    let mut out = Vec::new();
    for n in HISTORY {
        let set = format!("synthetic:{n}");
        let mut dbs = Databases::new(transport).await;
        let (name, url) = dbs.create().await?;
        ctx.ampd_migrate(&url, Some(&set))?;
        ctx.ampd_migrate(&url, Some(&set))?;
        let samples = (0..runs)
            .map(|_| ctx.ampd_migrate(&url, Some(&set)))
            .collect::<Res<Vec<_>>>()?;
        let executed = if count {
            Some(
                dbs.count_statements(&name, || ctx.ampd_migrate(&url, Some(&set)))
                    .await?,
            )
        } else {
            None
        };
        let counter = StatementCounter::start(&url).await;
        let proxied = counter.url().to_owned();
        // The proxy runs on the runtime's workers while this thread waits for the process.
        ctx.ampd_migrate(&proxied, Some(&set))?;
        let sent = counter.statements();
        drop(counter);
        dbs.drop(&name).await?;
        out.push(Scaling {
            n,
            noop: stats(&samples),
            executed,
            sent,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Coordination throughput: the data-access layer against pgbench running the same statements

/// Tasks (ampd) and clients (pgbench) running at once.
const CONCURRENCY: usize = 8;
/// Registered workers the heartbeat workload spreads over.
const WORKERS: usize = 100;

/// Records the statements the data-access functions send, and answers none of them.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<Statement>>);

#[derive(Debug)]
struct RecorderHandle(std::sync::Arc<Recorder>);

#[async_trait::async_trait]
impl sea_orm::ProxyDatabaseTrait for RecorderHandle {
    async fn query(&self, statement: Statement) -> Result<Vec<sea_orm::ProxyRow>, sea_orm::DbErr> {
        if let Ok(mut s) = self.0.0.lock() {
            s.push(statement);
        }
        Ok(Vec::new())
    }

    async fn execute(
        &self,
        statement: Statement,
    ) -> Result<sea_orm::ProxyExecResult, sea_orm::DbErr> {
        if let Ok(mut s) = self.0.0.lock() {
            s.push(statement);
        }
        Ok(sea_orm::ProxyExecResult::default())
    }
}

/// Placeholders in the captured statements, replaced by pgbench variables.
const HASH_MARK: &str = "manifesthashmark";
const NODE_MARK: &str = "nodeidmark";
const JOB_MARK: i64 = 987_654_321_012;

/// The first statement `f` sends (with its values inlined as literals), run against a recording
/// connection (the function's own error, since nothing answers, is expected and ignored).
async fn first_statement<F, Fut, T>(f: F) -> Res<String>
where
    F: FnOnce(DatabaseConnection) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let recorder = std::sync::Arc::new(Recorder::default());
    let proxy: std::sync::Arc<Box<dyn sea_orm::ProxyDatabaseTrait>> =
        std::sync::Arc::new(Box::new(RecorderHandle(recorder.clone())));
    let conn = sea_orm::Database::connect_proxy(sea_orm::DatabaseBackend::Postgres, proxy)
        .await
        .map_err(|e| format!("recording connection: {e}"))?;
    let _ = f(conn).await;
    let statements = recorder.0.lock().map_err(|_| "recorder poisoned")?;
    statements
        .first()
        .map(|s| s.to_string())
        .ok_or_else(|| "the function sent no statement".to_owned())
}

fn descriptor(hash: &str) -> serde_json::Value {
    serde_json::json!({ "namespace": "bench", "name": "cycle", "manifest_hash": hash })
}

/// The pgbench scripts: the exact statements of `jobs::schedule`, `jobs::mark_running`,
/// `jobs::mark_completed` and `workers::heartbeat`, with the per-call values as pgbench variables.
async fn pgbench_scripts() -> Res<(String, String)> {
    use ampd::metadata::{jobs, workers};
    let key = jobs::idempotency_key(
        "bench",
        &jobs::target(&descriptor(HASH_MARK)).map_err(|e| e.to_string())?,
    );
    let claim = jobs::JobClaim {
        job_id: JOB_MARK,
        node_id: NODE_MARK.to_owned(),
        attempt: 1,
        epoch: 0,
    };
    let schedule = first_statement(|db| async move {
        jobs::schedule(&db, "bench", descriptor(HASH_MARK), Some(NODE_MARK)).await
    })
    .await?;
    let running = {
        let claim = claim.clone();
        first_statement(|db| async move { jobs::mark_running(&db, &claim).await }).await?
    };
    let completed = first_statement(|db| async move {
        jobs::mark_completed(&db, &claim, &[], Duration::ZERO).await
    })
    .await?;
    let heartbeat =
        first_statement(|db| async move { workers::heartbeat(&db, NODE_MARK).await }).await?;
    let vars = |sql: &str| {
        sql.replace(&key, "bench-:client_id-:k")
            .replace(HASH_MARK, ":k")
            .replace(&JOB_MARK.to_string(), ":job_id")
            .replace(NODE_MARK, "bench-node")
    };
    for (name, sql) in [
        ("schedule", &schedule),
        ("mark_running", &running),
        ("mark_completed", &completed),
    ] {
        if sql.contains('\n') {
            return Err(format!(
                "{name}: a multi-line statement cannot go into a pgbench script"
            ));
        }
    }
    let cycle = format!(
        "\\set k random(1, 1000000000000)\n{} \\gset job_\n{};\n{};\n",
        vars(&schedule),
        vars(&running),
        vars(&completed)
    );
    let heartbeat = format!(
        "\\set w random(1, {WORKERS})\n{};\n",
        heartbeat.replace(NODE_MARK, "w:w")
    );
    Ok((cycle, heartbeat))
}

/// pgbench's transactions per second over `secs` (initial connections excluded).
fn pgbench(ctx: &Ctx<'_>, url: &str, script: &str, secs: u64) -> Res<f64> {
    pgbench_in(ctx, url, script, secs, "simple")
}

/// [`pgbench`] with query mode `mode` (`simple`, `extended` or `prepared`).
fn pgbench_in(ctx: &Ctx<'_>, url: &str, script: &str, secs: u64, mode: &str) -> Res<f64> {
    let path = ctx.tmp.join("script.sql");
    std::fs::write(&path, script).map_err(|e| format!("write pgbench script: {e}"))?;
    let mut cmd = Command::new(ctx.bindir.join("pgbench"));
    cmd.args([
        "-n",
        "-M",
        mode,
        "-c",
        &CONCURRENCY.to_string(),
        "-j",
        "2",
        "-T",
        &secs.to_string(),
        "-f",
    ])
    .arg(&path)
    .arg(url)
    .current_dir(ctx.tmp);
    clean_env(&mut cmd);
    let out = cmd.output().map_err(|e| format!("run pgbench: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("aborted") {
        return Err(format!(
            "pgbench failed: {}{}",
            stdout.trim(),
            stderr.trim()
        ));
    }
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if failed > 0 {
        return Err(format!("pgbench: {failed} transactions failed: {stdout}"));
    }
    stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no tps in pgbench's output: {stdout}"))
}

/// The heartbeat script in a form pgbench can prepare: the worker's id as a parameter
/// (`'w' || :w::text`) instead of inside a literal, which pgbench cannot bind.
fn prepared_heartbeat(script: &str) -> String {
    script.replace("'w:w'", "'w' || :w::text")
}

/// A small, fast, per-task random number generator (xorshift), for picking workers.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// schedule → mark_running → mark_completed.
    JobCycle,
    /// heartbeat of one of [`WORKERS`] workers.
    Heartbeat,
    /// ... and its latency recorded as a worker with a metrics address records it.
    HeartbeatMetered,
}

/// Operations per second of [`CONCURRENCY`] tasks sharing one ampd pool of as many connections.
async fn ampd_rate(url: &str, workload: Workload, secs: u64) -> Res<f64> {
    use ampd::metadata::{jobs, workers};
    let cfg = Ctx::config(url)?;
    let db = ampd::db::connect(&cfg, CONCURRENCY as u32)
        .await
        .map_err(|e| e.to_string())?;
    let run_until = |deadline: Instant, task: usize, warm: bool| {
        let db = db.clone();
        tokio::spawn(async move {
            let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15 ^ (task as u64 + 1));
            let mut n = 0u64;
            while Instant::now() < deadline {
                match workload {
                    Workload::JobCycle => {
                        let hash = format!("{}-{task}-{n}", if warm { "warm" } else { "run" });
                        let (job, _) =
                            jobs::schedule(&db, "bench", descriptor(&hash), Some("bench-node"))
                                .await
                                .map_err(|e| format!("schedule: {e}"))?;
                        let claim = jobs::JobClaim::of(&job).ok_or("scheduled unassigned")?;
                        jobs::mark_running(&db, &claim)
                            .await
                            .map_err(|e| format!("mark_running: {e}"))?;
                        jobs::mark_completed(&db, &claim, &[], Duration::ZERO)
                            .await
                            .map_err(|e| format!("mark_completed: {e}"))?;
                    }
                    Workload::Heartbeat => {
                        let w = rng.next() % WORKERS as u64 + 1;
                        workers::heartbeat(&db, &format!("w{w}"))
                            .await
                            .map_err(|e| format!("heartbeat: {e}"))?;
                    }
                    Workload::HeartbeatMetered => {
                        let w = rng.next() % WORKERS as u64 + 1;
                        let started = Instant::now();
                        let beat = workers::heartbeat(&db, &format!("w{w}")).await;
                        ampd::metrics::heartbeat(started.elapsed(), beat.is_ok());
                        beat.map_err(|e| format!("heartbeat: {e}"))?;
                    }
                }
                n += 1;
            }
            Ok::<u64, String>(n)
        })
    };
    // Warm-up: open every connection and prepare the statements, as pgbench's excluded
    // connection time does.
    let warm = Instant::now() + Duration::from_millis(500);
    for h in (0..CONCURRENCY)
        .map(|t| run_until(warm, t, true))
        .collect::<Vec<_>>()
    {
        h.await.map_err(|e| e.to_string())??;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut total = 0;
    for h in (0..CONCURRENCY)
        .map(|t| run_until(deadline, t, false))
        .collect::<Vec<_>>()
    {
        total += h.await.map_err(|e| e.to_string())??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    db.close().await.map_err(|e| e.to_string())?;
    Ok(total as f64 / elapsed)
}

/// A new database, migrated, with the workers the workloads need.
async fn throughput_db(ctx: &Ctx<'_>, dbs: &mut Databases<'_>) -> Res<(String, String)> {
    use ampd::metadata::workers;
    let (name, url) = dbs.create().await?;
    ctx.ampd_migrate(&url, None)?;
    let db = tests::connect(&url, 1).await;
    workers::register(&db, "bench-node", serde_json::json!({}))
        .await
        .map_err(|e| format!("register: {e}"))?;
    for w in 1..=WORKERS {
        workers::register(&db, &format!("w{w}"), serde_json::json!({}))
            .await
            .map_err(|e| format!("register: {e}"))?;
    }
    let _ = db.close().await;
    Ok((name, url))
}

async fn throughput(
    ctx: &Ctx<'_>,
    transport: &Transport,
    secs: u64,
) -> Res<(Vec<Throughput>, String, String)> {
    let (cycle_script, heartbeat_script) = pgbench_scripts().await?;
    let mut dbs = Databases::new(transport).await;
    let mut out = Vec::new();
    for (workload, script, what, unit) in [
        (
            Workload::JobCycle,
            &cycle_script,
            "schedule → mark_running → mark_completed",
            "cycles",
        ),
        (
            Workload::Heartbeat,
            &heartbeat_script,
            "heartbeat, 100 workers",
            "heartbeats",
        ),
    ] {
        // Two rounds in the order ampd, pgbench, pgbench, ampd; a new database for each run.
        let (mut ampd, mut floor) = (Vec::new(), Vec::new());
        // Heartbeats only: pgbench with ampd's protocol (prepared statements), without and with
        // the round trip sqlx's pool makes when a connection is released (Sync → ReadyForQuery).
        let (mut prepared, mut checked) = (Vec::new(), Vec::new());
        let heartbeat = workload == Workload::Heartbeat;
        for round in 0..2 {
            for side in 0..2 {
                let (name, url) = throughput_db(ctx, &mut dbs).await?;
                if (round + side) % 2 == 0 {
                    ampd.push(ampd_rate(&url, workload, secs).await?);
                } else {
                    floor.push(pgbench(ctx, &url, script, secs)?);
                    if heartbeat {
                        let script = prepared_heartbeat(script);
                        prepared.push(pgbench_in(ctx, &url, &script, secs, "prepared")?);
                        let script = format!("{script}\\startpipeline\n\\endpipeline\n");
                        checked.push(pgbench_in(ctx, &url, &script, secs, "prepared")?);
                    }
                }
                dbs.drop(&name).await?;
            }
        }
        out.push(Throughput {
            what,
            unit,
            ampd_per_sec: median(ampd),
            pgbench_per_sec: median(floor),
            prepared_per_sec: heartbeat.then(|| median(prepared)),
            checked_per_sec: heartbeat.then(|| median(checked)),
        });
    }
    Ok((out, cycle_script, heartbeat_script))
}

// ---------------------------------------------------------------------------------------------
// The report

struct Machine {
    cpu: String,
    cores: usize,
    ram: String,
    kernel: String,
    postgres: String,
    rustc: String,
    commit: String,
    ampd_size: String,
}

async fn machine(admin: &DatabaseConnection, bins: &Binaries) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| "unknown".into());
    let postgres = text(admin, "SELECT version()")
        .await
        .map(|v| v.split(" on ").next().unwrap_or(&v).to_owned())
        .unwrap_or_else(|e| e);
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into())
    };
    let rustc = output("rustc", &["--version"]);
    let mut commit = output("git", &["rev-parse", "--short", "HEAD"]);
    if !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        commit.push_str(" + uncommitted changes");
    }
    let ampd_size = std::fs::metadata(&bins.ampd)
        .map(|m| format!("{:.1} MB", m.len() as f64 / 1e6))
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        cpu,
        cores,
        ram,
        kernel,
        postgres,
        rustc,
        commit,
        ampd_size,
    }
}

fn ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0} ms")
    } else {
        format!("{x:.1} ms")
    }
}

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// `met`, or by how much the goal is missed.
fn verdict_at_most(value: f64, goal: f64) -> String {
    if value <= goal {
        "met".into()
    } else {
        format!("**missed** by {:.0}%", (value / goal - 1.0) * 100.0)
    }
}

struct Report {
    args_runs: usize,
    machine: Machine,
    server: String,
    comparisons: Vec<Comparison>,
    scaling: Vec<Scaling>,
    scaling_transport: String,
    throughput: Vec<Throughput>,
    throughput_note: String,
    services: Option<services::Services>,
    memory: Option<memory::Memory>,
    metrics: Option<metrics::Cost>,
    scale: Option<scale::Scale>,
    elapsed: Duration,
}

/// One throughput comparison of the data-access layer with pgbench.
struct Throughput {
    what: &'static str,
    unit: &'static str,
    ampd_per_sec: f64,
    pgbench_per_sec: f64,
    /// Heartbeats: pgbench with prepared statements (`-M prepared`), ampd's protocol.
    prepared_per_sec: Option<f64>,
    /// ... and the pool's release check (an empty pipeline) after every heartbeat.
    checked_per_sec: Option<f64>,
}

impl Report {
    fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Generated by `cargo run --release -p tests --features bench --bin ampd-bench` (see tests/README.md) on {} UTC \
             in {:.0} s, from commit {}. Every ampd figure is next to its floor: the same work done \
             by PostgreSQL's own tools over the same URL, measured in the same run, interleaved with \
             ampd's runs. Times are wall-clock from process start to exit (medians of {} runs, a new \
             database for every fresh run); peak memory is the child's `ru_maxrss` from `wait4`.\n",
            chrono::Utc::now().format("%Y-%m-%d %H:%M"),
            self.elapsed.as_secs_f64(),
            m.commit,
            self.args_runs,
        );
        let _ = writeln!(md, "## Machine\n");
        let _ = writeln!(
            md,
            "| CPU | cores | RAM | OS | PostgreSQL | rustc | ampd binary |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            m.cpu, m.cores, m.ram, m.kernel, m.postgres, m.rustc, m.ampd_size
        );
        let _ = writeln!(md, "Server: {}.\n", self.server);

        if !self.comparisons.is_empty() {
            let _ = writeln!(md, "## `ampd migrate` against its floor\n");
            let _ = writeln!(
                md,
                "| measurement | transport | ampd median (min–max) | floor | floor median (min–max) | ratio | goal | |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
            for c in &self.comparisons {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} ({}–{}) | `{}` | {} ({}–{}) | {:.2} | ≤ {} | {} |",
                    c.what,
                    c.transport,
                    ms(c.ampd.median_ms),
                    ms(c.ampd.min_ms),
                    ms(c.ampd.max_ms),
                    c.floor_name,
                    ms(c.floor.median_ms),
                    ms(c.floor.min_ms),
                    ms(c.floor.max_ms),
                    c.ratio(),
                    c.goal_ratio,
                    verdict_at_most(c.ratio(), c.goal_ratio),
                );
            }
            let counted: Vec<&Comparison> = self
                .comparisons
                .iter()
                .filter(|c| c.statements.is_some())
                .collect();
            if !counted.is_empty() {
                let _ = writeln!(
                    md,
                    "\nStatements the server executed for one run (`pg_stat_statements`, utility \
                 statements included):\n"
                );
                let _ = writeln!(md, "| measurement | transport | ampd | floor |");
                let _ = writeln!(md, "|---|---|---|---|");
                for c in counted {
                    if let Some((a, f)) = c.statements {
                        let _ = writeln!(md, "| {} | {} | {a} | {f} |", c.what, c.transport);
                    }
                }
            }

            let _ = writeln!(md, "\n## Peak memory of `ampd migrate`\n");
            let _ = writeln!(
                md,
                "| run | transport | ampd median | ampd max | psql median (for reference) | goal | |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|");
            for c in &self.comparisons {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | ≤ 30 MiB | {} |",
                    c.what,
                    c.transport,
                    mib(c.ampd.median_rss_kib),
                    mib(c.ampd.max_rss_kib as f64),
                    mib(c.floor.median_rss_kib),
                    verdict_at_most(c.ampd.max_rss_kib as f64 / 1024.0, 30.0),
                );
            }
        }
        if !self.scaling.is_empty() {
            let _ = writeln!(md, "\n## No-op run with a long history\n");
            let _ = writeln!(
                md,
                "`ampd-fixture migrate` with `AMPD_FIXTURE_MIGRATIONS=synthetic:N` (N trivial migrations \
             applied once), then no-op runs; {}. Goal: the statements per run do not grow with N, \
             and the time stays within 2x of N = 1.\n",
                self.scaling_transport
            );
            let _ = writeln!(
                md,
                "| applied migrations | statements executed (pg_stat_statements) | queries sent (wire count) | median (min–max) | vs N = 1 | |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|");
            let base = self.scaling.first();
            for s in &self.scaling {
                let ratio = base
                    .map(|b| s.noop.median_ms / b.noop.median_ms)
                    .unwrap_or(1.0);
                let flat = base.is_some_and(|b| b.sent == s.sent && b.executed == s.executed);
                let verdict = match (flat, ratio <= 2.0) {
                    (true, true) => "met".to_owned(),
                    (false, _) => "**missed**: statements grow".to_owned(),
                    (true, false) => verdict_at_most(ratio, 2.0),
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} ({}–{}) | {:.2} | {} |",
                    s.n,
                    s.executed
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "n/a".into()),
                    s.sent,
                    ms(s.noop.median_ms),
                    ms(s.noop.min_ms),
                    ms(s.noop.max_ms),
                    ratio,
                    verdict
                );
            }
        }
        if !self.throughput.is_empty() {
            let _ = writeln!(
                md,
                "\n## Coordination throughput of the data-access layer\n"
            );
            let _ = writeln!(md, "{}\n", self.throughput_note);
            let _ = writeln!(
                md,
                "| workload | ampd | pgbench, same statements | ratio | goal | |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|");
            for t in &self.throughput {
                let ratio = t.ampd_per_sec / t.pgbench_per_sec;
                let verdict = if ratio >= 0.7 {
                    "met".to_owned()
                } else {
                    format!("**missed** by {:.0}%", (1.0 - ratio / 0.7) * 100.0)
                };
                let _ = writeln!(
                    md,
                    "| {} | {:.0} {}/s | {:.0} {}/s | {:.2} | ≥ 0.7 | {} |",
                    t.what, t.ampd_per_sec, t.unit, t.pgbench_per_sec, t.unit, ratio, verdict
                );
            }
            let split: Vec<&Throughput> = self
                .throughput
                .iter()
                .filter(|t| t.prepared_per_sec.is_some())
                .collect();
            if !split.is_empty() {
                let _ = writeln!(
                    md,
                    "\nWhere the heartbeats' time goes: pgbench again, in the same rounds, with ampd's \
                     protocol (`-M prepared`: Bind/Execute/Sync of a prepared statement, the worker's id \
                     bound as `'w' || $1::text`), then with, after every heartbeat, the one round trip \
                     sqlx's pool makes when a connection goes back to it (its release check, `Sync` → \
                     `ReadyForQuery`; here an empty `\\startpipeline`/`\\endpipeline`).\n"
                );
                let _ = writeln!(md, "| floor | rate | ampd's ratio to it |");
                let _ = writeln!(md, "|---|---|---|");
                for t in split {
                    for (label, rate) in [
                        (
                            "pgbench, simple protocol (the goal's floor)",
                            Some(t.pgbench_per_sec),
                        ),
                        ("pgbench -M prepared", t.prepared_per_sec),
                        (
                            "pgbench -M prepared + the release check's round trip",
                            t.checked_per_sec,
                        ),
                    ] {
                        if let Some(rate) = rate {
                            let _ = writeln!(
                                md,
                                "| {label} | {rate:.0} {}/s | {:.2} |",
                                t.unit,
                                t.ampd_per_sec / rate
                            );
                        }
                    }
                }
            }
        }
        if let Some(s) = &self.services {
            md.push_str(&services::markdown(s));
        }
        if let Some(m) = &self.memory {
            md.push_str(&memory::markdown(m));
        }
        if let Some(c) = &self.metrics {
            md.push('\n');
            md.push_str(&metrics::markdown(c));
        }
        if let Some(s) = &self.scale {
            md.push_str(&scale::markdown(s));
        }
        md
    }
}

// ---------------------------------------------------------------------------------------------

async fn run(args: Args) -> Res<()> {
    let started = Instant::now();
    let bins = build_binaries()?;
    let tmp = std::env::temp_dir().join(format!("ampd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = measure_all(&args, &bins, &tmp, started).await;
    let _ = std::fs::remove_dir_all(&tmp);
    let report = result?;
    let md = report.markdown();
    println!("{md}");
    if args.write {
        let kept = std::fs::read_to_string(&args.out)
            .ok()
            .and_then(|old| {
                old.split_once(NOTES_MARKER)
                    .map(|(_, notes)| notes.to_owned())
            })
            .unwrap_or_else(|| "\n".to_owned());
        std::fs::write(&args.out, format!("{md}\n{NOTES_MARKER}{kept}"))
            .map_err(|e| format!("write {}: {e}", args.out.display()))?;
        eprintln!("wrote {}", args.out.display());
    }
    Ok(())
}

async fn measure_all(args: &Args, bins: &Binaries, tmp: &Path, started: Instant) -> Res<Report> {
    let server = start_server(tmp).await?;
    let ctx = Ctx {
        bins,
        bindir: &server.bindir,
        tmp,
    };
    let first = &server.transports[0];
    let admin = tests::connect(&first.admin_url, 1).await;
    // Statement counts come from pg_stat_statements when the server has it loaded.
    let stat_statements = scalar(
        &admin,
        "SELECT count(*) FROM pg_settings WHERE name = 'shared_preload_libraries' \
         AND setting ~ '(^|[ ,])pg_stat_statements($|[ ,])'",
    )
    .await?
        == 1;
    if stat_statements {
        exec(&admin, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await?;
    }
    let machine = machine(&admin, bins).await;

    let mut comparisons = Vec::new();
    for transport in server.transports.iter().filter(|_| args.wants("fresh")) {
        eprintln!("fresh migrate, {} ...", transport.label);
        comparisons.push(fresh_migrate(&ctx, transport, args.runs, stat_statements).await?);
    }
    for transport in server.transports.iter().filter(|_| args.wants("noop")) {
        eprintln!("no-op migrate, {} ...", transport.label);
        comparisons.push(noop_migrate(&ctx, transport, args.runs, stat_statements).await?);
    }
    let mut scaling = Vec::new();
    if args.wants("scaling") {
        eprintln!("no-op migrate with 1, 100, 1000 applied migrations ...");
        scaling = self::scaling(&ctx, first, args.runs, stat_statements).await?;
    }
    let (mut throughput, mut cycle_script, mut heartbeat_script) = Default::default();
    if args.wants("throughput") {
        eprintln!("coordination throughput, {} s per run ...", args.secs);
        (throughput, cycle_script, heartbeat_script) =
            self::throughput(&ctx, first, args.secs).await?;
    }
    let mut services = None;
    if args.wants("services") {
        let tools = services::tools()?;
        eprintln!("the services' work ...");
        services = Some(services::measure(&ctx, first, &tools, args.secs).await?);
    }
    let mut scale = None;
    if args.wants("scale") {
        eprintln!("a fleet and its history ...");
        scale = Some(scale::measure(&ctx, first, &args.fleet, &args.year, stat_statements).await?);
    }
    let mut memory = None;
    if args.wants("memory") {
        eprintln!("the controller's memory per request ...");
        let measured = memory::measure(&ctx, first).await?;
        eprint!("{}", memory::markdown(&measured));
        memory = Some(measured);
    }
    // Last: it installs the process's metrics registry, which the data-access functions the
    // other parts call would then record into.
    let mut metrics = None;
    if args.wants("metrics") {
        metrics = Some(metrics::measure(&ctx, first, args.secs).await?);
    }
    let throughput_note = format!(
        "{CONCURRENCY} tokio tasks sharing one ampd pool of {CONCURRENCY} connections (`ampd::db::connect`, \
         a runtime of 2 worker threads like ampd's), each calling the data-access functions in a loop, \
         against `pgbench -n -c {CONCURRENCY} -j 2 -T {secs} -f script.sql` running the statements those \
         functions send (captured from them, values inlined; simple query protocol, pgbench's default); \
         {label}; a new migrated database for every run, two runs of each side (ampd, pgbench, pgbench, \
         ampd), medians of the rates.\n\n\
         <details><summary>pgbench scripts</summary>\n\n```sql\n-- job cycle\n{cycle_script}\n-- heartbeat\n{heartbeat_script}```\n\n</details>",
        secs = args.secs,
        label = first.label,
    );
    let _ = admin.close().await;
    Ok(Report {
        args_runs: args.runs,
        machine,
        server: server.description.clone(),
        comparisons,
        scaling,
        scaling_transport: first.label.clone(),
        throughput,
        throughput_note,
        services,
        memory,
        metrics,
        scale,
        elapsed: started.elapsed(),
    })
}
