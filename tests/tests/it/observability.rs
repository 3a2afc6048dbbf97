//! What an operator sees of ampd: `GET /metrics` of the controller, the server and a worker,
//! scraped during a small scenario and checked against what happened (a deploy moves
//! `ampd_jobs{status="COMPLETED"}` by one, a killed worker shows in the oldest heartbeat age and
//! its job in the orphan counter, a 404 in the HTTP counters), every exposition linted by
//! Prometheus' own `promtool check metrics`; `/metrics` answering from the last values while the
//! database stalls; and JSON logs (`--log-format json`) that parse line by line and hold no secret.
//!
//! `promtool` comes from Debian's `prometheus` package, which `.ci/promtool` installs: without it a
//! test fails in CI and elsewhere skips only the lint, saying so.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tests::TestDb;
use tests::api::Api;
use tests::cli::{self, TempDir, config_toml};
use tests::proxy::{Fault, FaultProxy};
use tests::services::{Service, Workspace, eventually, free_addr};

const TOKEN: &str = "Obs3rvabilityT0ken";

/// `GET /metrics` of `addr` (with the bearer `token`): the exposition, after checking the status
/// and the media type. The client gives up after `within`.
async fn scrape_within(addr: SocketAddr, token: Option<&str>, within: Duration) -> String {
    let client = reqwest::Client::builder()
        .timeout(within)
        .build()
        .expect("client");
    let mut request = client.get(format!("http://{addr}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
    assert_eq!(response.status(), 200, "GET http://{addr}/metrics");
    let media = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(media, "text/plain; version=0.0.4; charset=utf-8");
    response.text().await.expect("body")
}

async fn scrape(addr: SocketAddr, token: Option<&str>) -> String {
    scrape_within(addr, token, Duration::from_secs(10)).await
}

/// The labels of a sample line's series, and its value.
fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut map = BTreeMap::new();
    // Label values here hold no `,` or `"`.
    for pair in labels.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        map.insert(k.to_owned(), v.trim_matches('"').to_owned());
    }
    Some((name, map, value))
}

/// The sum of the samples of `name` whose labels include `labels`; `None` when there is none.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for (n, map, v) in text.lines().filter_map(parse_sample) {
        if n == name
            && labels
                .iter()
                .all(|(k, want)| map.get(*k).is_some_and(|v| v == want))
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn must(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(text, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{text}"))
}

/// Lints `text` with `promtool check metrics` (Prometheus' own parser and naming rules).
fn promtool_check(text: &str, what: &str) {
    let Some(promtool) = tests::pgbouncer::require("promtool", ".ci/promtool", "the metrics lint")
    else {
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics refuses the {what} exposition ({}):\n{}{}\n--- exposition:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// A one-table manifest of `n` inline rows.
fn manifest(n: usize) -> Value {
    let rows: Vec<Value> = (0..n).map(|i| json!([format!("s{i}"), i as f64])).collect();
    json!({"kind": "static", "tables": {"prices": {
        "columns": [{"name": "symbol", "type": "string"}, {"name": "price", "type": "float64"}],
        "rows": rows,
    }}})
}

async fn register(admin: &Api, version: &str, rows: usize) {
    let body = json!({"namespace": "obs", "name": "prices", "version": version, "manifest": manifest(rows)});
    admin.post("/datasets", body).await.ok(201);
}

async fn deploy(admin: &Api, version: &str) -> Value {
    let path = format!("/datasets/obs/prices/versions/{version}/deploy");
    let reply = admin
        .call(reqwest::Method::POST, &path, tests::api::Body::None)
        .await;
    reply.ok(202).clone()
}

async fn wait_status(admin: &Api, id: i64, status: &str, logs: impl Fn() -> String) {
    tests::api::eventually(
        &format!("job {id} {status}"),
        Duration::from_secs(30),
        logs,
        || async {
            let reply = admin.get(&format!("/jobs/{id}")).await;
            reply.ok(200)["status"] == status
        },
    )
    .await;
}

fn start(name: &str, config: &Path, args: &[&str]) -> Service {
    Service::start(name, config, args, &[])
}

#[tokio::test]
async fn every_service_shows_in_its_metrics_what_happened() {
    let db = TestDb::migrated().await;
    let ws = Workspace::new();
    let (admin_addr, server_addr, a_metrics, b_metrics) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let controller = ws.config(
        "controller.toml",
        db.url(),
        &format!(
            "[controller]\nadmin_addr = \"{admin_addr}\"\nadmin_token = \"{TOKEN}\"\n\
             reconcile_interval_ms = 100\n\n[worker]\nliveness_window_ms = 3000\n"
        ),
    );
    let server = ws.config(
        "server.toml",
        db.url(),
        &format!("[server]\naddr = \"{server_addr}\"\nreconcile_interval_ms = 500\n"),
    );
    let worker = |node: &str, metrics: SocketAddr| {
        ws.config(
            &format!("{node}.toml"),
            db.url(),
            &format!(
                "[worker]\nheartbeat_interval_ms = 100\nreconcile_interval_ms = 200\n\
                 gc_interval_ms = 200\nmetrics_addr = \"{metrics}\"\n"
            ),
        )
    };
    let mut c = start("controller", &controller, &["controller"]);
    let mut s = start("server", &server, &["server"]);
    let mut a = start(
        "worker a",
        &worker("a", a_metrics),
        &["worker", "--node-id", "a"],
    );
    c.wait_healthy(admin_addr).await;
    s.wait_healthy(server_addr).await;
    a.wait_healthy(a_metrics).await;
    let admin = Api::new(admin_addr, Some(TOKEN.to_owned()));

    // The admin token protects /metrics (`metrics_open` is false).
    let anonymous = reqwest::get(format!("http://{admin_addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let completed = |text: &str| value(text, "ampd_jobs", &[("status", "COMPLETED")]);
    let before = scrape(admin_addr, Some(TOKEN)).await;
    let version = env!("CARGO_PKG_VERSION");
    must(&before, "ampd_build_info", &[("version", version)]);
    assert_eq!(completed(&before), Some(0.0), "{before}");

    // A deploy moves ampd_jobs{status="COMPLETED"} by one.
    register(&admin, "1.0.0", 3).await;
    let first = deploy(&admin, "1.0.0").await;
    let first_id = first["job_id"].as_i64().unwrap();
    wait_status(&admin, first_id, "COMPLETED", || c.log()).await;
    eventually("ampd_jobs{status=COMPLETED} 1", || async {
        completed(&scrape(admin_addr, Some(TOKEN)).await) == Some(1.0)
    })
    .await;

    // The worker's own metrics: the job, its rows, its heartbeats, its notification.
    let w = scrape(a_metrics, None).await;
    let ran = [("kind", "materialize-static"), ("outcome", "completed")];
    assert_eq!(must(&w, "ampd_job_run_duration_seconds_count", &ran), 1.0);
    assert_eq!(
        must(&w, "ampd_job_transitions_total", &[("to", "RUNNING")]),
        1.0
    );
    assert_eq!(
        must(&w, "ampd_job_transitions_total", &[("to", "COMPLETED")]),
        1.0
    );
    assert_eq!(must(&w, "ampd_materialized_rows_total", &[]), 3.0);
    assert!(must(&w, "ampd_materialized_bytes_total", &[]) > 0.0);
    assert!(
        must(
            &w,
            "ampd_worker_heartbeat_write_seconds_count",
            &[("result", "ok")]
        ) >= 1.0
    );
    let actions = [("channel", "job_actions")];
    assert!(must(&w, "ampd_notifications_received_total", &actions) >= 1.0);
    assert!(must(&w, "ampd_db_pool_connections", &[]) >= 1.0);
    promtool_check(&w, "worker");

    // The server: rows served (and their bytes), and a 404.
    let rows = Api::new(server_addr, None);
    let url = rows.url("/datasets/obs/prices/versions/1.0.0/tables/prices");
    let body = reqwest::get(&url).await.unwrap();
    assert_eq!(body.status(), 200);
    let body = body.bytes().await.unwrap();
    rows.get("/no/such/route").await.error(404, "not_found");
    let text = scrape(server_addr, None).await;
    let template = "/datasets/{namespace}/{name}/versions/{reference}/tables/{table}";
    let ok = [
        ("service", "server"),
        ("route", template),
        ("status_class", "2xx"),
    ];
    assert_eq!(must(&text, "ampd_http_requests_total", &ok), 1.0, "{text}");
    let missing = [
        ("service", "server"),
        ("route", "unmatched"),
        ("status_class", "4xx"),
    ];
    assert_eq!(must(&text, "ampd_http_requests_total", &missing), 1.0);
    assert_eq!(
        must(&text, "ampd_http_request_duration_seconds_count", &ok),
        1.0
    );
    let served = [("service", "server"), ("route", template)];
    assert_eq!(
        must(&text, "ampd_http_response_bytes_total", &served),
        body.len() as f64
    );
    promtool_check(&text, "server");
    // The rows may have been read before the notification of the new revision arrived.
    eventually(
        "the server counts the revision_changes notification",
        || async {
            let text = scrape(server_addr, None).await;
            let changes = [("channel", "revision_changes")];
            value(&text, "ampd_notifications_received_total", &changes).is_some_and(|n| n >= 1.0)
        },
    )
    .await;

    // The controller counts a 404 by its route template.
    admin.get("/jobs/999999999").await.error(404, "not_found");
    let text = scrape(admin_addr, Some(TOKEN)).await;
    let job_404 = [
        ("service", "controller"),
        ("route", "/jobs/{id}"),
        ("status_class", "4xx"),
    ];
    assert_eq!(
        must(&text, "ampd_http_requests_total", &job_404),
        1.0,
        "{text}"
    );

    // Worker a is killed while live, and the next deploy goes to it: its heartbeat ages, then it
    // is lost, and the controller moves the job (an orphan) to worker b once b runs.
    register(&admin, "2.0.0", 2).await;
    a.kill().await;
    let second = deploy(&admin, "2.0.0").await;
    assert_eq!(second["node_id"], "a", "{second}");
    let second_id = second["job_id"].as_i64().unwrap();
    eventually("the killed worker's heartbeat ages", || async {
        let text = scrape(admin_addr, Some(TOKEN)).await;
        value(&text, "ampd_worker_heartbeat_oldest_age_seconds", &[]).is_some_and(|age| age >= 0.5)
    })
    .await;
    eventually("no worker is live", || async {
        let text = scrape(admin_addr, Some(TOKEN)).await;
        value(&text, "ampd_workers_live", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(
        value(
            &scrape(admin_addr, Some(TOKEN)).await,
            "ampd_orphans_recovered_total",
            &[]
        ),
        None,
        "nothing recovered while no worker is live"
    );
    let mut b = start(
        "worker b",
        &worker("b", b_metrics),
        &["worker", "--node-id", "b"],
    );
    b.wait_healthy(b_metrics).await;
    wait_status(&admin, second_id, "COMPLETED", || c.log()).await;
    eventually(
        "the orphan is counted and the second job completed",
        || async {
            let text = scrape(admin_addr, Some(TOKEN)).await;
            value(&text, "ampd_orphans_recovered_total", &[]) == Some(1.0)
                && completed(&text) == Some(2.0)
                && value(&text, "ampd_workers_live", &[]) == Some(1.0)
        },
    )
    .await;
    let text = scrape(admin_addr, Some(TOKEN)).await;
    assert!(
        must(
            &text,
            "ampd_scheduling_pass_duration_seconds_count",
            &[("result", "ok")]
        ) >= 1.0
    );
    must(&text, "ampd_db_gauges_age_seconds", &[]);
    must(&text, "ampd_gc_backlog_files", &[]);
    promtool_check(&text, "controller");

    for service in [b, s, c] {
        assert_eq!(service.stop().await.code, Some(0));
    }
}

#[tokio::test]
async fn metrics_answer_from_the_last_values_while_the_database_stalls() {
    let db = TestDb::empty().await;
    let proxy = FaultProxy::start(db.url()).await;
    let ws = Workspace::new();
    let admin_addr = free_addr();
    // metrics_open: /metrics needs no token, the rest of the admin API still does.
    let controller = ws.config(
        "controller.toml",
        proxy.url(),
        &format!(
            "[controller]\nadmin_addr = \"{admin_addr}\"\nadmin_token = \"{TOKEN}\"\n\
             metrics_open = true\n"
        ),
    );
    let migrate = [("AMP_CONFIG_METADATA_DB__AUTO_MIGRATE", "true")];
    let mut c = Service::start("controller", &controller, &["controller"], &migrate);
    c.wait_healthy(admin_addr).await;
    // The migrations it applied on startup, each with its duration.
    let text = scrape(admin_addr, None).await;
    let applied = tests::schema_migration_count() as f64;
    assert_eq!(must(&text, "ampd_migrations_applied_total", &[]), applied);
    assert_eq!(
        must(&text, "ampd_migration_duration_seconds_count", &[]),
        applied
    );
    let anonymous = reqwest::get(format!("http://{admin_addr}/workers"))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    eventually("the database gauges", || async {
        value(
            &scrape(admin_addr, None).await,
            "ampd_jobs",
            &[("status", "SCHEDULED")],
        ) == Some(0.0)
    })
    .await;

    proxy.set(Fault::Stall);
    // Each scrape answers within 1 s (the client gives up after that) with the last values, whose
    // age grows.
    let age = std::cell::Cell::new(0.0);
    eventually("the gauges' age passes 1.5 s", || async {
        let text = scrape_within(admin_addr, None, Duration::from_secs(1)).await;
        assert_eq!(
            value(&text, "ampd_jobs", &[("status", "SCHEDULED")]),
            Some(0.0)
        );
        age.set(must(&text, "ampd_db_gauges_age_seconds", &[]));
        age.get() >= 1.5
    })
    .await;
    proxy.set(Fault::Pass);
    eventually("fresh gauges once the database answers", || async {
        let text = scrape(admin_addr, None).await;
        must(&text, "ampd_db_gauges_age_seconds", &[]) < 1.0
    })
    .await;

    // A worker whose metrics address is taken warns and runs on.
    // Bound by the test on a port the system picks, so no other test can hold it first.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = listener.local_addr().unwrap();
    let worker = ws.config(
        "w.toml",
        db.url(),
        &format!("[worker]\nmetrics_addr = \"{taken}\"\n"),
    );
    let mut w = start("worker", &worker, &["worker", "--node-id", "w"]);
    w.wait_for_log(Duration::from_secs(30), |log| {
        log.contains("worker started") && log.contains("runs without its /metrics")
    })
    .await;
    assert!(w.is_running(), "{}", w.log());
    drop(listener);
    assert_eq!(w.stop().await.code, Some(0));
    assert_eq!(c.stop().await.code, Some(0));
}

/// A password with characters JSON escapes (`"`, `\`, a control character), percent-encoded as
/// the URL's `sslpassword` carries it (a libpq parameter sqlx logs, with its value, as unknown).
const JSON_SECRET: &str = "Js%22on%5CPa%01ss";
/// The forms it may appear in.
const JSON_SECRET_FORMS: [&str; 5] = [
    JSON_SECRET,
    "Js\"on\\Pa\u{1}ss",
    "Js\\\"on\\\\Pa\\u0001ss",
    "on\\\\Pa",
    "Pa\\u0001ss",
];

#[tokio::test]
async fn json_logs_parse_line_by_line_and_hold_no_secret() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let url = format!("{}&sslpassword={JSON_SECRET}", db.url());
    let url = if db.url().contains('?') {
        url
    } else {
        url.replacen('&', "?", 1)
    };
    let config = dir.file("config.toml", &config_toml(&url, ""));
    let config = config.to_str().unwrap();
    let by_flag = ["--log-format", "json", "--config", config, "migrate"];
    /// Arguments, and the environment.
    type Run<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let runs: [Run; 2] = [
        (&by_flag, &[("RUST_LOG", "info,sqlx=trace")]),
        (
            &["--config", config, "migrate"],
            &[("RUST_LOG", "info,sqlx=trace"), ("AMP_LOG_FORMAT", "json")],
        ),
    ];
    for (args, env) in runs {
        let out = cli::run(cli::ampd(), args, env, Duration::from_secs(60)).await;
        out.assert_success();
        let mut redacted = 0;
        for line in out.stderr.lines() {
            let parsed: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{}", out.stderr));
            assert!(
                parsed["timestamp"].is_string() && parsed["level"].is_string(),
                "{line}"
            );
            // The target, a module path, is not mistaken for a URL.
            assert!(
                !parsed["target"].as_str().unwrap().contains("://"),
                "{line}"
            );
            // sqlx logs the parameter it does not know with its value, as a field of its own.
            if parsed["fields"]["key"] == "sslpassword" {
                assert_eq!(parsed["fields"]["value"], "***", "{line}");
                redacted += 1;
            }
        }
        assert!(
            redacted > 0,
            "sqlx logged no value of sslpassword, so nothing was shown redacted:\n{}",
            out.stderr
        );
        for secret in JSON_SECRET_FORMS {
            out.assert_not_in_output(secret);
        }
    }
    let out = cli::run(
        cli::ampd(),
        &["--log-format", "xml", "--config", config, "migrate"],
        &[],
        Duration::from_secs(60),
    )
    .await;
    out.assert_code(1);
    out.assert_stderr_contains("invalid value 'xml' for '--log-format <FORMAT>'");
}
