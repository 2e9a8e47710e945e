//! `text::one_line`, the sanitizer between what the runner user controls (Podman's messages,
//! helpers' stderr, process names) and `STATUS=`, `/readyz`, the journal and terminals.
//!
//! Input: two bytes of the bound N (0..=511), then the text (invalid UTF-8 replaced, as every
//! caller's lossy decoding does). Properties: no control character and none of the
//! characters that reorder or hide text in the output, at most N characters, and exactly what
//! an independent oracle makes of the text: its words joined by one space, cut to N - 1
//! characters and `…` when longer than N.
#![no_main]

use executor_agent::text::one_line;
use libfuzzer_sys::fuzz_target;

/// What one_line must treat as a separator: control characters, white space, and the
/// bidirectional, zero-width and line/paragraph separators (written out again here, not
/// taken from the code under test).
fn separator(c: char) -> bool {
    c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

fn oracle(text: &str, max: usize) -> String {
    let words: Vec<&str> = text.split(separator).filter(|w| !w.is_empty()).collect();
    let joined = words.join(" ");
    if joined.chars().count() <= max {
        return joined;
    }
    if max == 0 {
        return String::new();
    }
    let mut cut: String = joined.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = usize::from(u16::from_le_bytes([data[0], data[1]]) % 512);
    let text = String::from_utf8_lossy(&data[2..]);
    let out = one_line(&text, max);

    assert!(out.chars().count() <= max, "{} characters, bound {max}", out.chars().count());
    assert!(!out.chars().any(|c| c.is_control()), "a control character in {out:?}");
    assert!(!out.chars().any(|c| c != ' ' && separator(c)), "a separator other than a space in {out:?}");
    assert!(!out.contains("  ") && !out.starts_with(' '), "runs of spaces in {out:?}");
    assert_eq!(out, oracle(&text, max), "input {text:?}, bound {max}");
    // Idempotent on its own output when nothing was cut.
    if !out.ends_with('…') {
        assert_eq!(one_line(&out, max), out);
    }
});
