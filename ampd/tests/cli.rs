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

/// `ampd` with `args`, no config file and exactly the `AMP_CONFIG_*` variables `env`.
fn ampd_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ampd"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AMP_CONFIG") || key == "AMP_DIR" {
            cmd.env_remove(key);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.output().expect("run ampd")
}

#[test]
fn solo_without_a_config_file_takes_the_environment_and_names_its_variables() {
    for (env, expected) in [
        (
            ("AMP_CONFIG_NOPE__X", "1"),
            "error: environment variable AMP_CONFIG_NOPE__X: unknown config key `nope.x`\n",
        ),
        (
            ("AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS", "0"),
            "error: environment: `worker.heartbeat_interval_ms` (0, set by \
             AMP_CONFIG_WORKER__HEARTBEAT_INTERVAL_MS) must be at least 1\n",
        ),
        (
            ("AMP_CONFIG_METADATA_DB__URL", "mysql://u:Secr3tPw@h/db"),
            "error: environment variable AMP_CONFIG_METADATA_DB__URL: invalid value for \
             `metadata_db.url`: unsupported URL scheme `mysql`; expected postgres:// or postgresql://\n",
        ),
    ] {
        // A mistake in the configuration is reported before solo creates anything.
        let amp_dir = std::env::temp_dir().join(format!("ampd-cli-solo-{}", std::process::id()));
        let amp = amp_dir.to_string_lossy().into_owned();
        let out = ampd_with_env(&["solo"], &[env, ("AMP_DIR", amp.as_str())]);
        assert_eq!(out.status.code(), Some(1), "{env:?}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stderr), expected, "{env:?}");
        assert!(!amp_dir.exists(), "{env:?}: {amp} was created");
    }
}

#[test]
fn other_commands_still_need_a_config_file() {
    let url = (
        "AMP_CONFIG_METADATA_DB__URL",
        "postgresql://u@127.0.0.1:1/db",
    );
    for command in ["migrate", "controller", "server"] {
        let out = ampd_with_env(&[command], &[url]);
        assert_eq!(out.status.code(), Some(1), "{command}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("error: no configuration file: "),
            "{command}: {}",
            text(&out)
        );
    }
}
