//! The daemon's configuration: one TOML file (`--config <path>` or `AMP_CONFIG`), or none at all
//! (`ampd solo`), overlaid by `AMP_CONFIG_<SECTION>__<KEY>` environment variables (the environment
//! wins), with a default for every key but `metadata_db.url`. Relative paths are relative to the
//! working directory.
//!
//! This file holds the keys, their defaults and the entry points; `config/load.rs` reads and
//! checks the input. Every error is one line that names the key and the file or variable that set it (or the
//! position of a syntax error), and never contains a secret (see [`crate::redact`]).

mod load;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::redact::{self, Secret};

/// The daemon's whole configuration. Every section is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[metadata_db]`: the PostgreSQL metadata database.
    pub metadata_db: MetadataDbConfig,
    /// `[controller]`: the admin API and the loop that places, recovers and retries jobs.
    pub controller: ControllerConfig,
    /// `[server]`: the service that serves tables' rows.
    pub server: ServerConfig,
    /// `[worker]`: liveness, job execution and the files jobs write.
    pub worker: WorkerConfig,
    /// `[storage]`: the data directory every service shares.
    pub storage: StorageConfig,
    /// `[http]`: how the admin API and the server treat connections and requests.
    pub http: HttpConfig,
    /// Where the configuration came from, for messages.
    #[serde(skip)]
    origin: Origin,
}

/// `[metadata_db]`: how to reach and use the metadata database.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetadataDbConfig {
    /// `postgres://` or `postgresql://` URL; every command but `solo` requires it.
    pub url: Option<DatabaseUrl>,
    /// The URL for work that needs a real session (migrations and their lock, LISTEN, node-id
    /// claims) when `url` points at a connection pooler; see [`MetadataDbConfig::session_url`].
    pub direct_url: Option<DatabaseUrl>,
    /// Apply pending migrations at start-up; unset: `solo` migrates, other services do not.
    pub auto_migrate: Option<bool>,
    /// Pool size limit of a service; at least 1.
    pub max_connections: u32,
    /// Connections kept open while idle; at most `max_connections`.
    pub min_connections: u32,
    /// Seconds connecting may take, retries included; at least 1.
    pub connect_timeout_secs: u64,
    /// Seconds to wait for a free pooled connection; at least 1.
    pub acquire_timeout_secs: u64,
    /// Idle connections above `min_connections` are closed after this many seconds.
    pub idle_timeout_secs: u64,
    /// Seconds a migration run waits for another run's lock; at most 86400.
    pub migration_lock_timeout_secs: u64,
    /// PostgreSQL `lock_timeout` for migration DDL, in milliseconds; 1 ..= 2147483647.
    pub ddl_lock_timeout_ms: u64,
    /// Seconds a concurrent index build (a migration that runs alone) may wait for older
    /// transactions and for a lock on its table; 1 ..= 86400.
    pub concurrent_index_timeout_secs: u64,
    /// Client-side bound, in seconds, on each statement of a migration (beyond it the run
    /// concludes that the network or the server is frozen); 1 ..= 86400.
    pub migration_statement_timeout_secs: u64,
    /// Apply a pending migration older than the newest applied one (a branch merged late) instead
    /// of refusing the run; `ampd migrate --allow-out-of-order` sets it for one run.
    pub allow_out_of_order: bool,
    /// A database `ampd migrate impact` may empty and fill to measure the pending migrations on
    /// (never the target itself); without it, only `--create-shadow` gives `impact` one.
    pub shadow_url: Option<DatabaseUrl>,
    /// `ampd migrate impact` flags a statement that rewrites or scans, under a lock that blocks
    /// writes, a table at least this large (MiB, from `pg_class.relpages`); 0 flags every size.
    pub impact_risky_size_mb: u64,
}

/// `[controller]`: the admin API and the scheduling loop.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// Where the admin API listens: an IP address and a port.
    pub admin_addr: SocketAddr,
    /// When set, every admin API route but `/healthz` requires `Authorization: Bearer <token>`.
    /// A secret: never shown in output, logs or errors.
    pub admin_token: Option<Secret>,
    /// Milliseconds between passes that reassign dead workers' jobs and retry failed ones; >= 1.
    pub reconcile_interval_ms: u64,
    /// A failed job is retried after `retry_base_delay_ms * 2^(attempt-1)` ms; at least 1 ...
    pub retry_base_delay_ms: u64,
    /// ... capped at this many milliseconds; at least `retry_base_delay_ms`.
    pub retry_max_delay_ms: u64,
    /// Attempts a job gets before it is given up as FATAL; at least 1.
    pub max_attempts: u32,
    /// Largest request body the admin API accepts, in bytes (a larger one gets 413); at least 1.
    pub max_body_bytes: u64,
    /// Tables a registered manifest may have (more gets 422); at least 1.
    pub max_manifest_tables: u64,
    /// Columns a table of a registered manifest may have (more gets 422); at least 1.
    pub max_table_columns: u64,
    /// Inline rows a registered manifest may hold, all tables together (more gets 422); at least 1.
    pub max_inline_rows: u64,
    /// Longest namespace, name and version (in bytes) a manifest is registered under (longer
    /// gets 400); from 1 to 200 (names become directory names).
    pub max_name_len: u64,
    /// Whether the controller records HTTP metrics and serves `GET /metrics` (in solo: every
    /// service's metrics).
    pub metrics: bool,
    /// When true, `GET /metrics` is served without the admin token (for a Prometheus that holds no
    /// secret); the other routes still want it.
    pub metrics_open: bool,
    /// The events of a job that finished this many days ago are deleted; 0 keeps them forever;
    /// at most 36500.
    pub events_retention_days: u64,
    /// A finished job this many days old is deleted (never one whose revision is active, nor the
    /// COMPLETED job of a version still registered); 0 keeps them forever; at most 36500.
    pub jobs_retention_days: u64,
    /// A worker not live, with no active job, last seen this many days ago is deleted; 0 keeps
    /// them forever; at most 36500.
    pub workers_retention_days: u64,
    /// Seconds between retention passes; at least 1.
    pub retention_interval_secs: u64,
}

impl ControllerConfig {
    /// The limits a manifest is registered (and deployed) within.
    pub fn manifest_limits(&self) -> crate::manifest::Limits {
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        crate::manifest::Limits {
            max_tables: size(self.max_manifest_tables),
            max_columns: size(self.max_table_columns),
            max_inline_rows: size(self.max_inline_rows),
        }
    }
}

/// `[server]`: the service that serves tables' rows.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the server listens: an IP address and a port.
    pub addr: SocketAddr,
    /// Milliseconds between re-reads of every table's active revision; at least 1.
    pub reconcile_interval_ms: u64,
    /// The longest row (a line of a revision's files) served as CSV, in bytes; a longer one cuts
    /// the response off; at least 1.
    pub max_row_bytes: u64,
    /// Whether the server records HTTP metrics and serves `GET /metrics`.
    pub metrics: bool,
}

/// `[http]`: how the HTTP services (the controller's admin API and the server) treat their
/// connections and requests, so slow, idle or hostile clients cannot hold them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Seconds a client may take to send a request's headers, from the moment it connects (a
    /// slower one is disconnected); at least 1.
    pub header_timeout_secs: u64,
    /// Seconds a client may take to send a request's body (slower: 408); at least 1.
    pub body_timeout_secs: u64,
    /// Seconds from a request's last byte to its response's first (longer, say because the
    /// metadata database does not answer: 503); at least 1.
    pub request_timeout_secs: u64,
    /// Seconds a connection may stay open with nothing sent either way; then it is closed (a
    /// response in flight gets as long again); at least 1.
    pub idle_timeout_secs: u64,
    /// Connections a service keeps open at once; a new one past it is closed at once; at least 1
    /// (lowered, with a warning, to a quarter of the process's open-file limit).
    pub max_connections: u32,
    /// The host names and addresses requests may name in `Host` (DNS rebinding defence); empty:
    /// the address the service is bound to, `localhost`, `127.0.0.1` and `[::1]`; `["*"]`: any.
    pub allowed_hosts: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            request_timeout_secs: 30,
            idle_timeout_secs: 60,
            max_connections: 512,
            allowed_hosts: Vec::new(),
        }
    }
}

impl HttpConfig {
    /// What is wrong with `allowed_hosts`, if anything: an empty or over-long entry, one that is
    /// not a host name or address (a port, a path or a space in it), or `*` beside other entries.
    pub fn allowed_hosts_problem(&self) -> Option<String> {
        let hosts = &self.allowed_hosts;
        if hosts.iter().any(|h| h == "*") && hosts.len() > 1 {
            return Some("may hold `*` (any host) only alone".to_owned());
        }
        for (i, host) in hosts.iter().enumerate() {
            if host == "*" {
                continue;
            }
            let valid = !host.is_empty()
                && host.len() <= 253
                && crate::service::listen::normalize_host(host).is_some_and(|h| h.port.is_none());
            if !valid {
                return Some(format!(
                    "entry {} is not a host name or an IP address without a port",
                    i + 1
                ));
            }
        }
        None
    }
}

/// `[storage]`: where manifests and tables' files live, shared by the services (the controller
/// stores manifests there, workers write tables' files, the server reads them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The data directory; see [`StorageConfig::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// The umask a service creates files and directories with (`0o077`: files 0600, directories
    /// 0700); at most `0o777`.
    pub umask: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: None,
            umask: DEFAULT_UMASK,
        }
    }
}

/// The default `[storage] umask`: what ampd creates is readable by its own user only.
pub const DEFAULT_UMASK: u32 = 0o077;

/// Sets the process's umask (`[storage] umask`).
pub fn apply_umask(mask: u32) {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask & 0o777));
}

/// `[worker]`: liveness, job execution and the files jobs write.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Milliseconds between a worker's heartbeats; at least 1.
    pub heartbeat_interval_ms: u64,
    /// A worker whose last heartbeat is older than this (ms) is dead; > `heartbeat_interval_ms`.
    pub liveness_window_ms: u64,
    /// The directory a manifest's relative CSV paths are resolved in (nothing outside it is
    /// read); see [`WorkerConfig::sources_dir`].
    pub sources_dir: Option<PathBuf>,
    /// Jobs a worker runs at once; at least 1.
    pub max_concurrent_jobs: u32,
    /// Seconds a replaced revision's files are kept before they are deleted.
    pub gc_grace_secs: u64,
    /// Milliseconds between passes of the task that deletes expired files; at least 1.
    pub gc_interval_ms: u64,
    /// Milliseconds between re-reads of the jobs assigned to the worker; at least 1.
    pub reconcile_interval_ms: u64,
    /// Rows per file a job writes; at least 1.
    pub rows_per_file: u64,
    /// The longest CSV record (a header row too) read from `sources_dir`, in bytes; a longer one
    /// ends the job FATAL (`record_too_long`) and is refused at registration; at least 1.
    pub max_csv_record_bytes: u64,
    /// Where the worker serves `GET /metrics` (an IP address and a port); unset: nowhere (several
    /// workers may share a host). A port that cannot be bound is a warning, not an error. Unused by
    /// `ampd solo`, which serves every service's metrics on `[controller] admin_addr`.
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for MetadataDbConfig {
    fn default() -> Self {
        MetadataDbConfig {
            url: None,
            direct_url: None,
            auto_migrate: None,
            max_connections: 10,
            min_connections: 0,
            connect_timeout_secs: 5,
            acquire_timeout_secs: 30,
            idle_timeout_secs: 600,
            migration_lock_timeout_secs: 60,
            ddl_lock_timeout_ms: 5000,
            concurrent_index_timeout_secs: 600,
            migration_statement_timeout_secs: 3600,
            allow_out_of_order: false,
            shadow_url: None,
            impact_risky_size_mb: 100,
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            admin_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1610)),
            admin_token: None,
            reconcile_interval_ms: 1000,
            retry_base_delay_ms: 1000,
            retry_max_delay_ms: 300_000,
            max_attempts: 5,
            max_body_bytes: 4 * 1024 * 1024,
            max_manifest_tables: 1000,
            max_table_columns: 1000,
            max_inline_rows: 100_000,
            max_name_len: 63,
            metrics: true,
            metrics_open: false,
            events_retention_days: 30,
            jobs_retention_days: 90,
            workers_retention_days: 7,
            retention_interval_secs: 60,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1603)),
            reconcile_interval_ms: 30_000,
            max_row_bytes: 8 * 1024 * 1024,
            metrics: true,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            heartbeat_interval_ms: 1000,
            liveness_window_ms: 5000,
            sources_dir: None,
            max_concurrent_jobs: 2,
            gc_grace_secs: 300,
            gc_interval_ms: 5000,
            reconcile_interval_ms: 5000,
            rows_per_file: 100_000,
            max_csv_record_bytes: 1024 * 1024,
            metrics_addr: None,
        }
    }
}

/// Default of `storage.data_dir`.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default of `worker.sources_dir`.
pub const DEFAULT_SOURCES_DIR: &str = "./sources";

impl MetadataDbConfig {
    /// The URL for work that needs a real session: `direct_url`, else `url`.
    pub fn session_url(&self) -> Option<&DatabaseUrl> {
        self.direct_url.as_ref().or(self.url.as_ref())
    }
}

impl StorageConfig {
    /// `data_dir`, or [`DEFAULT_DATA_DIR`] when unset.
    pub fn data_dir(&self) -> &Path {
        self.data_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_DATA_DIR))
    }
}

impl WorkerConfig {
    /// `sources_dir`, or [`DEFAULT_SOURCES_DIR`] when unset.
    pub fn sources_dir(&self) -> &Path {
        (self.sources_dir.as_deref()).unwrap_or(Path::new(DEFAULT_SOURCES_DIR))
    }
}

/// A validated `postgres://` / `postgresql://` URL whose `Display` and `Debug` hide its secrets
/// (see [`crate::redact`]); [`DatabaseUrl::expose`] gives the real URL.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

const URL_SHAPE: &str =
    "expected a URL like postgresql://host:5432/database, with user:password@ before the host";

impl DatabaseUrl {
    /// Checks that `s` is a URL with scheme `postgres` or `postgresql`. The error never contains
    /// any part of the input but a recognisable scheme.
    pub fn parse(s: &str) -> Result<DatabaseUrl, String> {
        let s = s.trim_matches(|c: char| c <= ' ');
        if s.is_empty() {
            return Err(format!("the database URL is empty; {URL_SHAPE}"));
        }
        let url = url::Url::parse(s).map_err(|e| format!("not a valid URL ({e}); {URL_SHAPE}"))?;
        let scheme = url.scheme();
        if scheme != "postgres" && scheme != "postgresql" {
            // Only echo the scheme when it visibly is one (`xyz://`): in `user:password@host` the
            // "scheme" would be the user name.
            let prefix = s.get(..scheme.len() + 3).unwrap_or_default();
            let visible =
                scheme.len() <= 16 && prefix.eq_ignore_ascii_case(&format!("{scheme}://"));
            return Err(if visible {
                format!("unsupported URL scheme `{scheme}`; expected postgres:// or postgresql://")
            } else {
                "unsupported URL; expected postgres://... or postgresql://...".to_owned()
            });
        }
        // `postgresql:/user:pw@host/db` parses as a path without an authority: refused, as libpq
        // would, instead of connecting to a default target as a default user.
        let after_scheme = &s[scheme.len() + 1..];
        if url.cannot_be_a_base() || !after_scheme.starts_with("//") {
            return Err(format!("missing `//` after the scheme; {URL_SHAPE}"));
        }
        // The user part ends at the first `@` for libpq, at the last one for a WHATWG parser: an
        // unencoded `@` (in a password) means two different URLs.
        let authority = after_scheme[2..]
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        if authority.matches('@').count() > 1 {
            return Err(format!(
                "the user part holds an unencoded `@` (write it as %40); {URL_SHAPE}"
            ));
        }
        Ok(DatabaseUrl(s.to_owned()))
    }

    /// The real URL, secrets included: for connecting only, never for output.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password and secret query parameters replaced by `***`.
    pub fn redacted(&self) -> String {
        redact::redact_url(&self.0)
    }

    /// The percent-decoded database name (the URL path), `None` if absent.
    pub fn database(&self) -> Option<String> {
        let url = url::Url::parse(&self.0).ok()?;
        let name = url.path().trim_start_matches('/');
        (!name.is_empty()).then(|| redact::decode(name))
    }

    /// The percent-decoded user name, `None` if absent.
    pub fn username(&self) -> Option<String> {
        let url = url::Url::parse(&self.0).ok()?;
        (!url.username().is_empty()).then(|| redact::decode(url.username()))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        DatabaseUrl::parse(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// Where a configuration came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Origin {
    /// A config file, overlaid by the environment.
    File(PathBuf),
    /// The environment alone.
    #[default]
    Environment,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Environment => f.write_str("environment"),
        }
    }
}

/// Why the configuration could not be loaded. Every message is one line that names the key and
/// the file or variable (or the position of a syntax error), and contains no secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file is missing or unreadable.
    #[error("cannot read config file {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The config file is not valid TOML (or not UTF-8); `position` is 1-based (line, column).
    #[error("{origin}: invalid TOML{}: {message}", at_position(.position))]
    Syntax {
        origin: Origin,
        position: Option<(usize, usize)>,
        message: String,
    },
    /// The file has a section or key the daemon does not know.
    #[error("{origin}: unknown key `{key}`")]
    UnknownKey { origin: Origin, key: String },
    /// A value in the file has the wrong type or cannot be used.
    #[error("{origin}: invalid value for `{key}`: {message}")]
    InvalidValue {
        origin: Origin,
        key: String,
        message: String,
    },
    /// A required key is set neither in the file nor in the environment.
    #[error("{origin}: missing required key `{key}` (set it {})", set_it(.origin, .var))]
    MissingKey {
        origin: Origin,
        key: String,
        var: String,
    },
    /// An `AMP_CONFIG_*` variable names no known section and key.
    #[error("environment variable {var}: unknown config key `{key}`")]
    UnknownEnvKey { var: String, key: String },
    /// An `AMP_CONFIG_*` variable's value has the wrong type or cannot be used.
    #[error("environment variable {var}: invalid value for `{key}`: {message}")]
    InvalidEnvValue {
        var: String,
        key: String,
        message: String,
    },
    /// An `AMP_CONFIG_*` variable's name or value is not valid UTF-8.
    #[error("environment variable {var}: value is not valid UTF-8")]
    EnvNotUnicode { var: String },
    /// Two variables differing only in letter case set the same key.
    #[error("environment variables {first} and {second} both set `{key}`; keep one")]
    ConflictingEnv {
        first: String,
        second: String,
        key: String,
    },
    /// Values out of range or inconsistent with each other: every problem, `; `-separated.
    #[error("{origin}: {message}")]
    Invalid { origin: Origin, message: String },
}

fn at_position(position: &Option<(usize, usize)>) -> String {
    let at = |(line, column)| format!(" at line {line}, column {column}");
    position.map(at).unwrap_or_default()
}

fn set_it(origin: &Origin, var: &str) -> String {
    match origin {
        Origin::File(_) => format!("in the file or with {var}"),
        Origin::Environment => format!("with {var}"),
    }
}

impl Config {
    /// Reads the config file at `path` and applies the `AMP_CONFIG_*` variables of the process.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let origin = Origin::File(path.to_owned());
        let text = load::utf8(&origin, bytes)?;
        load::build(origin, &text, load::process_env()?)
    }

    /// Defaults and the `AMP_CONFIG_*` variables of the process, without a file: errors name only
    /// the variables.
    pub fn from_env() -> Result<Config, ConfigError> {
        load::build(Origin::Environment, "", load::process_env()?)
    }

    /// The configuration of the file `text` (as read from `path`, which only appears in messages)
    /// under the environment `env`, in which variables not starting with `AMP_CONFIG_` are ignored.
    /// Pure: for tests and tools.
    pub fn from_parts(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        load::build(
            Origin::File(path.to_owned()),
            text,
            env.into_iter().collect(),
        )
    }

    /// `metadata_db.url`, or the error every command but `solo` reports when it is unset.
    pub fn require_url(&self) -> Result<&DatabaseUrl, ConfigError> {
        let missing = || ConfigError::MissingKey {
            origin: self.origin.clone(),
            key: "metadata_db.url".to_owned(),
            var: load::env_var("metadata_db", "url"),
        };
        self.metadata_db.url.as_ref().ok_or_else(missing)
    }

    /// Every secret in the configuration (URL passwords, secret URL parameters, the admin token),
    /// for [`redact::register`].
    pub fn secrets(&self) -> Vec<String> {
        let db = &self.metadata_db;
        let urls =
            (db.url.iter().chain(&db.direct_url).chain(&db.shadow_url)).map(DatabaseUrl::expose);
        let token = self.controller.admin_token.iter().map(Secret::expose);
        let mut secrets: Vec<String> = urls.flat_map(redact::url_secrets).collect();
        secrets.extend(token.map(str::to_owned));
        secrets
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::redact_url;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const PATH: &str = "/etc/ampd/ampd.toml";
    const URL: &str = "postgresql://amp:hunter2@db.example:5432/amp";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_parts(Path::new(PATH), text, env(pairs))
    }

    fn load_err(text: &str, pairs: &[(&str, &str)]) -> String {
        match load(text, pairs) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert_names_key_or_position(&msg);
                msg
            }
        }
    }

    /// What docs/configuration.md promises of every message: one line that names the file or the
    /// variable, and the key (in backticks) or, for a syntax error, the line and column.
    fn assert_names_key_or_position(msg: &str) {
        assert!(
            !msg.contains('\n') && !msg.contains('\r'),
            "multi-line: {msg:?}"
        );
        let sources = [
            format!("config file {PATH}: "),
            "environment: ".to_owned(),
            "environment variable AMP_CONFIG_".to_owned(),
            "environment variables AMP_CONFIG_".to_owned(),
        ];
        assert!(
            sources.iter().any(|s| msg.starts_with(s.as_str())),
            "names neither the file nor a variable: {msg}"
        );
        if let Some((_, rest)) = msg.split_once(": invalid TOML") {
            let position = rest
                .strip_prefix(" at line ")
                .and_then(|r| r.split_once(": "))
                .and_then(|(position, _)| position.split_once(", column "));
            let valid = |n: &str| n.parse::<usize>().is_ok_and(|n| n >= 1);
            assert!(
                position.is_some_and(|(line, column)| valid(line) && valid(column)),
                "a syntax error without its position: {msg}"
            );
        } else {
            let key = msg
                .split('`')
                .nth(1)
                .filter(|_| msg.matches('`').count() >= 2);
            assert!(key.is_some_and(|k| !k.is_empty()), "names no key: {msg}");
        }
    }

    fn with_url(rest: &str) -> String {
        format!("[metadata_db]\nurl = \"{URL}\"\n{rest}")
    }

    #[test]
    fn impact_keys_are_validated_and_the_shadow_password_is_a_secret() {
        let c = load(&with_url(""), &[]).unwrap();
        assert_eq!(c.metadata_db.impact_risky_size_mb, 100);
        assert_eq!(c.metadata_db.shadow_url, None);
        let msg = load_err(&with_url(&format!("shadow_url = \"{URL}\"\n")), &[]);
        assert!(
            msg.contains("`metadata_db.shadow_url` must not be the metadata database itself"),
            "{msg}"
        );
        let msg = load_err(&with_url("impact_risky_size_mb = 1073741825\n"), &[]);
        assert!(
            msg.contains("impact_risky_size_mb") && msg.contains("at most 1073741824"),
            "{msg}"
        );
        let c = load(
            &with_url(
                "shadow_url = \"postgresql://u:Sh4dowPw@h/shadow\"\nimpact_risky_size_mb = 0\n",
            ),
            &[],
        )
        .unwrap();
        assert_eq!(c.metadata_db.impact_risky_size_mb, 0);
        assert!(c.secrets().iter().any(|s| s == "Sh4dowPw"));
        assert!(!format!("{:?}", c.metadata_db).contains("Sh4dowPw"));
    }

    #[test]
    fn defaults_applied_when_only_url_is_set() {
        let c = load(&with_url(""), &[]).unwrap();
        let db = &c.metadata_db;
        assert_eq!(c.require_url().unwrap().expose(), URL);
        assert_eq!(db.auto_migrate, None);
        assert_eq!(db.max_connections, 10);
        assert_eq!(db.min_connections, 0);
        assert_eq!(db.connect_timeout_secs, 5);
        assert_eq!(db.acquire_timeout_secs, 30);
        assert_eq!(db.idle_timeout_secs, 600);
        assert_eq!(db.migration_lock_timeout_secs, 60);
        assert_eq!(db.ddl_lock_timeout_ms, 5000);
        assert_eq!(c.worker, WorkerConfig::default());
        assert_eq!(c.worker.heartbeat_interval_ms, 1000);
        assert_eq!(c.worker.liveness_window_ms, 5000);
        assert_eq!(c.controller, ControllerConfig::default());
        assert_eq!(c.controller.reconcile_interval_ms, 1000);
        assert_eq!(c.controller.retry_base_delay_ms, 1000);
        assert_eq!(c.controller.retry_max_delay_ms, 300_000);
    }

    #[test]
    fn allow_out_of_order_is_off_unless_the_file_or_the_environment_turns_it_on() {
        assert!(
            !load(&with_url(""), &[])
                .unwrap()
                .metadata_db
                .allow_out_of_order
        );
        let on = with_url("allow_out_of_order = true\n");
        assert!(load(&on, &[]).unwrap().metadata_db.allow_out_of_order);
        let env = [("AMP_CONFIG_METADATA_DB__ALLOW_OUT_OF_ORDER", "false")];
        assert!(!load(&on, &env).unwrap().metadata_db.allow_out_of_order);
        let msg = load_err(&with_url("allow_out_of_order = \"yes\"\n"), &[]);
        assert!(msg.contains("metadata_db.allow_out_of_order"), "{msg}");
    }

    #[test]
    fn empty_sections_get_defaults() {
        let c = load(&with_url("[worker]\n[controller]\n"), &[]).unwrap();
        assert_eq!(c.worker, WorkerConfig::default());
        assert_eq!(c.controller, ControllerConfig::default());
    }

    #[test]
    fn file_values_are_read() {
        let text = with_url(
            "auto_migrate = true\nmax_connections = 20\nmin_connections = 2\n\
             connect_timeout_secs = 7\nacquire_timeout_secs = 8\nidle_timeout_secs = 9\n\
             migration_lock_timeout_secs = 11\nddl_lock_timeout_ms = 1_234\n\
             [worker]\nheartbeat_interval_ms = 200\nliveness_window_ms = 900\n\
             [controller]\nreconcile_interval_ms = 300\nretry_base_delay_ms = 50\nretry_max_delay_ms = 60\n",
        );
        let c = load(&text, &[]).unwrap();
        let db = &c.metadata_db;
        assert_eq!(db.auto_migrate, Some(true));
        assert_eq!((db.max_connections, db.min_connections), (20, 2));
        assert_eq!(
            (
                db.connect_timeout_secs,
                db.acquire_timeout_secs,
                db.idle_timeout_secs,
                db.migration_lock_timeout_secs,
                db.ddl_lock_timeout_ms
            ),
            (7, 8, 9, 11, 1234)
        );
        assert_eq!(
            c.worker,
            WorkerConfig {
                heartbeat_interval_ms: 200,
                liveness_window_ms: 900,
                ..WorkerConfig::default()
            }
        );
        assert_eq!(
            c.controller,
            ControllerConfig {
                reconcile_interval_ms: 300,
                retry_base_delay_ms: 50,
                retry_max_delay_ms: 60,
                ..ControllerConfig::default()
            }
        );
    }

    #[test]
    fn env_overrides_file_values() {
        let text = with_url(
            "max_connections = 20\nauto_migrate = true\n[worker]\nheartbeat_interval_ms = 200\n",
        );
        let c = load(
            &text,
            &[
                ("AMP_CONFIG_METADATA_DB__URL", "postgres://other@h2/db2"),
                ("AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS", "30"),
                ("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "false"),
                ("AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS", "0x10"),
                ("AMP_CONFIG_CONTROLLER__RETRY_MAX_DELAY_MS", "1_000_000"),
            ],
        )
        .unwrap();
        assert_eq!(c.require_url().unwrap().expose(), "postgres://other@h2/db2");
        assert_eq!(c.metadata_db.max_connections, 30);
        assert_eq!(c.metadata_db.auto_migrate, Some(false));
        assert_eq!(c.worker.heartbeat_interval_ms, 16);
        assert_eq!(c.controller.retry_max_delay_ms, 1_000_000);
    }

    #[test]
    fn env_url_is_taken_as_raw_string() {
        // Would be a TOML integer if interpreted as a scalar.
        let msg = load_err("", &[("AMP_CONFIG_METADATA_DB__URL", "12")]);
        assert!(msg.starts_with("environment variable AMP_CONFIG_METADATA_DB__URL: invalid value for `metadata_db.url`: "), "{msg}");
        assert!(!msg.contains("invalid type"), "{msg}");
    }

    #[test]
    fn env_variable_names_are_case_insensitive_but_may_not_conflict() {
        let c = load(
            &with_url(""),
            &[("AMP_CONFIG_metadata_db__max_connections", "3")],
        )
        .unwrap();
        assert_eq!(c.metadata_db.max_connections, 3);
        let msg = load_err(
            &with_url(""),
            &[
                ("AMP_CONFIG_metadata_db__max_connections", "3"),
                ("AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS", "4"),
            ],
        );
        assert_eq!(
            msg,
            "environment variables AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS and \
             AMP_CONFIG_metadata_db__max_connections both set `metadata_db.max_connections`; keep one"
        );
    }

    #[test]
    fn env_only_url_works_when_file_lacks_url() {
        let env_url = [("AMP_CONFIG_METADATA_DB__URL", URL)];
        for text in [
            "",
            "[metadata_db]\nmax_connections = 4\n",
            "[worker]\nheartbeat_interval_ms = 10\n",
        ] {
            let c = load(text, &env_url).unwrap();
            assert_eq!(c.require_url().unwrap().expose(), URL, "{text:?}");
        }
        assert_eq!(
            load("[metadata_db]\nmax_connections = 4\n", &env_url)
                .unwrap()
                .metadata_db
                .max_connections,
            4
        );
    }

    #[test]
    fn unknown_key_in_file_is_rejected() {
        assert_eq!(
            load_err(&with_url("foo = 1\n"), &[]),
            format!("config file {PATH}: unknown key `metadata_db.foo`")
        );
        assert_eq!(
            load_err(&with_url("[nope]\nx = 1\n"), &[]),
            format!("config file {PATH}: unknown key `nope`")
        );
        assert_eq!(
            load_err(&with_url("[worker]\n\"odd\\nkey\" = 1\n"), &[]),
            format!("config file {PATH}: unknown key `worker.\"odd\\nkey\"`")
        );
        assert_eq!(
            load_err(&format!("top = 1\n{}", with_url("")), &[]),
            format!("config file {PATH}: unknown key `top`")
        );
    }

    #[test]
    fn section_that_is_not_a_table_is_rejected() {
        assert_eq!(
            load_err(&with_url("[[worker]]\n"), &[]),
            format!(
                "config file {PATH}: invalid value for `worker`: expected a table (`[worker]`), found array"
            )
        );
    }

    #[test]
    fn unknown_key_in_env_is_rejected() {
        let text = with_url("");
        assert_eq!(
            load_err(&text, &[("AMP_CONFIG_NOPE__X", "1")]),
            "environment variable AMP_CONFIG_NOPE__X: unknown config key `nope.x`"
        );
        assert_eq!(
            load_err(&text, &[("AMP_CONFIG_METADATA_DB__FOO", "1")]),
            "environment variable AMP_CONFIG_METADATA_DB__FOO: unknown config key `metadata_db.foo`"
        );
        assert_eq!(
            load_err(&text, &[("AMP_CONFIG_METADATA_DB", "1")]),
            "environment variable AMP_CONFIG_METADATA_DB: unknown config key `metadata_db`"
        );
        assert_eq!(
            load_err(&text, &[("AMP_CONFIG_METADATA_DB_URL", URL)]),
            "environment variable AMP_CONFIG_METADATA_DB_URL: unknown config key `metadata_db_url`"
        );
    }

    #[test]
    fn amp_config_path_variable_is_not_an_override() {
        let c = load(
            &with_url(""),
            &[
                ("AMP_CONFIG", "/etc/ampd/ampd.toml"),
                ("AMP_CONFIGURATION", "x"),
                ("OTHER__VAR", "y"),
            ],
        )
        .unwrap();
        assert_eq!(c.metadata_db.max_connections, 10);
    }

    #[test]
    fn wrong_type_in_file_names_key() {
        let msg = load_err(&with_url("max_connections = \"many\"\n"), &[]);
        assert!(
            msg.starts_with(&format!(
                "config file {PATH}: invalid value for `metadata_db.max_connections`: "
            )),
            "{msg}"
        );
        assert!(msg.contains("u32"), "{msg}");

        let msg = load_err(&with_url("max_connections = -1\n"), &[]);
        assert!(msg.contains("`metadata_db.max_connections`"), "{msg}");

        let msg = load_err(&with_url("[worker]\nliveness_window_ms = true\n"), &[]);
        assert!(
            msg.contains("invalid value for `worker.liveness_window_ms`"),
            "{msg}"
        );

        let msg = load_err("[metadata_db]\nurl = 5\n", &[]);
        assert!(msg.contains("invalid value for `metadata_db.url`"), "{msg}");
    }

    #[test]
    fn wrong_type_in_env_names_variable_and_key() {
        let msg = load_err(
            &with_url(""),
            &[("AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS", "lots")],
        );
        assert!(
            msg.starts_with(
                "environment variable AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS: invalid value for `metadata_db.max_connections`: "
            ),
            "{msg}"
        );
        let msg = load_err(
            &with_url(""),
            &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "yes")],
        );
        assert!(
            msg.starts_with(
                "environment variable AMP_CONFIG_METADATA_DB__AUTO_MIGRATE: invalid value for `metadata_db.auto_migrate`: "
            ),
            "{msg}"
        );
    }

    #[test]
    fn missing_url_is_reported_with_env_hint() {
        let expected = format!(
            "config file {PATH}: missing required key `metadata_db.url` (set it in the file or with AMP_CONFIG_METADATA_DB__URL)"
        );
        for text in ["[metadata_db]\nmax_connections = 3\n", ""] {
            let config = load(text, &[]).unwrap();
            assert_eq!(config.metadata_db.url, None);
            let msg = config.require_url().unwrap_err().to_string();
            assert_names_key_or_position(&msg);
            assert_eq!(msg, expected);
        }
    }

    #[test]
    fn a_url_with_an_empty_authority_is_kept_for_libpq_defaults() {
        for url in [
            "postgresql:///db",
            "postgresql://%2Fvar%2Frun%2Fpostgresql/db",
        ] {
            assert_eq!(DatabaseUrl::parse(url).unwrap().expose(), url);
        }
    }

    #[test]
    fn bad_url_is_rejected_without_password() {
        for (url, why) in [
            ("mysql://u:hunter2@h/db", "unsupported URL scheme `mysql`"),
            (
                "postgresql://u:hunter2@h:notaport/db",
                "invalid port number",
            ),
            ("u:hunter2@h/db", "unsupported URL"),
            ("hunter2", "not a valid URL"),
            ("postgresql:hunter2", "missing `//`"),
            ("postgresql:/u:hunter2@h/db", "missing `//`"),
            ("postgres:/", "missing `//`"),
            ("postgresql://u:hun@ter2@h/db", "unencoded `@`"),
            ("postgresql://u:hunter2@my host/db", "not a valid URL"),
            ("", "empty"),
        ] {
            let msg = load_err(&format!("[metadata_db]\nurl = \"{url}\"\n"), &[]);
            assert!(
                msg.starts_with(&format!(
                    "config file {PATH}: invalid value for `metadata_db.url`: "
                )),
                "{msg}"
            );
            assert!(msg.contains(why), "{url}: {msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
        let msg = load_err("", &[("AMP_CONFIG_METADATA_DB__URL", "http://u:hunter2@h")]);
        assert!(
            msg.starts_with("environment variable AMP_CONFIG_METADATA_DB__URL: invalid value for `metadata_db.url`: "),
            "{msg}"
        );
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn malformed_toml_names_line_and_column() {
        let msg = load_err(
            "[metadata_db]\nurl = \"postgresql://h/db\"\nmax_connections = = 3\n",
            &[],
        );
        assert!(
            msg.starts_with(&format!(
                "config file {PATH}: invalid TOML at line 3, column 19: "
            )),
            "{msg}"
        );
        let msg = load_err("[metadata_db\n", &[]);
        assert!(msg.contains("invalid TOML at line 1, column "), "{msg}");
    }

    #[test]
    fn duplicate_key_is_a_toml_error() {
        let msg = load_err(&with_url("url = \"postgresql://h/x\"\n"), &[]);
        assert!(msg.contains("invalid TOML at line 3"), "{msg}");
    }

    #[test]
    fn validation_names_the_keys() {
        let msg = load_err(&with_url("min_connections = 11\n"), &[]);
        assert_eq!(
            msg,
            format!(
                "config file {PATH}: `metadata_db.min_connections` (11) must not be greater than `metadata_db.max_connections` (10)"
            )
        );
        let msg = load_err(
            &with_url(""),
            &[("AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS", "0")],
        );
        assert!(
            msg.contains("`metadata_db.max_connections` (0, set by AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS) must be at least 1"),
            "{msg}"
        );
        for key in [
            "connect_timeout_secs",
            "acquire_timeout_secs",
            "ddl_lock_timeout_ms",
        ] {
            let msg = load_err(&with_url(&format!("{key} = 0\n")), &[]);
            assert!(
                msg.contains(&format!("`metadata_db.{key}` (0) must be at least 1")),
                "{msg}"
            );
        }
        let msg = load_err(&with_url("ddl_lock_timeout_ms = 2147483648\n"), &[]);
        assert!(
            msg.contains(
                "`metadata_db.ddl_lock_timeout_ms` (2147483648) must be at most 2147483647"
            ),
            "{msg}"
        );
        let msg = load_err(&with_url("[worker]\nheartbeat_interval_ms = 5000\n"), &[]);
        assert!(
            msg.contains("`worker.liveness_window_ms` (5000) must be greater than `worker.heartbeat_interval_ms` (5000)"),
            "{msg}"
        );
        let msg = load_err(
            &with_url("[controller]\nretry_base_delay_ms = 10\nretry_max_delay_ms = 9\n"),
            &[],
        );
        assert!(
            msg.contains("`controller.retry_max_delay_ms` (9) must not be less than `controller.retry_base_delay_ms` (10)"),
            "{msg}"
        );
        let msg = load_err(
            &with_url("[controller]\nreconcile_interval_ms = 0\nretry_base_delay_ms = 0\n"),
            &[],
        );
        assert!(
            msg.contains("`controller.reconcile_interval_ms` (0) must be at least 1"),
            "{msg}"
        );
        assert!(
            msg.contains("; `controller.retry_base_delay_ms` (0) must be at least 1"),
            "{msg}"
        );
        let msg = load_err(
            &with_url("min_connections = 6\n"),
            &[("AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS", "5")],
        );
        assert_eq!(
            msg,
            format!(
                "config file {PATH}: `metadata_db.min_connections` (6) must not be greater than \
                 `metadata_db.max_connections` (5, set by AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS)"
            )
        );
        // Zero where zero makes sense is fine.
        load(
            &with_url("idle_timeout_secs = 0\nmigration_lock_timeout_secs = 0\n"),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn redacts_percent_encoded_password() {
        let raw = "postgresql://user:p%40ss%3Aw%2Frd@host:5432/db";
        let url = DatabaseUrl::parse(raw).unwrap();
        assert_eq!(url.expose(), raw);
        assert_eq!(url.redacted(), "postgresql://user:***@host:5432/db");
        assert_eq!(url.to_string(), "postgresql://user:***@host:5432/db");
        assert_eq!(format!("{url:?}"), "\"postgresql://user:***@host:5432/db\"");
        assert_eq!(redact_url(raw), "postgresql://user:***@host:5432/db");
        assert_eq!(url.username().as_deref(), Some("user"));
    }

    #[test]
    fn redacts_unicode_password() {
        let raw = "postgresql://user:pässwörd✓@host/db";
        let url = DatabaseUrl::parse(raw).unwrap();
        for shown in [
            url.redacted(),
            url.to_string(),
            format!("{url:?}"),
            redact_url(raw),
        ] {
            assert!(shown.contains("user:***@host/db"), "{shown}");
            assert!(
                !shown.contains("pässwörd") && !shown.contains("p%C3%A4ss"),
                "{shown}"
            );
        }
    }

    #[test]
    fn url_without_password_is_unchanged() {
        for raw in [
            "postgresql://user@host/db",
            "postgres://host",
            "postgresql:///db?host=/run/pg",
        ] {
            assert_eq!(DatabaseUrl::parse(raw).unwrap().redacted(), raw);
            assert_eq!(redact_url(raw), raw);
        }
    }

    #[test]
    fn password_query_parameter_is_redacted() {
        let url =
            DatabaseUrl::parse("postgresql://host/db?sslmode=require&password=hunter2").unwrap();
        assert_eq!(
            url.redacted(),
            "postgresql://host/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("not a url password=hunter2&x=1"),
            "not a url password=***&x=1"
        );
    }

    #[test]
    fn database_and_username_are_percent_decoded() {
        let url =
            DatabaseUrl::parse("postgresql://us%20er%C3%BC:pw@host/my%2Fdb%20%E2%9C%93").unwrap();
        assert_eq!(url.username().as_deref(), Some("us erü"));
        assert_eq!(url.database().as_deref(), Some("my/db ✓"));
        let bare = DatabaseUrl::parse("postgres://host").unwrap();
        assert_eq!(bare.username(), None);
        assert_eq!(bare.database(), None);
        assert_eq!(
            DatabaseUrl::parse("postgres://host/").unwrap().database(),
            None
        );
    }

    #[test]
    fn debug_of_config_never_shows_password() {
        let c = load(&with_url(""), &[]).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("amp:***@db.example"), "{debug}");
    }

    #[test]
    fn messages_never_contain_password_for_malformed_input() {
        let cases = [
            // Missing closing quote: toml would quote this line.
            "[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h/db\n",
            // Password-bearing URL as a wrong-typed value.
            "[metadata_db]\nurl = \"postgresql://h/db\"\nmax_connections = \"postgresql://u:S3cr3tPw@h/db\"\n",
            // Password with a quote and spaces, escaped in TOML.
            "[metadata_db]\nurl = \"postgresql://h/db\"\nmax_connections = \"postgresql://u:S3cr3tPw \\\" x@h/db\"\n",
            // As an unknown key.
            "[metadata_db]\n\"postgresql://u:S3cr3tPw@h\" = 1\n",
            // As a duplicate key.
            "[metadata_db]\n\"postgresql://u:S3cr3tPw@h\" = 1\n\"postgresql://u:S3cr3tPw@h\" = 2\n",
            // Wrong scheme / bad port.
            "[metadata_db]\nurl = \"mysql://u:S3cr3tPw@h/db\"\n",
            "[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h:port/db\"\n",
            // Unescaped slash in the password.
            "[metadata_db]\nurl = \"postgresql://u:S3cr/3tPw@h/db\"\n",
            // Password as a query parameter in a wrong-typed value.
            "[metadata_db]\nurl = \"postgresql://h/db\"\nmin_connections = \"postgresql://h/db?password=S3cr3tPw\"\n",
            // In an array.
            "[metadata_db]\nurl = \"postgresql://h/db\"\nmax_connections = [\"postgresql://u:S3cr3tPw@h\"]\n",
        ];
        for text in cases {
            let msg = load_err(text, &[]);
            assert!(
                !msg.contains("S3cr3tPw") && !msg.contains("3tPw"),
                "{text:?} -> {msg}"
            );
        }
        let msg = load_err(
            &with_url(""),
            &[(
                "AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS",
                "postgresql://u:S3cr3tPw \" x@h/db",
            )],
        );
        assert!(!msg.contains("S3cr3tPw"), "{msg}");
        assert!(
            msg.starts_with("environment variable AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS: "),
            "{msg}"
        );
    }

    #[test]
    fn load_reports_unreadable_file() {
        let path = std::env::temp_dir().join(format!(
            "ampd-config-test-missing-{}.toml",
            std::process::id()
        ));
        let err = Config::load(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(
            msg.starts_with(&format!("cannot read config file {}: ", path.display())),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn load_reports_non_utf8_file() {
        let path = std::env::temp_dir().join(format!(
            "ampd-config-test-latin1-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, b"[metadata_db]\nurl = \"postgresql://h/d\xe9\"\n").unwrap();
        let result = Config::load(&path);
        let _ = std::fs::remove_file(&path);
        let msg = result.unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "config file {}: invalid TOML at line 2, column 24: the file is not valid UTF-8",
                path.display()
            )
        );
    }

    /// The keys serde accepts at the top level (`None`) or in a section, read from its
    /// `deny_unknown_fields` message.
    fn serde_fields(section: Option<&str>) -> Vec<String> {
        let text = match section {
            None => "zzz_unknown = 1\n".to_owned(),
            Some(s) => format!("[{s}]\nzzz_unknown = 1\n"),
        };
        let err = toml::from_str::<Config>(&text).unwrap_err();
        let message = err.message().replace(" or ", ", ");
        // serde says "expected `a`", "expected `a`, `b`" or "expected one of `a`, `b`, `c`".
        let list = message
            .split_once("expected ")
            .unwrap_or_else(|| panic!("{message}"))
            .1;
        let list = list.strip_prefix("one of ").unwrap_or(list);
        list.split(", ")
            .map(|k| k.trim_matches('`').to_owned())
            .collect()
    }

    /// The configuration reference's block (the ```toml block under `## Keys` in
    /// docs/configuration.md), with the optional keys it shows commented out enabled.
    fn documented_config() -> String {
        let reference = include_str!("../../docs/configuration.md");
        let block = reference
            .split_once("\n## Keys\n")
            .and_then(|(_, rest)| rest.split_once("```toml\n"))
            .and_then(|(_, rest)| rest.split_once("```"))
            .expect("docs/configuration.md has a ```toml block under ## Keys")
            .0;
        block
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.split_once(" = ").is_some() => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_configuration_reference_documents_every_key_with_its_default() {
        let text = documented_config();
        let mut documented: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('[') {
                section = name.trim_end_matches(']').to_owned();
                documented.entry(section.clone()).or_default();
            } else if let Some((key, _)) = line.split_once(" = ") {
                let keys = documented
                    .get_mut(&section)
                    .expect("a key inside a section");
                keys.push(key.to_owned());
            }
        }
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let sections = documented.keys().cloned().collect::<Vec<_>>();
        assert_eq!(sections, sorted(serde_fields(None)));
        for (section, keys) in &documented {
            assert_eq!(
                sorted(keys.clone()),
                sorted(serde_fields(Some(section))),
                "[{section}]"
            );
        }

        // Every value shown is the default, apart from the keys that have none.
        let mut c = load(&text, &[]).unwrap();
        assert!(c.metadata_db.url.is_some() && c.metadata_db.direct_url.is_some());
        assert!(c.metadata_db.shadow_url.is_some());
        assert!(c.controller.admin_token.is_some());
        assert_eq!(c.storage.data_dir(), Path::new(DEFAULT_DATA_DIR));
        assert_eq!(c.worker.sources_dir(), Path::new(DEFAULT_SOURCES_DIR));
        (c.metadata_db.url, c.metadata_db.direct_url) = (None, None);
        c.metadata_db.shadow_url = None;
        c.metadata_db.auto_migrate = None;
        c.controller.admin_token = None;
        c.storage.data_dir = None;
        c.worker.sources_dir = None;
        c.worker.metrics_addr = None;
        assert_eq!(c.metadata_db, MetadataDbConfig::default());
        assert_eq!(c.controller, ControllerConfig::default());
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(c.worker, WorkerConfig::default());
        assert_eq!(c.storage, StorageConfig::default());
    }

    #[test]
    fn new_keys_default_as_documented() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.metadata_db.direct_url, None);
        assert_eq!(c.metadata_db.session_url(), None);
        assert_eq!(c.controller.admin_addr.to_string(), "127.0.0.1:1610");
        assert!(c.controller.admin_token.is_none());
        assert_eq!(c.controller.max_attempts, 5);
        assert_eq!(c.controller.max_body_bytes, 4_194_304);
        assert_eq!(c.server.addr.to_string(), "127.0.0.1:1603");
        assert_eq!(c.storage.data_dir, None);
        assert_eq!(c.storage.data_dir(), Path::new("./data"));
        assert_eq!(c.server.reconcile_interval_ms, 30_000);
        let w = &c.worker;
        assert_eq!(w.sources_dir, None);
        assert_eq!(w.sources_dir(), Path::new("./sources"));
        assert_eq!(w.max_concurrent_jobs, 2);
        assert_eq!(w.gc_grace_secs, 300);
        assert_eq!(w.gc_interval_ms, 5000);
        assert_eq!(w.reconcile_interval_ms, 5000);
        assert_eq!(w.rows_per_file, 100_000);
    }

    #[test]
    fn new_keys_are_read_from_the_file_and_the_environment() {
        let text = with_url(
            "direct_url = \"postgresql://amp:Dir3ctPw@primary:5432/amp\"\n\
             [controller]\nadmin_addr = \"0.0.0.0:9000\"\nmax_attempts = 3\nmax_body_bytes = 10\n\
             [server]\naddr = \"[::1]:9001\"\nreconcile_interval_ms = 7\n\
             [worker]\nsources_dir = \"src\"\nmax_concurrent_jobs = 8\ngc_grace_secs = 0\n\
             gc_interval_ms = 9\nreconcile_interval_ms = 11\nrows_per_file = 12\n",
        );
        let c = load(
            &text,
            &[
                // Read as TOML numbers first, but these keys want text.
                ("AMP_CONFIG_CONTROLLER__ADMIN_TOKEN", "12345"),
                ("AMP_CONFIG_STORAGE__DATA_DIR", "2024"),
                ("AMP_CONFIG_SERVER__ADDR", "127.0.0.1:7"),
            ],
        )
        .unwrap();
        let session = c.metadata_db.session_url().unwrap();
        assert_eq!(
            session.expose(),
            "postgresql://amp:Dir3ctPw@primary:5432/amp"
        );
        assert_eq!(c.require_url().unwrap().expose(), URL);
        assert_eq!(c.controller.admin_addr.to_string(), "0.0.0.0:9000");
        assert_eq!(c.controller.admin_token.as_ref().unwrap().expose(), "12345");
        assert_eq!(
            (c.controller.max_attempts, c.controller.max_body_bytes),
            (3, 10)
        );
        assert_eq!(c.server.addr.to_string(), "127.0.0.1:7");

        assert_eq!(c.server.reconcile_interval_ms, 7);
        let w = &c.worker;
        assert_eq!(c.storage.data_dir(), Path::new("2024"));
        assert_eq!(w.sources_dir(), Path::new("src"));
        assert_eq!((w.max_concurrent_jobs, w.gc_grace_secs), (8, 0));
        assert_eq!(
            (w.gc_interval_ms, w.reconcile_interval_ms, w.rows_per_file),
            (9, 11, 12)
        );
    }

    #[test]
    fn new_keys_are_validated_at_load() {
        for key in [
            "controller.max_attempts",
            "controller.max_body_bytes",
            "server.reconcile_interval_ms",
            "worker.max_concurrent_jobs",
            "worker.gc_interval_ms",
            "worker.reconcile_interval_ms",
            "worker.rows_per_file",
        ] {
            let (section, name) = key.split_once('.').unwrap();
            let msg = load_err(&with_url(&format!("[{section}]\n{name} = 0\n")), &[]);
            assert_eq!(
                msg,
                format!("config file {PATH}: `{key}` (0) must be at least 1")
            );
        }
        for key in [
            "storage.data_dir",
            "worker.sources_dir",
            "controller.admin_token",
        ] {
            let (section, name) = key.split_once('.').unwrap();
            let msg = load_err(&with_url(&format!("[{section}]\n{name} = \"\"\n")), &[]);
            assert_eq!(
                msg,
                format!("config file {PATH}: `{key}` must not be empty")
            );
        }
        let msg = load_err(&with_url(""), &[("AMP_CONFIG_CONTROLLER__ADMIN_TOKEN", "")]);
        assert_eq!(
            msg,
            format!(
                "config file {PATH}: `controller.admin_token` (set by AMP_CONFIG_CONTROLLER__ADMIN_TOKEN) must not be empty"
            )
        );
        for (key, value) in [
            ("controller.admin_addr", "localhost:1610"),
            ("server.addr", "1603"),
        ] {
            let (section, name) = key.split_once('.').unwrap();
            let msg = load_err(
                &with_url(&format!("[{section}]\n{name} = \"{value}\"\n")),
                &[],
            );
            assert!(
                msg.starts_with(&format!("config file {PATH}: invalid value for `{key}`: ")),
                "{msg}"
            );
        }
        let msg = load_err(&with_url("direct_url = \"mysql://u:Dir3ctPw@h/db\"\n"), &[]);
        assert!(
            msg.contains("invalid value for `metadata_db.direct_url`"),
            "{msg}"
        );
        assert!(!msg.contains("Dir3ctPw"), "{msg}");
        let msg = load_err(&with_url("[worker]\ngc_grace_secs = -1\n"), &[]);
        assert!(
            msg.contains("invalid value for `worker.gc_grace_secs`"),
            "{msg}"
        );
    }

    #[test]
    fn migration_lock_timeout_has_an_upper_bound() {
        let c = load(&with_url("migration_lock_timeout_secs = 86400\n"), &[]).unwrap();
        assert_eq!(c.metadata_db.migration_lock_timeout_secs, 86_400);
        let msg = load_err(&with_url("migration_lock_timeout_secs = 86401\n"), &[]);
        assert_eq!(
            msg,
            format!(
                "config file {PATH}: `metadata_db.migration_lock_timeout_secs` (86401) must be at most 86400 (one day)"
            )
        );
        let msg = load_err(
            &with_url(""),
            &[(
                "AMP_CONFIG_METADATA_DB__MIGRATION_LOCK_TIMEOUT_SECS",
                "1000000",
            )],
        );
        assert!(
            msg.contains("(1000000, set by AMP_CONFIG_METADATA_DB__MIGRATION_LOCK_TIMEOUT_SECS) must be at most 86400"),
            "{msg}"
        );
    }

    #[test]
    fn a_number_where_a_number_is_wanted_keeps_its_typed_complaint() {
        let msg = load_err(
            &with_url(""),
            &[("AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS", "1.5")],
        );
        assert!(
            msg.starts_with("environment variable AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS: invalid value for `worker.heartbeat_interval_ms`: invalid type: floating point"),
            "{msg}"
        );
    }

    #[test]
    fn environment_alone_builds_a_config_whose_errors_name_only_variables() {
        let env_only = |pairs: &[(&str, &str)]| load::build(Origin::Environment, "", env(pairs));
        let c = env_only(&[]).unwrap();
        assert_eq!(c.metadata_db, MetadataDbConfig::default());
        assert_eq!(
            c.require_url().unwrap_err().to_string(),
            "environment: missing required key `metadata_db.url` (set it with AMP_CONFIG_METADATA_DB__URL)"
        );
        let c = env_only(&[("AMP_CONFIG_METADATA_DB__URL", URL)]).unwrap();
        assert_eq!(c.require_url().unwrap().expose(), URL);

        let cases = [
            (
                ("AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS", "0"),
                "environment: `worker.heartbeat_interval_ms` (0, set by AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS) must be at least 1",
            ),
            (
                ("AMP_CONFIG_WORKER__NOPE", "1"),
                "environment variable AMP_CONFIG_WORKER__NOPE: unknown config key `worker.nope`",
            ),
            (
                ("AMP_CONFIG_SERVER__ADDR", "nowhere"),
                "environment variable AMP_CONFIG_SERVER__ADDR: invalid value for `server.addr`: ",
            ),
        ];
        for ((var, value), expected) in cases {
            let msg = env_only(&[(var, value)]).unwrap_err().to_string();
            assert_names_key_or_position(&msg);
            assert!(msg.starts_with(expected), "{msg}");
            assert!(!msg.contains("config file"), "{msg}");
        }
    }

    #[test]
    fn secrets_of_the_config_are_listed_and_never_shown() {
        let text = with_url(
            "direct_url = \"postgresql://amp:Dir3ctPw@primary/amp?sslpassword=K3yPass\"\n\
             [controller]\nadmin_token = \"T0kenS3cret\"\n",
        );
        let c = load(&text, &[]).unwrap();
        let secrets = c.secrets();
        for secret in ["hunter2", "Dir3ctPw", "K3yPass", "T0kenS3cret"] {
            assert!(
                secrets.iter().any(|s| s == secret),
                "{secret} in {secrets:?}"
            );
        }
        let debug = format!("{c:?}");
        for secret in ["hunter2", "Dir3ctPw", "K3yPass", "T0kenS3cret"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("sslpassword=***"), "{debug}");
        assert!(debug.contains("admin_token: Some(***)"), "{debug}");

        // The token is a secret in messages about other keys too.
        for (text, pairs) in [
            (
                with_url(
                    "[controller]\nadmin_token = \"T0kenS3cret\"\nmax_attempts = \"T0kenS3cret\"\n",
                ),
                vec![],
            ),
            (
                with_url("[controller]\nmax_attempts = \"T0kenS3cret\"\n"),
                vec![("AMP_CONFIG_CONTROLLER__ADMIN_TOKEN", "T0kenS3cret")],
            ),
        ] {
            let msg = load_err(&text, &pairs);
            assert!(msg.contains("`controller.max_attempts`"), "{msg}");
            assert!(!msg.contains("T0kenS3cret"), "{msg}");
        }
    }

    #[test]
    fn secret_query_parameters_are_redacted_and_listed() {
        let raw = "postgresql://u:pw@h/db?sslmode=require&sslpassword=K3y%2FPass&passfile=/etc/pgpass&sslkey=/k";
        let url = DatabaseUrl::parse(raw).unwrap();
        assert_eq!(
            url.to_string(),
            "postgresql://u:***@h/db?sslmode=require&sslpassword=***&passfile=/etc/pgpass&sslkey=/k"
        );
        assert_eq!(redact::url_secrets(raw), ["pw", "K3y%2FPass"]);
    }

    fn planted_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h/db\"\n"),
            Just("url = \"postgresql://u:S3cr3tPw@h/db\n"),
            Just("[metadata_db]\nmax_connections = \"postgres://S3cr3tPw:S3cr3tPw@h\"\n"),
            Just("[metadata_db]\n\"postgresql://u:S3cr3tPw@h\" = 1\n"),
            Just("[metadata_db]\nurl = 'mysql://u:S3cr3tPw@h/db'\n"),
            Just("[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h:port/db\"\n"),
            Just("[worker]\nheartbeat_interval_ms = [\"postgresql://u:S3cr3tPw@h\"]\n"),
            Just("[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h/db\"\nurl = 1\n"),
            Just("[metadata_db]\nurl = \"postgresql://h/db?sslpassword=S3cr3tPw\"\nmax_connections = \"x\"\n"),
            Just("[metadata_db]\ndirect_url = \"postgresql://u:S3cr3tPw@h/db\"\n[worker]\nrows_per_file = 0\n"),
            Just("[controller]\nadmin_token = \"S3cr3tPw\"\nmax_attempts = \"S3cr3tPw\"\n"),
            Just("[storage]\ndata_dir = \"\"\n[controller]\nadmin_token = 'S3cr3tPw'\n"),
        ]
        .prop_map(str::to_owned)
    }

    fn env_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9]{1,6}",
            Just("true".to_owned()),
            Just("postgresql://u:S3cr3tPw@h/db".to_owned()),
            (any::<String>(), any::<String>())
                .prop_map(|(a, b)| format!("{a}postgresql://u:S3cr3tPw@{b}")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_input_never_panics_nor_leaks_password(
            prefix in proptest::collection::vec(any::<u8>(), 0..120),
            planted in planted_text(),
            suffix in proptest::collection::vec(any::<u8>(), 0..120),
            wrap in any::<bool>(),
            url in proptest::option::of(env_value()),
            max in proptest::option::of(env_value()),
            auto in proptest::option::of(env_value()),
            heartbeat in proptest::option::of(env_value()),
            token in proptest::option::of(env_value()),
            data_dir in proptest::option::of(env_value()),
            unknown in proptest::option::of(env_value()),
        ) {
            let text = if wrap {
                format!(
                    "{}{planted}{}",
                    String::from_utf8_lossy(&prefix),
                    String::from_utf8_lossy(&suffix)
                )
            } else {
                planted
            };
            let mut env = Vec::new();
            for (name, value) in [
                ("AMP_CONFIG_METADATA_DB__URL", url),
                ("AMP_CONFIG_METADATA_DB__MAX_CONNECTIONS", max),
                ("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", auto),
                ("AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS", heartbeat),
                ("AMP_CONFIG_CONTROLLER__ADMIN_TOKEN", token),
                ("AMP_CONFIG_STORAGE__DATA_DIR", data_dir),
                ("AMP_CONFIG_NOPE__X", unknown),
            ] {
                if let Some(value) = value {
                    env.push((name.to_owned(), value));
                }
            }
            let result = Config::from_parts(Path::new(PATH), &text, env);
            let msg = match result {
                Ok(config) => {
                    // The secret-bearing values never show theirs; a URL put where a path belongs
                    // is not a secret's place, but output still hides its password by its shape.
                    let db = &config.metadata_db;
                    let secret_bearing = format!("{:?}", (&db.url, &db.direct_url, &config.controller.admin_token));
                    prop_assert!(!secret_bearing.contains("S3cr3tPw"), "{}", secret_bearing);
                    let shown = redact_url(&format!("{config:?}"));
                    prop_assert!(!shown.contains("S3cr3tPw"), "{}", shown);
                    match config.require_url() {
                        Ok(_) => return Ok(()),
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            assert_names_key_or_position(&msg);
            prop_assert!(!msg.contains("S3cr3tPw"), "leak: {}", msg);
        }
    }
}
