//! `materialize-static`: writes every table of a static manifest ([`crate::manifest`]) as JSON
//! Lines files into a new revision of that table.
//!
//! 1. The descriptor names the dataset and the manifest's hash; the manifest is read from
//!    `<data_dir>/<manifest_files.path>`, checked against its hash, and parsed.
//! 2. Every CSV source is resolved inside the sources directory before anything is read or written
//!    ([`manifest::resolve_source`]): a path that is absolute, uses `..` or leads outside through a
//!    symbolic link ends the job FATAL with nothing read.
//! 3. Then per table, in name order: register the table, create a revision through the job's claim
//!    whose metadata is a [`RevisionMeta`], and write the rows into `part-00000.jsonl`,
//!    `part-00001.jsonl`, ... of at most `rows_per_file` rows each under `<data_dir>/<revision
//!    path>/`. Each file is written as `<name>.tmp`, fsynced, renamed, and then registered with its
//!    size, its rows and its sha256 ([`FileMeta`]). A table without rows has no files.
//! 4. The revisions go back to the runner, which activates them with the job's completion.
//!
//! A CSV is read twice, streaming, so memory does not grow with its size: once to check its header
//! and count its rows (the revision's `rows`, recorded when it is created), once to write them. A
//! file whose row count changed in between fails the attempt. The job's token is looked at every
//! [`CHECK_EVERY`] rows, so a stop or a shutdown ends the work within a fraction of a second.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{Failure, Job, JobError, JobKind};
use crate::manifest::{
    self, Column, FORMAT_JSONL, FileMeta, RevisionMeta, RowEncoder, Source, SourceError,
    StaticManifest,
};
use crate::metadata::jobs::{self, Target};
use crate::metadata::{datasets, files, revisions};

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
                    let path = manifest::resolve_source(&job.settings.sources_dir, &relative)
                        .map_err(|e| refused_source(e, &table.name))?;
                    Input::Csv { path, relative }
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
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid("manifest".into(), format!("manifest: not JSON: {e}")))?;
    StaticManifest::parse(&value).map_err(|e| invalid(e.at.clone(), e.to_string()))
}

/// Why a table's CSV source is refused: the job can never succeed.
fn refused_source(err: SourceError, table: &str) -> JobError {
    let reason = match err {
        SourceError::Outside(_) => "source_outside",
        SourceError::Unreadable { .. } => "source_unreadable",
    };
    JobError::fatal(Failure::new(reason, err.to_string()).table(table))
}

/// Where a table's rows come from.
enum Input {
    /// Given in the manifest.
    Rows(Vec<Vec<serde_json::Value>>),
    /// A CSV file, resolved inside the sources directory.
    Csv {
        /// The resolved file.
        path: PathBuf,
        /// The path as the manifest gives it, for messages.
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

    let (rows, count) = match input {
        Input::Rows(rows) => {
            let count = rows.len() as u64;
            let rows = Rows::Inline {
                rows: rows.into_iter(),
                index: 0,
            };
            (rows, count)
        }
        Input::Csv { path, relative } => {
            let (table, columns) = (table.clone(), columns.clone());
            let reader = blocking(job, move |cancel| {
                let mut counting = open_csv(&path, &relative, &table, &columns)?;
                let count = count_rows(&mut counting, &relative, &table, &columns, &cancel)?;
                let reader = open_csv(&path, &relative, &table, &columns)?;
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
    };
    let meta = serde_json::to_value(RevisionMeta {
        format: FORMAT_JSONL.to_owned(),
        columns: columns.clone(),
        rows: count,
    })
    .map_err(|e| JobError::failed(Failure::new("internal", e.to_string())))?;
    let revision = job
        .call("create a revision", || {
            revisions::create_revision(&job.db, physical.id, Some(&job.claim), meta.clone())
        })
        .await?;
    let dir = under(&job.settings.data_dir, &revision.path).ok_or_else(|| {
        JobError::failed(Failure::new(
            "internal",
            format!(
                "revision {} has path {:?}, not a plain relative path",
                revision.id, revision.path
            ),
        ))
    })?;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io_failure(&table, format!("cannot create {}: {e}", dir.display())))?;

    let limit = job.settings.rows_per_file;
    let mut source = Some(TableRows {
        encoder: RowEncoder::new(&columns),
        table: table.clone(),
        columns,
        rows,
    });
    let (mut files_written, mut rows_written) = (0usize, 0u64);
    while let Some(mut rows) = source.take() {
        let (index, dir) = (files_written, dir.clone());
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
                revision.id,
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
        tracing::debug!(
            job_id = job.claim.job_id,
            table,
            file = part.name,
            rows = part.rows,
            "file written"
        );
        source = Some(rows);
    }
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

/// A bad row: `row` is the 1-based line of the file (or the row's index in the manifest, `at`
/// then says where), `column` the column's index.
fn bad_row(
    table: &str,
    columns: &[Column],
    row: Option<u64>,
    column: usize,
    message: String,
) -> JobError {
    JobError::fatal(Failure {
        row,
        column: columns.get(column).map(|c| c.name.clone()),
        ..Failure::new("bad_csv_row", message).table(table)
    })
}

/// Opens `path` as CSV and checks that its header names `columns` in order.
fn open_csv(
    path: &Path,
    relative: &str,
    table: &str,
    columns: &[Column],
) -> Result<csv::Reader<File>, JobError> {
    let file = File::open(path).map_err(|e| {
        JobError::fatal(
            Failure::new(
                "source_unreadable",
                format!("cannot open {relative:?} in the sources directory: {e}"),
            )
            .table(table),
        )
    })?;
    // The csv reader buffers by itself (`buffer_capacity`); a BufReader under it would copy twice.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .buffer_capacity(IO_BUFFER)
        .from_reader(file);
    let header = reader
        .headers()
        .map_err(|e| csv_failure(e, relative, table, columns))?;
    if !header.iter().eq(columns.iter().map(|c| c.name.as_str())) {
        return Err(JobError::fatal(Failure {
            row: Some(1),
            ..Failure::new(
                "bad_csv_header",
                format!(
                    "{relative:?}: the header row is {:?}; it must name the table's columns in \
                     order: {:?}",
                    header.iter().collect::<Vec<_>>().join(","),
                    columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            )
            .table(table)
        }));
    }
    Ok(reader)
}

/// The rows after the header of `reader`.
fn count_rows(
    reader: &mut csv::Reader<File>,
    relative: &str,
    table: &str,
    columns: &[Column],
    cancel: &CancellationToken,
) -> Result<u64, JobError> {
    let mut record = csv::ByteRecord::new();
    let mut count = 0u64;
    while reader
        .read_byte_record(&mut record)
        .map_err(|e| csv_failure(e, relative, table, columns))?
    {
        count += 1;
        if count.is_multiple_of(CHECK_EVERY) && cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
    }
    Ok(count)
}

/// A CSV reading error: I/O may pass, anything else is a bad file.
fn csv_failure(err: csv::Error, relative: &str, table: &str, columns: &[Column]) -> JobError {
    let line = err.position().map(|p| p.line());
    match err.kind() {
        csv::ErrorKind::Io(e) => io_failure(table, format!("cannot read {relative:?}: {e}")),
        csv::ErrorKind::Utf8 { err: utf8, .. } => bad_row(
            table,
            columns,
            line,
            utf8.field(),
            format!("{relative:?} line {}: not valid UTF-8", line.unwrap_or(0)),
        ),
        _ => JobError::fatal(Failure {
            row: line,
            ..Failure::new("bad_csv_row", format!("{relative:?}: {err}")).table(table)
        }),
    }
}

/// The rows of a table being written, read one at a time.
enum Rows {
    /// The manifest's rows.
    Inline {
        rows: std::vec::IntoIter<Vec<serde_json::Value>>,
        index: usize,
    },
    /// A CSV file past its header.
    Csv {
        reader: csv::Reader<File>,
        record: csv::StringRecord,
        relative: String,
    },
}

/// A table's rows with what encodes them.
struct TableRows {
    table: String,
    columns: Vec<Column>,
    encoder: RowEncoder,
    rows: Rows,
}

impl TableRows {
    /// Appends the next row, encoded as a JSON line, to `out`; false when there is none.
    fn next_into(&mut self, out: &mut Vec<u8>) -> Result<bool, JobError> {
        match &mut self.rows {
            Rows::Inline { rows, index, .. } => {
                let Some(row) = rows.next() else {
                    return Ok(false);
                };
                let at = *index;
                *index += 1;
                self.encoder.encode_json(&row, out).map_err(|e| {
                    JobError::fatal(Failure {
                        at: Some(format!("tables.{}.rows[{at}][{}]", self.table, e.column)),
                        column: self.columns.get(e.column).map(|c| c.name.clone()),
                        ..Failure::new("invalid_manifest", e.message).table(&self.table)
                    })
                })?;
                Ok(true)
            }
            Rows::Csv {
                reader,
                record,
                relative,
            } => {
                let more = reader
                    .read_record(record)
                    .map_err(|e| csv_failure(e, relative, &self.table, &self.columns))?;
                if !more {
                    return Ok(false);
                }
                let line = record.position().map(|p| p.line());
                self.encoder.encode_text(record.iter(), out).map_err(|e| {
                    let name = self.columns.get(e.column).map(|c| c.name.as_str());
                    bad_row(
                        &self.table,
                        &self.columns,
                        line,
                        e.column,
                        format!(
                            "{relative:?} line {}, column {}: {}",
                            line.unwrap_or(0),
                            name.unwrap_or("(none)"),
                            e.message
                        ),
                    )
                })?;
                Ok(true)
            }
        }
    }
}

/// A file written and renamed into place.
#[derive(Debug)]
struct Part {
    name: String,
    size: u64,
    rows: u64,
    sha256: String,
}

/// Writes the next at most `limit` rows of `rows` into file `index` of `dir`; `None` when there
/// are no rows left (and then no file).
fn write_part(
    rows: &mut TableRows,
    dir: &Path,
    index: usize,
    limit: u64,
    cancel: &CancellationToken,
) -> Result<Option<Part>, JobError> {
    let mut line = Vec::with_capacity(512);
    if !rows.next_into(&mut line)? {
        return Ok(None);
    }
    let name = manifest::part_file_name(index);
    let mut out = TmpFile::create(dir.join(format!("{name}.tmp"))).map_err(|(path, e)| {
        io_failure(
            &rows.table,
            format!("cannot create {}: {e}", path.display()),
        )
    })?;
    let mut hasher = Sha256::new();
    let (mut size, mut count) = (0u64, 0u64);
    loop {
        out.write(&line).map_err(|(path, e)| {
            io_failure(&rows.table, format!("cannot write {}: {e}", path.display()))
        })?;
        hasher.update(&line);
        size += line.len() as u64;
        count += 1;
        line.clear();
        if count >= limit {
            break;
        }
        if count.is_multiple_of(CHECK_EVERY) && cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        if !rows.next_into(&mut line)? {
            break;
        }
    }
    out.persist(&dir.join(&name)).map_err(|(path, e)| {
        io_failure(&rows.table, format!("cannot write {}: {e}", path.display()))
    })?;
    Ok(Some(Part {
        name,
        size,
        rows: count,
        sha256: hex::encode(hasher.finalize()),
    }))
}

/// A file being written under a temporary name, removed if it is dropped before
/// [`TmpFile::persist`] succeeds.
struct TmpFile {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    persisted: bool,
}

type IoFailure = (PathBuf, std::io::Error);

impl TmpFile {
    fn create(path: PathBuf) -> Result<TmpFile, IoFailure> {
        match File::create(&path) {
            Ok(file) => Ok(TmpFile {
                writer: Some(BufWriter::with_capacity(IO_BUFFER, file)),
                path,
                persisted: false,
            }),
            Err(e) => Err((path, e)),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), IoFailure> {
        let result = match self.writer.as_mut() {
            Some(writer) => writer.write_all(bytes),
            None => Err(std::io::Error::other("already closed")),
        };
        result.map_err(|e| (self.path.clone(), e))
    }

    /// Flushes and fsyncs the file, renames it to `to`, and fsyncs the directory, so the name is
    /// only ever seen with the whole content.
    fn persist(mut self, to: &Path) -> Result<(), IoFailure> {
        let Some(writer) = self.writer.take() else {
            return Err((self.path.clone(), std::io::Error::other("already closed")));
        };
        let synced = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all());
        synced.map_err(|e| (self.path.clone(), e))?;
        std::fs::rename(&self.path, to).map_err(|e| (to.to_path_buf(), e))?;
        self.persisted = true;
        if let Some(dir) = to.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| (dir.to_path_buf(), e))?;
        }
        Ok(())
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if !self.persisted {
            drop(self.writer.take());
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn columns(spec: &[(&str, &str)]) -> Vec<Column> {
        spec.iter()
            .map(|(name, ty)| serde_json::from_value(json!({"name": name, "type": ty})).unwrap())
            .collect()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ampd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_cancelled_file_is_removed_and_nothing_is_left_behind() {
        let dir = scratch("cancelled-part");
        let columns = columns(&[("n", "int64")]);
        let mut rows = TableRows {
            table: "t".into(),
            encoder: RowEncoder::new(&columns),
            columns,
            rows: Rows::Inline {
                rows: (0..5000)
                    .map(|n| vec![json!(n)])
                    .collect::<Vec<_>>()
                    .into_iter(),
                index: 0,
            },
        };
        let cancel = CancellationToken::new();
        cancel.cancel();
        let written = write_part(&mut rows, &dir, 0, 10_000, &cancel);
        assert!(matches!(written, Err(JobError::Cancelled)), "{written:?}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_csv_field_that_is_not_utf8_names_its_line_and_column() {
        let dir = scratch("not-utf8");
        let path = dir.join("t.csv");
        std::fs::write(&path, b"a,b\n1,x\n2,\xff\n").unwrap();
        let columns = columns(&[("a", "int64"), ("b", "string")]);
        let reader = open_csv(&path, "t.csv", "t", &columns).unwrap();
        let mut rows = TableRows {
            table: "t".into(),
            encoder: RowEncoder::new(&columns),
            columns,
            rows: Rows::Csv {
                reader,
                record: csv::StringRecord::new(),
                relative: "t.csv".into(),
            },
        };
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let written = write_part(&mut rows, &out, 0, 10, &CancellationToken::new());
        let Err(JobError::Fatal(failure)) = written else {
            panic!("{written:?}");
        };
        assert_eq!(
            (failure.reason, failure.row, failure.column.as_deref()),
            ("bad_csv_row", Some(3), Some("b")),
            "{failure:?}"
        );
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
