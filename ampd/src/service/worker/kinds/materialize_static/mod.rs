//! `materialize-static`: writes every table of a static manifest ([`crate::manifest`]) as JSON
//! Lines files into a new revision of that table.
//!
//! 1. The descriptor names the dataset and the manifest's hash; the manifest is read from
//!    `<data_dir>/<manifest_files.path>`, checked against its hash, and parsed.
//! 2. Every CSV source is opened beneath the sources directory before anything is written
//!    ([`manifest::open_source`]): a path that is absolute, uses `..`, leads outside through a
//!    symbolic link or is not a regular file ends the job FATAL with nothing read.
//! 3. Then per table, in name order: register the table, create a revision through the job's claim
//!    whose metadata is a [`RevisionMeta`], and write the rows into `part-00000.jsonl`,
//!    `part-00001.jsonl`, ... of at most `rows_per_file` rows each under `<data_dir>/<revision
//!    path>/`. Each file is written as `<name>.tmp`, fsynced, renamed, and then registered with its
//!    size, its rows and its sha256 ([`FileMeta`]). A table without rows has no files.
//! 4. The revisions go back to the runner, which activates them with the job's completion.
//!
//! A CSV is opened once when its table is written (beneath the sources directory again, so a file
//! swapped for a link out since step 2 is refused) and read twice through that handle, streaming,
//! so memory does not grow with its size: once to check its header and count its rows (the
//! revision's `rows`, recorded when it is created), once to write them. A file whose row count
//! changed in between fails the attempt. The job's token is looked at every
//! [`CHECK_EVERY`] rows, so a stop or a shutdown ends the work within a fraction of a second.

mod rows;

use std::path::{Component, Path, PathBuf};

use entity::physical_table_revisions;
use tokio_util::sync::CancellationToken;

use super::{Failure, Job, JobError, JobKind};
use crate::manifest::{
    self, Column, FORMAT_JSONL, FileMeta, RevisionMeta, RowEncoder, Source, StaticManifest,
    canonical,
};
use crate::metadata::jobs::{self, Target};
use crate::metadata::{datasets, files, revisions};
use crate::service::{
    self,
    storage::{Storage, StorageError},
};
use rows::{Rows, Sources, TableRows, count_rows, open_csv, refused_source, rewind, write_part};

/// Rows between two looks at the job's cancellation token.
const CHECK_EVERY: u64 = 1024;
/// The buffer of a CSV reader and of a file being written.
const IO_BUFFER: usize = 256 * 1024;

/// The `materialize-static` job kind.
pub struct MaterializeStatic;

#[async_trait::async_trait]
impl JobKind for MaterializeStatic {
    fn name(&self) -> &'static str {
        manifest::MATERIALIZE_STATIC
    }

    async fn run(&self, job: &Job) -> Result<Vec<i64>, JobError> {
        let target = jobs::target(&job.descriptor)
            .map_err(|e| JobError::fatal(Failure::new("invalid_descriptor", e.to_string())))?;
        let manifest = read_manifest(job, &target).await?;
        let mut plans = Vec::with_capacity(manifest.tables.len());
        for table in manifest.tables {
            let input = match table.source {
                Source::Rows(rows) => Input::Rows(rows),
                Source::Csv(relative) => {
                    // Refused before anything is written; opened again (once) when read.
                    manifest::open_source(&job.settings.sources_dir, &relative)
                        .map_err(|e| refused_source(e, &table.name))?;
                    Input::Csv { relative }
                }
            };
            plans.push(Plan {
                table: table.name,
                columns: table.columns,
                input,
            });
        }
        let mut written = Vec::with_capacity(plans.len());
        for plan in plans {
            written.push(write_table(job, &target, plan).await?);
        }
        Ok(written)
    }
}

/// `relative` under `root`, when it is a plain relative path (only normal components).
fn under(root: &Path, relative: &str) -> Option<PathBuf> {
    let path = Path::new(relative);
    let plain =
        !relative.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    plain.then(|| root.join(path))
}

/// The manifest the job names, read from the data directory, checked against its hash, parsed.
async fn read_manifest(job: &Job, target: &Target<'_>) -> Result<StaticManifest, JobError> {
    let hash = target.manifest_hash;
    let stored = job
        .call("read the manifest's registration", || {
            datasets::get_manifest(&job.db, hash)
        })
        .await?
        .ok_or_else(|| {
            JobError::fatal(Failure::new(
                "manifest_not_found",
                format!("manifest {hash} is not registered"),
            ))
        })?;
    let path = under(&job.settings.data_dir, &stored.path).ok_or_else(|| {
        JobError::fatal(Failure::new(
            "invalid_manifest",
            format!(
                "manifest {hash} is stored at {:?}, which is not a plain relative path in the data \
                 directory",
                stored.path
            ),
        ))
    })?;
    let bytes = tokio::fs::read(&path).await.map_err(|e| {
        JobError::failed(Failure::new(
            "manifest_unreadable",
            format!("cannot read manifest {hash} at {}: {e}", path.display()),
        ))
    })?;
    if datasets::manifest_hash(&bytes) != hash {
        return Err(JobError::fatal(Failure::new(
            "manifest_mismatch",
            format!(
                "the file {} does not hold manifest {hash}: its content has another hash",
                path.display()
            ),
        )));
    }
    let invalid = |at: String, message: String| {
        JobError::fatal(Failure {
            at: Some(at),
            ..Failure::new("invalid_manifest", message)
        })
    };
    let not_json = |e: String| invalid("manifest".into(), format!("manifest: not JSON: {e}"));
    // The controller stores canonical bytes; these are read as canonical again in case they were
    // written some other way, so the manifest's rules see them as the controller saw them.
    serde_json::from_slice::<canonical::Syntax>(&bytes).map_err(|e| not_json(e.to_string()))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| not_json(e.to_string()))?;
    let stored = canonical::canonical(text).map_err(|e| not_json(e.to_string()))?;
    let text = std::str::from_utf8(&stored).map_err(|e| not_json(e.to_string()))?;
    StaticManifest::parse(text).map_err(|e| invalid(e.at.clone(), e.to_string()))
}

/// Where a table's rows come from.
enum Input {
    /// Given in the manifest.
    Rows(Vec<Vec<serde_json::Value>>),
    /// A CSV file in the sources directory.
    Csv {
        /// The path as the manifest gives it.
        relative: String,
    },
}

/// One table to write.
struct Plan {
    table: String,
    columns: Vec<Column>,
    input: Input,
}

/// Writes table `plan` of `target` into a new revision; returns its id.
async fn write_table(job: &Job, target: &Target<'_>, plan: Plan) -> Result<i64, JobError> {
    let Plan {
        table,
        columns,
        input,
    } = plan;
    let physical = job
        .call("register the table", || {
            revisions::register_table(
                &job.db,
                target.namespace,
                target.name,
                target.manifest_hash,
                &table,
            )
        })
        .await?;
    let (rows, count) = open_rows(job, &table, &columns, input).await?;
    let (revision, dir) = new_revision(job, physical.id, &table, &columns, count).await?;
    let source = TableRows {
        encoder: RowEncoder::new(&columns),
        table: table.clone(),
        columns,
        rows,
    };
    let (files_written, rows_written) = write_files(job, revision.id, &dir, source).await?;
    if rows_written != count {
        return Err(JobError::failed(
            Failure::new(
                "source_changed",
                format!(
                    "the source had {count} rows when counted and {rows_written} when written: it \
                     changed while it was read"
                ),
            )
            .table(&table),
        ));
    }
    tracing::info!(
        job_id = job.claim.job_id,
        table,
        revision_id = revision.id,
        path = revision.path,
        rows = rows_written,
        files = files_written,
        "table written"
    );
    Ok(revision.id)
}

/// The rows of `input` and how many there are: a CSV is opened, its header checked and its rows
/// counted on the blocking pool, then opened again to be read.
async fn open_rows(
    job: &Job,
    table: &str,
    columns: &[Column],
    input: Input,
) -> Result<(Rows, u64), JobError> {
    Ok(match input {
        Input::Rows(rows) => {
            let count = rows.len() as u64;
            let rows = Rows::Inline {
                rows: rows.into_iter(),
                index: 0,
            };
            (rows, count)
        }
        Input::Csv { relative } => {
            let (table, columns) = (table.to_owned(), columns.to_vec());
            let sources = Sources {
                dir: job.settings.sources_dir.clone(),
                max_record_bytes: job.settings.max_csv_record_bytes,
            };
            let reader = blocking(job, move |cancel| {
                let mut counting = open_csv(&sources, &relative, &table, &columns)?;
                let count = count_rows(&mut counting, &relative, &table, &columns, &cancel)?;
                let reader = rewind(counting, &relative, &table, &columns)?;
                Ok((reader, count, relative))
            })
            .await??;
            let (reader, count, relative) = reader;
            let rows = Rows::Csv {
                reader,
                record: csv::StringRecord::new(),
                relative,
            };
            (rows, count)
        }
    })
}

/// A new revision of physical table `table_id` through the job's claim, recording its columns and
/// its `count` rows, and its directory, created.
async fn new_revision(
    job: &Job,
    table_id: i64,
    table: &str,
    columns: &[Column],
    count: u64,
) -> Result<(physical_table_revisions::Model, PathBuf), JobError> {
    let meta = serde_json::to_value(RevisionMeta {
        format: FORMAT_JSONL.to_owned(),
        columns: columns.to_vec(),
        rows: count,
    })
    .map_err(|e| JobError::failed(Failure::new("internal", e.to_string())))?;
    let revision = job
        .call("create a revision", || {
            revisions::create_revision(&job.db, table_id, Some(&job.claim), meta.clone())
        })
        .await?;
    crate::failpoint::failpoint!("worker::before_revision_dir");
    // Only while the revision's row names it and accepts files: one collected meanwhile (the
    // attempt was failed as lost, say) gets no directory.
    let storage = Storage::new(&job.settings.data_dir);
    let created = service::until_stopped(
        &job.cancel,
        storage.create_revision_dir(&job.db, revision.id, &revision.path),
    )
    .await;
    let dir = match created {
        None => return Err(JobError::Cancelled),
        Some(Ok(dir)) => dir,
        Some(Err(StorageError::Metadata(e))) => {
            return Err(JobError::from_metadata(
                "create the revision's directory",
                e,
            ));
        }
        Some(Err(e)) => return Err(io_failure(table, e.to_string())),
    };
    Ok((revision, dir))
}

/// Writes `source` into files of at most `rows_per_file` rows under `dir`, registering each into
/// revision `revision_id`; returns how many files and rows were written.
async fn write_files(
    job: &Job,
    revision_id: i64,
    dir: &Path,
    source: TableRows,
) -> Result<(usize, u64), JobError> {
    let limit = job.settings.rows_per_file;
    let table = source.table.clone();
    let mut source = Some(source);
    let (mut files_written, mut rows_written) = (0usize, 0u64);
    while let Some(mut rows) = source.take() {
        let (index, dir) = (files_written, dir.to_owned());
        let (rows, part) = blocking(job, move |cancel| {
            let part = write_part(&mut rows, &dir, index, limit, &cancel);
            Ok((rows, part))
        })
        .await??;
        let Some(part) = part? else { break };
        let size = i64::try_from(part.size).unwrap_or(i64::MAX);
        let file_meta = serde_json::to_value(FileMeta {
            rows: part.rows,
            sha256: part.sha256,
        })
        .map_err(|e| JobError::failed(Failure::new("internal", e.to_string())))?;
        job.call("register a file", || {
            files::register(
                &job.db,
                revision_id,
                &part.name,
                size,
                None,
                None,
                file_meta.clone(),
            )
        })
        .await?;
        files_written += 1;
        rows_written += part.rows;
        crate::metrics::materialized(part.rows, part.size);
        tracing::debug!(
            job_id = job.claim.job_id,
            table,
            file = part.name,
            rows = part.rows,
            "file written"
        );
        source = Some(rows);
    }
    Ok((files_written, rows_written))
}

/// Runs `work` on the blocking pool with the job's token; a worker thread that panicked is an
/// error of the attempt.
async fn blocking<T, F>(job: &Job, work: F) -> Result<Result<T, JobError>, JobError>
where
    T: Send + 'static,
    F: FnOnce(CancellationToken) -> Result<T, JobError> + Send + 'static,
{
    let cancel = job.cancel.clone();
    tokio::task::spawn_blocking(move || work(cancel))
        .await
        .map_err(|e| JobError::failed(Failure::new("internal", format!("a writer failed: {e}"))))
}

fn io_failure(table: &str, message: String) -> JobError {
    JobError::failed(Failure::new("io", message).table(table))
}
