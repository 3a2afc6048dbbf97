//! Validating a database's applied set against a [`MigrationSet`]: every applied migration must be
//! one this binary knows, and every recorded checksum must match this binary's, computed with the
//! algorithm it was recorded with.

use migration::Algorithm;

use super::error::MigrateError;
use super::set::MigrationSet;
use super::state::{AppliedRow, DbState};

/// How a recorded checksum compares with this binary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChecksumState {
    /// It matches.
    Ok,
    /// It differs.
    Mismatch,
    /// It was recorded with an algorithm this binary does not know.
    UnknownAlgorithm,
    /// Nothing recorded yet (applied by SeaORM's CLI).
    Unrecorded,
}

/// Compares `row`'s recorded checksum with `set`'s under the row's algorithm.
pub(super) fn checksum_state(set: &MigrationSet, row: &AppliedRow) -> ChecksumState {
    let Some(recorded) = &row.checksum else {
        return ChecksumState::Unrecorded;
    };
    match Algorithm::from_number(row.algorithm) {
        None => ChecksumState::UnknownAlgorithm,
        Some(algorithm) if *recorded == set.checksum(&row.version, algorithm) => ChecksumState::Ok,
        Some(_) => ChecksumState::Mismatch,
    }
}

/// Applied migrations that have no ampd record yet (applied by SeaORM's CLI): recorded by the
/// next run that takes the lock.
pub(super) struct Verdict {
    pub unrecorded: Vec<String>,
}

/// Checks `state` against `set`: refuses a database that applied migrations this binary does not
/// know, and a recorded checksum that does not match.
pub(super) fn check(set: &MigrationSet, state: &DbState) -> Result<Verdict, MigrateError> {
    let unknown: Vec<String> = state
        .applied
        .iter()
        .filter(|row| set.find(&row.version).is_none())
        .map(|row| row.version.clone())
        .collect();
    if !unknown.is_empty() {
        return Err(MigrateError::DatabaseAhead { names: unknown });
    }
    let mut unrecorded = Vec::new();
    for row in &state.applied {
        match checksum_state(set, row) {
            ChecksumState::Ok => {}
            ChecksumState::Unrecorded => unrecorded.push(row.version.clone()),
            ChecksumState::UnknownAlgorithm => {
                return Err(MigrateError::UnknownAlgorithm {
                    name: row.version.clone(),
                    algorithm: row.algorithm,
                });
            }
            ChecksumState::Mismatch => {
                let algorithm = Algorithm::from_number(row.algorithm).unwrap_or(Algorithm::CURRENT);
                return Err(MigrateError::ChecksumMismatch {
                    name: row.version.clone(),
                    recorded: row.checksum.clone().unwrap_or_default(),
                    algorithm: row.algorithm,
                    expected: set.checksum(&row.version, algorithm),
                });
            }
        }
    }
    Ok(Verdict { unrecorded })
}
