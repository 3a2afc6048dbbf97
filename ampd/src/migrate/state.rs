//! Reading what a database has applied: `seaql_migrations` (SeaORM's record, kept as SeaORM defines
//! it) joined with ampd's companion `ampd_migrations` (checksum and its algorithm, duration, ampd
//! version, whether ampd applied it or recorded it later, accepted checksum changes). One query when
//! both tables exist in their current layout; a fresh database, one migrated only by SeaORM's CLI,
//! or one whose `ampd_migrations` an older ampd created takes a probe and one more query.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult, Statement};
use serde::{Deserialize, Serialize};

use super::error::{Identity, MigrateError, quote_ident};
use crate::db::pg_error;

/// Something that runs a read-only statement and gives its rows.
pub(super) trait Reader {
    /// Runs `sql` and returns its rows.
    async fn rows(&self, sql: &str) -> Result<Vec<QueryResult>, DbErr>;

    /// Says something about the last statement to whoever reads along (a dry run's script).
    fn remark(&self, _text: &str) {}
}

impl Reader for DatabaseConnection {
    async fn rows(&self, sql: &str) -> Result<Vec<QueryResult>, DbErr> {
        self.query_all_raw(Statement::from_string(self.get_database_backend(), sql))
            .await
    }
}

/// A checksum replaced by `ampd migrate accept-checksum`, as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumChange {
    /// The checksum recorded before.
    pub checksum: String,
    /// Its algorithm version.
    pub algorithm: i64,
    /// The checksum accepted in its place.
    pub accepted: String,
    /// Why (given by the operator).
    pub reason: String,
    /// When (server time).
    pub at: String,
    /// The ampd version that accepted it.
    pub ampd_version: String,
    /// The database role that accepted it (absent in entries of older ampds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// How `ampd migrate baseline` recorded a migration without running it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineRecord {
    /// The migration the baseline went up to.
    pub to: String,
    /// Why (given by the operator).
    pub reason: String,
    /// The role that ran it (`current_user`).
    pub role: String,
    /// When (server time).
    pub at: String,
    /// The ampd version that recorded it.
    pub ampd_version: String,
}

/// A row of the applied set.
#[derive(Debug, Clone)]
pub(super) struct AppliedRow {
    pub version: String,
    pub applied_at: i64,
    /// `None`: applied without an ampd record (by SeaORM's CLI), not recorded yet.
    pub checksum: Option<String>,
    /// The checksum's algorithm version (1 for rows an older ampd recorded).
    pub algorithm: i64,
    pub execution_ms: Option<i64>,
    pub ampd_version: Option<String>,
    /// Applied without ampd and recorded later.
    pub adopted: bool,
    pub changes: Vec<ChecksumChange>,
    /// Recorded as compatible with binaries that do not know it (`false` when nothing says so).
    pub compatible: bool,
    /// Recorded by `ampd migrate baseline`, not applied by ampd.
    pub baseline: Option<BaselineRecord>,
}

impl AppliedRow {
    /// When it was applied.
    pub fn applied_at(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.applied_at, 0)
    }
}

/// What the database says.
#[derive(Debug, Clone, Default)]
pub(super) struct DbState {
    pub who: Identity,
    pub has_seaql: bool,
    pub has_history: bool,
    /// `ampd_migrations` has this ampd's layout (checksum algorithm, adoption, accepted changes,
    /// compatibility, baseline).
    pub history_current: bool,
    pub applied: Vec<AppliedRow>,
}

impl DbState {
    /// The newest applied migration of `names` (in their order).
    pub fn version<'a>(&self, names: impl DoubleEndedIterator<Item = &'a str>) -> Option<String> {
        names
            .rev()
            .find(|name| self.applied.iter().any(|r| r.version == *name))
            .map(str::to_owned)
    }

    /// The row of migration `name`, if applied.
    pub fn row(&self, name: &str) -> Option<&AppliedRow> {
        self.applied.iter().find(|r| r.version == name)
    }
}

const WHO: &str = "current_user::text AS role, current_database()::text AS database, \
                   current_schema()::text AS schema";

/// Both tables in their current layout: one query. `with_compat`: `ampd_migrations` has the
/// columns `compatible` and `baseline` (an ampd from before them created it: read as `false` and
/// none).
pub(super) fn read_current_sql(with_compat: bool) -> String {
    let compat = if with_compat {
        "h.compatible, h.baseline::text AS baseline"
    } else {
        "false AS compatible, NULL::text AS baseline"
    };
    format!(
        "SELECT {WHO}, s.version::text AS version, s.applied_at, h.checksum, \
         h.checksum_algorithm::bigint AS algorithm, h.execution_ms, h.ampd_version, h.adopted, \
         h.checksum_history::text AS changes, {compat} \
         FROM (SELECT 1) AS one \
         LEFT JOIN (seaql_migrations AS s LEFT JOIN ampd_migrations AS h ON h.version = s.version) ON true \
         ORDER BY s.version"
    )
}

/// `ampd_migrations` as ampd 0.1 created it: every row an algorithm-1 checksum; a row without a
/// duration is one ampd recorded after SeaORM's CLI applied the migration.
fn read_legacy_sql() -> String {
    format!(
        "SELECT {WHO}, s.version::text AS version, s.applied_at, h.checksum, \
         CASE WHEN h.version IS NULL THEN NULL ELSE 1::bigint END AS algorithm, h.execution_ms, \
         h.ampd_version, (h.version IS NOT NULL AND h.execution_ms IS NULL) AS adopted, \
         NULL::text AS changes, false AS compatible, NULL::text AS baseline \
         FROM (SELECT 1) AS one \
         LEFT JOIN (seaql_migrations AS s LEFT JOIN ampd_migrations AS h ON h.version = s.version) ON true \
         ORDER BY s.version"
    )
}

/// Only SeaORM's table.
fn read_seaql_sql() -> String {
    format!(
        "SELECT {WHO}, s.version::text AS version, s.applied_at, NULL::text AS checksum, \
         NULL::bigint AS algorithm, NULL::bigint AS execution_ms, NULL::text AS ampd_version, \
         false AS adopted, NULL::text AS changes, false AS compatible, NULL::text AS baseline \
         FROM (SELECT 1) AS one LEFT JOIN seaql_migrations AS s ON true ORDER BY s.version"
    )
}

pub(super) fn probe_sql() -> String {
    format!(
        "SELECT {WHO}, to_regclass('seaql_migrations') IS NOT NULL AS has_seaql, \
         to_regclass('ampd_migrations') IS NOT NULL AS has_history, \
         EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('ampd_migrations') \
                 AND attname = 'checksum_history' AND NOT attisdropped) AS history_v2, \
         (SELECT count(*) = 3 FROM pg_attribute WHERE attrelid = to_regclass('ampd_migrations') \
          AND attname IN ('checksum_history', 'compatible', 'baseline') AND NOT attisdropped) \
         AS history_current"
    )
}

fn who(row: &QueryResult) -> Result<Identity, DbErr> {
    Ok(Identity {
        role: row.try_get("", "role")?,
        database: row.try_get("", "database")?,
        schema: row.try_get("", "schema")?,
    })
}

fn rows_to_state(rows: &[QueryResult], mut state: DbState) -> Result<DbState, DbErr> {
    for row in rows {
        state.who = who(row)?;
        let version: Option<String> = row.try_get("", "version")?;
        let Some(version) = version else { continue };
        let changes: Option<String> = row.try_get("", "changes")?;
        let changes = match changes {
            Some(json) => serde_json::from_str(&json).map_err(|e| {
                DbErr::Custom(format!(
                    "ampd_migrations.checksum_history of {version} is not what ampd wrote: {e}"
                ))
            })?,
            None => Vec::new(),
        };
        let baseline: Option<String> = row.try_get("", "baseline")?;
        let baseline = match baseline {
            Some(json) => Some(serde_json::from_str(&json).map_err(|e| {
                DbErr::Custom(format!(
                    "ampd_migrations.baseline of {version} is not what ampd wrote: {e}"
                ))
            })?),
            None => None,
        };
        let algorithm: Option<i64> = row.try_get("", "algorithm")?;
        state.applied.push(AppliedRow {
            applied_at: row.try_get("", "applied_at")?,
            checksum: row.try_get("", "checksum")?,
            algorithm: algorithm.unwrap_or(1),
            execution_ms: row.try_get("", "execution_ms")?,
            ampd_version: row.try_get("", "ampd_version")?,
            adopted: row.try_get::<Option<bool>>("", "adopted")?.unwrap_or(false),
            changes,
            compatible: row
                .try_get::<Option<bool>>("", "compatible")?
                .unwrap_or(false),
            baseline,
            version,
        });
    }
    Ok(state)
}

/// [`read`], with a refusal to read explained: the role and the GRANT that lets it read.
pub(super) async fn read_checked(db: &impl Reader) -> Result<DbState, MigrateError> {
    explained(db, read(db).await).await
}

/// [`read_checked`] for a transaction, where a failing statement aborts it: the tables are probed
/// first, and only the read that fits them is sent.
pub(super) async fn read_checked_probed(db: &impl Reader) -> Result<DbState, MigrateError> {
    explained(db, read_after_probe(db).await).await
}

async fn explained(
    db: &impl Reader,
    read: Result<DbState, DbErr>,
) -> Result<DbState, MigrateError> {
    match read {
        Ok(state) => Ok(state),
        Err(e) => match pg_error(&e) {
            Some(pg) if pg.code == "42501" => Err(read_denied(db, &pg.message).await),
            _ => Err(MigrateError::database(e)),
        },
    }
}

/// The error for a read of the bookkeeping that PostgreSQL refused with `message`.
async fn read_denied(db: &impl Reader, message: &str) -> MigrateError {
    let rows = db
        .rows(
            "SELECT current_user::text AS role, \
             (SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY c.relname DESC) \
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relname IN ('seaql_migrations', 'ampd_migrations') \
              AND n.nspname = ANY (current_schemas(false))) AS tables",
        )
        .await
        .unwrap_or_default();
    let row = rows.first();
    let role: String = row
        .and_then(|r| r.try_get("", "role").ok())
        .unwrap_or_else(|| "<role>".to_owned());
    let tables: Option<String> = row.and_then(|r| r.try_get("", "tables").ok()).flatten();
    let role = quote_ident(&role);
    let grant = match (
        message.strip_prefix("permission denied for schema "),
        tables,
    ) {
        (Some(schema), _) => format!("GRANT USAGE ON SCHEMA {} TO {role};", quote_ident(schema)),
        (None, Some(tables)) => format!("GRANT SELECT ON TABLE {tables} TO {role};"),
        (None, None) => {
            format!("GRANT SELECT ON TABLE \"seaql_migrations\", \"ampd_migrations\" TO {role};")
        }
    };
    MigrateError::ReadDenied {
        role,
        message: format!("{message} (SQLSTATE 42501)"),
        grant,
    }
}

/// Reads the applied set without creating anything. Statements run outside any transaction (one
/// that fails aborts nothing).
pub(super) async fn read(db: &impl Reader) -> Result<DbState, DbErr> {
    let current = DbState {
        has_seaql: true,
        has_history: true,
        history_current: true,
        ..DbState::default()
    };
    match db.rows(&read_current_sql(true)).await {
        Ok(rows) => return rows_to_state(&rows, current),
        // undefined_table: a fresh database, or one migrated only by SeaORM's CLI;
        // undefined_column: `ampd_migrations` as an older ampd created it.
        Err(e) => match pg_error(&e) {
            Some(pg) if matches!(pg.code.as_str(), "42P01" | "42703") => db.remark(&format!(
                "fails here ({}): the bookkeeping tables are missing or from an older ampd; so:",
                pg.message
            )),
            _ => return Err(e),
        },
    }
    read_after_probe(db).await
}

/// Reads the applied set after a probe of which bookkeeping tables exist: two statements, none
/// of which fails on a fresh database.
async fn read_after_probe(db: &impl Reader) -> Result<DbState, DbErr> {
    let rows = db.rows(&probe_sql()).await?;
    let probe = rows.first().ok_or_else(|| {
        DbErr::Custom("the probe of the bookkeeping tables returned no row".into())
    })?;
    let state = DbState {
        who: who(probe)?,
        has_seaql: probe.try_get("", "has_seaql")?,
        has_history: probe.try_get("", "has_history")?,
        history_current: probe.try_get("", "history_current")?,
        applied: Vec::new(),
    };
    let history_v2: bool = probe.try_get("", "history_v2")?;
    let sql = match (state.has_seaql, state.has_history, history_v2) {
        (false, _, _) => return Ok(state),
        (true, true, true) => read_current_sql(state.history_current),
        (true, true, false) => read_legacy_sql(),
        (true, false, _) => read_seaql_sql(),
    };
    let rows = db.rows(&sql).await?;
    rows_to_state(&rows, state)
}
