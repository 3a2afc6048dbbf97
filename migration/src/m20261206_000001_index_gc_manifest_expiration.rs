//! `idx_gc_manifest_expiration_file_id`: the garbage collection entries in the order the collector
//! takes them.
//!
//! `files::list_expired` takes the soonest expired entries, `ORDER BY expiration, file_id LIMIT n`,
//! once per batch. Without an index in that order every batch reads and sorts the whole of
//! `gc_manifest`, so a pass over a backlog costs its size squared; with it a batch reads its own
//! entries and stops.
//!
//! Built concurrently, so the collector and the writers that schedule files are not blocked while
//! it builds; that cannot run inside a transaction, so this migration runs alone, outside one
//! (`use_transaction`).
//!
//! squawk-ignore prefer-robust-stmts: no `IF NOT EXISTS` on purpose. A build that failed half-way
//! leaves an INVALID index of this name, which `IF NOT EXISTS` would silently keep; without it,
//! `ampd migrate` finds the leftover and refuses with the statement that removes it.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum GcManifest {
    Table,
    Expiration,
    FileId,
}

const INDEX: &str = "idx_gc_manifest_expiration_file_id";

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
                    .table(GcManifest::Table)
                    .col(GcManifest::Expiration)
                    .col(GcManifest::FileId)
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
