//! Claim epochs, so that a job's fencing token names the process that holds its node id, not just
//! the node: `workers.claim_epoch` is raised by every claim of the node id by a new process, and
//! `jobs.claim_epoch` records the epoch of the claim that last moved the job (set when a worker
//! starts it; NULL while it is scheduled).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workers {
    Table,
    ClaimEpoch,
}

#[derive(DeriveIden)]
enum Jobs {
    Table,
    ClaimEpoch,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Workers::Table)
                    .add_column(
                        ColumnDef::new(Workers::ClaimEpoch)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .add_column(ColumnDef::new(Jobs::ClaimEpoch).big_integer().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .drop_column(Jobs::ClaimEpoch)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Workers::Table)
                    .drop_column(Workers::ClaimEpoch)
                    .to_owned(),
            )
            .await
    }
}
