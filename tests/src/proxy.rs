//! A fault-injection proxy between a client (a service, `ampd migrate`, a pool) and PostgreSQL:
//! a TCP listener on `127.0.0.1` that forwards every connection to the real server and, on
//! command, delays, stalls or drops what crosses it — the way a slow link, a network partition, a
//! paused VM or a reset connection does to a database client.
//!
//! A fault applies to every connection, or only to those whose startup message names a given
//! `application_name` (the pool, a node claim's session and the notification listener each set
//! their own), so a test can stall one of a process's connections and leave the others working;
//! when several prefixes match a name, the longest decides.
//! A stalled connection stays open and holds its bytes: nothing is lost, nothing is refused, the
//! bytes move on when the stall ends, as after a partition heals. A dropped connection is closed
//! on both sides at once (also one waiting for data), and new connections are closed as they
//! arrive while the fault lasts.
//!
//! The client side is plain TCP: a TLS or GSS request is answered "no", so the startup message can
//! be read; [`FaultProxy::url`] asks for `sslmode=disable`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;

/// `SSLRequest` and `GSSENCRequest`: the 8-byte requests a client may send before its startup
/// message.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// What the proxy does to the bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward at once.
    Pass,
    /// Forward every chunk after this long, in both directions.
    Delay(Duration),
    /// Forward nothing, in either direction, and keep the connection open until the fault changes.
    Stall,
    /// Close the connection (and every new one) on both sides.
    Drop,
}

/// The faults in force: one for every connection, overrides by `application_name` prefix, and
/// the connections blackholed (stalled whatever else is set).
#[derive(Debug, Clone)]
struct Faults {
    all: Fault,
    by_application: Vec<(String, Fault)>,
    /// Connections numbered below this are stalled (see [`FaultProxy::blackhole_open`]).
    blackholed_below: u64,
}

impl Faults {
    fn of(&self, peer: &Peer<'_>) -> Fault {
        if peer.number < self.blackholed_below {
            return Fault::Stall;
        }
        // The longest prefix that matches wins, so `ampd` can name a pool's connections while
        // `ampd-listener` names the listener's apart.
        self.by_application
            .iter()
            .filter(|(prefix, _)| peer.application.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(self.all, |(_, fault)| *fault)
    }
}

/// A connection through the proxy: its number (in the order the proxy accepted them) and its
/// `application_name`.
#[derive(Debug, Clone, Copy)]
struct Peer<'a> {
    number: u64,
    application: &'a str,
}

/// Where the proxy forwards to.
#[derive(Debug, Clone)]
pub(crate) enum Upstream {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Upstream {
    /// The server of `url` (TCP, or `?host=/socket/dir` for a Unix socket).
    pub(crate) fn of(url: &url::Url) -> Upstream {
        let port = url.port().unwrap_or(5432);
        let socket_dir = url
            .query_pairs()
            .find(|(k, _)| k == "host")
            .map(|(_, v)| v.into_owned())
            .filter(|h| h.starts_with('/'));
        match socket_dir {
            Some(dir) => Upstream::Unix(PathBuf::from(dir).join(format!(".s.PGSQL.{port}"))),
            None => Upstream::Tcp(url.host_str().unwrap_or("localhost").to_owned(), port),
        }
    }
}

/// `url` pointed at `127.0.0.1:port` over plain TCP (`sslmode=disable`), its other parameters kept.
pub(crate) fn url_through(url: &url::Url, port: u16) -> String {
    let mut through = url.clone();
    through.set_host(Some("127.0.0.1")).expect("set host");
    through.set_port(Some(port)).expect("set port");
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "host" && k != "sslmode")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    through
        .query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("sslmode", "disable");
    through.to_string()
}

/// Reads the client's startup message, answering "no" to a TLS or GSS request before it, and
/// returns it whole (length included).
pub(crate) async fn read_startup<R, W>(
    from_client: &mut R,
    to_client: &mut W,
) -> std::io::Result<Vec<u8>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let len = from_client.read_u32().await?;
        if !(8..=10_000).contains(&len) {
            return Err(std::io::Error::other(format!(
                "startup message of {len} bytes"
            )));
        }
        let mut body = vec![0; len as usize - 4];
        from_client.read_exact(&mut body).await?;
        let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        if len == 8 && matches!(code, SSL_REQUEST | GSSENC_REQUEST) {
            to_client.write_all(b"N").await?;
            continue;
        }
        let mut message = len.to_be_bytes().to_vec();
        message.extend_from_slice(&body);
        return Ok(message);
    }
}

/// The `application_name` a startup message asks for ("" when none).
fn application_name(startup: &[u8]) -> String {
    // Length (4), protocol version (4), then NUL-terminated name/value pairs.
    let mut fields = startup.get(8..).unwrap_or_default().split(|b| *b == 0);
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if name == b"application_name" {
            return String::from_utf8_lossy(value).into_owned();
        }
        if name.is_empty() {
            break;
        }
    }
    String::new()
}

/// A running fault proxy. Dropping it closes every connection through it.
pub struct FaultProxy {
    url: String,
    faults: watch::Sender<Faults>,
    open: Arc<AtomicUsize>,
    /// How many connections the proxy has accepted.
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to the server of `url` (a `postgresql://` URL, TCP or `?host=/socket/dir`),
    /// passing everything.
    pub async fn start(url: &str) -> FaultProxy {
        let parsed = url::Url::parse(url).expect("database URL");
        let upstream = Upstream::of(&parsed);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (faults, _) = watch::channel(Faults {
            all: Fault::Pass,
            by_application: Vec::new(),
            blackholed_below: 0,
        });
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (sender, counter, numbers) = (faults.clone(), open.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let number = numbers.fetch_add(1, Ordering::SeqCst);
                let (upstream, faults, open) =
                    (upstream.clone(), sender.subscribe(), counter.clone());
                tokio::spawn(async move {
                    open.fetch_add(1, Ordering::SeqCst);
                    let _ = connection(client, number, upstream, faults).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FaultProxy {
            url: url_through(&parsed, port),
            faults,
            open,
            accepted,
            task,
        }
    }

    /// The URL to connect through the proxy (same user, database and parameters,
    /// `sslmode=disable`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Applies `fault` to every connection, open or new, that no [`set_for`](Self::set_for) names.
    pub fn set(&self, fault: Fault) {
        self.faults.send_modify(|faults| faults.all = fault);
    }

    /// Applies `fault` to the connections whose `application_name` starts with `prefix`, open or
    /// new, until [`clear_for`](Self::clear_for). Where several prefixes match, the longest decides.
    pub fn set_for(&self, prefix: &str, fault: Fault) {
        self.faults.send_modify(|faults| {
            faults.by_application.retain(|(p, _)| p != prefix);
            faults.by_application.push((prefix.to_owned(), fault));
        });
    }

    /// Removes the override [`set_for`](Self::set_for) made for `prefix`.
    pub fn clear_for(&self, prefix: &str) {
        self.faults
            .send_modify(|faults| faults.by_application.retain(|(p, _)| p != prefix));
    }

    /// Stalls every connection for `duration`, then passes again (a partition that heals).
    pub fn stall_for(&self, duration: Duration) {
        self.set(Fault::Stall);
        let faults = self.faults.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            faults.send_modify(|faults| faults.all = Fault::Pass);
        });
    }

    /// Applies `fault` to the pool's connections of an ampd process
    /// ([`ampd::db::POOL_APPLICATION_NAME`]) and to none of its others (the node claim's, the
    /// listener's); [`clear_pool`](Self::clear_pool) ends it.
    pub fn set_for_pool(&self, fault: Fault) {
        self.set_for(ampd::metadata::workers::CLAIM_APPLICATION_NAME, Fault::Pass);
        self.set_for(
            ampd::metadata::notifications::LISTENER_APPLICATION_NAME,
            Fault::Pass,
        );
        self.set_for(ampd::db::POOL_APPLICATION_NAME, fault);
    }

    /// Ends what [`set_for_pool`](Self::set_for_pool) set.
    pub fn clear_pool(&self) {
        for prefix in [
            ampd::db::POOL_APPLICATION_NAME,
            ampd::metadata::workers::CLAIM_APPLICATION_NAME,
            ampd::metadata::notifications::LISTENER_APPLICATION_NAME,
        ] {
            self.clear_for(prefix);
        }
    }

    /// Stalls, for as long as the proxy runs, every connection it has accepted so far, and none it
    /// accepts later: a socket blackholed by a vanished peer or an expired NAT mapping, which never
    /// reports an error, while new connections to the same server work.
    pub fn blackhole_open(&self) {
        let below = self.accepted.load(Ordering::SeqCst);
        self.faults
            .send_modify(|faults| faults.blackholed_below = below);
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Every connection sees the fault set go away and closes.
        self.faults.send_modify(|faults| {
            faults.all = Fault::Drop;
            faults.blackholed_below = 0;
        });
    }
}

/// One client connection: its startup message read, then both directions pumped under the faults.
async fn connection(
    client: TcpStream,
    number: u64,
    upstream: Upstream,
    faults: watch::Receiver<Faults>,
) -> std::io::Result<()> {
    let (mut from_client, mut to_client) = client.into_split();
    let startup = read_startup(&mut from_client, &mut to_client).await?;
    let application = application_name(&startup);
    let peer = Peer {
        number,
        application: &application,
    };
    let mut gate = faults.clone();
    if !pass_gate(&mut gate, peer).await {
        return Ok(());
    }
    match upstream {
        Upstream::Tcp(host, port) => {
            let server = TcpStream::connect((host, port)).await?;
            let _ = server.set_nodelay(true);
            let (from_server, mut to_server) = server.into_split();
            to_server.write_all(&startup).await?;
            both_ways(from_client, to_client, from_server, to_server, peer, faults).await;
        }
        Upstream::Unix(path) => {
            let server = UnixStream::connect(path).await?;
            let (from_server, mut to_server) = server.into_split();
            to_server.write_all(&startup).await?;
            both_ways(from_client, to_client, from_server, to_server, peer, faults).await;
        }
    }
    Ok(())
}

/// Pumps client → server and server → client until either side ends or the connection is dropped.
async fn both_ways<CR, CW, SR, SW>(
    from_client: CR,
    to_client: CW,
    from_server: SR,
    to_server: SW,
    peer: Peer<'_>,
    faults: watch::Receiver<Faults>,
) where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    tokio::select! {
        _ = pump(from_client, to_server, peer, faults.clone()) => {}
        _ = pump(from_server, to_client, peer, faults) => {}
    }
}

/// Waits while the connection is stalled and sleeps a delay; false when it is to be dropped.
async fn pass_gate(faults: &mut watch::Receiver<Faults>, peer: Peer<'_>) -> bool {
    loop {
        let fault = faults.borrow_and_update().of(&peer);
        match fault {
            Fault::Pass => return true,
            Fault::Delay(delay) => {
                tokio::time::sleep(delay).await;
                return true;
            }
            Fault::Drop => return false,
            Fault::Stall => {
                if faults.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Returns once the connection is to be dropped (or the proxy is gone).
async fn dropped(faults: &mut watch::Receiver<Faults>, peer: Peer<'_>) {
    loop {
        if faults.borrow_and_update().of(&peer) == Fault::Drop {
            return;
        }
        if faults.changed().await.is_err() {
            return;
        }
    }
}

/// Forwards one direction chunk by chunk, each chunk through [`pass_gate`].
async fn pump<R, W>(mut from: R, mut to: W, peer: Peer<'_>, faults: watch::Receiver<Faults>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut watch_drop = faults.clone();
    let mut gate = faults;
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            () = dropped(&mut watch_drop, peer) => return,
        };
        if !pass_gate(&mut gate, peer).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
