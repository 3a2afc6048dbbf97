//! Worker nodes: registration, heartbeats, liveness, and the exclusive claim of a node id.

use std::time::Duration;

use entity::workers;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::sqlx::{self, Connection as _, PgConnection};

use crate::config::MetadataDbConfig;
use crate::db;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    Set, Statement, Value,
};
use sha2::{Digest, Sha256};

use super::{Error, Result, micros};

/// The longest node id (`workers_node_id_check`).
pub const MAX_NODE_ID_LEN: usize = 64;

/// Checks a node id against `workers_node_id_check`: 1-64 characters of `[A-Za-z0-9_.-]`, starting
/// with a letter.
pub fn validate_node_id(node_id: &str) -> Result<()> {
    let mut chars = node_id.chars();
    let valid = node_id.len() <= MAX_NODE_ID_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "node id {node_id:?} is invalid: use 1-{MAX_NODE_ID_LEN} characters of [A-Za-z0-9_.-], \
             starting with a letter"
        )))
    }
}

/// Registers a worker, or registers it again: the first registration sets `created_at`; every one
/// sets `info`, `registered_at` and `heartbeat_at` to now. One statement (an upsert).
#[tracing::instrument(skip(db, info), err)]
pub async fn register<C>(db: &C, node_id: &str, info: serde_json::Value) -> Result<workers::Model>
where
    C: ConnectionTrait,
{
    validate_node_id(node_id)?;
    let worker = workers::Entity::insert(workers::ActiveModel {
        node_id: Set(node_id.to_owned()),
        info: Set(info),
        ..Default::default()
    })
    .on_conflict(
        OnConflict::column(workers::Column::NodeId)
            .update_column(workers::Column::Info)
            .value(workers::Column::RegisteredAt, Expr::current_timestamp())
            .value(workers::Column::HeartbeatAt, Expr::current_timestamp())
            .to_owned(),
    )
    .exec_with_returning(db)
    .await?;
    Ok(worker)
}

/// Records a heartbeat of `node_id` (`heartbeat_at = now()`, the database clock). One statement.
/// `NotFound` when no worker of that id has registered.
#[tracing::instrument(skip(db), err)]
pub async fn heartbeat<C>(db: &C, node_id: &str) -> Result<()>
where
    C: ConnectionTrait,
{
    set_heartbeat(db, node_id, Expr::current_timestamp()).await
}

/// Signs worker `node_id` off as it shuts down: it stops counting as live at once (its
/// `heartbeat_at` is set to the Unix epoch), so the controller places nothing more on it and
/// recovers its jobs without waiting out the liveness window. Registering again makes it live
/// again. `NotFound` when no worker of that id has registered.
///
/// The epoch rather than `-infinity`: every row must still read back as a `chrono` timestamp, and
/// `-infinity` is outside chrono's range (decoding it panics).
#[tracing::instrument(skip(db), err)]
pub async fn sign_off<C>(db: &C, node_id: &str) -> Result<()>
where
    C: ConnectionTrait,
{
    set_heartbeat(db, node_id, Expr::cust("'epoch'::timestamptz")).await
}

/// Sets `heartbeat_at` of worker `node_id` to `at`; `NotFound` when it has not registered.
async fn set_heartbeat<C>(db: &C, node_id: &str, at: Expr) -> Result<()>
where
    C: ConnectionTrait,
{
    let res = workers::Entity::update_many()
        .col_expr(workers::Column::HeartbeatAt, at)
        .filter(workers::Column::NodeId.eq(node_id))
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        return Err(Error::not_found("worker", node_id));
    }
    Ok(())
}

/// The worker `node_id`, if it has registered.
pub async fn get<C>(db: &C, node_id: &str) -> Result<Option<workers::Model>>
where
    C: ConnectionTrait,
{
    Ok(workers::Entity::find()
        .filter(workers::Column::NodeId.eq(node_id))
        .one(db)
        .await?)
}

/// Every worker ever registered, by node id.
pub async fn list<C>(db: &C) -> Result<Vec<workers::Model>>
where
    C: ConnectionTrait,
{
    Ok(workers::Entity::find()
        .order_by_asc(workers::Column::NodeId)
        .all(db)
        .await?)
}

/// Which workers a page of [`list_page`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Every worker ever registered.
    Any,
    /// Only the live ones.
    Live,
    /// Only those that are not live.
    NotLive,
}

/// A page of workers by node id, each with whether it is live (`heartbeat_at > now() - window`, by
/// the database clock): those after node id `after` (keyset pagination: pass the last node id of
/// the previous page), filtered by `liveness`, at most `limit`. One statement, walking
/// `workers_node_id_key`.
pub async fn list_page<C>(
    db: &C,
    window: Duration,
    liveness: Liveness,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<(workers::Model, bool)>>
where
    C: ConnectionTrait,
{
    let window = micros("liveness window", window)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let live = "w.heartbeat_at > now() - $1 * interval '1 microsecond'";
    let mut conditions = match liveness {
        Liveness::Any => Vec::new(),
        Liveness::Live => vec![live.to_owned()],
        Liveness::NotLive => vec![format!("NOT ({live})")],
    };
    let mut values = vec![Value::from(window), Value::from(limit)];
    if let Some(after) = after {
        values.push(Value::from(after.to_owned()));
        conditions.push("w.node_id > $3".to_owned());
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    // Custom SQL: the liveness of each row is a computed column read beside the model.
    let sql =
        format!("SELECT w.*, {live} AS live FROM workers w {filter} ORDER BY w.node_id LIMIT $2");
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            values,
        ))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let live: bool = row.try_get("", "live")?;
        out.push((workers::Model::from_query_result(&row, "")?, live));
    }
    Ok(out)
}

/// Whether worker `node_id` is live (`heartbeat_at > now() - window`, by the database clock);
/// `false` when it never registered. One statement.
pub async fn is_live<C>(db: &C, node_id: &str, window: Duration) -> Result<bool>
where
    C: ConnectionTrait,
{
    let window = micros("liveness window", window)?;
    let found = workers::Entity::find()
        .filter(workers::Column::NodeId.eq(node_id))
        .filter(
            Expr::col(workers::Column::HeartbeatAt).gt(Expr::cust_with_values(
                "now() - $1 * interval '1 microsecond'",
                [window],
            )),
        )
        .one(db)
        .await?;
    Ok(found.is_some())
}

/// The live workers: `heartbeat_at > now() - window`, by the database clock; by node id.
pub async fn list_live<C>(db: &C, window: Duration) -> Result<Vec<workers::Model>>
where
    C: ConnectionTrait,
{
    let window = micros("liveness window", window)?;
    Ok(workers::Entity::find()
        .filter(
            Expr::col(workers::Column::HeartbeatAt).gt(Expr::cust_with_values(
                "now() - $1 * interval '1 microsecond'",
                [window],
            )),
        )
        .order_by_asc(workers::Column::NodeId)
        .all(db)
        .await?)
}

/// The active statuses as an SQL list (`'SCHEDULED', 'RUNNING', ...`), for the custom statements
/// below.
fn active_statuses_sql() -> String {
    super::jobs::ACTIVE
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The live workers (`heartbeat_at > now() - window`, by the database clock), by node id, each
/// with its number of active jobs (SCHEDULED, RUNNING, STOP_REQUESTED, STOPPING): where a job can
/// be placed. One statement, reading the live workers through `idx_workers_heartbeat_at` and their
/// jobs through `idx_jobs_node_id_status`: it does not grow with the workers ever registered nor
/// with the finished jobs.
pub async fn list_live_load<C>(db: &C, window: Duration) -> Result<Vec<(String, i64)>>
where
    C: ConnectionTrait,
{
    let rows = db.query_all_raw(list_live_load_statement(window)?).await?;
    rows.iter()
        .map(|row| Ok((row.try_get("", "node_id")?, row.try_get("", "active")?)))
        .collect()
}

/// The statement [`list_live_load`] runs (to `EXPLAIN` it).
pub fn list_live_load_statement(window: Duration) -> Result<Statement> {
    let window = micros("liveness window", window)?;
    let active = active_statuses_sql();
    // Custom SQL: a count per row reads plainly only as SQL. A correlated count rather than a
    // join: its plan is one probe of `idx_jobs_node_id_status` per live worker whatever the
    // table's statistics, where a join was planned as a merge over every job's index entry,
    // the finished ones too (15 ms a pass beside 98 000 finished jobs).
    Ok(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "SELECT w.node_id, (SELECT count(*) FROM jobs j \
                 WHERE j.node_id = w.node_id AND j.status IN ({active})) AS active \
             FROM workers w WHERE w.heartbeat_at > now() - $1 * interval '1 microsecond' \
             ORDER BY w.node_id"
        ),
        [Value::from(window)],
    ))
}

/// Deletes up to `batch` workers that are gone: not live (no heartbeat within `window`), last
/// seen `older_than` ago or earlier (the later of their last heartbeat and their last
/// registration, so a worker that signed off counts as last seen when it last started), holding
/// no active job, and whose node id no process holds ([`claim`]: a worker paused for longer keeps
/// its row and its claim epoch). Returns how many. The finished jobs that named such a worker keep
/// their history (their events name the node) and lose the link (`jobs_node_id_fkey` is
/// `ON DELETE SET NULL`). Rows another transaction holds are skipped, and each row is checked
/// again as it is deleted, so a worker that heartbeats or registers meanwhile stays. One
/// statement.
#[tracing::instrument(skip(db), err)]
pub async fn delete_gone<C>(
    db: &C,
    window: Duration,
    older_than: Duration,
    batch: u64,
) -> Result<u64>
where
    C: ConnectionTrait,
{
    let window = micros("liveness window", window)?;
    let age = micros("workers retention", older_than)?;
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let active = active_statuses_sql();
    // The claim key of `claim_key`, computed by the database: the first 8 bytes of
    // sha256("ampd/node-claim/" || node_id) as two big-endian int4, which pg_locks shows as
    // classid and objid (objsubid 2 for the two-int4 form).
    let gone = "w.heartbeat_at <= now() - $1 * interval '1 microsecond' \
         AND GREATEST(w.heartbeat_at, w.registered_at) <= now() - $2 * interval '1 microsecond'";
    let sql = format!(
        "DELETE FROM workers w WHERE w.id IN (\
           SELECT w.id FROM workers w \
           WHERE {gone} \
             AND NOT EXISTS (SELECT 1 FROM jobs j \
                 WHERE j.node_id = w.node_id AND j.status IN ({active})) \
             AND NOT EXISTS (SELECT 1 FROM pg_locks l, LATERAL (SELECT \
                   sha256(convert_to('ampd/node-claim/' || w.node_id, 'UTF8')) AS d) k \
                 WHERE l.locktype = 'advisory' AND l.objsubid = 2 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND l.classid = (('x' || encode(substring(k.d FROM 1 FOR 4), 'hex'))::bit(32)::int4)::oid \
                   AND l.objid = (('x' || encode(substring(k.d FROM 5 FOR 4), 'hex'))::bit(32)::int4)::oid) \
           ORDER BY w.id LIMIT $3 FOR UPDATE SKIP LOCKED) \
         AND {gone}"
    );
    let done = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [Value::from(window), Value::from(age), Value::from(batch)],
        ))
        .await?;
    Ok(done.rows_affected())
}

/// The advisory lock key of a node claim, in the two-`int4` key space (see the module docs of
/// [`crate::metadata`]): the first 8 bytes of `sha256("ampd/node-claim/" || node_id)` as two
/// big-endian `i32`s.
pub fn claim_key(node_id: &str) -> (i32, i32) {
    let digest = Sha256::new()
        .chain_update(b"ampd/node-claim/")
        .chain_update(node_id.as_bytes())
        .finalize();
    let bytes: [u8; 32] = digest.into();
    let [a, b, c, d, e, f, g, h, ..] = bytes;
    (
        i32::from_be_bytes([a, b, c, d]),
        i32::from_be_bytes([e, f, g, h]),
    )
}

/// Exclusive use of a node id, held for as long as this value (and its dedicated connection)
/// lives. Dropping it closes the connection, which releases the claim; [`NodeClaim::release`] does
/// the same and waits for it.
///
/// If the connection is lost (server restart, network, `pg_terminate_backend`), the claim is lost
/// with it: [`NodeClaim::check`] tells.
#[derive(Debug)]
pub struct NodeClaim {
    node_id: String,
    key: (i32, i32),
    epoch: i64,
    conn: PgConnection,
}

/// The `application_name` of a node claim's connection, so it can be found in `pg_stat_activity`.
pub const CLAIM_APPLICATION_NAME: &str = "ampd-node-claim";

/// How long [`NodeClaim::check`] waits for an answer before the claim counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Claims `node_id` for this process: a session-level `pg_try_advisory_lock(k1, k2)` (key:
/// [`claim_key`]) on a dedicated connection to the metadata database of `cfg` (opened with the
/// pool's connect options and retries), which the claim keeps open, and a new claim epoch: the
/// node's `workers.claim_epoch` raised by one (the row is created when the node never registered),
/// which every job transition of this process is fenced with ([`NodeClaim::epoch`]). `Conflict`
/// when another session holds the claim; `Connect` when the database cannot be reached.
#[tracing::instrument(skip(cfg), err)]
pub async fn claim(cfg: &MetadataDbConfig, node_id: &str) -> Result<NodeClaim> {
    claim_with(cfg, node_id, None).await
}

/// Claims `node_id` again for a process that held it with claim epoch `epoch` and lost the claim's
/// connection, as [`claim`] does, but keeping `epoch` when no other process has claimed the node id
/// meanwhile (the node's epoch is still `epoch`). When one has, the claim gets a new epoch, which
/// [`NodeClaim::epoch`] tells: the jobs this process ran under `epoch` are then no longer its own.
/// While the lock is still held by a session and the epoch is still `epoch` (this process's own
/// lost session, which the server has not ended yet), `Unavailable`: try again later.
#[tracing::instrument(skip(cfg), err)]
pub async fn claim_again(cfg: &MetadataDbConfig, node_id: &str, epoch: i64) -> Result<NodeClaim> {
    claim_with(cfg, node_id, Some(epoch)).await
}

async fn claim_with(cfg: &MetadataDbConfig, node_id: &str, keep: Option<i64>) -> Result<NodeClaim> {
    validate_node_id(node_id)?;
    let key = claim_key(node_id);
    let mut conn = db::connect_session(db::session_url(cfg)?, cfg, CLAIM_APPLICATION_NAME).await?;
    let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(key.0)
        .bind(key.1)
        .fetch_one(&mut conn)
        .await?;
    if !acquired {
        if let Some(epoch) = keep {
            // Still this process's epoch: nobody else has claimed the node id (a claim raises the
            // epoch under the lock), so what holds the lock is this process's own lost session,
            // not yet ended by the server. Try again later.
            let now: Option<i64> =
                sqlx::query_scalar("SELECT claim_epoch FROM workers WHERE node_id = $1")
                    .bind(node_id)
                    .fetch_optional(&mut conn)
                    .await?;
            if now == Some(epoch) {
                let _ = conn.close().await;
                return Err(Error::Unavailable {
                    sqlstate: None,
                    source: sea_orm::DbErr::Custom(format!(
                        "the claim of node id {node_id:?} is still held by this process's lost \
                         session (claim epoch {epoch})"
                    )),
                });
            }
        }
        let _ = conn.close().await;
        return Err(Error::Conflict(format!(
            "node id {node_id:?} is claimed by another process (advisory lock ({}, {})); stop \
             that process or choose another node id",
            key.0, key.1
        )));
    }
    // Under the lock, so no other claim of the node id runs meanwhile.
    let epoch: i64 = sqlx::query_scalar(
        "INSERT INTO workers (node_id, claim_epoch) VALUES ($1, COALESCE($2::bigint, 0) + 1) \
         ON CONFLICT (node_id) DO UPDATE SET claim_epoch = CASE \
             WHEN workers.claim_epoch = $2::bigint THEN workers.claim_epoch \
             ELSE workers.claim_epoch + 1 END \
         RETURNING claim_epoch",
    )
    .bind(node_id)
    .bind(keep)
    .fetch_one(&mut conn)
    .await?;
    Ok(NodeClaim {
        node_id: node_id.to_owned(),
        key,
        epoch,
        conn,
    })
}

impl NodeClaim {
    /// The node id claimed.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The claim epoch: the node's `workers.claim_epoch` this claim set, which fences every job
    /// transition of its holder ([`crate::metadata::jobs::JobClaim`]).
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Checks that the claim is still held: the connection is alive and the session still holds
    /// the lock. `Unavailable` when the connection is gone (and the claim with it) or gives no
    /// answer within 10 s, `Conflict` if the lock was released behind this value's back.
    pub async fn check(&mut self) -> Result<()> {
        let query = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_backend_pid() AND granted AND objsubid = 2 \
             AND classid = ($1::int4)::oid AND objid = ($2::int4)::oid)",
        )
        .bind(self.key.0)
        .bind(self.key.1)
        .fetch_one(&mut self.conn);
        let held: bool = match tokio::time::timeout(CHECK_TIMEOUT, query).await {
            Ok(held) => held?,
            Err(_) => {
                return Err(Error::Unavailable {
                    sqlstate: None,
                    source: sea_orm::DbErr::Custom(format!(
                        "the claim's connection gave no answer within {} s",
                        CHECK_TIMEOUT.as_secs()
                    )),
                });
            }
        };
        if held {
            Ok(())
        } else {
            Err(Error::Conflict(format!(
                "the claim of node id {:?} is no longer held",
                self.node_id
            )))
        }
    }

    /// Releases the claim and closes its connection.
    pub async fn release(mut self) -> Result<()> {
        let _: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1, $2)")
            .bind(self.key.0)
            .bind(self.key.1)
            .fetch_one(&mut self.conn)
            .await?;
        self.conn.close().await?;
        Ok(())
    }
}
