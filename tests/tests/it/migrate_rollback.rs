//! Safe binary roll-back: a service of a previous release (the fixture binary with the schema's
//! migrations) starts on a database a newer release (the schema's and more) migrated, when every
//! migration it does not know is recorded as compatible (warning with their names), and refuses
//! once one is not; `ampd migrate` of the previous release keeps refusing the newer database.

use tests::TestDb;
use tests::cli;
use tests::fixtures::{BREAKING, EXPAND};
use tests::services::{Service, Workspace, free_addr};

/// The schema's migrations that `migration::compat` marks compatible, in order.
fn schema_compatible() -> Vec<String> {
    tests::schema_migrations()
        .into_iter()
        .filter(|name| migration::compat::is_compatible(name))
        .collect()
}

/// Starts the previous release's server on `config`, with `env` added.
fn previous_server(config: &std::path::Path, env: &[(&str, &str)]) -> Service {
    let mut cmd = tokio::process::Command::new(cli::ampd_fixture());
    cmd.arg("--config").arg(config).arg("server");
    let mut all = vec![("AMPD_FIXTURE_MIGRATIONS", "previous")];
    all.extend_from_slice(env);
    Service::spawn("previous release's server", cmd, &all)
}

#[tokio::test]
async fn a_previous_release_starts_on_compatible_migrations_and_refuses_after_an_incompatible_one()
{
    let db = TestDb::empty().await;
    let ws = Workspace::new();
    let addr = free_addr();
    let config = ws.config(
        "server.toml",
        db.url(),
        &format!("[server]\naddr = \"{addr}\"\n"),
    );
    // The newer release migrates: the schema's migrations, then a compatible expand step.
    let out = cli::fixture_with_config(&config, "expand", &["migrate"]).await;
    out.assert_success();
    let conn = db.connect().await;
    let compatible: Vec<String> = tests::sql::column(
        &conn,
        "SELECT version::text FROM ampd_migrations WHERE compatible ORDER BY version",
    )
    .await;
    let mut expected = schema_compatible();
    expected.push(EXPAND.name.to_owned());
    assert_eq!(compatible, expected);

    // The previous release's `ampd migrate` still refuses the newer database.
    let out = cli::fixture_with_config(&config, "previous", &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("database is newer than this ampd");

    // Its services start on it (with or without auto_migrate), warning with the name.
    for env in [
        vec![],
        vec![("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
    ] {
        let mut server = previous_server(&config, &env);
        server.wait_healthy(addr).await;
        let log = server.log();
        assert!(
            log.contains("the database is newer than this ampd") && log.contains(EXPAND.name),
            "{env:?}: {log}"
        );
        let exit = server.stop().await;
        assert_eq!(exit.code, Some(0), "{}", exit.log);
    }
    // And its validate agrees with the database.
    let out = cli::fixture_with_config(&config, "previous", &["migrate", "validate"]).await;
    out.assert_success();

    // The newer release applies a step that is not compatible: the previous release refuses,
    // naming it (and only it).
    let out = cli::fixture_with_config(&config, "expand-breaking", &["migrate"]).await;
    out.assert_success();
    for env in [
        vec![],
        vec![("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
    ] {
        let exit = previous_server(&config, &env).wait().await;
        assert_eq!(exit.code, Some(1), "{env:?}: {}", exit.log);
        let error = exit
            .log
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{env:?}: no error line: {}", exit.log));
        assert!(
            error.contains("database is newer than this ampd")
                && error.contains(BREAKING.name)
                && error.contains("not recorded as compatible")
                && !error.contains(EXPAND.name),
            "{env:?}: {error}"
        );
    }
    let out = cli::fixture_with_config(&config, "previous", &["migrate", "validate"]).await;
    out.assert_code(1)
        .assert_stdout_contains(format!("PROBLEM  {}", BREAKING.name));
}

#[tokio::test]
async fn a_history_table_from_before_the_compatibility_flag_is_upgraded_and_reads_as_not_compatible()
 {
    let db = TestDb::empty().await;
    let dir = cli::TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::fixture_with_config(&config, "previous", &["migrate"]).await;
    out.assert_success();
    let conn = db.connect().await;
    // `ampd_migrations` as an ampd without the flag left it.
    sea_orm::ConnectionTrait::execute_unprepared(
        &conn,
        "ALTER TABLE ampd_migrations DROP COLUMN compatible, DROP COLUMN baseline",
    )
    .await
    .expect("old layout");
    let out = cli::ampd_with_config(&config, &["migrate", "validate"]).await;
    out.assert_success();

    // A newer release applies a compatible migration: recorded as such, while the rows the old
    // layout held (compatible ones of the schema among them) read as not compatible.
    let out = cli::fixture_with_config(&config, "expand", &["migrate"]).await;
    out.assert_success()
        .assert_stdout_contains("applied 1 migration ");
    let compatible: Vec<String> = tests::sql::column(
        &conn,
        "SELECT version::text FROM ampd_migrations WHERE compatible ORDER BY version",
    )
    .await;
    assert!(!schema_compatible().is_empty());
    assert_eq!(
        compatible,
        [EXPAND.name.to_owned()],
        "old rows read as not compatible"
    );
}
