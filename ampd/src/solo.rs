//! `ampd solo`: the controller, the server and one worker in one process, with nothing to set up.
//!
//! Everything lives in the amp directory (`--amp-dir`, `AMP_DIR`, default `./.amp`): the managed
//! database's cluster (`metadb/`, also the directory of its Unix socket), its log
//! (`postgres.log`), `metadb.toml` (a config file other `ampd` commands reach the managed database
//! with), the data (`data/`), the sources CSV paths resolve in (`sources/`), an optional
//! `config.toml`, and `solo.lock`, which one `ampd solo` holds while it runs. Without
//! `metadata_db.url`, solo runs PostgreSQL itself ([`crate::postgres`]): `initdb` on the first start,
//! the same cluster afterwards, listening on its socket only (no TCP port, so nothing conflicts).
//! With a URL it uses that database and manages nothing. `metadata_db.auto_migrate` defaults to
//! true.
//!
//! Stopping (Ctrl-C or SIGTERM): the services stop, the pool is closed, then PostgreSQL gets a fast
//! shutdown and ampd waits for it (forced after 30 s). If ampd is killed, PostgreSQL's watchdog
//! gives it the same fast shutdown; if the watchdog is killed too, the next `ampd solo` on the
//! directory stops the server it left.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::{self, Connection as _};

use crate::config::{Config, DatabaseUrl};
use crate::migrate::MigrationSet;
use crate::postgres::{self, PostgresError, Server};
use crate::service::{self, Component, controller, server, worker};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The default amp directory.
pub const DEFAULT_AMP_DIR: &str = "./.amp";
/// The managed database's superuser, whom ampd connects as.
const DB_USER: &str = "ampd";
/// The managed database.
const DB_NAME: &str = "amp";
/// The port naming the managed server's socket (no TCP listener uses it).
const DB_PORT: u16 = 5432;
/// How long a fast shutdown of the managed server may take before it is forced.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the managed server may take to accept connections (crash recovery included).
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Why solo cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SoloError {
    /// Another `ampd solo` holds the amp directory.
    #[error(
        "another ampd solo is running on {} (it holds {}); stop it first, or give this one another \
         --amp-dir",
        .dir.display(),
        .lock.display()
    )]
    Busy {
        /// The amp directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// Another `ampd solo` runs the managed cluster (reached through another amp directory).
    #[error(
        "another ampd solo runs the cluster in {}; stop it first, or give this one another \
         --amp-dir",
        .0.display()
    )]
    ClusterBusy(PathBuf),
    /// Someone but the amp directory's owner may write to it.
    #[error(
        "refusing the amp directory {}: {why}; ampd solo runs PostgreSQL from it and writes into \
         it, so only its owner may write to it (chmod go-w {}, or give it another --amp-dir)",
        .dir.display(),
        .dir.display()
    )]
    Unsafe {
        /// The amp directory.
        dir: PathBuf,
        /// Who else may write to it.
        why: String,
    },
    /// A file of the amp directory is a symbolic link, which solo never follows.
    #[error(
        "{} is a symbolic link: ampd solo never follows one in its amp directory; remove it",
        .0.display()
    )]
    Symlink(PathBuf),
    /// A file or directory of the amp directory could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The managed database could not be started or stopped.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// The managed server runs, but its database could not be created.
    #[error("managed database: cannot create the database {DB_NAME}: {0}")]
    CreateDatabase(sqlx::Error),
    /// The blocking work of starting or stopping the managed server did not finish.
    #[error("managed database: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> SoloError {
    move |source| SoloError::Io { what, source }
}

/// The amp directory's lock, held while solo runs.
struct AmpDirLock(#[allow(dead_code)] std::fs::File);

/// Opens `path` of the amp directory with `options`, never through a symbolic link.
fn open_in_amp_dir(
    path: &Path,
    options: &mut std::fs::OpenOptions,
) -> std::result::Result<std::fs::File, SoloError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    options
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => SoloError::Symlink(path.to_owned()),
            _ => io(format!("open {}", path.display()))(e),
        })
}

/// Refuses an amp directory that another user may write to (or that is another user's): they
/// could plant symbolic links or files where solo, maybe as root, writes.
fn check_private(dir: &Path) -> std::result::Result<(), SoloError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).map_err(io(format!("inspect {}", dir.display())))?;
    let me = rustix::process::geteuid().as_raw();
    let why = if meta.uid() != me {
        Some(format!(
            "it belongs to another user (uid {}, this process runs as uid {me})",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "its group or other users may write to it (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(SoloError::Unsafe {
            dir: dir.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// The managed cluster's lock: its data directory itself, locked while solo runs it, so a solo
/// that reaches the same cluster another way (a bind mount, say) never stops the one running it.
struct ClusterLock(#[allow(dead_code)] std::fs::File);

fn lock_cluster(data: &Path) -> std::result::Result<ClusterLock, SoloError> {
    let dir = std::fs::File::open(data).map_err(io(format!("open {}", data.display())))?;
    match dir.try_lock() {
        Ok(()) => Ok(ClusterLock(dir)),
        Err(std::fs::TryLockError::WouldBlock) => Err(SoloError::ClusterBusy(data.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(format!("lock {}", data.display()))(e)),
    }
}

fn lock(dir: &Path) -> std::result::Result<AmpDirLock, SoloError> {
    let path = dir.join("solo.lock");
    let file = open_in_amp_dir(
        &path,
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true),
    )?;
    match file.try_lock() {
        Ok(()) => Ok(AmpDirLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(SoloError::Busy {
            dir: dir.to_owned(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(format!("lock {}", path.display()))(e)),
    }
}

/// The configuration: `--config` / `AMP_CONFIG` when given, else `<amp_dir>/config.toml` when it
/// exists, else the defaults and the `AMP_CONFIG_*` environment. Paths left unset go under the amp
/// directory.
fn load_config(explicit: Option<&Path>, amp_dir: &Path) -> Result<Config> {
    let in_dir = amp_dir.join("config.toml");
    let mut config = match explicit {
        Some(path) => Config::load(path)?,
        None if in_dir.is_file() => Config::load(&in_dir)?,
        None => Config::from_env()?,
    };
    config
        .storage
        .data_dir
        .get_or_insert_with(|| amp_dir.join("data"));
    config
        .worker
        .sources_dir
        .get_or_insert_with(|| amp_dir.join("sources"));
    Ok(config)
}

/// `dir`, created when missing, as an absolute path without symbolic links. Created as root, it
/// lets other users through (mode 0711, whatever the umask): PostgreSQL, run as `postgres`, must
/// reach `metadb/` in it.
fn absolute(dir: &Path) -> std::result::Result<PathBuf, SoloError> {
    let existed = dir.exists();
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    if !existed && postgres::is_root() {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io(format!("chmod {}", dir.display())))?;
    }
    dir.canonicalize()
        .map_err(io(format!("resolve {}", dir.display())))
}

/// Starts (creating it the first time) the managed cluster in `<amp_dir>/metadb`. A server left
/// running on it by an earlier solo that died with its watchdog (no solo holds the directory, so
/// nothing else owns it) is stopped first.
fn start_managed(amp_dir: &Path) -> std::result::Result<(Server, ClusterLock), SoloError> {
    let bindir = postgres::find_bindir(None)?;
    let user = postgres::server_user()?;
    postgres::check_reachable(user.as_deref(), amp_dir)?;
    let data = amp_dir.join("metadb");
    postgres::refuse_symlink(&data)?;
    postgres::check_socket_path(&data, DB_PORT)?;
    let cluster_lock;
    if postgres::is_initialized(&data) {
        cluster_lock = lock_cluster(&data)?;
        match postgres::prepare_data_dir(&data) {
            Err(PostgresError::AlreadyRunning { pid, .. }) => {
                tracing::warn!(
                    pid,
                    "stopping the PostgreSQL an earlier ampd solo left running on this directory"
                );
                postgres::stop_server(pid, &data, STOP_TIMEOUT)?;
                postgres::prepare_data_dir(&data)?;
            }
            other => other?,
        }
    } else {
        tracing::info!(
            dir = %data.display(),
            bindir = %bindir.display(),
            "creating the managed PostgreSQL cluster (initdb)"
        );
        postgres::initdb(
            &bindir,
            &data,
            user.as_deref(),
            &postgres::InitOptions {
                superuser: DB_USER.to_owned(),
                no_sync: false,
            },
        )?;
        cluster_lock = lock_cluster(&data)?;
    }
    tracing::info!(dir = %data.display(), bindir = %bindir.display(), "starting PostgreSQL");
    let server = Server::start(
        &bindir,
        &data,
        user.as_deref(),
        &postgres::StartOptions {
            socket_dir: data.clone(),
            port: DB_PORT,
            listen_address: None,
            settings: Vec::new(),
            log_file: amp_dir.join("postgres.log"),
            remove_after_stop: None,
            stop_timeout: STOP_TIMEOUT,
            ready_timeout: READY_TIMEOUT,
        },
    )?;
    Ok((server, cluster_lock))
}

/// Creates the managed database on the first start (idempotent).
async fn ensure_database(server_url: &str) -> std::result::Result<(), sqlx::Error> {
    // The server accepts connections: it said so in postmaster.pid.
    let mut conn = sqlx::PgConnection::connect(server_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DB_NAME)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DB_NAME}")))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await
}

/// Writes `<amp_dir>/metadb.toml`, a config file for other `ampd` commands (`ampd --config
/// <amp_dir>/metadb.toml migrate status`) with the managed database's URL (it has no password:
/// only the server's user, and root, may use its socket).
fn write_metadb_config(amp_dir: &Path, url: &str) -> std::result::Result<PathBuf, SoloError> {
    let path = amp_dir.join("metadb.toml");
    let text = format!(
        "# Written by ampd solo at each start: its managed database, for other ampd commands while\n\
         # solo runs, e.g. ampd --config {} migrate status\n\
         [metadata_db]\nurl = {}\n",
        path.display(),
        toml::Value::String(url.to_owned())
    );
    let partial = amp_dir.join("metadb.toml.partial");
    // Made anew, never written through a link left in its place (removing one removes the link).
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io(format!("remove {}", partial.display()))(e));
        }
        _ => {}
    }
    let mut file = open_in_amp_dir(
        &partial,
        std::fs::OpenOptions::new().write(true).create_new(true),
    )?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(io(format!("write {}", partial.display())))?;
    drop(file);
    std::fs::rename(&partial, &path).map_err(io(format!("write {}", path.display())))?;
    Ok(path)
}

/// Runs `ampd solo`.
pub async fn run(
    config_path: Option<&Path>,
    amp_dir: &Path,
    node_id: String,
    migrations: fn() -> MigrationSet,
) -> Result {
    let shutdown = service::stop_on_signals()?;
    // The configuration first: a mistake in it creates nothing.
    let wanted =
        std::path::absolute(amp_dir).map_err(io(format!("resolve {}", amp_dir.display())))?;
    let mut config = load_config(config_path, &wanted)?;
    config
        .secrets()
        .iter()
        .for_each(|secret| crate::redact::register(secret));
    crate::config::apply_umask(config.storage.umask);
    let amp_dir = absolute(&wanted)?;
    check_private(&amp_dir)?;
    let _lock = lock(&amp_dir)?;
    for dir in [config.storage.data_dir(), config.worker.sources_dir()] {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }

    let managed = match config.metadata_db.url {
        Some(_) => None,
        None => {
            let started = {
                let amp_dir = amp_dir.clone();
                tokio::task::spawn_blocking(move || start_managed(&amp_dir)).await
            };
            // From here on, dropping the server (on any error) stops it.
            let (server, cluster_lock) = started.map_err(SoloError::from)??;
            ensure_database(&server.url(DB_USER, "postgres"))
                .await
                .map_err(SoloError::CreateDatabase)?;
            let url = server.url(DB_USER, DB_NAME);
            let metadb_config = write_metadb_config(&amp_dir, &url)?;
            config.metadata_db.url = Some(DatabaseUrl::parse(&url)?);
            Some((server, metadb_config, cluster_lock))
        }
    };
    print_banner(
        &config,
        &amp_dir,
        &node_id,
        managed.as_ref().map(|(_, path, _)| path.as_path()),
    );

    let result = run_services(config, node_id, migrations, shutdown).await;
    let Some((server, _, _cluster_lock)) = managed else {
        return result;
    };
    let stopped = match tokio::task::spawn_blocking(move || server.stop()).await {
        Ok(stopped) => stopped.map_err(SoloError::from),
        Err(e) => Err(SoloError::from(e)),
    };
    match (result, stopped) {
        (Ok(()), stopped) => Ok(stopped?),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(stop)) => {
            tracing::error!(error = %stop, "stopping the managed PostgreSQL failed");
            Err(e)
        }
    }
}

/// Connects (migrating), runs the three services until a stop is asked for or one fails, then
/// closes the pool.
async fn run_services(
    config: Config,
    node_id: String,
    migrations: fn() -> MigrationSet,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result {
    // Before connecting: the migrations applied on startup are recorded too.
    if config.controller.metrics {
        crate::metrics::install();
    }
    let connect = service::connect(&config, true, migrations);
    let Some(db) = service::until_stopped(&shutdown, connect)
        .await
        .transpose()?
    else {
        return Ok(());
    };
    let mut config = config;
    if let Some(addr) = config.worker.metrics_addr.take() {
        tracing::info!(%addr, "solo serves the worker's metrics on the admin API's /metrics, not on worker.metrics_addr");
    }
    let config = Arc::new(config);
    let components: Vec<Component> = vec![
        (
            "controller",
            Box::pin(controller::run(
                db.clone(),
                config.clone(),
                migrations,
                shutdown.clone(),
            )),
        ),
        (
            "server",
            Box::pin(server::run(db.clone(), config.clone(), shutdown.clone())),
        ),
        (
            "worker",
            Box::pin(worker::run(db.clone(), config, node_id, shutdown.clone())),
        ),
    ];
    let result = service::supervise(shutdown, components).await;
    if let Err(e) = db.close().await {
        tracing::warn!(error = %e, "closing the database pool failed");
    }
    tracing::info!("services stopped, database pool closed");
    Ok(result?)
}

/// Where everything is, on stdout. `metadb_config`: the config file of the managed database.
fn print_banner(config: &Config, amp_dir: &Path, node_id: &str, metadb_config: Option<&Path>) {
    let url = config
        .metadata_db
        .url
        .as_ref()
        .map(|u| u.redacted())
        .unwrap_or_default();
    let database = match metadb_config {
        Some(path) => format!(
            "{url}\n                managed: cluster {}, log {}\n                \
             other commands reach it with: ampd --config {} migrate status",
            amp_dir.join("metadb").display(),
            amp_dir.join("postgres.log").display(),
            path.display()
        ),
        None => url,
    };
    println!(
        "ampd solo\n  amp dir       {}\n  database      {database}\n  admin API     http://{}\n  \
         server        http://{}\n  worker        {node_id}\n  data          {}\n  sources       {}",
        amp_dir.display(),
        config.controller.admin_addr,
        config.server.addr,
        config.storage.data_dir().display(),
        config.worker.sources_dir().display(),
    );
}
