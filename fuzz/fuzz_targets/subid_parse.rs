//! /etc/subuid parsing, allocation and the append, checked against independent oracles.
//!
//! Input: 12 bytes of parameters (count, SUB_UID_MIN, span to SUB_UID_MAX), one byte that
//! picks the runner user's name, then the file's bytes.
#![no_main]

use std::path::Path;

use executor_agent::subid::{
    allocate, append_entry, is_owned_by, Entry, IdRange, Limits, RunnerUser, SubidError, SubidFile, MAX_LINE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 {
        return;
    }
    let word = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().unwrap());
    // Small counts and bounds near the file's numbers make collisions likely.
    let count = word(0) % 200_000;
    let min = word(4) % 1_000_000;
    let max = min.saturating_add(word(8) % 2_000_000);
    let limits = Limits { min, max, count: 65536 };
    let user = match data[12] % 3 {
        0 => RunnerUser { name: "core".into(), uid: 1000 },
        1 => RunnerUser { name: "a".into(), uid: 1 },
        _ => RunnerUser { name: "runner".into(), uid: 0 },
    };
    let bytes = &data[13..];
    let path = Path::new("/etc/subuid");

    let file = match SubidFile::parse(path, bytes) {
        Ok(file) => file,
        Err(SubidError::Malformed { line, .. }) => {
            let lines = bytes.split(|&b| b == b'\n').count();
            assert!(line >= 1 && line <= lines, "line {line} of {lines}");
            return;
        }
        Err(e) => panic!("parse failed with a non-Malformed error: {e}"),
    };
    let raw_lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    for entry in &file.entries {
        check_entry(entry, raw_lines[entry.line - 1]);
    }

    let plan = match allocate(&file, &user, count, &limits) {
        Ok(plan) => plan,
        Err(SubidError::InvalidCount) => {
            assert_eq!(count, 0);
            return;
        }
        Err(SubidError::Overlap { .. }) => {
            let (mine, theirs): (Vec<_>, Vec<_>) = file.entries.iter().partition(|e| is_owned_by(e, &user));
            assert!(mine.iter().any(|m| theirs.iter().any(|t| overlaps(m.range, t.range))));
            return;
        }
        Err(SubidError::Exhausted { .. }) => {
            assert!(owned_ids(&file, &user) < u64::from(count));
            assert_eq!(first_fit_oracle(&file, count, &limits), None, "a hole was missed");
            return;
        }
        Err(e) => panic!("allocate failed unexpectedly: {e}"),
    };
    assert!(count > 0);
    let Some(range) = plan.add else {
        assert!(owned_ids(&file, &user) >= u64::from(count));
        return;
    };
    assert!(owned_ids(&file, &user) < u64::from(count));
    assert_eq!(range.count, count);
    assert!(range.start >= min && range.end() - 1 <= u64::from(max), "{range:?} outside {min}..={max}");
    for e in &file.entries {
        assert!(!overlaps(range, e.range), "{range:?} overlaps line {}", e.line);
    }
    assert_eq!(first_fit_oracle(&file, count, &limits), Some(range.start), "not the lowest hole");

    // The append: the original bytes untouched, one newline if missing, then our line.
    let out = append_entry(bytes, &user.name, range);
    assert!(out.starts_with(bytes));
    let mut tail = Vec::new();
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        tail.push(b'\n');
    }
    tail.extend_from_slice(format!("{}:{}:{}\n", user.name, range.start, range.count).as_bytes());
    assert_eq!(&out[bytes.len()..], &tail[..]);

    // It parses again, to the same entries plus ours, and asks for nothing more.
    let again = SubidFile::parse(path, &out).expect("the appended file re-parses");
    assert_eq!(&again.entries[..file.entries.len()], &file.entries[..]);
    let added = &again.entries[file.entries.len()..];
    assert_eq!(added.len(), 1);
    assert_eq!((added[0].owner.as_str(), added[0].range, added[0].crlf), (user.name.as_str(), range, false));
    let next = allocate(&again, &user, count, &limits).expect("allocating again");
    assert_eq!(next.add, None, "not converged after one append");
});

/// What the parser accepted is what shadow-utils accepts.
fn check_entry(entry: &Entry, raw: &[u8]) {
    assert!(raw.len() < MAX_LINE);
    assert!(!raw.contains(&0));
    let content = raw.strip_suffix(b"\r").unwrap_or(raw);
    assert_eq!(entry.crlf, content.len() != raw.len());
    let fields: Vec<&[u8]> = content.split(|&b| b == b':').collect();
    assert_eq!(fields.len(), 3);
    assert!(!fields[0].is_empty() && !fields[0].starts_with(b"#"));
    assert_eq!(String::from_utf8_lossy(fields[0]), entry.owner);
    assert_eq!(fields[1], entry.range.start.to_string().as_bytes());
    assert_eq!(fields[2], entry.range.count.to_string().as_bytes());
    assert!(entry.range.count > 0 && entry.range.end() <= 1 << 32);
}

fn overlaps(a: IdRange, b: IdRange) -> bool {
    u64::from(a.start) < b.end() && u64::from(b.start) < a.end()
}

/// Usable IDs of the user (CRLF lines do not count), overlaps counted once, by brute
/// force over the sorted interval ends.
fn owned_ids(file: &SubidFile, user: &RunnerUser) -> u64 {
    let mut ranges: Vec<(u64, u64)> = file
        .entries
        .iter()
        .filter(|e| is_owned_by(e, user) && !e.crlf)
        .map(|e| (u64::from(e.range.start), e.range.end()))
        .collect();
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged.iter().map(|(s, e)| e - s).sum()
}

/// The lowest start is `min` or the end of some range: try each candidate in order.
fn first_fit_oracle(file: &SubidFile, count: u32, limits: &Limits) -> Option<u32> {
    let mut candidates: Vec<u64> = vec![u64::from(limits.min)];
    candidates.extend(file.entries.iter().map(|e| e.range.end()).filter(|&e| e >= u64::from(limits.min)));
    candidates.sort();
    candidates.into_iter().find_map(|start| {
        let end = start + u64::from(count);
        let fits = end - 1 <= u64::from(limits.max)
            && file.entries.iter().all(|e| end <= u64::from(e.range.start) || start >= e.range.end());
        fits.then(|| u32::try_from(start).expect("below max"))
    })
}
