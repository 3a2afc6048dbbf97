//! The migration session: what a run's code sends its statements to. A live run has a [`Live`]
//! session, one connection held for the whole run (see [`super::live`]); a dry run has a
//! [`Recording`] (see [`super::recording`]), which writes every statement into a script and sends
//! only those that read. The run's code is the same either way, so a dry run's script is what a
//! real run would send; this type only hands each call to one or the other.

use std::time::{Duration, Instant};

use migration::{MigrationTrait, SchemaManager};
use sea_orm::sqlx::postgres::PgRow;
use sea_orm::sqlx::{self, Column as _, Connection as _, PgConnection, TypeInfo as _};
use sea_orm::{DbErr, ProxyRow, QueryResult, RuntimeErr, Statement};
use sea_query_sqlx::SqlxValues;

use super::error::{MigrateError, describe};
use super::live::Live;
use super::recording::Recording;
use super::state::Reader;
use crate::config::MetadataDbConfig;
use crate::db::{self, BACKEND_PID_SQL};

/// One line of a dry run's script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A statement as sent (parameters shown in place), with an optional remark.
    Sql {
        /// The statement, without its final `;`.
        sql: String,
        /// Said about it in a comment on the line before.
        note: Option<String>,
    },
    /// A comment.
    Note(String),
}

/// What a run tells its operator as it goes. A live session logs it; a recording, which applies
/// nothing, writes into its script what concerns the plan and drops what only a real run can say.
pub(super) enum Event<'a> {
    /// Migrations are applied out of order (allowed): why, in words.
    OutOfOrder(&'a str),
    /// A migration was applied, in this long.
    Applied { name: &'a str, duration: Duration },
    /// A migration applied without ampd was recorded as applied.
    Adopted(&'a str),
}

/// The migration session (see the module documentation).
pub(super) enum Session {
    Live(Live),
    Recording(Recording),
}

pub(super) fn exec_err(e: sqlx::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(std::sync::Arc::new(e)))
}

pub(super) fn query_err(e: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(std::sync::Arc::new(e)))
}

/// How much longer than `ddl_lock_timeout_ms` one of the run's own statements may go without an
/// answer before the run concludes that the server or the network is frozen.
pub const QUICK_MARGIN: Duration = Duration::from_secs(10);

/// How an error for a statement that got no answer in time begins.
pub const NO_ANSWER: &str = "no answer from the server within ";

/// The error of a statement that got no answer within `limit`.
pub(super) fn stalled(limit: Duration) -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(format!(
        "{NO_ANSWER}{:.1} s (a frozen network or a stalled server); the connection was closed",
        limit.as_secs_f64()
    )))
}

/// The deadline, in seconds, that a statement failing with `err` missed, if that is why it failed.
pub fn no_answer(err: &DbErr) -> Option<f64> {
    let DbErr::Conn(RuntimeErr::Internal(text)) = err else {
        return None;
    };
    text.strip_prefix(NO_ANSWER)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

impl Session {
    /// Connects the session of a real run to `metadata_db.direct_url` (default `url`).
    pub async fn live(cfg: &MetadataDbConfig) -> Result<Session, MigrateError> {
        Ok(Session::Live(Live::connect(cfg, true).await?))
    }

    /// A recording session: connected to read what a run would read when `cfg` is given, else
    /// reading nothing.
    pub async fn recording(cfg: Option<&MetadataDbConfig>) -> Result<Session, MigrateError> {
        Ok(Session::Recording(Recording::new(cfg).await?))
    }

    /// Sets the client-side deadline of a migration's statements (for a step that may wait long).
    pub fn set_migration_deadline(&self, limit: Duration) {
        if let Session::Live(live) = self {
            live.set_migration_deadline(limit);
        }
    }

    /// A comment in a recording's script (nothing in a live run).
    pub fn note(&self, text: impl Into<String>) {
        if let Session::Recording(recording) = self {
            recording.note(text.into());
        }
    }

    /// Records that `sql` is sent on another connection than the session's (or, in a recording,
    /// that a real run would send it where the recording cannot).
    pub fn record_elsewhere(&self, sql: &str, note: impl Into<String>) {
        if let Session::Recording(recording) = self {
            recording.statement(sql, Some(note.into()));
        }
    }

    /// Tells the operator `event` (see [`Event`]).
    pub fn tell(&self, event: Event<'_>) {
        match (self, event) {
            (Session::Live(_), Event::OutOfOrder(text)) => tracing::warn!("{text}"),
            (Session::Live(_), Event::Applied { name, duration }) => tracing::info!(
                migration = %name,
                duration_ms = duration.as_millis() as u64,
                "applied migration"
            ),
            (Session::Live(_), Event::Adopted(name)) => {
                tracing::info!(migration = %name, "recorded a migration applied without ampd")
            }
            (Session::Recording(recording), Event::OutOfOrder(text)) => {
                recording.note(text.to_owned())
            }
            (Session::Recording(_), Event::Applied { .. } | Event::Adopted(_)) => {}
        }
    }

    /// A recording's script so far (a live session keeps none).
    pub fn script(&self) -> Vec<Line> {
        match self {
            Session::Live(_) => Vec::new(),
            Session::Recording(recording) => recording.script(),
        }
    }

    /// Runs `sql`, which changes nothing, and returns its rows (a recording runs it when connected).
    pub async fn read(&self, sql: &str) -> Result<Vec<QueryResult>, DbErr> {
        match self {
            Session::Live(live) => live.read(sql).await,
            Session::Recording(recording) => recording.read(sql).await,
        }
    }

    /// Runs `sql`, which changes something.
    pub async fn write(&self, sql: &str) -> Result<(), DbErr> {
        self.write_noted(sql, None).await
    }

    /// [`Session::write`] with a client-side deadline of `limit` (at most the run's own).
    pub async fn write_within(&self, sql: &str, limit: Duration) -> Result<(), DbErr> {
        match self {
            Session::Live(live) => live.write_within(sql, limit).await,
            Session::Recording(recording) => {
                recording.statement(sql, None);
                Ok(())
            }
        }
    }

    /// [`Session::write`] with a remark for a recording's script.
    pub async fn write_noted(&self, sql: &str, note: Option<String>) -> Result<(), DbErr> {
        match self {
            Session::Live(live) => live.write(sql).await,
            Session::Recording(recording) => {
                recording.statement(sql, note);
                Ok(())
            }
        }
    }

    /// Asks `sql`, a one-boolean question that may change something (taking or releasing the
    /// lock); `note` is said about it in a recording's script, which answers yes.
    pub async fn ask(&self, sql: &str, note: Option<String>) -> Result<bool, DbErr> {
        match self {
            Session::Live(live) => live.ask_within(sql, live.quick()).await,
            Session::Recording(recording) => {
                recording.statement(sql, note);
                Ok(true)
            }
        }
    }

    /// [`Session::ask`] with a client-side deadline of `limit` (at most the run's own).
    pub async fn ask_within(
        &self,
        sql: &str,
        note: Option<String>,
        limit: Duration,
    ) -> Result<bool, DbErr> {
        match self {
            Session::Live(live) => live.ask_within(sql, limit).await,
            Session::Recording(recording) => {
                recording.statement(sql, note);
                Ok(true)
            }
        }
    }

    /// Opens a transaction (`BEGIN`) with a client-side deadline of `limit`.
    pub async fn begin_within(&self, limit: Duration) -> Result<(), DbErr> {
        match self {
            Session::Live(live) => live.begin_within(limit).await,
            Session::Recording(recording) => {
                recording.begin();
                Ok(())
            }
        }
    }

    /// Opens a transaction (`BEGIN`).
    pub async fn begin(&self) -> Result<(), DbErr> {
        match self {
            Session::Live(live) => live.begin_within(live.quick()).await,
            Session::Recording(recording) => {
                recording.begin();
                Ok(())
            }
        }
    }

    /// Commits the transaction opened by [`Session::begin`].
    pub async fn commit(&self) -> Result<(), DbErr> {
        match self {
            Session::Live(live) => live.commit().await,
            Session::Recording(recording) => {
                recording.commit();
                Ok(())
            }
        }
    }

    /// Rolls back the open transaction with a client-side deadline of `limit`, and says whether
    /// that failed (a lock attempt that lost needs to know the session still works). A recording
    /// has nothing to undo.
    pub async fn rollback_within(&self, limit: Duration) -> Result<(), DbErr> {
        match self {
            Session::Live(live) => live.rollback_within(limit).await,
            Session::Recording(_) => Ok(()),
        }
    }

    /// Rolls back whatever transaction is open, after a failure. Errors are ignored: a session
    /// that cannot roll back is lost, and the server rolls back when it goes.
    pub async fn rollback(&self) {
        if let Session::Live(live) = self {
            let _ = live.rollback_within(live.quick()).await;
        }
    }

    /// Runs `migration`'s `up` on the session and returns the time it took. A recording cannot
    /// time it (`None`), and a migration that fails there (because it needs data a recording
    /// cannot give it) is not a failure: the script says where it stopped.
    pub async fn up(&self, migration: &dyn MigrationTrait) -> Result<Option<Duration>, DbErr> {
        let conn = self.seaorm().await?;
        let started = Instant::now();
        let result = match migration.up(&SchemaManager::new(&conn)).await {
            // A BEGIN/COMMIT the migration asked for that failed is its failure.
            Ok(()) => self.settled().await,
            Err(e) => Err(e),
        };
        match (self, result) {
            (Session::Live(_), Ok(())) => Ok(Some(started.elapsed())),
            (Session::Live(_), Err(e)) => Err(e),
            (Session::Recording(_), Ok(())) => Ok(None),
            (Session::Recording(recording), Err(e)) => {
                recording.note(format!(
                    "in this dry run {} stopped here ({}): the rest of what it sends depends on \
                     the database's data and is known only when it runs",
                    migration.name(),
                    describe(&e)
                ));
                Ok(None)
            }
        }
    }

    /// The server process serving the session (asked, so that a dry run shows it too).
    pub async fn backend_pid(&self) -> Result<Option<i32>, DbErr> {
        let rows = self.read(BACKEND_PID_SQL).await?;
        rows.first()
            .map(|row| row.try_get_by_index::<i32>(0))
            .transpose()
    }

    /// Returns the failure of a `BEGIN`/`COMMIT` a migration asked for, if one failed.
    pub async fn settled(&self) -> Result<(), DbErr> {
        match self {
            Session::Live(live) => live.settled().await,
            Session::Recording(_) => Ok(()),
        }
    }

    /// A SeaORM connection whose every statement goes to this session.
    pub async fn seaorm(&self) -> Result<sea_orm::DatabaseConnection, DbErr> {
        match self {
            Session::Live(live) => live.seaorm().await,
            Session::Recording(recording) => recording.seaorm().await,
        }
    }

    /// A second connection to the session's URL, for [`Session::check_own`]; none for a recording
    /// that contacts no database.
    async fn second_connection(
        &self,
        cfg: &MetadataDbConfig,
    ) -> Result<Option<PgConnection>, MigrateError> {
        match self {
            Session::Recording(recording) if !recording.connected() => Ok(None),
            _ => Ok(Some(db::open(cfg, db::session_url(cfg)?).await?)),
        }
    }
    /// Checks that the session is a session of its own, as a step that must run alone (`migration`)
    /// needs: in [`PROBE_ROUNDS`] rounds, the session and a second connection to the same URL ask
    /// which server process serves them. On PostgreSQL (or a pooler in session mode) the session
    /// always meets the same process and the second connection always another one. A pooler in
    /// transaction mode hands the second connection the process the session just released (the
    /// same one), or with `server_round_robin` moves the session from process to process: either
    /// shows within the rounds, before anything has changed.
    pub async fn check_own(
        &self,
        cfg: &MetadataDbConfig,
        migration: &str,
    ) -> Result<(), MigrateError> {
        let note = format!(
            "{migration} must run alone, holding the lock and its settings on this session: the \
             session and a second connection to the same URL must reach two server processes, \
             each always the same"
        );
        let url = db::session_url(cfg)?;
        let mut second = self.second_connection(cfg).await?;
        let mut own = Vec::new();
        let mut other = Vec::new();
        for round in 0..PROBE_ROUNDS {
            if round == 0 {
                self.note(note.clone());
            }
            let pid = self.backend_pid().await.map_err(MigrateError::database)?;
            own.extend(pid);
            self.record_elsewhere(BACKEND_PID_SQL, "on the second connection");
            let Some(conn) = second.as_mut() else {
                continue;
            };
            match tokio::time::timeout(db::SECOND_CONNECTION_WAIT, db::backend_pid(conn)).await {
                // No server process for a second connection: a full pool in session mode.
                Err(_) => break,
                Ok(Ok(pid)) => other.push(pid),
                Ok(Err(e)) => {
                    return Err(MigrateError::Connect(db::ConnectError::Refused {
                        key: db::session_key(cfg),
                        url: url.redacted(),
                        cause: e.to_string(),
                    }));
                }
            }
        }
        if let Some(conn) = second {
            let _ = conn.close().await;
        }
        let moved = own.windows(2).any(|w| w[0] != w[1]) || other.windows(2).any(|w| w[0] != w[1]);
        if let Some(&pid) = own
            .iter()
            .find(|p| other.contains(p))
            .or(moved.then(|| own.first()).flatten())
        {
            return Err(MigrateError::Connect(db::ConnectError::NotASession {
                key: db::session_key(cfg),
                url: url.redacted(),
                pid,
                work: "a migration that must run alone (CREATE INDEX CONCURRENTLY), which holds \
                       the migration lock and its settings on the session",
            }));
        }
        Ok(())
    }

    /// Closes the connection (the server releases a lock still held).
    pub async fn close(&self) {
        match self {
            Session::Live(live) => live.close().await,
            Session::Recording(recording) => recording.close().await,
        }
    }
}

impl Reader for Session {
    async fn rows(&self, sql: &str) -> Result<Vec<QueryResult>, DbErr> {
        self.read(sql).await
    }

    fn remark(&self, text: &str) {
        self.note(text);
    }
}

/// The statement that ends transaction level `depth` (1 = the transaction itself).
pub(super) fn end_sql(depth: u32, commit: bool) -> String {
    match (depth, commit) {
        (1, true) => "COMMIT".to_owned(),
        (1, false) => "ROLLBACK".to_owned(),
        (d, true) => format!("RELEASE SAVEPOINT ampd_{}", d - 1),
        (d, false) => format!(
            "ROLLBACK TO SAVEPOINT ampd_{0}; RELEASE SAVEPOINT ampd_{0}",
            d - 1
        ),
    }
}

/// A statement as a person reads it: parameters in place (when they can be put there safely).
pub(super) fn display(statement: &Statement) -> String {
    match &statement.values {
        Some(values) if !values.0.is_empty() => {
            if placeholders_within(&statement.sql, values.0.len()) {
                statement.to_string()
            } else {
                format!("{} /* parameters: {:?} */", statement.sql, values.0)
            }
        }
        _ => statement.sql.clone(),
    }
}

/// Whether every `$n` in `sql` is at most `count` (so putting the values in place cannot fail).
fn placeholders_within(sql: &str, count: usize) -> bool {
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let digits: String = sql[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if !digits.is_empty()
                && digits
                    .parse::<usize>()
                    .map_or(true, |n| n == 0 || n > count)
            {
                return false;
            }
            i += 1 + digits.len();
        } else {
            i += 1;
        }
    }
    true
}

/// How many rounds [`Session::check_own`] asks.
const PROBE_ROUNDS: usize = 3;

/// Column types whose values SeaORM's proxy rows can hold (others would make it panic).
const ROW_TYPES: [&str; 19] = [
    "BOOL",
    "\"CHAR\"",
    "INT2",
    "INT4",
    "INT8",
    "FLOAT4",
    "FLOAT8",
    "TEXT",
    "VARCHAR",
    "CHAR",
    "NAME",
    "BYTEA",
    "OID",
    "JSON",
    "JSONB",
    "TIMESTAMP",
    "TIMESTAMPTZ",
    "DATE",
    "TIME",
];

/// Runs `statement` on `conn` and returns its rows: with its values bound (the extended protocol),
/// or, with none, as sent (the simple protocol, which takes several statements at once).
pub(super) async fn fetch_all(
    conn: &mut PgConnection,
    statement: Statement,
) -> Result<Vec<PgRow>, sqlx::Error> {
    match statement.values {
        Some(values) => {
            sqlx::query_with(sqlx::AssertSqlSafe(statement.sql), SqlxValues(values))
                .fetch_all(conn)
                .await
        }
        None => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement.sql))
                .fetch_all(conn)
                .await
        }
    }
}

/// Runs `statement` on `conn`, as [`fetch_all`] does, for what it changes.
pub(super) async fn execute(
    conn: &mut PgConnection,
    statement: Statement,
) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    match statement.values {
        Some(values) => {
            sqlx::query_with(sqlx::AssertSqlSafe(statement.sql), SqlxValues(values))
                .execute(conn)
                .await
        }
        None => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement.sql))
                .execute(conn)
                .await
        }
    }
}

pub(super) fn proxy_row(row: PgRow) -> Result<ProxyRow, DbErr> {
    use sea_orm::sqlx::Row as _;
    if let Some(column) = row
        .columns()
        .iter()
        .find(|c| !ROW_TYPES.contains(&c.type_info().name()))
    {
        return Err(DbErr::Custom(format!(
            "a migration read column {:?} of type {}, which ampd's migration session cannot hand to it; \
             cast it in the query (e.g. ::text)",
            column.name(),
            column.type_info().name()
        )));
    }
    Ok(sea_orm::from_query_result_to_proxy_row(&QueryResult::from(
        row,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::DatabaseBackend;

    #[test]
    fn placeholders_are_checked_before_values_are_put_in_place() {
        assert!(placeholders_within("SELECT $1, $2", 2));
        assert!(!placeholders_within("SELECT $1, $3", 2));
        assert!(!placeholders_within("SELECT $0", 2));
        assert!(placeholders_within("SELECT $$ text $$", 0));
        let st = Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT $1, $2",
            [1_i32.into()],
        );
        assert!(display(&st).contains("parameters"), "{}", display(&st));
    }

    #[test]
    fn nested_transaction_levels_end_with_savepoints() {
        assert_eq!(end_sql(1, true), "COMMIT");
        assert_eq!(end_sql(2, true), "RELEASE SAVEPOINT ampd_1");
        assert_eq!(
            end_sql(3, false),
            "ROLLBACK TO SAVEPOINT ampd_2; RELEASE SAVEPOINT ampd_2"
        );
    }
}
