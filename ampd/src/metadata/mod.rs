//! Data access over the metadata database, one module per domain.
