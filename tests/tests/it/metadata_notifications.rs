//! `metadata::notifications`: typed NOTIFY payloads and a listener that skips malformed ones and
//! survives a lost connection.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ampd::metadata::notifications::{
    self, Action, JOB_ACTIONS, JobAction, LISTENER_APPLICATION_NAME, Listener, Notification,
    PayloadError, REVISION_CHANGES, RevisionChange,
};
use sea_orm::ConnectionTrait;
use tests::proxy::{Fault, FaultProxy};
use tests::{TestDb, sql};

const WAIT: Duration = Duration::from_secs(10);

fn start(job_id: i64) -> JobAction {
    JobAction {
        node_id: "w1".into(),
        job_id,
        action: Action::Start,
    }
}

async fn recv(listener: &mut Listener) -> Notification {
    sql::next_notification(listener, "a notification in time").await
}

/// Collects what `tracing` writes while it is the default subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("not poisoned")).into_owned()
    }
}

#[tokio::test]
async fn notifications_sent_with_notify_functions_arrive_typed() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let mut listener = Listener::connect(&db.config()).await.expect("listener");

    notifications::notify_job_action(
        &conn,
        &JobAction {
            node_id: "w1".into(),
            job_id: 7,
            action: Action::Stop,
        },
    )
    .await
    .unwrap();
    notifications::notify_revision_change(
        &conn,
        &RevisionChange {
            physical_table_id: 1,
            revision_id: 2,
        },
    )
    .await
    .unwrap();

    assert_eq!(
        recv(&mut listener).await,
        Notification::JobAction(JobAction {
            node_id: "w1".into(),
            job_id: 7,
            action: Action::Stop,
        })
    );
    assert_eq!(
        recv(&mut listener).await,
        Notification::RevisionChange(RevisionChange {
            physical_table_id: 1,
            revision_id: 2,
        })
    );
}

#[tokio::test]
async fn the_payloads_are_those_of_schema_md() {
    let parsed = notifications::parse(
        JOB_ACTIONS,
        r#"{"node_id": "w1", "job_id": 1, "action": "START"}"#,
    )
    .unwrap();
    assert_eq!(parsed, Notification::JobAction(start(1)));
    let parsed = notifications::parse(
        REVISION_CHANGES,
        r#"{"physical_table_id": 1, "revision_id": 2}"#,
    )
    .unwrap();
    assert_eq!(
        parsed,
        Notification::RevisionChange(RevisionChange {
            physical_table_id: 1,
            revision_id: 2
        })
    );
    assert_eq!(
        serde_json::to_value(start(1)).unwrap(),
        serde_json::json!({"node_id": "w1", "job_id": 1, "action": "START"})
    );
}

#[tokio::test]
async fn malformed_and_oversized_payloads_are_skipped_with_a_warning() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let captured = Captured::default();
    let writer = captured.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    );
    let mut listener = Listener::connect(&db.config()).await.expect("listener");
    // Valid in every respect but its size (PostgreSQL accepts up to 8000 bytes).
    let oversized = format!(
        r#"{{"node_id": "w1", "job_id": 1, "action": "START", "padding": "{}"}}"#,
        "x".repeat(7850)
    );
    assert!(oversized.len() > 7900 && oversized.len() < 8000);
    assert!(matches!(
        notifications::parse(JOB_ACTIONS, &oversized),
        Err(PayloadError::TooLong(_))
    ));
    let bad = [
        (JOB_ACTIONS, "not json".to_owned()),
        (JOB_ACTIONS, r#"{"node_id": "w1"}"#.to_owned()),
        (
            JOB_ACTIONS,
            r#"{"node_id": "w1", "job_id": 1, "action": "PAUSE"}"#.to_owned(),
        ),
        (
            JOB_ACTIONS,
            r#"{"node_id": "1 bad", "job_id": 1, "action": "STOP"}"#.to_owned(),
        ),
        (
            REVISION_CHANGES,
            r#"{"physical_table_id": "one"}"#.to_owned(),
        ),
        (REVISION_CHANGES, "[]".to_owned()),
        (JOB_ACTIONS, oversized),
    ];
    for (channel, payload) in &bad {
        sql::notify(&conn, channel, payload).await;
    }
    sql::notify(
        &conn,
        JOB_ACTIONS,
        r#"{"node_id": "w1", "job_id": 42, "action": "START"}"#,
    )
    .await;

    assert_eq!(
        recv(&mut listener).await,
        Notification::JobAction(start(42))
    );
    let log = captured.text();
    assert_eq!(
        log.matches("skipping a malformed notification").count(),
        bad.len(),
        "{log}"
    );
    assert!(log.contains("over the limit"), "{log}");
    assert!(log.contains("WARN"), "{log}");
}

#[tokio::test]
async fn the_listener_reports_a_reconnect_after_its_backend_is_terminated() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let mut listener = Listener::connect(&db.config()).await.expect("listener");
    let pid = listener.backend_pid().await.expect("pid");
    let named = sql::count(
        &conn,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid = {pid} AND application_name = '{LISTENER_APPLICATION_NAME}'"
        ),
    )
    .await;
    assert_eq!(named, 1, "named connection");

    conn.execute_unprepared(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .unwrap();

    // The loss is reported as an event of its own, after which the listener is connected again.
    let got = tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("the listener reports the lost connection")
        .expect("recv after reconnecting");
    assert_eq!(got, Notification::Reconnected);
    let new_pid = listener.backend_pid().await.expect("pid");
    assert_ne!(new_pid, pid, "a new connection");
    notifications::notify_job_action(&conn, &start(1000))
        .await
        .unwrap();
    match recv(&mut listener).await {
        Notification::JobAction(action) => assert_eq!(action.job_id, 1000),
        other => panic!("{other:?}"),
    }

    // And it keeps listening on both channels.
    notifications::notify_revision_change(
        &conn,
        &RevisionChange {
            physical_table_id: 5,
            revision_id: 6,
        },
    )
    .await
    .unwrap();
    match recv(&mut listener).await {
        Notification::RevisionChange(change) => assert_eq!(change.revision_id, 6),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_listener_or_claim_that_cannot_connect_gives_up_after_the_connect_timeout_url_redacted() {
    // A port nothing listens on: connection refused, retried until the timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let text = format!(
        "[metadata_db]\nurl = \"postgresql://ampd:s3cret-pw@127.0.0.1:{port}/amp\"\n\
         connect_timeout_secs = 2\n"
    );
    let cfg = ampd::config::Config::from_parts(std::path::Path::new("t.toml"), &text, Vec::new())
        .unwrap()
        .metadata_db;
    let started = std::time::Instant::now();
    let err = Listener::connect(&cfg).await.expect_err("nothing listens");
    let listener_took = started.elapsed();
    let started = std::time::Instant::now();
    let claim_err = ampd::metadata::workers::claim(&cfg, "w1")
        .await
        .expect_err("nothing listens");
    let claim_took = started.elapsed();
    for (what, err, took) in [
        ("listener", err, listener_took),
        ("claim", claim_err, claim_took),
    ] {
        let message = err.to_string();
        assert!(err.is_retryable(), "{what}: {message}");
        assert!(message.contains("gave up after"), "{what}: {message}");
        assert!(!message.contains("s3cret-pw"), "{what}: {message}");
        assert!(message.contains("ampd:***@"), "{what}: {message}");
        // Retried for the connect timeout (a lower bound), then given up (a generous upper one).
        assert!(took >= Duration::from_millis(1500), "{what}: {took:?}");
        assert!(took < Duration::from_secs(30), "{what}: {took:?}");
    }
}

/// Issue 21 (also-list): the listener lost its connection and could not connect again, so `recv`
/// failed; `backend_pid` then connected it again. Notifications were lost meanwhile, so the next
/// `recv` must still say [`Notification::Reconnected`], before anything else.
#[tokio::test]
async fn a_reconnect_made_by_backend_pid_is_still_reported_by_the_next_recv() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let proxy = FaultProxy::start(db.url()).await;
    let cfg = tests::metadata_config_with(proxy.url(), "connect_timeout_secs = 1");
    let mut listener = Listener::connect(&cfg).await.expect("listener");
    let pid = listener.backend_pid().await.expect("pid");

    proxy.set(Fault::Drop);
    tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("recv gives up within the connect timeout")
        .expect_err("the connection is lost and cannot be made again");
    proxy.set(Fault::Pass);
    let new_pid = listener.backend_pid().await.expect("connects again");
    assert_ne!(new_pid, pid);
    notifications::notify_job_action(&conn, &start(7))
        .await
        .unwrap();

    assert_eq!(recv(&mut listener).await, Notification::Reconnected);
    match recv(&mut listener).await {
        Notification::JobAction(action) => assert_eq!(action.job_id, 7),
        other => panic!("{other:?}"),
    }
}
