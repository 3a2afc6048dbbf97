//! The bookkeeping: `seaql_migrations` (SeaORM's own table, kept as SeaORM defines it so that its
//! CLI keeps working) and ampd's companion `ampd_migrations`, whose columns `docs/schema.md`
//! ("Migration bookkeeping") describes.
//!
//! Rows are written in the transaction of the step that applied the migration, so a migration is
//! recorded if and only if it was applied. Statements are plain text (values in place), so that a
//! dry run shows exactly what is sent.

use migration::Algorithm;
use sea_orm::sea_query::{
    ColumnDef, Expr, ForeignKey, ForeignKeyAction, Index, PostgresQueryBuilder, Table,
};
use sea_orm::{DatabaseBackend, DbErr};

use super::error::quote_literal;
use super::plan::Bookkeeping;
use super::session::{Event, Session};
use super::set::{AMPD_VERSION, MigrationSet};

/// ampd's companion to `seaql_migrations`.
pub const HISTORY_TABLE: &str = "ampd_migrations";

#[derive(sea_orm::DeriveIden)]
enum AmpdMigrations {
    Table,
    Version,
    Checksum,
    ExecutionMs,
    AmpdVersion,
    AppliedAt,
    ChecksumAlgorithm,
    Adopted,
    ChecksumHistory,
    Compatible,
    Baseline,
}

#[derive(sea_orm::DeriveIden)]
enum Seaql {
    #[sea_orm(iden = "seaql_migrations")]
    Table,
    Version,
}

fn create_seaql_sql() -> String {
    let stmt = sea_orm::Schema::new(DatabaseBackend::Postgres)
        .create_table_from_entity(migration::seaql_migrations::Entity)
        .if_not_exists()
        .to_owned();
    stmt.to_string(PostgresQueryBuilder)
}

/// The columns this ampd added to `ampd_migrations`; defaults that make the rows of older ampds
/// (and of older ampds still running) read right.
fn added_columns() -> [ColumnDef; 5] {
    [
        ColumnDef::new(AmpdMigrations::ChecksumAlgorithm)
            .small_integer()
            .not_null()
            .default(1)
            .to_owned(),
        ColumnDef::new(AmpdMigrations::Adopted)
            .boolean()
            .not_null()
            .default(false)
            .to_owned(),
        ColumnDef::new(AmpdMigrations::ChecksumHistory)
            .json_binary()
            .not_null()
            .default(Expr::cust("'[]'::jsonb"))
            .to_owned(),
        ColumnDef::new(AmpdMigrations::Compatible)
            .boolean()
            .not_null()
            .default(false)
            .to_owned(),
        ColumnDef::new(AmpdMigrations::Baseline)
            .json_binary()
            .null()
            .to_owned(),
    ]
}

fn create_history_sql() -> String {
    let mut stmt = Table::create();
    stmt.table(AmpdMigrations::Table)
        .if_not_exists()
        .col(ColumnDef::new(AmpdMigrations::Version).string().not_null())
        .col(ColumnDef::new(AmpdMigrations::Checksum).text().not_null())
        .col(
            ColumnDef::new(AmpdMigrations::ExecutionMs)
                .big_integer()
                .null(),
        )
        .col(
            ColumnDef::new(AmpdMigrations::AmpdVersion)
                .text()
                .not_null(),
        )
        .col(
            ColumnDef::new(AmpdMigrations::AppliedAt)
                .timestamp_with_time_zone()
                .not_null()
                .default(Expr::current_timestamp()),
        );
    for column in added_columns() {
        stmt.col(column);
    }
    stmt.primary_key(
        Index::create()
            .name("ampd_migrations_pkey")
            .col(AmpdMigrations::Version),
    )
    .foreign_key(
        ForeignKey::create()
            .name("ampd_migrations_version_fkey")
            .from(AmpdMigrations::Table, AmpdMigrations::Version)
            .to(Seaql::Table, Seaql::Version)
            .on_delete(ForeignKeyAction::Cascade),
    );
    stmt.to_string(PostgresQueryBuilder)
}

/// Brings an `ampd_migrations` of an older ampd to this layout. Rows of ampd 0.1 are algorithm-1
/// checksums, and those without a duration were recorded after SeaORM's CLI applied the migration;
/// rows recorded before `compatible` existed read as not compatible.
fn upgrade_history_sql() -> [String; 2] {
    let mut alter = Table::alter();
    alter.table(AmpdMigrations::Table);
    for column in added_columns() {
        alter.add_column_if_not_exists(column);
    }
    [
        alter.to_string(PostgresQueryBuilder),
        format!("UPDATE {HISTORY_TABLE} SET adopted = true WHERE execution_ms IS NULL"),
    ]
}

/// Creates or upgrades the bookkeeping tables and records migrations applied without ampd, as
/// `bookkeeping` says; in the step's transaction.
pub(super) async fn ensure(
    session: &Session,
    bookkeeping: &Bookkeeping,
    set: &MigrationSet,
) -> Result<(), DbErr> {
    if bookkeeping.create_seaql {
        session.write(&create_seaql_sql()).await?;
    }
    if bookkeeping.create_history {
        session.write(&create_history_sql()).await?;
    }
    if bookkeeping.upgrade_history {
        for sql in upgrade_history_sql() {
            session.write(&sql).await?;
        }
    }
    for name in &bookkeeping.adopt {
        session
            .write(&format!(
                "INSERT INTO {HISTORY_TABLE} (version, checksum, checksum_algorithm, execution_ms, \
                 ampd_version, adopted, compatible) VALUES ({}, {}, {}, NULL, {}, true, {})",
                quote_literal(name),
                quote_literal(&set.checksum(name, Algorithm::CURRENT)),
                Algorithm::CURRENT.number(),
                quote_literal(AMPD_VERSION),
                set.is_compatible(name)
            ))
            .await?;
        session.tell(Event::Adopted(name));
    }
    Ok(())
}

/// Records migration `name` as applied, in `seaql_migrations` (as SeaORM does) and in
/// `ampd_migrations`, with the time its `up` took (`None` in a dry run, which cannot know it) and
/// whether binaries that do not know it may keep running on it.
pub(super) async fn applied(
    session: &Session,
    name: &str,
    checksum: &str,
    execution_ms: Option<u64>,
    compatible: bool,
) -> Result<(), DbErr> {
    session
        .write(&format!(
            "INSERT INTO seaql_migrations (version, applied_at) VALUES ({}, \
             EXTRACT(EPOCH FROM now())::bigint)",
            quote_literal(name)
        ))
        .await?;
    let (ms, note) = match execution_ms {
        Some(ms) => (ms.to_string(), None),
        None => (
            "NULL".to_owned(),
            Some("execution_ms: the time the migration took, measured by the run".to_owned()),
        ),
    };
    session
        .write_noted(
            &format!(
                "INSERT INTO {HISTORY_TABLE} (version, checksum, checksum_algorithm, execution_ms, \
                 ampd_version, adopted, compatible) VALUES ({}, {}, {}, {ms}, {}, false, {compatible})",
                quote_literal(name),
                quote_literal(checksum),
                Algorithm::CURRENT.number(),
                quote_literal(AMPD_VERSION)
            ),
            note,
        )
        .await
}

/// Replaces the recorded checksum of `name` (`old`, computed with algorithm `old_algorithm`) by
/// `new` (current algorithm), keeping the old value, `reason`, the time and this ampd's version in
/// its `checksum_history`. Returns whether the row was changed (it is not when the recorded value
/// changed meanwhile).
pub(super) async fn accept(
    session: &Session,
    name: &str,
    old: &str,
    old_algorithm: i64,
    new: &str,
    reason: &str,
) -> Result<bool, DbErr> {
    let rows = session
        .read(&format!(
            "UPDATE {HISTORY_TABLE} SET checksum = {new}, checksum_algorithm = {algorithm}, \
             checksum_history = checksum_history || jsonb_build_array(jsonb_build_object(\
             'checksum', {old}, 'algorithm', {old_algorithm}, 'accepted', {new}, \
             'reason', {reason}, 'at', now()::text, 'ampd_version', {version}, \
             'role', current_user::text)) \
             WHERE version = {name} AND checksum = {old} RETURNING version",
            new = quote_literal(new),
            algorithm = Algorithm::CURRENT.number(),
            old = quote_literal(old),
            reason = quote_literal(reason),
            version = quote_literal(AMPD_VERSION),
            name = quote_literal(name),
        ))
        .await?;
    Ok(!rows.is_empty())
}

/// Upgrades `ampd_migrations` when an older ampd created it (for `accept-checksum`, which needs the
/// current layout).
pub(super) async fn upgrade(session: &Session) -> Result<(), DbErr> {
    for sql in upgrade_history_sql() {
        session.write(&sql).await?;
    }
    Ok(())
}

/// Records migration `name` as applied by `ampd migrate baseline` (up to `to`, for `reason`),
/// without running it: `adopted`, no duration, the role and time of the baseline kept in
/// `baseline`. In the caller's transaction.
pub(super) async fn baselined(
    session: &Session,
    set: &MigrationSet,
    name: &str,
    to: &str,
    reason: &str,
) -> Result<(), DbErr> {
    session
        .write(&format!(
            "INSERT INTO seaql_migrations (version, applied_at) VALUES ({}, \
             EXTRACT(EPOCH FROM now())::bigint)",
            quote_literal(name)
        ))
        .await?;
    session
        .write(&format!(
            "INSERT INTO {HISTORY_TABLE} (version, checksum, checksum_algorithm, execution_ms, \
             ampd_version, adopted, compatible, baseline) VALUES ({name}, {checksum}, {algorithm}, \
             NULL, {version}, true, {compatible}, jsonb_build_object('to', {to}, 'reason', {reason}, \
             'role', current_user::text, 'at', now()::text, 'ampd_version', {version}))",
            name = quote_literal(name),
            checksum = quote_literal(&set.checksum(name, Algorithm::CURRENT)),
            algorithm = Algorithm::CURRENT.number(),
            version = quote_literal(AMPD_VERSION),
            compatible = set.is_compatible(name),
            to = quote_literal(to),
            reason = quote_literal(reason),
        ))
        .await
}
