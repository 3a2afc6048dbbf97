//! `physical_tables` (a table of a dataset manifest and its active revision) and
//! `physical_table_revisions` (one storage location per materialization of a table).
//!
//! The two tables point at each other, so `physical_tables.active_revision_id` gets its foreign key
//! once both exist.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ManifestFiles {
    Table,
    Hash,
}

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum PhysicalTables {
    Table,
    Id,
    DatasetNamespace,
    DatasetName,
    ManifestHash,
    TableName,
    ActiveRevisionId,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum PhysicalTableRevisions {
    Table,
    Id,
    PhysicalTableId,
    Path,
    Writer,
    Metadata,
    CreatedAt,
    UpdatedAt,
}

const ACTIVE_REVISION_FKEY: &str = "physical_tables_active_revision_id_fkey";

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
                    .table(PhysicalTables::Table)
                    .col(
                        ColumnDef::new(PhysicalTables::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment(),
                    )
                    .col(
                        ColumnDef::new(PhysicalTables::DatasetNamespace)
                            .text()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(PhysicalTables::DatasetName)
                            .text()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(PhysicalTables::ManifestHash)
                            .text()
                            .not_null(),
                    )
                    .col(ColumnDef::new(PhysicalTables::TableName).text().not_null())
                    .col(
                        ColumnDef::new(PhysicalTables::ActiveRevisionId)
                            .big_integer()
                            .null(),
                    )
                    .col(timestamp(PhysicalTables::CreatedAt))
                    .col(timestamp(PhysicalTables::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .name("physical_tables_pkey")
                            .col(PhysicalTables::Id),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("physical_tables_manifest_hash_fkey")
                            .from(PhysicalTables::Table, PhysicalTables::ManifestHash)
                            .to(ManifestFiles::Table, ManifestFiles::Hash)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .index(
                        Index::create()
                            .name("physical_tables_dataset_table_key")
                            .unique()
                            .col(PhysicalTables::DatasetNamespace)
                            .col(PhysicalTables::DatasetName)
                            .col(PhysicalTables::ManifestHash)
                            .col(PhysicalTables::TableName),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(PhysicalTableRevisions::Table)
                    .col(
                        ColumnDef::new(PhysicalTableRevisions::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment(),
                    )
                    .col(
                        ColumnDef::new(PhysicalTableRevisions::PhysicalTableId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(PhysicalTableRevisions::Path)
                            .text()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(PhysicalTableRevisions::Writer)
                            .big_integer()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(PhysicalTableRevisions::Metadata)
                            .json_binary()
                            .not_null()
                            .default(Expr::val("{}")),
                    )
                    .col(timestamp(PhysicalTableRevisions::CreatedAt))
                    .col(timestamp(PhysicalTableRevisions::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .name("physical_table_revisions_pkey")
                            .col(PhysicalTableRevisions::Id),
                    )
                    .index(
                        Index::create()
                            .name("physical_table_revisions_path_key")
                            .unique()
                            .col(PhysicalTableRevisions::Path),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("physical_table_revisions_physical_table_id_fkey")
                            .from(
                                PhysicalTableRevisions::Table,
                                PhysicalTableRevisions::PhysicalTableId,
                            )
                            .to(PhysicalTables::Table, PhysicalTables::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("physical_table_revisions_writer_fkey")
                            .from(
                                PhysicalTableRevisions::Table,
                                PhysicalTableRevisions::Writer,
                            )
                            .to(Jobs::Table, Jobs::Id)
                            .on_delete(ForeignKeyAction::SetNull),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_foreign_key(
                ForeignKey::create()
                    .name(ACTIVE_REVISION_FKEY)
                    .from(PhysicalTables::Table, PhysicalTables::ActiveRevisionId)
                    .to(PhysicalTableRevisions::Table, PhysicalTableRevisions::Id)
                    .on_delete(ForeignKeyAction::SetNull)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_foreign_key(
                ForeignKey::drop()
                    .name(ACTIVE_REVISION_FKEY)
                    .table(PhysicalTables::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(
                Table::drop()
                    .table(PhysicalTableRevisions::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(PhysicalTables::Table).to_owned())
            .await
    }
}
