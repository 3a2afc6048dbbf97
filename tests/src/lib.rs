//! Test harness: every test gets its own freshly created PostgreSQL database, dropped afterwards, so
//! tests run in parallel with nothing shared. See [`cluster`] for where the server comes from.

pub mod api;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod fixtures;
pub mod pgbouncer;
pub mod proxy;
pub mod rows;
pub mod services;
pub mod sql;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, Statement};

pub use cluster::admin_url;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A database of its own for one test. Dropped (with any connections still open to it) when this
/// value is dropped.
pub struct TestDb {
    name: String,
    url: String,
    /// A role made for this database only (see [`TestDb::owned_by_password_role`]), dropped with it.
    role: Option<String>,
}

impl TestDb {
    /// A new, empty database (no tables at all).
    pub async fn empty() -> TestDb {
        let name = unique_name("t");
        admin_exec(&format!("CREATE DATABASE \"{name}\"")).await;
        let url = database_url(&name);
        TestDb {
            name,
            url,
            role: None,
        }
    }

    /// A new, empty database owned by a new login role with password `password`, a member of
    /// [`cluster::PASSWORD_ROLES`] (on a private cluster the server checks its password with
    /// `scram-sha-256`). The role's name is unique to this database ([`role`](Self::role)); both
    /// are dropped with this value. [`url`](Self::url) stays the admin's.
    pub async fn owned_by_password_role(password: &str) -> TestDb {
        let name = unique_name("t");
        let role = unique_name("role");
        let group = cluster::PASSWORD_ROLES;
        // The group may already exist (another test process made it): that error is expected.
        admin_exec(&format!(
            "DO $$ BEGIN CREATE ROLE {group} NOLOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        .await;
        let literal = password.replace('\'', "''");
        admin_exec(&format!(
            "CREATE ROLE \"{role}\" LOGIN IN ROLE {group} PASSWORD '{literal}'"
        ))
        .await;
        admin_exec(&format!("CREATE DATABASE \"{name}\" OWNER \"{role}\"")).await;
        let url = database_url(&name);
        TestDb {
            name,
            url,
            role: Some(role),
        }
    }

    /// The role made for this database by [`owned_by_password_role`](Self::owned_by_password_role).
    pub fn role(&self) -> Option<&str> {
        self.role.as_deref()
    }

    /// A new database migrated to head. Cloned from a template database that is migrated once per
    /// set of migrations, which keeps a test's set-up to one `CREATE DATABASE`.
    pub async fn migrated() -> TestDb {
        let template = ensure_template().await;
        let name = unique_name("t");
        admin_exec(&format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
        ))
        .await;
        let url = database_url(&name);
        TestDb {
            name,
            url,
            role: None,
        }
    }

    /// A new database cloned from database `template` (which no one may be connected to).
    pub async fn from_template(template: &str) -> TestDb {
        let name = unique_name("t");
        admin_exec(&format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
        ))
        .await;
        let url = database_url(&name);
        TestDb {
            name,
            url,
            role: None,
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection URL for this database (same credentials as the admin URL).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// ampd's `[metadata_db]` configuration for this database (defaults otherwise), for the
    /// data-access functions that open connections of their own (listeners, node claims).
    pub fn config(&self) -> ampd::config::MetadataDbConfig {
        metadata_config(&self.url)
    }

    /// A small SeaORM pool on this database.
    pub async fn connect(&self) -> DatabaseConnection {
        connect(&self.url, 5).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let mut statements = vec![format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )];
        if let Some(role) = &self.role {
            statements.push(format!("DROP ROLE IF EXISTS \"{role}\""));
        }
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            for sql in statements {
                rt.block_on(admin_exec(&sql));
            }
        })
        .join();
    }
}

/// ampd's `[metadata_db]` configuration for `url`, everything else at its default.
pub fn metadata_config(url: &str) -> ampd::config::MetadataDbConfig {
    metadata_config_with(url, "")
}

/// ampd's `[metadata_db]` configuration for `url` with the extra `[metadata_db]` lines `extra`.
pub fn metadata_config_with(url: &str, extra: &str) -> ampd::config::MetadataDbConfig {
    let text = cli::config_toml(url, extra);
    ampd::config::Config::from_parts(std::path::Path::new("test.toml"), &text, Vec::new())
        .unwrap_or_else(|e| panic!("config for {url}: {e}"))
        .metadata_db
}

/// Connects to `url` with a pool of at most `max` connections and quiet statement logging.
pub async fn connect(url: &str, max: u32) -> DatabaseConnection {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(max)
        .min_connections(0)
        .sqlx_logging(false);
    Database::connect(opts)
        .await
        .unwrap_or_else(|e| panic!("connect to test database: {e}"))
}

/// Runs one statement on the admin database.
pub async fn admin_exec(sql: &str) {
    let db = connect(admin_url(), 1).await;
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = db.close().await;
}

/// The URL of database `name` on the test server.
pub fn database_url(name: &str) -> String {
    let mut url = url::Url::parse(admin_url()).expect("admin URL is a URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// Whether the server lets a client in with the credentials of `url`.
pub async fn login_succeeds(url: &str) -> bool {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(1)
        .min_connections(0)
        .sqlx_logging(false);
    match Database::connect(opts).await {
        Ok(db) => {
            let _ = db.close().await;
            true
        }
        Err(_) => false,
    }
}

/// The command a pinned tool's installer script in `.ci/` (`openapi-validator`, `schemathesis`)
/// installed, asked with `--installed` (which installs nothing): `None`, after saying so, when it
/// is not installed outside CI; a failure in CI ([`not_run`]).
pub fn pinned_tool(script: &str, test: &str) -> Option<std::path::PathBuf> {
    let script = cli::workspace_root().join(".ci").join(script);
    let out = std::process::Command::new(&script)
        .arg("--installed")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    if out.status.success() {
        return Some(std::path::PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ));
    }
    not_run(test, String::from_utf8_lossy(&out.stderr).trim());
    None
}

/// Says that `test` cannot run because of `why` (a tool it needs is missing): in CI (`CI=true`) a
/// panic, since CI installs what the tests need; elsewhere a line on the process's stderr, past the
/// test harness's capture, after which the test returns without running.
pub fn not_run(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{why}; CI needs it for {test}");
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "\nNOT RUN: {test}: {why}; install it to run this test\n"
    );
}

/// A name no other test uses, on any server: `ampd_<prefix>_<pid>_<n>_<nanos>`. Valid as a
/// database, role or worker node id.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ampd_{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// Creates (once per server and set of migrations) a database migrated to head to clone tests from.
async fn ensure_template() -> String {
    static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            let fingerprint: String = migration::CHECKSUMS
                .iter()
                .map(|(name, sum)| format!("{name}{sum}"))
                .collect();
            let digest = {
                use std::hash::{DefaultHasher, Hash, Hasher};
                let mut h = DefaultHasher::new();
                fingerprint.hash(&mut h);
                h.finish()
            };
            let template = format!("ampd_template_{digest:016x}");
            // Serialise template creation across test processes with an advisory lock.
            let admin = connect(admin_url(), 1).await;
            admin
                .execute_unprepared("SELECT pg_advisory_lock(4242001)")
                .await
                .expect("template lock");
            let exists = admin
                .query_one_raw(Statement::from_string(
                    admin.get_database_backend(),
                    format!("SELECT 1 FROM pg_database WHERE datname = '{template}'"),
                ))
                .await
                .expect("look up template")
                .is_some();
            if !exists {
                let building = unique_name("building");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE \"{building}\""))
                    .await
                    .expect("create template");
                let db = connect(&database_url(&building), 1).await;
                migrate_to_head(&db).await.expect("migrate template");
                db.close().await.expect("close template");
                admin
                    .execute_unprepared(&format!(
                        "ALTER DATABASE \"{building}\" RENAME TO \"{template}\""
                    ))
                    .await
                    .expect("rename template");
            }
            admin
                .execute_unprepared("SELECT pg_advisory_unlock(4242001)")
                .await
                .expect("template unlock");
            let _ = admin.close().await;
            template
        })
        .await
        .clone()
}

/// The names of the schema's migrations, in order, from the migrator's own list.
pub fn schema_migrations() -> Vec<String> {
    Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect()
}

/// How many migrations the schema has.
pub fn schema_migration_count() -> usize {
    Migrator::migrations().len()
}

/// The name of the schema's last migration.
pub fn schema_head() -> String {
    schema_migrations()
        .pop()
        .expect("the schema has migrations")
}

/// Applies every migration with SeaORM's own migrator.
pub async fn migrate_to_head(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}

/// A small deterministic generator (xorshift64), so a failure can be replayed from its seed.
pub struct XorShift(pub u64);

impl XorShift {
    /// The next number of the sequence.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// The next number of the sequence, below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
