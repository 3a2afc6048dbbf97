//! `idx_job_events_created_at`: events by age.
//!
//! Retention deletes the events of jobs that finished long ago, oldest first, a batch at a time
//! (`jobs::delete_events_of_finished`): in this order a batch reads the events it deletes and
//! the few old ones it keeps, not the whole table.
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
enum JobEvents {
    Table,
    CreatedAt,
}

const INDEX: &str = "idx_job_events_created_at";

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
                    .table(JobEvents::Table)
                    .col(JobEvents::CreatedAt)
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
