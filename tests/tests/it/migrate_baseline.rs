//! `ampd migrate baseline --to <migration>`: on a schema created without ampd (restored from
//! `pg_dump --schema-only` without the bookkeeping tables), records the migrations up to
//! `<migration>` once the schema is found to be what they create, so that `ampd migrate` applies
//! only the rest; on a schema that differs, lists the difference and records nothing.

use sea_orm::ConnectionTrait;
use tests::cli::{self, TempDir};
use tests::{TestDb, sql};

/// The migrations a previous release's schema has: the `before-index` fixture set (the schema's
/// up to its first that runs alone).
fn previous_migrations() -> Vec<String> {
    let set = tests::fixtures::named("before-index").expect("the before-index set");
    set.names().into_iter().map(str::to_owned).collect()
}

/// The last of them.
fn previous_head() -> String {
    previous_migrations().pop().expect("migrations")
}

/// Runs PostgreSQL's `program` with `args`; its stdout.
fn pg_tool(program: &str, args: &[&str]) -> Option<String> {
    let bindir = match tests::cluster::find_bindir() {
        Ok(dir) => dir,
        Err(e) => {
            tests::not_run("baseline from a pg_dump", &e);
            return None;
        }
    };
    let out = std::process::Command::new(bindir.join(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn baseline(config: &std::path::Path, to: &str) -> cli::Output {
    cli::ampd_with_config(
        config,
        &[
            "migrate",
            "baseline",
            "--to",
            to,
            "--reason",
            "restored from a dump",
        ],
    )
    .await
}

async fn scratch_schemas(conn: &sea_orm::DatabaseConnection) -> i64 {
    sql::count(
        conn,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'ampd_baseline_scratch'",
    )
    .await
}

#[tokio::test]
async fn baseline_adopts_a_schema_restored_from_a_dump_and_migrate_applies_only_the_rest() {
    // A previous release's schema, dumped without the bookkeeping tables.
    let source = TestDb::empty().await;
    let dir = TempDir::new();
    let source_config = dir.file("source.toml", &cli::config_toml(source.url(), ""));
    let out = cli::fixture_with_config(&source_config, "before-index", &["migrate"]).await;
    out.assert_success();
    let dump = dir.path().join("schema.sql");
    let dump = dump.to_str().expect("utf-8 path");
    let Some(_) = pg_tool(
        "pg_dump",
        &[
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "-T",
            "seaql_migrations",
            "-T",
            "ampd_migrations",
            "-f",
            dump,
            "-d",
            source.url(),
        ],
    ) else {
        return;
    };
    let db = TestDb::empty().await;
    pg_tool(
        "psql",
        &[
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db.url(),
            "-f",
            dump,
        ],
    );
    let config = dir.config(db.url(), "");
    let conn = db.connect().await;
    assert_eq!(
        sql::count(
            &conn,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'seaql_migrations'"
        )
        .await,
        0
    );

    // Without a baseline, a run fails on what exists.
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_code(1).assert_stderr_contains("already exists");

    let out = baseline(&config, &previous_head()).await;
    out.assert_success();
    let previous = previous_migrations().len();
    out.assert_stdout_contains(format!("recorded {previous} migration(s) as applied"));
    let audited = sql::count(
        &conn,
        "SELECT count(*) FROM ampd_migrations WHERE adopted AND execution_ms IS NULL \
         AND baseline->>'reason' = 'restored from a dump' AND baseline->>'role' = current_user \
         AND baseline->>'ampd_version' = ampd_version AND baseline->>'to' IS NOT NULL",
    )
    .await;
    assert_eq!(audited, previous as i64);
    assert_eq!(
        scratch_schemas(&conn).await,
        0,
        "the scratch schema is dropped"
    );

    // The next run applies only the rest.
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    let rest = tests::schema_migration_count() - previous;
    out.assert_success()
        .assert_stdout_contains(format!("applied {rest} migrations "));
    let out = cli::ampd_with_config(&config, &["migrate", "validate", "--require-current"]).await;
    out.assert_success();
    let out = cli::ampd_with_config(&config, &["migrate", "status", "--json"]).await;
    let states: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let by: Vec<&str> = states
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["applied_by"].as_str().unwrap_or("-"))
        .collect();
    let mut expected = vec!["baseline"; previous];
    expected.extend(vec!["ampd"; rest]);
    assert_eq!(by, expected);
}

#[tokio::test]
async fn baseline_refuses_a_schema_with_a_missing_column_and_records_nothing() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    // A schema created without ampd's records, then changed by hand.
    cli::ampd_with_config(&config, &["migrate"])
        .await
        .assert_success();
    let conn = db.connect().await;
    conn.execute_unprepared(
        "DROP TABLE ampd_migrations, seaql_migrations; ALTER TABLE jobs DROP COLUMN detail",
    )
    .await
    .expect("change the schema");

    let out = baseline(&config, &tests::schema_head()).await;
    out.assert_code(1)
        .assert_stderr_contains("baseline refused, nothing was recorded")
        .assert_stderr_contains("column jobs.detail is missing (expected: jsonb NULL)");
    assert_eq!(
        sql::count(
            &conn,
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('seaql_migrations', 'ampd_migrations')"
        )
        .await,
        0,
        "nothing recorded"
    );
    assert_eq!(
        scratch_schemas(&conn).await,
        0,
        "the scratch schema is dropped"
    );

    // A database that records migrations is not one to baseline.
    let (other, other_config) = cli::database_at_head(&dir, "").await;
    let out = baseline(&other_config, &tests::schema_head()).await;
    out.assert_code(1)
        .assert_stderr_contains("already records applied migrations");
    drop(other);
}
