//! Why a migration run failed, and what the operator can do about it.

use std::fmt::Write as _;

use sea_orm::DbErr;

use super::LOCK_KEY;
use super::set::AMPD_VERSION;
use crate::db::{ConnectError, PgError, pg_error};

/// Why a migration run (or a read of the migration state) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database could not be reached, or the URL cannot carry a migration session.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// An applied migration's recorded checksum differs from this binary's.
    #[error(
        "migration checksum mismatch: {name} was applied with checksum {recorded} (algorithm \
         {algorithm}) but this ampd has {expected}; the migration was changed after it was applied. \
         Restore the original migration; or, if the change was reviewed and does not change what the \
         migration did (e.g. an upgrade of sea-orm forced an edit), record it with `ampd migrate \
         accept-checksum {name} --reason \"<why>\"`, which keeps the old value and the reason in the \
         history"
    )]
    ChecksumMismatch {
        /// The migration.
        name: String,
        /// Checksum recorded when it was applied.
        recorded: String,
        /// The checksum algorithm version the recorded value was computed with.
        algorithm: i64,
        /// This binary's checksum of the migration, under that algorithm.
        expected: String,
    },
    /// A migration's checksum was recorded with an algorithm version this binary does not know.
    #[error(
        "migration {name} was recorded with checksum algorithm {algorithm}, which this ampd \
         ({AMPD_VERSION}) does not know: a newer ampd migrated this database; run that version or a \
         later one"
    )]
    UnknownAlgorithm {
        /// The migration.
        name: String,
        /// The recorded algorithm version.
        algorithm: i64,
    },
    /// The database has applied migrations this binary does not know.
    #[error(
        "database is newer than this ampd ({AMPD_VERSION}): it has applied {} unknown to this binary; \
         run a newer ampd (the one that migrated it, or later)",
        names.join(", ")
    )]
    DatabaseAhead {
        /// The unknown migrations.
        names: Vec<String>,
    },
    /// Another migration run held the lock for longer than the configured wait.
    #[error(
        "timed out after {waited_secs} s waiting for the migration lock: another ampd is migrating this \
         database (or a session holds advisory lock {LOCK_KEY}); try again, or raise \
         metadata_db.migration_lock_timeout_secs"
    )]
    LockTimeout {
        /// How long it waited.
        waited_secs: u64,
    },
    /// The migration lock was no longer held when the run released it.
    #[error(
        "the migration lock was no longer held at the end of the run (pg_advisory_unlock returned \
         false): a statement of a migration released it (DISCARD ALL, pg_advisory_unlock_all); \
         another run may have migrated at the same time. Check `ampd migrate status` and remove that \
         statement from the migration"
    )]
    LockLost,
    /// A step was about to run on a server session that does not hold the migration lock.
    #[error(
        "the server session about to run a migration step does not hold the migration lock: the \
         connection was moved to another server session (a pooler in transaction mode behind \
         metadata_db.direct_url or url) or a migration released the lock; nothing of this step was \
         applied. Point metadata_db.direct_url at PostgreSQL itself (or a pooler in session mode)"
    )]
    LockNotHere,
    /// The role may not create tables where the migration creates them.
    #[error(
        "permission denied to create table in {place} ({message}): role {role} may not create tables \
         there; nothing was changed. As an administrator, run: {grant}"
    )]
    CreateDenied {
        /// The schema or database the table would be created in, quoted.
        place: String,
        /// The connected role, quoted.
        role: String,
        /// PostgreSQL's message.
        message: String,
        /// The statement that grants what is missing.
        grant: String,
    },
    /// A migration changes an object that belongs to another role.
    #[error(
        "migration {name} failed: {message}: {} belongs to role {owner}, and ampd connects as \
         {role}; only its owner (or a member of the owning role) may change it. {advice}",
        owned_object(message)
    )]
    NotOwner {
        /// The migration.
        name: String,
        /// PostgreSQL's message (`must be owner of table jobs`).
        message: String,
        /// The object's owner, quoted (or `another role` when it could not be found).
        owner: String,
        /// The connected role, quoted.
        role: String,
        /// What stays applied, and how to go on.
        advice: String,
    },
    /// The role lacks another privilege a migration (or the bookkeeping) needs.
    #[error(
        "migration {name} failed: {message} (SQLSTATE 42501): role {role} lacks a privilege it needs. \
         {outcome}. Run ampd migrate as the owner of the schema, or as an administrator, run: {grant}"
    )]
    Privilege {
        /// The migration (or `bookkeeping`).
        name: String,
        /// PostgreSQL's message.
        message: String,
        /// The connected role, quoted.
        role: String,
        /// What stays applied.
        outcome: String,
        /// The statement that grants what is missing.
        grant: String,
    },
    /// The role may not read the bookkeeping tables (the read every run and `status` starts with).
    #[error(
        "role {role} may not read the migration bookkeeping ({message}); nothing was changed. As an \
         administrator, run: {grant}"
    )]
    ReadDenied {
        /// The connected role, quoted.
        role: String,
        /// PostgreSQL's message.
        message: String,
        /// The statement that grants what is missing.
        grant: String,
    },
    /// Checked before the first step: the role may not write the bookkeeping tables.
    #[error(
        "role {role} may not record migrations: it lacks {missing}; nothing was changed (checked \
         before the first step). As an administrator, run: {grant}"
    )]
    BookkeepingDenied {
        /// The connected role, quoted.
        role: String,
        /// The privileges missing, and where.
        missing: String,
        /// The statement that grants them.
        grant: String,
    },
    /// No schema on the search path exists or may be used, so no table can be created.
    #[error(
        "no schema on the search_path of role {role} in database {database} exists or may be used \
         (current_schema() is NULL), so the bookkeeping tables cannot be created; nothing was \
         changed. Fix the search_path (e.g. ALTER ROLE {role} SET search_path = public), or, if \
         the schema exists but the role may not use it, as an administrator, run: {grant}"
    )]
    NoSchema {
        /// The connected role, quoted.
        role: String,
        /// The database, quoted.
        database: String,
        /// The statement that grants the use of `public`.
        grant: String,
    },
    /// A concurrent index build waited longer than `concurrent_index_timeout_secs` for older
    /// transactions (or a lock on its table).
    #[error(
        "migration {name} failed: its concurrent index build waited more than \
         metadata_db.concurrent_index_timeout_secs ({secs} s) for older transactions or a lock on \
         its table to end ({message}); {outcome}. Find the long transactions (pg_stat_activity, \
         oldest xact_start first), let them finish or raise the bound, and run again"
    )]
    ConcurrentIndexTimeout {
        /// The migration.
        name: String,
        /// The configured bound.
        secs: u64,
        /// PostgreSQL's message.
        message: String,
        /// What stays applied.
        outcome: String,
    },
    /// A statement got no answer within its client-side deadline.
    #[error(
        "no answer from the metadata database within {secs:.1} s while {during} (after {waited_secs:.1} \
         s): a frozen network, server or pooler; the connection was closed, so the server ends what \
         it was doing once it notices. {outcome}"
    )]
    NoAnswer {
        /// What the run was doing.
        during: String,
        /// The deadline missed.
        secs: f64,
        /// How long the run waited in all.
        waited_secs: f64,
        /// What stays applied.
        outcome: String,
    },
    /// A failure after earlier steps of the run applied migrations.
    #[error("{err}; but earlier steps of this run changed the database: {earlier}")]
    AfterSteps {
        /// The failure.
        err: Box<MigrateError>,
        /// What the earlier steps applied, by name.
        earlier: String,
    },
    /// A migration could not lock a table within `ddl_lock_timeout_ms` because another session
    /// holds a conflicting lock on it.
    #[error(
        "migration {name} failed: a table it changes is locked by another session and the lock was not \
         granted within metadata_db.ddl_lock_timeout_ms ({timeout_ms} ms) ({message}); {outcome}. \
         Find the blocking session (pg_stat_activity / pg_locks), let it finish, and run again"
    )]
    LockedByOtherSession {
        /// The migration.
        name: String,
        /// The configured DDL lock timeout.
        timeout_ms: u64,
        /// PostgreSQL's message.
        message: String,
        /// What stays applied.
        outcome: String,
    },
    /// A migration failed.
    #[error("migration {name} failed: {message}; {outcome}")]
    MigrationFailed {
        /// The migration.
        name: String,
        /// PostgreSQL's (or the migration's) message.
        message: String,
        /// What stays applied, and what to do.
        outcome: String,
    },
    /// A migration that runs outside a transaction would meet what an earlier, interrupted run of
    /// it left behind.
    #[error(
        "migration {name} cannot run: index {index} {found}; nothing was changed. Remove it, then \
         run ampd migrate again: {statement}"
    )]
    LeftOver {
        /// The migration.
        name: String,
        /// The index, schema-qualified and quoted.
        index: String,
        /// What was found.
        found: String,
        /// The statement that removes it.
        statement: String,
    },
    /// A service found migrations pending and was not asked to apply them.
    #[error(
        "the metadata database is not migrated ({pending} pending migration(s)): run `ampd migrate` \
         first, or set metadata_db.auto_migrate = true"
    )]
    NotMigrated {
        /// How many migrations are pending.
        pending: usize,
    },
    /// A migration named on the command line is not one of this binary's.
    #[error("this ampd has no migration {name} (see `ampd migrate status`)")]
    UnknownMigration {
        /// The name given.
        name: String,
    },
    /// `accept-checksum` was asked about a migration the database has not applied.
    #[error("migration {name} is not applied to this database: there is no checksum to accept")]
    NotApplied {
        /// The migration.
        name: String,
    },
    /// A service met applied migrations it does not know, and not every one is recorded as
    /// compatible with binaries that do not know it.
    #[error(
        "database is newer than this ampd ({AMPD_VERSION}): it has applied {} unknown to this \
         binary and not recorded as compatible with binaries that do not know {}; run a newer ampd \
         (the one that migrated it, or later)",
        incompatible.join(", "),
        if incompatible.len() == 1 { "it" } else { "them" }
    )]
    IncompatibleNewer {
        /// The unknown migrations not recorded as compatible.
        incompatible: Vec<String>,
    },
    /// A pending migration is older than the newest applied one.
    #[error(
        "migration {} is pending but older than {newest}, the newest applied migration: it would \
         be applied out of order (a change merged after a newer one was released?); nothing was \
         changed. If it does not depend on what came after it, run `ampd migrate \
         --allow-out-of-order` (or set metadata_db.allow_out_of_order = true)",
        pending.join(", ")
    )]
    OutOfOrder {
        /// The pending migrations older than `newest`.
        pending: Vec<String>,
        /// The newest applied migration.
        newest: String,
    },
    /// `baseline` found the schema different from what the migrations up to `to` create.
    #[error(
        "baseline refused, nothing was recorded: the schema differs from what the migrations up to \
         {to} create in {} place(s): {}",
        differences.len(),
        summary(differences)
    )]
    BaselineMismatch {
        /// The last migration of the baseline.
        to: String,
        /// Each difference, one line each.
        differences: Vec<String>,
    },
    /// `baseline` on a database that already records applied migrations.
    #[error(
        "baseline refused, nothing was recorded: the database already records applied migrations \
         ({}); baseline is for a schema created without ampd (restored from a dump without the \
         bookkeeping tables, or by hand). Use `ampd migrate`",
        applied.join(", ")
    )]
    BaselineNotEmpty {
        /// The migrations already recorded.
        applied: Vec<String>,
    },
    /// `validate` found problems (listed on stdout).
    #[error(
        "the database does not agree with this ampd ({AMPD_VERSION}): {problems} problem(s), listed \
         above"
    )]
    Invalid {
        /// How many problems were found.
        problems: usize,
    },
    /// Any other database error while reading or recording migration state.
    #[error("metadata database error: {0}")]
    Database(String),
}

/// The first few of `lines`, joined on one line.
fn summary(lines: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = lines
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if lines.len() > SHOWN {
        let _ = write!(text, "; and {} more", lines.len() - SHOWN);
    }
    text
}

impl MigrateError {
    /// A database error outside any migration (a statement that got no answer in time is said as
    /// such).
    pub(super) fn database(err: DbErr) -> Self {
        match super::session::no_answer(&err) {
            Some(secs) => MigrateError::NoAnswer {
                during: "reading or recording the migration state".to_owned(),
                secs,
                waited_secs: secs,
                outcome: "see `ampd migrate status` for what is applied".to_owned(),
            },
            None => MigrateError::Database(describe(&err)),
        }
    }
}

/// The server's message for `err` (with SQLSTATE and detail), or SeaORM's, password redacted.
pub(super) fn describe(err: &DbErr) -> String {
    match pg_error(err) {
        Some(pg) => describe_pg(&pg),
        None => err.to_string(),
    }
}

/// `message (SQLSTATE code): detail`.
pub(super) fn describe_pg(pg: &PgError) -> String {
    let mut s = format!("{} (SQLSTATE {})", pg.message, pg.code);
    if let Some(detail) = &pg.detail {
        let _ = write!(s, ": {detail}");
    }
    s
}

/// `name` as an SQL identifier: in double quotes, inner quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal (an `E''` literal when it holds a backslash, so that it reads
/// the same whatever `standard_conforming_strings` says).
pub fn quote_literal(text: &str) -> String {
    if text.contains('\\') {
        format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", text.replace('\'', "''"))
    }
}

/// `table "jobs"` from PostgreSQL's `must be owner of table jobs`.
fn owned_object(message: &str) -> String {
    let object = message.strip_prefix("must be owner of ").unwrap_or(message);
    match object.split_once(' ') {
        Some((kind, name)) => format!("{kind} {}", quote_ident(name)),
        None => quote_ident(object),
    }
}

/// Who is connected where, for advice on privileges.
#[derive(Debug, Clone, Default)]
pub(super) struct Identity {
    /// `current_user`.
    pub role: String,
    /// `current_database()`.
    pub database: String,
    /// `current_schema()`, where unqualified tables are created (none when no schema on the
    /// search path exists).
    pub schema: Option<String>,
}

/// The error for a `permission denied` (SQLSTATE 42501) from `name` (a migration or
/// `bookkeeping`), given who is connected and, for `must be owner of ...`, the owner if known.
pub(super) fn privilege_error(
    name: &str,
    pg: &PgError,
    who: &Identity,
    owner: Option<&str>,
    outcome: &str,
) -> MigrateError {
    let role = quote_ident(&who.role);
    if let Some(object) = pg.message.strip_prefix("must be owner of ") {
        let (kind, object_name) = object.split_once(' ').unwrap_or(("object", object));
        let owner = owner.map_or_else(|| "another role".to_owned(), quote_ident);
        return MigrateError::NotOwner {
            name: name.to_owned(),
            message: pg.message.clone(),
            advice: format!(
                "{outcome}. Run ampd migrate as {owner} (metadata_db.direct_url with that role's \
                 credentials), or make ampd's role the owner; as an administrator run: ALTER {} {} \
                 OWNER TO {role};",
                kind.to_uppercase(),
                quote_ident(object_name)
            ),
            owner,
            role,
        };
    }
    if let Some(schema) = pg.message.strip_prefix("permission denied for schema ") {
        let schema = quote_ident(schema);
        return MigrateError::CreateDenied {
            place: format!("schema {schema} of database {}", quote_ident(&who.database)),
            role: role.clone(),
            message: pg.message.clone(),
            grant: format!("GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};"),
        };
    }
    if pg.message.starts_with("permission denied for database ") {
        let database = quote_ident(&who.database);
        return MigrateError::CreateDenied {
            place: format!("database {database}"),
            role: role.clone(),
            message: pg.message.clone(),
            grant: format!("GRANT CREATE ON DATABASE {database} TO {role};"),
        };
    }
    // SQLSTATE 3F000 (invalid_schema_name): no schema on the search path exists or may be used.
    if pg.code == "3F000" {
        return MigrateError::NoSchema {
            database: quote_ident(&who.database),
            grant: format!("GRANT USAGE, CREATE ON SCHEMA \"public\" TO {role};"),
            role,
        };
    }
    let grant = match pg.message.strip_prefix("permission denied for ") {
        Some(object) => match object.split_once(' ') {
            Some(("table" | "relation", table)) => format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {}{} TO {role};",
                who.schema
                    .as_deref()
                    .map(|s| format!("{}.", quote_ident(s)))
                    .unwrap_or_default(),
                quote_ident(table)
            ),
            Some(("sequence", sequence)) => {
                format!(
                    "GRANT USAGE ON SEQUENCE {} TO {role};",
                    quote_ident(sequence)
                )
            }
            Some((kind, object)) => format!(
                "GRANT ALL ON {} {} TO {role};",
                kind.to_uppercase(),
                quote_ident(object)
            ),
            None => format!("GRANT ... TO {role}; (PostgreSQL did not name the object)"),
        },
        None => format!("GRANT ... TO {role}; (PostgreSQL did not name the object)"),
    };
    MigrateError::Privilege {
        name: name.to_owned(),
        message: pg.message.clone(),
        role,
        outcome: outcome.to_owned(),
        grant,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(message: &str) -> PgError {
        PgError {
            code: "42501".into(),
            message: message.into(),
            detail: None,
            constraint: None,
        }
    }

    fn who() -> Identity {
        Identity {
            role: "amp-app".into(),
            database: "amp-prod".into(),
            schema: Some("public".into()),
        }
    }

    #[test]
    fn create_denied_names_the_schema_and_quotes_every_identifier() {
        let err = privilege_error(
            "m",
            &pg("permission denied for schema public"),
            &who(),
            None,
            "",
        );
        let text = err.to_string();
        assert!(text.contains("permission denied to create table"), "{text}");
        assert!(
            text.contains("GRANT USAGE, CREATE ON SCHEMA \"public\" TO \"amp-app\";"),
            "{text}"
        );
        assert!(text.contains("database \"amp-prod\""), "{text}");
    }

    #[test]
    fn not_owner_gets_its_own_advice() {
        let err = privilege_error(
            "m1",
            &pg("must be owner of table jobs"),
            &who(),
            Some("admin"),
            "nothing was applied",
        );
        let text = err.to_string();
        assert!(
            text.contains("table \"jobs\" belongs to role \"admin\""),
            "{text}"
        );
        assert!(
            text.contains("ALTER TABLE \"jobs\" OWNER TO \"amp-app\";"),
            "{text}"
        );
        assert!(!text.contains("create table"), "{text}");
    }

    #[test]
    fn a_missing_table_privilege_gets_a_grant_naming_the_table() {
        let err = privilege_error(
            "m",
            &pg("permission denied for table jobs"),
            &who(),
            None,
            "nothing was applied",
        );
        let text = err.to_string();
        assert!(
            text.contains(
                "as an administrator, run: GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE \
                 \"public\".\"jobs\" TO \"amp-app\";"
            ),
            "{text}"
        );
        let mut no_schema = pg("no schema has been selected to create in");
        no_schema.code = "3F000".into();
        let text = privilege_error("bookkeeping", &no_schema, &who(), None, "").to_string();
        assert!(
            text.contains("search_path") && text.contains("nothing was changed"),
            "{text}"
        );
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }
}
