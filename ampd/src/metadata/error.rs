//! The error of every data-access function.

use std::sync::Arc;

use entity::JobStatus;
use sea_orm::{DbErr, RuntimeErr, sqlx};

/// What went wrong in a data-access function.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The row the operation names (a job, a worker, a revision, a manifest, ...) does not exist.
    #[error("{entity} {key} not found")]
    NotFound {
        /// What was looked for: `job`, `worker`, `manifest`, ...
        entity: &'static str,
        /// How it was named.
        key: String,
    },

    /// A job transition was asked for while the job was in a status it may not leave that way
    /// (SCHEMA.md's transition table); nothing was changed and no event was appended.
    #[error("job is {actual}, but this transition needs one of {}", list(expected))]
    StateConflict {
        /// The statuses the transition may start from.
        expected: Vec<JobStatus>,
        /// The status the job was in.
        actual: JobStatus,
    },

    /// The operation contradicts what is stored: another descriptor for an active job's key, an
    /// active revision to delete, a node id claimed by another process, a linked manifest to delete.
    #[error("{0}")]
    Conflict(String),

    /// The database refused a write with a constraint (unique, foreign key, check) that the function
    /// does not turn into one of the errors above.
    #[error("constraint {constraint} refused the write: {message}")]
    ConstraintViolation {
        /// The constraint's name, as in SCHEMA.md (`jobs_node_id_fkey`, ...).
        constraint: String,
        /// PostgreSQL's message.
        message: String,
    },

    /// A worker acted on a job through a claim that is no longer current: the job has moved to
    /// another node or another attempt since the claim was taken (the worker was declared lost, the
    /// job was retried or reassigned), or another process has claimed the node id since (its claim
    /// epoch moved on). Nothing was changed; the worker must drop the job.
    #[error(
        "job {job_id} is no longer this worker's: the claim is for {expected}, but the job is on \
         {actual}"
    )]
    Fenced {
        /// The job.
        job_id: i64,
        /// The assignment the claim names.
        expected: Assignment,
        /// The job's assignment now.
        actual: Assignment,
    },

    /// The operation may succeed if tried again: the database could not be reached or the
    /// connection was lost (no connection from the pool in time, refused, reset, server shutting
    /// down), or the server cancelled the statement for a reason that passes (serialization
    /// failure 40001, deadlock 40P01, lock timeout 55P03, statement timeout 57014). `sqlstate` is
    /// the server's code when there is one. Callers retry with backoff.
    #[error("{}", unavailable_message(.sqlstate.as_deref()))]
    Unavailable {
        /// The server's SQLSTATE, when the server reported one.
        sqlstate: Option<String>,
        /// The database error.
        #[source]
        source: DbErr,
    },

    /// A connection of its own (a listener's, a node claim's) could not be opened within the
    /// connect timeout; see the cause. Retryable when the server was unreachable.
    #[error(transparent)]
    Connect(crate::db::ConnectError),

    /// An argument is malformed (a node id, a dataset name, a version, a reference, a descriptor);
    /// the message says which and what a valid one looks like. Nothing was sent to the database.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Any other database error (a bug, or something the schema does not expect).
    #[error("metadata database error")]
    Db(#[source] DbErr),
}

/// Which node a job is assigned to and which attempt it is on, and the claim epoch of that node:
/// what a worker's claim names ([`crate::metadata::jobs::JobClaim`]) and what a fenced transition
/// finds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Assignment {
    /// The node, `None` when the job is assigned to none.
    pub node_id: Option<String>,
    /// The attempt.
    pub attempt: i32,
    /// The node's claim epoch (`workers.claim_epoch`): the one the claim holds, or the node's now.
    /// `None` when it was not checked (a controller's operation) or the node is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
}

impl std::fmt::Display for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let node = self.node_id.as_deref().unwrap_or("no node");
        write!(f, "attempt {} on {node}", self.attempt)?;
        if let Some(epoch) = self.epoch {
            write!(f, " (claim epoch {epoch})")?;
        }
        Ok(())
    }
}

fn unavailable_message(sqlstate: Option<&str>) -> String {
    let why = match sqlstate {
        Some("40001") => "a serialization failure (SQLSTATE 40001)",
        Some("40P01") => "a deadlock (SQLSTATE 40P01)",
        Some("55P03") => "a lock timeout (SQLSTATE 55P03)",
        Some("57014") => "a statement timeout or cancellation (SQLSTATE 57014)",
        Some(code) => {
            return format!("the metadata database is unavailable (SQLSTATE {code}); try again");
        }
        None => return "the metadata database is unavailable; try again".to_owned(),
    };
    format!("the operation was cancelled by {why}; try again")
}

/// The result of a data-access function.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn list(statuses: &[JobStatus]) -> String {
    statuses
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Error {
    pub(crate) fn not_found(entity: &'static str, key: impl ToString) -> Error {
        Error::NotFound {
            entity,
            key: key.to_string(),
        }
    }

    /// [`Error::Unavailable`] for an operation given up because it did not finish in time (a
    /// pool with no free connection, a connection that does not answer).
    pub fn timed_out() -> Error {
        Error::Unavailable {
            sqlstate: None,
            source: DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::Timeout),
        }
    }

    /// Whether trying the operation again may succeed ([`Error::Unavailable`]).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::Connect(crate::db::ConnectError::Unreachable { .. })
        )
    }

    /// The constraint a [`Error::ConstraintViolation`] names, if this is one.
    pub fn constraint(&self) -> Option<&str> {
        match self {
            Error::ConstraintViolation { constraint, .. } => Some(constraint),
            _ => None,
        }
    }

    /// `NotFound { entity, key }` when this is a violation of foreign key `fkey` (the row it
    /// points at is missing), else `self`.
    pub(crate) fn missing_if(self, fkey: &str, entity: &'static str, key: impl ToString) -> Error {
        if self.constraint() == Some(fkey) {
            Error::not_found(entity, key)
        } else {
            self
        }
    }
}

/// Sorts a database error into `Unavailable`, `ConstraintViolation` or `Db`.
impl From<DbErr> for Error {
    fn from(err: DbErr) -> Error {
        match &err {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => Error::Unavailable {
                sqlstate: None,
                source: err,
            },
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
                match classify_sqlx(e) {
                    Kind::Unavailable(sqlstate) => Error::Unavailable {
                        sqlstate,
                        source: err,
                    },
                    Kind::Constraint(constraint, message) => Error::ConstraintViolation {
                        constraint,
                        message,
                    },
                    Kind::Other => Error::Db(err),
                }
            }
            _ => Error::Db(err),
        }
    }
}

/// A dedicated connection that could not be opened.
impl From<crate::db::ConnectError> for Error {
    fn from(err: crate::db::ConnectError) -> Error {
        Error::Connect(err)
    }
}

/// Errors of a dedicated sqlx connection (node claims, the listener), sorted the same way.
impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Error {
        let err = Arc::new(err);
        match classify_sqlx(&err) {
            Kind::Unavailable(sqlstate) => Error::Unavailable {
                sqlstate,
                source: DbErr::Conn(RuntimeErr::SqlxError(err)),
            },
            Kind::Constraint(constraint, message) => Error::ConstraintViolation {
                constraint,
                message,
            },
            Kind::Other => Error::Db(DbErr::Query(RuntimeErr::SqlxError(err))),
        }
    }
}

enum Kind {
    Unavailable(Option<String>),
    Constraint(String, String),
    Other,
}

fn classify_sqlx(err: &sqlx::Error) -> Kind {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Kind::Unavailable(None),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match (code.get(..2), db.constraint()) {
                // Class 23: integrity constraint violation.
                (Some("23"), Some(constraint)) => {
                    Kind::Constraint(constraint.to_owned(), db.message().to_owned())
                }
                // Class 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown,
                // cannot connect now; 53300: too many connections; 40001 serialization failure,
                // 40P01 deadlock, 55P03 lock not available (lock_timeout), 57014 query cancelled
                // (statement_timeout): the statement lost a race or a wait, not its meaning.
                (Some("08"), _) => Kind::Unavailable(Some(code)),
                _ if matches!(
                    code.as_str(),
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "55P03" | "57014"
                ) =>
                {
                    Kind::Unavailable(Some(code))
                }
                _ => Kind::Other,
            }
        }
        _ => Kind::Other,
    }
}
