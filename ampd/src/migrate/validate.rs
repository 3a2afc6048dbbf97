//! `ampd migrate validate`: whether the database and this binary agree, for CI and deploy checks.
//! Read-only, like `status`: it creates nothing, takes no lock and sends nothing that changes
//! anything.
//!
//! It agrees when every applied migration this binary knows has its checksum, every applied one it
//! does not know is recorded as compatible with it, nothing is half-applied (no index left INVALID
//! by a concurrent build that failed or was interrupted, no index of a pending migration that runs
//! alone already built), and no pending migration would be refused as out of order. Pending
//! migrations are fine (`ampd migrate` applies them) unless `require_current` says otherwise.

use migration::Algorithm;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde::Serialize;

use super::error::{MigrateError, quote_ident, quote_literal};
use super::set::{MigrationSet, uses_transaction};
use super::state::{self, DbState};
use super::verify::{ChecksumState, checksum_state};
use super::{compat, leftovers, order, plan};
use crate::config::MetadataDbConfig;
use crate::db;

/// One finding of `validate`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Whether it is fine.
    pub ok: bool,
    /// What was found, for people.
    pub what: String,
}

/// What `validate` found.
#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    /// Every finding, the problems among them (`ok == false`).
    pub checks: Vec<Check>,
    /// How many findings are problems.
    pub problems: usize,
}

impl Validation {
    fn ok(&mut self, what: String) {
        self.checks.push(Check { ok: true, what });
    }

    fn problem(&mut self, what: String) {
        self.problems += 1;
        self.checks.push(Check { ok: false, what });
    }

    /// One line per finding: `ok` or `PROBLEM`, then what.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for check in &self.checks {
            let mark = if check.ok { "ok     " } else { "PROBLEM" };
            out.push_str(&format!("{mark}  {}\n", check.what));
        }
        if self.problems == 0 {
            out.push_str("valid: the database agrees with this ampd\n");
        } else {
            out.push_str(&format!("invalid: {} problem(s)\n", self.problems));
        }
        out
    }
}

/// Validates the database against `set`, read-only. `allow_out_of_order`: pending migrations older
/// than the newest applied one are not a problem; `require_current`: any pending migration is.
pub async fn validate(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    allow_out_of_order: bool,
    require_current: bool,
) -> Result<Validation, MigrateError> {
    let db = db::connect(cfg, 1).await?;
    let result = run(&db, set, allow_out_of_order, require_current).await;
    let _ = db.close().await;
    result
}

async fn run(
    db: &DatabaseConnection,
    set: &MigrationSet,
    allow_out_of_order: bool,
    require_current: bool,
) -> Result<Validation, MigrateError> {
    let state = state::read(db).await.map_err(MigrateError::database)?;
    let mut v = Validation {
        checks: Vec::new(),
        problems: 0,
    };
    checksums(set, &state, &mut v);
    let (compatible, incompatible) = compat::unknown(set, &state);
    for name in compatible {
        v.ok(format!(
            "{name}: applied by a newer ampd, unknown to this one and recorded as compatible with it"
        ));
    }
    for name in incompatible {
        v.problem(format!(
            "{name}: applied, unknown to this ampd and not recorded as compatible with binaries that \
             do not know it (the database is newer than this ampd)"
        ));
    }
    pending(set, &state, allow_out_of_order, require_current, &mut v);
    half_applied(db, set, &state, &mut v).await?;
    Ok(v)
}

fn checksums(set: &MigrationSet, state: &DbState, v: &mut Validation) {
    let mut matching = 0;
    for row in state
        .applied
        .iter()
        .filter(|r| set.find(&r.version).is_some())
    {
        let name = &row.version;
        match checksum_state(set, row) {
            ChecksumState::Ok => matching += 1,
            ChecksumState::Unrecorded => v.ok(format!(
                "{name}: applied without ampd (by SeaORM's CLI); the next `ampd migrate` records it"
            )),
            ChecksumState::UnknownAlgorithm => v.problem(format!(
                "{name}: recorded with checksum algorithm {}, which this ampd does not know (a \
                 newer ampd migrated it)",
                row.algorithm
            )),
            ChecksumState::Mismatch => {
                let algorithm = Algorithm::from_number(row.algorithm).unwrap_or(Algorithm::CURRENT);
                v.problem(format!(
                    "{name}: checksum mismatch: recorded {} (algorithm {}), this ampd has {}; the \
                     migration was changed after it was applied (restore it, or `ampd migrate \
                     accept-checksum {name} --reason \"<why>\"` if the change was reviewed)",
                    row.checksum.as_deref().unwrap_or_default(),
                    row.algorithm,
                    set.checksum(name, algorithm)
                ));
            }
        }
    }
    if matching > 0 {
        v.ok(format!(
            "{matching} applied migration(s) match this ampd's checksums"
        ));
    }
}

fn pending(
    set: &MigrationSet,
    state: &DbState,
    allow_out_of_order: bool,
    require_current: bool,
    v: &mut Validation,
) {
    let known = compat::known_only(set, state);
    let late = order::find(set, &known);
    if let Some(late) = &late {
        let what = format!(
            "{}: pending but older than {}, the newest applied migration",
            late.pending.join(", "),
            late.newest
        );
        if allow_out_of_order {
            v.ok(format!("{what} (out of order, allowed)"));
        } else {
            v.problem(format!(
                "{what}: `ampd migrate` refuses it unless --allow-out-of-order"
            ));
        }
    }
    let pending: Vec<String> = plan::pending(set, &known)
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    match (pending.len(), require_current) {
        (0, _) => v.ok("nothing pending: the schema is at this ampd's head".to_owned()),
        (n, false) => v.ok(format!(
            "{n} pending migration(s), applied by the next `ampd migrate`: {}",
            pending.join(", ")
        )),
        (n, true) => v.problem(format!(
            "{n} pending migration(s) (--require-current): {}",
            pending.join(", ")
        )),
    }
}

/// Indexes left INVALID by a concurrent build, and indexes of pending migrations that run alone
/// already built although not recorded.
async fn half_applied(
    db: &DatabaseConnection,
    set: &MigrationSet,
    state: &DbState,
    v: &mut Validation,
) -> Result<(), MigrateError> {
    let mut expected: Vec<(String, String)> = Vec::new();
    for migration in plan::pending(set, &compat::known_only(set, state)) {
        if !uses_transaction(migration) {
            let statements = leftovers::capture(migration).await;
            for index in leftovers::concurrent_indexes(&statements) {
                expected.push((index, migration.name().to_owned()));
            }
        }
    }
    let names: Vec<String> = expected.iter().map(|(n, _)| quote_literal(n)).collect();
    let also = if names.is_empty() {
        String::new()
    } else {
        format!(" OR c.relname IN ({})", names.join(", "))
    };
    let sql = format!(
        "SELECT n.nspname::text AS schema, c.relname::text AS name, i.indisvalid AS valid \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = ANY (current_schemas(false)) AND (NOT i.indisvalid{also}) \
         ORDER BY n.nspname, c.relname"
    );
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .map_err(MigrateError::database)?;
    let mut found = 0;
    for row in rows {
        let schema: String = row.try_get("", "schema").map_err(MigrateError::database)?;
        let name: String = row.try_get("", "name").map_err(MigrateError::database)?;
        let valid: bool = row.try_get("", "valid").map_err(MigrateError::database)?;
        let index = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        let of = expected
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| m.as_str());
        let what = match (valid, of) {
            (false, Some(m)) => format!(
                "index {index} is INVALID: a run of pending migration {m} failed or was \
                 interrupted half-way (CREATE INDEX CONCURRENTLY)"
            ),
            (false, None) => format!(
                "index {index} is INVALID: a CREATE INDEX CONCURRENTLY failed or was interrupted \
                 half-way"
            ),
            (true, Some(m)) => format!(
                "index {index} exists although migration {m}, which builds it, is not recorded as \
                 applied (a run died before recording it)"
            ),
            (true, None) => continue,
        };
        found += 1;
        v.problem(format!(
            "{what}; remove it, then run ampd migrate: DROP INDEX CONCURRENTLY IF EXISTS {index};"
        ));
    }
    if found == 0 {
        v.ok("nothing half-applied (no INVALID index, no unrecorded index build)".to_owned());
    }
    Ok(())
}
