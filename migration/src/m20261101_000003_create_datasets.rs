//! Datasets: `manifest_files` (content-addressed definitions), `dataset_manifests` (which manifests
//! belong to a dataset) and `tags` (version names of a dataset).
use sea_orm_migration::prelude::extension::postgres::PgBinOper;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ManifestFiles {
    Table,
    Hash,
    Kind,
    Path,
    CreatedAt,
}

#[derive(DeriveIden)]
enum DatasetManifests {
    Table,
    Namespace,
    Name,
    Hash,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Tags {
    Table,
    Namespace,
    Name,
    Version,
    Hash,
    CreatedAt,
    UpdatedAt,
}

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

fn matches(column: impl IntoIden, pattern: &str) -> Expr {
    Expr::col(column.into_iden()).binary(PgBinOper::Regex, pattern)
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ManifestFiles::Table)
                    .col(ColumnDef::new(ManifestFiles::Hash).text().not_null())
                    .col(ColumnDef::new(ManifestFiles::Kind).text().not_null())
                    .col(ColumnDef::new(ManifestFiles::Path).text().not_null())
                    .col(timestamp(ManifestFiles::CreatedAt))
                    .primary_key(
                        Index::create()
                            .name("manifest_files_pkey")
                            .col(ManifestFiles::Hash),
                    )
                    .check(Check::named(
                        "manifest_files_hash_check",
                        matches(ManifestFiles::Hash, "^[0-9a-f]{64}$"),
                    ))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(DatasetManifests::Table)
                    .col(
                        ColumnDef::new(DatasetManifests::Namespace)
                            .text()
                            .not_null(),
                    )
                    .col(ColumnDef::new(DatasetManifests::Name).text().not_null())
                    .col(ColumnDef::new(DatasetManifests::Hash).text().not_null())
                    .col(timestamp(DatasetManifests::CreatedAt))
                    .primary_key(
                        Index::create()
                            .name("dataset_manifests_pkey")
                            .col(DatasetManifests::Namespace)
                            .col(DatasetManifests::Name)
                            .col(DatasetManifests::Hash),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("dataset_manifests_hash_fkey")
                            .from(DatasetManifests::Table, DatasetManifests::Hash)
                            .to(ManifestFiles::Table, ManifestFiles::Hash)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .check(Check::named(
                        "dataset_manifests_namespace_check",
                        matches(DatasetManifests::Namespace, "^[a-z][a-z0-9_]*$"),
                    ))
                    .check(Check::named(
                        "dataset_manifests_name_check",
                        matches(DatasetManifests::Name, "^[a-z][a-z0-9_]*$"),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_dataset_manifests_hash")
                    .table(DatasetManifests::Table)
                    .col(DatasetManifests::Hash)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Tags::Table)
                    .col(ColumnDef::new(Tags::Namespace).text().not_null())
                    .col(ColumnDef::new(Tags::Name).text().not_null())
                    .col(ColumnDef::new(Tags::Version).text().not_null())
                    .col(ColumnDef::new(Tags::Hash).text().not_null())
                    .col(timestamp(Tags::CreatedAt))
                    .col(timestamp(Tags::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .name("tags_pkey")
                            .col(Tags::Namespace)
                            .col(Tags::Name)
                            .col(Tags::Version),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("tags_dataset_manifest_fkey")
                            .from_tbl(Tags::Table)
                            .from_col(Tags::Namespace)
                            .from_col(Tags::Name)
                            .from_col(Tags::Hash)
                            .to_tbl(DatasetManifests::Table)
                            .to_col(DatasetManifests::Namespace)
                            .to_col(DatasetManifests::Name)
                            .to_col(DatasetManifests::Hash)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Tags::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(DatasetManifests::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ManifestFiles::Table).to_owned())
            .await
    }
}
