//! `idx_jobs_status_id`: jobs of a status in id order.
//!
//! `GET /jobs?status=RUNNING` pages by ascending id (`ORDER BY id LIMIT n`, keyset on `id`). With
//! only `idx_jobs_status` the database either walks the primary key past every finished job that
//! sorts before the running ones, or reads every job of the status and sorts; in `(status, id)`
//! order a page reads its own rows and stops.
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
enum Jobs {
    Table,
    Status,
    Id,
}

const INDEX: &str = "idx_jobs_status_id";

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
                    .table(Jobs::Table)
                    .col(Jobs::Status)
                    .col(Jobs::Id)
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
