//! Hostile NOTIFY traffic: anyone who can connect can send anything on our channels. Random and
//! oversized payloads on both channels never break a listener, and valid events sent after them
//! are still delivered, in order.

use ampd::metadata::notifications::{
    Action, JOB_ACTIONS, JobAction, Listener, Notification, REVISION_CHANGES, RevisionChange,
};
use tests::{TestDb, XorShift, sql};

/// A payload that is not a valid event: random text, JSON of the wrong shape or types, near-misses
/// of the real shape, and payloads up to PostgreSQL's limit of just under 8000 bytes.
fn hostile_payload(rng: &mut XorShift) -> String {
    let mut payload = hostile_payload_unbounded(rng);
    // PostgreSQL refuses payloads of 8000 bytes or more: keep to the largest it accepts.
    while payload.len() > 7999 {
        payload.pop();
    }
    payload
}

fn hostile_payload_unbounded(rng: &mut XorShift) -> String {
    let random_text = |rng: &mut XorShift, len: usize| -> String {
        (0..len)
            .map(|_| match rng.below(4) {
                0 => char::from(b' ' + rng.below(95) as u8),
                1 => ['{', '}', '"', ':', ',', '[', ']', '\\'][rng.below(8) as usize],
                2 => char::from_u32(0x80 + rng.below(0x2000) as u32).unwrap_or('?'),
                _ => char::from(b'a' + rng.below(26) as u8),
            })
            .collect()
    };
    match rng.below(9) {
        0 => {
            let len = rng.below(64) as usize;
            random_text(rng, len)
        }
        1 => {
            let len = 7000 + rng.below(900) as usize;
            random_text(rng, len)
        }
        2 => String::new(),
        3 => "null".into(),
        4 => format!("[{}]", rng.next()),
        5 => r#"{"node_id": 5, "job_id": "x", "action": "START"}"#.into(),
        6 => r#"{"node_id": "w1", "job_id": 1, "action": "EXPLODE"}"#.into(),
        7 => format!(
            r#"{{"physical_table_id": {}, "revision_id": "{}"}}"#,
            rng.next(),
            random_text(rng, 7500)
        ),
        _ => format!(
            r#"{{"node_id": "{}", "job_id": 1, "action": "START"}}"#,
            "x".repeat(7900)
        ),
    }
}

#[tokio::test]
async fn random_and_oversized_payloads_never_break_a_listener() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let mut listener = Listener::connect(&db.config()).await.expect("listener");
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);

    for round in 0..5i64 {
        for _ in 0..100 {
            let channel = if rng.below(2) == 0 {
                JOB_ACTIONS
            } else {
                REVISION_CHANGES
            };
            sql::notify(&conn, channel, &hostile_payload(&mut rng)).await;
        }
        let action = JobAction {
            node_id: "w1".into(),
            job_id: round,
            action: Action::Start,
        };
        let change = RevisionChange {
            physical_table_id: round,
            revision_id: round + 100,
        };
        sql::notify(&conn, JOB_ACTIONS, &serde_json::to_string(&action).unwrap()).await;
        sql::notify(
            &conn,
            REVISION_CHANGES,
            &serde_json::to_string(&change).unwrap(),
        )
        .await;

        let first = sql::next_notification(
            &mut listener,
            "a valid event arrives after 100 hostile ones",
        )
        .await;
        let second = sql::next_notification(&mut listener, "the second valid event arrives").await;
        assert_eq!(first, Notification::JobAction(action), "round {round}");
        assert_eq!(
            second,
            Notification::RevisionChange(change),
            "round {round}"
        );
    }
}
