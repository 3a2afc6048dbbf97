//! The controller's admin API, run as a user runs it: an `ampd controller` process on a fresh
//! database (migrated on startup), driven over HTTP. Every route's success path, and every route's
//! bad input getting its 4xx and changing nothing (the metadata tables and the data directory are
//! compared before and after). Job transitions a worker would make are made here through
//! `ampd::metadata`, with the job's claim.

use std::collections::BTreeSet;
use std::time::Duration;

use ampd::metadata::{files, jobs, revisions, workers};
use reqwest::Method;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::TestDb;
use tests::api::{Api, Body, Reply, snapshot};
use tests::services::{Service, Workspace, free_addr};

/// Keeps the scheduler from acting on its own during a test: workers stay live for an hour and a
/// failed job is retried after an hour.
const QUIET: &str = "reconcile_interval_ms = 200\nretry_base_delay_ms = 3600000\n\
                     retry_max_delay_ms = 3600000\n";

/// An `ampd controller` process on a database and workspace of its own.
struct Controller {
    db: TestDb,
    conn: DatabaseConnection,
    ws: Workspace,
    service: Option<Service>,
    api: Api,
}

impl Controller {
    /// Starts a controller with the `[controller]` keys in `controller` and the `[worker]` keys in
    /// `worker`, and waits for `/healthz`.
    async fn start(controller: &str, worker: &str) -> Controller {
        let db = TestDb::empty().await;
        let ws = Workspace::new();
        let addr = free_addr();
        let extra = format!(
            "[controller]\nadmin_addr = \"{addr}\"\n{controller}\n\n[worker]\n\
             liveness_window_ms = 3600000\n{worker}\n"
        );
        let config = ws.config("controller.toml", db.url(), &extra);
        let token = controller
            .lines()
            .find_map(|l| l.strip_prefix("admin_token = "))
            .map(|t| t.trim_matches('"').to_owned());
        let mut service = Service::start(
            "controller",
            &config,
            &["controller"],
            &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
        );
        service.wait_healthy(addr).await;
        let conn = db.connect().await;
        Controller {
            db,
            conn,
            ws,
            service: Some(service),
            api: Api::new(addr, token),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Body) -> Reply {
        self.api.call(method, path, body).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.api.get(path).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.api.post(path, body).await
    }

    async fn put(&self, path: &str) -> Reply {
        self.api.put(path).await
    }

    async fn delete(&self, path: &str) -> Reply {
        self.api.delete(path).await
    }

    /// Registers `manifest` as `namespace/name@version` and returns its hash.
    async fn register(
        &self,
        namespace: &str,
        name: &str,
        version: &str,
        manifest: Value,
    ) -> String {
        let reply = self
            .post(
                "/datasets",
                json!({"namespace": namespace, "name": name, "version": version, "manifest": manifest}),
            )
            .await;
        reply.ok(201)["hash"].as_str().expect("a hash").to_owned()
    }

    /// Deploys `reference` of `namespace/name` and returns the answer.
    async fn deploy(&self, dataset: &str, reference: &str, body: Body) -> Reply {
        self.call(
            Method::POST,
            &format!("/datasets/{dataset}/versions/{reference}/deploy"),
            body,
        )
        .await
    }

    async fn job(&self, id: i64) -> entity::jobs::Model {
        jobs::get(&self.conn, id)
            .await
            .expect("read job")
            .expect("job exists")
    }

    /// The metadata tables' rows and the data directory's files, to compare before and after.
    async fn snapshot(&self) -> String {
        snapshot(&self.conn, &self.ws.data_dir()).await
    }

    /// Stops the process and starts another on the same database and workspace, with the
    /// `[controller]` keys in `controller`.
    async fn restart_with(&mut self, controller: &str) {
        let exit = self.service.take().expect("running").stop().await;
        assert_eq!(exit.code, Some(0), "{}", exit.log);
        let addr = free_addr();
        let extra = format!(
            "[controller]\nadmin_addr = \"{addr}\"\n{controller}\n\n[worker]\n\
             liveness_window_ms = 3600000\n"
        );
        let config = self
            .ws
            .config("controller-restarted.toml", self.db.url(), &extra);
        let mut service = Service::start("controller", &config, &["controller"], &[]);
        service.wait_healthy(addr).await;
        self.service = Some(service);
        self.api = Api::new(addr, None);
    }

    /// Stops the process with SIGTERM and checks that it exits 0.
    async fn stop(mut self) -> String {
        let exit = self.service.take().expect("running").stop().await;
        assert_eq!(exit.code, Some(0), "{}", exit.log);
        assert!(exit.took < Duration::from_secs(15), "took {:?}", exit.took);
        let _ = &self.db;
        exit.log
    }
}

/// Waits (at most 20 s) until `check` holds.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tests::api::eventually(what, Duration::from_secs(20), String::new, check).await;
}

fn prices(rows: Value) -> Value {
    json!({"kind": "static", "tables": {"prices": {
        "columns": [{"name": "symbol", "type": "string"}, {"name": "price", "type": "float64"}],
        "rows": rows}}})
}

fn trades(csv: &str) -> Value {
    json!({"kind": "static", "tables": {"trades": {
        "columns": [{"name": "id", "type": "int64"}, {"name": "symbol", "type": "string"}],
        "csv": csv}}})
}

fn hash_of(manifest: &Value) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(manifest).expect("encode"),
    ))
}

fn claim(job: &entity::jobs::Model) -> jobs::JobClaim {
    jobs::JobClaim::of(job).expect("the job is on a node")
}

async fn live_worker(conn: &DatabaseConnection, node_id: &str) {
    workers::register(conn, node_id, json!({"version": "test"}))
        .await
        .expect("register worker");
}

#[tokio::test]
async fn health_readiness_and_the_openapi_document() {
    let c = Controller::start("", "").await;
    assert_eq!(c.get("/healthz").await.ok(200), &json!({"status": "ok"}));
    assert_eq!(c.get("/readyz").await.ok(200), &json!({"status": "ready"}));

    // The document parses, and lists exactly the routes, each with its responses.
    let doc = c.get("/openapi.json").await.ok(200).clone();
    let file = c.ws.path().join("openapi.json");
    let text = serde_json::to_string_pretty(&doc).expect("encode");
    std::fs::write(&file, &text).expect("write the document");
    if let Ok(out) = std::env::var("AMPD_OPENAPI_OUT") {
        std::fs::write(&out, &text).expect("write AMPD_OPENAPI_OUT");
    }
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("read back"))
        .expect("the document parses");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let expected: BTreeSet<(String, String)> = [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/openapi.json"),
        ("post", "/datasets"),
        ("get", "/datasets"),
        ("get", "/datasets/{ns}/{name}"),
        ("get", "/datasets/{ns}/{name}/versions/{ref}"),
        ("delete", "/datasets/{ns}/{name}/versions/{ref}"),
        ("post", "/datasets/{ns}/{name}/versions/{ref}/deploy"),
        ("get", "/datasets/{ns}/{name}/versions/{ref}/tables"),
        ("post", "/revisions/{id}/activate"),
        ("get", "/jobs"),
        ("get", "/jobs/{id}"),
        ("delete", "/jobs/{id}"),
        ("get", "/jobs/{id}/events"),
        ("put", "/jobs/{id}/stop"),
        ("get", "/workers"),
        ("get", "/workers/{node_id}"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    let mut listed = BTreeSet::new();
    let mut operation_ids = BTreeSet::new();
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            listed.insert((method.clone(), path.clone()));
            let id = op["operationId"].as_str().expect("an operationId");
            assert!(
                operation_ids.insert(id.to_owned()),
                "operationId {id} twice"
            );
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {path}: no success response"
            );
            // Every path parameter is declared.
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(|c| c == '{' || c == '}');
                let declared = op["parameters"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true)
                });
                assert!(declared, "{method} {path}: parameter {name} not declared");
            }
            // No admin_token is configured: the document declares no 401 (openapi_conformance
            // checks one with a token).
            assert!(!responses.contains_key("401"), "{method} {path}: 401");
            if op.get("requestBody").is_some() {
                assert!(responses.contains_key("413"), "{method} {path}: 413");
            }
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
    assert_eq!(listed, expected);
    // Every reference names a schema the document defines.
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(schemas.contains_key(name), "$ref {r} is not defined");
    }
    // And every documented route is served (none falls through to the unknown-route 404 or 405).
    for (method, path) in &expected {
        let concrete = path
            .replace("{ns}", "nobody")
            .replace("{name}", "nothing")
            .replace("{ref}", "9.9.9")
            .replace("{id}", "424242")
            .replace("{node_id}", "ghost");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let reply = c.call(method.clone(), &concrete, Body::None).await;
        assert_ne!(reply.status, 405, "{method} {concrete}");
        assert!(
            !reply.body["error_message"]
                .as_str()
                .is_some_and(|m| m.starts_with("no route")),
            "{method} {concrete}: {}",
            reply.body
        );
    }

    // A schema that is not at this binary's head is not ready, and says why.
    c.conn
        .execute_unprepared(
            "DELETE FROM seaql_migrations WHERE version = \
             (SELECT max(version) FROM seaql_migrations)",
        )
        .await
        .expect("forget a migration");
    c.get("/readyz")
        .await
        .error(503, "unavailable")
        .says("not migrated (1 pending migration(s))");
    assert_eq!(c.get("/healthz").await.status, 200);
    c.stop().await;
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn datasets_are_registered_listed_resolved_and_versions_deleted() {
    let c = Controller::start("", "").await;
    let v1 = prices(json!([["ETH", 3100.5], ["BTC", 91000.0]]));
    let v2 = prices(json!([["ETH", 3200.0]]));
    std::fs::create_dir_all(c.ws.sources_dir().join("sub")).expect("mkdir");
    std::fs::write(
        c.ws.sources_dir().join("sub/trades.csv"),
        "id,symbol\n1,ETH\n2,BTC\n",
    )
    .expect("write csv");
    let csv = trades("sub/trades.csv");

    // Inline rows; the hash is the sha256 of the stored bytes, stored under the data directory.
    let reply = c
        .post(
            "/datasets",
            json!({"namespace": "demo", "name": "prices", "version": "1.0.0", "manifest": v1}),
        )
        .await;
    let hash1 = hash_of(&v1);
    assert_eq!(
        reply.ok(201),
        &json!({"namespace": "demo", "name": "prices", "version": "1.0.0", "hash": hash1})
    );
    let stored = std::fs::read(c.ws.data_dir().join(format!("manifests/{hash1}.json")))
        .expect("the manifest file");
    assert_eq!(stored, serde_json::to_vec(&v1).expect("encode"));
    let row = ampd::metadata::datasets::get_manifest(&c.conn, &hash1)
        .await
        .expect("read")
        .expect("registered");
    assert_eq!(
        (row.kind.as_str(), row.path.as_str()),
        ("static", format!("manifests/{hash1}.json").as_str())
    );

    // Versions sort by semver, not as text; `latest` is the highest, `dev` the last registered.
    let hash10 = c.register("demo", "prices", "1.10.0", v2.clone()).await;
    let hash2 = c
        .register("demo", "prices", "1.2.0", prices(json!([])))
        .await;
    let hash_csv = c.register("demo", "trades", "0.1.0", csv.clone()).await;
    assert_eq!(hash_csv, hash_of(&csv));
    // Registering a version with its own manifest again changes nothing but `dev`.
    assert_eq!(
        c.register("demo", "prices", "1.0.0", v1.clone()).await,
        hash1
    );

    assert_eq!(
        c.get("/datasets").await.ok(200),
        &json!([{"namespace": "demo", "name": "prices"}, {"namespace": "demo", "name": "trades"}])
    );
    let dataset = c.get("/datasets/demo/prices").await.ok(200).clone();
    let versions: Vec<(&str, &str)> = dataset["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|t| (t["version"].as_str().unwrap(), t["hash"].as_str().unwrap()))
        .collect();
    assert_eq!(
        versions,
        [
            ("1.0.0", hash1.as_str()),
            ("1.2.0", hash2.as_str()),
            ("1.10.0", hash10.as_str())
        ]
    );
    let tags: Vec<(&str, &str)> = dataset["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| (t["version"].as_str().unwrap(), t["hash"].as_str().unwrap()))
        .collect();
    assert_eq!(
        tags,
        [
            ("1.0.0", hash1.as_str()),
            ("1.10.0", hash10.as_str()),
            ("1.2.0", hash2.as_str()),
            ("dev", hash1.as_str()),
            ("latest", hash10.as_str())
        ]
    );

    // Resolve by version, latest, dev and hash: the manifest as stored, and its tags.
    for (reference, hash, manifest, tags) in [
        ("1.0.0", &hash1, &v1, json!(["1.0.0", "dev"])),
        ("latest", &hash10, &v2, json!(["1.10.0", "latest"])),
        ("dev", &hash1, &v1, json!(["1.0.0", "dev"])),
        (hash10.as_str(), &hash10, &v2, json!(["1.10.0", "latest"])),
    ] {
        let got = c
            .get(&format!("/datasets/demo/prices/versions/{reference}"))
            .await;
        assert_eq!(
            got.ok(200),
            &json!({"namespace": "demo", "name": "prices", "hash": hash, "kind": "static",
                    "manifest": manifest, "tags": tags}),
            "{reference}"
        );
    }
    let got = c.get("/datasets/demo/trades/versions/0.1.0").await;
    assert_eq!(got.ok(200)["manifest"], csv);

    // Deleting the highest version moves `latest` down.
    assert_eq!(
        c.delete("/datasets/demo/prices/versions/1.10.0")
            .await
            .status,
        204
    );
    let latest = c.get("/datasets/demo/prices/versions/latest").await;
    assert_eq!(latest.ok(200)["hash"], hash2.as_str());
    c.get("/datasets/demo/prices/versions/1.10.0")
        .await
        .error(404, "not_found");

    // Unknown names and bad references change nothing.
    let before = c.snapshot().await;
    c.get("/datasets/demo/nothing")
        .await
        .error(404, "not_found");
    c.get("/datasets/Demo/prices")
        .await
        .error(400, "invalid_request");
    for (path, status, code) in [
        ("/datasets/demo/prices/versions/9.9.9", 404, "not_found"),
        ("/datasets/demo/nothing/versions/latest", 404, "not_found"),
        ("/datasets/demo/prices/versions/1.0", 400, "invalid_request"),
        (
            "/datasets/demo/prices/versions/v1.0.0",
            400,
            "invalid_request",
        ),
        (
            "/datasets/demo/prices/versions/ABCDEF",
            400,
            "invalid_request",
        ),
        (
            "/datasets/demo/pr%2Fices/versions/1.0.0",
            400,
            "invalid_request",
        ),
        (
            "/datasets/demo/prices/versions/0000000000000000000000000000000000000000000000000000000000000000",
            404,
            "not_found",
        ),
        (
            "/datasets/demo/prices/versions/9.9.9/tables",
            404,
            "not_found",
        ),
        (
            "/datasets/demo/prices/versions/x.y/tables",
            400,
            "invalid_request",
        ),
    ] {
        c.get(path).await.error(status, code);
    }
    let by_hash = format!("/datasets/demo/prices/versions/{hash1}");
    for (path, status, code) in [
        (
            "/datasets/demo/prices/versions/latest",
            400,
            "invalid_request",
        ),
        ("/datasets/demo/prices/versions/dev", 400, "invalid_request"),
        ("/datasets/demo/prices/versions/1.0", 400, "invalid_request"),
        (by_hash.as_str(), 400, "invalid_request"),
        ("/datasets/demo/prices/versions/9.9.9", 404, "not_found"),
        ("/datasets/demo/nothing/versions/1.0.0", 404, "not_found"),
        (
            "/datasets/BAD/prices/versions/1.0.0",
            400,
            "invalid_request",
        ),
    ] {
        c.delete(path).await.error(status, code);
    }
    assert_eq!(c.snapshot().await, before);

    // Where the sources directory is not visible, CSV sources are left to the worker to check.
    std::fs::remove_dir_all(c.ws.sources_dir()).expect("remove sources");
    c.register("demo", "elsewhere", "1.0.0", trades("not/here.csv"))
        .await;
    c.stop().await;
}

#[tokio::test]
async fn a_manifest_is_stored_as_its_json_value_and_read_back_as_stored() {
    let c = Controller::start("", "").await;
    // Unsorted and duplicate keys (the last wins), escapes and unicode, floats, big integers,
    // nested objects in a field the manifest ignores, and whitespace: the stored bytes are those
    // of the manifest's `serde_json::Value`, as they always were.
    let manifest = r#" {
        "tables" : {"zeta": {"rows": [[-0.0, "\u00e9\n\"\\\/", 1E2], [1e300, "😀\ud83d\ude00", -0]],
                              "columns": [{"type": "float64", "name": "f"}, {"name": "s", "type": "string"},
                                          {"type": "float64", "name": "g"}]},
                     "alpha": {"columns": [{"name": "n", "type": "int64"}],
                               "rows": [[9223372036854775807], [-9223372036854775808]]}},
        "kind": "ignored",
        "meta": {"b": [1.0, 18446744073709551615, 18446744073709551616, {"y": null, "x": {}}],
                 "a": "\u0000", "a": "last", "é": 1, "e": 2},
        "kind" : "static"
    } "#;
    let value: Value = serde_json::from_str(manifest).expect("a JSON manifest");
    let body = format!(
        "{{\"namespace\": \"demo\", \"name\": \"odd\", \"version\": \"1.0.0\", \"manifest\": {manifest}}}"
    );
    let reply = c
        .call(
            Method::POST,
            "/datasets",
            Body::Raw(body.clone(), "application/json"),
        )
        .await;
    let hash = hash_of(&value);
    assert_eq!(reply.ok(201)["hash"], hash.as_str());
    let stored = std::fs::read(c.ws.data_dir().join(format!("manifests/{hash}.json")))
        .expect("the manifest file");
    assert_eq!(
        String::from_utf8(stored.clone()).expect("utf-8"),
        String::from_utf8(serde_json::to_vec(&value).expect("encode")).expect("utf-8")
    );

    // Read back: the stored bytes verbatim as the manifest.
    let text = c
        .api
        .http()
        .get(c.api.url("/datasets/demo/odd/versions/1.0.0"))
        .send()
        .await
        .expect("GET the version")
        .text()
        .await
        .expect("its body");
    let stored = String::from_utf8(stored).expect("utf-8");
    assert!(text.contains(&format!("\"manifest\":{stored},")), "{text}");
    let read: Value = serde_json::from_str(&text).expect("a JSON answer");
    assert_eq!(read["manifest"], value);

    // The same manifest sent as a tree, or as the same text again, is the same version.
    assert_eq!(
        c.register("demo", "odd", "1.0.0", value.clone()).await,
        hash
    );
    let again = c
        .call(
            Method::POST,
            "/datasets",
            Body::Raw(body, "application/json"),
        )
        .await;
    assert_eq!(again.ok(201)["hash"], hash.as_str());
    // Deploying checks the stored bytes again: they are a valid manifest.
    let deployed = c.deploy("demo/odd", "1.0.0", Body::None).await;
    assert_eq!(deployed.status, 202, "{}", deployed.body);
    c.stop().await;
}

#[tokio::test]
async fn registering_bad_input_is_refused_and_changes_nothing() {
    let c = Controller::start("max_body_bytes = 16384", "").await;
    let sources = c.ws.sources_dir();
    std::fs::write(sources.join("good.csv"), "id,symbol\n1,ETH\n").expect("write");
    std::fs::write(sources.join("swapped.csv"), "symbol,id\nETH,1\n").expect("write");
    std::fs::write(sources.join("empty.csv"), "").expect("write");
    let secret = c.ws.path().join("secret.csv");
    std::fs::write(&secret, "id,symbol\n1,ETH\n").expect("write");
    std::os::unix::fs::symlink(&secret, sources.join("link.csv")).expect("symlink");
    c.register("demo", "prices", "1.0.0", prices(json!([["ETH", 1.0]])))
        .await;
    let before = c.snapshot().await;

    let body = |namespace: &str, name: &str, version: &str, manifest: Value| json!({"namespace": namespace, "name": name, "version": version, "manifest": manifest});
    let cases: Vec<(&str, Body, u16, &str, &str)> = vec![
        (
            "malformed JSON",
            Body::Raw("{\"namespace\": ".into(), "application/json"),
            400,
            "invalid_request",
            "",
        ),
        (
            "not JSON at all",
            Body::Raw("namespace=demo".into(), "application/x-www-form-urlencoded"),
            415,
            "unsupported_media_type",
            "",
        ),
        (
            "a wrong type",
            Body::Json(json!({"namespace": 5, "name": "x", "version": "1.0.0", "manifest": {}})),
            422,
            "invalid_body",
            "namespace",
        ),
        (
            "a missing field",
            Body::Json(json!({"namespace": "demo", "name": "x", "version": "1.0.0"})),
            422,
            "invalid_body",
            "manifest",
        ),
        (
            "an invalid namespace",
            Body::Json(body("Demo", "x", "1.0.0", prices(json!([])))),
            400,
            "invalid_request",
            "namespace",
        ),
        (
            "an invalid name",
            Body::Json(body("demo", "x-y", "1.0.0", prices(json!([])))),
            400,
            "invalid_request",
            "name",
        ),
        (
            "latest as a version",
            Body::Json(body("demo", "x", "latest", prices(json!([])))),
            400,
            "invalid_request",
            "semantic version",
        ),
        (
            "dev as a version",
            Body::Json(body("demo", "x", "dev", prices(json!([])))),
            400,
            "invalid_request",
            "semantic version",
        ),
        (
            "a partial version",
            Body::Json(body("demo", "x", "1.0", prices(json!([])))),
            400,
            "invalid_request",
            "semantic version",
        ),
        (
            "another kind",
            Body::Json(body(
                "demo",
                "x",
                "1.0.0",
                json!({"kind": "evm-rpc", "tables": {}}),
            )),
            422,
            "invalid_manifest",
            "kind",
        ),
        (
            "no kind",
            Body::Json(body("demo", "x", "1.0.0", json!({"tables": {}}))),
            422,
            "invalid_manifest",
            "kind",
        ),
        (
            "an unknown column type",
            Body::Json(body(
                "demo",
                "x",
                "1.0.0",
                json!({"kind": "static", "tables": {"t": {
                    "columns": [{"name": "a", "type": "decimal"}], "rows": []}}}),
            )),
            422,
            "invalid_manifest",
            "tables.t.columns[0]",
        ),
        (
            "a bad row",
            Body::Json(body(
                "demo",
                "x",
                "1.0.0",
                prices(json!([["ETH", 1.0], ["BTC", "cheap"]])),
            )),
            422,
            "invalid_manifest",
            "tables.prices.rows[1][1]",
        ),
        (
            "an absolute CSV path",
            Body::Json(body(
                "demo",
                "x",
                "1.0.0",
                trades(&secret.display().to_string()),
            )),
            422,
            "invalid_manifest",
            "tables.trades.csv",
        ),
        (
            "a CSV path with ..",
            Body::Json(body("demo", "x", "1.0.0", trades("../secret.csv"))),
            422,
            "invalid_manifest",
            "tables.trades.csv",
        ),
        (
            "a CSV symlink out of the sources directory",
            Body::Json(body("demo", "x", "1.0.0", trades("link.csv"))),
            422,
            "invalid_manifest",
            "outside the sources directory",
        ),
        (
            "a missing CSV file",
            Body::Json(body("demo", "x", "1.0.0", trades("missing.csv"))),
            422,
            "invalid_manifest",
            "missing.csv",
        ),
        (
            "a CSV header in another order",
            Body::Json(body("demo", "x", "1.0.0", trades("swapped.csv"))),
            422,
            "invalid_manifest",
            "swapped.csv",
        ),
        (
            "an empty CSV file",
            Body::Json(body("demo", "x", "1.0.0", trades("empty.csv"))),
            422,
            "invalid_manifest",
            "empty.csv",
        ),
        (
            "a version that names another manifest",
            Body::Json(body(
                "demo",
                "prices",
                "1.0.0",
                prices(json!([["BTC", 2.0]])),
            )),
            409,
            "conflict",
            "already names manifest",
        ),
        (
            "a body over max_body_bytes",
            Body::Json(body(
                "demo",
                "x",
                "1.0.0",
                prices(Value::Array(vec![json!(["ETH", 1.0]); 2000])),
            )),
            413,
            "payload_too_large",
            "",
        ),
    ];
    for (what, request, status, code, part) in cases {
        let reply = c.call(Method::POST, "/datasets", request).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        reply.error(status, code).says(part);
        assert_eq!(c.snapshot().await, before, "{what} changed something");
    }
    // The CSV file the symlink names was never read into anything, and a good one registers.
    c.register("demo", "trades", "1.0.0", trades("good.csv"))
        .await;
    c.stop().await;
}

#[tokio::test]
async fn deploy_places_the_job_and_returns_the_existing_one() {
    let c = Controller::start(QUIET, "").await;
    let v1 = prices(json!([["ETH", 1.0]]));
    let v2 = prices(json!([["ETH", 2.0]]));
    let hash1 = c.register("demo", "a", "1.0.0", v1).await;
    c.register("demo", "a", "2.0.0", v2).await;
    c.register("demo", "b", "1.0.0", prices(json!([]))).await;

    // No worker is live: the job waits, unplaced.
    let first = c.deploy("demo/a", "1.0.0", Body::None).await;
    let first = first.ok(202).clone();
    assert_eq!(first["outcome"], "created");
    assert_eq!(first["status"], "SCHEDULED");
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["node_id"], Value::Null);
    let job_a1 = first["job_id"].as_i64().expect("job id");
    let job = c.job(job_a1).await;
    assert_eq!(job.kind, "materialize-static");
    assert_eq!(
        job.descriptor,
        json!({"namespace": "demo", "name": "a", "manifest_hash": hash1})
    );
    // The same version again, by version and by hash: the same job.
    for reference in ["1.0.0", hash1.as_str()] {
        let again = c.deploy("demo/a", reference, Body::None).await;
        assert_eq!(again.ok(202)["job_id"], job_a1);
        assert_eq!(again.ok(202)["outcome"], "existing");
    }

    // Once a worker is live the scheduler places the waiting job on it.
    live_worker(&c.conn, "w1").await;
    eventually("the scheduler places the job on w1", || async {
        c.job(job_a1).await.node_id.as_deref() == Some("w1")
    })
    .await;

    // Without a node: the least loaded live worker; with one: that worker.
    live_worker(&c.conn, "w2").await;
    let a2 = c.deploy("demo/a", "latest", Body::None).await;
    assert_eq!(a2.ok(202)["node_id"], "w2");
    assert_eq!(a2.ok(202)["outcome"], "created");
    let job_a2 = a2.ok(202)["job_id"].as_i64().expect("job id");
    let dev = c.deploy("demo/a", "dev", Body::None).await;
    assert_eq!(
        dev.ok(202)["job_id"],
        job_a2,
        "dev is the last registered: 2.0.0"
    );
    let b = c
        .deploy("demo/b", "1.0.0", Body::Json(json!({"node_id": "w1"})))
        .await;
    assert_eq!(b.ok(202)["node_id"], "w1");
    let job_b = b.ok(202)["job_id"].as_i64().expect("job id");

    // After FATAL a deploy schedules a new attempt; after COMPLETED it returns the job.
    let job = c.job(job_a2).await;
    jobs::mark_fatal(&c.conn, &claim(&job), json!({"reason": "test"}))
        .await
        .expect("fatal");
    let again = c.deploy("demo/a", "2.0.0", Body::None).await;
    assert_eq!(
        (
            &again.ok(202)["job_id"],
            &again.ok(202)["outcome"],
            &again.ok(202)["attempt"],
            &again.ok(202)["status"]
        ),
        (
            &json!(job_a2),
            &json!("rescheduled"),
            &json!(2),
            &json!("SCHEDULED")
        )
    );
    let job = c.job(job_b).await;
    jobs::mark_running(&c.conn, &claim(&job))
        .await
        .expect("running");
    jobs::mark_completed(&c.conn, &claim(&job), &[], Duration::from_secs(60))
        .await
        .expect("completed");
    let done = c.deploy("demo/b", "1.0.0", Body::None).await;
    assert_eq!(done.ok(202)["outcome"], "existing");
    assert_eq!(done.ok(202)["status"], "COMPLETED");

    // Bad input changes nothing.
    live_worker(&c.conn, "w3").await;
    workers::sign_off(&c.conn, "w3").await.expect("sign off");
    let before = c.snapshot().await;
    let cases: Vec<(&str, &str, Body, u16, &str)> = vec![
        ("demo/a", "9.9.9", Body::None, 404, "not_found"),
        ("demo/nothing", "1.0.0", Body::None, 404, "not_found"),
        ("demo/a", "1.0", Body::None, 400, "invalid_request"),
        ("Demo/a", "1.0.0", Body::None, 400, "invalid_request"),
        (
            "demo/a",
            "1.0.0",
            Body::Json(json!({"node_id": "ghost"})),
            404,
            "not_found",
        ),
        (
            "demo/a",
            "1.0.0",
            Body::Json(json!({"node_id": "w3"})),
            409,
            "conflict",
        ),
        (
            "demo/a",
            "1.0.0",
            Body::Json(json!({"node_id": "-bad id"})),
            400,
            "invalid_request",
        ),
        (
            "demo/a",
            "1.0.0",
            Body::Raw("{\"node_id\"".into(), "application/json"),
            400,
            "invalid_request",
        ),
        (
            "demo/a",
            "1.0.0",
            Body::Json(json!({"node_id": 5})),
            422,
            "invalid_body",
        ),
        (
            "demo/a",
            "1.0.0",
            Body::Raw("node_id=w1".into(), "text/plain"),
            415,
            "unsupported_media_type",
        ),
    ];
    for (dataset, reference, body, status, code) in cases {
        c.deploy(dataset, reference, body).await.error(status, code);
        assert_eq!(
            c.snapshot().await,
            before,
            "deploy {dataset}@{reference} changed something"
        );
    }
    c.stop().await;
}

#[tokio::test]
async fn jobs_are_listed_filtered_paged_stopped_and_deleted() {
    let c = Controller::start(QUIET, "").await;
    live_worker(&c.conn, "w1").await;
    let mut ids = Vec::new();
    for name in ["d1", "d2", "d3", "d4", "d5"] {
        c.register("demo", name, "1.0.0", prices(json!([]))).await;
        let reply = c.deploy(&format!("demo/{name}"), "1.0.0", Body::None).await;
        assert_eq!(reply.ok(202)["node_id"], "w1");
        ids.push(reply.ok(202)["job_id"].as_i64().expect("id"));
    }
    let [scheduled, running, completed, error, fatal] = ids[..] else {
        unreachable!()
    };
    let conn = &c.conn;
    jobs::mark_running(conn, &claim(&c.job(running).await))
        .await
        .expect("running");
    let job = c.job(completed).await;
    jobs::mark_running(conn, &claim(&job)).await.expect("run");
    jobs::mark_completed(conn, &claim(&job), &[], Duration::from_secs(60))
        .await
        .expect("complete");
    jobs::mark_error(conn, &claim(&c.job(error).await), json!({"reason": "test"}))
        .await
        .expect("error");
    jobs::mark_fatal(conn, &claim(&c.job(fatal).await), json!({"reason": "test"}))
        .await
        .expect("fatal");

    let page_ids = |reply: &Reply| -> Vec<i64> {
        reply.ok(200)["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["id"].as_i64().expect("id"))
            .collect()
    };
    assert_eq!(page_ids(&c.get("/jobs").await), ids);
    let after = format!("after={running}");
    for (query, expected) in [
        ("status=RUNNING,ERROR", vec![running, error]),
        ("status=running", vec![running]),
        ("status=active", vec![scheduled, running]),
        ("status=terminal", vec![completed, error, fatal]),
        ("status=active,FATAL", vec![scheduled, running, fatal]),
        (after.as_str(), vec![completed, error, fatal]),
    ] {
        assert_eq!(
            page_ids(&c.get(&format!("/jobs?{query}")).await),
            expected,
            "{query}"
        );
    }
    // Keyset pages of two, following next_after.
    let mut seen = Vec::new();
    let mut path = "/jobs?limit=2".to_owned();
    loop {
        let reply = c.get(&path).await;
        seen.extend(page_ids(&reply));
        match reply.body["next_after"].as_i64() {
            Some(after) => path = format!("/jobs?limit=2&after={after}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    // One job: the columns of its row.
    let got = c.get(&format!("/jobs/{completed}")).await.ok(200).clone();
    let row = c.job(completed).await;
    assert_eq!(got["id"], completed);
    assert_eq!(got["kind"], "materialize-static");
    assert_eq!(got["status"], "COMPLETED");
    assert_eq!(got["node_id"], "w1");
    assert_eq!(got["attempt"], 1);
    assert_eq!(got["descriptor"], row.descriptor);
    assert_eq!(got["idempotency_key"], row.idempotency_key);
    assert!(got["created_at"].is_string() && got["updated_at"].is_string());

    // Stop: SCHEDULED and RUNNING jobs are asked to stop; asking again changes nothing.
    for id in [scheduled, running] {
        let reply = c.put(&format!("/jobs/{id}/stop")).await;
        assert_eq!(reply.ok(200)["status"], "STOP_REQUESTED");
        let before = c.snapshot().await;
        let again = c.put(&format!("/jobs/{id}/stop")).await;
        assert_eq!(again.ok(200)["status"], "STOP_REQUESTED");
        assert_eq!(c.snapshot().await, before);
    }
    // The worker acknowledges and stops: stopping it again is still fine.
    let job = c.job(scheduled).await;
    jobs::mark_stopping(conn, &claim(&job))
        .await
        .expect("stopping");
    jobs::mark_stopped(conn, &claim(&job))
        .await
        .expect("stopped");
    let reply = c.put(&format!("/jobs/{scheduled}/stop")).await;
    assert_eq!(reply.ok(200)["status"], "STOPPED");
    let events: Vec<String> = c.get(&format!("/jobs/{scheduled}/events")).await.ok(200)["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            assert_eq!(e["job_id"], scheduled);
            e["event_type"].as_str().expect("type").to_owned()
        })
        .collect();
    assert_eq!(
        events,
        ["SCHEDULED", "STOP_REQUESTED", "STOPPING", "STOPPED"]
    );

    // Illegal transitions and bad input change nothing.
    let before = c.snapshot().await;
    for id in [completed, error, fatal] {
        c.put(&format!("/jobs/{id}/stop"))
            .await
            .error(409, "state_conflict");
    }
    c.put("/jobs/424242/stop").await.error(404, "not_found");
    c.put("/jobs/abc/stop").await.error(400, "invalid_request");
    c.delete(&format!("/jobs/{running}"))
        .await
        .error(409, "state_conflict")
        .says("is STOP_REQUESTED: only a COMPLETED, STOPPED, ERROR or FATAL job can be deleted");
    c.delete("/jobs/424242").await.error(404, "not_found");
    c.delete("/jobs/abc").await.error(400, "invalid_request");
    c.get("/jobs/424242").await.error(404, "not_found");
    c.get("/jobs/424242/events").await.error(404, "not_found");
    c.get("/jobs/1.5").await.error(400, "invalid_request");
    for query in [
        "status=BOGUS",
        "status=RUNNING,",
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "after=abc",
    ] {
        c.get(&format!("/jobs?{query}"))
            .await
            .error(400, "invalid_request");
    }
    assert_eq!(c.snapshot().await, before);

    // A terminal job is deleted with its events.
    assert_eq!(c.delete(&format!("/jobs/{completed}")).await.status, 204);
    c.get(&format!("/jobs/{completed}"))
        .await
        .error(404, "not_found");
    c.get(&format!("/jobs/{completed}/events"))
        .await
        .error(404, "not_found");
    c.delete(&format!("/jobs/{completed}"))
        .await
        .error(404, "not_found");
    assert_eq!(page_ids(&c.get("/jobs").await).len(), 4);
    c.stop().await;
}

#[tokio::test]
async fn tables_show_the_active_revision_and_roll_back() {
    // Replaced revisions of a roll back are due for deletion at once.
    let c = Controller::start(QUIET, "gc_grace_secs = 0").await;
    let (ctl, conn) = (&c, &c.conn);
    live_worker(conn, "w1").await;
    let hash = c
        .register("demo", "prices", "1.0.0", prices(json!([["ETH", 1.0]])))
        .await;
    let tables = c.get("/datasets/demo/prices/versions/1.0.0/tables").await;
    assert_eq!(
        tables.ok(200),
        &json!({"hash": hash, "tables": [
            {"name": "prices", "table_id": null, "active_revision": null, "revisions": []}]})
    );

    // What a worker does: a revision with its files, activated by the completion.
    let materialize = |job_id: i64| async move {
        let job = ctl.job(job_id).await;
        let claim = claim(&job);
        jobs::mark_running(conn, &claim).await.expect("running");
        let table = revisions::register_table(conn, "demo", "prices", &hash_of_job(&job), "prices")
            .await
            .expect("table");
        let meta = json!({"format": "jsonl", "rows": 1,
            "columns": [{"name": "symbol", "type": "string"}, {"name": "price", "type": "float64"}]});
        let revision = revisions::create_revision(conn, table.id, Some(&claim), meta.clone())
            .await
            .expect("revision");
        files::register(
            conn,
            revision.id,
            "part-00000.jsonl",
            31,
            None,
            None,
            json!({"rows": 1, "sha256": "ab".repeat(32)}),
        )
        .await
        .expect("file");
        // A revision this attempt wrote but never completed.
        let partial = revisions::create_revision(conn, table.id, Some(&claim), meta)
            .await
            .expect("partial revision");
        jobs::mark_completed(conn, &claim, &[revision.id], Duration::from_secs(3600))
            .await
            .expect("completed");
        (table.id, revision.id, partial.id)
    };

    let job1 = c.deploy("demo/prices", "1.0.0", Body::None).await.ok(202)["job_id"]
        .as_i64()
        .expect("id");
    let (table_id, first, partial) = materialize(job1).await;
    let tables = c
        .get("/datasets/demo/prices/versions/latest/tables")
        .await
        .ok(200)
        .clone();
    let table = &tables["tables"][0];
    assert_eq!(table["name"], "prices");
    assert_eq!(table["table_id"], table_id);
    let active = &table["active_revision"];
    assert_eq!(active["id"], first);
    assert_eq!(active["rows"], 1);
    assert!(active["activated_at"].is_string());
    assert!(
        active["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("demo/prices/prices/"))
    );
    assert_eq!(
        active["files"],
        json!([{"name": "part-00000.jsonl", "size": 31, "rows": 1, "sha256": "ab".repeat(32)}])
    );
    let listed: Vec<i64> = table["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .map(|r| r["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(listed, [first, partial]);

    // Run it again: a second revision replaces the first, whose files wait an hour.
    assert_eq!(c.delete(&format!("/jobs/{job1}")).await.status, 204);
    let job2 = c.deploy("demo/prices", "1.0.0", Body::None).await.ok(202)["job_id"]
        .as_i64()
        .expect("id");
    let (_, second, _) = materialize(job2).await;
    let tables = c.get("/datasets/demo/prices/versions/1.0.0/tables").await;
    assert_eq!(tables.ok(200)["tables"][0]["active_revision"]["id"], second);

    // Roll back to the first: its deletion is cancelled, the second is replaced.
    let rolled = c
        .post(&format!("/revisions/{first}/activate"), json!({}))
        .await;
    let rolled = rolled.ok(200);
    assert_eq!(rolled["namespace"], "demo");
    assert_eq!(rolled["name"], "prices");
    assert_eq!(rolled["manifest_hash"], hash.as_str());
    assert_eq!(rolled["previous_revision_id"], second);
    assert_eq!(rolled["table"]["active_revision"]["id"], first);
    let tables = c.get("/datasets/demo/prices/versions/1.0.0/tables").await;
    assert_eq!(tables.ok(200)["tables"][0]["active_revision"]["id"], first);

    // The second's files are due at once (gc_grace_secs = 0): no roll back to it; nor to a revision
    // that was never completed; nor to one that does not exist.
    let before = c.snapshot().await;
    c.post(&format!("/revisions/{second}/activate"), json!({}))
        .await
        .error(409, "conflict")
        .says("due for deletion");
    c.post(&format!("/revisions/{partial}/activate"), json!({}))
        .await
        .error(409, "conflict")
        .says("never completed");
    c.post("/revisions/424242/activate", json!({}))
        .await
        .error(404, "not_found");
    c.post("/revisions/abc/activate", json!({}))
        .await
        .error(400, "invalid_request");
    assert_eq!(c.snapshot().await, before);
    c.stop().await;
}

fn hash_of_job(job: &entity::jobs::Model) -> String {
    job.descriptor["manifest_hash"]
        .as_str()
        .expect("manifest_hash")
        .to_owned()
}

#[tokio::test]
async fn workers_show_liveness_and_active_jobs() {
    let c = Controller::start(QUIET, "").await;
    live_worker(&c.conn, "w1").await;
    live_worker(&c.conn, "w2").await;
    workers::sign_off(&c.conn, "w2").await.expect("sign off");
    c.register("demo", "prices", "1.0.0", prices(json!([])))
        .await;
    let job = c.deploy("demo/prices", "1.0.0", Body::None).await.ok(202)["job_id"]
        .as_i64()
        .expect("id");

    let all = c.get("/workers").await.ok(200).clone();
    assert_eq!(all["next_after"], serde_json::Value::Null);
    let summary: Vec<(&str, bool, Vec<i64>)> = all["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            (
                w["node_id"].as_str().expect("node"),
                w["live"].as_bool().expect("live"),
                w["active_jobs"]
                    .as_array()
                    .expect("jobs")
                    .iter()
                    .map(|j| j["id"].as_i64().expect("id"))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("w1", true, vec![job]), ("w2", false, Vec::new())]
    );
    let w1 = c.get("/workers/w1").await.ok(200).clone();
    assert_eq!(w1["info"], json!({"version": "test"}));
    assert!(w1["heartbeat_at"].is_string() && w1["registered_at"].is_string());
    assert_eq!(w1["active_jobs"][0]["status"], "SCHEDULED");
    assert_eq!(c.get("/workers/w2").await.ok(200)["live"], false);

    let before = c.snapshot().await;
    c.get("/workers/ghost").await.error(404, "not_found");
    c.get("/workers/bad%20id").await.error(404, "not_found");
    assert_eq!(c.snapshot().await, before);
    c.stop().await;
}

#[tokio::test]
async fn the_token_is_required_on_every_route_but_healthz() {
    let token = "s3cret-admin-token-4711";
    let mut c = Controller::start(&format!("admin_token = \"{token}\""), "").await;
    c.register("demo", "prices", "1.0.0", prices(json!([])))
        .await;
    assert_eq!(c.get("/datasets").await.status, 200);
    let before = c.snapshot().await;

    for wrong in [
        None,
        Some("wrong"),
        Some("s3cret-admin-token-4712"),
        Some(""),
    ] {
        c.api.token = wrong.map(str::to_owned);
        assert_eq!(c.get("/healthz").await.ok(200), &json!({"status": "ok"}));
        for (method, path) in [
            (Method::GET, "/readyz"),
            (Method::GET, "/openapi.json"),
            (Method::GET, "/datasets"),
            (Method::GET, "/datasets/demo/prices/versions/1.0.0"),
            (Method::DELETE, "/datasets/demo/prices/versions/1.0.0"),
            (Method::POST, "/datasets/demo/prices/versions/1.0.0/deploy"),
            (Method::GET, "/jobs"),
            (Method::GET, "/workers"),
            (Method::GET, "/no/such/route"),
        ] {
            let reply = c.call(method.clone(), path, Body::None).await;
            reply.error(401, "unauthorized");
            assert_eq!(
                reply.headers.get("www-authenticate").map(|v| v.as_bytes()),
                Some(&b"Bearer"[..]),
                "{method} {path}"
            );
        }
        let reply = c
            .post(
                "/datasets",
                json!({"namespace": "demo", "name": "other", "version": "1.0.0",
                       "manifest": prices(json!([]))}),
            )
            .await;
        reply.error(401, "unauthorized");
        assert_eq!(c.snapshot().await, before);
    }
    c.api.token = Some(token.to_owned());
    assert_eq!(c.get("/readyz").await.status, 200);
    let log = c.stop().await;
    assert!(!log.contains(token), "the token was logged:\n{log}");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let c = Controller::start("", "").await;
    c.get("/nope").await.error(404, "not_found");
    c.get("/datasets/a/b/c/d/e/f").await.error(404, "not_found");
    c.delete("/datasets").await.error(405, "method_not_allowed");
    c.call(Method::PATCH, "/jobs/1", Body::None)
        .await
        .error(405, "method_not_allowed");
    c.get("/jobs/1/stop").await.error(405, "method_not_allowed");
    // Every request is logged with its method, path and status.
    let log = c.stop().await;
    let logged = |path: &str, status: &str| {
        log.lines()
            .any(|l| l.contains(&format!("path={path}")) && l.contains(&format!("status={status}")))
    };
    assert!(logged("/nope", "404"), "{log}");
    assert!(logged("/jobs/1", "405"), "{log}");
    assert!(logged("/healthz", "200"), "{log}");
}

#[tokio::test]
async fn a_port_in_use_is_a_one_line_error_and_exit_1() {
    let db = TestDb::empty().await;
    let ws = Workspace::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let config = ws.config(
        "controller.toml",
        db.url(),
        &format!("[controller]\nadmin_addr = \"{addr}\"\n"),
    );
    let service = Service::start(
        "controller",
        &config,
        &["controller"],
        &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
    );
    let exit = service.wait().await;
    assert_eq!(exit.code, Some(1), "{}", exit.log);
    let errors: Vec<&str> = exit
        .log
        .lines()
        .filter(|l| l.starts_with("error:") || l.contains("caused by"))
        .collect();
    assert_eq!(
        errors,
        [format!(
            "error: cannot listen on {addr} (controller.admin_addr): Address already in use (os \
             error 98); another process listens there: stop it or set another address"
        )],
        "{}",
        exit.log
    );
    assert!(!exit.log.contains("panicked"), "{}", exit.log);
    drop(taken);
}

#[tokio::test]
async fn readiness_and_requests_follow_the_database() {
    let mut c = Controller::start("", "").await;
    c.register("demo", "prices", "1.0.0", prices(json!([])))
        .await;
    let name = c.db.name().to_owned();
    let sessions = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    );

    // The database refuses connections: not ready, and a request waits for it, retrying.
    tests::admin_exec(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
    ))
    .await;
    tests::admin_exec(&sessions).await;
    c.get("/readyz")
        .await
        .error(503, "unavailable")
        .says("not ready");
    assert_eq!(c.get("/healthz").await.status, 200);
    let pending = tokio::spawn(c.api.http().get(c.api.url("/datasets")).send());
    let service = c.service.as_mut().expect("running");
    service
        .wait_for_log(Duration::from_secs(30), |log| {
            log.contains("list datasets failed; retrying")
        })
        .await;

    // Back: the waiting request completes, and the controller is ready again.
    tests::admin_exec(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")).await;
    let reply = pending.await.expect("the request task").expect("an answer");
    assert_eq!(reply.status().as_u16(), 200);
    let body: Value = reply.json().await.expect("JSON");
    assert_eq!(body, json!([{"namespace": "demo", "name": "prices"}]));
    eventually("ready again", || async {
        c.get("/readyz").await.status == 200
    })
    .await;
    c.stop().await;
}

/// The files in the data directory's `manifests/`, none when it does not exist.
fn stored_manifests(c: &Controller) -> usize {
    std::fs::read_dir(c.ws.data_dir().join("manifests")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn a_120_000_column_manifest_is_refused_by_the_column_limit_while_healthz_answers() {
    let c = Controller::start(QUIET, "").await;
    let columns: Vec<Value> = (0..120_000)
        .map(|i| json!({"name": format!("c{i}"), "type": "int64"}))
        .collect();
    let manifest = json!({"kind": "static", "tables": {"t": {"columns": columns, "rows": []}}});
    let post = |name: &'static str| {
        let body = json!({"namespace": "big", "name": name, "version": "1.0.0",
                          "manifest": manifest.clone()});
        c.post("/datasets", body)
    };
    let health = async {
        for _ in 0..5 {
            let answered = tokio::time::timeout(Duration::from_secs(10), c.get("/healthz")).await;
            assert_eq!(
                answered.map(|r| r.status).ok(),
                Some(200),
                "/healthz waited"
            );
        }
    };
    let (a, b, ()) = tokio::join!(post("a"), post("b"), health);
    for reply in [a, b] {
        reply.error(422, "invalid_manifest");
        let message = reply.body["error_message"].as_str().unwrap_or_default();
        assert!(
            message.contains("tables.t.columns") && message.contains("max_table_columns"),
            "{message}"
        );
    }
    assert_eq!(stored_manifests(&c), 0);
    c.stop().await;
}

#[tokio::test]
async fn names_at_the_length_limit_register_and_past_it_get_400_with_no_file_left() {
    let c = Controller::start(QUIET, "").await;
    let manifest = json!({"kind": "static", "tables": {"t": {
        "columns": [{"name": "a", "type": "int64"}], "rows": [[1]]}}});
    let at_limit = format!("n{}", "x".repeat(62));
    let reply = c
        .post(
            "/datasets",
            json!({"namespace": at_limit, "name": at_limit, "version": "1.0.0",
                   "manifest": manifest}),
        )
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let long = format!("n{}", "x".repeat(63));
    let huge = format!("n{}", "x".repeat(8999));
    let version = format!("1.0.0-{}", "x".repeat(60));
    for (namespace, name, version, what) in [
        (long.as_str(), "ok", "1.0.0", "namespace"),
        (huge.as_str(), "ok", "1.0.0", "namespace"),
        ("ok", long.as_str(), "1.0.0", "name"),
        ("ok", "ok", version.as_str(), "version"),
    ] {
        let reply = c
            .post(
                "/datasets",
                json!({"namespace": namespace, "name": name, "version": version,
                       "manifest": {"kind": "static", "tables": {"u": {
                           "columns": [{"name": "a", "type": "int64"}], "rows": [[2]]}}}}),
            )
            .await;
        reply.error(400, "invalid_request");
        let message = reply.body["error_message"].as_str().unwrap_or_default();
        assert!(
            message.contains(what) && message.contains("max_name_len"),
            "{message}"
        );
    }
    assert_eq!(stored_manifests(&c), 1, "a refused manifest left its file");
    c.stop().await;
}

#[tokio::test]
async fn a_cross_site_post_without_a_token_is_refused_and_changes_nothing() {
    let c = Controller::start(QUIET, "").await;
    let manifest = json!({"kind": "static", "tables": {"t": {
        "columns": [{"name": "a", "type": "int64"}], "rows": [[1]]}}});
    c.post(
        "/datasets",
        json!({"namespace": "x", "name": "y", "version": "1.0.0", "manifest": manifest}),
    )
    .await;
    let before = snapshot(&c.conn, &c.ws.data_dir()).await;
    // What a page of another site can send without a preflight: no Content-Type, or text/plain,
    // and none of ampd's headers.
    let plain = reqwest::Client::new();
    let url = c.api.url("/datasets/x/y/versions/1.0.0/deploy");
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = plain.post(&url).header("Origin", "http://evil.example");
        if let Some(t) = content_type {
            request = request.header("Content-Type", t).body("{}");
        }
        let reply = request.send().await.unwrap();
        assert_eq!(reply.status().as_u16(), 415, "{content_type:?}");
    }
    assert_eq!(
        snapshot(&c.conn, &c.ws.data_dir()).await,
        before,
        "a refused POST changed something"
    );
    // ampd's own clients say who they are.
    let reply = plain
        .post(&url)
        .header("X-Ampd-Client", "curl")
        .send()
        .await
        .unwrap();
    assert_ne!(reply.status().as_u16(), 415);
    c.stop().await;
}

#[tokio::test]
async fn a_manifest_stored_before_a_limit_was_lowered_stays_readable_and_deletable_but_is_not_deployed()
 {
    let mut c = Controller::start(QUIET, "").await;
    let column = |name: &str| json!({"name": name, "type": "int64"});
    let wide = json!({"kind": "static", "tables": {"t": {
        "columns": [column("a"), column("b"), column("c")], "rows": [[1, 2, 3]]}}});
    let narrow = json!({"kind": "static", "tables": {"t": {
        "columns": [column("a")], "rows": [[1]]}}});
    c.register("wide", "cols", "1.0.0", wide).await;
    c.register("a_long_namespace", "n", "1.0.0", narrow).await;
    c.restart_with(&format!(
        "{QUIET}max_table_columns = 2\nmax_name_len = 10\n"
    ))
    .await;

    c.get("/datasets/wide/cols/versions/1.0.0").await.ok(200);
    c.get("/datasets/a_long_namespace/n/versions/1.0.0")
        .await
        .ok(200);
    let before = c.snapshot().await;
    c.deploy("wide/cols", "1.0.0", Body::None)
        .await
        .error(422, "invalid_manifest")
        .says("max_table_columns");
    c.deploy("a_long_namespace/n", "1.0.0", Body::None)
        .await
        .error(400, "invalid_request")
        .says("max_name_len");
    assert_eq!(
        c.snapshot().await,
        before,
        "a refused deploy changed something"
    );

    assert_eq!(
        c.delete("/datasets/wide/cols/versions/1.0.0").await.status,
        204
    );
    assert_eq!(
        c.delete("/datasets/a_long_namespace/n/versions/1.0.0")
            .await
            .status,
        204
    );
    c.stop().await;
}
