//! Reading a table's rows (the manifest's, or a CSV file's) and writing them into part files.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{CHECK_EVERY, IO_BUFFER, io_failure};
use crate::manifest::{self, Column, RowEncoder, SourceError};
use crate::service::worker::kinds::{Failure, JobError};

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

/// Why a table's CSV source is refused: the job can never succeed.
pub(super) fn refused_source(err: SourceError, table: &str) -> JobError {
    let reason = match err {
        SourceError::Outside(_) => "source_outside",
        SourceError::Unreadable { .. } => "source_unreadable",
    };
    JobError::fatal(Failure::new(reason, err.to_string()).table(table))
}

/// Opens `relative` beneath `sources_dir` ([`manifest::open_source`]: the one open of the file,
/// refused when it leads outside or is not a regular file) as CSV and checks that its header
/// names `columns` in order.
pub(super) fn open_csv(
    sources: &Sources,
    relative: &str,
    table: &str,
    columns: &[Column],
) -> Result<CsvReader, JobError> {
    let file =
        manifest::open_source(&sources.dir, relative).map_err(|e| refused_source(e, table))?;
    csv_reader(file, sources.max_record_bytes, relative, table, columns)
}

/// Where CSV sources are read from, and the longest record read.
#[derive(Clone, Debug)]
pub(super) struct Sources {
    /// `[worker] sources_dir`.
    pub(super) dir: PathBuf,
    /// `[worker] max_csv_record_bytes`.
    pub(super) max_record_bytes: u64,
}

/// A CSV source being read, its records bounded ([`manifest::RecordBound`]).
pub(super) type CsvReader = csv::Reader<manifest::RecordBound<File>>;

/// The file of `reader` read again from its start, through the same handle, its header checked
/// again.
pub(super) fn rewind(
    reader: CsvReader,
    relative: &str,
    table: &str,
    columns: &[Column],
) -> Result<CsvReader, JobError> {
    let limit = reader.get_ref().limit();
    let mut file = reader.into_inner().into_inner();
    file.seek(SeekFrom::Start(0))
        .map_err(|e| io_failure(table, format!("cannot read {relative:?} again: {e}")))?;
    csv_reader(file, limit, relative, table, columns)
}

fn csv_reader(
    file: File,
    limit: u64,
    relative: &str,
    table: &str,
    columns: &[Column],
) -> Result<CsvReader, JobError> {
    // The csv reader buffers by itself (`buffer_capacity`); a BufReader under it would copy twice.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .buffer_capacity(IO_BUFFER)
        .from_reader(manifest::RecordBound::new(file, limit, IO_BUFFER));
    let header = manifest::headers_bounded(&mut reader)
        .map_err(|e| csv_failure(e, relative, table, columns))?;
    if let Some(problem) =
        manifest::header_mismatch(header.iter(), columns.iter().map(|c| c.name.as_str()))
    {
        return Err(JobError::fatal(Failure {
            row: Some(1),
            ..Failure::new("bad_csv_header", format!("{relative:?} line 1: {problem}")).table(table)
        }));
    }
    Ok(reader)
}

/// The rows after the header of `reader`.
pub(super) fn count_rows(
    reader: &mut CsvReader,
    relative: &str,
    table: &str,
    columns: &[Column],
    cancel: &CancellationToken,
) -> Result<u64, JobError> {
    let mut record = csv::StringRecord::new();
    let mut count = 0u64;
    let limit = reader.get_ref().limit();
    while manifest::read_bounded(reader, &mut record)
        .map_err(|e| csv_failure_at(e, limit, relative, table, columns))?
    {
        count += 1;
        if count.is_multiple_of(CHECK_EVERY) && cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
    }
    Ok(count)
}

/// The error of [`manifest::read_bounded`]: a record over the limit starting on a line, or a
/// CSV error.
fn csv_failure_at(
    err: Result<u64, csv::Error>,
    limit: u64,
    relative: &str,
    table: &str,
    columns: &[Column],
) -> JobError {
    match err {
        Ok(line) => record_too_long(limit, Some(line), relative, table),
        Err(e) => csv_failure(e, relative, table, columns),
    }
}

fn record_too_long(limit: u64, line: Option<u64>, relative: &str, table: &str) -> JobError {
    JobError::fatal(Failure {
        row: line,
        ..Failure::new(
            "record_too_long",
            format!(
                "{relative:?} line {}: a record longer than {limit} bytes (`[worker] \
                 max_csv_record_bytes`)",
                line.unwrap_or(1)
            ),
        )
        .table(table)
    })
}

/// A CSV reading error: I/O may pass, anything else is a bad file.
fn csv_failure(err: csv::Error, relative: &str, table: &str, columns: &[Column]) -> JobError {
    let line = err.position().map(|p| p.line());
    if let Some(limit) = manifest::record_too_long(&err) {
        // Only the header row is read without `read_bounded`.
        return record_too_long(limit, Some(line.unwrap_or(1)), relative, table);
    }
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
pub(super) enum Rows {
    /// The manifest's rows.
    Inline {
        rows: std::vec::IntoIter<Vec<serde_json::Value>>,
        index: usize,
    },
    /// A CSV file past its header.
    Csv {
        reader: CsvReader,
        record: csv::StringRecord,
        relative: String,
    },
}

/// A table's rows with what encodes them.
pub(super) struct TableRows {
    pub(super) table: String,
    pub(super) columns: Vec<Column>,
    pub(super) encoder: RowEncoder,
    pub(super) rows: Rows,
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
                let limit = reader.get_ref().limit();
                let more = manifest::read_bounded(reader, record)
                    .map_err(|e| csv_failure_at(e, limit, relative, &self.table, &self.columns))?;
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
pub(super) struct Part {
    pub(super) name: String,
    pub(super) size: u64,
    pub(super) rows: u64,
    pub(super) sha256: String,
}

/// Writes the next at most `limit` rows of `rows` into file `index` of `dir`; `None` when there
/// are no rows left (and then no file).
pub(super) fn write_part(
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
        std::fs::write(dir.join("t.csv"), b"a,b\n1,x\n2,\xff\n").unwrap();
        let columns = columns(&[("a", "int64"), ("b", "string")]);
        let reader = open_csv(&at(&dir), "t.csv", "t", &columns).unwrap();
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

#[cfg(test)]
fn at(dir: &Path) -> Sources {
    Sources {
        dir: dir.to_owned(),
        max_record_bytes: 1024 * 1024,
    }
}

#[cfg(test)]
mod source_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_record_over_the_limit_ends_fatal_naming_the_limit_with_bounded_reading() {
        let dir = std::env::temp_dir().join(format!("ampd-long-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let limit = 4096u64;
        let mut nul = b"a\n".to_vec();
        nul.resize(2 + 2 * limit as usize, 0);
        std::fs::write(dir.join("nul.csv"), &nul).unwrap();
        let mut quoted = b"a\n1\n\"".to_vec();
        quoted.extend(std::iter::repeat_n(b'\n', 2 * limit as usize));
        std::fs::write(dir.join("quoted.csv"), &quoted).unwrap();
        std::fs::write(dir.join("header.csv"), "a".repeat(2 * limit as usize)).unwrap();
        let columns: Vec<Column> =
            vec![serde_json::from_value(json!({"name": "a", "type": "string"})).unwrap()];
        let sources = Sources {
            dir: dir.clone(),
            max_record_bytes: limit,
        };
        for (name, row) in [("nul.csv", 2), ("quoted.csv", 3), ("header.csv", 1)] {
            let failed = open_csv(&sources, name, "t", &columns).and_then(|mut reader| {
                count_rows(&mut reader, name, "t", &columns, &CancellationToken::new())
            });
            let Err(JobError::Fatal(failure)) = &failed else {
                panic!("{name}: {failed:?}");
            };
            assert_eq!(failure.reason, "record_too_long", "{name}: {failure:?}");
            assert_eq!(failure.row, Some(row), "{name}: {failure:?}");
            assert!(failure.message.contains("4096"), "{failure:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_source_swapped_for_a_symlink_out_between_check_and_open_is_refused() {
        let dir = std::env::temp_dir().join(format!("ampd-swap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sources = dir.join("sources");
        std::fs::create_dir_all(&sources).unwrap();
        std::fs::write(sources.join("b.csv"), "a\n1\n").unwrap();
        std::fs::write(dir.join("secret.csv"), "a\n424242\n").unwrap();
        let columns: Vec<Column> =
            vec![serde_json::from_value(json!({"name": "a", "type": "int64"})).unwrap()];
        // The check before the job (the plan) passes, then the file is swapped for a link out.
        drop(manifest::open_source(&sources, "b.csv").unwrap());
        std::fs::remove_file(sources.join("b.csv")).unwrap();
        std::os::unix::fs::symlink(dir.join("secret.csv"), sources.join("b.csv")).unwrap();
        let opened = open_csv(&at(&sources), "b.csv", "b", &columns);
        let Err(JobError::Fatal(failure)) = &opened else {
            panic!("the file outside was opened");
        };
        assert_eq!(failure.reason, "source_outside", "{failure:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_file_line_and_column_never_its_contents() {
        let dir = std::env::temp_dir().join(format!("ampd-echo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("h.csv"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        std::fs::write(dir.join("c.csv"), "a\nsecret-value\n").unwrap();
        let columns: Vec<Column> =
            vec![serde_json::from_value(json!({"name": "a", "type": "int64"})).unwrap()];
        let Err(JobError::Fatal(header)) = open_csv(&at(&dir), "h.csv", "h", &columns) else {
            panic!("a header that names no column was accepted");
        };
        assert!(!header.message.contains("root"), "{header:?}");
        assert!(header.message.contains("\"h.csv\" line 1"), "{header:?}");
        let reader = open_csv(&at(&dir), "c.csv", "c", &columns).unwrap();
        let mut rows = TableRows {
            table: "c".into(),
            encoder: RowEncoder::new(&columns),
            columns,
            rows: Rows::Csv {
                reader,
                record: csv::StringRecord::new(),
                relative: "c.csv".into(),
            },
        };
        let Err(JobError::Fatal(cell)) = rows.next_into(&mut Vec::new()) else {
            panic!("a value that is not an int64 was accepted");
        };
        assert!(!cell.message.contains("secret"), "{cell:?}");
        assert!(
            cell.message.contains("\"c.csv\" line 2, column a"),
            "{cell:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
