//! Running the built `ampd` as a user would: a config file in a temporary directory, the binary
//! as a child process, its exit code and output captured.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a run of the binary did. The `assert_*` methods check it and, when a check fails, print
/// the whole run (command, exit code, stdout, stderr) and point at the test's line.
#[derive(Debug)]
pub struct Output {
    /// The command line that ran, with the environment it was given, for failure messages.
    pub command: String,
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

    /// How many migrations `ampd migrate` says it applied (`applied N migration(s) in ...`); 0 when
    /// it applied none.
    pub fn applied(&self) -> usize {
        self.stdout
            .split_once("applied ")
            .and_then(|(_, rest)| rest.split_once(' '))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(0)
    }

    /// Fails the test unless `holds`, saying `what` failed and showing the whole run.
    #[track_caller]
    fn check(&self, holds: bool, what: impl FnOnce() -> String) -> &Self {
        if !holds {
            panic!(
                "{}\ncommand: {}\nexit code: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                what(),
                self.command,
                self.code
                    .map_or_else(|| "none (killed by a signal)".to_owned(), |c| c.to_string()),
                self.stdout,
                self.stderr
            );
        }
        self
    }

    /// Asserts the run exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        self.check(self.code == Some(code), || {
            format!("expected exit code {code}")
        })
    }

    /// Asserts the run exited with code 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }

    /// Asserts stdout contains `needle`.
    #[track_caller]
    pub fn assert_stdout_contains(&self, needle: impl AsRef<str>) -> &Self {
        let needle = needle.as_ref();
        self.check(self.stdout.contains(needle), || {
            format!("stdout does not contain {needle:?}")
        })
    }

    /// Asserts stderr contains `needle`.
    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: impl AsRef<str>) -> &Self {
        let needle = needle.as_ref();
        self.check(self.stderr.contains(needle), || {
            format!("stderr does not contain {needle:?}")
        })
    }

    /// Asserts stdout does not contain `needle`.
    #[track_caller]
    pub fn assert_stdout_lacks(&self, needle: impl AsRef<str>) -> &Self {
        let needle = needle.as_ref();
        self.check(!self.stdout.contains(needle), || {
            format!("stdout contains {needle:?}")
        })
    }

    /// Asserts stderr does not contain `needle`.
    #[track_caller]
    pub fn assert_stderr_lacks(&self, needle: impl AsRef<str>) -> &Self {
        let needle = needle.as_ref();
        self.check(!self.stderr.contains(needle), || {
            format!("stderr contains {needle:?}")
        })
    }

    /// Asserts `needle` appears in neither stdout nor stderr ([`all`](Self::all)): for secrets
    /// that must never be printed.
    #[track_caller]
    pub fn assert_not_in_output(&self, needle: impl AsRef<str>) -> &Self {
        let needle = needle.as_ref();
        self.check(!self.all().contains(needle), || {
            format!("the output contains {needle:?}")
        })
    }
}

/// The directory cargo puts this workspace's binaries in: `<target>/<profile>` of the running test
/// (`<target>/<profile>/deps/<test binary>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("profile dir").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The root of this workspace.
pub fn workspace_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace root")
            .to_path_buf()
    })
}

/// Binary `bin` of workspace package `package`, as cargo built it beside the running test; no
/// build is started from here. `cargo test --workspace` builds every binary of the workspace (a
/// package's binaries are built for its integration tests), and `cargo test -p tests` those of
/// this package (cargo tells the test where they are, as `CARGO_BIN_EXE_<name>`).
///
/// A binary of another package is not rebuilt by `cargo test -p tests`: it is refused, saying how
/// to build it, when it is missing or older than a source file of its package (`src/`, `build.rs`)
/// or of a workspace library it links (`libs`: their `src/` but `main.rs` and `bin/`), so a test
/// never runs a stale binary.
pub fn workspace_binary(package: &str, bin: &str, libs: &[&str]) -> PathBuf {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{bin}")) {
        return PathBuf::from(path);
    }
    let path = target_dir().join(bin);
    let build = format!(
        "build it with `cargo build -p {package} --bin {bin}`, or run `cargo test --workspace`"
    );
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; {build}", path.display()));
    let root = workspace_root();
    let newer = std::iter::once((package, true))
        .chain(libs.iter().map(|lib| (*lib, false)))
        .flat_map(|(krate, own)| {
            let dir = root.join(krate);
            let mut sources = vec![dir.join("build.rs")];
            rust_sources(&dir.join("src"), own, &mut sources);
            sources
        })
        .find(|source| {
            std::fs::metadata(source)
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified > built)
        });
    if let Some(newer) = newer {
        panic!(
            "{} is older than {}: {build}",
            path.display(),
            newer.display()
        );
    }
    path
}

/// The `.rs` files under `dir`; without `main.rs` and `bin/` unless `with_binaries`.
fn rust_sources(dir: &Path, with_binaries: bool, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name();
        if !with_binaries && (name == "main.rs" || name == "bin") {
            continue;
        }
        if path.is_dir() {
            rust_sources(&path, with_binaries, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `ampd` binary.
pub fn ampd() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("ampd", "ampd", &["entity", "migration"]))
}

/// The `ampd` command line built around a test-only migration set (`AMPD_FIXTURE_MIGRATIONS`).
pub fn ampd_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("tests", "ampd-fixture", &["ampd", "entity", "migration"]))
}

/// SeaORM's migration command line for this workspace's migrations (`migration/src/main.rs`).
pub fn seaorm_migration_cli() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("migration", "migration", &[]))
}

/// The cargo running these tests, as a command (for the one test that compiles a scaffolded
/// migration in a copy of the workspace), without the variables cargo sets for a test
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

    /// Writes `config.toml` for `url` with extra `[metadata_db]` lines `extra` ([`config_toml`])
    /// and returns its path.
    pub fn config(&self, url: &str, extra: &str) -> PathBuf {
        self.file("config.toml", &config_toml(url, extra))
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
        command: env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(std::iter::once(bin.display().to_string()))
            .chain(args.iter().map(|a| (*a).to_owned()))
            .collect::<Vec<_>>()
            .join(" "),
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

/// `n` runs of `ampd --config <config> <args...>` at once: their outputs, in the order they were
/// started, and the wall time until the last one finished.
pub async fn ampd_concurrently(config: &Path, args: &[&str], n: usize) -> (Vec<Output>, Duration) {
    let started = Instant::now();
    let runs: Vec<_> = (0..n)
        .map(|_| {
            let config = config.to_owned();
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            tokio::spawn(async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ampd_with_config(&config, &args).await
            })
        })
        .collect();
    let mut outputs = Vec::with_capacity(n);
    for run in runs {
        outputs.push(run.await.expect("task"));
    }
    (outputs, started.elapsed())
}

/// `bin --config <config> <args...>` ready to spawn: no stdin, stdout and stderr piped, no
/// inherited `RUST_LOG`, killed when dropped.
pub fn command(bin: &Path, config: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A new database migrated to head by the real `ampd`, and its config file `config.toml` in `dir`
/// (`extra`: more `[metadata_db]` lines).
pub async fn database_at_head(dir: &TempDir, extra: &str) -> (crate::TestDb, PathBuf) {
    let db = crate::TestDb::empty().await;
    let config = dir.config(db.url(), extra);
    ampd_with_config(&config, &["migrate"])
        .await
        .assert_success();
    (db, config)
}

/// `ampd-fixture --config <config> <args...>` with migration set `set`
/// (`AMPD_FIXTURE_MIGRATIONS`, see [`crate::fixtures`]), 60 s at most.
pub async fn fixture_with_config(config: &Path, set: &str, args: &[&str]) -> Output {
    let mut all = vec!["--config", config.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    run(
        ampd_fixture(),
        &all,
        &[("AMPD_FIXTURE_MIGRATIONS", set)],
        Duration::from_secs(60),
    )
    .await
}
