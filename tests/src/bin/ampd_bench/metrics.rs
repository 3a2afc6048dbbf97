//! The cost of metrics: heartbeats per second with the heartbeat's histogram recorded and without,
//! `GET /jobs/{id}` per second from a controller with metrics on (`[controller] metrics = true`,
//! the default) and off, runs interleaved (on, off, off, on, ...), medians; and the time of one
//! `GET /metrics` on a database of 256 live workers and 100 000 jobs, each scrape a second apart so
//! that each reads the database again.
//!
//! Heartbeats run in this process (as the throughput part does): "on" records what a worker with
//! `[worker] metrics_addr` records per heartbeat, into the process's registry; "off" records
//! nothing, as a worker without `metrics_addr`. The admin API's load comes from this process too:
//! [`LOAD_CONNECTIONS`] keep-alive connections asking in a loop, the same client for both sides.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{
    Ctx, Databases, Res, Transport, Workload, ampd_rate, exec, median, scalar, throughput_db,
};

/// Connections of the admin API's load.
const LOAD_CONNECTIONS: usize = 8;
/// On/off pairs of each comparison (each pair run as on, off or off, on in turn): five, so that a
/// median is not one noisy run's.
const PAIRS: usize = 5;
/// Scrapes timed.
const SCRAPES: usize = 7;
/// Workers and jobs of the scrape's database.
const SCRAPE_WORKERS: usize = 256;
const SCRAPE_JOBS: usize = 100_000;

/// What [`measure`] found.
pub struct Cost {
    pub heartbeats_on: f64,
    pub heartbeats_off: f64,
    pub jobs_on: f64,
    pub jobs_off: f64,
    pub scrape_median_ms: f64,
    pub scrape_max_ms: f64,
    pub query_median_ms: f64,
    pub scrape_bytes: usize,
    pub setup: String,
}

/// Runs `on` and `off` alternately ([`PAIRS`] pairs), and returns the medians (on, off).
async fn interleaved<F, Fut>(mut run: F) -> Res<(f64, f64)>
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = Res<f64>>,
{
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for pair in 0..PAIRS {
        let order = if pair % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for metrics in order {
            let rate = run(metrics).await?;
            eprintln!(
                "  metrics {}: {rate:.0}/s",
                if metrics { "on" } else { "off" }
            );
            if metrics { &mut on } else { &mut off }.push(rate);
        }
    }
    Ok((median(on), median(off)))
}

/// A controller process on `url`, with `metrics` on or off.
struct Controller {
    addr: SocketAddr,
    child: Child,
}

impl Controller {
    async fn start(ctx: &Ctx<'_>, url: &str, metrics: bool) -> Res<Controller> {
        let addr = SocketAddr::from(([127, 0, 0, 1], tests::services::free_port()));
        let path = ctx.tmp.join(format!("controller-{}.toml", addr.port()));
        let text = format!(
            "[metadata_db]\nurl = {url:?}\n\n[storage]\ndata_dir = {:?}\n\n[controller]\n\
             admin_addr = \"{addr}\"\nreconcile_interval_ms = 600000\nmetrics = {metrics}\n",
            ctx.tmp.join("data").display().to_string()
        );
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut cmd = Command::new(&ctx.bins.ampd);
        super::clean_env(&mut cmd);
        cmd.arg("--config")
            .arg(&path)
            .arg("controller")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("start ampd controller: {e}"))?;
        let controller = Controller { addr, child };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let url = format!("http://{addr}/healthz");
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(controller);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the controller on {addr} is not healthy within 60 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Requests per second of `GET url` for `secs` over [`LOAD_CONNECTIONS`] connections; every
/// answer must be a 200.
async fn load(url: &str, secs: u64) -> Res<f64> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(LOAD_CONNECTIONS)
        .build()
        .map_err(|e| e.to_string())?;
    // Warm-up: open the connections.
    for _ in 0..LOAD_CONNECTIONS * 4 {
        http.get(url).send().await.map_err(|e| e.to_string())?;
    }
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..LOAD_CONNECTIONS)
        .map(|_| {
            let (http, url, done) = (http.clone(), url.to_owned(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let r = http.get(&url).send().await.map_err(|e| e.to_string())?;
                    if r.status() != 200 {
                        return Err(format!("GET {url}: {}", r.status()));
                    }
                    r.bytes().await.map_err(|e| e.to_string())?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Measures the cost of metrics on new databases of `transport`'s server.
pub async fn measure(ctx: &Ctx<'_>, transport: &Transport, secs: u64) -> Res<Cost> {
    let mut dbs = Databases::new(transport).await;
    std::fs::create_dir_all(ctx.tmp.join("data")).map_err(|e| e.to_string())?;

    eprintln!("metrics: heartbeats, on and off ...");
    ampd::metrics::install();
    let (name, url) = throughput_db(ctx, &mut dbs).await?;
    let (heartbeats_on, heartbeats_off) = interleaved(|on| {
        let url = url.clone();
        async move {
            let workload = if on {
                Workload::HeartbeatMetered
            } else {
                Workload::Heartbeat
            };
            ampd_rate(&url, workload, secs).await
        }
    })
    .await?;
    dbs.drop(&name).await?;

    eprintln!("metrics: GET /jobs/{{id}}, on and off ...");
    let (name, url) = dbs.create().await?;
    ctx.ampd_migrate(&url, None)?;
    let db = tests::connect(&url, 1).await;
    let descriptor = super::descriptor("metrics-cost");
    let (job, _) = ampd::metadata::jobs::schedule(&db, "bench", descriptor, None)
        .await
        .map_err(|e| format!("schedule: {e}"))?;
    let on = Controller::start(ctx, &url, true).await?;
    let off = Controller::start(ctx, &url, false).await?;
    let path = format!("/jobs/{}", job.id);
    let (jobs_on, jobs_off) = interleaved(|metrics| {
        let url = if metrics {
            on.url(&path)
        } else {
            off.url(&path)
        };
        async move { load(&url, secs).await }
    })
    .await?;

    eprintln!("metrics: one scrape with {SCRAPE_WORKERS} workers and {SCRAPE_JOBS} jobs ...");
    // The bench's server runs with `synchronous_commit = off`, and VACUUM cannot mark a page
    // all-visible before the commit of its rows is flushed: the fill commits synchronously, so
    // that the VACUUM after it sets the visibility map as autovacuum does on a real database.
    exec(&db, "SET synchronous_commit = on").await?;
    exec(
        &db,
        &format!(
            "INSERT INTO workers (node_id, info) \
             SELECT 'scrape-' || g, '{{}}' FROM generate_series(1, {SCRAPE_WORKERS}) AS g"
        ),
    )
    .await?;
    exec(
        &db,
        &format!(
            "INSERT INTO jobs (idempotency_key, kind, node_id, descriptor, status, attempt) \
             SELECT 'scrape-' || g, 'bench', 'scrape-' || (1 + g % {SCRAPE_WORKERS}), '{{}}', \
             (ARRAY['SCHEDULED','RUNNING','COMPLETED','ERROR','FATAL','STOPPED'])[1 + g % 6], 1 \
             FROM generate_series(1, {SCRAPE_JOBS}) AS g"
        ),
    )
    .await?;
    exec(&db, "VACUUM ANALYZE jobs").await?;
    exec(&db, "VACUUM ANALYZE workers").await?;
    exec(&db, "RESET synchronous_commit").await?;
    let visible = scalar(
        &db,
        "SELECT (100 * relallvisible / greatest(relpages, 1))::int8 FROM pg_class \
         WHERE oid = 'jobs'::regclass",
    )
    .await?;
    let http = reqwest::Client::new();
    let (mut scrapes, mut queries, mut bytes) = (Vec::new(), Vec::new(), 0);
    let window = Duration::from_secs(3600);
    for _ in 0..SCRAPES {
        // Each scrape a little over a second after the last: it reads the database again. The
        // workers are kept live (a heartbeat each) outside the timed part.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        exec(&db, "UPDATE workers SET heartbeat_at = now()").await?;
        let started = Instant::now();
        let r = http
            .get(on.url("/metrics"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let text = r.text().await.map_err(|e| e.to_string())?;
        scrapes.push(started.elapsed().as_secs_f64() * 1000.0);
        let workers_line = format!("ampd_workers_live {SCRAPE_WORKERS}");
        if !text.contains(&workers_line) {
            return Err(format!("the scrape does not show {workers_line}:\n{text}"));
        }
        bytes = text.len();
        let started = Instant::now();
        ampd::metadata::overview::read(&db, window)
            .await
            .map_err(|e| format!("overview: {e}"))?;
        queries.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let scrape_max_ms = scrapes.iter().copied().fold(0.0, f64::max);
    drop((on, off));
    let _ = db.close().await;
    dbs.drop(&name).await?;
    Ok(Cost {
        heartbeats_on,
        heartbeats_off,
        jobs_on,
        jobs_off,
        scrape_median_ms: median(scrapes),
        scrape_max_ms,
        query_median_ms: median(queries),
        scrape_bytes: bytes,
        setup: format!(
            "{} ({}); heartbeats: {} tasks on one pool of as many connections, {PAIRS} runs of \
             {secs} s per side; `GET /jobs/{{id}}`: two release controllers on one database, one \
             with `[controller] metrics = false`, {LOAD_CONNECTIONS} keep-alive connections from \
             the bench process, {PAIRS} runs of {secs} s per side; scrapes: {SCRAPES}, each \
             1.1 s after the last, on jobs filled, then `VACUUM ANALYZE`d ({visible}% of their \
             pages all-visible)",
            "interleaved runs, medians",
            transport.label,
            super::CONCURRENCY,
        ),
    })
}

/// The section of BENCHMARKS.md.
pub fn markdown(c: &Cost) -> String {
    let change = |on: f64, off: f64| (on / off - 1.0) * 100.0;
    let verdict = |pct: f64| {
        if pct >= -5.0 {
            "met".to_owned()
        } else {
            format!("**missed** ({pct:.1}%)")
        }
    };
    let (hb, jobs) = (
        change(c.heartbeats_on, c.heartbeats_off),
        change(c.jobs_on, c.jobs_off),
    );
    let scrape = if c.scrape_median_ms <= 20.0 {
        "met"
    } else {
        "**missed**"
    };
    format!(
        "## Metrics\n\nThe cost of metrics ({}).\n\n\
         | measurement | metrics on | metrics off | change | goal | |\n|---|---|---|---|---|---|\n\
         | heartbeats, 100 workers (the heartbeat's histogram recorded) | {:.0} heartbeats/s | {:.0} heartbeats/s | {hb:+.1}% | ≥ −5% | {} |\n\
         | admin API: `GET /jobs/{{id}}` | {:.0} req/s | {:.0} req/s | {jobs:+.1}% | ≥ −5% | {} |\n\n\
         | measurement | median | max | goal | |\n|---|---|---|---|---|\n\
         | one `GET /metrics` of the controller, {SCRAPE_WORKERS} live workers and {SCRAPE_JOBS} jobs ({} bytes), the database read included | {:.1} ms | {:.1} ms | ≤ 20 ms | {scrape} |\n\
         | ... of which its one query (`metadata::overview::read`) | {:.1} ms | — | — | |\n",
        c.setup,
        c.heartbeats_on,
        c.heartbeats_off,
        verdict(hb),
        c.jobs_on,
        c.jobs_off,
        verdict(jobs),
        c.scrape_bytes,
        c.scrape_median_ms,
        c.scrape_max_ms,
        c.query_median_ms,
    )
}
