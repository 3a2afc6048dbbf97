//! Validates `jobs_node_id_fkey`, added `NOT VALID` by `m20261206_000003_jobs_node_fk_set_null`:
//! `VALIDATE CONSTRAINT` scans `jobs` under a `SHARE UPDATE EXCLUSIVE` lock, which lets the
//! scheduler and the workers read and write jobs meanwhile.
//!
//! It runs alone, outside a transaction (`use_transaction`): in the transaction of the migrations
//! before it, the scan would run under the `ACCESS EXCLUSIVE` lock the previous migration's
//! `ALTER` took, until the commit.
//!
//! squawk-ignore prefer-robust-stmts: one statement, which applies whole or not at all, and
//! validating a constraint that is already valid does nothing, so a failed run can be run again.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE jobs VALIDATE CONSTRAINT jobs_node_id_fkey")
            .await
            .map(|_| ())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // A validated constraint cannot be marked NOT VALID again: it is replaced by the
        // constraint the previous migration added.
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE jobs DROP CONSTRAINT jobs_node_id_fkey, \
                 ADD CONSTRAINT jobs_node_id_fkey FOREIGN KEY (node_id) \
                 REFERENCES workers (node_id) ON DELETE SET NULL NOT VALID",
            )
            .await
            .map(|_| ())
    }
}
