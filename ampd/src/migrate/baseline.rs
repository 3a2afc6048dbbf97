//! `ampd migrate baseline --to <migration>`: records the migrations up to `<migration>` as applied
//! without running them, on a database whose schema was created some other way (restored from a
//! dump without the bookkeeping tables, or by hand), after checking that the schema is what they
//! create.
//!
//! Under the migration lock, on the migration session:
//! 1. refuses a database that already records applied migrations;
//! 2. builds the reference: runs those migrations in a scratch schema of the same database
//!    ([`SCRATCH`], dropped again before the command returns) and reads its catalog;
//! 3. reads the catalog of the schema the migrations would have run in (`current_schema()`) and
//!    compares the two on the tables the migrations create: tables, columns with type,
//!    nullability, identity and default, indexes and constraints by name and definition
//!    ([`super::catalog`]). Any difference is listed and nothing is recorded;
//! 4. records each migration in one transaction, as adopted, with the reason, the role, the time
//!    and this ampd's version in `ampd_migrations.baseline`.
//!
//! What a migration did to data (a backfill) cannot be checked: the operator vouches for it.

use migration::MigrationTrait;

use super::catalog::{self, Catalog};
use super::error::{MigrateError, describe, quote_ident, quote_literal};
use super::plan::Bookkeeping;
use super::session::Session;
use super::set::MigrationSet;
use super::{lock, record, state};
use crate::config::MetadataDbConfig;

/// The scratch schema the reference is built in: dropped before and after each baseline.
pub const SCRATCH: &str = "ampd_baseline_scratch";

/// What [`baseline`] recorded.
#[derive(Debug, Clone)]
pub struct Baselined {
    /// The migrations recorded as applied, in order.
    pub recorded: Vec<String>,
    /// The schema that was compared.
    pub schema: String,
    /// How many objects (columns, indexes, constraints) were compared.
    pub compared: usize,
}

/// Records the migrations of `set` up to `to` as applied without running them, once the schema
/// is found to be what they create (see the module documentation).
pub async fn baseline(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    to: &str,
    reason: &str,
) -> Result<Baselined, MigrateError> {
    let Some(last) = set.names().iter().position(|name| *name == to) else {
        return Err(MigrateError::UnknownMigration {
            name: to.to_owned(),
        });
    };
    let migrations: Vec<&dyn MigrationTrait> = set.migrations().take(last + 1).collect();
    let session = Session::live(cfg).await?;
    let result = async {
        // It runs migrations in a scratch schema and records in a transaction of its own, holding
        // the lock on the session throughout: the session must be one of its own (not a pooler's
        // in transaction mode), as a step that runs alone needs.
        session.check_own(cfg, "ampd migrate baseline").await?;
        let limit = std::time::Duration::from_secs(cfg.migration_lock_timeout_secs);
        lock::acquire(&session, lock::Scope::Session, limit, "").await?;
        let result = locked(&session, set, &migrations, to, reason).await;
        let released = lock::release(&session).await;
        let baselined = result?;
        released?;
        Ok(baselined)
    }
    .await;
    session.close().await;
    result
}

async fn locked(
    session: &Session,
    set: &MigrationSet,
    migrations: &[&dyn MigrationTrait],
    to: &str,
    reason: &str,
) -> Result<Baselined, MigrateError> {
    let state = state::read(session).await.map_err(MigrateError::database)?;
    if !state.applied.is_empty() {
        return Err(MigrateError::BaselineNotEmpty {
            applied: state.applied.iter().map(|r| r.version.clone()).collect(),
        });
    }
    let Some(schema) = state.who.schema.clone() else {
        return Err(MigrateError::Database(
            "no schema on the search path exists: there is nothing to baseline".into(),
        ));
    };
    let expected = reference(session, migrations).await?;
    let actual = within_search_path(session, catalog::read(session, &schema)).await?;
    let differences = catalog::differences(&expected, &actual, to);
    if !differences.is_empty() {
        return Err(MigrateError::BaselineMismatch {
            to: to.to_owned(),
            differences,
        });
    }
    let recorded: Vec<String> = migrations.iter().map(|m| m.name().to_owned()).collect();
    record_all(session, set, &state, &recorded, to, reason).await?;
    tracing::warn!(
        to,
        reason,
        schema = %schema,
        "recorded {} migration(s) as applied without running them (baseline)",
        recorded.len()
    );
    Ok(Baselined {
        recorded,
        schema,
        compared: expected.objects.len(),
    })
}

/// Runs `work` and then restores the session's `search_path`, whatever `work` did to it.
async fn within_search_path<T>(
    session: &Session,
    work: impl Future<Output = Result<T, sea_orm::DbErr>>,
) -> Result<T, MigrateError> {
    let rows = session
        .read("SELECT current_setting('search_path') AS path")
        .await
        .map_err(MigrateError::database)?;
    let path: String = rows
        .first()
        .map(|row| row.try_get("", "path"))
        .transpose()
        .map_err(MigrateError::database)?
        .unwrap_or_default();
    let result = work.await;
    let restored = session
        .write(&format!(
            "SELECT set_config('search_path', {}, false)",
            quote_literal(&path)
        ))
        .await;
    let value = result.map_err(MigrateError::database)?;
    restored.map_err(MigrateError::database)?;
    Ok(value)
}

/// The catalog the migrations produce: they run in the scratch schema, which is dropped again.
async fn reference(
    session: &Session,
    migrations: &[&dyn MigrationTrait],
) -> Result<Catalog, MigrateError> {
    let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(SCRATCH));
    session.write(&drop).await.map_err(MigrateError::database)?;
    session
        .write(&format!("CREATE SCHEMA {}", quote_ident(SCRATCH)))
        .await
        .map_err(|e| {
            MigrateError::Database(format!(
                "baseline builds what the migrations create in a scratch schema, {SCRATCH}, and \
                 could not create it: {}",
                describe(&e)
            ))
        })?;
    let built = within_search_path(session, async {
        session
            .write(&format!("SET search_path TO {}", quote_ident(SCRATCH)))
            .await?;
        for &migration in migrations {
            run_up(session, migration).await.map_err(|e| {
                sea_orm::DbErr::Custom(format!(
                    "building the reference schema, migration {} failed: {}",
                    migration.name(),
                    describe(&e)
                ))
            })?;
        }
        catalog::read(session, SCRATCH).await
    })
    .await;
    let dropped = session.write(&drop).await;
    let catalog = built?;
    dropped.map_err(MigrateError::database)?;
    Ok(catalog)
}

/// Runs `migration.up` on the session, outside any transaction (the scratch schema is dropped
/// whatever happens).
async fn run_up(session: &Session, migration: &dyn MigrationTrait) -> Result<(), sea_orm::DbErr> {
    session.up(migration).await.map(drop)
}

/// Records `names` in one transaction, creating the bookkeeping tables if need be.
async fn record_all(
    session: &Session,
    set: &MigrationSet,
    state: &state::DbState,
    names: &[String],
    to: &str,
    reason: &str,
) -> Result<(), MigrateError> {
    session.begin().await.map_err(MigrateError::database)?;
    if let Err(e) = lock::ensure_held(session).await {
        session.rollback().await;
        return Err(e);
    }
    let bookkeeping = Bookkeeping {
        create_seaql: !state.has_seaql,
        create_history: !state.has_history,
        upgrade_history: state.has_history && !state.history_current,
        adopt: Vec::new(),
    };
    let written = async {
        record::ensure(session, &bookkeeping, set).await?;
        for name in names {
            record::baselined(session, set, name, to, reason).await?;
        }
        session.commit().await
    }
    .await;
    if let Err(e) = written {
        session.rollback().await;
        return Err(MigrateError::database(e));
    }
    Ok(())
}
