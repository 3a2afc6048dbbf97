//! `ampd migrate` through PgBouncer in transaction mode, as it is run in production: handed a
//! server connection per transaction, with `server_round_robin = 1`, a pool of 3 and another
//! client using the pool at the same time.
//! - Runs whose steps all run in a transaction work through it and never leave the migration lock
//!   or a setting behind on a pooled server connection: after each of 20 runs, `pg_locks` shows no
//!   advisory lock in the database and every server connection, asked through the pooler, shows
//!   the default `lock_timeout`, `statement_timeout` and `client_connection_check_interval`.
//! - A run with a step that must run alone (`CREATE INDEX CONCURRENTLY`) is refused before its
//!   first step, with the fix, leaving nothing applied and nothing held.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sea_orm::DatabaseConnection;
use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::sqlx::{self, ConnectOptions as _, PgConnection, Row as _};
use tests::TestDb;
use tests::cli::{self, TempDir, config_toml};
use tests::pgbouncer::{PgBouncer, PoolMode};

const POOL: u32 = 3;

fn bouncer(test: &str) -> Option<PgBouncer> {
    PgBouncer::start_with(PoolMode::Transaction, POOL, "server_round_robin = 1", test)
}

/// A client of the pooler: no startup parameter PgBouncer refuses, the simple protocol only.
async fn pooler_client(url: &str) -> PgConnection {
    let opts: PgConnectOptions = url.parse().expect("pooler URL");
    opts.extra_float_digits(None)
        .connect()
        .await
        .expect("a client of the pooler")
}

/// What another client sees on the pooled server connections: each setting, asked through the
/// pooler often enough to meet every server connection of the pool.
/// (The simple protocol: PgBouncer 1.18 in transaction mode loses prepared statements.)
async fn settings_seen(through: &mut PgConnection) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..3 * POOL {
        let row = sqlx::raw_sql(
            "SELECT format('lock_timeout=%s statement_timeout=%s client_connection_check_interval=%s', \
             current_setting('lock_timeout'), current_setting('statement_timeout'), \
             current_setting('client_connection_check_interval'))",
        )
        .fetch_one(&mut *through)
        .await
        .expect("settings through the pooler");
        seen.push(row.try_get::<String, _>(0).expect("text"));
    }
    seen.sort();
    seen.dedup();
    seen
}

/// Advisory locks held or awaited in this test's database.
async fn advisory_locks(direct: &DatabaseConnection) -> i64 {
    tests::sql::count(
        direct,
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND d.datname = current_database()",
    )
    .await
}

#[tokio::test]
async fn transaction_steps_through_a_transaction_pooler_leave_no_lock_or_setting_behind() {
    let Some(pgb) = bouncer("transaction_steps_through_a_transaction_pooler") else {
        return;
    };
    let db = TestDb::empty().await;
    let direct = db.connect().await;
    let mut through = pooler_client(&pgb.url(db.name())).await;
    let defaults = settings_seen(&mut through).await;

    // Another client keeps using the pool, in transactions of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, url) = (stop.clone(), pgb.url(db.name()));
        async move {
            let mut other = pooler_client(&url).await;
            let mut n = 0_u64;
            while !stop.load(Ordering::SeqCst) {
                sqlx::raw_sql("BEGIN; SELECT pg_sleep(0.005); COMMIT")
                    .execute(&mut other)
                    .await
                    .expect("the other client");
                n += 1;
            }
            n
        }
    });

    let dir = TempDir::new();
    let config = dir.config(&pgb.url(db.name()), "");
    for run in 1..=20 {
        // Run k knows k trivial migrations: each applies one more (the first also the bookkeeping).
        let set = format!("synthetic:{run}");
        let out = cli::run(
            cli::ampd_fixture(),
            &["--config", config.to_str().unwrap(), "migrate"],
            &[("AMPD_FIXTURE_MIGRATIONS", &set)],
            Duration::from_secs(30),
        )
        .await;
        out.assert_success()
            .assert_stdout_contains("applied 1 migration");
        assert_eq!(advisory_locks(&direct).await, 0, "run {run} left a lock");
        assert_eq!(
            settings_seen(&mut through).await,
            defaults,
            "run {run} left a setting on a pooled connection"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let other = load.await.expect("the other client");
    assert!(other > 0);
    let applied = tests::sql::count(&direct, "SELECT count(*) FROM seaql_migrations").await;
    assert_eq!(applied, 20);
}

#[tokio::test]
async fn a_run_with_a_step_that_runs_alone_is_refused_through_a_transaction_pooler() {
    let Some(pgb) = bouncer("a_run_with_a_step_that_runs_alone_is_refused") else {
        return;
    };
    let db = TestDb::empty().await;
    let direct = db.connect().await;
    let mut through = pooler_client(&pgb.url(db.name())).await;
    let defaults = settings_seen(&mut through).await;
    let dir = TempDir::new();
    let config = dir.config(&pgb.url(db.name()), "");
    for _ in 0..3 {
        let out = cli::ampd_with_config(&config, &["migrate"]).await;
        out.assert_code(1)
            .assert_stderr_contains("metadata_db.direct_url")
            .assert_stderr_contains("nothing was changed");
        let exists: bool = tests::sql::value(
            &direct,
            "SELECT to_regclass('seaql_migrations') IS NOT NULL",
        )
        .await;
        assert!(!exists, "a step ran: {}", out.stderr);
        assert_eq!(advisory_locks(&direct).await, 0);
        assert_eq!(settings_seen(&mut through).await, defaults);
    }

    // With direct_url on the server itself, the same run works.
    let config = dir.file(
        "direct.toml",
        &config_toml(
            &pgb.url(db.name()),
            &format!("direct_url = \"{}\"", db.url()),
        ),
    );
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_success();
    assert_eq!(
        tests::sql::count(&direct, "SELECT count(*) FROM seaql_migrations").await,
        tests::schema_migration_count() as i64
    );
}
