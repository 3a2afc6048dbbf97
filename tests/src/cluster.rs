//! Where the tests get a PostgreSQL server from.
//!
//! `AMP_TEST_DATABASE_URL`, when set, is an admin URL of a running server (the harness creates and
//! drops databases through it). Otherwise the harness starts a private, throw-away cluster once per
//! test process with `ampd::postgres`, the code `ampd solo` runs its managed database with: `initdb`
//! into a temporary directory and `postgres` listening only on a Unix socket in that directory, as
//! the unprivileged `postgres` user when the process runs as root (both programs refuse to run as
//! root), under a watchdog that stops the server and removes the directory when the test process
//! exits for any reason.
//!
//! A private cluster is made for tests: no fsync, 300 connections; it trusts every connection except
//! those of members of [`PASSWORD_ROLES`], whose passwords it checks (`scram-sha-256`), and preloads
//! `pg_stat_statements` when PostgreSQL has it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use ampd::postgres::{self, InitOptions, Server, StartOptions, TlsFiles};

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

/// The superuser of a private cluster.
const SUPERUSER: &str = "postgres";

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

/// A private PostgreSQL cluster on a Unix socket in a temporary directory, removed once it has
/// stopped (when this is dropped, or the process exits).
pub struct PrivateCluster {
    server: Server,
    bindir: PathBuf,
    tcp_tls: bool,
}

impl PrivateCluster {
    /// Runs `initdb` and starts `postgres`; returns once the server accepts connections.
    pub fn start() -> Result<Self, String> {
        Self::start_with(&ClusterOptions::default())
    }

    /// [`start`](Self::start) with extra settings and, optionally, a TCP listener with TLS.
    pub fn start_with(options: &ClusterOptions) -> Result<Self, String> {
        let bindir = find_bindir()?;
        let user = postgres::server_user().map_err(|e| e.to_string())?;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "ampd-test-pg-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // The socket's directory: the server's user must be able to create the socket there.
        if let Some(user) = &user {
            postgres::chown(user, &[&dir]).map_err(|e| e.to_string())?;
        }
        let data = dir.join("data");
        let group = PASSWORD_ROLES;
        postgres::initdb(
            &bindir,
            &data,
            user.as_deref(),
            &InitOptions {
                superuser: SUPERUSER.to_owned(),
                no_sync: true,
            },
        )
        .map_err(|e| e.to_string())?;
        postgres::write_hba(
            &data,
            &[
                format!("local   all  +{group}                scram-sha-256"),
                format!("host    all  +{group}  127.0.0.1/32  scram-sha-256"),
                format!("host    all  +{group}  ::1/128       scram-sha-256"),
            ],
        )
        .map_err(|e| e.to_string())?;

        let mut settings: Vec<(String, String)> = [
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
            ("max_connections", "300"),
            ("shared_buffers", "128MB"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .into();
        let preload_set = options
            .settings
            .iter()
            .any(|(name, _)| name == "shared_preload_libraries");
        if !preload_set && has_pg_stat_statements(&bindir) {
            settings.push((
                "shared_preload_libraries".into(),
                "pg_stat_statements".into(),
            ));
        }
        settings.extend(options.settings.iter().cloned());
        let (port, listen_address) = if options.tcp_tls {
            let tls = self_signed_certificate(&dir)?;
            settings.extend(tls.settings(user.as_deref()).map_err(|e| e.to_string())?);
            (crate::services::free_port(), Some("127.0.0.1".to_owned()))
        } else {
            (5432, None)
        };
        let server = Server::start(
            &bindir,
            &data,
            user.as_deref(),
            &StartOptions {
                socket_dir: dir.clone(),
                port,
                listen_address,
                settings,
                log_file: dir.join("server.log"),
                remove_after_stop: Some(dir),
                stop_timeout: Duration::from_secs(10),
                ready_timeout: Duration::from_secs(30),
            },
        )
        .map_err(|e| e.to_string())?;
        Ok(PrivateCluster {
            server,
            bindir,
            tcp_tls: options.tcp_tls,
        })
    }

    /// Admin URL of this cluster (the `postgres` role and database, over the Unix socket).
    pub fn admin_url(&self) -> String {
        self.server.url(SUPERUSER, "postgres")
    }

    /// Admin URL over TCP on `127.0.0.1`, TLS required, when started with
    /// [`ClusterOptions::tcp_tls`].
    pub fn tcp_admin_url(&self) -> Option<String> {
        self.tcp_tls.then(|| {
            format!(
                "postgresql://{SUPERUSER}@127.0.0.1:{}/postgres?sslmode=require",
                self.server.port()
            )
        })
    }

    /// The directory of the PostgreSQL programs this cluster runs (`psql`, `pg_dump`, ...).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }
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

/// A self-signed certificate for `localhost`/`127.0.0.1` and its key, in `dir` (the server makes
/// the key its own and private as it starts).
fn self_signed_certificate(dir: &Path) -> Result<TlsFiles, String> {
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
    Ok(TlsFiles { cert, key })
}

/// The directory holding PostgreSQL's programs: `AMP_TEST_PG_BINDIR` when set, else where `ampd
/// solo` finds them ([`ampd::postgres::find_bindir`]: `PATH`, `pg_config --bindir`, the newest
/// `/usr/lib/postgresql/<major>/bin`).
pub fn find_bindir() -> Result<PathBuf, String> {
    let explicit = std::env::var_os("AMP_TEST_PG_BINDIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    postgres::find_bindir(explicit.as_deref())
        .map_err(|e| format!("{e} (or set AMP_TEST_PG_BINDIR)"))
}

/// A PostgreSQL server of a test's own, on a Unix socket in a directory the test gives, which the
/// test can stop and start again (the server [`admin_url`] names is shared by every test of a
/// process and never restarted). Its superuser is `postgres`; it is stopped when dropped.
pub struct OwnCluster {
    bindir: PathBuf,
    user: Option<String>,
    data: PathBuf,
    options: StartOptions,
    server: Option<Server>,
}

impl OwnCluster {
    /// `initdb` in `<dir>/data` and a server on a socket in `<dir>/run` (its log in
    /// `<dir>/postgres.log`), with the extra server `settings`; returns once it accepts
    /// connections.
    pub async fn start(dir: &Path, settings: &[(&str, &str)]) -> OwnCluster {
        let bindir = find_bindir().expect("PostgreSQL's server programs");
        let user = postgres::server_user().expect("a user to run PostgreSQL as");
        let data = dir.join("data");
        let run = dir.join("run");
        std::fs::create_dir_all(&run).expect("mkdir");
        if let Some(user) = &user {
            postgres::chown(user, &[&run]).expect("chown");
        }
        let options = StartOptions {
            socket_dir: run,
            port: 5432,
            listen_address: None,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log_file: dir.join("postgres.log"),
            remove_after_stop: None,
            stop_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(120),
        };
        let mut pg = OwnCluster {
            bindir,
            user,
            data,
            options,
            server: None,
        };
        let (bindir, data, user) = (pg.bindir.clone(), pg.data.clone(), pg.user.clone());
        tokio::task::spawn_blocking(move || {
            let init = InitOptions {
                superuser: SUPERUSER.to_owned(),
                no_sync: true,
            };
            postgres::initdb(&bindir, &data, user.as_deref(), &init)
        })
        .await
        .expect("initdb ran")
        .expect("initdb");
        pg.start_again().await;
        pg
    }

    /// The URL of `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        self.server
            .as_ref()
            .expect("running")
            .url(SUPERUSER, database)
    }

    /// Fast shutdown: every session is terminated; returns once the server has stopped.
    pub async fn stop(&mut self) {
        let server = self.server.take().expect("running");
        tokio::task::spawn_blocking(move || server.stop())
            .await
            .expect("stop ran")
            .expect("PostgreSQL stops");
    }

    /// Starts the server again if it is stopped (a test that failed between [`stop`](Self::stop)
    /// and [`start_again`](Self::start_again) left it so).
    pub async fn ensure_running(&mut self) {
        if self.server.is_none() {
            self.start_again().await;
        }
    }

    /// Starts the server on the same data directory and socket; returns once it accepts
    /// connections.
    pub async fn start_again(&mut self) {
        let (bindir, data) = (self.bindir.clone(), self.data.clone());
        let (user, options) = (self.user.clone(), self.options.clone());
        let server = tokio::task::spawn_blocking(move || {
            Server::start(&bindir, &data, user.as_deref(), &options)
        })
        .await
        .expect("start ran")
        .expect("PostgreSQL starts");
        self.server = Some(server);
    }
}
