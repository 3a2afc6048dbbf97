//! `jobs` (one row per job, with its current state) and `job_events` (its append-only history).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workers {
    Table,
    NodeId,
}

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Id,
    Kind,
    NodeId,
    Status,
    Descriptor,
    Detail,
    Attempt,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum JobEvents {
    Table,
    Id,
    JobId,
    NodeId,
    EventType,
    Detail,
    CreatedAt,
}

/// Every job status; `jobs.status` and `job_events.event_type` are constrained to this set.
const STATUSES: [&str; 8] = [
    "SCHEDULED",
    "RUNNING",
    "COMPLETED",
    "STOP_REQUESTED",
    "STOPPING",
    "STOPPED",
    "ERROR",
    "FATAL",
];

fn now() -> Expr {
    Func::cust("now").into()
}

fn timestamp(name: impl IntoIden) -> ColumnDef {
    ColumnDef::new(name)
        .timestamp_with_time_zone()
        .not_null()
        .default(now())
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Jobs::Table)
                    .col(
                        ColumnDef::new(Jobs::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment(),
                    )
                    .col(ColumnDef::new(Jobs::Kind).text().not_null())
                    .col(ColumnDef::new(Jobs::NodeId).text().null())
                    .col(
                        ColumnDef::new(Jobs::Status)
                            .text()
                            .not_null()
                            .default("SCHEDULED"),
                    )
                    .col(ColumnDef::new(Jobs::Descriptor).json_binary().not_null())
                    .col(ColumnDef::new(Jobs::Detail).json_binary().null())
                    .col(
                        ColumnDef::new(Jobs::Attempt)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(timestamp(Jobs::CreatedAt))
                    .col(timestamp(Jobs::UpdatedAt))
                    .primary_key(Index::create().name("jobs_pkey").col(Jobs::Id))
                    .foreign_key(
                        ForeignKey::create()
                            .name("jobs_node_id_fkey")
                            .from(Jobs::Table, Jobs::NodeId)
                            .to(Workers::Table, Workers::NodeId),
                    )
                    .check(Check::named(
                        "jobs_status_check",
                        Expr::col(Jobs::Status).is_in(STATUSES),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_jobs_status")
                    .table(Jobs::Table)
                    .col(Jobs::Status)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_jobs_node_id_status")
                    .table(Jobs::Table)
                    .col(Jobs::NodeId)
                    .col(Jobs::Status)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(JobEvents::Table)
                    .col(
                        ColumnDef::new(JobEvents::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment(),
                    )
                    .col(ColumnDef::new(JobEvents::JobId).big_integer().not_null())
                    .col(ColumnDef::new(JobEvents::NodeId).text().null())
                    .col(ColumnDef::new(JobEvents::EventType).text().not_null())
                    .col(ColumnDef::new(JobEvents::Detail).json_binary().null())
                    .col(timestamp(JobEvents::CreatedAt))
                    .primary_key(Index::create().name("job_events_pkey").col(JobEvents::Id))
                    .foreign_key(
                        ForeignKey::create()
                            .name("job_events_job_id_fkey")
                            .from(JobEvents::Table, JobEvents::JobId)
                            .to(Jobs::Table, Jobs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .check(Check::named(
                        "job_events_event_type_check",
                        Expr::col(JobEvents::EventType).is_in(STATUSES),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_job_events_job_id_id")
                    .table(JobEvents::Table)
                    .col(JobEvents::JobId)
                    .col(JobEvents::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JobEvents::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Jobs::Table).to_owned())
            .await
    }
}
