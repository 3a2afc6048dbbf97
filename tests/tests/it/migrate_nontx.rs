//! Migrations that opt out of the transaction (`use_transaction() == Some(false)`), and the lock
//! they need to be waited for without a snapshot:
//! - consecutive transactional migrations share one transaction; one that opts out runs alone,
//!   outside any transaction, and the plan says so;
//! - a failure keeps the steps before it, and says which;
//! - an index left behind by an interrupted concurrent build is refused with the statement that
//!   removes it, never counted as applied;
//! - a run waiting for the lock holds no snapshot (and never blocks in `pg_advisory_lock`), and
//!   waits at most `migration_lock_timeout_secs`;
//! - eight runs at once over the schema's own concurrent index build all succeed.

use std::time::{Duration, Instant};

use ampd::config::MetadataDbConfig;
use ampd::migrate::{self, MigrateError, MigrationSet};
use migration::{MigrationTrait, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use sha2::{Digest, Sha256};
use tests::cli::{self, TempDir};
use tests::fixtures::SqlStep as Sql;
use tests::{TestDb, catalog, metadata_config, metadata_config_with, sql};

fn tx(name: &'static str, sql: &'static str) -> Sql {
    Sql {
        name,
        sql,
        alone: false,
    }
}

fn alone(name: &'static str, sql: &'static str) -> Sql {
    Sql {
        name,
        sql,
        alone: true,
    }
}

fn set(migrations: Vec<Sql>) -> MigrationSet {
    let boxed: Vec<Box<dyn MigrationTrait>> = migrations
        .into_iter()
        .map(|m| Box::new(m) as Box<dyn MigrationTrait>)
        .collect();
    MigrationSet::new(boxed, |name| {
        Some(hex::encode(Sha256::digest(format!("nontx:{name}"))))
    })
}

async fn recorded(db: &DatabaseConnection) -> Vec<String> {
    sql::column(
        db,
        "SELECT version::text FROM seaql_migrations ORDER BY version",
    )
    .await
}

/// Whether index `name` exists and is valid (`None`: it does not exist).
async fn index_valid(db: &DatabaseConnection, name: &str) -> Option<bool> {
    sql::optional(
        db,
        &format!(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = '{name}'"
        ),
    )
    .await
}

/// The first two migrations of [`steps_set`]: a table and its rows, both transactional.
fn items_and_rows() -> Vec<Sql> {
    vec![
        tx(
            "m20990101_000001_items",
            "CREATE TABLE nt_items (id bigint PRIMARY KEY, v int NOT NULL)",
        ),
        tx(
            "m20990101_000002_fill_items",
            "INSERT INTO nt_items SELECT g, g % 100 FROM generate_series(1, 5000) g",
        ),
    ]
}

fn steps_set() -> MigrationSet {
    let mut all = items_and_rows();
    all.extend([
        alone(
            "m20990101_000003_index_items_v",
            "CREATE INDEX CONCURRENTLY nt_items_v_idx ON nt_items (v)",
        ),
        tx(
            "m20990101_000004_after",
            "CREATE TABLE nt_after (id bigint)",
        ),
    ]);
    set(all)
}

#[tokio::test]
async fn transactional_migrations_share_a_step_and_a_concurrent_index_runs_alone() {
    let db = TestDb::empty().await;
    let cfg = metadata_config(db.url());
    let set = steps_set();

    // The plan, as the dry run and the status show it.
    let plan = migrate::dry_run(&cfg, &set).await.expect("dry run");
    let script = plan.script();
    println!("{script}");
    for step in [
        "-- step 1 of 3, in one transaction: m20990101_000001_items, m20990101_000002_fill_items",
        "-- step 2 of 3, alone, outside a transaction: m20990101_000003_index_items_v",
        "-- step 3 of 3, in one transaction: m20990101_000004_after",
    ] {
        assert!(script.contains(step), "{step}\n{script}");
    }
    // The concurrent build is sent outside a transaction: the last BEGIN before it was committed.
    let statements = plan.statements();
    let build = statements
        .iter()
        .position(|s| s.starts_with("CREATE INDEX CONCURRENTLY nt_items_v_idx"))
        .expect("the build is in the script");
    let last_begin = statements[..build].iter().rposition(|s| *s == "BEGIN");
    let last_commit = statements[..build].iter().rposition(|s| *s == "COMMIT");
    assert!(last_commit > last_begin, "{script}");

    let states = migrate::status(&cfg, &set).await.expect("status");
    let plan: Vec<(usize, String)> = states
        .iter()
        .map(|s| {
            let runs = serde_json::to_value(s.runs).expect("json");
            (
                s.step.expect("pending"),
                runs.as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        plan,
        [
            (1, "transaction".to_owned()),
            (1, "transaction".to_owned()),
            (2, "alone".to_owned()),
            (3, "transaction".to_owned()),
        ]
    );

    // Inside a transaction the build would fail (SQLSTATE 25001): it ran alone.
    let report = migrate::migrate(&cfg, &set).await.expect("migrate");
    assert_eq!(report.applied.len(), 4);
    let conn = db.connect().await;
    assert_eq!(index_valid(&conn, "nt_items_v_idx").await, Some(true));
    assert_eq!(recorded(&conn).await.len(), 4);
}

#[tokio::test]
async fn a_failure_keeps_the_steps_before_it_and_says_which() {
    let db = TestDb::empty().await;
    let cfg = metadata_config(db.url());
    let set = set(vec![
        tx(
            "m20990102_000001_items",
            "CREATE TABLE nt_items (id bigint PRIMARY KEY, v int NOT NULL)",
        ),
        alone(
            "m20990102_000002_index_items_v",
            "CREATE INDEX CONCURRENTLY nt_items_v_idx ON nt_items (v)",
        ),
        tx(
            "m20990102_000003_fails",
            "CREATE TABLE nt_doomed (id bigint); SELECT 1 / 0",
        ),
    ]);
    let err = migrate::migrate(&cfg, &set).await.expect_err("fails");
    let text = err.to_string();
    assert!(
        text.starts_with("migration m20990102_000003_fails failed: division by zero"),
        "{text}"
    );
    assert!(
        text.contains(
            "this step was rolled back; the 2 migration(s) applied by earlier steps of this run \
             stay applied and recorded (m20990102_000001_items, m20990102_000002_index_items_v; \
             the last: m20990102_000002_index_items_v)"
        ),
        "{text}"
    );
    let conn = db.connect().await;
    assert_eq!(
        recorded(&conn).await,
        ["m20990102_000001_items", "m20990102_000002_index_items_v"]
    );
    assert!(
        !catalog::tables(&conn)
            .await
            .contains(&"nt_doomed".to_owned())
    );
}

fn unique_set() -> MigrationSet {
    set(vec![
        tx(
            "m20990103_000001_dup",
            "CREATE TABLE nt_dup (v int NOT NULL); INSERT INTO nt_dup VALUES (1), (1), (2)",
        ),
        alone(
            "m20990103_000002_unique_dup_v",
            "CREATE UNIQUE INDEX CONCURRENTLY nt_dup_v_key ON nt_dup (v)",
        ),
    ])
}

#[tokio::test]
async fn an_index_left_invalid_by_a_failed_concurrent_build_is_refused_with_the_statement_that_removes_it()
 {
    let db = TestDb::empty().await;
    let cfg = metadata_config(db.url());
    let set = unique_set();
    let drop = "DROP INDEX CONCURRENTLY IF EXISTS \"public\".\"nt_dup_v_key\";";

    // The build fails half-way (a duplicate), and PostgreSQL leaves the index INVALID.
    let err = migrate::migrate(&cfg, &set).await.expect_err("duplicate");
    let text = err.to_string();
    assert!(
        text.starts_with(
            "migration m20990103_000002_unique_dup_v failed: could not create unique index"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "It left index \"public\".\"nt_dup_v_key\" behind; remove it before the next run: {drop}"
        )),
        "{text}"
    );
    let conn = db.connect().await;
    assert_eq!(index_valid(&conn, "nt_dup_v_key").await, Some(false));
    assert_eq!(recorded(&conn).await, ["m20990103_000001_dup"]);

    // The next run finds it before doing anything, and never counts the migration as applied.
    let before = catalog::snapshot(&conn).await;
    let err = migrate::migrate(&cfg, &set).await.expect_err("refused");
    assert!(matches!(err, MigrateError::LeftOver { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("index \"public\".\"nt_dup_v_key\" is left INVALID by an earlier run"),
        "{text}"
    );
    assert!(text.ends_with(drop), "{text}");
    assert_eq!(catalog::snapshot(&conn).await, before);
    assert_eq!(recorded(&conn).await, ["m20990103_000001_dup"]);

    // The statement given works; with the duplicate gone, the migration applies.
    conn.execute_unprepared(drop)
        .await
        .expect("the given statement");
    conn.execute_unprepared("DELETE FROM nt_dup WHERE ctid IN (SELECT min(ctid) FROM nt_dup GROUP BY v HAVING count(*) > 1)")
        .await
        .expect("remove the duplicate");
    let report = migrate::migrate(&cfg, &set).await.expect("applies");
    assert_eq!(report.applied.len(), 1);
    assert_eq!(index_valid(&conn, "nt_dup_v_key").await, Some(true));
}

#[tokio::test]
async fn an_index_built_by_a_run_that_died_before_recording_it_is_refused_too() {
    let db = TestDb::empty().await;
    let cfg = metadata_config(db.url());
    let all = steps_set();
    let conn = db.connect().await;
    // What a run killed between the build and its record leaves: the table, the valid index, no
    // record of the migration that built it.
    let first_two = set(items_and_rows());
    migrate::migrate(&cfg, &first_two).await.expect("first two");
    conn.execute_unprepared("CREATE INDEX nt_items_v_idx ON nt_items (v)")
        .await
        .expect("index");
    let err = migrate::migrate(&cfg, &all).await.expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("index \"public\".\"nt_items_v_idx\" already exists although the migration is not recorded"),
        "{text}"
    );
    assert!(
        text.ends_with("DROP INDEX CONCURRENTLY IF EXISTS \"public\".\"nt_items_v_idx\";"),
        "{text}"
    );
    assert_eq!(recorded(&conn).await.len(), 2);
}

/// A set whose last migration sleeps `secs` inside its transaction, holding the lock.
fn slow_set(secs: &'static str) -> MigrationSet {
    let sql: &'static str = Box::leak(format!("SELECT pg_sleep({secs})").into_boxed_str());
    set(vec![tx("m20990104_000001_slow", sql)])
}

/// Starts a run whose migration sleeps `secs` under the lock, and returns once it sleeps.
async fn holding_the_lock(
    cfg: &MetadataDbConfig,
    conn: &DatabaseConnection,
    db: &str,
    secs: &'static str,
) -> tokio::task::JoinHandle<Result<migrate::MigrateReport, MigrateError>> {
    let holder = {
        let cfg = cfg.clone();
        tokio::spawn(async move { migrate::migrate(&cfg, &slow_set(secs)).await })
    };
    let started = Instant::now();
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state = 'active' \
         AND query LIKE 'SELECT pg_sleep%'"
    );
    while sql::value::<i64>(conn, &sql).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the holder never slept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder
}

/// The sessions of database `db` (other than the caller's) whose last statement was the lock
/// poll: (state, whether they hold a snapshot).
async fn pollers(conn: &DatabaseConnection, db: &str) -> Vec<(String, bool)> {
    conn.query_all_raw(Statement::from_string(
        conn.get_database_backend(),
        format!(
            "SELECT state, backend_xmin IS NOT NULL FROM pg_stat_activity \
             WHERE datname = '{db}' AND pid <> pg_backend_pid() \
             AND query LIKE 'SELECT pg_try_advisory_%lock(%'"
        ),
    ))
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|r| {
        (
            r.try_get_by_index::<String>(0).unwrap_or_default(),
            r.try_get_by_index::<bool>(1).unwrap_or(true),
        )
    })
    .collect()
}

#[tokio::test]
async fn a_run_waiting_for_the_lock_holds_no_snapshot_and_never_blocks_in_pg_advisory_lock() {
    let db = TestDb::empty().await;
    let cfg = metadata_config(db.url());
    let conn = db.connect().await;
    // A run that sleeps 3 s under the lock; then a second run with work to do.
    let holder = holding_the_lock(&cfg, &conn, db.name(), "3").await;
    let waiter = {
        let cfg = cfg.clone();
        tokio::spawn(async move { migrate::migrate(&cfg, &slow_set("0")).await })
    };
    let mut seen = Vec::new();
    while !holder.is_finished() {
        let now = pollers(&conn, db.name()).await;
        seen.extend(now);
        let blocked: i64 = sql::value(
            &conn,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
                 AND pid <> pg_backend_pid() AND query LIKE '%pg_advisory_lock(%' \
                 AND state = 'active'",
                db.name()
            ),
        )
        .await;
        assert_eq!(blocked, 0, "no session waits inside pg_advisory_lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Between two questions the waiting run is idle, and holds no snapshot (during a question it
    // briefly does, as every statement does).
    let between: Vec<bool> = seen
        .iter()
        .filter(|(state, _)| state == "idle")
        .map(|(_, snapshot)| *snapshot)
        .collect();
    assert!(
        !between.is_empty(),
        "the second run was seen waiting for the lock: {seen:?}"
    );
    assert!(
        between.iter().all(|snapshot| !snapshot),
        "a waiting run holds no snapshot between its questions: {seen:?}"
    );
    holder.await.expect("task").expect("the holder applies");
    // The holder applied the sleeping migration; the waiter then found nothing left to do.
    let report = waiter.await.expect("task").expect("the waiter succeeds");
    assert!(report.applied.is_empty());
}

#[tokio::test]
async fn waiting_for_the_lock_gives_up_after_migration_lock_timeout_secs() {
    let db = TestDb::empty().await;
    let cfg = metadata_config(db.url());
    let conn = db.connect().await;
    // A run that sleeps 4 s under the lock; then a second run with work to do.
    let holder = holding_the_lock(&cfg, &conn, db.name(), "4").await;
    let impatient = metadata_config_with(db.url(), "migration_lock_timeout_secs = 1");
    let waited = Instant::now();
    let err = migrate::migrate(&impatient, &slow_set("0"))
        .await
        .expect_err("times out");
    let waited = waited.elapsed();
    assert!(
        matches!(err, MigrateError::LockTimeout { waited_secs: 1 }),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("timed out after 1 s waiting for the migration lock"),
        "{err}"
    );
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    holder.await.expect("task").expect("the holder applies");
}

#[tokio::test]
async fn eight_runs_at_once_over_a_concurrent_index_build_all_succeed() {
    let db = TestDb::empty().await;
    let cfg = metadata_config(db.url());
    // The schema before the index, with enough rows that building it takes a while. The
    // migrations from it on (index builds that run alone, and transactional ones after them) are
    // what the eight runs apply between them.
    let mut before_index = migration::Migrator::migrations();
    let at = before_index
        .iter()
        .position(|m| m.name() == "m20261201_000001_index_physical_tables_active_revision")
        .expect("the index migration");
    let indexes = before_index.split_off(at);
    assert!(indexes.iter().any(|m| m.use_transaction() == Some(false)));
    let before = MigrationSet::new(before_index, |name| {
        migration::checksum_of(name).map(str::to_owned)
    });
    migrate::migrate(&cfg, &before)
        .await
        .expect("up to the index");
    let conn = db.connect().await;
    conn.execute_unprepared(
        "INSERT INTO manifest_files (hash, kind, path) VALUES (repeat('a', 64), 'static', 'm'); \
         INSERT INTO physical_tables (dataset_namespace, dataset_name, manifest_hash, table_name) \
         SELECT 'ns', 'name', repeat('a', 64), 't' || g FROM generate_series(1, 200000) g",
    )
    .await
    .expect("rows");

    let dir = TempDir::new();
    let file = dir.config(db.url(), "");
    let (outputs, took) = cli::ampd_concurrently(&file, &["migrate"], 8).await;
    let mut applied = 0;
    for out in outputs {
        out.assert_success().assert_not_in_output("deadlock");
        applied += out.applied();
    }
    println!(
        "8 concurrent `ampd migrate` over CREATE INDEX CONCURRENTLY on 200000 rows: all exited 0 \
         in {:?}",
        took
    );
    assert_eq!(
        applied,
        indexes.len(),
        "each migration (each index build) applied by exactly one run"
    );
    for index in [
        "idx_physical_tables_active_revision_id",
        "idx_gc_manifest_expiration_file_id",
    ] {
        assert_eq!(index_valid(&conn, index).await, Some(true), "{index}");
    }
    assert_eq!(recorded(&conn).await.len(), tests::schema_migration_count());
}
