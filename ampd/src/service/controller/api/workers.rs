//! `/workers`: the registered workers, whether each is live, and their active jobs.

use axum::extract::State;
use serde::Serialize;

use super::jobs::Job;
use super::{Shared, db};
use crate::metadata::{jobs, workers};
use crate::service::http::{ApiError, ErrorBody, Json, Path};

/// A worker node.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Worker {
    /// Its node id.
    pub node_id: String,
    /// Whether its last heartbeat is within `[worker] liveness_window_ms` (by the database's
    /// clock). A worker that shut down cleanly is not live from then on.
    pub live: bool,
    /// Its last heartbeat (the Unix epoch or earlier once it has signed off).
    #[schema(value_type = String, format = DateTime)]
    pub heartbeat_at: chrono::DateTime<chrono::FixedOffset>,
    /// When it last registered (started).
    #[schema(value_type = String, format = DateTime)]
    pub registered_at: chrono::DateTime<chrono::FixedOffset>,
    /// When it first registered.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: chrono::DateTime<chrono::FixedOffset>,
    /// What it reported about itself (version, build).
    pub info: serde_json::Value,
    /// Its active jobs (SCHEDULED, RUNNING, STOP_REQUESTED, STOPPING), by id.
    pub active_jobs: Vec<Job>,
}

async fn view(app: &Shared, w: entity::workers::Model, live: bool) -> Result<Worker, ApiError> {
    let active = db("list a worker's jobs", || {
        jobs::list_active_for_node(&app.db, &w.node_id)
    })
    .await?;
    Ok(Worker {
        node_id: w.node_id,
        live,
        heartbeat_at: w.heartbeat_at,
        registered_at: w.registered_at,
        created_at: w.created_at,
        info: w.info,
        active_jobs: active.into_iter().map(Job::from).collect(),
    })
}

async fn live_nodes(app: &Shared) -> Result<Vec<String>, ApiError> {
    let live = db("list live workers", || {
        workers::list_live(&app.db, app.liveness_window)
    })
    .await?;
    Ok(live.into_iter().map(|w| w.node_id).collect())
}

/// List the workers.
///
/// Every worker ever registered, by node id, with its liveness and active jobs.
#[utoipa::path(
    get,
    path = "/workers",
    operation_id = "list_workers",
    tag = "workers",
    responses((status = 200, description = "The workers", body = [Worker])),
)]
pub async fn list(State(app): State<Shared>) -> Result<Json<Vec<Worker>>, ApiError> {
    let all = db("list workers", || workers::list(&app.db)).await?;
    let live = live_nodes(&app).await?;
    let mut out = Vec::with_capacity(all.len());
    for w in all {
        let is_live = live.contains(&w.node_id);
        out.push(view(&app, w, is_live).await?);
    }
    Ok(Json(out))
}

/// Get a worker.
#[utoipa::path(
    get,
    path = "/workers/{node_id}",
    operation_id = "get_worker",
    tag = "workers",
    params(("node_id" = String, Path, description = "The worker's node id")),
    responses(
        (status = 200, description = "The worker", body = Worker),
        (status = 404, description = "`not_found`: no worker of that id has registered",
            body = ErrorBody),
    ),
)]
pub async fn get(
    State(app): State<Shared>,
    Path(node_id): Path<String>,
) -> Result<Json<Worker>, ApiError> {
    let found = db("look up a worker", || workers::get(&app.db, &node_id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("worker {node_id} not found")))?;
    let live = live_nodes(&app).await?.contains(&found.node_id);
    Ok(Json(view(&app, found, live).await?))
}
