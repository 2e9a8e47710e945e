//! The configuration merge: any bytes in up to three fragments never panic, and merging
//! is deterministic and idempotent.
//!
//! Input: fragments separated by a 0xFF byte (never valid UTF-8, so never inside a
//! fragment); invalid UTF-8 is replaced, as a file read would be refused earlier anyway.
#![no_main]

use std::path::{Path, PathBuf};

use executor_agent::config::merge;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let texts: Vec<String> =
        data.split(|&b| b == 0xFF).take(3).map(|t| String::from_utf8_lossy(t).into_owned()).collect();
    let paths: Vec<PathBuf> =
        (0..texts.len()).map(|i| PathBuf::from(format!("/etc/executor-agent/config.d/{i}.toml"))).collect();
    let fragments = || paths.iter().map(PathBuf::as_path).zip(texts.iter().map(String::as_str));

    let checks = executor_agent::steps::check_names();
    let first = merge(fragments(), &checks);
    let second = merge(fragments(), &checks);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "merge is not deterministic"),
        (Err(a), Err(b)) => {
            let message = a.to_string();
            assert_eq!(message, b.to_string(), "merge is not deterministic");
            assert!(!message.is_empty());
        }
        _ => panic!("merge is not deterministic"),
    }

    // Applying every fragment twice in a row changes nothing.
    let twice: Vec<(&Path, &str)> = fragments().flat_map(|f| [f, f]).collect();
    match (&first, merge(twice, &checks)) {
        (Ok(a), Ok(b)) => assert_eq!(*a, b, "a repeated fragment changed the result"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("a repeated fragment changed the outcome: {a:?} vs {b:?}"),
    }
});
