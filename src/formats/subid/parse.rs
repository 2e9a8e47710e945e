//! Pure parsing of subuid(5)/subgid(5) contents, and the byte-exact append.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{IdRange, SubidError};

/// shadow-utils' subordinate_parse() rejects lines of this many bytes or more.
pub const MAX_LINE: usize = 1024;

/// Why a line is not a valid `owner:start:count` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum LineProblem {
    #[error("contains a NUL byte")]
    NulByte,
    #[error("line is {len} bytes long (shadow-utils accepts at most {})", MAX_LINE - 1)]
    TooLong { len: usize },
    #[error("expected 3 fields owner:start:count, found {found}")]
    FieldCount { found: usize },
    #[error("{field} is empty")]
    EmptyField { field: &'static str },
    #[error("{field} {value:?} is not a decimal number")]
    NotDecimal { field: &'static str, value: String },
    // shadow-utils parses with strtoul(base 0), so "0100" means 64 to it: refuse to guess.
    #[error("{field} {value:?} has a leading zero (shadow-utils would read it as octal)")]
    LeadingZero { field: &'static str, value: String },
    #[error("{field} {value:?} is too large")]
    TooLarge { field: &'static str, value: String },
    #[error("count is 0")]
    ZeroCount,
    #[error("range {start}:{count} ends past 2^32")]
    PastEnd { start: u64, count: u64 },
}

/// One `owner:start:count` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// 1-based line number.
    pub line: usize,
    pub owner: String,
    pub range: IdRange,
    /// The line ends in `\r\n`. newuidmap then sees a count of "65536\r" and ignores the
    /// line, so such a range blocks others but does not count as usable.
    pub crlf: bool,
}

/// The entries of a subordinate ID file; comments and blank lines are not kept here
/// because the file is only ever appended to, never re-serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubidFile {
    /// The path used in messages.
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

impl SubidFile {
    /// Parses the whole file, failing on the first malformed line.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<SubidFile, SubidError> {
        let mut entries = Vec::new();
        let mut lines = bytes.split(|&b| b == b'\n').peekable();
        let mut number = 0;
        while let Some(line) = lines.next() {
            number += 1;
            if line.is_empty() && lines.peek().is_none() {
                break; // after the final newline
            }
            let malformed = |problem| SubidError::Malformed { path: path.to_owned(), line: number, problem };
            if line.contains(&0) {
                return Err(malformed(LineProblem::NulByte));
            }
            let (content, crlf) = match line.strip_suffix(b"\r") {
                Some(content) => (content, true),
                None => (line, false),
            };
            if content.iter().all(u8::is_ascii_whitespace) || content.starts_with(b"#") {
                continue;
            }
            let (owner, range) = parse_entry(line, content).map_err(malformed)?;
            entries.push(Entry { line: number, owner, range, crlf });
        }
        Ok(SubidFile { path: path.to_owned(), entries })
    }
}

fn parse_entry(line: &[u8], content: &[u8]) -> Result<(String, IdRange), LineProblem> {
    if line.len() >= MAX_LINE {
        return Err(LineProblem::TooLong { len: line.len() });
    }
    let fields: Vec<&[u8]> = content.split(|&b| b == b':').collect();
    let [owner, start, count] = fields[..] else {
        return Err(LineProblem::FieldCount { found: fields.len() });
    };
    for (field, value) in [("owner", owner), ("start", start), ("count", count)] {
        if value.is_empty() {
            return Err(LineProblem::EmptyField { field });
        }
    }
    let start = parse_decimal("start", start)?;
    let count = parse_decimal("count", count)?;
    if count == 0 {
        return Err(LineProblem::ZeroCount);
    }
    if start + count > 1 << 32 {
        return Err(LineProblem::PastEnd { start, count });
    }
    // Only "0:4294967296" gets here with a count above u32::MAX; IdRange cannot hold it.
    let count = u32::try_from(count)
        .map_err(|_| LineProblem::TooLarge { field: "count", value: count.to_string() })?;
    let range = IdRange { start: start as u32, count };
    Ok((String::from_utf8_lossy(owner).into_owned(), range))
}

/// Decimal digits only (no sign, spaces, hex or leading zeros), at most ten of them.
fn parse_decimal(field: &'static str, value: &[u8]) -> Result<u64, LineProblem> {
    let text = || String::from_utf8_lossy(value).into_owned();
    if !value.iter().all(u8::is_ascii_digit) {
        return Err(LineProblem::NotDecimal { field, value: text() });
    }
    if value.len() > 1 && value[0] == b'0' {
        return Err(LineProblem::LeadingZero { field, value: text() });
    }
    if value.len() > 10 {
        return Err(LineProblem::TooLarge { field, value: text() });
    }
    Ok(std::str::from_utf8(value).expect("ASCII digits").parse().expect("at most 10 digits"))
}

/// `original` byte for byte, a newline if it lacked a final one, then `owner:start:count\n`.
pub fn append_entry(original: &[u8], owner: &str, range: IdRange) -> Vec<u8> {
    let mut out = Vec::with_capacity(original.len() + owner.len() + 24);
    out.extend_from_slice(original);
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(format!("{owner}:{}:{}\n", range.start, range.count).as_bytes());
    out
}
