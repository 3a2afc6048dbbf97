//! ampd's connection pool behind a connection that stalls for good (a blackholed socket: a peer
//! that vanished, an expired NAT mapping), while new connections to the server work.
//!
//! A statement abandoned on such a connection (its future dropped, as a request timeout does)
//! hands the connection back to the pool, which pings it before reusing it. That ping gets no
//! answer either; it must not keep the connection's slot in the pool for longer than a bound, or a
//! few stalls leave the pool with no slot to open a working connection in.

use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use tests::TestDb;
use tests::proxy::FaultProxy;

/// Issue 21 (also-list; sqlx issue 4349): a pool of one whose connection is blackholed after a
/// statement was abandoned on it opens a new connection and answers again within a bound, instead
/// of timing out every acquire until the kernel gives up on the socket.
#[tokio::test]
async fn a_blackholed_connection_handed_back_to_the_pool_frees_its_slot() {
    let db = TestDb::empty().await;
    let proxy = FaultProxy::start(db.url()).await;
    let cfg = tests::metadata_config_with(proxy.url(), "acquire_timeout_secs = 1");
    let pool = ampd::db::connect(&cfg, 1).await.expect("pool");
    pool.execute_unprepared("SELECT 1").await.expect("works");
    assert_eq!(proxy.open_connections(), 1);

    proxy.blackhole_open();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        pool.execute_unprepared("SELECT 1"),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the statement got an answer: {abandoned:?}"
    );

    // New connections pass the proxy: the pool answers again once the stalled connection has
    // given up its slot. Each try waits at most the acquire timeout (1 s).
    let started = Instant::now();
    while let Err(e) = pool.execute_unprepared("SELECT 1").await {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the pool stays exhausted behind the blackholed connection: {e}"
        );
    }
    let took = started.elapsed();
    println!("the pool answered again {took:?} after the blackholed connection was abandoned");
    assert!(proxy.open_connections() >= 2, "a new connection was opened");
}
