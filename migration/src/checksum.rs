//! Checksums of this crate's migrations, computed from their source at build time.

#[path = "normalize.rs"]
mod normalize;

pub use normalize::{canonical_tokens, source_checksum};

include!(concat!(env!("OUT_DIR"), "/checksums.rs"));

/// The checksum of the migration called `name` as this build knows it, if it is one of ours.
pub fn checksum_of(name: &str) -> Option<&'static str> {
    CHECKSUMS
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| CHECKSUMS[i].1)
}
