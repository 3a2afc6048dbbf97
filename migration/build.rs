// Checksums every migration source file (`src/mYYYYMMDD_HHMMSS_<what>.rs`) at build time, so the
// binary carries the checksum of exactly the migrations it was built from.
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

fn main() {
    println!("cargo:rerun-if-changed=src");
    let src = Path::new("src");
    let mut entries: Vec<(String, String)> = Vec::new();
    for entry in std::fs::read_dir(src).expect("read migration/src") {
        let entry = entry.expect("read migration/src entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_migration_file(&name) {
            continue;
        }
        let source = std::fs::read_to_string(entry.path()).expect("read migration source");
        let checksum =
            normalize::source_checksum(&source).unwrap_or_else(|e| panic!("{name}: {e}"));
        entries.push((name.trim_end_matches(".rs").to_owned(), checksum));
    }
    entries.sort();
    let mut out =
        String::from("/// (migration name, checksum of its canonical source), by name.\n");
    out.push_str("pub static CHECKSUMS: &[(&str, &str)] = &[\n");
    for (name, checksum) in &entries {
        writeln!(out, "    ({name:?}, {checksum:?}),").expect("write to string");
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("checksums.rs");
    std::fs::write(dest, out).expect("write checksums.rs");
}
