//! `idx_physical_table_revisions_writer`: the revisions a job wrote.
//!
//! `physical_table_revisions.writer` references `jobs(id)` `ON DELETE SET NULL`: deleting a job
//! (retention, `DELETE /jobs/{id}`) looks for the revisions it wrote, and retention checks that
//! none of them is active. Without an index each deleted job reads the whole table.
//!
//! Built concurrently, so that the tables' readers and writers are not blocked while it builds;
//! that cannot run inside a transaction, so this migration runs alone, outside one
//! (`use_transaction`).
//!
//! squawk-ignore prefer-robust-stmts: no `IF NOT EXISTS` on purpose. A build that failed half-way
//! leaves an INVALID index of this name, which `IF NOT EXISTS` would silently keep; without it,
//! `ampd migrate` finds the leftover and refuses with the statement that removes it.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PhysicalTableRevisions {
    Table,
    Writer,
}

const INDEX: &str = "idx_physical_table_revisions_writer";

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
                    .table(PhysicalTableRevisions::Table)
                    .col(PhysicalTableRevisions::Writer)
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
