//! What the HTTP services (the controller's admin API, the server) share: one error type whose
//! response is always `{"error_code": ..., "error_message": ...}`, extractors whose rejections are
//! such errors (a malformed body, path or query is a 4xx, never a 500), bearer-token
//! authentication, request logs, and binding a listen address with a one-line error.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::metadata;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable, machine-readable code: `not_found`, `invalid_request`, `invalid_manifest`,
    /// `conflict`, `unauthorized`, `payload_too_large`, `unavailable`, `internal`, ...
    pub error_code: String,
    /// What went wrong, for a person.
    pub error_message: String,
}

/// An error answered as `status` with an [`ErrorBody`].
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// [`ErrorBody::error_code`].
    pub code: &'static str,
    /// [`ErrorBody::error_message`].
    pub message: String,
}

impl ApiError {
    /// An error of `status` with `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 503 `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // An edge: what leaves the process as an answer is scrubbed like its logs and errors.
        let body = ErrorBody {
            error_code: self.code.to_owned(),
            error_message: crate::redact::redact(&self.message),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Data-access errors as HTTP: what the caller named does not exist (404), contradicts the stored
/// state (409), is malformed (400), or the database is unavailable (503). Anything else is a 500
/// whose details go to the log, not to the caller.
impl From<metadata::Error> for ApiError {
    fn from(err: metadata::Error) -> ApiError {
        use metadata::Error as E;
        match &err {
            E::NotFound { .. } => ApiError::not_found(err.to_string()),
            E::StateConflict { .. } | E::Fenced { .. } => {
                ApiError::new(StatusCode::CONFLICT, "state_conflict", err.to_string())
            }
            E::Conflict(_) | E::ConstraintViolation { .. } => ApiError::conflict(err.to_string()),
            E::InvalidInput(_) => ApiError::bad_request(err.to_string()),
            E::Unavailable { .. } | E::Connect(_) => {
                tracing::warn!(error = %err, "metadata database unavailable");
                ApiError::unavailable(format!("{err}; try again"))
            }
            E::Db(_) => {
                tracing::error!(error = ?err, "metadata database error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server's log",
                )
            }
        }
    }
}

fn rejection(status: StatusCode, text: String) -> ApiError {
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        _ => "invalid_request",
    };
    ApiError::new(status, code, text)
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        rejection(r.status(), r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        // A path segment that does not parse (a job id that is not a number) names nothing.
        let status = match r.status() {
            s if s.is_server_error() => StatusCode::BAD_REQUEST,
            s => s,
        };
        rejection(status, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        rejection(StatusCode::BAD_REQUEST, r.body_text())
    }
}

/// A JSON body, or a JSON response. As an extractor its rejections are [`ApiError`]s, and it takes
/// a JSON object only ([`from_object`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_request(req, state).await?;
        from_object(value).map(Json)
    }
}

/// `T` read from a request body that must be a JSON object: an array or a scalar is refused (422
/// `invalid_body`), although serde would read a struct from an array of its fields' values. Errors
/// name the field they are about.
pub fn from_object<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    let invalid =
        |message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message);
    let not = match &value {
        serde_json::Value::Object(_) => None,
        serde_json::Value::Array(_) => Some("an array"),
        serde_json::Value::Null => Some("null"),
        serde_json::Value::Bool(_) => Some("a boolean"),
        serde_json::Value::Number(_) => Some("a number"),
        serde_json::Value::String(_) => Some("a string"),
    };
    if let Some(not) = not {
        return Err(invalid(format!(
            "the body must be a JSON object, not {not}"
        )));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        invalid(format!(
            "Failed to deserialize the JSON body into the target type: {e}"
        ))
    })
}

/// A JSON request body, kept as its bytes: checked as [`Json`] checks one (the content type, the
/// size limit, the syntax, with the same rejections) without building a tree of it, so a large
/// body costs its bytes and no more. [`JsonBody::object_with_raw`] reads an object from it.
#[derive(Debug, Clone)]
pub struct JsonBody(pub axum::body::Bytes);

impl<S> FromRequest<S> for JsonBody
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // The content type is judged by axum's own `Json`, shown the headers only.
        let mut headers_only = Request::new(axum::body::Body::empty());
        *headers_only.headers_mut() = req.headers().clone();
        if let Err(r @ JsonRejection::MissingJsonContentType(_)) =
            axum::Json::<serde::de::IgnoredAny>::from_request(headers_only, state).await
        {
            return Err(r.into());
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| rejection(r.status(), r.body_text()))?;
        let checked = bytes.clone();
        tokio::task::spawn_blocking(move || check_syntax(&checked))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "checking a request body failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server's log",
                )
            })??;
        Ok(JsonBody(bytes))
    }
}

/// 400 or 422 with `Json`'s message unless `bytes` is one JSON value, read as `Json` reads it into a
/// `serde_json::Value` ([`Syntax`](crate::manifest::canonical::Syntax): the same errors at the
/// same paths).
fn check_syntax(bytes: &[u8]) -> Result<(), ApiError> {
    let syntax =
        |e: &dyn std::fmt::Display| format!("Failed to parse the request body as JSON: {e}");
    let mut de = serde_json::Deserializer::from_slice(bytes);
    if let Err(e) =
        serde_path_to_error::deserialize::<_, crate::manifest::canonical::Syntax>(&mut de)
    {
        return Err(match e.inner().classify() {
            serde_json::error::Category::Data => rejection(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            ),
            _ => rejection(StatusCode::BAD_REQUEST, syntax(&e)),
        });
    }
    de.end()
        .map_err(|e| rejection(StatusCode::BAD_REQUEST, syntax(&e)))
}

impl JsonBody {
    /// `T` read from the body as [`Json`] reads it ([`from_object`]: the same errors), except the
    /// field `raw`, which `T` sees as `null`; its value is returned as the range of the body's bytes
    /// that holds it (the last, if it is given twice), unread, or `None` when it is missing.
    pub fn object_with_raw<T: DeserializeOwned>(
        &self,
        raw: &str,
    ) -> Result<(T, Option<std::ops::Range<usize>>), ApiError> {
        use serde_json::Value;
        let bytes: &[u8] = &self.0;
        let first = bytes
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        if first != Some(&b'{') {
            // Not an object: `from_object` says what it is, from a value of the same kind.
            let kind = match first {
                Some(b'[') => Value::Array(Vec::new()),
                Some(b'n') => Value::Null,
                Some(b't' | b'f') => Value::Bool(true),
                Some(b'"') => Value::String(String::new()),
                _ => Value::from(0),
            };
            return from_object::<T>(kind).map(|t| (t, None));
        }
        let fields: std::collections::BTreeMap<String, &serde_json::value::RawValue> =
            serde_json::from_slice(bytes)
                .map_err(|e| rejection(StatusCode::BAD_REQUEST, e.to_string()))?;
        // What `T` needs of each field to give the errors it gives from the whole value: an array
        // or an object only as one (its contents are never in a message), a scalar as itself.
        let mut object = serde_json::Map::new();
        let mut range = None;
        for (name, value) in fields {
            let text = value.get();
            let shallow = if name == raw {
                let start = text.as_ptr() as usize - bytes.as_ptr() as usize;
                range = Some(start..start + text.len());
                Value::Null
            } else if text.starts_with('[') {
                Value::Array(Vec::new())
            } else if text.starts_with('{') {
                Value::Object(serde_json::Map::new())
            } else {
                serde_json::from_str(text)
                    .map_err(|e| rejection(StatusCode::BAD_REQUEST, e.to_string()))?
            };
            object.insert(name, shallow);
        }
        from_object::<T>(Value::Object(object)).map(|t| (t, range))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `value` as [`Json`] answers it, written into a buffer of `size` bytes (about its length), so a
/// large answer is not copied again each time the buffer would have grown.
pub fn json_sized<T: Serialize>(value: &T, size: usize) -> Response {
    let mut body = Vec::with_capacity(size);
    match serde_json::to_writer(&mut body, value) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding a response failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server's log",
            )
            .into_response()
        }
    }
}

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// The token every request must carry as `Authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerToken(Arc<[u8]>, bool);

impl BearerToken {
    /// A token.
    pub fn new(token: &str) -> BearerToken {
        BearerToken(token.as_bytes().into(), false)
    }

    /// The token, not asked for on `GET /metrics` (`[controller] metrics_open`).
    pub fn metrics_open(self, open: bool) -> BearerToken {
        BearerToken(self.0, open)
    }

    fn admits(&self, headers: &HeaderMap) -> bool {
        // The scheme is case-insensitive (RFC 7235); the token is not.
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .and_then(|v| v.split_at_checked(7))
            .and_then(|(scheme, rest)| scheme.eq_ignore_ascii_case(b"Bearer ").then_some(rest))
        else {
            return false;
        };
        // Constant time in the token's content (the length is not a secret worth hiding).
        given.len() == self.0.len() && bool::from(given.ct_eq(&self.0))
    }
}

/// Middleware: 401 unless the request carries the token; `/healthz` is always open, `/metrics` when
/// the token says so ([`BearerToken::metrics_open`]).
pub async fn require_token(
    State(token): State<BearerToken>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/healthz" || (token.1 && path == "/metrics") || token.admits(request.headers()) {
        return next.run(request).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong token: send Authorization: Bearer <[controller] admin_token>",
    )
    .into_response()
}

/// Whether `headers` say the body is JSON (`Content-Type: application/json`, any parameters).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The header a client that is not a browser page sends on a body-less POST.
pub const CLIENT_HEADER: &str = "x-ampd-client";

/// Middleware: a POST must carry `Content-Type: application/json` or an `X-Ampd-Client` header,
/// else 415. A page of another site can send neither without a CORS preflight, which the API
/// never grants, so it cannot deploy or roll back through the operator's browser.
pub async fn require_api_client(request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::POST {
        let headers = request.headers();
        if !is_json(headers) && !headers.contains_key(CLIENT_HEADER) {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a POST needs Content-Type: application/json (with its JSON body) or, without a \
                 body, an X-Ampd-Client header (any value)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// `router` with a log line per request (method, path, status, latency) through `tracing`;
/// headers, and so the token, are never logged.
pub fn with_request_logs(router: axum::Router) -> axum::Router {
    router.layer(
        tower_http::trace::TraceLayer::new_for_http()
            .make_span_with(|request: &Request| {
                tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
            })
            .on_request(())
            .on_response(
                |response: &Response, latency: std::time::Duration, _span: &tracing::Span| {
                    tracing::info!(
                        status = response.status().as_u16(),
                        latency_ms = latency.as_secs_f64() * 1000.0,
                        "request"
                    );
                },
            ),
    )
}

/// Why an HTTP service could not listen.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}{hint}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The configuration key that set it.
    pub key: &'static str,
    /// Why.
    pub source: std::io::Error,
    hint: &'static str,
}

/// Binds `addr` (set by config key `key`), with a one-line error that says what to do.
pub async fn bind(
    addr: SocketAddr,
    key: &'static str,
) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                "; another process listens there: stop it or set another address"
            }
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need privileges: choose a port above 1024"
            }
            _ => "",
        };
        BindError {
            addr,
            key,
            source,
            hint,
        }
    })
}

#[cfg(test)]
mod bearer_tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn the_bearer_scheme_is_matched_case_insensitively_and_the_token_exactly() {
        let token = BearerToken::new("s3cret");
        for admitted in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "bEaReR s3cret",
        ] {
            assert!(token.admits(&with(admitted)), "{admitted}");
        }
        for refused in [
            "Bearer S3CRET",
            "Bearer s3cre",
            "Basic s3cret",
            "Bearers3cret",
            "s3cret",
        ] {
            assert!(!token.admits(&with(refused)), "{refused}");
        }
    }
}

#[cfg(test)]
mod body_tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct WithTree {
        namespace: String,
        version: u32,
        manifest: serde_json::Value,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct WithRaw {
        namespace: String,
        version: u32,
        manifest: serde::de::IgnoredAny,
    }

    type Answer = Result<(String, u32, Vec<u8>), (StatusCode, &'static str, String)>;

    fn refused(e: ApiError) -> (StatusCode, &'static str, String) {
        (e.status, e.code, e.message)
    }

    /// What `Json` gives: the request read into a tree, the manifest written back.
    fn through_tree(body: &[u8]) -> Answer {
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_bytes(body)
            .map_err(|r| refused(ApiError::from(r)))?;
        let read: WithTree = from_object(value).map_err(refused)?;
        let manifest = serde_json::to_vec(&read.manifest).expect("encode");
        Ok((read.namespace, read.version, manifest))
    }

    /// What `JsonBody` gives: the same, the manifest canonical from its text.
    fn through_bytes(body: &[u8]) -> Answer {
        check_syntax(body).map_err(refused)?;
        let body = JsonBody(axum::body::Bytes::copy_from_slice(body));
        let (read, at) = body
            .object_with_raw::<WithRaw>("manifest")
            .map_err(refused)?;
        let text = std::str::from_utf8(&body.0[at.expect("a manifest")]).expect("utf-8");
        let manifest = crate::manifest::canonical::canonical(text).expect("canonical");
        Ok((read.namespace, read.version, manifest))
    }

    #[test]
    fn a_body_read_from_its_bytes_answers_as_one_read_into_a_tree() {
        let deep = format!(
            "{{\"namespace\": \"a\", \"version\": 1, \"manifest\": {}{}}}",
            "[".repeat(130),
            "]".repeat(130)
        );
        let bodies: Vec<&[u8]> = vec![
            br#"{"namespace": "a", "version": 1, "manifest": {"b": 1, "a": [1.0, -0, 1E2, "\u00e9"], "b": 2}}"#,
            br#" {"manifest": null, "version": 7, "namespace": "\u0041\n"} "#,
            br#"{"namespace": "a", "namespace": "b", "version": 1, "manifest": 1, "manifest": {"k": []}}"#,
            br#"{"namespace": "a", "version": 1}"#,
            br#"{"namespace": "a", "manifest": {}}"#,
            br#"{"namespace": 5, "version": 1, "manifest": {}}"#,
            br#"{"namespace": [1, 2], "version": 1, "manifest": {}}"#,
            br#"{"namespace": {"x": 1}, "version": 1, "manifest": {}}"#,
            br#"{"namespace": null, "version": 1, "manifest": {}}"#,
            br#"{"namespace": "a", "version": 1.5, "manifest": {}}"#,
            br#"{"namespace": "a", "version": -1, "manifest": {}}"#,
            br#"{"namespace": "a", "version": "1", "manifest": {}}"#,
            br#"{"namespace": "a", "version": 99999999999, "manifest": {}}"#,
            br#"{"namespace": "a", "version": 1, "manifest": {}, "tag": [1, {"x": 2}]}"#,
            br#"{"zzz": 1, "namespace": 5, "version": 1, "manifest": {}}"#,
            br#"{"aaa": 1, "namespace": 5, "version": 1, "manifest": {}}"#,
            br#"{"namespace": "a", "version": 1, "manifest": {"tables": [1, }}"#,
            br#"{"namespace": "a", "version": 1, "manifest": {"tables": {"t": [[1], [2, 1e400]]}}}"#,
            br#"{"namespace": "a", "version": 1, "manifest": {"a": "\x"}}"#,
            br#"{"namespace": "a", "version": 1, "manifest": {}} x"#,
            br#"{"namespace": "a", "version": 1, "manifest": {}"#,
            br#"{"namespace": "a", "version": 1, "manifest": {1: 2}}"#,
            b"{\"namespace\": \"\xff\", \"version\": 1, \"manifest\": {}}",
            b"",
            b"   ",
            b"null",
            b"[1, 2]",
            b"\"x\"",
            b"5",
            b"-1.5",
            b"true",
            b"{}",
            deep.as_bytes(),
        ];
        for body in bodies {
            let text = String::from_utf8_lossy(body);
            assert_eq!(through_bytes(body), through_tree(body), "{text}");
        }
    }
}
