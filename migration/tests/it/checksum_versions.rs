//! Versions of the checksum algorithm: token spacing never counts in the current one, and the
//! values databases recorded with algorithm 1 stay what this build gives them.

use super::source;
use std::process::Command;

use migration::{
    Algorithm, CHECKSUMS_V1, FROZEN_V1, checksum_with, effective_v1, parse_frozen_v1,
    source_checksum, source_checksum_v1,
};

/// Runs the real rustfmt on `text` and returns what it wrote.
fn rustfmt(text: &str, tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!("checksum-versions-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("m.rs");
    std::fs::write(&file, text).expect("write");
    let status = Command::new("rustfmt")
        .args(["--edition", "2024"])
        .arg(&file)
        .status()
        .expect("rustfmt runs");
    let formatted = std::fs::read_to_string(&file).expect("read");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "rustfmt {tag}");
    formatted
}

/// `text` with the space after `:`, `,` and `=` removed where punctuation follows, as a person
/// typing quickly writes it (`manager:&SchemaManager`, `a=-1`): the lexer then sees joint
/// punctuation where rustfmt's output has it alone.
fn cramped(text: &str) -> String {
    text.replace(": &", ":&")
        .replace(", &", ",&")
        .replace(" = -", "=-")
        .replace(" = &", "=&")
}

#[test]
fn rustfmt_of_cramped_punctuation_changes_only_algorithm_1_and_deployed_values_hold() {
    let frozen = parse_frozen_v1(FROZEN_V1).expect("checksums-v1.txt");
    assert!(!frozen.is_empty());
    for released in &frozen {
        let original = source(&released.name);
        let tight = cramped(&original);
        assert_ne!(
            tight, original,
            "{} has punctuation to cramp",
            released.name
        );
        // A real rustfmt turns the cramped file back into the released one.
        assert_eq!(
            rustfmt(&tight, &released.name),
            original,
            "{}",
            released.name
        );

        // Algorithm 1 counted the spacing: this is what broke deployed databases.
        assert_ne!(
            source_checksum_v1(&tight).unwrap(),
            source_checksum_v1(&original).unwrap(),
            "{}",
            released.name
        );
        // The current algorithm does not.
        assert_eq!(
            source_checksum(&tight).unwrap(),
            source_checksum(&original).unwrap(),
            "{}",
            released.name
        );
        // And the algorithm-1 value this build gives a reformatted released migration is the one
        // deployed databases recorded.
        assert_eq!(
            effective_v1(&released.name, &tight, &frozen).unwrap(),
            released.v1,
            "{}",
            released.name
        );
    }
}

#[test]
fn the_spacing_of_a_small_cramped_function_does_not_count() {
    let tight = "fn f(x:&str)->i32{let a=-1;a+x.len()as i32}\n";
    let formatted = rustfmt(tight, "small");
    assert_ne!(formatted, tight);
    assert_eq!(
        source_checksum(&formatted).unwrap(),
        source_checksum(tight).unwrap()
    );
    assert_ne!(
        source_checksum_v1(&formatted).unwrap(),
        source_checksum_v1(tight).unwrap()
    );
}

#[test]
fn a_real_edit_of_a_released_migration_changes_both_algorithms() {
    let frozen = parse_frozen_v1(FROZEN_V1).expect("checksums-v1.txt");
    let name = "m20261101_000007_backfill_jobs_idempotency_key";
    let original = source(name);
    let released = frozen.iter().find(|f| f.name == name).expect("frozen");
    let edited = original.replacen("\"jobs_idempotency_key_key\"", "\"jobs_key_key\"", 1);
    assert_ne!(edited, original);
    assert_ne!(effective_v1(name, &edited, &frozen).unwrap(), released.v1);
    assert_ne!(source_checksum(&edited).unwrap(), released.v2);
}

#[test]
fn this_build_gives_released_migrations_their_frozen_algorithm_1_values() {
    let frozen = parse_frozen_v1(FROZEN_V1).expect("checksums-v1.txt");
    for released in &frozen {
        assert_eq!(
            checksum_with(&released.name, Algorithm::V1),
            Some(released.v1.as_str()),
            "{}",
            released.name
        );
        assert_eq!(
            checksum_with(&released.name, Algorithm::V2),
            Some(released.v2.as_str()),
            "{} is unchanged since algorithm 1 was frozen",
            released.name
        );
    }
    // Migrations released later have algorithm-1 values too (computed), but are recorded with
    // the current algorithm.
    assert!(CHECKSUMS_V1.len() > frozen.len());
}

#[test]
fn algorithm_versions_are_numbered_as_recorded() {
    assert_eq!(Algorithm::CURRENT, Algorithm::V2);
    for algorithm in Algorithm::ALL {
        assert_eq!(Algorithm::from_number(algorithm.number()), Some(algorithm));
    }
    assert_eq!(Algorithm::from_number(3), None);
    assert_eq!(Algorithm::from_number(0), None);
}

#[test]
fn a_malformed_frozen_table_is_refused_with_its_line() {
    let err = parse_frozen_v1("# comment\nm1 abc def\n").unwrap_err();
    assert!(err.starts_with("line 2:"), "{err}");
    let ok = parse_frozen_v1(&format!(
        "m1 {} {}  # released\n",
        "a".repeat(64),
        "b".repeat(64)
    ))
    .unwrap();
    assert_eq!(ok.len(), 1);
}
