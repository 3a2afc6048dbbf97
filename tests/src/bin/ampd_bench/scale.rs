//! `--only scale`: a fleet and its history. A real `ampd controller` (release build) runs on a
//! database holding `workers` registered workers (a quarter of them with 4 RUNNING jobs each, the
//! ones that stop heartbeating), `active` more active jobs and, on the "history" side, `history`
//! finished jobs with `events` job events in all, plus workers registered once and gone
//! (`ever` in all). The same is measured on both sides:
//!
//! - database time per scheduling pass: `pg_stat_statements` over a quiet stretch (the heartbeats
//!   excluded), divided by the passes the controller made (one per `reconcile_interval_ms`);
//! - heartbeat write latency p50/p99: every live worker heartbeats once a second through a pool of
//!   8 (`workers::heartbeat`, ampd's own statement), while the passes run;
//! - p50/p99 of every list route, sequential requests to the controller;
//! - recovery: a quarter of the workers stop heartbeating at once; the time from their last
//!   heartbeat until every one of their RUNNING jobs is SCHEDULED on a live worker;
//! - then, on the history side, one retention pass with the defaults over the backdated history
//!   (the controller stopped), in-process: its time, the events deleted per second, and the
//!   longest statement of each kind: those that delete jobs (each its own transaction, so no lock
//!   on `jobs` is held longer) apart from those that delete events (they lock no row of `jobs`);
//! - last, on a database of its own, 365 simulated days of `--year` finished jobs a day with
//!   retention's defaults ([`simulate_year`]): the database's size after day 120 and day 365.
//!
//! Each side's figures are printed (stderr) as soon as the side ends, the retention pass's when it
//! ends, so a run cut off later still leaves them; `EXPLAIN (ANALYZE, BUFFERS)` of
//! `GET /workers?live=true`'s two statements is printed beside them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;

use super::{Ctx, Databases, Res, Transport, clean_env, exec, scalar};

/// The fleet's size; the defaults are the issue's.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub workers: usize,
    pub active: usize,
    pub history: usize,
    pub events: usize,
    pub ever: usize,
}

impl Default for Fleet {
    fn default() -> Fleet {
        Fleet {
            workers: 256,
            active: 2000,
            history: 98_000,
            events: 10_000_000,
            ever: 10_000,
        }
    }
}

impl Fleet {
    /// Parses `workers,active,history,events,ever`.
    pub fn parse(text: &str) -> Res<Fleet> {
        let n: Vec<usize> = text
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                format!("--fleet {text:?}: {e}; use workers,active,history,events,ever")
            })?;
        match n.as_slice() {
            &[workers, active, history, events, ever] if workers >= 4 && ever >= workers => {
                Ok(Fleet {
                    workers,
                    active,
                    history,
                    events,
                    ever,
                })
            }
            _ => Err(format!(
                "--fleet {text:?}: five numbers workers,active,history,events,ever with at least \
                 4 workers and ever >= workers"
            )),
        }
    }

    fn dead(&self) -> usize {
        self.workers / 4
    }
}

/// The figures of one side.
#[derive(Clone, Debug, Default)]
pub struct Side {
    pub pass_db_ms: Option<f64>,
    pub heartbeat_ms: (f64, f64),
    pub recovery_s: f64,
    /// Each route: its path, p50 and p99 (ms), and the size of its answer (bytes).
    pub routes: Vec<(String, f64, f64, usize)>,
    pub retention: Option<RetentionFigures>,
    pub size_mb: f64,
}

/// One retention pass, the statements that delete events timed apart from those that delete
/// jobs (only the latter lock rows of `jobs`; each statement is its own transaction).
#[derive(Clone, Debug, Default)]
pub struct RetentionFigures {
    pub secs: f64,
    pub events: u64,
    pub events_secs: f64,
    pub events_statements: u64,
    pub longest_events_ms: f64,
    pub jobs: u64,
    pub jobs_secs: f64,
    pub jobs_statements: u64,
    pub longest_jobs_ms: f64,
}

/// The simulated year: `jobs_per_day` finished jobs a day with `events_per_job` events each,
/// inserted a chunk of days at a time, a retention pass (the defaults) and a VACUUM after each.
#[derive(Clone, Debug)]
pub struct YearPlan {
    pub jobs_per_day: usize,
    pub events_per_job: usize,
}

/// Events per job of the simulated year when `--year` does not say: a job writes one event per
/// transition, three when it completes at its first attempt (SCHEDULED, RUNNING, COMPLETED);
/// ten leaves room for a placement, a retry and a stop. (The fleet's history has about a hundred
/// per job, to load the retention pass; a year of those would take hours to insert here.)
pub const YEAR_EVENTS_PER_JOB: usize = 10;

impl Default for YearPlan {
    fn default() -> YearPlan {
        YearPlan {
            jobs_per_day: 10_000,
            events_per_job: YEAR_EVENTS_PER_JOB,
        }
    }
}

impl YearPlan {
    /// Parses `jobs_per_day[,events_per_job]`; `0` skips the year.
    pub fn parse(text: &str) -> Res<YearPlan> {
        let n: Vec<usize> = text
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--year {text:?}: {e}; use jobs_per_day[,events_per_job]"))?;
        match *n.as_slice() {
            [jobs_per_day] => Ok(YearPlan {
                jobs_per_day,
                events_per_job: YEAR_EVENTS_PER_JOB,
            }),
            [jobs_per_day, events_per_job] if events_per_job >= 1 => Ok(YearPlan {
                jobs_per_day,
                events_per_job,
            }),
            _ => Err(format!(
                "--year {text:?}: jobs_per_day[,events_per_job] (0 jobs skips the year; at \
                 least 1 event per job)"
            )),
        }
    }
}

/// What the simulated year measured.
#[derive(Clone, Debug, Default)]
pub struct Year {
    pub jobs_per_day: usize,
    pub events_per_job: usize,
    /// `pg_database_size` after day 120 and day 365, MB.
    pub size_120_mb: f64,
    pub size_365_mb: f64,
    /// Rows in `jobs` and `job_events` after day 120 and after day 365.
    pub rows_120: (i64, i64),
    pub rows_365: (i64, i64),
    /// Wall time of the whole simulation, s.
    pub secs: f64,
    /// The longest retention pass (s) and its events per second.
    pub longest_pass_s: f64,
}

pub struct Scale {
    pub fleet: Fleet,
    pub empty: Side,
    pub full: Side,
    pub year: Option<Year>,
    pub liveness_s: f64,
}

const LIVENESS_MS: u64 = 5000;
const PASS_MS: u64 = 1000;
const REQUESTS: usize = 200;
const QUIET_SECS: u64 = 10;

pub async fn measure(
    ctx: &Ctx<'_>,
    transport: &Transport,
    fleet: &Fleet,
    plan: &YearPlan,
    stat_statements: bool,
) -> Res<Scale> {
    let mut dbs = Databases::new(transport).await;
    eprintln!("scale: the fleet without history ...");
    let empty = side(ctx, &mut dbs, fleet, false, stat_statements).await?;
    eprintln!(
        "scale: the fleet with {} finished jobs and {} events ...",
        fleet.history, fleet.events
    );
    let full = side(ctx, &mut dbs, fleet, true, stat_statements).await?;
    let year = if plan.jobs_per_day > 0 {
        let events_per_job = plan.events_per_job;
        eprintln!(
            "scale: 365 simulated days of {} jobs a day with {events_per_job} events each ...",
            plan.jobs_per_day
        );
        let year = simulate_year(ctx, &mut dbs, plan.jobs_per_day, events_per_job).await?;
        eprint!("{}", year_markdown(&year));
        Some(year)
    } else {
        None
    };
    Ok(Scale {
        fleet: fleet.clone(),
        empty,
        full,
        year,
        liveness_s: LIVENESS_MS as f64 / 1000.0,
    })
}

fn node(i: usize) -> String {
    format!("w{i:05}")
}

/// Fills a migrated database: the fleet, and the history when `history`.
async fn fill(db: &DatabaseConnection, fleet: &Fleet, history: bool) -> Res<()> {
    let (w, dead) = (fleet.workers, fleet.dead());
    exec(
        db,
        &format!(
            "INSERT INTO workers (node_id, info) \
             SELECT 'w' || lpad(i::text, 5, '0'), '{{}}' FROM generate_series(1, {w}) i;
             INSERT INTO jobs (idempotency_key, kind, node_id, status, descriptor, attempt) \
             SELECT 'dead' || i, 'materialize-static', 'w' || lpad((1 + (i - 1) / 4)::text, 5, '0'), \
                 'RUNNING', jsonb_build_object('namespace', 'dead', 'name', 'd' || i, \
                 'manifest_hash', 'h'), 1 \
             FROM generate_series(1, {dead} * 4) i;
             INSERT INTO jobs (idempotency_key, kind, node_id, status, descriptor, attempt) \
             SELECT 'active' || i, 'materialize-static', \
                 'w' || lpad(({dead} + 1 + i % ({w} - {dead}))::text, 5, '0'), \
                 CASE WHEN i % 2 = 0 THEN 'RUNNING' ELSE 'SCHEDULED' END, \
                 jsonb_build_object('namespace', 'active', 'name', 'd' || i, 'manifest_hash', 'h'), 1 \
             FROM generate_series(1, {active}) i;",
            active = fleet.active,
        ),
    )
    .await?;
    if history {
        let (h, e, ever) = (fleet.history, fleet.events, fleet.ever);
        // Finished jobs spread over the last 100 days, interleaved in id order with nothing else
        // (they come before the active ones in the primary key, as in a real history), each
        // COMPLETED, STOPPED or FATAL: an ERROR job would be due for a retry, which a history
        // long finished is not; gone workers registered once; every finished job with
        // events/history events.
        exec(
            db,
            &format!(
                "INSERT INTO workers (node_id, info, heartbeat_at, registered_at) \
                 SELECT 'g' || lpad(i::text, 6, '0'), '{{}}', now() - (i % 100) * interval '1 day', \
                     now() - (i % 100) * interval '1 day' \
                 FROM generate_series(1, {ever} - {w}) i;
                 INSERT INTO jobs (idempotency_key, kind, node_id, status, descriptor, attempt, \
                     created_at, updated_at) \
                 SELECT 'done' || i, 'materialize-static', NULL, \
                     (ARRAY['COMPLETED', 'STOPPED', 'FATAL'])[1 + i % 3], \
                     jsonb_build_object('namespace', 'old', 'name', 'd' || i, 'manifest_hash', 'h'), 1, \
                     now() - (100.0 * i / {h}) * interval '1 day', \
                     now() - (100.0 * i / {h}) * interval '1 day' \
                 FROM generate_series(1, {h}) i;
                 INSERT INTO job_events (job_id, node_id, event_type, created_at) \
                 SELECT j.id, 'w00001', 'RUNNING', j.updated_at \
                 FROM jobs j, generate_series(1, greatest(1, {e} / greatest({h}, 1))) \
                 WHERE j.idempotency_key LIKE 'done%';
                 ANALYZE;"
            ),
        )
        .await?;
    } else {
        exec(db, "ANALYZE").await?;
    }
    Ok(())
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i]
}

/// Heartbeats of the live workers, every second, until stopped; each write's latency (ms).
struct Heartbeats {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<f64>>,
    silenced: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Heartbeats {
    fn start(db: DatabaseConnection, fleet: &Fleet) -> Heartbeats {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let silenced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (workers, dead) = (fleet.workers, fleet.dead());
        let task = {
            let stop = stop.clone();
            let silenced = silenced.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    tick.tick().await;
                    let first = if silenced.load(std::sync::atomic::Ordering::SeqCst) {
                        dead + 1
                    } else {
                        1
                    };
                    let beats = (first..=workers).map(|i| {
                        let db = db.clone();
                        async move {
                            let started = Instant::now();
                            let ok = ampd::metadata::workers::heartbeat(&db, &node(i)).await;
                            (ok.is_ok(), started.elapsed().as_secs_f64() * 1000.0)
                        }
                    });
                    for (ok, ms) in futures_join(beats).await {
                        if ok {
                            latencies.push(ms);
                        }
                    }
                }
                latencies
            })
        };
        Heartbeats {
            stop,
            task,
            silenced,
        }
    }

    /// Stops the heartbeats of the first quarter of the workers.
    fn silence_dead(&self) {
        self.silenced
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    async fn stop(self) -> Vec<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap_or_default()
    }
}

/// Runs the futures concurrently (8 at a time: the pool's size) and collects their outputs.
async fn futures_join<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::new();
    for f in futures {
        if set.len() >= 8
            && let Some(Ok(t)) = set.join_next().await
        {
            out.push(t);
        }
        set.spawn(f);
    }
    while let Some(Ok(t)) = set.join_next().await {
        out.push(t);
    }
    out
}

fn spawn_controller(ctx: &Ctx<'_>, url: &str, dir: &Path, admin: SocketAddr) -> Res<Child> {
    std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("data dir: {e}"))?;
    let config = dir.join("scale-controller.toml");
    std::fs::write(
        &config,
        format!(
            "[metadata_db]\nurl = {url:?}\nconnect_timeout_secs = 30\n\n[storage]\ndata_dir = {:?}\n\n\
             [controller]\nadmin_addr = \"{admin}\"\nreconcile_interval_ms = {PASS_MS}\n\
             events_retention_days = 0\njobs_retention_days = 0\nworkers_retention_days = 0\n\n\
             [worker]\nliveness_window_ms = {LIVENESS_MS}\n",
            dir.join("data").display().to_string()
        ),
    )
    .map_err(|e| format!("write the controller's config: {e}"))?;
    let log = std::fs::File::create(dir.join("scale-controller.log"))
        .map_err(|e| format!("controller log: {e}"))?;
    let mut cmd = Command::new(&ctx.bins.ampd);
    cmd.arg("--config").arg(&config).arg("controller");
    clean_env(&mut cmd);
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("start the controller: {e}"))
}

async fn side(
    ctx: &Ctx<'_>,
    dbs: &mut Databases<'_>,
    fleet: &Fleet,
    history: bool,
    stat_statements: bool,
) -> Res<Side> {
    let (name, url) = dbs.create().await?;
    ctx.ampd_migrate(&url, None)?;
    let db = tests::connect(&url, 8).await;
    let filled = Instant::now();
    fill(&db, fleet, history).await?;
    eprintln!("  filled in {:.0} s", filled.elapsed().as_secs_f64());
    let size_mb = scalar(&db, "SELECT pg_database_size(current_database())").await? as f64 / 1e6;

    let beats = Heartbeats::start(db.clone(), fleet);
    let admin = SocketAddr::from(([127, 0, 0, 1], tests::services::free_port()));
    let mut controller = spawn_controller(ctx, &url, ctx.tmp, admin)?;
    let result = measure_running(&db, &name, dbs, fleet, admin, &beats, stat_statements).await;
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(controller.id() as libc::pid_t, libc::SIGTERM) };
    let _ = controller.wait();
    let latencies = beats.stop().await;
    let mut side = result?;
    let mut l = latencies;
    side.heartbeat_ms = (percentile(&mut l, 0.5), percentile(&mut l, 0.99));
    side.size_mb = size_mb;
    // Printed at once, so that a run cut off later still leaves this side's figures.
    eprint!(
        "{}",
        side_markdown(if history { "history" } else { "no history" }, fleet, &side)
    );
    if history {
        eprintln!("scale: one retention pass with the defaults over the history ...");
        let figures = retention_pass(&db).await?;
        eprint!("{}", retention_markdown(&figures));
        side.retention = Some(figures);
    }
    let _ = db.close().await;
    dbs.drop(&name).await?;
    Ok(side)
}

async fn measure_running(
    db: &DatabaseConnection,
    name: &str,
    dbs: &Databases<'_>,
    fleet: &Fleet,
    admin: SocketAddr,
    beats: &Heartbeats,
    stat_statements: bool,
) -> Res<Side> {
    let http = tests::api::client();
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("http://{admin}/healthz")).send().await
            && r.status().is_success()
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the controller was not healthy within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the first passes settle (the placement of the SCHEDULED jobs already placed changes
    // nothing), then measure a quiet stretch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut side = Side::default();
    if stat_statements {
        let oid = dbs.oid(name).await?;
        // The extension lives in the admin database; its view covers every database.
        exec(
            &dbs.admin,
            &format!("SELECT pg_stat_statements_reset(0, {oid}, 0)"),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(QUIET_SECS)).await;
        let micros = scalar(
            &dbs.admin,
            &format!(
                "SELECT coalesce(sum(total_exec_time * 1000), 0)::bigint FROM pg_stat_statements \
                 WHERE dbid = {oid} AND query NOT ILIKE '%heartbeat_at\" = CURRENT_TIMESTAMP%' \
                 AND query NOT ILIKE '%pg_stat_statements%'"
            ),
        )
        .await?;
        let passes = (QUIET_SECS * 1000 / PASS_MS) as f64;
        side.pass_db_ms = Some(micros as f64 / 1000.0 / passes);
        eprint!(
            "{}",
            statements_of_the_passes(&dbs.admin, oid, passes).await?
        );
    }

    let events_of = scalar(db, "SELECT coalesce(max(job_id), 1) FROM job_events").await?;
    for path in [
        "/workers".to_owned(),
        "/workers?live=true".to_owned(),
        "/jobs?status=RUNNING&limit=100".to_owned(),
        "/jobs?status=terminal&limit=100".to_owned(),
        "/jobs?limit=100".to_owned(),
        format!("/jobs/{events_of}/events"),
        "/datasets".to_owned(),
    ] {
        let mut ms = Vec::with_capacity(REQUESTS);
        let mut bytes = 0;
        for _ in 0..REQUESTS {
            let started = Instant::now();
            let r = http
                .get(format!("http://{admin}{path}"))
                .send()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = r.status();
            bytes = r.bytes().await.map(|b| b.len()).unwrap_or(0);
            if !status.is_success() {
                return Err(format!("GET {path}: {status}"));
            }
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        side.routes.push((
            path,
            percentile(&mut ms, 0.5),
            percentile(&mut ms, 0.99),
            bytes,
        ));
    }

    eprint!("{}", explain_live(db).await?);

    // Recovery: the first quarter stops heartbeating.
    beats.silence_dead();
    let last_beat = Instant::now();
    let dead = fleet.dead();
    loop {
        let recovered = scalar(
            db,
            &format!(
                "SELECT count(*) FROM jobs WHERE idempotency_key LIKE 'dead%' \
                 AND status = 'SCHEDULED' AND node_id > '{}'",
                node(dead)
            ),
        )
        .await?;
        if recovered as usize == dead * 4 {
            break;
        }
        if last_beat.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "recovery: {recovered} of {} jobs after 120 s",
                dead * 4
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last heartbeat was up to a second before silencing.
    side.recovery_s = last_beat.elapsed().as_secs_f64();
    Ok(side)
}

/// One retention pass with the defaults, statement by statement, as `retention::pass` runs it:
/// the statements that delete events (they read `jobs`, lock none of its rows) timed apart from
/// those that delete jobs (each locks the rows it deletes until it commits).
async fn retention_pass(db: &DatabaseConnection) -> Res<RetentionFigures> {
    use ampd::metadata::jobs;
    use ampd::service::controller::retention::{EVENTS_BATCH, JOBS_BATCH, Retention};
    let r = Retention::new(
        &ampd::config::ControllerConfig::default(),
        &ampd::config::WorkerConfig::default(),
    );
    let (events_age, jobs_age) = (
        r.events.ok_or("events retention is off by default?")?,
        r.jobs.ok_or("jobs retention is off by default?")?,
    );
    let started = Instant::now();
    let mut f = RetentionFigures::default();
    loop {
        let t = Instant::now();
        let purged = jobs::delete_events_of_finished(db, events_age, EVENTS_BATCH)
            .await
            .map_err(|e| format!("retention: {e}"))?;
        f.longest_events_ms = f.longest_events_ms.max(t.elapsed().as_secs_f64() * 1000.0);
        f.events_statements += 1;
        f.events += purged.events;
        if f.events_statements % 500 == 0 {
            eprintln!(
                "  {} events deleted in {:.0} s ...",
                f.events,
                started.elapsed().as_secs_f64()
            );
        }
        if purged.jobs < EVENTS_BATCH {
            break;
        }
    }
    f.events_secs = started.elapsed().as_secs_f64();
    let jobs_started = Instant::now();
    loop {
        let t = Instant::now();
        let n = jobs::delete_finished(db, jobs_age, JOBS_BATCH)
            .await
            .map_err(|e| format!("retention: {e}"))?;
        f.longest_jobs_ms = f.longest_jobs_ms.max(t.elapsed().as_secs_f64() * 1000.0);
        f.jobs_statements += 1;
        f.jobs += n;
        if n < JOBS_BATCH {
            break;
        }
    }
    f.jobs_secs = jobs_started.elapsed().as_secs_f64();
    f.secs = started.elapsed().as_secs_f64();
    Ok(f)
}

/// Where the passes' database time went: the statements of the quiet stretch (the heartbeats
/// left out), the costliest first, each with its calls and time per pass.
async fn statements_of_the_passes(
    admin: &DatabaseConnection,
    oid: i64,
    passes: f64,
) -> Res<String> {
    use sea_orm::{ConnectionTrait, Statement};
    let sql = format!(
        "SELECT calls, total_exec_time, regexp_replace(left(query, 110), '\\s+', ' ', 'g') \
         FROM pg_stat_statements WHERE dbid = {oid} \
         AND query NOT ILIKE '%heartbeat_at\" = CURRENT_TIMESTAMP%' \
         AND query NOT ILIKE '%pg_stat_statements%' ORDER BY total_exec_time DESC LIMIT 6"
    );
    let rows = admin
        .query_all_raw(Statement::from_string(admin.get_database_backend(), sql))
        .await
        .map_err(|e| format!("pg_stat_statements: {e}"))?;
    let mut out = "  the passes' statements, costliest first (calls, ms per pass):\n".to_owned();
    for r in rows {
        let calls: i64 = r.try_get_by_index(0).map_err(|e| e.to_string())?;
        let ms: f64 = r.try_get_by_index(1).map_err(|e| e.to_string())?;
        let query: String = r.try_get_by_index(2).map_err(|e| e.to_string())?;
        out.push_str(&format!("    {calls:>5} {:>7.2}  {query}\n", ms / passes));
    }
    Ok(out)
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the two statements of `GET /workers?live=true` (the page, then
/// the active jobs of its workers), as the controller sends them, and the state of `workers`.
async fn explain_live(db: &DatabaseConnection) -> Res<String> {
    use sea_orm::{ConnectionTrait, Statement};
    let lines = |sql: String| async move {
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                sql.clone(),
            ))
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
        rows.iter()
            .map(|r| r.try_get_by_index::<String>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{sql}: {e}"))
    };
    let live = format!(
        "w.heartbeat_at > now() - {} * interval '1 microsecond'",
        LIVENESS_MS * 1000
    );
    let page = format!(
        "SELECT w.*, {live} AS live FROM workers w WHERE {live} ORDER BY w.node_id LIMIT 100"
    );
    let nodes = lines(format!("SELECT node_id FROM ({page}) p")).await?;
    let list = nodes
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let jobs = format!(
        "SELECT * FROM jobs WHERE node_id IN ({list}) AND status IN ('SCHEDULED', 'RUNNING', \
         'STOP_REQUESTED', 'STOPPING') ORDER BY node_id, id"
    );
    let mut out = format!(
        "  GET /workers?live=true: {} active jobs on the page's {} workers; its page:\n",
        if nodes.is_empty() {
            "0".to_owned()
        } else {
            lines(format!("SELECT count(*)::text FROM ({jobs}) j"))
                .await?
                .concat()
        },
        nodes.len()
    );
    for l in lines(format!("EXPLAIN (ANALYZE, BUFFERS) {page}")).await? {
        out.push_str(&format!("    {l}\n"));
    }
    out.push_str("  and the active jobs of the page's workers:\n");
    if nodes.is_empty() {
        out.push_str("    (no live worker)\n");
    } else {
        for l in lines(format!("EXPLAIN (ANALYZE, BUFFERS) {jobs}")).await? {
            out.push_str(&format!("    {l}\n"));
        }
    }
    for l in lines(
        "SELECT format('workers: %s live tuples, %s dead, %s updates (%s HOT), heap %s, \
         workers_node_id_key %s, last autovacuum %s', n_live_tup, n_dead_tup, n_tup_upd, \
         n_tup_hot_upd, pg_size_pretty(pg_relation_size('workers')), \
         pg_size_pretty(pg_relation_size('workers_node_id_key')), \
         coalesce(last_autovacuum::text, 'never')) FROM pg_stat_user_tables \
         WHERE relname = 'workers'"
            .to_owned(),
    )
    .await?
    {
        out.push_str(&format!("  {l}\n"));
    }
    Ok(out)
}

const DAY_CHUNK: usize = 5;

/// 365 simulated days of `jobs_per_day` finished jobs a day (`events_per_job` events each) on a
/// new migrated database with retention's defaults: a chunk of `DAY_CHUNK` days is inserted, then
/// a retention pass runs as at the end of that chunk's last day, then a plain VACUUM (what
/// autovacuum does on a server), and so on. The rows of day `d` are dated `365 - d` days before
/// the real clock, so day 365 ends now; retention reads the database's clock, so a pass at the
/// end of day `k` is run with every age lengthened by `365 - k` days (the rows it compares are
/// then exactly as old as at day `k`).
async fn simulate_year(
    ctx: &Ctx<'_>,
    dbs: &mut Databases<'_>,
    jobs_per_day: usize,
    events_per_job: usize,
) -> Res<Year> {
    use ampd::service::controller::retention::{self, Retention};
    let (name, url) = dbs.create().await?;
    ctx.ampd_migrate(&url, None)?;
    let db = tests::connect(&url, 2).await;
    let defaults = Retention::new(
        &ampd::config::ControllerConfig::default(),
        &ampd::config::WorkerConfig::default(),
    );
    let (events_age, jobs_age) = (
        defaults
            .events
            .ok_or("events retention is off by default?")?,
        defaults.jobs.ok_or("jobs retention is off by default?")?,
    );
    const DAYS: usize = 365;
    let day = Duration::from_secs(24 * 60 * 60);
    let started = Instant::now();
    let mut year = Year {
        jobs_per_day,
        events_per_job,
        ..Year::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let rows = |db: DatabaseConnection| async move {
        Ok::<_, String>((
            scalar(&db, "SELECT count(*) FROM jobs").await?,
            scalar(&db, "SELECT count(*) FROM job_events").await?,
        ))
    };
    let mut first = 1;
    while first <= DAYS {
        let last = (first + DAY_CHUNK - 1).min(DAYS);
        // Each job finished at a point of its day (spread over the day), its events in the
        // minutes before, every status a finished job has.
        exec(
            &db,
            &format!(
                "WITH j AS (\
                   INSERT INTO jobs (idempotency_key, kind, node_id, status, descriptor, attempt, \
                       created_at, updated_at) \
                   SELECT 'y' || d || '.' || i, 'materialize-static', NULL, \
                       (ARRAY['COMPLETED', 'STOPPED', 'FATAL'])[1 + i % 3], \
                       jsonb_build_object('namespace', 'year', 'name', 'd' || i, 'manifest_hash', 'h'), 1, \
                       t - interval '10 minutes', t \
                   FROM generate_series({first}, {last}) d, generate_series(1, {jobs_per_day}) i, \
                       LATERAL (SELECT now() - ({DAYS} - d) * interval '1 day' \
                           - (1.0 - i::float8 / {jobs_per_day}) * interval '1 day' AS t) at \
                   RETURNING id, updated_at) \
                 INSERT INTO job_events (job_id, node_id, event_type, created_at) \
                 SELECT j.id, 'w00001', 'RUNNING', j.updated_at - (k * interval '1 second') \
                 FROM j, generate_series(1, {events_per_job}) k"
            ),
        )
        .await?;
        let shift = day.saturating_mul((DAYS - last) as u32);
        let r = Retention {
            events: Some(events_age + shift),
            jobs: Some(jobs_age + shift),
            workers: None,
            liveness_window: defaults.liveness_window,
        };
        let t = Instant::now();
        let deleted = retention::pass(&db, &r, &stop)
            .await
            .map_err(|e| format!("retention pass at day {last}: {e}"))?;
        let pass_s = t.elapsed().as_secs_f64();
        year.longest_pass_s = year.longest_pass_s.max(pass_s);
        exec(&db, "VACUUM").await?;
        if last % 30 < DAY_CHUNK || last == DAYS {
            eprintln!(
                "  day {last}: {:.0} MB; the pass deleted {} events and {} jobs in {pass_s:.1} s \
                 ({:.0} s so far)",
                scalar(&db, "SELECT pg_database_size(current_database())").await? as f64 / 1e6,
                deleted.events,
                deleted.jobs,
                started.elapsed().as_secs_f64()
            );
        }
        if last == 120 {
            year.size_120_mb =
                scalar(&db, "SELECT pg_database_size(current_database())").await? as f64 / 1e6;
            year.rows_120 = rows(db.clone()).await?;
        }
        first = last + 1;
    }
    year.size_365_mb =
        scalar(&db, "SELECT pg_database_size(current_database())").await? as f64 / 1e6;
    year.rows_365 = rows(db.clone()).await?;
    year.secs = started.elapsed().as_secs_f64();
    let _ = db.close().await;
    dbs.drop(&name).await?;
    Ok(year)
}

fn ms(x: f64) -> String {
    super::ms(x)
}

fn kb(bytes: usize) -> String {
    format!("{:.1} kB", bytes as f64 / 1000.0)
}

pub fn markdown(s: &Scale) -> String {
    use std::fmt::Write as _;
    let f = &s.fleet;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## A fleet and its history (`--only scale`)\n\n\
         A real `ampd controller` (release) on {} registered workers ({} heartbeating once a \
         second through a pool of 8, {} of them with 4 RUNNING jobs each that stop heartbeating \
         for the recovery), {} more active jobs; \"history\": {} finished jobs over 100 days with \
         {} events, and {} workers ever registered. Scheduling pass every {PASS_MS} ms, liveness \
         window {} s. List routes: {REQUESTS} sequential requests each.\n",
        f.workers,
        f.workers,
        f.dead(),
        f.active,
        f.history,
        f.events,
        f.ever,
        s.liveness_s
    );
    let _ = writeln!(md, "| measure | no history | history | goal |");
    let _ = writeln!(md, "|---|---|---|---|");
    let pass = |x: &Side| x.pass_db_ms.map(ms).unwrap_or_else(|| "–".to_owned());
    let _ = writeln!(
        md,
        "| database size | {:.0} MB | {:.0} MB | |",
        s.empty.size_mb, s.full.size_mb
    );
    let _ = writeln!(
        md,
        "| database time per scheduling pass (`pg_stat_statements`) | {} | {} | ≤ 5 ms and ≤ 1.2× no history |",
        pass(&s.empty),
        pass(&s.full)
    );
    let _ = writeln!(
        md,
        "| recovery of the {} RUNNING jobs of {} silenced workers | {:.1} s | {:.1} s | ≤ {:.0} s (liveness window + 1 s) |",
        f.dead() * 4,
        f.dead(),
        s.empty.recovery_s,
        s.full.recovery_s,
        s.liveness_s + 1.0
    );
    let _ = writeln!(
        md,
        "| heartbeat write p50 / p99 during passes | {} / {} | {} / {} | p99 ≤ 10 ms |",
        ms(s.empty.heartbeat_ms.0),
        ms(s.empty.heartbeat_ms.1),
        ms(s.full.heartbeat_ms.0),
        ms(s.full.heartbeat_ms.1)
    );
    for ((path, e50, e99, eb), (_, h50, h99, hb)) in s.empty.routes.iter().zip(&s.full.routes) {
        let _ = writeln!(
            md,
            "| `GET {path}` p50 / p99 (answer) | {} / {} ({}) | {} / {} ({}) | p99 ≤ 10 ms |",
            ms(*e50),
            ms(*e99),
            kb(*eb),
            ms(*h50),
            ms(*h99),
            kb(*hb)
        );
    }
    if let Some(r) = &s.full.retention {
        md.push_str(&retention_rows(r));
    }
    if let Some(y) = &s.year {
        md.push('\n');
        md.push_str(&year_markdown(y));
    }
    md
}

/// One side's figures as a table of their own, printed as soon as the side is measured.
fn side_markdown(title: &str, f: &Fleet, side: &Side) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "\n| measure | {title} |\n|---|---|");
    let _ = writeln!(md, "| database size | {:.0} MB |", side.size_mb);
    let _ = writeln!(
        md,
        "| database time per scheduling pass (`pg_stat_statements`) | {} |",
        side.pass_db_ms.map(ms).unwrap_or_else(|| "–".to_owned())
    );
    let _ = writeln!(
        md,
        "| recovery of the {} RUNNING jobs of {} silenced workers | {:.1} s |",
        f.dead() * 4,
        f.dead(),
        side.recovery_s
    );
    let _ = writeln!(
        md,
        "| heartbeat write p50 / p99 during passes | {} / {} |",
        ms(side.heartbeat_ms.0),
        ms(side.heartbeat_ms.1)
    );
    for (path, p50, p99, bytes) in &side.routes {
        let _ = writeln!(
            md,
            "| `GET {path}` p50 / p99 (answer) | {} / {} ({}) |",
            ms(*p50),
            ms(*p99),
            kb(*bytes)
        );
    }
    md
}

/// The rows of the history column that a retention pass fills.
fn retention_rows(r: &RetentionFigures) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| one retention pass, defaults (30 / 90 days): {} events, {} jobs deleted | | {:.1} s | |",
        r.events, r.jobs, r.secs
    );
    let _ = writeln!(
        md,
        "| its events: {} statements, {:.1} s, {:.0} events/s; longest statement (reads `jobs`, locks none of its rows) | | {} | |",
        r.events_statements,
        r.events_secs,
        r.events as f64 / r.events_secs.max(1e-9),
        ms(r.longest_events_ms)
    );
    let _ = writeln!(
        md,
        "| its jobs: {} statements, {:.1} s; longest statement (its own transaction: the longest lock on `jobs`) | | {} | ≤ 100 ms |",
        r.jobs_statements,
        r.jobs_secs,
        ms(r.longest_jobs_ms)
    );
    md
}

/// The retention pass's figures, printed as soon as the pass ends.
fn retention_markdown(r: &RetentionFigures) -> String {
    format!(
        "\n| retention | | history | goal |\n|---|---|---|---|\n{}",
        retention_rows(r)
    )
}

/// The simulated year's figures.
pub fn year_markdown(y: &Year) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| 365 simulated days, {} jobs a day with {} events each, retention's defaults | after day 120 | after day 365 | goal |\n|---|---|---|---|",
        y.jobs_per_day, y.events_per_job
    );
    let _ = writeln!(
        md,
        "| `pg_database_size` | {:.0} MB | {:.0} MB ({:.2}×) | ≤ 1.2× |",
        y.size_120_mb,
        y.size_365_mb,
        y.size_365_mb / y.size_120_mb.max(1e-9)
    );
    let _ = writeln!(
        md,
        "| rows in `jobs` / `job_events` | {} / {} | {} / {} | |",
        y.rows_120.0, y.rows_120.1, y.rows_365.0, y.rows_365.1
    );
    let _ = writeln!(
        md,
        "| the simulation's wall time; its longest retention pass | | {:.0} s; {:.1} s | |",
        y.secs, y.longest_pass_s
    );
    md
}
