//! Where the tests get a PostgreSQL server from.
//!
//! `AMP_TEST_DATABASE_URL`, when set, is an admin URL of a running server (the harness creates and
//! drops databases through it). Otherwise the harness starts a private, throw-away cluster once per
//! test process: `initdb` into a temporary directory and `postgres` listening only on a Unix socket
//! in that directory, as the unprivileged `postgres` user (through `setpriv`) when the process runs as root (both
//! programs refuse to run as root). A watchdog shell holds the read end of a pipe whose write end the
//! test process keeps open; when the test process exits for any reason the pipe closes and the
//! watchdog stops the server and removes the directory.
//!
//! A private cluster trusts every connection except those of members of
//! [`PASSWORD_ROLES`], whose passwords it checks (`scram-sha-256`), and preloads
//! `pg_stat_statements` when PostgreSQL has it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The admin URL of the server the tests use (created on first use).
pub fn admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("AMP_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => {
            let cluster = PrivateCluster::start().unwrap_or_else(|e| {
                panic!(
                    "cannot start a private PostgreSQL cluster for the tests ({e}); install \
                     PostgreSQL (initdb, postgres) or set AMP_TEST_DATABASE_URL to an admin URL"
                )
            });
            let url = cluster.admin_url();
            // Kept for the life of the process; its watchdog cleans up after the process exits.
            std::mem::forget(cluster);
            url
        }
    })
}

/// The group role whose members must log in with their password on a private cluster (its
/// `pg_hba.conf` asks them for `scram-sha-256` before it trusts everyone else).
pub const PASSWORD_ROLES: &str = "ampd_password_roles";

/// What a private cluster is started with beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra server settings, each passed as `-c name=value` (for example
    /// `("shared_preload_libraries", "pg_stat_statements")`).
    pub settings: Vec<(String, String)>,
    /// Also listen on `127.0.0.1` (a free port) with TLS on, with a throw-away self-signed
    /// certificate made by `openssl` (see [`PrivateCluster::tcp_admin_url`]).
    pub tcp_tls: bool,
}

/// A private PostgreSQL cluster on a Unix socket in a temporary directory.
pub struct PrivateCluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    tcp_tls: bool,
    /// The write end of the watchdog's pipe: closing it (dropping this, or the process exiting)
    /// stops the server.
    watchdog: Option<std::process::ChildStdin>,
    child: std::process::Child,
}

impl PrivateCluster {
    /// Runs `initdb` and starts `postgres`; returns once the server accepts connections.
    pub fn start() -> Result<Self, String> {
        Self::start_with(&ClusterOptions::default())
    }

    /// [`start`](Self::start) with extra settings and, optionally, a TCP listener with TLS.
    pub fn start_with(options: &ClusterOptions) -> Result<Self, String> {
        let bindir = find_bindir()?;
        let dir = std::env::temp_dir().join(format!(
            "ampd-test-pg-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ u128::from(rand_u32())
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let run_as = if is_root() { Some("postgres") } else { None };
        if let Some(user) = run_as {
            chown(user, &[&dir])?;
        }
        let data = dir.join("data");
        let out = as_user(run_as, &bindir.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }

        write_hba(&data, run_as)?;

        let mut extra = String::new();
        let mut port = 5432;
        if options.tcp_tls {
            port = free_port()?;
            let (cert, key) = self_signed_certificate(&dir, run_as)?;
            extra.push_str(&format!(
                " -p {port} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} \
                 -c ssl_key_file={}",
                sh_quote(&cert),
                sh_quote(&key)
            ));
        } else {
            extra.push_str(" -c listen_addresses=");
        }
        let preload_set = options
            .settings
            .iter()
            .any(|(name, _)| name == "shared_preload_libraries");
        if !preload_set && has_pg_stat_statements(&bindir) {
            extra.push_str(" -c shared_preload_libraries=pg_stat_statements");
        }
        for (name, value) in &options.settings {
            extra.push_str(&format!(" -c {}", sh_quote_str(&format!("{name}={value}"))));
        }

        // The watchdog: starts postgres, waits for stdin to close, then stops it and cleans up.
        let postgres = bindir.join("postgres");
        let script = format!(
            "{runas}{postgres} -D {data} -k {dir}{extra} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 \
             -c shared_buffers=128MB >{dir}/server.log 2>&1 & pid=$!; \
             cat >/dev/null; kill -INT $pid 2>/dev/null; \
             while kill -0 $pid 2>/dev/null; do sleep 0.1; done; rm -rf {dir}",
            runas = run_as
                .map(|u| format!("setpriv --reuid={u} --regid={u} --init-groups "))
                .unwrap_or_default(),
            postgres = sh_quote(&postgres),
            data = sh_quote(&data),
            dir = sh_quote(&dir),
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start postgres: {e}"))?;
        let watchdog = child.stdin.take().ok_or("no watchdog pipe")?;
        let cluster = PrivateCluster {
            dir,
            bindir: bindir.clone(),
            port,
            tcp_tls: options.tcp_tls,
            watchdog: Some(watchdog),
            child,
        };
        cluster.wait_ready(&bindir)?;
        Ok(cluster)
    }

    /// Admin URL of this cluster (the `postgres` role and database, over the Unix socket).
    pub fn admin_url(&self) -> String {
        let port = if self.port == 5432 {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        format!(
            "postgresql://postgres@localhost{port}/postgres?host={}",
            self.dir.display()
        )
    }

    /// Admin URL over TCP on `127.0.0.1`, TLS required, when started with
    /// [`ClusterOptions::tcp_tls`].
    pub fn tcp_admin_url(&self) -> Option<String> {
        self.tcp_tls.then(|| {
            format!(
                "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=require",
                self.port
            )
        })
    }

    /// The directory of the PostgreSQL programs this cluster runs (`psql`, `pg_dump`, ...).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    fn wait_ready(&self, bindir: &Path) -> Result<(), String> {
        let socket = self.dir.join(format!(".s.PGSQL.{}", self.port));
        let deadline = Instant::now() + Duration::from_secs(30);
        let pg_isready = bindir.join("pg_isready");
        while Instant::now() < deadline {
            if socket.exists() {
                let ready = Command::new(&pg_isready)
                    .arg("-h")
                    .arg(&self.dir)
                    .arg("-p")
                    .arg(self.port.to_string())
                    .arg("-q")
                    .status()
                    .map(|s| s.success())
                    // Without pg_isready, the socket existing is good enough.
                    .unwrap_or(true);
                if ready {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        Err(format!(
            "postgres did not start within 30 s: {}",
            log.trim()
        ))
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Closing the pipe makes the watchdog stop the server and remove the directory.
        drop(self.watchdog.take());
        let _ = self.child.wait();
    }
}

/// Replaces the `pg_hba.conf` of a new cluster at `data`: members of [`PASSWORD_ROLES`] log in with
/// `scram-sha-256` (over the socket and TCP); every other role is trusted.
fn write_hba(data: &Path, owner: Option<&str>) -> Result<(), String> {
    let group = PASSWORD_ROLES;
    let hba = data.join("pg_hba.conf");
    let rules = format!(
        "# TYPE  DATABASE USER    ADDRESS       METHOD\n\
         local   all      +{group}                scram-sha-256\n\
         host    all      +{group} 127.0.0.1/32  scram-sha-256\n\
         host    all      +{group} ::1/128       scram-sha-256\n\
         local   all      all                   trust\n\
         host    all      all     127.0.0.1/32  trust\n\
         host    all      all     ::1/128       trust\n"
    );
    std::fs::write(&hba, rules).map_err(|e| format!("write {}: {e}", hba.display()))?;
    if let Some(user) = owner {
        chown(user, &[&hba])?;
    }
    Ok(())
}

/// Gives `paths` to `user` (and its group).
fn chown(user: &str, paths: &[&Path]) -> Result<(), String> {
    let status = Command::new("chown")
        .arg(format!("{user}:"))
        .args(paths)
        .status()
        .map_err(|e| format!("chown: {e}"))?;
    if !status.success() {
        return Err(format!("chown {user} {paths:?} failed"));
    }
    Ok(())
}

/// Whether the PostgreSQL of `bindir` has the `pg_stat_statements` module (Debian's server package
/// ships it; elsewhere it may come with a `contrib` package).
pub fn has_pg_stat_statements(bindir: &Path) -> bool {
    let pkglibdir = Command::new(bindir.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .unwrap_or_else(|| bindir.join("../lib"));
    pkglibdir.join("pg_stat_statements.so").exists()
}

/// Whether the harness started the server the tests use (no `AMP_TEST_DATABASE_URL`), and so
/// knows how it is configured.
pub fn is_private() -> bool {
    std::env::var("AMP_TEST_DATABASE_URL").map_or(true, |url| url.trim().is_empty())
}

/// A port on `127.0.0.1` nothing listens on right now.
pub(crate) fn free_port() -> Result<u16, String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("find a free port: {e}"))
}

/// A self-signed certificate for `localhost`/`127.0.0.1` and its key, in `dir`, readable by the
/// server's user only (PostgreSQL refuses a key others may read).
fn self_signed_certificate(dir: &Path, owner: Option<&str>) -> Result<(PathBuf, PathBuf), String> {
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-addext"])
        .arg("subjectAltName=DNS:localhost,IP:127.0.0.1")
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run openssl (needed for a TLS listener): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", key.display()))?;
    if let Some(user) = owner {
        chown(user, &[&cert, &key])?;
    }
    Ok((cert, key))
}

/// The directory holding PostgreSQL's programs: `AMP_TEST_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/<major>/bin`, else `pg_config --bindir`, else the first `PATH` entry with
/// `initdb` and `postgres`.
pub fn find_bindir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("AMP_TEST_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    // Debian/Ubuntu: /usr/lib/postgresql/<major>/bin, newest first.
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((major, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return Ok(bin);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if bin.join("initdb").exists() {
            return Ok(bin);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    Err("initdb and postgres not found (set AMP_TEST_PG_BINDIR)".into())
}

fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(user) => {
            // setpriv execs the program (no intermediate process), as `user`.
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={user}"))
                .arg(format!("--regid={user}"))
                .arg("--init-groups")
                .arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub(crate) fn sh_quote(path: &Path) -> String {
    sh_quote_str(&path.display().to_string())
}

pub(crate) fn sh_quote_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id()) as u32
}
