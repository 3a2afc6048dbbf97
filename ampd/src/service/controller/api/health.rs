//! `GET /healthz`, `GET /readyz`, `GET /openapi.json`.

use std::time::Duration;

use axum::extract::State;
use serde::Serialize;

use super::Shared;
use crate::migrate;
use crate::service::http::{ApiError, ErrorBody, Json};

/// How long `/readyz` waits for the database before it answers 503.
const READY_WITHIN: Duration = Duration::from_secs(5);

/// The answer of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    /// `ok` (the process is up) or `ready` (and the database is usable).
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// The process is up.
///
/// Always open, even when a token is configured.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    responses((status = 200, description = "The process is up", body = Status)),
)]
pub async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// The controller is ready.
///
/// The database answers (within 5 s) and its schema is at this binary's head, or ahead of it only
/// by migrations recorded as compatible with it; 503 with the reason otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "`unavailable`: the database does not answer, or its schema \
            is not this binary's (the message says why)", body = ErrorBody),
    ),
)]
pub async fn readyz(State(app): State<Shared>) -> Result<Json<Status>, ApiError> {
    let migrations = (app.migrations)();
    // A database a newer ampd migrated with compatible migrations is one this binary runs on.
    let check = migrate::verify_for_service(&app.db, &migrations);
    let reason = match tokio::time::timeout(READY_WITHIN, check).await {
        Ok(Ok(_)) => return Ok(Json(Status { status: "ready" })),
        Ok(Err(e)) => crate::redact::redact(&e.to_string()),
        Err(_) => format!(
            "the metadata database did not answer within {} s",
            READY_WITHIN.as_secs()
        ),
    };
    tracing::warn!(reason = %reason, "not ready");
    Err(ApiError::unavailable(format!("not ready: {reason}")))
}

/// This document.
///
/// The OpenAPI 3.1 description of every route, generated from the code.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "health",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
)]
pub async fn openapi_json(State(app): State<Shared>) -> Json<serde_json::Value> {
    Json(app.openapi.clone())
}
