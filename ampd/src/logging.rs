//! Logging set-up: `tracing` to stderr, levels from `RUST_LOG`, as text or as JSON objects one a line
//! (`--log-format json`, `AMP_LOG_FORMAT=json`), and every line, ampd's and its libraries' alike,
//! passed through [`redact::redact`], so no level ever prints a secret (in JSON, a secret appears
//! JSON-escaped: [`redact::Secrets::add`] knows that form too).

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::EnvFilter;

use crate::redact;

/// Default levels: ampd's own progress at info, libraries' chatter only when asked for.
const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: a timestamp, the level, the message and `key=value` fields.
    #[default]
    Text,
    /// For log aggregation: one JSON object per line (`timestamp`, `level`, `fields` with the
    /// message, `target`, `span` and `spans`).
    Json,
}

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactingStderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// Stderr, through [`redact::redact`]. The formatter writes each event whole, so a secret is never
/// split across two writes.
///
/// A log line that cannot be written (stderr closed by its reader, `2>&1 | head -1`, or full) is
/// dropped: the work goes on. Reporting the failure would not reach anyone, and the subscriber's
/// own report of it (`eprintln!`) would panic half-way through a run.
struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let _ = io::stderr().write_all(redact::redact(&text).as_bytes());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}
