//! SeaORM's tooling and `ampd migrate` work together: a migration made by the pinned `sea-orm-cli`
//! compiles and is applied by `ampd` on top of head, and SeaORM's migration CLI agrees with `ampd`
//! about what is applied.
//!
//! SeaORM's migration CLI is the `migration` binary cargo built beside this test. The scaffolded
//! migration has to be compiled: the workspace copy is built in this workspace's target directory
//! with the same features, so every dependency is reused and only the copy's `migration`, `entity`
//! and `ampd` are compiled.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::TestDb;
use tests::cli::{self, TempDir};

/// The root of this workspace.
fn repo() -> &'static Path {
    cli::workspace_root()
}

/// The target directory this test was built in (`CARGO_TARGET_TMPDIR` is `<target>/tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// Runs `cmd` to completion; panics with its command line and output unless it succeeds.
fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `cargo build` of binary `bin` of `package` in the workspace at `dir`; returns the executable
/// as cargo reports it.
fn cargo_build(dir: &Path, package: &str, bin: &str, target: &Path) -> PathBuf {
    let mut cmd = cli::cargo();
    cmd.args(["build", "-q", "--locked", "-p", package, "--bin", bin])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target);
    let out = run_ok(&mut cmd);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo build reported no executable for {bin}"))
}

/// The pinned sea-orm-cli, installed once by `.ci/sea-orm-cli`.
fn sea_orm_cli() -> PathBuf {
    let out = run_ok(&mut Command::new(repo().join(".ci/sea-orm-cli")));
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// Copies `from` to `to` recursively, leaving out `target` directories.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().expect("file type").is_dir() {
            if entry.file_name() != "target" {
                copy_tree(&src, &dst);
            }
        } else {
            std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        }
    }
}

/// The name of the copy's `ampd` binary.
const COPY_BIN: &str = "ampd-sea-orm-cli-test";

/// Copies this workspace (its manifest, lock file and crates, no `target`) to `copy`, with two
/// changes that let it share this workspace's target directory without touching its artifacts:
///
/// - The crates move to `crates/<name>`. Cargo names a workspace crate's artifacts by its path
///   relative to the workspace root, so the copy's `migration` at `migration/` would overwrite this
///   workspace's compiled `migration` (and every `ampd` linked afterwards would carry the copy's
///   extra migration). Dependencies from the registry are named as before, so they are reused.
/// - The `ampd` binary is called [`COPY_BIN`], so that building it does not replace
///   `<target>/debug/ampd`, which other tests run.
///
/// The patched crates of `third_party/` are not copied: the copy's `[patch.crates-io]` points at
/// this workspace's, so they are the same packages and their artifacts are reused too.
///
/// Returns the directory the crates are in.
fn copy_workspace(repo: &Path, copy: &Path) -> PathBuf {
    let crates = copy.join("crates");
    std::fs::create_dir_all(&crates).expect("create copy");
    std::fs::copy(repo.join("Cargo.lock"), copy.join("Cargo.lock")).expect("copy Cargo.lock");
    let names = ["ampd", "entity", "migration", "tests"];
    let mut manifest = std::fs::read_to_string(repo.join("Cargo.toml")).expect("read Cargo.toml");
    for name in names {
        copy_tree(&repo.join(name), &crates.join(name));
        manifest = edited(
            &manifest,
            &format!("\"{name}\""),
            &format!("\"crates/{name}\""),
        );
    }
    let third_party = repo.join("third_party");
    manifest = edited(
        &manifest,
        "path = \"third_party/",
        &format!("path = \"{}/", third_party.display()),
    );
    std::fs::write(copy.join("Cargo.toml"), manifest).expect("write Cargo.toml");
    let ampd_manifest = crates.join("ampd/Cargo.toml");
    let toml = std::fs::read_to_string(&ampd_manifest).expect("read ampd/Cargo.toml");
    let toml = edited(
        &toml,
        "[[bin]]\nname = \"ampd\"",
        &format!("[[bin]]\nname = \"{COPY_BIN}\""),
    );
    std::fs::write(&ampd_manifest, toml).expect("write ampd/Cargo.toml");
    crates
}

/// `text` with every `from` replaced by `to`; panics if there is none.
fn edited(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "no {from} in:\n{text}");
    text.replace(from, to)
}

/// A directory removed when dropped, also when the test fails.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Names of the migration source files in `dir`.
fn migration_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read migration/src")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.starts_with('m') && n.ends_with(".rs") && n != "main.rs")
        .collect();
    names.sort();
    names
}

/// `m<8 digits>_<6 digits>_<what>`: the shape `build.rs` checksums and SeaORM sorts by.
fn is_migration_name(name: &str, what: &str) -> bool {
    let b = name.as_bytes();
    name.len() == 17 + what.len()
        && b[0] == b'm'
        && b[1..9].iter().all(u8::is_ascii_digit)
        && b[9] == b'_'
        && b[10..16].iter().all(u8::is_ascii_digit)
        && b[16] == b'_'
        && &name[17..] == what
}

/// Migrates `db` to head with the real `ampd`, as an operator would.
async fn migrate_to_head_with_ampd(db: &TestDb, dir: &TempDir) -> PathBuf {
    let config = dir.config(db.url(), "");
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_success();
    let applied = format!("applied {} migrations in", migration::CHECKSUMS.len());
    out.assert_stdout_contains(&applied);
    config
}

const UP: &str = r#"manager
            .create_table(
                Table::create()
                    .table("example")
                    .col(pk_auto("id"))
                    .col(text_null("note"))
                    .to_owned(),
            )
            .await"#;

const DOWN: &str = r#"manager
            .drop_table(Table::drop().table("example").to_owned())
            .await"#;

#[tokio::test]
async fn generated_migration_compiles_and_ampd_applies_it_on_top_of_head() {
    // Every copy's crates get the same artifact names in the target directory (see
    // `copy_workspace`), so concurrent runs take turns under a lock kept beside the copy. A failed
    // run's leftovers are removed before and after.
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmp).expect("create target tmp dir");
    let lock = File::create(tmp.join("sea-orm-cli-workspace.lock")).expect("create lock file");
    lock.lock().expect("lock the workspace copy");
    let copy = tmp.join("sea-orm-cli-workspace");
    let _ = std::fs::remove_dir_all(&copy);
    let _cleanup = RemoveOnDrop(copy.clone());

    let crates = copy_workspace(repo(), &copy);

    let src = crates.join("migration/src");
    let lib_before = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let files_before = migration_files(&src);

    let generate = run_ok(
        Command::new(sea_orm_cli())
            .args([
                "migrate",
                "generate",
                "add_example",
                "--universal-time",
                "-d",
            ])
            .arg(crates.join("migration"))
            .env_remove("MIGRATION_DIR")
            .env_remove("DATABASE_URL"),
    );
    let generate_output = String::from_utf8_lossy(&generate.stdout);

    // Exactly one new file, named like the others and sorting after every existing migration.
    let new_files: Vec<String> = migration_files(&src)
        .into_iter()
        .filter(|f| !files_before.contains(f))
        .collect();
    assert_eq!(
        new_files.len(),
        1,
        "new files: {new_files:?}\n{generate_output}"
    );
    let name = new_files[0].trim_end_matches(".rs").to_owned();
    assert!(is_migration_name(&name, "add_example"), "{name}");
    let head = migration::CHECKSUMS.last().expect("a migration").0;
    assert!(name.as_str() > head, "{name} sorts before head {head}");

    // lib.rs: the tool added the module and the list entry after the last ones, nothing else.
    let lib_after = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let module = format!("mod {name};\n");
    let entry = format!("            Box::new({name}::Migration),\n");
    assert!(lib_after.contains(&module), "{lib_after}");
    let (Some(entry_at), Some(head_at)) = (
        lib_after.find(&entry),
        lib_after.find(&format!("Box::new({head}::Migration)")),
    ) else {
        panic!("migrations() does not list {name} and {head}:\n{lib_after}");
    };
    assert!(
        entry_at > head_at,
        "{name} is not listed last:\n{lib_after}"
    );
    assert!(
        lib_after[..entry_at].contains("fn migrations()"),
        "{lib_after}"
    );
    assert_eq!(
        lib_after.replacen(&module, "", 1).replacen(&entry, "", 1),
        lib_before,
        "sea-orm-cli changed lib.rs beyond adding {name}"
    );

    // Fill the template's `todo!()`s with a real change, as a developer would.
    let file = src.join(&new_files[0]);
    let template = std::fs::read_to_string(&file).expect("read generated migration");
    assert_eq!(template.matches("todo!();").count(), 2, "{template}");
    let source = template
        .replace("_manager", "manager")
        .replacen("todo!();", UP, 1)
        .replacen("todo!();", DOWN, 1);
    std::fs::write(&file, &source).expect("write migration");

    let target = target_dir();
    let copy_ampd = cargo_build(&copy, "ampd", COPY_BIN, &target);

    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = migrate_to_head_with_ampd(&db, &dir).await;
    let config = config.to_str().expect("utf-8 path");
    let out = cli::run(
        &copy_ampd,
        &["--config", config, "migrate"],
        &[],
        Duration::from_secs(60),
    )
    .await;
    out.assert_success()
        .assert_stdout_contains("applied 1 migration in")
        .assert_stdout_contains(format!("schema at version {name}"));

    let conn = db.connect().await;
    let exists: bool =
        tests::sql::value(&conn, "SELECT to_regclass('public.example') IS NOT NULL").await;
    assert!(exists, "table example was not created");
    let recorded: String = tests::sql::value(
        &conn,
        &format!("SELECT checksum FROM ampd_migrations WHERE version = '{name}'"),
    )
    .await;
    assert_eq!(
        recorded,
        migration::source_checksum(&source).expect("checksum of the migration")
    );
}

#[tokio::test]
async fn seaorm_cli_status_agrees_with_ampd_migrate() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = migrate_to_head_with_ampd(&db, &dir).await;
    let seaorm = cli::seaorm_migration_cli();
    let env = [("DATABASE_URL", db.url()), ("DATABASE_SCHEMA", "public")];

    let status = cli::run(seaorm, &["status"], &env, Duration::from_secs(60)).await;
    status.assert_success();
    for (name, _) in migration::CHECKSUMS {
        status.assert_stdout_contains(format!("Migration '{name}'... Applied"));
    }
    assert_eq!(
        status.stdout.matches("Migration '").count(),
        migration::CHECKSUMS.len(),
        "{}",
        status.stdout
    );
    status.assert_stdout_lacks("Pending");

    let up = cli::run(seaorm, &["up"], &env, Duration::from_secs(60)).await;
    up.assert_success()
        .assert_stdout_contains("No pending migrations");
    let conn = db.connect().await;
    let applied: i64 = tests::sql::value(&conn, "SELECT count(*) FROM seaql_migrations").await;
    assert_eq!(applied, migration::CHECKSUMS.len() as i64);

    // And ampd, run again, still finds the schema current: the two agree after SeaORM's `up` too.
    let again = cli::ampd_with_config(&config, &["migrate"]).await;
    again.assert_success();
    assert!(
        again.stdout.starts_with("schema is up to date"),
        "{}",
        again.stdout
    );
}
