//! The worker service: runs the jobs assigned to its node (`runner`: one job's life; `kinds`: what
//! a job does).
//!
//! [`run`]:
//! 1. claims the node id for as long as it runs (a second process with the same `--node-id` is
//!    refused; the claim's epoch fences every job transition of this process), registers, and
//!    starts three loops: the heartbeat (every `heartbeat_interval_ms`, through the pool), the
//!    claim check (as often, on the claim's own connection) and the garbage collector
//!    ([`gc::collect`] every `gc_interval_ms`). The heartbeat never waits on the claim check: a
//!    stalled claim connection does not make a healthy worker look lost;
//! 2. follows the jobs assigned to it: on every `job_actions` START or STOP for its node, every
//!    `reconcile_interval_ms`, after the listener reconnects and whenever a job ends, it reads
//!    [`jobs::list_active_for_node`] and
//!    - starts SCHEDULED jobs, at most `max_concurrent_jobs` at once (the others wait for a slot);
//!    - stops a STOP_REQUESTED or STOPPING job it runs, and completes the stop through the job's
//!      claim when it does not run it;
//!    - fails a RUNNING job it does not run (left by an earlier process of this node id) with
//!      `{"reason": "worker_lost", "node_id": ...}`, which the controller retries at once;
//!    - drops a job it runs whose attempt is no longer active on this node;
//! 3. on shutdown signs off (the controller places nothing more here and recovers its jobs at
//!    once), hands its running jobs back (ERROR `worker_shutdown`, retried at once elsewhere),
//!    releases the claim, and returns within [`STOP_WITHIN`] and a little.
//!
//! A lost claim connection (a database restart, say) is claimed again at the next check, keeping
//! its epoch; if another process holds the node id by then, or has held it meanwhile (the epoch
//! moved on, and with it the fencing of this process's jobs), the worker hands its jobs back and
//! fails.

mod kinds;
mod runner;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use entity::{JobStatus, jobs as job_rows};
use sea_orm::DatabaseConnection;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, MetadataDbConfig};
use crate::metadata::notifications::{Listener, Notification};
use crate::metadata::workers::NodeClaim;
use crate::metadata::{self, jobs, jobs::JobClaim, workers};

use super::{ServiceError, gc, retrying, until_stopped};
use runner::{Cancel, Control};

/// How long a stopping worker waits for its jobs to be handed back and its bookkeeping to be
/// done before it gives up on what is left (the controller recovers those jobs as a lost
/// worker's).
pub const STOP_WITHIN: Duration = Duration::from_secs(8);

/// What a worker records about itself at registration.
fn info() -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// Where and how a worker's jobs read and write.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The node the worker runs as.
    pub node_id: String,
    /// `[storage] data_dir`: manifests and the tables' files.
    pub data_dir: PathBuf,
    /// `[worker] sources_dir`: where CSV sources are resolved.
    pub sources_dir: PathBuf,
    /// `[worker] max_csv_record_bytes`: the longest CSV record read.
    pub max_csv_record_bytes: u64,
    /// `[worker] rows_per_file`.
    pub rows_per_file: u64,
    /// `[worker] gc_grace_secs`: how long a replaced revision's files are kept.
    pub gc_grace: Duration,
}

impl Settings {
    /// The settings of worker `node_id` configured by `config`.
    pub fn new(config: &Config, node_id: String) -> Settings {
        Settings {
            node_id,
            data_dir: config.storage.data_dir().to_path_buf(),
            sources_dir: config.worker.sources_dir().to_path_buf(),
            max_csv_record_bytes: config.worker.max_csv_record_bytes,
            rows_per_file: config.worker.rows_per_file.max(1),
            gc_grace: Duration::from_secs(config.worker.gc_grace_secs),
        }
    }
}

/// Runs worker `node_id` until `shutdown` is cancelled, or until another process holds its node id
/// (an error).
pub async fn run(
    db: DatabaseConnection,
    config: Arc<Config>,
    node_id: String,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    workers::validate_node_id(&node_id)?;
    let settings = Arc::new(Settings::new(&config, node_id.clone()));
    if !settings.sources_dir.is_dir() {
        tracing::warn!(
            sources_dir = %settings.sources_dir.display(),
            "the sources directory does not exist: jobs reading CSV files will fail"
        );
    }
    let started = until_stopped(&shutdown, start(&db, &config.metadata_db, &node_id)).await;
    let Some((claim, mut listener)) = started.transpose()? else {
        return Ok(());
    };
    let epoch = claim.epoch();
    if let Some(addr) = config.worker.metrics_addr {
        crate::metrics::install();
        let limits = super::listen::Limits::new(&config.http, addr, 64 * 1024);
        tokio::spawn(super::metrics::serve_worker(
            addr,
            limits,
            db.clone(),
            shutdown.clone(),
        ));
    }
    let every_beat = Duration::from_millis(config.worker.heartbeat_interval_ms);
    let heartbeat =
        Background::spawn(|stop| heartbeat_loop(db.clone(), node_id.clone(), every_beat, stop));
    let mut claim_check = Background::spawn(|stop| {
        claim_loop(
            config.metadata_db.clone(),
            node_id.clone(),
            claim,
            every_beat,
            stop,
        )
    });
    let gc = Background::spawn(|stop| {
        gc_loop(
            db.clone(),
            settings.data_dir.clone(),
            Duration::from_millis(config.worker.gc_interval_ms),
            stop,
        )
    });
    let max_jobs = usize::try_from(config.worker.max_concurrent_jobs)
        .unwrap_or(usize::MAX)
        .max(1);
    tracing::info!(
        node_id,
        claim_epoch = epoch,
        max_concurrent_jobs = max_jobs,
        data_dir = %settings.data_dir.display(),
        sources_dir = %settings.sources_dir.display(),
        "worker started"
    );
    let mut slots = Slots::new(db.clone(), settings, max_jobs, epoch);
    let every = Duration::from_millis(config.worker.reconcile_interval_ms);
    let lost = follow(
        &mut slots,
        &mut listener,
        &mut claim_check,
        every,
        &shutdown,
    )
    .await;
    let loops = Loops {
        gc,
        heartbeat,
        claim_check,
    };
    wind_down(&db, &node_id, loops, slots, lost.is_some()).await;
    match lost {
        Some(e) => {
            tracing::error!(node_id, error = %e, "worker stopped: its node id is no longer its own");
            Err(e)
        }
        None => {
            tracing::info!(node_id, "worker stopped");
            Ok(())
        }
    }
}

/// The background loops of a worker.
struct Loops {
    gc: Background<()>,
    heartbeat: Background<()>,
    claim_check: Background<Result<Option<NodeClaim>, metadata::Error>>,
}

/// Stops the worker within [`STOP_WITHIN`]: the collector, then the heartbeat, the claim check
/// and the sign-off (unless the node id was `lost`), then every job is handed back and the node
/// claim released.
async fn wind_down(
    db: &DatabaseConnection,
    node_id: &str,
    loops: Loops,
    mut slots: Slots,
    lost: bool,
) {
    let deadline = Instant::now() + STOP_WITHIN;
    loops.gc.stop(Duration::from_millis(500)).await;
    loops.heartbeat.stop(Duration::from_millis(500)).await;
    // The claim check ended by itself when the node id was lost: there is no claim to release,
    // and the worker must not sign off a node id another process now runs.
    let claim = if lost {
        None
    } else {
        let claim = loops.claim_check.stop(Duration::from_secs(1)).await;
        sign_off(db, node_id).await;
        claim.and_then(Result::ok).flatten()
    };
    slots.hand_back(deadline - Duration::from_secs(1)).await;
    if let Some(claim) = claim {
        let _ = tokio::time::timeout(Duration::from_secs(1), claim.release()).await;
    }
}

/// Follows the jobs assigned to this node until `shutdown` is cancelled (`None`) or the
/// claim check ends because the node id is no longer this process's (the error).
async fn follow(
    slots: &mut Slots,
    listener: &mut Listener,
    claim_check: &mut Background<Result<Option<NodeClaim>, metadata::Error>>,
    every: Duration,
    shutdown: &CancellationToken,
) -> Option<ServiceError> {
    let mut reconcile = tokio::time::interval(every);
    reconcile.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            ended = &mut claim_check.handle => return Some(claim_lost(ended)),
            Some(joined) = slots.tasks.join_next_with_id(), if !slots.tasks.is_empty() => {
                slots.finished(joined);
                slots.reconcile_until(shutdown).await;
            }
            _ = reconcile.tick() => slots.reconcile_until(shutdown).await,
            received = listener.recv() => match received {
                Ok(Notification::JobAction(action)) if action.node_id == slots.settings.node_id => {
                    tracing::debug!(job_id = action.job_id, action = ?action.action, "job action");
                    slots.reconcile_until(shutdown).await;
                }
                Ok(Notification::Reconnected) => slots.reconcile_until(shutdown).await,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener failed; retrying");
                    until_stopped(shutdown, tokio::time::sleep(Duration::from_millis(500))).await;
                }
            },
        }
    }
}

/// Signs the worker off (not live from now on), before its jobs are handed back, so that the
/// controller, seeing them fail, places nothing here again.
async fn sign_off(db: &DatabaseConnection, node_id: &str) {
    let signed_off = tokio::time::timeout(
        Duration::from_secs(2),
        retrying("sign the worker off", || workers::sign_off(db, node_id)),
    )
    .await;
    match signed_off {
        Ok(Ok(())) => tracing::info!(node_id, "worker signed off"),
        Ok(Err(e)) => tracing::warn!(node_id, error = %e, "could not sign the worker off"),
        Err(_) => tracing::warn!(node_id, "could not sign the worker off in time"),
    }
}

/// A background loop of the worker and the token that stops it.
struct Background<T> {
    handle: JoinHandle<T>,
    stop: CancellationToken,
}

impl<T: Send + 'static> Background<T> {
    fn spawn<F>(task: impl FnOnce(CancellationToken) -> F) -> Background<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let stop = CancellationToken::new();
        Background {
            handle: tokio::spawn(task(stop.clone())),
            stop,
        }
    }

    /// Stops the loop and waits at most `within` for what it returns; aborts it after that.
    async fn stop(self, within: Duration) -> Option<T> {
        self.stop.cancel();
        let abort = self.handle.abort_handle();
        match tokio::time::timeout(within, self.handle).await {
            Ok(ended) => ended.ok(),
            Err(_) => {
                abort.abort();
                None
            }
        }
    }
}

/// Claims the node id, registers the worker, and connects the listener (before the first
/// reconcile, so that no START is missed between the two).
async fn start(
    db: &DatabaseConnection,
    cfg: &MetadataDbConfig,
    node_id: &str,
) -> Result<(NodeClaim, Listener), ServiceError> {
    let claim = workers::claim(cfg, node_id).await?;
    let worker = retrying("register the worker", || {
        workers::register(db, node_id, info())
    })
    .await?;
    let listener = Listener::connect(cfg).await?;
    tracing::info!(node_id, worker_id = worker.id, "worker registered");
    Ok((claim, listener))
}

/// The error a claim check that ended before it was asked to stop ends the worker with.
fn claim_lost(
    ended: Result<Result<Option<NodeClaim>, metadata::Error>, JoinError>,
) -> ServiceError {
    match ended {
        Ok(Err(e)) => ServiceError::Metadata(e),
        Ok(Ok(_)) => ServiceError::Stopped("the node claim check"),
        Err(e) => ServiceError::Io {
            what: "the node claim check failed".into(),
            source: std::io::Error::other(e.to_string()),
        },
    }
}

/// Sends a heartbeat every `every` through the pool until `stop` is cancelled. It waits on nothing
/// else (not on the node claim, which [`claim_loop`] checks on its own connection), so a stalled
/// claim connection never makes a live worker look lost. A failed heartbeat is logged and the next
/// tick tries again; a worker row that is gone is registered again.
async fn heartbeat_loop(
    db: DatabaseConnection,
    node_id: String,
    every: Duration,
    stop: CancellationToken,
) {
    super::every(every, &stop, || beat(&db, &node_id)).await;
}

/// One heartbeat.
async fn beat(db: &DatabaseConnection, node_id: &str) {
    let started = Instant::now();
    let beat = workers::heartbeat(db, node_id).await;
    crate::metrics::heartbeat(started.elapsed(), beat.is_ok());
    match beat {
        Ok(()) => {}
        Err(metadata::Error::NotFound { .. }) => match workers::register(db, node_id, info()).await
        {
            Ok(_) => tracing::warn!(node_id, "the worker's row was gone; registered again"),
            Err(e) => tracing::warn!(node_id, error = %e, "could not register again"),
        },
        Err(e) => {
            tracing::warn!(node_id, error = %e, "heartbeat failed; retrying at the next tick")
        }
    }
}

/// Checks the node claim every `every` until `stop` is cancelled (then it returns the claim, if it
/// holds it). A claim whose connection was lost is claimed again, keeping its epoch (a database
/// restart loses every session); the loop ends with `Conflict` when another process holds the
/// node id by then, or held it meanwhile (the epoch moved on: this process's jobs are fenced off).
async fn claim_loop(
    cfg: MetadataDbConfig,
    node_id: String,
    claim: NodeClaim,
    every: Duration,
    stop: CancellationToken,
) -> Result<Option<NodeClaim>, metadata::Error> {
    let epoch = claim.epoch();
    let mut claim = Some(claim);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(claim),
            _ = tick.tick() => {}
        }
        match until_stopped(&stop, check_claim(&cfg, &node_id, epoch, &mut claim)).await {
            None => return Ok(claim),
            Some(Err(e)) => return Err(e),
            Some(Ok(())) => {}
        }
    }
}

/// One check of the node claim, claiming the node id again (with `epoch`) when it was lost.
async fn check_claim(
    cfg: &MetadataDbConfig,
    node_id: &str,
    epoch: i64,
    claim: &mut Option<NodeClaim>,
) -> Result<(), metadata::Error> {
    // The claim lives on a connection of its own: when that connection is lost, so is the claim,
    // and another process may take the node id.
    if let Some(held) = claim.as_mut() {
        match held.check().await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(node_id, error = %e, "the node claim was lost; claiming the node id again");
                if let Some(old) = claim.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), old.release()).await;
                }
            }
        }
    }
    match workers::claim_again(cfg, node_id, epoch).await {
        Ok(held) if held.epoch() == epoch => {
            tracing::info!(node_id, claim_epoch = epoch, "node id claimed again");
            *claim = Some(held);
            Ok(())
        }
        Ok(held) => {
            let now = held.epoch();
            let _ = tokio::time::timeout(Duration::from_secs(1), held.release()).await;
            Err(metadata::Error::Conflict(format!(
                "node id {node_id:?} was claimed by another process while this one had lost its \
                 claim (claim epoch {epoch}, now {now}): its jobs are no longer this process's"
            )))
        }
        Err(e @ metadata::Error::Conflict(_)) => Err(e),
        Err(e) => {
            tracing::warn!(node_id, error = %e, "cannot claim the node id yet; retrying at the next check");
            Ok(())
        }
    }
}

/// Runs a garbage collection pass over `data_dir` every `every` until `stop` is cancelled; a
/// failed pass is logged and the next one tries again.
async fn gc_loop(
    db: DatabaseConnection,
    data_dir: PathBuf,
    every: Duration,
    stop: CancellationToken,
) {
    super::every(every, &stop, || async {
        if let Err(e) = gc::collect(&db, &data_dir).await {
            tracing::warn!(error = %e, "garbage collection failed; retrying at the next pass");
        }
    })
    .await;
}

/// A job this worker runs.
struct Slot {
    attempt: i32,
    control: Control,
    task: tokio::task::Id,
}

/// The jobs this worker runs, at most `max` at once.
struct Slots {
    db: DatabaseConnection,
    settings: Arc<Settings>,
    max: usize,
    /// The node claim's epoch: every job claim of this process carries it.
    epoch: i64,
    running: HashMap<i64, Slot>,
    tasks: JoinSet<()>,
}

impl Slots {
    fn new(db: DatabaseConnection, settings: Arc<Settings>, max: usize, epoch: i64) -> Slots {
        Slots {
            db,
            settings,
            max,
            epoch,
            running: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    fn start(&mut self, job: job_rows::Model, claim: JobClaim) {
        let control = Control::default();
        let span = tracing::info_span!("job", job_id = job.id, attempt = job.attempt);
        let (job_id, attempt) = (job.id, job.attempt);
        let task = self
            .tasks
            .spawn(
                runner::run(
                    self.db.clone(),
                    self.settings.clone(),
                    job,
                    claim,
                    control.clone(),
                )
                .instrument(span),
            )
            .id();
        self.running.insert(
            job_id,
            Slot {
                attempt,
                control,
                task,
            },
        );
    }

    /// Frees the slot of the task that ended.
    fn finished(&mut self, joined: Result<(tokio::task::Id, ()), JoinError>) {
        let task = match joined {
            Ok((task, ())) => task,
            Err(e) => {
                if e.is_panic() {
                    tracing::error!(error = %e, "a job's task panicked; the job is left to recovery");
                }
                e.id()
            }
        };
        self.running.retain(|_, slot| slot.task != task);
    }

    /// [`Slots::reconcile`], unless `shutdown` comes first; a failure is logged and the next
    /// reconcile tries again.
    async fn reconcile_until(&mut self, shutdown: &CancellationToken) {
        if let Some(Err(e)) = until_stopped(shutdown, self.reconcile()).await {
            tracing::warn!(error = %e, "reading this node's jobs failed; retrying at the next tick");
        }
    }

    /// Brings what runs here in line with the jobs assigned to this node (see the module docs).
    async fn reconcile(&mut self) -> Result<(), metadata::Error> {
        let node_id = self.settings.node_id.clone();
        let active = jobs::list_active_for_node(&self.db, &node_id).await?;
        for (job_id, slot) in &self.running {
            if !active
                .iter()
                .any(|j| j.id == *job_id && j.attempt == slot.attempt)
            {
                slot.control.cancel(Cancel::Drop);
            }
        }
        let mut waiting = 0;
        for job in active {
            let Some(claim) = JobClaim::by(&job, self.epoch) else {
                continue;
            };
            // RUNNING through this process's own claim, but not running here: its start was
            // recorded and the answer lost. It is this process's to run (`mark_running` through
            // the same claim succeeds again).
            let started_here = job.claim_epoch == Some(self.epoch);
            let here = self
                .running
                .get(&job.id)
                .map(|slot| (slot.attempt == job.attempt, slot.control.clone()));
            match (job.job_status(), here) {
                // This attempt runs here: it moves on by itself.
                (Ok(JobStatus::Scheduled | JobStatus::Running), Some((true, _))) => {}
                // An older attempt still ends here; the new one starts once it has.
                (Ok(JobStatus::Scheduled), Some((false, old))) => old.cancel(Cancel::Drop),
                (Ok(JobStatus::Scheduled), None) if self.running.len() < self.max => {
                    self.start(job, claim)
                }
                (Ok(JobStatus::Scheduled), None) => waiting += 1,
                (Ok(JobStatus::Running), None) if started_here && self.running.len() < self.max => {
                    self.start(job, claim)
                }
                (Ok(JobStatus::Running), None) if started_here => waiting += 1,
                (Ok(JobStatus::Running), here) => {
                    if let Some((_, old)) = here {
                        old.cancel(Cancel::Drop);
                    }
                    self.fail_left_running(&claim).await;
                }
                (Ok(JobStatus::StopRequested | JobStatus::Stopping), Some((true, control))) => {
                    control.cancel(Cancel::Stop)
                }
                (Ok(JobStatus::StopRequested | JobStatus::Stopping), here) => {
                    if let Some((_, old)) = here {
                        old.cancel(Cancel::Drop);
                    }
                    self.stop_left(&claim).await;
                }
                (Ok(_), _) => {}
                (Err(e), _) => {
                    tracing::warn!(job_id = job.id, error = %e, "job has an unknown status")
                }
            }
        }
        if waiting > 0 {
            tracing::debug!(
                waiting,
                running = self.running.len(),
                "jobs waiting for a free slot"
            );
        }
        Ok(())
    }

    /// Fails as `worker_lost` a job an earlier process of this node left RUNNING; the controller
    /// retries it.
    async fn fail_left_running(&self, claim: &JobClaim) {
        let detail = jobs::worker_lost(Some(&claim.node_id));
        match jobs::mark_error(&self.db, claim, detail).await {
            Ok(_) => tracing::warn!(
                job_id = claim.job_id,
                attempt = claim.attempt,
                "a job left running by an earlier process of this node failed as worker_lost; the \
                 controller retries it"
            ),
            Err(e) => {
                tracing::warn!(job_id = claim.job_id, error = %e, "could not fail a job left running")
            }
        }
    }

    /// Completes the stop of a job asked to stop that does not run here.
    async fn stop_left(&self, claim: &JobClaim) {
        match runner::complete_stop(&self.db, claim).await {
            Ok(()) => tracing::info!(
                job_id = claim.job_id,
                "stopped a job that was not running here"
            ),
            Err(e) => {
                tracing::warn!(job_id = claim.job_id, error = %e, "could not stop a job")
            }
        }
    }

    /// Hands every running job back (see [`runner`]) and waits for them until `deadline`, then
    /// aborts what is left: those stay RUNNING on a signed-off worker, which the controller
    /// recovers at once.
    async fn hand_back(&mut self, deadline: Instant) {
        for slot in self.running.values() {
            slot.control.cancel(Cancel::Shutdown);
        }
        let ending = self.running.len();
        let wait = async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.finished(joined);
            }
        };
        if tokio::time::timeout_at(deadline, wait).await.is_err() {
            tracing::warn!(
                left = self.running.len(),
                "jobs did not end in time; the controller recovers them"
            );
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        if ending > 0 {
            tracing::info!(jobs = ending, "running jobs handed back");
        }
    }
}
