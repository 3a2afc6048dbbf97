// Canonical form of a migration's Rust source, shared by `build.rs` (which checksums every migration
// file at build time) and the library (which exposes it to tests). Only tokens count: whitespace,
// comments, doc comments, `use` items and trailing commas are dropped, so `cargo fmt`, a new comment
// or a rebuild never changes a checksum, while any change to what the code says does. The sea-query
// SQL is deliberately not hashed: a sea-orm/sea-query upgrade may render the same migration
// differently, and that must not look like an edited migration.

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
use sha2::{Digest, Sha256};

/// The canonical token text of `source`, or the lexer's message if it is not valid Rust tokens.
pub fn canonical_tokens(source: &str) -> Result<String, String> {
    let stream: TokenStream = source
        .parse()
        .map_err(|e: proc_macro2::LexError| format!("not valid Rust tokens: {e:?}"))?;
    let mut out = String::new();
    write_stream(stream, true, &mut out);
    Ok(out)
}

/// Hex sha256 of [`canonical_tokens`].
pub fn source_checksum(source: &str) -> Result<String, String> {
    let canonical = canonical_tokens(source)?;
    Ok(hex::encode(Sha256::digest(canonical.as_bytes())))
}

fn write_stream(stream: TokenStream, top_level: bool, out: &mut String) {
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
                push_token(&tokens[i], out);
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
                write_stream(g.stream(), false, out);
                out.push_str(close);
                out.push(' ');
            }
            other => push_token(other, out),
        }
        i += 1;
    }
}

fn push_token(token: &TokenTree, out: &mut String) {
    match token {
        TokenTree::Punct(p) => {
            out.push(p.as_char());
            // Joint punctuation (`::`, `->`, `=>`) stays joined; anything else is one token.
            if p.spacing() == Spacing::Alone {
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
