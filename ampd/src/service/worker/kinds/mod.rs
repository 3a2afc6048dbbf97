//! Job kinds: what a worker does for a job, by its `jobs.kind`. Each kind lives in a file of its
//! own behind [`JobKind`]; adding one is that file and one line in [`KINDS`].
//!
//! A kind runs one attempt of a job through its [`Job`]: the claim it writes with, the
//! descriptor, the worker's settings and a cancellation token it checks between units of work. It
//! returns the revisions it wrote, which the runner activates with the job's completion, or a
//! [`JobError`] saying whether the job can ever succeed.

mod materialize_static;

use std::future::Future;
use std::sync::Arc;

use sea_orm::DatabaseConnection;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Settings;
use crate::metadata::{self, jobs::JobClaim};
use crate::service;

/// The kinds a worker runs.
static KINDS: &[&dyn JobKind] = &[&materialize_static::MaterializeStatic];

/// The kind named `kind`, if this worker runs it.
pub fn find(kind: &str) -> Option<&'static dyn JobKind> {
    KINDS.iter().copied().find(|k| k.name() == kind)
}

/// What a worker can run.
#[async_trait::async_trait]
pub trait JobKind: Send + Sync {
    /// The `jobs.kind` it runs.
    fn name(&self) -> &'static str;

    /// Runs one attempt of `job`; returns the revisions it wrote (each through `job.claim`), to be
    /// activated with the job's completion.
    async fn run(&self, job: &Job) -> Result<Vec<i64>, JobError>;
}

/// One attempt of a job, as a kind sees it.
pub struct Job {
    /// The metadata database.
    pub db: DatabaseConnection,
    /// The attempt's claim: every write of the job goes through it.
    pub claim: JobClaim,
    /// What to run (`jobs.descriptor`).
    pub descriptor: serde_json::Value,
    /// Where the worker reads and writes.
    pub settings: Arc<Settings>,
    /// Cancelled when the job must end (a stop, a shutdown, the job taken away): checked between
    /// units of work.
    pub cancel: CancellationToken,
}

impl Job {
    /// `op` on the metadata database, retried while its error is retryable
    /// ([`service::retrying`]) unless the job is cancelled first. A refusal of the claim (the job
    /// moved on, or stopped) is [`JobError::Refused`], a database that stays unavailable or fails is
    /// [`JobError::Failed`], invalid input [`JobError::Fatal`].
    pub async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, JobError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, metadata::Error>>,
    {
        match service::until_stopped(&self.cancel, service::retrying(what, op)).await {
            None => Err(JobError::Cancelled),
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(JobError::from_metadata(what, e)),
        }
    }
}

/// Why a job failed, as its `detail`: `{"reason": ..., "table": ..., "row": ..., "column": ...,
/// "message": ...}` (the fields that do not apply are left out).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// What kind of failure: `invalid_manifest`, `bad_csv_row`, `source_outside`, `io`, ...
    pub reason: &'static str,
    /// The table it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The 1-based line of the source file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row: Option<u64>,
    /// The column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// Where in the manifest (`tables.prices.rows[3][1]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// What is wrong, for people.
    pub message: String,
}

impl Failure {
    /// A failure for `reason` saying `message`.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            table: None,
            row: None,
            column: None,
            at: None,
            message: message.into(),
        }
    }

    /// The same, about table `table`.
    pub fn table(mut self, table: &str) -> Failure {
        self.table = Some(table.to_owned());
        self
    }

    /// The job's `detail`.
    pub fn detail(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({"reason": self.reason}))
    }
}

/// How an attempt of a job ended without completing.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job can never succeed as it is (an invalid manifest, a missing or refused source, a bad
    /// row): it ends FATAL with this detail.
    #[error("{0}")]
    Fatal(Box<Failure>),
    /// It failed in a way that may pass (I/O, the database): it ends ERROR with this detail, and
    /// the controller retries it with backoff.
    #[error("{0}")]
    Failed(Box<Failure>),
    /// The job's token was cancelled (a stop, a shutdown, the job taken away).
    #[error("cancelled")]
    Cancelled,
    /// The metadata database refused the claim (the job moved on, stopped, or was deleted) or a
    /// write into the attempt's output: the attempt is no longer this worker's to finish as it was.
    #[error("the job's claim was refused: {0}")]
    Refused(Box<metadata::Error>),
}

impl JobError {
    /// [`JobError::Fatal`] with `failure`.
    pub fn fatal(failure: Failure) -> JobError {
        JobError::Fatal(Box::new(failure))
    }

    /// [`JobError::Failed`] with `failure`.
    pub fn failed(failure: Failure) -> JobError {
        JobError::Failed(Box::new(failure))
    }

    /// `err` of data-access call `what`, sorted.
    pub fn from_metadata(what: &str, err: metadata::Error) -> JobError {
        use metadata::Error as E;
        match err {
            E::Fenced { .. } | E::StateConflict { .. } | E::NotFound { .. } | E::Conflict(_) => {
                JobError::Refused(Box::new(err))
            }
            E::InvalidInput(message) => {
                JobError::fatal(Failure::new("invalid_input", format!("{what}: {message}")))
            }
            e if e.is_retryable() => {
                JobError::failed(Failure::new("database_unavailable", format!("{what}: {e}")))
            }
            e => JobError::failed(Failure::new("database", format!("{what}: {}", chain(&e)))),
        }
    }
}

/// `err` and its causes on one line, secrets redacted (it is stored and shown).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    crate::redact::redact(&text)
}
