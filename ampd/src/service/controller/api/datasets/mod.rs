//! `/datasets`: register manifests as versions of a dataset, list and resolve them, delete a
//! version, deploy a version (schedule the job that materializes it) and list its tables.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{NoFields, OptionalJson, Shared, db, internal};
use crate::manifest::{self, StaticManifest, canonical};
use crate::metadata::{self, datasets};
use crate::service::controller::manifests;
use crate::service::http::{self, ApiError, ErrorBody, Json, JsonBody, Path};

pub mod deploy;
pub mod tables;

/// `POST /datasets`: a manifest to register as a version of a dataset.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"namespace": "demo", "name": "prices", "version": "1.0.0",
    "manifest": {"kind": "static", "tables": {"prices": {
        "columns": [{"name": "symbol", "type": "string"}, {"name": "price", "type": "float64"}],
        "rows": [["ETH", 3100.5], ["BTC", 91000.0]]}}}}))]
pub struct RegisterDataset {
    /// Lowercase letters, digits and `_`, starting with a letter.
    pub namespace: String,
    /// Lowercase letters, digits and `_`, starting with a letter.
    pub name: String,
    /// A semantic version (`1.0.0`, `1.1.0-rc.1`); `latest` and `dev` are managed by ampd.
    pub version: String,
    /// The manifest: `{"kind": "static", "tables": {...}}` (see the README for the format).
    #[schema(value_type = serde_json::Value)]
    pub manifest: InBody,
}

/// The `manifest` of a [`RegisterDataset`] as the request is read: its value stays in the body's
/// bytes ([`JsonBody::object_with_raw`]), from which it is validated and stored.
#[derive(Debug, Clone, Copy)]
pub struct InBody;

impl<'de> Deserialize<'de> for InBody {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<InBody, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| InBody)
    }
}

/// A registered version.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Registered {
    /// The dataset's namespace.
    pub namespace: String,
    /// The dataset's name.
    pub name: String,
    /// The version, in canonical form.
    pub version: String,
    /// The manifest's hash: hex sha256 of its stored bytes.
    pub hash: String,
}

/// A dataset: a namespace and a name with at least one manifest.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DatasetName {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// A tag of a dataset and the manifest it names.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Tag {
    /// A semantic version, `latest` (the highest version) or `dev` (the last registered manifest).
    pub version: String,
    /// The manifest's hash.
    pub hash: String,
    /// When the tag was last moved.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: chrono::DateTime<chrono::FixedOffset>,
}

/// A dataset with its versions and tags.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Dataset {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its versions, lowest to highest by semver precedence.
    pub versions: Vec<Tag>,
    /// Every tag, versions, `latest` and `dev` alike, by name.
    pub tags: Vec<Tag>,
}

/// One manifest of a dataset.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Version {
    /// The dataset's namespace.
    pub namespace: String,
    /// The dataset's name.
    pub name: String,
    /// The manifest's hash.
    pub hash: String,
    /// The manifest's kind (`static`).
    pub kind: String,
    /// The manifest, as stored.
    #[schema(value_type = serde_json::Value)]
    pub manifest: Box<serde_json::value::RawValue>,
    /// The tags that name this manifest (`1.0.0`, `latest`, `dev`, ...).
    pub tags: Vec<String>,
}

/// The path of a dataset: `/datasets/{ns}/{name}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DatasetPath {
    /// The dataset's namespace.
    #[serde(rename = "ns")]
    pub namespace: String,
    /// The dataset's name.
    pub name: String,
}

/// The path of a version of a dataset: `/datasets/{ns}/{name}/versions/{ref}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct VersionPath {
    /// The dataset's namespace.
    #[serde(rename = "ns")]
    pub namespace: String,
    /// The dataset's name.
    pub name: String,
    /// A version (`1.0.0`), `latest`, `dev`, or a manifest hash (64 hex characters); deleting
    /// takes a version only.
    #[serde(rename = "ref")]
    pub reference: String,
}

/// The errors of naming a version that does not resolve, for the document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Describes responses; `ApiError` builds them.
enum VersionErrors {
    /// `invalid_request`: a malformed name or reference.
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// `not_found`: no such version or manifest.
    #[response(status = 404)]
    Unknown(ErrorBody),
}

/// 400 unless `namespace` and `name` are valid dataset names.
fn check_dataset(namespace: &str, name: &str) -> Result<(), ApiError> {
    metadata::validate_dataset(namespace, name)?;
    Ok(())
}

/// `namespace/name@reference`, checked: 400 unless `reference` is a semver version, `latest`,
/// `dev` or a 64-hex hash.
fn reference(namespace: &str, name: &str, reference: &str) -> Result<String, ApiError> {
    check_dataset(namespace, name)?;
    let text = format!("{namespace}/{name}@{reference}");
    text.parse::<datasets::Reference>()?;
    Ok(text)
}

/// The manifest `reference` names: 400 for a malformed one, 404 for an unknown one.
async fn resolve(
    app: &Shared,
    path: &VersionPath,
) -> Result<entity::manifest_files::Model, ApiError> {
    let text = reference(&path.namespace, &path.name, &path.reference)?;
    db("resolve a dataset reference", || {
        datasets::resolve(&app.db, &text)
    })
    .await
}

/// 400 naming `[controller] max_name_len` when one of `names` (what it is, its value) is longer.
/// Registration checks every name; deploying checks the namespace and the name, so one stored
/// before the limit was lowered stays readable and deletable but is not deployed.
pub(crate) fn within_name_limit(max: usize, names: &[(&str, &str)]) -> Result<(), ApiError> {
    for (what, value) in names {
        if value.len() > max {
            return Err(ApiError::bad_request(format!(
                "the {what} is {} bytes long, more than the limit of {max} (`[controller] \
                 max_name_len`)",
                value.len(),
            )));
        }
    }
    Ok(())
}

/// A manifest as stored, or a 500 when its file cannot be read.
async fn load(
    app: &Shared,
    manifest: &entity::manifest_files::Model,
) -> Result<Box<serde_json::value::RawValue>, ApiError> {
    manifests::load(&app.data_dir, &manifest.path)
        .await
        .map_err(|e| internal(&format!("reading manifest file {}", manifest.path), e))
}

fn invalid_manifest(e: manifest::ManifestError) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_manifest",
        format!("invalid manifest: {e}"),
    )
}

/// The kind of the manifest whose JSON text is `manifest`, its check within `limits` (rows
/// counted, not kept), its bytes as stored and their hash.
fn validate(
    manifest: &[u8],
    limits: manifest::Limits,
) -> Result<(String, StaticManifest<usize>, Vec<u8>, String), ApiError> {
    let text = std::str::from_utf8(manifest).map_err(|e| internal("reading a manifest", e))?;
    let content = canonical::canonical(text).map_err(|e| internal("encoding a manifest", e))?;
    let stored = std::str::from_utf8(&content).map_err(|e| internal("encoding a manifest", e))?;
    let kind = manifest::kind_of(stored).map_err(invalid_manifest)?;
    let parsed = StaticManifest::parse_within(stored, limits).map_err(invalid_manifest)?;
    let hash = datasets::manifest_hash(&content);
    Ok((kind, parsed, content, hash))
}

/// Register a manifest as a version of a dataset.
///
/// The manifest is validated (CSV sources too, when the sources directory is visible here), stored
/// content-addressed, linked to the dataset (which moves `dev` to it) and tagged with the version
/// (`latest` moves to the highest version). Registering the same version with the same manifest
/// again changes nothing but `dev`, which moves back to it.
#[utoipa::path(
    post,
    path = "/datasets",
    operation_id = "register_dataset",
    tag = "datasets",
    request_body = RegisterDataset,
    responses(
        (status = 201, description = "Registered, linked and tagged", body = Registered),
        (status = 400, description = "`invalid_request`: malformed JSON, or an invalid \
            namespace, name or version", body = ErrorBody),
        (status = 409, description = "`conflict`: the version already names another manifest",
            body = ErrorBody),
        (status = 422, description = "`invalid_manifest`: the manifest can never be \
            materialized (the message names the place: `tables.prices.rows[3][1]`, a CSV file \
            that is missing, outside the sources directory or whose header does not match); \
            `invalid_body`: a field is missing or has the wrong type", body = ErrorBody),
    ),
)]
pub async fn register(
    State(app): State<Shared>,
    body: JsonBody,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    let (req, manifest) = body.object_with_raw::<RegisterDataset>("manifest")?;
    // A request without the field does not read as a `RegisterDataset`.
    let manifest = manifest.ok_or_else(|| internal("reading a registration", "no manifest"))?;
    within_name_limit(
        app.max_name_len,
        &[
            ("namespace", req.namespace.as_str()),
            ("name", req.name.as_str()),
            ("version", req.version.as_str()),
        ],
    )?;
    check_dataset(&req.namespace, &req.name)?;
    let version = semver::Version::parse(&req.version)
        .map_err(|e| {
            ApiError::bad_request(format!(
                "version {:?} is not a semantic version like 1.2.3 ({e}); `latest` and `dev` \
                 are managed by ampd",
                req.version
            ))
        })?
        .to_string();
    // Validation and encoding are linear in the manifest but can take a while on a large one:
    // off the async runtime, so health checks and the scheduler never wait behind them.
    // The manifest is read from the body's bytes, which go once it is validated.
    let limits = app.limits;
    let body = body.0;
    let (kind, parsed, content, hash) =
        tokio::task::spawn_blocking(move || validate(&body[manifest], limits))
            .await
            .map_err(|e| internal("validating a manifest", e))??;
    manifests::check_sources(app.sources_dir.clone(), app.max_csv_record_bytes, &parsed)
        .await
        .map_err(invalid_manifest)?;
    let (namespace, name) = (req.namespace.as_str(), req.name.as_str());

    // A version names one manifest for good: refuse before storing anything.
    let tagged = format!("{namespace}/{name}@{version}");
    match db("look up a version", || datasets::resolve(&app.db, &tagged)).await {
        Ok(other) if other.hash != hash => {
            return Err(ApiError::conflict(format!(
                "version {version} of {namespace}/{name} already names manifest {}; delete the \
                 version to tag another manifest",
                other.hash
            )));
        }
        Ok(_) => {}
        Err(e) if e.status == StatusCode::NOT_FOUND => {}
        Err(e) => return Err(e),
    }

    let path = manifests::store(&app.data_dir, &hash, &content)
        .await
        .map_err(|e| internal("storing a manifest file", e))?;
    db("register a dataset version", || {
        manifests::register(&app.db, namespace, name, &version, &kind, &content, &path)
    })
    .await?;
    tracing::info!(namespace, name, version, hash, "dataset version registered");
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            namespace: req.namespace,
            name: req.name,
            version,
            hash,
        }),
    ))
}

/// List the datasets.
///
/// Every dataset (a namespace and name with at least one manifest), by namespace and name.
#[utoipa::path(
    get,
    path = "/datasets",
    operation_id = "list_datasets",
    tag = "datasets",
    responses((status = 200, description = "The datasets", body = [DatasetName])),
)]
pub async fn list(State(app): State<Shared>) -> Result<Json<Vec<DatasetName>>, ApiError> {
    let all = db("list datasets", || datasets::list_datasets(&app.db)).await?;
    Ok(Json(
        all.into_iter()
            .map(|d| DatasetName {
                namespace: d.namespace,
                name: d.name,
            })
            .collect(),
    ))
}

fn tag(t: entity::tags::Model) -> Tag {
    Tag {
        version: t.version,
        hash: t.hash,
        updated_at: t.updated_at,
    }
}

/// Get a dataset with its versions and tags.
///
/// Its versions lowest to highest by semver precedence, and all its tags (`latest`, `dev`
/// included) with the manifests they name.
#[utoipa::path(
    get,
    path = "/datasets/{ns}/{name}",
    operation_id = "get_dataset",
    tag = "datasets",
    params(DatasetPath),
    responses(
        (status = 200, description = "The dataset", body = Dataset),
        (status = 400, description = "`invalid_request`: an invalid namespace or name",
            body = ErrorBody),
        (status = 404, description = "`not_found`: the dataset has no manifest", body = ErrorBody),
    ),
)]
pub async fn get(
    State(app): State<Shared>,
    Path(DatasetPath { namespace, name }): Path<DatasetPath>,
) -> Result<Json<Dataset>, ApiError> {
    check_dataset(&namespace, &name)?;
    let exists = db("look up a dataset", || {
        datasets::exists(&app.db, &namespace, &name)
    })
    .await?;
    if !exists {
        return Err(ApiError::not_found(format!(
            "dataset {namespace}/{name} not found"
        )));
    }
    let versions = db("list versions", || {
        datasets::list_versions(&app.db, &namespace, &name)
    })
    .await?;
    let tags = db("list tags", || {
        datasets::list_tags(&app.db, &namespace, &name)
    })
    .await?;
    Ok(Json(Dataset {
        namespace,
        name,
        versions: versions.into_iter().map(tag).collect(),
        tags: tags.into_iter().map(tag).collect(),
    }))
}

/// Get the manifest a version, `latest`, `dev` or a hash names.
///
/// The manifest as stored, its kind, and the tags that name it.
#[utoipa::path(
    get,
    path = "/datasets/{ns}/{name}/versions/{ref}",
    operation_id = "get_version",
    tag = "datasets",
    params(VersionPath),
    responses(
        (status = 200, description = "The manifest", body = Version),
        VersionErrors,
    ),
)]
pub async fn get_version(
    State(app): State<Shared>,
    Path(path): Path<VersionPath>,
) -> Result<axum::response::Response, ApiError> {
    let found = resolve(&app, &path).await?;
    let VersionPath {
        namespace, name, ..
    } = path;
    // The stored bytes go into the answer as they are, never parsed into a tree.
    let manifest = load(&app, &found).await?;
    let tags = db("list tags", || {
        datasets::list_tags(&app.db, &namespace, &name)
    })
    .await?;
    let size = manifest.get().len() + 1024;
    let version = Version {
        tags: tags
            .into_iter()
            .filter(|t| t.hash == found.hash)
            .map(|t| t.version)
            .collect(),
        namespace,
        name,
        hash: found.hash,
        kind: found.kind,
        manifest,
    };
    Ok(http::json_sized(&version, size))
}

/// Delete a version.
///
/// The version tag goes; the manifest stays registered and `latest` moves to the highest remaining
/// version.
#[utoipa::path(
    delete,
    path = "/datasets/{ns}/{name}/versions/{ref}",
    operation_id = "delete_version",
    tag = "datasets",
    params(VersionPath),
    request_body(content = Option<NoFields>, description = "None (or an empty object)"),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_request`: not a semantic version (`latest` and \
            `dev` cannot be deleted), or the body is malformed JSON", body = ErrorBody),
        (status = 404, description = "`not_found`: no such version", body = ErrorBody),
    ),
)]
pub async fn delete_version(
    State(app): State<Shared>,
    Path(VersionPath {
        namespace,
        name,
        reference: version,
    }): Path<VersionPath>,
    _: OptionalJson<NoFields>,
) -> Result<StatusCode, ApiError> {
    check_dataset(&namespace, &name)?;
    if semver::Version::parse(&version).is_err() {
        return Err(ApiError::bad_request(format!(
            "{version:?} is not a semantic version; only versions can be deleted (`latest` and \
             `dev` follow the versions and manifests)"
        )));
    }
    db("delete a version", || {
        datasets::delete_version(&app.db, &namespace, &name, &version)
    })
    .await?;
    tracing::info!(namespace, name, version, "dataset version deleted");
    Ok(StatusCode::NO_CONTENT)
}
