//! `workers`: one row per worker node ever registered.
use sea_orm_migration::prelude::extension::postgres::PgBinOper;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workers {
    Table,
    Id,
    NodeId,
    Info,
    HeartbeatAt,
    CreatedAt,
    RegisteredAt,
}

fn now() -> Expr {
    Func::cust("now").into()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Workers::Table)
                    .col(
                        ColumnDef::new(Workers::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment(),
                    )
                    .col(ColumnDef::new(Workers::NodeId).text().not_null())
                    .col(
                        ColumnDef::new(Workers::Info)
                            .json_binary()
                            .not_null()
                            .default(Expr::val("{}")),
                    )
                    .col(
                        ColumnDef::new(Workers::HeartbeatAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(now()),
                    )
                    .col(
                        ColumnDef::new(Workers::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(now()),
                    )
                    .col(
                        ColumnDef::new(Workers::RegisteredAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(now()),
                    )
                    .primary_key(Index::create().name("workers_pkey").col(Workers::Id))
                    .index(
                        Index::create()
                            .name("workers_node_id_key")
                            .unique()
                            .col(Workers::NodeId),
                    )
                    .check(Check::named(
                        "workers_node_id_check",
                        Expr::col(Workers::NodeId)
                            .binary(PgBinOper::Regex, "^[A-Za-z][A-Za-z0-9_.-]{0,63}$"),
                    ))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Workers::Table).to_owned())
            .await
    }
}
