//! Configuration: TOML fragments merged in a documented order, then validated into [`Settings`].
//!
//! Files, lowest precedence first:
//! 1. built-in defaults (a node with no file works for user `core`);
//! 2. `/etc/executor-agent/config.toml`;
//! 3. drop-ins `*.toml` from `/usr/lib/executor-agent/config.d`, `/run/executor-agent/config.d`
//!    and `/etc/executor-agent/config.d`, applied in file-name order across the three
//!    directories. A drop-in in `/etc` hides a same-named one in `/run`, which hides one in
//!    `/usr/lib` (the systemd convention, as zincati does).
//!
//! A later file overrides only the keys it sets. Unknown keys and bad values are errors that
//! name the file, line and key; the agent then refuses to start.

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::paths::Root;

pub const MAIN_CONFIG: &str = "/etc/executor-agent/config.toml";
/// Drop-in directories, lowest precedence first for same-named files.
pub const DROP_IN_DIRS: [&str; 3] =
    ["/usr/lib/executor-agent/config.d", "/run/executor-agent/config.d", "/etc/executor-agent/config.d"];

/// Everything the agent needs to know, validated.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Settings {
    /// The user whose rootless Podman serves CI jobs.
    pub runner_user: String,
    /// Minimum number of subordinate UIDs and GIDs the runner user must own.
    pub subid_count: u32,
    /// How long to wait for the shadow-utils locks before giving up on a pass.
    #[serde(with = "humantime_serde_compat")]
    pub subid_lock_timeout: Duration,
    /// How long to wait for `user@UID.service` to become active after enabling linger.
    #[serde(with = "humantime_serde_compat")]
    pub user_manager_timeout: Duration,
    /// The Podman API socket unit in the runner user's manager.
    pub podman_socket_unit: String,
    /// Bound on one Podman API request (`/_ping`, `/version`).
    #[serde(with = "humantime_serde_compat")]
    pub podman_api_timeout: Duration,
    /// `net.ipv4.ip_unprivileged_port_start`, live and persisted.
    pub unprivileged_port_start: u16,
    /// Address of the health endpoint.
    pub listen: SocketAddr,
    /// Full re-check of every step even without events.
    #[serde(with = "humantime_serde_compat")]
    pub resync_interval: Duration,
    /// First and largest delay between repair attempts of a failing step.
    #[serde(with = "humantime_serde_compat")]
    pub repair_backoff_min: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub repair_backoff_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            runner_user: "core".into(),
            subid_count: 65536,
            subid_lock_timeout: Duration::from_secs(15),
            user_manager_timeout: Duration::from_secs(30),
            podman_socket_unit: "podman.socket".into(),
            podman_api_timeout: Duration::from_secs(5),
            unprivileged_port_start: 80,
            listen: SocketAddr::from(([0, 0, 0, 0], 9739)),
            resync_interval: Duration::from_secs(30),
            repair_backoff_min: Duration::from_secs(1),
            repair_backoff_max: Duration::from_secs(60),
        }
    }
}

/// One file's worth of settings: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fragment {
    #[serde(default)]
    runner: RunnerSection,
    #[serde(default)]
    subids: SubidsSection,
    #[serde(default)]
    linger: LingerSection,
    #[serde(default)]
    podman: PodmanSection,
    #[serde(default)]
    sysctl: SysctlSection,
    #[serde(default)]
    http: HttpSection,
    #[serde(default)]
    repair: RepairSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunnerSection {
    #[serde(default, deserialize_with = "user_name")]
    user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubidsSection {
    #[serde(default, deserialize_with = "id_count")]
    count: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    lock_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LingerSection {
    #[serde(default, deserialize_with = "duration")]
    user_manager_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodmanSection {
    #[serde(default, deserialize_with = "unit_name")]
    socket_unit: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    api_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SysctlSection {
    unprivileged_port_start: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    #[serde(default, deserialize_with = "socket_addr")]
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepairSection {
    #[serde(default, deserialize_with = "duration")]
    resync_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    backoff_min: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    backoff_max: Option<Duration>,
}

/// A configuration error, always naming where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {key}: {message}")]
    Invalid { file: PathBuf, line: usize, key: String, message: String },
    #[error("{file}: {key}: {message}")]
    Conflict { file: PathBuf, key: String, message: String },
}

/// The files that make up the configuration, in the order they are applied.
pub fn config_files(root: &Root, main: Option<&Path>) -> Result<Vec<PathBuf>, ConfigError> {
    let mut files = Vec::new();
    let main = main.map(Path::to_path_buf).unwrap_or_else(|| root.join(MAIN_CONFIG));
    if main.exists() {
        files.push(main);
    }
    // File name -> winning path; later directories replace earlier ones.
    let mut drop_ins: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
    for dir in DROP_IN_DIRS {
        let dir = root.join(dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ConfigError::Read { file: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| ConfigError::Read { file: dir.clone(), source })?;
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                drop_ins.insert(entry.file_name(), path);
            }
        }
    }
    files.extend(drop_ins.into_values());
    Ok(files)
}

/// Loads, merges and validates the configuration.
pub fn load(root: &Root, main: Option<&Path>) -> Result<Settings, ConfigError> {
    let files = config_files(root, main)?;
    let mut texts = Vec::with_capacity(files.len());
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        texts.push((file, text));
    }
    merge(texts.iter().map(|(f, t)| (f.as_path(), t.as_str())))
}

/// Applies fragments in order over the defaults; exposed for tests and fuzzing.
pub fn merge<'a>(fragments: impl IntoIterator<Item = (&'a Path, &'a str)>) -> Result<Settings, ConfigError> {
    let mut settings = Settings::default();
    let mut backoff_origin = None;
    for (file, text) in fragments {
        let fragment = parse_fragment(file, text)?;
        set(&mut settings.runner_user, fragment.runner.user);
        set(&mut settings.subid_count, fragment.subids.count);
        set(&mut settings.subid_lock_timeout, fragment.subids.lock_timeout);
        set(&mut settings.user_manager_timeout, fragment.linger.user_manager_timeout);
        set(&mut settings.podman_socket_unit, fragment.podman.socket_unit);
        set(&mut settings.podman_api_timeout, fragment.podman.api_timeout);
        set(&mut settings.unprivileged_port_start, fragment.sysctl.unprivileged_port_start);
        set(&mut settings.listen, fragment.http.listen);
        set(&mut settings.resync_interval, fragment.repair.resync_interval);
        if fragment.repair.backoff_min.is_some() || fragment.repair.backoff_max.is_some() {
            backoff_origin = Some(file.to_path_buf());
        }
        set(&mut settings.repair_backoff_min, fragment.repair.backoff_min);
        set(&mut settings.repair_backoff_max, fragment.repair.backoff_max);
    }
    if settings.repair_backoff_min > settings.repair_backoff_max {
        return Err(ConfigError::Conflict {
            file: backoff_origin.unwrap_or_else(|| PathBuf::from(MAIN_CONFIG)),
            key: "repair.backoff_min".into(),
            message: format!(
                "{} is larger than repair.backoff_max {}",
                humantime::format_duration(settings.repair_backoff_min),
                humantime::format_duration(settings.repair_backoff_max)
            ),
        });
    }
    Ok(settings)
}

/// A key set in a later file replaces the earlier value.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn parse_fragment(file: &Path, text: &str) -> Result<Fragment, ConfigError> {
    let invalid = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
        let line = span.map(|s| line_of(text, s.start)).unwrap_or(1);
        ConfigError::Invalid { file: file.to_path_buf(), line, key, message }
    };
    let deserializer = toml::de::Deserializer::parse(text)
        .map_err(|e| invalid(e.span(), "(syntax)".into(), e.message().trim().to_string()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = match e.path().to_string() {
            p if p == "." => "(top level)".to_string(),
            p => p,
        };
        let inner = e.into_inner();
        invalid(inner.span(), key, inner.message().trim().to_string())
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    let value = humantime::parse_duration(&text)
        .map_err(|e| D::Error::custom(format!("{text:?} is not a duration like \"15s\" or \"2m\": {e}")))?;
    if value.is_zero() {
        return Err(D::Error::custom("must be longer than 0s"));
    }
    Ok(Some(value))
}

fn id_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let value = i64::deserialize(d)?;
    // Podman needs at least 65536 for common images; fewer is allowed but never zero.
    match u32::try_from(value) {
        Ok(v) if v > 0 => Ok(Some(v)),
        _ => Err(D::Error::custom(format!("{value} is not a count between 1 and {}", u32::MAX))),
    }
}

fn user_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(d)?;
    // shadow-utils' default NAME_REGEX, with its 32-character limit.
    let valid_first = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let valid_rest =
        name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid_first || !valid_rest || name.len() > 32 {
        return Err(D::Error::custom(format!(
            "{name:?} is not a valid user name (lower-case letters, digits, '_' and '-', starting with a letter or '_', at most 32)"
        )));
    }
    Ok(Some(name))
}

fn unit_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(d)?;
    let valid = name.ends_with(".socket")
        && name.len() > ".socket".len()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
    if !valid {
        return Err(D::Error::custom(format!("{name:?} is not a socket unit name like \"podman.socket\"")));
    }
    Ok(Some(name))
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(|_| {
        D::Error::custom(format!("{text:?} is not an address like \"0.0.0.0:9739\" or \"[::1]:9739\""))
    })
}

/// Serialises durations the way they are written in the config ("15s").
mod humantime_serde_compat {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = toml::to_string(&crate::config::SettingsView::from(self)).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// The effective configuration in the same shape as the file, for `executor-agent config`.
#[derive(serde::Serialize)]
pub struct SettingsView {
    runner: BTreeMap<&'static str, String>,
    subids: BTreeMap<&'static str, toml::Value>,
    linger: BTreeMap<&'static str, String>,
    podman: BTreeMap<&'static str, String>,
    sysctl: BTreeMap<&'static str, i64>,
    http: BTreeMap<&'static str, String>,
    repair: BTreeMap<&'static str, String>,
}

impl From<&Settings> for SettingsView {
    fn from(s: &Settings) -> Self {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        SettingsView {
            runner: [("user", s.runner_user.clone())].into(),
            subids: [
                ("count", toml::Value::Integer(s.subid_count.into())),
                ("lock_timeout", toml::Value::String(d(s.subid_lock_timeout))),
            ]
            .into(),
            linger: [("user_manager_timeout", d(s.user_manager_timeout))].into(),
            podman: [("socket_unit", s.podman_socket_unit.clone()), ("api_timeout", d(s.podman_api_timeout))]
                .into(),
            sysctl: [("unprivileged_port_start", s.unprivileged_port_start.into())].into(),
            http: [("listen", s.listen.to_string())].into(),
            repair: [
                ("resync_interval", d(s.resync_interval)),
                ("backoff_min", d(s.repair_backoff_min)),
                ("backoff_max", d(s.repair_backoff_max)),
            ]
            .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(fragments: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        merge(fragments.iter().map(|(f, t)| (Path::new(*f), *t)))
    }

    #[test]
    fn no_file_means_documented_defaults() {
        let s = merged(&[]).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.runner_user, "core");
        assert_eq!(s.subid_count, 65536);
        assert_eq!(s.listen.to_string(), "0.0.0.0:9739");
        assert_eq!(s.unprivileged_port_start, 80);
    }

    #[test]
    fn later_fragments_override_only_the_keys_they_set() {
        let s = merged(&[
            ("/etc/executor-agent/config.toml", "[runner]\nuser = \"ci\"\n[subids]\ncount = 70000\n"),
            ("/etc/executor-agent/config.d/50-count.toml", "[subids]\ncount = 131072\n"),
        ])
        .unwrap();
        assert_eq!(s.runner_user, "ci");
        assert_eq!(s.subid_count, 131072);
        assert_eq!(s.subid_lock_timeout, Duration::from_secs(15));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = merged(&[("/etc/x.toml", "[runner]\nuser = \"core\"\nusr = \"x\"\n")]).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/etc/x.toml:3: runner"), "{text}");
        assert!(text.contains("unknown field `usr`"), "{text}");
    }

    #[test]
    fn unknown_section_is_rejected() {
        let err = merged(&[("/etc/x.toml", "\n[runnr]\nuser = \"core\"\n")]).unwrap_err();
        assert!(err.to_string().contains("unknown field `runnr`"), "{err}");
        assert!(err.to_string().starts_with("/etc/x.toml:2:"), "{err}");
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        let cases = [
            ("[subids]\ncount = 0\n", "subids.count", 2),
            ("[subids]\ncount = -5\n", "subids.count", 2),
            ("[subids]\ncount = \"many\"\n", "subids.count", 2),
            ("[subids]\nlock_timeout = \"soon\"\n", "subids.lock_timeout", 2),
            ("[subids]\nlock_timeout = \"0s\"\n", "subids.lock_timeout", 2),
            ("[runner]\nuser = \"Root User\"\n", "runner.user", 2),
            ("[sysctl]\nunprivileged_port_start = 70000\n", "sysctl.unprivileged_port_start", 2),
            ("\n[http]\nlisten = \"localhost\"\n", "http.listen", 3),
            ("[podman]\nsocket_unit = \"podman.service\"\n", "podman.socket_unit", 2),
        ];
        for (text, key, line) in cases {
            let err = merged(&[("/etc/executor-agent/config.d/10-bad.toml", text)]).unwrap_err();
            let msg = err.to_string();
            let prefix = format!("/etc/executor-agent/config.d/10-bad.toml:{line}: {key}: ");
            assert!(msg.starts_with(&prefix), "{text:?} gave {msg:?}, wanted prefix {prefix:?}");
        }
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = merged(&[("/etc/x.toml", "[runner]\nuser = \"core\n")]).unwrap_err();
        assert!(err.to_string().starts_with("/etc/x.toml:2: (syntax)"), "{err}");
    }

    #[test]
    fn inconsistent_backoff_is_rejected() {
        let err = merged(&[("/etc/y.toml", "[repair]\nbackoff_min = \"2m\"\n")]).unwrap_err();
        assert!(err.to_string().starts_with("/etc/y.toml: repair.backoff_min"), "{err}");
    }

    #[test]
    fn drop_ins_are_ordered_by_name_and_etc_hides_usr_lib() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let write = |p: &str, text: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write(MAIN_CONFIG, "[subids]\ncount = 1\n[runner]\nuser = \"main\"\n");
        write("/usr/lib/executor-agent/config.d/10-vendor.toml", "[subids]\ncount = 2\n");
        write("/usr/lib/executor-agent/config.d/20-hidden.toml", "[runner]\nuser = \"hidden\"\n");
        write("/etc/executor-agent/config.d/20-hidden.toml", "[http]\nlisten = \"127.0.0.1:1\"\n");
        write("/run/executor-agent/config.d/30-runtime.toml", "[subids]\ncount = 3\n");
        write("/etc/executor-agent/config.d/README", "not toml, ignored");

        let files = config_files(&root, None).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.strip_prefix(dir.path()).unwrap().to_path_buf()).collect();
        assert_eq!(
            names,
            [
                "etc/executor-agent/config.toml",
                "usr/lib/executor-agent/config.d/10-vendor.toml",
                "etc/executor-agent/config.d/20-hidden.toml",
                "run/executor-agent/config.d/30-runtime.toml",
            ]
            .map(PathBuf::from)
        );
        let s = load(&root, None).unwrap();
        assert_eq!(s.subid_count, 3);
        assert_eq!(s.runner_user, "main");
        assert_eq!(s.listen.to_string(), "127.0.0.1:1");
    }

    #[test]
    fn shipped_config_file_documents_every_key_at_its_default() {
        let text = include_str!("../ignition/config.toml");
        assert_eq!(merged(&[("ignition/config.toml", text)]).unwrap(), Settings::default());
        let shipped: toml::Table = text.parse().unwrap();
        let known: toml::Table = Settings::default().to_string().parse().unwrap();
        for (section, keys) in &known {
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    shipped.get(section).and_then(|s| s.get(key)).is_some(),
                    "ignition/config.toml lacks {section}.{key}"
                );
            }
        }
    }

    #[test]
    fn effective_config_round_trips() {
        let s = Settings::default();
        let text = s.to_string();
        let back = merged(&[("/x.toml", &text)]).unwrap();
        assert_eq!(back, s);
    }
}
