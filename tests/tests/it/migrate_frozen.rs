//! `ampd migrate` on a frozen network (the harness's fault proxy stalling every byte, as a paused
//! VM or a partition does): the run gives up within its configured bounds plus the stated margin,
//! and says what it waited for.
//! - Under the lock wait: another session holds the migration lock, the network freezes while the
//!   run waits; with `migration_lock_timeout_secs = 3` it fails within the bound plus its margin.
//! - Under the startup: a listener that never answers; the time the message states is the time it
//!   took.

use std::time::Duration;

use sea_orm::ConnectionTrait;
use tests::TestDb;
use tests::cli::{self, TempDir};
use tests::proxy::{Fault, FaultProxy};

#[tokio::test]
async fn a_network_that_freezes_during_the_lock_wait_fails_within_the_bound() {
    let db = TestDb::empty().await;
    let holder = db.connect().await;
    holder
        .execute_unprepared(&format!(
            "SELECT pg_advisory_lock({})",
            ampd::migrate::LOCK_KEY
        ))
        .await
        .expect("hold the migration lock");
    let proxy = FaultProxy::start(db.url()).await;
    let dir = TempDir::new();
    let config = dir.config(proxy.url(), "migration_lock_timeout_secs = 3");
    let run = tokio::spawn({
        let config = config.clone();
        async move {
            cli::run(
                cli::ampd(),
                &["--config", config.to_str().unwrap(), "migrate"],
                &[],
                Duration::from_secs(25),
            )
            .await
        }
    });
    // Freeze the network once the run asks for the lock.
    let asking = async {
        loop {
            let n = tests::sql::count(
                &holder,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND query LIKE 'SELECT pg_try_advisory%'",
            )
            .await;
            if n > 0 || run.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), asking)
        .await
        .expect("the run asks for the lock");
    proxy.set(Fault::Stall);
    let out = run.await.expect("the run");
    println!("frozen lock wait: {:?}\n{}", out.elapsed, out.all());
    out.assert_code(1);
    assert!(
        out.elapsed < Duration::from_secs(15),
        "{:?}: {}",
        out.elapsed,
        out.all()
    );
    out.assert_stderr_contains("migration lock")
        .assert_stderr_contains("no answer");
}

#[tokio::test]
async fn a_listener_that_never_answers_is_given_up_in_the_time_the_message_states() {
    let db = TestDb::empty().await;
    let proxy = FaultProxy::start(db.url()).await;
    proxy.set(Fault::Stall);
    let dir = TempDir::new();
    let config = dir.config(proxy.url(), "connect_timeout_secs = 2");
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    println!("frozen startup: {:?}\n{}", out.elapsed, out.all());
    out.assert_code(1);
    let stated: f64 = out
        .stderr
        .split("gave up after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no time stated: {}", out.stderr));
    // The process' own start and exit aside, the stated time is the time it took.
    assert!(
        out.elapsed.as_secs_f64() - stated < 0.5,
        "took {:?}, stated {stated} s",
        out.elapsed
    );
    assert!(out.elapsed < Duration::from_secs(10), "{:?}", out.elapsed);
}

/// The timer states (`tr` of `/proc/net/tcp`: 2 is keepalive) of the TCP sockets connected to
/// `port` on this machine's loopback.
fn timers_to(port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(timer)) = (fields.get(2), fields.get(5)) else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port) {
                out.extend(
                    timer
                        .split(':')
                        .next()
                        .and_then(|t| u8::from_str_radix(t, 16).ok()),
                );
            }
        }
    }
    out
}

#[tokio::test]
async fn the_migration_session_has_tcp_keepalive() {
    if !std::path::Path::new("/proc/net/tcp").exists() {
        tests::not_run(
            "the_migration_session_has_tcp_keepalive",
            "no /proc/net/tcp",
        );
        return;
    }
    let db = TestDb::empty().await;
    let holder = db.connect().await;
    holder
        .execute_unprepared(&format!(
            "SELECT pg_advisory_lock({})",
            ampd::migrate::LOCK_KEY
        ))
        .await
        .expect("hold the migration lock");
    let proxy = FaultProxy::start(db.url()).await;
    let port: u16 = url::Url::parse(proxy.url())
        .ok()
        .and_then(|u| u.port())
        .expect("proxy port");
    // A connection nobody set keepalive on shows none: the probe can fail.
    let plain = tests::connect(proxy.url(), 1).await;
    plain
        .execute_unprepared("SELECT 1")
        .await
        .expect("a plain query");
    assert!(
        !timers_to(port).contains(&2),
        "keepalive before ampd ran: {:?}",
        timers_to(port)
    );
    let dir = TempDir::new();
    let config = dir.config(proxy.url(), "migration_lock_timeout_secs = 20");
    let mut child = cli::command(cli::ampd(), &config, &["migrate"])
        .spawn()
        .expect("spawn");
    let found = async {
        loop {
            if timers_to(port).contains(&2) {
                return true;
            }
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let found = tokio::time::timeout(Duration::from_secs(15), found)
        .await
        .unwrap_or(false);
    let _ = child.kill().await;
    assert!(
        found,
        "no socket to the server with keepalive: {:?}",
        timers_to(port)
    );
}
