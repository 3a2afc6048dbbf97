//! The migration lock: a session-level advisory lock on the migration session.
//!
//! A run waits for it by asking `pg_try_advisory_lock` again and again, with backoff, never by
//! blocking in `pg_advisory_lock`: a session blocked there keeps a snapshot, `CREATE INDEX
//! CONCURRENTLY` in the lock holder waits for every older snapshot, and PostgreSQL then finds a
//! deadlock and aborts one of them. Between two questions a waiting run holds nothing.

use std::time::{Duration, Instant};

use super::error::MigrateError;
use super::session::Session;
use super::{LOCK_KEY, settings_sql};
use crate::config::MetadataDbConfig;

/// The first pause between two attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The longest pause between two attempts: a waiting run asks at most four times a second, so it
/// follows a short run quickly, and dozens of them cost the server next to nothing.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

fn try_lock_sql() -> String {
    format!("SELECT pg_try_advisory_lock({LOCK_KEY})")
}

fn unlock_sql() -> String {
    format!("SELECT pg_advisory_unlock({LOCK_KEY})")
}

/// Runs `work` under the lock: first proves the session is one of its own and sets its settings
/// (nothing has changed yet), then waits for the lock (at most `migration_lock_timeout_secs`), runs
/// `work`, and releases the lock, failing if it was no longer held.
pub(super) async fn holding<T>(
    session: &Session,
    cfg: &MetadataDbConfig,
    work: impl AsyncFnOnce() -> Result<T, MigrateError>,
) -> Result<T, MigrateError> {
    session.check_own(cfg).await?;
    session
        .write(&settings_sql(cfg))
        .await
        .map_err(MigrateError::database)?;
    acquire(
        session,
        Duration::from_secs(cfg.migration_lock_timeout_secs),
    )
    .await?;
    let result = work().await;
    let released = release(session).await;
    let value = result?;
    released?;
    Ok(value)
}

/// Takes the lock, waiting at most `limit`.
async fn acquire(session: &Session, limit: Duration) -> Result<(), MigrateError> {
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let note = format!(
        "asked again while it answers false, after {} ms doubling up to {} ms, for at most {} s; \
         nothing is held in between",
        FIRST_BACKOFF.as_millis(),
        MAX_BACKOFF.as_millis(),
        limit.as_secs()
    );
    let mut attempts = 0_u32;
    loop {
        let note = (attempts == 0).then(|| note.clone());
        attempts += 1;
        if session
            .ask(&try_lock_sql(), note, true)
            .await
            .map_err(MigrateError::database)?
        {
            tracing::debug!(
                waited_ms = started.elapsed().as_millis() as u64,
                attempts,
                "migration lock taken"
            );
            return Ok(());
        }
        let waited = started.elapsed();
        if waited >= limit {
            return Err(MigrateError::LockTimeout {
                waited_secs: waited.as_secs(),
            });
        }
        if attempts == 1 {
            tracing::info!("another ampd holds the migration lock; waiting for it");
        }
        tokio::time::sleep(backoff.min(limit - waited)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Whether the session serving the statement holds the lock.
fn held_sql() -> String {
    // A bigint key is (classid, objid) = (high, low) 32 bits, objsubid 1.
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND pid = pg_backend_pid() AND objsubid = 1 AND classid = {}::oid AND objid = {}::oid)",
        (LOCK_KEY as u64) >> 32,
        (LOCK_KEY as u64) & 0xffff_ffff
    )
}

/// Checks, at the start of a step, that the server session running it holds the lock: a pooler
/// that moved the client to another server session (or a migration that released the lock) would
/// otherwise let two runs apply at once.
pub(super) async fn ensure_held(session: &Session) -> Result<(), MigrateError> {
    let held = session
        .ask(
            &held_sql(),
            Some("the session running this step must be the one holding the lock".into()),
            true,
        )
        .await
        .map_err(MigrateError::database)?;
    if held {
        Ok(())
    } else {
        Err(MigrateError::LockNotHere)
    }
}

/// Releases the lock, and fails if the session no longer held it.
async fn release(session: &Session) -> Result<(), MigrateError> {
    let held = session
        .ask(&unlock_sql(), None, true)
        .await
        .map_err(MigrateError::database)?;
    if held {
        Ok(())
    } else {
        Err(MigrateError::LockLost)
    }
}
