//! Test-only migration sets for the `ampd-fixture` binary (the `ampd` command line built around
//! them) and for in-process tests. Chosen with `AMPD_FIXTURE_MIGRATIONS`:
//!
//! | value | migrations |
//! |---|---|
//! | unset or `schema` | the metadata schema's own (same as `ampd`) |
//! | `failing` | the schema's, then one that creates a table and then fails |
//! | `slow` | the schema's, then one that sleeps `AMPD_FIXTURE_SLEEP_SECS` (default 30) inside the run |
//! | `alter-jobs` | the schema's, then one that adds a column to `jobs` (needs its lock) |
//! | `synthetic:N` | N trivial migrations (each creates and drops nothing but a comment) |
//! | `previous` | the schema's (a previous release, next to `expand` and `expand-breaking`, which add to it) |
//! | `before-index` | the schema's up to (not including) its first that runs alone: the released ones |
//! | `expand` | the schema's, then [`EXPAND`] (a nullable column, marked compatible) |
//! | `expand-breaking` | `expand`'s, then [`BREAKING`] (a required column, not marked compatible) |
//! | `newer` | the schema's, then [`NEWER`] |
//! | `late` | the schema's, then [`LATE`] (merged late: it sorts before `NEWER`), then [`NEWER`] |
//! | `impact-base` | the schema's, then one that creates the table `impact_big` |
//! | `impact` | `impact-base`'s, then four on `impact_big`: add a nullable column, change a column's type, set NOT NULL, build an index concurrently |

use ampd::migrate::MigrationSet;
use migration::{DbErr, MigrationName, MigrationTrait, MigratorTrait, SchemaManager};
use sea_orm::ConnectionTrait;
use sha2::{Digest, Sha256};

/// The migration set named by `AMPD_FIXTURE_MIGRATIONS` (see the module docs).
pub fn from_env() -> MigrationSet {
    let which = std::env::var("AMPD_FIXTURE_MIGRATIONS").unwrap_or_default();
    named(&which).unwrap_or_else(|| {
        eprintln!("unknown AMPD_FIXTURE_MIGRATIONS={which:?}; using the schema's migrations");
        MigrationSet::ampd()
    })
}

/// The migration set called `which`, if there is one.
pub fn named(which: &str) -> Option<MigrationSet> {
    let extra: Box<dyn MigrationTrait> = match which {
        "" | "schema" => return Some(MigrationSet::ampd()),
        "previous" => return Some(MigrationSet::ampd()),
        "before-index" => {
            let mut migrations = migration::Migrator::migrations();
            let first_alone = migrations
                .iter()
                .position(|m| m.use_transaction() == Some(false))
                .unwrap_or(migrations.len());
            migrations.truncate(first_alone);
            return Some(MigrationSet::new(migrations, checksum));
        }
        "expand" => return Some(with_sql(&[EXPAND])),
        "expand-breaking" => return Some(with_sql(&[EXPAND, BREAKING])),
        "newer" => return Some(with_sql(&[NEWER])),
        "late" => return Some(with_sql(&[LATE, NEWER])),
        "failing" => Box::new(Failing),
        "slow" => Box::new(Slow),
        "alter-jobs" => Box::new(AlterJobs),
        "impact-base" | "impact" => {
            let mut migrations = migration::Migrator::migrations();
            migrations.extend(impact_migrations(which == "impact"));
            return Some(MigrationSet::new(migrations, checksum));
        }
        other => {
            let n: usize = other.strip_prefix("synthetic:")?.parse().ok()?;
            return Some(synthetic(n));
        }
    };
    let mut migrations = migration::Migrator::migrations();
    migrations.push(extra);
    Some(MigrationSet::new(migrations, checksum))
}

/// The schema's checksums for its migrations; a fixed one derived from the name for fixtures.
fn checksum(name: &str) -> Option<String> {
    migration::checksum_of(name)
        .map(str::to_owned)
        .or_else(|| Some(hex::encode(Sha256::digest(format!("fixture:{name}")))))
}

/// Creates a table, then runs a statement PostgreSQL rejects.
pub struct Failing;

impl MigrationName for Failing {
    fn name(&self) -> &str {
        "m20991231_000001_fixture_fails"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Failing {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("CREATE TABLE fixture_created_before_failure (id bigint)")
            .await?;
        db.execute_unprepared("ALTER TABLE no_such_table ADD COLUMN x int")
            .await?;
        Ok(())
    }
}

/// Sleeps inside the run, so a test can interrupt it half-way.
pub struct Slow;

impl MigrationName for Slow {
    fn name(&self) -> &str {
        "m20991231_000002_fixture_slow"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Slow {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let secs: f64 = std::env::var("AMPD_FIXTURE_SLEEP_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30.0);
        let db = manager.get_connection();
        db.execute_unprepared("CREATE TABLE fixture_slow_started (id bigint)")
            .await?;
        db.execute_unprepared(&format!("SELECT pg_sleep({secs})"))
            .await?;
        Ok(())
    }
}

/// Adds a column to `jobs`, which needs an ACCESS EXCLUSIVE lock on it.
pub struct AlterJobs;

impl MigrationName for AlterJobs {
    fn name(&self) -> &str {
        "m20991231_000003_fixture_alter_jobs"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AlterJobs {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE jobs ADD COLUMN fixture_note text")
            .await
            .map(|_| ())
    }
}

/// `n` trivial migrations, named in order.
pub fn synthetic(n: usize) -> MigrationSet {
    let migrations: Vec<Box<dyn MigrationTrait>> = (0..n)
        .map(|i| Box::new(Synthetic(format!("m20000101_{:06}_synthetic", i + 1))) as _)
        .collect();
    MigrationSet::new(migrations, checksum)
}

struct Synthetic(String);

impl MigrationName for Synthetic {
    fn name(&self) -> &str {
        &self.0
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Synthetic {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("SELECT 1")
            .await
            .map(|_| ())
    }
}

/// A fixture migration: its name, its one statement, and whether it is marked compatible with
/// binaries that do not know it.
pub struct SqlFixture {
    /// The migration's name.
    pub name: &'static str,
    /// What it runs.
    pub sql: &'static str,
    /// Marked compatible (as `migration::compat` marks a reviewed migration).
    pub compatible: bool,
}

/// Adds a nullable column: compatible with binaries that do not know it.
pub const EXPAND: SqlFixture = SqlFixture {
    name: "m20991231_000006_fixture_expand",
    sql: "ALTER TABLE workers ADD COLUMN fixture_zone text",
    compatible: true,
};

/// Adds a required column older binaries would not fill: not compatible.
pub const BREAKING: SqlFixture = SqlFixture {
    name: "m20991231_000007_fixture_breaking",
    sql: "ALTER TABLE jobs ADD COLUMN fixture_fence bigint NOT NULL DEFAULT 0",
    compatible: false,
};

/// A migration merged late: it sorts before [`NEWER`], which was applied first.
pub const LATE: SqlFixture = SqlFixture {
    name: "m20991231_000004_fixture_late",
    sql: "CREATE TABLE fixture_late (id bigint)",
    compatible: false,
};

/// A migration released before [`LATE`] was merged.
pub const NEWER: SqlFixture = SqlFixture {
    name: "m20991231_000005_fixture_newer",
    sql: "CREATE TABLE fixture_newer (id bigint)",
    compatible: false,
};

/// The schema's migrations, then `extra`, with the compatible ones of `extra` marked so.
fn with_sql(extra: &[SqlFixture]) -> MigrationSet {
    let mut migrations = migration::Migrator::migrations();
    let mut compatible: Vec<&'static str> = Vec::new();
    for fixture in extra {
        migrations.push(Box::new(Sql(fixture.name, fixture.sql)));
        if fixture.compatible {
            compatible.push(fixture.name);
        }
    }
    MigrationSet::new(migrations, checksum).with_compatible(move |name| {
        migration::compat::is_compatible(name) || compatible.contains(&name)
    })
}

struct Sql(&'static str, &'static str);

impl MigrationName for Sql {
    fn name(&self) -> &str {
        self.0
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Sql {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(self.1)
            .await
            .map(|_| ())
    }
}

/// A migration that runs one statement, in a transaction or (`alone`) outside one (the `impact`
/// sets, and tests that build migration sets of their own).
pub struct SqlStep {
    /// The migration's name.
    pub name: &'static str,
    /// What it runs.
    pub sql: &'static str,
    /// Outside a transaction (`use_transaction() == Some(false)`).
    pub alone: bool,
}

/// The table `impact_big` (`impact-base`), then (with `pending`) the four migrations whose impact
/// the tests measure.
pub fn impact_migrations(pending: bool) -> Vec<Box<dyn MigrationTrait>> {
    let mut steps = vec![SqlStep {
        name: "m20991231_000101_fixture_impact_table",
        sql: "CREATE TABLE impact_big (id bigint PRIMARY KEY, n integer NOT NULL, t text)",
        alone: false,
    }];
    if pending {
        steps.extend([
            SqlStep {
                name: IMPACT_ADD_COLUMN,
                sql: "ALTER TABLE impact_big ADD COLUMN note text",
                alone: false,
            },
            SqlStep {
                name: IMPACT_CHANGE_TYPE,
                sql: "ALTER TABLE impact_big ALTER COLUMN n TYPE bigint",
                alone: false,
            },
            SqlStep {
                name: IMPACT_SET_NOT_NULL,
                sql: "ALTER TABLE impact_big ALTER COLUMN t SET NOT NULL",
                alone: false,
            },
            SqlStep {
                name: IMPACT_INDEX,
                sql: "CREATE INDEX CONCURRENTLY impact_big_n ON impact_big (n)",
                alone: true,
            },
        ]);
    }
    steps
        .into_iter()
        .map(|s| Box::new(s) as Box<dyn MigrationTrait>)
        .collect()
}

/// `impact`: adds a nullable column to `impact_big`.
pub const IMPACT_ADD_COLUMN: &str = "m20991231_000102_fixture_impact_add_column";
/// `impact`: changes the type of `impact_big.n` (int to bigint).
pub const IMPACT_CHANGE_TYPE: &str = "m20991231_000103_fixture_impact_change_type";
/// `impact`: sets `impact_big.t` NOT NULL.
pub const IMPACT_SET_NOT_NULL: &str = "m20991231_000104_fixture_impact_set_not_null";
/// `impact`: builds an index on `impact_big.n` concurrently (outside a transaction).
pub const IMPACT_INDEX: &str = "m20991231_000105_fixture_impact_index";

impl MigrationName for SqlStep {
    fn name(&self) -> &str {
        self.name
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SqlStep {
    fn use_transaction(&self) -> Option<bool> {
        self.alone.then_some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(self.sql)
            .await
            .map(|_| ())
    }
}
