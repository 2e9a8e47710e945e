//! The canary's image, made on the node from what the agent carries: its own running binary
//! and the shared libraries it has mapped (the dynamic loader, libc, libgcc_s), as one layer
//! imported through the API. Nothing is pulled, so the canary proves the node, not a registry.
//!
//! The tar is deterministic, so its hash names the image: a new agent binary (or a libc
//! changed by an OS update) makes a new tag, and the old tags are removed.

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};

/// The repository the canary's images are imported under.
pub const REPOSITORY: &str = "localhost/executor-agent-canary";
/// Where the agent's binary is in the image.
pub const BINARY: &str = "/executor-agent";
/// Where the libraries are in the image.
const LIB_DIR: &str = "/lib";

/// A built image: its tag and the command prefix that runs the agent's binary in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `localhost/executor-agent-canary:<version>-<hash>`.
    pub reference: String,
    /// The loader and its library path, then the binary (empty loader for a static binary).
    pub entrypoint: Vec<String>,
}

/// The layer as a tar, and what to call it.
pub struct Built {
    pub tar: Vec<u8>,
    pub layout: Layout,
}

/// Builds the layer from this process's executable and mapped libraries.
pub fn build() -> Result<Built> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    let exe = std::fs::read_link("/proc/self/exe").context("reading /proc/self/exe")?;
    let libraries = mapped_libraries(&maps, &exe);
    let binary = std::fs::read("/proc/self/exe").context("reading the agent's own binary")?;
    let mut files = vec![(BINARY.to_string(), binary)];
    let mut loader = None;
    for path in &libraries {
        let name = path.file_name().context("a mapped library without a file name")?.to_string_lossy();
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let inside = format!("{LIB_DIR}/{name}");
        if name.starts_with("ld-") {
            loader = Some(inside.clone());
        }
        files.push((inside, data));
    }
    if loader.is_none() && !libraries.is_empty() {
        bail!(
            "the agent maps shared libraries but no dynamic loader (ld-*.so): cannot run it in a container"
        );
    }
    let tar = layer(&files)?;
    let tag = format!("{}-{:016x}", env!("CARGO_PKG_VERSION"), fnv1a(&tar));
    let entrypoint = match loader {
        Some(loader) => vec![loader, "--library-path".into(), LIB_DIR.into(), BINARY.into()],
        None => vec![BINARY.into()],
    };
    Ok(Built { tar, layout: Layout { reference: format!("{REPOSITORY}:{tag}"), entrypoint } })
}

/// The distinct files of shared objects in a `/proc/PID/maps` text, the executable excluded,
/// in the order first mapped.
pub fn mapped_libraries(maps: &str, exe: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode pathname (the name may contain spaces).
        let mut fields = line.splitn(6, ' ');
        let (Some(_), Some(_), Some(_), Some(_), Some(_), Some(name)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let name = name.trim_start();
        if !name.starts_with('/') || name.ends_with(" (deleted)") {
            continue;
        }
        let path = PathBuf::from(name);
        let is_shared_object = path.file_name().is_some_and(|n| n.to_string_lossy().contains(".so"));
        if path != exe && is_shared_object && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// A tar of the directories the containers need and the files, owned by root, with fixed
/// times so the same inputs give the same bytes.
fn layer(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["lib", "data", "etc", "tmp"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
        header.set_size(0);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    }
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o755);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, path.trim_start_matches('/'), data.as_slice())?;
    }
    Ok(tar.into_inner()?)
}

/// FNV-1a, 64 bits: a name for the content, not a security measure (the image is made and
/// checked by root through the runner user's API, which the user could change anyway).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 fe:01 1311 /usr/local/bin/executor-agent
7f10a0000000-7f10a0022000 r--p 00000000 fe:01 2101 /usr/lib/x86_64-linux-gnu/libc.so.6
7f10a0022000-7f10a0197000 r-xp 00022000 fe:01 2101 /usr/lib/x86_64-linux-gnu/libc.so.6
7f10a0200000-7f10a0210000 r-xp 00000000 fe:01 2102 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
7f10a0300000-7f10a0301000 rw-p 00000000 00:00 0 
7f10a0400000-7f10a0401000 r--p 00000000 fe:01 9 /usr/lib/locale/C.utf8/LC_CTYPE
7f10a0500000-7f10a0501000 r--p 00000000 fe:01 10 /tmp/old lib.so (deleted)
7f10a0600000-7f10a0628000 r-xp 00000000 fe:01 2103 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn libraries_come_from_the_maps_once_each_without_the_executable() {
        let libs = mapped_libraries(MAPS, Path::new("/usr/local/bin/executor-agent"));
        let libs: Vec<_> = libs.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            libs,
            [
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn the_layer_is_the_same_bytes_for_the_same_files() {
        let files = vec![("/executor-agent".to_string(), b"binary".to_vec())];
        let a = layer(&files).unwrap();
        assert_eq!(a, layer(&files).unwrap());
        let other = vec![("/executor-agent".to_string(), b"binary2".to_vec())];
        assert_ne!(fnv1a(&a), fnv1a(&layer(&other).unwrap()));
        let mut archive = tar::Archive::new(a.as_slice());
        let names: Vec<String> =
            archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, ["lib/", "data/", "etc/", "tmp/", "executor-agent"]);
    }

    #[test]
    fn this_test_binary_can_be_built_into_an_image() {
        let built = build().unwrap();
        assert!(built.layout.reference.starts_with("localhost/executor-agent-canary:0."));
        assert!(built.layout.entrypoint.last().is_some_and(|b| b == BINARY));
        assert!(built.tar.len() > 100_000);
    }
}
