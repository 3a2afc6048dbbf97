//! A manifest's stored bytes, built from the JSON text it came in without a tree of it.
//!
//! The bytes stored (and hashed) for a manifest are `serde_json::to_vec` of the
//! `serde_json::Value` its text parses to: no whitespace, every object's keys sorted by their
//! bytes with the last of duplicate keys kept, numbers and strings written the way `Value` writes
//! them. [`canonical`] writes those same bytes straight from the text: arrays element by element,
//! objects by sorting their entries (each value kept as its borrowed text, then written the same
//! way), scalars re-serialized through serde_json. Memory is the text and the output, not a tree
//! of about 80 bytes per value.
//!
//! [`Syntax`] reads a JSON text making the same calls as `Value`'s `Deserialize` and keeps nothing,
//! so a text it accepts is one `Value` accepts, and one it refuses gets `Value`'s error.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// `serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(text)?)`, without the `Value`.
/// Linear in the text (an object nested `d` deep is read `d` times); run it off the async runtime.
pub fn canonical(text: &str) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    write_canonical(text, &mut out)?;
    Ok(out)
}

fn write_canonical(text: &str, out: &mut Vec<u8>) -> serde_json::Result<()> {
    let mut de = serde_json::Deserializer::from_str(text);
    Canonical { out }.deserialize(&mut de)?;
    de.end()
}

/// Writes the value it reads, canonical, to `out`.
struct Canonical<'o> {
    out: &'o mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for Canonical<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Canonical<'_> {
    fn value<E: de::Error>(self, value: &serde_json::Value) -> Result<(), E> {
        serde_json::to_writer(&mut *self.out, value).map_err(E::custom)
    }
}

impl<'de> Visitor<'de> for Canonical<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.value(&serde_json::Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.value(&serde_json::Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.value(&serde_json::Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // `Value::from` turns a float that is not finite into null, as `Value`'s visitor does.
        self.value(&serde_json::Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        serde_json::to_writer(&mut *self.out, v).map_err(E::custom)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.out;
        out.push(b'[');
        let mut first = true;
        loop {
            let mark = out.len();
            if !first {
                out.push(b',');
            }
            if seq
                .next_element_seed(Canonical { out: &mut *out })?
                .is_none()
            {
                out.truncate(mark);
                break;
            }
            first = false;
        }
        out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut entries: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
        while let Some(key) = map.next_key_seed(Key)? {
            entries.push((key, map.next_value()?));
        }
        // Stable: of equal keys, the last given is the last of its run, and the one kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let out = self.out;
        out.push(b'{');
        let mut first = true;
        for (i, (key, value)) in entries.iter().enumerate() {
            if entries.get(i + 1).is_some_and(|next| next.0 == *key) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *out, key.as_ref()).map_err(de::Error::custom)?;
            out.push(b':');
            write_canonical(value.get(), out).map_err(de::Error::custom)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// An object's key, borrowed from the text when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Any JSON value, read with the calls `serde_json::Value`'s `Deserialize` makes (`deserialize_any`
/// for a value, `deserialize_str` for an object's first key and `deserialize_string` for the
/// others), keeping nothing: the same text is accepted and refused with the same error, and through
/// `serde_path_to_error` at the same path.
#[derive(Debug, Clone, Copy)]
pub struct Syntax;

impl<'de> serde::Deserialize<'de> for Syntax {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Syntax, D::Error> {
        deserializer.deserialize_any(SyntaxVisitor)
    }
}

struct SyntaxVisitor;

/// An object's key, read as `Value` reads its first key.
struct FirstKey;

impl<'de> DeserializeSeed<'de> for FirstKey {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// An object's key after the first, read as `Value` reads it (`String`'s `Deserialize`).
struct OtherKey;

impl<'de> serde::Deserialize<'de> for OtherKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<OtherKey, D::Error> {
        deserializer
            .deserialize_string(KeyVisitor)
            .map(|()| OtherKey)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
}

impl<'de> Visitor<'de> for SyntaxVisitor {
    type Value = Syntax;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Syntax, E> {
        Ok(Syntax)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Syntax, E> {
        Ok(Syntax)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Syntax, E> {
        Ok(Syntax)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Syntax, E> {
        Ok(Syntax)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Syntax, E> {
        Ok(Syntax)
    }

    fn visit_none<E: de::Error>(self) -> Result<Syntax, E> {
        Ok(Syntax)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Syntax, D::Error> {
        serde::Deserialize::deserialize(deserializer)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Syntax, E> {
        Ok(Syntax)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Syntax, A::Error> {
        while seq.next_element::<Syntax>()?.is_some() {}
        Ok(Syntax)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Syntax, A::Error> {
        if map.next_key_seed(FirstKey)?.is_some() {
            map.next_value::<Syntax>()?;
            while map.next_entry::<OtherKey, Syntax>()?.is_some() {}
        }
        Ok(Syntax)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the stored bytes have always been.
    fn through_value(text: &str) -> Vec<u8> {
        let value: serde_json::Value = serde_json::from_str(text).expect(text);
        serde_json::to_vec(&value).expect(text)
    }

    #[test]
    fn canonical_bytes_are_those_of_the_value_tree() {
        let texts = [
            // Unsorted keys, duplicates (the last wins), nested objects, whitespace.
            r#" { "kind" : "static", "b": 1, "a": {"z": [1, {"y": 2, "x": 3}], "a": null},
                  "b": 2, "a\u0000": 0, "é": 1, "e": 2, "": 3, "~": 4 } "#,
            r#"{"k": 1, "k": {"x": 1}, "k": [1, 2]}"#,
            // Keys equal once unescaped, and ordered by their bytes.
            r#"{"\u0061": 1, "a": 2, "A": 3, "\u00e9": 4, "\ud83d\ude00": 5, "z": 6}"#,
            // Strings: escapes, unicode, control characters, `/`, DEL.
            r#"["a\"b\\c\/d\b\f\n\r\t", "\u0001\u001f\u007f", "é ü 中 😀", "\ud83d\ude00", "\u2028\u2029", ""]"#,
            // Numbers: floats, exponents, signed zero, big integers.
            r#"[1.0, 1e300, -0.0, -0, 0, 1E2, 1e-7, 0.1, 123456789.123456789, 5e-324,
                1.7976931348623157e308, -1.5, 2.5e+3, 100e-2]"#,
            r#"[9223372036854775807, 9223372036854775808, 18446744073709551615,
                18446744073709551616, -9223372036854775808, -9223372036854775809,
                123456789012345678901234567890]"#,
            // Rows with objects, arrays and every scalar.
            r#"{"kind":"static","tables":{"t":{"rows":[[{"b":1,"a":[]}, [], {}], [true, false, null]],
                "columns":[{"type":"int64","name":"n"}]}}}"#,
            "[]",
            "{}",
            "null",
            "\"x\"",
            " 7 ",
            "[[[[[[[[[[{\"a\":[[[{}]]]}]]]]]]]]]]",
        ];
        for text in texts {
            assert_eq!(
                String::from_utf8(canonical(text).expect(text)).unwrap(),
                String::from_utf8(through_value(text)).unwrap(),
                "{text}"
            );
        }
    }

    #[test]
    fn syntax_accepts_and_refuses_what_value_does_with_its_errors() {
        let texts = [
            "{\"a\": [1, 2, {\"b\": null}]}",
            "{\"a\": 1,}",
            "{\"a\" 1}",
            "[1, 2",
            "{\"a\": 1e400}",
            "{\"a\": \"\\x\"}",
            "{\"a\": \"\u{1}\"}",
            "{1: 2}",
            "[01]",
            "nul",
            "",
            "[] []",
            &format!("{}{}", "[".repeat(200), "]".repeat(200)),
        ];
        for text in texts {
            let value = serde_json::from_str::<serde_json::Value>(text).map(drop);
            let syntax = serde_json::from_str::<Syntax>(text).map(drop);
            assert_eq!(
                syntax.map_err(|e| e.to_string()),
                value.map_err(|e| e.to_string()),
                "{text}"
            );
        }
        // Invalid UTF-8 in a string, from bytes.
        let bytes = b"{\"a\": \"\xff\"}";
        assert_eq!(
            serde_json::from_slice::<Syntax>(bytes)
                .map(drop)
                .map_err(|e| e.to_string()),
            serde_json::from_slice::<serde_json::Value>(bytes)
                .map(drop)
                .map_err(|e| e.to_string()),
        );
    }
}
