//! What runs on a data directory: `postmaster.pid` and the processes it may name.
//!
//! PostgreSQL records its postmaster's pid in `<data>/postmaster.pid` and removes the file when it
//! stops. After a crash the file stays. PostgreSQL itself removes one whose process is gone (once it
//! has checked that no process of the old server still uses its shared memory); what it cannot tell
//! is a pid that now belongs to another process of the same user, which it takes for a running
//! server and refuses to start. So before a start, [`prepare_data_dir`]:
//!
//! - leaves a file whose process is gone to PostgreSQL;
//! - removes a file whose pid belongs to a process that is not a PostgreSQL server of this directory
//!   (its program is not `postgres`, or its working directory, which the server sets to its data
//!   directory, is elsewhere), and never signals that process;
//! - reports a server that still runs on the directory ([`PostgresError::AlreadyRunning`]);
//! - then waits (bounded) until no process of an earlier server is left on the directory (the
//!   children of a killed postmaster exit on their own, moments later), so two servers never share
//!   a directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{PostgresError, Result};

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    let Ok(pid_t) = i32::try_from(pid) else {
        return false;
    };
    if pid_t <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the process exists.
    let exists = unsafe { libc::kill(pid_t, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !zombie(pid)
}

/// Whether `pid` is a zombie (exited, not yet reaped by its parent).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) S ...`: the state follows the last `)`.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Whether the running process `pid` is a PostgreSQL server process on `data` (its program is
/// `postgres` and its working directory is `data`): `None` when that cannot be told (no `/proc`, or
/// the process belongs to a user whose processes this one may not inspect).
fn postgres_on(pid: u32, data: &Path) -> Option<bool> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let exe = std::fs::read_link(proc.join("exe")).ok()?;
    let cwd = std::fs::read_link(proc.join("cwd")).ok()?;
    let data = data.canonicalize().ok()?;
    // A program replaced while it runs shows as `postgres (deleted)`.
    let is_postgres = exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("postgres"));
    Some(is_postgres && cwd == data)
}

/// The pid `data`'s `postmaster.pid` names, if the file exists (`Some(None)`: it exists but names
/// no pid).
fn recorded_pid(pid_file: &Path) -> Result<Option<Option<u32>>> {
    match std::fs::read_to_string(pid_file) {
        Ok(text) => Ok(Some(
            text.lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(super::io(format!("read {}", pid_file.display()))(e)),
    }
}

/// Before a server is started on `data`: deals with a `postmaster.pid` left behind and waits for
/// the processes of an earlier server to be gone (see the module's documentation). A server still
/// running on `data` is [`PostgresError::AlreadyRunning`].
pub fn prepare_data_dir(data: &Path) -> Result<()> {
    let pid_file = data.join("postmaster.pid");
    match recorded_pid(&pid_file)? {
        None => {}
        Some(Some(pid)) if !alive(pid) => {
            tracing::info!(
                pid,
                "postmaster.pid names a process that is gone (the server did not stop cleanly); \
                 PostgreSQL recovers"
            );
        }
        Some(Some(pid)) => match postgres_on(pid, data) {
            Some(true) => {
                return Err(PostgresError::AlreadyRunning {
                    pid,
                    data: data.to_owned(),
                });
            }
            Some(false) => {
                tracing::warn!(
                    pid,
                    pid_file = %pid_file.display(),
                    "postmaster.pid names a running process that is not this directory's \
                     PostgreSQL (its pid was reused); removing the file, leaving the process alone"
                );
                remove(&pid_file)?;
            }
            None => return Err(PostgresError::Unverifiable { pid, pid_file }),
        },
        Some(None) => {
            tracing::warn!(pid_file = %pid_file.display(), "removing a postmaster.pid that names no process");
            remove(&pid_file)?;
        }
    }
    wait_for_leftovers(data, Duration::from_secs(30))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(super::io(format!("remove {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// The PostgreSQL processes running on `data` (empty where `/proc` cannot be read).
fn server_processes(data: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| postgres_on(pid, data) == Some(true) && !zombie(pid))
        .collect()
}

/// Waits (at most `within`) until no PostgreSQL process runs on `data`.
fn wait_for_leftovers(data: &Path, within: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let left = server_processes(data);
        if left.is_empty() {
            return Ok(());
        }
        if started.elapsed() > within {
            return Err(PostgresError::Leftovers {
                pids: left,
                data: data.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the server `pid` running on `data` (one [`prepare_data_dir`] reported): a fast shutdown
/// (SIGINT), an immediate one (SIGQUIT) after `timeout`, SIGKILL 5 s later, waiting until it is
/// gone. Before each signal it checks again that `pid` is still that server, so a process that
/// took the pid meanwhile is never signalled.
pub fn stop_server(pid: u32, data: &Path, timeout: Duration) -> Result<()> {
    let steps = [
        (libc::SIGINT, timeout),
        (libc::SIGQUIT, Duration::from_secs(5)),
        (libc::SIGKILL, Duration::from_secs(5)),
    ];
    let ours = || alive(pid) && postgres_on(pid, data) == Some(true);
    for (signal, wait) in steps {
        if !ours() {
            return Ok(());
        }
        // SAFETY: kill(2); `pid` was just checked to be the PostgreSQL server of `data`.
        unsafe { libc::kill(pid as i32, signal) };
        let sent = Instant::now();
        while ours() && sent.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if ours() {
        return Err(PostgresError::AlreadyRunning {
            pid,
            data: data.to_owned(),
        });
    }
    Ok(())
}
