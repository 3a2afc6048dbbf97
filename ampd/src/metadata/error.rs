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

    /// The database could not be reached or the connection was lost: no connection from the pool
    /// in time, connection refused or reset, server shutting down. Retrying later may succeed.
    #[error("the metadata database is unavailable")]
    Unavailable(#[source] DbErr),

    /// An argument is malformed (a node id, a dataset name, a version, a reference, a descriptor);
    /// the message says which and what a valid one looks like. Nothing was sent to the database.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Any other database error (a bug, or something the schema does not expect).
    #[error("metadata database error")]
    Db(#[source] DbErr),
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

    /// The constraint a [`Error::ConstraintViolation`] names, if this is one.
    pub fn constraint(&self) -> Option<&str> {
        match self {
            Error::ConstraintViolation { constraint, .. } => Some(constraint),
            _ => None,
        }
    }
}

/// Sorts a database error into `Unavailable`, `ConstraintViolation` or `Db`.
impl From<DbErr> for Error {
    fn from(err: DbErr) -> Error {
        match &err {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => Error::Unavailable(err),
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
                match classify_sqlx(e) {
                    Kind::Unavailable => Error::Unavailable(err),
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

/// Errors of a dedicated sqlx connection (node claims, the listener), sorted the same way.
impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Error {
        let err = Arc::new(err);
        match classify_sqlx(&err) {
            Kind::Unavailable => Error::Unavailable(DbErr::Conn(RuntimeErr::SqlxError(err))),
            Kind::Constraint(constraint, message) => Error::ConstraintViolation {
                constraint,
                message,
            },
            Kind::Other => Error::Db(DbErr::Query(RuntimeErr::SqlxError(err))),
        }
    }
}

enum Kind {
    Unavailable,
    Constraint(String, String),
    Other,
}

fn classify_sqlx(err: &sqlx::Error) -> Kind {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Kind::Unavailable,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match (code.get(..2), db.constraint()) {
                // Class 23: integrity constraint violation.
                (Some("23"), Some(constraint)) => {
                    Kind::Constraint(constraint.to_owned(), db.message().to_owned())
                }
                // Class 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown,
                // cannot connect now; 53300: too many connections.
                (Some("08"), _) => Kind::Unavailable,
                _ if matches!(code.as_str(), "57P01" | "57P02" | "57P03" | "53300") => {
                    Kind::Unavailable
                }
                _ => Kind::Other,
            }
        }
        _ => Kind::Other,
    }
}
