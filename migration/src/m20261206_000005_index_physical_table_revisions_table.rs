//! `idx_physical_table_revisions_table_id`: the revisions of a table.
//!
//! `GET /datasets/{ns}/{name}/versions/{ref}/tables` reads the revisions of every table of a
//! manifest, `revisions::list` those of one table, and deleting a physical table cascades to its
//! revisions: without an index each of these reads the whole of `physical_table_revisions`.
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
    PhysicalTableId,
}

const INDEX: &str = "idx_physical_table_revisions_table_id";

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
                    .col(PhysicalTableRevisions::PhysicalTableId)
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
