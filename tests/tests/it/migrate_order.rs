//! The out-of-order policy: a pending migration older than the newest applied one (merged late)
//! is refused, naming both, unless `--allow-out-of-order` or `metadata_db.allow_out_of_order`.

use tests::cli::{self, TempDir};
use tests::fixtures::{LATE, NEWER};
use tests::{TestDb, sql};

async fn late_table(conn: &sea_orm::DatabaseConnection) -> i64 {
    sql::count(
        conn,
        "SELECT count(*) FROM pg_tables WHERE tablename = 'fixture_late'",
    )
    .await
}

#[tokio::test]
async fn a_migration_merged_late_is_refused_naming_both_and_applied_when_allowed() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::fixture_with_config(&config, "newer", &["migrate"]).await;
    out.assert_success();

    let out = cli::fixture_with_config(&config, "late", &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains(format!(
            "migration {} is pending but older than {}, the newest applied migration",
            LATE.name, NEWER.name
        ))
        .assert_stderr_contains("--allow-out-of-order");
    let conn = db.connect().await;
    assert_eq!(late_table(&conn).await, 0, "nothing applied");
    let out = cli::fixture_with_config(&config, "late", &["migrate", "validate"]).await;
    out.assert_code(1)
        .assert_stdout_contains(format!("PROBLEM  {}", LATE.name));

    let out = cli::fixture_with_config(&config, "late", &["migrate", "--allow-out-of-order"]).await;
    out.assert_success()
        .assert_stdout_contains("applied 1 migration ")
        .assert_stderr_contains("out of order (allowed)");
    assert_eq!(late_table(&conn).await, 1);
}

#[tokio::test]
async fn the_configuration_key_allows_out_of_order_migrations_too() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "allow_out_of_order = true");
    let out = cli::fixture_with_config(&config, "newer", &["migrate"]).await;
    out.assert_success();
    let out = cli::fixture_with_config(&config, "late", &["migrate"]).await;
    out.assert_success();
    let conn = db.connect().await;
    assert_eq!(late_table(&conn).await, 1);
}
