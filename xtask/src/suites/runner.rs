//! The one runner of the node suites (e2e scenarios, fault cases): each case on each OS in turn,
//! timed, `PASS`/`FAIL` naming the OS, a failed case's console lines, the figures and notes the
//! cases recorded, each OS's wall time, and the count (`Tally`) for the closing line.

use crate::harness::node::{self, Node};
use crate::harness::tree::Os;
use crate::render::ignition::Extras;
use anyhow::{anyhow, bail, Result};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Passed and failed scenarios or cases, summed over suites and OSes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
    }

    /// Prints the closing `N passed, N failed` line (the one CI parses, so nothing else prints
    /// it) and fails when something failed.
    pub fn close(self, what: &str) -> Result<()> {
        println!("{} passed, {} failed", self.passed, self.failed);
        if self.failed > 0 {
            bail!("{} {what} failed", self.failed);
        }
        Ok(())
    }
}

/// What a suite run by the runner calls itself, and how its figure table is laid out.
pub struct Words {
    /// `==> SUITE [os]: ...`, the node names (`SUITE-os-N`) and `SUITE wall time on ...`.
    pub suite: &'static str,
    /// One case: `the scenario panicked`, the table's second column and, with an s,
    /// `(N of M scenarios passed)`.
    pub one: &'static str,
    /// Console lines printed per node of a failed case.
    pub log_lines: usize,
    pub table: Table,
}

/// The column widths of the figure table (os, case, figure, value) and its rule's length.
pub struct Table {
    pub case: usize,
    pub figure: usize,
    /// Values are right-aligned to this width (0: as they are).
    pub value: usize,
    pub value_title: &'static str,
    pub rule: usize,
}

/// A suite the runner runs: a marker type whose words the runner prints.
pub trait Kind {
    const WORDS: Words;

    /// Whether the case labelled `case` runs on `os` (all of them, unless a suite says less).
    fn applies(_os: Os, _case: &str) -> bool {
        true
    }
}

/// One case of a suite.
pub type Case<K> = fn(&mut Suite<K>) -> Result<()>;

/// One printed figure.
struct Figure {
    os: Os,
    case: &'static str,
    what: String,
    value: String,
}

/// What the cases of one OS share: the OS, the agent binary, its pristine tree, the figures and
/// notes recorded so far, and the console logs of the current case's nodes.
pub struct Suite<K> {
    pub os: Os,
    pub agent: PathBuf,
    pub pristine: PathBuf,
    counter: usize,
    /// Console logs of the current case's nodes, printed when it fails.
    logs: Vec<PathBuf>,
    figures: Vec<Figure>,
    notes: Vec<String>,
    kind: PhantomData<K>,
}

impl<K: Kind> Suite<K> {
    /// A fresh node (`SUITE-os-N`), provisioned with the local variant plus `extras`.
    pub fn node(&mut self, extras: &Extras) -> Result<Node> {
        self.counter += 1;
        let name = node::test_node_name(K::WORDS.suite, self.os, self.counter);
        let node = Node::create(&name, &self.pristine, &self.agent, extras)?;
        self.logs.push(node.log.clone());
        Ok(node)
    }

    /// Records a figure of `case` and shows it at once.
    pub fn fig(&mut self, case: &'static str, what: impl Into<String>, value: impl Into<String>) {
        let (what, value) = (what.into(), value.into());
        eprintln!("    {what}: {value}");
        self.figures.push(Figure { os: self.os, case, what, value });
    }

    /// Records a duration in whole milliseconds.
    pub fn ms(&mut self, case: &'static str, what: impl Into<String>, took: Duration) {
        self.fig(case, what, format!("{:.0} ms", took.as_secs_f64() * 1000.0));
    }

    /// Records a note, printed after the figures with its OS.
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("    NOTE: {text}");
        self.notes.push(text);
    }
}

/// Runs `cases` (label and function) on each OS of `trees` in turn, each with fresh nodes;
/// prints PASS/FAIL naming the OS, the figures, notes and each OS's wall time, and returns the
/// count (the caller prints the closing line).
pub fn run<K: Kind>(agent: &Path, trees: &[(Os, PathBuf)], cases: &[(String, Case<K>)]) -> Result<Tally> {
    let words = &K::WORDS;
    node::cleanup_leftovers(&format!("{}-", words.suite))?;
    let mut tally = Tally::default();
    let (mut figures, mut notes, mut walls) = (Vec::new(), Vec::new(), Vec::new());
    for (os, pristine) in trees {
        let os = *os;
        let mut suite = Suite::<K> {
            os,
            agent: agent.to_path_buf(),
            pristine: pristine.clone(),
            counter: 0,
            logs: Vec::new(),
            figures: Vec::new(),
            notes: Vec::new(),
            kind: PhantomData,
        };
        let mut this = Tally::default();
        let started = Instant::now();
        for (label, case) in cases.iter().filter(|(label, _)| K::applies(os, label)) {
            eprintln!("\n==> {} [{os}]: {label}", words.suite);
            let t = Instant::now();
            suite.logs.clear();
            // A panic is a failed case too (its nodes are dropped, so cleaned up, while unwinding).
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut suite)))
                .unwrap_or_else(|_| Err(anyhow!("the {} panicked", words.one)));
            match outcome {
                Ok(()) => {
                    this.passed += 1;
                    println!("PASS  [{os}] {label} ({:.1} s)", t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    this.failed += 1;
                    println!("FAIL  [{os}] {label} ({:.1} s): {e:#}", t.elapsed().as_secs_f64());
                    for log in &suite.logs {
                        let tail = node::file_tail(log, words.log_lines);
                        println!("  last console lines of {}:\n{}", log.display(), indent(&tail));
                    }
                }
            }
        }
        let t = Instant::now();
        node::finish_deletions();
        eprintln!("(deleting the {os} node copies took another {:.1} s)", t.elapsed().as_secs_f64());
        walls.push((os, started.elapsed(), this));
        tally.add(this);
        figures.append(&mut suite.figures);
        notes.extend(suite.notes.drain(..).map(|n| format!("[{os}] {n}")));
    }
    print!("{}", report(words, &figures, &notes));
    println!();
    for (os, wall, this) in walls {
        println!(
            "{} wall time on {os}: {:.1} s ({} of {} {}s passed)",
            words.suite,
            wall.as_secs_f64(),
            this.passed,
            this.passed + this.failed,
            words.one
        );
    }
    Ok(tally)
}

/// The figure table, then the notes (when there are any).
fn report(words: &Words, figures: &[Figure], notes: &[String]) -> String {
    let rows = figures.iter().map(|f| [f.os.name(), f.case, f.what.as_str(), f.value.as_str()]);
    table(["os", words.one, "figure"], &words.table, rows, notes)
}

/// A figure table laid out by `layout` (rows of where, case, figure, value; `titles` of the
/// first three columns, the value's is the layout's), then the notes.
pub fn table<'a>(
    titles: [&str; 3],
    layout: &Table,
    rows: impl Iterator<Item = [&'a str; 4]>,
    notes: &[String],
) -> String {
    let Table { case, figure, value, value_title, rule } = *layout;
    let [where_, case_title, figure_title] = titles;
    let mut out =
        format!("\n{where_:<9} {case_title:<case$} {figure_title:<figure$} {value_title:>value$}\n");
    out += &"-".repeat(rule);
    out += "\n";
    for [at, c, what, v] in rows {
        out += &format!("{at:<9} {c:<case$} {what:<figure$} {v:>value$}\n");
    }
    if !notes.is_empty() {
        out += "\nnotes:\n";
        for n in notes {
            out += &format!("  - {n}\n");
        }
    }
    out
}

/// `text` indented for a report.
pub fn indent(text: &str) -> String {
    text.lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suites::e2e::E2e;
    use crate::suites::faults::Faults;

    fn figure(value: &str) -> Figure {
        Figure { os: Os::Bookworm, case: "drift", what: "detect".into(), value: value.into() }
    }

    #[test]
    fn the_e2e_table_right_aligns_its_milliseconds_as_before() {
        let text = report(&E2e::WORDS, &[figure("42 ms")], &[]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], format!("{:<9} {:<28} {:<48} {:>10}", "os", "scenario", "figure", "time"));
        assert_eq!(lines[2].len(), 98);
        assert_eq!(lines[3], format!("{:<9} {:<28} {:<48} {:>7.0} ms", "bookworm", "drift", "detect", 42.0));
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn the_faults_table_shows_values_as_they_are_then_the_notes() {
        let notes = ["[bookworm] slow".to_string()];
        let text = report(&Faults::WORDS, &[figure("3 of 4")], &notes);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], format!("{:<9} {:<24} {:<72} value", "os", "case", "figure"));
        assert_eq!(lines[3], format!("{:<9} {:<24} {:<72} {}", "bookworm", "drift", "detect", "3 of 4"));
        assert_eq!(&lines[4..], ["", "notes:", "  - [bookworm] slow"]);
    }

    #[test]
    fn a_tally_adds_up_and_fails_when_something_failed() {
        let mut t = Tally { passed: 2, failed: 0 };
        t.add(Tally { passed: 1, failed: 0 });
        assert_eq!(t, Tally { passed: 3, failed: 0 });
        assert!(t.close("case(s)").is_ok());
        assert!(Tally { passed: 0, failed: 1 }.close("case(s)").is_err());
    }
}
