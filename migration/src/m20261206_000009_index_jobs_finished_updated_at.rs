//! `idx_jobs_finished_updated_at`: finished jobs by last update (a partial index).
//!
//! Retention deletes finished jobs (COMPLETED, STOPPED, ERROR, FATAL) oldest first, a batch at a
//! time (`jobs::delete_finished`): this index holds only those, in that order, so a batch reads
//! the jobs it deletes and the few old ones it keeps (the COMPLETED job of each version still
//! registered), not every job.
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
    UpdatedAt,
    Status,
}

const INDEX: &str = "idx_jobs_finished_updated_at";

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
                    .col(Jobs::UpdatedAt)
                    .and_where(Expr::col(Jobs::Status).is_in([
                        "COMPLETED",
                        "STOPPED",
                        "ERROR",
                        "FATAL",
                    ]))
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
