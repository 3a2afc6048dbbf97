//! `/jobs`: list (filtered, keyset pages), one job, its events, stop it, delete it.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use entity::JobStatus;
use serde::{Deserialize, Serialize};

use super::{NoFields, OptionalJson, Shared, db};
use crate::metadata::{self, jobs};
use crate::service::http::{ApiError, ErrorBody, Json, Path, Query};

/// The largest page `GET /jobs` gives.
pub const MAX_LIMIT: u64 = 1000;
/// The page size when `limit` is not given.
pub const DEFAULT_LIMIT: u64 = 100;

/// A job: the columns of its `jobs` row.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Job {
    /// Its id.
    pub id: i64,
    /// Its kind (`materialize-static`).
    pub kind: String,
    /// The worker it is assigned to, if any.
    pub node_id: Option<String>,
    /// `SCHEDULED`, `RUNNING`, `COMPLETED`, `STOP_REQUESTED`, `STOPPING`, `STOPPED`, `ERROR` or
    /// `FATAL`.
    pub status: String,
    /// What it runs: `{"namespace", "name", "manifest_hash"}`.
    pub descriptor: serde_json::Value,
    /// Why it failed (ERROR, FATAL), if it did.
    pub detail: Option<serde_json::Value>,
    /// The attempt it is on (1 for the first run).
    pub attempt: i32,
    /// When it was created.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: chrono::DateTime<chrono::FixedOffset>,
    /// When it last changed.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: chrono::DateTime<chrono::FixedOffset>,
    /// Its idempotency key: hex sha256 of `kind:namespace/name@manifest_hash`.
    pub idempotency_key: String,
}

impl From<entity::jobs::Model> for Job {
    fn from(j: entity::jobs::Model) -> Job {
        Job {
            id: j.id,
            kind: j.kind,
            node_id: j.node_id,
            status: j.status,
            descriptor: j.descriptor,
            detail: j.detail,
            attempt: j.attempt,
            created_at: j.created_at,
            updated_at: j.updated_at,
            idempotency_key: j.idempotency_key,
        }
    }
}

/// A page of jobs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobPage {
    /// The jobs, by ascending id.
    pub jobs: Vec<Job>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<i64>,
}

/// An event of a job: one per transition.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobEvent {
    /// Its id (events are ordered by it).
    pub id: i64,
    /// The job.
    pub job_id: i64,
    /// The job's node after the transition.
    pub node_id: Option<String>,
    /// The status the job moved to.
    pub event_type: String,
    /// The descriptor (SCHEDULED), the error (ERROR, FATAL), or a recovery's reason.
    pub detail: Option<serde_json::Value>,
    /// When it happened.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: chrono::DateTime<chrono::FixedOffset>,
}

/// The filter and page of `GET /jobs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// Comma-separated statuses (`RUNNING,ERROR`), `active` (SCHEDULED, RUNNING, STOP_REQUESTED,
    /// STOPPING) or `terminal` (COMPLETED, STOPPED, ERROR, FATAL); every status when absent.
    pub status: Option<String>,
    /// Jobs per page, 1 to 1000; 100 when absent.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
    /// Only jobs with a larger id: the previous page's `next_after`.
    pub after: Option<i64>,
}

/// The statuses `filter` names: 400 for an unknown one.
fn statuses(filter: &str) -> Result<Vec<JobStatus>, ApiError> {
    let mut out = Vec::new();
    for item in filter.split(',').map(str::trim) {
        match item {
            "active" => out.extend(jobs::ACTIVE),
            "terminal" => out.extend(jobs::TERMINAL),
            status => out.push(status.to_ascii_uppercase().parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "status {status:?} is unknown: use a comma-separated list of SCHEDULED, \
                     RUNNING, COMPLETED, STOP_REQUESTED, STOPPING, STOPPED, ERROR, FATAL, or \
                     `active` or `terminal`"
                ))
            })?),
        }
    }
    out.sort_by_key(|s| s.as_str());
    out.dedup();
    Ok(out)
}

/// List jobs.
///
/// Jobs by ascending id, filtered by status, a page at a time (keyset: pass the previous page's
/// `next_after` as `after`).
#[utoipa::path(
    get,
    path = "/jobs",
    operation_id = "list_jobs",
    tag = "jobs",
    params(JobsQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobPage),
        (status = 400, description = "`invalid_request`: an unknown status, a limit outside \
            1..=1000, or a parameter that is not a number", body = ErrorBody),
    ),
)]
pub async fn list(
    State(app): State<Shared>,
    Query(query): Query<JobsQuery>,
) -> Result<Json<JobPage>, ApiError> {
    let filter = match &query.status {
        Some(filter) => statuses(filter)?,
        None => Vec::new(),
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range: use 1 to {MAX_LIMIT}"
        )));
    }
    let page = db("list jobs", || {
        jobs::list(&app.db, &filter, query.after, limit)
    })
    .await?;
    let next_after = match page.last() {
        Some(last) if page.len() as u64 == limit => Some(last.id),
        _ => None,
    };
    Ok(Json(JobPage {
        jobs: page.into_iter().map(Job::from).collect(),
        next_after,
    }))
}

async fn find(app: &Shared, id: i64) -> Result<entity::jobs::Model, ApiError> {
    db("look up a job", || jobs::get(&app.db, id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
}

/// Get a job.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    operation_id = "get_job",
    tag = "jobs",
    params(("id" = i64, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 400, description = "`invalid_request`: the id is not a number", body = ErrorBody),
        (status = 404, description = "`not_found`: no such job", body = ErrorBody),
    ),
)]
pub async fn get(State(app): State<Shared>, Path(id): Path<i64>) -> Result<Json<Job>, ApiError> {
    Ok(Json(find(&app, id).await?.into()))
}

/// The largest page `GET /jobs/{id}/events` gives.
pub const MAX_EVENTS_LIMIT: u64 = 1000;
/// The page of events when `limit` is not given.
pub const DEFAULT_EVENTS_LIMIT: u64 = 100;

/// A page of a job's events.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobEventPage {
    /// The events, oldest first.
    pub events: Vec<JobEvent>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<i64>,
}

/// The page of `GET /jobs/{id}/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events per page, 1 to 1000; 100 when absent.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
    /// Only events with a larger id: the previous page's `next_after`.
    pub after: Option<i64>,
}

/// List a job's events.
///
/// Oldest first, a page at a time (keyset: pass the previous page's `next_after` as `after`): its
/// history of transitions, recoveries included. The events of a job that finished longer ago than
/// `[controller] events_retention_days` are deleted.
#[utoipa::path(
    get,
    path = "/jobs/{id}/events",
    operation_id = "list_job_events",
    tag = "jobs",
    params(("id" = i64, Path, description = "The job's id"), EventsQuery),
    responses(
        (status = 200, description = "A page of the events", body = JobEventPage),
        (status = 400, description = "`invalid_request`: the id is not a number, a limit outside \
            1..=1000, or a parameter that is not a number", body = ErrorBody),
        (status = 404, description = "`not_found`: no such job", body = ErrorBody),
    ),
)]
pub async fn events(
    State(app): State<Shared>,
    Path(id): Path<i64>,
    Query(query): Query<EventsQuery>,
) -> Result<Json<JobEventPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_EVENTS_LIMIT);
    if !(1..=MAX_EVENTS_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range: use 1 to {MAX_EVENTS_LIMIT}"
        )));
    }
    find(&app, id).await?;
    let events = db("list job events", || {
        jobs::list_events_page(&app.db, id, query.after, limit)
    })
    .await?;
    let next_after = match events.last() {
        Some(last) if events.len() as u64 == limit => Some(last.id),
        _ => None,
    };
    Ok(Json(JobEventPage {
        events: events
            .into_iter()
            .map(|e| JobEvent {
                id: e.id,
                job_id: e.job_id,
                node_id: e.node_id,
                event_type: e.event_type,
                detail: e.detail,
                created_at: e.created_at,
            })
            .collect(),
        next_after,
    }))
}

/// Ask a job to stop.
///
/// Idempotent: a SCHEDULED or RUNNING job becomes STOP_REQUESTED and its worker is told; a job
/// already stopping or stopped is returned unchanged.
#[utoipa::path(
    put,
    path = "/jobs/{id}/stop",
    operation_id = "stop_job",
    tag = "jobs",
    params(("id" = i64, Path, description = "The job's id")),
    request_body(content = Option<NoFields>, description = "None (or an empty object)"),
    responses(
        (status = 200, description = "The job, stop requested (or already stopping or stopped)",
            body = Job),
        (status = 400, description = "`invalid_request`: the id is not a number, or the \
            body is malformed JSON", body = ErrorBody),
        (status = 404, description = "`not_found`: no such job", body = ErrorBody),
        (status = 409, description = "`state_conflict`: the job is COMPLETED, ERROR or FATAL",
            body = ErrorBody),
    ),
)]
pub async fn stop(
    State(app): State<Shared>,
    Path(id): Path<i64>,
    _: OptionalJson<NoFields>,
) -> Result<Json<Job>, ApiError> {
    /// How one try ended without an answer.
    enum Failed {
        /// The job moved between the read and the request (its worker started or failed it).
        Moved(ApiError),
        /// The answer is this error.
        Final(ApiError),
    }
    let app = &app;
    // A job that moved is looked at again, a few times at most (the project's one retry
    // mechanism, `crate::retry::Backoff`).
    let backoff = crate::retry::Backoff {
        first: Duration::from_millis(10),
        max: Duration::from_millis(40),
        within: Duration::from_millis(100),
        jitter: false,
    };
    let stopped = backoff
        .run(
            |_| async move {
                let job = find(app, id).await.map_err(Failed::Final)?;
                let status = job
                    .job_status()
                    .map_err(|e| Failed::Final(super::internal("reading a job", e)))?;
                match status {
                    JobStatus::Scheduled | JobStatus::Running => {}
                    JobStatus::StopRequested | JobStatus::Stopping | JobStatus::Stopped => {
                        return Ok(job);
                    }
                    JobStatus::Completed | JobStatus::Error | JobStatus::Fatal => {
                        return Err(Failed::Final(ApiError::new(
                            StatusCode::CONFLICT,
                            "state_conflict",
                            format!(
                                "job {id} is {status}: only a SCHEDULED or RUNNING job can be \
                                 stopped"
                            ),
                        )));
                    }
                }
                match db("request a stop", || jobs::request_stop(&app.db, id)).await {
                    Ok(job) => {
                        tracing::info!(job_id = id, node = ?job.node_id, "stop requested");
                        Ok(job)
                    }
                    Err(e) if e.status == StatusCode::CONFLICT => Err(Failed::Moved(e)),
                    Err(e) => Err(Failed::Final(e)),
                }
            },
            |failed| matches!(failed, Failed::Moved(_)),
            |_, _| {},
        )
        .await;
    match stopped {
        Ok(job) => Ok(Json(job.into())),
        Err(Failed::Moved(e) | Failed::Final(e)) => Err(e),
    }
}

/// Delete a job.
///
/// Only a terminal job (COMPLETED, STOPPED, ERROR, FATAL), with its events.
#[utoipa::path(
    delete,
    path = "/jobs/{id}",
    operation_id = "delete_job",
    tag = "jobs",
    params(("id" = i64, Path, description = "The job's id")),
    request_body(content = Option<NoFields>, description = "None (or an empty object)"),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_request`: the id is not a number, or the \
            body is malformed JSON", body = ErrorBody),
        (status = 404, description = "`not_found`: no such job", body = ErrorBody),
        (status = 409, description = "`state_conflict`: the job is active (stop it first)",
            body = ErrorBody),
    ),
)]
pub async fn delete(
    State(app): State<Shared>,
    Path(id): Path<i64>,
    _: OptionalJson<NoFields>,
) -> Result<StatusCode, ApiError> {
    match crate::service::retrying("delete a job", || jobs::delete(&app.db, id)).await {
        Ok(()) => {}
        Err(metadata::Error::StateConflict { actual, .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "state_conflict",
                format!(
                    "job {id} is {actual}: only a COMPLETED, STOPPED, ERROR or FATAL job can be \
                     deleted; stop it first"
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(job_id = id, "job deleted");
    Ok(StatusCode::NO_CONTENT)
}
