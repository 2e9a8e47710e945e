//! JSON written the way Butane writes it: Go's `encoding/json` (clarketm/json fork) with
//! `MarshalIndent(v, "", "  ")`, fields in Go struct order, HTML characters escaped.

/// A JSON value whose objects keep the order they were built in.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Object(Vec<(String, Json)>),
    Array(Vec<Json>),
    String(String),
    Int(i64),
    Bool(bool),
}

impl Json {
    /// An object from `(key, value)` pairs, skipping `None` values (Go's `omitempty`).
    pub fn object<'a>(fields: impl IntoIterator<Item = (&'a str, Option<Json>)>) -> Json {
        Json::Object(fields.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect())
    }

    /// `Some(self)` unless this is an empty object or array (clarketm/json's `omitempty` on structs and slices).
    pub fn non_empty(self) -> Option<Json> {
        match &self {
            Json::Object(f) if f.is_empty() => None,
            Json::Array(a) if a.is_empty() => None,
            _ => Some(self),
        }
    }

    /// Pretty-printed like Go's `json.MarshalIndent(v, "", "  ")`, without a trailing newline.
    pub fn to_pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        match self {
            Json::Object(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Array(items) if items.is_empty() => out.push_str("[]"),
            Json::Object(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    write_string(out, key);
                    out.push_str(": ");
                    value.write(out, depth + 1);
                }
                newline(out, depth);
                out.push('}');
            }
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    item.write(out, depth + 1);
                }
                newline(out, depth);
                out.push(']');
            }
            Json::String(s) => write_string(out, s),
            Json::Int(n) => out.push_str(&n.to_string()),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
}

fn newline(out: &mut String, depth: usize) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str("  ");
    }
}

/// Go's `encodeState.string` with `escapeHTML` on: `<`, `>`, `&`, U+2028 and U+2029 are
/// escaped, other control characters become `\u00xx` except `\n`, `\r` and `\t`.
fn write_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 || c == '<' || c == '>' || c == '&' => {
                let b = c as u32 as u8;
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indents_like_go_marshal_indent() {
        let v = Json::object([
            ("a", Some(Json::Object(vec![]))),
            ("b", None),
            ("c", Some(Json::Array(vec![Json::Int(1), Json::Bool(true)]))),
        ]);
        assert_eq!(v.to_pretty(), "{\n  \"a\": {},\n  \"c\": [\n    1,\n    true\n  ]\n}");
    }

    #[test]
    fn escapes_like_go() {
        let v = Json::String("a&b<c>\u{1}\n\"\\\u{2028}é".into());
        assert_eq!(v.to_pretty(), r#""a\u0026b\u003cc\u003e\u0001\n\"\\\u2028é""#);
    }
}
