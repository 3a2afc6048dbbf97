//! A server program run under a watchdog that stops it when its owner goes, however it goes.
//!
//! The watchdog is a shell in a process group of its own (so a Ctrl-C at the terminal reaches the
//! owner, which stops its own work first and the server last). It starts the program in the
//! background, prints its pid, and reads its standard input, a pipe whose write end only the owner
//! holds. When the owner closes it ([`Watchdog::stop`]) or dies (even by `kill -9`), the read ends:
//! the watchdog sends the stop signal, forces an immediate stop (SIGQUIT) after the stop timeout
//! and kills the program (SIGKILL) five seconds later, waits until it has exited, and then removes
//! the throw-away directory it was given, if any.
//!
//! The program and its arguments reach the shell as positional parameters, never as script text,
//! so no path or setting is ever quoted or interpreted. As a background job of the shell, the
//! program starts with SIGINT and SIGQUIT ignored: PostgreSQL and PgBouncer set their own handlers;
//! a program that keeps them ignored is killed once the stop timeout and 5 s have passed.

use std::ffi::OsString;
use std::io::BufRead as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long after the forced stop (SIGQUIT) the watchdog kills the program (SIGKILL).
const KILL_AFTER_QUIT: Duration = Duration::from_secs(5);
/// How often the watchdog looks whether the program has exited while it stops.
const TICK: Duration = Duration::from_millis(50);

/// The watchdog's script. Its standard error is the log file (opened by ampd). Arguments: the
/// directory to remove afterwards (empty: none), the stop signal, the ticks until SIGQUIT and
/// until SIGKILL, then the program and its arguments.
const SCRIPT: &str = r#"cleanup=$1; sig=$2; quit=$3; kill=$4; shift 4
"$@" 1>&2 </dev/null &
pid=$!
echo "$pid"
cat >/dev/null
kill -"$sig" "$pid" 2>/dev/null
n=0
while kill -0 "$pid" 2>/dev/null; do
  n=$((n+1))
  [ "$n" -eq "$quit" ] && kill -QUIT "$pid" 2>/dev/null
  [ "$n" -eq "$kill" ] && kill -KILL "$pid" 2>/dev/null
  sleep 0.05
done
if [ -n "$cleanup" ]; then rm -rf -- "$cleanup"; fi
"#;

/// What [`Watchdog::start`] runs, and how it is stopped.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Run it as this user (through `setpriv`, which execs it); `None`: as this process's user.
    pub user: Option<String>,
    /// Where its standard output and error are appended.
    pub log_file: PathBuf,
    /// The signal that asks it to stop (`INT`, `TERM`).
    pub stop_signal: &'static str,
    /// How long it may take to stop before it is forced (SIGQUIT, then SIGKILL 5 s later).
    pub stop_timeout: Duration,
    /// A directory removed once it has stopped (throw-away installations).
    pub remove_after_stop: Option<PathBuf>,
}

/// A program running under its watchdog. Dropping it stops the program, as [`Watchdog::stop`]
/// does.
#[derive(Debug)]
pub struct Watchdog {
    pipe: Option<ChildStdin>,
    shell: Child,
    pid: u32,
    bound: Duration,
}

impl Watchdog {
    /// Starts `watch.program` under a watchdog, and returns once it runs (not once it is ready).
    pub fn start(watch: &Watch) -> std::io::Result<Watchdog> {
        use std::os::unix::process::CommandExt as _;
        let ticks = |d: Duration| d.as_millis().div_ceil(TICK.as_millis()).max(1);
        let quit = ticks(watch.stop_timeout);
        let kill = quit + ticks(KILL_AFTER_QUIT);
        // Opened here, not by the shell: appended to, created private, and never through a
        // symbolic link (one planted in its place would send the log, as root, anywhere).
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&watch.log_file)
            .map_err(|e| {
                let symlink = std::fs::symlink_metadata(&watch.log_file)
                    .is_ok_and(|m| m.file_type().is_symlink());
                if symlink {
                    std::io::Error::other(format!(
                        "{} is a symbolic link, which ampd does not follow: remove it",
                        watch.log_file.display()
                    ))
                } else {
                    std::io::Error::new(e.kind(), format!("open {}: {e}", watch.log_file.display()))
                }
            })?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("ampd-watchdog")
            .arg(watch.remove_after_stop.as_deref().unwrap_or(Path::new("")))
            .arg(watch.stop_signal)
            .arg(quit.to_string())
            .arg(kill.to_string());
        if let Some(user) = &watch.user {
            cmd.arg("setpriv")
                .arg(format!("--reuid={user}"))
                .arg(format!("--regid={user}"))
                .arg("--init-groups");
        }
        let mut shell = cmd
            .arg(&watch.program)
            .args(&watch.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()?;
        let pipe = shell.stdin.take();
        let mut line = String::new();
        if let Some(out) = shell.stdout.take() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        let mut watchdog = Watchdog {
            pipe,
            shell,
            pid: 0,
            bound: watch.stop_timeout + KILL_AFTER_QUIT + Duration::from_secs(5),
        };
        match line.trim().parse() {
            Ok(pid) => {
                watchdog.pid = pid;
                Ok(watchdog)
            }
            Err(_) => {
                let _ = watchdog.stop();
                Err(std::io::Error::other(format!(
                    "the watchdog of {} did not start it",
                    watch.program.display()
                )))
            }
        }
    }

    /// The program's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the program is still running.
    pub fn is_running(&self) -> bool {
        super::process::alive(self.pid)
    }

    /// Asks the program to stop and waits until it and the watchdog have exited (the watchdog
    /// forces the program after its stop timeout). Gives up after a bound a little longer than
    /// that, and says so.
    pub fn stop(mut self) -> std::io::Result<ExitStatus> {
        self.stop_and_wait()
    }

    fn stop_and_wait(&mut self) -> std::io::Result<ExitStatus> {
        drop(self.pipe.take());
        let started = Instant::now();
        loop {
            if let Some(status) = self.shell.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > self.bound {
                return Err(std::io::Error::other(format!(
                    "process {} did not stop within {} s",
                    self.pid,
                    self.bound.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.pipe.is_some() {
            let _ = self.stop_and_wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ampd-watchdog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `program args` that writes `started` to its log, stopped with `stop_signal`.
    fn watch(dir: &Path, program: &str, script: &str, stop_signal: &'static str) -> Watch {
        Watch {
            program: PathBuf::from(program),
            args: vec!["-e".into(), script.into()],
            user: None,
            log_file: dir.join("log"),
            stop_signal,
            stop_timeout: Duration::from_millis(300),
            remove_after_stop: None,
        }
    }

    fn wait_for_log(dir: &Path) {
        let started = Instant::now();
        while !std::fs::read_to_string(dir.join("log")).is_ok_and(|l| l.contains("started")) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the program logs"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops `watchdog`; how long it took. The program is gone afterwards.
    fn stop(watchdog: Watchdog) -> Duration {
        let pid = watchdog.pid();
        assert!(watchdog.is_running());
        let started = Instant::now();
        watchdog.stop().unwrap();
        assert!(!super::super::process::alive(pid));
        started.elapsed()
    }

    #[test]
    fn stopping_signals_the_program_waits_for_it_and_removes_the_directory() {
        let dir = scratch("stop");
        let throwaway = dir.join("throwaway");
        std::fs::create_dir_all(&throwaway).unwrap();
        let loop_ = "echo started; while :; do sleep 0.05; done";
        let mut watch = watch(&dir, "/bin/sh", loop_, "TERM");
        watch.args[0] = "-c".into();
        watch.remove_after_stop = Some(throwaway.clone());
        let watchdog = Watchdog::start(&watch).unwrap();
        wait_for_log(&dir);
        let took = stop(watchdog);
        assert!(
            took < Duration::from_millis(300),
            "SIGTERM stops it: {took:?}"
        );
        assert!(!throwaway.exists(), "removed after the stop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_program_that_ignores_the_stop_signal_is_forced_after_the_timeout() {
        // Like PostgreSQL, it sets its own handlers: SIGINT ignored, SIGQUIT's default (exit).
        let dir = scratch("force");
        let script = r#"$SIG{INT} = "IGNORE"; $SIG{QUIT} = "DEFAULT"; $| = 1;
            print "started\n"; select(undef, undef, undef, 0.05) while 1;"#;
        let watchdog = Watchdog::start(&watch(&dir, "perl", script, "INT")).unwrap();
        wait_for_log(&dir);
        let took = stop(watchdog);
        assert!(
            took >= Duration::from_millis(300),
            "not before the timeout: {took:?}"
        );
        assert!(took < KILL_AFTER_QUIT, "SIGQUIT ends it: {took:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_program_that_ignores_sigquit_too_is_killed() {
        // A shell's background job starts with SIGINT and SIGQUIT ignored; a program that keeps
        // them so is killed.
        let dir = scratch("kill");
        let mut watch = watch(
            &dir,
            "/bin/sh",
            "echo started; while :; do sleep 0.05; done",
            "INT",
        );
        watch.args[0] = "-c".into();
        watch.stop_timeout = Duration::from_millis(100);
        let watchdog = Watchdog::start(&watch).unwrap();
        wait_for_log(&dir);
        let took = stop(watchdog);
        assert!(
            took >= KILL_AFTER_QUIT,
            "SIGKILL comes 5 s after SIGQUIT: {took:?}"
        );
        assert!(took < KILL_AFTER_QUIT + Duration::from_secs(5), "{took:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
