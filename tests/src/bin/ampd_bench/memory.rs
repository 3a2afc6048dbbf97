//! The controller's memory per request against the size of the request: a release `ampd
//! controller` on a new database registers a 4 MB inline manifest (one table, about a million
//! one-value rows, `max_inline_rows` raised for it), once alone and eight times at once, then
//! answers eight concurrent reads of that version. Each figure is the peak resident set during
//! the step (`VmHWM`, reset through `/proc/<pid>/clear_refs` before it) above the resident set
//! before it, divided by the bytes of one request body (goal: at most 4).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Ctx, Databases, Res, Transport, clean_env};

/// Rows of the manifest (one small integer each: `[7]`).
const ROWS: usize = 1_000_000;
/// Requests at once in the concurrent steps.
const CONCURRENT: usize = 8;
/// The goal: peak memory per request over the body's size.
pub const GOAL: f64 = 4.0;

/// The figures.
pub struct Memory {
    /// Bytes of one registration's body.
    pub body_bytes: u64,
    /// Resident set of the idle controller, KiB.
    pub idle_kib: u64,
    /// (what, KiB above the resident set before the step, requests in the step).
    pub steps: Vec<(&'static str, u64, usize)>,
    /// Resident set once every step is over, KiB.
    pub after_kib: u64,
}

fn status_kib(pid: u32, field: &str) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("the controller's /proc status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {field} in the controller's /proc status"))
}

/// Resets the peak resident set (`VmHWM`) to the current one.
fn reset_peak(pid: u32) -> Res<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .map_err(|e| format!("resetting the controller's peak RSS: {e}"))
}

struct Controller {
    child: Child,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Drop for Controller {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Controller {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn start(ctx: &Ctx<'_>, url: &str, dir: &Path) -> Res<Controller> {
        std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("data dir: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], tests::services::free_port()));
        let config = dir.join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "[metadata_db]\nurl = {url:?}\n\n[storage]\ndata_dir = {:?}\n\n[controller]\n\
                 admin_addr = \"{addr}\"\nmax_inline_rows = {}\nreconcile_interval_ms = 600000\n",
                dir.join("data").display().to_string(),
                ROWS * 2
            ),
        )
        .map_err(|e| format!("controller.toml: {e}"))?;
        let log = std::fs::File::create(dir.join("controller.log"))
            .map_err(|e| format!("controller.log: {e}"))?;
        let mut cmd = Command::new(&ctx.bins.ampd);
        cmd.arg("--config").arg(&config).arg("controller");
        clean_env(&mut cmd);
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("start the controller: {e}"))?;
        let controller = Controller {
            child,
            addr,
            http: reqwest::Client::new(),
        };
        let started = Instant::now();
        loop {
            if let Ok(r) = controller
                .http
                .get(format!("http://{addr}/healthz"))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(controller);
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err("the controller was not healthy within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Res<()> {
        let r = request.send().await.map_err(|e| format!("{what}: {e}"))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| format!("{what}: {e}"))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "{what}: {status}: {}",
                text.chars().take(300).collect::<String>()
            ))
        }
    }

    async fn register(&self, body: &[u8], version: &str) -> Res<()> {
        let request = self
            .http
            .post(format!("http://{}/datasets", self.addr))
            .header("Content-Type", "application/json")
            .body(body.to_vec());
        self.send(request, &format!("register {version}")).await
    }

    async fn read(&self, version: &str) -> Res<()> {
        let request = self.http.get(format!(
            "http://{}/datasets/bench/memory/versions/{version}",
            self.addr
        ));
        self.send(request, &format!("read {version}")).await
    }

    /// Runs `step`, returning the peak resident set during it above the one before it, KiB.
    async fn peak_of<F: std::future::Future<Output = Res<()>>>(&self, step: F) -> Res<u64> {
        let before = status_kib(self.pid(), "VmRSS:")?;
        reset_peak(self.pid())?;
        step.await?;
        let peak = status_kib(self.pid(), "VmHWM:")?;
        Ok(peak.saturating_sub(before))
    }
}

/// The body of a registration of version `version` of `bench/memory`.
fn body(version: &str) -> Vec<u8> {
    let mut rows = String::with_capacity(ROWS * 4);
    for i in 0..ROWS {
        if i > 0 {
            rows.push(',');
        }
        rows.push('[');
        rows.push(char::from(b'0' + (i % 10) as u8));
        rows.push(']');
    }
    format!(
        "{{\"namespace\":\"bench\",\"name\":\"memory\",\"version\":\"{version}\",\"manifest\":\
         {{\"kind\":\"static\",\"tables\":{{\"t\":{{\"columns\":[{{\"name\":\"n\",\"type\":\
         \"int64\"}}],\"rows\":[{rows}]}}}}}}}}"
    )
    .into_bytes()
}

pub async fn measure(ctx: &Ctx<'_>, transport: &Transport) -> Res<Memory> {
    let mut dbs = Databases::new(transport).await;
    let (name, url) = dbs.create().await?;
    ctx.ampd_migrate(&url, None)?;
    let dir = ctx.tmp.join("memory");
    let _ = std::fs::remove_dir_all(&dir);
    let result = async {
        let controller = Controller::start(ctx, &url, &dir).await?;
        // Warm: one small request, so the figures are the large requests' own.
        controller.read("0.0.0").await.err();
        let idle_kib = status_kib(controller.pid(), "VmRSS:")?;
        let one = body("1.0.0");
        let body_bytes = one.len() as u64;
        let mut steps = Vec::new();
        let kib = controller
            .peak_of(controller.register(&one, "1.0.0"))
            .await?;
        steps.push(("register, one request", kib, 1));
        let versions: Vec<String> = (0..CONCURRENT).map(|i| format!("2.0.{i}")).collect();
        let bodies: Vec<Vec<u8>> = versions.iter().map(|v| body(v)).collect();
        let kib = controller
            .peak_of(async {
                let all = bodies
                    .iter()
                    .zip(&versions)
                    .map(|(b, v)| controller.register(b, v));
                futures_util::future::try_join_all(all).await.map(drop)
            })
            .await?;
        steps.push(("register, 8 requests at once", kib, CONCURRENT));
        let kib = controller
            .peak_of(async {
                let all = (0..CONCURRENT).map(|_| controller.read("1.0.0"));
                futures_util::future::try_join_all(all).await.map(drop)
            })
            .await?;
        steps.push((
            "read the version (its manifest), 8 requests at once",
            kib,
            CONCURRENT,
        ));
        let after_kib = status_kib(controller.pid(), "VmRSS:")?;
        Ok(Memory {
            body_bytes,
            idle_kib,
            steps,
            after_kib,
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    dbs.drop(&name).await?;
    result
}

pub fn markdown(m: &Memory) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let body_mib = m.body_bytes as f64 / (1024.0 * 1024.0);
    let _ = writeln!(md, "\n## The controller's memory per request\n");
    let _ = writeln!(
        md,
        "A release `ampd controller`, idle at {:.1} MiB resident; the body of one registration is a \
         {:.2} MiB inline manifest of {ROWS} one-value rows. Each step's figure is its peak resident \
         set above the resident set before it (`VmHWM` reset through `clear_refs`), per request, \
         over the body's size; the goal is at most {GOAL}×.\n",
        mib(m.idle_kib),
        body_mib
    );
    let _ = writeln!(
        md,
        "| step | peak above before | per request | per request / body | goal ≤ {GOAL}× |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for (what, kib, n) in &m.steps {
        let per = mib(*kib) / *n as f64;
        let ratio = per / body_mib;
        let verdict = if ratio <= GOAL { "met" } else { "**missed**" };
        let _ = writeln!(
            md,
            "| {what} | {:.1} MiB | {per:.1} MiB | {ratio:.1}× | {verdict} |",
            mib(*kib)
        );
    }
    let _ = writeln!(
        md,
        "\nResident set after the steps: {:.1} MiB (memory the allocator keeps for reuse).",
        mib(m.after_kib)
    );
    md
}
