//! Running the built `ampd` as a user would: a config file in a temporary directory, the binary
//! as a child process, its exit code and output captured.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a run of the binary did.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Output {
    /// stdout and stderr together, for searching.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

fn target_dir() -> PathBuf {
    // <target>/debug/deps/<test binary> -> <target>/debug
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("profile dir").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The cargo running these tests, as a command without the variables cargo sets for a test
/// process (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). Build scripts watch some of them (ring's
/// reruns when `CARGO_MANIFEST_DIR` or `CARGO_PKG_NAME` changes), so a nested build that inherited
/// them would find those dependencies dirty next to a build from a shell, and the two would rebuild
/// ring, rustls, sqlx and sea-orm in turn, minutes each time.
pub fn cargo() -> std::process::Command {
    const SET_FOR_TESTS: [&str; 9] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    let mut cmd = std::process::Command::new(env!("CARGO"));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if SET_FOR_TESTS.contains(&key)
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Builds (if needed) and returns a binary of this workspace. Cargo makes the nested build a
/// no-op when `cargo test --workspace` already built it, and a fresh build otherwise.
fn built(package: &str, bin: &str) -> PathBuf {
    let status = cargo()
        .args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    let path = target_dir().join(bin);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The `ampd` binary.
pub fn ampd() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("ampd", "ampd"))
}

/// The `ampd` command line built around a test-only migration set (`AMPD_FIXTURE_MIGRATIONS`).
pub fn ampd_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("tests", "ampd-fixture"))
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory.
    pub fn new() -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ampd-cli-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Writes `contents` to `name` in this directory and returns its path.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write file");
        path
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config file for `url` with extra `[metadata_db]` lines.
pub fn config_toml(url: &str, extra: &str) -> String {
    format!("[metadata_db]\nurl = \"{url}\"\n{extra}\n")
}

/// Runs `bin` with `args` and extra environment `env` (any inherited `AMP_CONFIG*` and `RUST_LOG`
/// variables removed first), waiting at most `timeout`.
pub async fn run(bin: &Path, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("AMP_CONFIG") || key == "RUST_LOG" || key == "AMPD_FIXTURE_MIGRATIONS" {
            cmd.env_remove(key);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn ampd");
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {args:?} did not finish within {timeout:?}",
                bin.display()
            )
        })
        .expect("wait for ampd");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// `ampd --config <config> <args...>`, 60 s at most.
pub async fn ampd_with_config(config: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--config", config.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    run(ampd(), &all, &[], Duration::from_secs(60)).await
}
