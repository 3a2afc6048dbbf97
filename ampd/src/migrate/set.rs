//! The migrations a binary knows, and the checksums it knows them by.

use migration::{Algorithm, MigrationTrait, MigratorTrait};

/// The version of this ampd, recorded with each migration it applies.
pub const AMPD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Gives the checksum this binary knows a migration by, under a checksum algorithm.
type ChecksumFn = Box<dyn Fn(&str, Algorithm) -> Option<String> + Send + Sync>;

/// Says whether a migration was reviewed as compatible with binaries that do not know it.
type CompatFn = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// A list of migrations and the checksums this binary knows them by.
pub struct MigrationSet {
    migrations: Vec<Box<dyn MigrationTrait>>,
    checksum: ChecksumFn,
    compatible: CompatFn,
}

impl MigrationSet {
    /// The metadata schema's migrations (the `migration` crate), with the checksums computed from
    /// their source when this binary was built.
    pub fn ampd() -> Self {
        MigrationSet::with_algorithms(migration::Migrator::migrations(), |name, algorithm| {
            migration::checksum_with(name, algorithm).map(str::to_owned)
        })
    }

    /// Any list of migrations, in order, with each one's checksum under the current algorithm
    /// (used by tests and benchmarks). Under algorithm version 1, migrations of the metadata schema
    /// have their schema's value and others none.
    pub fn new(
        migrations: Vec<Box<dyn MigrationTrait>>,
        checksum: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        MigrationSet::with_algorithms(migrations, move |name, algorithm| {
            if algorithm == Algorithm::CURRENT {
                checksum(name)
            } else {
                migration::checksum_with(name, algorithm).map(str::to_owned)
            }
        })
    }

    /// Any list of migrations, in order, with each one's checksum under each algorithm.
    pub fn with_algorithms(
        migrations: Vec<Box<dyn MigrationTrait>>,
        checksum: impl Fn(&str, Algorithm) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        MigrationSet {
            migrations,
            checksum: Box::new(checksum),
            compatible: Box::new(migration::compat::is_compatible),
        }
    }

    /// This set with `compatible` saying which of its migrations binaries that do not know them
    /// may keep running on (by default the metadata schema's table, `migration::compat`).
    pub fn with_compatible(
        mut self,
        compatible: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.compatible = Box::new(compatible);
        self
    }

    /// Migration names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.migrations.iter().map(|m| m.name()).collect()
    }

    /// The migrations, in order.
    pub(super) fn migrations(&self) -> impl Iterator<Item = &dyn MigrationTrait> {
        self.migrations.iter().map(|m| m.as_ref())
    }

    /// The migration called `name`.
    pub(super) fn find(&self, name: &str) -> Option<&dyn MigrationTrait> {
        self.migrations().find(|m| m.name() == name)
    }

    /// Whether `name` was reviewed as compatible with binaries that do not know it (recorded with
    /// it when it is applied).
    pub(super) fn is_compatible(&self, name: &str) -> bool {
        (self.compatible)(name)
    }

    /// The checksum of `name` under `algorithm` (empty when this binary has none).
    pub(super) fn checksum(&self, name: &str, algorithm: Algorithm) -> String {
        (self.checksum)(name, algorithm).unwrap_or_default()
    }
}

/// Whether `migration` runs inside a transaction: unless it opts out with
/// `use_transaction() == Some(false)` (PostgreSQL's convention, as SeaORM's migrator follows it).
pub(super) fn uses_transaction(migration: &dyn MigrationTrait) -> bool {
    migration.use_transaction() != Some(false)
}
