//! Data access over the metadata database, one module per domain.
//!
//! Every function is a free `async fn` whose module names the noun (`jobs::schedule`,
//! `workers::heartbeat`, `revisions::activate`) and is generic over SeaORM's [`ConnectionTrait`], so
//! a caller passes the pool or a transaction of its own; functions that make several writes also
//! need [`TransactionTrait`] and open a transaction (a savepoint when the caller's connection is
//! already a transaction). Nothing here decides *policy* (which worker gets a job, when to retry):
//! these are the mechanisms the services in `service/` are built from.
//!
//! Errors are [`Error`]: `NotFound`, `StateConflict`, `Conflict`, `ConstraintViolation`,
//! `Unavailable`, `InvalidInput`, or the database error itself.
//!
//! # Hot paths
//! `jobs::schedule`, the `jobs::mark_*` transitions and `workers::heartbeat` are one statement, so
//! one round trip, each: a transition is a guarded `UPDATE ... RETURNING` in a CTE that also inserts
//! the `job_events` row (and, where there is one, sends the `pg_notify`), so the update, its event and
//! its notification commit or roll back together even on a bare pool connection.
//!
//! # Advisory lock keys
//! PostgreSQL keeps the single-`bigint` key space of the advisory lock functions apart from the
//! two-`int4` one: a lock taken with one form never conflicts with a lock taken with the other.
//! - single `bigint`: the migrator's [`LOCK_KEY`](crate::migrate::LOCK_KEY) `0x616d7064_6d696772`
//!   ("ampdmigr"), nothing else.
//! - two `int4`: node claims ([`workers::claim`]); the key is the first 8 bytes of
//!   `sha256("ampd/node-claim/" || node_id)`, split into two big-endian `i32`s
//!   ([`workers::claim_key`]). A 64-bit hash makes two node ids sharing a key (and so refusing each
//!   other's claim) vanishingly unlikely (about n²/2⁶⁵ for n node ids).
//!
//! [`ConnectionTrait`]: sea_orm::ConnectionTrait
//! [`TransactionTrait`]: sea_orm::TransactionTrait

pub mod datasets;
pub mod error;
pub mod files;
pub mod jobs;
pub mod notifications;
pub mod overview;
pub mod revisions;
pub mod workers;

pub use error::{Error, Result};

use std::time::Duration;

/// `duration` in whole microseconds, for `$n * interval '1 microsecond'` computed by the database
/// clock. Too long a duration (over 292 000 years) is invalid input.
pub(crate) fn micros(what: &str, duration: Duration) -> Result<i64> {
    i64::try_from(duration.as_micros())
        .map_err(|_| Error::InvalidInput(format!("{what} of {duration:?} is too long")))
}

/// Dataset namespaces and names: lowercase `[a-z0-9_]`, starting with a letter (the CHECK of
/// `dataset_manifests`).
pub(crate) fn validate_dataset_part(what: &str, value: &str) -> Result<()> {
    let mut chars = value.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "dataset {what} {value:?} is invalid: use lowercase letters, digits and '_', starting \
             with a letter"
        )))
    }
}

/// A dataset's namespace and name, each as [`validate_dataset_part`] wants it.
pub(crate) fn validate_dataset(namespace: &str, name: &str) -> Result<()> {
    validate_dataset_part("namespace", namespace)?;
    validate_dataset_part("name", name)
}

/// File and table names: a non-empty single path segment (no `/`, `\` or NUL, not `.` or `..`).
pub(crate) fn validate_path_segment(what: &str, value: &str) -> Result<()> {
    if value.is_empty() || value == "." || value == ".." || value.contains(['/', '\\', '\0']) {
        return Err(Error::InvalidInput(format!(
            "{what} {value:?} is invalid: it must be a non-empty path segment"
        )));
    }
    Ok(())
}
