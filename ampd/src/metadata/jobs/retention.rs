//! Retention: deleting the history of finished jobs, and finished jobs themselves, a small batch
//! per statement. Each function is one statement on its own (one short transaction on a pool
//! connection), which locks only the rows it deletes; the caller calls it again while it returns a
//! full batch. Which ages to keep is the caller's choice (`[controller] events_retention_days`,
//! `jobs_retention_days`).

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbErr, Value};

use super::TERMINAL;
use super::transition::stmt;
use crate::metadata::{Result, micros};

/// `'COMPLETED', 'STOPPED', 'ERROR', 'FATAL'`: the terminal statuses as an SQL list (fixed text,
/// never a value).
fn terminal_list() -> String {
    TERMINAL
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one statement of [`delete_events_of_finished`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventsPurged {
    /// The finished jobs whose events it deleted (a short batch is the last one).
    pub jobs: u64,
    /// The events it deleted.
    pub events: u64,
}

/// Deletes every event of up to `batch` jobs that finished `older_than` ago or earlier (terminal,
/// last updated then) and still have events, oldest first; returns how many jobs and events. The
/// events of an active job, or of one that finished more recently, are never touched, so a job's
/// history goes whole or not at all. One statement, driven by the jobs: it walks
/// `idx_jobs_finished_updated_at` from the oldest event's time (a job with events was last updated
/// no earlier than its first event) and reads each job's events through
/// `idx_job_events_job_id_id`, so a batch costs its jobs' events and not a scan of the events
/// kept. It reads `jobs` without locking a row of it.
#[tracing::instrument(skip(db), err)]
pub async fn delete_events_of_finished<C>(
    db: &C,
    older_than: Duration,
    batch: u64,
) -> Result<EventsPurged>
where
    C: ConnectionTrait,
{
    let age = micros("events retention", older_than)?;
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let terminal = terminal_list();
    let sql = format!(
        "WITH doomed AS (\
           SELECT j.id FROM jobs j \
           WHERE j.status IN ({terminal}) \
             AND j.updated_at <= now() - $1 * interval '1 microsecond' \
             AND j.updated_at >= (SELECT min(created_at) FROM job_events) \
             AND EXISTS (SELECT 1 FROM job_events e WHERE e.job_id = j.id) \
           ORDER BY j.updated_at LIMIT $2), \
         gone AS (DELETE FROM job_events WHERE job_id IN (SELECT id FROM doomed) RETURNING 1) \
         SELECT (SELECT count(*) FROM doomed) AS jobs, (SELECT count(*) FROM gone) AS events"
    );
    let row = db
        .query_one_raw(stmt(sql, vec![Value::from(age), Value::from(batch)]))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the events retention's counts".into()))?;
    let jobs: i64 = row.try_get("", "jobs")?;
    let events: i64 = row.try_get("", "events")?;
    Ok(EventsPurged {
        jobs: u64::try_from(jobs).unwrap_or(0),
        events: u64::try_from(events).unwrap_or(0),
    })
}

/// Deletes up to `batch` finished jobs (terminal) last updated `older_than` ago or earlier, oldest
/// first, with whatever events they still have; returns how many. Never a job that wrote a
/// revision that is active now, and never a COMPLETED job of a manifest still linked to its
/// dataset (so deploying that version again still answers `existing` rather than running it
/// again). Rows another transaction holds are skipped (`SKIP LOCKED`), and each row is checked
/// again as it is deleted, so a job moved back to SCHEDULED meanwhile stays. One statement.
#[tracing::instrument(skip(db), err)]
pub async fn delete_finished<C>(db: &C, older_than: Duration, batch: u64) -> Result<u64>
where
    C: ConnectionTrait,
{
    let age = micros("jobs retention", older_than)?;
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let terminal = terminal_list();
    let sql = format!(
        "DELETE FROM jobs WHERE id IN (\
           SELECT j.id FROM jobs j \
           WHERE j.status IN ({terminal}) \
             AND j.updated_at <= now() - $1 * interval '1 microsecond' \
             AND NOT EXISTS (SELECT 1 FROM physical_table_revisions r \
                 JOIN physical_tables t ON t.active_revision_id = r.id WHERE r.writer = j.id) \
             AND NOT (j.status = 'COMPLETED' AND EXISTS (SELECT 1 FROM dataset_manifests d \
                 WHERE d.namespace = j.descriptor->>'namespace' \
                   AND d.name = j.descriptor->>'name' \
                   AND d.hash = j.descriptor->>'manifest_hash')) \
           ORDER BY j.updated_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
         AND status IN ({terminal}) \
         AND updated_at <= now() - $1 * interval '1 microsecond'"
    );
    let done = db
        .execute_raw(stmt(sql, vec![Value::from(age), Value::from(batch)]))
        .await?;
    Ok(done.rows_affected())
}
