//! The migrations produce exactly the schema of docs/schema.md, apply once, and undo exactly; and
//! docs/schema.md names everything that schema has.

use migration::{Migrator, MigratorTrait};
use tests::{TestDb, catalog};

fn expected_schema() -> Vec<String> {
    let mut lines: Vec<String> = include_str!("../expected_schema.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

fn assert_same(actual: &[String], expected: &[String]) {
    let missing: Vec<_> = expected.iter().filter(|l| !actual.contains(l)).collect();
    let unexpected: Vec<_> = actual.iter().filter(|l| !expected.contains(l)).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "schema differs from expected_schema.txt\nmissing:\n  {}\nunexpected:\n  {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        unexpected
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
    );
}

/// The sections of docs/schema.md that document a table (`### <table> — ...`), by table name:
/// the text up to the next heading.
fn documented_tables(doc: &str) -> std::collections::BTreeMap<&str, String> {
    let mut tables = std::collections::BTreeMap::new();
    let mut current: Option<(&str, String)> = None;
    for line in doc.lines() {
        if line.starts_with('#') {
            if let Some((name, text)) = current.take() {
                tables.insert(name, text);
            }
            if let Some(heading) = line.strip_prefix("### ") {
                let name = heading.split_whitespace().next().unwrap_or_default();
                current = Some((name, String::new()));
            }
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    if let Some((name, text)) = current {
        tables.insert(name, text);
    }
    tables
}

/// What docs/schema.md leaves out of `expected_schema.txt`: for each line there, the table
/// without a section, the column without a row in its table's section (`| a, b | ...` documents
/// `a` and `b`), or the constraint or index its table's section does not name in backticks.
fn undocumented(doc: &str, expected: &[String]) -> Vec<String> {
    let tables = documented_tables(doc);
    let mut missing = Vec::new();
    for line in expected {
        let mut words = line.split_whitespace();
        let (Some(kind), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        let (table, item) = name.split_once('.').unwrap_or((name, ""));
        let Some(section) = tables.get(table) else {
            missing.push(format!("table {table} (no `### {table}` section)"));
            continue;
        };
        let found = match kind {
            "table" => true,
            "column" => section.lines().any(|row| {
                row.strip_prefix('|')
                    .and_then(|cells| cells.split('|').next())
                    .is_some_and(|cell| cell.split(',').any(|c| c.trim() == item))
            }),
            _ => section.contains(&format!("`{item}`")) || section.contains(&format!("`{item}(")),
        };
        if !found {
            missing.push(format!("{kind} {name}"));
        }
    }
    missing
}

#[test]
fn docs_schema_names_every_table_column_constraint_and_index_of_the_schema() {
    let missing = undocumented(include_str!("../../../docs/schema.md"), &expected_schema());
    assert!(
        missing.is_empty(),
        "docs/schema.md does not document:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_schema_doc_check_finds_what_is_left_out() {
    let doc = "### jobs — one row per job\n| column | type |\n|---|---|\n| id, kind | bigint |\n\
               Index: `idx_jobs_status(status)`.\n### workers\n| id | bigint |\n";
    let expected: Vec<String> = [
        "table jobs",
        "column jobs.id bigint",
        "column jobs.kind text",
        "column jobs.status text",
        "index jobs.idx_jobs_status CREATE INDEX",
        "constraint jobs.jobs_pkey PRIMARY KEY (id)",
        "column workers.id bigint",
        "column workers.status text",
        "table files",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(
        undocumented(doc, &expected),
        [
            "column jobs.status",
            "constraint jobs.jobs_pkey",
            "column workers.status",
            "table files (no `### files` section)",
        ]
    );
}

#[tokio::test]
async fn migrating_an_empty_database_yields_exactly_the_documented_schema() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    assert!(catalog::snapshot(&conn).await.is_empty());
    Migrator::up(&conn, None).await.expect("migrate");
    assert_same(&catalog::snapshot(&conn).await, &expected_schema());
}

#[tokio::test]
async fn running_the_migrator_twice_applies_nothing_the_second_time() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    Migrator::up(&conn, None).await.expect("first run");
    let applied = Migrator::get_migration_models(&conn)
        .await
        .expect("applied");
    assert_eq!(applied.len(), Migrator::migrations().len());
    let schema = catalog::snapshot(&conn).await;

    assert!(
        Migrator::get_pending_migrations(&conn)
            .await
            .expect("pending")
            .is_empty()
    );
    Migrator::up(&conn, None).await.expect("second run");

    assert_eq!(
        Migrator::get_migration_models(&conn)
            .await
            .expect("applied"),
        applied
    );
    assert_eq!(catalog::snapshot(&conn).await, schema);
}

#[tokio::test]
async fn full_down_leaves_no_table_of_ours_and_up_again_reproduces_the_catalog() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    Migrator::up(&conn, None).await.expect("up");
    let before = catalog::snapshot(&conn).await;

    Migrator::down(&conn, None).await.expect("down to zero");
    assert_eq!(catalog::tables(&conn).await, ["seaql_migrations"]);
    assert!(catalog::snapshot(&conn).await.is_empty());
    assert!(
        Migrator::get_migration_models(&conn)
            .await
            .expect("applied")
            .is_empty(),
        "no migration is recorded as applied after a full down"
    );

    Migrator::up(&conn, None).await.expect("up again");
    assert_eq!(catalog::snapshot(&conn).await, before);
}

#[tokio::test]
async fn each_migration_down_undoes_exactly_its_up() {
    let db = TestDb::empty().await;
    let conn = db.connect().await;
    let count = Migrator::migrations().len() as u32;
    for step in 0..count {
        let before = catalog::snapshot(&conn).await;
        Migrator::up(&conn, Some(1)).await.expect("up one");
        let after = catalog::snapshot(&conn).await;
        assert_ne!(before, after, "migration {} changes the schema", step + 1);
        Migrator::down(&conn, Some(1)).await.expect("down one");
        assert_eq!(
            catalog::snapshot(&conn).await,
            before,
            "down of migration {} restores the schema before it",
            step + 1
        );
        Migrator::up(&conn, Some(1)).await.expect("up one again");
        assert_eq!(catalog::snapshot(&conn).await, after);
    }
    assert_same(&catalog::snapshot(&conn).await, &expected_schema());
}
