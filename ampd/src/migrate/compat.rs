//! Services on a database a newer ampd migrated: the safe binary roll-back.
//!
//! `ampd migrate` records with each migration whether binaries that do not know it may keep
//! running on the schema it produces (`migration::compat`, reviewed per migration). A service (the
//! controller, the server, a worker; not `ampd migrate`) that finds applied migrations it does not
//! know starts when every one of them is recorded as compatible, warning with their names, and
//! refuses otherwise, naming the ones that are not ([`MigrateError::IncompatibleNewer`]). It never
//! migrates such a database: with migrations of its own still pending it refuses as `ampd migrate`
//! does ([`MigrateError::DatabaseAhead`]).

use sea_orm::DatabaseConnection;

use super::error::MigrateError;
use super::set::MigrationSet;
use super::state::{self, DbState};
use super::{MigrateReport, plan, verify};
use crate::config::MetadataDbConfig;

/// The applied migrations `set` does not know: those recorded as compatible, and the others.
pub(super) fn unknown(set: &MigrationSet, state: &DbState) -> (Vec<String>, Vec<String>) {
    let mut compatible = Vec::new();
    let mut incompatible = Vec::new();
    for row in state
        .applied
        .iter()
        .filter(|row| set.find(&row.version).is_none())
    {
        if row.compatible {
            compatible.push(row.version.clone());
        } else {
            incompatible.push(row.version.clone());
        }
    }
    (compatible, incompatible)
}

/// `state` without the applied migrations `set` does not know.
pub(super) fn known_only(set: &MigrationSet, state: &DbState) -> DbState {
    DbState {
        applied: state
            .applied
            .iter()
            .filter(|row| set.find(&row.version).is_some())
            .cloned()
            .collect(),
        ..state.clone()
    }
}

/// Checks, read-only, that a service of `set` may run on the database: every applied migration it
/// knows has its checksum, none of its own is pending, and every one it does not know is recorded
/// as compatible. Returns the compatible unknown ones (empty on a database at this binary's head).
pub async fn verify_for_service(
    db: &DatabaseConnection,
    set: &MigrationSet,
) -> Result<Vec<String>, MigrateError> {
    let state = state::read(db).await.map_err(MigrateError::database)?;
    check(set, &state)
}

/// The decision of [`verify_for_service`] on `state`.
pub(super) fn check(set: &MigrationSet, state: &DbState) -> Result<Vec<String>, MigrateError> {
    let (compatible, incompatible) = unknown(set, state);
    if !incompatible.is_empty() {
        return Err(MigrateError::IncompatibleNewer { incompatible });
    }
    let known = known_only(set, state);
    verify::check(set, &known)?;
    let pending = plan::pending(set, &known).len();
    match (pending, compatible.is_empty()) {
        (0, _) => Ok(compatible),
        // Migrating a database that is ahead of this binary is a newer ampd's job.
        (_, false) => Err(MigrateError::DatabaseAhead { names: compatible }),
        (pending, true) => Err(MigrateError::NotMigrated { pending }),
    }
}

/// What a service that migrates on startup found.
#[derive(Debug)]
pub enum ServiceStart {
    /// It migrated (or found the schema up to date).
    Migrated(MigrateReport),
    /// The database is ahead of this binary with migrations recorded as compatible, named here:
    /// nothing was migrated.
    Newer(Vec<String>),
}

/// Migrates on a service's startup (`metadata_db.auto_migrate`): as [`super::migrate`], except that
/// a database ahead of this binary is accepted, unchanged, when every migration it does not know is
/// recorded as compatible.
pub async fn migrate_for_service(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
) -> Result<ServiceStart, MigrateError> {
    match super::migrate(cfg, set).await {
        Ok(report) => Ok(ServiceStart::Migrated(report)),
        // Refused before anything was changed: decide as a service that does not migrate.
        Err(MigrateError::DatabaseAhead { .. }) => {
            let db = crate::db::connect(cfg, 1).await?;
            let result = verify_for_service(&db, set).await;
            let _ = db.close().await;
            result.map(ServiceStart::Newer)
        }
        Err(e) => Err(e),
    }
}

/// The warning a service logs when it starts on a database ahead of it.
pub fn warn_newer(names: &[String]) {
    if !names.is_empty() {
        tracing::warn!(
            "the database is newer than this ampd ({}): it has applied {}, unknown to this binary \
             and recorded as compatible with binaries that do not know {}; starting on it",
            super::AMPD_VERSION,
            names.join(", "),
            if names.len() == 1 { "it" } else { "them" }
        );
    }
}
