//! Finding PostgreSQL's server programs (`initdb` and `postgres`), in this order:
//!
//! 1. the first `PATH` entry holding both (a symbolic link, as in `/usr/local/bin/initdb ->
//!    /usr/lib/postgresql/15/bin/initdb`, is followed to the directory of the programs);
//! 2. `pg_config --bindir` (the first `pg_config` on `PATH`);
//! 3. `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu), the newest version first.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{PostgresError, Result};

/// The directory whose `<version>/bin` subdirectories [`find_bindir`] looks in last.
pub const VERSIONS_DIR: &str = "/usr/lib/postgresql";

/// For tests only: replaces [`VERSIONS_DIR`], so that a test can make the search find nothing on a
/// machine that has PostgreSQL there.
pub const VERSIONS_DIR_ENV: &str = "AMP_TEST_PG_VERSIONS_DIR";

/// Where [`find_bindir_in`] looks.
#[derive(Debug, Clone)]
pub struct Search {
    /// The `PATH` to search (also for `pg_config`).
    pub path: OsString,
    /// The directory of `<version>/bin` installations.
    pub versions_dir: PathBuf,
}

impl Search {
    /// This process's `PATH` and [`VERSIONS_DIR`] (or `$AMP_TEST_PG_VERSIONS_DIR`).
    pub fn from_env() -> Search {
        Search {
            path: std::env::var_os("PATH").unwrap_or_default(),
            versions_dir: std::env::var_os(VERSIONS_DIR_ENV)
                .filter(|d| !d.is_empty())
                .map_or_else(|| PathBuf::from(VERSIONS_DIR), PathBuf::from),
        }
    }
}

fn has_server_programs(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// The directory of PostgreSQL's programs: `explicit` when given (it must hold them), else the
/// first found in the order of the module's documentation, in this process's environment.
pub fn find_bindir(explicit: Option<&Path>) -> Result<PathBuf> {
    match explicit {
        Some(dir) if has_server_programs(dir) => Ok(dir.to_owned()),
        Some(dir) => Err(PostgresError::NotFound {
            looked: format!("{} (as configured)", dir.display()),
        }),
        None => find_bindir_in(&Search::from_env()),
    }
}

/// [`find_bindir`] in the places `search` names.
pub fn find_bindir_in(search: &Search) -> Result<PathBuf> {
    let path: Vec<PathBuf> = std::env::split_paths(&search.path).collect();
    if let Some(dir) = path.iter().find(|d| has_server_programs(d)) {
        // Follow a link to the installation, where the other programs (pg_ctl, psql) are too.
        let real = dir
            .join("initdb")
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
            .filter(|d| has_server_programs(d));
        return Ok(real.unwrap_or_else(|| dir.clone()));
    }
    let pg_config = match path
        .iter()
        .map(|d| d.join("pg_config"))
        .find(|p| p.is_file())
    {
        None => "no pg_config on PATH".to_owned(),
        Some(pg_config) => match bindir_of(&pg_config) {
            Some(dir) if has_server_programs(&dir) => return Ok(dir),
            Some(dir) => format!("{}: no initdb and postgres there", dir.display()),
            None => format!("{} failed", pg_config.display()),
        },
    };
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(&search.versions_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server_programs(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    Err(PostgresError::NotFound {
        looked: format!(
            "PATH, `pg_config --bindir` ({pg_config}) and {}/<version>/bin",
            search.versions_dir.display()
        ),
    })
}

/// What `pg_config --bindir` says.
fn bindir_of(pg_config: &Path) -> Option<PathBuf> {
    let out = Command::new(pg_config)
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with fake `initdb` and `postgres` files.
    fn install(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for program in ["initdb", "postgres"] {
            std::fs::write(dir.join(program), "").unwrap();
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ampd-find-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn path_comes_first_then_the_newest_version() {
        let root = scratch("order");
        let versions = root.join("versions");
        install(&versions.join("9/bin"));
        install(&versions.join("16/bin"));
        install(&versions.join("15/bin"));
        std::fs::create_dir_all(versions.join("17/bin")).unwrap(); // no programs: skipped
        std::fs::create_dir_all(versions.join("notes")).unwrap();
        let on_path = root.join("on-path");
        install(&on_path);
        let empty = root.join("empty");
        std::fs::create_dir_all(&empty).unwrap();

        let search = |path: &[&Path]| Search {
            path: std::env::join_paths(path).unwrap(),
            versions_dir: versions.clone(),
        };
        assert_eq!(
            find_bindir_in(&search(&[&empty, &on_path])).unwrap(),
            on_path
        );
        // pg_config (the first on PATH) before the versions.
        let pg_config_dir = root.join("pg-config");
        let reported = root.join("reported/bin");
        install(&reported);
        std::fs::create_dir_all(&pg_config_dir).unwrap();
        let script = pg_config_dir.join("pg_config");
        std::fs::write(&script, format!("#!/bin/sh\necho {}\n", reported.display())).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_bindir_in(&search(&[&empty, &pg_config_dir, &on_path])).unwrap(),
            on_path,
            "PATH first"
        );
        assert_eq!(
            find_bindir_in(&search(&[&empty, &pg_config_dir])).unwrap(),
            reported
        );
        assert_eq!(
            find_bindir_in(&search(&[&empty])).unwrap(),
            versions.join("16/bin")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_link_on_path_leads_to_the_installation() {
        let root = scratch("link");
        let install_dir = root.join("pg/bin");
        install(&install_dir);
        let links = root.join("links");
        std::fs::create_dir_all(&links).unwrap();
        for program in ["initdb", "postgres"] {
            std::os::unix::fs::symlink(install_dir.join(program), links.join(program)).unwrap();
        }
        let search = Search {
            path: links.clone().into_os_string(),
            versions_dir: root.join("none"),
        };
        assert_eq!(
            find_bindir_in(&search).unwrap(),
            install_dir.canonicalize().unwrap()
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn nothing_found_is_one_line_naming_every_place() {
        let root = scratch("none");
        let search = Search {
            path: root.clone().into_os_string(),
            versions_dir: root.join("versions"),
        };
        let message = find_bindir_in(&search).unwrap_err().to_string();
        assert!(!message.contains('\n'), "{message}");
        for part in [
            "initdb, postgres",
            "PATH",
            "`pg_config --bindir` (no pg_config on PATH)",
            &format!("{}/<version>/bin", root.join("versions").display()),
            "apt-get install postgresql",
        ] {
            assert!(message.contains(part), "{part:?} in {message}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
