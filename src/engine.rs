//! The engine: the pass (which drifted step is repaired when, backoff, the next pass), the
//! check results (policies, flap damping, readiness, the status line) and the metrics.

pub mod checks;
pub mod eviction;
pub mod metrics;
pub mod pass;
