//! The compatibility table names only migrations of the migrator.

use migration::{Migrator, MigratorTrait};

#[test]
fn every_compatible_entry_is_a_migration_of_the_migrator() {
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    for entry in migration::compat::COMPATIBLE {
        assert!(
            names.iter().any(|n| n == entry),
            "{entry} is in compat::COMPATIBLE but is no migration of the migrator"
        );
    }
    assert!(!migration::compat::is_compatible(
        "m20000101_000001_not_reviewed"
    ));
}
