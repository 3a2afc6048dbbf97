//! Bringing the metadata database up to date: the one entry point shared by `ampd migrate` and by
//! services that migrate on startup.
//!
//! A run ([`migrate`], the steps in [`run`]):
//! 1. connects the migration session: one connection to `metadata_db.direct_url` (default `url`),
//!    held until the end, every statement with a client-side deadline ([`session`]);
//! 2. reads the applied set and validates it against this binary ([`state`], [`verify`]): an
//!    applied migration this binary does not know, or a recorded checksum that does not match
//!    (computed with the algorithm it was recorded with), is refused. With nothing to do it stops
//!    here, after one query;
//! 3. plans the pending migrations into steps ([`plan`]) and checks, before the first step, all
//!    that can refuse the run: leftovers of the steps that run alone, the bookkeeping privileges,
//!    and, when a step must run alone, that the session is one of its own ([`preflight`]);
//! 4. runs the steps ([`apply`]): each takes the advisory lock [`LOCK_KEY`] for itself, asking with
//!    backoff for at most `migration_lock_timeout_secs` and holding nothing while it waits
//!    ([`lock`]); a transaction step takes it for its transaction and sets its settings with
//!    `SET LOCAL`, so nothing outlives it on a pooled connection; a step that runs alone takes it
//!    on the session and releases it after. Under the lock each step reads and validates the
//!    applied set again (another run may have migrated meanwhile), plans, and applies, recording
//!    each migration in the step that applied it ([`record`]).
//!
//! "All or nothing" holds per step: consecutive migrations that run in a transaction are applied in
//! one transaction, so a failure in any of them leaves the database as the previous step left it.
//! A migration that opts out of the transaction runs alone and is recorded only after it succeeded;
//! what an interrupted one leaves behind is found by the next run ([`leftovers`]). The first failure
//! stops the run; steps committed before it stay applied and recorded. A killed run loses its
//! session, and the server rolls back its open step and releases its lock.

mod accept;
mod apply;
mod baseline;
mod catalog;
mod compat;
mod dry_run;
mod error;
mod impact;
mod leftovers;
mod live;
mod lock;
mod order;
mod plan;
mod preflight;
mod record;
mod recording;
mod session;
mod set;
mod state;
mod status;
mod validate;
mod verify;

use std::time::{Duration, Instant};

use serde::Serialize;

pub use accept::{Accepted, accept_checksum};
pub use apply::Applied;
pub use baseline::{Baselined, baseline};
pub use compat::{ServiceStart, migrate_for_service, verify_for_service, warn_newer};
pub use dry_run::{DryRun, dry_run, dry_run_one};
pub use error::{MigrateError, quote_ident, quote_literal};
pub use impact::{Impact, ImpactError, ImpactOptions, impact};
pub use plan::StepKind;
pub use record::HISTORY_TABLE;
pub use set::{AMPD_VERSION, MigrationSet};
pub use state::{BaselineRecord, ChecksumChange};
pub use status::{MigrationState, status};
pub use validate::{Check, Validation, validate};

use crate::config::MetadataDbConfig;
use apply::Done;
use session::Session;

/// The advisory lock serialising migration runs (`"ampdmigr"` as a big-endian i64). Data-access
/// locks use the two-key form of the advisory lock functions and never collide with it.
pub const LOCK_KEY: i64 = 0x616d_7064_6d69_6772;

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// Migrations applied, in order (empty when the schema was up to date).
    pub applied: Vec<Applied>,
    /// Applied migrations that had no ampd record (applied by SeaORM's CLI) and were recorded now.
    pub adopted: Vec<String>,
    /// Wall time of the whole run, connecting included.
    pub elapsed: Duration,
    /// The newest applied migration after the run.
    pub version: Option<String>,
}

impl MigrateReport {
    /// The run's last line: what was done and where the schema is now.
    pub fn summary(&self) -> String {
        let version = self.version.as_deref().unwrap_or("(none)");
        if self.applied.is_empty() {
            format!("schema is up to date (version {version})")
        } else {
            format!(
                "applied {} migration{} in {} ms; schema at version {version}",
                self.applied.len(),
                if self.applied.len() == 1 { "" } else { "s" },
                self.elapsed.as_millis()
            )
        }
    }
}

/// What [`run`] did, before it is timed.
struct Outcome {
    done: Done,
    version: Option<String>,
}

/// Connects the migration session and brings the database up to date with `set`.
pub async fn migrate(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
) -> Result<MigrateReport, MigrateError> {
    let started = Instant::now();
    let session = Session::live(cfg).await?;
    let result = run(&session, cfg, set, apply::Replan::UnderEachLock).await;
    session.close().await;
    let outcome = result?;
    Ok(MigrateReport {
        applied: outcome.done.applied,
        adopted: outcome.done.adopted,
        elapsed: started.elapsed(),
        version: outcome.version,
    })
}

/// A run on `session` (a live one, or a dry run's recording, which sends nothing that changes
/// anything), planning again as `replan` says.
async fn run(
    session: &Session,
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    replan: apply::Replan,
) -> Result<Outcome, MigrateError> {
    // Read and validate without the lock: with nothing to do, that was the run's one query.
    let state = state::read_checked(session).await?;
    let verdict = verify::check(set, &state)?;
    if let Some(late) = order::check(set, &state, cfg.allow_out_of_order)? {
        let text = format!(
            "applying {} out of order (allowed): older than {}, the newest applied migration",
            late.pending.join(", "),
            late.newest
        );
        session.tell(session::Event::OutOfOrder(&text));
    }
    let plan = plan::plan(set, &state, &verdict);
    if plan.steps.is_empty() {
        session.note("schema is up to date: nothing would run");
        return Ok(Outcome {
            done: Done::default(),
            version: state.version(set.names().into_iter()),
        });
    }
    // Everything that can refuse the run, while nothing has changed.
    preflight::check(session, cfg, &plan).await?;
    // The steps, each under the lock, each planned again under it.
    let done = apply::apply(session, cfg, set, &plan, replan).await?;
    let version = set
        .names()
        .into_iter()
        .rev()
        .find(|name| state.row(name).is_some() || done.applied.iter().any(|a| a.name == *name))
        .map(str::to_owned);
    Ok(Outcome { done, version })
}
