//! `metadata::workers`: registration, heartbeats, liveness, and exclusive node claims.

use std::time::Duration;

use ampd::metadata::{Error, workers};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::json;
use tests::TestDb;

async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Claims `node_id`, polling while another connection (one that is going away) still holds it;
/// fails if it is still held after 10 s.
async fn claim_once_free(
    cfg: &ampd::config::MetadataDbConfig,
    node_id: &str,
) -> workers::NodeClaim {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match workers::claim(cfg, node_id).await {
            Ok(claim) => return claim,
            Err(Error::Conflict(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{node_id} is still claimed 10 s after its holder went: {e}"),
        }
    }
}

#[tokio::test]
async fn register_upserts_by_node_id_keeping_created_at_and_refreshing_the_rest() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let first = workers::register(&conn, "w1", json!({"version": "1.0.0"}))
        .await
        .expect("register");
    assert_eq!(first.info, json!({"version": "1.0.0"}));
    exec(
        &conn,
        "UPDATE workers SET created_at = now() - interval '1 day', \
         registered_at = now() - interval '1 day', heartbeat_at = now() - interval '1 day'",
    )
    .await;
    let old = workers::get(&conn, "w1").await.unwrap().expect("stored");

    let again = workers::register(&conn, "w1", json!({"version": "1.1.0"}))
        .await
        .expect("register again");

    assert_eq!(again.id, first.id, "same row");
    assert_eq!(again.info, json!({"version": "1.1.0"}));
    assert_eq!(again.created_at, old.created_at, "created_at is set once");
    assert!(again.registered_at > old.registered_at);
    assert!(again.heartbeat_at > old.heartbeat_at);
    assert_eq!(workers::list(&conn).await.unwrap().len(), 1);
}

#[tokio::test]
async fn register_with_an_invalid_node_id_is_invalid_input() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let too_long = format!("w{}", "x".repeat(64));
    for bad in [
        "",
        "1worker",
        "_w",
        "w 1",
        "w/1",
        "wörker",
        too_long.as_str(),
    ] {
        let err = workers::register(&conn, bad, json!({}))
            .await
            .expect_err(bad);
        match err {
            Error::InvalidInput(message) => assert!(message.contains("node id"), "{message}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let longest = format!("w{}", "x".repeat(63));
    for good in ["w", "Worker-1.eu_west", longest.as_str()] {
        workers::register(&conn, good, json!({}))
            .await
            .unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
    assert_eq!(workers::list(&conn).await.unwrap().len(), 3);
}

#[tokio::test]
async fn heartbeat_moves_heartbeat_at_and_keeps_registered_at() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    workers::register(&conn, "w1", json!({})).await.unwrap();
    exec(
        &conn,
        "UPDATE workers SET heartbeat_at = now() - interval '1 minute'",
    )
    .await;
    let before = workers::get(&conn, "w1").await.unwrap().unwrap();

    workers::heartbeat(&conn, "w1").await.expect("heartbeat");

    let after = workers::get(&conn, "w1").await.unwrap().unwrap();
    assert!(after.heartbeat_at > before.heartbeat_at);
    assert_eq!(after.registered_at, before.registered_at);
}

#[tokio::test]
async fn heartbeat_of_an_unknown_worker_is_not_found() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    workers::register(&conn, "w1", json!({})).await.unwrap();
    let err = workers::heartbeat(&conn, "ghost")
        .await
        .expect_err("unknown");
    assert!(
        matches!(&err, Error::NotFound { entity: "worker", key } if key == "ghost"),
        "{err:?}"
    );
}

#[tokio::test]
async fn list_live_keeps_workers_whose_heartbeat_is_within_the_window() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    for node in ["fresh", "stale", "dead"] {
        workers::register(&conn, node, json!({})).await.unwrap();
    }
    exec(
        &conn,
        "UPDATE workers SET heartbeat_at = now() - interval '3 seconds' WHERE node_id = 'stale'",
    )
    .await;
    exec(
        &conn,
        "UPDATE workers SET heartbeat_at = now() - interval '1 hour' WHERE node_id = 'dead'",
    )
    .await;

    let live = |window| {
        let conn = conn.clone();
        async move {
            workers::list_live(&conn, window)
                .await
                .unwrap()
                .into_iter()
                .map(|w| w.node_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(live(Duration::from_secs(1)).await, ["fresh"]);
    assert_eq!(live(Duration::from_secs(5)).await, ["fresh", "stale"]);
    assert_eq!(
        live(Duration::from_secs(7200)).await,
        ["dead", "fresh", "stale"]
    );
}

#[tokio::test]
async fn a_signed_off_worker_is_not_live_and_still_reads_back() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    workers::register(&conn, "w1", json!({}))
        .await
        .expect("register");
    workers::register(&conn, "w2", json!({}))
        .await
        .expect("register");
    workers::sign_off(&conn, "w1").await.expect("sign off");

    let live = workers::list_live(&conn, Duration::from_secs(3600))
        .await
        .expect("list live");
    assert_eq!(
        live.iter().map(|w| w.node_id.as_str()).collect::<Vec<_>>(),
        ["w2"]
    );
    // The row reads back, through `get` and `list` alike.
    let w1 = workers::get(&conn, "w1").await.expect("get").expect("w1");
    assert_eq!(w1.heartbeat_at.timestamp(), 0);
    assert_eq!(workers::list(&conn).await.expect("list").len(), 2);
    assert!(matches!(
        workers::sign_off(&conn, "ghost").await,
        Err(Error::NotFound { .. })
    ));
    // Registering again makes it live again.
    workers::register(&conn, "w1", json!({}))
        .await
        .expect("register");
    assert_eq!(
        workers::list_live(&conn, Duration::from_secs(3600))
            .await
            .expect("list live")
            .len(),
        2
    );
}

#[tokio::test]
async fn get_and_list_return_registered_workers() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    assert!(workers::get(&conn, "w1").await.unwrap().is_none());
    workers::register(&conn, "w2", json!({})).await.unwrap();
    workers::register(&conn, "w1", json!({})).await.unwrap();
    let nodes: Vec<String> = workers::list(&conn)
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.node_id)
        .collect();
    assert_eq!(nodes, ["w1", "w2"]);
    assert_eq!(
        workers::get(&conn, "w2").await.unwrap().unwrap().node_id,
        "w2"
    );
}

#[tokio::test]
async fn only_one_of_two_connections_claims_a_node_id_until_the_first_is_released() {
    let db = TestDb::migrated().await;
    let (w1, w2) = (tests::unique_name("w1"), tests::unique_name("w2"));
    let first = workers::claim(&db.config(), &w1)
        .await
        .expect("first claim");
    assert_eq!(first.node_id(), w1);

    let err = workers::claim(&db.config(), &w1)
        .await
        .expect_err("already claimed");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    let other = workers::claim(&db.config(), &w2)
        .await
        .expect("another node id is free");

    first.release().await.expect("release");
    let second = workers::claim(&db.config(), &w1)
        .await
        .expect("free after release");
    drop((second, other));
}

#[tokio::test]
async fn dropping_a_node_claim_closes_its_connection_and_frees_the_node_id() {
    let db = TestDb::migrated().await;
    let w1 = tests::unique_name("w1");
    let first = workers::claim(&db.config(), &w1)
        .await
        .expect("first claim");
    assert!(workers::claim(&db.config(), &w1).await.is_err());

    drop(first);

    // The server notices the closed socket asynchronously.
    claim_once_free(&db.config(), &w1).await;
}

#[tokio::test]
async fn a_node_claim_is_lost_with_its_connection_and_check_says_so() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let w1 = tests::unique_name("w1");
    let mut claim = workers::claim(&db.config(), &w1).await.expect("claim");
    claim.check().await.expect("held");

    // Only this test's database: other tests hold claims of their own.
    let (k1, k2) = workers::claim_key(&w1);
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) AS holders, bool_and(pg_terminate_backend(pid)) AS terminated \
             FROM pg_locks \
             WHERE locktype = 'advisory' AND objsubid = 2 AND granted \
               AND classid = ($1::int4)::oid AND objid = ($2::int4)::oid \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [k1.into(), k2.into()],
        ))
        .await
        .unwrap()
        .expect("one row");
    assert_eq!(
        row.try_get::<i64>("", "holders").unwrap(),
        1,
        "the claim's lock is in pg_locks, once"
    );
    assert_eq!(
        row.try_get::<Option<bool>>("", "terminated").unwrap(),
        Some(true)
    );

    // The server ends the backend asynchronously: wait until the claim's check sees it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match claim.check().await {
            Err(err) => break err,
            Ok(()) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the claim still looks held 10 s after its backend was terminated"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    claim_once_free(&db.config(), &w1).await;
}

#[tokio::test]
async fn claim_keys_use_the_two_key_space_and_differ_between_node_ids() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    // The migrator's single-key lock does not block a claim, whatever the node id.
    let key = ampd::migrate::LOCK_KEY;
    assert_eq!(key, 0x616d_7064_6d69_6772);
    exec(&conn, &format!("SELECT pg_advisory_lock({key})")).await;
    let _claim = workers::claim(&db.config(), &tests::unique_name("w1"))
        .await
        .expect("claim");
    assert_ne!(workers::claim_key("w1"), workers::claim_key("w2"));
    assert_eq!(workers::claim_key("w1"), workers::claim_key("w1"));
}
