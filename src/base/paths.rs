//! Where node files live: the real `/`, or another tree given with `--root`.

use std::path::{Path, PathBuf};

/// The root of the node's file system for the file-based work (subuid, subgid,
/// login.defs, sysctl.d), like `useradd --root` and `systemctl --root`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root(PathBuf);

impl Root {
    /// The running system's `/`.
    pub fn host() -> Self {
        Root(PathBuf::from("/"))
    }

    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root(dir.into())
    }

    /// True when this is the live system, so that live-only work (D-Bus, /proc/sys) applies.
    pub fn is_host(&self) -> bool {
        self.0 == Path::new("/")
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// Maps an absolute node path such as `/etc/subuid` into this root.
    pub fn join(&self, absolute: impl AsRef<Path>) -> PathBuf {
        let absolute = absolute.as_ref();
        let relative = absolute.strip_prefix("/").unwrap_or(absolute);
        self.0.join(relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_absolute_paths_under_the_root() {
        assert_eq!(Root::host().join("/etc/subuid"), PathBuf::from("/etc/subuid"));
        assert_eq!(Root::new("/tmp/n").join("/etc/subuid"), PathBuf::from("/tmp/n/etc/subuid"));
        assert!(!Root::new("/tmp/n").is_host());
    }
}
