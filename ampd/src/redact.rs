//! The one path by which secrets are kept out of every message, error and log line.
//!
//! What is a secret:
//! - the password of a database URL (`postgresql://user:<secret>@host/db`);
//! - the value of a parameter whose name ends in `password` or `token`, any case, in a URL's query
//!   or as `name=value` in text: libpq's `password` and `sslpassword` (the client key's passphrase).
//!   Parameters that name a file (`passfile`, `sslkey`, `sslcert`, `sslrootcert`) are not secrets:
//!   the file's contents are, its path is not;
//! - the value of a config key whose name ends in `password` or `token` (`controller.admin_token`).
//!
//! [`redact_url`] finds the first two by their shape, wherever they appear in text. [`Secrets`]
//! replaces values known exactly, raw, percent-decoded or escaped, wherever they appear: that
//! catches them where a library prints a value without its URL (sqlx logs
//! `ignoring unrecognized connect parameter key=sslpassword value=…`). The configuration loader
//! uses a `Secrets` of its own, gathered from the input, for its error messages; everything else
//! goes through [`redact`], whose secrets are [`register`]ed from the loaded configuration.
//!
//! Redaction happens at the edges, where text leaves the process, not where it is made: every log
//! line (`logging`), every printed error (`cli::print_error`), `ampd migrate`'s results on stdout
//! (`migrate_cmd`), every HTTP error body (`service::http::ApiError`), a job's error detail before
//! it is stored (readable through the admin API) and `/readyz`'s reason. Errors inside the
//! process carry what happened as it happened. A URL shown on purpose is formatted through
//! [`crate::config::DatabaseUrl`], whose `Display` redacts.

use std::fmt;
use std::sync::RwLock;

use percent_encoding::percent_decode_str;

/// What a secret is replaced by.
pub const MASK: &str = "***";

/// Longer candidates are not passwords; more than this many means hostile input.
const MAX_SECRET_LEN: usize = 4096;
const MAX_SECRETS: usize = 1000;

/// Whether a parameter or key called `name` holds a secret (see the module documentation).
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.ends_with("password") || name.ends_with("token")
}

/// Whether the URL query parameter called `name` (as written, encoded) holds a secret.
fn is_secret_param(name: &str) -> bool {
    is_secret_name(&decode(&name.replace('+', " ")))
}

/// Whether the query parameter `name=value` (as written) holds a secret: a secret name, or
/// libpq's `options` setting one (`-c password=…`).
fn is_secret_pair(name: &str, value: &str) -> bool {
    let decoded = |s: &str| decode(&s.replace('+', " ")).to_ascii_lowercase();
    is_secret_param(name)
        || (decoded(name) == "options" && {
            let value = decoded(value);
            value.contains("password") || value.contains("token")
        })
}

/// `s` percent-decoded (invalid escapes kept, invalid UTF-8 replaced).
pub fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// The secrets of `url`, as written in it: its password and its secret query parameters' values.
pub fn url_secrets(url: &str) -> Vec<String> {
    let Ok(url) = url::Url::parse(url) else {
        return Vec::new();
    };
    let params = url.query().unwrap_or_default().split('&');
    let params = params.filter_map(|part| part.split_once('='));
    let secret_params = params.filter(|(name, value)| is_secret_pair(name, value));
    let password = url.password().into_iter();
    password
        .chain(secret_params.map(|(_, value)| value))
        .map(str::to_owned)
        .collect()
}

/// `text` with every URL password and every secret parameter's value replaced by `***` (user
/// names, hosts and other parameters are kept). A URL is rewritten through its parsed form; other
/// text by its shape: between `://user:` and the last `@` of a word, and after `…password=` or
/// `…token=`. Never panics.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(url) if url.has_host() => match redact_parsed(&url) {
            // A second URL hidden in the path or query: treat the whole as text.
            Some(out) if out.matches("://").count() > 1 => redact_text(&out),
            Some(out) => out,
            None if text.matches("://").count() > 1 => redact_text(text),
            None => text.to_owned(),
        },
        _ => redact_text(text),
    }
}

/// The redacted serialisation of `url`, or `None` when it holds nothing to hide.
fn redact_parsed(url: &url::Url) -> Option<String> {
    let mut out = url.clone();
    let mut changed = false;
    if url.password().is_some() {
        if out.set_password(Some(MASK)).is_err() {
            return Some(redact_text(url.as_str()));
        }
        changed = true;
    }
    if let Some(query) = url.query() {
        let parts: Vec<String> = query
            .split('&')
            .map(|part| match part.split_once('=') {
                Some((name, value)) if is_secret_pair(name, value) => {
                    changed = true;
                    format!("{name}={MASK}")
                }
                _ => part.to_owned(),
            })
            .collect();
        out.set_query(Some(&parts.join("&")));
    }
    changed.then(|| out.to_string())
}

/// Ends a URL or a parameter value found in free text.
fn ends_word(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>')
}

/// A `postgres:` or `postgresql:` scheme not followed by `//` (`postgresql:/user:pw@host/db`, a
/// mistyped URL) is given its `//`, so that its user part is found as in a URL.
fn with_authority(s: &str) -> std::borrow::Cow<'_, str> {
    let lower = s.to_ascii_lowercase();
    let mut inserts = Vec::new();
    for scheme in ["postgresql:", "postgres:"] {
        for (at, _) in lower.match_indices(scheme) {
            let end = at + scheme.len();
            // `sqlx_postgres::options` (a module path, the target of a JSON log line) holds no
            // scheme.
            let before = at.checked_sub(1).map(|i| lower.as_bytes()[i]);
            let starts_word = before.is_none_or(|b| !b.is_ascii_alphanumeric() && b != b'_');
            if starts_word && !lower[end..].starts_with("//") && !inserts.contains(&end) {
                // `postgres:` inside `postgresql:` is not a scheme of its own.
                if scheme == "postgres:" && lower[..end].ends_with("postgresql:") {
                    continue;
                }
                inserts.push(end);
            }
        }
    }
    if inserts.is_empty() {
        return std::borrow::Cow::Borrowed(s);
    }
    inserts.sort_unstable();
    let mut out = String::with_capacity(s.len() + 2 * inserts.len());
    let mut cursor = 0;
    for at in inserts {
        out.push_str(&s[cursor..at]);
        let slashes = s[at..].bytes().take_while(|&b| b == b'/').count();
        out.push_str(&"//"[..2 - slashes.min(2)]);
        cursor = at;
    }
    out.push_str(&s[cursor..]);
    std::borrow::Cow::Owned(out)
}

/// Shape-based redaction of free text (see [`redact_url`]).
fn redact_text(s: &str) -> String {
    let s = &*with_authority(s);
    let mut out = String::with_capacity(s.len());
    let mut cursor = 0;
    while let Some(rel) = s[cursor..].find("://") {
        let start = cursor + rel + 3;
        let end = s[start..].find(ends_word).map_or(s.len(), |i| start + i);
        let word = &s[start..end];
        let userinfo = word
            .rfind('@')
            .and_then(|at| word[..at].find(':').map(|colon| (colon, at)));
        match userinfo {
            Some((colon, at)) => {
                out.push_str(&s[cursor..=start + colon]);
                out.push_str(MASK);
                out.push_str(&s[start + at..end]);
            }
            None => out.push_str(&s[cursor..end]),
        }
        cursor = end;
    }
    out.push_str(&s[cursor..]);
    mask_param_values(&out)
}

/// Each secret `name=value` in `s`, as the byte range of its value.
fn secret_params(s: &str) -> Vec<(usize, usize)> {
    // ASCII lower-casing keeps byte offsets.
    let lower = s.to_ascii_lowercase();
    let mut found = Vec::new();
    for marker in ["password=", "token="] {
        for (at, _) in lower.match_indices(marker) {
            let start = at + marker.len();
            let end = s[start..]
                .find(|c: char| ends_word(c) || matches!(c, '&' | '#' | ';' | ','))
                .map_or(s.len(), |i| start + i);
            found.push((start, end));
        }
    }
    found.sort_unstable();
    found
}

/// `s` with each secret parameter's value replaced by `***`.
fn mask_param_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut cursor = 0;
    for (start, end) in secret_params(s) {
        if start < cursor || start == end {
            continue;
        }
        out.push_str(&s[cursor..start]);
        out.push_str(MASK);
        cursor = end;
    }
    out.push_str(&s[cursor..]);
    out
}

/// A secret string from the configuration (`controller.admin_token`): `Debug` shows `***`;
/// [`Secret::expose`] gives the value, for use and never for output.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// Secret values known exactly, replaced wherever they appear. (No `Debug`: it holds secrets.)
#[derive(Default)]
pub struct Secrets {
    /// Every form of every secret, longest first, so that a secret containing another goes whole.
    forms: Vec<String>,
}

impl Secrets {
    /// Adds `secret` in every form a message may show it in: as given, percent-decoded (also with
    /// `+` as a space, as in a query), escaped as `Debug` quotes it, and escaped as a JSON string
    /// holds it (a JSON log line).
    pub fn add(&mut self, secret: &str) {
        if secret.is_empty() || secret.len() > MAX_SECRET_LEN || self.forms.len() >= MAX_SECRETS {
            return;
        }
        let decoded = decode(secret);
        let form_decoded = decode(&secret.replace('+', " "));
        for form in [secret, &decoded, &form_decoded] {
            for form in [
                form.to_owned(),
                form.escape_debug().to_string(),
                json_escaped(form),
            ] {
                if !form.is_empty() && !self.forms.contains(&form) {
                    self.forms.push(form);
                }
            }
        }
        self.forms.sort_by_key(|form| std::cmp::Reverse(form.len()));
    }

    /// Adds everything in `text` (input that may be malformed) that may be a secret by its shape:
    /// for every `://` on a line, what lies between the next `:` and each later `@`; every secret
    /// parameter's value.
    pub fn harvest(&mut self, text: &str) {
        let mut search = 0;
        while let Some(rel) = text[search..].find("://") {
            let start = search + rel + 3;
            search = start;
            let line_end = text[start..]
                .find(['\n', '\r'])
                .map_or(text.len(), |i| start + i);
            let line = &text[start..line_end];
            if let Some(colon) = line.find(':') {
                for (at, _) in line.match_indices('@').filter(|(at, _)| *at > colon) {
                    self.add(&line[colon + 1..at]);
                }
            }
        }
        for (start, end) in secret_params(text) {
            self.add(&text[start..end]);
        }
    }

    /// `text` with every known secret, and every secret found by its shape, replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for form in &self.forms {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), MASK);
            }
        }
        redact_url(&out)
    }
}

/// `s` as it appears inside a JSON string (without the quotes).
fn json_escaped(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or_default()
        .to_owned()
}

/// The secrets of the running process's configuration.
static REGISTERED: RwLock<Secrets> = RwLock::new(Secrets { forms: Vec::new() });

/// Registers `secret` for [`redact`].
pub fn register(secret: &str) {
    match REGISTERED.write() {
        Ok(mut secrets) => secrets.add(secret),
        Err(poisoned) => poisoned.into_inner().add(secret),
    }
}

/// `text` with every registered secret and every secret found by its shape replaced by `***`:
/// what every log line and every printed error goes through.
pub fn redact(text: &str) -> String {
    match REGISTERED.read() {
        Ok(secrets) => secrets.redact(text),
        Err(poisoned) => poisoned.into_inner().redact(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redact_url_falls_back_to_text_for_unparseable_input() {
        assert_eq!(
            redact_url("postgresql://u:pa/ss@host/db"),
            "postgresql://u:***@host/db"
        );
        assert_eq!(
            redact_url("postgresql://u:p@ss@h:x/db"),
            "postgresql://u:***@h:x/db"
        );
        assert_eq!(
            redact_url("see postgresql://u:secret@h:bad now"),
            "see postgresql://u:***@h:bad now"
        );
        assert_eq!(redact_url("no url here"), "no url here");
        for s in ["", "://", ":///@", "a://:@", "x://é:ü@", "://@:"] {
            let _ = redact_url(s);
        }
    }

    #[test]
    fn a_url_without_its_authority_slashes_is_redacted_too() {
        for (text, expected) in [
            (
                "url=postgresql:/amp:HunterPw2@host/db",
                "url=postgresql://amp:***@host/db",
            ),
            (
                "postgresql:amp:HunterPw2@host/db",
                "postgresql://amp:***@host/db",
            ),
            ("postgres:/u:Pw@h", "postgres://u:***@h"),
        ] {
            assert_eq!(redact_url(text), expected);
        }
        assert_eq!(redact_url("postgresql:///db"), "postgresql:///db");
        for path in ["sqlx_postgres::options::parse", "x_postgresql:y"] {
            assert_eq!(redact_url(path), path);
        }
    }

    #[test]
    fn parameters_ending_in_password_or_token_are_secret_and_file_names_are_not() {
        for name in [
            "password",
            "sslpassword",
            "SSLPassword",
            "admin_token",
            "pass%77ord",
        ] {
            assert!(is_secret_name(&decode(name)), "{name}");
        }
        for name in [
            "passfile",
            "sslkey",
            "sslcert",
            "sslrootcert",
            "user",
            "tokens",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
        assert_eq!(
            redact_url("postgresql://h/db?sslpassword=K3y&passfile=/p&sslkey=/k&pass%77ord=x"),
            "postgresql://h/db?sslpassword=***&passfile=/p&sslkey=/k&pass%77ord=***"
        );
        assert_eq!(
            redact_url("connect: sslpassword=K3y passfile=/p token=T0k&x=1"),
            "connect: sslpassword=*** passfile=/p token=***&x=1"
        );
    }

    #[test]
    fn known_secrets_are_replaced_in_every_form() {
        let mut secrets = Secrets::default();
        secrets.add("K3y%2FPa+ss\"q");
        for (shown, expected) in [
            // As sqlx logs an unrecognised parameter: decoded, without its URL.
            (
                "ignoring unrecognized connect parameter key=sslpassword value=K3y/Pa ss\"q",
                "ignoring unrecognized connect parameter key=sslpassword value=***",
            ),
            ("as written: K3y%2FPa+ss\"q", "as written: ***"),
            ("debug: \"K3y/Pa+ss\\\"q\"", "debug: \"***\""),
        ] {
            assert_eq!(secrets.redact(shown), expected);
        }
        // Longest first: a secret containing another goes whole.
        let mut secrets = Secrets::default();
        secrets.add("ab");
        secrets.add("abcd");
        assert_eq!(secrets.redact("xabcdx ab"), "x***x ***");
    }

    #[test]
    fn harvest_finds_what_may_be_a_password_in_malformed_input() {
        let mut secrets = Secrets::default();
        secrets.harvest("url = \"postgresql://u:S3cr/3t \\\" x@h/db\n?sslpassword=K3yPass&y=1");
        let shown = "invalid type: string \"postgresql://u:S3cr/3t \\\" x@h/db\", and K3yPass";
        let redacted = secrets.redact(shown);
        assert!(
            !redacted.contains("S3cr") && !redacted.contains("K3yPass"),
            "{redacted}"
        );
    }

    #[test]
    fn registered_secrets_are_redacted_from_output() {
        register("Reg1stered%40Secret");
        assert_eq!(
            redact("value=Reg1stered@Secret and Reg1stered%40Secret"),
            "value=*** and ***"
        );
    }

    #[test]
    fn a_secret_is_redacted_as_a_json_log_line_escapes_it() {
        let secret = "Js\"on\\Pa\u{1}ss'x";
        let mut secrets = Secrets::default();
        secrets.add(secret);
        let line =
            serde_json::json!({"fields": {"key": "sslpassword", "value": secret}}).to_string();
        assert_eq!(
            secrets.redact(&line),
            r#"{"fields":{"key":"sslpassword","value":"***"}}"#
        );
    }

    #[test]
    fn secret_debug_never_shows_the_value() {
        let secret: Secret = serde_json::from_str("\"T0ken\"").unwrap();
        assert_eq!(secret.expose(), "T0ken");
        assert_eq!(format!("{secret:?}"), "***");
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            failure_persistence: None, ..ProptestConfig::with_cases(512)
        })]

        #[test]
        fn redact_url_never_panics_nor_leaks(
            a in any::<String>(),
            b in any::<String>(),
        ) {
            let s = format!("{a}postgresql://u:S3cr3tPw@{b}");
            let _ = redact_url(&a);
            let red = redact_url(&s);
            // A user name/host part may legitimately hold the letters; the
            // password slot right after `u:` never does.
            prop_assert!(!red.contains("u:S3cr3tPw@"), "{}", red);
        }
    }

    #[test]
    fn a_password_set_through_the_options_parameter_is_redacted() {
        for url in [
            "postgresql://h/db?options=-c%20password%3DX",
            "postgresql://h/db?options=-c+password%3DX",
            "postgresql://h/db?application_name=a&options=-csslpassword%3DX",
        ] {
            let shown = redact_url(url);
            assert!(
                !shown.contains("%3DX") && !shown.contains("=X"),
                "{url}: {shown}"
            );
            assert!(shown.contains("options=***"), "{url}: {shown}");
            assert!(!url_secrets(url).is_empty(), "{url}");
        }
        assert_eq!(
            redact_url("postgresql://h/db?options=-c%20search_path%3Dx"),
            "postgresql://h/db?options=-c%20search_path%3Dx"
        );
    }
}
