//! Reading single values with plain SQL, for checks the entities do not express (catalog views,
//! locks, counts over raw tables), and both ends of a notification channel.

use std::time::Duration;

use ampd::metadata::notifications::{Listener, Notification};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TryGetable};

/// The first column of the one row `sql` selects, if it selects a row.
pub async fn optional<T: TryGetable>(db: &DatabaseConnection, sql: &str) -> Option<T> {
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .map(|row| {
            row.try_get_by_index::<T>(0)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
}

/// The first column of the one row `sql` selects.
pub async fn value<T: TryGetable>(db: &DatabaseConnection, sql: &str) -> T {
    optional(db, sql)
        .await
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// The single count (or other integer) `sql` selects.
pub async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    value(db, sql).await
}

/// The first column of every row `sql` selects, in order.
pub async fn column<T: TryGetable>(db: &DatabaseConnection, sql: &str) -> Vec<T> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| {
            row.try_get_by_index::<T>(0)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
        .collect()
}

/// Sends `payload` on `channel` with `pg_notify`, as any client of the database can.
pub async fn notify(db: &DatabaseConnection, channel: &str, payload: &str) {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [channel.into(), payload.into()],
    ))
    .await
    .expect("pg_notify");
}

/// The next notification `listener` delivers, waiting at most ten seconds; `what` says in the
/// failure what was expected.
pub async fn next_notification(listener: &mut Listener, what: &str) -> Notification {
    tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 10 s"))
        .expect("recv")
}

/// The pid of a session of `db`'s database that waits for a lock, once there is one: evidence that
/// a statement started elsewhere has reached what an open transaction holds. Panics with `what`
/// when none waits within `within`.
pub async fn lock_waiter(db: &DatabaseConnection, what: &str, within: Duration) -> i32 {
    let started = std::time::Instant::now();
    loop {
        let waiting = optional::<i32>(
            db,
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await;
        if let Some(pid) = waiting {
            return pid;
        }
        assert!(started.elapsed() < within, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The plan of `stmt`, as `EXPLAIN (FORMAT JSON)` gives it, as text.
pub async fn plan_of<C: ConnectionTrait>(db: &C, stmt: &Statement) -> String {
    let explain = Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!("EXPLAIN (FORMAT JSON) {}", stmt.sql),
        stmt.values.clone().map(|v| v.0).unwrap_or_default(),
    );
    let row = db.query_one_raw(explain).await.unwrap().expect("a plan");
    row.try_get_by_index::<serde_json::Value>(0)
        .unwrap()
        .to_string()
}
