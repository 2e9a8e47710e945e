//! How full a file system is, counted the way `df` shows it, so the agent and an operator
//! at a shell agree on the number.

use anyhow::{Context as _, Result};

/// Block and inode use of one file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Size of the file system (`df`'s Size column).
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// Free to an unprivileged user (`f_bavail`): Podman runs as the runner user, so the
    /// blocks reserved for root are not space it can use.
    pub avail_bytes: u64,
    pub inodes_used: u64,
    pub inodes_total: u64,
}

impl Usage {
    /// From raw `statvfs` counts (fragment size and block/inode counts).
    pub fn from_counts(
        fragment: u64,
        blocks: u64,
        free: u64,
        avail: u64,
        files: u64,
        files_free: u64,
    ) -> Usage {
        Usage {
            total_bytes: blocks.saturating_mul(fragment),
            used_bytes: blocks.saturating_sub(free).saturating_mul(fragment),
            avail_bytes: avail.saturating_mul(fragment),
            inodes_used: files.saturating_sub(files_free),
            inodes_total: files,
        }
    }

    /// Measures the file system holding an opened directory (`fstatvfs`: what was opened,
    /// whatever its path names by now).
    pub fn of_dir(dir: &crate::userfs::Dir) -> Result<Usage> {
        // statvfs on a local file system answers at once; no need to leave the runtime.
        let s = nix::sys::statvfs::fstatvfs(dir.fd())
            .with_context(|| format!("statvfs {}", dir.path.display()))?;
        Ok(Usage::from_statvfs(&s))
    }

    // The statvfs counts are u64 on 64-bit targets, narrower on 32-bit ones.
    #[allow(clippy::unnecessary_cast)]
    fn from_statvfs(s: &nix::sys::statvfs::Statvfs) -> Usage {
        Usage::from_counts(
            s.fragment_size() as u64,
            s.blocks() as u64,
            s.blocks_free() as u64,
            s.blocks_available() as u64,
            s.files() as u64,
            s.files_free() as u64,
        )
    }

    /// Percent of blocks used, `df`'s Use%: used / (used + available to users), rounded up.
    pub fn percent(&self) -> u8 {
        percent_up(self.used_bytes, self.used_bytes.saturating_add(self.avail_bytes))
    }

    /// Percent of inodes used, `df -i`'s IUse%, rounded up; 0 where the file system has no
    /// fixed inode count (btrfs reports 0).
    pub fn inode_percent(&self) -> u8 {
        percent_up(self.inodes_used, self.inodes_total)
    }
}

fn percent_up(part: u64, whole: u64) -> u8 {
    if whole == 0 {
        return 0;
    }
    let p = (u128::from(part) * 100).div_ceil(u128::from(whole));
    p.min(100) as u8
}

/// Bytes for people: `4.1 MiB`, `123 MiB`, `50 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 {
        format!("{} {}", value.round() as u64, UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_is_dfs_use_excluding_the_root_reserve_rounded_up() {
        // 1000 blocks of 4 KiB, 100 free of which 50 are reserved for root:
        // df shows 900 / (900 + 50) = 94.7 -> 95%.
        let u = Usage::from_counts(4096, 1000, 100, 50, 1000, 970);
        assert_eq!(u.used_bytes, 900 * 4096);
        assert_eq!(u.total_bytes, 1000 * 4096);
        assert_eq!(u.percent(), 95);
        assert_eq!(u.inode_percent(), 3);
        // Exactly on a boundary stays there.
        assert_eq!(Usage::from_counts(1, 100, 20, 20, 0, 0).percent(), 80);
        // Nothing left for users is 100%, not more.
        assert_eq!(Usage::from_counts(1, 100, 5, 0, 0, 0).percent(), 100);
    }

    #[test]
    fn file_systems_without_inode_counts_or_blocks_read_zero() {
        let u = Usage::from_counts(4096, 0, 0, 0, 0, 0);
        assert_eq!((u.percent(), u.inode_percent()), (0, 0));
    }

    #[test]
    fn measures_a_real_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let opened = crate::userfs::Dir::open(dir.path(), None).unwrap().unwrap();
        let u = Usage::of_dir(&opened).unwrap();
        assert!(u.total_bytes > 0 && u.used_bytes <= u.total_bytes, "{u:?}");
        assert!(u.percent() <= 100);
        let s = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        assert_eq!(u.total_bytes, s.blocks() as u64 * s.fragment_size() as u64);
    }

    #[test]
    fn bytes_read_like_df_h() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(4_261_550), "4.1 MiB");
        assert_eq!(bytes(123 * 1024 * 1024), "123 MiB");
        assert_eq!(bytes(50 * 1024 * 1024 * 1024), "50 GiB");
    }
}
