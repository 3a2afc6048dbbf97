//! `GET /datasets/{ns}/{name}/versions/{ref}/tables`: a version's tables, each with its active
//! revision and files, and its revisions.

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use serde::Serialize;

use super::{VersionErrors, VersionPath, load, resolve};
use crate::manifest;
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
    // Three statements whatever the number of tables: the tables, their revisions, the active
    // revisions' files.
    let physical = db("list tables", || {
        revisions::list_tables_of_manifest(&app.db, &namespace, &name, &found.hash)
    })
    .await?;
    let all_revisions = db("list revisions", || {
        revisions::list_of_manifest(&app.db, &namespace, &name, &found.hash)
    })
    .await?;
    let active_files = db("list files", || {
        metadata::files::list_active_of_manifest(&app.db, &namespace, &name, &found.hash)
    })
    .await?;
    let mut revisions_of = group(all_revisions, |r| r.physical_table_id);
    let mut files_of = group(active_files, |f| f.revision_id);
    // The manifest's tables, and any table a job registered for it.
    let mut by_name: BTreeMap<String, Option<entity::physical_tables::Model>> =
        manifest::table_names(manifest.get())
            .into_iter()
            .map(|k| (k, None))
            .collect();
    for table in physical {
        by_name.insert(table.table_name.clone(), Some(table));
    }
    let tables = by_name
        .into_iter()
        .map(|(table_name, table)| match table {
            Some(table) => {
                let revisions = revisions_of.remove(&table.id).unwrap_or_default();
                let files = table
                    .active_revision_id
                    .and_then(|id| files_of.remove(&id))
                    .unwrap_or_default();
                view(table_name, &table, revisions, files)
            }
            None => Table {
                name: table_name,
                table_id: None,
                active_revision: None,
                revisions: Vec::new(),
            },
        })
        .collect();
    Ok(Json(Tables {
        hash: found.hash,
        tables,
    }))
}

/// `items` grouped by `key`, each group in the order `items` came in.
fn group<T>(items: Vec<T>, key: impl Fn(&T) -> i64) -> HashMap<i64, Vec<T>> {
    let mut out: HashMap<i64, Vec<T>> = HashMap::new();
    for item in items {
        out.entry(key(&item)).or_default().push(item);
    }
    out
}

fn meta_str(meta: &serde_json::Value, key: &str) -> Option<String> {
    meta.get(key).and_then(|v| v.as_str()).map(str::to_owned)
}

fn meta_u64(meta: &serde_json::Value, key: &str) -> Option<u64> {
    meta.get(key).and_then(|v| v.as_u64())
}

/// Table `name` (physical table `table`) with its active revision, that revision's files, and its
/// revisions, read from the database (two statements).
pub(crate) async fn table_view(
    app: &Shared,
    name: String,
    table: &entity::physical_tables::Model,
) -> Result<Table, ApiError> {
    let all = db("list revisions", || revisions::list(&app.db, table.id)).await?;
    let files = match table.active_revision_id {
        Some(active) => db("list files", || metadata::files::list(&app.db, active)).await?,
        None => Vec::new(),
    };
    Ok(view(name, table, all, files))
}

/// Table `name` (physical table `table`) from its revisions `all` (oldest first) and the files of
/// its active revision (`files`, by id).
fn view(
    name: String,
    table: &entity::physical_tables::Model,
    all: Vec<entity::physical_table_revisions::Model>,
    files: Vec<entity::file_metadata::Model>,
) -> Table {
    let active = all
        .iter()
        .find(|r| Some(r.id) == table.active_revision_id)
        .map(|r| ActiveRevision {
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
        });
    Table {
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
    }
}
