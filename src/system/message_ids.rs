//! The agent's journal MESSAGE_IDs: operators find its events with `journalctl MESSAGE_ID=<id>`,
//! so an ID never changes. xtask includes this file too (it does not depend on the agent).

/// The agent changed the node (a file, linger, a unit, a sysctl).
pub const NODE_CHANGED: &str = "b053dd1b77b74757b0d57209f02dbc23";
/// A repair attempt failed; another follows after the backoff.
pub const REPAIR_FAILED: &str = "171da1b65d684b68b7d4ae5d2f729da7";
/// The node became ready (every check passes).
pub const NODE_READY: &str = "7ba5e54cd07e4f91bcbf130e10d4bc96";
/// The node stopped being ready.
pub const NODE_NOT_READY: &str = "4da83dcf98484804b701e669ba5eebb8";
/// One check changed from passing to failing or back.
pub const CHECK_CHANGED: &str = "294e56242497461cb3c65a2cfb09df88";
/// A job canary round failed (fields STAGE, and the reason in the message).
pub const CANARY_FAILED: &str = "44e9bec21edf42c7862c3c56b9318309";
/// The agent started (with its effective configuration) or is stopping.
pub const AGENT_LIFECYCLE: &str = "d3954dc3203c47b8867f25f26914f130";
/// Self-eviction: the wait started or was called off, or the node is ending itself.
pub const SELF_EVICTION: &str = "823da024ff1a4797951921758010347f";

#[cfg(test)]
mod tests {
    /// What `journalctl MESSAGE_ID=` matches: 32 lowercase hex digits; and no two IDs alike.
    #[test]
    fn ids_are_distinct_128_bit_hex() {
        let ids = [
            super::NODE_CHANGED,
            super::REPAIR_FAILED,
            super::NODE_READY,
            super::NODE_NOT_READY,
            super::CHECK_CHANGED,
            super::CANARY_FAILED,
            super::AGENT_LIFECYCLE,
            super::SELF_EVICTION,
        ];
        for id in ids {
            assert!(id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{id}");
        }
        let readme = include_str!("../../README.md");
        for id in ids {
            assert!(readme.contains(&format!("| `{id}` |")), "README.md's MESSAGE_ID table lacks {id}");
        }
        let mut sorted = ids.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "two MESSAGE_IDs are equal");
    }
}
