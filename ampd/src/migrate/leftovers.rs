//! What an interrupted migration that runs outside a transaction can leave behind, found before it
//! runs again. A `CREATE INDEX CONCURRENTLY` that fails (or whose session dies) half-way leaves an
//! INVALID index of its name: not used by queries, still maintained by every write, and silently
//! kept by `IF NOT EXISTS`. One that completed, in a run that died before recording it, leaves a
//! valid index the migration would fail to create. Either way the run refuses and gives the
//! statement that removes it; it never counts the migration as applied.

use migration::MigrationTrait;

use super::error::{MigrateError, quote_ident, quote_literal};
use super::session::{Line, Session};

/// The statements `migration` sends when it runs, as far as they are known without running it.
pub(super) async fn capture(migration: &dyn MigrationTrait) -> Vec<String> {
    let Ok(session) = Session::recording(None).await else {
        return Vec::new();
    };
    // A migration that needs data it cannot have here stops early: what it sent so far counts.
    let _ = session.up(migration).await;
    session
        .script()
        .into_iter()
        .filter_map(|line| match line {
            Line::Sql { sql, .. } => Some(sql),
            Line::Note(_) => None,
        })
        .collect()
}

/// The names of the indexes `statements` build concurrently.
pub(super) fn concurrent_indexes(statements: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for sql in statements {
        let words: Vec<&str> = sql.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let Some(at) = upper
            .windows(2)
            .position(|w| w[0] == "INDEX" && w[1] == "CONCURRENTLY")
        else {
            continue;
        };
        if upper.first().map(String::as_str) != Some("CREATE") {
            continue;
        }
        let mut i = at + 2;
        if upper
            .get(i..i + 3)
            .is_some_and(|w| w == ["IF", "NOT", "EXISTS"])
        {
            i += 3;
        }
        let Some(name) = words.get(i) else { continue };
        if upper[i] == "ON" {
            // An unnamed index: PostgreSQL chooses its name, which cannot be looked for.
            continue;
        }
        let last = name.rsplit("\".\"").next().unwrap_or(name);
        names.push(last.trim_matches('"').replace("\"\"", "\""));
    }
    names
}

/// Refuses to run `migration` when an index it builds concurrently already exists, valid or not.
pub(super) async fn check(
    session: &Session,
    migration: &dyn MigrationTrait,
) -> Result<(), MigrateError> {
    match find(session, migration).await? {
        Some(found) => Err(found),
        None => Ok(()),
    }
}

/// The error describing an index of `migration` found in the database, if there is one.
pub(super) async fn find(
    session: &Session,
    migration: &dyn MigrationTrait,
) -> Result<Option<MigrateError>, MigrateError> {
    let indexes = concurrent_indexes(&capture(migration).await);
    if indexes.is_empty() {
        return Ok(None);
    }
    let names: Vec<String> = indexes.iter().map(|n| quote_literal(n)).collect();
    let sql = format!(
        "SELECT n.nspname::text AS schema, c.relname::text AS name, i.indisvalid AS valid \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = ANY (current_schemas(false)) AND c.relname IN ({}) \
         ORDER BY i.indisvalid, c.relname",
        names.join(", ")
    );
    session.note(format!(
        "looks for what an interrupted run of {} may have left (its index {})",
        migration.name(),
        indexes.join(", ")
    ));
    let rows = session.read(&sql).await.map_err(MigrateError::database)?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let schema: String = row.try_get("", "schema").map_err(MigrateError::database)?;
    let name: String = row.try_get("", "name").map_err(MigrateError::database)?;
    let valid: bool = row.try_get("", "valid").map_err(MigrateError::database)?;
    let index = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
    Ok(Some(MigrateError::LeftOver {
        name: migration.name().to_owned(),
        statement: format!("DROP INDEX CONCURRENTLY IF EXISTS {index};"),
        found: if valid {
            "already exists although the migration is not recorded as applied (an earlier run may \
             have built it and stopped before recording it; it is rebuilt)"
                .to_owned()
        } else {
            "is left INVALID by an earlier run of it that failed half-way (CREATE INDEX \
             CONCURRENTLY)"
                .to_owned()
        },
        index,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_index_names_are_found_in_what_sea_query_renders() {
        let statements = vec![
            "CREATE INDEX CONCURRENTLY \"idx_a\" ON \"t\" (\"a\")".to_owned(),
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"idx_b\" ON \"t\" (\"b\")".to_owned(),
            "create index concurrently idx_c on t (c)".to_owned(),
            "CREATE INDEX \"idx_d\" ON \"t\" (\"d\")".to_owned(),
            "CREATE INDEX CONCURRENTLY ON t (e)".to_owned(),
            "DROP INDEX CONCURRENTLY \"idx_f\"".to_owned(),
        ];
        assert_eq!(concurrent_indexes(&statements), ["idx_a", "idx_b", "idx_c"]);
    }
}
