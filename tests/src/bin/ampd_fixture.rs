//! The `ampd` command line built around a test-only migration set (see `tests::fixtures`).

use std::process::ExitCode;

fn main() -> ExitCode {
    ampd::cli::main(tests::fixtures::from_env)
}
