//! The Ignition config: render `ignition/executor-agent.bu` to `.ign` (production and local
//! variants), keep the `.bu` in step with the unit file and `release.toml`, validate, and `dist`.
//! The production config has one variant per architecture: `executor-agent.bu` (x86_64) and
//! `executor-agent-aarch64.bu`, written from it with the aarch64 binary's URL and hash.

use crate::harness::host;
use crate::render::butane::{self, Config, Resource};
use crate::suites::cross;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha512};
use std::path::{Path, PathBuf};

/// Where the agent binary goes on the node.
pub const AGENT_PATH: &str = "/usr/local/bin/executor-agent";
/// The agent's unit.
pub const UNIT_NAME: &str = "executor-agent.service";
/// Every unit the `.bu` installs, with the repository file it must carry verbatim.
const UNITS: [(&str, &str); 3] = [
    (UNIT_NAME, "systemd/executor-agent.service"),
    ("executor-agent.socket", "systemd/executor-agent.socket"),
    ("executor-agent-boot-gate.service", "systemd/executor-agent-boot-gate.service"),
];
/// Where the configuration goes on the node.
pub const CONFIG_PATH: &str = "/etc/executor-agent/config.toml";

/// A production variant: the Butane source and its committed rendering for one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// `uname -m` of the nodes it is for.
    pub arch: &'static str,
    /// The Rust target of the binary it installs (its entry in release.toml).
    pub target: &'static str,
    butane: &'static str,
    ign: &'static str,
}

/// x86_64: the one Butane source that is edited by hand (and merged into operators' configs).
pub const X86_64: Variant = Variant {
    arch: "x86_64",
    target: cross::X86_64,
    butane: "ignition/executor-agent.bu",
    ign: "ignition/executor-agent.ign",
};

/// aarch64 (ARM64/Graviton): written by `cargo xtask ignition` from the x86_64 source, with
/// only the binary's URL and hash changed.
pub const AARCH64: Variant = Variant {
    arch: "aarch64",
    target: cross::AARCH64,
    butane: "ignition/executor-agent-aarch64.bu",
    ign: "ignition/executor-agent-aarch64.ign",
};

/// Every production variant.
pub const VARIANTS: [Variant; 2] = [X86_64, AARCH64];

impl Variant {
    /// Its Butane source.
    pub fn butane_path(&self) -> PathBuf {
        host::repo_root().join(self.butane)
    }

    /// Its committed rendering.
    pub fn ign_path(&self) -> PathBuf {
        host::repo_root().join(self.ign)
    }
}

/// The hand-edited Butane source (x86_64).
pub fn butane_path() -> PathBuf {
    X86_64.butane_path()
}

fn release_path() -> PathBuf {
    host::repo_root().join("ignition/release.toml")
}

/// The documented defaults, copied inline into the `.bu`.
pub fn config_toml_path() -> PathBuf {
    host::repo_root().join("ignition/config.toml")
}

#[cfg(test)]
fn unit_path() -> PathBuf {
    host::repo_root().join(UNITS[0].1)
}

/// `ignition/release.toml`: the released binaries that the production variants download.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: String,
    pub url_base: String,
    /// One per target, in the order of [`VARIANTS`].
    #[serde(rename = "binary")]
    pub binaries: Vec<Binary>,
}

/// One released binary (`[[binary]]` in release.toml).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Binary {
    pub target: String,
    pub file: String,
    pub url: String,
    pub sha512: String,
    pub size: u64,
}

impl Release {
    pub fn load() -> Result<Release> {
        let text = host::read_string(release_path())?;
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid release file", release_path().display()))
    }

    /// The binary for `target`.
    pub fn binary(&self, target: &str) -> Result<&Binary> {
        self.binaries.iter().find(|b| b.target == target).with_context(|| {
            format!("{} has no [[binary]] for {target}: run `cargo xtask dist`", release_path().display())
        })
    }

    fn render(&self) -> String {
        let mut out = format!(
            "# The released executor-agent binaries that the production Ignition configs install, one per\n\
             # architecture (ignition/executor-agent.bu: x86_64, ignition/executor-agent-aarch64.bu: aarch64).\n\
             # Written by `cargo xtask dist` from the binaries it built: publish exactly target/dist/<file>\n\
             # at its `url`, or the node's Ignition refuses it (verification.hash is the sha512 below).\n\
             version = \"{version}\"\n\
             url_base = \"{url_base}\"\n",
            version = self.version,
            url_base = self.url_base,
        );
        for b in &self.binaries {
            out.push_str(&format!(
                "\n[[binary]]\n\
                 target = \"{target}\"\n\
                 file = \"{file}\"\n\
                 url = \"{url}\"\n\
                 sha512 = \"{sha512}\"\n\
                 size = {size}\n",
                target = b.target,
                file = b.file,
                url = b.url,
                sha512 = b.sha512,
                size = b.size,
            ));
        }
        out
    }
}

/// Parses a variant's Butane source and checks that it matches the unit file and release.toml.
pub fn load_source(variant: &Variant) -> Result<Config> {
    let config = parse_source(variant)?;
    check_in_step(&config, variant)?;
    Ok(config)
}

fn parse_source(variant: &Variant) -> Result<Config> {
    let path = variant.butane_path();
    let text = host::read_string(&path)?;
    Config::parse(&text).with_context(|| format!("{} is not valid for the renderer", path.display()))
}

/// The `.bu` must carry the unit files verbatim and release.toml's URL and hash for its target.
fn check_in_step(config: &Config, variant: &Variant) -> Result<()> {
    let butane_path = || variant.butane_path();
    for (name, file) in UNITS {
        let unit_file = host::read_string(host::repo_root().join(file))?;
        let unit = config
            .units
            .iter()
            .find(|u| u.name == name)
            .with_context(|| format!("{} has no unit {name}", butane_path().display()))?;
        if unit.contents.as_deref() != Some(unit_file.as_str()) {
            bail!(
                "the {name} contents in {} differ from {file}: run `cargo xtask ignition` to copy the unit in",
                butane_path().display(),
            );
        }
    }
    let config_file = host::read_string(config_toml_path())?;
    let entry = config
        .files
        .iter()
        .find(|f| f.node.path == CONFIG_PATH)
        .with_context(|| format!("{} does not install {CONFIG_PATH}", butane_path().display()))?;
    if entry.contents.as_ref().and_then(|c| c.inline.as_deref()) != Some(config_file.as_str()) {
        bail!(
            "the inline {CONFIG_PATH} in {} differs from {}: run `cargo xtask ignition` to copy it in",
            butane_path().display(),
            config_toml_path().display()
        );
    }
    let release = Release::load()?;
    let release = release.binary(variant.target)?;
    let file = config
        .files
        .iter()
        .find(|f| f.node.path == AGENT_PATH)
        .with_context(|| format!("{} does not install {AGENT_PATH}", butane_path().display()))?;
    let contents = file.contents.as_ref().context("the agent binary entry has no contents")?;
    let want_hash = format!("sha512-{}", release.sha512);
    if contents.source.as_deref() != Some(release.url.as_str())
        || contents.hash.as_deref() != Some(want_hash.as_str())
    {
        bail!(
            "{AGENT_PATH} in {} does not use the url and sha512 of {}: run `cargo xtask dist`",
            butane_path().display(),
            release_path().display()
        );
    }
    if file.mode != Some(0o755) {
        bail!("{AGENT_PATH} must have mode 0755 in {}", butane_path().display());
    }
    Ok(())
}

/// A production variant as Butane would print it (`butane --pretty --strict`).
pub fn render_production(variant: &Variant) -> Result<String> {
    let config = load_source(variant)?;
    let json = config.to_ignition(None)?;
    Ok(json.to_pretty() + "\n")
}

/// Extra entries a test scenario adds to the local variant (as an operator's own Butane would).
#[derive(Debug, Clone, Default)]
pub struct Extras {
    pub files: Vec<butane::File>,
    pub links: Vec<butane::Link>,
}

/// The local variant: the production source with the agent binary embedded from `binary`
/// (`contents.local`, gzip-compressed by Butane's rules) and its sha512, rendered into `work`.
/// Returns the path of the rendered, validated `.ign`.
/// The unit comes from systemd/executor-agent.service as it is now, so a node always tests the
/// working tree (a stale `.bu` only warns here; `ignition --check` and the tests fail on it).
pub fn render_local(binary: &Path, extras: &Extras, work: &Path) -> Result<PathBuf> {
    let mut config = parse_source(&X86_64)?;
    if let Err(e) = check_in_step(&config, &X86_64) {
        eprintln!("warning: {e:#}");
    }
    for (name, file) in UNITS {
        let unit_file = host::read_string(host::repo_root().join(file))?;
        let unit = config
            .units
            .iter_mut()
            .find(|u| u.name == name)
            .with_context(|| format!("the source has no {name}"))?;
        unit.contents = Some(unit_file);
    }
    let config_file = host::read_string(config_toml_path())?;
    let entry = config.file_mut(CONFIG_PATH).context("the source does not install the configuration")?;
    entry.contents = Some(Resource { inline: Some(config_file), ..Resource::default() });
    let data = host::read(binary)?;
    let files = work.join("files");
    std::fs::create_dir_all(&files).with_context(|| format!("cannot create {}", files.display()))?;
    host::write(files.join("executor-agent"), &data)?;
    let entry = config.file_mut(AGENT_PATH).context("the source does not install the agent")?;
    entry.contents = Some(Resource {
        local: Some("executor-agent".into()),
        hash: Some(format!("sha512-{}", sha512_hex(&data))),
        ..Resource::default()
    });
    config.files.extend(extras.files.iter().cloned());
    config.links.extend(extras.links.iter().cloned());
    let json = config.to_ignition(Some(&files))?;
    let out = work.join("local.ign");
    host::write(&out, json.to_pretty() + "\n")?;
    validate(&out)?;
    Ok(out)
}

/// Runs Debian's `ignition-validate` on a rendered config.
pub fn validate(path: &Path) -> Result<()> {
    let out = host::capture(host::cmd(host::IGNITION_VALIDATE, [path]))
        .context("ignition-validate is missing (Debian package `ignition`)")?;
    if !out.status.success() || !out.stdout.is_empty() || !out.stderr.is_empty() {
        bail!(
            "ignition-validate rejected {} ({}):\n{}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Lower-case hex sha512.
pub fn sha512_hex(data: &[u8]) -> String {
    Sha512::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Butane snippets an operator merges into a node's config, each rendered beside its source.
const SNIPPETS: [(&str, &str); 1] = [("ignition/zincati-fleet-lock.bu", "ignition/zincati-fleet-lock.ign")];

fn render_snippet(source: &str) -> Result<String> {
    let text = host::read_string(host::repo_root().join(source))?;
    let config = butane::Config::parse(&text).with_context(|| source.to_string())?;
    Ok(config.to_ignition(None)?.to_pretty() + "\n")
}

/// `cargo xtask ignition [--check]`: every production variant (x86_64, aarch64) and snippet.
pub fn cmd_ignition(check: bool) -> Result<()> {
    for (source, rendered) in SNIPPETS {
        let fresh = render_snippet(source)?;
        let path = host::repo_root().join(rendered);
        if check {
            if host::read_string(&path)? != fresh {
                bail!("{rendered} is stale: run `cargo xtask ignition` and commit the result");
            }
            eprintln!("ok: {rendered} is what {source} renders to");
        } else {
            host::write(&path, fresh)?;
            eprintln!("wrote {rendered}");
        }
        validate_if_possible(&path)?;
    }
    if check {
        let derived = derive_aarch64_source()?;
        if derived != host::read_string(AARCH64.butane_path())? {
            bail!(
                "{} is stale: run `cargo xtask ignition` and commit the result",
                AARCH64.butane_path().display()
            );
        }
        for variant in VARIANTS {
            let fresh = render_production(&variant)?;
            let committed = host::read_string(variant.ign_path())?;
            if fresh != committed {
                bail!(
                    "{} is stale: run `cargo xtask ignition` and commit the result",
                    variant.ign_path().display()
                );
            }
            eprintln!(
                "ok: {} is what {} renders to",
                variant.ign_path().display(),
                variant.butane_path().display()
            );
        }
    } else {
        sync_into_source()?;
        host::write(AARCH64.butane_path(), derive_aarch64_source()?)?;
        for variant in VARIANTS {
            host::write(variant.ign_path(), render_production(&variant)?)?;
            eprintln!("wrote {}", variant.ign_path().display());
        }
    }
    for variant in VARIANTS {
        validate_if_possible(&variant.ign_path())?;
    }
    Ok(())
}

/// The aarch64 source's header; the x86_64 source follows, from its `variant:` line on.
const AARCH64_HEADER: &str = "\
# executor-agent on Fedora CoreOS, aarch64 (ARM64/Graviton) nodes. WRITTEN by `cargo xtask
# ignition` from ignition/executor-agent.bu (edit that file, then run it): the same config, but
# the binary entry installs the aarch64 build recorded in ignition/release.toml.
# Render it alone with
#   butane --strict --pretty ignition/executor-agent-aarch64.bu > executor-agent-aarch64.ign
# or merge its entries into your own aarch64 Butane config; see ignition/README.md.
";

/// The aarch64 source: the x86_64 one from its `variant:` line, with the aarch64 binary's URL
/// and hash from release.toml and its own header.
fn derive_aarch64_source() -> Result<String> {
    let source = host::read_string(X86_64.butane_path())?;
    let body_at = source
        .find("\nvariant:")
        .map(|i| i + 1)
        .or_else(|| source.starts_with("variant:").then_some(0))
        .with_context(|| format!("no `variant:` line in {}", X86_64.butane_path().display()))?;
    let release = Release::load()?;
    let binary = release.binary(AARCH64.target)?;
    let body = set_binary_source(&source[body_at..], &binary.url, &format!("sha512-{}", binary.sha512))?;
    Ok(format!("{AARCH64_HEADER}{body}"))
}

/// Validates when `ignition-validate` is there; as root, installs it first.
fn validate_if_possible(path: &Path) -> Result<()> {
    if !Path::new(host::IGNITION_VALIDATE).exists() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("warning: ignition-validate is not installed and this is not root: skipped validation");
            return Ok(());
        }
        host::ensure_packages(&["ignition"])?;
    }
    validate(path)?;
    eprintln!("ok: ignition-validate accepts {}", path.display());
    Ok(())
}

/// Copies the unit files and config.toml into their literal blocks in the `.bu`.
fn sync_into_source() -> Result<()> {
    let source = host::read_string(butane_path())?;
    let config = host::read_string(config_toml_path())?;
    let mut updated = replace_block(&source, &format!("- path: {CONFIG_PATH}"), "inline", &config)?;
    for (name, file) in UNITS {
        let unit = host::read_string(host::repo_root().join(file))?;
        updated = replace_block(&updated, &format!("- name: {name}"), "contents", &unit)?;
    }
    if updated != source {
        host::write(butane_path(), &updated)?;
        eprintln!("copied the unit file and config.toml into {}", butane_path().display());
    }
    Ok(())
}

/// Text surgery on the `.bu`: the `<key>: |` literal block inside the list item whose first
/// line is `anchor` (e.g. `- name: executor-agent.service` and `contents`).
fn replace_block(source: &str, anchor: &str, key: &str, contents: &str) -> Result<String> {
    let lines: Vec<&str> = source.split_inclusive('\n').collect();
    let name_at = lines
        .iter()
        .position(|l| l.trim() == anchor)
        .with_context(|| format!("no `{anchor}` line in the Butane source"))?;
    let item_indent = indent(lines[name_at]);
    let mut contents_at = None;
    for (i, line) in lines.iter().enumerate().skip(name_at + 1) {
        if !line.trim().is_empty() && indent(line) <= item_indent {
            break;
        }
        if line.trim_start().starts_with(&format!("{key}: |")) {
            contents_at = Some(i);
            break;
        }
    }
    let contents_at = contents_at.with_context(|| format!("`{anchor}` has no `{key}: |` block"))?;
    let key_indent = indent(lines[contents_at]);
    let mut end = contents_at + 1;
    while end < lines.len() && (lines[end].trim().is_empty() || indent(lines[end]) > key_indent) {
        end += 1;
    }
    // Blank lines right before the next key belong to the layout, not the block.
    while end > contents_at + 1 && lines[end - 1].trim().is_empty() {
        end -= 1;
    }
    if contents.starts_with([' ', '\t']) {
        bail!("the text for `{anchor}` starts with whitespace, which a plain literal block cannot hold");
    }
    let chomp = if contents.ends_with("\n\n") {
        bail!("the text for `{anchor}` ends with blank lines; remove them");
    } else if contents.ends_with('\n') {
        "|"
    } else {
        "|-"
    };
    let pad = " ".repeat(key_indent + 2);
    let mut out: String = lines[..contents_at].concat();
    out.push_str(&format!("{}{key}: {chomp}\n", " ".repeat(key_indent)));
    for line in contents.lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&pad);
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&lines[end..].concat());
    Ok(out)
}

/// Text surgery on the `.bu`: the `source:` and `hash:` lines of the agent binary's entry.
fn set_binary_source(source: &str, url: &str, hash: &str) -> Result<String> {
    let mut lines: Vec<String> = source.split_inclusive('\n').map(str::to_string).collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == format!("- path: {AGENT_PATH}"))
        .with_context(|| format!("no `- path: {AGENT_PATH}` line in the Butane source"))?;
    let item_indent = indent(&lines[start]);
    let (mut set_source, mut set_hash) = (false, false);
    for line in lines.iter_mut().skip(start + 1) {
        if !line.trim().is_empty() && indent(line) <= item_indent {
            break;
        }
        let pad = " ".repeat(indent(line));
        if line.trim_start().starts_with("source:") {
            *line = format!("{pad}source: {url}\n");
            set_source = true;
        } else if line.trim_start().starts_with("hash:") {
            *line = format!("{pad}hash: {hash}\n");
            set_hash = true;
        }
    }
    if !(set_source && set_hash) {
        bail!("the {AGENT_PATH} entry of the Butane source needs `source:` and `verification.hash:` lines");
    }
    Ok(lines.concat())
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// `cargo xtask dist [--url-base URL]`: builds the release binary of every variant's target
/// into target/dist, records them in release.toml, points each `.bu` at its binary and
/// re-renders the `.ign` files.
pub fn cmd_dist(url_base: Option<String>) -> Result<()> {
    let manifest = host::read_string(host::repo_root().join("Cargo.toml"))?;
    let manifest: toml::Table = toml::from_str(&manifest).context("Cargo.toml is not valid TOML")?;
    let version = manifest
        .get("package")
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .context("Cargo.toml has no package.version")?
        .to_string();
    let url_base = match (url_base, Release::load()) {
        (Some(u), _) => u,
        (None, Ok(old)) => old.url_base,
        (None, Err(e)) => return Err(e.context("no release.toml to take the URL base from: pass --url-base")),
    };
    let url_base = url_base.trim_end_matches('/').to_string();
    if !url_base.starts_with("https://") {
        bail!("the release URL base must be https:// (got {url_base})");
    }
    let dist = host::target_dir().join("dist");
    let mut binaries = Vec::new();
    for variant in VARIANTS {
        let data = host::read(cross::build_release(variant.target)?)?;
        let file = format!("executor-agent-{version}-{}", variant.target);
        host::write(dist.join(&file), &data)?;
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(dist.join(&file), mode)
            .with_context(|| format!("cannot make {} executable", dist.join(&file).display()))?;
        let sha512 = sha512_hex(&data);
        host::write(dist.join(format!("{file}.sha512")), format!("{sha512}  {file}\n"))?;
        binaries.push(Binary {
            target: variant.target.to_string(),
            url: format!("{url_base}/v{version}/{file}"),
            file,
            sha512,
            size: data.len() as u64,
        });
    }
    let new = Release { version, url_base, binaries };
    // The x86_64 source by hand-style text surgery; `cmd_ignition` writes the aarch64 one from it.
    let x86 = new.binary(X86_64.target)?;
    let source = host::read_string(butane_path())?;
    let updated = set_binary_source(&source, &x86.url, &format!("sha512-{}", x86.sha512))?;
    host::write(release_path(), new.render())?;
    host::write(butane_path(), updated)?;
    cmd_ignition(false)?;
    for b in &new.binaries {
        eprintln!(
            "dist: {} ({} bytes, sha512 {})\n      publish it at {}",
            dist.join(&b.file).display(),
            b.size,
            b.sha512,
            b.url
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed `.ign` is exactly what its `.bu` renders to, and the aarch64 `.bu` is what
    /// the x86_64 one gives (fails when one is stale).
    #[test]
    fn committed_ignition_matches_a_fresh_render() {
        for variant in VARIANTS {
            let fresh = render_production(&variant).expect("the Butane source renders");
            let committed = std::fs::read_to_string(variant.ign_path()).expect("the .ign is committed");
            assert!(fresh == committed, "{} is stale: run `cargo xtask ignition`", variant.ign);
        }
        let derived = derive_aarch64_source().unwrap();
        let committed = std::fs::read_to_string(AARCH64.butane_path()).expect("the aarch64 .bu is committed");
        assert!(derived == committed, "{} is stale: run `cargo xtask ignition`", AARCH64.butane);
    }

    /// The variants differ in the binary's URL and hash only, and each names its own target.
    #[test]
    fn variants_differ_only_in_the_binary() {
        let release = Release::load().unwrap();
        let mut rendered = Vec::new();
        for variant in VARIANTS {
            let mut json: serde_json::Value =
                serde_json::from_str(&render_production(&variant).unwrap()).unwrap();
            let files = json["storage"]["files"].as_array_mut().unwrap();
            let bin = files.iter_mut().find(|f| f["path"] == AGENT_PATH).unwrap();
            let binary = release.binary(variant.target).unwrap();
            assert_eq!(bin["contents"]["source"], binary.url.as_str());
            assert!(binary.url.ends_with(&format!("-{}", variant.target)), "{}", binary.url);
            assert_eq!(bin["contents"]["verification"]["hash"], format!("sha512-{}", binary.sha512).as_str());
            bin["contents"] = serde_json::Value::Null;
            rendered.push(json);
        }
        assert_eq!(rendered[0], rendered[1]);
        assert_ne!(
            release.binary(cross::X86_64).unwrap().sha512,
            release.binary(cross::AARCH64).unwrap().sha512
        );
    }

    /// The production config installs the binary, unit and config, and nothing under /usr but /usr/local.
    #[test]
    fn production_config_installs_binary_unit_and_config() {
        for variant in VARIANTS {
            production_variant_installs_binary_unit_and_config(&variant);
        }
    }

    fn production_variant_installs_binary_unit_and_config(variant: &Variant) {
        let json: serde_json::Value = serde_json::from_str(&render_production(variant).unwrap()).unwrap();
        assert_eq!(json["ignition"]["version"], "3.3.0");
        let files = json["storage"]["files"].as_array().unwrap();
        let bin = files.iter().find(|f| f["path"] == AGENT_PATH).unwrap();
        assert_eq!(bin["mode"], 0o755);
        assert!(bin["contents"]["source"].as_str().unwrap().starts_with("https://"));
        assert!(bin["contents"]["verification"]["hash"].as_str().unwrap().starts_with("sha512-"));
        assert!(files.iter().any(|f| f["path"] == CONFIG_PATH));
        for f in files {
            let p = f["path"].as_str().unwrap();
            assert!(!p.starts_with("/usr/") || p.starts_with("/usr/local/"), "{p} is under read-only /usr");
        }
        let unit = &json["systemd"]["units"][0];
        assert_eq!(unit["name"], UNIT_NAME);
        assert_eq!(unit["enabled"], true);
        assert_eq!(unit["contents"], std::fs::read_to_string(unit_path()).unwrap());
        // The boot gate is installed for operators to enable, not enabled.
        let gate = &json["systemd"]["units"][1];
        assert_eq!(gate["name"], "executor-agent-boot-gate.service");
        assert_eq!(gate["enabled"], false);
        // The health port's socket unit, enabled: systemd holds the port across agent restarts.
        let socket = &json["systemd"]["units"][2];
        assert_eq!(socket["name"], "executor-agent.socket");
        assert_eq!(socket["enabled"], true);
    }

    /// Every data URL in the committed config decodes to the file it was made from, and where
    /// Butane's rule picked gzip it did so by a wide margin, so Go's deflate (whose bytes differ
    /// from ours and between Go releases) makes the same choice.
    #[test]
    fn embedded_payloads_decode_and_the_gzip_choice_is_clear() {
        for variant in VARIANTS {
            embedded_payloads_decode(variant.ign_path());
        }
    }

    fn embedded_payloads_decode(ign: PathBuf) {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ign).unwrap()).unwrap();
        let file =
            json["storage"]["files"].as_array().unwrap().iter().find(|f| f["path"] == CONFIG_PATH).unwrap();
        let source = file["contents"]["source"].as_str().unwrap();
        let compression = file["contents"]["compression"].as_str().unwrap();
        let want = std::fs::read(config_toml_path()).unwrap();
        let got = match (source.strip_prefix("data:;base64,"), compression) {
            (Some(b64), c) => {
                let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
                if c == "gzip" {
                    crate::render::gzip::decompress(&raw).unwrap()
                } else {
                    raw
                }
            }
            (None, "") => {
                let escaped = source.strip_prefix("data:,").unwrap();
                let mut out = Vec::new();
                let mut bytes = escaped.bytes();
                while let Some(b) = bytes.next() {
                    if b == b'%' {
                        let hex: String =
                            [bytes.next().unwrap() as char, bytes.next().unwrap() as char].iter().collect();
                        out.push(u8::from_str_radix(&hex, 16).unwrap());
                    } else {
                        out.push(b);
                    }
                }
                out
            }
            other => panic!("unexpected encoding {other:?}"),
        };
        assert!(got == want, "the config.toml embedded in the .ign differs from ignition/config.toml: run `cargo xtask ignition`");
        let plain = (1 + butane::path_escape(&want).len()).min(8 + want.len().div_ceil(3) * 4);
        let gz = 8 + crate::render::gzip::compress(&want).len().div_ceil(3) * 4 + 4;
        let margin = (plain as f64 - gz as f64).abs() / plain as f64;
        assert!(
            margin > 0.05,
            "gzip ({gz}) vs plain ({plain}) is too close to call: Go's deflate might choose otherwise"
        );
    }

    #[test]
    fn release_file_round_trips() {
        let r = Release::load().unwrap();
        assert_eq!(toml::from_str::<Release>(&r.render()).unwrap(), r);
        assert_eq!(r.render(), std::fs::read_to_string(release_path()).unwrap());
        let targets: Vec<&str> = r.binaries.iter().map(|b| b.target.as_str()).collect();
        assert_eq!(targets, VARIANTS.map(|v| v.target));
        for b in &r.binaries {
            assert_eq!(b.file, format!("executor-agent-{}-{}", r.version, b.target));
            assert_eq!(b.url, format!("{}/v{}/{}", r.url_base, r.version, b.file));
            assert_eq!(b.sha512.len(), 128);
        }
    }

    #[test]
    fn dist_rewrites_only_the_binary_entry() {
        let src = "storage:\n  files:\n    - path: /usr/local/bin/executor-agent\n      contents:\n        source: https://a/old\n        verification:\n          hash: sha512-old\n    - path: /etc/x\n      contents:\n        source: https://keep\n";
        let out = set_binary_source(src, "https://a/new", "sha512-new").unwrap();
        assert!(out.contains("        source: https://a/new\n"));
        assert!(out.contains("          hash: sha512-new\n"));
        assert!(out.contains("source: https://keep"));
        assert!(set_binary_source("storage: {}\n", "u", "h").is_err());
    }

    #[test]
    fn unit_block_replacement_keeps_the_rest() {
        let src = "systemd:\n  units:\n    - name: a.service\n      enabled: true\n      contents: |\n        [Unit]\n\n        X=1\n\n    - name: b.service\n";
        let out = replace_block(src, "- name: a.service", "contents", "[Unit]\nY=2\n").unwrap();
        assert_eq!(out, "systemd:\n  units:\n    - name: a.service\n      enabled: true\n      contents: |\n        [Unit]\n        Y=2\n\n    - name: b.service\n");
        let out = replace_block(src, "- name: a.service", "contents", "[Unit]\nY=2").unwrap();
        assert!(out.contains("contents: |-\n        [Unit]\n        Y=2\n\n    - name"));
    }
}
