//! Lists that stay bounded as the fleet and its history grow: every list route of the admin API
//! sends as many statements for 20 workers, jobs or tables as for 2 (no query per row), and so does
//! a scheduling pass for 20 workers and finished jobs (plus one statement per change it makes), and
//! reads the live workers only;
//! `GET /workers` and `GET /jobs/{id}/events` are pages (`limit`, `after`, 400 on bad values).
//!
//! The admin API runs in the test's process ([`CountedApi`]), its one database connection going
//! through the harness's statement-counting proxy; nothing else uses that connection.

use std::time::Duration;

use ampd::service::controller::{self, Policy};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};
use tests::TestDb;
use tests::services::Workspace;
use tests::wire::{CountedApi, StatementCounter};

/// Runs `sql` on `db`.
async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A fleet: `workers` live workers `w0001`..., each with one RUNNING job, and `finished`
/// COMPLETED jobs (each with two events) that name the first worker.
async fn fleet(db: &DatabaseConnection, workers: usize, finished: usize) {
    exec(
        db,
        &format!(
            "INSERT INTO workers (node_id, info) \
             SELECT 'w' || lpad(i::text, 4, '0'), '{{}}' FROM generate_series(1, {workers}) i;
             INSERT INTO jobs (idempotency_key, kind, node_id, status, descriptor, attempt) \
             SELECT 'run' || i, 'materialize-static', 'w' || lpad(i::text, 4, '0'), 'RUNNING', \
                    jsonb_build_object('namespace', 'demo', 'name', 'd' || i, 'manifest_hash', 'h'), 1 \
             FROM generate_series(1, {workers}) i;
             INSERT INTO jobs (idempotency_key, kind, node_id, status, descriptor, attempt) \
             SELECT 'done' || i, 'materialize-static', 'w0001', 'COMPLETED', \
                    jsonb_build_object('namespace', 'old', 'name', 'd' || i, 'manifest_hash', 'h'), 1 \
             FROM generate_series(1, {finished}) i;
             INSERT INTO job_events (job_id, node_id, event_type) \
             SELECT id, node_id, e FROM jobs, unnest(ARRAY['SCHEDULED', 'COMPLETED']) e \
             WHERE status = 'COMPLETED';"
        ),
    )
    .await;
}

/// The admin API on a fleet of `n` workers with `n` finished jobs.
async fn on_fleet(n: usize) -> (TestDb, CountedApi) {
    let db = TestDb::migrated().await;
    fleet(&db.connect().await, n, n).await;
    let api = CountedApi::start(db.url(), "").await;
    (db, api)
}

#[tokio::test]
async fn listing_workers_sends_as_many_statements_for_20_workers_as_for_2() {
    let (_small_db, small) = on_fleet(2).await;
    let (_large_db, large) = on_fleet(20).await;
    let (two, few) = small.get("/workers").await;
    let (twenty, many) = large.get("/workers").await;
    assert_eq!(
        few, many,
        "GET /workers: {few} statements for 2 workers, {many} for 20"
    );
    assert_eq!(two["workers"].as_array().map(Vec::len), Some(2));
    let listed = twenty["workers"].as_array().expect("workers");
    assert_eq!(listed.len(), 20);
    for (i, w) in listed.iter().enumerate() {
        let node = format!("w{:04}", i + 1);
        assert_eq!(w["node_id"], node.as_str());
        assert_eq!(w["live"], true);
        let active = w["active_jobs"].as_array().expect("active jobs");
        assert_eq!(active.len(), 1, "{node}: its one RUNNING job");
        assert_eq!(active[0]["node_id"], node.as_str());
    }
}

#[tokio::test]
async fn every_other_list_route_sends_as_many_statements_for_20_rows_as_for_2() {
    let (_small_db, small) = on_fleet(2).await;
    let (_large_db, large) = on_fleet(20).await;
    for path in [
        "/jobs",
        "/jobs?status=RUNNING",
        "/jobs?status=terminal&limit=5",
        "/jobs/3/events",
        "/workers?live=true",
        "/workers/w0001",
        "/datasets",
    ] {
        let (_, few) = small.get(path).await;
        let (_, many) = large.get(path).await;
        assert_eq!(
            few, many,
            "GET {path}: {few} statements with 2 workers and jobs, {many} with 20"
        );
    }
}

/// A version of dataset `demo/wide` with `n` tables, each with two revisions (the second active,
/// with two files); returns the database and its API.
async fn wide_version(n: usize, ws: &Workspace) -> (TestDb, CountedApi) {
    let db = TestDb::migrated().await;
    let extra = format!("[storage]\ndata_dir = \"{}\"\n", ws.data_dir().display());
    let api = CountedApi::start(db.url(), &extra).await;
    let tables: serde_json::Map<String, Value> = (0..n)
        .map(|i| {
            (
                format!("t{i:03}"),
                json!({"columns": [{"name": "a", "type": "int64"}], "rows": [[i]]}),
            )
        })
        .collect();
    let reply = api
        .api()
        .post(
            "/datasets",
            json!({"namespace": "demo", "name": "wide", "version": "1.0.0",
                   "manifest": {"kind": "static", "tables": tables}}),
        )
        .await;
    let hash = reply.ok(201)["hash"].as_str().expect("hash").to_owned();
    exec(
        &db.connect().await,
        &format!(
            "INSERT INTO physical_tables (dataset_namespace, dataset_name, manifest_hash, table_name) \
             SELECT 'demo', 'wide', '{hash}', 't' || lpad(i::text, 3, '0') \
             FROM generate_series(0, {n} - 1) i;
             INSERT INTO physical_table_revisions (physical_table_id, path, metadata) \
             SELECT t.id, 'demo/wide/' || t.table_name || '/' || r, jsonb_build_object('rows', r) \
             FROM physical_tables t, generate_series(1, 2) r;
             UPDATE physical_tables t SET active_revision_id = \
                 (SELECT max(id) FROM physical_table_revisions r WHERE r.physical_table_id = t.id);
             INSERT INTO file_metadata (revision_id, file_name, object_size, metadata) \
             SELECT t.active_revision_id, 'part-' || f || '.jsonl', 10, jsonb_build_object('rows', 1) \
             FROM physical_tables t, generate_series(0, 1) f;"
        ),
    )
    .await;
    (db, api)
}

#[tokio::test]
async fn listing_a_versions_tables_sends_as_many_statements_for_20_tables_as_for_2() {
    let path = "/datasets/demo/wide/versions/1.0.0/tables";
    let ws = Workspace::new();
    let (_small_db, small) = wide_version(2, &ws).await;
    let (_, few) = small.get(path).await;
    let ws = Workspace::new();
    let (_large_db, large) = wide_version(20, &ws).await;
    let (body, many) = large.get(path).await;
    assert_eq!(
        few, many,
        "GET {path}: {few} statements for 2 tables, {many} for 20"
    );
    let tables = body["tables"].as_array().expect("tables");
    assert_eq!(tables.len(), 20);
    for (i, t) in tables.iter().enumerate() {
        assert_eq!(t["name"], format!("t{i:03}").as_str());
        let revisions = t["revisions"].as_array().expect("revisions");
        assert_eq!(revisions.len(), 2, "{}", t["name"]);
        let active = &t["active_revision"];
        assert_eq!(active["id"], revisions[1]["id"]);
        let files: Vec<&str> = active["files"]
            .as_array()
            .expect("files")
            .iter()
            .map(|f| f["name"].as_str().expect("name"))
            .collect();
        assert_eq!(files, ["part-0.jsonl", "part-1.jsonl"]);
    }
}

fn policy() -> Policy {
    Policy {
        liveness_window: Duration::from_secs(5),
        retry_base_delay: Duration::from_secs(3600),
        retry_max_delay: Duration::from_secs(3600),
        max_attempts: 5,
    }
}

/// The statements of one scheduling pass on a fleet of `n` workers and `n` finished jobs in which
/// `lost` more RUNNING jobs belong to a worker that stopped heartbeating, and how many of those the
/// pass moved back to SCHEDULED on a live worker.
async fn pass(n: usize, lost: usize) -> (u64, i64) {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    fleet(&conn, n, n).await;
    exec(
        &conn,
        &format!(
            "INSERT INTO workers (node_id, heartbeat_at) VALUES ('gone', now() - interval '1 hour');
             INSERT INTO jobs (idempotency_key, kind, node_id, status, descriptor, attempt) \
             SELECT 'lost' || i, 'materialize-static', 'gone', 'RUNNING', \
                    jsonb_build_object('namespace', 'lost', 'name', 'd' || i, 'manifest_hash', 'h'), 1 \
             FROM generate_series(1, {lost}) i;"
        ),
    )
    .await;
    let counter = StatementCounter::start(db.url()).await;
    let counted = tests::connect(counter.url(), 1).await;
    counter.reset();
    controller::reconcile(&counted, &policy())
        .await
        .expect("scheduling pass");
    let statements = counter.statements();
    let moved = tests::sql::count(
        &conn,
        "SELECT count(*) FROM jobs WHERE idempotency_key LIKE 'lost%' \
         AND status = 'SCHEDULED' AND node_id <> 'gone'",
    )
    .await;
    (statements, moved)
}

#[tokio::test]
async fn a_scheduling_pass_is_constant_in_workers_and_finished_jobs_plus_one_statement_per_change()
{
    let (idle_small, _) = pass(2, 0).await;
    let (idle_large, _) = pass(20, 0).await;
    assert_eq!(
        idle_small, idle_large,
        "a pass with nothing to do: {idle_small} statements for 2 workers and finished jobs, \
         {idle_large} for 20"
    );
    // Each lost RUNNING job changes twice: it fails as worker_lost, then its retry is scheduled
    // on a live worker.
    let (busy, moved) = pass(20, 3).await;
    assert_eq!(moved, 3);
    assert_eq!(
        busy,
        idle_large + 2 * 3,
        "a pass that recovered 3 jobs: {busy} statements, {idle_large} when idle"
    );
}

/// How many rows of each of `workers` and `jobs` running `stmt` read (`EXPLAIN (ANALYZE, FORMAT
/// JSON)`: the rows each scan of the table returned or filtered out, times its loops).
async fn rows_read<C: ConnectionTrait>(db: &C, stmt: &sea_orm::Statement) -> (f64, f64) {
    fn walk(node: &Value, read: &mut (f64, f64)) {
        let n = |key: &str| node[key].as_f64().unwrap_or(0.0);
        let rows =
            (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
                * n("Actual Loops");
        match node["Relation Name"].as_str() {
            Some("workers") => read.0 += rows,
            Some("jobs") => read.1 += rows,
            _ => {}
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            walk(child, read);
        }
    }
    let explain = sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", stmt.sql),
        stmt.values.clone().map(|v| v.0).unwrap_or_default(),
    );
    let row = db.query_one_raw(explain).await.unwrap().expect("a plan");
    let plan: Value = row.try_get_by_index(0).unwrap();
    let mut read = (0.0, 0.0);
    walk(&plan[0]["Plan"], &mut read);
    read
}

/// The reads of a scheduling pass that look at workers (the live ones with their loads, the
/// orphaned jobs) read the live workers and the active jobs, not every worker retention keeps nor
/// the finished jobs: beside 5 000 gone workers and 20 000 finished jobs, each reads fewer than
/// 1 000 rows of either table for 300 live workers with one job each. Before
/// `idx_workers_heartbeat_at`, both read every worker; the loads written as a join were planned as
/// a merge over every job (20 300 rows read here).
#[tokio::test]
async fn a_scheduling_pass_reads_the_live_workers_and_active_jobs_not_the_gone_or_finished() {
    use ampd::metadata::{jobs, workers};
    use sea_orm::TransactionTrait;
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    fleet(&conn, 300, 20000).await;
    exec(
        &conn,
        "INSERT INTO workers (node_id, heartbeat_at, registered_at) \
         SELECT 'g' || lpad(i::text, 5, '0'), now() - interval '3 days', now() - interval '3 days' \
         FROM generate_series(1, 5000) i;
         UPDATE jobs SET node_id = NULL WHERE status = 'COMPLETED';
         ANALYZE",
    )
    .await;
    let window = Duration::from_secs(3600);
    let reads = [
        (
            "the live workers' loads",
            workers::list_live_load_statement(window).unwrap(),
        ),
        (
            "the orphaned jobs",
            jobs::list_orphaned_statement(window).unwrap(),
        ),
    ];
    for (what, stmt) in &reads {
        let (workers_read, jobs_read) = rows_read(&conn, stmt).await;
        assert!(
            workers_read < 1000.0 && jobs_read < 1000.0,
            "{what} read {workers_read} rows of workers and {jobs_read} of jobs"
        );
    }
    // Without the index, both read every worker.
    let tx = conn.begin().await.unwrap();
    tx.execute_unprepared("DROP INDEX idx_workers_heartbeat_at")
        .await
        .unwrap();
    for (what, stmt) in &reads {
        let (workers_read, _) = rows_read(&tx, stmt).await;
        assert!(
            workers_read >= 5000.0,
            "{what} without the index: {workers_read}"
        );
    }
    tx.rollback().await.unwrap();
    // And the reads still answer: the 300 live workers with one job each, no orphan.
    let load = workers::list_live_load(&conn, window).await.unwrap();
    assert_eq!(load.len(), 300);
    assert!(load.iter().all(|(_, active)| *active == 1), "{load:?}");
    assert!(jobs::list_orphaned(&conn, window).await.unwrap().is_empty());
}

#[tokio::test]
async fn workers_and_events_come_a_page_at_a_time_and_bad_pages_are_400() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    fleet(&conn, 5, 0).await;
    // w0004 and w0005 are not live; job 1 gets 5 events.
    exec(
        &conn,
        "UPDATE workers SET heartbeat_at = now() - interval '1 hour' \
         WHERE node_id IN ('w0004', 'w0005');
         INSERT INTO job_events (job_id, event_type) \
         SELECT 1, e FROM unnest(ARRAY['SCHEDULED', 'RUNNING', 'ERROR', 'SCHEDULED', 'RUNNING']) e;",
    )
    .await;
    let api = CountedApi::start(db.url(), "").await;
    let nodes = |page: &Value| -> Vec<String> {
        page["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["node_id"].as_str().expect("node").to_owned())
            .collect()
    };

    let (first, _) = api.get("/workers?limit=2").await;
    assert_eq!(nodes(&first), ["w0001", "w0002"]);
    assert_eq!(first["next_after"], "w0002");
    let (second, _) = api.get("/workers?limit=2&after=w0002").await;
    assert_eq!(nodes(&second), ["w0003", "w0004"]);
    let (last, _) = api.get("/workers?limit=2&after=w0004").await;
    assert_eq!(nodes(&last), ["w0005"]);
    assert_eq!(last["next_after"], Value::Null);
    let (default, _) = api.get("/workers").await;
    assert_eq!(nodes(&default).len(), 5);
    assert_eq!(default["next_after"], Value::Null);

    let (live, _) = api.get("/workers?live=true").await;
    assert_eq!(nodes(&live), ["w0001", "w0002", "w0003"]);
    let (live_page, _) = api.get("/workers?live=true&limit=2&after=w0001").await;
    assert_eq!(nodes(&live_page), ["w0002", "w0003"]);
    let (dead, _) = api.get("/workers?live=false").await;
    assert_eq!(nodes(&dead), ["w0004", "w0005"]);
    assert!(
        dead["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .all(|w| w["live"] == false)
    );

    let ids = |page: &Value| -> Vec<i64> {
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["id"].as_i64().expect("id"))
            .collect()
    };
    let (all, _) = api.get("/jobs/1/events").await;
    let every = ids(&all);
    assert_eq!(every.len(), 5);
    assert_eq!(all["next_after"], Value::Null);
    let (first, _) = api.get("/jobs/1/events?limit=3").await;
    assert_eq!(ids(&first), every[..3]);
    assert_eq!(first["next_after"], every[2]);
    let (rest, _) = api
        .get(&format!("/jobs/1/events?limit=3&after={}", every[2]))
        .await;
    assert_eq!(ids(&rest), every[3..]);
    assert_eq!(rest["next_after"], Value::Null);
    let (first_type, _) = api.get("/jobs/1/events?limit=1").await;
    assert_eq!(first_type["events"][0]["event_type"], "SCHEDULED");

    for bad in [
        "/workers?limit=0",
        "/workers?limit=1001",
        "/workers?limit=many",
        "/workers?live=maybe",
        "/jobs/1/events?limit=0",
        "/jobs/1/events?limit=1001",
        "/jobs/1/events?after=first",
    ] {
        api.api().get(bad).await.error(400, "invalid_request");
    }
    api.api()
        .get("/jobs/999/events?limit=5")
        .await
        .error(404, "not_found");

    // The document states the bounds.
    let doc = api.api().get("/openapi.json").await.ok(200).clone();
    for path in ["/workers", "/jobs/{id}/events"] {
        let params = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: parameters"));
        let limit = params
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap_or_else(|| panic!("{path}: limit"));
        assert_eq!(limit["schema"]["minimum"], 1, "{path}");
        assert_eq!(limit["schema"]["maximum"], 1000, "{path}");
        assert!(params.iter().any(|p| p["name"] == "after"), "{path}: after");
    }
}
