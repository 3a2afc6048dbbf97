//! What registering a manifest involves besides the database: its file under the data directory
//! (content-addressed, written whole or not at all), the check of its CSV sources against the
//! sources directory, and the one transaction that registers, links and tags it.

use std::io;
use std::path::{Path, PathBuf};

use sea_orm::{ConnectionTrait, TransactionSession, TransactionTrait};
use serde_json::value::RawValue;

use crate::manifest::{self, ManifestError, Source, StaticManifest};
use crate::metadata::{self, datasets};

/// Stores manifest `content` (whose hash is `hash`) at `<data_dir>/manifests/<hash>.json` and
/// returns that path relative to `data_dir` (`manifest_files.path`). The file is written to a
/// temporary name and renamed into place, so a reader sees all of it or nothing; a file already
/// there with the same bytes is kept.
pub async fn store(data_dir: &Path, hash: &str, content: &[u8]) -> io::Result<String> {
    let relative = manifest::manifest_path(hash);
    let path = data_dir.join(&relative);
    if holds(&path, content).await {
        return Ok(relative);
    }
    let dir = path.parent().unwrap_or(data_dir);
    tokio::fs::create_dir_all(dir).await?;
    let temp = dir.join(format!(".{hash}.{}.tmp", uuid::Uuid::now_v7()));
    let written = write_synced(&temp, content).await;
    let renamed = match written {
        Ok(()) => tokio::fs::rename(&temp, &path).await,
        Err(e) => Err(e),
    };
    if renamed.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    renamed.map(|()| relative)
}

/// Whether the file at `path` holds exactly `content`, compared a piece at a time (a manifest can
/// be as large as a request body; reading it whole would hold it twice).
async fn holds(path: &Path, content: &[u8]) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return false;
    };
    if !file
        .metadata()
        .await
        .is_ok_and(|m| m.len() == content.len() as u64)
    {
        return false;
    }
    let mut piece = vec![0; 64 * 1024];
    let mut at = 0;
    loop {
        match file.read(&mut piece).await {
            Ok(0) => return at == content.len(),
            Ok(n) if content.get(at..at + n) == Some(&piece[..n]) => at += n,
            _ => return false,
        }
    }
}

async fn write_synced(path: &Path, content: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(path).await?;
    file.write_all(content).await?;
    file.sync_all().await
}

/// Reads back the manifest stored at `relative` (`manifest_files.path`) under `data_dir`: its
/// bytes, checked to be JSON, not parsed into a tree.
pub async fn load(data_dir: &Path, relative: &str) -> io::Result<Box<RawValue>> {
    let bytes = tokio::fs::read(data_dir.join(relative)).await?;
    let text = String::from_utf8(bytes).map_err(io::Error::other)?;
    RawValue::from_string(text).map_err(io::Error::other)
}

/// Checks every CSV source of `manifest` in `sources_dir`, when that directory exists here (the
/// controller may run where the workers' sources are not visible; the worker checks again): the
/// file must open beneath the directory as a regular file ([`manifest::open_source`]: no
/// absolute path, `..` or symbolic link leading out) and its header row must name the table's columns, in order. Rows
/// are checked by the worker as it reads them.
pub async fn check_sources<R>(
    sources_dir: PathBuf,
    max_record_bytes: u64,
    manifest: &StaticManifest<R>,
) -> Result<(), ManifestError> {
    let csv: Vec<(String, String, Vec<String>)> = manifest
        .tables
        .iter()
        .filter_map(|t| match &t.source {
            Source::Csv(path) => Some((
                t.name.clone(),
                path.clone(),
                t.columns.iter().map(|c| c.name.clone()).collect(),
            )),
            Source::Rows(_) => None,
        })
        .collect();
    if csv.is_empty() {
        return Ok(());
    }
    let check = move || {
        if !sources_dir.is_dir() {
            tracing::debug!(
                sources_dir = %sources_dir.display(),
                "sources directory not visible here; the worker checks the CSV sources"
            );
            return Ok(());
        }
        for (table, path, columns) in &csv {
            check_csv(&sources_dir, max_record_bytes, table, path, columns)?;
        }
        Ok(())
    };
    tokio::task::spawn_blocking(check)
        .await
        .unwrap_or_else(|e| {
            Err(ManifestError {
                at: "tables".into(),
                message: format!("checking the CSV sources failed: {e}"),
            })
        })
}

fn check_csv(
    sources_dir: &Path,
    max_record_bytes: u64,
    table: &str,
    path: &str,
    columns: &[String],
) -> Result<(), ManifestError> {
    let at = format!("tables.{table}.csv");
    let fail = |message: String| ManifestError {
        at: at.clone(),
        message,
    };
    let file = manifest::open_source(sources_dir, path).map_err(|e| fail(e.to_string()))?;
    // Only the header row is read, and no more of it than the record limit.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(manifest::RecordBound::new(file, max_record_bytes, 8 * 1024));
    let header =
        manifest::headers_bounded(&mut reader).map_err(|e| {
            match manifest::record_too_long(&e) {
                Some(limit) => fail(format!(
                    "{path:?} line 1: a record longer than {limit} bytes (`[worker] \
                 max_csv_record_bytes`)"
                )),
                None => fail(format!("cannot read the header row of {path:?}: {e}")),
            }
        })?;
    if let Some(problem) =
        manifest::header_mismatch(header.iter(), columns.iter().map(String::as_str))
    {
        return Err(fail(format!("{path:?} line 1: {problem}")));
    }
    Ok(())
}

/// Registers manifest `content` of `kind` stored at `path`, links it to dataset `namespace/name`
/// (which moves `dev` to it) and tags it `version` (which may move `latest`), in one transaction:
/// all of it happens or none. Returns the manifest's hash. `Conflict` when the version already
/// names another manifest.
pub async fn register<C>(
    db: &C,
    namespace: &str,
    name: &str,
    version: &str,
    kind: &str,
    content: &[u8],
    path: &str,
) -> metadata::Result<String>
where
    C: ConnectionTrait + TransactionTrait,
{
    let tx = db.begin().await?;
    let hash = datasets::register_manifest(&tx, kind, content, path).await?;
    datasets::link(&tx, namespace, name, &hash).await?;
    datasets::tag(&tx, namespace, name, version, &hash).await?;
    tx.commit().await?;
    Ok(hash)
}
