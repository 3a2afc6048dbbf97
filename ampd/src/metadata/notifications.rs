//! LISTEN/NOTIFY: the `job_actions` and `revision_changes` channels, typed.
//!
//! Sending is an ordinary statement (`SELECT pg_notify($1, $2)`) on any connection or transaction;
//! inside a transaction the notification is delivered when the transaction commits, and not at all
//! if it rolls back. (The hot paths in `jobs` build the same payload with `json_build_object` inside
//! their own statement rather than call [`notify_job_action`], to stay one round trip.)
//!
//! Receiving needs a dedicated connection: [`Listener`]. Anyone who can connect can `NOTIFY`, so a
//! payload that is not what the channel carries is logged (`warn`) and skipped, never an error.
//! Notifications sent while the listener is disconnected are lost: a listener reconnects by itself
//! and says so ([`Notification::Reconnected`]); its owner reconciles from the tables then, and on a
//! timer.

use std::time::Duration;

use sea_orm::sqlx::postgres::{PgListener, PgPoolOptions};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::{Deserialize, Serialize};

use super::workers::validate_node_id;
use super::{Error, Result};
use crate::config::{DatabaseUrl, MetadataDbConfig};
use crate::db;

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

impl JobAction {
    /// The same payload built by the database: SQL for a [`JobAction`]'s JSON text from the SQL
    /// expressions `node_id`, `job_id` and `action`, for statements that send it themselves.
    pub(crate) fn sql(node_id: &str, job_id: &str, action: &str) -> String {
        format!(
            "json_build_object('node_id', {node_id}, 'job_id', {job_id}, 'action', {action})::text"
        )
    }
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
    /// The listener lost its connection and has connected and listened again: notifications sent
    /// in between are lost, so the owner reconciles from the tables now.
    Reconnected,
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

/// How long a listener waits for a notification before it checks, with a query, that its
/// connection is still alive (sqlx offers no TCP keepalive on the client side).
const PING_EVERY: Duration = Duration::from_secs(30);
/// How long that check may take before the connection counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens on `job_actions` and `revision_changes` on a dedicated connection.
///
/// The connection is opened like every other of ampd's (the configured connect timeout, retries
/// with backoff, the URL redacted in errors) and checked with a query after every
/// [`PING_EVERY`] without traffic. When it is lost (server restart, network, `pg_terminate_backend`),
/// [`Listener::recv`] connects again, listens again, and returns [`Notification::Reconnected`], so
/// the owner knows to reconcile: notifications sent in between are lost.
pub struct Listener {
    url: DatabaseUrl,
    cfg: MetadataDbConfig,
    inner: Option<PgListener>,
    /// The connection was lost since the last [`Notification::Reconnected`].
    lost: bool,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("connected", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

async fn listen(url: &DatabaseUrl, cfg: &MetadataDbConfig) -> Result<PgListener> {
    Ok(db::with_connect_retry(url, cfg, |opts| async move {
        // What `PgListener::connect` does, with ampd's options: a private pool of one, used only
        // to reconnect.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            // The connection comes back only when the listener is dropped or replaced: close it
            // then, instead of checking it with a query that a server shutting down (solo stops
            // its PostgreSQL right after its services) answers with an error.
            .after_release(|_, _| Box::pin(async { Ok(false) }))
            .connect_lazy_with(opts.application_name(LISTENER_APPLICATION_NAME));
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.ignore_pool_close_event(true);
        listener.eager_reconnect(false);
        db::apply_session_settings(&mut listener).await?;
        listener.listen_all([JOB_ACTIONS, REVISION_CHANGES]).await?;
        Ok(listener)
    })
    .await?)
}

impl Listener {
    /// Connects to the metadata database of `cfg` and listens on both channels.
    #[tracing::instrument(skip_all, err)]
    pub async fn connect(cfg: &MetadataDbConfig) -> Result<Listener> {
        let url = db::session_url(cfg)?.clone();
        let inner = listen(&url, cfg).await?;
        Ok(Listener {
            url,
            cfg: cfg.clone(),
            inner: Some(inner),
            lost: false,
        })
    }

    /// The next valid notification, or [`Notification::Reconnected`] once after the connection was
    /// lost and re-established. Malformed payloads are logged and skipped. When connecting again
    /// fails (within the connect timeout), an error; the next call tries again. Cancel-safe as far
    /// as sqlx's `PgListener::try_recv` is: a notification is returned in the same poll that takes it
    /// off the connection.
    pub async fn recv(&mut self) -> Result<Notification> {
        loop {
            let listener = match self.inner.as_mut() {
                Some(listener) => listener,
                None => self.inner.insert(listen(&self.url, &self.cfg).await?),
            };
            // Connected again since the loss, here or in `backend_pid`: said once, either way.
            if std::mem::take(&mut self.lost) {
                crate::metrics::listener_reconnected();
                tracing::info!("notification listener connected again");
                return Ok(Notification::Reconnected);
            }
            let received = match tokio::time::timeout(PING_EVERY, listener.try_recv()).await {
                Ok(Ok(Some(received))) => received,
                Ok(Ok(None)) => {
                    self.connection_lost("the connection was closed");
                    continue;
                }
                Ok(Err(e)) => {
                    self.connection_lost(&e.to_string());
                    continue;
                }
                Err(_) => {
                    let ping = sea_orm::sqlx::query("SELECT 1").execute(&mut *listener);
                    match tokio::time::timeout(PING_TIMEOUT, ping).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => self.connection_lost(&e.to_string()),
                        Err(_) => self.connection_lost("no answer to a check within 10 s"),
                    }
                    continue;
                }
            };
            match parse(received.channel(), received.payload()) {
                Ok(notification) => {
                    crate::metrics::notification(match &notification {
                        Notification::RevisionChange(_) => REVISION_CHANGES,
                        _ => JOB_ACTIONS,
                    });
                    return Ok(notification);
                }
                Err(error) => tracing::warn!(
                    channel = received.channel(),
                    sender_pid = received.process_id(),
                    %error,
                    "skipping a malformed notification"
                ),
            }
        }
    }

    fn connection_lost(&mut self, why: &str) {
        tracing::warn!(
            error = %why,
            "notification listener lost its connection; notifications are lost until it connects \
             again"
        );
        self.inner = None;
        self.lost = true;
    }

    /// The server process id of the listener's current connection (to find it in
    /// `pg_stat_activity`). Connects first if it is not connected; when that is a reconnect after
    /// a lost connection, the next [`recv`](Self::recv) still returns
    /// [`Notification::Reconnected`] first.
    pub async fn backend_pid(&mut self) -> Result<i32> {
        let listener = match self.inner.as_mut() {
            Some(listener) => listener,
            None => self.inner.insert(listen(&self.url, &self.cfg).await?),
        };
        Ok(sea_orm::sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(listener)
            .await?)
    }
}
