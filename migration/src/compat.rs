//! Which migrations binaries that do not know them may keep running on: the reviewed
//! compatibility table.
//!
//! When a release's `ampd migrate` has applied a migration, services of the previous release (a
//! rolling deploy, a crash-restart, a roll-back of the binary) meet a database with a migration
//! they do not know. They start on it only if the migration is recorded as compatible with them,
//! and `ampd migrate` records what this table says when it applies (or baselines) a migration.
//!
//! A migration is compatible when a binary that does not know it keeps working correctly, and
//! keeps every newer binary working correctly, on the schema it produces. As a rule of thumb:
//!
//! | change | compatible |
//! |---|---|
//! | a new index, a new table the older binary never reads | yes |
//! | a new nullable column (or one with a default) that nothing newer relies on for safety | yes |
//! | a new column the newer binary relies on (a fencing token, a key it deduplicates by) | **no** |
//! | a dropped or renamed column or table, a narrowed type, a new `NOT NULL` or `CHECK` | **no** |
//! | a backfill whose result older binaries would not keep up to date | **no** |
//!
//! A migration missing from [`COMPATIBLE`] is not compatible: the default is "no" until a reviewer
//! adds it here, in the same change as the migration. This file is not a migration file, so editing
//! it changes no checksum. A change that is not compatible in one step can usually be made in two
//! that are (expand, then contract one release later): see `docs/migrate.md`.
//!
//! The table only matters for migrations a running binary does not know; the ones below were
//! reviewed when this table was introduced.

/// The migrations reviewed as compatible with binaries that do not know them, by name. Each entry
/// says why, in a comment.
pub static COMPATIBLE: &[&str] = &[
    // A new index built concurrently: older binaries' queries are unchanged (and get faster).
    "m20261201_000001_index_physical_tables_active_revision",
    // The same: the garbage collector's batches read through it.
    "m20261206_000001_index_gc_manifest_expiration",
    // Not m20261206_000002_add_claim_epochs: the claim epoch is part of the fencing token, and a
    // binary that does not know it would act on jobs without it.
    // The worker link of a job loses its row when the worker is deleted: only retention (a
    // newer controller) deletes workers, and `jobs.node_id` was nullable already, so a binary that
    // does not know this reads a finished job with no node as it reads an unassigned one.
    "m20261206_000003_jobs_node_fk_set_null",
    // Validating that constraint changes no row and no behaviour.
    "m20261206_000004_validate_jobs_node_fk",
    // New indexes built concurrently, as above.
    "m20261206_000005_index_physical_table_revisions_table",
    "m20261206_000006_index_jobs_status_id",
    "m20261206_000007_index_job_events_created_at",
    "m20261206_000008_index_physical_table_revisions_writer",
    "m20261206_000009_index_jobs_finished_updated_at",
    "m20261206_000010_index_workers_heartbeat_at",
];

/// Whether the migration called `name` was reviewed as compatible with binaries that do not know
/// it ([`COMPATIBLE`]); `false` for every other name.
pub fn is_compatible(name: &str) -> bool {
    COMPATIBLE.contains(&name)
}
