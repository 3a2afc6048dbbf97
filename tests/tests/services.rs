//! The long-running subcommands, run as a user runs them: they migrate on startup when asked to,
//! a node id can be run by one worker process at a time, and SIGTERM stops them with exit 0.

use std::process::Stdio;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tests::TestDb;
use tests::cli::{self, TempDir, config_toml};

fn spawn(config: &std::path::Path, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(cli::ampd())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ampd")
}

async fn registered(db: &DatabaseConnection, node_id: &str) -> bool {
    let sql = format!("SELECT count(*) FROM workers WHERE node_id = '{node_id}'");
    match db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
    {
        Ok(Some(row)) => row.try_get_by_index::<i64>(0).unwrap_or(0) > 0,
        _ => false,
    }
}

async fn wait_registered(db: &DatabaseConnection, node_id: &str) {
    let started = Instant::now();
    while !registered(db, node_id).await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{node_id} never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn terminate(child: tokio::process::Child) -> std::process::Output {
    let pid = child.id().expect("running") as i32;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("stops after SIGTERM")
        .expect("output")
}

#[tokio::test]
async fn a_node_id_runs_in_one_worker_process_at_a_time() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.file("config.toml", &config_toml(db.url(), "auto_migrate = true"));
    let conn = db.connect().await;

    let first = spawn(&config, &["worker", "--node-id", "w1"]);
    wait_registered(&conn, "w1").await;

    let second = spawn(&config, &["worker", "--node-id", "w1"]);
    let out = tokio::time::timeout(Duration::from_secs(30), second.wait_with_output())
        .await
        .expect("the second worker gives up")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("node id \"w1\" is claimed by another process"),
        "{stderr}"
    );

    let out = terminate(first).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Once the first is gone, the node id is free again.
    let third = spawn(&config, &["worker", "--node-id", "w1"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = Instant::now();
    wait_registered(&conn, "w1").await;
    let out = terminate(third).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(before.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn solo_migrates_on_startup_by_default_and_stops_cleanly() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    // The admin API listens: on a free port, not the default one another process may hold.
    let admin = format!(
        "\n[controller]\nadmin_addr = \"{}\"",
        tests::services::free_addr()
    );
    let config = dir.file("config.toml", &config_toml(db.url(), &admin));
    let conn = db.connect().await;

    let solo = spawn(&config, &["solo"]);
    wait_registered(&conn, "solo").await;
    let out = terminate(solo).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("applied 7 migrations"), "{stderr}");
}

#[tokio::test]
async fn a_service_without_auto_migrate_does_not_touch_the_schema() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.file(
        "config.toml",
        &config_toml(db.url(), "auto_migrate = false"),
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        spawn(&config, &["worker", "--node-id", "w1"]).wait_with_output(),
    )
    .await
    .expect("exits")
    .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "the metadata database is not migrated (7 pending migration(s)): run `ampd migrate`"
        ),
        "{stderr}"
    );
    let conn = db.connect().await;
    assert!(
        tests::catalog::tables(&conn).await.is_empty(),
        "nothing created: {stderr}"
    );
}
