//! Every Prometheus metric ampd exposes: its name, type, labels and help text ([`DEFINITIONS`]), the
//! functions that record them, and the process's one registry ([`install`], [`render`]).
//!
//! The registry is process-wide (the `metrics` crate's global recorder), so the services of one
//! process (`ampd solo`) share it and one `GET /metrics` shows them all. It is installed by the
//! first service that serves `/metrics` (the controller, the server, a worker with
//! `[worker] metrics_addr`); until then every recording function costs a relaxed atomic load and
//! does nothing, so a worker without a metrics address records nothing.
//!
//! Names follow Prometheus' conventions (`ampd_` prefix, base units `_seconds` and `_bytes`,
//! counters end in `_total`); every label has a bounded set of values (statuses, job kinds, route
//! templates, status classes), never a job id, node id or dataset name. `docs/observability.md`
//! lists the same table; a unit test checks that the two agree.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// A metric's Prometheus type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (reset when the process restarts).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Observations counted into buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One metric.
#[derive(Clone, Copy, Debug)]
pub struct Definition {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its labels.
    pub labels: &'static [&'static str],
    /// Who exposes it.
    pub from: &'static str,
    /// Its help text (`# HELP`).
    pub help: &'static str,
}

macro_rules! metrics_table {
    ($($id:ident = $name:literal, $kind:ident, [$($label:literal),*], $from:literal, $help:literal;)*) => {
        $(
            #[doc = $help]
            pub const $id: &str = $name;
        )*
        /// Every metric ampd exposes.
        pub const DEFINITIONS: &[Definition] = &[$(Definition {
            name: $name,
            kind: Kind::$kind,
            labels: &[$($label),*],
            from: $from,
            help: $help,
        }),*];
    };
}

metrics_table! {
    BUILD_INFO = "ampd_build_info", Gauge, ["version", "commit"], "all",
        "Always 1; the labels say which ampd runs (commit `unknown` when built outside a git checkout).";
    JOBS = "ampd_jobs", Gauge, ["status"], "controller",
        "Jobs by status, read from the database (at most once a second).";
    WORKERS_LIVE = "ampd_workers_live", Gauge, [], "controller",
        "Workers whose last heartbeat is within [worker] liveness_window_ms, read from the database.";
    HEARTBEAT_OLDEST_AGE = "ampd_worker_heartbeat_oldest_age_seconds", Gauge, [], "controller",
        "Age of the oldest heartbeat among the live workers (0 when none is live).";
    GC_BACKLOG_FILES = "ampd_gc_backlog_files", Gauge, [], "controller",
        "Files whose garbage collection is due (expired gc_manifest entries), read from the database.";
    GC_BACKLOG_BYTES = "ampd_gc_backlog_bytes", Gauge, [], "controller",
        "Bytes of the files whose garbage collection is due.";
    DB_GAUGES_AGE = "ampd_db_gauges_age_seconds", Gauge, [], "controller",
        "Age of the database-derived gauges: grows while the database does not answer (they keep their last value).";
    DB_GAUGES_FAILURES = "ampd_db_gauges_read_failures_total", Counter, [], "controller",
        "Reads of the database-derived gauges that failed or took longer than 5 s.";
    JOB_TRANSITIONS = "ampd_job_transitions_total", Counter, ["to"], "controller, worker",
        "Job status changes this process made, by the status entered.";
    JOB_RETRIES = "ampd_job_retries_total", Counter, [], "controller",
        "Failed jobs given a new attempt by the scheduler.";
    JOB_GIVE_UPS = "ampd_job_give_ups_total", Counter, [], "controller",
        "Failed jobs given up (FATAL) after [controller] max_attempts attempts.";
    JOB_RUN_DURATION = "ampd_job_run_duration_seconds", Histogram, ["kind", "outcome"], "worker",
        "Duration of job attempts, from start to the recorded outcome.";
    SCHEDULING_PASS_DURATION = "ampd_scheduling_pass_duration_seconds", Histogram, ["result"], "controller",
        "Duration of the scheduler's passes (recover orphans, retry failed jobs).";
    ORPHANS_RECOVERED = "ampd_orphans_recovered_total", Counter, [], "controller",
        "Jobs of lost workers that the scheduler failed, moved or stopped.";
    HEARTBEAT_DURATION = "ampd_worker_heartbeat_write_seconds", Histogram, ["result"], "worker",
        "Latency of a worker's heartbeat write.";
    ROWS_MATERIALIZED = "ampd_materialized_rows_total", Counter, [], "worker",
        "Rows written into table revisions' files.";
    BYTES_MATERIALIZED = "ampd_materialized_bytes_total", Counter, [], "worker",
        "Bytes of the table revisions' files written.";
    GC_FILES_COLLECTED = "ampd_gc_files_collected_total", Counter, [], "worker",
        "Files deleted by the garbage collector.";
    GC_REVISIONS_REMOVED = "ampd_gc_revisions_removed_total", Counter, [], "worker",
        "Revisions whose files were all collected, removed with their directory.";
    NOTIFICATIONS = "ampd_notifications_received_total", Counter, ["channel"], "server, worker",
        "Notifications (LISTEN/NOTIFY) received, by channel.";
    LISTENER_RECONNECTS = "ampd_notification_listener_reconnects_total", Counter, [], "server, worker",
        "Times a notification listener connected again after losing its connection.";
    DB_POOL_CONNECTIONS = "ampd_db_pool_connections", Gauge, [], "all",
        "Connections of the metadata database pool (open, idle or in use), at the scrape.";
    DB_POOL_IDLE = "ampd_db_pool_idle_connections", Gauge, [], "all",
        "Idle connections of the metadata database pool, at the scrape.";
    HTTP_REQUESTS = "ampd_http_requests_total", Counter, ["service", "method", "route", "status_class"], "controller, server",
        "HTTP requests answered, by route template (`unmatched`: no route) and status class.";
    HTTP_DURATION = "ampd_http_request_duration_seconds", Histogram, ["service", "method", "route", "status_class"], "controller, server",
        "Time from a request's arrival to its response's headers.";
    HTTP_RESPONSE_BYTES = "ampd_http_response_bytes_total", Counter, ["service", "route"], "controller, server",
        "Bytes of response bodies sent.";
    MIGRATIONS_APPLIED = "ampd_migrations_applied_total", Counter, [], "services with auto_migrate",
        "Migrations applied by this process on startup.";
    MIGRATION_DURATION = "ampd_migration_duration_seconds", Histogram, [], "services with auto_migrate",
        "Duration of each migration applied on startup.";
}

/// Buckets of request and database latencies: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of jobs and migrations: 10 ms to 1 h.
const LONG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The commit ampd was built from (`build.rs`), `unknown` outside a git checkout.
pub const COMMIT: &str = env!("AMPD_COMMIT");

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's registry (once; later calls return the same one) and starts its upkeep
/// (histogram samples are folded into their buckets every 5 s, so memory stays bounded between
/// scrapes). `None` when another recorder was installed first (it is then the one that records).
/// Call from within a Tokio runtime.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %e, "another metrics recorder is installed; /metrics is empty");
                return None;
            }
            describe();
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        })
        .as_ref()
}

fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    for def in DEFINITIONS.iter().filter(|d| d.kind == Kind::Histogram) {
        let buckets = match def.name {
            JOB_RUN_DURATION | MIGRATION_DURATION => LONG_BUCKETS,
            _ => LATENCY_BUCKETS,
        };
        // Only fails on an empty bucket list.
        builder = match builder.set_buckets_for_metric(Matcher::Full(def.name.into()), buckets) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
    }
    builder
}

fn describe() {
    for def in DEFINITIONS {
        match def.kind {
            Kind::Counter => metrics::describe_counter!(def.name, def.help),
            Kind::Gauge => metrics::describe_gauge!(def.name, def.help),
            Kind::Histogram => metrics::describe_histogram!(def.name, def.help),
        }
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => COMMIT)
        .set(1.0);
}

/// The exposition (Prometheus text format 0.0.4) of everything recorded in this process; empty
/// when no registry is installed.
pub fn render() -> String {
    HANDLE
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// A job entered status `to`.
pub fn job_transition(to: &'static str) {
    metrics::counter!(JOB_TRANSITIONS, "to" => to).increment(1);
}

/// The scheduler gave a failed job a new attempt.
pub fn job_retried() {
    metrics::counter!(JOB_RETRIES).increment(1);
}

/// The scheduler gave a failed job up.
pub fn job_given_up() {
    metrics::counter!(JOB_GIVE_UPS).increment(1);
}

/// A job attempt of `kind` (a registered kind, or `unknown`) ended with `outcome` after `took`.
pub fn job_ran(kind: &'static str, outcome: &'static str, took: Duration) {
    metrics::histogram!(JOB_RUN_DURATION, "kind" => kind, "outcome" => outcome)
        .record(took.as_secs_f64());
}

/// A scheduling pass took `took`; `ok`: it did all its work.
pub fn scheduling_pass(took: Duration, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::histogram!(SCHEDULING_PASS_DURATION, "result" => result).record(took.as_secs_f64());
}

/// The scheduler recovered a job of a lost worker.
pub fn orphan_recovered() {
    metrics::counter!(ORPHANS_RECOVERED).increment(1);
}

/// A heartbeat write took `took`; `ok`: it was written.
pub fn heartbeat(took: Duration, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::histogram!(HEARTBEAT_DURATION, "result" => result).record(took.as_secs_f64());
}

/// A job wrote a file of `rows` rows and `bytes` bytes.
pub fn materialized(rows: u64, bytes: u64) {
    metrics::counter!(ROWS_MATERIALIZED).increment(rows);
    metrics::counter!(BYTES_MATERIALIZED).increment(bytes);
}

/// A garbage collection pass deleted `files` files and removed `revisions` revisions.
pub fn collected(files: u64, revisions: u64) {
    metrics::counter!(GC_FILES_COLLECTED).increment(files);
    metrics::counter!(GC_REVISIONS_REMOVED).increment(revisions);
}

/// A notification arrived on `channel` (one of ampd's channels).
pub fn notification(channel: &'static str) {
    metrics::counter!(NOTIFICATIONS, "channel" => channel).increment(1);
}

/// A notification listener connected again.
pub fn listener_reconnected() {
    metrics::counter!(LISTENER_RECONNECTS).increment(1);
}

/// The metadata database pool has `size` connections, `idle` of them idle.
pub fn pool(size: u32, idle: usize) {
    metrics::gauge!(DB_POOL_CONNECTIONS).set(f64::from(size));
    metrics::gauge!(DB_POOL_IDLE).set(idle as f64);
}

/// Migration runs on startup applied `applied` (each with its duration).
pub fn migrations_applied(applied: &[Duration]) {
    metrics::counter!(MIGRATIONS_APPLIED).increment(applied.len() as u64);
    for took in applied {
        metrics::histogram!(MIGRATION_DURATION).record(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut names = std::collections::HashSet::new();
        for def in DEFINITIONS {
            assert!(def.name.starts_with("ampd_"), "{}", def.name);
            assert!(names.insert(def.name), "{} is defined twice", def.name);
            assert_eq!(
                def.kind == Kind::Counter,
                def.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                def.name
            );
            if def.kind == Kind::Histogram {
                assert!(def.name.ends_with("_seconds"), "{}", def.name);
            }
            for label in def.labels {
                assert!(
                    !["job_id", "node_id", "dataset", "namespace", "name"].contains(label),
                    "{}: unbounded label {label}",
                    def.name
                );
            }
        }
    }

    #[test]
    fn the_observability_document_lists_every_metric_as_defined() {
        let doc = include_str!("../../docs/observability.md");
        for def in DEFINITIONS {
            let kind = match def.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let labels = match def.labels {
                [] => "—".to_owned(),
                labels => labels
                    .iter()
                    .map(|l| format!("`{l}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let row = format!("| `{}` | {kind} | {labels} |", def.name);
            assert!(
                doc.contains(&row),
                "docs/observability.md has no row starting {row:?}"
            );
        }
        let rows = doc.lines().filter(|l| l.starts_with("| `ampd_")).count();
        assert_eq!(rows, DEFINITIONS.len(), "one row per metric, no more");
    }
}
