//! The HTTP services' bounds (`[http]`), on an `ampd controller` process: slow-header connections
//! are bounded in number and closed, an idle connection is closed, a declared over-limit body is
//! refused before it is sent and a slow body times out, `Host` must name one of the service's
//! hosts, and with the metadata database stalled a request answers 503 and SIGTERM exits, each
//! within its bound.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tests::TestDb;
use tests::api::Api;
use tests::proxy::{Fault, FaultProxy};
use tests::services::{Service, Workspace};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An `ampd controller` on a fresh database with `[http]` keys `http`, reached at `addr`.
struct Controller {
    _db: TestDb,
    _ws: Workspace,
    service: Service,
    addr: SocketAddr,
    api: Api,
}

async fn controller(http: &str) -> Controller {
    let db = TestDb::empty().await;
    controller_on(db, None, http).await
}

/// A controller on `db`, connecting through `url` when given (the database itself otherwise).
async fn controller_on(db: TestDb, url: Option<&str>, http: &str) -> Controller {
    let ws = Workspace::new();
    let extra = format!("reconcile_interval_ms = 200\n\n[http]\n{http}\n");
    let (service, addr) = tests::services::controller(&ws, url.unwrap_or(db.url()), &extra).await;
    Controller {
        _db: db,
        _ws: ws,
        service,
        addr,
        api: Api::new(addr, None),
    }
}

/// Reads from `stream` until the peer closes it (`true`) or `within` passes (`false`); what was
/// read is returned too.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> (bool, String) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (false, String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slow_header_connections_are_bounded_in_number_and_closed_and_the_api_answers_after() {
    let c = controller("max_connections = 8\nheader_timeout_secs = 3\n").await;
    // 24 clients that start a request and never finish its headers.
    let mut slow = Vec::new();
    for _ in 0..24 {
        let mut stream = TcpStream::connect(c.addr).await.expect("connect");
        stream
            .write_all(b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await
            .expect("write");
        slow.push(stream);
    }
    // Those past the bound are closed at once; 8 are kept.
    let mut kept = Vec::new();
    for mut stream in slow {
        let (closed, _) = closed_within(&mut stream, Duration::from_millis(500)).await;
        if !closed {
            kept.push(stream);
        }
    }
    // The harness's own health-check connection may hold one of the 8.
    assert!(
        (1..=8).contains(&kept.len()),
        "{} connections kept open; [http] max_connections is 8",
        kept.len()
    );
    // The kept ones are closed once the header timeout passes.
    let started = Instant::now();
    for stream in &mut kept {
        let (closed, _) = closed_within(stream, Duration::from_secs(10)).await;
        assert!(
            closed,
            "a slow-header connection outlived the header timeout"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "closed after {:?}",
        started.elapsed()
    );
    assert_eq!(c.api.get("/healthz").await.status, 200);
    assert_eq!(c.api.get("/jobs").await.status, 200);
    c.service.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_body_too_large_or_too_slow_is_refused() {
    let c = controller("idle_timeout_secs = 1\nbody_timeout_secs = 1\nheader_timeout_secs = 30\n")
        .await;
    // A keep-alive connection that answered one request, then sends nothing.
    let mut idle = TcpStream::connect(c.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let (closed, answer) = closed_within(&mut idle, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed, "an idle keep-alive connection stayed open");

    // A declared length over the limit (4 MiB by default): 413 with no byte of the body sent.
    let mut big = TcpStream::connect(c.addr).await.expect("connect");
    big.write_all(
        b"POST /datasets HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
          Content-Length: 10000000000\r\n\r\n",
    )
    .await
    .expect("write");
    let (_, answer) = closed_within(&mut big, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");

    // A body that starts and stalls: 408 once the body timeout passes.
    let mut slow = TcpStream::connect(c.addr).await.expect("connect");
    slow.write_all(
        b"POST /datasets HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"namespace\":",
    )
    .await
    .expect("write");
    let (_, answer) = closed_within(&mut slow, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout_secs"), "{answer}");
    c.service.stop().await;
}

/// A raw request `head` (request line and headers, without the blank line); its status line.
async fn status_of(addr: SocketAddr, head: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("{head}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let (_, answer) = closed_within(&mut stream, Duration::from_secs(10)).await;
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_request_naming_a_host_not_allowed_is_refused_but_probes_answer_any_host() {
    let c = controller("").await;
    let port = c.addr.port();
    for allowed in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LOCALHOST".to_owned(),
        "[::1]".to_owned(),
    ] {
        let status = status_of(c.addr, &format!("GET /jobs HTTP/1.1\r\nHost: {allowed}")).await;
        assert!(status.contains(" 200 "), "{allowed}: {status}");
    }
    // A page on evil.example whose name now resolves to 127.0.0.1 (DNS rebinding).
    for refused in [
        "Host: evil.example".to_owned(),
        format!("Host: evil.example:{port}"),
        "Host: 127.0.0.1.evil.example".to_owned(),
    ] {
        let status = status_of(c.addr, &format!("GET /jobs HTTP/1.1\r\n{refused}")).await;
        assert!(status.contains(" 421 "), "{refused}: {status}");
        let status = status_of(
            c.addr,
            &format!(
                "POST /datasets/a/b/versions/1.0.0/deploy HTTP/1.1\r\n{refused}\r\nX-Ampd-Client: x"
            ),
        )
        .await;
        assert!(status.contains(" 421 "), "{refused}: {status}");
    }
    // HTTP/1.0 without a Host header.
    assert!(
        status_of(c.addr, "GET /jobs HTTP/1.0")
            .await
            .contains(" 421 ")
    );
    // A health probe that uses the pod's address.
    let status = status_of(c.addr, "GET /healthz HTTP/1.1\r\nHost: 10.9.8.7").await;
    assert!(status.contains(" 200 "), "{status}");

    // The refusal says what to do.
    let reply = reqwest::Client::new()
        .get(c.api.url("/jobs"))
        .header("Host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 421);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["error_code"], "host_not_allowed");
    assert!(
        body["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("[http] allowed_hosts")),
        "{body}"
    );
    c.service.stop().await;
}

#[tokio::test]
async fn allowed_hosts_star_admits_any_host() {
    let c = controller("allowed_hosts = [\"*\"]\n").await;
    let status = status_of(c.addr, "GET /jobs HTTP/1.1\r\nHost: amp.example.com").await;
    assert!(status.contains(" 200 "), "{status}");
    c.service.stop().await;
}

#[tokio::test]
async fn an_empty_body_sent_as_json_is_no_body() {
    let c = controller("").await;
    let manifest = serde_json::json!({"kind": "static", "tables": {"t": {
        "columns": [{"name": "a", "type": "int64"}], "rows": [[1]]}}});
    c.api
        .post(
            "/datasets",
            serde_json::json!({"namespace": "e", "name": "b", "version": "1.0.0",
                               "manifest": manifest}),
        )
        .await
        .ok(201);
    // What a client that always sends the header sends for a body-less deploy.
    let reply = reqwest::Client::new()
        .post(c.api.url("/datasets/e/b/versions/1.0.0/deploy"))
        .header("Content-Type", "application/json")
        .send()
        .await
        .unwrap();
    let status = reply.status().as_u16();
    let body = reply.text().await.unwrap();
    assert_eq!(status, 202, "{body}");
    c.service.stop().await;
}

#[tokio::test]
async fn with_the_database_stalled_a_request_answers_503_and_sigterm_exits_within_their_bounds() {
    let db = TestDb::empty().await;
    let proxy = FaultProxy::start(db.url()).await;
    let url = proxy.url().to_owned();
    let c = controller_on(db, Some(&url), "request_timeout_secs = 2\n").await;
    assert_eq!(c.api.get("/jobs").await.status, 200);
    proxy.set(Fault::Stall);
    let started = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(20), c.api.get("/jobs/1"))
        .await
        .expect("an answer while the database is stalled");
    let waited = started.elapsed();
    reply.error(503, "unavailable").says("request_timeout_secs");
    assert!(
        waited < Duration::from_secs(5),
        "503 after {waited:?}, bound 2 s"
    );
    // Stopping does not wait on the stalled database: requests in flight get 5 s, the scheduler's
    // pass is dropped.
    let started = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(30), c.service.stop())
        .await
        .expect("the controller exits on SIGTERM with the database stalled");
    let waited = started.elapsed();
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    assert!(
        waited < Duration::from_secs(10),
        "SIGTERM took {waited:?}; the bound is 10 s"
    );
}
