//! Bringing the metadata database up to date: the one entry point shared by `ampd migrate` and by
//! services that migrate on startup.
//!
//! A run:
//! 1. reads what is applied (one query: `seaql_migrations` joined with ampd's companion table
//!    `ampd_migrations`), and verifies it against this binary: a migration whose recorded checksum
//!    differs is refused (`migration checksum mismatch`), and so is an applied migration this binary
//!    does not know (the database is newer than this ampd). With nothing pending it stops there.
//! 2. otherwise takes the session advisory lock [`LOCK_KEY`] on its dedicated connection (waiting
//!    at most `migration_lock_timeout_secs`), opens one transaction, reads and verifies the applied
//!    set again (another ampd may have just migrated), then applies every pending
//!    migration with `lock_timeout = ddl_lock_timeout_ms`, records each in `seaql_migrations` (as
//!    SeaORM does, so its CLI keeps working) and in `ampd_migrations` (checksum, duration, ampd
//!    version), and commits. Any failure rolls the whole run back: the database stays exactly as it
//!    was. The lock is released after the commit or rollback, or by the server when the
//!    connection ends, so a killed run never leaves it held.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use migration::{MigrationTrait, MigratorTrait, SchemaManager};
use sea_orm::sea_query::{ColumnDef, Expr, ForeignKey, ForeignKeyAction, Index, Query, Table};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DatabaseTransaction, DbErr, QueryResult,
    Statement, TransactionTrait,
};
use serde::Serialize;

use crate::config::MetadataDbConfig;
use crate::db::{self, ConnectError, pg_error};

/// The advisory lock serialising migration runs (`"ampdmigr"` as a big-endian i64). Data-access
/// locks use the two-key form of the advisory lock functions and never collide with it.
pub const LOCK_KEY: i64 = 0x616d_7064_6d69_6772;

/// ampd's companion to `seaql_migrations`.
pub const HISTORY_TABLE: &str = "ampd_migrations";

/// The version of this ampd, recorded with each migration it applies.
pub const AMPD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Gives the checksum this binary knows a migration by.
type ChecksumFn = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A list of migrations and the checksums this binary knows them by.
pub struct MigrationSet {
    migrations: Vec<Box<dyn MigrationTrait>>,
    checksum: ChecksumFn,
}

impl MigrationSet {
    /// The metadata schema's migrations (the `migration` crate), with the checksums computed from
    /// their source when this binary was built.
    pub fn ampd() -> Self {
        MigrationSet::new(migration::Migrator::migrations(), |name| {
            migration::checksum_of(name).map(str::to_owned)
        })
    }

    /// Any list of migrations, in order, with a checksum for each (used by tests and benchmarks).
    pub fn new(
        migrations: Vec<Box<dyn MigrationTrait>>,
        checksum: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        MigrationSet {
            migrations,
            checksum: Box::new(checksum),
        }
    }

    /// Migration names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.migrations.iter().map(|m| m.name()).collect()
    }

    fn checksum_of(&self, name: &str) -> String {
        (self.checksum)(name).unwrap_or_default()
    }
}

/// Why a migration run failed. Nothing was changed in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// An applied migration's recorded checksum differs from this binary's.
    #[error(
        "migration checksum mismatch: {name} was applied with checksum {recorded} but this ampd has {expected}; \
         the migration was changed after it was applied. Restore the original migration, or reset the \
         database (drop and re-create it) if its data can be thrown away"
    )]
    ChecksumMismatch {
        /// The migration.
        name: String,
        /// Checksum recorded when it was applied.
        recorded: String,
        /// Checksum of this binary's migration.
        expected: String,
    },
    /// The database has applied migrations this binary does not know.
    #[error(
        "database is newer than this ampd ({AMPD_VERSION}): it has applied {} unknown to this binary; \
         run a newer ampd (the one that migrated it, or later)",
        names.join(", ")
    )]
    DatabaseAhead {
        /// The unknown migrations.
        names: Vec<String>,
    },
    /// Another migration run held the lock for longer than the configured wait.
    #[error(
        "timed out after {waited_secs} s waiting for the migration lock: another ampd is migrating this \
         database (or a session holds advisory lock {LOCK_KEY}); try again, or raise \
         metadata_db.migration_lock_timeout_secs"
    )]
    LockTimeout {
        /// How long it waited.
        waited_secs: u64,
    },
    /// The role may not create tables.
    #[error(
        "permission denied: role {role} may not create tables in database {database} ({message}); \
         as an administrator, run: GRANT CREATE ON DATABASE {database} TO {role}; GRANT ALL ON SCHEMA public TO {role};"
    )]
    PermissionDenied {
        /// The connected role.
        role: String,
        /// The database.
        database: String,
        /// PostgreSQL's message.
        message: String,
    },
    /// A migration could not lock a table within `ddl_lock_timeout_ms` because another session
    /// holds a conflicting lock on it.
    #[error(
        "migration {name} failed: a table it changes is locked by another session and the lock was not \
         granted within {timeout_ms} ms ({message}); nothing was applied. Find the blocking session \
         (pg_stat_activity / pg_locks), let it finish, and run again"
    )]
    LockedByOtherSession {
        /// The migration.
        name: String,
        /// The configured DDL lock timeout.
        timeout_ms: u64,
        /// PostgreSQL's message.
        message: String,
    },
    /// A migration failed; the run was rolled back.
    #[error("migration {name} failed: {message}; nothing was applied (the run was rolled back)")]
    MigrationFailed {
        /// The migration.
        name: String,
        /// PostgreSQL's (or the migration's) message.
        message: String,
    },
    /// A service found migrations pending and was not asked to apply them.
    #[error(
        "the metadata database is not migrated ({pending} pending migration(s)): run `ampd migrate` \
         first, or set metadata_db.auto_migrate = true"
    )]
    NotMigrated {
        /// How many migrations are pending.
        pending: usize,
    },
    /// Any other database error while reading or recording migration state.
    #[error("metadata database error: {0}")]
    Database(String),
}

impl MigrateError {
    fn database(err: DbErr) -> Self {
        MigrateError::Database(describe(&err))
    }
}

/// The server's message for `err` (with SQLSTATE), or SeaORM's.
fn describe(err: &DbErr) -> String {
    match pg_error(err) {
        Some(pg) => {
            let mut s = format!("{} (SQLSTATE {})", pg.message, pg.code);
            if let Some(detail) = pg.detail {
                let _ = write!(s, ": {detail}");
            }
            s
        }
        None => crate::redact::redact_url(&err.to_string()),
    }
}

/// One migration applied by a run.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// Migration name.
    pub name: String,
    /// Time its `up` took.
    pub duration: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// Migrations applied, in order (empty when the schema was up to date).
    pub applied: Vec<Applied>,
    /// Applied migrations that had no ampd record (applied by SeaORM's CLI) and were recorded now.
    pub adopted: Vec<String>,
    /// Wall time of the whole run, connecting included.
    pub elapsed: Duration,
    /// The newest applied migration after the run.
    pub version: Option<String>,
}

impl MigrateReport {
    /// The run's last line: what was done and where the schema is now.
    pub fn summary(&self) -> String {
        let version = self.version.as_deref().unwrap_or("(none)");
        if self.applied.is_empty() {
            format!("schema is up to date (version {version})")
        } else {
            format!(
                "applied {} migration{} in {} ms; schema at version {version}",
                self.applied.len(),
                if self.applied.len() == 1 { "" } else { "s" },
                self.elapsed.as_millis()
            )
        }
    }
}

/// A migration as it stands in a database, as `ampd migrate status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationState {
    /// Migration name.
    pub name: String,
    /// `applied` or `pending`.
    pub state: &'static str,
    /// When it was applied.
    pub applied_at: Option<DateTime<Utc>>,
    /// `ok`, `mismatch`, `unknown` (applied, but this binary does not have it), `unrecorded`
    /// (applied without an ampd record, e.g. by SeaORM's CLI), or `pending`.
    pub checksum: &'static str,
    /// Time its `up` took, when ampd applied it.
    pub duration_ms: Option<i64>,
    /// The ampd version that applied it.
    pub ampd_version: Option<String>,
}

/// A row of the applied set.
#[derive(Debug, Clone)]
struct AppliedRow {
    version: String,
    applied_at: i64,
    checksum: Option<String>,
    execution_ms: Option<i64>,
    ampd_version: Option<String>,
}

/// What the database says, read in one round trip where it can.
#[derive(Debug, Clone, Default)]
struct DbState {
    role: String,
    database: String,
    has_seaql: bool,
    has_history: bool,
    applied: Vec<AppliedRow>,
}

const READ_STATE_SQL: &str = "\
SELECT current_user::text AS role, current_database()::text AS database, \
       s.version::text AS version, s.applied_at, h.checksum, h.execution_ms, h.ampd_version \
FROM (SELECT 1) AS one \
LEFT JOIN (seaql_migrations AS s LEFT JOIN ampd_migrations AS h ON h.version = s.version) ON true \
ORDER BY s.version";

const PROBE_SQL: &str = "\
SELECT current_user::text AS role, current_database()::text AS database, \
       to_regclass('seaql_migrations') IS NOT NULL AS has_seaql, \
       to_regclass('ampd_migrations') IS NOT NULL AS has_history";

const READ_SEAQL_SQL: &str = "\
SELECT current_user::text AS role, current_database()::text AS database, \
       s.version::text AS version, s.applied_at, NULL::text AS checksum, \
       NULL::bigint AS execution_ms, NULL::text AS ampd_version \
FROM (SELECT 1) AS one LEFT JOIN seaql_migrations AS s ON true ORDER BY s.version";

fn rows_to_state(rows: &[QueryResult], has_history: bool) -> Result<DbState, DbErr> {
    let mut state = DbState {
        has_seaql: true,
        has_history,
        ..DbState::default()
    };
    for row in rows {
        state.role = row.try_get("", "role")?;
        state.database = row.try_get("", "database")?;
        let version: Option<String> = row.try_get("", "version")?;
        if let Some(version) = version {
            state.applied.push(AppliedRow {
                version,
                applied_at: row.try_get("", "applied_at")?,
                checksum: row.try_get("", "checksum")?,
                execution_ms: row.try_get("", "execution_ms")?,
                ampd_version: row.try_get("", "ampd_version")?,
            });
        }
    }
    Ok(state)
}

/// Reads the applied set without creating anything: one query when both bookkeeping tables exist.
/// Inside a transaction (`in_transaction`), where a failed statement would abort it, it asks which
/// tables exist first instead of trying.
async fn read_state<C: ConnectionTrait>(db: &C, in_transaction: bool) -> Result<DbState, DbErr> {
    let backend = db.get_database_backend();
    if !in_transaction {
        match db
            .query_all_raw(Statement::from_string(backend, READ_STATE_SQL))
            .await
        {
            Ok(rows) => return rows_to_state(&rows, true),
            // undefined_table: a fresh database, or one migrated only by SeaORM's CLI.
            Err(e) if pg_error(&e).is_some_and(|pg| pg.code == "42P01") => {}
            Err(e) => return Err(e),
        }
    }
    let probe = db
        .query_one_raw(Statement::from_string(backend, PROBE_SQL))
        .await?
        .ok_or_else(|| DbErr::Custom("probe returned no row".into()))?;
    let has_seaql: bool = probe.try_get("", "has_seaql")?;
    let has_history: bool = probe.try_get("", "has_history")?;
    if has_seaql {
        let sql = if has_history {
            READ_STATE_SQL
        } else {
            READ_SEAQL_SQL
        };
        let rows = db
            .query_all_raw(Statement::from_string(backend, sql))
            .await?;
        return rows_to_state(&rows, has_history);
    }
    Ok(DbState {
        role: probe.try_get("", "role")?,
        database: probe.try_get("", "database")?,
        has_seaql,
        has_history,
        applied: Vec::new(),
    })
}

/// The verdict on a database's applied set against a [`MigrationSet`].
struct Plan<'a> {
    pending: Vec<&'a dyn MigrationTrait>,
    unrecorded: Vec<String>,
}

fn plan<'a>(set: &'a MigrationSet, state: &DbState) -> Result<Plan<'a>, MigrateError> {
    let known: HashMap<&str, usize> = set
        .migrations
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name(), i))
        .collect();
    let unknown: Vec<String> = state
        .applied
        .iter()
        .filter(|row| !known.contains_key(row.version.as_str()))
        .map(|row| row.version.clone())
        .collect();
    if !unknown.is_empty() {
        return Err(MigrateError::DatabaseAhead { names: unknown });
    }
    let mut unrecorded = Vec::new();
    for row in &state.applied {
        let expected = set.checksum_of(&row.version);
        match &row.checksum {
            Some(recorded) if *recorded != expected => {
                return Err(MigrateError::ChecksumMismatch {
                    name: row.version.clone(),
                    recorded: recorded.clone(),
                    expected,
                });
            }
            Some(_) => {}
            None => unrecorded.push(row.version.clone()),
        }
    }
    let applied: std::collections::HashSet<&str> =
        state.applied.iter().map(|r| r.version.as_str()).collect();
    let pending = set
        .migrations
        .iter()
        .filter(|m| !applied.contains(m.name()))
        .map(|m| m.as_ref())
        .collect();
    Ok(Plan {
        pending,
        unrecorded,
    })
}

/// Connects (one dedicated connection) and brings the database up to date with `set`.
pub async fn migrate(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
) -> Result<MigrateReport, MigrateError> {
    let started = Instant::now();
    let db = db::connect(cfg, 1).await?;
    let result = migrate_on(&db, cfg, set, started).await;
    let _ = db.close().await;
    result
}

/// The run itself, on `db`: a pool of exactly one connection, so that the session's advisory lock
/// and the transaction are on the same connection.
async fn migrate_on(
    db: &DatabaseConnection,
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    started: Instant,
) -> Result<MigrateReport, MigrateError> {
    // Fast path: read and verify without locking; nothing to do means one query in all.
    let state = read_state(db, false)
        .await
        .map_err(MigrateError::database)?;
    let first = plan(set, &state)?;
    if first.pending.is_empty() && first.unrecorded.is_empty() {
        return Ok(MigrateReport {
            applied: Vec::new(),
            adopted: Vec::new(),
            elapsed: started.elapsed(),
            version: state.applied.last().map(|r| r.version.clone()),
        });
    }

    // Take the session lock before the transaction begins: a transaction that began before another
    // run committed could still see that run's tables as missing in its catalog cache.
    let lock_wait_ms = cfg.migration_lock_timeout_secs.saturating_mul(1000).max(1);
    let waiting = Instant::now();
    let lock_sql = format!(
        "SET lock_timeout = {lock_wait_ms}; SELECT pg_advisory_lock({LOCK_KEY}); \
         SET lock_timeout = {}",
        cfg.ddl_lock_timeout_ms.max(1)
    );
    if let Err(e) = db.execute_unprepared(&lock_sql).await {
        return Err(match pg_error(&e) {
            Some(pg) if pg.code == "55P03" => MigrateError::LockTimeout {
                waited_secs: waiting.elapsed().as_secs(),
            },
            _ => MigrateError::database(e),
        });
    }
    tracing::debug!(
        waited_ms = waiting.elapsed().as_millis() as u64,
        "migration lock taken"
    );

    let result = apply_in_transaction(db, cfg, set).await;
    // Closing the connection would release the lock too; unlocking keeps the order explicit.
    let _ = db
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({LOCK_KEY})"))
        .await;
    let (applied, adopted, version) = result?;
    Ok(MigrateReport {
        applied,
        adopted,
        elapsed: started.elapsed(),
        version,
    })
}

async fn apply_in_transaction(
    db: &DatabaseConnection,
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
) -> Result<Outcome, MigrateError> {
    let txn = db.begin().await.map_err(MigrateError::database)?;
    match apply_locked(&txn, cfg, set).await {
        Ok(outcome) => {
            txn.commit().await.map_err(MigrateError::database)?;
            Ok(outcome)
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Err(e)
        }
    }
}

type Outcome = (Vec<Applied>, Vec<String>, Option<String>);

async fn apply_locked(
    txn: &DatabaseTransaction,
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
) -> Result<Outcome, MigrateError> {
    // Another ampd may have migrated while we waited: decide again under the lock.
    let state = read_state(txn, true)
        .await
        .map_err(MigrateError::database)?;
    tracing::debug!(
        applied = state.applied.len(),
        has_seaql = state.has_seaql,
        has_history = state.has_history,
        "applied set under the lock"
    );
    let plan = plan(set, &state)?;
    let permission = |e: DbErr| match pg_error(&e) {
        Some(pg) if pg.code == "42501" => MigrateError::PermissionDenied {
            role: state.role.clone(),
            database: state.database.clone(),
            message: pg.message,
        },
        _ => MigrateError::database(e),
    };

    if !state.has_seaql {
        let stmt = sea_orm::Schema::new(DatabaseBackend::Postgres)
            .create_table_from_entity(migration::seaql_migrations::Entity)
            .if_not_exists()
            .to_owned();
        txn.execute(&stmt).await.map_err(permission)?;
    }
    if !state.has_history {
        txn.execute(&history_table()).await.map_err(permission)?;
    }

    let mut adopted = Vec::new();
    for name in &plan.unrecorded {
        record_history(txn, name, &set.checksum_of(name), None)
            .await
            .map_err(MigrateError::database)?;
        tracing::info!(migration = %name, "recorded checksum of a migration applied without ampd");
        adopted.push(name.clone());
    }

    let mut applied = Vec::new();
    for migration in plan.pending {
        let name = migration.name().to_owned();
        let started = Instant::now();
        let manager = SchemaManager::new(txn);
        if let Err(e) = migration.up(&manager).await {
            return Err(match pg_error(&e) {
                Some(pg) if pg.code == "55P03" => MigrateError::LockedByOtherSession {
                    name,
                    timeout_ms: cfg.ddl_lock_timeout_ms,
                    message: pg.message,
                },
                Some(pg) if pg.code == "42501" => MigrateError::PermissionDenied {
                    role: state.role.clone(),
                    database: state.database.clone(),
                    message: pg.message,
                },
                _ => MigrateError::MigrationFailed {
                    name,
                    message: describe(&e),
                },
            });
        }
        let duration = started.elapsed();
        record_seaql(txn, &name)
            .await
            .map_err(MigrateError::database)?;
        record_history(
            txn,
            &name,
            &set.checksum_of(&name),
            Some(duration.as_millis() as i64),
        )
        .await
        .map_err(MigrateError::database)?;
        tracing::info!(migration = %name, duration_ms = duration.as_millis() as u64, "applied migration");
        applied.push(Applied { name, duration });
    }

    let version = set
        .migrations
        .iter()
        .rev()
        .map(|m| m.name())
        .find(|name| {
            state.applied.iter().any(|r| r.version == *name)
                || applied.iter().any(|a| a.name == *name)
        })
        .map(str::to_owned);
    Ok((applied, adopted, version))
}

#[derive(sea_orm::DeriveIden)]
enum History {
    #[sea_orm(iden = "ampd_migrations")]
    Table,
    Version,
    Checksum,
    ExecutionMs,
    AmpdVersion,
    AppliedAt,
}

#[derive(sea_orm::DeriveIden)]
enum Seaql {
    #[sea_orm(iden = "seaql_migrations")]
    Table,
    Version,
    AppliedAt,
}

/// `ampd_migrations`: what SeaORM does not record. Its rows follow `seaql_migrations` (a SeaORM
/// `down` removes both).
fn history_table() -> sea_orm::sea_query::TableCreateStatement {
    Table::create()
        .table(History::Table)
        .if_not_exists()
        .col(ColumnDef::new(History::Version).string().not_null())
        .col(ColumnDef::new(History::Checksum).text().not_null())
        .col(ColumnDef::new(History::ExecutionMs).big_integer().null())
        .col(ColumnDef::new(History::AmpdVersion).text().not_null())
        .col(
            ColumnDef::new(History::AppliedAt)
                .timestamp_with_time_zone()
                .not_null()
                .default(Expr::current_timestamp()),
        )
        .primary_key(
            Index::create()
                .name("ampd_migrations_pkey")
                .col(History::Version),
        )
        .foreign_key(
            ForeignKey::create()
                .name("ampd_migrations_version_fkey")
                .from(History::Table, History::Version)
                .to(Seaql::Table, Seaql::Version)
                .on_delete(ForeignKeyAction::Cascade),
        )
        .to_owned()
}

async fn record_seaql<C: ConnectionTrait>(db: &C, name: &str) -> Result<(), DbErr> {
    let stmt = Query::insert()
        .into_table(Seaql::Table)
        .columns([Seaql::Version, Seaql::AppliedAt])
        .values_panic([name.into(), Utc::now().timestamp().into()])
        .to_owned();
    db.execute(&stmt).await.map(|_| ())
}

async fn record_history<C: ConnectionTrait>(
    db: &C,
    name: &str,
    checksum: &str,
    execution_ms: Option<i64>,
) -> Result<(), DbErr> {
    let stmt = Query::insert()
        .into_table(History::Table)
        .columns([
            History::Version,
            History::Checksum,
            History::ExecutionMs,
            History::AmpdVersion,
        ])
        .values_panic([
            name.into(),
            checksum.into(),
            execution_ms.into(),
            AMPD_VERSION.into(),
        ])
        .to_owned();
    db.execute(&stmt).await.map(|_| ())
}

/// Verifies, read-only, that the database is at this binary's head: the check a service makes at
/// startup when it does not migrate itself. Errors as [`migrate`] would refuse, or
/// [`MigrateError::NotMigrated`] when migrations are pending.
pub async fn verify_current(
    db: &DatabaseConnection,
    set: &MigrationSet,
) -> Result<(), MigrateError> {
    let state = read_state(db, false)
        .await
        .map_err(MigrateError::database)?;
    let plan = plan(set, &state)?;
    if plan.pending.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::NotMigrated {
            pending: plan.pending.len(),
        })
    }
}

/// The applied and pending migrations of the database, read-only (creates nothing).
pub async fn status(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
) -> Result<Vec<MigrationState>, MigrateError> {
    let db = db::connect(cfg, 1).await?;
    let state = read_state(&db, false).await.map_err(MigrateError::database);
    let _ = db.close().await;
    Ok(states(set, &state?))
}

fn states(set: &MigrationSet, state: &DbState) -> Vec<MigrationState> {
    let applied: HashMap<&str, &AppliedRow> = state
        .applied
        .iter()
        .map(|r| (r.version.as_str(), r))
        .collect();
    let mut out: Vec<MigrationState> = set
        .migrations
        .iter()
        .map(|m| {
            let name = m.name();
            match applied.get(name) {
                Some(row) => MigrationState {
                    name: name.to_owned(),
                    state: "applied",
                    applied_at: DateTime::from_timestamp(row.applied_at, 0),
                    checksum: match &row.checksum {
                        None => "unrecorded",
                        Some(c) if *c == set.checksum_of(name) => "ok",
                        Some(_) => "mismatch",
                    },
                    duration_ms: row.execution_ms,
                    ampd_version: row.ampd_version.clone(),
                },
                None => MigrationState {
                    name: name.to_owned(),
                    state: "pending",
                    applied_at: None,
                    checksum: "pending",
                    duration_ms: None,
                    ampd_version: None,
                },
            }
        })
        .collect();
    let known: std::collections::HashSet<&str> = set.names().into_iter().collect();
    for row in state
        .applied
        .iter()
        .filter(|r| !known.contains(r.version.as_str()))
    {
        out.push(MigrationState {
            name: row.version.clone(),
            state: "applied",
            applied_at: DateTime::from_timestamp(row.applied_at, 0),
            checksum: "unknown",
            duration_ms: row.execution_ms,
            ampd_version: row.ampd_version.clone(),
        });
    }
    out
}

/// The SQL a run would execute, per pending migration, in order.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// (migration, its statements) for each pending migration.
    pub migrations: Vec<(String, Vec<String>)>,
}

impl DryRun {
    /// A script a person can read (and `psql` could run), with the bookkeeping as comments.
    pub fn script(&self) -> String {
        let mut out = String::new();
        if self.migrations.is_empty() {
            out.push_str("-- schema is up to date: nothing would run\n");
            return out;
        }
        let _ = writeln!(
            out,
            "-- {} pending migration(s), applied in one transaction under advisory lock {LOCK_KEY}",
            self.migrations.len()
        );
        out.push_str("BEGIN;\n");
        let _ = writeln!(out, "SELECT pg_advisory_xact_lock({LOCK_KEY});");
        for (name, statements) in &self.migrations {
            let _ = writeln!(out, "\n-- {name}");
            for stmt in statements {
                let _ = writeln!(out, "{stmt};");
            }
            let _ = writeln!(
                out,
                "-- then recorded in seaql_migrations and {HISTORY_TABLE} (checksum, duration, ampd {AMPD_VERSION})"
            );
        }
        out.push_str("\nCOMMIT;\n");
        out
    }
}

/// Reads what is pending (read-only) and renders the SQL each pending migration would run,
/// without executing any of it.
pub async fn dry_run(cfg: &MetadataDbConfig, set: &MigrationSet) -> Result<DryRun, MigrateError> {
    let db = db::connect(cfg, 1).await?;
    let state = read_state(&db, false).await.map_err(MigrateError::database);
    let _ = db.close().await;
    let state = state?;
    let plan = plan(set, &state)?;
    let mut migrations = Vec::new();
    for migration in plan.pending {
        let statements = capture(migration)
            .await
            .map_err(|e| MigrateError::MigrationFailed {
                name: migration.name().to_owned(),
                message: describe(&e),
            })?;
        migrations.push((migration.name().to_owned(), statements));
    }
    Ok(DryRun { migrations })
}

/// Runs `migration.up` against a recording connection that executes nothing.
async fn capture(migration: &dyn MigrationTrait) -> Result<Vec<String>, DbErr> {
    let recorder = Arc::new(Recorder::default());
    let proxy: Arc<Box<dyn sea_orm::ProxyDatabaseTrait>> =
        Arc::new(Box::new(RecorderHandle(recorder.clone())));
    let conn = sea_orm::Database::connect_proxy(DatabaseBackend::Postgres, proxy).await?;
    migration.up(&SchemaManager::new(&conn)).await?;
    let statements = recorder
        .statements
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    Ok(statements)
}

#[derive(Debug, Default)]
struct Recorder {
    statements: Mutex<Vec<String>>,
}

#[derive(Debug)]
struct RecorderHandle(Arc<Recorder>);

#[async_trait::async_trait]
impl sea_orm::ProxyDatabaseTrait for RecorderHandle {
    async fn query(&self, statement: Statement) -> Result<Vec<sea_orm::ProxyRow>, DbErr> {
        if let Ok(mut s) = self.0.statements.lock() {
            s.push(statement.to_string());
        }
        Ok(Vec::new())
    }

    async fn execute(&self, statement: Statement) -> Result<sea_orm::ProxyExecResult, DbErr> {
        if let Ok(mut s) = self.0.statements.lock() {
            s.push(statement.to_string());
        }
        Ok(sea_orm::ProxyExecResult::default())
    }
}
