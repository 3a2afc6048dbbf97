//! `ampd migrate --dry-run`: what a run would send, in order, with nothing sent that changes
//! anything. It is a run on a recording session (see [`super::recording`]): the statements that only read
//! (the applied set, the look for leftovers, the session check) are run, so the plan is the one a
//! real run would make now; the lock, the settings, the bookkeeping and every migration statement
//! are only written down.

use std::fmt::Write as _;

use serde::Serialize;

use super::apply;
use super::error::MigrateError;
use super::plan::{Bookkeeping, Plan, Step, StepKind};
use super::run;
use super::session::{Line, Session};
use super::set::{MigrationSet, uses_transaction};
use crate::config::MetadataDbConfig;

/// What a run would send, in order.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// What the script is about.
    pub title: String,
    /// Each statement (with its remark) and each comment, in order.
    pub lines: Vec<ScriptLine>,
}

/// A line of a dry run's script.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScriptLine {
    /// A statement, as sent (parameters in place), and what is said about it.
    Sql {
        /// The statement, without its final `;`.
        sql: String,
        /// A remark.
        note: Option<String>,
    },
    /// A comment.
    Note(String),
}

impl DryRun {
    fn new(title: String, lines: Vec<Line>) -> DryRun {
        let lines = lines
            .into_iter()
            .map(|line| match line {
                Line::Sql { sql, note } => ScriptLine::Sql { sql, note },
                Line::Note(note) => ScriptLine::Note(note),
            })
            .collect();
        DryRun { title, lines }
    }

    /// The statements, in order.
    pub fn statements(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                ScriptLine::Sql { sql, .. } => Some(sql.as_str()),
                ScriptLine::Note(_) => None,
            })
            .collect()
    }

    /// A script a person can read (and `psql` or a linter can parse): one statement per line,
    /// ending in `;`, remarks as `--` comments.
    pub fn script(&self) -> String {
        let mut out = String::new();
        for line in self.title.lines() {
            let _ = writeln!(out, "-- {line}");
        }
        for line in &self.lines {
            match line {
                ScriptLine::Sql { sql, note } => {
                    if let Some(note) = note {
                        let _ = writeln!(out, "-- {}", one_line(note));
                    }
                    let _ = writeln!(out, "{sql};");
                }
                ScriptLine::Note(note) => {
                    let _ = writeln!(out, "-- {}", one_line(note));
                }
            }
        }
        out
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What `ampd migrate` would send to the database now, in order, sending only what reads.
pub async fn dry_run(cfg: &MetadataDbConfig, set: &MigrationSet) -> Result<DryRun, MigrateError> {
    let session = Session::recording(Some(cfg)).await?;
    let result = run(&session, cfg, set, apply::Replan::UnderFirstLock).await;
    session.close().await;
    result?;
    Ok(DryRun::new(
        format!(
            "ampd migrate --dry-run: what a run would send to {}, in order, on one session. The \
             statements that only read were run; nothing else was sent.",
            cfg.session_url()
                .map_or_else(|| "(no url)".to_owned(), |url| url.redacted())
        ),
        session.script(),
    ))
}

/// What a run sends for migration `name` alone, as the step it would be, without contacting any
/// database: the session settings, the step's statements and its records (for review and linting).
pub async fn dry_run_one(
    cfg: &MetadataDbConfig,
    set: &MigrationSet,
    name: &str,
) -> Result<DryRun, MigrateError> {
    let migration = set
        .find(name)
        .ok_or_else(|| MigrateError::UnknownMigration {
            name: name.to_owned(),
        })?;
    let session = Session::recording(None).await?;
    let plan = Plan {
        steps: vec![Step {
            kind: if uses_transaction(migration) {
                StepKind::Transaction
            } else {
                StepKind::Alone
            },
            migrations: vec![migration],
            bookkeeping: false,
        }],
        bookkeeping: Bookkeeping::default(),
    };
    apply::apply(&session, cfg, set, &plan, apply::Replan::Never).await?;
    Ok(DryRun::new(
        format!(
            "ampd migrate --dry-run --only {name}: the statements a run sends for this migration, \
             as the step it is (no database was contacted)"
        ),
        session.script(),
    ))
}
