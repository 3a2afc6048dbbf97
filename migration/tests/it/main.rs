//! The migration crate's tests in one binary: checksums and their algorithm versions, and
//! the compatibility table.

mod checksum;
mod checksum_versions;
mod compat;
