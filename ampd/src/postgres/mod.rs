//! A PostgreSQL cluster that ampd runs itself from the system's server programs: `ampd solo`'s
//! managed metadata database, and the test suite's private clusters (one implementation for both).
//!
//! - [`find_bindir`] finds `initdb` and `postgres` (see [`find`] for the order).
//! - [`server_user`]: PostgreSQL refuses to run as root, so as root the programs run as the
//!   unprivileged `postgres` user (through `setpriv`), which then owns the data directory;
//!   [`check_reachable`] makes sure that user can reach it.
//! - [`initdb`] creates a cluster (all at once: a cluster whose creation was cut off is never left
//!   behind as one); [`write_hba`] puts rules ahead of its `trust` for local connections.
//! - [`prepare_data_dir`] deals with what a crash leaves behind ([`process`]);
//!   [`stop_server`] stops a server an owner that died left running.
//! - [`Server::start`] starts `postgres` on a Unix socket (and, if asked, a TCP address, with TLS)
//!   under a [`Watchdog`] that gives it a fast shutdown when its owner stops it or dies, and returns
//!   once it accepts connections; [`Server::stop`] stops it and waits (bounded).

pub mod find;
pub mod process;
pub mod watchdog;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use find::{Search, find_bindir, find_bindir_in};
pub use process::{prepare_data_dir, stop_server};
pub use watchdog::{Watch, Watchdog};

/// What went wrong with a managed cluster. Each message is one line and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// No directory with both `initdb` and `postgres` was found.
    #[error(
        "PostgreSQL's server programs (initdb, postgres) were not found; looked on {looked}; \
         install PostgreSQL 15 or newer (Debian/Ubuntu: apt-get install postgresql; macOS: brew \
         install postgresql) or set metadata_db.url to a database of your own"
    )]
    NotFound {
        /// Where it looked.
        looked: String,
    },
    /// Running as root, and there is no unprivileged user to run PostgreSQL as.
    #[error(
        "PostgreSQL refuses to run as root, and there is no `postgres` user to run it as: create \
         one (useradd --system postgres) or run ampd as an ordinary user"
    )]
    NoServerUser,
    /// The unprivileged user PostgreSQL runs as cannot reach the directory it must use.
    #[error(
        "PostgreSQL runs as the user `{user}` (it refuses root), which cannot reach {}: let it \
         (chmod o+x on the directories above it) or use a directory it can reach",
        .dir.display()
    )]
    Unreachable {
        /// The user.
        user: String,
        /// The directory.
        dir: PathBuf,
    },
    /// A program failed or could not be run.
    #[error("{what} failed: {detail}")]
    Command {
        /// What was run.
        what: String,
        /// Its message (the last lines of its output) or why it could not run.
        detail: String,
    },
    /// A file or directory could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A directory that should hold a cluster holds something else.
    #[error(
        "{} is neither empty nor a PostgreSQL cluster (no PG_VERSION): move it away, or use \
         another directory",
        .0.display()
    )]
    NotACluster(PathBuf),
    /// A path where a cluster is made or kept is a symbolic link, which is never followed (it
    /// could lead the cluster, its removal or its owner change anywhere).
    #[error(
        "{} is a symbolic link: ampd never follows one where it makes or keeps a cluster; remove \
         it",
        .0.display()
    )]
    Symlink(PathBuf),
    /// A server is already running on the data directory.
    #[error(
        "a PostgreSQL server (pid {pid}) is running on {} and would not stop: stop it, or use \
         another directory",
        .data.display()
    )]
    AlreadyRunning {
        /// Its process id.
        pid: u32,
        /// The data directory.
        data: PathBuf,
    },
    /// `postmaster.pid` names a live process that may or may not be this directory's server.
    #[error(
        "{} names process {pid}, which is running but cannot be checked; if no PostgreSQL runs on \
         this directory, remove that file and start again",
        .pid_file.display()
    )]
    Unverifiable {
        /// The process id.
        pid: u32,
        /// The pid file.
        pid_file: PathBuf,
    },
    /// Processes of an earlier server still run on the data directory.
    #[error(
        "processes of an earlier PostgreSQL server still run on {} (pids {pids:?}): stop them, \
         then start again",
        .data.display()
    )]
    Leftovers {
        /// Their process ids.
        pids: Vec<u32>,
        /// The data directory.
        data: PathBuf,
    },
    /// The Unix socket's path would be longer than the system allows.
    #[error(
        "the socket path {} is {len} bytes, longer than the {max} a Unix socket may have: use a \
         shorter directory",
        .path.display()
    )]
    SocketPathTooLong {
        /// The socket's path.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The server exited, or did not accept connections in time.
    #[error("PostgreSQL {how}; its log ({}) says: {log}", .log_file.display())]
    NotReady {
        /// What happened: it exited, or did not become ready within some time.
        how: String,
        /// The server's log file.
        log_file: PathBuf,
        /// The log's last lines.
        log: String,
    },
}

type Result<T, E = PostgresError> = std::result::Result<T, E>;

/// The longest path of a Unix socket (`sun_path` holds 108 bytes with its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Checks that the socket a server on `port` makes in `dir` has a path short enough.
pub fn check_socket_path(dir: &Path, port: u16) -> Result<()> {
    let path = dir.join(format!(".s.PGSQL.{port}"));
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(PostgresError::SocketPathTooLong {
            path,
            len,
            max: MAX_SOCKET_PATH,
        });
    }
    Ok(())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PostgresError {
    let what = what.into();
    move |source| PostgresError::Io { what, source }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The user PostgreSQL must run as: `None` (this process's user) unless this process is root, then
/// `postgres`, which must exist.
pub fn server_user() -> Result<Option<String>> {
    if !is_root() {
        return Ok(None);
    }
    let exists = Command::new("id")
        .args(["-u", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if exists {
        Ok(Some("postgres".to_owned()))
    } else {
        Err(PostgresError::NoServerUser)
    }
}

/// Gives `paths` to `user` (and its group), as root.
pub fn chown(user: &str, paths: &[&Path]) -> Result<()> {
    let out = Command::new("chown")
        .arg(format!("{user}:"))
        .args(paths)
        .output()
        .map_err(io("run chown"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PostgresError::Command {
            what: format!("chown {user}"),
            detail: last_lines(&String::from_utf8_lossy(&out.stderr), 3),
        })
    }
}

/// `program` run as `user` (through `setpriv`, which execs it: no process in between), or as this
/// process's user.
pub fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(user) => {
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

/// Checks that `user` (when PostgreSQL runs as another user than this process) can enter `dir`.
pub fn check_reachable(user: Option<&str>, dir: &Path) -> Result<()> {
    let Some(user) = user else { return Ok(()) };
    let reachable = as_user(Some(user), Path::new("test"))
        .arg("-x")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(io("run setpriv"))?
        .success();
    if reachable {
        Ok(())
    } else {
        Err(PostgresError::Unreachable {
            user: user.to_owned(),
            dir: dir.to_owned(),
        })
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// How [`initdb`] creates a cluster.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The bootstrap superuser's name.
    pub superuser: String,
    /// Skip fsync (throw-away clusters only).
    pub no_sync: bool,
}

/// Whether `data` holds a cluster (`initdb` has run there).
pub fn is_initialized(data: &Path) -> bool {
    data.join("PG_VERSION").is_file()
}

/// [`PostgresError::Symlink`] when `path` is a symbolic link.
pub fn refuse_symlink(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(PostgresError::Symlink(path.to_owned())),
        _ => Ok(()),
    }
}

/// Creates a cluster in `data`, which must be absent or empty, owned by `user` when given: UTF-8,
/// the C locale, `trust` for local connections (only the server's user, and root, may use the
/// socket of a server started by [`Server::start`], so `trust` admits no one else; see
/// [`write_hba`] for more rules). The cluster is made beside `data` and renamed into place once
/// complete, so a creation cut off half-way never leaves a cluster behind (its remains are removed
/// by the next call).
pub fn initdb(bindir: &Path, data: &Path, user: Option<&str>, options: &InitOptions) -> Result<()> {
    refuse_symlink(data)?;
    if let Ok(mut entries) = std::fs::read_dir(data) {
        if entries.next().is_some() {
            return Err(PostgresError::NotACluster(data.to_owned()));
        }
        std::fs::remove_dir(data).map_err(io(format!("remove {}", data.display())))?;
    }
    let mut partial = data.as_os_str().to_owned();
    partial.push(".initdb");
    let partial = PathBuf::from(partial);
    refuse_symlink(&partial)?;
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(format!(
            "remove the incomplete cluster {}",
            partial.display()
        )))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(format!("create {}", partial.display())))?;
    if let Some(user) = user {
        chown(user, &[&partial])?;
    }
    let mut cmd = as_user(user, &bindir.join("initdb"));
    cmd.args([
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--username",
    ])
    .arg(&options.superuser);
    if options.no_sync {
        cmd.arg("--no-sync");
    }
    let out = cmd
        .arg("--pgdata")
        .arg(&partial)
        .stdin(Stdio::null())
        .output()
        .map_err(io("run initdb"))?;
    if !out.status.success() {
        return Err(PostgresError::Command {
            what: format!("initdb --pgdata {}", partial.display()),
            detail: last_lines(&String::from_utf8_lossy(&out.stderr), 3),
        });
    }
    write_hba(&partial, &[])?;
    std::fs::rename(&partial, data).map_err(io(format!(
        "rename {} to {}",
        partial.display(),
        data.display()
    )))
}

/// Replaces the `pg_hba.conf` of the cluster in `data` (before the server starts): `first`, then
/// `trust` for every local connection and every TCP one from the loopback addresses.
pub fn write_hba(data: &Path, first: &[String]) -> Result<()> {
    let hba = data.join("pg_hba.conf");
    let mut rules = String::from("# TYPE  DATABASE  USER  ADDRESS  METHOD\n");
    for rule in first {
        rules.push_str(rule);
        rules.push('\n');
    }
    rules.push_str(
        "local   all  all                 trust\n\
         host    all  all  127.0.0.1/32   trust\n\
         host    all  all  ::1/128        trust\n",
    );
    // initdb made the file: writing it keeps its owner.
    std::fs::write(&hba, rules).map_err(io(format!("write {}", hba.display())))
}

/// A certificate and its key for a server's TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Makes the files usable by the server, run as `user`: the key readable by its owner only, as
    /// PostgreSQL requires, and both owned by `user`. Returns the settings that turn TLS on with
    /// them, for [`StartOptions::settings`].
    pub fn settings(&self, user: Option<&str>) -> Result<Vec<(String, String)>> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&self.key, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("chmod {}", self.key.display())))?;
        if let Some(user) = user {
            chown(user, &[&self.cert, &self.key])?;
        }
        Ok(vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), self.cert.display().to_string()),
            ("ssl_key_file".into(), self.key.display().to_string()),
        ])
    }
}

/// How [`Server::start`] runs `postgres`.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The directory of the server's Unix socket (only the server's user may use the socket).
    pub socket_dir: PathBuf,
    /// The port, which names the socket (`.s.PGSQL.<port>`) and the TCP listener if any.
    pub port: u16,
    /// Also listen on TCP at this address (`None`: Unix socket only).
    pub listen_address: Option<String>,
    /// Extra settings, each passed as `-c name=value`.
    pub settings: Vec<(String, String)>,
    /// Where the server writes its log.
    pub log_file: PathBuf,
    /// A directory the watchdog removes once the server has stopped (throw-away clusters).
    pub remove_after_stop: Option<PathBuf>,
    /// How long a fast shutdown may take before the server is forced to stop.
    pub stop_timeout: Duration,
    /// How long the server may take to accept connections (crash recovery included).
    pub ready_timeout: Duration,
}

/// A running `postgres` under its watchdog.
#[derive(Debug)]
pub struct Server {
    watchdog: Watchdog,
    data: PathBuf,
    socket_dir: PathBuf,
    port: u16,
}

impl Server {
    /// Starts `postgres` of `bindir` on `data` (as `user`), and returns once it accepts connections
    /// (as `pg_ctl start -w` tells: `postmaster.pid` names the process started and says `ready`).
    pub fn start(
        bindir: &Path,
        data: &Path,
        user: Option<&str>,
        options: &StartOptions,
    ) -> Result<Server> {
        check_socket_path(&options.socket_dir, options.port)?;
        let mut settings: Vec<(String, String)> = vec![
            ("unix_socket_permissions".into(), "0700".into()),
            (
                "listen_addresses".into(),
                options.listen_address.clone().unwrap_or_default(),
            ),
        ];
        settings.extend(options.settings.iter().cloned());
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            data.into(),
            "-k".into(),
            options.socket_dir.clone().into(),
            "-p".into(),
            options.port.to_string().into(),
        ];
        for (name, value) in settings {
            args.push("-c".into());
            args.push(format!("{name}={value}").into());
        }
        let watchdog = Watchdog::start(&Watch {
            program: bindir.join("postgres"),
            args,
            user: user.map(str::to_owned),
            log_file: options.log_file.clone(),
            stop_signal: "INT",
            stop_timeout: options.stop_timeout,
            remove_after_stop: options.remove_after_stop.clone(),
        })
        .map_err(io("start postgres"))?;
        let server = Server {
            watchdog,
            data: data.to_owned(),
            socket_dir: options.socket_dir.clone(),
            port: options.port,
        };
        // Dropping the server on failure stops it.
        server.wait_ready(&options.log_file, options.ready_timeout)?;
        Ok(server)
    }

    fn wait_ready(&self, log_file: &Path, within: Duration) -> Result<()> {
        let started = Instant::now();
        let pid_file = self.data.join("postmaster.pid");
        let pid = self.watchdog.pid().to_string();
        loop {
            // Line 1: the postmaster's pid; line 8: its status.
            let status = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let lines: Vec<&str> = status.lines().collect();
            if lines.first().is_some_and(|l| l.trim() == pid)
                && lines.get(7).is_some_and(|l| l.trim() == "ready")
            {
                return Ok(());
            }
            let how = if !self.watchdog.is_running() {
                "exited at start".to_owned()
            } else if started.elapsed() > within {
                format!("did not accept connections within {} s", within.as_secs())
            } else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let log = std::fs::read_to_string(log_file).unwrap_or_default();
            return Err(PostgresError::NotReady {
                how,
                log_file: log_file.to_owned(),
                log: last_lines(&log, 3),
            });
        }
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        self.watchdog.pid()
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `postgresql://` URL for `database` as `user` over the Unix socket (the port left out when
    /// it is the default, 5432).
    pub fn url(&self, user: &str, database: &str) -> String {
        use percent_encoding::{AsciiSet, CONTROLS, NON_ALPHANUMERIC, utf8_percent_encode};
        // What a query value must not hold as such; `/` stays readable.
        const QUERY_VALUE: &AsciiSet = &CONTROLS
            .add(b' ')
            .add(b'"')
            .add(b'#')
            .add(b'%')
            .add(b'&')
            .add(b'+')
            .add(b'<')
            .add(b'=')
            .add(b'>');
        let port = if self.port == 5432 {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        format!(
            "postgresql://{}@localhost{port}/{}?host={}",
            utf8_percent_encode(user, NON_ALPHANUMERIC),
            utf8_percent_encode(database, NON_ALPHANUMERIC),
            utf8_percent_encode(&self.socket_dir.display().to_string(), QUERY_VALUE),
        )
    }

    /// Asks the server for a fast shutdown and waits until it has stopped (forced after the stop
    /// timeout). Blocking: call it from a blocking context.
    pub fn stop(self) -> Result<()> {
        let started = Instant::now();
        let pid = self.watchdog.pid();
        self.watchdog
            .stop()
            .map_err(io(format!("stop PostgreSQL (pid {pid})")))?;
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "PostgreSQL stopped"
        );
        Ok(())
    }
}
