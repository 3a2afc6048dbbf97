//! `idx_physical_tables_active_revision_id`: finds the table whose active revision is a given one.
//!
//! Every delete of a revision runs `revisions::lock_inactive` (`... WHERE active_revision_id = $1`)
//! and the `ON DELETE SET NULL` of `physical_tables_active_revision_id_fkey`, which scans
//! `physical_tables` for the deleted id; without an index both read the whole table.
//!
//! Built concurrently, so writers to `physical_tables` are not blocked while it builds; that cannot
//! run inside a transaction, so this migration runs alone, outside one (`use_transaction`).
//!
//! squawk-ignore prefer-robust-stmts: no `IF NOT EXISTS` on purpose. A build that failed half-way
//! leaves an INVALID index of this name, which `IF NOT EXISTS` would silently keep; without it,
//! `ampd migrate` finds the leftover and refuses with the statement that removes it.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PhysicalTables {
    Table,
    ActiveRevisionId,
}

const INDEX: &str = "idx_physical_tables_active_revision_id";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(PhysicalTables::Table)
                    .col(PhysicalTables::ActiveRevisionId)
                    .concurrently()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(Index::drop().name(INDEX).concurrently().to_owned())
            .await
    }
}
