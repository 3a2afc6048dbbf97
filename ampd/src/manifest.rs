//! Dataset manifests of kind `static`: tables with typed columns whose rows are given inline or as
//! a CSV file, and the encoding of their rows as JSON Lines.
//!
//! ```json
//! {"kind": "static",
//!  "tables": {"prices": {"columns": [{"name": "symbol", "type": "string"},
//!                                    {"name": "price", "type": "float64"}],
//!                        "rows": [["ETH", 3100.5], ["BTC", 91000.0]]}}}
//! ```
//!
//! A table has `"rows"` (an array of arrays, one value per column) or `"csv"` (a path relative to
//! the worker's sources directory, to a file with a header row naming the same columns in the same
//! order). Table and column names are lowercase `[a-z][a-z0-9_]*`. Column types: `int64` (a JSON
//! integer; in CSV, an integer), `float64` (a finite number), `string`, `bool` (`true`/`false`),
//! `timestamp` (RFC 3339, e.g. `2024-05-01T12:00:00Z`; written back in UTC). Other fields are
//! allowed and ignored. A served row is a JSON object keyed by column name, in column order:
//! `{"symbol":"ETH","price":3100.5}`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub mod canonical;

/// The manifest kind this module knows.
pub const STATIC: &str = "static";
/// The job kind that materializes a static manifest.
pub const MATERIALIZE_STATIC: &str = "materialize-static";
/// The format of the files a materialization writes (one JSON object per line).
pub const FORMAT_JSONL: &str = "jsonl";

/// Where a manifest is stored, relative to the data directory (`manifest_files.path`): its bytes,
/// exactly those its hash is taken of.
pub fn manifest_path(hash: &str) -> String {
    format!("manifests/{hash}.json")
}

/// The name of the `index`th file (from 0) of a revision a materialization writes.
pub fn part_file_name(index: usize) -> String {
    format!("part-{index:05}.{FORMAT_JSONL}")
}

/// The `metadata` of a revision a materialization writes: what a reader needs to read its files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevisionMeta {
    /// The files' format: `jsonl`.
    pub format: String,
    /// The table's columns, in order.
    pub columns: Vec<Column>,
    /// Rows in all the revision's files.
    pub rows: u64,
}

/// The `metadata` of a file a materialization writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileMeta {
    /// Rows in the file.
    pub rows: u64,
    /// Hex sha256 of the file's bytes.
    pub sha256: String,
}
/// The longest table or column name.
pub const MAX_NAME_LEN: usize = 63;

/// The type of a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// A 64-bit signed integer.
    Int64,
    /// A finite 64-bit float.
    Float64,
    /// UTF-8 text.
    String,
    /// `true` or `false`.
    Bool,
    /// An instant, RFC 3339.
    Timestamp,
}

impl ColumnType {
    /// The name used in manifests.
    pub const fn as_str(self) -> &'static str {
        match self {
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::String => "string",
            ColumnType::Bool => "bool",
            ColumnType::Timestamp => "timestamp",
        }
    }
}

/// A column of a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub ty: ColumnType,
}

/// Where a table's rows come from; `R` is what a parse keeps of inline rows ([`Rows`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Source<R = Vec<Vec<serde_json::Value>>> {
    /// Given in the manifest.
    Rows(R),
    /// A CSV file, relative to the sources directory.
    Csv(String),
}

/// A table of a static manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Table<R = Vec<Vec<serde_json::Value>>> {
    /// Its name.
    pub name: String,
    /// Its columns, in order.
    pub columns: Vec<Column>,
    /// Its rows.
    pub source: Source<R>,
}

/// A parsed, validated static manifest: its tables by name. `R` is what the parse kept of each
/// table's inline rows: the rows themselves (the default, for the worker, which writes them) or
/// their number (`usize`, for the controller, which only checks them).
#[derive(Clone, Debug, PartialEq)]
pub struct StaticManifest<R = Vec<Vec<serde_json::Value>>> {
    /// The tables, ordered by name.
    pub tables: Vec<Table<R>>,
}

/// What a parse keeps of a table's inline rows, each checked before it is kept.
pub trait Rows {
    /// Nothing yet, room for `n` rows.
    fn with_capacity(n: usize) -> Self;
    /// Keeps a checked row.
    fn push(&mut self, row: Vec<serde_json::Value>);
}

/// Every row.
impl Rows for Vec<Vec<serde_json::Value>> {
    fn with_capacity(n: usize) -> Self {
        Vec::with_capacity(n)
    }

    fn push(&mut self, row: Vec<serde_json::Value>) {
        Vec::push(self, row);
    }
}

/// The number of rows: a check that keeps no row after it has been checked.
impl Rows for usize {
    fn with_capacity(_: usize) -> Self {
        0
    }

    fn push(&mut self, _: Vec<serde_json::Value>) {
        *self += 1;
    }
}

/// What is wrong with a manifest, and where (`tables.prices.rows[3][1]`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {message}")]
pub struct ManifestError {
    /// Where in the manifest (or the CSV file).
    pub at: String,
    /// What is wrong.
    pub message: String,
}

fn err(at: impl fmt::Display, message: impl Into<String>) -> ManifestError {
    ManifestError {
        at: at.to_string(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
struct RawManifest<'a> {
    #[serde(borrow)]
    kind: &'a RawValue,
    #[serde(borrow)]
    tables: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawTable<'a> {
    #[serde(borrow)]
    columns: Option<&'a RawValue>,
    #[serde(borrow)]
    rows: Option<&'a RawValue>,
    #[serde(borrow)]
    csv: Option<&'a RawValue>,
}

/// A table or column name: `[a-z][a-z0-9_]*`, at most [`MAX_NAME_LEN`] characters.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The `kind` (any non-empty string) of the manifest whose stored bytes are `manifest`
/// ([`canonical::canonical`]), or an error when there is none.
pub fn kind_of(manifest: &str) -> Result<String, ManifestError> {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(borrow)]
        kind: Option<&'a RawValue>,
    }
    let missing = || err("kind", "a manifest needs a non-empty string field \"kind\"");
    if !manifest.starts_with('{') {
        return Err(missing());
    }
    let Kind { kind } = serde_json::from_str(manifest).map_err(|_| missing())?;
    kind.filter(|k| k.get().starts_with('"'))
        .and_then(|k| serde_json::from_str::<String>(k.get()).ok())
        .filter(|k| !k.is_empty())
        .ok_or_else(missing)
}

/// The names in the `tables` object of the manifest whose stored bytes are `manifest`, in order,
/// whatever their tables hold: none when there is no such object.
pub fn table_names(manifest: &str) -> Vec<String> {
    #[derive(Deserialize)]
    struct Tables<'a> {
        #[serde(borrow)]
        tables: Option<&'a RawValue>,
    }
    if !manifest.starts_with('{') {
        return Vec::new();
    }
    match serde_json::from_str(manifest) {
        Ok(Tables {
            tables: Some(tables),
        }) if tables.get().starts_with('{') => {
            serde_json::from_str::<BTreeMap<String, serde::de::IgnoredAny>>(tables.get())
                .map(|t| t.into_keys().collect())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// Bounds on what one manifest may hold, each checked before the work it bounds (the controller's
/// `[controller]` keys of the same names; a manifest stored before a limit was lowered is still
/// read with [`Limits::NONE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Tables per manifest (`max_manifest_tables`).
    pub max_tables: usize,
    /// Columns per table (`max_table_columns`).
    pub max_columns: usize,
    /// Inline rows per manifest, all tables together (`max_inline_rows`).
    pub max_inline_rows: usize,
}

impl Limits {
    /// No bound: for a manifest already stored.
    pub const NONE: Limits = Limits {
        max_tables: usize::MAX,
        max_columns: usize::MAX,
        max_inline_rows: usize::MAX,
    };
}

fn over_limit(at: &str, what: &str, count: usize, max: usize, key: &str) -> ManifestError {
    err(
        at,
        format!("{count} {what}, more than the limit of {max} (`[controller] {key}`)"),
    )
}

impl<R: Rows> StaticManifest<R> {
    /// Parses and validates a static manifest from its stored bytes (canonical JSON:
    /// [`canonical::canonical`]): its structure, names and types, and every inline row. CSV files
    /// are checked when they are read.
    pub fn parse(manifest: &str) -> Result<Self, ManifestError> {
        StaticManifest::parse_within(manifest, Limits::NONE)
    }

    /// [`StaticManifest::parse`], refusing a manifest over `limits` (the message names the
    /// limit). The rows are read one at a time, each checked and then handed to `R`. Linear in
    /// the manifest's size; run it off the async runtime.
    pub fn parse_within(manifest: &str, limits: Limits) -> Result<Self, ManifestError> {
        let raw: RawManifest = from_text(manifest)
            .map_err(|e| err("manifest", format!("not a manifest object: {e}")))?;
        // Canonical text: a string is the same bytes as `Value`'s, and so is its display.
        if raw.kind.get() != "\"static\"" {
            return Err(err(
                "kind",
                format!(
                    "unsupported manifest kind {}; this ampd runs \"static\"",
                    raw.kind.get()
                ),
            ));
        }
        let Some(tables) = raw.tables.filter(|t| t.get().starts_with('{')) else {
            return Err(err("tables", "expected an object of tables by name"));
        };
        let count = count(tables.get());
        if count == 0 {
            return Err(err("tables", "a manifest needs at least one table"));
        }
        if count > limits.max_tables {
            return Err(over_limit(
                "tables",
                "tables",
                count,
                limits.max_tables,
                "max_manifest_tables",
            ));
        }
        let mut rows_left = limits.max_inline_rows;
        // Canonical text: the keys are sorted and unique, as in the `Value` tree's map.
        let tables: BTreeMap<String, &RawValue> =
            serde_json::from_str(tables.get()).map_err(|e| err("tables", without_position(&e)))?;
        let mut parsed = Vec::with_capacity(tables.len());
        for (name, value) in tables {
            let at = format!("tables.{name}");
            if !valid_name(&name) {
                return Err(err(
                    &at,
                    "invalid table name: use lowercase letters, digits and '_', starting with a \
                     letter, at most 63 characters",
                ));
            }
            parsed.push(parse_table(&at, name, value, &limits, &mut rows_left)?);
        }
        Ok(StaticManifest { tables: parsed })
    }
}

/// `T` read from `text` (canonical JSON), or serde's message as reading it from its `Value`
/// would give it: without the text's line and column, and with a struct given as an array of
/// more elements than it has fields refused as `Value` refuses it.
fn from_text<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| {
        if text.starts_with('[') && e.to_string().starts_with("trailing characters") {
            let len = count(text);
            return <serde_json::Error as serde::de::Error>::invalid_length(
                len,
                &"fewer elements in array",
            )
            .to_string();
        }
        without_position(&e)
    })
}

/// The message of `e` without the position serde_json adds when it reads text.
fn without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    if e.line() == 0 {
        return message;
    }
    let position = format!(" at line {} column {}", e.line(), e.column());
    match message.strip_suffix(&position) {
        Some(m) => m.to_owned(),
        None => message,
    }
}

/// The elements of the array or the entries of the object `text` holds (0 for anything else),
/// counted without keeping them.
fn count(text: &str) -> usize {
    use serde::Deserializer as _;
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array or an object")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    serde_json::Deserializer::from_str(text)
        .deserialize_any(Count)
        .unwrap_or(0)
}

fn parse_table<R: Rows>(
    at: &str,
    name: String,
    value: &RawValue,
    limits: &Limits,
    rows_left: &mut usize,
) -> Result<Table<R>, ManifestError> {
    let raw: RawTable =
        from_text(value.get()).map_err(|e| err(at, format!("expected a table object: {e}")))?;
    let columns = parse_columns(&format!("{at}.columns"), raw.columns, limits.max_columns)?;
    let source = match (raw.rows, raw.csv) {
        (Some(rows), None) => {
            let at = format!("{at}.rows");
            let mut n = 0;
            if rows.get().starts_with('[') {
                n = count(rows.get());
                if n > *rows_left {
                    return Err(over_limit(
                        &at,
                        "inline rows (with the tables before it)",
                        limits.max_inline_rows - *rows_left + n,
                        limits.max_inline_rows,
                        "max_inline_rows",
                    ));
                }
                *rows_left -= n;
            }
            Source::Rows(parse_rows(&at, &columns, rows, n)?)
        }
        (None, Some(csv)) if csv.get().starts_with('"') => {
            let path: String = serde_json::from_str(csv.get())
                .map_err(|e| err(format!("{at}.csv"), without_position(&e)))?;
            check_relative(&path).map_err(|m| err(format!("{at}.csv"), m))?;
            Source::Csv(path)
        }
        (None, Some(_)) => return Err(err(format!("{at}.csv"), "expected a path string")),
        (Some(_), Some(_)) => return Err(err(at, "give either \"rows\" or \"csv\", not both")),
        (None, None) => return Err(err(at, "a table needs \"rows\" or \"csv\"")),
    };
    Ok(Table {
        name,
        columns,
        source,
    })
}

fn parse_columns(
    at: &str,
    value: Option<&RawValue>,
    max_columns: usize,
) -> Result<Vec<Column>, ManifestError> {
    let Some(value) = value.filter(|v| v.get().starts_with('[')) else {
        return Err(err(at, "expected an array of {\"name\", \"type\"} objects"));
    };
    let count = count(value.get());
    if count == 0 {
        return Err(err(at, "a table needs at least one column"));
    }
    if count > max_columns {
        return Err(over_limit(
            at,
            "columns",
            count,
            max_columns,
            "max_table_columns",
        ));
    }
    let items: Vec<&RawValue> =
        serde_json::from_str(value.get()).map_err(|e| err(at, without_position(&e)))?;
    let mut columns: Vec<Column> = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("{at}[{i}]");
        // A column is small: read through its `Value`, so serde's messages are those it has
        // always given.
        let column: Column = serde_json::from_str::<serde_json::Value>(item.get())
            .and_then(serde_json::from_value)
            .map_err(|e| {
                err(
                    &at,
                    format!(
                        "{e}; a column is {{\"name\": ..., \"type\": ...}} with a type of int64, \
                         float64, string, bool, timestamp"
                    ),
                )
            })?;
        if !valid_name(&column.name) {
            return Err(err(
                &at,
                format!(
                    "invalid column name {:?}: use lowercase letters, digits and '_', starting \
                     with a letter",
                    column.name
                ),
            ));
        }
        if !seen.insert(column.name.clone()) {
            return Err(err(&at, format!("duplicate column {:?}", column.name)));
        }
        columns.push(column);
    }
    Ok(columns)
}

/// The rows of `value` (an array of `n` rows), read and checked one at a time.
fn parse_rows<R: Rows>(
    at: &str,
    columns: &[Column],
    value: &RawValue,
    n: usize,
) -> Result<R, ManifestError> {
    use serde::Deserializer as _;
    if !value.get().starts_with('[') {
        return Err(err(at, "expected an array of rows"));
    }
    let mut reader = RowReader {
        at,
        width: columns.len(),
        encoder: RowEncoder::new(columns),
        scratch: Vec::new(),
        rows: R::with_capacity(n),
        failed: None,
    };
    let read = serde_json::Deserializer::from_str(value.get()).deserialize_seq(&mut reader);
    match (read, reader.failed) {
        (_, Some(e)) => Err(e),
        (Ok(()), None) => Ok(reader.rows),
        (Err(e), None) => Err(err(at, without_position(&e))),
    }
}

/// Reads an array of rows, checking each and handing it to `rows`; the first row that does not
/// fit ends the read with its error in `failed`.
struct RowReader<'a, R> {
    at: &'a str,
    width: usize,
    encoder: RowEncoder,
    scratch: Vec<u8>,
    rows: R,
    failed: Option<ManifestError>,
}

impl<R: Rows> RowReader<'_, R> {
    fn row(&mut self, r: usize, row: serde_json::Value) -> Result<(), ManifestError> {
        let at = self.at;
        let serde_json::Value::Array(values) = row else {
            return Err(err(format!("{at}[{r}]"), "expected an array of values"));
        };
        if values.len() != self.width {
            return Err(err(
                format!("{at}[{r}]"),
                format!(
                    "has {} values, the table has {} columns",
                    values.len(),
                    self.width
                ),
            ));
        }
        self.scratch.clear();
        self.encoder
            .encode_json(&values, &mut self.scratch)
            .map_err(|e| err(format!("{at}[{r}][{}]", e.column), e.message))?;
        self.rows.push(values);
        Ok(())
    }
}

impl<'de, R: Rows> serde::de::Visitor<'de> for &mut RowReader<'_, R> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of rows")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut r = 0;
        while let Some(row) = seq.next_element::<serde_json::Value>()? {
            if let Err(e) = self.row(r, row) {
                self.failed = Some(e);
                return Err(serde::de::Error::custom("a row does not fit"));
            }
            r += 1;
        }
        Ok(())
    }
}

/// Whether `path` is a plain relative path: not empty, not absolute, no `..` or `.`, so that it
/// names something inside whatever directory it is joined to (symbolic links aside).
pub fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Checks that `path` is a plain relative path: not absolute, no `..` or `.`, not empty.
fn check_relative(path: &str) -> Result<(), String> {
    if !is_plain_relative(path) {
        return Err(format!(
            "{path:?} is not allowed: give a path relative to the sources directory, without \
             '..', '.' or a leading '/'"
        ));
    }
    Ok(())
}

/// Why a CSV source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The path is absolute, uses `..`, or leads (through a symlink) outside the sources
    /// directory.
    #[error("{0}")]
    Outside(String),
    /// The file does not exist or cannot be opened.
    #[error("cannot open {path:?} in the sources directory: {source}")]
    Unreadable {
        /// The path as given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Opens the file `relative` names inside `sources_dir`, for reading, once: the path is resolved
/// by the kernel beneath the directory (`openat2` with `RESOLVE_BENEATH`), so neither `..` nor a
/// symbolic link (of the file or of a directory on the way) can lead outside it, and a file
/// swapped for a link after an earlier check is refused rather than followed. The open does not
/// block (a FIFO is not waited on) and the handle is checked to be a regular file. Read only from
/// the handle returned: the path may name something else a moment later.
pub fn open_source(sources_dir: &Path, relative: &str) -> Result<std::fs::File, SourceError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    check_relative(relative).map_err(SourceError::Outside)?;
    let unreadable = |source| SourceError::Unreadable {
        path: relative.to_owned(),
        source,
    };
    let dir = rustix::fs::open(
        sources_dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SourceError::Unreadable {
        path: sources_dir.display().to_string(),
        source: e.into(),
    })?;
    let fd = rustix::fs::openat2(
        &dir,
        relative,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => SourceError::Outside(format!(
            "{relative:?} leads outside the sources directory (through a symbolic link)"
        )),
        other => unreadable(other.into()),
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| unreadable(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(unreadable(std::io::Error::other(
            "not a regular file (a FIFO, device, socket or directory is refused)",
        )));
    }
    Ok(std::fs::File::from(fd))
}

/// What is wrong with a header row, said without quoting it (a file's contents stay out of
/// errors): the first position that does not name the expected column, or the count.
pub fn header_mismatch<'a>(
    header: impl IntoIterator<Item = &'a str>,
    columns: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let names: Vec<&str> = columns.into_iter().collect();
    let mut got = 0;
    for field in header {
        match names.get(got) {
            Some(name) if field == *name => got += 1,
            Some(name) => {
                return Some(format!(
                    "the header row must name the table's columns in order: field {} is not \
                     {name:?}",
                    got + 1
                ));
            }
            None => {
                got += 1;
                break;
            }
        }
    }
    (got != names.len()).then(|| {
        format!(
            "the header row has {} {got} fields; it must name the table's {} columns in order: {}",
            if got > names.len() {
                "more than"
            } else {
                "only"
            },
            names.len(),
            names.join(",")
        )
    })
}

/// The marker of the I/O error [`RecordBound`] ends a read with: a CSV record longer than the
/// limit.
#[derive(Debug, thiserror::Error)]
#[error("a CSV record longer than {limit} bytes")]
pub struct RecordTooLong {
    /// The limit, in bytes.
    pub limit: u64,
}

/// A reader under a CSV parser that hands it at most `limit` bytes (plus the parser's buffer)
/// past the end of the last whole record, so a record without an end (a file without a newline, a
/// quote never closed) costs memory up to the limit, not the file's size. The reader of the
/// records calls [`RecordBound::record_ended`] after each one with the parser's position.
#[derive(Debug)]
pub struct RecordBound<R> {
    inner: R,
    delivered: u64,
    record_end: std::cell::Cell<u64>,
    allowed: u64,
    limit: u64,
}

impl<R> RecordBound<R> {
    /// `inner`, read by a parser whose buffer holds `buffer` bytes, records at most `limit` bytes.
    pub fn new(inner: R, limit: u64, buffer: usize) -> RecordBound<R> {
        RecordBound {
            inner,
            delivered: 0,
            record_end: std::cell::Cell::new(0),
            allowed: limit.saturating_add(buffer as u64),
            limit,
        }
    }

    /// A record ended at byte `offset` of the stream.
    pub fn record_ended(&self, offset: u64) {
        self.record_end.set(offset);
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The reader underneath.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: std::io::Read> std::io::Read for RecordBound<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let used = self.delivered - self.record_end.get().min(self.delivered);
        let room = self.allowed.saturating_sub(used);
        if room == 0 {
            return Err(std::io::Error::other(RecordTooLong { limit: self.limit }));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.delivered += n as u64;
        Ok(n)
    }
}

/// The [`RecordTooLong`] inside a CSV error, if that is what it is.
pub fn record_too_long(err: &csv::Error) -> Option<u64> {
    match err.kind() {
        csv::ErrorKind::Io(e) => e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<RecordTooLong>())
            .map(|r| r.limit),
        _ => None,
    }
}

/// The header row of `reader` (its first record), refusing one longer than the bound's limit.
pub fn headers_bounded<R: std::io::Read>(
    reader: &mut csv::Reader<RecordBound<R>>,
) -> Result<csv::StringRecord, csv::Error> {
    let header = reader.headers()?.clone();
    let end = reader.position().byte();
    let limit = reader.get_ref().limit();
    if end > limit {
        return Err(csv::Error::from(std::io::Error::other(RecordTooLong {
            limit,
        })));
    }
    reader.get_ref().record_ended(end);
    Ok(header)
}

/// Reads the next record of `reader` into `record`, refusing one longer than the bound's limit:
/// that is `Err(Ok(line))`, `line` the 1-based line it starts on; any other error is
/// `Err(Err(_))`.
pub fn read_bounded<R: std::io::Read>(
    reader: &mut csv::Reader<RecordBound<R>>,
    record: &mut csv::StringRecord,
) -> Result<bool, Result<u64, csv::Error>> {
    let start = reader.position().clone();
    let more = match reader.read_record(record) {
        Ok(more) => more,
        Err(e) if record_too_long(&e).is_some() => return Err(Ok(start.line())),
        Err(e) => return Err(Err(e)),
    };
    let end = reader.position().byte();
    if end - start.byte() > reader.get_ref().limit() {
        return Err(Ok(start.line()));
    }
    reader.get_ref().record_ended(end);
    Ok(more)
}

/// A value that does not fit its column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellError {
    /// The column's index.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Encodes rows of one table as JSON Lines objects keyed by column name, in column order.
#[derive(Clone, Debug)]
pub struct RowEncoder {
    types: Vec<ColumnType>,
    names: Vec<String>,
    /// `{"a":`, `,"b":`, ...: what goes before each value.
    prefixes: Vec<Vec<u8>>,
}

impl RowEncoder {
    /// The encoder of a table with `columns`.
    pub fn new(columns: &[Column]) -> RowEncoder {
        let prefixes = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut p = if i == 0 { b"{".to_vec() } else { b",".to_vec() };
                // Column names are [a-z0-9_]: nothing to escape.
                p.extend_from_slice(format!("\"{}\":", c.name).as_bytes());
                p
            })
            .collect();
        RowEncoder {
            types: columns.iter().map(|c| c.ty).collect(),
            names: columns.iter().map(|c| c.name.clone()).collect(),
            prefixes,
        }
    }

    /// The column names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Appends the row given as text fields (a CSV record) to `out`, with its newline.
    pub fn encode_text<'a>(
        &self,
        fields: impl IntoIterator<Item = &'a str>,
        out: &mut Vec<u8>,
    ) -> Result<(), CellError> {
        let mut n = 0;
        for (i, field) in fields.into_iter().enumerate() {
            let Some(ty) = self.types.get(i) else {
                return Err(CellError {
                    column: i,
                    message: format!("more fields than the {} columns", self.types.len()),
                });
            };
            out.extend_from_slice(&self.prefixes[i]);
            write_text(*ty, field, out).map_err(|message| CellError { column: i, message })?;
            n += 1;
        }
        if n != self.types.len() {
            return Err(CellError {
                column: n,
                message: format!("{n} fields, the table has {} columns", self.types.len()),
            });
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }

    /// Appends the row given as JSON values (an inline row) to `out`, with its newline.
    pub fn encode_json(
        &self,
        values: &[serde_json::Value],
        out: &mut Vec<u8>,
    ) -> Result<(), CellError> {
        for (i, (ty, value)) in self.types.iter().zip(values).enumerate() {
            out.extend_from_slice(&self.prefixes[i]);
            write_json(*ty, value, out).map_err(|message| CellError { column: i, message })?;
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }
}

fn expected(ty: ColumnType, got: impl fmt::Display) -> String {
    format!("expected {}, got {got}", ty.as_str())
}

/// Writes a CSV field. The messages never quote the field: a file's contents stay out of errors
/// (which a job's detail shows to whoever can read the admin API).
fn write_text(ty: ColumnType, field: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let not_a = || format!("not a valid {} value", ty.as_str());
    match ty {
        ColumnType::Int64 => {
            let v: i64 = field.parse().map_err(|_| not_a())?;
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        ColumnType::Float64 => {
            let v: f64 = field.parse().map_err(|_| not_a())?;
            write_float(v, "a value that is not finite", out)?;
        }
        ColumnType::String => write_string(field, out),
        ColumnType::Bool => out.extend_from_slice(match field {
            "true" => b"true",
            "false" => b"false",
            _ => return Err(format!("{} (use true or false)", not_a())),
        }),
        ColumnType::Timestamp => write_timestamp(field, out)
            .map_err(|_| format!("{} (use RFC 3339, e.g. 2024-05-01T12:00:00Z)", not_a()))?,
    }
    Ok(())
}

fn write_json(ty: ColumnType, value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), String> {
    use serde_json::Value;
    match (ty, value) {
        (ColumnType::Int64, Value::Number(n)) if n.is_i64() => {
            out.extend_from_slice(
                itoa::Buffer::new()
                    .format(n.as_i64().unwrap_or(0))
                    .as_bytes(),
            );
        }
        (ColumnType::Float64, Value::Number(n)) => match n.as_f64() {
            Some(v) => write_float(v, n, out)?,
            None => return Err(expected(ty, n)),
        },
        (ColumnType::String, Value::String(s)) => write_string(s, out),
        (ColumnType::Bool, Value::Bool(b)) => {
            out.extend_from_slice(if *b { b"true" } else { b"false" })
        }
        (ColumnType::Timestamp, Value::String(s)) => write_timestamp(s, out)?,
        (_, other) => return Err(expected(ty, other)),
    }
    Ok(())
}

fn write_float(v: f64, shown: impl fmt::Display, out: &mut Vec<u8>) -> Result<(), String> {
    if !v.is_finite() {
        return Err(format!("expected a finite float64, got {shown}"));
    }
    out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    // serde_json's escaping of a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write_timestamp(s: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|_| {
        expected(
            ColumnType::Timestamp,
            format!("{s:?} (use RFC 3339, e.g. 2024-05-01T12:00:00Z)"),
        )
    })?;
    let utc = t.with_timezone(&chrono::Utc);
    let _ = write!(
        out,
        "\"{}\"",
        utc.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(tables: serde_json::Value) -> serde_json::Value {
        json!({"kind": "static", "tables": tables})
    }

    #[test]
    fn the_documented_example_parses_and_encodes_in_column_order() {
        let text = manifest(json!({"prices": {
            "columns": [{"name": "symbol", "type": "string"}, {"name": "price", "type": "float64"}],
            "rows": [["ETH", 3100.5], ["BTC", 91000.0]]}}))
        .to_string();
        let m: StaticManifest = StaticManifest::parse(&text).unwrap();
        let counted = StaticManifest::<usize>::parse(&text).unwrap();
        assert_eq!(counted.tables[0].source, Source::Rows(2));
        assert_eq!(counted.tables[0].columns, m.tables[0].columns);
        let t = &m.tables[0];
        let enc = RowEncoder::new(&t.columns);
        let mut out = Vec::new();
        let Source::Rows(rows) = &t.source else {
            panic!()
        };
        for row in rows {
            enc.encode_json(row, &mut out).unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"symbol\":\"ETH\",\"price\":3100.5}\n{\"symbol\":\"BTC\",\"price\":91000.0}\n"
        );
    }

    #[test]
    fn every_type_reads_text_and_rejects_what_does_not_fit() {
        let cols: Vec<Column> = ["int64", "float64", "string", "bool", "timestamp"]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::from_value(json!({"name": format!("c{i}"), "type": t})).unwrap()
            })
            .collect();
        let enc = RowEncoder::new(&cols);
        let mut out = Vec::new();
        enc.encode_text(
            ["-7", "1e3", "a \"q\"", "true", "2024-05-01T14:00:00+02:00"],
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"c0\":-7,\"c1\":1000.0,\"c2\":\"a \\\"q\\\"\",\"c3\":true,\"c4\":\"2024-05-01T12:00:00Z\"}\n"
        );
        for (bad, column) in [
            (["x", "1", "s", "true", "2024-05-01T12:00:00Z"], 0),
            (["1", "NaN", "s", "true", "2024-05-01T12:00:00Z"], 1),
            (["1", "1", "s", "yes", "2024-05-01T12:00:00Z"], 3),
            (["1", "1", "s", "true", "yesterday"], 4),
        ] {
            let e = enc.encode_text(bad, &mut Vec::new()).unwrap_err();
            assert_eq!(e.column, column, "{e:?}");
        }
        let e = enc.encode_text(["1", "1"], &mut Vec::new()).unwrap_err();
        assert_eq!(e.column, 2);
    }

    #[test]
    fn a_manifest_that_can_never_succeed_is_rejected_naming_the_place() {
        let cases = [
            (json!({"kind": "evm-rpc"}), "kind"),
            (manifest(json!({})), "tables"),
            (
                manifest(
                    json!({"Bad": {"columns": [{"name": "a", "type": "string"}], "rows": []}}),
                ),
                "tables.Bad",
            ),
            (
                manifest(json!({"t": {"columns": [{"name": "a", "type": "decimal"}], "rows": []}})),
                "tables.t.columns[0]",
            ),
            (
                manifest(
                    json!({"t": {"columns": [{"name": "a", "type": "int64"}], "rows": [[1], ["x"]]}}),
                ),
                "tables.t.rows[1][0]",
            ),
            (
                manifest(
                    json!({"t": {"columns": [{"name": "a", "type": "int64"}], "rows": [[1, 2]]}}),
                ),
                "tables.t.rows[0]",
            ),
            (
                manifest(
                    json!({"t": {"columns": [{"name": "a", "type": "int64"}], "csv": "/etc/passwd"}}),
                ),
                "tables.t.csv",
            ),
            (
                manifest(
                    json!({"t": {"columns": [{"name": "a", "type": "int64"}], "csv": "../x.csv"}}),
                ),
                "tables.t.csv",
            ),
            (
                manifest(
                    json!({"t": {"columns": [{"name": "a", "type": "int64"}, {"name": "a", "type": "bool"}], "rows": []}}),
                ),
                "tables.t.columns[1]",
            ),
            (
                manifest(json!({"t": {"columns": [{"name": "a", "type": "int64"}]}})),
                "tables.t",
            ),
        ];
        for (m, at) in cases {
            let text = m.to_string();
            let e = StaticManifest::<usize>::parse(&text).expect_err(&text);
            assert_eq!(e.at, at, "{m}: {e}");
            let kept = StaticManifest::<Vec<Vec<serde_json::Value>>>::parse(&text);
            assert_eq!(kept.expect_err(&text), e, "{m}");
        }
    }

    #[test]
    fn sources_open_inside_the_sources_directory_only() {
        let dir = std::env::temp_dir().join(format!("ampd-sources-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sources = dir.join("sources");
        std::fs::create_dir_all(sources.join("sub")).unwrap();
        std::fs::write(sources.join("sub/a.csv"), "a\n1\n").unwrap();
        std::fs::write(dir.join("secret.csv"), "a\n1\n").unwrap();
        std::os::unix::fs::symlink(dir.join("secret.csv"), sources.join("link.csv")).unwrap();
        std::os::unix::fs::symlink("sub/a.csv", sources.join("inside.csv")).unwrap();
        std::os::unix::fs::symlink(&dir, sources.join("up")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", sources.join("zero.csv")).unwrap();
        assert!(open_source(&sources, "sub/a.csv").is_ok());
        assert!(open_source(&sources, "inside.csv").is_ok());
        // `up/missing.csv` and `up/secret.csv` get the same answer: no oracle for outside paths.
        for bad in [
            "/etc/passwd",
            "../secret.csv",
            "sub/../../secret.csv",
            "link.csv",
            "./sub/a.csv",
            "up/secret.csv",
            "up/missing.csv",
            "zero.csv",
        ] {
            let opened = open_source(&sources, bad);
            assert!(
                matches!(opened, Err(SourceError::Outside(_))),
                "{bad}: {opened:?}"
            );
        }
        assert!(matches!(
            open_source(&sources, "missing.csv"),
            Err(SourceError::Unreadable { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_or_a_directory_in_the_sources_directory_is_refused_without_waiting() {
        let dir = std::env::temp_dir().join(format!("ampd-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("d.csv")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("f.csv").into_os_string().into_encoded_bytes())
            .unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        for name in ["f.csv", "d.csv"] {
            let opened = open_source(&dir, name);
            let Err(SourceError::Unreadable { source, .. }) = &opened else {
                panic!("{name}: {opened:?}");
            };
            assert!(
                source.to_string().contains("not a regular file"),
                "{source}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
