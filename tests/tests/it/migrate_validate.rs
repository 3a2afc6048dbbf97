//! `ampd migrate validate`: exit 0 when the database and this binary agree, 1 with the reasons
//! otherwise (a changed checksum, an unknown migration not recorded as compatible, a half-built
//! index); read-only.

use sea_orm::ConnectionTrait;
use tests::cli::{self, TempDir};
use tests::{TestDb, catalog};

async fn validate(config: &std::path::Path, extra: &[&str]) -> cli::Output {
    let mut args = vec!["migrate", "validate"];
    args.extend_from_slice(extra);
    cli::ampd_with_config(config, &args).await
}

#[tokio::test]
async fn validate_passes_on_an_agreeing_database_and_on_pending_migrations_unless_told_not_to() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    // Nothing applied yet: pending migrations are what `ampd migrate` is for.
    let out = validate(&config, &[]).await;
    out.assert_success()
        .assert_stdout_contains("pending migration(s)");
    let out = validate(&config, &["--require-current"]).await;
    out.assert_code(1);
    let conn = db.connect().await;
    assert!(
        catalog::tables(&conn).await.is_empty(),
        "validate created nothing"
    );

    cli::ampd_with_config(&config, &["migrate"])
        .await
        .assert_success();
    let out = validate(&config, &["--require-current", "--json"]).await;
    out.assert_success();
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(report["problems"], 0, "{report}");
    let out = validate(&config, &[]).await;
    out.assert_stdout_contains("valid: the database agrees with this ampd");
}

#[tokio::test]
async fn validate_fails_on_a_changed_checksum_and_names_the_migration() {
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
    let out = validate(&config, &[]).await;
    out.assert_code(1)
        .assert_stdout_contains("PROBLEM  m20261101_000003_create_datasets: checksum mismatch")
        .assert_stderr_contains("error: the database does not agree with this ampd")
        .assert_stderr_contains("1 problem(s)");
    assert_eq!(catalog::snapshot(&conn).await, before);
}

#[tokio::test]
async fn validate_fails_on_an_unknown_migration_not_recorded_as_compatible() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::fixture_with_config(&config, "alter-jobs", &["migrate"]).await;
    out.assert_success();
    let out = validate(&config, &[]).await;
    out.assert_code(1).assert_stdout_contains(
        "PROBLEM  m20991231_000003_fixture_alter_jobs: applied, unknown to this ampd and not \
         recorded as compatible",
    );
}

#[tokio::test]
async fn validate_fails_on_an_index_a_concurrent_build_left_half_built() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    // A previous release migrated; this one's first new migration (a concurrent index build)
    // failed half-way and left its index INVALID.
    let out = cli::fixture_with_config(&config, "before-index", &["migrate"]).await;
    out.assert_success();
    let conn = db.connect().await;
    conn.execute_unprepared(&format!(
        "INSERT INTO manifest_files (hash, kind, path) VALUES ('{0}', 'static', 'm'); \
         INSERT INTO physical_tables (dataset_namespace, dataset_name, manifest_hash, table_name) \
         VALUES ('ns', 'd', '{0}', 'a'), ('ns', 'd', '{0}', 'b')",
        "a".repeat(64)
    ))
    .await
    .expect("rows");
    let failed = conn
        .execute_unprepared(
            "CREATE UNIQUE INDEX CONCURRENTLY idx_physical_tables_active_revision_id \
             ON physical_tables (dataset_namespace)",
        )
        .await;
    assert!(failed.is_err(), "the build fails on the duplicate");
    let before = catalog::snapshot(&conn).await;

    let out = validate(&config, &[]).await;
    out.assert_code(1)
        .assert_stdout_contains(
            "PROBLEM  index \"public\".\"idx_physical_tables_active_revision_id\" is INVALID: a run \
             of pending migration m20261201_000001_index_physical_tables_active_revision failed",
        )
        .assert_stdout_contains(
            "DROP INDEX CONCURRENTLY IF EXISTS \"public\".\"idx_physical_tables_active_revision_id\";",
        );
    assert_eq!(
        catalog::snapshot(&conn).await,
        before,
        "validate changed nothing"
    );

    conn.execute_unprepared(
        "DROP INDEX CONCURRENTLY IF EXISTS \"public\".\"idx_physical_tables_active_revision_id\"",
    )
    .await
    .expect("drop");
    let out = validate(&config, &[]).await;
    out.assert_success();
}
