//! `ampd migrate`: apply pending migrations and exit; `ampd migrate status`; `--dry-run`;
//! `ampd migrate accept-checksum`; `ampd migrate validate`; `ampd migrate baseline`;
//! `ampd migrate impact`.

use std::io::Write as _;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::migrate::{self, MigrationSet};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Print what a run would send, in order (the lock, the settings, the bookkeeping, every
    /// migration's statements, the records), sending only the statements that read. Shows which
    /// pending migrations run together in one transaction and which run alone.
    #[arg(long)]
    dry_run: bool,

    /// With --dry-run: only the statements of this migration, as the step a run makes of it,
    /// without contacting the database (for review and linting).
    #[arg(long, value_name = "MIGRATION", requires = "dry_run")]
    only: Option<String>,

    /// Apply pending migrations older than the newest applied one (merged late) instead of
    /// refusing the run; for this run only (metadata_db.allow_out_of_order for every run).
    #[arg(long)]
    allow_out_of_order: bool,

    #[command(subcommand)]
    action: Option<MigrateAction>,
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
    /// Show applied and pending migrations with applied-at, checksum state, duration, who applied
    /// them and, for pending ones, the step of the next run (read-only: creates nothing).
    Status {
        /// One JSON document on stdout, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Measure what each pending statement would lock, rewrite or scan on this database, and which
    /// sessions would block it now: the pending steps run on a shadow database
    /// (metadata_db.shadow_url, or --create-shadow), the target is only read (catalogs and
    /// statistics). A statement is flagged when it rewrites or scans, under a lock that blocks
    /// writes, a table of at least metadata_db.impact_risky_size_mb, or when a current session
    /// would block it.
    Impact {
        /// One JSON document on stdout, for scripts.
        #[arg(long)]
        json: bool,
        /// Exit 1 when a statement is flagged (for CI and deploy scripts), after the report.
        #[arg(long)]
        check: bool,
        /// Without metadata_db.shadow_url: create a temporary shadow database on the target's
        /// server and drop it after (needs CREATEDB; like any database, its WAL is replicated).
        #[arg(long)]
        create_shadow: bool,
    },
    /// Accept this binary's checksum for an applied migration whose source was changed on purpose
    /// (reviewed: what it does is unchanged), keeping the old checksum, the reason and the time in
    /// the history.
    AcceptChecksum {
        /// The migration.
        #[arg(value_name = "MIGRATION")]
        name: String,
        /// Why the change is safe (recorded in the history).
        #[arg(long, value_parser = non_empty)]
        reason: String,
    },
    /// Check that the database and this binary agree: checksums match, every applied migration
    /// this binary does not know is recorded as compatible with it, nothing is half-applied and no
    /// pending migration would be refused as out of order. Exit 0 when they agree, 1 otherwise,
    /// with the reasons (read-only: creates nothing).
    Validate {
        /// One JSON document on stdout, for scripts.
        #[arg(long)]
        json: bool,
        /// Count pending migrations as a problem too (the database must be at this binary's head).
        #[arg(long)]
        require_current: bool,
        /// Pending migrations older than the newest applied one are not a problem.
        #[arg(long)]
        allow_out_of_order: bool,
    },
    /// Record the migrations up to MIGRATION as applied without running them, on a database whose
    /// schema was created without ampd (restored from a dump without the bookkeeping tables, or by
    /// hand). First checks that its tables, columns and types, indexes and constraints are what
    /// those migrations create (built in a scratch schema, dropped again); any difference is listed
    /// and nothing is recorded.
    Baseline {
        /// The last migration the schema already has.
        #[arg(long, value_name = "MIGRATION")]
        to: String,
        /// Why (recorded with each migration, with the role, the time and this ampd's version).
        #[arg(long, value_parser = non_empty)]
        reason: String,
    },
}

fn non_empty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("the reason must not be empty".into())
    } else {
        Ok(text.to_owned())
    }
}

/// The result of a command could not be written to stdout (other than a reader that went away).
#[derive(Debug, thiserror::Error)]
#[error("{done}; but the result could not be written to stdout")]
struct Unwritten {
    /// What the command did, in full, since stdout cannot say it.
    done: String,
    #[source]
    source: std::io::Error,
}

/// Writes `text` to stdout. A reader that went away (`ampd migrate | head -0`) does not turn what
/// was done into a failure: the result was already committed, and stderr still reports it. Any
/// other failure (a full disk, `> /dev/full`) is an error that says what was done (`done`).
fn print(text: &str, done: impl FnOnce() -> String) -> Result<(), Unwritten> {
    let mut stdout = std::io::stdout().lock();
    // An edge: the result is scrubbed like the logs and errors.
    match stdout
        .write_all(crate::redact::redact(text).as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            tracing::debug!("stdout is closed; the result was not printed");
            Ok(())
        }
        Err(source) => Err(Unwritten {
            done: done(),
            source,
        }),
        Ok(()) => Ok(()),
    }
}

const READ_ONLY: fn() -> String = || "nothing was changed".to_owned();

pub async fn run(
    config: &Config,
    args: MigrateArgs,
    set: &MigrationSet,
) -> Result<(), Box<dyn std::error::Error>> {
    if args.action.is_some() && (args.dry_run || args.only.is_some()) {
        return Err(
            "--dry-run and --only apply to `ampd migrate` itself, not to its subcommands \
             (`status`, `validate`, `baseline`, `accept-checksum`, `impact`)"
                .into(),
        );
    }
    let mut db = config.metadata_db.clone();
    db.allow_out_of_order |= args.allow_out_of_order;
    let db = &db;
    match (args.action, args.dry_run, args.only) {
        (Some(MigrateAction::Status { json }), _, _) => {
            let states = migrate::status(db, set).await?;
            if json {
                print(
                    &format!("{}\n", serde_json::to_string_pretty(&states)?),
                    READ_ONLY,
                )?;
            } else {
                print(&status_table(&states), READ_ONLY)?;
            }
        }
        (
            Some(MigrateAction::Impact {
                json,
                check,
                create_shadow,
            }),
            _,
            _,
        ) => {
            let options = migrate::ImpactOptions { create_shadow };
            let impact = migrate::impact(db, set, options).await?;
            if json {
                print(
                    &format!("{}\n", serde_json::to_string_pretty(&impact)?),
                    READ_ONLY,
                )?;
            } else {
                print(&impact.text(), READ_ONLY)?;
            }
            if check && impact.flagged > 0 {
                return Err(format!(
                    "impact --check: {} statement(s) flagged as risky (see the report on stdout)",
                    impact.flagged
                )
                .into());
            }
        }
        (Some(MigrateAction::AcceptChecksum { name, reason }), _, _) => {
            match migrate::accept_checksum(db, set, &name, &reason).await? {
                Some(accepted) => {
                    let text = format!(
                        "accepted checksum {} for {} (was {}, algorithm {}); the old value and the \
                         reason are kept in {}.checksum_history",
                        accepted.new,
                        accepted.name,
                        accepted.old,
                        accepted.old_algorithm,
                        migrate::HISTORY_TABLE
                    );
                    print(&format!("{text}\n"), || text.clone())?
                }
                None => print(
                    &format!(
                        "{name}: the recorded checksum already matches (or none is recorded yet); \
                         nothing changed\n"
                    ),
                    READ_ONLY,
                )?,
            }
        }
        (
            Some(MigrateAction::Validate {
                json,
                require_current,
                allow_out_of_order,
            }),
            _,
            _,
        ) => {
            let allow = allow_out_of_order || db.allow_out_of_order;
            let validation = migrate::validate(db, set, allow, require_current).await?;
            if json {
                print(
                    &format!("{}\n", serde_json::to_string_pretty(&validation)?),
                    READ_ONLY,
                )?;
            } else {
                print(&validation.text(), READ_ONLY)?;
            }
            if validation.problems > 0 {
                return Err(migrate::MigrateError::Invalid {
                    problems: validation.problems,
                }
                .into());
            }
        }
        (Some(MigrateAction::Baseline { to, reason }), _, _) => {
            let done = migrate::baseline(db, set, &to, &reason).await?;
            let recorded = format!(
                "recorded {} migration(s) as applied without running them (baseline): {}",
                done.recorded.len(),
                done.recorded.join(", ")
            );
            print(
                &format!(
                    "compared {} columns, indexes and constraints of schema {} with what the \
                     migrations up to {to} create: they agree\n{recorded}\n",
                    done.compared, done.schema,
                ),
                || recorded.clone(),
            )?;
        }
        (None, true, Some(name)) => {
            let plan = migrate::dry_run_one(db, set, &name).await?;
            print(&plan.script(), READ_ONLY)?;
        }
        (None, true, None) => {
            let plan = migrate::dry_run(db, set).await?;
            print(&plan.script(), READ_ONLY)?;
        }
        (None, false, _) => {
            tracing::info!(url = %crate::db::session_url(db)?, "migrating metadata database");
            let report = migrate::migrate(db, set).await?;
            let mut out = String::new();
            for name in &report.adopted {
                out.push_str(&format!("recorded {name} (applied earlier without ampd)\n"));
            }
            out.push_str(&report.summary());
            out.push('\n');
            print(&out, || {
                let names: Vec<&str> = report.applied.iter().map(|a| a.name.as_str()).collect();
                let mut done = format!("the run is complete: {}", report.summary());
                if !names.is_empty() {
                    done.push_str(&format!(" ({})", names.join(", ")));
                }
                if !report.adopted.is_empty() {
                    done.push_str(&format!(
                        "; recorded {} (applied earlier without ampd)",
                        report.adopted.join(", ")
                    ));
                }
                done
            })?;
        }
    }
    Ok(())
}

fn status_table(states: &[migrate::MigrationState]) -> String {
    let width = states
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(9)
        .max(9);
    let row = |name: &str, state: &str, at: &str, sum: &str, ms: &str, by: &str, plan: &str| {
        format!("{name:<width$}  {state:<8}  {at:<20}  {sum:<10}  {ms:>8}  {by:<16}  {plan}\n")
    };
    let mut out = row(
        "MIGRATION",
        "STATE",
        "APPLIED AT (UTC)",
        "CHECKSUM",
        "MS",
        "BY",
        "NEXT RUN",
    );
    for s in states {
        let applied_at = s
            .applied_at
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into());
        let ms = s
            .duration_ms
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into());
        let by = match (s.applied_by, s.ampd_version.as_deref()) {
            (Some("outside-ampd"), _) => "outside ampd".to_owned(),
            (Some("baseline"), Some(version)) => format!("baseline {version}"),
            (_, Some(version)) => format!("ampd {version}"),
            _ => "-".to_owned(),
        };
        let plan = match (s.step, s.runs) {
            (Some(step), Some(kind)) => format!("step {step}, {}", kind.describe()),
            _ => "-".to_owned(),
        };
        out.push_str(&row(
            &s.name,
            s.state,
            &applied_at,
            s.checksum_state,
            &ms,
            &by,
            &plan,
        ));
    }
    let applied = states.iter().filter(|s| s.state == "applied").count();
    let pending = states.len() - applied;
    out.push_str(&format!("{applied} applied, {pending} pending\n"));
    out
}
