//! The documentation stays usable: every relative link of the README, `ARCHITECTURE.md`,
//! `tests/README.md` and `docs/*.md` leads to a file that exists (and, into a Markdown file, to a
//! heading it has), every code block names its language, and every file with a Rust snippet is
//! compiled by the `migration` crate's doc tests. No database: these read the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_owned()
}

/// The Markdown files checked, relative to the workspace root.
fn documents() -> Vec<PathBuf> {
    let root = workspace();
    let mut files: Vec<PathBuf> = ["README.md", "ARCHITECTURE.md", "tests/README.md"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| p.strip_prefix(&root).expect("under the root").to_owned())
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn read(rel: &Path) -> String {
    std::fs::read_to_string(workspace().join(rel))
        .unwrap_or_else(|e| panic!("{}: {e}", rel.display()))
}

/// The lines of a Markdown text outside fenced code blocks, with their line numbers (1-based).
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The opening line of every fenced code block: (line number, info string).
fn fences(text: &str) -> Vec<(usize, String)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            if !fenced {
                out.push((i + 1, info.trim().to_owned()));
            }
            fenced = !fenced;
        }
    }
    out
}

/// The anchors GitHub gives the headings of a Markdown text: lower case, only letters, digits,
/// `-`, `_` and spaces kept, spaces turned into `-`; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// The targets of the inline links `[text](target)` of a line, code spans left out.
fn link_targets(line: &str) -> Vec<String> {
    let mut plain = String::new();
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            plain.push(c);
        }
    }
    let mut out = Vec::new();
    let mut rest = plain.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].trim().to_owned());
        rest = &after[end..];
    }
    out
}

#[test]
fn every_relative_link_leads_to_an_existing_file_and_heading() {
    let root = workspace();
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = read(&doc);
        let dir = doc.parent().unwrap_or(Path::new("")).to_owned();
        for (line_no, line) in prose(&text) {
            for target in link_targets(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (file, anchor) = match target.split_once('#') {
                    Some((file, anchor)) => (file, Some(anchor)),
                    None => (target.as_str(), None),
                };
                let rel = if file.is_empty() {
                    doc.clone()
                } else {
                    dir.join(file)
                };
                let path = root.join(&rel);
                if !path.exists() {
                    broken.push(format!(
                        "{}:{line_no}: {target}: no such file",
                        doc.display()
                    ));
                    continue;
                }
                let Some(anchor) = anchor else { continue };
                if path.extension().is_some_and(|x| x == "md") {
                    let text = std::fs::read_to_string(&path).expect("a Markdown file");
                    if !anchors(&text).contains(anchor) {
                        broken.push(format!(
                            "{}:{line_no}: {target}: no heading with that anchor in {}",
                            doc.display(),
                            rel.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser right?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_code_block_names_its_language() {
    // rustdoc compiles a block without a language as Rust, so an unmarked block in a file the
    // doc tests include would be compiled; and a reader should know what a block is.
    let mut unmarked = Vec::new();
    for doc in documents() {
        for (line_no, info) in fences(&read(&doc)) {
            if info.is_empty() {
                unmarked.push(format!("{}:{line_no}", doc.display()));
            }
        }
    }
    assert!(
        unmarked.is_empty(),
        "code blocks without a language (```text, ```sh, ```rust, ...):\n{}",
        unmarked.join("\n")
    );
}

#[test]
fn every_document_with_a_rust_snippet_is_compiled_by_the_doc_tests() {
    let lib = read(Path::new("migration/src/lib.rs"));
    let mut missing = Vec::new();
    let mut with_rust = 0;
    for doc in documents() {
        let has_rust = fences(&read(&doc)).iter().any(|(_, info)| {
            let words: Vec<&str> = info.split(',').map(str::trim).collect();
            words.first() == Some(&"rust") && !words.contains(&"ignore")
        });
        if has_rust {
            with_rust += 1;
            let include = format!("include_str!(\"../../{}\")", doc.display());
            if !lib.contains(&include) {
                missing.push(format!("{} (add #[doc = {include}])", doc.display()));
            }
        }
    }
    assert!(with_rust > 0, "no Rust snippet found: is the parser right?");
    assert!(
        missing.is_empty(),
        "Rust snippets not compiled by migration/src/lib.rs's doc_snippets:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_anchor_of_a_heading_is_the_one_github_gives_it() {
    let text = "# `ampd migrate`\n## Poolers (PgBouncer) and `direct_url`\n\
                ### jobs — one row per job, with its current state\n## Errors\n## Errors\n\
                ```sh\n# not a heading\n```\n";
    let expected: BTreeSet<String> = [
        "ampd-migrate",
        "poolers-pgbouncer-and-direct_url",
        "jobs--one-row-per-job-with-its-current-state",
        "errors",
        "errors-1",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(anchors(text), expected);
}
