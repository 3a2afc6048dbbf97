//! Schema migrations of the ampd metadata database.
//!
//! Each `mYYYYMMDD_HHMMSS_<what>.rs` file is one logical change, built with sea-query. The list in
//! [`Migrator::migrations`] is maintained by `sea-orm-cli migrate generate`; keep the
//! `impl MigratorTrait` block last in this file so that the tool can rewrite it.
//!
//! Released migrations are frozen: every applied migration's checksum is recorded, and `ampd migrate`
//! refuses to run when a migration's source no longer matches what was applied.
pub use sea_orm_migration::prelude::*;
/// SeaORM's own record of applied migrations, re-exported for ampd's migrator.
pub use sea_orm_migration::seaql_migrations;

mod checksum;
pub mod compat;
pub use checksum::{
    Algorithm, CHECKSUMS, CHECKSUMS_V1, FROZEN_V1, FrozenV1, canonical_tokens, checksum_of,
    checksum_with, effective_v1, parse_frozen_v1, source_checksum, source_checksum_v1,
};

mod m20261101_000001_create_workers;
mod m20261101_000002_create_jobs;
mod m20261101_000003_create_datasets;
mod m20261101_000004_create_physical_tables;
mod m20261101_000005_create_files;
mod m20261101_000006_add_jobs_idempotency_key;
mod m20261101_000007_backfill_jobs_idempotency_key;
mod m20261201_000001_index_physical_tables_active_revision;
mod m20261206_000001_index_gc_manifest_expiration;
mod m20261206_000002_add_claim_epochs;
mod m20261206_000003_jobs_node_fk_set_null;
mod m20261206_000004_validate_jobs_node_fk;
mod m20261206_000005_index_physical_table_revisions_table;
mod m20261206_000006_index_jobs_status_id;
mod m20261206_000007_index_job_events_created_at;
mod m20261206_000008_index_physical_table_revisions_writer;
mod m20261206_000009_index_jobs_finished_updated_at;
mod m20261206_000010_index_workers_heartbeat_at;

/// The Rust snippets of the README and of `docs/`, compiled as doc tests of this crate (`cargo test
/// -p migration --doc`, part of `cargo test --workspace`) so that they keep compiling as written. A
/// snippet that is not meant to compile is marked `rust,ignore` with the reason beside it. A file of
/// `docs/` that gets a Rust snippet gets a line here (`tests/tests/it/docs.rs` checks it).
#[cfg(doctest)]
pub mod doc_snippets {
    #[doc = include_str!("../../README.md")]
    pub struct Readme;
    #[doc = include_str!("../../docs/adding-a-migration.md")]
    pub struct AddingAMigration;
    #[doc = include_str!("../../docs/migrate.md")]
    pub struct Migrate;
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261101_000001_create_workers::Migration),
            Box::new(m20261101_000002_create_jobs::Migration),
            Box::new(m20261101_000003_create_datasets::Migration),
            Box::new(m20261101_000004_create_physical_tables::Migration),
            Box::new(m20261101_000005_create_files::Migration),
            Box::new(m20261101_000006_add_jobs_idempotency_key::Migration),
            Box::new(m20261101_000007_backfill_jobs_idempotency_key::Migration),
            Box::new(m20261201_000001_index_physical_tables_active_revision::Migration),
            Box::new(m20261206_000001_index_gc_manifest_expiration::Migration),
            Box::new(m20261206_000002_add_claim_epochs::Migration),
            Box::new(m20261206_000003_jobs_node_fk_set_null::Migration),
            Box::new(m20261206_000004_validate_jobs_node_fk::Migration),
            Box::new(m20261206_000005_index_physical_table_revisions_table::Migration),
            Box::new(m20261206_000006_index_jobs_status_id::Migration),
            Box::new(m20261206_000007_index_job_events_created_at::Migration),
            Box::new(m20261206_000008_index_physical_table_revisions_writer::Migration),
            Box::new(m20261206_000009_index_jobs_finished_updated_at::Migration),
            Box::new(m20261206_000010_index_workers_heartbeat_at::Migration),
        ]
    }
}
