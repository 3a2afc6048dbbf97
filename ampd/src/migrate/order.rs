//! The out-of-order policy: a pending migration that comes before the newest applied one (in this
//! binary's order) is one that was merged after a newer migration was released and applied. Applied
//! now, it would run on a schema its author never saw, so a run refuses it, naming both, unless
//! `metadata_db.allow_out_of_order` (or `ampd migrate --allow-out-of-order`) says it may.

use super::error::MigrateError;
use super::set::MigrationSet;
use super::state::DbState;

/// Pending migrations older than the newest applied one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct OutOfOrder {
    /// The pending migrations that come before `newest`, in order.
    pub pending: Vec<String>,
    /// The newest applied migration of the set.
    pub newest: String,
}

/// The pending migrations of `set` that come before the newest one `state` has applied, if any.
pub(super) fn find(set: &MigrationSet, state: &DbState) -> Option<OutOfOrder> {
    let names = set.names();
    let newest = names.iter().rposition(|name| state.row(name).is_some())?;
    let pending: Vec<String> = names[..newest]
        .iter()
        .filter(|name| state.row(name).is_none())
        .map(|name| (*name).to_owned())
        .collect();
    (!pending.is_empty()).then(|| OutOfOrder {
        pending,
        newest: names[newest].to_owned(),
    })
}

/// Refuses out-of-order pending migrations unless `allow`; with `allow`, returns them so that the
/// run can say it applies them.
pub(super) fn check(
    set: &MigrationSet,
    state: &DbState,
    allow: bool,
) -> Result<Option<OutOfOrder>, MigrateError> {
    match find(set, state) {
        Some(found) if !allow => Err(MigrateError::OutOfOrder {
            pending: found.pending,
            newest: found.newest,
        }),
        other => Ok(other),
    }
}
