//! The migrations produce exactly the schema of SCHEMA.md, apply once, and undo exactly.

use migration::{Migrator, MigratorTrait};
use tests::{TestDb, catalog};

fn expected_schema() -> Vec<String> {
    let mut lines: Vec<String> = include_str!("../expected_schema.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

fn assert_same(actual: &[String], expected: &[String]) {
    let missing: Vec<_> = expected.iter().filter(|l| !actual.contains(l)).collect();
    let unexpected: Vec<_> = actual.iter().filter(|l| !expected.contains(l)).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "schema differs from SCHEMA.md\nmissing:\n  {}\nunexpected:\n  {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        unexpected
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
    );
}

#[tokio::test]
async fn migrating_an_empty_database_yields_exactly_the_documented_schema() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    assert!(catalog::snapshot(&conn).await.is_empty());
    Migrator::up(&conn, None).await.expect("migrate");
    assert_same(&catalog::snapshot(&conn).await, &expected_schema());
}

#[tokio::test]
async fn running_the_migrator_twice_applies_nothing_the_second_time() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    Migrator::up(&conn, None).await.expect("first run");
    let applied = Migrator::get_migration_models(&conn)
        .await
        .expect("applied");
    assert_eq!(applied.len(), Migrator::migrations().len());
    let schema = catalog::snapshot(&conn).await;

    assert!(
        Migrator::get_pending_migrations(&conn)
            .await
            .expect("pending")
            .is_empty()
    );
    Migrator::up(&conn, None).await.expect("second run");

    assert_eq!(
        Migrator::get_migration_models(&conn)
            .await
            .expect("applied"),
        applied
    );
    assert_eq!(catalog::snapshot(&conn).await, schema);
}

#[tokio::test]
async fn full_down_leaves_no_table_of_ours_and_up_again_reproduces_the_catalog() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    Migrator::up(&conn, None).await.expect("up");
    let before = catalog::snapshot(&conn).await;

    Migrator::down(&conn, None).await.expect("down to zero");
    assert_eq!(catalog::tables(&conn).await, ["seaql_migrations"]);
    assert!(catalog::snapshot(&conn).await.is_empty());
    assert!(
        Migrator::get_migration_models(&conn)
            .await
            .expect("applied")
            .is_empty(),
        "no migration is recorded as applied after a full down"
    );

    Migrator::up(&conn, None).await.expect("up again");
    assert_eq!(catalog::snapshot(&conn).await, before);
}

#[tokio::test]
async fn each_migration_down_undoes_exactly_its_up() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    let count = Migrator::migrations().len() as u32;
    for step in 0..count {
        let before = catalog::snapshot(&conn).await;
        Migrator::up(&conn, Some(1)).await.expect("up one");
        let after = catalog::snapshot(&conn).await;
        assert_ne!(before, after, "migration {} changes the schema", step + 1);
        Migrator::down(&conn, Some(1)).await.expect("down one");
        assert_eq!(
            catalog::snapshot(&conn).await,
            before,
            "down of migration {} restores the schema before it",
            step + 1
        );
        Migrator::up(&conn, Some(1)).await.expect("up one again");
        assert_eq!(catalog::snapshot(&conn).await, after);
    }
    assert_same(&catalog::snapshot(&conn).await, &expected_schema());
}
