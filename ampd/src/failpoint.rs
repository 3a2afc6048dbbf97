//! Failpoints: named places in the code where a test makes a process pause (or sleep), to drive an
//! interleaving that timing alone would rarely produce. Built on the `fail` crate, and only with
//! ampd's `failpoints` feature, which the `tests` crate turns on: without it [`failpoint!`]
//! expands to nothing and the `fail` crate is not linked, so a release build has no failpoint code.
//!
//! A test sets them
//! - in a spawned `ampd` process: `FAILPOINTS="name=actions;name=actions"` in its environment
//!   (the `fail` crate's syntax: `pause`, `sleep(ms)`, `off`, `1*pause->off`, ...), read at
//!   start-up ([`setup`]; the process logs `failpoints set` when it has them), and while it runs,
//!   one `name=actions` line at a time on its standard input (`name=off` releases a paused one);
//! - in the test process itself: `fail::cfg(name, actions)`.
//!
//! Every failpoint logs `failpoint reached` with its name when it is configured and reached, which
//! is what a test waits for before it acts on the paused process. A paused failpoint waits on the
//! blocking thread pool, so the rest of the process (its heartbeat, its other jobs) runs on.
//!
//! The failpoints:
//! - `worker::before_revision_dir`: a job has created a revision row and not yet its directory.

/// Pauses here when the failpoint `$name` is configured (see the [module docs](self)); nothing at
/// all in a build without the `failpoints` feature. For async code.
#[cfg(feature = "failpoints")]
macro_rules! failpoint {
    ($name:literal) => {
        $crate::failpoint::reached($name).await
    };
}

/// Pauses here when the failpoint `$name` is configured (see the [module docs](self)); nothing at
/// all in a build without the `failpoints` feature. For async code.
#[cfg(not(feature = "failpoints"))]
macro_rules! failpoint {
    ($name:literal) => {};
}

pub(crate) use failpoint;

#[cfg(feature = "failpoints")]
pub use enabled::{reached, setup};

#[cfg(feature = "failpoints")]
mod enabled {
    use std::io::BufRead;

    /// Sets the failpoints `FAILPOINTS` names (`name=actions;...`), and follows the process's
    /// standard input for more (`name=actions`, one a line) until it closes. Does nothing when
    /// `FAILPOINTS` is not set. A malformed setting is an error naming it.
    pub fn setup() -> Result<(), String> {
        let Some(spec) = std::env::var_os("FAILPOINTS") else {
            return Ok(());
        };
        let spec = spec
            .into_string()
            .map_err(|_| "FAILPOINTS is not valid UTF-8".to_owned())?;
        for setting in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            apply(setting).map_err(|e| format!("FAILPOINTS: {e}"))?;
        }
        tracing::info!(failpoints = spec, "failpoints set");
        std::thread::Builder::new()
            .name("failpoints".into())
            .spawn(|| {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { return };
                    let setting = line.trim();
                    if setting.is_empty() {
                        continue;
                    }
                    match apply(setting) {
                        Ok(()) => tracing::info!(setting, "failpoint set"),
                        Err(e) => tracing::warn!(error = e, "failpoint not set"),
                    }
                }
            })
            .map_err(|e| format!("cannot follow the failpoints on standard input: {e}"))?;
        Ok(())
    }

    /// Applies one `name=actions`.
    fn apply(setting: &str) -> Result<(), String> {
        let Some((name, actions)) = setting.split_once('=') else {
            return Err(format!("{setting:?} is not name=actions"));
        };
        fail::cfg(name.trim(), actions.trim())
            .map_err(|e| format!("failpoint {:?}: {e}", name.trim()))
    }

    /// Failpoint `name`, reached: when it is configured, logs so and evaluates it on the blocking
    /// pool (a `pause` waits there, not on the async runtime).
    pub async fn reached(name: &'static str) {
        let configured = fail::list()
            .iter()
            .any(|(n, actions)| n == name && !actions.is_empty() && actions != "off");
        if !configured {
            return;
        }
        tracing::info!(failpoint = name, "failpoint reached");
        let _ = tokio::task::spawn_blocking(move || fail::eval(name, |_| ())).await;
        tracing::info!(failpoint = name, "failpoint passed");
    }
}
