//! ampd's TCP connections set `TCP_NODELAY`: to the metadata database (the pool, the migration
//! session, a node claim's session, the notification listener) and on the HTTP services' accepted
//! connections. Without it Nagle's algorithm holds back the small writes of the TLS handshake and of
//! PostgreSQL's startup message until the server's delayed ACK, about 85 ms per new TLS connection
//! (sqlx-core 0.9.0 connects without it; `third_party/sqlx-core` carries the upstream fix).
//!
//! Each check asks PostgreSQL for the client port of the connection under test
//! (`inet_client_port()`, or `pg_stat_activity` for the listener), finds the socket with that local
//! port among this process's file descriptors, and reads its option with `getsockopt`. A plain
//! `std::net::TcpStream` to the same server, which nobody set the option on, must read 0, so the
//! probe is shown able to fail.

use std::net::TcpStream;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use ampd::config::MetadataDbConfig;
use ampd::metadata::notifications::{LISTENER_APPLICATION_NAME, Listener};
use sea_orm::sqlx::{self, PgConnection};
use sea_orm::{ConnectionTrait, Statement};
use tests::cluster::{ClusterOptions, PrivateCluster};

/// This file's own cluster, listening on `127.0.0.1` with TLS, as production databases are reached.
/// Started once per test process and kept (its watchdog stops it when the process exits).
fn tcp_url() -> Option<&'static str> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    URL.get_or_init(|| {
        let options = ClusterOptions {
            tcp_tls: true,
            ..ClusterOptions::default()
        };
        match PrivateCluster::start_with(&options) {
            Ok(cluster) => {
                let url = cluster.tcp_admin_url();
                std::mem::forget(cluster);
                url
            }
            Err(e) if !tests::cluster::is_private() => {
                tests::not_run(
                    "tcp_nodelay",
                    &format!("cannot start a private cluster with a TCP listener ({e})"),
                );
                None
            }
            Err(e) => panic!("start a private PostgreSQL cluster with a TCP listener: {e}"),
        }
    })
    .as_deref()
}

fn port_of(url: &str) -> u16 {
    url::Url::parse(url)
        .expect("URL")
        .port()
        .expect("the TCP URL has a port")
}

/// The port of a `sockaddr` filled in by `getsockname`/`getpeername`, if it is an IP socket's.
fn ip_port(addr: &libc::sockaddr_storage) -> Option<u16> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a `sockaddr_in`.
            let v4 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(u16::from_be(v4.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a `sockaddr_in6`.
            let v6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(u16::from_be(v6.sin6_port))
        }
        _ => None,
    }
}

/// `getsockname` (`peer` false) or `getpeername` (`peer` true) of `fd`, as a port.
fn socket_port(fd: RawFd, peer: bool) -> Option<u16> {
    // SAFETY: an all-zero `sockaddr_storage` is valid; the calls write at most `len` bytes to it.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let ptr = (&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: `ptr` and `len` describe `addr`; a closed or non-socket fd only makes the call fail.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, ptr, &mut len)
        } else {
            libc::getsockname(fd, ptr, &mut len)
        }
    };
    if rc == 0 { ip_port(&addr) } else { None }
}

/// `TCP_NODELAY` of this process's TCP socket from local port `local` to remote port `peer`, or
/// `None` if there is no such socket.
fn nodelay(local: u16, peer: u16) -> Option<bool> {
    let fds = std::fs::read_dir("/proc/self/fd").expect("list /proc/self/fd");
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket
            || socket_port(fd, false) != Some(local)
            || socket_port(fd, true) != Some(peer)
        {
            continue;
        }
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` describe a c_int the call writes the option into.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&mut value as *mut libc::c_int).cast::<libc::c_void>(),
                &mut len,
            )
        };
        assert_eq!(
            rc,
            0,
            "getsockopt(TCP_NODELAY) on fd {fd}: {}",
            std::io::Error::last_os_error()
        );
        return Some(value != 0);
    }
    None
}

/// The probe reads 0 on a socket nobody set the option on: a plain connection to `port`.
fn assert_probe_sees_nagle(port: u16) {
    let plain = TcpStream::connect(("127.0.0.1", port)).expect("plain TCP connection");
    let local = plain.local_addr().expect("local address").port();
    assert_eq!(
        nodelay(local, port),
        Some(false),
        "a plain std::net::TcpStream must read TCP_NODELAY=0 (else the probe cannot fail)"
    );
}

const CLIENT_PORT: &str = "SELECT inet_client_port()";

async fn client_port_of(conn: &mut PgConnection) -> u16 {
    let port: i32 = sqlx::query_scalar(CLIENT_PORT)
        .fetch_one(conn)
        .await
        .expect("inet_client_port()");
    u16::try_from(port).expect("a TCP client port")
}

fn config(url: &str) -> MetadataDbConfig {
    tests::metadata_config(url)
}

#[tokio::test]
async fn pool_connections_set_tcp_nodelay() {
    let Some(url) = tcp_url() else { return };
    let server = port_of(url);
    assert_probe_sees_nagle(server);

    let db = ampd::db::connect(&config(url), 1)
        .await
        .expect("ampd::db::connect over TCP + TLS");
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            CLIENT_PORT,
        ))
        .await
        .expect("inet_client_port() on the pool")
        .expect("a row");
    let local: i32 = row.try_get_by_index(0).expect("a port");
    let local = u16::try_from(local).expect("a TCP client port");
    assert_eq!(
        nodelay(local, server),
        Some(true),
        "the pool's connection from port {local} has TCP_NODELAY off"
    );
    db.close().await.expect("close the pool");
}

#[tokio::test]
async fn session_connections_set_tcp_nodelay() {
    let Some(url) = tcp_url() else { return };
    let server = port_of(url);
    assert_probe_sees_nagle(server);
    let cfg = config(url);
    let session_url = ampd::db::session_url(&cfg).expect("a session URL");

    // How `ampd migrate` connects its migration session (and a dry run its reading one).
    let mut migration = ampd::db::open(&cfg, session_url)
        .await
        .expect("the migration session's connection");
    let local = client_port_of(&mut migration).await;
    assert_eq!(
        nodelay(local, server),
        Some(true),
        "the migration session's connection has TCP_NODELAY off"
    );

    // How a worker opens the session that holds its node claim.
    let mut claim = ampd::db::connect_session(session_url, &cfg, "ampd-tcp-nodelay-claim")
        .await
        .expect("a node claim's session");
    let local = client_port_of(&mut claim).await;
    assert_eq!(
        nodelay(local, server),
        Some(true),
        "a node claim's session has TCP_NODELAY off"
    );
}

#[tokio::test]
async fn listener_connection_sets_tcp_nodelay() {
    let Some(url) = tcp_url() else { return };
    let server = port_of(url);
    assert_probe_sees_nagle(server);
    let cfg = config(url);

    let listener = Listener::connect(&cfg)
        .await
        .expect("the notification listener");
    // The listener runs no query of ours: find its session by its application name (no other
    // test on this cluster opens a listener).
    let mut admin = ampd::db::open(&cfg, ampd::db::session_url(&cfg).expect("URL"))
        .await
        .expect("a connection to look at pg_stat_activity");
    let ports: Vec<i32> =
        sqlx::query_scalar("SELECT client_port FROM pg_stat_activity WHERE application_name = $1")
            .bind(LISTENER_APPLICATION_NAME)
            .fetch_all(&mut admin)
            .await
            .expect("the listener's client port");
    assert_eq!(ports.len(), 1, "exactly one listening session: {ports:?}");
    let local = u16::try_from(ports[0]).expect("a TCP client port");
    assert_eq!(
        nodelay(local, server),
        Some(true),
        "the notification listener's connection has TCP_NODELAY off"
    );
    drop(listener);
}

#[tokio::test]
async fn http_connections_set_tcp_nodelay() {
    use std::io::{Read as _, Write as _};

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("local address").port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let limits = ampd::service::listen::Limits::new(
        &ampd::config::HttpConfig::default(),
        listener.local_addr().expect("local address"),
        1024,
    );
    let served = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            ampd::service::listen::serve(listener, axum::Router::new(), &limits, shutdown).await
        }
    });

    let client = tokio::task::spawn_blocking(move || {
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        client
            .write_all(b"GET /missing HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("send a request");
        // An answer proves the connection was accepted (and tapped) by the server.
        let mut answer = [0u8; 12];
        client
            .read_exact(&mut answer)
            .expect("read the status line");
        assert_eq!(&answer, b"HTTP/1.1 404", "the server answers");
        client
    })
    .await
    .expect("client");
    let client_port = client.local_addr().expect("client address").port();
    assert_eq!(
        nodelay(client_port, port),
        Some(false),
        "the client's own plain socket reads TCP_NODELAY=0 (else the probe cannot fail)"
    );
    assert_eq!(
        nodelay(port, client_port),
        Some(true),
        "the HTTP server's accepted connection has TCP_NODELAY off"
    );
    shutdown.cancel();
    drop(client);
    served.await.expect("serve task").expect("serve");
}
