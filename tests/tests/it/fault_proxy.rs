//! The harness's fault proxy does what its faults say: a stall holds a statement back from the
//! server until it ends (and loses nothing), a drop closes open and new connections, and a fault
//! set for one `application_name` leaves the others alone.

use std::time::Duration;

use sea_orm::DatabaseConnection;
use sea_orm::sqlx::{self, Connection, PgConnection};
use tests::TestDb;
use tests::proxy::{Fault, FaultProxy};

/// `url` with `application_name` set.
fn named(url: &str, application: &str) -> String {
    let mut url = url::Url::parse(url).expect("URL");
    url.query_pairs_mut()
        .append_pair("application_name", application);
    url.to_string()
}

/// Sessions of the test's database whose statement contains `marker` (spelled in two halves here,
/// so that this query, and the earlier ones of the pool's other connections, do not match).
async fn running(admin: &DatabaseConnection, marker: &str) -> i64 {
    tests::sql::count(
        admin,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND query LIKE '%' || '{head}' || '{tail}' || '%'",
            head = &marker[..1],
            tail = &marker[1..],
        ),
    )
    .await
}

#[tokio::test]
async fn stall_holds_a_statement_back_until_it_ends_and_loses_nothing() {
    let db = TestDb::empty().await;
    let admin = db.connect().await;
    let proxy = FaultProxy::start(db.url()).await;
    let mut conn = PgConnection::connect(proxy.url()).await.expect("connect");
    proxy.set(Fault::Stall);
    let query = tokio::spawn(async move {
        let n: i64 = sqlx::query_scalar("SELECT 41::bigint + 1 /* stalled_marker */")
            .fetch_one(&mut conn)
            .await
            .expect("the statement completes after the stall");
        n
    });
    // The statement is held in the proxy: the server never sees it while the stall lasts. A
    // statement sent around the proxy is evidence the server is answering meanwhile.
    for _ in 0..20 {
        assert_eq!(running(&admin, "stalled_marker").await, 0);
        assert!(!query.is_finished());
    }
    proxy.set(Fault::Pass);
    assert_eq!(query.await.expect("join"), 42);
}

#[tokio::test]
async fn drop_closes_open_connections_and_refuses_new_ones() {
    let db = TestDb::empty().await;
    let proxy = FaultProxy::start(db.url()).await;
    let mut conn = PgConnection::connect(proxy.url()).await.expect("connect");
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect("passes");
    proxy.set(Fault::Drop);
    assert!(
        sqlx::query("SELECT 1").execute(&mut conn).await.is_err(),
        "a dropped connection cannot run a statement"
    );
    assert!(PgConnection::connect(proxy.url()).await.is_err());
    proxy.set(Fault::Pass);
    let mut again = PgConnection::connect(proxy.url()).await.expect("reconnect");
    sqlx::query("SELECT 1")
        .execute(&mut again)
        .await
        .expect("passes again");
}

#[tokio::test]
async fn a_fault_for_one_application_leaves_the_others_alone() {
    let db = TestDb::empty().await;
    let admin = db.connect().await;
    let proxy = FaultProxy::start(db.url()).await;
    let mut stalled = PgConnection::connect(&named(proxy.url(), "victim-1"))
        .await
        .expect("connect victim");
    let mut other = PgConnection::connect(&named(proxy.url(), "bystander"))
        .await
        .expect("connect bystander");
    proxy.set_for("victim", Fault::Stall);
    let held = tokio::spawn(async move {
        sqlx::query("SELECT 1 /* victim_marker */")
            .execute(&mut stalled)
            .await
            .map(|_| ())
    });
    for _ in 0..10 {
        sqlx::query("SELECT 1")
            .execute(&mut other)
            .await
            .expect("the bystander is not stalled");
        assert!(!held.is_finished());
    }
    assert_eq!(running(&admin, "victim_marker").await, 0);
    assert_eq!(proxy.open_connections(), 2);
    proxy.clear_for("victim");
    held.await
        .expect("join")
        .expect("the victim's statement completes");
}

#[tokio::test]
async fn delay_slows_every_round_trip_by_at_least_the_delay() {
    let db = TestDb::empty().await;
    let proxy = FaultProxy::start(db.url()).await;
    let mut conn = PgConnection::connect(proxy.url()).await.expect("connect");
    proxy.set(Fault::Delay(Duration::from_millis(200)));
    let started = std::time::Instant::now();
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect("delayed, not refused");
    // Both directions wait: the question and the answer.
    assert!(started.elapsed() >= Duration::from_millis(400));
}
