//! `ampd migrate`, run as a user runs it: the built binary, a config file, exit codes and output.

use std::time::Duration;

use sea_orm::ConnectionTrait;
use tests::cli::{self, TempDir, config_toml};
use tests::sql::count;
use tests::{TestDb, catalog};

/// How many migrations the schema has (the migrator's own list).
fn schema_migrations() -> usize {
    tests::schema_migration_count()
}

/// `url` with its user and password replaced.
fn with_credentials(url: &str, user: &str, password: Option<&str>) -> String {
    let mut u = url::Url::parse(url).expect("url");
    u.set_username(user).expect("set user");
    u.set_password(password).expect("set password");
    u.to_string()
}

async fn migrate(config: &std::path::Path) -> cli::Output {
    cli::ampd_with_config(config, &["migrate"]).await
}

#[tokio::test]
async fn migrate_applies_everything_then_a_second_run_is_a_noop() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");

    let head = tests::schema_head();
    let first = migrate(&config).await;
    first
        .assert_success()
        .assert_stdout_contains(format!("applied {} migrations in", schema_migrations()))
        .assert_stdout_contains(format!("schema at version {head}"));
    for name in migration::CHECKSUMS.iter().map(|(n, _)| n) {
        // The progress names every migration.
        first.assert_stderr_contains(name);
    }

    let second = migrate(&config).await;
    second.assert_success();
    assert_eq!(
        second.stdout.trim(),
        format!("schema is up to date (version {head})")
    );

    let conn = db.connect().await;
    assert_eq!(
        count(&conn, "SELECT count(*) FROM seaql_migrations").await,
        schema_migrations() as i64
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM ampd_migrations WHERE execution_ms IS NOT NULL AND ampd_version <> ''")
            .await,
        schema_migrations() as i64
    );
}

#[tokio::test]
async fn amp_config_names_the_config_file() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::run(
        cli::ampd(),
        &["migrate"],
        &[("AMP_CONFIG", config.to_str().unwrap())],
        Duration::from_secs(60),
    )
    .await;
    out.assert_success()
        .assert_stdout_contains(format!("applied {} migrations", schema_migrations()));
}

#[tokio::test]
async fn environment_override_beats_the_file() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    // The file points at a database that does not exist; the environment at the real one.
    let wrong = tests::database_url("ampd_no_such_database");
    let config = dir.config(&wrong, "");
    let out = cli::run(
        cli::ampd(),
        &["--config", config.to_str().unwrap(), "migrate"],
        &[("AMP_CONFIG_METADATA_DB__URL", db.url())],
        Duration::from_secs(60),
    )
    .await;
    out.assert_success()
        .assert_stdout_contains(format!("applied {} migrations", schema_migrations()));
}

#[tokio::test]
async fn without_a_config_the_error_says_how_to_pass_one() {
    let out = cli::run(cli::ampd(), &["migrate"], &[], Duration::from_secs(30)).await;
    out.assert_code(1)
        .assert_stderr_contains("--config <path>")
        .assert_stderr_contains("AMP_CONFIG");
}

#[tokio::test]
async fn a_missing_config_file_is_a_clear_error_naming_it() {
    let dir = TempDir::new();
    let missing = dir.path().join("nope.toml");
    let out = cli::ampd_with_config(&missing, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("cannot read config file")
        .assert_stderr_contains("nope.toml");
}

#[tokio::test]
async fn an_unreadable_config_file_is_a_clear_error() {
    let dir = TempDir::new();
    // A directory cannot be read as a file (and, unlike permissions, this holds for root too).
    let out = cli::ampd_with_config(dir.path(), &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("cannot read config file");
}

#[tokio::test]
async fn a_malformed_config_file_is_named_with_the_line() {
    let dir = TempDir::new();
    let bad = dir.file(
        "bad.toml",
        "[metadata_db]\nurl = \"postgresql://x@h/db\"\nmax_connections = \n",
    );
    let out = cli::ampd_with_config(&bad, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("bad.toml")
        .assert_stderr_contains("line 3");
}

#[tokio::test]
async fn a_config_value_of_the_wrong_type_names_its_key() {
    let dir = TempDir::new();
    let wrong_type = dir.file(
        "type.toml",
        "[metadata_db]\nurl = \"postgresql://x@h/db\"\nmax_connections = \"many\"\n",
    );
    let out = cli::ampd_with_config(&wrong_type, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("metadata_db.max_connections");
}

#[tokio::test]
async fn an_unknown_config_key_is_named() {
    let dir = TempDir::new();
    let unknown = dir.file(
        "unknown.toml",
        "[metadata_db]\nurl = \"postgresql://x@h/db\"\npool_size = 3\n",
    );
    let out = cli::ampd_with_config(&unknown, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("metadata_db.pool_size");
}

#[tokio::test]
async fn a_missing_url_is_named() {
    let dir = TempDir::new();
    let config = dir.file("config.toml", "[metadata_db]\nauto_migrate = false\n");
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("metadata_db.url")
        .assert_stderr_contains("config.toml");
}

#[tokio::test]
async fn an_unreachable_server_fails_within_the_connect_timeout() {
    let dir = TempDir::new();
    let config = dir.config(
        "postgresql://amp:Unreachable-Pw@127.0.0.1:1/amp",
        "connect_timeout_secs = 2",
    );
    let out = migrate(&config).await;
    out.assert_code(1);
    // A refused connection is retried with backoff until the timeout, then given up.
    assert!(
        out.elapsed >= Duration::from_secs(2),
        "gave up after {:?}, before the 2 s connect timeout",
        out.elapsed
    );
    assert!(
        out.elapsed < Duration::from_secs(2 + 10),
        "gave up after {:?}, connect timeout is 2 s",
        out.elapsed
    );
    out.assert_stderr_contains("failed to connect to metadata database: ")
        .assert_stderr_contains("postgresql://amp:***@127.0.0.1:1/amp")
        .assert_not_in_output("Unreachable-Pw");
}

#[tokio::test]
async fn a_wrong_database_name_is_reported_as_missing() {
    let dir = TempDir::new();
    let url = tests::database_url("ampd_database_that_does_not_exist");
    let config = dir.config(&url, "");
    let out = migrate(&config).await;
    out.assert_code(1)
        .assert_stderr_contains("database \"ampd_database_that_does_not_exist\" does not exist");
}

#[tokio::test]
async fn a_role_without_create_gets_the_grant_to_ask_for() {
    let db = TestDb::empty().await;
    let role = format!("ampd_nocreate_{}", std::process::id());
    tests::admin_exec(&format!("DROP ROLE IF EXISTS {role}")).await;
    tests::admin_exec(&format!("CREATE ROLE {role} LOGIN PASSWORD 'x'")).await;
    let dir = TempDir::new();
    let config = dir.config(&with_credentials(db.url(), &role, Some("x")), "");
    let out = migrate(&config).await;
    let conn = db.connect().await;
    let tables = catalog::tables(&conn).await;
    drop(conn);
    tests::admin_exec(&format!("DROP ROLE IF EXISTS {role}")).await;

    out.assert_code(1)
        .assert_stderr_contains("permission denied to create table")
        .assert_stderr_contains(format!(
            "GRANT USAGE, CREATE ON SCHEMA \"public\" TO \"{role}\";"
        ));
    assert!(tables.is_empty(), "nothing was created: {tables:?}");
}

#[tokio::test]
async fn eight_concurrent_runs_all_succeed_and_apply_each_migration_once() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let runs = (0..8).map(|_| {
        let config = config.clone();
        async move { migrate(&config).await }
    });
    let outputs = futures_join_all(runs).await;
    let mut applied_by = 0;
    for out in &outputs {
        out.assert_success();
        if out
            .stdout
            .contains(&format!("applied {} migrations", schema_migrations()))
        {
            applied_by += 1;
        } else {
            out.assert_stdout_contains("schema is up to date");
        }
    }
    assert_eq!(applied_by, 1, "exactly one run applied the migrations");
    let conn = db.connect().await;
    assert_eq!(
        count(
            &conn,
            "SELECT count(DISTINCT version) FROM seaql_migrations"
        )
        .await,
        schema_migrations() as i64
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM seaql_migrations").await,
        schema_migrations() as i64
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM ampd_migrations").await,
        schema_migrations() as i64
    );
}

/// Waits for every future (a small join_all, to avoid a dependency for one use).
pub async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

async fn fixture(config: &std::path::Path, set: &str, args: &[&str]) -> cli::Output {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    cli::run(
        cli::ampd_fixture(),
        &all,
        &[("AMPD_FIXTURE_MIGRATIONS", set)],
        Duration::from_secs(60),
    )
    .await
}

#[tokio::test]
async fn a_failing_migration_leaves_no_trace_of_its_step_on_an_empty_database() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = fixture(&config, "failing", &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("migration m20991231_000001_fixture_fails failed")
        .assert_stderr_contains("relation \"no_such_table\" does not exist");
    // The schema's migrations up to the last one that runs alone (outside a transaction) are steps
    // before the failing one, so they stay applied; the failing step (with any transactional
    // migrations of the schema after that one) leaves nothing.
    out.assert_stderr_contains("stay applied");
    let before_the_failing_step = <migration::Migrator as migration::MigratorTrait>::migrations()
        .iter()
        .rposition(|m| m.use_transaction() == Some(false))
        .map_or(0, |last_alone| last_alone + 1);
    let conn = db.connect().await;
    let tables = catalog::tables(&conn).await;
    assert!(
        !tables.contains(&"fixture_created_before_failure".to_owned()),
        "{tables:?}"
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM seaql_migrations").await,
        before_the_failing_step as i64
    );
}

#[tokio::test]
async fn a_failing_migration_leaves_a_current_database_exactly_as_it_was() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    migrate(&config).await.assert_success();
    let conn = db.connect().await;
    let before = catalog::snapshot(&conn).await;
    let history = count(&conn, "SELECT count(*) FROM ampd_migrations").await;

    let out = fixture(&config, "failing", &["migrate"]).await;
    out.assert_code(1);
    assert_eq!(catalog::snapshot(&conn).await, before);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM ampd_migrations").await,
        history
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'fixture_created_before_failure'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_tampered_checksum_is_refused_and_nothing_changes() {
    let dir = TempDir::new();
    let (db, config) = cli::database_at_head(&dir, "").await;
    let conn = db.connect().await;
    conn.execute_unprepared(
        "UPDATE ampd_migrations SET checksum = repeat('0', 64) \
         WHERE version = 'm20261101_000003_create_datasets'",
    )
    .await
    .expect("tamper");
    let before = catalog::snapshot(&conn).await;

    // A run that has something to apply (the fixture's extra migration) still applies nothing.
    let out = fixture(&config, "alter-jobs", &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("migration checksum mismatch")
        .assert_stderr_contains("m20261101_000003_create_datasets")
        .assert_stderr_contains("Restore the original migration");
    assert_eq!(catalog::snapshot(&conn).await, before);

    let status = cli::ampd_with_config(&config, &["migrate", "status", "--json"]).await;
    status.assert_success();
    let states: serde_json::Value = serde_json::from_str(&status.stdout).expect("json");
    let datasets = states
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "m20261101_000003_create_datasets")
        .expect("listed");
    assert_eq!(datasets["checksum"], "mismatch");
}

#[tokio::test]
async fn an_applied_migration_unknown_to_this_binary_is_refused() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    // A newer ampd (here: the fixture with one more migration) migrated this database.
    fixture(&config, "alter-jobs", &["migrate"])
        .await
        .assert_success();
    let conn = db.connect().await;
    let before = catalog::snapshot(&conn).await;

    let out = migrate(&config).await;
    out.assert_code(1)
        .assert_stderr_contains("database is newer than this ampd")
        .assert_stderr_contains("m20991231_000003_fixture_alter_jobs");
    assert_eq!(catalog::snapshot(&conn).await, before);

    let status = cli::ampd_with_config(&config, &["migrate", "status", "--json"]).await;
    let states: serde_json::Value = serde_json::from_str(&status.stdout).expect("json");
    let last = states.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["name"], "m20991231_000003_fixture_alter_jobs");
    assert_eq!(last["checksum"], "unknown");
}

#[tokio::test]
async fn status_is_read_only_and_reports_every_migration() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");

    let out = cli::ampd_with_config(&config, &["migrate", "status"]).await;
    out.assert_success()
        .assert_stdout_contains(format!("0 applied, {} pending", schema_migrations()));
    let conn = db.connect().await;
    assert!(
        catalog::tables(&conn).await.is_empty(),
        "status created nothing"
    );

    migrate(&config).await.assert_success();
    let out = cli::ampd_with_config(&config, &["migrate", "status", "--json"]).await;
    let states: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let states = states.as_array().expect("array");
    assert_eq!(states.len(), schema_migrations());
    for s in states {
        assert_eq!(s["state"], "applied");
        assert_eq!(s["checksum"], "ok");
        assert!(s["applied_at"].is_string());
        assert!(s["duration_ms"].is_number());
        assert_eq!(s["ampd_version"], env!("CARGO_PKG_VERSION"));
    }
}

#[tokio::test]
async fn dry_run_prints_the_sql_in_order_and_changes_nothing() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::ampd_with_config(&config, &["migrate", "--dry-run"]).await;
    out.assert_success();
    let workers = out
        .stdout
        .find("CREATE TABLE \"workers\"")
        .expect("workers DDL");
    let jobs = out.stdout.find("CREATE TABLE \"jobs\"").expect("jobs DDL");
    let backfill = out
        .stdout
        .find("UPDATE \"jobs\" SET \"idempotency_key\"")
        .expect("backfill");
    assert!(workers < jobs && jobs < backfill, "in migration order");
    let conn = db.connect().await;
    assert!(catalog::tables(&conn).await.is_empty());

    migrate(&config).await.assert_success();
    let out = cli::ampd_with_config(&config, &["migrate", "--dry-run"]).await;
    out.assert_stdout_contains("nothing would run");
}

#[tokio::test]
async fn a_percent_encoded_password_is_checked_by_the_server_and_never_printed() {
    // `@`, `:`, `/`, `%` and unicode, percent-encoded in the URL.
    let password = "S3cr3t@:/%pässwört";
    let wrong = "n0t-the-S3cr3t";
    let db = TestDb::owned_by_password_role(password).await;
    let role = db.role().expect("a role of its own");
    let url = with_credentials(db.url(), role, Some(password));
    let wrong_url = with_credentials(db.url(), role, Some(wrong));
    if tests::login_succeeds(&wrong_url).await {
        assert!(
            !tests::cluster::is_private(),
            "the private cluster let {role} in with a wrong password"
        );
        println!(
            "skipped: the server of AMP_TEST_DATABASE_URL lets {role} log in with a wrong password \
             (its pg_hba.conf does not check passwords), so this test cannot show that the \
             password is sent and checked"
        );
        return;
    }
    let encoded = url::Url::parse(&url)
        .unwrap()
        .password()
        .unwrap()
        .to_owned();
    assert_ne!(encoded, password, "the URL carries it percent-encoded");
    let dir = TempDir::new();
    let config = dir.config(&url, "");
    let wrong_password = dir.file(
        "wrong.toml",
        &config_toml(&wrong_url, "connect_timeout_secs = 2"),
    );
    let bad_port = dir.file(
        "unreachable.toml",
        &config_toml(
            &with_credentials("postgresql://x@127.0.0.1:1/amp", "amp", Some(password)),
            "connect_timeout_secs = 1",
        ),
    );
    let malformed = dir.file("malformed.toml", &format!("[metadata_db]\nurl = \"{url}\n"));
    let config = config.to_str().unwrap();
    let mut outputs = Vec::new();
    for level in ["info", "trace"] {
        let env = [("RUST_LOG", level)];
        async fn run(args: &[&str], env: &[(&str, &str)]) -> cli::Output {
            cli::run(cli::ampd(), args, env, Duration::from_secs(60)).await
        }
        for args in [
            &["--config", config, "migrate"][..],
            &["--config", config, "migrate"],
            &["--config", config, "migrate", "status"],
            &["--config", config, "migrate", "status", "--json"],
            &["--config", config, "migrate", "--dry-run"],
        ] {
            let out = run(args, &env).await;
            out.assert_success();
            outputs.push(out);
        }
        let out = run(
            &["--config", wrong_password.to_str().unwrap(), "migrate"],
            &env,
        )
        .await;
        out.assert_code(1).assert_stderr_contains(format!(
            "password authentication failed for user \"{role}\""
        ));
        outputs.push(out);
        for config in [&bad_port, &malformed] {
            let out = run(&["--config", config.to_str().unwrap(), "migrate"], &env).await;
            out.assert_code(1);
            outputs.push(out);
        }
    }
    let first = &outputs[0];
    // The first run migrated, as the role.
    first.assert_stdout_contains(format!("applied {} migrations in", schema_migrations()));
    for out in outputs {
        for secret in [password, encoded.as_str(), wrong, "S3cr3t"] {
            out.assert_not_in_output(secret);
        }
    }
}
