//! `ampd migrate`: apply pending migrations and exit; `ampd migrate status`; `--dry-run`.

use std::io::Write as _;

use crate::config::Config;
use crate::migrate::{self, MigrationSet};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MigrateArgs {
    /// Print the SQL the pending migrations would run, in order, and change nothing.
    #[arg(long)]
    dry_run: bool,

    #[command(subcommand)]
    action: Option<MigrateAction>,
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
    /// Show applied and pending migrations with applied-at, checksum state and duration
    /// (read-only: creates nothing).
    Status {
        /// One JSON document on stdout, for scripts.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    config: &Config,
    args: MigrateArgs,
    set: &MigrationSet,
) -> Result<(), Box<dyn std::error::Error>> {
    let db = &config.metadata_db;
    let mut stdout = std::io::stdout().lock();
    match (args.action, args.dry_run) {
        (Some(MigrateAction::Status { json }), _) => {
            let states = migrate::status(db, set).await?;
            if json {
                serde_json::to_writer_pretty(&mut stdout, &states)?;
                writeln!(stdout)?;
            } else {
                write!(stdout, "{}", status_table(&states))?;
            }
        }
        (None, true) => {
            let plan = migrate::dry_run(db, set).await?;
            write!(stdout, "{}", plan.script())?;
        }
        (None, false) => {
            tracing::info!(url = %config.require_url()?, "migrating metadata database");
            let report = migrate::migrate(db, set).await?;
            for name in &report.adopted {
                writeln!(stdout, "recorded {name} (applied earlier without ampd)")?;
            }
            writeln!(stdout, "{}", report.summary())?;
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
    let mut out = format!(
        "{:<width$}  {:<8}  {:<20}  {:<10}  {:>8}  {}\n",
        "MIGRATION", "STATE", "APPLIED AT (UTC)", "CHECKSUM", "MS", "BY AMPD"
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
        out.push_str(&format!(
            "{:<width$}  {:<8}  {:<20}  {:<10}  {:>8}  {}\n",
            s.name,
            s.state,
            applied_at,
            s.checksum,
            ms,
            s.ampd_version.as_deref().unwrap_or("-")
        ));
    }
    let applied = states.iter().filter(|s| s.state == "applied").count();
    let pending = states.len() - applied;
    out.push_str(&format!("{applied} applied, {pending} pending\n"));
    out
}
