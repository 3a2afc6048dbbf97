//! A revision's rows as a response body: its files opened (all of them, before the first byte is
//! sent), then streamed as JSON Lines (the files' bytes as they are) or converted to CSV line by
//! line. Memory stays constant whatever the table's size: a body holds one chunk at a time.
//!
//! An open file stays readable after it is unlinked (on Linux and every Unix), so once [`open`]
//! has returned, the garbage collector deleting the revision's files cannot cut the response
//! short: a request completes on the revision it started on.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde_json::value::RawValue;
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Take};
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use super::view::Active;
use crate::manifest::{Column, is_plain_relative};

/// Bytes read from a file, and the size of a CSV chunk, at a time.
const CHUNK: usize = 256 * 1024;

/// Why a revision's files could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A file does not exist (any more): the garbage collector deleted it, so the revision the
    /// view named is no longer active.
    #[error("{} is gone", .0.display())]
    Gone(PathBuf),
    /// A path from the database is not a plain relative path, so it could name something outside
    /// the data directory: nothing is opened.
    #[error(
        "revision {revision_id} names {path:?}, which is not a plain relative path under the data \
         directory; refusing to read it"
    )]
    UnsafePath {
        /// The revision.
        revision_id: i64,
        /// The path as stored (the revision's, or one of its files' names).
        path: String,
    },
    /// A file's size differs from the size it was registered with.
    #[error("{} has {actual} bytes but was registered with {registered}", .path.display())]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its registered size.
        registered: u64,
        /// Its size on disk.
        actual: u64,
    },
    /// A file could not be opened or examined for another reason.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// A file of a revision, open, limited to its registered size.
struct OpenFile {
    name: String,
    file: Take<File>,
}

/// The files of a revision, all open.
pub struct Opened {
    /// The revision.
    pub revision: Arc<Active>,
    files: Vec<OpenFile>,
}

impl Opened {
    /// The bytes of all the files together.
    pub fn len(&self) -> u64 {
        self.revision.files.iter().map(|f| f.size).sum()
    }

    /// Whether the files hold no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens every file of `revision` under `data_dir`, checking first that its path and the files'
/// names are plain relative paths, and then that each file has its registered size.
pub async fn open(data_dir: &Path, revision: Arc<Active>) -> Result<Opened, OpenError> {
    let unsafe_path = |path: &str| OpenError::UnsafePath {
        revision_id: revision.revision_id,
        path: path.to_owned(),
    };
    if !is_plain_relative(&revision.path) {
        return Err(unsafe_path(&revision.path));
    }
    if let Some(file) = revision.files.iter().find(|f| !is_plain_relative(&f.name)) {
        return Err(unsafe_path(&file.name));
    }
    let dir = data_dir.join(&revision.path);
    let mut files = Vec::with_capacity(revision.files.len());
    for entry in &revision.files {
        let path = dir.join(&entry.name);
        let io = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => OpenError::Gone(path.clone()),
            _ => OpenError::Io {
                path: path.clone(),
                source,
            },
        };
        let file = File::open(&path).await.map_err(io)?;
        let actual = file.metadata().await.map_err(io)?.len();
        if actual != entry.size {
            return Err(OpenError::SizeMismatch {
                path,
                registered: entry.size,
                actual,
            });
        }
        files.push(OpenFile {
            name: entry.name.clone(),
            file: file.take(entry.size),
        });
    }
    Ok(Opened { revision, files })
}

/// `stream`, ending with an error (which makes the server close the connection instead of ending
/// the response as if it were complete) when `abort` is cancelled first, with every error logged.
fn guarded<S>(stream: S, abort: CancellationToken, revision_id: i64) -> Body
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let stream = Box::pin(stream);
    let guarded = futures_util::stream::unfold(Some((stream, abort)), |state| async move {
        let (mut stream, abort) = state?;
        tokio::select! {
            biased;
            () = abort.cancelled() => Some((
                Err(io::Error::other("the server is stopping")),
                None,
            )),
            item = stream.next() => match item {
                Some(Ok(bytes)) => Some((Ok(bytes), Some((stream, abort)))),
                Some(Err(e)) => Some((Err(e), None)),
                None => None,
            },
        }
    })
    .inspect_err(move |error| {
        tracing::error!(revision_id, %error, "response cut short");
    });
    Body::from_stream(guarded)
}

/// The rows as JSON Lines: the files' bytes as they are, in order. Its length is
/// [`Opened::len`].
pub fn jsonl(opened: Opened, abort: CancellationToken) -> Body {
    let revision_id = opened.revision.revision_id;
    let stream = futures_util::stream::iter(opened.files)
        .flat_map(|f| ReaderStream::with_capacity(f.file, CHUNK));
    guarded(stream, abort, revision_id)
}

/// The rows as CSV: a header row of `columns`' names, then each JSON line's values in column
/// order ([`CsvEncoder`]).
/// A line longer than `max_row_bytes` ends the body with an error (the connection is cut).
pub fn csv(
    opened: Opened,
    columns: &[Column],
    max_row_bytes: usize,
    abort: CancellationToken,
) -> Body {
    let revision_id = opened.revision.revision_id;
    let state = CsvState {
        files: opened.files.into(),
        current: None,
        encoder: CsvEncoder::new(columns),
        line: Vec::new(),
        max_row_bytes,
        finished: false,
    };
    let stream = futures_util::stream::try_unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Ok(chunk.map(|c| (c, state)))
    });
    guarded(stream, abort, revision_id)
}

/// A file being converted.
struct Reading {
    name: String,
    reader: BufReader<Take<File>>,
    line: u64,
}

struct CsvState {
    files: VecDeque<OpenFile>,
    current: Option<Reading>,
    encoder: CsvEncoder,
    line: Vec<u8>,
    max_row_bytes: usize,
    finished: bool,
}

impl CsvState {
    /// The next chunk of about [`CHUNK`] bytes, `None` after the last.
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.encoder.pending() >= CHUNK {
                return Ok(Some(self.encoder.take()));
            }
            let Some(reading) = self.current.as_mut() else {
                match self.files.pop_front() {
                    Some(f) => {
                        self.current = Some(Reading {
                            name: f.name,
                            reader: BufReader::with_capacity(CHUNK, f.file),
                            line: 0,
                        });
                        continue;
                    }
                    None if self.finished => return Ok(None),
                    None => {
                        self.finished = true;
                        let rest = self.encoder.take();
                        return Ok((!rest.is_empty()).then_some(rest));
                    }
                }
            };
            self.line.clear();
            let read = read_row(&mut reading.reader, &mut self.line, self.max_row_bytes).await;
            if read.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{} line {}: {e}", reading.name, reading.line + 1),
                )
            })? == 0
            {
                self.current = None;
                continue;
            }
            reading.line += 1;
            self.encoder.row(&self.line).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} line {}: {e}", reading.name, reading.line),
                )
            })?;
        }
    }
}

/// Reads one line (with its `\n`) into `line`, as `read_until` does, but fails once the line is
/// longer than `max` bytes instead of growing `line` without bound; 0 at the end.
async fn read_row<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<usize> {
    let mut read = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(read);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a row longer than {max} bytes (`[server] max_row_bytes`)"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        read += take;
        if done {
            return Ok(read);
        }
    }
}

/// A CSV writer into a buffer of about one chunk.
fn chunk_writer() -> csv::Writer<Vec<u8>> {
    csv::Writer::from_writer(Vec::with_capacity(CHUNK + CHUNK / 4))
}

/// Converts JSON Lines rows to CSV: a header row of the column names, then per line one record
/// with the line's values in column order. Strings are written as their text, quoted where CSV
/// needs it (a comma, a quote, a line break); numbers and booleans as written in the line
/// (timestamps are strings); `null` or a missing column as an empty field; anything else as its
/// JSON text. Records end with `\n`.
pub struct CsvEncoder {
    columns: Vec<String>,
    writer: csv::Writer<Vec<u8>>,
}

impl CsvEncoder {
    /// An encoder for `columns`, with the header row written.
    pub fn new(columns: &[Column]) -> CsvEncoder {
        let mut writer = chunk_writer();
        let columns: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
        // Writing into a Vec cannot fail.
        let _ = writer.write_record(&columns);
        CsvEncoder { columns, writer }
    }

    /// Appends the record of one JSON Lines row (a blank line is skipped). An error when the line
    /// is not a JSON object.
    pub fn row(&mut self, line: &[u8]) -> Result<(), String> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        let values: HashMap<String, &RawValue> = serde_json::from_slice(line)
            .map_err(|e| format!("not a JSON object of column values: {e}"))?;
        for column in &self.columns {
            let text = match values.get(column).map(|v| v.get()) {
                None | Some("null") => std::borrow::Cow::Borrowed(""),
                Some(raw) if raw.starts_with('"') => std::borrow::Cow::Owned(
                    serde_json::from_str::<String>(raw)
                        .map_err(|e| format!("column {column}: {e}"))?,
                ),
                Some(raw) => std::borrow::Cow::Borrowed(raw),
            };
            self.writer
                .write_field(text.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        self.writer
            .write_record(None::<&[u8]>)
            .map_err(|e| e.to_string())
    }

    /// Bytes written and not taken yet.
    fn pending(&mut self) -> usize {
        // Moves the writer's own buffer into the Vec (cannot fail).
        let _ = self.writer.flush();
        self.writer.get_ref().len()
    }

    /// Takes what was written so far.
    pub fn take(&mut self) -> Bytes {
        let full = std::mem::replace(&mut self.writer, chunk_writer());
        // Flushing into a Vec cannot fail.
        Bytes::from(full.into_inner().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ColumnType;

    fn columns(names: &[&str]) -> Vec<Column> {
        names
            .iter()
            .map(|n| Column {
                name: (*n).to_owned(),
                ty: ColumnType::String,
            })
            .collect()
    }

    fn csv_of(names: &[&str], lines: &[&str]) -> String {
        let mut e = CsvEncoder::new(&columns(names));
        for line in lines {
            e.row(line.as_bytes()).unwrap();
        }
        String::from_utf8(e.take().to_vec()).unwrap()
    }

    #[test]
    fn values_are_written_in_column_order_as_written_and_quoted_where_csv_needs_it() {
        assert_eq!(
            csv_of(
                &["s", "i", "f", "b", "t", "n"],
                &[
                    r#"{"n":null,"t":"2024-05-01T12:00:00Z","b":true,"f":1.50,"i":-7,"s":"a, \"b\"\nc"}"#,
                    r#"{"s":"plain","i":12345678901234567890,"f":1e300,"b":false,"t":"x"}"#,
                    "",
                ],
            ),
            "s,i,f,b,t,n\n\
             \"a, \"\"b\"\"\nc\",-7,1.50,true,2024-05-01T12:00:00Z,\n\
             plain,12345678901234567890,1e300,false,x,\n"
        );
    }

    #[test]
    fn a_line_that_is_not_an_object_is_an_error() {
        let mut e = CsvEncoder::new(&columns(&["a"]));
        assert!(e.row(b"[1, 2]").is_err());
        assert!(e.row(b"{\"a\": ").is_err());
    }

    #[tokio::test]
    async fn a_row_is_read_whole_up_to_the_limit_and_refused_past_it() {
        let mut input: &[u8] = b"{\"a\":1}\n{\"a\":22}\nend";
        let mut line = Vec::new();
        assert_eq!(read_row(&mut input, &mut line, 8).await.unwrap(), 8);
        line.clear();
        let err = read_row(&mut input, &mut line, 8).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("max_row_bytes"), "{err}");

        // 3 MiB without a newline, a 64 KiB limit: refused, having held at most the limit.
        let big = vec![b'x'; 3 << 20];
        let mut reader = BufReader::with_capacity(CHUNK, &big[..]);
        let mut line = Vec::new();
        assert!(read_row(&mut reader, &mut line, 64 << 10).await.is_err());
        assert!(line.len() <= 64 << 10, "{}", line.len());
    }
}
