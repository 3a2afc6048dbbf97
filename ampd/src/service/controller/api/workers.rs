//! `/workers`: the registered workers, whether each is live, and their active jobs.

use std::collections::HashMap;

use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::jobs::Job;
use super::{Shared, db};
use crate::metadata::workers::Liveness;
use crate::metadata::{jobs, workers};
use crate::service::http::{ApiError, ErrorBody, Json, Path, Query};

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

fn view(w: entity::workers::Model, live: bool, active: Vec<entity::jobs::Model>) -> Worker {
    Worker {
        node_id: w.node_id,
        live,
        heartbeat_at: w.heartbeat_at,
        registered_at: w.registered_at,
        created_at: w.created_at,
        info: w.info,
        active_jobs: active.into_iter().map(Job::from).collect(),
    }
}

/// The largest page `GET /workers` gives.
pub const MAX_LIMIT: u64 = 1000;
/// The page size when `limit` is not given.
pub const DEFAULT_LIMIT: u64 = 100;

/// A page of workers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkerPage {
    /// The workers, by node id.
    pub workers: Vec<Worker>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<String>,
}

/// The filter and page of `GET /workers`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WorkersQuery {
    /// `true`: only the live workers; `false`: only those that are not; every worker ever
    /// registered (and not yet removed by `[controller] workers_retention_days`) when absent.
    pub live: Option<bool>,
    /// Workers per page, 1 to 1000; 100 when absent.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
    /// Only workers whose node id sorts after this one: the previous page's `next_after`.
    pub after: Option<String>,
}

/// List the workers.
///
/// Workers by node id, with their liveness and active jobs, a page at a time (keyset: pass the
/// previous page's `next_after` as `after`); `live` filters by liveness.
#[utoipa::path(
    get,
    path = "/workers",
    operation_id = "list_workers",
    tag = "workers",
    params(WorkersQuery),
    responses(
        (status = 200, description = "A page of workers", body = WorkerPage),
        (status = 400, description = "`invalid_request`: a limit outside 1..=1000, a limit that \
            is not a number, or `live` other than true or false", body = ErrorBody),
    ),
)]
pub async fn list(
    State(app): State<Shared>,
    Query(query): Query<WorkersQuery>,
) -> Result<Json<WorkerPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range: use 1 to {MAX_LIMIT}"
        )));
    }
    let liveness = match query.live {
        None => Liveness::Any,
        Some(true) => Liveness::Live,
        Some(false) => Liveness::NotLive,
    };
    // Two statements whatever the number of workers: the page, then the active jobs of its workers.
    let page = db("list workers", || {
        workers::list_page(
            &app.db,
            app.liveness_window,
            liveness,
            query.after.as_deref(),
            limit,
        )
    })
    .await?;
    let nodes: Vec<String> = page.iter().map(|(w, _)| w.node_id.clone()).collect();
    let active = db("list the workers' jobs", || {
        jobs::list_active_for_nodes(&app.db, &nodes)
    })
    .await?;
    let mut active_of: HashMap<String, Vec<entity::jobs::Model>> = HashMap::new();
    for job in active {
        if let Some(node) = job.node_id.clone() {
            active_of.entry(node).or_default().push(job);
        }
    }
    let next_after = match page.last() {
        Some((last, _)) if page.len() as u64 == limit => Some(last.node_id.clone()),
        _ => None,
    };
    let workers = page
        .into_iter()
        .map(|(w, live)| {
            let active = active_of.remove(&w.node_id).unwrap_or_default();
            view(w, live, active)
        })
        .collect();
    Ok(Json(WorkerPage {
        workers,
        next_after,
    }))
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
    let live = db("check a worker's liveness", || {
        workers::is_live(&app.db, &found.node_id, app.liveness_window)
    })
    .await?;
    let active = db("list a worker's jobs", || {
        jobs::list_active_for_node(&app.db, &found.node_id)
    })
    .await?;
    Ok(Json(view(found, live, active)))
}
