//! Stop requests that no worker acknowledges: a job asked to stop while it is on no node (never
//! placed, or its worker removed) is stopped by the controller, as the stop of a lost worker's job
//! is, and then re-deploys and deletes like any stopped job. Also a job left in STOP_REQUESTED with
//! no node by an earlier version, which recovers at the controller's next pass.

use std::time::Duration;

use ampd::metadata::jobs;
use ampd::service::controller::{self, Policy};
use reqwest::Method;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::json;
use tests::TestDb;
use tests::api::{Api, Body};
use tests::rows::{self, event_types, job};
use tests::services::{Service, Workspace, free_addr};

fn policy() -> Policy {
    Policy {
        liveness_window: Duration::from_secs(5),
        retry_base_delay: Duration::from_secs(3600),
        retry_max_delay: Duration::from_secs(3600),
        max_attempts: 5,
    }
}

/// Issue 21, item 2, through the data-access layer: SCHEDULED on no node → STOP_REQUESTED with no
/// node, which no worker will ever acknowledge; the controller's next pass stops it.
#[tokio::test]
async fn a_stop_of_an_unassigned_job_completes_at_the_controllers_next_pass() {
    let test_db = TestDb::migrated().await;
    let db = test_db.connect().await;
    let j = rows::scheduled(&db, "unplaced", None).await;
    let asked = jobs::request_stop(&db, j.id).await.expect("request stop");
    assert_eq!(
        (asked.status.as_str(), asked.node_id.as_deref()),
        ("STOP_REQUESTED", None)
    );

    controller::reconcile(&db, &policy())
        .await
        .expect("reconcile");

    let stopped = job(&db, j.id).await;
    assert_eq!(stopped.status, "STOPPED", "{stopped:?}");
    assert_eq!(stopped.node_id, None);
    assert_eq!(
        event_types(&db, j.id).await,
        ["SCHEDULED", "STOP_REQUESTED", "STOPPING", "STOPPED"]
    );
    let last = jobs::list_events(&db, j.id).await.unwrap().pop().unwrap();
    assert_eq!(
        last.detail,
        Some(json!({"reason": "worker_lost", "node_id": null}))
    );
    // A job on no node is lost to every liveness window: stopping it directly works too, and a
    // second pass has nothing left to do.
    let again = rows::scheduled(&db, "unplaced-2", None).await;
    let asked = jobs::request_stop(&db, again.id).await.unwrap();
    let done = jobs::stop_lost(&db, &asked, Duration::from_secs(3600))
        .await
        .expect("stop_lost on no node");
    assert_eq!(done.status, "STOPPED");
    controller::reconcile(&db, &policy()).await.expect("again");
    assert_eq!(event_types(&db, j.id).await.len(), 4);
}

/// A database written by an earlier version holds a job in STOP_REQUESTED with no node (what a
/// stop of an unplaced job left, for ever): the new controller's next pass stops it.
#[tokio::test]
async fn a_job_wedged_in_stop_requested_by_an_earlier_version_recovers() {
    let test_db = TestDb::migrated().await;
    let db = test_db.connect().await;
    db.execute_unprepared(
        "INSERT INTO jobs (id, idempotency_key, kind, node_id, status, descriptor, attempt) \
         OVERRIDING SYSTEM VALUE VALUES \
         (7, repeat('b', 64), 'materialize-static', NULL, 'STOP_REQUESTED', \
          '{\"namespace\": \"eth\", \"name\": \"old\", \"manifest_hash\": \"\"}', 1); \
         INSERT INTO job_events (job_id, node_id, event_type, detail) VALUES \
         (7, NULL, 'SCHEDULED', NULL), (7, NULL, 'STOP_REQUESTED', NULL)",
    )
    .await
    .expect("the wedged job, as plain rows");

    controller::reconcile(&db, &policy())
        .await
        .expect("reconcile");

    assert_eq!(job(&db, 7).await.status, "STOPPED");
    assert_eq!(
        event_types(&db, 7).await,
        ["SCHEDULED", "STOP_REQUESTED", "STOPPING", "STOPPED"]
    );
}

/// Through the admin API of an `ampd controller` with no worker: deploy (SCHEDULED on no node),
/// stop, and the job is STOPPED by the scheduler; a re-deploy then schedules a new attempt rather
/// than returning the stopped job, and a stopped job can be deleted.
#[tokio::test]
async fn an_unplaced_job_stopped_through_the_api_redeploys_and_deletes() {
    let db = TestDb::empty().await;
    let ws = Workspace::new();
    let addr = free_addr();
    let extra = format!(
        "[controller]\nadmin_addr = \"{addr}\"\nreconcile_interval_ms = 100\n\
         retry_base_delay_ms = 3600000\nretry_max_delay_ms = 3600000\n"
    );
    let config = ws.config("controller.toml", db.url(), &extra);
    let mut service = Service::start(
        "controller",
        &config,
        &["controller"],
        &[("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")],
    );
    service.wait_healthy(addr).await;
    let api = Api::new(addr, None);
    let conn = db.connect().await;
    let manifest = json!({"kind": "static", "tables": {"t": {
        "columns": [{"name": "id", "type": "int64"}], "rows": [[1]]}}});
    api.post(
        "/datasets",
        json!({"namespace": "demo", "name": "d", "version": "1.0.0", "manifest": manifest}),
    )
    .await
    .ok(201);
    let deploy = || {
        api.call(
            Method::POST,
            "/datasets/demo/d/versions/1.0.0/deploy",
            Body::None,
        )
    };
    let first = deploy().await;
    let body = first.ok(202);
    assert_eq!(
        (body["status"].as_str(), &body["node_id"]),
        (Some("SCHEDULED"), &json!(null))
    );
    let id = body["job_id"].as_i64().expect("job id");

    let stop = api.put(&format!("/jobs/{id}/stop")).await;
    assert_eq!(stop.ok(200)["status"], "STOP_REQUESTED");
    stopped(&conn, &service, id).await;

    let again = deploy().await;
    let body = again.ok(202);
    assert_eq!(body["job_id"], id);
    assert_eq!(body["outcome"], "rescheduled", "{body}");
    assert_eq!(body["status"], "SCHEDULED");
    assert_eq!(body["attempt"], 2);

    api.put(&format!("/jobs/{id}/stop")).await.ok(200);
    stopped(&conn, &service, id).await;
    assert_eq!(api.delete(&format!("/jobs/{id}")).await.status, 204);
    api.get(&format!("/jobs/{id}"))
        .await
        .error(404, "not_found");

    let exit = service.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    assert!(
        !exit.log.contains("it is not lost"),
        "the scheduler kept retrying the stop:\n{}",
        exit.log
    );
}

/// Waits (at most 20 s) until job `id` is STOPPED.
async fn stopped(conn: &DatabaseConnection, service: &Service, id: i64) {
    tests::api::eventually(
        "the controller stops the job",
        Duration::from_secs(20),
        || service.log(),
        || async { job(conn, id).await.status == "STOPPED" },
    )
    .await;
}
