//! Backfill of `jobs.idempotency_key` for jobs created before it existed, then `NOT NULL` and
//! `UNIQUE jobs_idempotency_key_key`.
//!
//! The key is the hex sha256 of `kind:namespace/name@manifest_hash`, read from the job's descriptor
//! (a missing field reads as the empty string). Older databases may hold several jobs for the same
//! key: the newest (highest id) keeps the plain key, so that scheduling the same work again finds it,
//! and each older one gets the hash of `<key text>#<id>`, which keeps it unique and traceable.
use sea_orm_migration::prelude::extension::postgres::PgExpr;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Id,
    Kind,
    Descriptor,
    IdempotencyKey,
}

#[derive(DeriveIden)]
struct Newer;

const UNIQUE_KEY: &str = "jobs_idempotency_key_key";

/// `kind:namespace/name@manifest_hash` of the row being updated.
fn key_text() -> Expr {
    let field = |name: &str| {
        Expr::expr(Func::coalesce([
            Expr::col((Jobs::Table, Jobs::Descriptor)).cast_json_field(name),
            Expr::val(""),
        ]))
    };
    Expr::col((Jobs::Table, Jobs::Kind))
        .concat(":")
        .concat(field("namespace"))
        .concat("/")
        .concat(field("name"))
        .concat("@")
        .concat(field("manifest_hash"))
}

/// `encode(sha256(convert_to(text, 'UTF8')), 'hex')`
fn hex_sha256(text: Expr) -> Expr {
    Func::cust("encode")
        .arg(Func::cust("sha256").arg(Func::cust("convert_to").arg(text).arg("UTF8")))
        .arg("hex")
        .into()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();

        // 1. Every job without a key gets the key of what it runs.
        db.execute(
            &Query::update()
                .table(Jobs::Table)
                .value(Jobs::IdempotencyKey, hex_sha256(key_text()))
                .and_where(Expr::col((Jobs::Table, Jobs::IdempotencyKey)).is_null())
                .to_owned(),
        )
        .await?;

        // 2. Where several jobs now share a key, all but the newest get a key of their own.
        db.execute(
            &Query::update()
                .table(Jobs::Table)
                .value(
                    Jobs::IdempotencyKey,
                    hex_sha256(
                        key_text()
                            .concat("#")
                            .concat(Expr::col((Jobs::Table, Jobs::Id)).cast_as("text")),
                    ),
                )
                .and_where(Expr::exists(
                    Query::select()
                        .expr(Expr::val(1))
                        .from_as(Jobs::Table, Newer)
                        .and_where(
                            Expr::col((Newer, Jobs::IdempotencyKey))
                                .equals((Jobs::Table, Jobs::IdempotencyKey)),
                        )
                        .and_where(
                            Expr::col((Newer, Jobs::Id)).gt(Expr::col((Jobs::Table, Jobs::Id))),
                        )
                        .to_owned(),
                ))
                .to_owned(),
        )
        .await?;

        // 3. From now on every job has exactly one key of its own.
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .modify_column(ColumnDef::new(Jobs::IdempotencyKey).not_null().unique_key())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The backfilled keys stay: the previous schema allowed them, and the migration before
        // this one drops the column when it is undone.
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .drop_constraint(UNIQUE_KEY)
                    .modify_column(ColumnDef::new(Jobs::IdempotencyKey).null())
                    .to_owned(),
            )
            .await
    }
}
