//! Talking to a running service over HTTP as a user does, and looking at what a request changed:
//! [`Api`] sends requests (with the admin token, if any) and reads JSON answers as [`Reply`]s;
//! [`snapshot`] captures the metadata tables and the data directory, so a test can show that a
//! refused request changed nothing; [`eventually`] waits for evidence.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::Value;

/// An HTTP answer: status, headers and the body parsed as JSON (`Null` when empty).
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body as JSON, `Null` when empty.
    pub body: Value,
}

impl Reply {
    /// Asserts an error body (`{"error_code", "error_message"}`, nothing else) of `status` with
    /// `code`.
    #[track_caller]
    pub fn error(&self, status: u16, code: &str) -> &Reply {
        assert_eq!(self.status, status, "{}", self.body);
        let body = self.body.as_object().expect("an error body is an object");
        assert_eq!(body.len(), 2, "{}", self.body);
        assert_eq!(body["error_code"], code, "{}", self.body);
        assert!(
            body["error_message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            self.body
        );
        self
    }

    /// The error message, which must contain `part`.
    #[track_caller]
    pub fn says(&self, part: &str) -> &Reply {
        let message = self.body["error_message"].as_str().unwrap_or_default();
        assert!(message.contains(part), "{part:?} not in {message:?}");
        self
    }

    /// The body, once the status is asserted to be `status`.
    #[track_caller]
    pub fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "{}", self.body);
        &self.body
    }
}

/// A request body.
pub enum Body {
    /// No body.
    None,
    /// A JSON body (`Content-Type: application/json`).
    Json(Value),
    /// These bytes with this content type.
    Raw(String, &'static str),
}

/// A client of one service's HTTP address.
pub struct Api {
    addr: SocketAddr,
    http: reqwest::Client,
    /// The bearer token sent with every request, if any.
    pub token: Option<String>,
}

impl Api {
    /// A client of `addr` that sends `token` (when given) as `Authorization: Bearer`.
    pub fn new(addr: SocketAddr, token: Option<String>) -> Api {
        Api {
            addr,
            http: client(),
            token,
        }
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The underlying client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends `method path` with `body` and reads the answer, which must be JSON or empty.
    pub async fn call(&self, method: Method, path: &str, body: Body) -> Reply {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request = match body {
            Body::None => request,
            Body::Json(v) => request.json(&v),
            Body::Raw(text, content_type) => request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(text),
        };
        let response = request.send().await.expect("the service answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("a body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{path}: answer {status} is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, Body::None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Body::Json(body)).await
    }

    /// `PUT path` without a body.
    pub async fn put(&self, path: &str) -> Reply {
        self.call(Method::PUT, path, Body::None).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, Body::None).await
    }
}

/// The metadata tables' rows and the files under `data_dir` (with their sizes), as text, to
/// compare before and after a request that must change nothing.
pub async fn snapshot(conn: &DatabaseConnection, data_dir: &Path) -> String {
    let mut out = String::new();
    for table in [
        "workers",
        "jobs",
        "job_events",
        "manifest_files",
        "dataset_manifests",
        "tags",
        "physical_tables",
        "physical_table_revisions",
        "file_metadata",
        "gc_manifest",
    ] {
        // A running worker's heartbeat moves on by itself: everything else about it counts.
        let row = if table == "workers" {
            "(t.id, t.node_id, t.info, t.created_at, t.registered_at)::text"
        } else {
            "t::text"
        };
        let sql = format!(
            "SELECT coalesce(string_agg({row}, E'\\n' ORDER BY {row}), '') AS rows FROM {table} t"
        );
        let row = conn
            .query_one_raw(Statement::from_string(conn.get_database_backend(), sql))
            .await
            .expect("snapshot query")
            .expect("a row");
        let rows: String = row.try_get("", "rows").expect("rows");
        out.push_str(&format!("== {table}\n{rows}\n"));
    }
    out.push_str("== files\n");
    for file in list_files(data_dir) {
        out.push_str(&format!("{file}\n"));
    }
    out
}

/// Every file under `dir`, recursively, as `<path> <size>`, sorted.
pub fn list_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(list_files(&path));
        } else {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            out.push(format!("{} {len}", path.display()));
        }
    }
    out.sort();
    out
}

/// Waits (at most `within`) until `check` holds, looking again every 50 ms; panics naming `what`
/// (and what `context` says then) otherwise.
pub async fn eventually<F, Fut>(
    what: &str,
    within: Duration,
    context: impl Fn() -> String,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "not within {within:?}: {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP client as ampd's own tools are: it sends `X-Ampd-Client` on every request, so a
/// body-less POST is accepted (a browser page cannot send that header cross-site).
pub fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "x-ampd-client",
        reqwest::header::HeaderValue::from_static("tests"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}
