//! `ampd`, the data daemon. The command line lives in [`ampd::cli`]; this binary runs it with the
//! metadata schema's migrations.

use std::process::ExitCode;

fn main() -> ExitCode {
    ampd::cli::main(ampd::migrate::MigrationSet::ampd)
}
