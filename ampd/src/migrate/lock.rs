//! The migration lock, `LOCK_KEY`, taken for each step on the server session that runs it:
//!
//! - a step that runs in a transaction takes it **transaction-scoped**
//!   (`pg_try_advisory_xact_lock` inside the step's transaction) and sets its settings with
//!   `SET LOCAL`: the lock and the settings end with the transaction, on whatever server session
//!   ran it, so nothing outlives the step even behind a pooler in transaction mode;
//! - a step that must run alone (`CREATE INDEX CONCURRENTLY`, outside any transaction) takes it
//!   **session-level** (`pg_try_advisory_lock`) on a session proven to be a real one before the run
//!   started ([`super::preflight`]), checks before each statement that the session running it
//!   holds it, and releases it (checking the answer) when the step ends.
//!
//! A run waits by asking `pg_try_advisory_xact_lock` outside any transaction (it answers whether the
//! lock is free now, and holds nothing afterwards) again and again with backoff, never by blocking
//! in `pg_advisory_lock`: a session blocked there keeps a snapshot, `CREATE INDEX CONCURRENTLY` in
//! the lock holder waits for every older snapshot, and PostgreSQL then finds a deadlock and aborts
//! one of them. Between two questions a waiting run holds nothing. Every question has a client-side
//! deadline: what is left of `migration_lock_timeout_secs`, plus [`LOCK_MARGIN`].

use std::time::{Duration, Instant};

use super::LOCK_KEY;
use super::error::MigrateError;
use super::session::Session;

/// The first pause between two attempts; it doubles up to [`MAX_BACKOFF`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The longest pause between two attempts: a waiting run asks at most four times a second, so it
/// follows a short run quickly, and dozens of them cost the server next to nothing.
pub(super) const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// How much longer than `migration_lock_timeout_secs` a run may wait for the answer to its last
/// question before it concludes that the server or the network is frozen.
pub(super) const LOCK_MARGIN: Duration = Duration::from_secs(2);

/// Which lock a step takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// `pg_try_advisory_xact_lock`, in the step's open transaction.
    Transaction,
    /// `pg_try_advisory_lock`, on the session (a step that runs alone).
    Session,
}

fn probe_sql() -> String {
    format!("SELECT pg_try_advisory_xact_lock({LOCK_KEY})")
}

fn take_sql(scope: Scope) -> String {
    match scope {
        Scope::Transaction => format!("SELECT pg_try_advisory_xact_lock({LOCK_KEY})"),
        Scope::Session => format!("SELECT pg_try_advisory_lock({LOCK_KEY})"),
    }
}

fn unlock_sql() -> String {
    format!("SELECT pg_advisory_unlock({LOCK_KEY})")
}

/// Takes the lock for a step, waiting at most `limit`. With [`Scope::Transaction`], each attempt
/// opens the step's transaction and sets `settings` in it first, and a failed attempt rolls it
/// back. Every statement of the wait has the deadline of what is left of `limit`, plus
/// [`LOCK_MARGIN`].
pub(super) async fn acquire(
    session: &Session,
    scope: Scope,
    limit: Duration,
    settings: &str,
) -> Result<(), MigrateError> {
    let started = Instant::now();
    let mut attempts = 0_u32;
    let deadline = || limit.saturating_sub(started.elapsed()) + LOCK_MARGIN;
    loop {
        if scope == Scope::Transaction {
            session
                .begin_within(deadline())
                .await
                .map_err(|e| lock_error(e, started))?;
            session
                .write_within(settings, deadline())
                .await
                .map_err(|e| lock_error(e, started))?;
        }
        let note = (attempts == 0).then(|| match scope {
            Scope::Transaction => "the migration lock, for this transaction only".to_owned(),
            Scope::Session => "the migration lock, on this session, for this step".to_owned(),
        });
        attempts += 1;
        let got = session
            .ask_within(&take_sql(scope), note, deadline())
            .await
            .map_err(|e| lock_error(e, started))?;
        if got {
            tracing::debug!(
                waited_ms = started.elapsed().as_millis() as u64,
                attempts,
                "migration lock taken"
            );
            return Ok(());
        }
        if scope == Scope::Transaction {
            session
                .rollback_within(deadline())
                .await
                .map_err(|e| lock_error(e, started))?;
        }
        if attempts == 1 {
            tracing::info!("another ampd holds the migration lock; waiting for it");
        }
        // Ask, holding nothing, until it is free (or the time is up); then take it again.
        wait_until_free(session, limit, started, attempts == 1).await?;
    }
}

/// How one look at a lock held by another run ended.
enum Probe {
    /// Still held.
    Held,
    /// The question failed.
    Failed(MigrateError),
}

/// Asks, outside any transaction and holding nothing, whether the lock is free: after
/// [`FIRST_BACKOFF`], doubling up to [`MAX_BACKOFF`] (the project's one retry mechanism,
/// [`crate::retry::Backoff`]), until it is or `limit` has passed since `started`
/// ([`MigrateError::LockTimeout`]). `first_wait`: the dry-run notes the question.
async fn wait_until_free(
    session: &Session,
    limit: Duration,
    started: Instant,
    first_wait: bool,
) -> Result<(), MigrateError> {
    let timed_out = || MigrateError::LockTimeout {
        waited_secs: started.elapsed().as_secs(),
    };
    let left = limit.saturating_sub(started.elapsed());
    if left.is_zero() {
        return Err(timed_out());
    }
    tokio::time::sleep(FIRST_BACKOFF.min(left)).await;
    let sql = probe_sql();
    let backoff = crate::retry::Backoff {
        first: (FIRST_BACKOFF * 2).min(MAX_BACKOFF),
        max: MAX_BACKOFF,
        within: limit.saturating_sub(started.elapsed()),
        jitter: false,
    };
    let probed = backoff
        .run(
            |_| {
                let note = first_wait.then(|| {
                    format!(
                        "while another run holds it: asked outside any transaction (answers \
                         whether it is free, holds nothing), after {} ms doubling up to {} ms, \
                         for at most {} s",
                        FIRST_BACKOFF.as_millis(),
                        MAX_BACKOFF.as_millis(),
                        limit.as_secs()
                    )
                });
                let deadline = limit.saturating_sub(started.elapsed()) + LOCK_MARGIN;
                let ask = session.ask_within(&sql, note, deadline);
                async move {
                    match ask.await {
                        Ok(true) => Ok(()),
                        Ok(_) => Err(Probe::Held),
                        Err(e) => Err(Probe::Failed(lock_error(e, started))),
                    }
                }
            },
            |probe| matches!(probe, Probe::Held),
            |_, _| {},
        )
        .await;
    match probed {
        Ok(()) => Ok(()),
        Err(Probe::Held) => Err(timed_out()),
        Err(Probe::Failed(e)) => Err(e),
    }
}

/// A failure while waiting for the lock: a question that got no answer in time is the frozen
/// network's, said as such.
fn lock_error(err: sea_orm::DbErr, started: Instant) -> MigrateError {
    match super::session::no_answer(&err) {
        Some(secs) => MigrateError::NoAnswer {
            during: "waiting for the migration lock".to_owned(),
            secs,
            waited_secs: started.elapsed().as_secs_f64(),
            outcome: "nothing was changed".to_owned(),
        },
        None => MigrateError::database(err),
    }
}

/// Whether the session serving the statement holds the lock at session level.
fn held_sql() -> String {
    // A bigint key is (classid, objid) = (high, low) 32 bits, objsubid 1.
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND pid = pg_backend_pid() AND objsubid = 1 AND classid = {}::oid AND objid = {}::oid)",
        (LOCK_KEY as u64) >> 32,
        (LOCK_KEY as u64) & 0xffff_ffff
    )
}

/// Whether any session of this database holds the lock now (a run that may be building an index
/// concurrently: its index is INVALID until the build ends).
pub(super) async fn held_by_a_run(session: &Session) -> Result<bool, MigrateError> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND objsubid = 1 AND classid = {}::oid AND objid = {}::oid)",
        (LOCK_KEY as u64) >> 32,
        (LOCK_KEY as u64) & 0xffff_ffff
    );
    let rows = session.read(&sql).await.map_err(MigrateError::database)?;
    Ok(rows
        .first()
        .and_then(|row| row.try_get_by_index::<bool>(0).ok())
        .unwrap_or(false))
}

/// Checks, before each statement of a step that runs alone, that the server session running it
/// holds the lock: a pooler that moved the client to another server session (or a migration that
/// released the lock) would otherwise let two runs apply at once.
pub(super) async fn ensure_held(session: &Session) -> Result<(), MigrateError> {
    let held = session
        .ask(
            &held_sql(),
            Some("the session running this step must be the one holding the lock".into()),
        )
        .await
        .map_err(MigrateError::database)?;
    if held {
        Ok(())
    } else {
        Err(MigrateError::LockNotHere)
    }
}

/// Releases the session-level lock of a step that ran alone, and fails if the session no longer
/// held it.
pub(super) async fn release(session: &Session) -> Result<(), MigrateError> {
    let held = session
        .ask(&unlock_sql(), None)
        .await
        .map_err(MigrateError::database)?;
    if held {
        Ok(())
    } else {
        Err(MigrateError::LockLost)
    }
}
