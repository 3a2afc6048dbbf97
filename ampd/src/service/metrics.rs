//! `GET /metrics` and what feeds it at scrape time: the HTTP metrics layer ([`track`]) of the
//! controller's and the server's routers, the database-derived gauges of the controller
//! ([`DbGauges`]), the pool gauges, and a worker's own metrics listener ([`serve_worker`]). The
//! metrics themselves are defined in [`crate::metrics`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
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
///
/// The metrics' handles are looked up once per route, method and status class and kept
/// ([`Handles`]), so a request costs a map lookup under a read lock and no allocation of labels;
/// a body of known length is counted at once and only a streamed body is wrapped to count its bytes.
pub fn track(router: Router, service: &'static str) -> Router {
    router.layer(RecordLayer(Arc::new(Handles::new(service))))
}

/// Records every request's metrics. `Router::layer` puts it around each route and the fallback,
/// inside the routing: a request that took a route (any of its methods, or none: a 405) carries the
/// route's [`MatchedPath`]; a request the fallback answers has none (`unmatched`).
#[derive(Clone)]
struct RecordLayer(Arc<Handles>);

impl<S> tower_layer::Layer<S> for RecordLayer {
    type Service = Record<S>;

    fn layer(&self, inner: S) -> Record<S> {
        Record {
            inner,
            handles: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct Record<S> {
    inner: S,
    handles: Arc<Handles>,
}

impl<S> tower_service::Service<Request> for Record<S>
where
    S: tower_service::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = RecordFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let method = Method::of(request.method());
        let path = request.extensions().get::<MatchedPath>().cloned();
        RecordFuture {
            inner: self.inner.call(request),
            handles: self.handles.clone(),
            started,
            method,
            path,
        }
    }
}

pin_project_lite::pin_project! {
    struct RecordFuture<F> {
        #[pin]
        inner: F,
        handles: Arc<Handles>,
        started: Instant,
        method: Method,
        path: Option<MatchedPath>,
    }
}

impl<F, E> Future for RecordFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let route = this.path.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
        let class = Class::of(response.status().as_u16());
        let elapsed = this.started.elapsed();
        let route = this.handles.route(route);
        let (requests, duration) = route.of(*this.method, class);
        requests.increment(1);
        duration.record(elapsed.as_secs_f64());
        // A HEAD request's body is dropped unsent (axum replaces it, outside this layer).
        if *this.method == Method::Head {
            return Poll::Ready(Ok(response));
        }
        match http_body::Body::size_hint(response.body()).exact() {
            Some(length) => {
                route.bytes.increment(length);
                Poll::Ready(Ok(response))
            }
            None => {
                let bytes = route.bytes.clone();
                Poll::Ready(Ok(response.map(|body| Body::new(Counted { body, bytes }))))
            }
        }
    }
}

/// The `route` label of a request no route took.
const UNMATCHED: &str = "unmatched";

/// The `method` label's values.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

impl Method {
    const COUNT: usize = 8;

    fn of(method: &axum::http::Method) -> Method {
        use axum::http::Method as M;
        match *method {
            M::GET => Method::Get,
            M::HEAD => Method::Head,
            M::POST => Method::Post,
            M::PUT => Method::Put,
            M::DELETE => Method::Delete,
            M::PATCH => Method::Patch,
            M::OPTIONS => Method::Options,
            _ => Method::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
            Method::Other => "other",
        }
    }
}

/// The `status_class` label's values, `1xx` to `5xx`.
#[derive(Clone, Copy)]
struct Class(usize);

impl Class {
    const COUNT: usize = 5;
    const LABELS: [&'static str; Class::COUNT] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

    fn of(status: u16) -> Class {
        Class(match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        })
    }
}

/// The HTTP metrics' handles of one service, by route: registered the first time a request needs
/// them, then kept (the registry never drops a metric).
struct Handles {
    service: &'static str,
    routes: RwLock<HashMap<Box<str>, Arc<RouteHandles>>>,
}

/// One route's handles: its bytes counter, and its requests counter and latency histogram by
/// method and status class.
struct RouteHandles {
    route: Box<str>,
    service: &'static str,
    bytes: metrics::Counter,
    by: [OnceLock<(metrics::Counter, metrics::Histogram)>; Method::COUNT * Class::COUNT],
}

impl Handles {
    fn new(service: &'static str) -> Handles {
        Handles {
            service,
            routes: RwLock::new(HashMap::new()),
        }
    }

    /// The handles of `route` (a template or [`UNMATCHED`]).
    fn route(&self, route: &str) -> Arc<RouteHandles> {
        if let Some(found) = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
        {
            return found.clone();
        }
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes
            .entry(route.into())
            .or_insert_with(|| {
                Arc::new(RouteHandles {
                    route: route.into(),
                    service: self.service,
                    bytes: metrics::counter!(
                        m::HTTP_RESPONSE_BYTES,
                        "service" => self.service,
                        "route" => route.to_owned()
                    ),
                    by: std::array::from_fn(|_| OnceLock::new()),
                })
            })
            .clone()
    }
}

impl RouteHandles {
    /// The requests counter and latency histogram of `method` and `class` on this route.
    fn of(&self, method: Method, class: Class) -> &(metrics::Counter, metrics::Histogram) {
        self.by[method as usize * Class::COUNT + class.0].get_or_init(|| {
            let labels = [
                ("service", self.service.to_owned()),
                ("method", method.label().to_owned()),
                ("route", self.route.to_string()),
                ("status_class", Class::LABELS[class.0].to_owned()),
            ];
            (
                metrics::counter!(m::HTTP_REQUESTS, &labels),
                metrics::histogram!(m::HTTP_DURATION, &labels),
            )
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{Method, StatusCode};
    use axum::routing::post;
    use http_body_util::BodyExt;
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

    /// The value of the sample `name{labels}` in `text` (labels in their exposition order).
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().unwrap())
    }

    fn router() -> Router {
        let streamed = || async {
            let chunks = ["ab", "cde"].map(|c| Ok::<_, std::io::Error>(axum::body::Bytes::from(c)));
            Body::from_stream(futures_util::stream::iter(chunks))
        };
        let router = Router::new()
            .route(
                "/items/{id}",
                get(|| async { "twelve bytes" }).post(|| async { StatusCode::CONFLICT }),
            )
            .route("/stream", get(streamed))
            .route("/only-post", post(|| async { "" }))
            .fallback(|| async { StatusCode::NOT_FOUND });
        track(router, "test")
    }

    /// Sends each request to a new [`router`], and returns what the recorder holds after the
    /// bodies were read.
    fn exchange(requests: &[(Method, &str)]) -> String {
        let recorder: PrometheusRecorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let mut router = router();
                for (method, uri) in requests {
                    let request = axum::http::Request::builder()
                        .method(method)
                        .uri(*uri)
                        .body(Body::empty())
                        .unwrap();
                    let response = tower_service::Service::call(&mut router, request)
                        .await
                        .unwrap();
                    response.into_body().collect().await.unwrap();
                }
            })
        });
        handle.render()
    }

    const BYTES: &str = "ampd_http_response_bytes_total";
    const REQUESTS: &str = "ampd_http_requests_total";

    #[test]
    fn a_request_is_counted_under_its_route_template_method_and_status_class() {
        let text = exchange(&[
            (Method::GET, "/items/1"),
            (Method::GET, "/items/2"),
            (Method::POST, "/items/3"),
        ]);
        let labels = |method: &str, class: &str| {
            format!(
                "service=\"test\",method=\"{method}\",route=\"/items/{{id}}\",status_class=\"{class}\""
            )
        };
        assert_eq!(
            sample(&text, REQUESTS, &labels("GET", "2xx")),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, REQUESTS, &labels("POST", "4xx")),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "ampd_http_request_duration_seconds_count",
                &labels("GET", "2xx")
            ),
            Some(2.0),
            "{text}"
        );
        let bytes = "service=\"test\",route=\"/items/{id}\"";
        assert_eq!(sample(&text, BYTES, bytes), Some(24.0), "{text}");
    }

    #[test]
    fn no_route_is_unmatched_and_a_method_the_route_lacks_counts_under_the_route() {
        let text = exchange(&[(Method::GET, "/nothing/here"), (Method::GET, "/only-post")]);
        let labels = |route: &str| {
            format!("service=\"test\",method=\"GET\",route=\"{route}\",status_class=\"4xx\"")
        };
        assert_eq!(
            sample(&text, REQUESTS, &labels("unmatched")),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, REQUESTS, &labels("/only-post")),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn a_streamed_body_is_counted_as_sent_and_a_head_answer_sends_none() {
        let text = exchange(&[(Method::GET, "/stream"), (Method::HEAD, "/items/1")]);
        assert_eq!(
            sample(&text, BYTES, "service=\"test\",route=\"/stream\""),
            Some(5.0),
            "{text}"
        );
        let head = "service=\"test\",method=\"HEAD\",route=\"/items/{id}\",status_class=\"2xx\"";
        assert_eq!(sample(&text, REQUESTS, head), Some(1.0), "{text}");
        assert_eq!(
            sample(&text, BYTES, "service=\"test\",route=\"/items/{id}\""),
            Some(0.0),
            "{text}"
        );
    }
}
