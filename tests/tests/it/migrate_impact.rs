//! `ampd migrate impact` over a table of 1 M rows (`impact_big`, built once per run in a template
//! database and cloned per test), with four pending migrations (the `impact` fixture set): add a
//! nullable column, change a column's type, set NOT NULL, build an index concurrently.
//! - the modes, rewrites, scans and flags reported are what PostgreSQL did on the shadow;
//! - a session idle in a transaction that read the table is named by its pid, `--check` exits 1,
//!   and the target's `pg_locks` shows nothing from `impact` beyond AccessShareLock on catalogs
//!   and the bookkeeping tables it reads the applied set from; the target is unchanged;
//! - `--create-shadow` creates a temporary database and drops it; without a shadow, a clear error.

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::Value;
use tests::cli::{self, TempDir};
use tests::fixtures::{IMPACT_ADD_COLUMN, IMPACT_CHANGE_TYPE, IMPACT_INDEX, IMPACT_SET_NOT_NULL};
use tests::{TestDb, admin_url, connect, metadata_config, sql};

/// Rows in `impact_big`.
const ROWS: i64 = 1_000_000;

/// The template database holding the applied `impact-base` set and `impact_big` with [`ROWS`]
/// rows, analyzed (made once per server: its name carries the schema's fingerprint).
async fn template() -> String {
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            let digest = {
                use std::hash::{DefaultHasher, Hash, Hasher};
                let mut h = DefaultHasher::new();
                (tests::schema_migrations(), ROWS, "impact v1").hash(&mut h);
                h.finish()
            };
            let name = format!("ampd_impact_template_{digest:016x}");
            let admin = connect(admin_url(), 1).await;
            admin
                .execute_unprepared("SELECT pg_advisory_lock(4242026)")
                .await
                .expect("template lock");
            let exists = sql::count(
                &admin,
                &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
            )
            .await;
            if exists == 0 {
                let building = tests::unique_name("impact_building");
                tests::admin_exec(&format!("CREATE DATABASE \"{building}\"")).await;
                let url = tests::database_url(&building);
                let set = tests::fixtures::named("impact-base").expect("impact-base");
                ampd::migrate::migrate(&metadata_config(&url), &set)
                    .await
                    .expect("migrate the template");
                let db = connect(&url, 1).await;
                db.execute_unprepared(&format!(
                    "INSERT INTO impact_big (id, n, t) \
                     SELECT i, i % 1000, 'x' FROM generate_series(1, {ROWS}) AS i"
                ))
                .await
                .expect("fill impact_big");
                db.execute_unprepared("ANALYZE impact_big")
                    .await
                    .expect("analyze impact_big");
                db.close().await.expect("close");
                tests::admin_exec(&format!(
                    "ALTER DATABASE \"{building}\" RENAME TO \"{name}\""
                ))
                .await;
            }
            admin
                .execute_unprepared("SELECT pg_advisory_unlock(4242026)")
                .await
                .expect("template unlock");
            let _ = admin.close().await;
            name
        })
        .await
        .clone()
}

/// A target with the fixture table, a shadow, and a config naming both (size threshold 1 MiB).
async fn setup(dir: &TempDir) -> (TestDb, TestDb, std::path::PathBuf) {
    let target = TestDb::from_template(&template().await).await;
    let shadow = TestDb::empty().await;
    let config = dir.config(
        target.url(),
        &format!(
            "shadow_url = \"{}\"\nimpact_risky_size_mb = 1\n",
            shadow.url()
        ),
    );
    (target, shadow, config)
}

async fn impact(config: &std::path::Path, args: &[&str]) -> cli::Output {
    let mut all = vec![
        "--config",
        config.to_str().expect("utf-8 path"),
        "migrate",
        "impact",
    ];
    all.extend(args);
    cli::run(
        cli::ampd_fixture(),
        &all,
        &[("AMPD_FIXTURE_MIGRATIONS", "impact")],
        Duration::from_secs(60),
    )
    .await
}

/// The statement of migration `name` in the JSON report (each fixture migration sends one).
fn statement<'a>(report: &'a Value, name: &str) -> &'a Value {
    let steps = report["steps"].as_array().expect("steps");
    let migration = steps
        .iter()
        .flat_map(|s| s["migrations"].as_array().expect("migrations"))
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {report:#}"));
    let statements = migration["statements"].as_array().expect("statements");
    assert_eq!(statements.len(), 1, "{migration:#}");
    &statements[0]
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// The lock modes the statement's session held on `impact_big`.
fn modes(statement: &Value) -> Vec<String> {
    statement["locks"]
        .as_array()
        .expect("locks")
        .iter()
        .filter(|l| l["relation"] == "public.impact_big")
        .map(|l| l["mode"].as_str().expect("mode").to_owned())
        .collect()
}

/// What the target's table looks like: its file, its columns, its indexes.
async fn table_state(db: &DatabaseConnection) -> (i64, Vec<String>, i64) {
    let filenode = sql::value(
        db,
        "SELECT relfilenode::int8 FROM pg_class WHERE oid = 'impact_big'::regclass",
    )
    .await;
    let columns = sql::column(
        db,
        "SELECT attname::text || ' ' || format_type(atttypid, atttypmod) || \
         CASE WHEN attnotnull THEN ' not null' ELSE '' END FROM pg_attribute \
         WHERE attrelid = 'impact_big'::regclass AND attnum > 0 ORDER BY attnum",
    )
    .await;
    let indexes = sql::count(
        db,
        "SELECT count(*) FROM pg_index WHERE indrelid = 'impact_big'::regclass",
    )
    .await;
    (filenode, columns, indexes)
}

#[tokio::test]
async fn impact_reports_the_locks_rewrites_scans_and_flags_postgresql_measured() {
    let dir = TempDir::new();
    let (target, _shadow, config) = setup(&dir).await;
    let started = Instant::now();
    let out = impact(&config, &["--json"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(0), "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    eprintln!("impact --json on {ROWS} rows took {took:?}");

    let add = statement(&report, IMPACT_ADD_COLUMN);
    assert_eq!(add["measured"], "transaction", "{add:#}");
    assert_eq!(modes(add), ["AccessExclusiveLock"], "{add:#}");
    assert!(strings(&add["rewrites"]).is_empty(), "{add:#}");
    assert!(strings(&add["scans"]).is_empty(), "{add:#}");
    assert!(
        add["risky"].as_array().expect("risky").is_empty(),
        "no rewrite, no scan, no blocker: not flagged: {add:#}"
    );
    let size = &add["tables"][0];
    assert_eq!(size["relation"], "public.impact_big", "{add:#}");
    assert!(
        size["bytes"].as_u64().expect("bytes") > 1024 * 1024,
        "{add:#}"
    );
    let rows = size["rows"].as_f64().expect("rows");
    assert!((rows - ROWS as f64).abs() < ROWS as f64 * 0.1, "{add:#}");

    let change = statement(&report, IMPACT_CHANGE_TYPE);
    assert_eq!(
        strings(&change["rewrites"]),
        ["public.impact_big"],
        "{change:#}"
    );
    // Held since the added column; PostgreSQL also takes SHARE to rebuild the primary key.
    assert!(
        modes(change).contains(&"AccessExclusiveLock".to_owned()),
        "{change:#}"
    );
    let risky = strings(&change["risky"]);
    assert!(
        risky.len() == 1 && risky[0].starts_with("rewrites public.impact_big"),
        "{change:#}"
    );

    let not_null = statement(&report, IMPACT_SET_NOT_NULL);
    assert!(strings(&not_null["rewrites"]).is_empty(), "{not_null:#}");
    assert_eq!(
        strings(&not_null["scans"]),
        ["public.impact_big"],
        "{not_null:#}"
    );
    let risky = strings(&not_null["risky"]);
    assert!(
        risky.len() == 1 && risky[0].starts_with("scans public.impact_big"),
        "{not_null:#}"
    );

    let index = statement(&report, IMPACT_INDEX);
    assert_eq!(index["measured"], "sampled", "{index:#}");
    assert_eq!(modes(index), ["ShareUpdateExclusiveLock"], "{index:#}");
    assert!(strings(&index["rewrites"]).is_empty(), "{index:#}");
    assert!(
        index["risky"].as_array().expect("risky").is_empty(),
        "SHARE UPDATE EXCLUSIVE blocks no writes, and no session blocks it: {index:#}"
    );
    assert_eq!(report["flagged"], 2, "{report:#}");
    let runs: Vec<&str> = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["runs"].as_str().expect("runs"))
        .collect();
    assert_eq!(runs, ["transaction", "alone"], "{report:#}");

    // The text report, and --check failing on the two flags.
    let text = impact(&config, &["--check"]).await;
    assert_eq!(text.code, Some(1), "{}", text.all());
    assert!(
        text.stdout.contains("RISKY: rewrites public.impact_big")
            && text.stderr.contains("2 statement(s) flagged as risky"),
        "{}",
        text.all()
    );
    eprintln!("{}", text.stdout);
    drop(target);
}

#[tokio::test]
async fn impact_names_an_idle_in_transaction_reader_and_only_reads_the_target() {
    let dir = TempDir::new();
    let (target, _shadow, config) = setup(&dir).await;
    let db = target.connect().await;
    let before = table_state(&db).await;
    let history = sql::count(&db, "SELECT count(*) FROM seaql_migrations").await;

    // A session that read the table and stayed in its transaction.
    let mut reader_url = url::Url::parse(target.url()).expect("a URL");
    reader_url
        .query_pairs_mut()
        .append_pair("application_name", "reporting");
    let idle = connect(reader_url.as_str(), 1).await;
    let pid: i32 = sql::value(&idle, "SELECT pg_backend_pid()").await;
    idle.execute_unprepared("BEGIN; SELECT id FROM impact_big LIMIT 1")
        .await
        .expect("read in a transaction");

    // Run impact while watching the target's locks of its session ("ampd").
    let mut child = cli::command(
        cli::ampd_fixture(),
        &config,
        &["migrate", "impact", "--json", "--check"],
    )
    .env("AMPD_FIXTURE_MIGRATIONS", "impact")
    .spawn()
    .expect("spawn ampd-fixture");
    let watch = "SELECT l.locktype::text || ' ' || l.mode::text || ' ' || \
                 CASE WHEN c.oid < 16384 THEN 'catalog' \
                 ELSE COALESCE(n.nspname::text || '.' || c.relname::text, '-') END \
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 LEFT JOIN pg_class c ON c.oid = l.relation \
                 LEFT JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE a.datname = current_database() AND a.application_name = 'ampd' \
                 AND l.pid <> pg_backend_pid() AND l.locktype = 'relation'";
    let sessions = "SELECT count(*) FROM pg_stat_activity \
                    WHERE datname = current_database() AND application_name = 'ampd'";
    let mut seen_session = false;
    let mut locks = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("child").is_none() {
        assert!(Instant::now() < deadline, "impact did not finish in 60 s");
        seen_session |= sql::count(&db, sessions).await > 0;
        locks.extend(sql::column::<String>(&db, watch).await);
    }
    let out = child.wait_with_output().await.expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "--check flags: {stdout}\n{stderr}"
    );
    assert!(seen_session, "the watch saw impact's session on the target");
    let bookkeeping = [
        "public.seaql_migrations",
        "public.ampd_migrations",
        "public.seaql_migrations_pkey",
        "public.ampd_migrations_pkey",
    ];
    for lock in &locks {
        let relation = lock.rsplit(' ').next().unwrap_or_default();
        assert!(
            lock.starts_with("relation AccessShareLock ")
                && (relation == "catalog" || bookkeeping.contains(&relation)),
            "impact took {lock} on the target (all: {locks:?})"
        );
    }

    let report: Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let add = statement(&report, IMPACT_ADD_COLUMN);
    let blockers = add["blockers"].as_array().expect("blockers");
    assert!(
        blockers.iter().any(|b| b["pid"] == pid
            && b["state"] == "idle in transaction"
            && b["holds"]["mode"] == "AccessShareLock"),
        "the reader {pid} blocks the ACCESS EXCLUSIVE lock: {add:#}"
    );
    assert!(
        strings(&add["risky"]).iter().any(|r| r
            .starts_with(&format!("would wait behind pid {pid} (reporting),"))
            && r.contains("idle in transaction for")),
        "{add:#}"
    );
    // SHARE UPDATE EXCLUSIVE does not conflict with its ACCESS SHARE, and a READ COMMITTED
    // session idle in its transaction holds no snapshot.
    let index = statement(&report, IMPACT_INDEX);
    assert!(
        !index["blockers"]
            .as_array()
            .expect("blockers")
            .iter()
            .any(|b| b["pid"] == pid),
        "{index:#}"
    );

    // The text report says the same.
    let text = impact(&config, &[]).await;
    assert_eq!(text.code, Some(0), "{}", text.all());
    assert!(
        text.stdout.contains(&format!(
            "would wait behind pid {pid} (reporting), idle in transaction for "
        )),
        "{}",
        text.all()
    );
    eprintln!("{}", text.stdout);

    // Nothing changed on the target, and the reader is still there, in its transaction.
    assert_eq!(table_state(&db).await, before);
    assert_eq!(
        sql::count(&db, "SELECT count(*) FROM seaql_migrations").await,
        history
    );
    let state: String = sql::value(
        &db,
        &format!("SELECT state::text FROM pg_stat_activity WHERE pid = {pid}"),
    )
    .await;
    assert_eq!(state, "idle in transaction");
    idle.execute_unprepared("ROLLBACK").await.expect("rollback");
    let _ = idle.close().await;
}

#[tokio::test]
async fn impact_with_create_shadow_creates_a_temporary_database_and_drops_it() {
    let dir = TempDir::new();
    let target = TestDb::from_template(&template().await).await;
    let config = dir.config(target.url(), "");
    let out = impact(&config, &["--json", "--create-shadow"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["shadow_created"], true, "{report:#}");
    let shadow = report["shadow"].as_str().expect("shadow URL");
    let parsed = url::Url::parse(shadow).expect("a URL");
    let name = parsed.path().trim_start_matches('/');
    assert!(name.starts_with("ampd_impact_shadow_"), "{shadow}");
    // Measured there like on a configured shadow; size threshold at its default (100 MiB).
    assert_eq!(
        modes(statement(&report, IMPACT_INDEX)),
        ["ShareUpdateExclusiveLock"]
    );
    assert_eq!(report["flagged"], 0, "{report:#}");
    let admin = connect(admin_url(), 1).await;
    let left = sql::count(
        &admin,
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    )
    .await;
    assert_eq!(left, 0, "the temporary shadow {name} was dropped");
}

#[tokio::test]
async fn impact_without_a_shadow_says_how_to_get_one_and_refuses_the_target_as_shadow() {
    let dir = TempDir::new();
    let target = TestDb::from_template(&template().await).await;
    let config = dir.config(target.url(), "");
    let out = impact(&config, &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr
            .contains("error: no shadow database: set metadata_db.shadow_url")
            && out.stderr.contains("--create-shadow"),
        "{}",
        out.all()
    );

    // The same database under another spelling of its URL is still the target.
    let mut other_spelling = url::Url::parse(target.url()).expect("a URL");
    other_spelling
        .query_pairs_mut()
        .append_pair("application_name", "another");
    let config = dir.config(
        target.url(),
        &format!("shadow_url = \"{other_spelling}\"\n"),
    );
    let out = impact(&config, &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("reaches the metadata database itself"),
        "{}",
        out.all()
    );
    let db = target.connect().await;
    assert_eq!(
        sql::count(&db, "SELECT count(*) FROM impact_big").await,
        ROWS,
        "the target was not emptied"
    );
}
