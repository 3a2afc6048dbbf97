//! The controller's admin API: JSON in and out, one module per resource, each handler parsing and
//! validating its request, calling [`crate::metadata`] and mapping the result. Every error is an
//! [`ErrorBody`]; a malformed body, path or query is a 4xx. The OpenAPI document
//! (`GET /openapi.json`) is generated from the handlers' annotations and types ([`openapi`]), so it
//! cannot drift from the routes.

pub mod datasets;
pub mod health;
pub mod jobs;
pub mod revisions;
pub mod workers;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Config;
use crate::metadata;
use crate::migrate::MigrationSet;
use crate::service::http::{self, ApiError, BearerToken, ErrorBody};

/// What the handlers share.
pub struct AppState {
    /// The metadata database.
    pub db: DatabaseConnection,
    /// The migrations this binary runs (`/readyz` checks the schema against them).
    pub migrations: fn() -> MigrationSet,
    /// `[storage] data_dir`: manifests are stored in its `manifests/`.
    pub data_dir: PathBuf,
    /// `[worker] sources_dir`: CSV sources are checked there when the controller can see it.
    pub sources_dir: PathBuf,
    /// `[worker] liveness_window_ms`.
    pub liveness_window: Duration,
    /// `[worker] gc_grace_secs`: how long the files of a revision replaced by a roll back are kept.
    pub gc_grace: Duration,
    /// The OpenAPI document, served by `GET /openapi.json`.
    pub openapi: serde_json::Value,
    /// `[controller] max_manifest_tables`, `max_table_columns`, `max_inline_rows`.
    pub limits: crate::manifest::Limits,
    /// `[controller] max_name_len`.
    pub max_name_len: usize,
    /// `[worker] max_csv_record_bytes`: the header row of a CSV source is checked within it.
    pub max_csv_record_bytes: u64,
}

impl AppState {
    /// The state of a controller configured with `config`.
    pub fn new(
        db: DatabaseConnection,
        config: &Config,
        migrations: fn() -> MigrationSet,
    ) -> AppState {
        AppState {
            db,
            migrations,
            data_dir: config.storage.data_dir().to_owned(),
            sources_dir: config.worker.sources_dir().to_owned(),
            liveness_window: Duration::from_millis(config.worker.liveness_window_ms),
            gc_grace: Duration::from_secs(config.worker.gc_grace_secs),
            openapi: serde_json::Value::Null,
            limits: config.controller.manifest_limits(),
            max_name_len: usize::try_from(config.controller.max_name_len).unwrap_or(usize::MAX),
            max_csv_record_bytes: config.worker.max_csv_record_bytes,
        }
    }
}

/// The state handlers extract.
pub type Shared = Arc<AppState>;

/// Every route, with its OpenAPI description.
fn routes() -> OpenApiRouter<Shared> {
    OpenApiRouter::with_openapi(document())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::openapi_json))
        .routes(routes!(datasets::register, datasets::list))
        .routes(routes!(datasets::get))
        .routes(routes!(datasets::get_version, datasets::delete_version))
        .routes(routes!(datasets::deploy::deploy))
        .routes(routes!(datasets::tables::tables))
        .routes(routes!(revisions::activate))
        .routes(routes!(jobs::list))
        .routes(routes!(jobs::get, jobs::delete))
        .routes(routes!(jobs::events))
        .routes(routes!(jobs::stop))
        .routes(routes!(workers::list))
        .routes(routes!(workers::get))
}

/// The OpenAPI document of the admin API.
pub fn openapi() -> OpenApi {
    let (_, mut doc) = routes().split_for_parts();
    add_common_responses(&mut doc);
    doc
}

/// The admin API of `state`: every route, JSON 404 and 405 for unknown routes and methods, bodies
/// limited to `max_body_bytes` (413), a JSON 500 should a handler panic (the connection is kept),
/// the bearer token required on every route but `/healthz` when `token` is set, and a log line
/// per request; with `metrics` (the `/metrics` route, outside the OpenAPI document), HTTP metrics.
pub fn router(
    mut state: AppState,
    max_body_bytes: usize,
    token: Option<BearerToken>,
    metrics: Option<axum::Router>,
) -> axum::Router {
    let (router, mut doc) = routes().split_for_parts();
    add_common_responses(&mut doc);
    let mut served = serde_json::to_value(&doc).unwrap_or_default();
    exact(&mut served, token.is_some(), state.max_name_len);
    state.openapi = served;
    let mut router = router
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Arc::new(state))
        .merge(metrics.clone().unwrap_or_default())
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn(http::require_api_client));
    if let Some(token) = token {
        router = router.layer(axum::middleware::from_fn_with_state(
            token,
            http::require_token,
        ));
    }
    if metrics.is_some() {
        router = crate::service::metrics::track(router, "controller");
    }
    http::with_request_logs(router)
}

/// A dataset's namespace or name, as `metadata::validate_dataset_part` accepts it.
const NAME_PATTERN: &str = "^[a-z][a-z0-9_]*$";
/// A semantic version (semver.org's expression).
const VERSION_PATTERN: &str = r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-((0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(\.(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(\+([0-9a-zA-Z-]+(\.[0-9a-zA-Z-]+)*))?";

/// `word` matched in any case (JSON Schema patterns have no flags): `[Aa][Cc]…`.
fn any_case(word: &str) -> String {
    word.chars()
        .map(|c| {
            if c.is_ascii_alphabetic() {
                format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase())
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Makes the served document say exactly what the handlers enforce: the bearer scheme (and 401)
/// only when a token is configured; an optional body that is an object or nothing, never `null`;
/// the patterns of namespaces, names, versions, references and statuses; the length limit of
/// the names a registration may give.
fn exact(doc: &mut serde_json::Value, secured: bool, max_name_len: usize) {
    use serde_json::{Value, json};
    let version = format!("^{VERSION_PATTERN}$");
    let reference = format!("^(latest|dev|[0-9a-f]{{64}}|{VERSION_PATTERN})$");
    let statuses: Vec<String> = metadata::jobs::ACTIVE
        .iter()
        .chain(metadata::jobs::TERMINAL.iter())
        .map(|s| any_case(s.as_str()))
        .chain(["active".to_owned(), "terminal".to_owned()])
        .collect();
    let one = format!("({})", statuses.join("|"));
    let status = format!("^ *{one} *(, *{one} *)*$");
    if !secured {
        if let Some(root) = doc.as_object_mut() {
            root.remove("security");
        }
        if let Some(components) = doc.get_mut("components").and_then(Value::as_object_mut) {
            components.remove("securitySchemes");
        }
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            if !secured {
                if let Some(op) = op.as_object_mut() {
                    op.remove("security");
                }
                if let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) {
                    responses.remove("401");
                }
            }
            // `Option<T>` bodies: absent or an object, not `null` (which is refused).
            if let Some(schema) = op.pointer_mut("/requestBody/content/application~1json/schema")
                && let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array)
                && let Some(object) = alternatives
                    .iter()
                    .find(|s| s.get("type") != Some(&json!("null")))
                    .cloned()
            {
                *schema = object;
            }
            let deletes_a_version = method == "delete" && path.contains("{ref}");
            for param in op
                .get_mut("parameters")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let pattern = match (param["in"].as_str(), param["name"].as_str()) {
                    (Some("path"), Some("ns" | "name")) => NAME_PATTERN.to_owned(),
                    (Some("path"), Some("ref")) if deletes_a_version => version.clone(),
                    (Some("path"), Some("ref")) => reference.clone(),
                    (Some("query"), Some("status")) => status.clone(),
                    _ => continue,
                };
                param["schema"]["pattern"] = json!(pattern);
            }
        }
    }
    if let Some(register) = doc.pointer_mut("/components/schemas/RegisterDataset/properties") {
        for (field, pattern) in [
            ("namespace", NAME_PATTERN.to_owned()),
            ("name", NAME_PATTERN.to_owned()),
            ("version", version),
        ] {
            register[field]["pattern"] = json!(pattern);
            register[field]["maxLength"] = json!(max_name_len);
            register[field]["minLength"] = json!(1);
        }
        register["manifest"]["type"] = json!("object");
    }
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> axum::response::Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    internal("a request", format!("the handler panicked: {what}")).into_response()
}

async fn unknown_route(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {}; see GET /openapi.json", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Runs data-access call `op`, retrying what may pass (a briefly unavailable database) with
/// backoff ([`crate::service::retrying`]), and maps its error to the API's.
pub(crate) async fn db<T, F, Fut>(what: &str, op: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = metadata::Result<T>>,
{
    crate::service::retrying(what, op)
        .await
        .map_err(ApiError::from)
}

/// A 500 whose cause goes to the log, not to the caller.
pub(crate) fn internal(what: &str, err: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %err, "{what} failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{what} failed; see the controller's log"),
    )
}

/// An optional JSON body: none when the request has an empty body (with or without
/// `Content-Type: application/json`, so a client that always sends the header may send nothing);
/// otherwise it must be `Content-Type: application/json` and a JSON object of `T`, with the same
/// errors as [`http::Json`].
pub struct OptionalJson<T>(pub Option<T>);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = http::is_json(req.headers());
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| ApiError::new(r.status(), "invalid_request", r.body_text()))?;
        if bytes.is_empty() {
            return Ok(OptionalJson(None));
        }
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a request body must be JSON, sent with Content-Type: application/json",
            ));
        }
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_bytes(&bytes)?;
        http::from_object(value).map(|v| OptionalJson(Some(v)))
    }
}

/// The body of a route that takes none: no body at all, or an empty JSON object (`{}`). Anything
/// else is refused as any body is (malformed JSON 400, a field 422, another media type 415, too
/// large 413), before the route acts: a mistyped or misdirected request changes nothing.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

/// The document's root: title, version, tags and the bearer scheme (required when
/// `[controller] admin_token` is set).
fn document() -> OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(
        info(
            title = "ampd controller admin API",
            description = "Register and deploy datasets, follow jobs and workers, roll tables \
                back. Errors are `{\"error_code\", \"error_message\"}`. When `[controller] \
                admin_token` is set, every route but `/healthz` needs `Authorization: Bearer \
                <token>`."
        ),
        components(schemas(ErrorBody)),
        modifiers(&BearerScheme),
        security(("bearer" = [])),
        tags(
            (name = "health", description = "Liveness, readiness and this document"),
            (name = "datasets", description = "Manifests, versions, deployments and tables"),
            (name = "revisions", description = "Table revisions (roll back)"),
            (name = "jobs", description = "Jobs and their events"),
            (name = "workers", description = "Worker nodes and their liveness"),
        )
    )]
    struct Doc;
    <Doc as utoipa::OpenApi>::openapi()
}

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The responses every route may give besides its own, added to each operation that does not
/// describe them itself: 401 (all but the open `/healthz`), 413, 415 and 422 (routes with a body), 503
/// and 500 (routes that use the database).
fn add_common_responses(doc: &mut OpenApi) {
    let error = |description: &str| -> RefOr<Response> {
        RefOr::T(
            utoipa::openapi::ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::content::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let open = path == "/healthz";
        let uses_db = !matches!(path.as_str(), "/healthz" | "/openapi.json" | "/readyz");
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in operations.into_iter().flatten() {
            let responses = &mut op.responses.responses;
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| error(description));
            };
            if open {
                op.security = Some(Vec::new());
            } else {
                add(
                    "401",
                    "`unauthorized`: the bearer token is missing or wrong (when `[controller] \
                     admin_token` is set)",
                );
            }
            if !matches!(path.as_str(), "/healthz" | "/readyz") {
                add(
                    "421",
                    "`host_not_allowed`: the `Host` header names none of the service's hosts \
                     (`[http] allowed_hosts`)",
                );
            }
            if op.request_body.is_some() {
                add(
                    "408",
                    "`request_timeout`: the body did not arrive within `[http] body_timeout_secs`",
                );
                add(
                    "413",
                    "`payload_too_large`: the body is larger than `[controller] max_body_bytes`",
                );
                add(
                    "415",
                    "`unsupported_media_type`: a body without `Content-Type: application/json`",
                );
                add(
                    "422",
                    "`invalid_body`: a field of the body is missing, unknown or of the wrong type",
                );
            }
            if uses_db {
                add(
                    "503",
                    "`unavailable`: the metadata database did not answer (within `[http] \
                     request_timeout_secs`); try again",
                );
                add(
                    "500",
                    "`internal`: an unexpected error; see the controller's log",
                );
            }
        }
    }
}
