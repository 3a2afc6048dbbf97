//! Checksums of this crate's migrations, computed from their source at build time.

#[path = "normalize.rs"]
mod normalize;

pub use normalize::{
    Algorithm, FrozenV1, canonical_tokens, effective_v1, parse_frozen_v1, source_checksum,
    source_checksum_v1,
};

include!(concat!(env!("OUT_DIR"), "/checksums.rs"));

fn lookup(table: &'static [(&'static str, &'static str)], name: &str) -> Option<&'static str> {
    table
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| table[i].1)
}

/// The checksum of the migration called `name` under the current algorithm, if it is one of ours.
pub fn checksum_of(name: &str) -> Option<&'static str> {
    lookup(CHECKSUMS, name)
}

/// The checksum of the migration called `name` under `algorithm`, if it is one of ours.
pub fn checksum_with(name: &str, algorithm: Algorithm) -> Option<&'static str> {
    match algorithm {
        Algorithm::V1 => lookup(CHECKSUMS_V1, name),
        Algorithm::V2 => lookup(CHECKSUMS, name),
    }
}

/// The version-1 values frozen for the migrations released under algorithm version 1.
pub const FROZEN_V1: &str = include_str!("../checksums-v1.txt");
