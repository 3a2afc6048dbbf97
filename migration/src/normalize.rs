// Canonical form of a migration's Rust source, shared by `build.rs` (which checksums every migration
// file at build time) and the library (which exposes it to tests). Only tokens count: whitespace,
// comments, doc comments, `use` items and trailing commas are dropped, so `cargo fmt`, a new comment
// or a rebuild never changes a checksum, while any change to what the code says does. The sea-query
// SQL is deliberately not hashed: a sea-orm/sea-query upgrade may render the same migration
// differently, and that must not look like an edited migration.
//
// The algorithm is versioned, because deployed databases keep the checksums they were given:
// - version 1 wrote joint punctuation joined (`x:&str` gave `x :& str`, `x: &str` gave `x : & str`),
//   so a rustfmt that only changes spacing between punctuation changed the checksum;
// - version 2 writes every punctuation character as a token of its own, so spacing never counts.
// A recorded checksum is always verified with the version it was recorded with; the values of
// version 1 are frozen for the migrations released under it (see `checksums-v1.txt`).

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
use sha2::{Digest, Sha256};

/// A version of the checksum algorithm. The number is what the history table records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// Tokens with joint punctuation written joined: token spacing counts.
    V1 = 1,
    /// Tokens with every punctuation character on its own: token spacing never counts.
    V2 = 2,
}

impl Algorithm {
    /// The version new checksums are recorded with.
    pub const CURRENT: Algorithm = Algorithm::V2;

    /// Every version, oldest first.
    pub const ALL: [Algorithm; 2] = [Algorithm::V1, Algorithm::V2];

    /// The version recorded as `number`, if this build knows it.
    pub fn from_number(number: i64) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.number() == number)
    }

    /// The number recorded in the history table.
    pub fn number(self) -> i64 {
        self as i64
    }

    /// The canonical token text of `source` under this version, or the lexer's message if it is not
    /// valid Rust tokens.
    pub fn canonical_tokens(self, source: &str) -> Result<String, String> {
        let stream: TokenStream = source
            .parse()
            .map_err(|e: proc_macro2::LexError| format!("not valid Rust tokens: {e:?}"))?;
        let mut out = String::new();
        write_stream(stream, true, self, &mut out);
        Ok(out)
    }

    /// Hex sha256 of [`Algorithm::canonical_tokens`].
    pub fn checksum(self, source: &str) -> Result<String, String> {
        let canonical = self.canonical_tokens(source)?;
        Ok(hex::encode(Sha256::digest(canonical.as_bytes())))
    }
}

/// The canonical token text of `source` under the current algorithm.
pub fn canonical_tokens(source: &str) -> Result<String, String> {
    Algorithm::CURRENT.canonical_tokens(source)
}

/// The checksum of `source` under the current algorithm.
pub fn source_checksum(source: &str) -> Result<String, String> {
    Algorithm::CURRENT.checksum(source)
}

/// The checksum of `source` under algorithm version 1 (what databases migrated before version 2
/// recorded).
pub fn source_checksum_v1(source: &str) -> Result<String, String> {
    Algorithm::V1.checksum(source)
}

/// A migration released under algorithm version 1, as `checksums-v1.txt` froze it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenV1 {
    /// The migration's name.
    pub name: String,
    /// Its version-1 checksum when it was released.
    pub v1: String,
    /// Its version-2 checksum when version 1 was frozen.
    pub v2: String,
}

/// Parses `checksums-v1.txt`: `name v1 v2` per line; `#` starts a comment.
pub fn parse_frozen_v1(text: &str) -> Result<Vec<FrozenV1>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        match fields.as_slice() {
            [name, v1, v2] if is_hex(v1) && is_hex(v2) => out.push(FrozenV1 {
                name: (*name).to_owned(),
                v1: (*v1).to_owned(),
                v2: (*v2).to_owned(),
            }),
            _ => {
                return Err(format!(
                    "line {}: expected `<migration> <v1 checksum> <v2 checksum>`",
                    i + 1
                ));
            }
        }
    }
    Ok(out)
}

/// The version-1 checksum this build gives migration `name` whose source is `source`: its frozen
/// value when the source says what it said at release (same version-2 checksum, so it can differ
/// only in spacing or comments), else the value computed from the source.
pub fn effective_v1(name: &str, source: &str, frozen: &[FrozenV1]) -> Result<String, String> {
    let computed = Algorithm::V1.checksum(source)?;
    match frozen.iter().find(|f| f.name == name) {
        Some(f) if Algorithm::V2.checksum(source)? == f.v2 => Ok(f.v1.clone()),
        _ => Ok(computed),
    }
}

fn write_stream(stream: TokenStream, top_level: bool, algorithm: Algorithm, out: &mut String) {
    let tokens: Vec<TokenTree> = stream.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            // `#[doc = "..."]` (a doc comment) and `#![doc = "..."]`: documentation only.
            TokenTree::Punct(p) if p.as_char() == '#' => {
                let group_at = match tokens.get(i + 1) {
                    Some(TokenTree::Punct(b)) if b.as_char() == '!' => i + 2,
                    _ => i + 1,
                };
                if let Some(TokenTree::Group(g)) = tokens.get(group_at)
                    && g.delimiter() == Delimiter::Bracket
                    && is_doc_attribute(g.stream())
                {
                    i = group_at + 1;
                    continue;
                }
                push_token(&tokens[i], algorithm, out);
            }
            // `use ...;` and `pub use ...;` at the top level: rustfmt reorders them freely and they
            // only bring names into scope.
            TokenTree::Ident(id) if top_level && id == "use" => {
                if out.ends_with("pub ") {
                    out.truncate(out.len() - "pub ".len());
                }
                while i < tokens.len() {
                    if matches!(&tokens[i], TokenTree::Punct(p) if p.as_char() == ';') {
                        break;
                    }
                    i += 1;
                }
            }
            // A comma right before the end of its group is optional (rustfmt adds or removes it).
            TokenTree::Punct(p) if p.as_char() == ',' && i + 1 == tokens.len() && !top_level => {}
            TokenTree::Group(g) => {
                let (open, close) = match g.delimiter() {
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::Brace => ("{", "}"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::None => ("", ""),
                };
                out.push_str(open);
                out.push(' ');
                write_stream(g.stream(), false, algorithm, out);
                out.push_str(close);
                out.push(' ');
            }
            other => push_token(other, algorithm, out),
        }
        i += 1;
    }
}

fn push_token(token: &TokenTree, algorithm: Algorithm, out: &mut String) {
    match token {
        TokenTree::Punct(p) => {
            out.push(p.as_char());
            let joined = match algorithm {
                // Joint punctuation (`::`, `->`, `=>`) stays joined; anything else is one token.
                Algorithm::V1 => p.spacing() == Spacing::Joint,
                // Whether the lexer saw a space after it is formatting, not meaning.
                Algorithm::V2 => false,
            };
            if !joined {
                out.push(' ');
            }
        }
        other => {
            out.push_str(&other.to_string());
            out.push(' ');
        }
    }
}

fn is_doc_attribute(stream: TokenStream) -> bool {
    matches!(stream.into_iter().next(), Some(TokenTree::Ident(id)) if id == "doc")
}
