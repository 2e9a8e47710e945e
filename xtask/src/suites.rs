//! The suites: end-to-end scenarios, fault cases and the bench on nspawn nodes, the one runner the scenarios and cases share, the cgroup v2 VM checks, and the host-only cross-test and fuzz runs.

pub mod bench;
pub mod cross;
pub mod e2e;
pub mod faults;
pub mod fuzz;
pub mod runner;
pub mod vm;
