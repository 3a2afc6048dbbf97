//! `GET /datasets/{ns}/{name}/versions/{ref}/tables`: a version's tables, each with its active
//! revision and files, and its revisions.

use axum::extract::State;
use serde::Serialize;

use super::{VersionErrors, VersionPath, load, resolve};
use crate::metadata::{self, revisions};
use crate::service::controller::api::{Shared, db};
use crate::service::http::{ApiError, Json, Path};

/// A file of a revision.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct File {
    /// Its name in the revision's directory (`part-00000.jsonl`, ...).
    pub name: String,
    /// Its size in bytes.
    pub size: i64,
    /// Rows in it.
    pub rows: Option<u64>,
    /// Hex sha256 of its bytes.
    pub sha256: Option<String>,
}

/// A revision of a table: a directory of files under the data directory.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Revision {
    /// Its id (`POST /revisions/{id}/activate` rolls back to it).
    pub id: i64,
    /// Its directory, relative to the data directory.
    pub path: String,
    /// When it was created.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: chrono::DateTime<chrono::FixedOffset>,
    /// When it was last made active (never, if absent).
    pub activated_at: Option<String>,
    /// When its files are due for deletion (while it is scheduled for garbage collection).
    pub gc_expires_at: Option<String>,
    /// Rows in all its files.
    pub rows: Option<u64>,
}

/// The active revision of a table, with its files in order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActiveRevision {
    /// Its id.
    pub id: i64,
    /// Its directory, relative to the data directory.
    pub path: String,
    /// When it was made active.
    pub activated_at: Option<String>,
    /// Rows in all its files.
    pub rows: Option<u64>,
    /// Its files, in the order their rows are served.
    pub files: Vec<File>,
}

/// A table of a manifest.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Table {
    /// The table's name.
    pub name: String,
    /// The physical table's id, once a job has started materializing it.
    pub table_id: Option<i64>,
    /// The revision served, if any.
    pub active_revision: Option<ActiveRevision>,
    /// Every revision of the table, oldest first.
    pub revisions: Vec<Revision>,
}

/// The tables of a version.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Tables {
    /// The manifest's hash.
    pub hash: String,
    /// Its tables, by name.
    pub tables: Vec<Table>,
}

/// List the tables of a version.
///
/// Each table of the manifest with its active revision (id, path, files, rows, activated at), or
/// null before one is completed, and the list of its revisions.
#[utoipa::path(
    get,
    path = "/datasets/{ns}/{name}/versions/{ref}/tables",
    operation_id = "list_tables",
    tag = "datasets",
    params(VersionPath),
    responses(
        (status = 200, description = "The tables", body = Tables),
        VersionErrors,
    ),
)]
pub async fn tables(
    State(app): State<Shared>,
    Path(path): Path<VersionPath>,
) -> Result<Json<Tables>, ApiError> {
    let found = resolve(&app, &path).await?;
    let VersionPath {
        namespace, name, ..
    } = path;
    let manifest = load(&app, &found).await?;
    let physical = db("list tables", || {
        revisions::list_tables_of_manifest(&app.db, &namespace, &name, &found.hash)
    })
    .await?;
    // The manifest's tables, and any table a job registered for it.
    let mut names: Vec<String> = manifest
        .get("tables")
        .and_then(|t| t.as_object())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();
    names.extend(physical.iter().map(|t| t.table_name.clone()));
    names.sort();
    names.dedup();
    let mut tables = Vec::with_capacity(names.len());
    for table_name in names {
        let table = physical.iter().find(|t| t.table_name == table_name);
        tables.push(table_view(&app, table_name, table).await?);
    }
    Ok(Json(Tables {
        hash: found.hash,
        tables,
    }))
}

fn meta_str(meta: &serde_json::Value, key: &str) -> Option<String> {
    meta.get(key).and_then(|v| v.as_str()).map(str::to_owned)
}

fn meta_u64(meta: &serde_json::Value, key: &str) -> Option<u64> {
    meta.get(key).and_then(|v| v.as_u64())
}

/// Table `name` (physical table `table`, if one is registered) with its active revision, that
/// revision's files, and its revisions.
pub(crate) async fn table_view(
    app: &Shared,
    name: String,
    table: Option<&entity::physical_tables::Model>,
) -> Result<Table, ApiError> {
    let Some(table) = table else {
        return Ok(Table {
            name,
            table_id: None,
            active_revision: None,
            revisions: Vec::new(),
        });
    };
    let all = db("list revisions", || revisions::list(&app.db, table.id)).await?;
    let active = match all.iter().find(|r| Some(r.id) == table.active_revision_id) {
        Some(r) => {
            let files = db("list files", || metadata::files::list(&app.db, r.id)).await?;
            Some(ActiveRevision {
                id: r.id,
                path: r.path.clone(),
                activated_at: meta_str(&r.metadata, "activated_at"),
                rows: meta_u64(&r.metadata, "rows"),
                files: files
                    .into_iter()
                    .map(|f| File {
                        rows: meta_u64(&f.metadata, "rows"),
                        sha256: meta_str(&f.metadata, "sha256"),
                        name: f.file_name,
                        size: f.object_size,
                    })
                    .collect(),
            })
        }
        None => None,
    };
    Ok(Table {
        name,
        table_id: Some(table.id),
        active_revision: active,
        revisions: all
            .into_iter()
            .map(|r| Revision {
                activated_at: meta_str(&r.metadata, "activated_at"),
                gc_expires_at: meta_str(&r.metadata, "gc_expires_at"),
                rows: meta_u64(&r.metadata, "rows"),
                id: r.id,
                path: r.path,
                created_at: r.created_at,
            })
            .collect(),
    })
}
