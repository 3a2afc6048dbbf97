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
//!   (the controller stopped), in-process: its time and its longest statement on `jobs` (each
//!   statement is its own transaction, so no lock on `jobs` is held longer).

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
    pub routes: Vec<(String, f64, f64)>,
    pub retention: Option<(f64, f64, u64, u64)>,
    pub size_mb: f64,
}

pub struct Scale {
    pub fleet: Fleet,
    pub empty: Side,
    pub full: Side,
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
    Ok(Scale {
        fleet: fleet.clone(),
        empty,
        full,
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
    if history {
        side.retention = Some(retention_pass(&db).await?);
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
        for _ in 0..REQUESTS {
            let started = Instant::now();
            let r = http
                .get(format!("http://{admin}{path}"))
                .send()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = r.status();
            let _ = r.bytes().await;
            if !status.is_success() {
                return Err(format!("GET {path}: {status}"));
            }
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        side.routes
            .push((path, percentile(&mut ms, 0.5), percentile(&mut ms, 0.99)));
    }

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

/// One retention pass with the defaults, statement by statement: (total s, longest statement on
/// `jobs` in ms, events deleted, jobs deleted).
async fn retention_pass(db: &DatabaseConnection) -> Res<(f64, f64, u64, u64)> {
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
    let mut longest_ms: f64 = 0.0;
    let (mut events, mut deleted_jobs) = (0, 0);
    loop {
        let t = Instant::now();
        let n = jobs::delete_events_of_finished(db, events_age, EVENTS_BATCH)
            .await
            .map_err(|e| format!("retention: {e}"))?;
        // The events batch also reads `jobs` (a shared lock on no row).
        longest_ms = longest_ms.max(t.elapsed().as_secs_f64() * 1000.0);
        events += n;
        if n < EVENTS_BATCH {
            break;
        }
    }
    loop {
        let t = Instant::now();
        let n = jobs::delete_finished(db, jobs_age, JOBS_BATCH)
            .await
            .map_err(|e| format!("retention: {e}"))?;
        longest_ms = longest_ms.max(t.elapsed().as_secs_f64() * 1000.0);
        deleted_jobs += n;
        if n < JOBS_BATCH {
            break;
        }
    }
    Ok((
        started.elapsed().as_secs_f64(),
        longest_ms,
        events,
        deleted_jobs,
    ))
}

fn ms(x: f64) -> String {
    super::ms(x)
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
    for ((path, e50, e99), (_, h50, h99)) in s.empty.routes.iter().zip(&s.full.routes) {
        let _ = writeln!(
            md,
            "| `GET {path}` p50 / p99 | {} / {} | {} / {} | p99 ≤ 10 ms |",
            ms(*e50),
            ms(*e99),
            ms(*h50),
            ms(*h99)
        );
    }
    if let Some((secs, longest, events, jobs)) = s.full.retention {
        let _ = writeln!(
            md,
            "| one retention pass, defaults (30 / 90 days): {events} events, {jobs} jobs deleted | | {secs:.1} s | |"
        );
        let _ = writeln!(
            md,
            "| its longest statement touching `jobs` (its own transaction: the longest lock) | | {} | ≤ 100 ms |",
            ms(longest)
        );
    }
    md
}
