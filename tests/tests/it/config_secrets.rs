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
    let config = dir.config(&url, "");
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

    // (config, arguments, exit code, whether the output shows the URL: the "migrating" line, the
    // connect error).
    let runs = [
        (&config, &["migrate"][..], 0, true),
        (&config, &["migrate"], 0, true),
        (&config, &["migrate", "status"], 0, false),
        (&config, &["migrate", "status", "--json"], 0, false),
        (&config, &["migrate", "--dry-run"], 0, false),
        (&unreachable, &["migrate"], 1, true),
        (&malformed, &["migrate"], 1, false),
        (&wrong_type, &["migrate"], 1, false),
    ];
    for level in ["info", "trace"] {
        let env = [
            ("RUST_LOG", level),
            ("AMP_CONFIG_CONTROLLER__ADMIN_TOKEN", ADMIN_TOKEN),
        ];
        for (config, args, code, shows_url) in runs {
            let mut all = vec!["--config", config.to_str().unwrap()];
            all.extend(args);
            let out = cli::run(cli::ampd(), &all, &env, Duration::from_secs(60)).await;
            out.assert_code(code);
            for secret in FORMS {
                out.assert_not_in_output(secret);
            }
            if shows_url {
                // The URL is shown redacted.
                out.assert_stderr_contains("sslpassword=***&app_token=***");
            }
        }
    }
}
