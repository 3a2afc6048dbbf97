//! The ampd daemon's library: configuration, the metadata database (migrations and data access),
//! the long-running services, and the command line the `ampd` binary runs.

pub mod cli;
pub mod config;
pub mod db;
pub mod failpoint;
pub mod keepalive;
mod logging;
pub mod manifest;
pub mod metadata;
pub mod metrics;
pub mod migrate;
mod migrate_cmd;
pub mod postgres;
pub mod redact;
pub mod retry;
pub mod service;
mod service_cmd;
pub mod solo;
