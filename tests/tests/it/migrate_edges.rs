//! `ampd migrate` at the edges a DBA meets on a production database, run as a user runs it:
//! - closed or failing pipes (`2>&1 | head -1`, `2>&-`, `> /dev/full`, a reader gone before the
//!   first line): every migration is applied or none, never a run stopped half-way, and what reaches
//!   the terminal says exactly which were applied;
//! - global flags after the subcommand (`ampd migrate --config X status`), and `AMP_CONFIG=""`;
//! - mistyped URLs refused before connecting, none printing its password, while
//!   `postgresql:///db` (a Unix socket and the OS user) keeps working;
//! - permission errors on the read path, on CONNECT and on the bookkeeping, each with the GRANT that
//!   fixes it (run as given);
//! - all preflight checks before the first step (a leftover index, the bookkeeping privileges);
//! - `accept-checksum` against an unknown algorithm and a database that is ahead, and its audit;
//! - `CREATE INDEX CONCURRENTLY` waiting for older transactions under its own bound, not under
//!   `ddl_lock_timeout_ms`, and not cut by a database-level `statement_timeout`;
//! - failures on `direct_url` named as such; a search path without a schema explained.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection};
use tests::TestDb;
use tests::cli::{self, Output, TempDir, config_toml};

/// The schema's last migration: it builds an index concurrently (runs alone).
const CONCURRENT: &str = "m20261201_000001_index_physical_tables_active_revision";

async fn applied(db: &DatabaseConnection) -> i64 {
    tests::sql::count(
        db,
        "SELECT count(*) FROM seaql_migrations WHERE to_regclass('seaql_migrations') IS NOT NULL",
    )
    .await
}

async fn applied_count(url: &str) -> i64 {
    let conn = tests::connect(url, 1).await;
    let exists: bool =
        tests::sql::value(&conn, "SELECT to_regclass('seaql_migrations') IS NOT NULL").await;
    let n = if exists { applied(&conn).await } else { 0 };
    let _ = conn.close().await;
    n
}

/// `url` with its user (and password) replaced.
fn as_user(url: &str, user: &str) -> String {
    let mut u = url::Url::parse(url).expect("url");
    u.set_username(user).expect("set user");
    u.set_password(None).expect("no password");
    u.to_string()
}

/// Runs `ampd migrate` through `sh -c` with `shell` around it (`{ampd}` is replaced by the
/// command), 60 s at most; the exit code is the shell's.
async fn through_shell(config: &Path, shell: &str) -> Output {
    let ampd = format!(
        "'{}' --config '{}' migrate",
        cli::ampd().display(),
        config.display()
    );
    cli::run(
        Path::new("/bin/bash"),
        &["-c", &shell.replace("{ampd}", &ampd)],
        &[],
        Duration::from_secs(60),
    )
    .await
}

#[tokio::test]
async fn closed_or_failing_pipes_never_stop_a_run_half_way() {
    let total = tests::schema_migration_count() as i64;

    // A reader of both streams gone before the first line (`2>&1 | head -0`): every log line fails.
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut cmd = cli::command(cli::ampd(), &config, &["migrate"]);
    cmd.stdout(Stdio::from(writer.try_clone().expect("clone")))
        .stderr(Stdio::from(writer));
    let status = tokio::time::timeout(Duration::from_secs(60), cmd.status())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(0), "a closed pipe");
    assert_eq!(applied_count(db.url()).await, total, "a closed pipe");

    // `2>&1 | head -1`, `2>&-` and `>&-`: exit 0 with every migration applied.
    for shell in [
        "set -o pipefail; {ampd} 2>&1 | head -1",
        "{ampd} 2>&-",
        "{ampd} >&- 2>&-",
    ] {
        let db = TestDb::empty().await;
        let dir = TempDir::new();
        let config = dir.config(db.url(), "");
        let out = through_shell(&config, shell).await;
        out.assert_success();
        assert_eq!(applied_count(db.url()).await, total, "{shell}");
    }

    // `> /dev/full`: the run is done, and stderr says exactly what it applied.
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = through_shell(&config, "{ampd} > /dev/full").await;
    assert_eq!(applied_count(db.url()).await, total);
    out.assert_code(1)
        .assert_stderr_contains("could not be written to stdout")
        .assert_stderr_contains(format!("applied {total} migrations"));
    for name in tests::schema_migrations() {
        out.assert_stderr_contains(&name);
    }
}

#[tokio::test]
async fn global_flags_work_after_the_subcommand_and_an_empty_amp_config_is_explained() {
    let dir = TempDir::new();
    let (_db, config) = cli::database_at_head(&dir, "").await;
    let config = config.to_str().expect("utf-8");
    let long = Duration::from_secs(60);
    for args in [
        vec!["migrate", "--config", config, "status"],
        vec!["migrate", "status", "--config", config],
        vec!["migrate", "--config", config, "status", "--json"],
        vec!["migrate", "--config", config, "--dry-run"],
        vec![
            "migrate",
            "--config",
            config,
            "accept-checksum",
            CONCURRENT,
            "--reason",
            "r",
        ],
    ] {
        let out = cli::run(cli::ampd(), &args, &[], long).await;
        out.assert_success();
    }
    let both = cli::run(
        cli::ampd(),
        &["migrate", "--config", config, "--dry-run", "status"],
        &[],
        long,
    )
    .await;
    both.assert_code(1).assert_stderr_contains("--dry-run");

    let empty = cli::run(cli::ampd(), &["migrate"], &[("AMP_CONFIG", "")], long).await;
    empty
        .assert_code(1)
        .assert_stderr_contains("AMP_CONFIG is set but empty")
        .assert_stderr_lacks("value is required");
}

#[tokio::test]
async fn mistyped_urls_are_refused_before_connecting_without_printing_the_password() {
    let dir = TempDir::new();
    for url in [
        "postgres:/",
        "postgresql:/amp:HunterPw2@host/db",
        "postgresql:amp:HunterPw2@host/db",
        "postgresql://amp:HunterPw2host/db",
        "postgresql://amp:Hunter@Pw2@host/db",
        "postgresql://amp:HunterPw2@my host/db",
    ] {
        let config = dir.file(
            "bad.toml",
            &format!("[metadata_db]\nurl = \"{url}\"\nconnect_timeout_secs = 1\n"),
        );
        let out = cli::run(
            cli::ampd(),
            &["--config", config.to_str().unwrap(), "migrate"],
            &[("RUST_LOG", "debug")],
            Duration::from_secs(30),
        )
        .await;
        out.assert_code(1);
        for secret in ["HunterPw2", "Hunter@Pw2", "Pw2@"] {
            out.assert_not_in_output(secret);
        }
        // Refused before connecting: the key named, no connection attempted.
        let all = out.all();
        assert!(
            all.contains("metadata_db.url"),
            "{url} is not refused before connecting: {all}"
        );
        out.assert_not_in_output("failed to connect");
    }

    // `postgresql:///db`: the default Unix socket and the OS user, as libpq reads it.
    let db = TestDb::empty().await;
    let admin = url::Url::parse(tests::admin_url()).expect("admin URL");
    let socket_dir = admin
        .query_pairs()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.into_owned());
    let Some(socket_dir) = socket_dir else {
        tests::not_run(
            "postgresql:///db",
            "the test server is not on a Unix socket",
        );
        return;
    };
    let config = dir.file(
        "socket.toml",
        &config_toml(&format!("postgresql:///{}", db.name()), ""),
    );
    let user = match admin.username() {
        "" => "postgres",
        user => user,
    };
    let port = admin.port().unwrap_or(5432).to_string();
    let out = cli::run(
        cli::ampd(),
        &["--config", config.to_str().unwrap(), "migrate"],
        &[("PGHOST", &socket_dir), ("PGPORT", &port), ("PGUSER", user)],
        Duration::from_secs(60),
    )
    .await;
    out.assert_success();
    assert_eq!(
        applied_count(db.url()).await,
        tests::schema_migration_count() as i64
    );
}

#[tokio::test]
async fn accept_checksum_refuses_an_unknown_algorithm_and_a_database_that_is_ahead() {
    let dir = TempDir::new();
    let (db, config) = cli::database_at_head(&dir, "").await;
    let conn = db.connect().await;
    let name = "m20261101_000001_create_workers";
    let accept = |config: std::path::PathBuf| async move {
        cli::ampd_with_config(
            &config,
            &["migrate", "accept-checksum", name, "--reason", "reviewed"],
        )
        .await
    };

    // Recorded by a newer ampd, with an algorithm this one does not know: refused, row kept.
    conn.execute_unprepared(&format!(
        "UPDATE ampd_migrations SET checksum = 'newer', checksum_algorithm = 99 WHERE version = '{name}'"
    ))
    .await
    .expect("newer algorithm");
    let out = accept(config.clone()).await;
    out.assert_code(1).assert_stderr_contains("algorithm 99");
    let kept: i64 = tests::sql::value(
        &conn,
        &format!("SELECT checksum_algorithm::bigint FROM ampd_migrations WHERE version = '{name}'"),
    )
    .await;
    assert_eq!(kept, 99);

    // A database that is ahead (a migration this ampd does not know): refused, row kept.
    conn.execute_unprepared(&format!(
        "UPDATE ampd_migrations SET checksum = 'edited', checksum_algorithm = 2 WHERE version = '{name}'; \
         INSERT INTO seaql_migrations (version, applied_at) VALUES ('m20991231_999999_from_a_newer_ampd', 0)"
    ))
    .await
    .expect("ahead");
    let out = accept(config.clone()).await;
    out.assert_code(1)
        .assert_stderr_contains("database is newer than this ampd");
    let kept: String = tests::sql::value(
        &conn,
        &format!("SELECT checksum FROM ampd_migrations WHERE version = '{name}'"),
    )
    .await;
    assert_eq!(kept, "edited");

    // Once the database is not ahead, the change is accepted and the audit names the role.
    conn.execute_unprepared(
        "DELETE FROM seaql_migrations WHERE version = 'm20991231_999999_from_a_newer_ampd'",
    )
    .await
    .expect("not ahead");
    let out = accept(config).await;
    out.assert_success();
    let role: String = tests::sql::value(
        &conn,
        &format!(
            "SELECT checksum_history -> -1 ->> 'role' FROM ampd_migrations WHERE version = '{name}'"
        ),
    )
    .await;
    let current: String = tests::sql::value(&conn, "SELECT current_user::text").await;
    assert_eq!(role, current);
}

/// A login role of this test, dropped by the returned guard's caller.
async fn login_role(prefix: &str) -> String {
    let role = tests::unique_name(prefix);
    tests::admin_exec(&format!("CREATE ROLE \"{role}\" LOGIN")).await;
    role
}

/// The statement after `marker` in `text`, up to its `;`.
fn statement_after(text: &str, marker: &str) -> Option<String> {
    let rest = text.split(marker).nth(1)?;
    let end = rest.find(';')?;
    Some(rest[..=end].trim().to_owned())
}

#[tokio::test]
async fn read_path_and_connect_permission_errors_give_the_grant_that_fixes_them() {
    let dir = TempDir::new();
    let (db, _) = cli::database_at_head(&dir, "").await;
    let role = login_role("reader").await;
    let config = dir.file("role.toml", &config_toml(&as_user(db.url(), &role), ""));
    let admin = db.connect().await;

    // No rights on the bookkeeping tables of an up-to-date database.
    let denied = cli::ampd_with_config(&config, &["migrate"]).await;
    let grant = statement_after(&denied.stderr, "As an administrator, run: ");
    if let Some(grant) = &grant {
        admin.execute_unprepared(grant).await.expect("the GRANT");
    }
    let after = cli::ampd_with_config(&config, &["migrate"]).await;

    // CONNECT revoked.
    admin
        .execute_unprepared(&format!(
            "REVOKE CONNECT ON DATABASE \"{0}\" FROM PUBLIC; REVOKE CONNECT ON DATABASE \"{0}\" FROM \"{role}\"",
            db.name()
        ))
        .await
        .expect("revoke connect");
    let no_connect = cli::ampd_with_config(&config, &["migrate"]).await;
    let connect_grant = statement_after(&no_connect.stderr, "As an administrator, run: ");
    if let Some(grant) = &connect_grant {
        admin.execute_unprepared(grant).await.expect("the GRANT");
    }
    let reconnected = cli::ampd_with_config(&config, &["migrate", "status"]).await;
    drop(admin);
    drop(db);
    tests::admin_exec(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;

    denied
        .assert_code(1)
        .assert_stderr_contains("permission denied");
    assert!(grant.is_some(), "{}", denied.stderr);
    assert!(
        !grant.as_deref().unwrap_or_default().contains("..."),
        "{grant:?}"
    );
    after
        .assert_success()
        .assert_stdout_contains("schema is up to date");
    no_connect.assert_code(1);
    assert!(
        connect_grant
            .as_deref()
            .is_some_and(|g| g.starts_with("GRANT CONNECT ON DATABASE")),
        "{}",
        no_connect.stderr
    );
    reconnected.assert_success();
}

/// What the configurations of the tests that make an earlier migration pending again need: newer
/// ones stay applied, so it is out of order.
const OUT_OF_ORDER: &str = "allow_out_of_order = true";

/// A database at head whose migrations `unapply` are made pending again (their records deleted,
/// what they built kept); its configuration allows them to run out of order.
async fn last_pending(dir: &TempDir, unapply: &[&str]) -> (TestDb, std::path::PathBuf) {
    let (db, config) = cli::database_at_head(dir, OUT_OF_ORDER).await;
    let conn = db.connect().await;
    for name in unapply {
        conn.execute_unprepared(&format!(
            "DELETE FROM seaql_migrations WHERE version = '{name}'"
        ))
        .await
        .expect("unapply");
    }
    let _ = conn.close().await;
    (db, config)
}

#[tokio::test]
async fn a_leftover_index_is_refused_before_any_step_runs() {
    let dir = TempDir::new();
    // The index build (alone) pending with its index still there, and ampd's own table gone: a run
    // would first create it and record the applied migrations in a transaction step.
    let (db, config) = last_pending(&dir, &[CONCURRENT]).await;
    let conn = db.connect().await;
    conn.execute_unprepared("DROP TABLE ampd_migrations")
        .await
        .expect("drop ampd_migrations");
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    let created: bool =
        tests::sql::value(&conn, "SELECT to_regclass('ampd_migrations') IS NOT NULL").await;
    out.assert_code(1)
        .assert_stderr_contains("nothing was changed");
    assert!(!created, "a step ran before the refusal: {}", out.stderr);
}

#[tokio::test]
async fn bookkeeping_privileges_are_checked_before_the_index_is_built() {
    let dir = TempDir::new();
    let (db, _) = last_pending(&dir, &[CONCURRENT]).await;
    let conn = db.connect().await;
    conn.execute_unprepared("DROP INDEX idx_physical_tables_active_revision_id")
        .await
        .expect("drop index");
    let role = login_role("indexer").await;
    // The role owns the table the index is built on (and may create in its schema, as building
    // an index needs) and may read, but not write, the bookkeeping.
    conn.execute_unprepared(&format!(
        "ALTER TABLE physical_tables OWNER TO \"{role}\"; \
         GRANT USAGE, CREATE ON SCHEMA public TO \"{role}\"; \
         GRANT SELECT ON seaql_migrations, ampd_migrations TO \"{role}\""
    ))
    .await
    .expect("grants");
    let config = dir.file(
        "role.toml",
        &config_toml(&as_user(db.url(), &role), OUT_OF_ORDER),
    );
    let denied = cli::ampd_with_config(&config, &["migrate"]).await;
    let built: i64 = tests::sql::count(
        &conn,
        "SELECT count(*) FROM pg_class WHERE relname = 'idx_physical_tables_active_revision_id'",
    )
    .await;
    let grant = statement_after(&denied.stderr, "As an administrator, run: ");
    if let Some(grant) = &grant {
        conn.execute_unprepared(grant).await.expect("the GRANT");
    }
    let after = cli::ampd_with_config(&config, &["migrate"]).await;
    let _ = conn.close().await;
    drop(db);
    tests::admin_exec(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;

    denied.assert_code(1);
    assert_eq!(
        built, 0,
        "the index was built before the refusal: {}",
        denied.stderr
    );
    assert!(
        grant.as_deref().is_some_and(|g| g.contains("INSERT")
            && g.contains("\"seaql_migrations\"")
            && !g.contains("...")),
        "{}",
        denied.stderr
    );
    after.assert_success();
}

#[tokio::test]
async fn a_concurrent_index_build_waits_for_older_transactions_under_its_own_bound() {
    let dir = TempDir::new();
    let (db, _) = last_pending(&dir, &[CONCURRENT]).await;
    let config = dir.file(
        "bounds.toml",
        &config_toml(
            db.url(),
            "ddl_lock_timeout_ms = 200\nconcurrent_index_timeout_secs = 60\nallow_out_of_order = true",
        ),
    );
    let admin = db.connect().await;
    admin
        .execute_unprepared(&format!(
            "DROP INDEX idx_physical_tables_active_revision_id; \
             ALTER DATABASE \"{}\" SET statement_timeout = '500ms'",
            db.name()
        ))
        .await
        .expect("set up");
    // An older transaction with a snapshot: the build waits for it to end.
    let old = tests::connect(db.url(), 1).await;
    old.execute_unprepared("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .await
        .expect("old transaction");
    let run = tokio::spawn({
        let config = config.clone();
        async move { cli::ampd_with_config(&config, &["migrate"]).await }
    });
    // Wait until the build has waited for more than both other bounds, then end the transaction.
    let waited = async {
        loop {
            let n = tests::sql::count(
                &admin,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND query ILIKE 'CREATE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock' \
                 AND now() - query_start > interval '1 second'",
            )
            .await;
            if n > 0 || run.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), waited)
        .await
        .expect("the build waits");
    old.execute_unprepared("COMMIT").await.expect("commit");
    let out = run.await.expect("run");
    out.assert_success();

    // Under a bound of 1 s, the error names that bound.
    let conn = db.connect().await;
    conn.execute_unprepared(&format!(
        "DROP INDEX idx_physical_tables_active_revision_id; \
         DELETE FROM seaql_migrations WHERE version = '{CONCURRENT}'"
    ))
    .await
    .expect("pending again");
    let short = dir.file(
        "short.toml",
        &config_toml(
            db.url(),
            "ddl_lock_timeout_ms = 200\nconcurrent_index_timeout_secs = 1\nallow_out_of_order = true",
        ),
    );
    old.execute_unprepared("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .await
        .expect("old transaction");
    let out = cli::ampd_with_config(&short, &["migrate"]).await;
    old.execute_unprepared("ROLLBACK").await.expect("rollback");
    out.assert_code(1)
        .assert_stderr_contains("concurrent_index_timeout_secs");
}

#[tokio::test]
async fn failures_on_direct_url_are_named_as_such() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let missing = tests::database_url(&tests::unique_name("missing"));
    let config = dir.config(db.url(), &format!("direct_url = \"{missing}\""));
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("metadata_db.direct_url")
        .assert_stderr_lacks("fix metadata_db.url");
}

#[tokio::test]
async fn a_search_path_without_a_usable_schema_is_explained() {
    let db = TestDb::empty().await;
    tests::admin_exec(&format!(
        "ALTER DATABASE \"{}\" SET search_path = no_such_schema",
        db.name()
    ))
    .await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("search_path")
        .assert_stderr_contains("nothing was changed");
}
