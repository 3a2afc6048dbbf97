//! The daemon's configuration.
//!
//! `ampd` reads one TOML file (its path comes from `--config <path>` or the
//! `AMP_CONFIG` environment variable; clap resolves that, not this module):
//!
//! ```toml
//! [metadata_db]
//! url = "postgresql://ampd:secret@db.example:5432/amp"   # required
//! # auto_migrate = true            # unset: solo mode migrates, other modes do not
//! max_connections = 10
//! min_connections = 0
//! connect_timeout_secs = 5          # total time connecting may take, retries included
//! acquire_timeout_secs = 30
//! idle_timeout_secs = 600
//! migration_lock_timeout_secs = 60  # how long `ampd migrate` waits for another migrator
//! ddl_lock_timeout_ms = 5000        # PostgreSQL `lock_timeout` for migration DDL
//!
//! [worker]                          # optional section
//! heartbeat_interval_ms = 1000
//! liveness_window_ms = 5000
//!
//! [controller]                      # optional section
//! reconcile_interval_ms = 1000
//! retry_base_delay_ms = 1000
//! retry_max_delay_ms = 300000
//! ```
//!
//! Every key can be overridden from the environment as
//! `AMP_CONFIG_<SECTION>__<KEY>` (section and key separated by a double
//! underscore), e.g. `AMP_CONFIG_METADATA_DB__URL` or
//! `AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS=500`. The environment wins over
//! the file. A variable that starts with `AMP_CONFIG_` but names no known key
//! is an error; `AMP_CONFIG` itself (the config path) is not an override.
//!
//! Every error is a single line that names the file or variable and the key,
//! and never contains the database password: passwords found in the file text
//! or in the override values are stripped from every message.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// The daemon's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[metadata_db]`: the PostgreSQL metadata database (required section).
    pub metadata_db: MetadataDbConfig,
    /// `[worker]`: worker heartbeats (optional section).
    #[serde(default)]
    pub worker: WorkerConfig,
    /// `[controller]`: the reconcile loop (optional section).
    #[serde(default)]
    pub controller: ControllerConfig,
}

/// `[metadata_db]`: how to reach and use the metadata database.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataDbConfig {
    /// `postgres://` or `postgresql://` URL (required).
    pub url: DatabaseUrl,
    /// A URL of a real session (PostgreSQL itself or a session-mode pooler) for the work that needs
    /// one: migrations and their lock, LISTEN, node-id claims. Unset: `url`.
    #[serde(default)]
    pub direct_url: Option<DatabaseUrl>,
    /// Apply pending migrations at start-up. `None` = not set: solo mode treats
    /// it as `true`, the other modes as `false`.
    #[serde(default)]
    pub auto_migrate: Option<bool>,
    /// Pool size limit, at least 1.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Connections kept open while idle; at most `max_connections`.
    #[serde(default = "default_min_connections")]
    pub min_connections: u32,
    /// Total time connecting may take, retries included; at least 1.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// How long to wait for a free pool connection; at least 1.
    #[serde(default = "default_acquire_timeout_secs")]
    pub acquire_timeout_secs: u64,
    /// Idle connections above `min_connections` are closed after this long.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// How long `ampd migrate` waits for another migrator's lock.
    #[serde(default = "default_migration_lock_timeout_secs")]
    pub migration_lock_timeout_secs: u64,
    /// PostgreSQL `lock_timeout` for migration DDL; 1 ..= 2147483647.
    #[serde(default = "default_ddl_lock_timeout_ms")]
    pub ddl_lock_timeout_ms: u64,
}

impl MetadataDbConfig {
    /// The URL of session-bound work: `direct_url`, or `url` when it is not set.
    pub fn session_url(&self) -> &DatabaseUrl {
        self.direct_url.as_ref().unwrap_or(&self.url)
    }
}

/// `[worker]`: heartbeat timing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// How often a worker records a heartbeat; at least 1.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A worker without a heartbeat for this long is dead; must exceed
    /// `heartbeat_interval_ms`.
    #[serde(default = "default_liveness_window_ms")]
    pub liveness_window_ms: u64,
}

/// `[controller]`: reconcile loop timing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Pause between reconcile passes; at least 1.
    #[serde(default = "default_reconcile_interval_ms")]
    pub reconcile_interval_ms: u64,
    /// First retry delay of the exponential back-off; at least 1.
    #[serde(default = "default_retry_base_delay_ms")]
    pub retry_base_delay_ms: u64,
    /// Back-off cap; at least `retry_base_delay_ms`.
    #[serde(default = "default_retry_max_delay_ms")]
    pub retry_max_delay_ms: u64,
}

fn default_max_connections() -> u32 {
    10
}
fn default_min_connections() -> u32 {
    0
}
fn default_connect_timeout_secs() -> u64 {
    5
}
fn default_acquire_timeout_secs() -> u64 {
    30
}
fn default_idle_timeout_secs() -> u64 {
    600
}
fn default_migration_lock_timeout_secs() -> u64 {
    60
}
fn default_ddl_lock_timeout_ms() -> u64 {
    5000
}
fn default_heartbeat_interval_ms() -> u64 {
    1000
}
fn default_liveness_window_ms() -> u64 {
    5000
}
fn default_reconcile_interval_ms() -> u64 {
    1000
}
fn default_retry_base_delay_ms() -> u64 {
    1000
}
fn default_retry_max_delay_ms() -> u64 {
    300_000
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            liveness_window_ms: default_liveness_window_ms(),
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            reconcile_interval_ms: default_reconcile_interval_ms(),
            retry_base_delay_ms: default_retry_base_delay_ms(),
            retry_max_delay_ms: default_retry_max_delay_ms(),
        }
    }
}

/// PostgreSQL's upper bound for `lock_timeout` (an `int` of milliseconds).
const MAX_PG_LOCK_TIMEOUT_MS: u64 = i32::MAX as u64;

// ---------------------------------------------------------------------------
// Database URL
// ---------------------------------------------------------------------------

/// A validated `postgres://` / `postgresql://` URL whose `Display` and `Debug`
/// never show the password; [`DatabaseUrl::expose`] gives the real URL.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Checks that `s` is a URL with scheme `postgres` or `postgresql`.
    /// The error message never contains the password (nor any other part of
    /// the input apart from a recognisable scheme).
    pub fn parse(s: &str) -> Result<DatabaseUrl, String> {
        let s = s.trim_matches(|c: char| c <= ' ');
        if s.is_empty() {
            return Err(
                "the database URL is empty; expected a URL like postgresql://host:5432/database, with user:password@ before the host"
                    .into(),
            );
        }
        let url = url::Url::parse(s).map_err(|e| {
            format!("not a valid URL ({e}); expected a URL like postgresql://host:5432/database, with user:password@ before the host")
        })?;
        let scheme = url.scheme();
        if scheme != "postgres" && scheme != "postgresql" {
            // Only echo the scheme when it is visibly one (`xyz://`): in
            // `user:password@host` the "scheme" would be the user name.
            let looks_like_scheme = scheme.len() <= 16
                && s.get(..scheme.len() + 3)
                    .is_some_and(|p| p.eq_ignore_ascii_case(&format!("{scheme}://")));
            return Err(if looks_like_scheme {
                format!("unsupported URL scheme `{scheme}`; expected postgres:// or postgresql://")
            } else {
                "unsupported URL; expected postgres://... or postgresql://...".to_owned()
            });
        }
        if url.cannot_be_a_base() {
            return Err(
                "missing `//` after the scheme; expected a URL like postgresql://host:5432/database, with user:password@ before the host"
                    .to_owned(),
            );
        }
        Ok(DatabaseUrl(s.to_owned()))
    }

    /// The real URL, password included: for connecting only, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password (and any `password=` query parameter)
    /// replaced by `***`; the user name is kept. Unchanged without a password.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// The percent-decoded database name (the URL path), `None` if absent.
    pub fn database(&self) -> Option<String> {
        let url = url::Url::parse(&self.0).ok()?;
        let name = url.path().trim_start_matches('/');
        (!name.is_empty()).then(|| percent_decode(name))
    }

    /// The percent-decoded user name, `None` if absent.
    pub fn username(&self) -> Option<String> {
        let url = url::Url::parse(&self.0).ok()?;
        let user = url.username();
        (!user.is_empty()).then(|| percent_decode(user))
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
        let s = String::deserialize(deserializer)?;
        DatabaseUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Redacts the password of any URL-ish string (see [`DatabaseUrl::redacted`]).
/// If `s` does not parse as a URL, anything between `://user:` and the last
/// `@` before the host (and any `password=` value) is replaced by `***`.
/// Never panics.
pub fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        // Without a host there is no userinfo: whatever looks like one is text.
        Ok(url) if url.has_host() => {
            let out = redact_parsed(&url).unwrap_or_else(|| s.to_owned());
            // A second URL hidden in the path or query: fall back to text.
            if out.matches("://").count() > 1 {
                redact_text(&out)
            } else {
                out
            }
        }
        _ => redact_text(s),
    }
}

/// `Some(redacted serialisation)` if `url` carries a password, `None` if
/// there is nothing to hide.
fn redact_parsed(url: &url::Url) -> Option<String> {
    let mut out = url.clone();
    let mut changed = false;
    if url.password().is_some() {
        if out.set_password(Some("***")).is_err() {
            return Some(redact_text(url.as_str()));
        }
        changed = true;
    }
    if let Some(query) = url.query() {
        let mut query_changed = false;
        let parts: Vec<String> = query
            .split('&')
            .map(|part| {
                let key = part.split('=').next().unwrap_or("");
                if percent_decode(&key.replace('+', " ")).eq_ignore_ascii_case("password") {
                    query_changed = true;
                    format!("{key}=***")
                } else {
                    part.to_owned()
                }
            })
            .collect();
        if query_changed {
            out.set_query(Some(&parts.join("&")));
            changed = true;
        }
    }
    changed.then(|| out.to_string())
}

/// Ends the authority part of a URL found in free text.
fn ends_url_in_text(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>')
}

/// Textual redaction for free text that may contain URLs: for every `://`,
/// the part between the first `:` and the last `@` of the following word
/// becomes `***`; so does every `password=` value.
fn redact_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut cursor = 0;
    while let Some(rel) = s[cursor..].find("://") {
        let start = cursor + rel + 3;
        let region_end = s[start..]
            .find(ends_url_in_text)
            .map_or(s.len(), |i| start + i);
        let region = &s[start..region_end];
        let userinfo = region
            .rfind('@')
            .and_then(|at| region[..at].find(':').map(|colon| (colon, at)));
        match userinfo {
            Some((colon, at)) => {
                out.push_str(&s[cursor..start + colon + 1]);
                out.push_str("***");
                out.push_str(&s[start + at..region_end]);
            }
            None => out.push_str(&s[cursor..region_end]),
        }
        cursor = region_end;
    }
    out.push_str(&s[cursor..]);
    redact_password_params(&out)
}

const PASSWORD_PARAM: &str = "password=";

fn ends_password_param(c: char) -> bool {
    c.is_whitespace() || matches!(c, '&' | '"' | '\'' | '`' | '#' | ';')
}

/// Replaces the value of every `password=` (any case) by `***`.
fn redact_password_params(s: &str) -> String {
    // ASCII lower-casing keeps byte offsets.
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut cursor = 0;
    while let Some(rel) = lower[cursor..].find(PASSWORD_PARAM) {
        let start = cursor + rel + PASSWORD_PARAM.len();
        let end = s[start..]
            .find(ends_password_param)
            .map_or(s.len(), |i| start + i);
        out.push_str(&s[cursor..start]);
        if end > start {
            out.push_str("***");
        }
        cursor = end;
    }
    out.push_str(&s[cursor..]);
    out
}

/// Percent-decodes `s` (invalid escapes are kept, invalid UTF-8 replaced).
fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why the configuration could not be loaded. Every message is one line and
/// never contains the database password.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file is missing or unreadable.
    #[error("cannot read config file {}: {error}", .path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the operating system reported.
        error: std::io::Error,
    },
    /// The config file is not valid TOML (or not UTF-8).
    #[error("config file {}: invalid TOML{}: {message}", .path.display(), at_position(.position))]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// 1-based line and column (in characters) of the problem, if known.
        position: Option<(usize, usize)>,
        /// What is wrong there.
        message: String,
    },
    /// The file has a section or key the daemon does not know.
    #[error("config file {}: unknown key `{key}`", .path.display())]
    UnknownKey {
        /// The config file.
        path: PathBuf,
        /// Dotted key path, e.g. `metadata_db.foo`.
        key: String,
    },
    /// A value in the file has the wrong type or cannot be used.
    #[error("config file {}: invalid value for `{key}`: {message}", .path.display())]
    InvalidValue {
        /// The config file.
        path: PathBuf,
        /// Dotted key path, e.g. `metadata_db.max_connections`.
        key: String,
        /// What was expected.
        message: String,
    },
    /// A required key is set neither in the file nor in the environment.
    #[error("config file {}: missing required key `{key}` (set it in the file or with {var})", .path.display())]
    MissingKey {
        /// The config file.
        path: PathBuf,
        /// Dotted key path: `metadata_db.url`.
        key: String,
        /// The environment variable that can set it.
        var: String,
    },
    /// An `AMP_CONFIG_*` variable names no known section/key.
    #[error("environment variable {var}: unknown config key `{key}`")]
    UnknownEnvKey {
        /// The variable's name.
        var: String,
        /// The key it would set, e.g. `nope.x`.
        key: String,
    },
    /// An `AMP_CONFIG_*` variable's value has the wrong type or cannot be used.
    #[error("environment variable {var}: invalid value for `{key}`: {message}")]
    InvalidEnvValue {
        /// The variable's name.
        var: String,
        /// The key it sets.
        key: String,
        /// What was expected.
        message: String,
    },
    /// An `AMP_CONFIG_*` variable's value is not valid UTF-8.
    #[error("environment variable {var}: value is not valid UTF-8")]
    EnvNotUnicode {
        /// The variable's name (lossily decoded).
        var: String,
    },
    /// Two variables differing only in letter case set the same key.
    #[error("environment variables {first} and {second} both set `{key}`; keep one")]
    ConflictingEnv {
        /// One variable.
        first: String,
        /// The other.
        second: String,
        /// The key both set.
        key: String,
    },
    /// The values are well-typed but inconsistent or out of range
    /// (e.g. `min_connections > max_connections`, a zero timeout).
    #[error("config file {}: {message}", .path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Which key(s) and why; overrides name their variable.
        message: String,
    },
}

fn at_position(position: &Option<(usize, usize)>) -> String {
    match position {
        Some((line, column)) => format!(" at line {line}, column {column}"),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------
// Schema and loading
// ---------------------------------------------------------------------------

const ENV_PREFIX: &str = "AMP_CONFIG_";

/// How an environment value is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Always the raw string.
    Str,
    /// A TOML bool/integer/float if it parses as one, else a string.
    Scalar,
}

/// Every section and key; kept equal to the structs' fields (tested).
const SCHEMA: &[(&str, &[(&str, Kind)])] = &[
    (
        "metadata_db",
        &[
            ("url", Kind::Str),
            ("direct_url", Kind::Str),
            ("auto_migrate", Kind::Scalar),
            ("max_connections", Kind::Scalar),
            ("min_connections", Kind::Scalar),
            ("connect_timeout_secs", Kind::Scalar),
            ("acquire_timeout_secs", Kind::Scalar),
            ("idle_timeout_secs", Kind::Scalar),
            ("migration_lock_timeout_secs", Kind::Scalar),
            ("ddl_lock_timeout_ms", Kind::Scalar),
        ],
    ),
    (
        "worker",
        &[
            ("heartbeat_interval_ms", Kind::Scalar),
            ("liveness_window_ms", Kind::Scalar),
        ],
    ),
    (
        "controller",
        &[
            ("reconcile_interval_ms", Kind::Scalar),
            ("retry_base_delay_ms", Kind::Scalar),
            ("retry_max_delay_ms", Kind::Scalar),
        ],
    ),
];

fn schema_section(name: &str) -> Option<(&'static str, &'static [(&'static str, Kind)])> {
    SCHEMA.iter().copied().find(|(section, _)| *section == name)
}

fn schema_key(section: &str, key: &str) -> Option<(&'static str, &'static str, Kind)> {
    let (section, keys) = schema_section(section)?;
    keys.iter()
        .find(|(k, _)| *k == key)
        .map(|&(k, kind)| (section, k, kind))
}

fn env_var_name(section: &str, key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}__{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

/// Which environment variable set a key.
type Origins = BTreeMap<(&'static str, &'static str), String>;

impl Config {
    /// Reads the config file at `path` and applies the `AMP_CONFIG_*`
    /// overrides from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let valid = std::str::from_utf8(valid).unwrap_or_default();
                return Err(ConfigError::Syntax {
                    path: path.to_owned(),
                    position: Some(line_col(valid, valid.len())),
                    message: "the file is not valid UTF-8".to_owned(),
                });
            }
        };
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let name_lossy = name.to_string_lossy();
            if !name_lossy.starts_with(ENV_PREFIX) {
                continue;
            }
            match (name.into_string(), value.into_string()) {
                (Ok(name), Ok(value)) => env.push((name, value)),
                (name, _) => {
                    let var = name.unwrap_or_else(|n| n.to_string_lossy().into_owned());
                    return Err(ConfigError::EnvNotUnicode {
                        var: one_line(&var, MAX_KEY_CHARS),
                    });
                }
            }
        }
        Config::from_parts(path, &text, env)
    }

    /// Builds the configuration from the file's `text` (as read from `path`,
    /// which is only used in messages) and the environment `env`; variables
    /// not starting with `AMP_CONFIG_` are ignored. Pure: for tests.
    pub fn from_parts(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        env.sort();

        let mut sanitizer = Sanitizer::default();
        sanitizer.add_text(text);
        for (_, value) in &env {
            sanitizer.add_text(value);
        }

        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    position: e.span().map(|span| line_col(text, span.start)),
                    message: sanitizer.clean(e.message(), MAX_MESSAGE_CHARS),
                })?;
        for (key, value) in &table {
            sanitizer.add_text(key);
            sanitizer.add_value(value);
        }

        check_structure(path, &table, &sanitizer)?;
        let origins = apply_env(&mut table, &env, &sanitizer)?;

        let has_url = matches!(table.get("metadata_db"), Some(toml::Value::Table(t)) if t.contains_key("url"));
        if !has_url {
            return Err(ConfigError::MissingKey {
                path: path.to_owned(),
                key: "metadata_db.url".to_owned(),
                var: env_var_name("metadata_db", "url"),
            });
        }

        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| value_error(path, &e, &origins, &sanitizer))?;
        validate(path, &config, &origins)?;
        Ok(config)
    }
}

/// Rejects unknown sections/keys and sections that are not tables.
fn check_structure(path: &Path, table: &toml::Table, san: &Sanitizer) -> Result<(), ConfigError> {
    for (name, value) in table {
        let Some((_, keys)) = schema_section(name) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key: san.clean(&display_key(&[name]), MAX_KEY_CHARS),
            });
        };
        let toml::Value::Table(section) = value else {
            return Err(ConfigError::InvalidValue {
                path: path.to_owned(),
                key: name.clone(),
                message: format!("expected a table (`[{name}]`), found {}", value.type_str()),
            });
        };
        if let Some(key) = section
            .keys()
            .find(|k| !keys.iter().any(|(known, _)| known == k))
        {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key: san.clean(&display_key(&[name, key]), MAX_KEY_CHARS),
            });
        }
    }
    Ok(())
}

/// Applies the `AMP_CONFIG_*` variables (already filtered and sorted) to
/// `table`, returning which variable set which key.
fn apply_env(
    table: &mut toml::Table,
    env: &[(String, String)],
    san: &Sanitizer,
) -> Result<Origins, ConfigError> {
    let mut origins = Origins::new();
    for (var, raw) in env {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let (section, key) = match rest.split_once("__") {
            Some((section, key)) => (section, Some(key)),
            None => (rest.as_str(), None),
        };
        let Some((section, key, kind)) = key.and_then(|key| schema_key(section, key)) else {
            let shown = match key {
                Some(key) => format!("{section}.{key}"),
                None => section.to_owned(),
            };
            return Err(ConfigError::UnknownEnvKey {
                var: san.clean(var, MAX_KEY_CHARS),
                key: san.clean(&shown, MAX_KEY_CHARS),
            });
        };
        if let Some(first) = origins.insert((section, key), var.clone()) {
            return Err(ConfigError::ConflictingEnv {
                first: san.clean(&first, MAX_KEY_CHARS),
                second: san.clean(var, MAX_KEY_CHARS),
                key: format!("{section}.{key}"),
            });
        }
        let value = match kind {
            Kind::Str => toml::Value::String(raw.clone()),
            Kind::Scalar => env_scalar(raw),
        };
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        // `check_structure` made sure every known section is a table.
        if let toml::Value::Table(section_table) = entry {
            section_table.insert(key.to_owned(), value);
        }
    }
    Ok(origins)
}

/// An environment value as a TOML bool/integer/float if it is one, else a string.
fn env_scalar(raw: &str) -> toml::Value {
    match raw.parse::<toml::Value>() {
        Ok(v @ (toml::Value::Boolean(_) | toml::Value::Integer(_) | toml::Value::Float(_))) => v,
        _ => toml::Value::String(raw.to_owned()),
    }
}

/// Maps a typed-deserialisation error to the file or the variable that set the key.
fn value_error(
    path: &Path,
    err: &serde_path_to_error::Error<toml::de::Error>,
    origins: &Origins,
    san: &Sanitizer,
) -> ConfigError {
    let keys: Vec<String> = err
        .path()
        .iter()
        .map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => key.clone(),
            other => other.to_string(),
        })
        .collect();
    let message = san.clean(err.inner().message(), MAX_MESSAGE_CHARS);
    let key = san.clean(&display_key(&keys), MAX_KEY_CHARS);
    let origin = match keys.as_slice() {
        [section, key] => {
            schema_key(section, key).and_then(|(section, key, _)| origins.get(&(section, key)))
        }
        _ => None,
    };
    match origin {
        Some(var) => ConfigError::InvalidEnvValue {
            var: var.clone(),
            key,
            message,
        },
        None => ConfigError::InvalidValue {
            path: path.to_owned(),
            key,
            message,
        },
    }
}

/// Range and consistency checks; all problems in one line.
fn validate(path: &Path, config: &Config, origins: &Origins) -> Result<(), ConfigError> {
    // "`section.key` (value)", or "(value, set by VAR)" for an override.
    let named =
        |section: &'static str, key: &'static str, value: u64| match origins.get(&(section, key)) {
            Some(var) => format!("`{section}.{key}` ({value}, set by {var})"),
            None => format!("`{section}.{key}` ({value})"),
        };
    let db = &config.metadata_db;
    let worker = &config.worker;
    let controller = &config.controller;
    let mut problems = Vec::new();

    let must_be_positive = [
        (
            "metadata_db",
            "max_connections",
            u64::from(db.max_connections),
        ),
        (
            "metadata_db",
            "connect_timeout_secs",
            db.connect_timeout_secs,
        ),
        (
            "metadata_db",
            "acquire_timeout_secs",
            db.acquire_timeout_secs,
        ),
        ("metadata_db", "ddl_lock_timeout_ms", db.ddl_lock_timeout_ms),
        (
            "worker",
            "heartbeat_interval_ms",
            worker.heartbeat_interval_ms,
        ),
        (
            "controller",
            "reconcile_interval_ms",
            controller.reconcile_interval_ms,
        ),
        (
            "controller",
            "retry_base_delay_ms",
            controller.retry_base_delay_ms,
        ),
    ];
    for (section, key, value) in must_be_positive {
        if value < 1 {
            problems.push(format!("{} must be at least 1", named(section, key, value)));
        }
    }
    if db.ddl_lock_timeout_ms > MAX_PG_LOCK_TIMEOUT_MS {
        problems.push(format!(
            "{} must be at most {MAX_PG_LOCK_TIMEOUT_MS} (PostgreSQL's limit for lock_timeout)",
            named("metadata_db", "ddl_lock_timeout_ms", db.ddl_lock_timeout_ms),
        ));
    }
    if db.min_connections > db.max_connections {
        problems.push(format!(
            "{} must not be greater than {}",
            named("metadata_db", "min_connections", db.min_connections.into()),
            named("metadata_db", "max_connections", db.max_connections.into()),
        ));
    }
    if worker.liveness_window_ms <= worker.heartbeat_interval_ms {
        problems.push(format!(
            "{} must be greater than {}",
            named("worker", "liveness_window_ms", worker.liveness_window_ms),
            named(
                "worker",
                "heartbeat_interval_ms",
                worker.heartbeat_interval_ms
            ),
        ));
    }
    if controller.retry_max_delay_ms < controller.retry_base_delay_ms {
        problems.push(format!(
            "{} must not be less than {}",
            named(
                "controller",
                "retry_max_delay_ms",
                controller.retry_max_delay_ms
            ),
            named(
                "controller",
                "retry_base_delay_ms",
                controller.retry_base_delay_ms
            ),
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            message: problems.join("; "),
        })
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// A dotted key path; segments that are not bare TOML keys are quoted.
fn display_key<S: AsRef<str>>(segments: &[S]) -> String {
    segments
        .iter()
        .map(|segment| {
            let segment = segment.as_ref();
            let bare = !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if bare {
                segment.to_owned()
            } else {
                format!("{segment:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

const MAX_KEY_CHARS: usize = 200;
const MAX_MESSAGE_CHARS: usize = 500;
const MAX_SECRETS: usize = 1000;
const MAX_SECRET_LEN: usize = 4096;

/// Collects password candidates from the input and strips them from the
/// input-derived parts of messages.
#[derive(Default)]
struct Sanitizer {
    secrets: BTreeSet<String>,
}

impl Sanitizer {
    /// Collects every possible URL password in `text`: for each `://`, what
    /// lies between the first `:` and each `@` on the rest of its line; and
    /// every `password=` value.
    fn add_text(&mut self, text: &str) {
        let mut search = 0;
        while let Some(rel) = text[search..].find("://") {
            let start = search + rel + 3;
            search = start;
            let line_end = text[start..]
                .find(['\n', '\r'])
                .map_or(text.len(), |i| start + i);
            let region = &text[start..line_end];
            if let Some(colon) = region.find(':') {
                for (at, _) in region.match_indices('@').filter(|(at, _)| *at > colon) {
                    self.add_secret(&region[colon + 1..at]);
                }
            }
        }
        let lower = text.to_ascii_lowercase();
        let mut search = 0;
        while let Some(rel) = lower[search..].find(PASSWORD_PARAM) {
            let start = search + rel + PASSWORD_PARAM.len();
            search = start;
            let end = text[start..]
                .find(ends_password_param)
                .map_or(text.len(), |i| start + i);
            self.add_secret(&text[start..end]);
        }
    }

    /// Collects candidates from every string and key inside `value`.
    fn add_value(&mut self, value: &toml::Value) {
        match value {
            toml::Value::String(s) => self.add_text(s),
            toml::Value::Array(items) => items.iter().for_each(|v| self.add_value(v)),
            toml::Value::Table(table) => {
                for (key, value) in table {
                    self.add_text(key);
                    self.add_value(value);
                }
            }
            _ => {}
        }
    }

    fn add_secret(&mut self, secret: &str) {
        if secret.is_empty() || secret.len() > MAX_SECRET_LEN || self.secrets.len() >= MAX_SECRETS {
            return;
        }
        let decoded = percent_decode(secret);
        for variant in [
            secret.escape_debug().to_string(),
            decoded.escape_debug().to_string(),
            decoded,
            secret.to_owned(),
        ] {
            if !variant.is_empty() {
                self.secrets.insert(variant);
            }
        }
    }

    /// `s` without any collected password, URL password or control
    /// character, shortened to `max_chars`.
    fn clean(&self, s: &str, max_chars: usize) -> String {
        let mut secrets: Vec<&String> = self.secrets.iter().collect();
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        let mut out = s.to_owned();
        for secret in secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        one_line(&redact_text(&out), max_chars)
    }
}

/// Control characters and line separators become spaces; at most `max_chars`.
fn one_line(s: &str, max_chars: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                ' '
            } else {
                c
            }
        })
        .take(max_chars + 1)
        .collect();
    if out.chars().count() > max_chars {
        out = out.chars().take(max_chars).collect();
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
                assert!(
                    !msg.contains('\n') && !msg.contains('\r'),
                    "multi-line: {msg:?}"
                );
                msg
            }
        }
    }

    fn with_url(rest: &str) -> String {
        format!("[metadata_db]\nurl = \"{URL}\"\n{rest}")
    }

    #[test]
    fn defaults_applied_when_only_url_is_set() {
        let c = load(&with_url(""), &[]).unwrap();
        let db = &c.metadata_db;
        assert_eq!(db.url.expose(), URL);
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
                liveness_window_ms: 900
            }
        );
        assert_eq!(
            c.controller,
            ControllerConfig {
                reconcile_interval_ms: 300,
                retry_base_delay_ms: 50,
                retry_max_delay_ms: 60
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
        assert_eq!(c.metadata_db.url.expose(), "postgres://other@h2/db2");
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
            assert_eq!(c.metadata_db.url.expose(), URL, "{text:?}");
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
        assert_eq!(
            load_err("[metadata_db]\nmax_connections = 3\n", &[]),
            expected
        );
        assert_eq!(load_err("", &[]), expected);
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
    fn redact_url_falls_back_to_text_for_unparseable_input() {
        assert_eq!(
            redact_url("postgresql://u:pa/ss@host/db"),
            "postgresql://u:***@host/db"
        );
        assert_eq!(
            redact_url("postgresql://u:p@ss@h:x/db"),
            "postgresql://u:***@h:x/db"
        );
        assert_eq!(
            redact_url("see postgresql://u:secret@h:bad now"),
            "see postgresql://u:***@h:bad now"
        );
        assert_eq!(redact_url("no url here"), "no url here");
        for s in ["", "://", ":///@", "a://:@", "x://é:ü@", "://@:"] {
            let _ = redact_url(s);
        }
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

    /// The keys that serde accepts, read from its `deny_unknown_fields` message.
    fn serde_fields(section: Option<&str>) -> Vec<String> {
        let text = match section {
            None => "zzz_unknown = 1\n".to_owned(),
            Some(s) => format!("[{s}]\nzzz_unknown = 1\n"),
        };
        let err = match section {
            None => toml::from_str::<Config>(&text).unwrap_err(),
            Some("metadata_db") => {
                toml::from_str::<MetadataDbConfig>("zzz_unknown = 1").unwrap_err()
            }
            Some("worker") => toml::from_str::<WorkerConfig>("zzz_unknown = 1").unwrap_err(),
            Some("controller") => {
                toml::from_str::<ControllerConfig>("zzz_unknown = 1").unwrap_err()
            }
            Some(other) => panic!("unexpected section {other}"),
        };
        let message = err.message().to_owned();
        let message = message.replace(" or ", ", ");
        let list = message
            .split_once("expected one of ")
            .or_else(|| message.split_once("expected "))
            .unwrap_or_else(|| panic!("{message}"))
            .1;
        list.split(", ")
            .map(|k| k.trim_matches('`').to_owned())
            .collect()
    }

    #[test]
    fn schema_lists_exactly_the_struct_fields() {
        let sections: Vec<String> = SCHEMA.iter().map(|(s, _)| (*s).to_owned()).collect();
        assert_eq!(serde_fields(None), sections);
        for (section, keys) in SCHEMA {
            let keys: Vec<String> = keys.iter().map(|(k, _)| (*k).to_owned()).collect();
            assert_eq!(serde_fields(Some(section)), keys, "[{section}]");
        }
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
                ("AMP_CONFIG_NOPE__X", unknown),
            ] {
                if let Some(value) = value {
                    env.push((name.to_owned(), value));
                }
            }
            match Config::from_parts(Path::new(PATH), &text, env) {
                Ok(config) => {
                    let debug = format!("{config:?}");
                    prop_assert!(!debug.contains("S3cr3tPw"), "{}", debug);
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(!msg.contains('\n') && !msg.contains('\r'), "multi-line: {:?}", msg);
                    prop_assert!(!msg.contains("S3cr3tPw"), "leak: {}", msg);
                }
            }
        }

        #[test]
        fn redact_url_never_panics_nor_leaks(
            a in any::<String>(),
            b in any::<String>(),
        ) {
            let s = format!("{a}postgresql://u:S3cr3tPw@{b}");
            let _ = redact_url(&a);
            let red = redact_url(&s);
            // A user name/host part may legitimately hold the letters; the
            // password slot right after `u:` never does.
            prop_assert!(!red.contains("u:S3cr3tPw@"), "{}", red);
        }
    }
}
