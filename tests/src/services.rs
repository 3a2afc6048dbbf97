//! Running ampd's services as a user does: each an `ampd` process with a config file, found by its
//! HTTP address and `/healthz`, stopped with SIGTERM or killed with SIGKILL, its log kept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

/// A port on `127.0.0.1` nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `127.0.0.1:<a free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `check` every 50 ms until it holds; fails, naming `what`, after 30 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An `ampd` process running a service.
pub struct Service {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    /// Where [`Service::failpoint`] writes (a service started with failpoints only).
    stdin: Option<ChildStdin>,
}

/// How a service process ended.
#[derive(Debug)]
pub struct Exit {
    /// The exit code, `None` when a signal ended it.
    pub code: Option<i32>,
    /// What it wrote to stdout and stderr.
    pub log: String,
    /// How long it took to exit after it was asked to.
    pub took: Duration,
}

impl Service {
    /// Starts `ampd --config <config> <args...>` (`name` is for messages) with `env` added to an
    /// environment cleaned of `AMP_CONFIG*` and `RUST_LOG` (set to `info`).
    pub fn start(name: &str, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut cmd = Command::new(crate::cli::ampd());
        cmd.arg("--config").arg(config).args(args);
        Service::spawn(name, cmd, env)
    }

    /// [`Service::start`] with the failpoints `failpoints` set (`FAILPOINTS`, `name=actions;...`;
    /// see `ampd::failpoint`), and its standard input kept for [`Service::failpoint`]. Waits until
    /// the process says it has them: a binary built without them (`cargo build -p ampd` alone) is
    /// refused, saying how to build one that has.
    pub async fn start_with_failpoints(
        name: &str,
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        failpoints: &str,
    ) -> Service {
        let mut cmd = Command::new(crate::cli::ampd());
        cmd.arg("--config").arg(config).args(args);
        let mut env = env.to_vec();
        env.push(("FAILPOINTS", failpoints));
        let mut service = Service::spawn(name, cmd, &env);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !service.log().contains("failpoints set") {
            let exited = !service.is_running();
            let started = service.log().contains(" started");
            assert!(
                !exited && !started && Instant::now() < deadline,
                "{name} has no failpoints: build ampd with them (`cargo build -p ampd --features \
                 failpoints`, or `cargo test --workspace`, which builds it for the tests):\n{}",
                service.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        service
    }

    /// Sets failpoint `name` of a service started [with failpoints](Self::start_with_failpoints)
    /// to `actions` (`off` releases a paused one), and waits until the process has taken it.
    pub async fn failpoint(&mut self, name: &str, actions: &str) {
        let line = format!("{name}={actions}");
        let before = self.log().matches("failpoint set").count();
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{} was not started with failpoints", self.name));
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the service's standard input");
        stdin
            .flush()
            .await
            .expect("flush the service's standard input");
        let name = self.name.clone();
        eventually(&format!("{name} sets failpoint {line}"), || {
            let set = self.log().matches("failpoint set").count() > before;
            async move { set }
        })
        .await;
    }

    /// Starts `cmd` (an `ampd` command line) as service `name`.
    pub fn spawn(name: &str, mut cmd: Command, env: &[(&str, &str)]) -> Service {
        for (key, _) in std::env::vars() {
            if key.starts_with("AMP_CONFIG") || key == "RUST_LOG" || key == "AMP_DIR" {
                cmd.env_remove(key);
            }
        }
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let failpoints = env.iter().any(|(k, _)| *k == "FAILPOINTS");
        cmd.stdin(if failpoints {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdin = child.stdin.take();
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                let mut buf = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut log) = log.lock() {
                        log.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        Service {
            name: name.to_owned(),
            child,
            log,
            stdin,
        }
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (at most `within`) until `ready` holds for the log; panics with the log otherwise,
    /// or if the process exits first.
    pub async fn wait_for_log(&mut self, within: Duration, ready: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if ready(&self.log()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) first:\n{}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{}: not ready within {within:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits (at most 60 s) until `GET http://<addr>/healthz` answers 200.
    pub async fn wait_healthy(&mut self, addr: SocketAddr) {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/healthz");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status() == reqwest::StatusCode::OK
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before it was healthy:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not healthy at {url} within 60 s:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Pauses the process (SIGSTOP), as a frozen VM or a stopped container does: its sockets
    /// stay open and nothing it would send is sent, until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a [paused](Self::pause) process run on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Sends SIGTERM and waits (at most 60 s) for the process to exit.
    pub async fn stop(mut self) -> Exit {
        let asked = Instant::now();
        self.signal(libc::SIGTERM);
        self.wait_exit(asked).await
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub async fn kill(mut self) -> Exit {
        let asked = Instant::now();
        self.signal(libc::SIGKILL);
        self.wait_exit(asked).await
    }

    /// Waits (at most 60 s) for the process to exit by itself.
    pub async fn wait(mut self) -> Exit {
        let asked = Instant::now();
        self.wait_exit(asked).await
    }

    async fn wait_exit(&mut self, asked: Instant) -> Exit {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within 60 s:\n{}", self.name, self.log()))
            .expect("wait");
        // Let the readers take the last output.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Exit {
            code: status.code(),
            log: self.log(),
            took: asked.elapsed(),
        }
    }
}

/// Starts `ampd controller` on database `url` with its config in `ws` (`[controller] admin_addr`
/// a free address, then the TOML in `extra`, which may go on with `[controller]` keys and hold
/// other sections), migrating on start, and waits for `/healthz`; the service and its address.
pub async fn controller(ws: &Workspace, url: &str, extra: &str) -> (Service, SocketAddr) {
    let addr = free_addr();
    let text = format!("[controller]\nadmin_addr = \"{addr}\"\n{extra}\n");
    let config = ws.config("controller.toml", url, &text);
    let mut service = Service::start(
        "controller",
        &config,
        &["controller"],
        &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
    );
    service.wait_healthy(addr).await;
    (service, addr)
}

/// A directory for a test's service config, data and sources, removed on drop.
pub struct Workspace {
    dir: crate::cli::TempDir,
}

impl Default for Workspace {
    fn default() -> Self {
        Workspace::new()
    }
}

impl Workspace {
    /// A new, empty one, with `data/` and `sources/` in it.
    pub fn new() -> Workspace {
        let dir = crate::cli::TempDir::new();
        for sub in ["data", "sources"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("create dir");
        }
        Workspace { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `<dir>/data`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `<dir>/sources`.
    pub fn sources_dir(&self) -> PathBuf {
        self.dir.path().join("sources")
    }

    /// Writes a config file `name` for database `url` with `[storage] data_dir` and
    /// `[worker] sources_dir` in this workspace, plus the TOML in `extra` (whole sections, which
    /// must not repeat `[storage]` or set `sources_dir`), and returns its path.
    pub fn config(&self, name: &str, url: &str, extra: &str) -> PathBuf {
        let text = format!(
            "[metadata_db]\nurl = {url:?}\n\n[storage]\ndata_dir = {:?}\n\n{extra}\n",
            self.data_dir().display().to_string()
        );
        let text = if extra.contains("[worker]") {
            text.replacen(
                "[worker]\n",
                &format!(
                    "[worker]\nsources_dir = {:?}\n",
                    self.sources_dir().display().to_string()
                ),
                1,
            )
        } else {
            format!(
                "{text}\n[worker]\nsources_dir = {:?}\n",
                self.sources_dir().display().to_string()
            )
        };
        self.dir.file(name, &text)
    }
}
