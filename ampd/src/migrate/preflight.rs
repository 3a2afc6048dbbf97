//! What a run checks before its first step, so that a refusal comes while nothing has changed
//! (and its "nothing was changed" is true):
//! - every pending migration that runs alone: what an interrupted earlier run of it left behind
//!   ([`leftovers`]);
//! - the bookkeeping: the privileges recording needs on `seaql_migrations` and `ampd_migrations`
//!   (or, on a fresh database, `CREATE` in the schema they are created in, and a schema to create
//!   them in);
//! - a run with a step that must run alone: that the migration session is a session of its own
//!   (see [`Session::check_own`]), since that step holds the lock and its settings on the session.
//!
//! Each step checks again under its lock what may have changed while the run waited.

use super::error::{Identity, MigrateError, quote_ident};
use super::plan::{Plan, StepKind};
use super::session::Session;
use super::{leftovers, lock};
use crate::config::MetadataDbConfig;

/// Runs every check before the first step of `plan`.
pub(super) async fn check(
    session: &Session,
    cfg: &MetadataDbConfig,
    plan: &Plan<'_>,
) -> Result<(), MigrateError> {
    let alone: Vec<_> = plan
        .steps
        .iter()
        .filter(|s| s.kind == StepKind::Alone)
        .flat_map(|s| s.migrations.iter().copied())
        .collect();
    for &migration in &alone {
        if let Some(found) = leftovers::find(session, migration).await? {
            // A run holding the lock may be building that very index right now (INVALID until
            // it ends): the step decides under the lock, when that run is done.
            if !lock::held_by_a_run(session).await? {
                return Err(found);
            }
        }
    }
    bookkeeping(session, plan).await?;
    if let Some(first) = alone.first() {
        session.check_own(cfg, first.name()).await?;
    }
    Ok(())
}

/// Privileges the bookkeeping needs: `(table, privileges)`.
const NEEDED: [(&str, &[&str]); 2] = [
    ("seaql_migrations", &["SELECT", "INSERT"]),
    ("ampd_migrations", &["SELECT", "INSERT", "UPDATE"]),
];

fn privileges_sql() -> String {
    let mut columns = vec![
        "current_user::text AS role".to_owned(),
        "current_database()::text AS database".to_owned(),
        "current_schema()::text AS schema".to_owned(),
        "CASE WHEN current_schema() IS NULL THEN false \
         ELSE has_schema_privilege(current_schema(), 'CREATE') END AS can_create"
            .to_owned(),
    ];
    for (table, privileges) in NEEDED {
        columns.push(format!(
            "(SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass('{table}')) AS {table}_schema"
        ));
        let checks: Vec<String> = privileges
            .iter()
            .map(|p| format!("has_table_privilege(to_regclass('{table}'), '{p}')"))
            .collect();
        columns.push(format!(
            "COALESCE({}, true) AS {table}_ok",
            checks.join(" AND ")
        ));
    }
    format!("SELECT {}", columns.join(", "))
}

/// Refuses a run whose bookkeeping would be denied, with the statement that grants what is
/// missing.
async fn bookkeeping(session: &Session, plan: &Plan<'_>) -> Result<(), MigrateError> {
    session.note("the privileges the bookkeeping needs, checked before the first step");
    let rows = session
        .read(&privileges_sql())
        .await
        .map_err(MigrateError::database)?;
    let Some(row) = rows.first() else {
        return Ok(());
    };
    let get = |column: &str| row.try_get::<Option<String>>("", column).ok().flatten();
    let who = Identity {
        role: get("role").unwrap_or_default(),
        database: get("database").unwrap_or_default(),
        schema: get("schema"),
    };
    let role = quote_ident(&who.role);
    let creates = plan.bookkeeping.create_seaql || plan.bookkeeping.create_history;
    if creates {
        let Some(schema) = &who.schema else {
            return Err(MigrateError::NoSchema {
                role: role.clone(),
                database: quote_ident(&who.database),
                grant: format!("GRANT USAGE, CREATE ON SCHEMA \"public\" TO {role};"),
            });
        };
        let can_create: bool = row.try_get("", "can_create").unwrap_or(true);
        if !can_create {
            let schema = quote_ident(schema);
            return Err(MigrateError::CreateDenied {
                place: format!("schema {schema} of database {}", quote_ident(&who.database)),
                role: role.clone(),
                message: "checked before the first step: no CREATE privilege".to_owned(),
                grant: format!("GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};"),
            });
        }
    }
    let mut denied = Vec::new();
    let mut tables = Vec::new();
    for (table, privileges) in NEEDED {
        let Some(schema) = get(&format!("{table}_schema")) else {
            continue;
        };
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(table));
        let ok: bool = row.try_get("", &format!("{table}_ok")).unwrap_or(true);
        if !ok {
            denied.push(format!("{} on {qualified}", privileges.join(", ")));
        }
        tables.push(qualified);
    }
    if denied.is_empty() {
        return Ok(());
    }
    Err(MigrateError::BookkeepingDenied {
        role: role.clone(),
        missing: denied.join("; "),
        grant: format!(
            "GRANT SELECT, INSERT, UPDATE ON TABLE {} TO {role};",
            tables.join(", ")
        ),
    })
}
