//! The server's routes: `GET /healthz`, and
//! `GET /datasets/{namespace}/{name}/versions/{ref}/tables/{table}`, the rows of a table's active
//! revision as JSON Lines or CSV.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::rows::{self, OpenError, Opened};
use super::view::{Active, TableKey, View};
use crate::manifest::FORMAT_JSONL;
use crate::metadata::datasets;
use crate::service::http::{self, ApiError, Json, Path, Query};

/// The route of a table's rows.
pub const ROWS_ROUTE: &str = "/datasets/{namespace}/{name}/versions/{reference}/tables/{table}";

/// The media type of JSON Lines responses.
pub const JSONL_TYPE: &str = "application/x-ndjson";
/// The media type of CSV responses.
pub const CSV_TYPE: &str = "text/csv; charset=utf-8";

/// What the routes share.
pub struct AppState {
    /// The metadata database.
    pub db: DatabaseConnection,
    /// The active revisions.
    pub view: Arc<View>,
    /// `[storage] data_dir`.
    pub data_dir: PathBuf,
    /// Cancelled when responses still streaming must be cut off (the server is stopping).
    pub abort: CancellationToken,
    /// `[server] max_row_bytes`: the longest row served as CSV.
    pub max_row_bytes: usize,
}

/// The server's router, with request logs; with `metrics` (the `/metrics` route), HTTP metrics.
pub fn router(state: Arc<AppState>, metrics: Option<Router>) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route(ROWS_ROUTE, get(table_rows))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    if let Some(scrape) = metrics {
        router = crate::service::metrics::track(router.merge(scrape), "server");
    }
    http::with_request_logs(router)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route {}; the server answers GET /healthz, GET /metrics and GET \
         /datasets/{{namespace}}/{{name}}/versions/{{ref}}/tables/{{table}}",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed here: the server only answers GET"),
    )
}

/// How the rows are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// JSON Lines: one JSON object per row (the default).
    Jsonl,
    /// CSV with a header row.
    Csv,
}

impl Format {
    /// `?format=` when given (`jsonl` or `csv`; anything else is a 400), else CSV when the
    /// `Accept` header prefers `text/csv` to JSON Lines, else JSON Lines.
    pub fn choose(format: Option<&str>, headers: &HeaderMap) -> Result<Format, ApiError> {
        match format.map(str::to_ascii_lowercase).as_deref() {
            Some("jsonl" | "ndjson") => return Ok(Format::Jsonl),
            Some("csv") => return Ok(Format::Csv),
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "unknown format {:?}: use format=jsonl (the default) or format=csv",
                    format.unwrap_or_default()
                )));
            }
            None => {}
        }
        let accept = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        Ok(if prefers_csv(&accept) {
            Format::Csv
        } else {
            Format::Jsonl
        })
    }
}

/// Whether an `Accept` header value ranks `text/csv` above JSON Lines (`application/x-ndjson`,
/// `application/jsonl`, `application/json`, or a wildcard): by quality, then by which comes first.
fn prefers_csv(accept: &str) -> bool {
    // (quality, position) of the best range of each; a later position ranks lower.
    let mut csv: Option<(f32, usize)> = None;
    let mut jsonl: Option<(f32, usize)> = None;
    for (position, range) in accept.split(',').enumerate() {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = match media.as_str() {
            "text/csv" => &mut csv,
            "application/x-ndjson"
            | "application/jsonl"
            | "application/json"
            | "*/*"
            | "application/*" => &mut jsonl,
            _ => continue,
        };
        if slot.is_none_or(|(q, _)| quality > q) {
            *slot = Some((quality, position));
        }
    }
    match (csv, jsonl) {
        (Some((q, _)), _) if q <= 0.0 => false,
        (Some(_), None) => true,
        (Some((cq, cp)), Some((jq, jp))) => cq > jq || (cq == jq && cp < jp),
        (None, _) => false,
    }
}

/// The query of the rows route.
#[derive(Debug, Deserialize)]
struct RowsQuery {
    /// `jsonl` or `csv`.
    format: Option<String>,
}

async fn table_rows(
    State(state): State<Arc<AppState>>,
    Path((namespace, name, reference, table)): Path<(String, String, String, String)>,
    Query(query): Query<RowsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let format = Format::choose(query.format.as_deref(), &headers)?;
    let dataset = format!("{namespace}/{name}@{reference}");
    let manifest = datasets::resolve(&state.db, &dataset).await?;
    let key = TableKey {
        namespace,
        name,
        manifest_hash: manifest.hash,
        table,
    };
    let revision = state.active(&key, &dataset).await?;
    let opened = state.open(revision).await?;
    state.respond(format, opened)
}

fn internal(error: &OpenError) -> ApiError {
    tracing::error!(%error, "cannot serve a revision");
    match error {
        // Says nothing about the server's files that the database does not already say.
        OpenError::UnsafePath { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            error.to_string(),
        ),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the table's files cannot be read; see the server's log",
        ),
    }
}

impl AppState {
    /// The active revision of the table `key` names (re-read from the database when the view does
    /// not know one), or a 404.
    async fn active(&self, key: &TableKey, dataset: &str) -> Result<Arc<Active>, ApiError> {
        let table = match self.view.get(key) {
            Some(table) if table.active.is_some() => table,
            _ => self.view.find(&self.db, key).await?.ok_or_else(|| {
                ApiError::not_found(format!("{dataset} has no table {:?}", key.table))
            })?,
        };
        table.active.ok_or_else(|| {
            ApiError::not_found(format!(
                "table {:?} of {dataset} has no active revision yet: deploy the dataset first",
                key.table
            ))
        })
    }

    /// Opens the files of `revision`. When one is gone (the view named a revision that has since
    /// been replaced and collected), re-reads the table once and opens its current revision, or
    /// answers 503.
    async fn open(&self, revision: Arc<Active>) -> Result<Opened, ApiError> {
        let table_id = revision.table_id;
        let gone = match rows::open(&self.data_dir, revision).await {
            Ok(opened) => return Ok(opened),
            Err(OpenError::Gone(path)) => path,
            Err(e) => return Err(internal(&e)),
        };
        tracing::info!(
            table_id,
            path = %gone.display(),
            "a file of the revision in view is gone; re-reading the table"
        );
        let retry_later = |why: String| {
            ApiError::unavailable(format!(
                "the table's active revision changed while it was being read ({why}); try again"
            ))
        };
        let current = self
            .view
            .refresh(&self.db, table_id)
            .await
            .map_err(|e| retry_later(format!("re-reading it failed: {e}")))?
            .and_then(|table| table.active)
            .ok_or_else(|| ApiError::not_found("the table no longer has an active revision"))?;
        let revision_id = current.revision_id;
        match rows::open(&self.data_dir, current).await {
            Ok(opened) => Ok(opened),
            Err(OpenError::Gone(_)) => Err(retry_later(format!(
                "a file of its revision {revision_id} is gone too"
            ))),
            Err(e) => Err(internal(&e)),
        }
    }

    fn respond(&self, format: Format, opened: Opened) -> Result<Response, ApiError> {
        let revision = &opened.revision;
        let meta = match &revision.meta {
            Some(meta) if meta.format == FORMAT_JSONL => meta,
            other => {
                let what = other.as_ref().map_or_else(
                    || "no format and columns in its metadata".to_owned(),
                    |m| format!("format {:?}", m.format),
                );
                tracing::error!(
                    revision_id = revision.revision_id,
                    "cannot serve a revision with {what}"
                );
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!(
                        "revision {} has {what}; this server serves revisions written as JSON \
                         Lines by a materialization",
                        revision.revision_id
                    ),
                ));
            }
        };
        let abort = self.abort.clone();
        Ok(match format {
            Format::Jsonl => {
                let len = opened.len();
                let mut response = rows::jsonl(opened, abort).into_response();
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSONL_TYPE));
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                response
            }
            Format::Csv => {
                let columns = meta.columns.clone();
                let mut response =
                    rows::csv(opened, &columns, self.max_row_bytes, abort).into_response();
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(CSV_TYPE));
                response
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> Format {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        Format::choose(None, &headers).unwrap()
    }

    #[test]
    fn the_query_wins_and_accept_decides_otherwise() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("text/csv"));
        assert_eq!(
            Format::choose(Some("jsonl"), &headers).unwrap(),
            Format::Jsonl
        );
        assert_eq!(
            Format::choose(Some("CSV"), &HeaderMap::new()).unwrap(),
            Format::Csv
        );
        assert_eq!(
            Format::choose(None, &HeaderMap::new()).unwrap(),
            Format::Jsonl
        );
        let err = Format::choose(Some("xml"), &HeaderMap::new()).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);

        assert_eq!(accept("text/csv"), Format::Csv);
        assert_eq!(accept("text/csv;q=0.9, */*;q=0.1"), Format::Csv);
        assert_eq!(accept("text/csv, application/x-ndjson"), Format::Csv);
        assert_eq!(accept("application/x-ndjson, text/csv"), Format::Jsonl);
        assert_eq!(accept("text/csv;q=0.5, application/json"), Format::Jsonl);
        assert_eq!(accept("text/csv;q=0"), Format::Jsonl);
        assert_eq!(accept("*/*"), Format::Jsonl);
        assert_eq!(accept("text/html"), Format::Jsonl);
    }
}
