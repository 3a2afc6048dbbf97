//! SeaORM's migration command line for this crate: `cargo run -p migration -- status|up|down|...`
//! with `DATABASE_URL` set. Operators use `ampd migrate` instead, which adds locking, checksums and
//! all-or-nothing application.
use sea_orm_migration::prelude::*;

#[tokio::main]
async fn main() {
    cli::run_cli(migration::Migrator).await;
}
