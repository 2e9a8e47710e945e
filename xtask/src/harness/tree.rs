//! The pristine root file systems that every node is copied from: one per Debian suite
//! (bookworm, trixie), built with debootstrap, and the FCOS-shaped one made from the trixie tree;
//! cached side by side under `.node-cache/`, each keyed by its suite, package list and recipe.

use crate::harness::host;
use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a node runs: a Debian release, or Debian 13 in Fedora CoreOS's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Os {
    /// Debian 12: Podman 4.3, systemd 252, slirp4netns by default.
    Bookworm,
    /// Debian 13: Podman 5.4, systemd 257, pasta by default, netavark on nftables.
    Trixie,
    /// Debian 13 laid out as FCOS is, for what the layout changes (see [`fcos_layout`]):
    /// `/home` and `/usr/local` links into `/var`, a read-only `/usr`, core's stock subordinate
    /// range, newuidmap with file capabilities, a rootful `docker.socket`, no perl or python.
    FcosLike,
}

impl Os {
    /// Every kind of node, in the order the suites run them.
    pub const ALL: &'static [Os] = &[Os::Bookworm, Os::Trixie, Os::FcosLike];
    /// The Debian releases: what the fault cases run on by default.
    pub const DEBIAN: &'static [Os] = &[Os::Bookworm, Os::Trixie];

    /// As the PASS/FAIL lines and node names write it.
    pub fn name(self) -> &'static str {
        match self {
            Os::Bookworm => "bookworm",
            Os::Trixie => "trixie",
            Os::FcosLike => "fcos-like",
        }
    }

    /// The Debian suite its packages come from (debootstrap's argument).
    pub fn suite(self) -> &'static str {
        match self {
            Os::Bookworm => "bookworm",
            Os::Trixie | Os::FcosLike => "trixie",
        }
    }

    /// The tree this one is made from, when it is not debootstrapped itself.
    pub fn base(self) -> Option<Os> {
        match self {
            Os::FcosLike => Some(Os::Trixie),
            Os::Bookworm | Os::Trixie => None,
        }
    }

    /// `bookworm`/`debian12`/`12`, `trixie`/`debian13`/`13` or `fcos-like`/`fcos` (any case).
    pub fn parse(text: &str) -> Result<Os> {
        match text.to_ascii_lowercase().as_str() {
            "bookworm" | "debian12" | "debian-12" | "12" => Ok(Os::Bookworm),
            "trixie" | "debian13" | "debian-13" | "13" => Ok(Os::Trixie),
            "fcos-like" | "fcos" => Ok(Os::FcosLike),
            _ => Err(anyhow!(
                "unknown OS {text:?}: bookworm (debian12, 12), trixie (debian13, 13) or fcos-like (fcos)"
            )),
        }
    }

    /// `--os` of e2e and faults: one OS, or `all` for every one in turn.
    pub fn parse_list(text: &str) -> Result<Vec<Os>> {
        if text.eq_ignore_ascii_case("all") {
            return Ok(Os::ALL.to_vec());
        }
        let mut list = Vec::new();
        for part in text.split(',') {
            let os = Os::parse(part.trim())?;
            if !list.contains(&os) {
                list.push(os);
            }
        }
        Ok(list)
    }

    /// What a node of this OS needs besides minbase (see shared/notes/test-environments.md).
    pub fn packages(self) -> Vec<&'static str> {
        let mut list = PACKAGES.to_vec();
        if self.suite() == "trixie" {
            // netavark on Debian 13 drives nftables: without `nft` every container start on a
            // network fails ("netavark (exit code 1): nftables error: unable to execute nft").
            list.push("nftables");
        }
        if self == Os::FcosLike {
            // FCOS ships Moby (`moby-engine`) with a rootful docker.socket enabled: Debian's
            // docker.io is the same daemon, docker-cli (a package of its own since Debian 13)
            // the same /usr/bin/docker.
            list.extend(["docker.io", "docker-cli"]);
        }
        list
    }
}

impl std::fmt::Display for Os {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a bookworm node needs besides minbase (see shared/notes/test-environments.md for why
/// each is there); [`Os::packages`] adds what later suites need on top.
const PACKAGES: &[&str] = &[
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
    // sshd for the manager's path (pam_nologin in its PAM account stack, as on FCOS).
    "openssh-server",
];

/// Bump when the customisation below changes, so cached trees are rebuilt.
const RECIPE: &str = "executor-agent node tree v3";
/// Bump when [`fcos_layout`] changes (the FCOS-shaped tree's key adds it to [`RECIPE`]).
const FCOS_RECIPE: &str = "fcos layout v1";

/// The suite the host's apt sources name: the mirror is taken from its stanza (the build
/// machine is Debian 12), and the same mirror serves every suite.
const HOST_SUITE: &str = "bookworm";

/// Where the test image source lives in the tree (a tar of a busybox root, imported by `podman import`).
pub const IMAGE_TAR: &str = "/opt/e2e/busybox.tar";
/// What the test image's `/srv/index.html` says (served by busybox httpd on the published port).
pub const IMAGE_INDEX: &str = "executor-agent e2e: port 80 works\n";

/// `.node-cache/` in the repository (gitignored), resolved when it exists: it may be a symlink
/// (a second worktree sharing the trees), and a node's path must read the same in every process
/// (the running-node check compares it with nspawn's command line).
pub fn cache_dir() -> PathBuf {
    let dir = host::repo_root().join(".node-cache");
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// The cache key of a suite's tree: the suite, its package list and the recipe.
fn key(os: Os) -> String {
    let mut h = Sha256::new();
    h.update(os.name());
    h.update("\n");
    h.update(os.packages().join(","));
    h.update("\n");
    h.update(RECIPE);
    if os == Os::FcosLike {
        h.update(FCOS_RECIPE);
    }
    h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The tree's directory name: `tree-<suite>-<key>`.
fn tree_name(os: Os) -> String {
    format!("tree-{}-{}", os.name(), key(os))
}

/// Returns the pristine tree of `os`, building it when the cache has none for its current key.
pub fn ensure(os: Os) -> Result<PathBuf> {
    let dir = cache_dir().join(tree_name(os));
    let done = cache_dir().join(format!("{}.done", tree_name(os)));
    adopt_unnamed_tree(os, &dir, &done);
    if done.exists() && dir.join("usr/bin/podman").exists() {
        eprintln!("==> reusing the cached {os} node tree {}", dir.display());
        return Ok(dir);
    }
    remove_stale_trees(os)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove the incomplete tree {}", dir.display()))?;
    }
    let started = Instant::now();
    match os.base() {
        None => build(os, &dir),
        Some(base) => derive(os, &ensure(base)?, &dir),
    }
    .with_context(|| format!("building the {os} node tree in {} failed", dir.display()))?;
    host::write(&done, format!("{RECIPE}\n{}\n{}\n", os.name(), os.packages().join(" ")))?;
    eprintln!("==> {os} node tree built in {:.1} s: {}", started.elapsed().as_secs_f64(), dir.display());
    Ok(dir)
}

/// The pristine trees of `oses`, in the order asked: the debootstrapped ones side by side
/// (debootstrap mostly waits on the network and dpkg), then those made from them.
pub fn ensure_all(oses: &[Os]) -> Result<Vec<(Os, PathBuf)>> {
    let mut roots: Vec<Os> = oses.iter().map(|os| os.base().unwrap_or(*os)).collect();
    roots.sort();
    roots.dedup();
    let built: Vec<(Os, PathBuf)> = std::thread::scope(|s| {
        let builds: Vec<_> = roots.iter().map(|&os| (os, s.spawn(move || ensure(os)))).collect();
        builds
            .into_iter()
            .map(|(os, build)| {
                let tree = build.join().map_err(|_| anyhow!("building the {os} node tree panicked"))??;
                Ok((os, tree))
            })
            .collect::<Result<_>>()
    })?;
    oses.iter()
        .map(|&os| match built.iter().find(|(b, _)| *b == os) {
            Some((_, tree)) => Ok((os, tree.clone())),
            None => Ok((os, ensure(os)?)),
        })
        .collect()
}

/// Before trees were named by suite, the bookworm tree was `tree-<key>`: a finished one with
/// the current key is renamed rather than built again.
fn adopt_unnamed_tree(os: Os, dir: &Path, done: &Path) {
    let old = cache_dir().join(format!("tree-{}", key(os)));
    let old_done = cache_dir().join(format!("tree-{}.done", key(os)));
    if os != Os::Bookworm || dir.exists() || !old_done.exists() || !old.join("usr/bin/podman").exists() {
        return;
    }
    if std::fs::rename(&old, dir).is_ok() && std::fs::rename(&old_done, done).is_ok() {
        eprintln!("==> renamed the cached node tree tree-{} to {}", key(os), tree_name(os));
    }
}

/// Whether the cache entry `name` (a tree or its `.done` marker) belongs to `os`: `tree-<suite>-*`,
/// and for bookworm also the suite-less `tree-<key>` of before.
fn belongs_to(name: &str, os: Os) -> bool {
    let Some(rest) = name.strip_prefix("tree-") else { return false };
    if let Some(rest) = rest.strip_prefix(os.name()) {
        return rest.starts_with('-');
    }
    let stem = rest.strip_suffix(".done").unwrap_or(rest);
    os == Os::Bookworm && stem.len() == 12 && stem.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Trees of `os` with older keys are removed (each is about a gigabyte); the other suites'
/// trees are kept.
fn remove_stale_trees(os: Os) -> Result<()> {
    let current = tree_name(os);
    let Ok(entries) = std::fs::read_dir(cache_dir()) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !belongs_to(&name, os) || name == current || name == format!("{current}.done") {
            continue;
        }
        eprintln!("==> removing the stale {os} node tree {name}");
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        } else {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// The Debian mirror of this machine's apt sources (`URIs:` of the bookworm stanza); the same
/// mirror serves trixie, which the host's sources do not name.
pub fn mirror() -> String {
    let deb822 = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    mirror_from(&deb822, &list).unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

/// The first URI serving [`HOST_SUITE`], from a deb822 sources file, else from a one-line
/// sources.list.
fn mirror_from(deb822: &str, list: &str) -> Option<String> {
    for stanza in deb822.split("\n\n") {
        let field =
            |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
        let suites = field("Suites:").unwrap_or_default();
        if suites.split_whitespace().any(|s| s == HOST_SUITE) {
            if let Some(uri) = field("URIs:").and_then(|u| u.split_whitespace().next().map(str::to_string)) {
                return Some(uri);
            }
        }
    }
    list.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        (words.len() >= 3 && words[0] == "deb" && words[2] == HOST_SUITE).then(|| words[1].to_string())
    })
}

fn build(os: Os, dir: &Path) -> Result<()> {
    let mirror = mirror();
    eprintln!("==> debootstrap {os} from {mirror} (about a minute)");
    std::fs::create_dir_all(dir.parent().unwrap()).context("cannot create .node-cache")?;
    // Per suite: both trees may be built at the same time.
    let log = cache_dir().join(format!("debootstrap-{os}.log"));
    let _ = std::fs::remove_file(&log);
    let mut debootstrap = host::cmd(
        "debootstrap",
        ["--variant=minbase".to_string(), format!("--include={}", os.packages().join(","))],
    );
    debootstrap.arg(os.suite()).arg(dir).arg(&mirror);
    host::run_logged(&mut debootstrap, &log)?;
    customise(os, dir)
}

/// A tree made from `base`: a copy with the extra packages of `os`, then its layout.
fn derive(os: Os, base: &Path, dir: &Path) -> Result<()> {
    eprintln!(
        "==> {os} node tree: a copy of {} with {} (about a minute)",
        base.display(),
        extra_packages(os).join(" ")
    );
    host::run(host::cmd("cp", ["-a", "--reflink=auto"]).arg(base).arg(dir))
        .context("copying the base tree")?;
    let log = cache_dir().join(format!("apt-{os}.log"));
    let _ = std::fs::remove_file(&log);
    install_packages(dir, &extra_packages(os), &log)?;
    match os {
        Os::FcosLike => fcos_layout(dir),
        Os::Bookworm | Os::Trixie => Ok(()),
    }
}

/// Installs `packages` into the tree `dir` with its own apt (output appended to `log`), starting
/// no daemon (dpkg's maintainer scripts ask policy-rc.d), and leaves no downloads or lists.
pub fn install_packages(dir: &Path, packages: &[&str], log: &Path) -> Result<()> {
    let chroot = |args: &[&str]| {
        let mut c = host::cmd("chroot", [dir.as_os_str()]);
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    let policy = dir.join("usr/sbin/policy-rc.d");
    host::write(&policy, "#!/bin/sh\nexit 101\n")?;
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755))?;
    host::run_logged(&mut chroot(&["apt-get", "update", "-q"]), log)?;
    let mut install = chroot(&["apt-get", "install", "-y", "-q", "--no-install-recommends"]);
    install.args(packages);
    host::run_logged(&mut install, log).with_context(|| format!("installing {}", packages.join(" ")))?;
    host::run_logged(&mut chroot(&["apt-get", "clean"]), log)?;
    std::fs::remove_file(&policy)?;
    let _ = std::fs::remove_dir_all(dir.join("var/lib/apt/lists"));
    std::fs::create_dir_all(dir.join("var/lib/apt/lists/partial"))?;
    Ok(())
}

/// The packages `os` has beyond its base tree's.
fn extra_packages(os: Os) -> Vec<&'static str> {
    let base = os.base().map(Os::packages).unwrap_or_default();
    os.packages().into_iter().filter(|p| !base.contains(p)).collect()
}

/// What FCOS's subordinate-ID settings are (login.defs of Fedora's shadow-utils), and the range
/// stock FCOS gives `core` (fedora-coreos-tracker#2056).
const FCOS_LOGIN_DEFS: &str = "SUB_UID_MIN 524288\nSUB_UID_MAX 600100000\nSUB_UID_COUNT 65536\n\
                               SUB_GID_MIN 524288\nSUB_GID_MAX 600100000\nSUB_GID_COUNT 65536\n";
pub const FCOS_CORE_RANGE: &str = "core:524288:65536\n";

/// Whether a tree (pristine or a node's copy) has FCOS's layout: `/usr/local` is a link into
/// `/var`, which is what lets `/usr` be read-only.
pub fn has_fcos_layout(dir: &Path) -> bool {
    dir.join("usr/local").is_symlink()
}

/// Fedora CoreOS's shape, as far as the agent can tell it apart (shared/notes/field-facts.md):
/// the writable places of an ostree system are under /var (`/home`, `/root`, `/opt`, `/srv`,
/// `/mnt` and `/usr/local` are relative links into it; nspawn mounts `/usr` read-only, see
/// [`has_fcos_layout`]); core's home is /var/home/core and it already has the stock range;
/// newuidmap/newgidmap carry file capabilities instead of the setuid bit; the rootful
/// docker.socket is enabled (docker.service is not); the docker CLI is /usr/bin/docker; there
/// is no perl or python.
fn fcos_layout(dir: &Path) -> Result<()> {
    let root = dir.to_str().context("the tree's path is not UTF-8")?;
    for (link, target, real) in [
        ("home", "var/home", "var/home"),
        ("root", "var/roothome", "var/roothome"),
        ("opt", "var/opt", "var/opt"),
        ("srv", "var/srv", "var/srv"),
        ("mnt", "var/mnt", "var/mnt"),
        ("usr/local", "../var/usrlocal", "var/usrlocal"),
    ] {
        let (link, real) = (dir.join(link), dir.join(real));
        // Debian has an empty /var/opt of its own; anything else there would be lost.
        if real.exists() {
            std::fs::remove_dir(&real)
                .with_context(|| format!("{} exists and is not empty", real.display()))?;
        }
        if link.exists() {
            std::fs::rename(&link, &real)
                .with_context(|| format!("moving {} to {}", link.display(), real.display()))?;
        } else {
            std::fs::create_dir_all(&real)?;
        }
        std::os::unix::fs::symlink(target, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    host::run(host::cmd("chroot", [root, "usermod", "-d", "/var/home/core", "core"]))?;
    host::write(dir.join("etc/subuid"), FCOS_CORE_RANGE)?;
    host::write(dir.join("etc/subgid"), FCOS_CORE_RANGE)?;
    let defs = dir.join("etc/login.defs");
    let text = host::read_string(&defs)?;
    let kept: String = text
        .lines()
        .filter(|l| !l.trim_start_matches('#').trim_start().starts_with("SUB_"))
        .map(|l| format!("{l}\n"))
        .collect();
    host::write(&defs, format!("{kept}{FCOS_LOGIN_DEFS}"))?;
    for (helper, cap) in [("newuidmap", "cap_setuid=ep"), ("newgidmap", "cap_setgid=ep")] {
        let path = dir.join("usr/bin").join(helper);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        host::run(host::cmd("setcap", [cap.as_ref(), path.as_os_str()]))?;
    }
    // The docker CLI the nspawn trees get in /usr/local/bin: FCOS's is Moby's, in /usr/bin.
    std::fs::remove_file(dir.join("var/usrlocal/bin/docker"))
        .context("the tree has no /usr/local/bin/docker")?;
    host::run(host::cmd("systemctl", ["--root", root, "disable", "docker.service", "containerd.service"]))?;
    host::run(host::cmd("systemctl", ["--root", root, "enable", "docker.socket"]))?;
    for entry in std::fs::read_dir(dir.join("usr/bin"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "perl" || name.starts_with("perl5") || name.starts_with("python") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Everything a node needs after debootstrap: the runner user, Podman settings, /dev/net/tun,
/// a docker CLI, the test image source, and a quiet console.
fn customise(os: Os, dir: &Path) -> Result<()> {
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

    install_docker_cli(os, dir)?;
    build_test_image(os, dir)?;
    Ok(())
}

/// The docker CLI that GitLab Runner's `docker system dial-stdio` needs on the node (FCOS ships
/// one): the host's /usr/local/bin/docker, else the client from Debian's docker.io package.
fn install_docker_cli(os: Os, dir: &Path) -> Result<()> {
    let dest = dir.join("usr/local/bin/docker");
    let host_docker = Path::new("/usr/local/bin/docker");
    if host_docker.is_file() {
        std::fs::copy(host_docker, &dest).context("cannot copy /usr/local/bin/docker into the tree")?;
    } else {
        let work = cache_dir().join(format!("docker-cli-{os}"));
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
fn build_test_image(os: Os, dir: &Path) -> Result<()> {
    let staging = cache_dir().join(format!("image-staging-{os}"));
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
        // Only the bookworm stanza counts (the host is Debian 12); trixie uses the same mirror.
        let other = "Types: deb\nURIs: http://elsewhere/debian\nSuites: trixie\n";
        assert_eq!(mirror_from(other, ""), None);
    }

    #[test]
    fn parses_os_names() {
        for text in ["bookworm", "debian12", "12", "Bookworm"] {
            assert_eq!(Os::parse(text).unwrap(), Os::Bookworm, "{text}");
        }
        for text in ["trixie", "debian13", "13"] {
            assert_eq!(Os::parse(text).unwrap(), Os::Trixie, "{text}");
        }
        assert!(Os::parse("sid").is_err());
        assert_eq!(Os::parse_list("all").unwrap(), Os::ALL);
        assert_eq!(Os::parse_list("13").unwrap(), [Os::Trixie]);
        for os in Os::ALL {
            assert_eq!(Os::parse(os.name()).unwrap(), *os);
        }
    }

    #[test]
    fn trixie_adds_nftables_to_the_bookworm_list() {
        let (bookworm, trixie) = (Os::Bookworm.packages(), Os::Trixie.packages());
        assert!(bookworm.contains(&"iptables"), "without iptables the Docker-API default network fails");
        assert!(!bookworm.contains(&"nftables"));
        assert!(trixie.contains(&"nftables"), "netavark on Debian 13 needs nft");
        assert!(bookworm.iter().all(|p| trixie.contains(p)), "trixie lacks a bookworm package");
        assert_eq!(trixie.len(), bookworm.len() + 1);
    }

    #[test]
    fn the_fcos_like_tree_is_trixie_plus_moby_and_named_apart() {
        assert_eq!(Os::parse("fcos").unwrap(), Os::FcosLike);
        assert_eq!(Os::FcosLike.suite(), "trixie");
        assert_eq!(Os::FcosLike.base(), Some(Os::Trixie));
        assert_eq!(extra_packages(Os::FcosLike), ["docker.io", "docker-cli"]);
        assert_ne!(key(Os::FcosLike), key(Os::Trixie));
        assert!(belongs_to(&tree_name(Os::FcosLike), Os::FcosLike));
        assert!(!belongs_to(&tree_name(Os::FcosLike), Os::Trixie));
        assert!(!belongs_to(&tree_name(Os::Trixie), Os::FcosLike));
        assert!(!Os::DEBIAN.contains(&Os::FcosLike) && Os::ALL.contains(&Os::FcosLike));
    }

    #[test]
    fn cache_keys_differ_per_suite_and_name_it() {
        assert_eq!(key(Os::Bookworm).len(), 12);
        assert_ne!(key(Os::Bookworm), key(Os::Trixie));
        assert!(tree_name(Os::Trixie).starts_with("tree-trixie-"));
        assert!(tree_name(Os::Bookworm).starts_with("tree-bookworm-"));
    }

    #[test]
    fn stale_tree_removal_keeps_the_other_suite() {
        assert!(belongs_to("tree-bookworm-0123456789ab", Os::Bookworm));
        assert!(belongs_to("tree-bookworm-0123456789ab.done", Os::Bookworm));
        assert!(belongs_to("tree-0123456789ab", Os::Bookworm), "the suite-less name of before");
        assert!(belongs_to("tree-0123456789ab.done", Os::Bookworm));
        assert!(!belongs_to("tree-trixie-0123456789ab", Os::Bookworm));
        assert!(!belongs_to("tree-0123456789ab", Os::Trixie));
        assert!(belongs_to("tree-trixie-0123456789ab.done", Os::Trixie));
        assert!(!belongs_to("tree-bookworm-0123456789ab", Os::Trixie));
        assert!(!belongs_to("nodes", Os::Bookworm));
        assert!(!belongs_to("debootstrap-trixie.log", Os::Trixie));
    }
}
