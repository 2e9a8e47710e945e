//! Pure allocation: what the runner user owns and the first free range it still needs.

use serde::Serialize;

use super::parse::{Entry, SubidFile};
use super::{IdRange, Limits, RunnerUser, SubidError};

/// The outcome of planning against one parsed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Allocation {
    /// The user's usable ranges, in file order.
    pub owned: Vec<IdRange>,
    /// The range to append, if the user owns fewer than the requested IDs.
    pub add: Option<IdRange>,
}

/// True when `entry` belongs to `user`: newuidmap matches the owner field against
/// both the login name and the decimal UID, as strings.
pub fn is_owned_by(entry: &Entry, user: &RunnerUser) -> bool {
    entry.owner == user.name || entry.owner == user.uid.to_string()
}

/// Plans like shadow-utils: the user's ranges count toward `count`; if short, the
/// lowest hole of `count` IDs inside `limits.min..=limits.max` that overlaps no range in
/// the file (anyone's, ours included) is chosen. A new range is always the full
/// `count`, not the shortfall: that is what `usermod --add-subuids` users expect, and
/// one whole block is easier to recognise than a top-up.
pub fn allocate(
    file: &SubidFile,
    user: &RunnerUser,
    count: u32,
    limits: &Limits,
) -> Result<Allocation, SubidError> {
    if count == 0 {
        return Err(SubidError::InvalidCount);
    }
    let (mine, theirs): (Vec<&Entry>, Vec<&Entry>) = file.entries.iter().partition(|e| is_owned_by(e, user));
    // Which of two owners is right is a decision for a person, not for us.
    for ours in &mine {
        if let Some(other) = theirs.iter().find(|t| overlaps(ours.range, t.range)) {
            return Err(SubidError::Overlap {
                path: file.path.clone(),
                ours: describe(ours),
                theirs: describe(other),
            });
        }
    }
    let owned: Vec<IdRange> = mine.iter().filter(|e| !e.crlf).map(|e| e.range).collect();
    if union_len(&owned) >= u64::from(count) {
        return Ok(Allocation { owned, add: None });
    }
    let taken: Vec<IdRange> = file.entries.iter().map(|e| e.range).collect();
    match first_fit(&taken, count, limits) {
        Some(start) => Ok(Allocation { owned, add: Some(IdRange { start, count }) }),
        None => {
            Err(SubidError::Exhausted { path: file.path.clone(), count, min: limits.min, max: limits.max })
        }
    }
}

fn overlaps(a: IdRange, b: IdRange) -> bool {
    u64::from(a.start) < b.end() && u64::from(b.start) < a.end()
}

fn describe(e: &Entry) -> String {
    format!("line {} ({}:{}:{})", e.line, e.owner, e.range.start, e.range.count)
}

/// IDs covered by `ranges`, counting overlapping lines once.
fn union_len(ranges: &[IdRange]) -> u64 {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let (mut total, mut covered_to) = (0u64, 0u64);
    for r in sorted {
        let start = u64::from(r.start).max(covered_to);
        if r.end() > start {
            total += r.end() - start;
            covered_to = r.end();
        }
    }
    total
}

/// Lowest start `s` with `min <= s` and `s + count - 1 <= max` clear of every range.
fn first_fit(taken: &[IdRange], count: u32, limits: &Limits) -> Option<u32> {
    let mut sorted = taken.to_vec();
    sorted.sort_by_key(|r| r.start);
    let count = u64::from(count);
    let limit = u64::from(limits.max) + 1; // exclusive
    let mut low = u64::from(limits.min);
    for r in sorted {
        if low + count > limit {
            return None;
        }
        if low + count <= u64::from(r.start) {
            break;
        }
        low = low.max(r.end());
    }
    (low + count <= limit).then_some(low as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(min: u32, max: u32) -> Limits {
        Limits { min, max, count: 65536 }
    }

    #[test]
    fn first_fit_respects_bounds_inclusively() {
        let r = |start, count| IdRange { start, count };
        assert_eq!(first_fit(&[], 10, &limits(100, 109)), Some(100));
        assert_eq!(first_fit(&[], 10, &limits(100, 108)), None);
        assert_eq!(first_fit(&[r(100, 5)], 10, &limits(100, 114)), Some(105));
        assert_eq!(first_fit(&[r(0, 105), r(110, 5), r(120, 10)], 10, &limits(100, 200)), Some(130));
        // A hole exactly count wide between two ranges.
        assert_eq!(first_fit(&[r(100, 10), r(120, 10)], 10, &limits(100, 200)), Some(110));
        assert_eq!(first_fit(&[r(0, u32::MAX)], 1, &limits(0, u32::MAX)), Some(u32::MAX));
    }

    #[test]
    fn union_counts_overlaps_once() {
        let r = |start, count| IdRange { start, count };
        assert_eq!(union_len(&[r(10, 10), r(15, 10), r(100, 1)]), 16);
        assert_eq!(union_len(&[r(10, 10), r(12, 2)]), 10);
    }
}
