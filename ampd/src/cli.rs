//! The `ampd` command line: clap types, logging set-up, dispatch, error printing and the exit
//! code. It lives in the library so that the same command line can be built around another list of
//! migrations (the test suite builds one with test-only migrations); `main.rs` only picks the
//! metadata schema's migrations.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::migrate::MigrationSet;
use crate::{logging, migrate_cmd, redact, service_cmd};

/// The ampd data daemon.
#[derive(Debug, Parser)]
#[command(name = "ampd", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML), before or after the subcommand; default: the AMP_CONFIG
    /// environment variable. Every key can be overridden from the environment as
    /// AMP_CONFIG_<SECTION>__<KEY>, e.g. AMP_CONFIG_METADATA_DB__URL.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// How log lines (stderr) are written: text for people, or json, one object per line, for
    /// log aggregation. Secrets are redacted either way.
    #[arg(
        long,
        global = true,
        env = "AMP_LOG_FORMAT",
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending metadata database migrations, then exit (0: up to date, 1: error).
    Migrate(migrate_cmd::MigrateArgs),
    /// Run the controller: the admin API, and the scheduler that places jobs, recovers dead
    /// workers' jobs and retries failed ones.
    Controller,
    /// Run the server: serves the rows of every table's active revision over HTTP.
    Server,
    /// Run a worker node: registers, heartbeats and follows the jobs assigned to it.
    Worker {
        /// This worker's node id: 1-64 characters of [A-Za-z0-9_.-], starting with a letter.
        #[arg(long, value_name = "ID")]
        node_id: String,
    },
    /// Run the controller, the server and a worker in one process, with nothing to set up: without
    /// metadata_db.url it runs its own PostgreSQL in the amp directory (metadata_db.auto_migrate
    /// defaults to true). Configuration: --config / AMP_CONFIG, else <amp dir>/config.toml if it
    /// exists, else the defaults and the AMP_CONFIG_* environment.
    Solo {
        /// The embedded worker's node id.
        #[arg(long, value_name = "ID", default_value = "solo")]
        node_id: String,
        /// Where solo keeps everything: its database (metadb/), data/, sources/, config.toml.
        #[arg(long, env = "AMP_DIR", value_name = "DIR", default_value = crate::solo::DEFAULT_AMP_DIR)]
        amp_dir: PathBuf,
    },
}

/// Runs the command line of the process with the migrations `migrations` returns, and gives the
/// exit code: 0 on success, 1 on any error (usage errors included).
pub fn main(migrations: fn() -> MigrationSet) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    logging::init(cli.log_format);
    #[cfg(feature = "failpoints")]
    if let Err(e) = crate::failpoint::setup() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            print_error(&e);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, migrations)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(e.as_ref());
            ExitCode::FAILURE
        }
    }
}

/// The configuration file: `--config`, else `AMP_CONFIG` (set but empty is an error, not "unset").
fn config_path(cli: &Cli) -> Result<Option<PathBuf>, Box<dyn std::error::Error>> {
    if let Some(path) = &cli.config {
        return Ok(Some(path.clone()));
    }
    match std::env::var_os("AMP_CONFIG") {
        Some(value) if value.is_empty() => Err(EMPTY_AMP_CONFIG.into()),
        Some(value) => Ok(Some(PathBuf::from(value))),
        None => Ok(None),
    }
}

async fn run(cli: Cli, migrations: fn() -> MigrationSet) -> Result<(), Box<dyn std::error::Error>> {
    let path = config_path(&cli)?;
    let load = || -> Result<Config, Box<dyn std::error::Error>> {
        let config = match &path {
            Some(path) => Config::load(path)?,
            None => return Err(NO_CONFIG.into()),
        };
        config.require_url()?;
        crate::config::apply_umask(config.storage.umask);
        config
            .secrets()
            .iter()
            .for_each(|secret| redact::register(secret));
        Ok(config)
    };
    match cli.command {
        // Solo finds its configuration itself (it may live in its directory, or not exist).
        Command::Solo { node_id, amp_dir } => {
            crate::solo::run(path.as_deref(), &amp_dir, node_id, migrations).await
        }
        Command::Migrate(args) => migrate_cmd::run(&load()?, args, &migrations()).await,
        Command::Controller => service_cmd::controller(load()?, migrations).await,
        Command::Server => service_cmd::server(load()?, migrations).await,
        Command::Worker { node_id } => service_cmd::worker(load()?, node_id, migrations).await,
    }
}

const NO_CONFIG: &str = "no configuration file: pass --config <path> (before or after the subcommand) or set AMP_CONFIG=<path>";

const EMPTY_AMP_CONFIG: &str = "AMP_CONFIG is set but empty: set it to the configuration file's path, unset it, or pass --config <path>";

/// `error: <what failed>` and one `  caused by: <why>` line per source, secrets redacted.
fn print_error(err: &dyn std::error::Error) {
    let mut out = format!("error: {err}\n");
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !out.contains(&line) {
            out.push_str(&format!("  caused by: {line}\n"));
        }
        source = cause.source();
    }
    let _ = std::io::stderr().write_all(redact::redact(&out).as_bytes());
}
