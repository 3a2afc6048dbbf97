//! What the controller's `/metrics` shows of the database: jobs by status, live workers and their
//! oldest heartbeat, the garbage collection backlog. One statement, so a scrape costs one round
//! trip.

use std::collections::BTreeMap;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

use super::{Error, Result, micros};

/// The state of the metadata database at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overview {
    /// Jobs by status (statuses without jobs are absent).
    pub jobs: BTreeMap<String, i64>,
    /// Workers whose last heartbeat is within the liveness window.
    pub live_workers: i64,
    /// Age of the oldest heartbeat among the live workers, in seconds (0 when none is live).
    pub oldest_heartbeat_age_secs: f64,
    /// Files whose garbage collection is due (expired `gc_manifest` entries).
    pub gc_due_files: i64,
    /// Their bytes.
    pub gc_due_bytes: i64,
}

/// Jobs are counted status by status (`$2`, the eight statuses, comma-separated): each count is an
/// index-only scan of `idx_jobs_status` on the pages the visibility map shows all-visible, which
/// reads the index's few pages instead of the table's and compares and groups nothing.
const SQL: &str = "\
SELECT
  (SELECT coalesce(json_object_agg(s.status, c.n), '{}')::text
     FROM unnest(string_to_array($2, ',')) AS s(status)
          CROSS JOIN LATERAL (SELECT count(*) AS n FROM jobs AS j WHERE j.status = s.status) AS c
    WHERE c.n > 0) AS jobs,
  w.live, w.oldest_age, g.files, g.bytes
FROM (SELECT count(*) AS live,
             coalesce(extract(epoch FROM now() - min(heartbeat_at)), 0)::float8 AS oldest_age
        FROM workers
       WHERE heartbeat_at > now() - $1 * interval '1 microsecond') AS w,
     (SELECT count(*) AS files, coalesce(sum(f.object_size), 0)::bigint AS bytes
        FROM gc_manifest AS gc JOIN file_metadata AS f ON f.id = gc.file_id
       WHERE gc.expiration <= now()) AS g";

/// Reads the [`Overview`]; a worker is live when its heartbeat is within `liveness_window`.
pub async fn read<C>(db: &C, liveness_window: Duration) -> Result<Overview>
where
    C: ConnectionTrait,
{
    let window = micros("liveness window", liveness_window)?;
    let statuses = entity::JobStatus::ALL.map(|s| s.as_str()).join(",");
    let statement =
        Statement::from_sql_and_values(DbBackend::Postgres, SQL, [window.into(), statuses.into()]);
    let row = db
        .query_one_raw(statement)
        .await?
        .ok_or_else(|| Error::Db(DbErr::RecordNotFound("the overview query's row".into())))?;
    let jobs: String = row.try_get("", "jobs")?;
    let jobs = serde_json::from_str(&jobs)
        .map_err(|e| Error::Db(DbErr::Custom(format!("jobs by status: {e}"))))?;
    Ok(Overview {
        jobs,
        live_workers: row.try_get("", "live")?,
        oldest_heartbeat_age_secs: row.try_get("", "oldest_age")?,
        gc_due_files: row.try_get("", "files")?,
        gc_due_bytes: row.try_get("", "bytes")?,
    })
}
