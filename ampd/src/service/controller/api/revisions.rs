//! `/revisions`: roll a table back to an earlier revision.

use axum::extract::State;
use serde::Serialize;

use super::datasets::tables::{Table, table_view};
use super::{NoFields, OptionalJson, Shared, db};
use crate::metadata::revisions;
use crate::service::http::{ApiError, ErrorBody, Json, Path};

/// A table after a roll back.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Activated {
    /// The dataset's namespace.
    pub namespace: String,
    /// The dataset's name.
    pub name: String,
    /// The manifest the table belongs to.
    pub manifest_hash: String,
    /// The revision that was active before (its files are now scheduled for deletion after
    /// `[worker] gc_grace_secs`), if another one was.
    pub previous_revision_id: Option<i64>,
    /// The table, with its new active revision.
    pub table: Table,
}

/// Roll a table back to an earlier revision.
///
/// The revision becomes its table's active revision again. The revision it replaces is scheduled
/// for deletion after `[worker] gc_grace_secs`; a revision that was itself scheduled has its
/// schedule cancelled, unless it has expired.
#[utoipa::path(
    post,
    path = "/revisions/{id}/activate",
    operation_id = "activate_revision",
    tag = "revisions",
    params(("id" = i64, Path, description = "The revision's id")),
    request_body(content = Option<NoFields>, description = "None (or an empty object)"),
    responses(
        (status = 200, description = "The table's new state", body = Activated),
        (status = 400, description = "`invalid_request`: the id is not a number, or the \
            body is malformed JSON", body = ErrorBody),
        (status = 404, description = "`not_found`: no such revision", body = ErrorBody),
        (status = 409, description = "`conflict`: its files are due for deletion (or gone), or \
            the job that wrote it never completed", body = ErrorBody),
    ),
)]
pub async fn activate(
    State(app): State<Shared>,
    Path(id): Path<i64>,
    _: OptionalJson<NoFields>,
) -> Result<Json<Activated>, ApiError> {
    let revision = db("look up a revision", || revisions::get(&app.db, id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("revision {id} not found")))?;
    let table_id = revision.physical_table_id;
    let done = db("activate a revision", || {
        revisions::activate(&app.db, table_id, id, app.gc_grace)
    })
    .await?;
    tracing::info!(
        revision_id = id,
        table_id,
        previous = ?done.previous,
        "revision activated"
    );
    let table = done.table;
    let view = table_view(&app, table.table_name.clone(), &table).await?;
    Ok(Json(Activated {
        namespace: table.dataset_namespace,
        name: table.dataset_name,
        manifest_hash: table.manifest_hash,
        previous_revision_id: done.previous.filter(|p| *p != id),
        table: view,
    }))
}
