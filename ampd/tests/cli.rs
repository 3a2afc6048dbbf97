//! The command line without a database: help, version and usage errors, and their exit codes.
//! (Everything that needs PostgreSQL is in the workspace's `tests` crate.)

use std::process::{Command, Output};

fn ampd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ampd"))
        .args(args)
        .env_remove("AMP_CONFIG")
        .output()
        .expect("run ampd")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn help_lists_every_subcommand_and_exits_0() {
    let out = ampd(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out);
    for sub in [
        "migrate",
        "controller",
        "server",
        "worker",
        "solo",
        "--config",
    ] {
        assert!(help.contains(sub), "{sub} in:\n{help}");
    }
    let out = ampd(&["migrate", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).contains("--dry-run"));
    assert!(text(&out).contains("status"));
}

#[test]
fn version_exits_0() {
    let out = ampd(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn usage_errors_exit_1_with_a_message() {
    for args in [
        &["frobnicate"][..],
        &["worker"][..],
        &["migrate", "--dry-run", "status"][..],
        &["migrate", "status", "--yaml"][..],
        &[][..],
    ] {
        let out = ampd(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("error"),
            "{args:?}: {}",
            text(&out)
        );
    }
}
