//! `GET /metrics` and what feeds it at scrape time: the HTTP metrics layer ([`track`]) of the
//! controller's and the server's routers, the database-derived gauges of the controller
//! ([`DbGauges`]), the pool gauges, and a worker's own metrics listener ([`serve_worker`]). The
//! metrics themselves are defined in [`crate::metrics`].

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body::Frame;
use sea_orm::DatabaseConnection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metadata::overview::{self, Overview};
use crate::metrics as m;

/// The database-derived gauges are read at most this often.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// A scrape waits at most this long for a fresh read; then it shows the last values.
pub const SCRAPE_WAIT: Duration = Duration::from_millis(500);
/// A read of the gauges is abandoned after this long.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The media type of the Prometheus text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `GET /metrics` reads at scrape time.
#[derive(Clone)]
pub struct Scrape {
    /// The pool whose size is shown.
    db: DatabaseConnection,
    /// The controller's database-derived gauges.
    gauges: Option<Arc<DbGauges>>,
}

impl Scrape {
    /// A scrape of a process whose pool is `db`; `gauges`: the controller's database gauges.
    pub fn new(db: DatabaseConnection, gauges: Option<Arc<DbGauges>>) -> Scrape {
        Scrape { db, gauges }
    }

    /// The route `GET /metrics`, for a router of the service.
    pub fn routes(self) -> Router {
        Router::new()
            .route("/metrics", get(scrape))
            .with_state(Arc::new(self))
    }
}

async fn scrape(State(scrape): State<Arc<Scrape>>) -> Response {
    if let Some(gauges) = &scrape.gauges {
        gauges.refresh().await;
    }
    if let Some(pool) = pool_of(&scrape.db) {
        m::pool(pool.size(), pool.num_idle());
    }
    let body = m::render();
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    response
}

fn pool_of(db: &DatabaseConnection) -> Option<&sea_orm::sqlx::PgPool> {
    match &db.inner {
        sea_orm::DatabaseConnectionType::SqlxPostgresPoolConnection(_) => {
            Some(db.get_postgres_connection_pool())
        }
        _ => None,
    }
}

/// The controller's gauges read from the database ([`overview::read`]): read by a scrape when the
/// last read is [`MIN_REFRESH`] old or older, one read at a time; a scrape waits [`SCRAPE_WAIT`] at
/// most for it and otherwise shows the last values, with their age (`ampd_db_gauges_age_seconds`),
/// so `/metrics` answers promptly while the database does not.
pub struct DbGauges {
    db: DatabaseConnection,
    liveness_window: Duration,
    state: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// The last successful read and when it was made.
    last: Option<(Overview, Instant)>,
    /// When the last read was started.
    started: Option<Instant>,
    /// Set while a read is running: its completion.
    running: Option<watch::Receiver<bool>>,
}

impl DbGauges {
    /// Gauges read from `db`; a worker is live when its heartbeat is within `liveness_window`.
    pub fn new(db: DatabaseConnection, liveness_window: Duration) -> Arc<DbGauges> {
        Arc::new(DbGauges {
            db,
            liveness_window,
            state: Mutex::new(Cache::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the gauges again when due (waiting at most [`SCRAPE_WAIT`]), then publishes the last
    /// values and their age.
    pub async fn refresh(self: &Arc<Self>) {
        let wait = {
            let mut cache = self.lock();
            let due = cache.started.is_none_or(|at| at.elapsed() >= MIN_REFRESH);
            match &cache.running {
                Some(done) => Some(done.clone()),
                None if due => {
                    let (tx, rx) = watch::channel(false);
                    cache.started = Some(Instant::now());
                    cache.running = Some(rx.clone());
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.read().await;
                        let _ = tx.send(true);
                    });
                    Some(rx)
                }
                None => None,
            }
        };
        if let Some(mut done) = wait {
            let _ = tokio::time::timeout(SCRAPE_WAIT, done.wait_for(|done| *done)).await;
        }
        self.publish();
    }

    /// One read, recorded in the cache (on failure only the failure counter moves).
    async fn read(&self) {
        let read =
            tokio::time::timeout(READ_TIMEOUT, overview::read(&self.db, self.liveness_window))
                .await;
        let mut cache = self.lock();
        cache.running = None;
        match read {
            Ok(Ok(overview)) => cache.last = Some((overview, Instant::now())),
            Ok(Err(e)) => {
                metrics::counter!(m::DB_GAUGES_FAILURES).increment(1);
                tracing::warn!(error = %e, "reading the database gauges of /metrics failed");
            }
            Err(_) => {
                metrics::counter!(m::DB_GAUGES_FAILURES).increment(1);
                tracing::warn!(
                    "reading the database gauges of /metrics took longer than {READ_TIMEOUT:?}"
                );
            }
        }
    }

    fn publish(&self) {
        let cache = self.lock();
        let Some((overview, at)) = &cache.last else {
            return;
        };
        for status in entity::JobStatus::ALL {
            let name = status.as_str();
            let n = overview.jobs.get(name).copied().unwrap_or(0);
            metrics::gauge!(m::JOBS, "status" => name).set(n as f64);
        }
        metrics::gauge!(m::WORKERS_LIVE).set(overview.live_workers as f64);
        metrics::gauge!(m::HEARTBEAT_OLDEST_AGE).set(overview.oldest_heartbeat_age_secs);
        metrics::gauge!(m::GC_BACKLOG_FILES).set(overview.gc_due_files as f64);
        metrics::gauge!(m::GC_BACKLOG_BYTES).set(overview.gc_due_bytes as f64);
        metrics::gauge!(m::DB_GAUGES_AGE).set(at.elapsed().as_secs_f64());
    }
}

/// `router` with HTTP metrics (`ampd_http_*`) labelled `service`: every request, by route template
/// (axum's [`MatchedPath`]; `unmatched` for no route), method and status class, its latency to the
/// response's headers, and the bytes of its response body. Call it once the routes are added.
pub fn track(router: Router, service: &'static str) -> Router {
    router
        .route_layer(middleware::from_fn(mark_route))
        .layer(middleware::from_fn_with_state(service, record))
}

/// The route template a request matched, handed from [`mark_route`] to [`record`].
#[derive(Clone)]
struct Route(MatchedPath);

async fn mark_route(request: Request, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(request).await;
    if let Some(matched) = matched {
        response.extensions_mut().insert(Route(matched));
    }
    response
}

async fn record(State(service): State<&'static str>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<Route>()
        .map_or_else(|| "unmatched".to_owned(), |r| r.0.as_str().to_owned());
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let labels = [
        ("service", service.to_owned()),
        ("method", method.to_owned()),
        ("route", route.clone()),
        ("status_class", class.to_owned()),
    ];
    metrics::counter!(m::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(m::HTTP_DURATION, &labels).record(started.elapsed().as_secs_f64());
    let bytes = metrics::counter!(m::HTTP_RESPONSE_BYTES, "service" => service, "route" => route);
    response.map(|body| Body::new(Counted { body, bytes }))
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A response body that adds the bytes it sends to a counter.
struct Counted {
    body: Body,
    bytes: metrics::Counter,
}

impl http_body::Body for Counted {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.increment(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `GET /metrics` of a worker on `[worker] metrics_addr` (within the `[http]` bounds,
/// `limits`) until `shutdown` is cancelled. A
/// failed bind is a warning: the worker runs on without it.
pub async fn serve_worker(
    addr: std::net::SocketAddr,
    limits: super::listen::Limits,
    db: DatabaseConnection,
    shutdown: CancellationToken,
) {
    let listener = match super::http::bind(addr, "worker.metrics_addr").await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(error = %e, "the worker runs without its /metrics");
            return;
        }
    };
    tracing::info!(%addr, "worker metrics listening");
    let router = Scrape::new(db, None)
        .routes()
        .route("/healthz", get(|| async { "ok" }));
    if let Err(e) = super::listen::serve(listener, router, &limits, shutdown).await {
        tracing::warn!(error = %e, %addr, "serving the worker's /metrics failed");
    }
}
