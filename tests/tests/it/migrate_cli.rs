//! `ampd migrate` at its edges, run as a user runs it:
//! - an IPv6 literal host (`postgresql://user@[::1]:port/db`) connects; an unreachable one is
//!   reported as unreachable, not as a name that cannot be resolved;
//! - a reader that closes stdout (`ampd migrate | head -0`) does not turn success into exit 1;
//! - a role that may not create tables gets a GRANT that works as given, names quoted (a database
//!   called `amp-prod-…`); a migration that changes another role's table gets its own advice.

use std::time::Duration;

use sea_orm::ConnectionTrait;
use tests::TestDb;
use tests::cli::{self, TempDir, config_toml};

/// `url` with its user and password replaced.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let mut u = url::Url::parse(url).expect("url");
    u.set_username(user).expect("set user");
    u.set_password(Some(password)).expect("set password");
    u.to_string()
}

/// A TCP listener on `[::1]` that forwards every connection to the test server. `None` when this
/// machine has no IPv6 loopback.
async fn ipv6_forwarder() -> Option<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.ok()?;
    let port = listener.local_addr().ok()?.port();
    let admin = url::Url::parse(tests::admin_url()).expect("admin URL");
    let server_port = admin.port().unwrap_or(5432);
    let socket_dir = admin
        .query_pairs()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.into_owned());
    let host = admin.host_str().unwrap_or("localhost").to_owned();
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let socket_dir = socket_dir.clone();
            let host = host.clone();
            tokio::spawn(async move {
                match socket_dir {
                    Some(dir) => {
                        let path = format!("{dir}/.s.PGSQL.{server_port}");
                        if let Ok(mut server) = tokio::net::UnixStream::connect(path).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }
                    None => {
                        if let Ok(mut server) =
                            tokio::net::TcpStream::connect((host.as_str(), server_port)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }
                }
            });
        }
    });
    Some((port, task))
}

#[tokio::test]
async fn an_ipv6_literal_host_connects_and_an_unreachable_one_is_named_as_such() {
    let dir = TempDir::new();
    let unreachable = dir.file(
        "unreachable.toml",
        &config_toml(
            "postgresql://amp:V6-Secret@[::1]:1/amp",
            "connect_timeout_secs = 1",
        ),
    );
    let out = cli::ampd_with_config(&unreachable, &["migrate"]).await;
    out.assert_code(1)
        .assert_stderr_contains("failed to connect to metadata database: ")
        .assert_stderr_contains("(metadata_db.url postgresql://amp:***@[::1]:1/amp;")
        // The literal is an address, not a name to look up.
        .assert_stderr_lacks("lookup address")
        .assert_not_in_output("V6-Secret");

    let Some((port, forwarder)) = ipv6_forwarder().await else {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "\nNOT RUN (in part): this machine has no IPv6 loopback; only the refusal was checked\n"
        );
        return;
    };
    let db = TestDb::empty().await;
    let config = dir.file(
        "v6.toml",
        &config_toml(
            &format!("postgresql://postgres@[::1]:{port}/{}", db.name()),
            "",
        ),
    );
    let out = cli::ampd_with_config(&config, &["migrate"]).await;
    out.assert_success().assert_stdout_contains(format!(
        "applied {} migrations",
        tests::schema_migration_count()
    ));
    forwarder.abort();
}

#[tokio::test]
async fn a_closed_stdout_after_success_does_not_turn_it_into_a_failure() {
    let db = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.config(db.url(), "");
    for args in [vec!["migrate"], vec!["migrate", "status"]] {
        let mut child = cli::command(cli::ampd(), &config, &args)
            .spawn()
            .expect("spawn");
        // `| head -0`: the reader goes away before anything is written.
        drop(child.stdout.take());
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("exits")
            .expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
    let conn = db.connect().await;
    let applied = tests::sql::count(&conn, "SELECT count(*) FROM seaql_migrations").await;
    assert_eq!(applied, tests::schema_migration_count() as i64);
}

#[tokio::test]
async fn a_grant_hint_with_quoted_names_works_as_given() {
    let tag = format!("{}", std::process::id());
    let database = format!("amp-prod-{tag}");
    let role = format!("amp-app-{tag}");
    tests::admin_exec(&format!("CREATE DATABASE \"{database}\"")).await;
    tests::admin_exec(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;
    tests::admin_exec(&format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'")).await;
    let url = with_credentials(&tests::database_url(&database), &role, "pw");
    let dir = TempDir::new();
    let config = dir.config(&url, "");

    let refused = cli::ampd_with_config(&config, &["migrate"]).await;
    let grant = refused
        .stderr
        .split("As an administrator, run: ")
        .nth(1)
        .map(|s| s.trim().to_owned());
    if let Some(grant) = &grant {
        let admin = tests::connect(&tests::database_url(&database), 1).await;
        admin
            .execute_unprepared(grant)
            .await
            .expect("the GRANT as given");
        let _ = admin.close().await;
    }
    let after = cli::ampd_with_config(&config, &["migrate"]).await;

    tests::admin_exec(&format!(
        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
    ))
    .await;
    tests::admin_exec(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;

    refused.assert_code(1).assert_stderr_contains(format!(
        "permission denied to create table in schema \"public\" of database \"{database}\""
    ));
    assert_eq!(
        grant.as_deref(),
        Some(format!("GRANT USAGE, CREATE ON SCHEMA \"public\" TO \"{role}\";").as_str()),
        "{}",
        refused.stderr
    );
    after.assert_success().assert_stdout_contains(format!(
        "applied {} migrations",
        tests::schema_migration_count()
    ));
}

#[tokio::test]
async fn changing_another_roles_table_gets_advice_about_owners_not_grants() {
    let dir = TempDir::new();
    let (db, _) = cli::database_at_head(&dir, "").await;
    let role = format!("ampd-owner-{}", std::process::id());
    tests::admin_exec(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;
    tests::admin_exec(&format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'")).await;
    let admin = db.connect().await;
    admin
        .execute_unprepared(&format!(
            "GRANT USAGE, CREATE ON SCHEMA public TO \"{role}\"; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO \"{role}\""
        ))
        .await
        .expect("grants");
    let config = dir.file(
        "role.toml",
        &config_toml(&with_credentials(db.url(), &role, "pw"), ""),
    );
    let run = |config: std::path::PathBuf| async move {
        cli::run(
            cli::ampd_fixture(),
            &["--config", config.to_str().unwrap(), "migrate"],
            &[("AMPD_FIXTURE_MIGRATIONS", "alter-jobs")],
            Duration::from_secs(60),
        )
        .await
    };
    let refused = run(config.clone()).await;
    let fix = format!("ALTER TABLE \"jobs\" OWNER TO \"{role}\";");
    admin
        .execute_unprepared(&fix)
        .await
        .expect("the fix as given");
    let after = run(config).await;
    drop(admin);
    drop(db);
    tests::admin_exec(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;

    refused
        .assert_code(1)
        .assert_stderr_contains(format!(
            "migration m20991231_000003_fixture_alter_jobs failed: must be owner of table jobs: \
             table \"jobs\" belongs to role \"postgres\", and ampd connects as \"{role}\""
        ))
        .assert_stderr_contains(&fix)
        .assert_stderr_lacks("create table");
    after.assert_success();
}
