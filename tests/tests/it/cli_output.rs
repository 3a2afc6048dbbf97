//! The harness's checks of a run of the binary (`tests::cli::Output`): each fails when what it
//! checks does not hold, and its message shows the whole run.

use std::time::Duration;

use tests::cli::Output;

/// A failed run, as `cli::run` would return it.
fn run() -> Output {
    Output {
        command: "RUST_LOG=info ampd --config c.toml migrate".into(),
        code: Some(1),
        stdout: "the stdout\n".into(),
        stderr: "error: the stderr\n".into(),
        elapsed: Duration::ZERO,
    }
}

/// The panic message of `check` on [`run`], or `None` when it passed.
fn failure(check: impl FnOnce(&Output)) -> Option<String> {
    let out = run();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&out)))
        .err()
        .map(|payload| {
            payload
                .downcast_ref::<String>()
                .cloned()
                .expect("a formatted panic message")
        })
}

#[test]
fn checks_that_hold_pass_and_chain() {
    let failed = failure(|out| {
        out.assert_code(1)
            .assert_stdout_contains("the stdout")
            .assert_stderr_contains(String::from("the stderr"))
            .assert_stdout_lacks("error")
            .assert_stderr_lacks("the stdout")
            .assert_not_in_output("secret");
    });
    assert_eq!(failed, None);
}

/// A check, and the start of its failure message on [`run`].
type Case = (&'static str, fn(&Output));

#[test]
fn a_check_that_does_not_hold_fails_showing_the_whole_run() {
    let cases: [Case; 7] = [
        ("expected exit code 0", |out| {
            out.assert_success();
        }),
        ("expected exit code 2", |out| {
            out.assert_code(2);
        }),
        ("stdout does not contain \"the stderr\"", |out| {
            out.assert_stdout_contains("the stderr");
        }),
        ("stderr does not contain \"the stdout\"", |out| {
            out.assert_stderr_contains("the stdout");
        }),
        ("stdout contains \"the stdout\"", |out| {
            out.assert_stdout_lacks("the stdout");
        }),
        ("stderr contains \"error\"", |out| {
            out.assert_stderr_lacks("error");
        }),
        ("the output contains \"the stderr\"", |out| {
            out.assert_not_in_output("the stderr");
        }),
    ];
    for (what, check) in cases {
        let message = failure(check).unwrap_or_else(|| panic!("{what}: the check passed"));
        assert!(message.starts_with(what), "{what}: {message}");
        for part in [
            "command: RUST_LOG=info ampd --config c.toml migrate",
            "exit code: 1",
            "--- stdout ---\nthe stdout\n",
            "--- stderr ---\nerror: the stderr\n",
        ] {
            assert!(message.contains(part), "{what}: no {part:?} in {message}");
        }
    }
}

#[test]
fn a_chain_stops_at_its_first_failing_check() {
    let message = failure(|out| {
        out.assert_success().assert_stderr_contains("not there");
    })
    .expect("the exit code is 1");
    assert!(message.starts_with("expected exit code 0"), "{message}");
}
