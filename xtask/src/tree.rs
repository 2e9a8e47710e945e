//! The pristine Debian bookworm root file system that every node is copied from, built with
//! debootstrap and cached under `.node-cache/` keyed by its package list and recipe.

use crate::host;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

const SUITE: &str = "bookworm";

/// What a node needs besides minbase (see shared/notes/test-environments.md for why each is there).
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "dbus-user-session",
    "podman",
    "netavark",
    "aardvark-dns",
    "iptables",
    "uidmap",
    "slirp4netns",
    "passt",
    "crun",
    "conmon",
    "fuse-overlayfs",
    "curl",
    "iproute2",
    "procps",
    "busybox-static",
];

/// Bump when the customisation below changes, so cached trees are rebuilt.
const RECIPE: &str = "executor-agent node tree v3";

/// Where the test image source lives in the tree (a tar of a busybox root, imported by `podman import`).
pub const IMAGE_TAR: &str = "/opt/e2e/busybox.tar";
/// What the test image's `/srv/index.html` says (served by busybox httpd on the published port).
pub const IMAGE_INDEX: &str = "executor-agent e2e: port 80 works\n";

/// `.node-cache/` in the repository (gitignored).
pub fn cache_dir() -> PathBuf {
    host::repo_root().join(".node-cache")
}

/// The cache key: the suite, the package list and the recipe.
fn key() -> String {
    let mut h = Sha256::new();
    h.update(SUITE);
    h.update("\n");
    h.update(PACKAGES.join(","));
    h.update("\n");
    h.update(RECIPE);
    h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Returns the pristine tree, building it when the cache has none for the current key.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir().join(format!("tree-{}", key()));
    let done = cache_dir().join(format!("tree-{}.done", key()));
    if done.exists() && dir.join("usr/bin/podman").exists() {
        eprintln!("==> reusing the cached node tree {}", dir.display());
        return Ok(dir);
    }
    remove_stale_trees()?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove the incomplete tree {}", dir.display()))?;
    }
    let started = Instant::now();
    build(&dir).with_context(|| format!("building the node tree in {} failed", dir.display()))?;
    host::write(&done, format!("{RECIPE}\n{}\n", PACKAGES.join(" ")))?;
    eprintln!("==> node tree built in {:.1} s: {}", started.elapsed().as_secs_f64(), dir.display());
    Ok(dir)
}

/// Trees of older keys are removed: each is about a gigabyte.
fn remove_stale_trees() -> Result<()> {
    let Ok(entries) = std::fs::read_dir(cache_dir()) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("tree-") {
            eprintln!("==> removing the stale node tree {name}");
            let path = entry.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            } else {
                std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// The Debian mirror of this machine's apt sources (`URIs:` of the bookworm stanza).
pub fn mirror() -> String {
    let deb822 = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    mirror_from(&deb822, &list).unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

/// The first URI serving `SUITE`, from a deb822 sources file, else from a one-line sources.list.
fn mirror_from(deb822: &str, list: &str) -> Option<String> {
    for stanza in deb822.split("\n\n") {
        let field =
            |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
        let suites = field("Suites:").unwrap_or_default();
        if suites.split_whitespace().any(|s| s == SUITE) {
            if let Some(uri) = field("URIs:").and_then(|u| u.split_whitespace().next().map(str::to_string)) {
                return Some(uri);
            }
        }
    }
    list.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        (words.len() >= 3 && words[0] == "deb" && words[2] == SUITE).then(|| words[1].to_string())
    })
}

fn build(dir: &Path) -> Result<()> {
    let mirror = mirror();
    eprintln!("==> debootstrap {SUITE} from {mirror} (about a minute)");
    std::fs::create_dir_all(dir.parent().unwrap()).context("cannot create .node-cache")?;
    let log = cache_dir().join("debootstrap.log");
    let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let status = host::cmd(
        "debootstrap",
        ["--variant=minbase".to_string(), format!("--include={}", PACKAGES.join(","))],
    )
    .arg(SUITE)
    .arg(dir)
    .arg(&mirror)
    .stdin(std::process::Stdio::null())
    .stdout(log_file.try_clone()?)
    .stderr(log_file)
    .status()
    .context("cannot start debootstrap")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "debootstrap failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    customise(dir)
}

/// Everything a node needs after debootstrap: the runner user, Podman settings, /dev/net/tun,
/// a docker CLI, the test image source, and a quiet console.
fn customise(dir: &Path) -> Result<()> {
    // Downloaded .debs are not needed in the nodes.
    host::run(host::cmd("chroot", [dir.as_os_str(), "apt-get".as_ref(), "clean".as_ref()]))?;

    // The runner user, UID 1000 like FCOS's core. Debian's useradd adds subordinate ranges by
    // itself: clear them, so that the agent is what provides them.
    host::run(host::cmd(
        "chroot",
        [dir.to_str().unwrap(), "useradd", "-m", "-u", "1000", "-U", "-s", "/bin/bash", "core"],
    ))?;
    host::write(dir.join("etc/subuid"), "")?;
    host::write(dir.join("etc/subgid"), "")?;

    // Native rootless overlay instead of vfs.
    let conf = dir.join("home/core/.config/containers/storage.conf");
    host::write(&conf, "[storage]\ndriver = \"overlay\"\n")?;
    host::run(host::cmd(
        "chroot",
        [dir.to_str().unwrap(), "chown", "-R", "core:core", "/home/core/.config"],
    ))?;

    // No udev in the container: give /dev/net/tun FCOS's mode so slirp4netns/pasta can open it.
    host::write(dir.join("etc/tmpfiles.d/dev-net-tun.conf"), "z /dev/net/tun 0666 root root -\n")?;

    // The console getty would only add noise to the boot log.
    host::run(host::cmd(
        "systemctl",
        ["--root".as_ref(), dir.as_os_str(), "mask".as_ref(), "console-getty.service".as_ref()],
    ))?;

    install_docker_cli(dir)?;
    build_test_image(dir)?;
    Ok(())
}

/// The docker CLI that GitLab Runner's `docker system dial-stdio` needs on the node (FCOS ships
/// one): the host's /usr/local/bin/docker, else the client from Debian's docker.io package.
fn install_docker_cli(dir: &Path) -> Result<()> {
    let dest = dir.join("usr/local/bin/docker");
    let host_docker = Path::new("/usr/local/bin/docker");
    if host_docker.is_file() {
        std::fs::copy(host_docker, &dest).context("cannot copy /usr/local/bin/docker into the tree")?;
    } else {
        let work = cache_dir().join("docker-cli");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        host::run(host::cmd("chroot", [dir.to_str().unwrap(), "apt-get", "update", "-q"]))
            .context("apt-get update in the tree")?;
        host::run(host::cmd(
            "chroot",
            [dir.to_str().unwrap(), "sh", "-c", "cd /tmp && apt-get download docker.io"],
        ))
        .context("downloading Debian's docker.io for its client")?;
        let deb = std::fs::read_dir(dir.join("tmp"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("docker.io_")))
            .context("apt-get download docker.io left no .deb")?;
        host::run(host::cmd("dpkg-deb", [deb.as_os_str(), "-x".as_ref(), work.as_os_str()]))?;
        std::fs::copy(work.join("usr/bin/docker"), &dest).context("docker.io has no usr/bin/docker")?;
        std::fs::remove_file(&deb)?;
        std::fs::remove_dir_all(&work)?;
        host::run(host::cmd("chroot", [dir.to_str().unwrap(), "apt-get", "clean"]))?;
        let _ = std::fs::remove_dir_all(dir.join("var/lib/apt/lists"));
        std::fs::create_dir_all(dir.join("var/lib/apt/lists/partial"))?;
    }
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A busybox root as a tar in the tree: `podman import` makes it `localhost/busybox` on the node,
/// since no registry is reachable. Its /srv/index.html is what the port-80 check expects.
fn build_test_image(dir: &Path) -> Result<()> {
    let staging = cache_dir().join("image-staging");
    let _ = std::fs::remove_dir_all(&staging);
    for sub in ["bin", "srv", "tmp"] {
        std::fs::create_dir_all(staging.join(sub))?;
    }
    std::fs::copy(dir.join("bin/busybox"), staging.join("bin/busybox"))
        .context("busybox-static is not in the tree")?;
    for applet in
        ["sh", "echo", "cat", "ls", "id", "sleep", "httpd", "wget", "true", "false", "env", "hostname"]
    {
        std::os::unix::fs::symlink("busybox", staging.join("bin").join(applet))?;
    }
    host::write(staging.join("srv/index.html"), IMAGE_INDEX)?;
    let tar = dir.join(IMAGE_TAR.trim_start_matches('/'));
    std::fs::create_dir_all(tar.parent().unwrap())?;
    host::run(
        host::cmd("tar", ["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&staging)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )?;
    std::fs::set_permissions(&tar, std::fs::Permissions::from_mode(0o644))?;
    std::fs::remove_dir_all(&staging)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_comes_from_the_bookworm_stanza() {
        let deb822 = "Types: deb\nURIs: http://mirror.one/debian-security\nSuites: bookworm-security\n\n\
                      Types: deb\nURIs: http://mirror.two/debian\nSuites: bookworm bookworm-updates\n";
        assert_eq!(mirror_from(deb822, ""), Some("http://mirror.two/debian".into()));
        let list = "deb http://mirror.three/debian bookworm main\n";
        assert_eq!(mirror_from("", list), Some("http://mirror.three/debian".into()));
        assert_eq!(mirror_from("", ""), None);
    }

    #[test]
    fn cache_key_changes_with_the_recipe_inputs() {
        assert_eq!(key().len(), 12);
        assert!(PACKAGES.contains(&"iptables"), "without iptables the Docker-API default network fails");
    }
}
