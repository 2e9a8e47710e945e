//! The node harness: the host's tools, the Debian node trees, nspawn nodes booted from them, the prober that polls a node's agent, and the cgroup v2 VM.

pub mod host;
pub mod node;
pub mod probe;
pub mod tree;
pub mod vm;
