//! Migration checksums: what changes them and what must not.

use super::source;
use std::process::Command;

use migration::{
    Algorithm, CHECKSUMS, MigratorTrait, checksum_of, checksum_with, source_checksum,
    source_checksum_v1,
};

const SAMPLE: &str = "m20261101_000002_create_jobs";

/// Every released migration and its checksum under today's normaliser (checksum algorithm 1), as
/// deployed databases record it in `ampd_migrations`. Written out rather than computed: a change to
/// the normaliser that moved any of them would make every such database refuse to migrate.
/// Append a migration here once it is released; never change a line.
const RELEASED_V1: &[(&str, &str)] = &[
    (
        "m20261101_000001_create_workers",
        "ee3bccfab5a026c8614c9455c1e3339b19028370ad5714f6570113fdce35a219",
    ),
    (
        "m20261101_000002_create_jobs",
        "cba97ab9b38715590fed5aa4cdc37858a9289f1827187432a7bdd01d1a6404e1",
    ),
    (
        "m20261101_000003_create_datasets",
        "6ad7e7e1a7418f8bff131395c4d49370954a05be6e16d4706c5256d1cd1653c3",
    ),
    (
        "m20261101_000004_create_physical_tables",
        "3aaa4c50c8dccc1c1608c5542d6a998c0c8629a4c0ceaca2a28c5b111d1330ee",
    ),
    (
        "m20261101_000005_create_files",
        "a73cfaca6069b014939219f4f7ae0402b54fed5780490f985ea68d529542e334",
    ),
    (
        "m20261101_000006_add_jobs_idempotency_key",
        "70269302c1c3e7fc04447c3cbe99f120b4cd7b4797b8dd6a1ec887fc2cbb767c",
    ),
    (
        "m20261101_000007_backfill_jobs_idempotency_key",
        "eee392970c1cc661c6d26655f562ad5e3c8ffa7f4fa81184c91ab624bf286fc8",
    ),
];

#[test]
fn released_migrations_keep_the_checksums_deployed_databases_recorded() {
    for (name, released) in RELEASED_V1 {
        assert_eq!(
            checksum_with(name, Algorithm::V1),
            Some(*released),
            "{name}: the algorithm-1 checksum built into ampd changed"
        );
        assert_eq!(
            source_checksum_v1(&source(name)).as_deref(),
            Ok(*released),
            "{name}: the algorithm-1 checksum of its source changed"
        );
    }
    // Every migration this build knows, but the newest ones not yet released, is in the table.
    let released: Vec<&str> = RELEASED_V1.iter().map(|(name, _)| *name).collect();
    let known: Vec<&str> = CHECKSUMS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        &known[..released.len()],
        &released[..],
        "released migrations are neither removed nor reordered"
    );
}

#[test]
fn every_migration_has_the_checksum_of_its_source() {
    let names: Vec<String> = migration::Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    assert_eq!(
        names.len(),
        CHECKSUMS.len(),
        "one checksum per migration file"
    );
    for name in &names {
        let built = checksum_of(name).unwrap_or_else(|| panic!("{name} has a checksum"));
        assert_eq!(built, source_checksum(&source(name)).unwrap(), "{name}");
        assert_eq!(built.len(), 64);
    }
    let unique: std::collections::HashSet<_> = CHECKSUMS.iter().map(|(_, c)| c).collect();
    assert_eq!(
        unique.len(),
        CHECKSUMS.len(),
        "different migrations, different checksums"
    );
}

#[test]
fn comments_doc_comments_and_whitespace_do_not_change_a_checksum() {
    let original = source(SAMPLE);
    let commented = original
        .replace(
            "#[async_trait::async_trait]",
            "/* block */ #[async_trait::async_trait] // trailing",
        )
        .replace(
            "pub struct Migration;",
            "/// A doc comment.\n/// Another.\npub struct Migration; // c",
        )
        .replace(
            "    async fn down(",
            "    // Explaining down.\n    /// Documented.\n    async fn down(",
        );
    assert_ne!(commented, original);
    let squeezed: String = original
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .collect::<Vec<_>>()
        .join(" ");
    let expected = source_checksum(&original).unwrap();
    assert_eq!(source_checksum(&commented).unwrap(), expected);
    assert_eq!(source_checksum(&squeezed).unwrap(), expected);
}

#[test]
fn trailing_commas_and_import_order_do_not_change_a_checksum() {
    let original = source(SAMPLE);
    let expected = source_checksum(&original).unwrap();
    let commas = original
        .replace(".auto_increment(),\n", ".auto_increment(),,\n")
        .replace("\"FATAL\",\n];", "\"FATAL\"\n];");
    assert_ne!(commas, original);
    // (A doubled comma is not Rust; the point is the closing one, which rustfmt adds or drops.)
    let commas = commas.replace(",,", ",");
    assert_eq!(source_checksum(&commas).unwrap(), expected);
    let reordered = format!("use std::fmt;\n{original}");
    assert_eq!(source_checksum(&reordered).unwrap(), expected);
}

#[test]
fn rustfmt_of_a_badly_formatted_copy_gives_the_same_checksum() {
    let original = source(SAMPLE);
    let expected = source_checksum(&original).unwrap();
    let ugly = original.replace('\n', " \n\n ").replace("    ", "\t");
    let dir = std::env::temp_dir().join(format!("checksum-rustfmt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("m.rs");
    std::fs::write(&file, &ugly).unwrap();
    let status = Command::new("rustfmt")
        .args(["--edition", "2024"])
        .arg(&file)
        .status();
    let formatted = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.expect("rustfmt runs").success());
    assert_ne!(formatted, ugly);
    assert_eq!(source_checksum(&formatted).unwrap(), expected);
    assert_eq!(source_checksum(&ugly).unwrap(), expected);
}

#[test]
fn a_real_change_to_what_a_migration_does_changes_its_checksum() {
    let original = source(SAMPLE);
    let expected = source_checksum(&original).unwrap();
    for (from, to) in [
        (
            "ColumnDef::new(Jobs::Kind).text()",
            "ColumnDef::new(Jobs::Kind).string()",
        ),
        ("\"jobs_status_check\"", "\"jobs_status_chk\""),
        (".default(0)", ".default(1)"),
        ("ForeignKeyAction::Cascade", "ForeignKeyAction::SetNull"),
        ("\"FATAL\",\n];", "\"FATAL\",\n    \"PAUSED\",\n];"),
    ] {
        assert!(original.contains(from), "{from}");
        let changed = original.replacen(from, to, 1);
        assert_ne!(
            source_checksum(&changed).unwrap(),
            expected,
            "{from} -> {to}"
        );
    }
}

#[test]
fn text_that_is_not_rust_has_no_checksum() {
    assert!(source_checksum("fn x() { \"unterminated }").is_err());
}
