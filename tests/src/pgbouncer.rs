//! A private PgBouncer in front of the test server, for tests of ampd behind a pooler.
//!
//! [`PgBouncer::start`] writes a `pgbouncer.ini` into a temporary directory (listening on
//! `127.0.0.1` and `::1`, a free port, any client user logged in to the server as the admin URL's
//! user) and starts Debian's `pgbouncer` as the `postgres` user when run as root (it refuses root),
//! under a watchdog that stops it and removes the directory when the test process goes.
//!
//! `.ci/run` installs `pgbouncer`. When it is missing, a test in CI (`CI=true`) fails; elsewhere it
//! says on stderr, past the test harness's capture, that it did not run, and returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ampd::postgres::{Watch, Watchdog};

use crate::services::free_port;

/// How PgBouncer hands server connections to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// One server connection per client connection, for its whole life.
    Session,
    /// A server connection per transaction: between transactions, a client has none.
    Transaction,
}

/// Finds `tool` (on `PATH` or in `/usr/sbin`). When it is missing: in CI (`CI=true`) a panic
/// saying who installs it; elsewhere a line on stderr saying that `test` did not run, and `None`.
pub fn require(tool: &str, installed_by: &str, test: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    if let Some(found) = dirs.iter().map(|d| d.join(tool)).find(|p| p.is_file()) {
        return Some(found);
    }
    crate::not_run(
        test,
        &format!("{tool} is not installed ({installed_by} installs it)"),
    );
    None
}

/// A running PgBouncer; stopped (and its directory removed) when dropped.
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    version: (u32, u32),
    /// Stops PgBouncer and removes `dir` when dropped (or when the process exits).
    _watchdog: Watchdog,
}

/// The admin URL's server, as PgBouncer's `[databases]` connection string wants it.
fn upstream() -> String {
    let admin = url::Url::parse(crate::admin_url()).expect("admin URL is a URL");
    let socket_dir = admin
        .query_pairs()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.into_owned());
    let host = socket_dir.unwrap_or_else(|| admin.host_str().unwrap_or("localhost").to_owned());
    let user = match admin.username() {
        "" => "postgres".to_owned(),
        user => percent_decode(user),
    };
    let mut out = format!(
        "host={host} port={} user={user}",
        admin.port().unwrap_or(5432)
    );
    if let Some(password) = admin.password() {
        out.push_str(&format!(" password={}", percent_decode(password)));
    }
    out
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_owned())
}

fn version_of(bin: &Path) -> (u32, u32) {
    let out = Command::new(bin).arg("--version").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let number = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("0.0")
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0))
        .collect::<Vec<_>>();
    (
        number.first().copied().unwrap_or(0),
        number.get(1).copied().unwrap_or(0),
    )
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` with `pool_size` server connections per database, for `test`;
    /// `None` when it is not installed (outside CI).
    pub fn start(mode: PoolMode, pool_size: u32, test: &str) -> Option<PgBouncer> {
        PgBouncer::start_with(mode, pool_size, "", test)
    }

    /// [`PgBouncer::start`] with more `[pgbouncer]` settings (`extra`: `key = value` lines), e.g.
    /// `server_round_robin = 1`, which hands a client the server connection used longest ago
    /// instead of the one just released.
    pub fn start_with(
        mode: PoolMode,
        pool_size: u32,
        extra: &str,
        test: &str,
    ) -> Option<PgBouncer> {
        let bin = require("pgbouncer", ".ci/run (apt-get install pgbouncer)", test)?;
        let version = version_of(&bin);
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ampd-test-pgbouncer-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create pgbouncer dir");
        let port = free_port();
        let mode_name = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        // PgBouncer 1.21 and newer can keep prepared statements in transaction mode.
        let prepared = if version >= (1, 21) {
            "max_prepared_statements = 200\n"
        } else {
            ""
        };
        let ini = format!(
            "[databases]\n* = {upstream}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1,::1\n\
             listen_port = {port}\nunix_socket_dir =\nauth_type = any\npool_mode = {mode_name}\n\
             default_pool_size = {pool_size}\nmax_client_conn = 500\n{prepared}\
             logfile = {log}\npidfile = {pid}\n{extra}\n",
            upstream = upstream(),
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        );
        let ini_path = dir.join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).expect("write pgbouncer.ini");
        let user = ampd::postgres::is_root().then(|| "postgres".to_owned());
        if let Some(user) = &user {
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown {user} {}", dir.display());
        }
        let watchdog = Watchdog::start(&Watch {
            program: bin,
            args: vec![ini_path.into()],
            user,
            log_file: dir.join("stderr.log"),
            stop_signal: "TERM",
            stop_timeout: Duration::from_secs(10),
            remove_after_stop: Some(dir.clone()),
        })
        .expect("start pgbouncer");
        let bouncer = PgBouncer {
            dir,
            port,
            version,
            _watchdog: watchdog,
        };
        bouncer.wait_ready();
        Some(bouncer)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default();
        let stderr = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        panic!("pgbouncer did not start within 20 s: {log} {stderr}");
    }

    /// The URL of database `name` through this PgBouncer (on `127.0.0.1`).
    pub fn url(&self, name: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The URL of database `name` through this PgBouncer on the IPv6 loopback, as a literal.
    pub fn url_v6(&self, name: &str) -> String {
        format!("postgresql://postgres@[::1]:{}/{name}", self.port)
    }

    /// PgBouncer's (major, minor) version.
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    /// Whether this PgBouncer keeps prepared statements in transaction mode (1.21 and newer, with
    /// `max_prepared_statements`, which [`PgBouncer::start`] sets).
    pub fn keeps_prepared_statements(&self) -> bool {
        self.version >= (1, 21)
    }

    /// PgBouncer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}
