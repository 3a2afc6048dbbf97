//! `ampd migrate accept-checksum`: the reviewed way to accept a changed released migration (for
//! example when a sea-orm or sea-query upgrade forces an edit that does not change what it did),
//! without dropping the database or editing the history by hand. Under the migration lock, the
//! recorded checksum of one applied migration is replaced by this binary's; the old value, its
//! algorithm, the reason, the time, this ampd's version and the database role are appended to the
//! row's `checksum_history`. It runs in one transaction holding the lock for that transaction
//! (safe through a pooler in transaction mode), and refuses a database that is ahead of this
//! binary, and a checksum recorded with an algorithm this binary does not know (a newer ampd's).

use migration::Algorithm;

use super::apply::transaction_settings_sql;
use super::error::MigrateError;
use super::lock::{self, Scope};
use super::session::Session;
use super::set::MigrationSet;
use super::verify::{ChecksumState, checksum_state};
use super::{record, state};
use crate::config::MetadataDbConfig;

/// A checksum accepted by [`accept_checksum`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The migration.
    pub name: String,
    /// The checksum recorded before.
    pub old: String,
    /// Its algorithm version.
    pub old_algorithm: i64,
    /// The checksum recorded now (current algorithm).
    pub new: String,
}

/// Records this binary's checksum for applied migration `name`, keeping the old one and `reason`
/// in the history. `None` when there is nothing to accept (the checksum already matches, or none is
/// recorded yet).
pub async fn accept_checksum(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    name: &str,
    reason: &str,
) -> Result<Option<Accepted>, MigrateError> {
    if set.find(name).is_none() {
        return Err(MigrateError::UnknownMigration {
            name: name.to_owned(),
        });
    }
    let session = Session::live(cfg).await?;
    let limit = std::time::Duration::from_secs(cfg.migration_lock_timeout_secs);
    let result = async {
        lock::acquire(
            &session,
            Scope::Transaction,
            limit,
            &transaction_settings_sql(cfg),
        )
        .await?;
        let result = accept(&session, set, name, reason).await;
        // Nothing to accept, or a refusal: end the transaction (and with it the lock).
        session.rollback().await;
        result
    }
    .await;
    session.close().await;
    result
}

async fn accept(
    session: &Session,
    set: &MigrationSet,
    name: &str,
    reason: &str,
) -> Result<Option<Accepted>, MigrateError> {
    let state = state::read_checked_probed(session).await?;
    // A database ahead of this binary was migrated by a newer ampd: its checksums are not this
    // binary's to judge.
    let ahead: Vec<String> = state
        .applied
        .iter()
        .filter(|row| set.find(&row.version).is_none())
        .map(|row| row.version.clone())
        .collect();
    if !ahead.is_empty() {
        return Err(MigrateError::DatabaseAhead { names: ahead });
    }
    let row = state.row(name).ok_or_else(|| MigrateError::NotApplied {
        name: name.to_owned(),
    })?;
    let Some(old) = row.checksum.clone() else {
        return Ok(None);
    };
    match checksum_state(set, row) {
        ChecksumState::Ok | ChecksumState::Unrecorded => return Ok(None),
        ChecksumState::UnknownAlgorithm => {
            return Err(MigrateError::UnknownAlgorithm {
                name: name.to_owned(),
                algorithm: row.algorithm,
            });
        }
        ChecksumState::Mismatch => {}
    }
    let new = set.checksum(name, Algorithm::CURRENT);
    let accepted = Accepted {
        name: name.to_owned(),
        old,
        old_algorithm: row.algorithm,
        new,
    };
    let changed = async {
        if !state.history_current {
            record::upgrade(session).await?;
        }
        let changed = record::accept(
            session,
            name,
            &accepted.old,
            accepted.old_algorithm,
            &accepted.new,
            reason,
        )
        .await?;
        session.commit().await?;
        Ok(changed)
    }
    .await;
    let changed = match changed {
        Ok(changed) => changed,
        Err(e) => {
            session.rollback().await;
            return Err(MigrateError::database(e));
        }
    };
    if !changed {
        return Err(MigrateError::Database(format!(
            "the recorded checksum of {name} changed while accepting it; run the command again"
        )));
    }
    tracing::warn!(
        migration = %name,
        old = %accepted.old,
        new = %accepted.new,
        reason,
        "accepted a changed checksum"
    );
    Ok(Some(accepted))
}
