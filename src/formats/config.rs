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
//! A later file overrides only the keys it sets. Each file is validated on its own, so an
//! unknown key or a bad value is an error naming that file, the line and the key; the agent
//! then refuses to start.

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize};
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

/// Everything the agent needs to know, validated. The shape is the file's shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub runner: Runner,
    pub subids: Subids,
    pub linger: Linger,
    pub podman: Podman,
    pub sysctl: Sysctl,
    pub http: Http,
    pub repair: Repair,
    /// Per-check policy: `[checks.NAME]` with `required`, `failures_before_critical`,
    /// `successes_before_passing`. Checks not named keep their defaults.
    /// Names are checked against the steps' checks when loading (`merge`'s `known_checks`).
    pub checks: BTreeMap<String, CheckPolicyOverride>,
    pub storage: Storage,
    pub cgroups: Cgroups,
    pub canary: Canary,
    pub podman_config: PodmanConfig,
    pub control: Control,
    pub runner_privileges: RunnerPrivileges,
    pub spot: Spot,
    pub fleet_lock: FleetLock,
    pub drain: DrainPolicy,
    pub self_eviction: SelfEviction,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Runner {
    /// The user whose rootless Podman serves CI jobs.
    #[serde(deserialize_with = "user_name")]
    pub user: String,
}

impl Default for Runner {
    fn default() -> Self {
        Runner { user: "core".into() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Subids {
    /// Minimum number of subordinate UIDs and GIDs the runner user must own.
    #[serde(deserialize_with = "id_count")]
    pub count: u32,
    /// How long to wait for the shadow-utils locks.
    #[serde(with = "duration")]
    pub lock_timeout: Duration,
}

impl Default for Subids {
    fn default() -> Self {
        Subids { count: 65536, lock_timeout: Duration::from_secs(15) }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Linger {
    /// How long to wait for `user@UID.service` and for jobs in the user's manager.
    #[serde(with = "duration")]
    pub user_manager_timeout: Duration,
}

impl Default for Linger {
    fn default() -> Self {
        Linger { user_manager_timeout: Duration::from_secs(30) }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Podman {
    /// The Podman API socket unit in the runner user's manager.
    #[serde(deserialize_with = "unit_name")]
    pub socket_unit: String,
    /// Bound on one Podman API request.
    #[serde(with = "duration")]
    pub api_timeout: Duration,
}

impl Default for Podman {
    fn default() -> Self {
        Podman { socket_unit: "podman.socket".into(), api_timeout: Duration::from_secs(5) }
    }
}

impl Podman {
    /// The service the socket starts (systemd's default `Service=`: the socket's name).
    pub fn api_service_unit(&self) -> String {
        let stem = self.socket_unit.strip_suffix(".socket").unwrap_or(&self.socket_unit);
        format!("{stem}.service")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sysctl {
    /// `net.ipv4.ip_unprivileged_port_start`, live and persisted.
    pub unprivileged_port_start: u16,
}

impl Default for Sysctl {
    fn default() -> Self {
        Sysctl { unprivileged_port_start: 80 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    /// Address of the read-only health endpoint.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
}

impl Default for Http {
    fn default() -> Self {
        Http { listen: SocketAddr::from(([0, 0, 0, 0], 9739)) }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Repair {
    /// Full re-check of every step even without events.
    #[serde(with = "duration")]
    pub resync_interval: Duration,
    /// First and largest delay between repair attempts of a failing step.
    #[serde(with = "duration")]
    pub backoff_min: Duration,
    #[serde(with = "duration")]
    pub backoff_max: Duration,
}

impl Default for Repair {
    fn default() -> Self {
        Repair {
            resync_interval: Duration::from_secs(30),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Thresholds for the runner user's Podman storage (kubelet's defaults as a model).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// Not ready when the storage file system is this full (percent of blocks).
    #[serde(deserialize_with = "percent")]
    pub not_ready_percent: u8,
    /// Not ready when this share of inodes is used.
    #[serde(deserialize_with = "percent")]
    pub inodes_not_ready_percent: u8,
    /// Unused images are removed, oldest first, from this use...
    #[serde(deserialize_with = "percent")]
    pub gc_high_percent: u8,
    /// ...down to this one.
    #[serde(deserialize_with = "percent")]
    pub gc_low_percent: u8,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            not_ready_percent: 90,
            inodes_not_ready_percent: 95,
            gc_high_percent: 85,
            gc_low_percent: 80,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cgroups {
    /// Write a drop-in delegating `cpu memory pids` to `user@.service` when missing.
    pub fix_delegation: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Canary {
    /// Run the job canary (required by default: a node is ready only when a round passed).
    pub enabled: bool,
    /// A passing node runs a round at least this often.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Bound on one round (cleanup has its own 20 s after it).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Never two rounds closer than this: requests and failures wait for it, then back off
    /// doubling up to `interval`.
    #[serde(with = "duration")]
    pub min_gap: Duration,
}

impl Default for Canary {
    fn default() -> Self {
        Canary {
            enabled: true,
            interval: Duration::from_secs(300),
            timeout: Duration::from_secs(30),
            min_gap: Duration::from_secs(15),
        }
    }
}

/// The runner user's own Podman configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodmanConfig {
    /// Manage `~/.config/containers/{storage.conf,containers.conf}` of the runner user.
    pub manage: bool,
    /// `[storage] driver`: native rootless overlay rather than the slow vfs.
    #[serde(deserialize_with = "storage_driver")]
    pub storage_driver: String,
    /// `[network] default_rootless_network_cmd` ("pasta" or "slirp4netns"); empty: Podman's.
    #[serde(deserialize_with = "network_cmd")]
    pub network_cmd: String,
    /// Registry host -> credential helper (`ecr-login` runs `docker-credential-ecr-login`).
    #[serde(deserialize_with = "cred_helpers")]
    pub cred_helpers: BTreeMap<String, String>,
    /// Link /var/run/docker.sock to the user's Podman socket for tools that hard-code it.
    pub docker_socket_link: bool,
    /// `[engine] service_timeout = 0`: the API service, once started, stays up instead of
    /// exiting after 5 s idle, so a job's first request and the agent's probes meet a warm
    /// service rather than starting one each time.
    pub keep_api_service: bool,
}

impl Default for PodmanConfig {
    fn default() -> Self {
        PodmanConfig {
            manage: true,
            storage_driver: "overlay".into(),
            network_cmd: String::new(),
            cred_helpers: BTreeMap::new(),
            docker_socket_link: false,
            keep_api_service: true,
        }
    }
}

/// EC2 Spot interruptions: watched only on AWS (Afterburn's `AWS_INSTANCE_ID` present).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Spot {
    /// Watch IMDSv2 and drain on an interruption notice.
    pub enabled: bool,
    /// Drain on a rebalance recommendation too (an elevated risk of interruption), which
    /// usually comes minutes before the two-minute interruption notice.
    pub drain_on_rebalance: bool,
    /// How often IMDS is asked (two requests a round; failures back off up to a minute).
    #[serde(serialize_with = "duration::serialize", deserialize_with = "at_least_a_second")]
    pub poll_interval: Duration,
    /// The instance metadata service (link-local on EC2).
    pub imds_address: SocketAddr,
}

impl Default for Spot {
    fn default() -> Self {
        Spot {
            enabled: true,
            drain_on_rebalance: true,
            poll_interval: Duration::from_secs(5),
            imds_address: SocketAddr::from(([169, 254, 169, 254], 80)),
        }
    }
}

/// What a drain does besides failing readiness.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainPolicy {
    /// While drained, refuse new logins of every user but root with /etc/nologin (as
    /// `shutdown` does): the runner's SSH connections, and so its acquire heartbeat, fail.
    pub refuse_logins: bool,
}

impl Default for DrainPolicy {
    fn default() -> Self {
        DrainPolicy { refuse_logins: true }
    }
}

/// Opt-in: a node that stays not ready with nothing running ends itself, so the autoscaler
/// replaces it ("instance unexpectedly removed") instead of sending it jobs that fail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelfEviction {
    pub enabled: bool,
    /// How long the node must stay not ready, with no job running and no drain, before it acts
    /// (announced in the journal and metrics when the wait starts).
    #[serde(serialize_with = "duration::serialize", deserialize_with = "at_least_ten_seconds")]
    pub after: Duration,
    /// What it does: empty powers the node off through systemd (`poweroff.target`), otherwise
    /// this command (an absolute path, then its arguments), e.g. one that marks the instance
    /// unhealthy in its auto scaling group.
    #[serde(deserialize_with = "command")]
    pub command: Vec<String>,
}

impl Default for SelfEviction {
    fn default() -> Self {
        SelfEviction { enabled: false, after: Duration::from_secs(30 * 60), command: Vec::new() }
    }
}

fn at_least_ten_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let after = duration::deserialize(d)?;
    if after < Duration::from_secs(10) {
        return Err(D::Error::custom(format!(
            "{} is too short: at least 10s",
            humantime::format_duration(after)
        )));
    }
    Ok(after)
}

/// A command line: empty, or an absolute program path followed by its arguments.
fn command<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let argv = Vec::<String>::deserialize(d)?;
    if let Some(program) = argv.first() {
        if !program.starts_with('/') {
            return Err(D::Error::custom(format!("{program:?} is not an absolute path")));
        }
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(D::Error::custom("an argument contains NUL"));
    }
    Ok(argv)
}

/// zincati's FleetLock protocol, served for this node's own zincati.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetLock {
    pub enabled: bool,
    /// A loopback address: only this node's zincati (as root) may take the lock.
    #[serde(deserialize_with = "loopback")]
    pub listen: SocketAddr,
}

impl Default for FleetLock {
    fn default() -> Self {
        FleetLock { enabled: true, listen: SocketAddr::from(([127, 0, 0, 1], 9740)) }
    }
}

fn loopback<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let addr = SocketAddr::deserialize(d)?;
    if !addr.ip().is_loopback() {
        return Err(D::Error::custom(format!("{addr} is not a loopback address (127.0.0.1 or ::1)")));
    }
    Ok(addr)
}

/// A poll interval: a second or more, so IMDS is never hammered.
fn at_least_a_second<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let interval = duration::deserialize(d)?;
    if interval < Duration::from_secs(1) {
        return Err(D::Error::custom(format!(
            "{} is too short: at least 1s",
            humantime::format_duration(interval)
        )));
    }
    Ok(interval)
}

/// The runner user's paths to root (the `runner-privileges` check).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerPrivileges {
    /// Mask (and stop) the rootful `docker.socket` and `docker.service` FCOS enables. Off by
    /// default: masking breaks anyone who uses rootful Docker on purpose.
    pub mask_docker: bool,
}

/// Where controls that change the node (drain) are accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Control {
    /// Root-only Unix socket for `executor-agent drain` / `undrain`.
    pub socket: PathBuf,
    /// A root-only file holding a bearer token that allows `POST /drain` and `POST /undrain`
    /// on the HTTP endpoint; empty: no control over HTTP.
    pub token_file: PathBuf,
}

impl Default for Control {
    fn default() -> Self {
        Control { socket: PathBuf::from("/run/executor-agent/control.sock"), token_file: PathBuf::new() }
    }
}

/// How a check affects readiness, and how many observations it takes to flip it (like
/// Consul's `failures_before_critical` and `success_before_passing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckPolicy {
    pub required: bool,
    pub failures_before_critical: u32,
    pub successes_before_passing: u32,
}

/// `[checks.NAME]` as written: every key optional, the rest from the check's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckPolicyOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "at_least_one")]
    pub failures_before_critical: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "at_least_one")]
    pub successes_before_passing: Option<u32>,
}

impl CheckPolicyOverride {
    pub fn apply(&self, mut policy: CheckPolicy) -> CheckPolicy {
        if let Some(v) = self.required {
            policy.required = v;
        }
        if let Some(v) = self.failures_before_critical {
            policy.failures_before_critical = v;
        }
        if let Some(v) = self.successes_before_passing {
            policy.successes_before_passing = v;
        }
        policy
    }
}

fn at_least_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = i64::deserialize(d)?;
    match u32::try_from(v) {
        Ok(v) if v >= 1 => Ok(Some(v)),
        _ => Err(serde::de::Error::custom(format!("{v} is not a count of 1 or more"))),
    }
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
    /// A value that parses but does not fit this node (a user that does not exist).
    #[error("{key}: {message}")]
    NotOnThisNode { key: String, message: String },
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
/// `known_checks`: the names `[checks.NAME]` may use (`steps::check_names()`); the steps own
/// them, and the configuration does not depend on the steps.
pub fn load(root: &Root, main: Option<&Path>, known_checks: &[&str]) -> Result<Settings, ConfigError> {
    let files = config_files(root, main)?;
    let mut texts = Vec::with_capacity(files.len());
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        texts.push((file, text));
    }
    merge(texts.iter().map(|(f, t)| (f.as_path(), t.as_str())), known_checks)
}

/// Applies fragments in order over the defaults; exposed for tests and fuzzing.
pub fn merge<'a>(
    fragments: impl IntoIterator<Item = (&'a Path, &'a str)>,
    known_checks: &[&str],
) -> Result<Settings, ConfigError> {
    let mut merged = toml::Table::new();
    // "section.key" -> the file that set it last, to name it in cross-key errors.
    let mut origin: BTreeMap<String, (usize, PathBuf)> = BTreeMap::new();
    for (index, (file, text)) in fragments.into_iter().enumerate() {
        // Validating each file alone is what lets an error name the file and line.
        parse_fragment(file, text, known_checks)?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Invalid {
            file: file.to_path_buf(),
            line: 1,
            key: "(syntax)".into(),
            message: e.message().to_string(),
        })?;
        deep_merge(&mut merged, table, "", (index, file), &mut origin);
    }
    let settings: Settings =
        Settings::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Conflict {
            file: PathBuf::from(MAIN_CONFIG),
            key: "(merged)".into(),
            message: e.to_string(),
        })?;
    validate_across_keys(&settings, &origin)?;
    Ok(settings)
}

/// `origin` records, for each key, the index and path of the last file that set it.
fn deep_merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    file: (usize, &Path),
    origin: &mut BTreeMap<String, (usize, PathBuf)>,
) {
    for (key, value) in from {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => {
                deep_merge(existing, new, &path, file, origin)
            }
            (_, value) => {
                if let toml::Value::Table(t) = &value {
                    for k in t.keys() {
                        origin.insert(format!("{path}.{k}"), (file.0, file.1.to_path_buf()));
                    }
                }
                origin.insert(path, (file.0, file.1.to_path_buf()));
                into.insert(key, value);
            }
        }
    }
}

/// Rules between keys, checked on the merged result; the error names the last file that
/// set one of the keys involved.
fn validate_across_keys(
    s: &Settings,
    origin: &BTreeMap<String, (usize, PathBuf)>,
) -> Result<(), ConfigError> {
    let conflict = |keys: &[&str], key: &str, message: String| {
        // The file applied last among those that set one of the keys.
        let file = keys.iter().filter_map(|k| origin.get(*k)).max_by_key(|(i, _)| *i).map(|(_, f)| f.clone());
        Err(ConfigError::Conflict {
            file: file.unwrap_or_else(|| PathBuf::from(MAIN_CONFIG)),
            key: key.into(),
            message,
        })
    };
    if s.repair.backoff_min > s.repair.backoff_max {
        return conflict(
            &["repair.backoff_min", "repair.backoff_max"],
            "repair.backoff_min",
            format!(
                "{} is larger than repair.backoff_max {}",
                humantime::format_duration(s.repair.backoff_min),
                humantime::format_duration(s.repair.backoff_max)
            ),
        );
    }
    let c = &s.canary;
    if c.min_gap.is_zero() || c.min_gap > c.interval || c.timeout.is_zero() {
        return conflict(
            &["canary.min_gap", "canary.interval", "canary.timeout"],
            "canary",
            format!(
                "need 0 < min_gap <= interval and timeout > 0, got min_gap {} / interval {} / timeout {}",
                humantime::format_duration(c.min_gap),
                humantime::format_duration(c.interval),
                humantime::format_duration(c.timeout)
            ),
        );
    }
    let st = &s.storage;
    if !(st.gc_low_percent < st.gc_high_percent && st.gc_high_percent <= st.not_ready_percent) {
        return conflict(
            &["storage.gc_low_percent", "storage.gc_high_percent", "storage.not_ready_percent"],
            "storage",
            format!(
                "need gc_low_percent < gc_high_percent <= not_ready_percent, got {} / {} / {}",
                st.gc_low_percent, st.gc_high_percent, st.not_ready_percent
            ),
        );
    }
    Ok(())
}

fn parse_fragment(file: &Path, text: &str, known_checks: &[&str]) -> Result<Settings, ConfigError> {
    let invalid = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
        let line = span.map(|s| line_of(text, s.start)).unwrap_or(1);
        ConfigError::Invalid { file: file.to_path_buf(), line, key, message }
    };
    let deserializer = toml::de::Deserializer::parse(text)
        .map_err(|e| invalid(e.span(), "(syntax)".into(), e.message().trim().to_string()))?;
    let fragment: Settings = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = match e.path().to_string() {
            p if p == "." => "(top level)".to_string(),
            p => p,
        };
        let inner = e.into_inner();
        invalid(inner.span(), key, inner.message().trim().to_string())
    })?;
    if let Some(unknown) = fragment.checks.keys().find(|k| !known_checks.contains(&k.as_str())) {
        return Err(invalid(
            check_key_span(text, unknown),
            format!("checks.{unknown}"),
            format!("no check is called {unknown:?}; checks are {}", known_checks.join(", ")),
        ));
    }
    Ok(fragment)
}

/// Where `[checks.NAME]` (or `checks.NAME = ...`, or `NAME` under `[checks]`) names `name`.
fn check_key_span(text: &str, name: &str) -> Option<std::ops::Range<usize>> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let checks = doc.as_table().get("checks")?.as_table_like()?;
    let (key, _) = checks.get_key_value(name)?;
    key.span()
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Durations written like "15s" or "2m", never zero.
mod duration {
    use super::*;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        let value = humantime::parse_duration(&text).map_err(|e| {
            D::Error::custom(format!("{text:?} is not a duration like \"15s\" or \"2m\": {e}"))
        })?;
        if value.is_zero() {
            return Err(D::Error::custom("must be longer than 0s"));
        }
        Ok(value)
    }
}

fn id_count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let value = i64::deserialize(d)?;
    match u32::try_from(value) {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(D::Error::custom(format!("{value} is not a count between 1 and {}", u32::MAX))),
    }
}

fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let value = i64::deserialize(d)?;
    match u8::try_from(value) {
        Ok(v) if (1..=100).contains(&v) => Ok(v),
        _ => Err(D::Error::custom(format!("{value} is not a percentage between 1 and 100"))),
    }
}

fn user_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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
    Ok(name)
}

fn unit_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let valid = name.ends_with(".socket")
        && name.len() > ".socket".len()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
    if !valid {
        return Err(D::Error::custom(format!("{name:?} is not a socket unit name like \"podman.socket\"")));
    }
    Ok(name)
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        D::Error::custom(format!("{text:?} is not an address like \"0.0.0.0:9739\" or \"[::1]:9739\""))
    })
}

fn storage_driver<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let driver = String::deserialize(d)?;
    match driver.as_str() {
        "overlay" | "vfs" | "btrfs" | "zfs" => Ok(driver),
        _ => Err(D::Error::custom(format!("{driver:?} is not a storage driver (overlay, vfs, btrfs, zfs)"))),
    }
}

fn network_cmd<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let cmd = String::deserialize(d)?;
    match cmd.as_str() {
        "" | "pasta" | "slirp4netns" => Ok(cmd),
        _ => Err(D::Error::custom(format!(
            "{cmd:?} is not a rootless network command (pasta, slirp4netns, or \"\")"
        ))),
    }
}

fn cred_helpers<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    use crate::podman_conf::{valid_helper_name, valid_registry};
    let map = BTreeMap::<String, String>::deserialize(d)?;
    for (registry, helper) in &map {
        if !valid_registry(registry) {
            return Err(D::Error::custom(format!("{registry:?} is not a registry host name")));
        }
        if !valid_helper_name(helper) {
            return Err(D::Error::custom(format!(
                "{helper:?} is not a credential helper name (docker-credential-NAME must be a plain file name)"
            )));
        }
    }
    Ok(map)
}

impl fmt::Display for Settings {
    /// The effective configuration, in the file's format (`executor-agent config`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&toml::to_string(self).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(fragments: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        merge(fragments.iter().map(|(f, t)| (Path::new(*f), *t)), &crate::steps::check_names())
    }

    #[test]
    fn no_file_means_documented_defaults() {
        let s = merged(&[]).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.runner.user, "core");
        assert_eq!(s.subids.count, 65536);
        assert_eq!(s.http.listen.to_string(), "0.0.0.0:9739");
        assert_eq!(s.sysctl.unprivileged_port_start, 80);
        assert!(crate::checks::configured_policy(&s, "podman-api").required);
        assert!(!crate::checks::configured_policy(&s, "docker-cli").required);
    }

    #[test]
    fn later_fragments_override_only_the_keys_they_set() {
        let s = merged(&[
            ("/etc/executor-agent/config.toml", "[runner]\nuser = \"ci\"\n[subids]\ncount = 70000\n"),
            ("/etc/executor-agent/config.d/50-count.toml", "[subids]\ncount = 131072\n"),
            ("/etc/executor-agent/config.d/60-checks.toml", "[checks.docker-cli]\nrequired = true\n"),
            (
                "/etc/executor-agent/config.d/70-helpers.toml",
                "[podman_config.cred_helpers]\n\"1.dkr.ecr.eu-west-1.amazonaws.com\" = \"ecr-login\"\n",
            ),
        ])
        .unwrap();
        assert_eq!(s.runner.user, "ci");
        assert_eq!(s.subids.count, 131072);
        assert_eq!(s.subids.lock_timeout, Duration::from_secs(15));
        assert!(crate::checks::configured_policy(&s, "docker-cli").required);
        assert_eq!(crate::checks::configured_policy(&s, "docker-cli").failures_before_critical, 1);
        assert_eq!(s.podman_config.cred_helpers["1.dkr.ecr.eu-west-1.amazonaws.com"], "ecr-login");
        assert!(s.podman_config.manage);
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
            ("[storage]\ngc_high_percent = 101\n", "storage.gc_high_percent", 2),
            ("[checks.nonsense]\nrequired = true\n", "checks.nonsense", 1),
            ("\n[checks]\ncanary = { required = false }\nnonsense = {}\n", "checks.nonsense", 4),
            ("[checks.docker-cli]\nrequired = \"yes\"\n", "checks.docker-cli.required", 2),
            (
                "[checks.docker-cli]\nfailures_before_critical = 0\n",
                "checks.docker-cli.failures_before_critical",
                2,
            ),
            ("[cgroups]\nfix_delegation = 1\n", "cgroups.fix_delegation", 2),
            ("[spot]\npoll_interval = \"100ms\"\n", "spot.poll_interval", 2),
            ("[spot]\nimds_address = \"imds\"\n", "spot.imds_address", 2),
            ("[fleet_lock]\nlisten = \"0.0.0.0:9740\"\n", "fleet_lock.listen", 2),
            ("[self_eviction]\nafter = \"5s\"\n", "self_eviction.after", 2),
            ("[self_eviction]\ncommand = [\"poweroff\"]\n", "self_eviction.command", 2),
            ("[drain]\nrefuse_logins = \"no\"\n", "drain.refuse_logins", 2),
            ("[runner_privileges]\nmask_docker = \"yes\"\n", "runner_privileges.mask_docker", 2),
            ("[podman_config]\nstorage_driver = \"aufs\"\n", "podman_config.storage_driver", 2),
            ("[podman_config]\nnetwork_cmd = \"bridge\"\n", "podman_config.network_cmd", 2),
            (
                "[podman_config.cred_helpers]\n\"r.example\" = \"../../bin/sh\"\n",
                "podman_config.cred_helpers",
                1,
            ),
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
    fn rules_across_keys_name_the_file_that_broke_them() {
        let err = merged(&[
            ("/etc/executor-agent/config.toml", "[repair]\nbackoff_min = \"1s\"\nbackoff_max = \"1m\"\n"),
            ("/etc/y.toml", "[repair]\nbackoff_min = \"2m\"\n"),
        ])
        .unwrap_err();
        assert!(err.to_string().starts_with("/etc/y.toml: repair.backoff_min"), "{err}");
        let err = merged(&[
            ("/etc/a.toml", "[storage]\ngc_low_percent = 50\n"),
            ("/etc/b.toml", "[storage]\ngc_high_percent = 40\n"),
        ])
        .unwrap_err();
        assert!(err.to_string().starts_with("/etc/b.toml: storage: need gc_low_percent"), "{err}");
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
        let s = load(&root, None, &crate::steps::check_names()).unwrap();
        assert_eq!(s.subids.count, 3);
        assert_eq!(s.runner.user, "main");
        assert_eq!(s.http.listen.to_string(), "127.0.0.1:1");
    }

    #[test]
    fn shipped_config_file_documents_every_key_at_its_default() {
        let text = include_str!("../../ignition/config.toml");
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
        let mut s = Settings::default();
        s.checks.insert("canary".into(), CheckPolicyOverride { required: Some(true), ..Default::default() });
        s.podman_config.cred_helpers.insert("registry.example".into(), "ecr-login".into());
        let text = s.to_string();
        let back = merged(&[("/x.toml", &text)]).unwrap();
        assert_eq!(back, s);
    }
}
