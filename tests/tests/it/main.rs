//! The integration tests of the ampd metadata database, one module per domain, in one test binary:
//! one link of ampd, SeaORM and sqlx, one private PostgreSQL cluster for the run, and every test
//! free to run beside every other (each on a database of its own; see `tests/README.md`).

mod ampd_migrate;
mod config_secrets;
mod controller_api;
mod e2e;
mod entities;
mod fault_proxy;
mod foreign_keys;
mod job_fencing;
mod metadata_datasets;
mod metadata_errors;
mod metadata_files;
mod metadata_gc;
mod metadata_jobs;
mod metadata_notifications;
mod metadata_revisions;
mod metadata_workers;
mod migrate_checksums;
mod migrate_cli;
mod migrate_dryrun;
mod migrate_edges;
mod migrate_faults;
mod migrate_frozen;
mod migrate_impact;
mod migrate_nontx;
mod migrate_pooler;
mod migrate_scaling;
mod notify_hostile;
mod pgbouncer;
mod schema;
mod sea_orm_cli;
mod server_rows;
mod services;
mod solo;
mod tcp_nodelay;
mod upgrade_with_data;
mod worker_jobs;
