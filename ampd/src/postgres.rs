//! A PostgreSQL cluster that ampd runs itself from the system's server programs: `ampd solo`'s
//! managed metadata database, and the test suite's private clusters (one implementation for both).
//!
//! - [`find_bindir`] finds `initdb` and `postgres`: on `PATH`, in `pg_config --bindir`, or in
//!   `/usr/lib/postgresql/<version>/bin`, newest first.
//! - [`server_user`]: PostgreSQL refuses to run as root, so as root the programs run as the
//!   unprivileged `postgres` user (through `setpriv`), which then owns the data directory.
//! - [`initdb`] creates a cluster; [`Server::start`] starts `postgres` on a Unix socket (and, if
//!   asked, a TCP address) under a watchdog: a shell in a process group of its own (so a Ctrl-C at the
//!   terminal reaches ampd, not the server) that holds the read end of a pipe whose write end ampd
//!   keeps. When ampd closes it ([`Server::stop`]) or dies (even by `kill -9`), the watchdog asks the
//!   server for a fast shutdown, forces it after a bounded wait, and waits for it to exit.
//! - [`prepare_data_dir`] deals with a `postmaster.pid` left behind: a stale one (its process gone,
//!   or the pid recycled by an unrelated process, which is never signalled) is removed; one whose
//!   server still runs on this directory is reported, so two servers never share a directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// What went wrong with a managed cluster. Each message is one line and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// No directory with both `initdb` and `postgres` was found.
    #[error(
        "PostgreSQL's server programs (initdb, postgres) were not found; looked in {looked}; \
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
    /// A server is already running on the data directory.
    #[error(
        "a PostgreSQL server (pid {pid}) is already running on {}: another ampd uses this \
         directory; stop it first, or use another directory",
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
    /// The server did not accept connections in time.
    #[error("PostgreSQL did not become ready within {} s; its log ({}) says: {log}", .waited.as_secs(), .log_file.display())]
    NotReady {
        /// How long it waited.
        waited: Duration,
        /// The server's log file.
        log_file: PathBuf,
        /// The log's last lines.
        log: String,
    },
}

type Result<T, E = PostgresError> = std::result::Result<T, E>;

/// The longest path of a Unix socket (`sun_path` holds 108 bytes with its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PostgresError {
    let what = what.into();
    move |source| PostgresError::Io { what, source }
}

fn has_server_programs(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// The directory with PostgreSQL's `initdb` and `postgres`: `explicit` when given, else the first
/// `PATH` entry with both, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
pub fn find_bindir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return if has_server_programs(dir) {
            Ok(dir.to_owned())
        } else {
            Err(PostgresError::NotFound {
                looked: format!("{} (as configured)", dir.display()),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| has_server_programs(d)) {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server_programs(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server_programs(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    Err(PostgresError::NotFound {
        looked: "PATH, `pg_config --bindir` and /usr/lib/postgresql/<version>/bin".to_owned(),
    })
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

/// Creates a cluster in `data` (which must be empty or absent) with `trust` authentication for
/// local connections, owned by `user` when given. Only the owner may reach its socket directory, so
/// `trust` admits no one else.
pub fn initdb(bindir: &Path, data: &Path, user: Option<&str>, options: &InitOptions) -> Result<()> {
    std::fs::create_dir_all(data).map_err(io(format!("create {}", data.display())))?;
    if let Some(user) = user {
        chown(user, &[data])?;
    }
    let mut cmd = as_user(user, &bindir.join("initdb"));
    cmd.args(["-A", "trust", "-E", "UTF8", "--locale=C", "-U"])
        .arg(&options.superuser);
    if options.no_sync {
        cmd.arg("--no-sync");
    }
    let out = cmd
        .arg("-D")
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .map_err(io("run initdb"))?;
    if !out.status.success() {
        return Err(PostgresError::Command {
            what: format!("initdb -D {}", data.display()),
            detail: last_lines(&String::from_utf8_lossy(&out.stderr), 3),
        });
    }
    Ok(())
}

/// Whether `data` holds a cluster (`initdb` has run there).
pub fn is_initialized(data: &Path) -> bool {
    data.join("PG_VERSION").is_file()
}

/// Before starting a server on `data`: removes a stale `postmaster.pid` (its process is gone, or
/// the pid now belongs to a process that is not this directory's server, which is never
/// signalled), or reports a server that still runs there (`AlreadyRunning`, with its pid).
pub fn prepare_data_dir(data: &Path) -> Result<()> {
    let pid_file = data.join("postmaster.pid");
    let text = match std::fs::read_to_string(&pid_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("read {}", pid_file.display()))(e)),
    };
    let pid = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok());
    let stale = match pid {
        None => true,
        Some(pid) => match server_of(pid, data) {
            Some(true) => {
                return Err(PostgresError::AlreadyRunning {
                    pid,
                    data: data.to_owned(),
                });
            }
            Some(false) => true,
            None => {
                return Err(PostgresError::Unverifiable { pid, pid_file });
            }
        },
    };
    if stale {
        tracing::warn!(
            pid_file = %pid_file.display(),
            pid = ?pid,
            "removing a stale postmaster.pid (its process is gone or is not this directory's server)"
        );
        std::fs::remove_file(&pid_file).map_err(io(format!("remove {}", pid_file.display())))?;
    }
    Ok(())
}

/// Whether process `pid` is a PostgreSQL server running on `data`: `Some(false)` when it does not
/// exist or is another program (its working directory, which the server sets to its data directory,
/// is elsewhere), `None` when that cannot be told.
fn server_of(pid: u32, data: &Path) -> Option<bool> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    if !proc.exists() {
        return Some(false);
    }
    let Ok(cwd) = std::fs::read_link(proc.join("cwd")) else {
        return None;
    };
    let data = data.canonicalize().ok()?;
    Some(cwd == data)
}

/// How [`Server::start`] runs `postgres`.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The directory of the server's Unix socket (only the server's user may enter it).
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
    /// How long the server may take to accept connections.
    pub ready_timeout: Duration,
}

/// A running `postgres` under its watchdog.
#[derive(Debug)]
pub struct Server {
    watchdog: Option<ChildStdin>,
    child: Child,
    socket_dir: PathBuf,
    port: u16,
    stop_timeout: Duration,
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn sh_path(path: &Path) -> String {
    sh_quote(&path.display().to_string())
}

impl Server {
    /// Starts `postgres` of `bindir` on `data` (as `user`), and returns once it accepts connections
    /// on its socket.
    pub fn start(
        bindir: &Path,
        data: &Path,
        user: Option<&str>,
        options: &StartOptions,
    ) -> Result<Server> {
        let socket = options
            .socket_dir
            .join(format!(".s.PGSQL.{}", options.port));
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(PostgresError::SocketPathTooLong {
                path: socket,
                len,
                max: MAX_SOCKET_PATH,
            });
        }
        let mut args = format!(
            " -D {} -k {} -p {} -c unix_socket_permissions=0700",
            sh_path(data),
            sh_path(&options.socket_dir),
            options.port
        );
        args.push_str(&format!(
            " -c listen_addresses={}",
            sh_quote(options.listen_address.as_deref().unwrap_or(""))
        ));
        for (name, value) in &options.settings {
            args.push_str(&format!(" -c {}", sh_quote(&format!("{name}={value}"))));
        }
        let run_as = user
            .map(|u| format!("setpriv --reuid={u} --regid={u} --init-groups "))
            .unwrap_or_default();
        let ticks = options.stop_timeout.as_millis().div_ceil(100).max(1);
        let cleanup = options
            .remove_after_stop
            .as_deref()
            .map(|dir| format!("; rm -rf {}", sh_path(dir)))
            .unwrap_or_default();
        // The watchdog: starts the server, waits for its stdin to close (ampd stopped or died), asks
        // for a fast shutdown (SIGINT), forces an immediate one (SIGQUIT) after the stop timeout,
        // and waits for the server to be gone.
        let script = format!(
            "{run_as}{postgres}{args} >>{log} 2>&1 & pid=$!; \
             cat >/dev/null; kill -INT $pid 2>/dev/null; n=0; \
             while kill -0 $pid 2>/dev/null; do \
               n=$((n+1)); [ $n -eq {ticks} ] && kill -QUIT $pid 2>/dev/null; sleep 0.1; \
             done{cleanup}",
            postgres = sh_path(&bindir.join("postgres")),
            log = sh_path(&options.log_file),
        );
        use std::os::unix::process::CommandExt as _;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // A process group of its own: a Ctrl-C at the terminal goes to ampd, which stops its
            // services first and the server last.
            .process_group(0)
            .spawn()
            .map_err(io("start postgres"))?;
        let watchdog = child.stdin.take();
        let mut server = Server {
            watchdog,
            child,
            socket_dir: options.socket_dir.clone(),
            port: options.port,
            stop_timeout: options.stop_timeout,
        };
        if let Err(e) = server.wait_ready(bindir, &options.log_file, options.ready_timeout) {
            server.stop_now();
            return Err(e);
        }
        Ok(server)
    }

    fn wait_ready(&mut self, bindir: &Path, log_file: &Path, within: Duration) -> Result<()> {
        let started = Instant::now();
        let pg_isready = bindir.join("pg_isready");
        let socket = self.socket_dir.join(format!(".s.PGSQL.{}", self.port));
        loop {
            if socket.exists() {
                let ready = Command::new(&pg_isready)
                    .arg("-q")
                    .arg("-h")
                    .arg(&self.socket_dir)
                    .arg("-p")
                    .arg(self.port.to_string())
                    .status()
                    // Without pg_isready, the socket existing is good enough.
                    .map_or(true, |s| s.success());
                if ready {
                    return Ok(());
                }
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited || started.elapsed() > within {
                let log = std::fs::read_to_string(log_file).unwrap_or_default();
                return Err(PostgresError::NotReady {
                    waited: started.elapsed(),
                    log_file: log_file.to_owned(),
                    log: last_lines(&log, 3),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `postgresql://` URL for `database` as `user` over the Unix socket.
    pub fn url(&self, user: &str, database: &str) -> String {
        let mut url = url::Url::parse("postgresql://localhost").expect("a constant URL");
        url.set_username(user).ok();
        url.set_port(Some(self.port)).ok();
        url.set_path(&format!("/{database}"));
        url.query_pairs_mut()
            .append_pair("host", &self.socket_dir.display().to_string());
        url.to_string()
    }

    fn stop_now(&mut self) {
        drop(self.watchdog.take());
        let _ = self.child.wait();
    }

    /// Asks the server for a fast shutdown and waits until it has stopped (forced after the stop
    /// timeout). Blocking: call it from a blocking context.
    pub fn stop(mut self) -> Result<()> {
        let started = Instant::now();
        drop(self.watchdog.take());
        let status = self.child.wait().map_err(io("wait for postgres to stop"))?;
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            forced = started.elapsed() >= self.stop_timeout,
            ?status,
            "PostgreSQL stopped"
        );
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.watchdog.is_some() {
            self.stop_now();
        }
    }
}

/// Appends `line` to `path` (a marker in a log), ignoring failure.
pub fn note(path: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
