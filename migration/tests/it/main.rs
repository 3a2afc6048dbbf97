//! The migration crate's tests in one binary: checksums and their algorithm versions.

mod checksum;
mod checksum_versions;
