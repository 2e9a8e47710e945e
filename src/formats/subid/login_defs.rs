//! The SUB_UID_* / SUB_GID_* limits from login.defs(5), read the way shadow-utils' getdef.c does.

use std::path::Path;

use crate::paths::Root;

use super::{IdKind, Limits, SubidError};

impl Limits {
    /// shadow-utils' defaults when login.defs or a key is absent.
    pub const DEFAULT: Limits = Limits { min: 100_000, max: 600_100_000, count: 65_536 };

    /// Reads `<root>/etc/login.defs`; a missing file means the defaults.
    pub fn from_login_defs(root: &Root, kind: IdKind) -> Result<Limits, SubidError> {
        let path = root.join("/etc/login.defs");
        match std::fs::read(&path) {
            Ok(bytes) => Limits::parse_login_defs(&path, &bytes, kind),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Limits::DEFAULT),
            Err(source) => Err(SubidError::Io { op: "reading", path, source }),
        }
    }

    /// Parses login.defs contents. The last occurrence of a key wins, as in shadow-utils.
    /// Unlike shadow-utils, which falls back to the default with a warning, an unparsable
    /// value is an error: allocating from a range the administrator did not mean is worse
    /// than not allocating.
    pub fn parse_login_defs(path: &Path, bytes: &[u8], kind: IdKind) -> Result<Limits, SubidError> {
        let prefix = kind.login_defs_prefix();
        let mut limits = Limits::DEFAULT;
        for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let Some((key, value)) = split_line(line) else {
                continue;
            };
            let slot = match key.strip_prefix(prefix.as_bytes()) {
                Some(b"_MIN") => &mut limits.min,
                Some(b"_MAX") => &mut limits.max,
                Some(b"_COUNT") => &mut limits.count,
                _ => continue,
            };
            *slot = parse_number(value).ok_or_else(|| SubidError::LoginDefs {
                path: path.to_owned(),
                line: index + 1,
                key: String::from_utf8_lossy(key).into_owned(),
                value: String::from_utf8_lossy(value).into_owned(),
            })?;
        }
        if limits.min > limits.max {
            return Err(SubidError::LimitsInverted {
                path: path.to_owned(),
                prefix,
                min: limits.min,
                max: limits.max,
            });
        }
        Ok(limits)
    }
}

/// getdef.c's def_load(): trim trailing white space, skip leading blanks, `#` starts a
/// comment, the key ends at a blank, the value skips blanks and quotes and ends at a quote.
fn split_line(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = line.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    let line = &line[..end];
    let start = line.iter().position(|&b| b != b' ' && b != b'\t')?;
    let line = &line[start..];
    if line.starts_with(b"#") {
        return None;
    }
    let key_end = line.iter().position(|&b| b == b' ' || b == b'\t')?;
    let (key, rest) = line.split_at(key_end);
    let value_start = rest.iter().position(|&b| !matches!(b, b' ' | b'\t' | b'"')).unwrap_or(rest.len());
    let value = &rest[value_start..];
    let value_end = value.iter().position(|&b| b == b'"').unwrap_or(value.len());
    Some((key, &value[..value_end]))
}

/// strtoul(base 0) without sign or trailing garbage: decimal, `0x` hex or `0` octal.
fn parse_number(value: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(value).ok()?;
    let (digits, radix) = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        (hex, 16)
    } else if text.len() > 1 && text.starts_with('0') {
        (&text[1..], 8)
    } else {
        (text, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, kind: IdKind) -> Result<Limits, SubidError> {
        Limits::parse_login_defs(Path::new("/etc/login.defs"), text.as_bytes(), kind)
    }

    #[test]
    fn defaults_when_keys_absent_or_commented() {
        let text = "# SUB_UID_MIN 5\n#SUB_UID_MAX\t9\nUID_MIN 1000\n\nSUB_UID_MIN\n";
        assert_eq!(parse(text, IdKind::Uid).unwrap(), Limits::DEFAULT);
    }

    #[test]
    fn reads_tab_and_space_separated_keys_last_one_wins() {
        let text = "SUB_UID_MIN\t150000\nSUB_UID_MAX   300000  \r\nSUB_UID_COUNT \"1000\"\nSUB_GID_MIN 7\n  SUB_UID_MIN 0x30D40\n";
        let limits = parse(text, IdKind::Uid).unwrap();
        assert_eq!(limits, Limits { min: 200_000, max: 300_000, count: 1000 });
        assert_eq!(parse(text, IdKind::Gid).unwrap(), Limits { min: 7, ..Limits::DEFAULT });
        assert_eq!(parse("SUB_GID_MIN 0\nSUB_GID_MAX 0777\n", IdKind::Gid).unwrap().max, 0o777);
    }

    #[test]
    fn bad_value_fails_closed_with_line() {
        let err = parse("UID_MIN 1000\nSUB_UID_MIN 10k\n", IdKind::Uid).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/login.defs:2: SUB_UID_MIN \"10k\" is not a number from 0 to 4294967295"
        );
        let err = parse("SUB_UID_MIN 10\nSUB_UID_MAX 9\n", IdKind::Uid).unwrap_err();
        assert_eq!(err.to_string(), "/etc/login.defs: SUB_UID_MIN (10) is above SUB_UID_MAX (9)");
    }
}
