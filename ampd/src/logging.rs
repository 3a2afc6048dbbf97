//! Logging set-up: `tracing` to stderr, levels from `RUST_LOG`, and every line, ampd's and its
//! libraries' alike, passed through [`redact::redact`], so no level ever prints a secret.

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::EnvFilter;

use crate::redact;

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
