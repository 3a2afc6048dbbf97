//! Applying a plan, step by step, on the migration session, and recording each migration. Each
//! step takes the migration lock for itself ([`lock`]) and is planned again under it (another run
//! may have applied something while this one waited), so what it applies is decided by what the
//! database holds while the lock is held:
//!
//! - A transaction step: `BEGIN`, its settings (`SET LOCAL`), the lock for the transaction, the
//!   bookkeeping if it carries it, each migration's `up` followed by its records, `COMMIT`. Any
//!   failure rolls the whole step back, lock and settings included.
//! - A step that runs alone: the lock and its settings on the session; a look for what an
//!   interrupted earlier run of it left behind; its `up` outside any transaction (a concurrent
//!   index build waits for older transactions under `concurrent_index_timeout_secs`); its records
//!   in a transaction of their own, so it is recorded only once it succeeded; then the settings are
//!   reset and the lock released.
//!
//! A run stops at the first failure. Steps committed before it stay applied and recorded, and the
//! error names them.

use std::time::Duration;

use migration::{Algorithm, MigrationTrait};
use sea_orm::DbErr;
use serde::Serialize;

use super::error::{Identity, MigrateError, describe, privilege_error, quote_literal};
use super::lock::{self, Scope};
use super::plan::{Plan, Step, StepKind};
use super::session::{Event, Session, no_answer};
use super::set::MigrationSet;
use super::{leftovers, record, state, verify};
use crate::config::MetadataDbConfig;
use crate::db::pg_error;

/// One migration applied by a run.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// Migration name.
    pub name: String,
    /// Time its `up` took.
    pub duration: Duration,
}

/// What the steps of a run did.
#[derive(Debug, Clone, Default)]
pub(super) struct Done {
    pub applied: Vec<Applied>,
    pub adopted: Vec<String>,
}

impl Done {
    /// What stays applied when a step fails now, for the error message.
    fn stays(&self, step: StepKind) -> String {
        let this = match step {
            StepKind::Transaction if self.applied.is_empty() => {
                return "nothing was applied (the run was rolled back)".to_owned();
            }
            StepKind::Transaction => "this step was rolled back".to_owned(),
            StepKind::Alone => "it ran outside a transaction, so what it did before failing stays \
                                done, and it is not recorded as applied"
                .to_owned(),
        };
        format!("{this}; {}", self.earlier())
    }

    /// What earlier steps of this run applied, by name.
    pub fn earlier(&self) -> String {
        if self.applied.is_empty() {
            return "no earlier step of this run applied anything".to_owned();
        }
        let names: Vec<&str> = self.applied.iter().map(|a| a.name.as_str()).collect();
        format!(
            "the {} migration(s) applied by earlier steps of this run stay applied and recorded \
             ({}; the last: {})",
            names.len(),
            names.join(", "),
            names.last().copied().unwrap_or_default()
        )
    }
}

/// A failure inside a step, before the step is undone and the failure explained.
struct Failure {
    /// The migration that failed, or `bookkeeping`.
    name: String,
    err: DbErr,
}

fn failed(name: &str) -> impl FnOnce(DbErr) -> Failure + '_ {
    move |err| Failure {
        name: name.to_owned(),
        err,
    }
}

/// The settings of a transaction step, for its transaction only.
pub(super) fn transaction_settings_sql(cfg: &MetadataDbConfig) -> String {
    // Let the server notice within a second that a client died in the middle of a statement (a
    // killed `ampd migrate`), so its transaction and its lock go with it (PostgreSQL 14+); no
    // statement_timeout the database or role may set cuts a migration (the run bounds it itself).
    format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = 0; \
         SET LOCAL client_connection_check_interval = 1000",
        cfg.ddl_lock_timeout_ms.max(1)
    )
}

/// The settings of a step that runs alone, on the session (reset when the step ends): its lock
/// waits, a concurrent index build's wait for older transactions included, are bounded by
/// `concurrent_index_timeout_secs`.
fn alone_settings_sql(cfg: &MetadataDbConfig) -> String {
    format!(
        "SET lock_timeout = {}; SET statement_timeout = 0; SET client_connection_check_interval = 1000",
        cfg.concurrent_index_timeout_secs.max(1) * 1000
    )
}

const RESET_SQL: &str =
    "RESET lock_timeout; RESET statement_timeout; RESET client_connection_check_interval";

/// How a run plans its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Replan {
    /// Read the applied set again under each step's lock, and plan from it.
    UnderEachLock,
    /// Read and plan under the first step's lock only; under each later one, show those reads
    /// and go on with that plan (a dry run: it applies nothing, so reading again would find the
    /// steps it has shown still pending).
    UnderFirstLock,
    /// Run the plan as given (a dry run of one migration, which reads nothing).
    Never,
}

/// Applies `plan` and records what it applied.
///
/// A plan with a step that runs alone runs only on a session proven to be its own (see
/// [`super::preflight`]); there the run also holds the lock on the session from before its first
/// step to after its last (each step's own lock is then granted at once, advisory locks being
/// re-entrant), so one run applies the whole plan while others wait, instead of taking turns
/// between steps.
pub(super) async fn apply(
    session: &Session,
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    plan: &Plan<'_>,
    replan: Replan,
) -> Result<Done, MigrateError> {
    let hold = replan != Replan::Never && plan.steps.iter().any(|s| s.kind == StepKind::Alone);
    if !hold {
        return steps(session, cfg, set, plan, replan).await;
    }
    let lock_wait = Duration::from_secs(cfg.migration_lock_timeout_secs);
    lock::acquire(session, Scope::Session, lock_wait, "").await?;
    let result = steps(session, cfg, set, plan, replan).await;
    let released = lock::release(session).await;
    let done = result?;
    released.map_err(|e| after(e, &done))?;
    Ok(done)
}

/// The steps of `plan`, each under its own lock.
async fn steps(
    session: &Session,
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    plan: &Plan<'_>,
    replan: Replan,
) -> Result<Done, MigrateError> {
    let mut done = Done::default();
    let lock_wait = Duration::from_secs(cfg.migration_lock_timeout_secs);
    let mut next = plan.steps.first().map(|s| s.kind);
    let mut index = 0;
    while let Some(kind) = next {
        // The lock for the step, then the plan under it.
        match kind {
            StepKind::Transaction => {
                let settings = transaction_settings_sql(cfg);
                lock::acquire(session, Scope::Transaction, lock_wait, &settings)
                    .await
                    .map_err(|e| after(e, &done))?;
            }
            StepKind::Alone => {
                lock::acquire(session, Scope::Session, lock_wait, "")
                    .await
                    .map_err(|e| after(e, &done))?;
                if let Err(e) = session.write(&alone_settings_sql(cfg)).await {
                    end_alone(session).await;
                    return Err(after(MigrateError::database(e), &done));
                }
                // Its statements may first wait for older transactions, then build.
                session.set_migration_deadline(Duration::from_secs(
                    cfg.migration_statement_timeout_secs + cfg.concurrent_index_timeout_secs,
                ));
            }
        }
        let (fresh, who) = match planned(session, set, plan, index, replan).await {
            Ok(fresh) => fresh,
            Err(e) => {
                end_lock(session, kind).await;
                return Err(after(e, &done));
            }
        };
        let Some(step) = fresh.steps.first() else {
            end_lock(session, kind).await;
            break;
        };
        if step.kind != kind {
            // Another run changed what is pending: take the lock this step needs.
            end_lock(session, kind).await;
            next = Some(step.kind);
            continue;
        }
        let names: Vec<&str> = step.migrations.iter().map(|m| m.name()).collect();
        session.note(format!(
            "step {} of {}, {}: {}",
            index + 1,
            index + fresh.steps.len(),
            step.kind.describe(),
            if names.is_empty() {
                "bookkeeping only".to_owned()
            } else {
                names.join(", ")
            }
        ));
        let result = match step.kind {
            StepKind::Transaction => transaction_step(session, set, &fresh, step).await,
            StepKind::Alone => alone_step(session, set, step).await,
        };
        match result {
            Ok(applied) => {
                for a in &applied {
                    session.tell(Event::Applied {
                        name: &a.name,
                        duration: a.duration,
                    });
                }
                if step.bookkeeping {
                    done.adopted = fresh.bookkeeping.adopt.clone();
                }
                done.applied.extend(applied);
                if step.kind == StepKind::Alone {
                    session
                        .write(RESET_SQL)
                        .await
                        .map_err(|e| after(MigrateError::database(e), &done))?;
                    lock::release(session).await.map_err(|e| after(e, &done))?;
                }
            }
            Err(Failed::Refused(e)) => {
                end_lock(session, step.kind).await;
                return Err(after(e, &done));
            }
            Err(Failed::Step(failure)) => {
                session.rollback().await;
                let mut stays = done.stays(step.kind);
                if step.kind == StepKind::Alone
                    && let Some(first) = step.migrations.first()
                    && let Ok(Some(MigrateError::LeftOver {
                        index, statement, ..
                    })) = leftovers::find(session, *first).await
                {
                    stays.push_str(&format!(
                        ". It left index {index} behind; remove it before the next run: {statement}"
                    ));
                }
                let err = explain(session, cfg, &who, step.kind, failure, &stays).await;
                end_lock(session, step.kind).await;
                return Err(err);
            }
        }
        index += 1;
        next = fresh.steps.get(1).map(|s| s.kind);
    }
    Ok(done)
}

/// `err`, which happened after the steps in `done`: when they applied something, the error says
/// so (a refusal's "nothing was changed" would not be true).
fn after(err: MigrateError, done: &Done) -> MigrateError {
    if done.applied.is_empty() && done.adopted.is_empty() {
        err
    } else {
        MigrateError::AfterSteps {
            err: Box::new(err),
            earlier: done.earlier(),
        }
    }
}

/// Ends the lock of a step that did not run (or failed): rolls back the step's transaction, or
/// resets the settings of a step that ran alone and releases its lock.
async fn end_lock(session: &Session, kind: StepKind) {
    match kind {
        StepKind::Transaction => session.rollback().await,
        StepKind::Alone => end_alone(session).await,
    }
}

async fn end_alone(session: &Session) {
    session.rollback().await;
    let _ = session.write(RESET_SQL).await;
    let _ = lock::release(session).await;
}

/// The plan under the lock: the applied set read and validated again, and planned; or `given` from
/// step `index` (see [`Replan`]).
async fn planned<'a>(
    session: &Session,
    set: &'a MigrationSet,
    given: &Plan<'a>,
    index: usize,
    replan: Replan,
) -> Result<(Plan<'a>, Identity), MigrateError> {
    let rest = || {
        let mut plan = given.clone();
        plan.steps.drain(..index.min(plan.steps.len()));
        plan
    };
    if replan == Replan::Never {
        return Ok((rest(), Identity::default()));
    }
    if replan == Replan::UnderFirstLock && index > 0 {
        // A real run reads again here, and finds this run's earlier steps applied (and the
        // bookkeeping tables in their current layout).
        session.record_elsewhere(
            &state::probe_sql(),
            "on this session, under this step's lock: the applied set again (in a real run it \
             holds this run's earlier steps)",
        );
        session.record_elsewhere(
            &state::read_current_sql(true),
            "then the read that fits the tables the probe found",
        );
        return Ok((rest(), Identity::default()));
    }
    // In the step's transaction a failing statement would abort it: probe the tables first.
    let state = state::read_checked_probed(session).await?;
    tracing::debug!(
        applied = state.applied.len(),
        has_seaql = state.has_seaql,
        has_history = state.has_history,
        "applied set under the lock"
    );
    let verdict = verify::check(set, &state)?;
    Ok((super::plan::plan(set, &state, &verdict), state.who))
}

enum Failed {
    /// The step did not start: nothing to undo.
    Refused(MigrateError),
    /// The step failed: undo it, then explain.
    Step(Failure),
}

/// A transaction step, in the transaction its lock was taken in; committed at the end.
async fn transaction_step(
    session: &Session,
    set: &MigrationSet,
    plan: &Plan<'_>,
    step: &Step<'_>,
) -> Result<Vec<Applied>, Failed> {
    let mut applied = Vec::new();
    if step.bookkeeping {
        record::ensure(session, &plan.bookkeeping, set)
            .await
            .map_err(failed("bookkeeping"))
            .map_err(Failed::Step)?;
    }
    for &migration in &step.migrations {
        let duration = up(session, migration).await.map_err(Failed::Step)?;
        record(session, set, migration, duration)
            .await
            .map_err(Failed::Step)?;
        applied.push(Applied {
            name: migration.name().to_owned(),
            duration: duration.unwrap_or_default(),
        });
    }
    session
        .commit()
        .await
        .map_err(failed("the step's COMMIT"))
        .map_err(Failed::Step)?;
    Ok(applied)
}

/// A step that runs alone, under the session lock and its settings.
async fn alone_step(
    session: &Session,
    set: &MigrationSet,
    step: &Step<'_>,
) -> Result<Vec<Applied>, Failed> {
    let mut applied = Vec::new();
    for &migration in &step.migrations {
        lock::ensure_held(session).await.map_err(Failed::Refused)?;
        leftovers::check(session, migration)
            .await
            .map_err(Failed::Refused)?;
        let duration = up(session, migration).await.map_err(Failed::Step)?;
        session
            .begin()
            .await
            .map_err(failed(migration.name()))
            .map_err(Failed::Step)?;
        record(session, set, migration, duration)
            .await
            .map_err(Failed::Step)?;
        session
            .commit()
            .await
            .map_err(failed(migration.name()))
            .map_err(Failed::Step)?;
        applied.push(Applied {
            name: migration.name().to_owned(),
            duration: duration.unwrap_or_default(),
        });
    }
    Ok(applied)
}

/// Runs `migration.up` on the session; the time it took (`None` in a dry run).
async fn up(
    session: &Session,
    migration: &dyn MigrationTrait,
) -> Result<Option<Duration>, Failure> {
    session
        .up(migration)
        .await
        .map_err(failed(migration.name()))
}

async fn record(
    session: &Session,
    set: &MigrationSet,
    migration: &dyn MigrationTrait,
    duration: Option<Duration>,
) -> Result<(), Failure> {
    let name = migration.name();
    record::applied(
        session,
        name,
        &set.checksum(name, Algorithm::CURRENT),
        duration.map(|d| d.as_millis() as u64),
        set.is_compatible(name),
    )
    .await
    .map_err(failed(name))
}

/// The error for `failure`, after its step was undone.
async fn explain(
    session: &Session,
    cfg: &MetadataDbConfig,
    who: &Identity,
    kind: StepKind,
    failure: Failure,
    stays: &str,
) -> MigrateError {
    let Failure { name, err } = failure;
    if let Some(secs) = no_answer(&err) {
        let outcome = if name == "the step's COMMIT" {
            format!(
                "whether this step was committed is unknown (its COMMIT got no answer): run `ampd \
                 migrate status` to see; {}",
                stays
            )
        } else {
            stays.to_owned()
        };
        return MigrateError::NoAnswer {
            during: format!("running {name}"),
            secs,
            waited_secs: secs,
            outcome,
        };
    }
    match pg_error(&err) {
        Some(pg) if pg.code == "55P03" && kind == StepKind::Alone => {
            MigrateError::ConcurrentIndexTimeout {
                name,
                secs: cfg.concurrent_index_timeout_secs,
                message: pg.message,
                outcome: stays.to_owned(),
            }
        }
        Some(pg) if pg.code == "55P03" => MigrateError::LockedByOtherSession {
            name,
            timeout_ms: cfg.ddl_lock_timeout_ms,
            message: pg.message,
            outcome: stays.to_owned(),
        },
        Some(pg) if pg.code == "42501" || pg.code == "3F000" => {
            let owner = match pg.message.strip_prefix("must be owner of ") {
                Some(object) => owner_of(session, object).await,
                None => None,
            };
            privilege_error(&name, &pg, who, owner.as_deref(), stays)
        }
        _ => MigrateError::MigrationFailed {
            name,
            message: describe(&err),
            outcome: stays.to_owned(),
        },
    }
}

/// The owner of `object` (`table jobs`, as PostgreSQL names it in `must be owner of ...`).
async fn owner_of(session: &Session, object: &str) -> Option<String> {
    let (_, name) = object.split_once(' ')?;
    let rows = session
        .read(&format!(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = to_regclass({})",
            quote_literal(name)
        ))
        .await
        .ok()?;
    rows.first()?.try_get_by_index::<String>(0).ok()
}
