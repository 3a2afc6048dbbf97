// Checksums every migration source file (`src/mYYYYMMDD_HHMMSS_<what>.rs`) at build time, so the
// binary carries the checksums of exactly the migrations it was built from: under the current
// algorithm, and under algorithm version 1 (frozen in `checksums-v1.txt` for the migrations
// released under it), which databases migrated before version 2 recorded.
use std::fmt::Write as _;
use std::path::Path;

#[allow(dead_code)]
mod normalize {
    include!("src/normalize.rs");
}

fn is_migration_file(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".rs") else {
        return false;
    };
    let b = stem.as_bytes();
    b.len() > 17
        && b[0] == b'm'
        && b[1..9].iter().all(u8::is_ascii_digit)
        && b[9] == b'_'
        && b[10..16].iter().all(u8::is_ascii_digit)
        && b[16] == b'_'
}

fn table(out: &mut String, doc: &str, name: &str, entries: &[(String, String)]) {
    writeln!(out, "/// {doc}").expect("write to string");
    writeln!(out, "pub static {name}: &[(&str, &str)] = &[").expect("write to string");
    for (migration, checksum) in entries {
        writeln!(out, "    ({migration:?}, {checksum:?}),").expect("write to string");
    }
    out.push_str("];\n");
}

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=checksums-v1.txt");
    let frozen = std::fs::read_to_string("checksums-v1.txt").expect("read checksums-v1.txt");
    let frozen =
        normalize::parse_frozen_v1(&frozen).unwrap_or_else(|e| panic!("checksums-v1.txt: {e}"));
    let src = Path::new("src");
    let mut current: Vec<(String, String)> = Vec::new();
    let mut v1: Vec<(String, String)> = Vec::new();
    for entry in std::fs::read_dir(src).expect("read migration/src") {
        let entry = entry.expect("read migration/src entry");
        let file = entry.file_name().to_string_lossy().into_owned();
        if !is_migration_file(&file) {
            continue;
        }
        let name = file.trim_end_matches(".rs").to_owned();
        let source = std::fs::read_to_string(entry.path()).expect("read migration source");
        let checksum =
            normalize::source_checksum(&source).unwrap_or_else(|e| panic!("{file}: {e}"));
        let old = normalize::effective_v1(&name, &source, &frozen)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        current.push((name.clone(), checksum));
        v1.push((name, old));
    }
    current.sort();
    v1.sort();
    let mut out = String::new();
    table(
        &mut out,
        "(migration name, checksum of its canonical source under the current algorithm), by name.",
        "CHECKSUMS",
        &current,
    );
    table(
        &mut out,
        "(migration name, its algorithm-1 checksum: frozen for released migrations), by name.",
        "CHECKSUMS_V1",
        &v1,
    );
    let dest = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("checksums.rs");
    std::fs::write(dest, out).expect("write checksums.rs");
}
