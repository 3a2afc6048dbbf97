//! Planning a run: the pending migrations in order, cut into steps. Consecutive migrations that run
//! in a transaction form one step, applied all or nothing; a migration that opts out of the
//! transaction (`use_transaction() == Some(false)`, e.g. to build an index concurrently) is a step
//! of its own, run outside any transaction. The bookkeeping (creating or upgrading ampd's tables,
//! recording migrations applied by SeaORM's CLI) goes into the first transaction, or a transaction
//! of its own when the run starts with a migration that runs alone.

use migration::MigrationTrait;
use serde::Serialize;

use super::set::{MigrationSet, uses_transaction};
use super::state::DbState;
use super::verify::Verdict;

/// How a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// In one transaction with the other migrations of its step: all or nothing.
    Transaction,
    /// Alone, outside any transaction.
    Alone,
}

impl StepKind {
    /// How the plan is shown to people.
    pub fn describe(self) -> &'static str {
        match self {
            StepKind::Transaction => "in one transaction",
            StepKind::Alone => "alone, outside a transaction",
        }
    }
}

/// One step of a run.
#[derive(Clone)]
pub(super) struct Step<'a> {
    pub kind: StepKind,
    pub migrations: Vec<&'a dyn MigrationTrait>,
    /// This step also does the run's bookkeeping (always a transaction step).
    pub bookkeeping: bool,
}

/// What the bookkeeping of a run does besides recording the migrations it applies.
#[derive(Debug, Clone, Default)]
pub(super) struct Bookkeeping {
    /// `seaql_migrations` is missing.
    pub create_seaql: bool,
    /// `ampd_migrations` is missing.
    pub create_history: bool,
    /// `ampd_migrations` has the layout of an older ampd.
    pub upgrade_history: bool,
    /// Applied migrations without an ampd record, recorded now.
    pub adopt: Vec<String>,
}

impl Bookkeeping {
    fn is_empty(&self) -> bool {
        !self.create_seaql && !self.create_history && !self.upgrade_history && self.adopt.is_empty()
    }
}

/// A run's plan.
#[derive(Clone)]
pub(super) struct Plan<'a> {
    pub steps: Vec<Step<'a>>,
    pub bookkeeping: Bookkeeping,
}

/// The migrations of `set` that `state` has not applied, in order.
pub(super) fn pending<'a>(set: &'a MigrationSet, state: &DbState) -> Vec<&'a dyn MigrationTrait> {
    set.migrations()
        .filter(|m| state.row(m.name()).is_none())
        .collect()
}

/// `pending` cut into steps.
pub(super) fn steps<'a>(pending: &[&'a dyn MigrationTrait]) -> Vec<Step<'a>> {
    let mut steps: Vec<Step<'a>> = Vec::new();
    for &migration in pending {
        let kind = if uses_transaction(migration) {
            StepKind::Transaction
        } else {
            StepKind::Alone
        };
        match steps.last_mut() {
            Some(step) if kind == StepKind::Transaction && step.kind == StepKind::Transaction => {
                step.migrations.push(migration)
            }
            _ => steps.push(Step {
                kind,
                migrations: vec![migration],
                bookkeeping: false,
            }),
        }
    }
    steps
}

/// The plan for `state` (already verified, with `verdict`). Empty when there is nothing to do.
pub(super) fn plan<'a>(set: &'a MigrationSet, state: &DbState, verdict: &Verdict) -> Plan<'a> {
    let mut steps = steps(&pending(set, state));
    let bookkeeping = Bookkeeping {
        create_seaql: !state.has_seaql,
        create_history: !state.has_history,
        upgrade_history: state.has_history && !state.history_current,
        adopt: verdict.unrecorded.clone(),
    };
    if steps.is_empty() && bookkeeping.adopt.is_empty() {
        // Nothing pending: the tables are left as they are (a read-only run).
        return Plan {
            steps,
            bookkeeping: Bookkeeping::default(),
        };
    }
    if !bookkeeping.is_empty() {
        match steps.first_mut() {
            Some(first) if first.kind == StepKind::Transaction => first.bookkeeping = true,
            _ => steps.insert(
                0,
                Step {
                    kind: StepKind::Transaction,
                    migrations: Vec::new(),
                    bookkeeping: true,
                },
            ),
        }
    }
    Plan { steps, bookkeeping }
}

/// For each pending migration of `set`, its step number (from 1) and how the step runs, as a run
/// would plan them now.
pub(super) fn pending_steps(set: &MigrationSet, state: &DbState) -> Vec<(String, usize, StepKind)> {
    let verdict = Verdict {
        unrecorded: state
            .applied
            .iter()
            .filter(|r| r.checksum.is_none())
            .map(|r| r.version.clone())
            .collect(),
    };
    plan(set, state, &verdict)
        .steps
        .iter()
        .enumerate()
        .flat_map(|(i, step)| {
            step.migrations
                .iter()
                .map(move |m| (m.name().to_owned(), i + 1, step.kind))
        })
        .collect()
}
