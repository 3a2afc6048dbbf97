//! The live migration session: one `PgConnection`, opened on `metadata_db.direct_url` (default
//! `url`) and held for the whole run, on which the lock, every transaction, every migration
//! statement and the bookkeeping run. SeaORM's migrations reach it through a proxy connection, so
//! nothing can take another connection behind the run's back (a pool of one would, after a
//! reconnect, without the lock).
//!
//! Every statement has a client-side deadline: the run's own statements (reads, the lock, the
//! settings, the bookkeeping) `ddl_lock_timeout_ms` plus [`QUICK_MARGIN`], a migration's statements
//! `migration_statement_timeout_secs`. A statement that gets no answer in time (a frozen network
//! or server) closes the connection, so the server ends what it was doing when it notices, and
//! fails with [`NO_ANSWER`](super::session::NO_ANSWER). On TCP the client socket has keepalive on
//! ([`crate::db::keepalive`]), so a peer that vanished is noticed even between statements.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::sqlx::{self, Connection as _, PgConnection};
use sea_orm::{
    DatabaseBackend, DatabaseConnection, DbErr, ProxyDatabaseTrait, ProxyExecResult, ProxyRow,
    QueryResult, RuntimeErr, Statement,
};

use super::error::MigrateError;
use super::session::{
    QUICK_MARGIN, end_sql, exec_err, execute, fetch_all, proxy_row, query_err, stalled,
};
use crate::config::MetadataDbConfig;
use crate::db;

/// What the session's statements go to.
struct Wire {
    /// The connection; `None` once it was closed or dropped after a missed deadline.
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
    /// A SeaORM transaction was dropped unfinished: roll it back before the next statement.
    rollback_pending: AtomicBool,
}

/// The live migration session (see the module documentation).
pub(super) struct Live {
    inner: Arc<Inner>,
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

/// Sends `sql` (one or more statements without parameters) and waits for it to finish.
async fn send(conn: &mut PgConnection, sql: String) -> Result<(), DbErr> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(exec_err)
}

impl Live {
    /// Connects to `metadata_db.direct_url` (default `url`); `keepalive`: with TCP keepalive on
    /// the socket (a run that changes the database), or as a plain connection (one that only
    /// reads).
    pub async fn connect(cfg: &MetadataDbConfig, keepalive: bool) -> Result<Live, MigrateError> {
        let url = db::session_url(cfg)?;
        let conn = if keepalive {
            db::open_with_keepalive(cfg, url).await?
        } else {
            db::open(cfg, url).await?
        };
        Ok(Live {
            inner: Arc::new(Inner {
                wire: tokio::sync::Mutex::new(Wire {
                    conn: Some(conn),
                    depth: 0,
                    deferred: None,
                }),
                quick: Duration::from_millis(cfg.ddl_lock_timeout_ms) + QUICK_MARGIN,
                migration_ms: AtomicU64::new(cfg.migration_statement_timeout_secs.max(1) * 1000),
                rollback_pending: AtomicBool::new(false),
            }),
        })
    }

    /// Sets the client-side deadline of a migration's statements (for a step that may wait long).
    pub fn set_migration_deadline(&self, limit: Duration) {
        self.inner
            .migration_ms
            .store(limit.as_millis() as u64, Ordering::SeqCst);
    }

    /// Runs `sql` and returns its rows.
    pub async fn read(&self, sql: &str) -> Result<Vec<QueryResult>, DbErr> {
        let mut wire = self.inner.wire.lock().await;
        self.inner.settle(&mut wire).await?;
        let rows = within!(&mut wire, self.inner.quick, |conn| async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_all(conn)
                .await
                .map_err(query_err)
        })?;
        Ok(rows.into_iter().map(QueryResult::from).collect())
    }

    /// Sends `sql` with a client-side deadline of `limit` (at most the run's own).
    pub async fn write_within(&self, sql: &str, limit: Duration) -> Result<(), DbErr> {
        let mut wire = self.inner.wire.lock().await;
        self.inner.settle(&mut wire).await?;
        within!(&mut wire, limit.min(self.inner.quick), |conn| send(
            conn,
            sql.to_owned()
        ))
    }

    /// Sends `sql` with the run's own deadline.
    pub async fn write(&self, sql: &str) -> Result<(), DbErr> {
        self.write_within(sql, self.inner.quick).await
    }

    /// Asks `sql`, a one-boolean question, with a client-side deadline of `limit` (at most the
    /// run's own).
    pub async fn ask_within(&self, sql: &str, limit: Duration) -> Result<bool, DbErr> {
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

    /// The run's own deadline.
    pub fn quick(&self) -> Duration {
        self.inner.quick
    }

    /// Opens a transaction (`BEGIN`) with a client-side deadline of `limit`.
    pub async fn begin_within(&self, limit: Duration) -> Result<(), DbErr> {
        self.write_within("BEGIN", limit).await?;
        self.inner.wire.lock().await.depth = 1;
        Ok(())
    }

    /// Commits the open transaction.
    pub async fn commit(&self) -> Result<(), DbErr> {
        let result = self.write("COMMIT").await;
        self.inner.wire.lock().await.depth = 0;
        result
    }

    /// Rolls back whatever transaction is open, with a client-side deadline of `limit`.
    pub async fn rollback_within(&self, limit: Duration) -> Result<(), DbErr> {
        let mut wire = self.inner.wire.lock().await;
        let open = wire.depth > 0;
        wire.depth = 0;
        wire.deferred = None;
        self.inner.rollback_pending.store(false, Ordering::SeqCst);
        if !open {
            return Ok(());
        }
        within!(&mut wire, limit.min(self.inner.quick), |conn| send(
            conn,
            "ROLLBACK".to_owned()
        ))
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

    /// Closes the connection (the server releases a lock still held).
    pub async fn close(&self) {
        if let Some(conn) = self.inner.wire.lock().await.conn.take() {
            let _ = conn.close().await;
        }
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
            if wire.conn.is_some() {
                within!(wire, self.quick, |conn| send(conn, sql))?;
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
        if let Err(e) = within!(wire, self.quick, |conn| send(conn, sql)) {
            wire.deferred.get_or_insert(e);
        }
    }
}

/// SeaORM's view of the session. Statements with parameters are prepared and bound, as SeaORM
/// sends them on its pools; those without are sent as they are (they may hold several
/// statements, as `execute_unprepared` allows).
struct Proxy(Arc<Inner>);

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationSession").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl ProxyDatabaseTrait for Proxy {
    async fn query(&self, statement: Statement) -> Result<Vec<ProxyRow>, DbErr> {
        let inner = &self.0;
        let mut wire = inner.wire.lock().await;
        inner.settle(&mut wire).await?;
        let limit = inner.migration_deadline();
        let rows = within!(&mut wire, limit, |conn| async move {
            fetch_all(conn, statement).await.map_err(query_err)
        })?;
        rows.into_iter().map(proxy_row).collect()
    }

    async fn execute(&self, statement: Statement) -> Result<ProxyExecResult, DbErr> {
        let inner = &self.0;
        let mut wire = inner.wire.lock().await;
        inner.settle(&mut wire).await?;
        let limit = inner.migration_deadline();
        let done = within!(&mut wire, limit, |conn| async move {
            execute(conn, statement).await.map_err(exec_err)
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
