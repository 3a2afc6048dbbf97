//! ampd behind a real PgBouncer (Debian's `pgbouncer`, started by the test on a free port):
//! - session mode: `ampd migrate` and the services work through it, also eight runs at once;
//! - transaction mode: pointing the session-bound work at it is refused before any change, with
//!   the fix in the message; with `direct_url` on the server itself, `ampd migrate` works, also
//!   eight runs at once; the services' pool on it works when PgBouncer keeps prepared statements
//!   (1.21+) and is refused with the reason otherwise.
//!
//! Outputs are printed for the record (`-- --nocapture`).

use std::time::Duration;

use tests::TestDb;
use tests::cli::{self, TempDir, config_toml};
use tests::pgbouncer::{PgBouncer, PoolMode};
use tests::services::{Service, Workspace};
use tests::sql::count;

/// How many migrations the schema has.
fn schema_migrations() -> i64 {
    tests::schema_migration_count() as i64
}

/// `ampd --config <config> <args>`, printed for the record.
async fn ampd(label: &str, config: &std::path::Path, args: &[&str]) -> cli::Output {
    let out = cli::ampd_with_config(config, args).await;
    println!(
        "--- {label}: ampd {} -> exit {:?}\n{}{}",
        args.join(" "),
        out.code,
        out.stdout,
        out.stderr
    );
    out
}

/// Eight `ampd migrate` at once: all exit 0, exactly one applies the migrations.
async fn eight_at_once(label: &str, config: &std::path::Path, db: &TestDb) {
    let (outputs, took) = cli::ampd_concurrently(config, &["migrate"], 8).await;
    // Each step runs under its own lock, so the runs may share the steps out between them; together
    // they apply every migration once.
    let mut applied = 0;
    for out in outputs {
        out.assert_success().assert_not_in_output("deadlock");
        applied += out.applied() as i64;
    }
    println!(
        "--- {label}: 8 concurrent `ampd migrate`: all exited 0 in {:?}; together they applied \
         {applied} migrations",
        took
    );
    assert_eq!(applied, schema_migrations());
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

/// PgBouncer in transaction mode with `pool_size` server connections, if it is installed.
fn transaction_mode(pool_size: u32) -> Option<PgBouncer> {
    PgBouncer::start(
        PoolMode::Transaction,
        pool_size,
        "pgbouncer transaction mode",
    )
}

/// The `[metadata_db]` line that sends session-bound work to `url`.
fn direct_url(url: &str) -> String {
    format!("direct_url = \"{url}\"")
}

/// The `[storage]` and `[worker]` keys of a worker's config, in `workspace`.
fn worker_sections(workspace: &Workspace) -> String {
    format!(
        "\n[storage]\ndata_dir = {:?}\n\n[worker]\nsources_dir = {:?}\n",
        workspace.data_dir().display().to_string(),
        workspace.sources_dir().display().to_string()
    )
}

/// Runs `ampd worker --node-id <node>` on `config` until it has registered, then stops it with
/// SIGTERM; returns its log.
async fn worker_registers_then_stops(config: &std::path::Path, node: &str) -> String {
    let mut worker = Service::start("worker", config, &["worker", "--node-id", node], &[]);
    worker
        .wait_for_log(Duration::from_secs(30), |log| {
            log.contains("worker registered")
        })
        .await;
    let exit = worker.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    exit.log
}

#[tokio::test]
async fn session_mode_migrate_and_services_work_through_pgbouncer() {
    let Some(bouncer) = PgBouncer::start(PoolMode::Session, 20, "pgbouncer session mode") else {
        return;
    };
    println!("--- PgBouncer {:?}, pool_mode = session", bouncer.version());
    let db = TestDb::empty().await;
    let workspace = Workspace::new();
    let config = workspace.path().join("config.toml");
    std::fs::write(
        &config,
        config_toml(&bouncer.url(db.name()), &worker_sections(&workspace)),
    )
    .expect("config");

    let out = ampd("session mode", &config, &["migrate"]).await;
    out.assert_success()
        .assert_stdout_contains(format!("applied {} migrations", schema_migrations()));
    let out = ampd("session mode", &config, &["migrate", "status"]).await;
    out.assert_success()
        .assert_stdout_contains(format!("{} applied, 0 pending", schema_migrations()));

    // A worker (node-id claim and LISTEN on session connections, its pool too) through PgBouncer.
    let node = format!("pgbs{}", std::process::id());
    let log = worker_registers_then_stops(&config, &node).await;
    println!("--- session mode: ampd worker --node-id {node}\n{log}");
}

#[tokio::test]
async fn session_mode_eight_concurrent_runs_through_pgbouncer_stay_correct() {
    // Fewer server connections than runs: some runs queue in PgBouncer for a connection.
    let Some(bouncer) = PgBouncer::start(PoolMode::Session, 4, "pgbouncer session mode x8") else {
        return;
    };
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(&bouncer.url(db.name()), "");
    eight_at_once("session mode, 4 server connections", &config, &db).await;
}

#[tokio::test]
async fn transaction_mode_as_the_only_url_is_refused_before_any_change_with_the_fix() {
    let Some(bouncer) = transaction_mode(4) else {
        return;
    };
    println!(
        "--- PgBouncer {:?}, pool_mode = transaction",
        bouncer.version()
    );
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(&bouncer.url(db.name()), "");

    let out = ampd("transaction mode, url only", &config, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("metadata_db.url (postgresql://postgres@127.0.0.1:")
        .assert_stderr_contains("does not give a connection a session of its own")
        .assert_stderr_contains("Set metadata_db.direct_url to PostgreSQL itself")
        .assert_stderr_contains("nothing was changed");
    let conn = db.connect().await;
    assert!(
        tests::catalog::tables(&conn).await.is_empty(),
        "no DDL ran, not even bookkeeping"
    );

    // Reading needs no session of its own: status and the dry run work through it.
    let out = ampd(
        "transaction mode, url only",
        &config,
        &["migrate", "status"],
    )
    .await;
    out.assert_success()
        .assert_stdout_contains(format!("0 applied, {} pending", schema_migrations()));
}

#[tokio::test]
async fn transaction_mode_with_direct_url_migrates_and_eight_runs_stay_correct() {
    let Some(bouncer) = transaction_mode(2) else {
        return;
    };
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(&bouncer.url(db.name()), &direct_url(db.url()));
    eight_at_once(
        "transaction mode as url, direct_url on the server",
        &config,
        &db,
    )
    .await;
    let out = ampd("transaction mode, direct_url", &config, &["migrate"]).await;
    out.assert_success()
        .assert_stdout_contains("schema is up to date");
}

#[tokio::test]
async fn transaction_mode_as_direct_url_is_refused_for_listen_and_claims() {
    let Some(bouncer) = transaction_mode(4) else {
        return;
    };
    let db = TestDb::migrated().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), &direct_url(&bouncer.url(db.name())));
    let node = format!("pgbt{}", std::process::id());
    let out = ampd(
        "transaction mode as direct_url",
        &config,
        &["worker", "--node-id", &node],
    )
    .await;
    out.assert_code(1)
        .assert_stderr_contains("metadata_db.direct_url (postgresql://postgres@127.0.0.1:")
        .assert_stderr_contains("LISTEN and node-id claims could not stay on one session");
}

#[tokio::test]
async fn services_with_a_transaction_mode_url_work_when_pgbouncer_keeps_prepared_statements() {
    let Some(bouncer) = transaction_mode(4) else {
        return;
    };
    let db = TestDb::migrated().await;
    let workspace = Workspace::new();
    let config = workspace.path().join("config.toml");
    std::fs::write(
        &config,
        config_toml(
            &bouncer.url(db.name()),
            &format!("{}\n{}", direct_url(db.url()), worker_sections(&workspace)),
        ),
    )
    .expect("config");
    let node = format!("pgbp{}", std::process::id());
    if bouncer.keeps_prepared_statements() {
        let log = worker_registers_then_stops(&config, &node).await;
        println!("--- transaction mode url, direct_url: ampd worker\n{log}");
    } else {
        // PgBouncer before 1.21 hands a client's prepared statements to other clients and loses
        // them between transactions; ampd's pool would fail at random, so it refuses to start.
        let out = ampd(
            "transaction mode url (PgBouncer before 1.21), direct_url",
            &config,
            &["worker", "--node-id", &node],
        )
        .await;
        out.assert_code(1)
            .assert_stderr_contains("does not keep prepared statements across transactions")
            .assert_stderr_contains("max_prepared_statements");
    }
}

#[tokio::test]
async fn a_startup_parameter_pgbouncer_refuses_is_not_reported_as_a_password_problem() {
    let Some(bouncer) = PgBouncer::start(PoolMode::Session, 2, "pgbouncer startup parameters")
    else {
        return;
    };
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    // ampd itself sends none; an `options` the operator puts in the URL is sent as given.
    let url = format!("{}?options=-c%20work_mem%3D64MB", bouncer.url(db.name()));
    let config = dir.config(&url, "");
    let out = ampd("a refused startup parameter", &config, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains(
            "the server refused the connection: unsupported startup parameter: options",
        )
        .assert_stderr_lacks("password");
}
