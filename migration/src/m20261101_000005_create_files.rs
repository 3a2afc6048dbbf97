//! Files: `file_metadata` (one row per data file of a revision) and `gc_manifest` (files scheduled
//! for deletion).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PhysicalTableRevisions {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum FileMetadata {
    Table,
    Id,
    RevisionId,
    FileName,
    ObjectSize,
    ObjectETag,
    ObjectVersion,
    Metadata,
    CreatedAt,
}

#[derive(DeriveIden)]
enum GcManifest {
    Table,
    FileId,
    RevisionId,
    FilePath,
    Expiration,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(FileMetadata::Table)
                    .col(
                        ColumnDef::new(FileMetadata::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment(),
                    )
                    .col(
                        ColumnDef::new(FileMetadata::RevisionId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(FileMetadata::FileName).text().not_null())
                    .col(
                        ColumnDef::new(FileMetadata::ObjectSize)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(FileMetadata::ObjectETag).text().null())
                    .col(ColumnDef::new(FileMetadata::ObjectVersion).text().null())
                    .col(
                        ColumnDef::new(FileMetadata::Metadata)
                            .json_binary()
                            .not_null()
                            .default(Expr::val("{}")),
                    )
                    .col(
                        ColumnDef::new(FileMetadata::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(Func::cust("now")),
                    )
                    .primary_key(
                        Index::create()
                            .name("file_metadata_pkey")
                            .col(FileMetadata::Id),
                    )
                    .index(
                        Index::create()
                            .name("file_metadata_revision_file_key")
                            .unique()
                            .col(FileMetadata::RevisionId)
                            .col(FileMetadata::FileName),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("file_metadata_revision_id_fkey")
                            .from(FileMetadata::Table, FileMetadata::RevisionId)
                            .to(PhysicalTableRevisions::Table, PhysicalTableRevisions::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(GcManifest::Table)
                    .col(ColumnDef::new(GcManifest::FileId).big_integer().not_null())
                    .col(
                        ColumnDef::new(GcManifest::RevisionId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(GcManifest::FilePath).text().not_null())
                    .col(
                        ColumnDef::new(GcManifest::Expiration)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .name("gc_manifest_pkey")
                            .col(GcManifest::FileId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("gc_manifest_file_id_fkey")
                            .from(GcManifest::Table, GcManifest::FileId)
                            .to(FileMetadata::Table, FileMetadata::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("gc_manifest_revision_id_fkey")
                            .from(GcManifest::Table, GcManifest::RevisionId)
                            .to(PhysicalTableRevisions::Table, PhysicalTableRevisions::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_gc_manifest_revision_expiration")
                    .table(GcManifest::Table)
                    .col(GcManifest::RevisionId)
                    .col(GcManifest::Expiration)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(GcManifest::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(FileMetadata::Table).to_owned())
            .await
    }
}
