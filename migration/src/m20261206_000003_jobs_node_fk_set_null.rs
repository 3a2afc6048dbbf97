//! `jobs_node_id_fkey` becomes `ON DELETE SET NULL`, so that retention can delete a worker row
//! that finished jobs still name (the node id stays in their `job_events`); with no action, one
//! finished job would keep its worker's row forever.
//!
//! The constraint is replaced in one `ALTER TABLE` (drop and add together, so no moment without
//! it), added `NOT VALID`: checking the existing rows would scan `jobs` under the `ALTER`'s
//! `ACCESS EXCLUSIVE` lock, and they all satisfy the old constraint already, which named the same
//! columns. New and changed rows are checked from here on; the next migration
//! (`m20261206_000004_validate_jobs_node_fk`) validates the old ones under a lock that lets reads
//! and writes go on.
//!
//! squawk-ignore ban-drop-constraint: the constraint is dropped and added again, by the same
//! name on the same columns, in the same statement: no client ever sees the table without it.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE jobs DROP CONSTRAINT jobs_node_id_fkey, \
                 ADD CONSTRAINT jobs_node_id_fkey FOREIGN KEY (node_id) \
                 REFERENCES workers (node_id)",
            )
            .await
            .map(|_| ())
    }
}
