//! The migration crate's tests in one binary: checksums and their algorithm versions, and
//! the compatibility table.

mod checksum;
mod checksum_versions;
mod compat;

/// The source text of migration `name` (`migration/src/<name>.rs`).
fn source(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(format!("{name}.rs")),
    )
    .expect("migration source")
}
