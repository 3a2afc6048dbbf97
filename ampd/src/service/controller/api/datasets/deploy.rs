//! `POST /datasets/{ns}/{name}/versions/{ref}/deploy`: schedule the job that materializes a
//! version, on a named worker or the least loaded live one.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{VersionPath, invalid_manifest, load, resolve};
use crate::manifest::{self, StaticManifest};
use crate::metadata::{jobs, workers};
use crate::service::controller::Placement;
use crate::service::controller::api::{OptionalJson, Shared, db, internal};
use crate::service::http::{ApiError, ErrorBody, Json, Path};

/// `POST .../deploy`: where to run the job; without a body (or without `node_id`) the least
/// loaded live worker, or none yet when no worker is live (the scheduler places it later).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// A registered, live worker's node id.
    pub node_id: Option<String>,
}

/// What a deploy did.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A new job was scheduled.
    Created,
    /// The job is active or COMPLETED: nothing to do, here it is.
    Existing,
    /// The job had stopped or failed: it was scheduled again, as a new attempt.
    Rescheduled,
}

impl From<jobs::Scheduled> for Outcome {
    fn from(s: jobs::Scheduled) -> Outcome {
        match s {
            jobs::Scheduled::Created => Outcome::Created,
            jobs::Scheduled::Existing => Outcome::Existing,
            jobs::Scheduled::Rescheduled => Outcome::Rescheduled,
        }
    }
}

/// The job that materializes a deployed version.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Deployed {
    /// The job (see `GET /jobs/{id}`).
    pub job_id: i64,
    /// Its status.
    pub status: String,
    /// Its node, if it is placed on one.
    pub node_id: Option<String>,
    /// Its attempt.
    pub attempt: i32,
    /// What the deploy did.
    pub outcome: Outcome,
}

/// Deploy a version: schedule the job that materializes it.
///
/// The job goes to the named worker, else to the least loaded live one, else to none yet (the
/// scheduler places it when a worker is live). Deploying a version whose job is active or
/// COMPLETED returns that job; after STOPPED, ERROR or FATAL it is scheduled again as a new
/// attempt.
#[utoipa::path(
    post,
    path = "/datasets/{ns}/{name}/versions/{ref}/deploy",
    operation_id = "deploy_version",
    tag = "datasets",
    params(VersionPath),
    request_body(content = Option<Deploy>, description = "Optional: the worker to run the job on"),
    responses(
        (status = 202, description = "The job", body = Deployed),
        (status = 400, description = "`invalid_request`: a malformed name, reference, node id \
            or JSON body", body = ErrorBody),
        (status = 404, description = "`not_found`: no such version, or the named worker never \
            registered", body = ErrorBody),
        (status = 409, description = "`conflict`: the named worker is not live", body = ErrorBody),
        (status = 422, description = "`invalid_manifest`: the manifest's kind has no job that \
            materializes it; `invalid_body`: a field has the wrong type", body = ErrorBody),
    ),
)]
pub async fn deploy(
    State(app): State<Shared>,
    Path(path): Path<VersionPath>,
    OptionalJson(body): OptionalJson<Deploy>,
) -> Result<(StatusCode, Json<Deployed>), ApiError> {
    let found = resolve(&app, &path).await?;
    super::within_name_limit(
        app.max_name_len,
        &[
            ("namespace", path.namespace.as_str()),
            ("name", path.name.as_str()),
        ],
    )?;
    let VersionPath {
        namespace, name, ..
    } = path;
    if found.kind != manifest::STATIC {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_manifest",
            format!(
                "manifest {} is of kind {:?}; this ampd materializes \"static\" manifests only",
                found.hash, found.kind
            ),
        ));
    }
    // A manifest stored before a limit was lowered stays readable, but is not deployed.
    let stored = load(&app, &found).await?;
    let limits = app.limits;
    tokio::task::spawn_blocking(move || {
        StaticManifest::<usize>::parse_within(stored.get(), limits).map(drop)
    })
    .await
    .map_err(|e| internal("validating a manifest", e))?
    .map_err(invalid_manifest)?;
    let node = choose_node(&app, body.unwrap_or_default().node_id).await?;
    let descriptor = serde_json::json!({
        "namespace": namespace,
        "name": name,
        "manifest_hash": found.hash,
    });
    let (job, outcome) = db("schedule a job", || {
        jobs::schedule(
            &app.db,
            manifest::MATERIALIZE_STATIC,
            descriptor.clone(),
            node.as_deref(),
        )
    })
    .await?;
    let outcome = Outcome::from(outcome);
    tracing::info!(
        job_id = job.id,
        namespace,
        name,
        hash = found.hash,
        node = ?job.node_id,
        ?outcome,
        "deployed"
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(Deployed {
            job_id: job.id,
            status: job.status,
            node_id: job.node_id,
            attempt: job.attempt,
            outcome,
        }),
    ))
}

/// The node a deploy schedules its job on: `named` when it is a registered, live worker (else
/// `NotFound` or `Conflict`), without a name the least loaded live worker, or none when no worker
/// is live.
async fn choose_node(app: &Shared, named: Option<String>) -> Result<Option<String>, ApiError> {
    let window = app.liveness_window;
    let mut placement = db("read the live workers", || Placement::read(&app.db, window)).await?;
    Ok(match named {
        Some(node) => {
            workers::validate_node_id(&node)?;
            let known = db("look up a worker", || workers::get(&app.db, &node)).await?;
            if known.is_none() {
                return Err(ApiError::not_found(format!(
                    "worker {node} has never registered"
                )));
            }
            if !placement.is_live(&node) {
                return Err(ApiError::conflict(format!(
                    "worker {node} is not live (no heartbeat within {} ms); name a live worker \
                     or leave node_id out",
                    window.as_millis()
                )));
            }
            Some(node)
        }
        None => placement.pick(),
    })
}
