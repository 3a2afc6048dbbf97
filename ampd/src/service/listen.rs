//! Serving an HTTP service (the controller's admin API, the server) on its listener within the
//! bounds `[http]` sets, so that slow, idle or hostile clients cannot hold it:
//!
//! - at most `max_connections` connections at once; one past it is closed as soon as it is
//!   accepted (the process's open-file limit lowers the bound, see [`Limits::new`]);
//! - a request's headers must arrive within `header_timeout_secs` of the connection (or of the
//!   previous response), else the connection is closed;
//! - a connection with nothing sent either way for `idle_timeout_secs` is closed (a response in
//!   flight gets one more period: a client that stopped reading is then cut off);
//! - a body declared larger than the limit is refused (413) before any of it is read; a body
//!   sent more slowly than `body_timeout_secs` is 408;
//! - a response that has not started `request_timeout_secs` after the request was read (the
//!   metadata database does not answer) is 503;
//! - `Host` must name an allowed host (421), so that a web page cannot reach the API through
//!   DNS rebinding; `GET /healthz` and `/readyz` answer any host, for probes that use an address.
//!
//! HTTP/1.1 only (hyper's connection builder, in place of `axum::serve`, which sets none of these).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::service::http::ApiError;

/// The bounds a service is served within (from `[http]`, its bound address and its body limit).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `header_timeout_secs`.
    pub header_timeout: Duration,
    /// `body_timeout_secs`.
    pub body_timeout: Duration,
    /// `request_timeout_secs`.
    pub request_timeout: Duration,
    /// `idle_timeout_secs`.
    pub idle_timeout: Duration,
    /// `max_connections`, lowered to what the open-file limit allows.
    pub max_connections: usize,
    /// The largest request body.
    pub max_body_bytes: usize,
    /// The hosts `Host` may name.
    pub hosts: AllowedHosts,
}

impl Limits {
    /// The bounds of a service bound to `bound` whose bodies may be `max_body_bytes` long. The
    /// connection bound is at most a quarter of the process's open-file limit (the rest is for
    /// database connections, files and the other services of the process): a bound the limit
    /// cannot honour would make `accept` fail instead of closing the connection past it.
    pub fn new(http: &HttpConfig, bound: SocketAddr, max_body_bytes: usize) -> Limits {
        let configured = usize::try_from(http.max_connections).unwrap_or(usize::MAX);
        let files = open_file_limit();
        let max_connections = match files {
            Some(files) if configured > (files / 4).max(1) => {
                let lowered = (files / 4).max(1);
                tracing::warn!(
                    configured,
                    open_file_limit = files,
                    max_connections = lowered,
                    "[http] max_connections is more than a quarter of the open-file limit \
                     (ulimit -n) allows; lowered"
                );
                lowered
            }
            _ => configured,
        };
        Limits {
            header_timeout: Duration::from_secs(http.header_timeout_secs.max(1)),
            body_timeout: Duration::from_secs(http.body_timeout_secs.max(1)),
            request_timeout: Duration::from_secs(http.request_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(http.idle_timeout_secs.max(1)),
            max_connections,
            max_body_bytes,
            hosts: AllowedHosts::new(&http.allowed_hosts, bound.ip()),
        }
    }
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does) and returns it.
fn open_file_limit() -> Option<usize> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    limit.current.and_then(|n| usize::try_from(n).ok())
}

/// A host and, when given, its port, as `Host` carries them: the name in lower case without a
/// trailing dot, an IPv6 address in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// The host.
    pub host: String,
    /// The port.
    pub port: Option<u16>,
}

/// `s` (a `Host` value or an `allowed_hosts` entry) in the form hosts are compared in, or `None`
/// when it is neither a host name nor an IP address (with an optional port).
pub fn normalize_host(s: &str) -> Option<Authority> {
    if s.is_empty() || s.len() > 300 {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = inside.parse().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some(Authority {
            host: format!("[{ip}]"),
            port,
        });
    }
    if let Ok(ip) = s.parse::<Ipv6Addr>() {
        return Some(Authority {
            host: format!("[{ip}]"),
            port: None,
        });
    }
    let (name, port) = match s.rsplit_once(':') {
        Some((name, port)) => (name, Some(port.parse::<u16>().ok()?)),
        None => (s, None),
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    valid.then_some(Authority { host: name, port })
}

/// The hosts a request's `Host` may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedHosts {
    /// Any (`allowed_hosts = ["*"]`).
    Any,
    /// These (normalized).
    Only(Vec<String>),
}

impl AllowedHosts {
    /// `configured`, or when it is empty the defaults: the bound address (unless it is
    /// unspecified, `0.0.0.0` or `::`), `localhost`, `127.0.0.1` and `[::1]`.
    pub fn new(configured: &[String], bound: IpAddr) -> AllowedHosts {
        if configured.iter().any(|h| h == "*") {
            return AllowedHosts::Any;
        }
        let mut hosts: Vec<String> = if configured.is_empty() {
            let mut defaults = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            defaults.push("[::1]".to_owned());
            if !bound.is_unspecified() {
                defaults.push(match bound {
                    IpAddr::V4(ip) => ip.to_string(),
                    IpAddr::V6(ip) => format!("[{ip}]"),
                });
            }
            defaults
        } else {
            configured
                .iter()
                .filter_map(|h| normalize_host(h).map(|a| a.host))
                .collect()
        };
        hosts.sort();
        hosts.dedup();
        AllowedHosts::Only(hosts)
    }

    /// Whether a request whose `Host` is `value` (`None`: it has none) is admitted.
    fn admits(&self, value: Option<&str>) -> bool {
        match self {
            AllowedHosts::Any => true,
            AllowedHosts::Only(hosts) => value
                .and_then(normalize_host)
                .is_some_and(|a| hosts.contains(&a.host)),
        }
    }
}

/// What the guard middleware needs.
#[derive(Debug, Clone)]
struct Guard {
    limits: Limits,
}

/// `router` behind the request bounds of `limits` (the connection bounds are [`serve`]'s).
pub fn guarded(router: axum::Router, limits: &Limits) -> axum::Router {
    let guard = Arc::new(Guard {
        limits: limits.clone(),
    });
    router.layer(axum::middleware::from_fn_with_state(guard, guard_request))
}

fn host_of(request: &Request) -> Option<String> {
    match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok().map(str::to_owned),
        None => request.uri().authority().map(|a| a.as_str().to_owned()),
    }
}

async fn guard_request(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    let limits = &guard.limits;
    let path = request.uri().path();
    let probe = path == "/healthz" || path == "/readyz";
    let host = host_of(&request);
    if !probe && !limits.hosts.admits(host.as_deref()) {
        let named = match &host {
            Some(h) => format!("`{}`", h.chars().take(100).collect::<String>()),
            None => "no host".to_owned(),
        };
        tracing::info!(host = %named, "refused a request naming a host that is not allowed");
        let allowed = match &limits.hosts {
            AllowedHosts::Only(hosts) => hosts.join(", "),
            AllowedHosts::Any => String::new(),
        };
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "the request names {named} in its Host header, which is not one of this \
                 service's hosts ({allowed}); add the name to [http] allowed_hosts (\"*\" admits \
                 any, for a service behind a proxy that checks it)"
            ),
        )
        .into_response();
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the request body is larger than {} bytes (the limit)",
                limits.max_body_bytes
            ),
        )
        .into_response()
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let read = http_body_util::Limited::new(body, limits.max_body_bytes);
    let bytes =
        match tokio::time::timeout(limits.body_timeout, http_body_util::BodyExt::collect(read))
            .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Ok(Err(e)) => {
                return ApiError::bad_request(format!("cannot read the request body: {e}"))
                    .into_response();
            }
            Err(_) => {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {} s ([http] body_timeout_secs)",
                        limits.body_timeout.as_secs()
                    ),
                )
                .into_response();
            }
        };
    let request = Request::from_parts(parts, Body::from(bytes));
    match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                timeout_s = limits.request_timeout.as_secs(),
                "a request got no response within [http] request_timeout_secs; answered 503"
            );
            ApiError::unavailable(format!(
                "no response within {} s ([http] request_timeout_secs): the metadata database \
                 may be unreachable; try again",
                limits.request_timeout.as_secs()
            ))
            .into_response()
        }
    }
}

/// A TCP stream that notes when bytes last went either way.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

/// When a connection last carried bytes, in milliseconds since it was accepted.
struct Activity {
    since: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves `router` (behind [`guarded`]'s request bounds) on `listener` within `limits` until
/// `shutdown` is cancelled; then accepts nothing more, lets every connection finish the request
/// it is serving, and returns once all are closed. Dropping the returned future closes every
/// connection at once. Accepted connections get `TCP_NODELAY`: a response's last small write is
/// not held back until the client's delayed ACK.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: &Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = guarded(router, limits);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    let mut last_full_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Out of file descriptors (or memory): wait instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if last_full_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                last_full_warning = Some(Instant::now());
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "closing new connections: the service has [http] max_connections open"
                );
            }
            drop(tcp);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Tracked {
            inner: tcp,
            activity: activity.clone(),
        });
        let service = TowerToHyperService::new(router.clone());
        let idle = limits.idle_timeout;
        let header_timeout = limits.header_timeout;
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let connection = builder.serve_connection(io, service);
            tokio::pin!(connection);
            // When the connection was asked to close (idle, or stopping).
            let mut closing: Option<Instant> = None;
            let mut tick = tokio::time::interval(idle.min(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    done = connection.as_mut() => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    () = shutdown.cancelled(), if closing.is_none() => {
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    _ = tick.tick() => {
                        if activity.idle_for() < idle {
                            continue;
                        }
                        match closing {
                            // Idle: closed now, or after the response in flight.
                            None => {
                                connection.as_mut().graceful_shutdown();
                                closing = Some(Instant::now());
                            }
                            // Still idle a period later, a response in flight: the client
                            // stopped reading it.
                            Some(at) if at.elapsed() >= idle => {
                                tracing::debug!("closing a connection idle for two periods");
                                break;
                            }
                            Some(_) => {}
                        }
                    }
                }
            }
        });
    }
    // Stopping: no new connections; the open ones finish their requests and close.
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Whether an `accept` error concerns one connection only (it went away before it was
/// accepted), so the next `accept` may succeed at once.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused | K::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_compared_without_port_case_or_trailing_dot() {
        let a = |s: &str| normalize_host(s).map(|a| (a.host, a.port));
        assert_eq!(a("LocalHost:1610"), Some(("localhost".into(), Some(1610))));
        assert_eq!(a("example.com."), Some(("example.com".into(), None)));
        assert_eq!(a("[::1]:80"), Some(("[::1]".into(), Some(80))));
        assert_eq!(a("::1"), Some(("[::1]".into(), None)));
        assert_eq!(a("[0:0::1]"), Some(("[::1]".into(), None)));
        assert_eq!(a("127.0.0.1:1603"), Some(("127.0.0.1".into(), Some(1603))));
        for bad in [
            "",
            "a b",
            "host/path",
            "host:port",
            "[::1",
            "[zz]",
            "a:1:2",
            "évil",
        ] {
            assert_eq!(a(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_default_hosts_are_the_bound_address_and_the_loopback_names() {
        let bound: IpAddr = "10.1.2.3".parse().unwrap();
        let hosts = AllowedHosts::new(&[], bound);
        for admitted in ["10.1.2.3:1610", "localhost:1610", "127.0.0.1", "[::1]:9"] {
            assert!(hosts.admits(Some(admitted)), "{admitted}");
        }
        for refused in ["evil.example", "10.1.2.4", "localhost.evil.example"] {
            assert!(!hosts.admits(Some(refused)), "{refused}");
        }
        assert!(!hosts.admits(None), "a request without Host");
        let any = AllowedHosts::new(&["*".into()], bound);
        assert!(any.admits(Some("evil.example")) && any.admits(None));
        let unspecified = AllowedHosts::new(&[], "0.0.0.0".parse().unwrap());
        assert!(!unspecified.admits(Some("0.0.0.0")));
        let configured = AllowedHosts::new(&["Amp.Example.".into()], bound);
        assert!(configured.admits(Some("amp.example:443")));
        assert!(
            !configured.admits(Some("localhost")),
            "the defaults are replaced"
        );
    }
}
