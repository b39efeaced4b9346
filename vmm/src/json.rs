//! A small JSON writer for the one-object outputs of `mmu-vmm` and its
//! benches (no serde: what is written is flat and known). Keys and strings
//! are escaped; numbers are written as given, floats with six decimals.

use std::fmt::Write as _;

/// A JSON string literal for `s`.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON array of already-rendered values.
pub fn array(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().collect();
    format!("[{}]", items.join(", "))
}

/// A JSON object, built member by member.
#[derive(Debug, Default)]
pub struct Object {
    members: Vec<String>,
}

impl Object {
    /// An empty object.
    pub fn new() -> Self {
        Object::default()
    }

    /// A member whose value is already JSON.
    pub fn raw(mut self, key: &str, json: impl Into<String>) -> Self {
        self.members
            .push(format!("{}: {}", string(key), json.into()));
        self
    }

    /// A member with an integer value.
    pub fn num(self, key: &str, value: u64) -> Self {
        self.raw(key, value.to_string())
    }

    /// A member with a float value (six decimals).
    pub fn float(self, key: &str, value: f64) -> Self {
        self.raw(key, format!("{value:.6}"))
    }

    /// A member with a boolean value.
    pub fn bool(self, key: &str, value: bool) -> Self {
        self.raw(key, value.to_string())
    }

    /// A member with a string value (escaped).
    pub fn str(self, key: &str, value: &str) -> Self {
        self.raw(key, string(value))
    }

    /// Named counters as members of a nested object.
    pub fn counters<'a>(
        self,
        key: &str,
        counters: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Self {
        let inner = counters
            .into_iter()
            .fold(Object::new(), |o, (name, value)| o.num(name, value));
        self.raw(key, inner.finish())
    }

    /// The object as JSON text, on one line.
    pub fn finish(self) -> String {
        format!("{{{}}}", self.members.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_render_and_escape() {
        let json = Object::new()
            .str("name", "a \"b\"\n\u{1}")
            .num("n", 7)
            .bool("ok", true)
            .float("t", 0.5)
            .counters("c", [("x", 1), ("y", 2)])
            .raw("list", array(["1".to_string(), "2".to_string()]))
            .finish();
        assert_eq!(
            json,
            r#"{"name": "a \"b\"\n\u0001", "n": 7, "ok": true, "t": 0.500000, "c": {"x": 1, "y": 2}, "list": [1, 2]}"#
        );
        assert_eq!(Object::new().finish(), "{}");
        assert_eq!(array(Vec::new()), "[]");
    }
}
