//! Retention: deleting the history of finished jobs, and finished jobs themselves, a small batch
//! per statement. Each function is one statement on its own (one short transaction on a pool
//! connection), which locks only the rows it deletes; the caller calls it again while it returns a
//! full batch. Which ages to keep is the caller's choice (`[controller] events_retention_days`,
//! `jobs_retention_days`).

use std::time::Duration;

use sea_orm::{ConnectionTrait, Value};

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

/// Deletes up to `batch` events of jobs that finished `older_than` ago or earlier (terminal, last
/// updated then), oldest first; returns how many. The events of an active job, or of one that
/// finished more recently, are never touched, so a job's history goes whole or not at all once
/// the job is old enough. One statement, reading `idx_job_events_created_at` (an event of such a
/// job is at least as old as the job's last update).
#[tracing::instrument(skip(db), err)]
pub async fn delete_events_of_finished<C>(db: &C, older_than: Duration, batch: u64) -> Result<u64>
where
    C: ConnectionTrait,
{
    let age = micros("events retention", older_than)?;
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let terminal = terminal_list();
    let sql = format!(
        "WITH doomed AS (\
           SELECT e.id FROM job_events e JOIN jobs j ON j.id = e.job_id \
           WHERE e.created_at <= now() - $1 * interval '1 microsecond' \
             AND j.status IN ({terminal}) \
             AND j.updated_at <= now() - $1 * interval '1 microsecond' \
           ORDER BY e.created_at LIMIT $2) \
         DELETE FROM job_events WHERE id IN (SELECT id FROM doomed)"
    );
    let done = db
        .execute_raw(stmt(sql, vec![Value::from(age), Value::from(batch)]))
        .await?;
    Ok(done.rows_affected())
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
