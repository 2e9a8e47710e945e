//! Text from outside the agent (Podman's messages, a container's output, files the runner
//! user controls) made safe for one line of `STATUS=`, HTTP, the journal or a terminal.

/// One line of at most `max_chars` characters: control characters (newlines, escapes, NUL)
/// become a space, runs of white space one space, and a cut is marked with `…`.
pub fn one_line(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_mul(4)));
    let mut count = 0;
    let mut space = false;
    for c in text.chars() {
        if c.is_control() || c.is_whitespace() || is_format_or_separator(c) {
            space = count > 0;
            continue;
        }
        let needed = usize::from(space) + 1;
        if count + needed > max_chars {
            // Room for the mark: drop what it must replace.
            while count + 1 > max_chars && out.pop().is_some() {
                count -= 1;
            }
            if max_chars > 0 {
                out.push('…');
            }
            return out;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(c);
        count += needed;
    }
    out
}

/// Characters that move the cursor or reorder text without being control characters
/// (bidirectional overrides, zero-width and line/paragraph separators).
fn is_format_or_separator(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_and_escapes_become_single_spaces() {
        assert_eq!(one_line("a\nMAINPID=1\r\n\x1b[2Jb\0c", 100), "a MAINPID=1 [2Jb c");
        assert_eq!(one_line("  lead and trail \t", 100), "lead and trail");
        assert_eq!(one_line("bidi \u{202e}txet", 100), "bidi txet");
    }

    #[test]
    fn long_text_is_cut_with_a_mark() {
        assert_eq!(one_line("abcdef", 6), "abcdef");
        let cut = one_line("abcdefg", 6);
        assert_eq!(cut.chars().count(), 6);
        assert!(cut.ends_with('…'), "{cut}");
        assert_eq!(one_line(&"é".repeat(1000), 10).chars().count(), 10);
    }
}
