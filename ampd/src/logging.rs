//! Logging set-up: `tracing` to stderr, levels from `RUST_LOG`, and every line passed through a
//! redactor that removes the database password, so no log level ever prints it.

use std::io::{self, IsTerminal, Write};
use std::sync::RwLock;

use tracing_subscriber::EnvFilter;

/// Strings that must never reach the terminal (the password, raw and percent-decoded).
static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Default levels: ampd's own progress at info, libraries' chatter only when asked for.
const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| RedactingStderr)
        .try_init();
}

/// Registers the password of `url` (if any) for redaction.
pub fn add_secrets_of(url: &crate::config::DatabaseUrl) {
    let Ok(parsed) = url::Url::parse(url.expose()) else {
        return;
    };
    let Some(raw) = parsed.password() else {
        return;
    };
    let mut secrets = match SECRETS.write() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    secrets.push(raw.to_owned());
    if let Ok(decoded) = percent_encoding::percent_decode_str(raw).decode_utf8()
        && decoded != raw
    {
        secrets.push(decoded.into_owned());
    }
    // Longest first, so a secret that contains another is removed whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.retain(|s| !s.is_empty());
}

/// `text` with every registered secret replaced by `***`.
pub fn redact(text: &str) -> String {
    let secrets = match SECRETS.read() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    let mut out = text.to_owned();
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out
}

struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        io::stderr().write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}
