//! `ampd migrate impact`: what each pending statement will lock, rewrite or scan on this database,
//! and which sessions would block it now. Read-only on the target.
//!
//! 1. On the target, a recording session ([`Session::recording`]) reads the applied set, validates it and plans
//!    the run as `ampd migrate` would ([`state`], [`verify`], [`plan`]).
//! 2. A shadow database (`metadata_db.shadow_url`, emptied first, or with `--create-shadow` a
//!    temporary database created on the target's server and dropped after) is brought to the
//!    target's applied set by the same migrations, then the pending steps run on it as a run would
//!    (a transaction step in one transaction, a step that runs alone outside any), through a
//!    connection that measures every statement ([`Recorder`]):
//!    - in a transaction: the relation locks the session holds after the statement (`pg_locks`),
//!      whether a table's `relfilenode` changed (a rewrite) and its `seq_scan` counter in
//!      `pg_stat_xact_user_tables` grew (a scan);
//!    - outside a transaction (`CREATE INDEX CONCURRENTLY`): the locks are sampled from a second
//!      session while the statement runs. That session holds a snapshot, which such a build waits
//!      for before it ends, so the sample is taken while the build holds its locks; the sampler then
//!      lets it go. Scans are read from `pg_stat_user_tables` after a forced flush.
//! 3. Joined with the target, from catalogs and statistics only (`pg_class.relpages`/`reltuples`,
//!    `pg_locks`, `pg_stat_activity`): each table's estimated size and rows, and the sessions that
//!    hold a conflicting lock (or, for a statement outside a transaction, an old snapshot) now.
//!
//! A statement is flagged when it rewrites or scans, under a lock that blocks writes, a table of at
//! least `metadata_db.impact_risky_size_mb`, or when a current session would block it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use migration::{MigrationTrait, SchemaManager};
use sea_orm::sqlx::{self, Connection as _, PgConnection, Row as _};
use sea_orm::{
    DatabaseBackend, DatabaseConnection, DbErr, ProxyDatabaseTrait, ProxyExecResult, ProxyRow,
    RuntimeErr, Statement,
};
use serde::Serialize;

use super::error::{MigrateError, describe, quote_ident};
use super::plan::{self, StepKind};
use super::session::{Session, display, exec_err, fetch_all, proxy_row};
use super::set::{MigrationSet, uses_transaction};
use super::{state, verify};
use crate::config::{DatabaseUrl, MetadataDbConfig};
use crate::db;

/// Why `ampd migrate impact` could not measure.
#[derive(Debug, thiserror::Error)]
pub enum ImpactError {
    /// Reading or validating the target, as `ampd migrate` would refuse it.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// Neither `metadata_db.shadow_url` nor `--create-shadow` was given.
    #[error(
        "no shadow database: set metadata_db.shadow_url to a database ampd may empty and fill, or \
         pass --create-shadow to create a temporary one on the target's server (it needs CREATEDB, \
         and its WAL is replicated like any database's); nothing was changed"
    )]
    NoShadow,
    /// The shadow URL reaches the target database itself.
    #[error(
        "metadata_db.shadow_url ({url}) reaches the metadata database itself; impact empties the \
         shadow, so it must be another database; nothing was changed"
    )]
    ShadowIsTarget {
        /// The shadow URL, redacted.
        url: String,
    },
    /// Preparing the shadow database failed (connecting, creating, emptying it).
    #[error("preparing the shadow database {url} failed: {message}")]
    Shadow {
        /// The shadow URL, redacted.
        url: String,
        /// What failed.
        message: String,
    },
    /// A migration failed on the shadow database.
    #[error(
        "on the shadow database, {name} failed: {message}; the target was not changed (a real run \
         would likely fail the same way)"
    )]
    ShadowMigration {
        /// The migration.
        name: String,
        /// PostgreSQL's message.
        message: String,
    },
    /// Reading the target's catalogs or statistics failed.
    #[error("reading the target's catalogs failed: {0}")]
    Target(String),
}

/// Lock modes that block `INSERT`, `UPDATE` and `DELETE` on a table.
const WRITE_BLOCKING: [&str; 4] = [
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
];

/// PostgreSQL's table-level lock modes, weakest first.
const MODES: [&str; 8] = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
];

/// Whether lock modes `a` and `b` conflict (PostgreSQL's table-level lock conflict table).
pub fn conflicts(a: &str, b: &str) -> bool {
    // Row i: the modes (by index in MODES) that mode i conflicts with.
    const TABLE: [&[usize]; 8] = [
        &[7],
        &[6, 7],
        &[4, 5, 6, 7],
        &[3, 4, 5, 6, 7],
        &[2, 3, 5, 6, 7],
        &[2, 3, 4, 5, 6, 7],
        &[1, 2, 3, 4, 5, 6, 7],
        &[0, 1, 2, 3, 4, 5, 6, 7],
    ];
    let index = |m: &str| MODES.iter().position(|x| *x == m);
    match (index(a), index(b)) {
        (Some(i), Some(j)) => TABLE[i].contains(&j),
        _ => false,
    }
}

/// What `ampd migrate impact` found.
#[derive(Debug, Clone, Serialize)]
pub struct Impact {
    /// The target database, redacted.
    pub target: String,
    /// Where the pending steps were measured, redacted.
    pub shadow: Option<String>,
    /// Whether the shadow was a temporary database created (and dropped) for this run.
    pub shadow_created: bool,
    /// The size from which a rewrite or scan under a lock that blocks writes is flagged.
    pub risky_size_bytes: u64,
    /// The pending steps, as `ampd migrate` would run them.
    pub steps: Vec<StepImpact>,
    /// How many statements are flagged.
    pub flagged: usize,
    /// Wall time of the whole measurement.
    pub elapsed_ms: u64,
}

/// One pending step.
#[derive(Debug, Clone, Serialize)]
pub struct StepImpact {
    /// Its number in the run (from 1).
    pub step: usize,
    /// How it runs.
    pub runs: StepKind,
    /// Its migrations.
    pub migrations: Vec<MigrationImpact>,
}

/// One pending migration.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationImpact {
    /// Its name.
    pub name: String,
    /// Each statement it sent, in order.
    pub statements: Vec<StatementImpact>,
}

/// What one statement did on the shadow, and what it meets on the target.
#[derive(Debug, Clone, Serialize)]
pub struct StatementImpact {
    /// The statement.
    pub sql: String,
    /// `transaction` (read after it, in its step's transaction) or `sampled` (from a second
    /// session while it ran outside a transaction).
    pub measured: &'static str,
    /// The table locks held after it (in a transaction: until the step commits).
    pub locks: Vec<LockHeld>,
    /// Tables it rewrote (their `relfilenode` changed).
    pub rewrites: Vec<String>,
    /// Tables it read in full without rewriting them.
    pub scans: Vec<String>,
    /// The target's estimates for the tables it locked.
    pub tables: Vec<TableSize>,
    /// Sessions on the target that would block it now.
    pub blockers: Vec<Blocker>,
    /// Why it is flagged (empty: not flagged).
    pub risky: Vec<String>,
}

/// A table lock the step's session held.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct LockHeld {
    /// `schema.table`.
    pub relation: String,
    /// PostgreSQL's name of the mode (`AccessExclusiveLock`).
    pub mode: String,
    /// Taken by this statement (else by an earlier one of its step, still held).
    pub taken_here: bool,
}

/// A table's size on the target, from `pg_class` (estimates kept by VACUUM and ANALYZE).
#[derive(Debug, Clone, Serialize)]
pub struct TableSize {
    /// `schema.table`.
    pub relation: String,
    /// `relpages * block_size`; `None` when the table is not on the target (yet).
    pub bytes: Option<u64>,
    /// `reltuples`; `None` when never vacuumed or analyzed, or not on the target.
    pub rows: Option<f64>,
}

/// A session on the target that a statement would wait behind.
#[derive(Debug, Clone, Serialize)]
pub struct Blocker {
    /// Its server process.
    pub pid: i32,
    /// Its `application_name`.
    pub application: String,
    /// Its state (`idle in transaction`, `active`).
    pub state: String,
    /// Seconds in that state.
    pub state_secs: f64,
    /// Seconds since its transaction began.
    pub transaction_secs: Option<f64>,
    /// Its last (or current) query.
    pub query: String,
    /// The table it holds a conflicting lock on, and the mode; `None` for an old snapshot.
    pub holds: Option<LockHeld>,
}

impl Blocker {
    /// "pid 4242 (psql), idle in transaction for 2 h 3 min, holding AccessShareLock on public.t".
    pub fn describe(&self) -> String {
        let app = if self.application.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.application)
        };
        let what = match &self.holds {
            Some(lock) => format!("holding {} on {}", lock.mode, lock.relation),
            None => "holding a snapshot older than the build".to_owned(),
        };
        format!(
            "pid {}{app}, {} for {}, {what}; its query: {}",
            self.pid,
            self.state,
            human_secs(self.state_secs),
            one_line(&self.query, 120)
        )
    }
}

impl Blocker {
    /// "pid 4242 (psql), idle in transaction for 2 h 3 min".
    pub fn short(&self) -> String {
        let app = if self.application.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.application)
        };
        format!(
            "pid {}{app}, {} for {}",
            self.pid,
            self.state,
            human_secs(self.state_secs)
        )
    }
}

impl Impact {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let statements: usize = self
            .steps
            .iter()
            .flat_map(|s| &s.migrations)
            .map(|m| m.statements.len())
            .sum();
        let migrations: usize = self.steps.iter().map(|s| s.migrations.len()).sum();
        if self.steps.is_empty() {
            let _ = writeln!(
                out,
                "ampd migrate impact: {}: nothing is pending",
                self.target
            );
            return out;
        }
        let _ = writeln!(
            out,
            "ampd migrate impact: {}: {migrations} pending migration(s), {statements} statement(s), \
             measured on {}{} in {} ms",
            self.target,
            self.shadow.as_deref().unwrap_or("(no shadow)"),
            if self.shadow_created {
                " (a temporary database, dropped)"
            } else {
                ""
            },
            self.elapsed_ms
        );
        for step in &self.steps {
            let _ = writeln!(out, "\nstep {}, {}", step.step, step.runs.describe());
            for m in &step.migrations {
                let _ = writeln!(out, "  {}", m.name);
                for s in &m.statements {
                    let _ = writeln!(out, "    {}", one_line(&s.sql, 160));
                    let locks: Vec<String> = s
                        .locks
                        .iter()
                        .map(|l| {
                            format!(
                                "{} {}{}",
                                l.relation,
                                l.mode,
                                if l.taken_here {
                                    ""
                                } else {
                                    " (held from earlier)"
                                }
                            )
                        })
                        .collect();
                    let _ = writeln!(
                        out,
                        "      locks ({}): {}",
                        s.measured,
                        if locks.is_empty() {
                            "no table lock".to_owned()
                        } else {
                            locks.join(", ")
                        }
                    );
                    let mut did = Vec::new();
                    did.extend(s.rewrites.iter().map(|t| format!("rewrites {t}")));
                    did.extend(s.scans.iter().map(|t| format!("scans {t}")));
                    if did.is_empty() {
                        did.push("no rewrite, no scan".to_owned());
                    }
                    let _ = writeln!(out, "      {}", did.join(", "));
                    for t in &s.tables {
                        let _ = writeln!(out, "      on the target: {}", t.describe());
                    }
                    for b in &s.blockers {
                        let _ = writeln!(out, "      would wait behind {}", b.describe());
                    }
                    for why in &s.risky {
                        let _ = writeln!(out, "      RISKY: {why}");
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "\n{} statement(s) flagged as risky (tables from {} up, and current blockers)",
            self.flagged,
            human_bytes(self.risky_size_bytes)
        );
        out
    }
}

impl TableSize {
    fn describe(&self) -> String {
        match (self.bytes, self.rows) {
            (None, _) => format!("{} does not exist yet", self.relation),
            (Some(bytes), Some(rows)) => format!(
                "{} ~{}, ~{} rows",
                self.relation,
                human_bytes(bytes),
                rows.round() as u64
            ),
            (Some(bytes), None) => format!(
                "{} ~{}, rows unknown (never vacuumed or analyzed)",
                self.relation,
                human_bytes(bytes)
            ),
        }
    }
}

fn one_line(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > max {
        let cut: String = line.chars().take(max).collect();
        format!("{cut}…")
    } else {
        line
    }
}

/// `52.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `2 h 3 min`, `4 min 5 s`, `12 s`.
pub fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// Where the shadow database comes from.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImpactOptions {
    /// Without `metadata_db.shadow_url`, create a temporary database on the target's server.
    pub create_shadow: bool,
}

/// Measures the pending migrations of `set` (see the module documentation).
pub async fn impact(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    options: ImpactOptions,
) -> Result<Impact, ImpactError> {
    let started = Instant::now();
    let target = Session::recording(Some(cfg))
        .await
        .map_err(ImpactError::from)?;
    let result = on_target(&target, cfg, set, options).await;
    target.close().await;
    let mut impact = result?;
    impact.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(impact)
}

async fn on_target(
    target: &Session,
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    options: ImpactOptions,
) -> Result<Impact, ImpactError> {
    let url = db::session_url(cfg).map_err(MigrateError::from)?;
    let state = state::read_checked(target).await?;
    let verdict = verify::check(set, &state)?;
    let plan = plan::plan(set, &state, &verdict);
    let risky_size_bytes = cfg.impact_risky_size_mb.saturating_mul(1024 * 1024);
    let mut impact = Impact {
        target: url.redacted(),
        shadow: None,
        shadow_created: false,
        risky_size_bytes,
        steps: Vec::new(),
        flagged: 0,
        elapsed_ms: 0,
    };
    if plan.steps.iter().all(|s| s.migrations.is_empty()) {
        return Ok(impact);
    }
    let shadow = Shadow::prepare(target, cfg, url, options).await?;
    impact.shadow = Some(shadow.url.redacted());
    impact.shadow_created = shadow.created;
    let measured = async {
        let conn = shadow.connect(cfg).await?;
        let recorder = Recorder::new(conn, cfg).await?;
        // The target's applied set, by the same migrations.
        for migration in set.migrations().filter(|m| state.row(m.name()).is_some()) {
            recorder.run(migration, uses_transaction(migration)).await?;
        }
        let mut steps = Vec::new();
        for (i, step) in plan.steps.iter().enumerate() {
            if step.migrations.is_empty() {
                continue;
            }
            let mut migrations = Vec::new();
            let sampler = match step.kind {
                StepKind::Alone => Some(shadow.connect(cfg).await?),
                StepKind::Transaction => None,
            };
            recorder
                .start(sampler, step.kind == StepKind::Transaction)
                .await?;
            for &migration in &step.migrations {
                recorder.run_measured(migration).await?;
                migrations.push((migration.name().to_owned(), recorder.take().await));
            }
            recorder.finish().await?;
            steps.push((i + 1, step.kind, migrations));
        }
        recorder.close().await;
        Ok::<_, ImpactError>(steps)
    }
    .await;
    shadow.finish(cfg).await;
    let measured = measured?;
    let now = TargetNow::read(target).await?;
    for (number, runs, migrations) in measured {
        let migrations = migrations
            .into_iter()
            .map(|(name, statements)| MigrationImpact {
                name,
                statements: statements
                    .into_iter()
                    .map(|m| now.judge(m, runs, risky_size_bytes, cfg))
                    .collect(),
            })
            .collect();
        impact.steps.push(StepImpact {
            step: number,
            runs,
            migrations,
        });
    }
    impact.flagged = impact
        .steps
        .iter()
        .flat_map(|s| &s.migrations)
        .flat_map(|m| &m.statements)
        .filter(|s| !s.risky.is_empty())
        .count();
    Ok(impact)
}

/// The shadow database: its URL, and whether it was created for this run.
struct Shadow {
    url: DatabaseUrl,
    created: bool,
    /// For a created shadow: the target's URL, to drop it from.
    admin: Option<DatabaseUrl>,
}

impl Shadow {
    async fn prepare(
        target: &Session,
        cfg: &MetadataDbConfig,
        target_url: &DatabaseUrl,
        options: ImpactOptions,
    ) -> Result<Shadow, ImpactError> {
        if let Some(url) = &cfg.shadow_url {
            let shadow = Shadow {
                url: url.clone(),
                created: false,
                admin: None,
            };
            let mut conn = shadow.connect(cfg).await?;
            let same = identity(&mut conn).await.map_err(|e| shadow.failed(e))?;
            if Some(same) == target_identity(target).await? {
                let _ = conn.close().await;
                return Err(ImpactError::ShadowIsTarget {
                    url: url.redacted(),
                });
            }
            let reset = "DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public";
            let result = sqlx::raw_sql(reset).execute(&mut conn).await;
            let _ = conn.close().await;
            result.map_err(|e| shadow.failed(e))?;
            return Ok(shadow);
        }
        if !options.create_shadow {
            return Err(ImpactError::NoShadow);
        }
        let name = format!(
            "ampd_impact_shadow_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        let mut parsed = url::Url::parse(target_url.expose()).map_err(|e| ImpactError::Shadow {
            url: target_url.redacted(),
            message: e.to_string(),
        })?;
        parsed.set_path(&format!("/{name}"));
        let url = DatabaseUrl::parse(parsed.as_str()).map_err(|message| ImpactError::Shadow {
            url: target_url.redacted(),
            message,
        })?;
        let shadow = Shadow {
            url,
            created: true,
            admin: Some(target_url.clone()),
        };
        let mut admin = db::connect_session(target_url, cfg, "ampd migrate impact (shadow)")
            .await
            .map_err(|e| shadow.failed(e))?;
        let result = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote_ident(&name)
        )))
        .execute(&mut admin)
        .await;
        let _ = admin.close().await;
        result.map_err(|e| ImpactError::Shadow {
            url: shadow.url.redacted(),
            message: format!(
                "CREATE DATABASE on the target's server failed ({}); --create-shadow needs the \
                 CREATEDB privilege, or set metadata_db.shadow_url",
                db_message(&e)
            ),
        })?;
        Ok(shadow)
    }

    fn failed(&self, e: impl std::fmt::Display) -> ImpactError {
        ImpactError::Shadow {
            url: self.url.redacted(),
            message: e.to_string(),
        }
    }

    async fn connect(&self, cfg: &MetadataDbConfig) -> Result<PgConnection, ImpactError> {
        db::connect_session(&self.url, cfg, "ampd migrate impact (shadow)")
            .await
            .map_err(|e| self.failed(e))
    }

    /// Drops a created shadow (its connections are closed by then).
    async fn finish(&self, cfg: &MetadataDbConfig) {
        let Some(admin) = &self.admin else { return };
        let Some(name) = self.url.database() else {
            return;
        };
        match db::connect_session(admin, cfg, "ampd migrate impact (shadow)").await {
            Ok(mut conn) => {
                let sql = format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&name)
                );
                if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                {
                    tracing::warn!(database = %name, error = %db_message(&e), "could not drop the temporary shadow database");
                }
                let _ = conn.close().await;
            }
            Err(e) => {
                tracing::warn!(database = %name, error = %e, "could not drop the temporary shadow database")
            }
        }
    }
}

fn db_message(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => d.message().to_owned(),
        None => e.to_string(),
    }
}

const IDENTITY_SQL: &str = "SELECT current_database()::text, pg_postmaster_start_time()::text, \
                            (SELECT oid::int8 FROM pg_database WHERE datname = current_database())";

async fn identity(conn: &mut PgConnection) -> Result<(String, String, i64), sqlx::Error> {
    let row = sqlx::raw_sql(IDENTITY_SQL).fetch_one(conn).await?;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

async fn target_identity(target: &Session) -> Result<Option<(String, String, i64)>, ImpactError> {
    let rows = target.read(IDENTITY_SQL).await.map_err(target_err)?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let get = || -> Result<_, DbErr> {
        Ok((
            row.try_get_by_index::<String>(0)?,
            row.try_get_by_index::<String>(1)?,
            row.try_get_by_index::<i64>(2)?,
        ))
    };
    get().map(Some).map_err(target_err)
}

fn target_err(e: DbErr) -> ImpactError {
    ImpactError::Target(describe(&e))
}

/// A user table of the shadow, as one statement saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rel {
    name: String,
    filenode: i64,
    seq_scan: i64,
}

/// What a statement did on the shadow, before the target is consulted.
#[derive(Debug, Clone, Default)]
struct Measured {
    sql: String,
    sampled: bool,
    locks: Vec<LockHeld>,
    rewrites: Vec<String>,
    scans: Vec<String>,
}

const RELS_SQL: &str = "SELECT c.oid::int8, quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
     c.relfilenode::int8, COALESCE(s.seq_scan, 0)::int8 \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN pg_stat_xact_user_tables s ON s.relid = c.oid \
     WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";

/// [`RELS_SQL`] with the cumulative counters, for a statement outside a transaction.
fn rels_flushed_sql() -> String {
    RELS_SQL.replace("pg_stat_xact_user_tables", "pg_stat_user_tables")
}

const MY_LOCKS_SQL: &str = "SELECT relation::int8, mode::text FROM pg_locks \
     WHERE pid = pg_backend_pid() AND locktype = 'relation' AND granted";

/// The state of one step being measured.
struct Step {
    /// A transaction step (else the step runs alone, sampled by `sampler`).
    transaction: bool,
    sampler: Option<PgConnection>,
    /// Locks held before the current statement (a transaction step's earlier statements).
    held: BTreeSet<(i64, String)>,
    statements: Vec<Measured>,
}

struct Wire {
    conn: Option<PgConnection>,
    pid: i32,
    depth: u32,
    step: Option<Step>,
    /// A failure SeaORM's proxy interface cannot return (a `BEGIN` it asked for).
    deferred: Option<DbErr>,
}

/// The shadow session: SeaORM's migrations send their statements through it, and inside a step
/// each statement is measured.
#[derive(Debug, Clone)]
struct Recorder {
    wire: Arc<tokio::sync::Mutex<Wire>>,
    limit: Duration,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowSession")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    async fn new(mut conn: PgConnection, cfg: &MetadataDbConfig) -> Result<Recorder, ImpactError> {
        let shadow_err = |e: sqlx::Error| ImpactError::Shadow {
            url: "(shadow)".to_owned(),
            message: db_message(&e),
        };
        sqlx::raw_sql("SET statement_timeout = 0")
            .execute(&mut conn)
            .await
            .map_err(shadow_err)?;
        // Statistics read when asked, not from a snapshot taken at the first read (PostgreSQL 15
        // or later; before it, every read is fresh outside a transaction).
        let _ = sqlx::raw_sql("SET stats_fetch_consistency = none")
            .execute(&mut conn)
            .await;
        let pid: i32 = sqlx::raw_sql(db::BACKEND_PID_SQL)
            .fetch_one(&mut conn)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(shadow_err)?;
        Ok(Recorder {
            wire: Arc::new(tokio::sync::Mutex::new(Wire {
                conn: Some(conn),
                pid,
                depth: 0,
                step: None,
                deferred: None,
            })),
            limit: Duration::from_secs(cfg.migration_statement_timeout_secs.max(1)),
        })
    }

    async fn seaorm(&self) -> Result<DatabaseConnection, DbErr> {
        let proxy: Arc<Box<dyn ProxyDatabaseTrait>> = Arc::new(Box::new(self.clone()));
        sea_orm::Database::connect_proxy(DatabaseBackend::Postgres, proxy).await
    }

    async fn plain(&self, sql: &str) -> Result<(), DbErr> {
        let mut wire = self.wire.lock().await;
        let conn = wire.conn.as_mut().ok_or_else(lost)?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(conn)
            .await
            .map(|_| ())
            .map_err(exec_err)
    }

    /// Runs `migration` unmeasured (bringing the shadow to the target's applied set).
    async fn run(
        &self,
        migration: &dyn MigrationTrait,
        transaction: bool,
    ) -> Result<(), ImpactError> {
        let failed = |e: DbErr| ImpactError::ShadowMigration {
            name: migration.name().to_owned(),
            message: describe(&e),
        };
        if transaction {
            self.begin().await.map_err(failed)?;
        }
        self.up(migration).await.map_err(failed)?;
        if transaction {
            self.end(true).await.map_err(failed)?;
        }
        Ok(())
    }

    async fn up(&self, migration: &dyn MigrationTrait) -> Result<(), DbErr> {
        let conn = self.seaorm().await?;
        migration.up(&SchemaManager::new(&conn)).await?;
        match self.wire.lock().await.deferred.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn begin(&self) -> Result<(), DbErr> {
        self.plain("BEGIN").await?;
        self.wire.lock().await.depth = 1;
        Ok(())
    }

    async fn end(&self, commit: bool) -> Result<(), DbErr> {
        let result = self.plain(if commit { "COMMIT" } else { "ROLLBACK" }).await;
        self.wire.lock().await.depth = 0;
        result
    }

    /// Starts measuring a step (a transaction step opens its transaction).
    async fn start(
        &self,
        sampler: Option<PgConnection>,
        transaction: bool,
    ) -> Result<(), ImpactError> {
        if transaction {
            self.begin()
                .await
                .map_err(|e| ImpactError::ShadowMigration {
                    name: "the step's BEGIN".to_owned(),
                    message: describe(&e),
                })?;
        }
        self.wire.lock().await.step = Some(Step {
            transaction,
            sampler,
            held: BTreeSet::new(),
            statements: Vec::new(),
        });
        Ok(())
    }

    async fn run_measured(&self, migration: &dyn MigrationTrait) -> Result<(), ImpactError> {
        self.up(migration)
            .await
            .map_err(|e| ImpactError::ShadowMigration {
                name: migration.name().to_owned(),
                message: describe(&e),
            })
    }

    /// The statements measured since the last call.
    async fn take(&self) -> Vec<Measured> {
        let mut wire = self.wire.lock().await;
        wire.step
            .as_mut()
            .map(|s| std::mem::take(&mut s.statements))
            .unwrap_or_default()
    }

    /// Ends the step: commits its transaction, closes its sampler.
    async fn finish(&self) -> Result<(), ImpactError> {
        let step = self.wire.lock().await.step.take();
        if let Some(step) = step {
            if let Some(sampler) = step.sampler {
                let _ = sampler.close().await;
            }
            if step.transaction {
                self.end(true)
                    .await
                    .map_err(|e| ImpactError::ShadowMigration {
                        name: "the step's COMMIT".to_owned(),
                        message: describe(&e),
                    })?;
            }
        }
        Ok(())
    }

    async fn close(&self) {
        if let Some(conn) = self.wire.lock().await.conn.take() {
            let _ = conn.close().await;
        }
    }

    /// Sends `statement`, measuring it inside a step; its rows.
    async fn send(&self, statement: Statement) -> Result<(Vec<ProxyRow>, u64), DbErr> {
        let mut wire = self.wire.lock().await;
        if let Some(e) = wire.deferred.take() {
            return Err(e);
        }
        let wire = &mut *wire;
        let Some(step) = wire.step.as_mut() else {
            let conn = wire.conn.as_mut().ok_or_else(lost)?;
            return within(self.limit, execute(conn, statement)).await;
        };
        let conn = wire.conn.as_mut().ok_or_else(lost)?;
        let sql = display(&statement);
        if step.transaction {
            let before = rels(conn, RELS_SQL).await?;
            let result = within(self.limit, execute(conn, statement)).await?;
            let after = rels(conn, RELS_SQL).await?;
            let locks = my_locks(conn).await?;
            let measured = compare(sql, &before, &after, &locks, &step.held, false);
            step.held = locks;
            step.statements.push(measured);
            Ok(result)
        } else {
            force_flush(conn).await?;
            let before = rels(conn, &rels_flushed_sql()).await?;
            let sampler = step.sampler.as_mut().ok_or_else(lost)?;
            sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
                .execute(&mut *sampler)
                .await
                .map_err(exec_err)?;
            let done = AtomicBool::new(false);
            let pid = wire.pid;
            let run = async {
                let result = within(self.limit, execute(conn, statement)).await;
                done.store(true, Ordering::SeqCst);
                result
            };
            let (result, sampled) = tokio::join!(run, sample(sampler, pid, &done));
            let result = result?;
            let sampled = sampled?;
            let conn = wire.conn.as_mut().ok_or_else(lost)?;
            force_flush(conn).await?;
            let after = rels(conn, &rels_flushed_sql()).await?;
            let measured = compare(sql, &before, &after, &sampled, &BTreeSet::new(), true);
            step.statements.push(measured);
            Ok(result)
        }
    }
}

fn lost() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(
        "the shadow session's connection is closed".into(),
    ))
}

async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, DbErr>>,
) -> Result<T, DbErr> {
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(DbErr::Conn(RuntimeErr::Internal(format!(
            "no answer from the shadow database within {} s",
            limit.as_secs()
        )))),
    }
}

async fn execute(
    conn: &mut PgConnection,
    statement: Statement,
) -> Result<(Vec<ProxyRow>, u64), DbErr> {
    let rows = fetch_all(conn, statement).await.map_err(exec_err)?;
    let n = rows.len() as u64;
    let rows = rows.into_iter().map(proxy_row).collect::<Result<_, _>>()?;
    Ok((rows, n))
}

async fn force_flush(conn: &mut PgConnection) -> Result<(), DbErr> {
    // The session's pending statistics reach the shared counters when it next goes idle
    // (PostgreSQL 15 or later; before it they are sent at the end of each transaction, at most
    // every half second, so a scan outside a transaction may then go unseen).
    let _ = sqlx::raw_sql("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await;
    sqlx::raw_sql("SELECT 1")
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(exec_err)
}

async fn rels(conn: &mut PgConnection, sql: &str) -> Result<BTreeMap<i64, Rel>, DbErr> {
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(conn)
        .await
        .map_err(exec_err)?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<i64, _>(0)?,
                Rel {
                    name: r.try_get(1)?,
                    filenode: r.try_get(2)?,
                    seq_scan: r.try_get(3)?,
                },
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(exec_err)
}

async fn my_locks(conn: &mut PgConnection) -> Result<BTreeSet<(i64, String)>, DbErr> {
    let rows = sqlx::raw_sql(MY_LOCKS_SQL)
        .fetch_all(conn)
        .await
        .map_err(exec_err)?;
    rows.iter()
        .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<String, _>(1)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(exec_err)
}

/// Samples the relation locks of server process `pid` until the statement is done; when the
/// statement waits for the sampler's snapshot (a concurrent index build does, before it ends), the
/// sample is complete and the sampler lets it go.
async fn sample(
    sampler: &mut PgConnection,
    pid: i32,
    done: &AtomicBool,
) -> Result<BTreeSet<(i64, String)>, DbErr> {
    let sql = format!(
        "SELECT relation::int8, mode::text, granted, locktype::text FROM pg_locks WHERE pid = {pid}"
    );
    let mut seen = BTreeSet::new();
    let mut open = true;
    let started = Instant::now();
    while !done.load(Ordering::SeqCst) {
        if open {
            let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .fetch_all(&mut *sampler)
                .await
                .map_err(exec_err)?;
            let mut waits_for_snapshot = false;
            for r in &rows {
                let locktype: String = r.try_get(3).map_err(exec_err)?;
                let granted: bool = r.try_get(2).map_err(exec_err)?;
                if locktype == "relation" && granted {
                    let rel: Option<i64> = r.try_get(0).map_err(exec_err)?;
                    let mode: String = r.try_get(1).map_err(exec_err)?;
                    seen.extend(rel.map(|rel| (rel, mode)));
                } else if !granted && (locktype == "virtualxid" || locktype == "transactionid") {
                    waits_for_snapshot = true;
                }
            }
            // Never hold the statement longer than a moment after it began to wait for us.
            if waits_for_snapshot || started.elapsed() > Duration::from_secs(30) {
                sqlx::raw_sql("COMMIT")
                    .execute(&mut *sampler)
                    .await
                    .map_err(exec_err)?;
                open = false;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if open {
        sqlx::raw_sql("COMMIT")
            .execute(&mut *sampler)
            .await
            .map_err(exec_err)?;
    }
    Ok(seen)
}

/// What changed between `before` and `after`, with the table locks `locks` held after the
/// statement (`held` before it).
fn compare(
    sql: String,
    before: &BTreeMap<i64, Rel>,
    after: &BTreeMap<i64, Rel>,
    locks: &BTreeSet<(i64, String)>,
    held: &BTreeSet<(i64, String)>,
    sampled: bool,
) -> Measured {
    let mut rewrites = Vec::new();
    let mut scans = Vec::new();
    for (oid, old) in before {
        let Some(new) = after.get(oid) else { continue };
        if new.filenode != old.filenode && old.filenode != 0 {
            rewrites.push(new.name.clone());
        } else if new.seq_scan > old.seq_scan {
            scans.push(new.name.clone());
        }
    }
    let mut locks: Vec<LockHeld> = locks
        .iter()
        // Tables that existed before the statement (a new one is no other session's concern).
        .filter_map(|(oid, mode)| {
            let rel = before.get(oid)?;
            Some(LockHeld {
                relation: rel.name.clone(),
                mode: mode.clone(),
                taken_here: !held.contains(&(*oid, mode.clone())),
            })
        })
        .collect();
    locks.sort();
    Measured {
        sql,
        sampled,
        locks,
        rewrites,
        scans,
    }
}

/// The target now: its tables' sizes, its sessions' locks and snapshots.
struct TargetNow {
    sizes: BTreeMap<String, (u64, Option<f64>)>,
    locks: Vec<(String, String, Blocker)>,
    snapshots: Vec<Blocker>,
}

const SIZES_SQL: &str = "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
     c.relpages::int8 * current_setting('block_size')::int8, c.reltuples::float8 \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";

const SESSION_COLUMNS: &str = "a.pid, COALESCE(a.application_name, '')::text, \
     COALESCE(a.state, '')::text, \
     EXTRACT(EPOCH FROM now() - COALESCE(a.state_change, a.backend_start))::float8, \
     EXTRACT(EPOCH FROM now() - a.xact_start)::float8, COALESCE(a.query, '')::text";

fn locks_sql() -> String {
    format!(
        "SELECT {SESSION_COLUMNS}, quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
         l.mode::text \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid() \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND c.relkind IN ('r', 'p', 'm')"
    )
}

fn snapshots_sql() -> String {
    format!(
        "SELECT {SESSION_COLUMNS} FROM pg_stat_activity a \
         WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
         AND a.backend_xmin IS NOT NULL AND a.backend_type = 'client backend'"
    )
}

fn blocker(row: &sea_orm::QueryResult) -> Result<Blocker, DbErr> {
    Ok(Blocker {
        pid: row.try_get_by_index(0)?,
        application: row.try_get_by_index(1)?,
        state: row.try_get_by_index(2)?,
        state_secs: row.try_get_by_index(3)?,
        transaction_secs: row.try_get_by_index(4)?,
        query: row.try_get_by_index(5)?,
        holds: None,
    })
}

impl TargetNow {
    async fn read(target: &Session) -> Result<TargetNow, ImpactError> {
        let mut sizes = BTreeMap::new();
        for row in target.read(SIZES_SQL).await.map_err(target_err)? {
            let name: String = row.try_get_by_index(0).map_err(target_err)?;
            let bytes: i64 = row.try_get_by_index(1).map_err(target_err)?;
            let rows: f64 = row.try_get_by_index(2).map_err(target_err)?;
            sizes.insert(name, (bytes.max(0) as u64, (rows >= 0.0).then_some(rows)));
        }
        let mut locks = Vec::new();
        for row in target.read(&locks_sql()).await.map_err(target_err)? {
            let relation: String = row.try_get_by_index(6).map_err(target_err)?;
            let mode: String = row.try_get_by_index(7).map_err(target_err)?;
            locks.push((relation, mode, blocker(&row).map_err(target_err)?));
        }
        let snapshots = target
            .read(&snapshots_sql())
            .await
            .map_err(target_err)?
            .iter()
            .map(blocker)
            .collect::<Result<_, _>>()
            .map_err(target_err)?;
        Ok(TargetNow {
            sizes,
            locks,
            snapshots,
        })
    }

    /// The statement measured as `m`, joined with the target and judged.
    fn judge(
        &self,
        m: Measured,
        runs: StepKind,
        risky_size: u64,
        cfg: &MetadataDbConfig,
    ) -> StatementImpact {
        let mut tables = Vec::new();
        let mut risky = Vec::new();
        let mut blockers: Vec<Blocker> = Vec::new();
        let names: BTreeSet<&str> = m.locks.iter().map(|l| l.relation.as_str()).collect();
        for name in &names {
            let size = self.sizes.get(*name);
            tables.push(TableSize {
                relation: (*name).to_owned(),
                bytes: size.map(|s| s.0),
                rows: size.and_then(|s| s.1),
            });
            let blocking: Vec<&str> = m
                .locks
                .iter()
                .filter(|l| l.relation == *name && WRITE_BLOCKING.contains(&l.mode.as_str()))
                .map(|l| l.mode.as_str())
                .collect();
            let heavy = blocking
                .iter()
                .max_by_key(|mode| MODES.iter().position(|x| x == *mode));
            let did = if m.rewrites.iter().any(|t| t == name) {
                Some("rewrites")
            } else if m.scans.iter().any(|t| t == name) {
                Some("scans")
            } else {
                None
            };
            if let (Some(did), Some(mode), Some((bytes, rows))) = (did, heavy, size)
                && *bytes >= risky_size
            {
                let waits = if *mode == "AccessExclusiveLock" {
                    "reads and writes of it wait"
                } else {
                    "writes to it wait"
                };
                risky.push(format!(
                    "{did} {name} (~{}, ~{} rows) under {mode}: {waits} until the step ends",
                    human_bytes(*bytes),
                    rows.map_or("?".to_owned(), |r| (r.round() as u64).to_string())
                ));
            }
            // Who would block the locks this statement takes.
            for lock in m
                .locks
                .iter()
                .filter(|l| l.relation == *name && l.taken_here)
            {
                for (relation, mode, session) in &self.locks {
                    let conflict = conflicts(&lock.mode, mode)
                        // A concurrent index build also waits for the table's writers.
                        || (m.sampled && conflicts("ShareLock", mode));
                    if relation == *name
                        && conflict
                        && !blockers.iter().any(|b| b.pid == session.pid)
                    {
                        let mut b = session.clone();
                        b.holds = Some(LockHeld {
                            relation: relation.clone(),
                            mode: mode.clone(),
                            taken_here: false,
                        });
                        blockers.push(b);
                    }
                }
            }
        }
        // Outside a transaction an index build waits for every older snapshot of the database.
        if runs == StepKind::Alone && m.sampled && !m.locks.is_empty() {
            for session in &self.snapshots {
                if !blockers.iter().any(|b| b.pid == session.pid) {
                    blockers.push(session.clone());
                }
            }
        }
        for b in &blockers {
            let bound = match runs {
                StepKind::Transaction => format!(
                    "a run would wait up to ddl_lock_timeout_ms ({} ms), queueing every \
                     conflicting query behind it, then fail",
                    cfg.ddl_lock_timeout_ms
                ),
                StepKind::Alone => format!(
                    "a run would wait up to concurrent_index_timeout_secs ({} s), then fail",
                    cfg.concurrent_index_timeout_secs
                ),
            };
            risky.push(format!("would wait behind {}; {bound}", b.short()));
        }
        StatementImpact {
            sql: m.sql,
            measured: if m.sampled { "sampled" } else { "transaction" },
            locks: m.locks,
            rewrites: m.rewrites,
            scans: m.scans,
            tables,
            blockers,
            risky,
        }
    }
}

// Statements with parameters are prepared and bound; those without are sent as they are.
#[async_trait::async_trait]
impl ProxyDatabaseTrait for Recorder {
    async fn query(&self, statement: Statement) -> Result<Vec<ProxyRow>, DbErr> {
        self.send(statement).await.map(|(rows, _)| rows)
    }

    async fn execute(&self, statement: Statement) -> Result<ProxyExecResult, DbErr> {
        self.send(statement)
            .await
            .map(|(_, n)| ProxyExecResult::new(0, n))
    }

    async fn begin(&self) {
        let mut wire = self.wire.lock().await;
        let sql = if wire.depth == 0 {
            "BEGIN".to_owned()
        } else {
            format!("SAVEPOINT ampd_impact_{}", wire.depth)
        };
        wire.depth += 1;
        level(&mut wire, sql).await;
    }

    async fn commit(&self) {
        end_level(&self.wire, true).await;
    }

    async fn rollback(&self) {
        end_level(&self.wire, false).await;
    }
}

async fn end_level(wire: &tokio::sync::Mutex<Wire>, commit: bool) {
    let mut wire = wire.lock().await;
    if wire.depth == 0 {
        return;
    }
    let sql = match (wire.depth, commit) {
        (1, true) => "COMMIT".to_owned(),
        (1, false) => "ROLLBACK".to_owned(),
        (d, true) => format!("RELEASE SAVEPOINT ampd_impact_{}", d - 1),
        (d, false) => format!("ROLLBACK TO SAVEPOINT ampd_impact_{}", d - 1),
    };
    wire.depth -= 1;
    level(&mut wire, sql).await;
}

async fn level(wire: &mut Wire, sql: String) {
    let Some(conn) = wire.conn.as_mut() else {
        wire.deferred.get_or_insert_with(lost);
        return;
    };
    if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(conn).await {
        wire.deferred.get_or_insert(exec_err(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_conflicts_follow_postgresql() {
        assert!(conflicts("AccessExclusiveLock", "AccessShareLock"));
        assert!(!conflicts("ShareUpdateExclusiveLock", "AccessShareLock"));
        assert!(!conflicts("ShareUpdateExclusiveLock", "RowExclusiveLock"));
        assert!(conflicts(
            "ShareUpdateExclusiveLock",
            "ShareUpdateExclusiveLock"
        ));
        assert!(conflicts("ShareLock", "RowExclusiveLock"));
        assert!(!conflicts("ShareLock", "ShareLock"));
        // Symmetric.
        for a in MODES {
            for b in MODES {
                assert_eq!(conflicts(a, b), conflicts(b, a), "{a} / {b}");
            }
        }
    }

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(52 * 1024 * 1024), "52.0 MiB");
        assert_eq!(human_secs(7380.0), "2 h 3 min");
        assert_eq!(human_secs(12.4), "12 s");
    }
}
