//! Formats, pure (no I/O but reading what they are given): the configuration (fragments
//! merged, then validated), /etc/subuid and login.defs, user namespace maps and file
//! capabilities, and Podman's TOML files. What a correct file looks like, and the smallest
//! edit that makes one.

pub mod config;
pub mod idmap;
pub mod podman_conf;
pub mod subid;
