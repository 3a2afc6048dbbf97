//! `ampd migrate` under faults: killed mid-run, its backend terminated, DDL blocked by a long
//! transaction, dozens of concurrent runs, and hostile configuration files.
//!
//! Figures are printed (`cargo test -p tests --test it -- migrate_faults:: --nocapture`) for the
//! README's reliability section; no test asserts on timing beyond generous bounds that separate
//! "bounded" from "hung".

use std::time::{Duration, Instant};

use ampd::migrate::{self, MigrationSet};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tests::cli::{self, TempDir, database_at_head};
use tests::sql::count;
use tests::{TestDb, XorShift, catalog};

/// How many migrations the schema has (the migrator's own list).
fn schema_migrations() -> i64 {
    tests::schema_migration_count() as i64
}

/// SQL that is true for rows of `pg_locks` in the current database (the test's own).
const THIS_DATABASE_LOCK: &str =
    "database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// Whether any session holds the migration lock of `db`'s database.
async fn lock_held(db: &DatabaseConnection) -> bool {
    let sql = format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND ((classid::bigint << 32) | objid::bigint) = {} AND {THIS_DATABASE_LOCK}",
        migrate::LOCK_KEY
    );
    count(db, &sql).await > 0
}

/// Polls `check` every 20 ms until it is true or `limit` passes; returns the time it took.
async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn fixture_command(
    config: &std::path::Path,
    set: &str,
    sleep_secs: &str,
) -> tokio::process::Command {
    let mut cmd = cli::command(cli::ampd_fixture(), config, &["migrate"]);
    cmd.env("AMPD_FIXTURE_MIGRATIONS", set)
        .env("AMPD_FIXTURE_SLEEP_SECS", sleep_secs);
    cmd
}

/// The slow fixture migration run to its end without its sleep (what a rerun after a fault does).
async fn slow_without_sleep(config: &std::path::Path) -> cli::Output {
    let env = [
        ("AMPD_FIXTURE_MIGRATIONS", "slow"),
        ("AMPD_FIXTURE_SLEEP_SECS", "0"),
    ];
    let args = ["--config", config.to_str().unwrap(), "migrate"];
    cli::run(cli::ampd_fixture(), &args, &env, Duration::from_secs(60)).await
}

/// The backends of `db`'s database running the slow fixture migration's sleep.
const SLOW_MIGRATION_BACKENDS: &str = "FROM pg_stat_activity WHERE datname = current_database() \
     AND application_name = 'ampd' AND query LIKE 'SELECT pg_sleep%' AND state = 'active'";

/// Whether the slow fixture migration is running (its table exists in the open transaction and
/// its backend is sleeping).
async fn slow_migration_running(db: &DatabaseConnection) -> bool {
    count(db, &format!("SELECT count(*) {SLOW_MIGRATION_BACKENDS}")).await > 0
}

#[tokio::test]
async fn killing_ampd_mid_run_leaves_the_previous_version_and_releases_the_lock() {
    let dir = TempDir::new();
    let (db, config) = database_at_head(&dir, "").await;
    let conn = db.connect().await;
    let before = catalog::snapshot(&conn).await;

    let mut child = fixture_command(&config, "slow", "30")
        .spawn()
        .expect("spawn");
    wait_until(Duration::from_secs(30), || slow_migration_running(&conn))
        .await
        .expect("the slow migration started");
    assert!(lock_held(&conn).await);

    let killed_at = Instant::now();
    child.start_kill().expect("kill -9");
    let _ = child.wait().await;
    let released = wait_until(Duration::from_secs(10), || async {
        !lock_held(&conn).await
    })
    .await
    .expect("the lock is released after the process dies");
    println!(
        "kill -9 mid-run: lock released {:?} after the kill",
        killed_at
            .elapsed()
            .min(released + Duration::from_millis(20))
    );

    assert_eq!(
        catalog::snapshot(&conn).await,
        before,
        "schema exactly as before"
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM seaql_migrations").await,
        schema_migrations()
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'fixture_slow_started'"
        )
        .await,
        0
    );

    let out = slow_without_sleep(&config).await;
    out.assert_success()
        .assert_stdout_contains("applied 1 migration in");
}

#[tokio::test]
async fn terminating_the_backend_mid_run_leaves_the_previous_version() {
    let dir = TempDir::new();
    let (db, config) = database_at_head(&dir, "").await;
    let conn = db.connect().await;
    let before = catalog::snapshot(&conn).await;

    let child = fixture_command(&config, "slow", "30")
        .spawn()
        .expect("spawn");
    wait_until(Duration::from_secs(30), || slow_migration_running(&conn))
        .await
        .expect("the slow migration started");
    let terminated = count(
        &conn,
        &format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) {SLOW_MIGRATION_BACKENDS}) t"
        ),
    )
    .await;
    assert_eq!(terminated, 1);

    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("ampd exits after losing its connection")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("m20991231_000002_fixture_slow"), "{stderr}");
    // The server tells the client before the dying backend has released its locks.
    wait_until(Duration::from_secs(10), || async {
        !lock_held(&conn).await
    })
    .await
    .expect("the lock is released with the terminated backend");
    assert_eq!(catalog::snapshot(&conn).await, before);

    let out = slow_without_sleep(&config).await;
    out.assert_success();
}

#[tokio::test]
async fn ddl_blocked_by_a_long_transaction_fails_within_the_lock_timeout() {
    // Long enough that the test sees ampd's lock request waiting on a loaded machine.
    let lock_timeout = Duration::from_millis(3000);
    let dir = TempDir::new();
    let (db, config) = database_at_head(
        &dir,
        &format!("ddl_lock_timeout_ms = {}", lock_timeout.as_millis()),
    )
    .await;
    let conn = db.connect().await;
    let before = catalog::snapshot(&conn).await;

    // A long-running application transaction holding a lock on `jobs`.
    let holder = tests::connect(db.url(), 1).await;
    holder.execute_unprepared("BEGIN").await.unwrap();
    holder
        .execute_unprepared("SELECT count(*) FROM jobs")
        .await
        .unwrap();

    let mut command = fixture_command(&config, "alter-jobs", "0");
    let started = Instant::now();
    let child = command.spawn().expect("spawn");
    wait_until(Duration::from_secs(30), || async {
        count(
            &conn,
            &format!(
                "SELECT count(*) FROM pg_locks WHERE relation = 'jobs'::regclass \
                 AND NOT granted AND {THIS_DATABASE_LOCK}"
            ),
        )
        .await
            > 0
    })
    .await
    .expect("ampd waits for the jobs lock");

    // An application query arriving now queues behind ampd's lock request: measure how long.
    let app = tests::connect(db.url(), 1).await;
    let query_started = Instant::now();
    app.execute_unprepared("SELECT count(*) FROM jobs")
        .await
        .unwrap();
    let app_blocked = query_started.elapsed();

    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("ampd gives up")
        .expect("output");
    let run = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    holder.execute_unprepared("ROLLBACK").await.unwrap();

    println!(
        "blocked DDL (ddl_lock_timeout_ms = {}): ampd failed after {run:?}; an application query \
         on the table waited {app_blocked:?}",
        lock_timeout.as_millis()
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("m20991231_000003_fixture_alter_jobs"),
        "{stderr}"
    );
    assert!(stderr.contains("locked by another session"), "{stderr}");
    assert!(
        run >= lock_timeout,
        "ampd waited for the lock before giving up: {run:?}"
    );
    // Unbounded, the query would wait for the holder, which rolls back only after ampd exits.
    assert!(
        app_blocked < lock_timeout + Duration::from_secs(10),
        "the application was held at most about the lock timeout: {app_blocked:?}"
    );
    assert_eq!(
        catalog::snapshot(&conn).await,
        before,
        "nothing half-applied"
    );
    assert!(!lock_held(&conn).await);
}

#[tokio::test]
async fn thirty_two_concurrent_processes_all_succeed_and_apply_each_migration_once() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let (outputs, took) = cli::ampd_concurrently(&config, &["migrate"], 32).await;
    let mut applied = 0;
    for out in outputs {
        out.assert_success();
        applied += usize::from(out.applied() as i64 == schema_migrations());
    }
    println!(
        "32 concurrent `ampd migrate` processes: all exited 0 in {:?}",
        took
    );
    assert_eq!(applied, 1);
    let conn = db.connect().await;
    assert_eq!(
        count(&conn, "SELECT count(*) FROM seaql_migrations").await,
        schema_migrations()
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM ampd_migrations").await,
        schema_migrations()
    );
}

#[tokio::test]
async fn thirty_two_concurrent_in_process_callers_of_the_startup_entry_point_all_succeed() {
    let db = TestDb::empty().await;
    let config = tests::metadata_config(db.url());
    let started = Instant::now();
    let handles: Vec<_> = (0..32)
        .map(|_| {
            let cfg = config.clone();
            tokio::spawn(async move { migrate::migrate(&cfg, &MigrationSet::ampd()).await })
        })
        .collect();
    let mut applied = 0;
    for h in handles {
        let report = h.await.expect("task").expect("migrate");
        applied += report.applied.len();
    }
    println!(
        "32 concurrent in-process migrate() calls: all succeeded in {:?}",
        started.elapsed()
    );
    assert_eq!(
        applied,
        schema_migrations() as usize,
        "each migration applied once in all"
    );
    let conn = db.connect().await;
    assert_eq!(
        count(&conn, "SELECT count(*) FROM seaql_migrations").await,
        schema_migrations()
    );
}

#[tokio::test]
async fn hostile_config_files_always_exit_1_with_one_clear_error_line() {
    let dir = TempDir::new();
    let seeds = [
        "[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h/db\"\nmax_connections = ",
        "[metadata_db]\nurl = 42\n",
        "[metadata_db]\nurl = \"mysql://u:S3cr3tPw@h/db\"\n",
        "[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h/db\"\nmax_connections = -1\n",
        "[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h/db\"\n[worker]\nliveness_window_ms = 1\n",
        "[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h/db\"\n[nope]\nx = 1\n",
        "[[metadata_db]]\nurl = \"x\"\n",
        "metadata_db = \"postgresql://u:S3cr3tPw@h/db\"\n",
        "\u{feff}[metadata_db]\nurl = \"postgresql://u:S3cr3tPw@h/db\"\nurl = \"again\"\n",
    ];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut cases: Vec<Vec<u8>> = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    for seed in seeds {
        // Mutations: truncation, byte flips and inserted junk.
        for _ in 0..3 {
            let mut bytes = seed.as_bytes().to_vec();
            match rng.next() % 3 {
                0 => bytes.truncate((rng.next() as usize) % bytes.len().max(1)),
                1 => {
                    let i = (rng.next() as usize) % bytes.len();
                    bytes[i] = (rng.next() % 256) as u8;
                }
                _ => {
                    let i = (rng.next() as usize) % bytes.len();
                    let junk: Vec<u8> = (0..8).map(|_| (rng.next() % 256) as u8).collect();
                    bytes.splice(i..i, junk);
                }
            }
            cases.push(bytes);
        }
    }
    let mut config_errors = 0;
    for (i, bytes) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, bytes).unwrap();
        let out = cli::run(
            cli::ampd(),
            &["--config", path.to_str().unwrap(), "migrate"],
            &[("AMP_CONFIG_METADATA_DB__CONNECT_TIMEOUT_SECS", "1")],
            Duration::from_secs(30),
        )
        .await;
        let case = String::from_utf8_lossy(bytes);
        // The cases come from a fixed seed: case i, named by its file case{i}.toml in the command
        // a failure prints, is the same on every run.
        out.assert_code(1)
            .assert_stderr_lacks("panicked")
            .assert_not_in_output("S3cr3tPw");
        let errors: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "case {i} {case:?}: {}", out.stderr);
        // A mutation can leave a valid file (with an unreachable server); any other message is
        // about the file and says where the problem is, as the README promises.
        let line = errors[0];
        assert!(
            line.starts_with("error: failed to connect to metadata database")
                || names_key_or_position(line),
            "case {i} {case:?}: the message names no key and no position: {line}"
        );
        config_errors += usize::from(names_key_or_position(line));
    }
    assert!(
        config_errors >= seeds.len(),
        "most cases are rejected as bad configuration: {config_errors} of {}",
        cases.len()
    );
}

/// Whether a config error names the key (`` `section.key` ``) or the position
/// (`at line L, column C`) of the problem.
fn names_key_or_position(message: &str) -> bool {
    let key = message
        .split('`')
        .nth(1)
        .is_some_and(|key| !key.trim().is_empty() && message.matches('`').count() >= 2);
    let position = message
        .split_once(" at line ")
        .and_then(|(_, rest)| rest.split_once(", column "))
        .is_some_and(|(line, rest)| {
            line.parse::<usize>().is_ok() && rest.starts_with(|c: char| c.is_ascii_digit())
        });
    key || position
}
