//! `ampd migrate --dry-run` prints what a real run sends, in order, and `migrate status --json`
//! shows the plan:
//! - the statements of a dry run on a fresh database are those a real run on another fresh
//!   database sends, as seen on the wire (values in place of parameters aside);
//! - on a current database it reads once and says nothing would run;
//! - `--only` prints one migration's step without any database;
//! - a migration that needs data does not fail the dry run, and the script says where it depends on
//!   data;
//! - the status shows which pending migrations run together in a transaction and which alone.

use std::time::Duration;

use ampd::migrate::{self, MigrationSet};
use migration::{DbErr, MigrationName, MigrationTrait, SchemaManager};
use sea_orm::{ConnectionTrait, Statement};
use tests::TestDb;
use tests::cli::{self, TempDir, config_toml};
use tests::wire::StatementCounter;

/// `sql` split into statements (at `;` outside quotes), each with its values made anonymous:
/// quoted literals, `$n` parameters, numbers and `NULL` become `?`, and whitespace is one space.
fn normalise(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                // A literal ('' inside is a quote); E'...' loses its E below.
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                        }
                        Some('\'') | None => break,
                        Some(_) => {}
                    }
                }
                if current.ends_with('E') {
                    current.pop();
                }
                current.push_str(" NULL ");
            }
            '"' => {
                current.push('"');
                for d in chars.by_ref() {
                    current.push(d);
                    if d == '"' {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            ';' => statements.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    statements.push(current);
    statements
        .iter()
        .map(|s| tokens(s).join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

/// The tokens of `statement` (words of identifier characters, or single other characters), with
/// numbers, `$n` parameters and `NULL` made `?`.
fn tokens(statement: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if word.is_empty() {
            return;
        }
        let w = std::mem::take(word);
        let digits = w.trim_start_matches('$');
        let value = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            || w.eq_ignore_ascii_case("null");
        out.push(if value { "?".to_owned() } else { w });
    };
    for c in statement.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '$' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
        }
    }
    flush(&mut word, &mut out);
    out
}

#[test]
fn normalising_makes_values_anonymous_and_keeps_identifiers() {
    assert_eq!(
        normalise("SET a = 5; INSERT INTO t (v) VALUES ('x;y', E'\\\\', NULL, $1) -- c\n;"),
        ["SET a = ?", "INSERT INTO t ( v ) VALUES ( ? , ? , ? , ? )"]
    );
    assert_eq!(
        normalise("SELECT \"m2026_1\" FROM idx_2"),
        ["SELECT \" m2026_1 \" FROM idx_2"]
    );
}

#[tokio::test]
async fn dry_run_prints_the_statements_a_real_run_sends_in_order() {
    let dry_db = TestDb::empty().await;
    let real_db = TestDb::empty().await;
    let dir = TempDir::new();
    let dry_config = dir.file("dry.toml", &config_toml(dry_db.url(), ""));
    let dry = cli::ampd_with_config(&dry_config, &["migrate", "--dry-run"]).await;
    dry.assert_success();

    let wire = StatementCounter::start(real_db.url()).await;
    let real_config = dir.file("real.toml", &config_toml(wire.url(), ""));
    let real = cli::ampd_with_config(&real_config, &["migrate"]).await;
    real.assert_success().assert_stdout_contains(format!(
        "applied {} migrations",
        tests::schema_migration_count()
    ));

    let printed = normalise(&dry.stdout);
    let sent: Vec<String> = wire.sent().iter().flat_map(|s| normalise(s)).collect();
    if printed != sent {
        let width = printed.len().max(sent.len());
        let mut diff = String::new();
        for i in 0..width {
            let p = printed.get(i).map(String::as_str).unwrap_or("(none)");
            let s = sent.get(i).map(String::as_str).unwrap_or("(none)");
            if p != s {
                diff.push_str(&format!("#{i}\n  printed: {p}\n  sent:    {s}\n"));
            }
        }
        panic!("the dry run differs from what the run sent:\n{diff}");
    }
    println!(
        "dry run and real run: the same {} statements, in the same order",
        sent.len()
    );
    // The dry run changed nothing.
    let conn = dry_db.connect().await;
    assert!(tests::catalog::tables(&conn).await.is_empty());
}

#[tokio::test]
async fn dry_run_of_a_current_database_reads_once_and_says_nothing_would_run() {
    let dir = TempDir::new();
    let (_db, config) = cli::database_at_head(&dir, "").await;
    let out = cli::ampd_with_config(&config, &["migrate", "--dry-run"]).await;
    out.assert_success();
    assert_eq!(normalise(&out.stdout).len(), 1, "{}", out.stdout);
    out.assert_stdout_contains("-- schema is up to date: nothing would run");
}

#[tokio::test]
async fn dry_run_only_prints_one_migrations_step_without_a_database() {
    let dir = TempDir::new();
    // Nothing listens there: the database is not contacted.
    let config = dir.config("postgresql://lint@127.0.0.1:1/lint", "");
    let name = "m20261201_000001_index_physical_tables_active_revision";
    let out = cli::ampd_with_config(&config, &["migrate", "--dry-run", "--only", name]).await;
    out.assert_success();
    let statements = normalise(&out.stdout);
    let build = statements
        .iter()
        .position(|s| {
            s.starts_with("CREATE INDEX CONCURRENTLY \" idx_physical_tables_active_revision_id \"")
        })
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(
        !statements[..build].iter().any(|s| s == "BEGIN"),
        "the build runs outside a transaction: {}",
        out.stdout
    );
    assert_eq!(statements[build + 1], "BEGIN", "{}", out.stdout);
    assert!(statements[build + 2].starts_with("INSERT INTO seaql_migrations"));
    // The records commit; then the step's settings are reset and its session lock released.
    assert_eq!(statements[build + 4], "COMMIT", "{}", out.stdout);
    assert!(
        statements
            .last()
            .is_some_and(|s| s.starts_with("SELECT pg_advisory_unlock")),
        "{}",
        out.stdout
    );

    let out = cli::ampd_with_config(&config, &["migrate", "--dry-run", "--only", "m1_nope"]).await;
    out.assert_code(1)
        .assert_stderr_contains("this ampd has no migration m1_nope");
}

/// Backfills from a row it reads first: what it sends next depends on the data.
struct NeedsData;

impl MigrationName for NeedsData {
    fn name(&self) -> &str {
        "m20990105_000001_needs_data"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for NeedsData {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS n FROM pg_class",
            ))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("no count".into()))?;
        let n: i64 = row.try_get("", "n")?;
        db.execute_unprepared(&format!("CREATE TABLE nd_seen AS SELECT {n} AS relations"))
            .await
            .map(|_| ())
    }
}

#[tokio::test]
async fn a_migration_that_needs_data_does_not_fail_the_dry_run_and_the_script_says_so() {
    let db = TestDb::empty().await;
    let set = MigrationSet::new(vec![Box::new(NeedsData)], |_| Some("0".repeat(64)));
    let plan = migrate::dry_run(&tests::metadata_config(db.url()), &set)
        .await
        .expect("a dry run does not fail");
    let script = plan.script();
    assert!(
        script.contains("-- returns rows in a real run; a dry run has none to give the migration"),
        "{script}"
    );
    assert!(
        script.contains("-- in this dry run m20990105_000001_needs_data stopped here (")
            && script.contains(
                "): the rest of what it sends depends on the database's data and is known only \
                 when it runs"
            ),
        "{script}"
    );
    // The real run reads the row and goes on.
    let report = migrate::migrate(&tests::metadata_config(db.url()), &set)
        .await
        .expect("a real run applies it");
    assert_eq!(report.applied.len(), 1);
}

#[tokio::test]
async fn status_json_shows_which_pending_migrations_run_together_and_which_alone() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    let out = cli::run(
        cli::ampd(),
        &[
            "--config",
            config.to_str().unwrap(),
            "migrate",
            "status",
            "--json",
        ],
        &[],
        Duration::from_secs(60),
    )
    .await;
    out.assert_success();
    let states: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let plan: Vec<(String, u64, String)> = states
        .as_array()
        .expect("array")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_owned(),
                s["step"].as_u64().unwrap_or(0),
                s["runs"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let (together, rest) = plan.split_at(7);
    for (name, step, runs) in together {
        assert_eq!((*step, runs.as_str()), (1, "transaction"), "{name}");
    }
    assert_eq!(
        rest,
        [
            (
                "m20261201_000001_index_physical_tables_active_revision".to_owned(),
                2,
                "alone".to_owned()
            ),
            (
                "m20261206_000001_index_gc_manifest_expiration".to_owned(),
                3,
                "alone".to_owned()
            ),
            (
                "m20261206_000002_add_claim_epochs".to_owned(),
                4,
                "transaction".to_owned()
            ),
            (
                "m20261206_000003_jobs_node_fk_set_null".to_owned(),
                4,
                "transaction".to_owned()
            ),
            (
                "m20261206_000004_validate_jobs_node_fk".to_owned(),
                5,
                "alone".to_owned()
            ),
            (
                "m20261206_000005_index_physical_table_revisions_table".to_owned(),
                6,
                "alone".to_owned()
            ),
            (
                "m20261206_000006_index_jobs_status_id".to_owned(),
                7,
                "alone".to_owned()
            ),
            (
                "m20261206_000007_index_job_events_created_at".to_owned(),
                8,
                "alone".to_owned()
            ),
            (
                "m20261206_000008_index_physical_table_revisions_writer".to_owned(),
                9,
                "alone".to_owned()
            ),
            (
                "m20261206_000009_index_jobs_finished_updated_at".to_owned(),
                10,
                "alone".to_owned()
            ),
            (
                "m20261206_000010_index_workers_heartbeat_at".to_owned(),
                11,
                "alone".to_owned()
            ),
        ]
    );
}
