//! A private PostgreSQL cluster for scripts, started the way the test harness starts its own
//! (`tests::cluster`): prints the cluster's admin URL and the directory of PostgreSQL's programs,
//! one per line, then runs until its standard input closes, and stops the cluster.
//!
//! ```sh
//! coproc PG { cargo run -q -p tests --bin ampd-test-pg; }
//! read -r admin_url <&"${PG[0]}"; read -r bindir <&"${PG[0]}"
//! ```

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use tests::cluster::PrivateCluster;

fn main() -> ExitCode {
    let cluster = match PrivateCluster::start() {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("error: cannot start a private PostgreSQL cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{}", cluster.admin_url())
        .and_then(|()| writeln!(out, "{}", cluster.bindir().display()))
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(out);
    // Until whoever started us closes our standard input (or exits).
    let _ = std::io::stdin().lock().read_to_end(&mut Vec::new());
    drop(cluster);
    ExitCode::SUCCESS
}
