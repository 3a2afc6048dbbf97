//! The admin API against its own OpenAPI document, with an independent tool: the pinned
//! schemathesis (`.ci/schemathesis`) generates requests from the document a running `ampd
//! controller` serves — valid ones and invalid ones, property-based, with a fixed seed so a run is
//! repeatable — and requires that no answer is a 5xx, that every answer (status, headers, body)
//! is one the document describes, and that every request the document forbids (a value outside a
//! pattern, range or type, a missing field, an unknown route) is refused with a 4xx.
//!
//! Not required: that every request the document allows is accepted — a manifest that is an
//! object can still fail the manifest's own rules (422), which no schema can say in full.

use serde_json::Value;
use tests::TestDb;
use tests::api::Api;
use tests::services::{Service, Workspace};

async fn controller(ws: &Workspace, db: &TestDb, keys: &str) -> (Service, Api) {
    let (service, addr) = tests::services::controller(ws, db.url(), keys).await;
    let token = keys
        .lines()
        .find_map(|l| l.strip_prefix("admin_token = "))
        .map(|t| t.trim_matches('"').to_owned());
    (service, Api::new(addr, token))
}

#[tokio::test]
async fn generated_requests_get_no_5xx_and_only_answers_the_document_describes() {
    let test = "openapi_conformance::generated_requests_get_no_5xx_and_only_answers_the_document_describes";
    let Some(st) = tests::pinned_tool("schemathesis", test) else {
        return;
    };
    let db = TestDb::empty().await;
    let ws = Workspace::new();
    let (service, api) = controller(&ws, &db, "").await;
    let out = tokio::process::Command::new(&st)
        .current_dir(ws.path())
        .args([
            "run",
            &api.url("/openapi.json"),
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--mode",
            "all",
            "--max-examples",
            "5",
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--no-color",
            // What ampd's own clients send with a body-less POST.
            "--header",
            "X-Ampd-Client: schemathesis",
        ])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .await
        .expect("run schemathesis");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found failures:\n{said}");
    // "Selected: 17/17" and "Tested: 17": every operation of the document was exercised.
    let number_after = |label: &str| {
        said.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|rest| {
                rest.trim()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
    };
    let (selected, tested) = (number_after("Selected:"), number_after("Tested:"));
    assert!(
        selected.is_some() && selected == tested,
        "not every operation was tested:\n{said}"
    );
    service.stop().await;
}

#[tokio::test]
async fn the_document_declares_the_bearer_scheme_only_when_a_token_is_configured() {
    let db = TestDb::empty().await;
    let ws = Workspace::new();
    let (open, api) = controller(&ws, &db, "").await;
    let doc: Value = api.get("/openapi.json").await.ok(200).clone();
    assert!(doc.get("security").is_none(), "{}", doc["security"]);
    assert!(doc.pointer("/components/securitySchemes").is_none());
    assert!(doc.pointer("/paths/~1jobs/get/responses/401").is_none());
    open.stop().await;

    let (secured, api) = controller(&ws, &db, "admin_token = \"s3cret\"").await;
    let doc: Value = api.get("/openapi.json").await.ok(200).clone();
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));
    assert_eq!(
        doc.pointer("/components/securitySchemes/bearer/scheme"),
        Some(&serde_json::json!("bearer"))
    );
    assert!(doc.pointer("/paths/~1jobs/get/responses/401").is_some());
    // The patterns the handlers enforce.
    let ns = doc
        .pointer("/paths/~1datasets~1{ns}~1{name}/get/parameters/0/schema/pattern")
        .and_then(Value::as_str);
    assert_eq!(ns, Some("^[a-z][a-z0-9_]*$"));
    assert_eq!(
        doc.pointer("/components/schemas/RegisterDataset/properties/namespace/maxLength"),
        Some(&serde_json::json!(63))
    );
    secured.stop().await;
}
