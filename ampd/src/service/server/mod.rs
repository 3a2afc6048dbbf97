//! The server service: serves the rows of every table's active revision over HTTP
//! ([`routes`]), from the files under `[storage] data_dir` ([`rows`]), as its [`view`] names them.
//!
//! The view follows `revision_changes` (each notification re-reads the table it names), is re-read
//! whole every `[server] reconcile_interval_ms` and after the listener reconnects (notifications
//! sent while it was disconnected are lost), and a request for a table the view does not know
//! re-reads it from the database. So a new revision, or a roll back, is served without a restart.

pub mod routes;
pub mod rows;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metadata::notifications::{Listener, Notification, RevisionChange};

use super::{ServiceError, http, listen, retrying, until_stopped};
use routes::AppState;
use view::View;

/// The largest request body the server reads: it answers `GET`s, whose bodies it ignores.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long responses still streaming when a stop is asked for may go on before they are cut off.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Runs the server until `shutdown` is cancelled: binds `[server] addr` (a port in use is
/// [`ServiceError::Bind`]), loads the view, then serves and follows the revision changes.
pub async fn run(
    db: DatabaseConnection,
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let listener = http::bind(config.server.addr, "server.addr").await?;
    let data_dir = config.storage.data_dir().to_path_buf();
    if !data_dir.is_dir() {
        tracing::warn!(
            data_dir = %data_dir.display(),
            "the data directory does not exist (yet): no table can be served until it does"
        );
    }
    let Some(notifications) =
        until_stopped(&shutdown, Listener::connect(&config.metadata_db)).await
    else {
        return Ok(());
    };
    let notifications = notifications?;
    let view = Arc::new(View::new());
    let loaded = until_stopped(&shutdown, reload(&db, &view, "load")).await;
    if loaded.is_none() {
        return Ok(());
    }
    let abort = CancellationToken::new();
    let state = Arc::new(AppState {
        db: db.clone(),
        view: view.clone(),
        data_dir,
        abort: abort.clone(),
        max_row_bytes: usize::try_from(config.server.max_row_bytes).unwrap_or(usize::MAX),
    });
    tracing::info!(addr = %config.server.addr, "server started");
    let every = Duration::from_millis(config.server.reconcile_interval_ms);
    // The view is followed until the server stops serving, for whatever reason.
    let following = shutdown.child_token();
    let serving = async {
        let limits = listen::Limits::new(&config.http, config.server.addr, MAX_BODY_BYTES);
        let scrape = (config.server.metrics).then(|| {
            crate::metrics::install();
            super::metrics::Scrape::new(db.clone(), None).routes()
        });
        let router = routes::router(state, scrape);
        let served = serve(listener, router, &limits, &shutdown, &abort).await;
        following.cancel();
        served
    };
    let (served, ()) = tokio::join!(
        serving,
        follow(&db, &view, notifications, every, &following)
    );
    tracing::info!("server stopped");
    served
}

/// Serves until `shutdown` is cancelled, then lets responses in flight finish for [`DRAIN`] before
/// cutting them off (`abort`).
async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: &listen::Limits,
    shutdown: &CancellationToken,
    abort: &CancellationToken,
) -> Result<(), ServiceError> {
    let serving = listen::serve(listener, router, limits, shutdown.clone());
    let cut_off = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN).await;
        tracing::warn!("responses still in flight after {DRAIN:?}; cutting them off");
        abort.cancel();
        // A client that reads nothing more never sees its response end: stop waiting for it.
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tokio::select! {
        served = serving => served.map_err(|source| ServiceError::Io {
            what: "serving HTTP".into(),
            source,
        }),
        () = cut_off => Ok(()),
    }
}

/// Re-reads the whole view (retrying transient errors); a failure is logged and left to the next
/// re-read.
async fn reload(db: &DatabaseConnection, view: &View, why: &str) {
    match retrying("re-reading the active revisions", || view.reload(db)).await {
        Ok(()) => {
            let (tables, active) = view.counts();
            tracing::debug!(why, tables, active, "active revisions read");
        }
        Err(error) => tracing::warn!(
            why,
            %error,
            "reading the active revisions failed; trying again at the next re-read"
        ),
    }
}

/// Keeps the view current until `shutdown` is cancelled: each `revision_changes` notification
/// re-reads its table, a reconnected listener and every tick of `every` the whole view.
async fn follow(
    db: &DatabaseConnection,
    view: &View,
    mut notifications: Listener,
    every: Duration,
    shutdown: &CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let work = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => Work::Reload("timer"),
            received = notifications.recv() => match received {
                Ok(Notification::RevisionChange(change)) => Work::Table(change),
                Ok(Notification::Reconnected) => Work::Reload("listener reconnected"),
                Ok(Notification::JobAction(_)) => continue,
                Err(error) => {
                    tracing::warn!(%error, "notification listener failed; retrying");
                    Work::Pause
                }
            },
        };
        let done = until_stopped(shutdown, async {
            match work {
                Work::Reload(why) => reload(db, view, why).await,
                Work::Table(change) => {
                    let table_id = change.physical_table_id;
                    let refreshed =
                        retrying("re-reading a table", || view.refresh(db, table_id)).await;
                    match refreshed {
                        Ok(_) => tracing::info!(
                            physical_table_id = table_id,
                            revision_id = change.revision_id,
                            "active revision changed"
                        ),
                        Err(error) => tracing::warn!(
                            physical_table_id = table_id,
                            %error,
                            "re-reading a table failed; trying again at the next re-read"
                        ),
                    }
                }
                Work::Pause => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        })
        .await;
        if done.is_none() {
            return;
        }
    }
}

/// What the loop does next.
enum Work {
    /// Re-read the whole view, and why.
    Reload(&'static str),
    /// Re-read the table a notification named.
    Table(RevisionChange),
    /// Wait a little after a listener error.
    Pause,
}
