//! Turning a TOML file and `AMP_CONFIG_*` variables into a checked [`Config`]: the environment
//! overlay, typed deserialisation (unknown keys refused by serde's `deny_unknown_fields`, the key
//! located by `serde_path_to_error`), ranges and relations, and messages that name the key and the
//! file or variable that set it, cleaned of every secret the input holds.

use std::collections::BTreeMap;
use std::ffi::OsStr;

use super::{Config, ConfigError, Origin};
use crate::redact::{self, Secrets};

const ENV_PREFIX: &str = "AMP_CONFIG_";
const MAX_KEY_CHARS: usize = 200;
const MAX_MESSAGE_CHARS: usize = 500;
/// PostgreSQL's upper bound for `lock_timeout` (an `int` of milliseconds).
const MAX_PG_LOCK_TIMEOUT_MS: u64 = i32::MAX as u64;
/// Upper bound of `metadata_db.migration_lock_timeout_secs`: one day.
const MAX_MIGRATION_LOCK_TIMEOUT_SECS: u64 = 86_400;
/// The largest `metadata_db.impact_risky_size_mb`: 1 PiB.
const MAX_IMPACT_RISKY_SIZE_MB: u64 = 1 << 30;

/// The variable that sets `section.key`.
pub(super) fn env_var(section: &str, key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}__{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

/// The file's bytes as text, or the position of the first byte that is not UTF-8.
pub(super) fn utf8(origin: &Origin, bytes: Vec<u8>) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let valid = std::str::from_utf8(valid).unwrap_or_default();
        ConfigError::Syntax {
            origin: origin.clone(),
            position: Some(line_col(valid, valid.len())),
            message: "the file is not valid UTF-8".to_owned(),
        }
    })
}

/// The `AMP_CONFIG_*` variables of the process.
pub(super) fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let ours =
        std::env::vars_os().filter(|(name, _)| name.to_string_lossy().starts_with(ENV_PREFIX));
    ours.map(
        |(name, value)| match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => Ok((name, value)),
            (Ok(name), Err(_)) => Err(name),
            (Err(name), _) => Err(name.to_string_lossy().into_owned()),
        },
    )
    .collect::<Result<_, _>>()
    .map_err(|var| ConfigError::EnvNotUnicode {
        var: one_line(&var, MAX_KEY_CHARS),
    })
}

/// The configuration of `text` under `env` (variables without the prefix are ignored).
pub(super) fn build(
    origin: Origin,
    text: &str,
    env: Vec<(String, String)>,
) -> Result<Config, ConfigError> {
    let mut env: Vec<_> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    env.sort();
    let mut secrets = Secrets::default();
    secrets.harvest(text);
    env.iter().for_each(|(_, value)| secrets.harvest(value));
    let file: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.clone(),
            position: e.span().map(|span| line_col(text, span.start)),
            message: clean(&secrets, e.message(), MAX_MESSAGE_CHARS),
        })?;
    file.iter()
        .for_each(|(key, value)| harvest(&mut secrets, key, value));
    let mut loader = Loader {
        origin,
        file,
        env: EnvKeys::new(),
        secrets,
    };
    let table = loader.overlay(env)?;
    let config = loader.deserialize(table)?;
    loader.validate(&config)?;
    Ok(Config {
        origin: loader.origin,
        ..config
    })
}

/// Adds to `secrets` what may be a secret in `value` (at `key`) by its shape, and the whole value
/// of a secret key.
fn harvest(secrets: &mut Secrets, key: &str, value: &toml::Value) {
    secrets.harvest(key);
    match value {
        toml::Value::String(s) if redact::is_secret_name(key) => secrets.add(s),
        toml::Value::String(s) => secrets.harvest(s),
        toml::Value::Table(table) => table.iter().for_each(|(k, v)| harvest(secrets, k, v)),
        toml::Value::Array(items) => items.iter().for_each(|v| harvest(secrets, "", v)),
        _ => {}
    }
}

/// The variables that set keys: `section.key` → (variable, value as given).
type EnvKeys = BTreeMap<String, (String, String)>;

/// What turning input into a [`Config`] needs for its messages.
struct Loader {
    origin: Origin,
    /// The file's table, before the overlay.
    file: toml::Table,
    env: EnvKeys,
    secrets: Secrets,
}

impl Loader {
    /// The file's table with the variables `env` (sorted) applied, each value read as a TOML
    /// boolean or number when it is one, else taken as a string.
    fn overlay(&mut self, env: Vec<(String, String)>) -> Result<toml::Table, ConfigError> {
        let mut table = self.file.clone();
        for (var, raw) in env {
            let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
            let Some((section, key)) = rest.split_once("__") else {
                let (var, key) = (self.clean_var(&var), self.clean_key(&rest));
                return Err(ConfigError::UnknownEnvKey { var, key });
            };
            if redact::is_secret_name(key) {
                self.secrets.add(&raw);
            }
            let value = match raw.parse::<toml::Value>() {
                Ok(v) if v.is_bool() || v.is_integer() || v.is_float() => v,
                _ => toml::Value::String(raw.clone()),
            };
            let slot = table
                .entry(section)
                .or_insert_with(|| toml::Table::new().into());
            // A file section that is not a table is reported as the file's mistake.
            if let toml::Value::Table(section_table) = slot {
                section_table.insert(key.to_owned(), value);
            }
            if let Some((first, _)) = self
                .env
                .insert(rest.replacen("__", ".", 1), (var.clone(), raw))
            {
                return Err(ConfigError::ConflictingEnv {
                    first: self.clean_var(&first),
                    second: self.clean_var(&var),
                    key: self.clean_key(&format!("{section}.{key}")),
                });
            }
        }
        Ok(table)
    }

    /// The typed configuration. A variable's value that TOML read as a boolean or number where the
    /// key wants a string (a URL, a token) is taken as the text it was.
    fn deserialize(&self, mut table: toml::Table) -> Result<Config, ConfigError> {
        let mut retried = BTreeMap::new();
        loop {
            let err = match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
                Ok(config) => return Ok(config),
                Err(err) => err,
            };
            let keys = path_keys(&err);
            let set_by = self.env.get(&keys.join("."));
            if let (Some((_, raw)), [section, key]) = (set_by, keys.as_slice())
                && err.inner().message().starts_with("invalid type")
            {
                // Not a string either: the complaint about the typed value is the clearer one.
                if let Some(first) = retried.remove(&keys) {
                    return Err(self.value_error(&first));
                }
                let slot = table.get_mut(section).and_then(|s| s.get_mut(key));
                if let Some(slot) = slot.filter(|slot| !slot.is_str()) {
                    *slot = toml::Value::String(raw.clone());
                    retried.insert(keys, err);
                    continue;
                }
            }
            return Err(self.value_error(&err));
        }
    }

    /// Maps a deserialisation error to the file or the variable that set the key.
    fn value_error(&self, err: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let keys = path_keys(err);
        let set_by = match keys.as_slice() {
            [_, _] => self.env.get_key_value(&keys.join(".")),
            // An unknown section that only a variable names.
            [section] if !self.file.contains_key(section) => {
                let in_section = |(k, _): &(&String, _)| k.split('.').next() == Some(section);
                self.env.iter().find(in_section)
            }
            _ => None,
        };
        let message = clean(&self.secrets, err.inner().message(), MAX_MESSAGE_CHARS);
        let unknown = message.starts_with("unknown field");
        // A known section that is not a table: serde may have read an array as the struct's fields.
        let not_a_table = keys
            .first()
            .and_then(|name| Some((name, self.file.get(name)?)));
        let not_a_table = not_a_table.filter(|(_, value)| !unknown && !value.is_table());
        let origin = self.origin.clone();
        match (set_by, not_a_table) {
            (_, Some((name, value))) => ConfigError::InvalidValue {
                origin,
                key: self.clean_key(name),
                message: format!("expected a table (`[{name}]`), found {}", value.type_str()),
            },
            (Some((key, (var, _))), None) if unknown => ConfigError::UnknownEnvKey {
                var: self.clean_var(var),
                key: self.clean_key(key),
            },
            // The variable of a known key holds nothing secret in its name.
            (Some((key, (var, _))), None) => ConfigError::InvalidEnvValue {
                var: var.clone(),
                key: key.clone(),
                message,
            },
            (None, None) => {
                let key = self.clean_key(&display_key(&keys));
                if unknown {
                    ConfigError::UnknownKey { origin, key }
                } else {
                    ConfigError::InvalidValue {
                        origin,
                        key,
                        message,
                    }
                }
            }
        }
    }

    /// Ranges and relations; every problem in one message.
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let mut problems = Problems {
            env: &self.env,
            found: Vec::new(),
        };
        problems.ranges(config);
        problems.relations(config);
        if problems.found.is_empty() {
            return Ok(());
        }
        let message = problems.found.join("; ");
        Err(ConfigError::Invalid {
            origin: self.origin.clone(),
            message,
        })
    }

    /// A key from the input, fit for a message.
    fn clean_key(&self, s: &str) -> String {
        clean(&self.secrets, s, MAX_KEY_CHARS)
    }

    /// An `AMP_CONFIG_*` variable's name, fit for a message.
    fn clean_var(&self, var: &str) -> String {
        let rest = var.get(ENV_PREFIX.len()..).unwrap_or_default();
        format!("{ENV_PREFIX}{}", self.clean_key(rest))
    }
}

/// Range and relation problems, each naming its keys and the variables that set them.
struct Problems<'a> {
    env: &'a EnvKeys,
    found: Vec<String>,
}

impl Problems<'_> {
    fn ranges(&mut self, config: &Config) {
        let (db, c, s, w) = (
            &config.metadata_db,
            &config.controller,
            &config.server,
            &config.worker,
        );
        self.at_least_1("metadata_db.max_connections", db.max_connections);
        self.at_least_1("metadata_db.connect_timeout_secs", db.connect_timeout_secs);
        self.at_least_1("metadata_db.acquire_timeout_secs", db.acquire_timeout_secs);
        self.at_least_1("metadata_db.ddl_lock_timeout_ms", db.ddl_lock_timeout_ms);
        self.at_least_1("worker.heartbeat_interval_ms", w.heartbeat_interval_ms);
        self.at_least_1("worker.max_concurrent_jobs", w.max_concurrent_jobs);
        self.at_least_1("worker.gc_interval_ms", w.gc_interval_ms);
        self.at_least_1("worker.reconcile_interval_ms", w.reconcile_interval_ms);
        self.at_least_1("worker.rows_per_file", w.rows_per_file);
        self.at_least_1("worker.max_csv_record_bytes", w.max_csv_record_bytes);
        self.at_least_1("controller.reconcile_interval_ms", c.reconcile_interval_ms);
        self.at_least_1("controller.retry_base_delay_ms", c.retry_base_delay_ms);
        self.at_least_1("controller.max_attempts", c.max_attempts);
        self.at_least_1("controller.max_body_bytes", c.max_body_bytes);
        self.at_least_1("controller.max_manifest_tables", c.max_manifest_tables);
        self.at_least_1("controller.max_table_columns", c.max_table_columns);
        self.at_least_1("controller.max_inline_rows", c.max_inline_rows);
        self.at_least_1("controller.max_name_len", c.max_name_len);
        self.at_most(
            ("controller.max_name_len", c.max_name_len),
            200,
            "names become directory names, at most 255 bytes",
        );
        self.at_least_1(
            "controller.retention_interval_secs",
            c.retention_interval_secs,
        );
        for retention in [
            ("controller.events_retention_days", c.events_retention_days),
            ("controller.jobs_retention_days", c.jobs_retention_days),
            (
                "controller.workers_retention_days",
                c.workers_retention_days,
            ),
        ] {
            self.at_most(retention, 36_500, "a hundred years; 0 keeps forever");
        }
        self.at_least_1("server.reconcile_interval_ms", s.reconcile_interval_ms);
        self.at_least_1("server.max_row_bytes", s.max_row_bytes);
        let h = &config.http;
        self.at_least_1("http.header_timeout_secs", h.header_timeout_secs);
        self.at_least_1("http.body_timeout_secs", h.body_timeout_secs);
        self.at_least_1("http.request_timeout_secs", h.request_timeout_secs);
        self.at_least_1("http.idle_timeout_secs", h.idle_timeout_secs);
        self.at_least_1("http.max_connections", h.max_connections);
        for (key, secs) in [
            ("http.header_timeout_secs", h.header_timeout_secs),
            ("http.body_timeout_secs", h.body_timeout_secs),
            ("http.request_timeout_secs", h.request_timeout_secs),
            ("http.idle_timeout_secs", h.idle_timeout_secs),
        ] {
            self.at_most((key, secs), MAX_MIGRATION_LOCK_TIMEOUT_SECS, "one day");
        }
        if let Some(problem) = h.allowed_hosts_problem() {
            let key = self.named("http.allowed_hosts", None);
            self.found.push(format!("{key} {problem}"));
        }
        self.at_most(
            ("storage.umask", u64::from(config.storage.umask)),
            0o777,
            "a umask has nine permission bits",
        );
        let ddl_lock = ("metadata_db.ddl_lock_timeout_ms", db.ddl_lock_timeout_ms);
        self.at_most(
            ddl_lock,
            MAX_PG_LOCK_TIMEOUT_MS,
            "PostgreSQL's limit for lock_timeout",
        );
        let lock_wait = (
            "metadata_db.migration_lock_timeout_secs",
            db.migration_lock_timeout_secs,
        );
        self.at_most(lock_wait, MAX_MIGRATION_LOCK_TIMEOUT_SECS, "one day");
        let index_wait = (
            "metadata_db.concurrent_index_timeout_secs",
            db.concurrent_index_timeout_secs,
        );
        self.at_least_1(index_wait.0, index_wait.1);
        self.at_most(index_wait, MAX_MIGRATION_LOCK_TIMEOUT_SECS, "one day");
        let statement = (
            "metadata_db.migration_statement_timeout_secs",
            db.migration_statement_timeout_secs,
        );
        self.at_least_1(statement.0, statement.1);
        self.at_most(statement, MAX_MIGRATION_LOCK_TIMEOUT_SECS, "one day");
        self.at_most(
            ("metadata_db.impact_risky_size_mb", db.impact_risky_size_mb),
            MAX_IMPACT_RISKY_SIZE_MB,
            "1 PiB",
        );
        if let Some(shadow) = &db.shadow_url
            && (db.url.as_ref() == Some(shadow) || db.direct_url.as_ref() == Some(shadow))
        {
            self.found.push(
                "`metadata_db.shadow_url` must not be the metadata database itself: `ampd migrate \
                 impact` empties the shadow database"
                    .to_owned(),
            );
        }
        self.not_empty(
            "controller.admin_token",
            c.admin_token.as_ref().map(|t| t.expose()),
        );
        self.not_empty("storage.data_dir", config.storage.data_dir.as_ref());
        self.not_empty("worker.sources_dir", w.sources_dir.as_ref());
    }

    fn relations(&mut self, config: &Config) {
        let (db, c, w) = (&config.metadata_db, &config.controller, &config.worker);
        let min = ("metadata_db.min_connections", db.min_connections.into());
        let max = ("metadata_db.max_connections", db.max_connections.into());
        self.relation(min, "must not be greater than", max, min.1 <= max.1);
        let window = ("worker.liveness_window_ms", w.liveness_window_ms);
        let interval = ("worker.heartbeat_interval_ms", w.heartbeat_interval_ms);
        self.relation(
            window,
            "must be greater than",
            interval,
            window.1 > interval.1,
        );
        let cap = ("controller.retry_max_delay_ms", c.retry_max_delay_ms);
        let base = ("controller.retry_base_delay_ms", c.retry_base_delay_ms);
        self.relation(cap, "must not be less than", base, cap.1 >= base.1);
    }

    /// "`key` (value)", "`key` (value, set by VAR)", "`key` (set by VAR)" or "`key`".
    fn named(&self, key: &str, value: Option<u64>) -> String {
        let set_by = self.env.get(key).map(|(var, _)| format!("set by {var}"));
        let notes: Vec<String> = value
            .map(|v| v.to_string())
            .into_iter()
            .chain(set_by)
            .collect();
        if notes.is_empty() {
            format!("`{key}`")
        } else {
            format!("`{key}` ({})", notes.join(", "))
        }
    }

    fn at_least_1(&mut self, key: &str, value: impl Into<u64>) {
        let value = value.into();
        if value < 1 {
            self.found.push(format!(
                "{} must be at least 1",
                self.named(key, Some(value))
            ));
        }
    }

    fn at_most(&mut self, (key, value): (&str, u64), max: u64, why: &str) {
        if value > max {
            let key = self.named(key, Some(value));
            self.found
                .push(format!("{key} must be at most {max} ({why})"));
        }
    }

    /// "`a` (x) <relation> `b` (y)" unless `holds`.
    fn relation(&mut self, (a, x): (&str, u64), relation: &str, (b, y): (&str, u64), holds: bool) {
        if !holds {
            let (a, b) = (self.named(a, Some(x)), self.named(b, Some(y)));
            self.found.push(format!("{a} {relation} {b}"));
        }
    }

    fn not_empty(&mut self, key: &str, value: Option<impl AsRef<OsStr>>) {
        if value.is_some_and(|v| v.as_ref().is_empty()) {
            self.found
                .push(format!("{} must not be empty", self.named(key, None)));
        }
    }
}

/// The path of the key an error is about, one string per segment.
fn path_keys(err: &serde_path_to_error::Error<toml::de::Error>) -> Vec<String> {
    let segment = |segment: &serde_path_to_error::Segment| match segment {
        serde_path_to_error::Segment::Map { key } => key.clone(),
        other => other.to_string(),
    };
    err.path().iter().map(segment).collect()
}

/// `s` from the input, without secrets or line breaks, at most `max_chars` long.
fn clean(secrets: &Secrets, s: &str, max_chars: usize) -> String {
    one_line(&secrets.redact(s), max_chars)
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
    (line, before[line_start..].chars().count() + 1)
}

/// A dotted key path; segments that are not bare TOML keys are quoted.
fn display_key(segments: &[String]) -> String {
    let bare = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let shown = segments.iter().map(|s| {
        if !s.is_empty() && bare(s) {
            s.clone()
        } else {
            format!("{s:?}")
        }
    });
    shown.collect::<Vec<_>>().join(".")
}

/// Control characters and line separators become spaces; at most `max_chars` characters.
fn one_line(s: &str, max_chars: usize) -> String {
    let control = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    let mut chars = s.chars().map(|c| if control(c) { ' ' } else { c });
    let mut out: String = chars.by_ref().take(max_chars).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}
