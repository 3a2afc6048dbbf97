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
    assert_eq!(out.code, Some(0), "{}", out.all());

    let out = cli::fixture_with_config(&config, "late", &["migrate"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains(&format!(
            "migration {} is pending but older than {}, the newest applied migration",
            LATE.name, NEWER.name
        )) && out.stderr.contains("--allow-out-of-order"),
        "{}",
        out.stderr
    );
    let conn = db.connect().await;
    assert_eq!(late_table(&conn).await, 0, "nothing applied");
    let out = cli::fixture_with_config(&config, "late", &["migrate", "validate"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stdout.contains(&format!("PROBLEM  {}", LATE.name)),
        "{}",
        out.stdout
    );

    let out = cli::fixture_with_config(&config, "late", &["migrate", "--allow-out-of-order"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("applied 1 migration "),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("out of order (allowed)"),
        "{}",
        out.stderr
    );
    assert_eq!(late_table(&conn).await, 1);
}

#[tokio::test]
async fn the_configuration_key_allows_out_of_order_migrations_too() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "allow_out_of_order = true");
    let out = cli::fixture_with_config(&config, "newer", &["migrate"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let out = cli::fixture_with_config(&config, "late", &["migrate"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let conn = db.connect().await;
    assert_eq!(late_table(&conn).await, 1);
}
