//! The recording session of a dry run (and of the other commands that show statements instead of
//! sending them): every statement the run's code hands it is written into a script, in order, and
//! nothing that changes anything (the lock, settings, DDL, bookkeeping rows) is sent. Statements
//! that only read (the applied set, the look for leftovers, the session check) also run for real
//! when the recording has a connection, so the plan is the one a real run would make now. Every
//! question a run asks on its way (is the lock free, was it taken, is it still held) gets the answer
//! of the path on which the run goes ahead, so the script shows what a run that meets no other run
//! sends. The run's code is the same as a live run's, so the script is what a real run would send.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use sea_orm::{
    DatabaseBackend, DatabaseConnection, DbErr, ProxyDatabaseTrait, ProxyExecResult, ProxyRow,
    QueryResult, Statement,
};

use super::error::MigrateError;
use super::live::Live;
use super::session::{Line, display, end_sql};
use crate::config::MetadataDbConfig;

/// What a recording says about a statement whose rows a migration reads.
const ROWS_NOTE: &str = "returns rows in a real run; a dry run has none to give the migration, so \
                         what it sends next may depend on the data";

struct Script {
    lines: StdMutex<Vec<Line>>,
    /// Transaction levels a migration opened through SeaORM and has not ended.
    depth: StdMutex<u32>,
    /// A SeaORM transaction was dropped unfinished: its `ROLLBACK` comes before the next statement.
    rollback_pending: AtomicBool,
}

/// A dry run's session (see the module documentation).
pub(super) struct Recording {
    script: Arc<Script>,
    /// Where the statements that only read are run; `None` when no database is contacted.
    reads: Option<Live>,
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Script {
    fn push(&self, line: Line) {
        lock(&self.lines).push(line);
    }

    /// Before a statement: the `ROLLBACK` of a SeaORM transaction dropped unfinished.
    fn settle(&self) {
        if self.rollback_pending.swap(false, Ordering::SeqCst) {
            let mut depth = lock(&self.depth);
            if *depth > 0 {
                let sql = end_sql(*depth, false);
                *depth -= 1;
                drop(depth);
                self.push(Line::Sql { sql, note: None });
            }
        }
    }

    fn statement(&self, sql: String, note: Option<String>) {
        self.settle();
        self.push(Line::Sql { sql, note });
    }
}

impl Recording {
    /// A recording connected to read what a run would read when `cfg` is given, else reading
    /// nothing.
    pub async fn new(cfg: Option<&MetadataDbConfig>) -> Result<Recording, MigrateError> {
        let reads = match cfg {
            Some(cfg) => Some(Live::connect(cfg, false).await?),
            None => None,
        };
        Ok(Recording {
            script: Arc::new(Script {
                lines: StdMutex::new(Vec::new()),
                depth: StdMutex::new(0),
                rollback_pending: AtomicBool::new(false),
            }),
            reads,
        })
    }

    /// Whether the statements that only read are run.
    pub fn connected(&self) -> bool {
        self.reads.is_some()
    }

    /// A comment.
    pub fn note(&self, text: String) {
        self.script.push(Line::Note(text));
    }

    /// A statement, with what is said about it.
    pub fn statement(&self, sql: &str, note: Option<String>) {
        self.script.statement(sql.to_owned(), note);
    }

    /// `BEGIN`: a transaction the run opens (a migration's own are savepoints inside it).
    pub fn begin(&self) {
        self.statement("BEGIN", None);
        *lock(&self.script.depth) = 1;
    }

    /// `COMMIT` of the run's transaction.
    pub fn commit(&self) {
        self.statement("COMMIT", None);
        *lock(&self.script.depth) = 0;
    }

    /// The script so far.
    pub fn script(&self) -> Vec<Line> {
        lock(&self.script.lines).clone()
    }

    /// Writes down `sql` and, when connected, runs it and returns its rows (none otherwise).
    pub async fn read(&self, sql: &str) -> Result<Vec<QueryResult>, DbErr> {
        self.statement(sql, None);
        match &self.reads {
            Some(live) => live.read(sql).await,
            None => Ok(Vec::new()),
        }
    }

    /// A SeaORM connection whose every statement is written down.
    pub async fn seaorm(&self) -> Result<DatabaseConnection, DbErr> {
        let proxy: Arc<Box<dyn ProxyDatabaseTrait>> =
            Arc::new(Box::new(Proxy(self.script.clone())));
        sea_orm::Database::connect_proxy(DatabaseBackend::Postgres, proxy).await
    }

    /// Closes the connection that reads, if there is one.
    pub async fn close(&self) {
        if let Some(live) = &self.reads {
            live.close().await;
        }
    }
}

/// SeaORM's view of a recording: every statement written down, no rows, nothing affected.
struct Proxy(Arc<Script>);

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingSession").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl ProxyDatabaseTrait for Proxy {
    async fn query(&self, statement: Statement) -> Result<Vec<ProxyRow>, DbErr> {
        self.0
            .statement(display(&statement), Some(ROWS_NOTE.to_owned()));
        Ok(Vec::new())
    }

    async fn execute(&self, statement: Statement) -> Result<ProxyExecResult, DbErr> {
        self.0.statement(display(&statement), None);
        Ok(ProxyExecResult::default())
    }

    async fn begin(&self) {
        self.0.settle();
        let sql = {
            let mut depth = lock(&self.0.depth);
            let sql = if *depth == 0 {
                "BEGIN".to_owned()
            } else {
                format!("SAVEPOINT ampd_{}", *depth)
            };
            *depth += 1;
            sql
        };
        self.0.push(Line::Sql { sql, note: None });
    }

    async fn commit(&self) {
        self.end(true);
    }

    async fn rollback(&self) {
        self.end(false);
    }

    fn start_rollback(&self) {
        self.0.rollback_pending.store(true, Ordering::SeqCst);
    }
}

impl Proxy {
    fn end(&self, commit: bool) {
        let sql = {
            let mut depth = lock(&self.0.depth);
            if *depth == 0 {
                return;
            }
            let sql = end_sql(*depth, commit);
            *depth -= 1;
            sql
        };
        self.0.push(Line::Sql { sql, note: None });
    }
}
