//! The long-running subcommands, run as a user runs them: they migrate on startup when asked to,
//! a node id can be run by one worker process at a time, and SIGTERM stops them with exit 0, also
//! while they are still starting.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tests::TestDb;
use tests::cli::{self, TempDir};
use tests::services::eventually;

fn spawn(config: &std::path::Path, args: &[&str]) -> tokio::process::Child {
    cli::command(cli::ampd(), config, args)
        .spawn()
        .expect("spawn ampd")
}

/// When worker `node_id` last registered (microseconds since the epoch), if it has.
async fn registered_at(db: &DatabaseConnection, node_id: &str) -> Option<i64> {
    let sql = format!(
        "SELECT (extract(epoch FROM registered_at) * 1000000)::bigint FROM workers \
         WHERE node_id = '{node_id}'"
    );
    match db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
    {
        Ok(Some(row)) => row.try_get_by_index::<i64>(0).ok(),
        _ => None,
    }
}

/// Waits until worker `node_id` has registered after `since` (a `registered_at` read before the
/// process was started; `None`: never registered before).
async fn wait_registered_after(db: &DatabaseConnection, node_id: &str, since: Option<i64>) {
    eventually(&format!("{node_id} registers"), || async {
        registered_at(db, node_id)
            .await
            .is_some_and(|at| since.is_none_or(|since| at > since))
    })
    .await;
}

async fn wait_registered(db: &DatabaseConnection, node_id: &str) {
    wait_registered_after(db, node_id, None).await;
}

/// Sends SIGTERM; the process must exit 0 within 20 s. Returns its stderr.
async fn terminate(child: tokio::process::Child) -> String {
    let pid = child.id().expect("running") as i32;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("stops after SIGTERM")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "exit 0 after SIGTERM: {stderr}");
    stderr
}

#[tokio::test]
async fn a_node_id_runs_in_one_worker_process_at_a_time() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "auto_migrate = true");
    let conn = db.connect().await;
    let node = tests::unique_name("w1");
    let worker = ["worker", "--node-id", node.as_str()];

    let first = spawn(&config, &worker);
    wait_registered(&conn, &node).await;

    let second = spawn(&config, &worker);
    let out = tokio::time::timeout(Duration::from_secs(30), second.wait_with_output())
        .await
        .expect("the second worker gives up")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("node id \"{node}\" is claimed by another process")),
        "{stderr}"
    );

    terminate(first).await;

    // Once the first is gone, the node id is free again: a third process claims it and registers
    // anew (a registration newer than the first one's).
    let before = registered_at(&conn, &node).await;
    assert!(before.is_some(), "the first worker registered");
    let third = spawn(&config, &worker);
    wait_registered_after(&conn, &node, before).await;
    terminate(third).await;
}

#[tokio::test]
async fn sigterm_while_a_service_is_still_starting_stops_it_with_exit_0() {
    // The worker migrates on startup, and is kept waiting for the migration lock (held here); the
    // SIGTERM arrives while it waits. It stops at once, with exit 0, having migrated nothing.
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "auto_migrate = true");
    let conn = db.connect().await;
    // Hold the migration lock, so the worker cannot get past migrating.
    let key = ampd::migrate::LOCK_KEY;
    conn.execute_unprepared(&format!("SELECT pg_advisory_lock({key})"))
        .await
        .expect("take the migration lock");
    let node = tests::unique_name("w1");
    let child = spawn(&config, &["worker", "--node-id", node.as_str()]);
    // Evidence that it is waiting for the lock: a session of this database (not this one) that
    // asks for it (a waiting run polls pg_try_advisory_xact_lock).
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND query LIKE 'SELECT pg_try_advisory%'"
        .to_owned();
    eventually("the worker asks for the migration lock", || async {
        tests::sql::count(&conn, &waiting).await > 0
    })
    .await;
    let stderr = terminate(child).await;
    conn.execute_unprepared(&format!("SELECT pg_advisory_unlock({key})"))
        .await
        .expect("release the migration lock");
    assert!(
        tests::catalog::tables(&conn).await.is_empty(),
        "nothing was migrated: {stderr}"
    );
}

#[tokio::test]
async fn solo_migrates_on_startup_by_default_and_stops_cleanly() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    // The admin API and the server listen on free ports, not the default ones another process may
    // hold, and the amp directory is the test's own.
    let addrs = format!(
        "\n[controller]\nadmin_addr = \"{}\"\n[server]\naddr = \"{}\"",
        tests::services::free_addr(),
        tests::services::free_addr()
    );
    let config = dir.config(db.url(), &addrs);
    let conn = db.connect().await;

    let amp_dir = dir.path().join("amp").display().to_string();
    let solo = spawn(&config, &["solo", "--amp-dir", &amp_dir]);
    wait_registered(&conn, "solo").await;
    let stderr = terminate(solo).await;
    let applied = format!("applied {} migrations", tests::schema_migration_count());
    assert!(stderr.contains(&applied), "{stderr}");
}

#[tokio::test]
async fn a_service_without_auto_migrate_does_not_touch_the_schema() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "auto_migrate = false");
    let node = tests::unique_name("w1");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        spawn(&config, &["worker", "--node-id", node.as_str()]).wait_with_output(),
    )
    .await
    .expect("exits")
    .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the metadata database is not migrated ({} pending migration(s)): run `ampd migrate`",
            tests::schema_migration_count()
        )),
        "{stderr}"
    );
    let conn = db.connect().await;
    assert!(
        tests::catalog::tables(&conn).await.is_empty(),
        "nothing created: {stderr}"
    );
}
