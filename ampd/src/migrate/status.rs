//! `ampd migrate status`: every migration with its state, read-only (creates nothing).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::error::MigrateError;
use super::plan::{StepKind, pending_steps};
use super::set::MigrationSet;
use super::state::{self, AppliedRow, BaselineRecord, ChecksumChange, DbState};
use super::verify::{ChecksumState, checksum_state};
use crate::config::MetadataDbConfig;
use crate::db;

/// A migration as it stands in a database, as `ampd migrate status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationState {
    /// Migration name.
    pub name: String,
    /// `applied` or `pending`.
    pub state: &'static str,
    /// When it was applied.
    pub applied_at: Option<DateTime<Utc>>,
    /// `ok`, `mismatch`, `unknown` (applied, but this binary does not have it),
    /// `unknown-algorithm` (recorded by a newer ampd), `unrecorded` (applied without an ampd
    /// record, e.g. by SeaORM's CLI), or `pending`: a verdict on the checksum, not the checksum.
    #[serde(rename = "checksum")]
    pub checksum_state: &'static str,
    /// The algorithm version of the recorded checksum.
    pub checksum_algorithm: Option<i64>,
    /// Time its `up` took, when ampd applied it.
    pub duration_ms: Option<i64>,
    /// The ampd version that applied (or recorded) it.
    pub ampd_version: Option<String>,
    /// `ampd`, `outside-ampd` when it was applied without ampd (by SeaORM's CLI) and recorded
    /// later, or `baseline` when `ampd migrate baseline` recorded it without running it.
    pub applied_by: Option<&'static str>,
    /// For an applied migration, whether it is recorded as compatible with binaries that do not
    /// know it (see `migration::compat`).
    pub compatible: Option<bool>,
    /// How `ampd migrate baseline` recorded it (up to which migration, reason, role, time, ampd
    /// version), when it did.
    pub baseline: Option<BaselineRecord>,
    /// For a pending migration, the step of the next run it belongs to (from 1).
    pub step: Option<usize>,
    /// For a pending migration, how its step runs: `transaction` (with the other migrations of its
    /// step, all or nothing) or `alone` (outside any transaction).
    pub runs: Option<StepKind>,
    /// Checksums replaced by `ampd migrate accept-checksum`, oldest first.
    pub checksum_changes: Vec<ChecksumChange>,
}

/// The applied and pending migrations of the database, read-only (creates nothing).
pub async fn status(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
) -> Result<Vec<MigrationState>, MigrateError> {
    let db = db::connect(cfg, 1).await?;
    let state = state::read_checked(&db).await;
    let _ = db.close().await;
    Ok(states(set, &state?))
}

/// An applied migration's entry, its checksum state already decided.
fn applied(row: &AppliedRow, checksum_state: &'static str) -> MigrationState {
    MigrationState {
        name: row.version.clone(),
        state: "applied",
        applied_at: row.applied_at(),
        checksum_state,
        checksum_algorithm: row.checksum.as_ref().map(|_| row.algorithm),
        duration_ms: row.execution_ms,
        ampd_version: row.ampd_version.clone(),
        applied_by: row
            .checksum
            .as_ref()
            .map(|_| match (&row.baseline, row.adopted) {
                (Some(_), _) => "baseline",
                (None, true) => "outside-ampd",
                (None, false) => "ampd",
            }),
        compatible: row.checksum.as_ref().map(|_| row.compatible),
        baseline: row.baseline.clone(),
        step: None,
        runs: None,
        checksum_changes: row.changes.clone(),
    }
}

fn states(set: &MigrationSet, state: &DbState) -> Vec<MigrationState> {
    let plan = pending_steps(set, state);
    let mut out: Vec<MigrationState> = set
        .migrations()
        .map(|m| match state.row(m.name()) {
            Some(row) => applied(
                row,
                match checksum_state(set, row) {
                    ChecksumState::Ok => "ok",
                    ChecksumState::Mismatch => "mismatch",
                    ChecksumState::UnknownAlgorithm => "unknown-algorithm",
                    ChecksumState::Unrecorded => "unrecorded",
                },
            ),
            None => {
                let step = plan.iter().find(|(n, _, _)| n == m.name());
                MigrationState {
                    name: m.name().to_owned(),
                    state: "pending",
                    applied_at: None,
                    checksum_state: "pending",
                    checksum_algorithm: None,
                    duration_ms: None,
                    ampd_version: None,
                    applied_by: None,
                    compatible: None,
                    baseline: None,
                    step: step.map(|(_, number, _)| *number),
                    runs: step.map(|(_, _, kind)| *kind),
                    checksum_changes: Vec::new(),
                }
            }
        })
        .collect();
    out.extend(
        state
            .applied
            .iter()
            .filter(|r| set.find(&r.version).is_none())
            .map(|row| applied(row, "unknown")),
    );
    out
}
