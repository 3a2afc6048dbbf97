//! Counting what a client asks the server to run, at the protocol level: a proxy on `127.0.0.1`
//! that forwards everything to the real server and counts the client's `Query` (simple protocol)
//! and `Execute` (extended protocol) messages. Each of those is one statement the server runs
//! (a `Query` holding several `;`-separated statements counts once) and one wait for its answer.
//!
//! It also keeps the text of each statement run, in order ([`StatementCounter::sent`]): a `Query`'s
//! text as sent, and for an `Execute` the text its portal's statement was parsed from.
//!
//! It needs nothing from the server (unlike `pg_stat_statements`, which must be preloaded), so
//! tests can count statements on any server. The client side is plain TCP (a TLS request is
//! answered "no", as a server without TLS would); the server side is the admin URL's own transport,
//! without TLS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::proxy::{Upstream, read_startup, url_through};

/// A running counting proxy; stops when dropped.
pub struct StatementCounter {
    url: String,
    statements: Arc<AtomicU64>,
    sent: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatementCounter {
    /// Starts a proxy to the server of `url` (a `postgresql://` URL, TCP or `?host=/socket/dir`).
    pub async fn start(url: &str) -> StatementCounter {
        let parsed = url::Url::parse(url).expect("database URL");
        let upstream = Upstream::of(&parsed);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let local = listener.local_addr().expect("proxy address");
        let client_url = url_through(&parsed, local.port());

        let statements = Arc::new(AtomicU64::new(0));
        let counter = statements.clone();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let texts = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let upstream = upstream.clone();
                let counter = counter.clone();
                let texts = texts.clone();
                tokio::spawn(async move {
                    let _ = match upstream {
                        Upstream::Tcp(host, port) => match TcpStream::connect((host, port)).await {
                            Ok(server) => {
                                let _ = server.set_nodelay(true);
                                relay(client, server, counter, texts).await
                            }
                            Err(e) => Err(e),
                        },
                        Upstream::Unix(path) => match UnixStream::connect(path).await {
                            Ok(server) => relay(client, server, counter, texts).await,
                            Err(e) => Err(e),
                        },
                    };
                });
            }
        });
        StatementCounter {
            url: client_url,
            statements,
            sent,
            task,
        }
    }

    /// The URL to connect through the proxy (same user and database, `sslmode=disable`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Statements sent through the proxy since it started or since the last [`reset`](Self::reset).
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::SeqCst)
    }

    /// Sets the count back to zero.
    pub fn reset(&self) {
        self.statements.store(0, Ordering::SeqCst);
    }

    /// The text of every statement run through the proxy so far, in order (a `Query` holding
    /// several statements is one entry).
    pub fn sent(&self) -> Vec<String> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for StatementCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The NUL-terminated strings at the start of a message body.
fn cstrings(body: &[u8], n: usize) -> Vec<String> {
    body.split(|b| *b == 0)
        .take(n)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Forwards one client connection: the server's bytes as they come, the client's message by
/// message, counting `Query` and `Execute`.
async fn relay<S>(
    client: TcpStream,
    server: S,
    statements: Arc<AtomicU64>,
    sent: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = tokio::io::split(server);

    // Before the startup message: refuse TLS and GSS encryption, so the rest is readable.
    let startup = read_startup(&mut from_client, &mut to_client).await?;
    to_server.write_all(&startup).await?;

    let downstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    });
    let upstream = async {
        // Prepared statements and portals of this connection, by name: their SQL.
        let mut parsed: HashMap<String, String> = HashMap::new();
        let mut portals: HashMap<String, String> = HashMap::new();
        loop {
            let kind = from_client.read_u8().await?;
            let len = from_client.read_u32().await?;
            let mut message = Vec::with_capacity(len as usize + 1);
            message.push(kind);
            message.extend_from_slice(&len.to_be_bytes());
            message.resize(len as usize + 1, 0);
            from_client.read_exact(&mut message[5..]).await?;
            if matches!(kind, b'Q' | b'E') {
                statements.fetch_add(1, Ordering::SeqCst);
            }
            let body = &message[5..];
            let text = match kind {
                b'Q' => cstrings(body, 1).pop(),
                b'P' => {
                    if let [name, sql] = cstrings(body, 2).as_slice() {
                        parsed.insert(name.clone(), sql.clone());
                    }
                    None
                }
                b'B' => {
                    if let [portal, statement] = cstrings(body, 2).as_slice() {
                        let sql = parsed.get(statement).cloned().unwrap_or_default();
                        portals.insert(portal.clone(), sql);
                    }
                    None
                }
                b'E' => cstrings(body, 1)
                    .pop()
                    .and_then(|portal| portals.get(&portal).cloned()),
                _ => None,
            };
            if let Some(text) = text
                && let Ok(mut sent) = sent.lock()
            {
                sent.push(text);
            }
            to_server.write_all(&message).await?;
            if kind == b'X' {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let result = upstream.await;
    let _ = to_server.shutdown().await;
    let _ = downstream.await;
    result
}

/// The controller's admin API served in this process on `127.0.0.1:0`, its database connection
/// (one pooled connection) going through a [`StatementCounter`], and nothing else on that
/// connection: no scheduler, no retention. [`CountedApi::get`] tells how many statements a request
/// sent, so a test can assert that a list route's count does not grow with the rows it lists.
pub struct CountedApi {
    counter: StatementCounter,
    conn: sea_orm::DatabaseConnection,
    api: crate::api::Api,
    task: tokio::task::JoinHandle<()>,
}

impl CountedApi {
    /// Serves the admin API of a controller configured with the `[controller]` and `[worker]`
    /// defaults (and `extra`, more TOML of those sections) on the database of `url`.
    pub async fn start(url: &str, extra: &str) -> CountedApi {
        let counter = StatementCounter::start(url).await;
        let conn = crate::connect(counter.url(), 1).await;
        let text = crate::cli::config_toml(url, extra);
        let config =
            ampd::config::Config::from_parts(std::path::Path::new("test.toml"), &text, Vec::new())
                .unwrap_or_else(|e| panic!("controller config: {e}"));
        let state = ampd::service::controller::api::AppState::new(
            conn.clone(),
            &config,
            ampd::migrate::MigrationSet::ampd,
        );
        let router = ampd::service::controller::api::router(state, 1 << 20, None, None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the admin API");
        let addr = listener.local_addr().expect("its address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        CountedApi {
            counter,
            conn,
            api: crate::api::Api::new(addr, None),
            task,
        }
    }

    /// `GET path`: its JSON answer (which must be 200) and the statements it sent.
    pub async fn get(&self, path: &str) -> (serde_json::Value, u64) {
        self.counter.reset();
        let reply = self.api.get(path).await;
        let statements = self.counter.statements();
        (reply.ok(200).clone(), statements)
    }

    /// The API, to send other requests.
    pub fn api(&self) -> &crate::api::Api {
        &self.api
    }

    /// The counted connection.
    pub fn conn(&self) -> &sea_orm::DatabaseConnection {
        &self.conn
    }

    /// The counter.
    pub fn counter(&self) -> &StatementCounter {
        &self.counter
    }
}

impl Drop for CountedApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}
