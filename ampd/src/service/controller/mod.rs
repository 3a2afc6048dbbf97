//! The controller service: the admin API ([`api`]), the scheduler loop ([`scheduler`]) and the
//! retention loop ([`retention`]).

pub mod api;
pub mod manifests;
pub mod retention;
pub mod scheduler;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::migrate::MigrationSet;

use super::ServiceError;
use super::http::{self, BearerToken};
use super::listen;
use super::metrics::{DbGauges, Scrape};
pub use scheduler::{Placement, Policy, reconcile};

/// How long requests in flight may take to finish once a stop is asked for; then they are cut.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs the controller until `shutdown` is cancelled: binds `[controller] admin_addr` first (an
/// address in use is [`ServiceError::Bind`]), then serves the admin API and runs the scheduler
/// loop. `migrations` are the ones this binary runs (`/readyz` checks the schema against them).
pub async fn run(
    db: DatabaseConnection,
    config: Arc<Config>,
    migrations: fn() -> MigrationSet,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let listener = http::bind(config.controller.admin_addr, "controller.admin_addr").await?;
    let state = api::AppState::new(db.clone(), &config, migrations);
    let max_body = usize::try_from(config.controller.max_body_bytes).unwrap_or(usize::MAX);
    let token = (config.controller.admin_token.as_ref())
        .map(|t| BearerToken::new(t.expose()).metrics_open(config.controller.metrics_open));
    let scrape = config.controller.metrics.then(|| {
        crate::metrics::install();
        let window = Duration::from_millis(config.worker.liveness_window_ms);
        let gauges = DbGauges::new(db.clone(), window);
        Scrape::new(db.clone(), Some(gauges)).routes()
    });
    let router = api::router(state, max_body, token, scrape);
    let limits = listen::Limits::new(&config.http, config.controller.admin_addr, max_body);
    tracing::info!(addr = %config.controller.admin_addr, "admin API listening");

    // The API and the scheduler stop together: on the shutdown token, or when the API fails.
    let stop = shutdown.child_token();
    let serve = {
        let stop = stop.clone();
        async move {
            let served = tokio::select! {
                served = listen::serve(listener, router, &limits, stop.clone()) => served,
                () = async { stop.cancelled().await; tokio::time::sleep(DRAIN).await } => {
                    tracing::warn!("requests still running after {DRAIN:?}; cut off");
                    Ok(())
                }
            };
            stop.cancel();
            served
        }
    };
    let policy = Policy::new(&config.controller, &config.worker);
    let interval = Duration::from_millis(config.controller.reconcile_interval_ms);
    let schedule = scheduler::run(db.clone(), policy, interval, stop.clone());
    let retention = retention::run(
        db,
        retention::Retention::new(&config.controller, &config.worker),
        Duration::from_secs(config.controller.retention_interval_secs),
        stop.clone(),
    );
    tracing::info!("controller started");
    let (served, (), ()) = tokio::join!(serve, schedule, retention);
    tracing::info!("controller stopped");
    served.map_err(|source| ServiceError::Io {
        what: format!("serving the admin API on {}", config.controller.admin_addr),
        source,
    })
}
