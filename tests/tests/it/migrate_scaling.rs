//! A no-op `ampd migrate` (the database already current) costs the same number of statements
//! however long the migration history is: it reads the applied set in one query, not one per
//! migration.
//!
//! Statements are counted at the protocol level by a proxy ([`tests::wire::StatementCounter`]),
//! which works on any server; when the server also has `pg_stat_statements` loaded, its count of
//! what the server executed for the database must agree. The harness's private cluster preloads it
//! whenever PostgreSQL has the module.

use ampd::migrate;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tests::wire::StatementCounter;
use tests::{TestDb, metadata_config, sql};

/// Statements one no-op run costs, counted by the proxy and (when available) by the server.
#[derive(Debug, PartialEq, Eq)]
struct NoopCost {
    sent: u64,
    executed: Option<i64>,
}

/// The server's own count of statements run in database `oid`, or `None` when
/// `pg_stat_statements` is not loaded (`stats`). `reset` zeroes that database's entries first.
async fn executed_in(
    admin: &DatabaseConnection,
    stats: bool,
    oid: i64,
    reset: bool,
) -> Option<i64> {
    if !stats {
        return None;
    }
    if reset {
        admin
            .execute_unprepared(&format!("SELECT pg_stat_statements_reset(0, {oid}, 0)"))
            .await
            .expect("reset pg_stat_statements");
        return Some(0);
    }
    sql::optional::<i64>(
        admin,
        &format!(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE dbid = {oid} AND query NOT ILIKE '%pg_stat_statements%'"
        ),
    )
    .await
}

/// Applies `n` synthetic migrations to a new database, then measures one more (no-op) run.
async fn noop_cost(n: usize) -> NoopCost {
    let db = TestDb::empty().await;
    let set = tests::fixtures::synthetic(n);
    let first = migrate::migrate(&metadata_config(db.url()), &set)
        .await
        .expect("first run");
    assert_eq!(first.applied.len(), n, "the first run applies all {n}");

    let admin = tests::connect(tests::admin_url(), 1).await;
    let preloaded = sql::optional::<i64>(
        &admin,
        "SELECT count(*) FROM pg_settings WHERE name = 'shared_preload_libraries' \
         AND setting ~ '(^|[ ,])pg_stat_statements($|[ ,])'",
    )
    .await
        == Some(1);
    let private = tests::cluster::is_private();
    if private
        && tests::cluster::find_bindir().is_ok_and(|b| tests::cluster::has_pg_stat_statements(&b))
    {
        assert!(preloaded, "the private cluster preloads pg_stat_statements");
    }
    if !preloaded {
        println!("pg_stat_statements is not loaded: only the proxy counts statements");
    }
    if preloaded {
        admin
            .execute_unprepared("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .expect("create extension pg_stat_statements");
    }
    let oid = sql::optional::<i64>(
        &admin,
        &format!(
            "SELECT oid::bigint FROM pg_database WHERE datname = '{}'",
            db.name()
        ),
    )
    .await
    .expect("the database's oid");

    let counter = StatementCounter::start(db.url()).await;
    executed_in(&admin, preloaded, oid, true).await;
    counter.reset();
    let noop = migrate::migrate(&metadata_config(counter.url()), &set)
        .await
        .expect("no-op run");
    assert!(noop.applied.is_empty(), "nothing left to apply: {noop:?}");
    let cost = NoopCost {
        sent: counter.statements(),
        executed: executed_in(&admin, preloaded, oid, false).await,
    };
    let _ = admin.close().await;
    cost
}

#[tokio::test]
async fn a_noop_run_costs_the_same_statements_with_1000_migrations_as_with_1() {
    let one = noop_cost(1).await;
    let thousand = noop_cost(1000).await;
    println!("no-op run: 1 migration {one:?}, 1000 migrations {thousand:?}");
    // The counters see the run at all (so the comparison below can fail).
    assert!(one.sent >= 1, "the proxy saw the run's query: {one:?}");
    assert_eq!(
        one, thousand,
        "a no-op run's statements do not grow with the history"
    );
    // What the README promises: a current database costs one query.
    assert_eq!(one.sent, 1, "{one:?}");
    if let Some(executed) = one.executed {
        assert_eq!(executed, 1, "the server ran one statement: {one:?}");
    }
    if let Some(executed) = thousand.executed {
        assert_eq!(executed, 1, "the server ran one statement: {thousand:?}");
    }
}
