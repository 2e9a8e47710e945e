//! The node harness: the host's tools, the Debian node trees, nspawn nodes booted from them and the prober that polls a node's agent.

pub mod host;
pub mod node;
pub mod probe;
pub mod tree;
