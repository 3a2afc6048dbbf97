//! Secrets in the database URL's query and in the configuration never reach stdout or stderr, at
//! any log level, whatever `ampd migrate` does: migrating, reporting, printing its plan, failing to
//! connect or failing to load its configuration.

use std::time::Duration;

use tests::TestDb;
use tests::cli::{self, TempDir, config_toml};

/// `sslpassword` (the client key's passphrase), percent-encoded as a URL carries it.
const SSL_PASSPHRASE: &str = "SslK3y%2FPass+phrase";
/// An unknown parameter that the redaction rule calls secret (its name ends in `token`).
const APP_TOKEN: &str = "AppT0kenValue";
const ADMIN_TOKEN: &str = "Adm1nT0kenValue";

/// Every form in which the secrets above could be printed.
const FORMS: [&str; 6] = [
    SSL_PASSPHRASE,
    "SslK3y/Pass phrase",
    "SslK3y/Pass+phrase",
    "SslK3y",
    APP_TOKEN,
    ADMIN_TOKEN,
];

/// `url` with the secret query parameters added.
fn with_secret_params(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslpassword={SSL_PASSPHRASE}&app_token={APP_TOKEN}")
}

#[tokio::test]
async fn query_secrets_never_appear_in_any_output_at_info_or_trace() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let url = with_secret_params(db.url());
    let config = dir.file("config.toml", &config_toml(&url, ""));
    let unreachable = dir.file(
        "unreachable.toml",
        &config_toml(
            &with_secret_params("postgresql://amp@127.0.0.1:1/amp"),
            "connect_timeout_secs = 1",
        ),
    );
    let malformed = dir.file("malformed.toml", &format!("[metadata_db]\nurl = \"{url}\n"));
    let wrong_type = dir.file(
        "wrong_type.toml",
        &config_toml(&url, &format!("max_connections = \"{url}\"")),
    );

    let mut outputs = Vec::new();
    for level in ["info", "trace"] {
        let env = [
            ("RUST_LOG", level),
            ("AMP_CONFIG_CONTROLLER__ADMIN_TOKEN", ADMIN_TOKEN),
        ];
        for (config, args, succeeds) in [
            (&config, vec!["migrate"], true),
            (&config, vec!["migrate"], true),
            (&config, vec!["migrate", "status"], true),
            (&config, vec!["migrate", "status", "--json"], true),
            (&config, vec!["migrate", "--dry-run"], true),
            (&unreachable, vec!["migrate"], false),
            (&malformed, vec!["migrate"], false),
            (&wrong_type, vec!["migrate"], false),
        ] {
            let mut all = vec!["--config", config.to_str().unwrap()];
            all.extend(&args);
            let out = cli::run(cli::ampd(), &all, &env, Duration::from_secs(60)).await;
            let expected = if succeeds { 0 } else { 1 };
            assert_eq!(out.code, Some(expected), "{level} {args:?}: {}", out.all());
            outputs.push((level, args, out));
        }
    }

    for (level, args, out) in &outputs {
        let all = out.all();
        for secret in FORMS {
            assert!(
                !all.contains(secret),
                "{secret:?} leaked at {level} by {args:?}:\n{all}"
            );
        }
    }
    // The URL was shown, redacted: on the "migrating" line and in the connect error.
    for (level, args, out) in &outputs {
        let shows_url = args == &["migrate"] || out.code == Some(1) && args.len() == 1;
        let is_config_error = out.stderr.contains("config file");
        if shows_url && !is_config_error {
            assert!(
                out.stderr.contains("sslpassword=***&app_token=***"),
                "{level} {args:?}: the URL not shown redacted:\n{}",
                out.stderr
            );
        }
    }
}
