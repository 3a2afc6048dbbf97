//! Checksums across ampd versions and the reviewed way to accept a changed migration:
//! - a database migrated by ampd 0.1 (algorithm-1 checksums, the old `ampd_migrations` layout)
//!   migrates on with this ampd, its rows verified with algorithm 1 and its table upgraded;
//! - `ampd migrate accept-checksum` replaces a changed checksum and keeps the old one, the reason
//!   and the time in the history;
//! - migrations applied by SeaORM's CLI are marked as such when ampd records them.

use std::time::Duration;

use ampd::migrate::{self, MigrationSet};
use migration::{Algorithm, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tests::TestDb;
use tests::cli::{self, TempDir};

async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn status(config: &std::path::Path) -> Vec<serde_json::Value> {
    let out = cli::ampd_with_config(config, &["migrate", "status", "--json"]).await;
    out.assert_success();
    let states: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    states.as_array().expect("array").clone()
}

fn entry<'a>(states: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    states
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("{name} listed"))
}

const ADOPTED_BY_OLD_AMPD: &str = "m20261101_000003_create_datasets";

/// A database as ampd 0.1 left it: the schema's first seven migrations, `ampd_migrations` without
/// the algorithm, adoption and history columns, algorithm-1 checksums, and one migration that ampd
/// 0.1 recorded after SeaORM's CLI applied it (no duration).
async fn migrated_by_ampd_0_1(db: &TestDb) -> DatabaseConnection {
    let mut first_seven = migration::Migrator::migrations();
    first_seven.truncate(7);
    let set = MigrationSet::new(first_seven, |name| {
        migration::checksum_of(name).map(str::to_owned)
    });
    let cfg = tests::metadata_config(db.url());
    migrate::migrate(&cfg, &set).await.expect("first seven");
    let conn = db.connect().await;
    exec(
        &conn,
        "ALTER TABLE ampd_migrations DROP COLUMN checksum_algorithm, DROP COLUMN adopted, \
         DROP COLUMN checksum_history",
    )
    .await;
    for name in set.names() {
        let v1 = migration::checksum_with(name, Algorithm::V1).expect("algorithm 1");
        exec(
            &conn,
            &format!("UPDATE ampd_migrations SET checksum = '{v1}' WHERE version = '{name}'"),
        )
        .await;
    }
    exec(
        &conn,
        &format!(
            "UPDATE ampd_migrations SET execution_ms = NULL WHERE version = '{ADOPTED_BY_OLD_AMPD}'"
        ),
    )
    .await;
    conn
}

#[tokio::test]
async fn a_database_migrated_by_ampd_0_1_migrates_on_with_its_algorithm_1_checksums() {
    let db = TestDb::empty().await;
    let _conn = migrated_by_ampd_0_1(&db).await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");

    // Read-only before the run: the old layout reads as algorithm 1.
    let before = status(&config).await;
    for s in &before[..7] {
        assert_eq!(s["checksum"], "ok", "{s}");
        assert_eq!(s["checksum_algorithm"], 1, "{s}");
    }

    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    // ampd 0.1 knew the first seven: the rest are applied now.
    let rest = tests::schema_migration_count() - 7;
    out.assert_success().assert_stdout_contains(&if rest == 1 {
        "applied 1 migration in".to_owned()
    } else {
        format!("applied {rest} migrations in")
    });

    let after = status(&config).await;
    for s in &after {
        assert_eq!(s["checksum"], "ok", "{s}");
    }
    for s in &after[..7] {
        assert_eq!(
            s["checksum_algorithm"], 1,
            "recorded with algorithm 1, kept: {s}"
        );
    }
    assert_eq!(after[7]["checksum_algorithm"], 2);
    assert_eq!(
        entry(&after, ADOPTED_BY_OLD_AMPD)["applied_by"],
        "outside-ampd"
    );
    assert_eq!(
        entry(&after, "m20261101_000002_create_jobs")["applied_by"],
        "ampd"
    );
}

#[tokio::test]
async fn a_changed_algorithm_1_checksum_is_still_refused_with_its_algorithm() {
    let db = TestDb::empty().await;
    let conn = migrated_by_ampd_0_1(&db).await;
    exec(
        &conn,
        "UPDATE ampd_migrations SET checksum = repeat('1', 64) \
         WHERE version = 'm20261101_000005_create_files'",
    )
    .await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_code(1);
    let v1 = migration::checksum_with("m20261101_000005_create_files", Algorithm::V1).unwrap();
    out.assert_stderr_contains(format!(
        "migration checksum mismatch: m20261101_000005_create_files was applied with checksum \
             {} (algorithm 1) but this ampd has {v1}",
        "1".repeat(64)
    ));
}

#[tokio::test]
async fn accept_checksum_replaces_a_changed_checksum_and_keeps_the_old_one_with_the_reason() {
    let dir = TempDir::new();
    let (db, config) = cli::database_at_head(&dir, "").await;
    let name = "m20261101_000004_create_physical_tables";
    let old = "0".repeat(64);
    let conn = db.connect().await;
    // What a released migration edited after it was applied looks like from the database.
    exec(
        &conn,
        &format!("UPDATE ampd_migrations SET checksum = '{old}' WHERE version = '{name}'"),
    )
    .await;
    let refused = cli::ampd_with_config(&config, &["migrate"]).await;
    // The refusal names the way out.
    refused
        .assert_code(1)
        .assert_stderr_contains(format!("ampd migrate accept-checksum {name} --reason"));

    let reason = "sea-query 1.1 renamed Func::cust; the SQL is the same";
    let accepted = cli::ampd_with_config(
        &config,
        &["migrate", "accept-checksum", name, "--reason", reason],
    )
    .await;
    accepted.assert_success();
    let new = migration::checksum_of(name).unwrap();
    accepted.assert_stdout_contains(format!(
        "accepted checksum {new} for {name} (was {old}, algorithm 2)"
    ));

    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_success();
    let states = status(&config).await;
    let row = entry(&states, name);
    assert_eq!(row["checksum"], "ok");
    let changes = row["checksum_changes"].as_array().expect("history");
    assert_eq!(changes.len(), 1, "{row}");
    assert_eq!(changes[0]["checksum"], old.as_str());
    assert_eq!(changes[0]["algorithm"], 2);
    assert_eq!(changes[0]["accepted"], new);
    assert_eq!(changes[0]["reason"], reason);
    assert!(changes[0]["at"].as_str().is_some_and(|t| !t.is_empty()));

    // Nothing left to accept.
    let again = cli::ampd_with_config(
        &config,
        &["migrate", "accept-checksum", name, "--reason", reason],
    )
    .await;
    again
        .assert_success()
        .assert_stdout_contains("nothing changed");
}

#[tokio::test]
async fn accept_checksum_refuses_what_it_cannot_accept() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let name = "m20261101_000001_create_workers";

    let pending = cli::ampd_with_config(
        &config,
        &["migrate", "accept-checksum", name, "--reason", "x"],
    )
    .await;
    pending
        .assert_code(1)
        .assert_stderr_contains(format!("migration {name} is not applied to this database"));

    let unknown = cli::ampd_with_config(
        &config,
        &["migrate", "accept-checksum", "m1_unknown", "--reason", "x"],
    )
    .await;
    unknown
        .assert_code(1)
        .assert_stderr_contains("this ampd has no migration m1_unknown");

    for args in [
        vec!["migrate", "accept-checksum", name],
        vec!["migrate", "accept-checksum", name, "--reason", "  "],
    ] {
        let out = cli::run(
            cli::ampd(),
            &[&["--config", config.to_str().unwrap()], args.as_slice()].concat(),
            &[],
            Duration::from_secs(30),
        )
        .await;
        out.assert_code(1).assert_stderr_contains("--reason");
    }
    let conn = db.connect().await;
    assert!(tests::catalog::tables(&conn).await.is_empty());
}

#[tokio::test]
async fn migrations_applied_by_seaorms_cli_are_marked_when_ampd_records_them() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    migration::Migrator::up(&conn, None)
        .await
        .expect("SeaORM's migrator");
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_success();
    for name in migration::CHECKSUMS.iter().map(|(n, _)| n) {
        out.assert_stdout_contains(format!("recorded {name} (applied earlier without ampd)"));
    }
    for s in status(&config).await {
        assert_eq!(s["checksum"], "ok", "{s}");
        assert_eq!(s["applied_by"], "outside-ampd", "{s}");
        assert!(s["duration_ms"].is_null(), "{s}");
    }
    let human = cli::ampd_with_config(&config, &["migrate", "status"]).await;
    human.assert_stdout_contains("outside ampd");
    let not_adopted: Vec<String> = tests::sql::column(
        &conn,
        "SELECT version FROM ampd_migrations WHERE NOT adopted",
    )
    .await;
    assert!(not_adopted.is_empty(), "every row is marked adopted");
}
