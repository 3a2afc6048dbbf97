//! Applying a plan, step by step, on the migration session, and recording each migration.
//!
//! - A transaction step: `BEGIN`, the bookkeeping if it carries it, each migration's `up` followed
//!   by its records, `COMMIT`. Any failure rolls the whole step back.
//! - A step that runs alone: first a look for what an interrupted earlier run of it left behind,
//!   then its `up` outside any transaction, then its records in a transaction of their own, so it
//!   is recorded only once it succeeded.
//!
//! A run stops at the first failure. Steps committed before it stay applied and recorded.

use std::time::{Duration, Instant};

use migration::{Algorithm, MigrationTrait, SchemaManager};
use sea_orm::DbErr;
use serde::Serialize;

use super::error::{Identity, MigrateError, describe, privilege_error, quote_literal};
use super::plan::{Plan, Step, StepKind};
use super::record;
use super::session::Session;
use super::set::MigrationSet;
use super::{leftovers, lock};
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
        match self.applied.last() {
            None => this,
            Some(last) => format!(
                "{this}; the {} migration(s) applied by earlier steps of this run stay applied and \
                 recorded (the last: {})",
                self.applied.len(),
                last.name
            ),
        }
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

/// Applies `plan` and records what it applied.
pub(super) async fn apply(
    session: &Session,
    ddl_lock_timeout_ms: u64,
    set: &MigrationSet,
    who: &Identity,
    plan: &Plan<'_>,
) -> Result<Done, MigrateError> {
    let mut done = Done::default();
    for (i, step) in plan.steps.iter().enumerate() {
        let names: Vec<&str> = step.migrations.iter().map(|m| m.name()).collect();
        session.note(format!(
            "step {} of {}, {}: {}",
            i + 1,
            plan.steps.len(),
            step.kind.describe(),
            if names.is_empty() {
                "bookkeeping only".to_owned()
            } else {
                names.join(", ")
            }
        ));
        let result = match step.kind {
            StepKind::Transaction => transaction_step(session, set, plan, step).await,
            StepKind::Alone => alone_step(session, set, step).await,
        };
        match result {
            Ok(applied) => {
                for a in applied.iter().filter(|_| !session.is_dry()) {
                    tracing::info!(
                        migration = %a.name,
                        duration_ms = a.duration.as_millis() as u64,
                        "applied migration"
                    );
                }
                if step.bookkeeping {
                    done.adopted = plan.bookkeeping.adopt.clone();
                }
                done.applied.extend(applied);
            }
            Err(Failed::Refused(e)) => return Err(e),
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
                return Err(explain(session, ddl_lock_timeout_ms, who, failure, &stays).await);
            }
        }
    }
    Ok(done)
}

enum Failed {
    /// The step did not start: nothing to undo.
    Refused(MigrateError),
    /// The step failed: undo it, then explain.
    Step(Failure),
}

async fn transaction_step(
    session: &Session,
    set: &MigrationSet,
    plan: &Plan<'_>,
    step: &Step<'_>,
) -> Result<Vec<Applied>, Failed> {
    session
        .begin()
        .await
        .map_err(|e| Failed::Refused(MigrateError::database(e)))?;
    if let Err(e) = lock::ensure_held(session).await {
        session.rollback().await;
        return Err(Failed::Refused(e));
    }
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

/// Runs `migration.up` on the session; the time it took (`None` in a dry run). In a dry run a
/// migration that fails (because it needs data the dry run cannot give it) is not a failure: the
/// script says where it stopped.
async fn up(
    session: &Session,
    migration: &dyn MigrationTrait,
) -> Result<Option<Duration>, Failure> {
    let name = migration.name();
    let conn = session.seaorm().await.map_err(failed(name))?;
    let started = Instant::now();
    let result = migration.up(&SchemaManager::new(&conn)).await;
    let result = match result {
        // A BEGIN/COMMIT the migration asked for that failed is its failure.
        Ok(()) => session.settled().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) if session.is_dry() => Ok(None),
        Ok(()) => Ok(Some(started.elapsed())),
        Err(e) if session.is_dry() => {
            session.note(format!(
                "in this dry run {name} stopped here ({}): the rest of what it sends depends on \
                 the database's data and is known only when it runs",
                describe(&e)
            ));
            Ok(None)
        }
        Err(e) => Err(Failure {
            name: name.to_owned(),
            err: e,
        }),
    }
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
    ddl_lock_timeout_ms: u64,
    who: &Identity,
    failure: Failure,
    stays: &str,
) -> MigrateError {
    let Failure { name, err } = failure;
    match pg_error(&err) {
        Some(pg) if pg.code == "55P03" => MigrateError::LockedByOtherSession {
            name,
            timeout_ms: ddl_lock_timeout_ms,
            message: pg.message,
            outcome: stays.to_owned(),
        },
        Some(pg) if pg.code == "42501" => {
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
