//! `idx_workers_heartbeat_at`: workers by last heartbeat.
//!
//! Every scheduling pass reads the live workers (`heartbeat_at > now() - window`) and the active
//! jobs whose worker is not among them. Without this index both read every row of `workers`, and
//! that table keeps every worker seen within `[controller] workers_retention_days`: with node ids
//! that change per pod start, thousands of gone workers for a few hundred live ones. Through it a
//! pass reads the live workers only, whatever the number ever registered.
//!
//! The price: a heartbeat changes an indexed column, so it is no longer a HOT update and writes an
//! entry in each of the table's three indexes. `workers` holds one row per worker, so the extra
//! entries are few and vacuum reclaims them; the scale benchmark measures the heartbeats with it.
//!
//! Built concurrently, so that the heartbeats are not blocked while it builds; that cannot run
//! inside a transaction, so this migration runs alone, outside one (`use_transaction`).
//!
//! squawk-ignore prefer-robust-stmts: no `IF NOT EXISTS` on purpose. A build that failed half-way
//! leaves an INVALID index of this name, which `IF NOT EXISTS` would silently keep; without it,
//! `ampd migrate` finds the leftover and refuses with the statement that removes it.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workers {
    Table,
    HeartbeatAt,
}

const INDEX: &str = "idx_workers_heartbeat_at";

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
                    .table(Workers::Table)
                    .col(Workers::HeartbeatAt)
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
