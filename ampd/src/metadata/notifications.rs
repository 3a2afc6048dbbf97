//! LISTEN/NOTIFY: the `job_actions` and `revision_changes` channels, typed.
//!
//! Sending is an ordinary statement (`SELECT pg_notify($1, $2)`) on any connection or transaction;
//! inside a transaction the notification is delivered when the transaction commits, and not at all
//! if it rolls back. (The hot paths in `jobs` build the same payload with `json_build_object` inside
//! their own statement rather than call [`notify_job_action`], to stay one round trip.)
//!
//! Receiving needs a dedicated connection: [`Listener`]. Anyone who can connect can `NOTIFY`, so a
//! payload that is not what the channel carries is logged (`warn`) and skipped, never an error.
//! Notifications sent while the listener is disconnected are lost: a listener reconnects by itself,
//! but its owner must also reconcile from the tables (on a timer, and after a reconnect).

use sea_orm::sqlx::postgres::{PgListener, PgPoolOptions};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::{Deserialize, Serialize};

use super::workers::validate_node_id;
use super::{Error, Result};

/// The channel of START/STOP requests to worker nodes.
pub const JOB_ACTIONS: &str = "job_actions";
/// The channel announcing a newly activated table revision.
pub const REVISION_CHANGES: &str = "revision_changes";
/// The largest payload a [`Listener`] accepts; valid payloads are under 200 bytes. (PostgreSQL's own
/// limit is 8000 bytes.)
pub const MAX_PAYLOAD_BYTES: usize = 1024;
/// The `application_name` of a listener's connection, so it can be found in `pg_stat_activity`.
pub const LISTENER_APPLICATION_NAME: &str = "ampd-listener";

/// What a worker is asked to do with a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Start (or resume) the job.
    Start,
    /// Stop the job.
    Stop,
}

impl Action {
    /// The name in a payload: `START` or `STOP`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Start => "START",
            Action::Stop => "STOP",
        }
    }
}

/// A `job_actions` payload: `{"node_id": "...", "job_id": 1, "action": "START" | "STOP"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAction {
    /// The worker the request is for.
    pub node_id: String,
    /// The job.
    pub job_id: i64,
    /// What to do.
    pub action: Action,
}

/// A `revision_changes` payload: `{"physical_table_id": 1, "revision_id": 2}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionChange {
    /// The table whose active revision changed.
    pub physical_table_id: i64,
    /// Its new active revision.
    pub revision_id: i64,
}

/// A notification received by a [`Listener`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// From `job_actions`.
    JobAction(JobAction),
    /// From `revision_changes`.
    RevisionChange(RevisionChange),
}

async fn notify<C, T>(db: &C, channel: &str, payload: &T) -> Result<()>
where
    C: ConnectionTrait,
    T: Serialize,
{
    let payload = serde_json::to_string(payload)
        .map_err(|e| Error::InvalidInput(format!("notification payload: {e}")))?;
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [channel.into(), payload.into()],
    ))
    .await?;
    Ok(())
}

/// Sends `action` on `job_actions` (delivered when the caller's transaction, if any, commits).
#[tracing::instrument(skip(db), err)]
pub async fn notify_job_action<C>(db: &C, action: &JobAction) -> Result<()>
where
    C: ConnectionTrait,
{
    validate_node_id(&action.node_id)?;
    notify(db, JOB_ACTIONS, action).await
}

/// Sends `change` on `revision_changes` (delivered when the caller's transaction, if any, commits).
#[tracing::instrument(skip(db), err)]
pub async fn notify_revision_change<C>(db: &C, change: &RevisionChange) -> Result<()>
where
    C: ConnectionTrait,
{
    notify(db, REVISION_CHANGES, change).await
}

/// Why a payload was skipped.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Longer than [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {0} bytes is over the limit of {MAX_PAYLOAD_BYTES}")]
    TooLong(usize),
    /// Not JSON, or not the shape the channel carries.
    #[error("payload is not a valid message of its channel: {0}")]
    Malformed(#[from] serde_json::Error),
    /// JSON of the right shape, with a value out of range (a malformed node id, say).
    #[error("payload has an invalid value: {0}")]
    Invalid(String),
    /// A channel this listener does not know.
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
}

/// Parses a payload received on `channel`.
pub fn parse(channel: &str, payload: &str) -> Result<Notification, PayloadError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(PayloadError::TooLong(payload.len()));
    }
    match channel {
        JOB_ACTIONS => {
            let action: JobAction = serde_json::from_str(payload)?;
            validate_node_id(&action.node_id).map_err(|e| PayloadError::Invalid(e.to_string()))?;
            Ok(Notification::JobAction(action))
        }
        REVISION_CHANGES => Ok(Notification::RevisionChange(serde_json::from_str(payload)?)),
        other => Err(PayloadError::UnknownChannel(other.to_owned())),
    }
}

/// Listens on `job_actions` and `revision_changes` on a dedicated connection.
///
/// The connection is sqlx's [`PgListener`] over a private pool of one: when the connection drops
/// (server restart, network, `pg_terminate_backend`), the next [`Listener::recv`] reconnects and
/// `LISTEN`s again. Notifications sent in between are lost.
pub struct Listener {
    url: String,
    inner: Option<PgListener>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("connected", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

async fn listen(url: &str) -> Result<PgListener> {
    let options = crate::db::pg_options(url)
        .map_err(|e| Error::InvalidInput(format!("database URL: {e}")))?;
    let options = options.application_name(LISTENER_APPLICATION_NAME);
    // What `PgListener::connect` does, plus the application name: a pool of one without timeouts,
    // used only to reconnect.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen_all([JOB_ACTIONS, REVISION_CHANGES]).await?;
    Ok(listener)
}

impl Listener {
    /// Connects to `url` and listens on both channels.
    #[tracing::instrument(skip(url), err)]
    pub async fn connect(url: &str) -> Result<Listener> {
        let inner = listen(url).await?;
        Ok(Listener {
            url: url.to_owned(),
            inner: Some(inner),
        })
    }

    /// The next valid notification. Malformed payloads are logged and skipped. A lost connection
    /// is re-established (and both channels listened to again) without an error; `Unavailable`
    /// when that fails, and the next call tries again. Cancel-safe as far as sqlx's `PgListener::recv`
    /// is: a notification is returned in the same poll that takes it off the connection.
    pub async fn recv(&mut self) -> Result<Notification> {
        loop {
            let listener = match self.inner.as_mut() {
                Some(listener) => listener,
                None => self.inner.insert(listen(&self.url).await?),
            };
            let received = match listener.recv().await {
                Ok(received) => received,
                Err(e) => {
                    // sqlx reconnects by itself after the usual ways a connection dies; for any
                    // other error start afresh with a new listener on the next call.
                    self.inner = None;
                    tracing::warn!(error = %e, "notification listener lost its connection");
                    return Err(Error::from(e));
                }
            };
            match parse(received.channel(), received.payload()) {
                Ok(notification) => return Ok(notification),
                Err(error) => tracing::warn!(
                    channel = received.channel(),
                    sender_pid = received.process_id(),
                    %error,
                    "skipping a malformed notification"
                ),
            }
        }
    }

    /// The server process id of the listener's current connection (to find it in
    /// `pg_stat_activity`). Connects first if it is not connected.
    pub async fn backend_pid(&mut self) -> Result<i32> {
        let listener = match self.inner.as_mut() {
            Some(listener) => listener,
            None => self.inner.insert(listen(&self.url).await?),
        };
        Ok(sea_orm::sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(listener)
            .await?)
    }
}
