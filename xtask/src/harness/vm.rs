//! The cgroup v2 VM: Debian's qemu-system-x86 unpacked into `.node-cache/` (TCG, no KVM), a
//! Debian 13 node tree with a kernel (cached beside the node trees), a per-run ext4 image
//! provisioned by the same Ignition config as the nspawn nodes, booted with `-kernel/-initrd`
//! on a unified cgroup hierarchy; commands as root or as `core` over SSH (a per-run key,
//! qemu's user networking forwarding a host loopback port to the guest's sshd); qemu killed
//! and the image deleted on every exit path.

use crate::harness::host;
use crate::harness::node::{self, Node, AGENT_PORT};
use crate::harness::tree;
use crate::render::ignition::Extras;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The VM's name: its node copy, its files under `.node-cache/vm/` and the PASS/FAIL lines.
pub const VM_NAME: &str = "vm-trixie";
/// Unpacked, not installed: `apt-get install qemu-system-x86` would remove the host's
/// qemu-utils 10.0 (a backport the 7.2 system emulator conflicts with).
const QEMU_DEBS: &[&str] = &["qemu-system-x86", "qemu-system-common"];
/// What the emulator loads at run time, installed normally (they do not conflict).
const FIRMWARE_PACKAGES: &[&str] = &["seabios", "ipxe-qemu", "qemu-system-data"];
/// The host tools of the image and the exec channel.
const HOST_PACKAGES: &[&str] = &["e2fsprogs", "openssh-client"];
/// Where Debian's firmware packages put the files qemu looks up by name, in lookup order.
const FIRMWARE_DIRS: &[&str] = &["/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu"];
/// The firmware a `-kernel` boot of the default `pc` machine cannot do without.
const REQUIRED_FIRMWARE: &[(&str, &str)] =
    &[("bios-256k.bin", "seabios"), ("linuxboot_dma.bin", "qemu-system-data")];
/// What the node tree lacks to boot on its own: a kernel, and an initramfs that finds the
/// virtio disk (initramfs-tools brings udev and kmod along).
const KERNEL_PACKAGES: &[&str] = &["linux-image-amd64", "initramfs-tools"];
/// Bump when the kernel tree's customisation below changes, so cached ones are rebuilt.
const KERNEL_RECIPE: &str = "executor-agent vm kernel tree v1";
/// The guest's address on qemu's user network (slirp's fixed 10.0.2.0/24 plan).
const GUEST_NETWORK: &str =
    "[Match]\nName=eth0\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nDNS=10.0.2.3\n";
const IMAGE_SIZE: &str = "3G";
/// Bound on one command run in the VM (TCG is some ten times slower than the nspawn nodes).
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(180);

/// The VM's files (image, console log, SSH key and control sockets): `.node-cache/vm/`.
pub fn vm_dir() -> PathBuf {
    tree::cache_dir().join("vm")
}

/// The unpacked emulator and the firmware folder it is given with `-L`.
pub struct Qemu {
    pub bin: PathBuf,
    pub firmware: PathBuf,
    pub version: String,
}

/// The `Version:` apt would download for `package`.
fn candidate_version(package: &str) -> Result<String> {
    let out = host::capture(host::cmd("apt-cache", ["show", "--no-all-versions", package]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string())).with_context(|| {
        format!("apt-cache knows no version of {package}: {}", String::from_utf8_lossy(&out.stderr))
    })
}

/// Package names of a Debian `Depends:` field: versions dropped, the first of alternatives.
pub fn parse_depends(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter_map(|dep| {
            let first = dep.split('|').next()?.trim();
            let name = first.split(|c: char| c.is_whitespace() || c == '(' || c == ':').next()?;
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// Debian's qemu-system-x86 unpacked into `.node-cache/qemu-x86-<key>/` (keyed by the version
/// apt offers), the libraries and firmware it needs installed, `-L` folder linked; checked
/// with `ldd` so a missing library is named before a boot fails obscurely.
pub fn ensure_qemu() -> Result<Qemu> {
    host::ensure_packages(HOST_PACKAGES)?;
    host::ensure_packages(FIRMWARE_PACKAGES)?;
    let version = candidate_version(QEMU_DEBS[0])?;
    let key: String = Sha256::digest(format!("{version}\n{}", QEMU_DEBS.join(",")))
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = tree::cache_dir().join(format!("qemu-x86-{key}"));
    let root = dir.join("root");
    let bin = root.join("usr/bin/qemu-system-x86_64");
    let depends_file = dir.join("depends");
    if !(bin.is_file() && depends_file.is_file()) {
        let _ = std::fs::remove_dir_all(&dir);
        let debs = dir.join("debs");
        std::fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
        eprintln!(
            "==> unpacking qemu-system-x86 {version} into {} (not installed: see QEMU_DEBS)",
            dir.display()
        );
        // Into a root-only folder: apt's _apt sandbox user could not write there.
        let mut download = host::cmd("apt-get", ["download", "-q", "-o", "APT::Sandbox::User=root"]);
        download.args(QEMU_DEBS.iter().map(|p| format!("{p}={version}"))).current_dir(&debs);
        host::run(&mut download).context("apt-get download of the qemu packages failed")?;
        let mut depends = Vec::new();
        for entry in std::fs::read_dir(&debs)?.flatten() {
            let deb = entry.path();
            host::run(host::cmd("dpkg-deb", ["-x".as_ref(), deb.as_os_str(), root.as_os_str()]))?;
            let out =
                host::capture(host::cmd("dpkg-deb", ["-f".as_ref(), deb.as_os_str(), "Depends".as_ref()]))?;
            depends.extend(parse_depends(&String::from_utf8_lossy(&out.stdout)));
        }
        depends.retain(|d| !QEMU_DEBS.contains(&d.as_str()));
        depends.sort();
        depends.dedup();
        std::fs::remove_dir_all(&debs)?;
        if !bin.is_file() {
            bail!("qemu-system-x86 {version} has no usr/bin/qemu-system-x86_64");
        }
        // Written last: its presence marks a complete unpack.
        host::write(&depends_file, depends.join("\n") + "\n")?;
    }
    let depends = host::read_string(&depends_file)?;
    let depends: Vec<&str> = depends.lines().filter(|l| !l.is_empty()).collect();
    host::ensure_packages(&depends)?;
    let ldd = host::capture(host::cmd("ldd", [&bin]))?;
    let missing: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter(|l| l.contains("not found"))
        .map(|l| l.trim().to_string())
        .collect();
    if !ldd.status.success() || !missing.is_empty() {
        bail!(
            "{} cannot run: missing libraries {missing:?} ({}{})",
            bin.display(),
            String::from_utf8_lossy(&ldd.stdout),
            String::from_utf8_lossy(&ldd.stderr)
        );
    }
    let firmware = dir.join("firmware");
    let mut sources = vec![root.join("usr/share/qemu")];
    sources.extend(FIRMWARE_DIRS.iter().map(PathBuf::from));
    link_firmware(&sources, &firmware)?;
    Ok(Qemu { bin, firmware, version })
}

/// Makes `dest` a folder of symlinks to every file of `sources` (the first source naming a
/// file wins; links that lead nowhere are left out), pointing at the real files so that
/// Debian's relative links between its firmware packages need not resolve from `dest`.
/// Fails naming the package of a required file that none of them has.
pub fn link_firmware(sources: &[PathBuf], dest: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    for source in sources {
        let Ok(entries) = std::fs::read_dir(source) else { continue };
        for entry in entries.flatten() {
            let link = dest.join(entry.file_name());
            let Ok(target) = std::fs::canonicalize(entry.path()) else { continue };
            if link.symlink_metadata().is_ok() || !target.is_file() {
                continue;
            }
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("cannot link {}", link.display()))?;
        }
    }
    let missing: Vec<String> = REQUIRED_FIRMWARE
        .iter()
        .filter(|(file, _)| !dest.join(file).is_file())
        .map(|(file, package)| format!("{file} (package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "no {} in {}: qemu cannot boot without it",
            missing.join(", "),
            sources.iter().map(|s| s.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// The pristine tree plus a kernel and the VM's network, cached as
/// `.node-cache/vm-kernel-<tree>-<key>/`. Returns it and how long building it took (None:
/// cached).
pub fn ensure_kernel_tree(pristine: &Path) -> Result<(PathBuf, Option<Duration>)> {
    let tree_name = pristine.file_name().context("the pristine tree has no name")?.to_string_lossy();
    let key: String = Sha256::digest(format!(
        "{tree_name}\n{}\n{KERNEL_RECIPE}\n{GUEST_NETWORK}",
        KERNEL_PACKAGES.join(",")
    ))
    .iter()
    .take(6)
    .map(|b| format!("{b:02x}"))
    .collect();
    let prefix = format!("vm-kernel-{}", tree_name.trim_start_matches("tree-"));
    let name = format!("{prefix}-{key}");
    let dir = tree::cache_dir().join(&name);
    let done = tree::cache_dir().join(format!("{name}.done"));
    if done.exists() && boot_files(&dir).is_ok() {
        eprintln!("==> reusing the cached VM kernel tree {}", dir.display());
        return Ok((dir, None));
    }
    // Only this function's own older entries: the node trees beside them belong to others.
    if let Ok(entries) = std::fs::read_dir(tree::cache_dir()) {
        for entry in entries.flatten() {
            let n = entry.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("{prefix}-")) && !n.starts_with(&name) {
                eprintln!("==> removing the stale VM kernel tree {n}");
                let p = entry.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    }
    let started = Instant::now();
    let partial = tree::cache_dir().join(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    let log = tree::cache_dir().join(format!("{prefix}.log"));
    eprintln!(
        "==> installing {} into a copy of {} (about 40 s; log {})",
        KERNEL_PACKAGES.join(" "),
        pristine.display(),
        log.display()
    );
    host::run(host::cmd("cp", ["-a", "--reflink=auto"]).arg(pristine).arg(&partial))
        .context("copying the pristine tree failed")?;
    install_kernel(&partial, &log)
        .with_context(|| format!("installing the kernel into {} failed", partial.display()))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&partial, &dir)?;
    host::write(&done, format!("{KERNEL_RECIPE}\n{tree_name}\n{}\n", KERNEL_PACKAGES.join(" ")))?;
    let took = started.elapsed();
    eprintln!("==> VM kernel tree built in {:.1} s: {}", took.as_secs_f64(), dir.display());
    Ok((dir, Some(took)))
}

fn install_kernel(dir: &Path, log: &Path) -> Result<()> {
    tree::install_packages(dir, KERNEL_PACKAGES, log)?;
    boot_files(dir)?;
    // The nspawn nodes have a private network with only loopback; the VM needs an address
    // for the forwarded SSH port (a static one: no DHCP wait under TCG).
    host::write(dir.join("etc/systemd/network/10-vm.network"), GUEST_NETWORK)?;
    host::run(host::cmd(
        "systemctl",
        ["--root".as_ref(), dir.as_os_str(), "enable".as_ref(), "systemd-networkd.service".as_ref()],
    ))?;
    Ok(())
}

/// The newest kernel of `<dir>/boot` and its initramfs.
pub fn boot_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = dir.join("boot");
    let names: Vec<String> = std::fs::read_dir(&boot)
        .with_context(|| format!("cannot read {}", boot.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let (kernel, initrd) = pick_kernel(&names)
        .with_context(|| format!("no vmlinuz-* with its initrd.img-* in {}", boot.display()))?;
    Ok((boot.join(kernel), boot.join(initrd)))
}

/// The newest `vmlinuz-V` that has an `initrd.img-V` beside it, from a `/boot` listing.
pub fn pick_kernel(names: &[String]) -> Option<(String, String)> {
    let mut versions: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| names.iter().any(|n| n == &format!("initrd.img-{v}")))
        .collect();
    versions.sort_by_key(|v| version_key(v));
    versions.last().map(|v| (format!("vmlinuz-{v}"), format!("initrd.img-{v}")))
}

fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok()).collect()
}

/// The kernel command line: the unified cgroup hierarchy is the point of the VM; the serial
/// getty would interleave with the console log; `eth0` is what the network file matches.
pub fn kernel_cmdline() -> String {
    [
        "root=/dev/vda",
        "rw",
        "console=ttyS0",
        "systemd.unified_cgroup_hierarchy=1",
        "systemd.mask=serial-getty@ttyS0.service",
        "net.ifnames=0",
        // A panic ends qemu (with -no-reboot) instead of hanging until the timeout.
        "panic=-1",
    ]
    .join(" ")
}

/// What one boot needs: the image, the kernel and initramfs copied out of it, the SSH key.
pub struct Image {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub key: PathBuf,
}

/// qemu's arguments (TCG: /dev/kvm exists on the build machines but does not boot stock kernels).
pub fn qemu_args(firmware: &Path, image: &Image, ssh_port: u16, console: &Path) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    let mut args: Vec<String> =
        ["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "4096"].map(String::from).to_vec();
    args.extend(["-nodefaults".into(), "-display".into(), "none".into(), "-no-reboot".into()]);
    args.extend(["-L".into(), s(firmware)]);
    args.extend(["-kernel".into(), s(&image.kernel), "-initrd".into(), s(&image.initrd)]);
    args.extend(["-append".into(), kernel_cmdline()]);
    // cache=unsafe: the image is thrown away after the run.
    args.extend(["-drive".into(), format!("file={},format=raw,if=virtio,cache=unsafe", s(&image.disk))]);
    args.extend([
        "-netdev".into(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),
        // No option ROM: the kernel is loaded directly, nothing boots from the network.
        "-device".into(),
        "virtio-net-pci,netdev=n0,romfile=".into(),
    ]);
    // Entropy for sshd and getrandom() early in boot.
    args.extend(["-device".into(), "virtio-rng-pci".into()]);
    args.extend(["-serial".into(), format!("file:{}", s(console))]);
    args
}

/// Builds the VM's image from the kernel tree: a node copy provisioned exactly as an nspawn
/// node is (`Node::create`: machine-id, hostname, the real Ignition binary, first-boot
/// presets), a per-run SSH key for root and core, `mkfs.ext4 -d`. Returns the image and the
/// time each part took.
pub fn build_image(
    kernel_tree: &Path,
    agent: &Path,
    extras: &Extras,
) -> Result<(Image, Vec<(String, Duration)>)> {
    let dir = vm_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut times = Vec::new();
    let t = Instant::now();
    let node = Node::create(VM_NAME, kernel_tree, agent, extras)?;
    times.push(("copy + Ignition (Node::create)".to_string(), t.elapsed()));

    let key = dir.join(format!("{VM_NAME}.key"));
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("key.pub"));
    host::run(host::cmd("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", VM_NAME, "-f"]).arg(&key))?;
    let public = host::read_string(format!("{}.pub", key.display()))?;
    // Debian's sshd reads ~/.ssh/authorized_keys (FCOS's authorized_keys.d is its own patch).
    for (home, uid) in [("root", 0), ("home/core", 1000)] {
        let ssh = node.dir.join(home).join(".ssh");
        host::write(ssh.join("authorized_keys"), &public)?;
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
        std::fs::set_permissions(ssh.join("authorized_keys"), std::fs::Permissions::from_mode(0o600))?;
        for p in [&ssh, &ssh.join("authorized_keys")] {
            std::os::unix::fs::chown(p, Some(uid), Some(uid))?;
        }
    }
    let (kernel_in, initrd_in) = boot_files(&node.dir)?;
    let (kernel, initrd) = (dir.join(format!("{VM_NAME}.vmlinuz")), dir.join(format!("{VM_NAME}.initrd")));
    std::fs::copy(&kernel_in, &kernel).with_context(|| format!("cannot copy {}", kernel_in.display()))?;
    std::fs::copy(&initrd_in, &initrd).with_context(|| format!("cannot copy {}", initrd_in.display()))?;

    let t = Instant::now();
    let disk = dir.join(format!("{VM_NAME}.img"));
    let _ = std::fs::remove_file(&disk);
    let out = host::capture(
        host::cmd("mkfs.ext4", ["-q", "-F", "-L", "root", "-d"]).arg(&node.dir).arg(&disk).arg(IMAGE_SIZE),
    )?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 -d {} failed ({}): {}{}",
            node.dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    times.push((format!("mkfs.ext4 -d ({IMAGE_SIZE})"), t.elapsed()));
    // The copy is in the image now: dropping the node deletes it (in the background).
    drop(node);
    Ok((Image { disk, kernel, initrd, key }, times))
}

/// A booted VM. Dropping it kills qemu and its SSH masters and deletes the image.
pub struct Vm {
    pub console: PathBuf,
    image: Image,
    port: u16,
    qemu: Option<Child>,
    /// One SSH connection per user, every command multiplexed over it (a new login under
    /// TCG costs about a second).
    masters: Vec<(String, Child, PathBuf)>,
    pub boot_started: Instant,
    _lock: std::fs::File,
}

/// A loopback port nobody listens on right now, for qemu's forward to the guest's sshd.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Dies with this process (an interrupted run leaves no qemu or ssh behind). Tied to the
/// spawning thread: spawn from the thread that owns the VM.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and only affects the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

impl Vm {
    /// Starts qemu on `image` in the background; the console goes to `.node-cache/vm/NAME.log`.
    pub fn boot(qemu: &Qemu, image: Image) -> Result<Vm> {
        let lock = node::lock_name(VM_NAME)?
            .with_context(|| format!("{VM_NAME} is in use by another `cargo xtask` process"))?;
        let console = vm_dir().join(format!("{VM_NAME}.log"));
        let _ = std::fs::remove_file(&console);
        let port = free_port()?;
        let qemu_log = vm_dir().join(format!("{VM_NAME}.qemu.log"));
        let log = std::fs::File::create(&qemu_log)
            .with_context(|| format!("cannot create {}", qemu_log.display()))?;
        let mut cmd = Command::new(&qemu.bin);
        cmd.args(qemu_args(&qemu.firmware, &image, port, &console))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let boot_started = Instant::now();
        let child = cmd.spawn().with_context(|| format!("cannot start {}", qemu.bin.display()))?;
        Ok(Vm { console, image, port, qemu: Some(child), masters: Vec::new(), boot_started, _lock: lock })
    }

    /// Whether qemu still runs.
    pub fn is_running(&mut self) -> bool {
        self.qemu.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// ssh with the VM's key and port; the caller adds its options, then [`Vm::destination`].
    fn ssh_base(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-i".as_ref(), self.image.key.as_os_str()])
            .args(["-p", &self.port.to_string()])
            .args(host::BATCH_SSH_OPTIONS)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "ServerAliveInterval=10",
                "-o",
                "ServerAliveCountMax=6",
            ])
            .stdin(Stdio::null());
        cmd
    }

    fn destination(user: &str) -> String {
        format!("{user}@127.0.0.1")
    }

    fn control_path(user: &str) -> PathBuf {
        vm_dir().join(format!("{VM_NAME}-{user}.ctl"))
    }

    /// Waits until root can log in over SSH, then opens the root and core connections every
    /// command goes through. Returns when root first logged in.
    pub fn wait_ssh(&mut self, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut last;
        let first = loop {
            let out = host::capture(self.ssh_base().arg(Vm::destination("root")).arg("true"))?;
            if out.status.success() {
                break Instant::now();
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if !self.is_running() {
                bail!("qemu exited while booting{}", self.tail_note());
            }
            if Instant::now() >= deadline {
                bail!("no SSH login as root within {timeout:?} (last: {last}){}", self.tail_note());
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        for user in ["root", "core"] {
            self.open_master(user, deadline)?;
        }
        Ok(first)
    }

    fn open_master(&mut self, user: &str, deadline: Instant) -> Result<()> {
        let ctl = Vm::control_path(user);
        let _ = std::fs::remove_file(&ctl);
        let mut cmd = self.ssh_base();
        cmd.args(["-M", "-N", "-o", "ControlPersist=no", "-S"])
            .arg(&ctl)
            .arg(Vm::destination(user))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("cannot start the ssh master")?;
        self.masters.push((user.to_string(), child, ctl.clone()));
        loop {
            let check = host::capture(
                Command::new("ssh").arg("-S").arg(&ctl).args(["-O", "check"]).arg(Vm::destination(user)),
            )?;
            if check.status.success() {
                return Ok(());
            }
            // A refused login (pam_nologin while the boot finishes) ends the master: retry.
            let (_, child, _) = self.masters.last_mut().unwrap();
            if let Ok(Some(status)) = child.try_wait() {
                if Instant::now() >= deadline {
                    bail!(
                        "the SSH connection as {user} ended ({status}): {}",
                        String::from_utf8_lossy(&check.stderr)
                    );
                }
                self.masters.pop();
                std::thread::sleep(Duration::from_secs(1));
                return self.open_master(user, deadline);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the SSH connection as {user} did not come up: {}",
                    String::from_utf8_lossy(&check.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `script` in a non-interactive SSH session of `user` (`root` or `core`), as GitLab
    /// Runner's connector runs commands; killed after [`EXEC_TIMEOUT`].
    pub fn exec(&mut self, user: &str, script: &str) -> Result<Output> {
        let ctl = Vm::control_path(user);
        let mut cmd = self.ssh_base();
        cmd.args(["-o", "ControlMaster=no", "-S"]).arg(&ctl).arg(Vm::destination(user)).arg("--").arg(script);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().context("cannot start ssh")?;
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(EXEC_TIMEOUT) {
            Ok(out) => {
                let out = out?;
                // 255: ssh itself failed, not the command.
                if out.status.code() == Some(255) && !self.is_running() {
                    bail!("qemu has exited (running `{script}` as {user}){}", self.tail_note());
                }
                Ok(out)
            }
            Err(_) => {
                // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                bail!("in the VM as {user}: `{script}` did not finish within {EXEC_TIMEOUT:?}")
            }
        }
    }

    fn must(&mut self, user: &str, script: &str) -> Result<String> {
        let out = self.exec(user, script)?;
        if !out.status.success() {
            bail!(
                "in the VM as {user}: `{script}` failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A root shell script that must succeed; returns stdout.
    pub fn run(&mut self, script: &str) -> Result<String> {
        self.must("root", script)
    }

    /// A script of `core` (the runner user's SSH session: XDG_RUNTIME_DIR set by pam_systemd).
    pub fn as_core(&mut self, script: &str) -> Result<Output> {
        self.exec("core", script)
    }

    /// `as_core` that must succeed; returns stdout.
    pub fn run_as_core(&mut self, script: &str) -> Result<String> {
        self.must("core", script)
    }

    /// Waits for the end of the boot (`systemctl is-system-running --wait`); returns the state
    /// (`running`, or `degraded` naming the failed units).
    pub fn wait_systemd(&mut self) -> Result<String> {
        let out = self.exec("root", "systemctl is-system-running --wait")?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match state.as_str() {
            "running" => Ok(state),
            "degraded" => {
                let failed =
                    self.run("systemctl --failed --no-legend --plain | cut -d' ' -f1 | tr '\\n' ' '")?;
                Ok(format!("degraded (failed: {})", failed.trim()))
            }
            other => bail!("systemd ended its boot as {other:?}{}", self.tail_note()),
        }
    }

    /// `/readyz` of the agent on the VM's loopback, as (ready, JSON body).
    pub fn readyz(&mut self) -> Result<(bool, serde_json::Value)> {
        let out =
            self.exec("root", &format!("curl -s -i --max-time 5 http://127.0.0.1:{AGENT_PORT}/readyz"))?;
        if !out.status.success() {
            bail!("curl /readyz failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        let (status, body) = node::parse_http(&out.stdout)?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("/readyz did not answer JSON ({status}): {body}"))?;
        match status {
            200 => Ok((true, json)),
            503 => Ok((false, json)),
            other => bail!("/readyz answered {other}: {body}"),
        }
    }

    /// Polls `/readyz` until it answers 200 (`want`) or 503; returns when it first did.
    pub fn wait_readyz(&mut self, want: bool, timeout: Duration) -> Result<(Instant, serde_json::Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.readyz() {
                Ok((ready, json)) if ready == want => return Ok((Instant::now(), json)),
                Ok((_, json)) => json.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if !self.is_running() {
                bail!("qemu exited while waiting for /readyz{}", self.tail_note());
            }
            if Instant::now() >= deadline {
                bail!(
                    "/readyz did not become {} within {timeout:?}; last: {last}",
                    if want { 200 } else { 503 }
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The last lines of the console log.
    pub fn console_tail(&self, lines: usize) -> String {
        node::file_tail(&self.console, lines)
    }

    fn tail_note(&self) -> String {
        format!("; last console lines ({}):\n{}", self.console.display(), self.console_tail(25))
    }

    /// Kills the SSH masters and qemu (SIGTERM, SIGKILL after 5 s) and deletes the image;
    /// nothing of the VM is worth a clean shutdown.
    pub fn stop(&mut self) {
        for (_, mut child, ctl) in self.masters.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(ctl);
        }
        if let Some(mut child) = self.qemu.take() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for p in [&self.image.disk, &self.image.kernel, &self.image.initrd, &self.image.key] {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(format!("{}.pub", self.image.key.display()));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_asks_for_cgroup_v2_and_a_quiet_serial_console() {
        let line = kernel_cmdline();
        let words: Vec<&str> = line.split(' ').collect();
        for w in [
            "root=/dev/vda",
            "rw",
            "console=ttyS0",
            "systemd.unified_cgroup_hierarchy=1",
            "systemd.mask=serial-getty@ttyS0.service",
            "net.ifnames=0",
        ] {
            assert!(words.contains(&w), "{w} missing from {line}");
        }
        assert!(!line.contains("  ") && !line.contains('\n'));
    }

    #[test]
    fn qemu_runs_tcg_with_the_forward_and_the_console_file() {
        let image = Image {
            disk: "/c/vm.img".into(),
            kernel: "/c/vmlinuz".into(),
            initrd: "/c/initrd".into(),
            key: "/c/key".into(),
        };
        let args = qemu_args(Path::new("/c/fw"), &image, 2222, Path::new("/c/console.log"));
        let joined = args.join(" ");
        assert!(joined.starts_with("-accel tcg,thread=multi -cpu max -smp 2 -m 4096 "), "{joined}");
        assert!(!joined.contains("kvm"), "{joined}");
        let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].as_str());
        assert_eq!(after("-L"), Some("/c/fw"));
        assert_eq!(after("-append"), Some(kernel_cmdline().as_str()));
        assert_eq!(after("-drive"), Some("file=/c/vm.img,format=raw,if=virtio,cache=unsafe"));
        assert_eq!(after("-netdev"), Some("user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22"));
        assert_eq!(after("-serial"), Some("file:/c/console.log"));
    }

    #[test]
    fn depends_fields_give_package_names() {
        let field = "libaio1 (>= 0.3.93), libc6 (>= 2.34), libfdt1 (>= 1.6.0) | libfdt-alt, \
                     qemu-system-common (= 1:7.2+dfsg-7), libglib2.0-0:any (>= 2.75)\n";
        assert_eq!(
            parse_depends(field),
            ["libaio1", "libc6", "libfdt1", "qemu-system-common", "libglib2.0-0"]
        );
        assert!(parse_depends("").is_empty());
    }

    #[test]
    fn picks_the_newest_kernel_with_an_initrd() {
        let names: Vec<String> = [
            "vmlinuz-6.12.9-amd64",
            "initrd.img-6.12.9-amd64",
            "vmlinuz-6.12.38+deb13-amd64",
            "initrd.img-6.12.38+deb13-amd64",
            "vmlinuz-6.13.0-amd64",
            "config-6.12.9-amd64",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            pick_kernel(&names),
            Some(("vmlinuz-6.12.38+deb13-amd64".into(), "initrd.img-6.12.38+deb13-amd64".into())),
            "6.13.0 has no initrd"
        );
        assert_eq!(pick_kernel(&["vmlinuz-1".to_string()]), None);
    }

    #[test]
    fn the_firmware_folder_links_real_files_first_source_first() {
        let base = std::env::temp_dir().join(format!("xtask-vm-fw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (qemu, seabios, dest) = (base.join("qemu"), base.join("seabios"), base.join("fw"));
        std::fs::create_dir_all(&qemu).unwrap();
        std::fs::create_dir_all(&seabios).unwrap();
        std::fs::write(seabios.join("bios-256k.bin"), "seabios").unwrap();
        std::fs::write(qemu.join("linuxboot_dma.bin"), "qemu").unwrap();
        // Debian's relative link from qemu-system-data to seabios, and one to nowhere.
        std::os::unix::fs::symlink("../seabios/bios-256k.bin", qemu.join("bios-256k.bin")).unwrap();
        std::os::unix::fs::symlink("../ipxe/missing.rom", qemu.join("efi-e1000.rom")).unwrap();
        std::fs::write(seabios.join("linuxboot_dma.bin"), "shadowed").unwrap();
        link_firmware(&[qemu.clone(), seabios.clone()], &dest).unwrap();
        assert_eq!(std::fs::read_link(dest.join("bios-256k.bin")).unwrap(), seabios.join("bios-256k.bin"));
        assert_eq!(std::fs::read_to_string(dest.join("linuxboot_dma.bin")).unwrap(), "qemu");
        assert!(dest.join("efi-e1000.rom").symlink_metadata().is_err(), "a dangling link was kept");
        // Run again: the folder is rebuilt, not appended to.
        link_firmware(&[qemu.clone(), seabios.clone()], &dest).unwrap();
        std::fs::remove_file(seabios.join("bios-256k.bin")).unwrap();
        let err = link_firmware(&[qemu, seabios], &dest).unwrap_err().to_string();
        assert!(err.contains("bios-256k.bin (package seabios)"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
