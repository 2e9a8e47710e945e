//! Text and files: bounded one-line text from untrusted sources, atomic replacement that keeps
//! owner, mode and label, `--root`, and reading what the runner user controls without
//! following links. Every layer above uses these.

pub mod fsutil;
pub mod paths;
pub mod text;
pub mod userfs;
