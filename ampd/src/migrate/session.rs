//! The migration session: one `PgConnection`, opened on `metadata_db.direct_url` (default `url`) and
//! held for the whole run, on which the lock, every transaction, every migration statement and the
//! bookkeeping run. SeaORM's migrations reach it through a proxy connection, so nothing can take
//! another connection behind the run's back (a pool of one would, after a reconnect, without the
//! lock).
//!
//! Every statement has a client-side deadline ([`Deadlines`]): the run's own statements (reads,
//! the lock, the settings, the bookkeeping) `ddl_lock_timeout_ms` plus [`QUICK_MARGIN`], a
//! migration's statements `migration_statement_timeout_secs`. A statement that gets no answer in
//! time (a frozen network or server) closes the connection, so the server ends what it was doing
//! when it notices, and fails with [`NO_ANSWER`]. On TCP the client socket has keepalive on
//! ([`crate::db::keepalive`]), so a peer that vanished is noticed even between statements.
//!
//! A dry run uses the same session type with a script: statements that change nothing (reading
//! the applied set, looking for leftovers) run for real when there is a connection, everything is
//! written to the script, and nothing that changes anything (the lock, DDL, bookkeeping rows) is
//! sent. The run's code is the same either way, so the script is what a real run would send.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use sea_orm::sqlx::postgres::PgRow;
use sea_orm::sqlx::{self, Column as _, Connection as _, PgConnection, TypeInfo as _};
use sea_orm::{
    DatabaseBackend, DatabaseConnection, DbErr, ProxyDatabaseTrait, ProxyExecResult, ProxyRow,
    QueryResult, RuntimeErr, Statement,
};
use sea_query_sqlx::SqlxValues;

use super::error::MigrateError;
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

/// What the statements of a session's connection go to.
struct Wire {
    /// The connection: absent only in a dry run that reads nothing from a database.
    conn: Option<PgConnection>,
    /// Open transaction levels: 0 outside a transaction, 1 in one, more in savepoints.
    depth: u32,
    /// A failure of a `BEGIN`/`COMMIT` a migration asked for through SeaORM, which SeaORM's proxy
    /// interface cannot return: reported by the session's next statement.
    deferred: Option<DbErr>,
}

struct Inner {
    wire: tokio::sync::Mutex<Wire>,
    /// The client-side deadline of the run's own statements.
    quick: Duration,
    /// The client-side deadline of a migration's statements, in milliseconds (changed for a step).
    migration_ms: AtomicU64,
    /// The script of a dry run; `None` for a real run.
    script: Option<StdMutex<Vec<Line>>>,
    /// A SeaORM transaction was dropped unfinished: roll it back before the next statement.
    rollback_pending: AtomicBool,
}

/// The migration session (see the module documentation).
pub(super) struct Session {
    inner: Arc<Inner>,
}

pub(super) fn exec_err(e: sqlx::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))
}

fn query_err(e: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)))
}

/// How much longer than `ddl_lock_timeout_ms` one of the run's own statements may go without an
/// answer before the run concludes that the server or the network is frozen.
pub const QUICK_MARGIN: Duration = Duration::from_secs(10);

/// How an error for a statement that got no answer in time begins.
pub const NO_ANSWER: &str = "no answer from the server within ";

/// The error of a statement that got no answer within `limit`.
fn stalled(limit: Duration) -> DbErr {
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

/// Waits at most `limit` for `$work` (an async block using `$conn`, the connection of `$wire`); a
/// missed deadline drops the connection (its state is unknown) and is [`stalled`]. (A macro, not a
/// function taking an async closure: such a closure's future is not `Send` for every lifetime,
/// which the services' spawned tasks need.)
macro_rules! within {
    ($wire:expr, $limit:expr, |$conn:ident| $work:expr) => {{
        let wire: &mut Wire = $wire;
        let limit: Duration = $limit;
        let outcome = match wire.conn.as_mut() {
            None => None,
            Some($conn) => Some(tokio::time::timeout(limit, $work).await),
        };
        match outcome {
            None => Err(lost()),
            Some(Ok(result)) => result,
            Some(Err(_)) => {
                wire.conn = None;
                wire.depth = 0;
                Err(stalled(limit))
            }
        }
    }};
}

fn lost() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(
        "the migration session's connection is closed".into(),
    ))
}

impl Session {
    fn new(conn: Option<PgConnection>, dry: bool, cfg: &MetadataDbConfig) -> Session {
        Session {
            inner: Arc::new(Inner {
                wire: tokio::sync::Mutex::new(Wire {
                    conn,
                    depth: 0,
                    deferred: None,
                }),
                quick: Duration::from_millis(cfg.ddl_lock_timeout_ms) + QUICK_MARGIN,
                migration_ms: AtomicU64::new(cfg.migration_statement_timeout_secs.max(1) * 1000),
                script: dry.then(|| StdMutex::new(Vec::new())),
                rollback_pending: AtomicBool::new(false),
            }),
        }
    }

    /// Connects the session of a real run to `metadata_db.direct_url` (default `url`).
    pub async fn live(cfg: &MetadataDbConfig) -> Result<Session, MigrateError> {
        let conn = db::open_with_keepalive(cfg, db::session_url(cfg)?).await?;
        Ok(Session::new(Some(conn), false, cfg))
    }

    /// Sets the client-side deadline of a migration's statements (for a step that may wait long).
    pub fn set_migration_deadline(&self, limit: Duration) {
        self.inner
            .migration_ms
            .store(limit.as_millis() as u64, Ordering::SeqCst);
    }

    /// A dry run's session: connected to read what a run would read when `cfg` is given, else
    /// reading nothing.
    pub async fn dry(cfg: Option<&MetadataDbConfig>) -> Result<Session, MigrateError> {
        let conn = match cfg {
            Some(cfg) => Some(db::open(cfg, db::session_url(cfg)?).await?),
            None => None,
        };
        let defaults = MetadataDbConfig::default();
        Ok(Session::new(conn, true, cfg.unwrap_or(&defaults)))
    }

    /// Whether this is a dry run.
    pub fn is_dry(&self) -> bool {
        self.inner.script.is_some()
    }

    /// Adds `line` to a dry run's script.
    fn record(&self, line: Line) {
        if let Some(script) = &self.inner.script {
            match script.lock() {
                Ok(mut s) => s.push(line),
                Err(poisoned) => poisoned.into_inner().push(line),
            }
        }
    }

    /// A comment in a dry run's script (nothing in a real run).
    pub fn note(&self, text: impl Into<String>) {
        self.record(Line::Note(text.into()));
    }

    /// Records that `sql` is sent on another connection than the session's.
    pub fn record_elsewhere(&self, sql: &str, note: impl Into<String>) {
        self.record(Line::Sql {
            sql: sql.to_owned(),
            note: Some(note.into()),
        });
    }

    /// The script so far.
    pub fn script(&self) -> Vec<Line> {
        match &self.inner.script {
            Some(script) => match script.lock() {
                Ok(s) => s.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            },
            None => Vec::new(),
        }
    }

    /// Runs `sql`, which changes nothing, and returns its rows: in a dry run too, when connected.
    pub async fn read(&self, sql: &str) -> Result<Vec<QueryResult>, DbErr> {
        self.record(Line::Sql {
            sql: sql.to_owned(),
            note: None,
        });
        let mut wire = self.inner.wire.lock().await;
        self.inner.settle(&mut wire).await?;
        if wire.conn.is_none() && self.is_dry() {
            return Ok(Vec::new());
        }
        let rows = within!(&mut wire, self.inner.quick, |conn| async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_all(conn)
                .await
                .map_err(query_err)
        })?;
        Ok(rows.into_iter().map(QueryResult::from).collect())
    }

    /// Runs `sql`, which changes something: sent in a real run, only written down in a dry run.
    pub async fn write(&self, sql: &str) -> Result<(), DbErr> {
        self.write_noted(sql, None).await
    }

    /// [`Session::write`] with a client-side deadline of `limit` (at most the run's own).
    pub async fn write_within(&self, sql: &str, limit: Duration) -> Result<(), DbErr> {
        self.record(Line::Sql {
            sql: sql.to_owned(),
            note: None,
        });
        if self.is_dry() {
            return Ok(());
        }
        let mut wire = self.inner.wire.lock().await;
        self.inner.settle(&mut wire).await?;
        within!(&mut wire, limit.min(self.inner.quick), |conn| async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(exec_err)
        })
    }

    /// Opens a transaction (`BEGIN`) with a client-side deadline of `limit`.
    pub async fn begin_within(&self, limit: Duration) -> Result<(), DbErr> {
        self.write_within("BEGIN", limit).await?;
        self.inner.wire.lock().await.depth = 1;
        Ok(())
    }

    /// Rolls back the open transaction with a client-side deadline of `limit`, and says whether
    /// that failed (a lock attempt that lost needs to know the session still works).
    pub async fn rollback_within(&self, limit: Duration) -> Result<(), DbErr> {
        if self.is_dry() {
            return Ok(());
        }
        let mut wire = self.inner.wire.lock().await;
        let open = wire.depth > 0;
        wire.depth = 0;
        wire.deferred = None;
        self.inner.rollback_pending.store(false, Ordering::SeqCst);
        if !open {
            return Ok(());
        }
        within!(&mut wire, limit.min(self.inner.quick), |conn| async move {
            sqlx::raw_sql("ROLLBACK")
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(exec_err)
        })
    }

    /// [`Session::write`] with a remark for the script.
    pub async fn write_noted(&self, sql: &str, note: Option<String>) -> Result<(), DbErr> {
        self.record(Line::Sql {
            sql: sql.to_owned(),
            note,
        });
        if self.is_dry() {
            return Ok(());
        }
        let mut wire = self.inner.wire.lock().await;
        self.inner.settle(&mut wire).await?;
        within!(&mut wire, self.inner.quick, |conn| async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(exec_err)
        })
    }

    /// Asks `sql`, a one-boolean question that changes something (taking or releasing the lock): in
    /// a dry run it is only written down, with `note`, and `dry_answer` is the answer.
    pub async fn ask(
        &self,
        sql: &str,
        note: Option<String>,
        dry_answer: bool,
    ) -> Result<bool, DbErr> {
        self.ask_within(sql, note, dry_answer, self.inner.quick)
            .await
    }

    /// [`Session::ask`] with a client-side deadline of `limit` (at most the run's own).
    pub async fn ask_within(
        &self,
        sql: &str,
        note: Option<String>,
        dry_answer: bool,
        limit: Duration,
    ) -> Result<bool, DbErr> {
        self.record(Line::Sql {
            sql: sql.to_owned(),
            note,
        });
        if self.is_dry() {
            return Ok(dry_answer);
        }
        let mut wire = self.inner.wire.lock().await;
        self.inner.settle(&mut wire).await?;
        use sqlx::Row as _;
        within!(&mut wire, limit.min(self.inner.quick), |conn| async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_one(conn)
                .await
                .and_then(|row| row.try_get::<bool, _>(0))
                .map_err(query_err)
        })
    }

    /// The server process serving the session (asked, so that a dry run shows it too).
    pub async fn backend_pid(&self) -> Result<Option<i32>, DbErr> {
        let rows = self.read(BACKEND_PID_SQL).await?;
        rows.first()
            .map(|row| row.try_get_by_index::<i32>(0))
            .transpose()
    }

    /// Opens a transaction (`BEGIN`).
    pub async fn begin(&self) -> Result<(), DbErr> {
        self.write("BEGIN").await?;
        self.inner.wire.lock().await.depth = 1;
        Ok(())
    }

    /// Commits the transaction opened by [`Session::begin`].
    pub async fn commit(&self) -> Result<(), DbErr> {
        let result = self.write("COMMIT").await;
        self.inner.wire.lock().await.depth = 0;
        result
    }

    /// Rolls back whatever transaction is open, after a failure (real runs only: a dry run has no
    /// failures to undo). Errors are ignored: a session that cannot roll back is lost, and the
    /// server rolls back when it goes.
    pub async fn rollback(&self) {
        if self.is_dry() {
            return;
        }
        let mut wire = self.inner.wire.lock().await;
        let open = wire.depth > 0;
        wire.depth = 0;
        wire.deferred = None;
        self.inner.rollback_pending.store(false, Ordering::SeqCst);
        if open {
            let quick = self.inner.quick;
            let _ = within!(&mut wire, quick, |conn| async move {
                sqlx::raw_sql("ROLLBACK")
                    .execute(conn)
                    .await
                    .map_err(exec_err)
            });
        }
    }

    /// Returns the failure of a `BEGIN`/`COMMIT` a migration asked for, if one failed.
    pub async fn settled(&self) -> Result<(), DbErr> {
        let mut wire = self.inner.wire.lock().await;
        self.inner.settle(&mut wire).await
    }

    /// A SeaORM connection whose every statement goes to this session.
    pub async fn seaorm(&self) -> Result<DatabaseConnection, DbErr> {
        let proxy: Arc<Box<dyn ProxyDatabaseTrait>> = Arc::new(Box::new(Proxy(self.inner.clone())));
        sea_orm::Database::connect_proxy(DatabaseBackend::Postgres, proxy).await
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
        let mut second = if self.is_dry() && self.inner.wire.lock().await.conn.is_none() {
            None
        } else {
            Some(db::open(cfg, url).await?)
        };
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
        if let Some(conn) = self.inner.wire.lock().await.conn.take() {
            let _ = conn.close().await;
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

impl Inner {
    /// The client-side deadline of a migration's statements now.
    fn migration_deadline(&self) -> Duration {
        Duration::from_millis(self.migration_ms.load(Ordering::SeqCst))
    }

    /// Before a statement: a SeaORM transaction dropped unfinished is rolled back, and a failure
    /// that could not be returned earlier is returned now.
    async fn settle(&self, wire: &mut Wire) -> Result<(), DbErr> {
        if self.rollback_pending.swap(false, Ordering::SeqCst) && wire.depth > 0 {
            let sql = end_sql(wire.depth, false);
            wire.depth -= 1;
            if let Some(script) = &self.script {
                push(
                    script,
                    Line::Sql {
                        sql: sql.clone(),
                        note: None,
                    },
                );
            } else if wire.conn.is_some() {
                within!(wire, self.quick, |conn| async move {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(conn)
                        .await
                        .map_err(exec_err)
                })?;
            }
        }
        match wire.deferred.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// `BEGIN` (or a savepoint in a transaction) for a transaction SeaORM opens.
    async fn open_level(&self) {
        let mut wire = self.wire.lock().await;
        if let Err(e) = self.settle(&mut wire).await {
            wire.deferred = Some(e);
            return;
        }
        let sql = if wire.depth == 0 {
            "BEGIN".to_owned()
        } else {
            format!("SAVEPOINT ampd_{}", wire.depth)
        };
        wire.depth += 1;
        self.send_level(&mut wire, sql).await;
    }

    /// `COMMIT`/`ROLLBACK` (or their savepoint forms) for a transaction SeaORM ends.
    async fn close_level(&self, commit: bool) {
        let mut wire = self.wire.lock().await;
        if wire.depth == 0 {
            return;
        }
        let sql = end_sql(wire.depth, commit);
        wire.depth -= 1;
        self.send_level(&mut wire, sql).await;
    }

    async fn send_level(&self, wire: &mut Wire, sql: String) {
        if let Some(script) = &self.script {
            push(script, Line::Sql { sql, note: None });
            return;
        }
        let result = within!(wire, self.quick, |conn| async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(exec_err)
        });
        if let Err(e) = result {
            wire.deferred.get_or_insert(e);
        }
    }
}

/// The statement that ends transaction level `depth` (1 = the transaction itself).
fn end_sql(depth: u32, commit: bool) -> String {
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

fn push(script: &StdMutex<Vec<Line>>, line: Line) {
    match script.lock() {
        Ok(mut s) => s.push(line),
        Err(poisoned) => poisoned.into_inner().push(line),
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

/// SeaORM's view of the session.
#[derive(Debug)]
struct Proxy(Arc<Inner>);

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationSession")
            .field("dry", &self.script.is_some())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// The session's wire for a migration's `statement`, after what must come first; `None` in a
    /// dry run, which writes the statement into the script (with `note`) instead.
    async fn wire_for(
        &self,
        statement: &Statement,
        note: Option<&str>,
    ) -> Result<Option<tokio::sync::MutexGuard<'_, Wire>>, DbErr> {
        let inner = &self.0;
        let mut wire = inner.wire.lock().await;
        inner.settle(&mut wire).await?;
        match &inner.script {
            Some(script) => {
                push(
                    script,
                    Line::Sql {
                        sql: display(statement),
                        note: note.map(str::to_owned),
                    },
                );
                Ok(None)
            }
            None => Ok(Some(wire)),
        }
    }
}

/// What a dry run says about a statement whose rows a migration reads.
const ROWS_NOTE: &str = "returns rows in a real run; a dry run has none to give the migration, so \
                         what it sends next may depend on the data";

// Statements with parameters are prepared and bound, as SeaORM sends them on its pools; those
// without are sent as they are (they may hold several statements, as `execute_unprepared` allows).
#[async_trait::async_trait]
impl ProxyDatabaseTrait for Proxy {
    async fn query(&self, statement: Statement) -> Result<Vec<ProxyRow>, DbErr> {
        let Some(mut wire) = self.wire_for(&statement, Some(ROWS_NOTE)).await? else {
            return Ok(Vec::new());
        };
        let limit = self.0.migration_deadline();
        let rows = within!(&mut wire, limit, |conn| async move {
            fetch_all(conn, statement).await.map_err(query_err)
        })?;
        rows.into_iter().map(proxy_row).collect()
    }

    async fn execute(&self, statement: Statement) -> Result<ProxyExecResult, DbErr> {
        let Some(mut wire) = self.wire_for(&statement, None).await? else {
            return Ok(ProxyExecResult::default());
        };
        let limit = self.0.migration_deadline();
        let done = within!(&mut wire, limit, |conn| async move {
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
            .map_err(exec_err)
        })?;
        Ok(ProxyExecResult::new(0, done.rows_affected()))
    }

    async fn begin(&self) {
        self.0.open_level().await;
    }

    async fn commit(&self) {
        self.0.close_level(true).await;
    }

    async fn rollback(&self) {
        self.0.close_level(false).await;
    }

    fn start_rollback(&self) {
        self.0.rollback_pending.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
