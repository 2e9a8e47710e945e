//! Podman's configuration files as text: edits of `storage.conf` and `containers.conf` that
//! change only the keys the agent owns (every other key, comment and the layout stay), the
//! credential-helper merge of `auth.json`, the names those accept, and the storage-driver
//! decision. No I/O: the podman-config step reads and writes; `config` validates with these.

use std::collections::BTreeMap;
use std::path::Path;

/// `/var/run` is a link to `/run`; systemd-tmpfiles wants the real path.
pub const DOCKER_SOCK: &str = "/run/docker.sock";

/// One key we own in a TOML file: `[table] key = value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub table: &'static str,
    pub key: &'static str,
    pub value: Scalar,
}

/// The value of a key we own: Podman reads strings and integers, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scalar {
    Str(String),
    Int(i64),
}

impl Scalar {
    pub(crate) fn matches(&self, value: &toml_edit::Value) -> bool {
        match self {
            Scalar::Str(s) => value.as_str() == Some(s.as_str()),
            Scalar::Int(n) => value.as_integer() == Some(*n),
        }
    }

    /// As written in the file (strings quoted), for the journal's "set ... = ...".
    fn repr(&self) -> String {
        match self {
            Scalar::Str(s) => format!("{s:?}"),
            Scalar::Int(n) => n.to_string(),
        }
    }

    fn to_toml(&self) -> toml_edit::Value {
        match self {
            Scalar::Str(s) => s.as_str().into(),
            Scalar::Int(n) => (*n).into(),
        }
    }
}

impl From<&str> for Scalar {
    fn from(s: &str) -> Self {
        Scalar::Str(s.to_string())
    }
}

impl From<String> for Scalar {
    fn from(s: String) -> Self {
        Scalar::Str(s)
    }
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Str(s) => f.write_str(s),
            Scalar::Int(n) => write!(f, "{n}"),
        }
    }
}

/// A key whose value changes, both as written in the file (strings quoted); `from` is `None`
/// when it was not set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub what: String,
    pub from: Option<String>,
    pub to: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.from {
            None => write!(f, "{} = {}", self.what, self.to),
            Some(from) => write!(f, "{} = {} (was {from})", self.what, self.to),
        }
    }
}

/// A parse error as "line L, column C: message", without quoting the file (which is the
/// user's, and shown on the health endpoint).
pub fn toml_error(text: &str, e: &toml_edit::TomlError) -> String {
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            format!("line {line}, column {column}: {}", e.message().trim())
        }
        None => e.message().trim().to_string(),
    }
}

/// The string value of `[table] key`, if set.
pub fn toml_value(text: &str, table: &str, key: &str) -> Result<Option<String>, String> {
    let doc: toml_edit::DocumentMut = text.parse().map_err(|e| toml_error(text, &e))?;
    let Some(item) = doc.get(table) else { return Ok(None) };
    let table_like = item.as_table_like().ok_or_else(|| format!("{table} is not a table"))?;
    match table_like.get(key) {
        None => Ok(None),
        Some(item) => match item.as_str() {
            Some(s) => Ok(Some(s.to_string())),
            None => Err(format!("{table}.{key} is not a string")),
        },
    }
}

/// The value of `[table] key` as written (any type), if set.
pub(crate) fn toml_raw(text: &str, table: &str, key: &str) -> Option<toml_edit::Value> {
    let doc: toml_edit::DocumentMut = text.parse().ok()?;
    doc.get(table)?.as_table_like()?.get(key)?.as_value().cloned()
}

/// Sets `settings` in a TOML text, keeping everything else. `Ok(None)` when every key
/// already has its value (nothing to write).
pub fn edit_toml(text: &str, settings: &[Setting]) -> Result<Option<(String, Vec<Change>)>, String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| toml_error(text, &e))?;
    let mut changes = Vec::new();
    for s in settings {
        let item =
            doc.as_table_mut().entry(s.table).or_insert(toml_edit::Item::Table(toml_edit::Table::new()));
        if let Some(t) = item.as_table_mut() {
            // `[a.b]` alone makes `a` implicit: it would not be printed with our key.
            t.set_implicit(false);
        }
        let table = item.as_table_like_mut().ok_or_else(|| format!("{} is not a table", s.table))?;
        let what = format!("[{}] {}", s.table, s.key);
        match table.get_mut(s.key) {
            None => {
                table.insert(s.key, toml_edit::Item::Value(s.value.to_toml()));
                changes.push(Change { what, from: None, to: s.value.repr() });
            }
            Some(item) => {
                let value =
                    item.as_value_mut().ok_or_else(|| format!("{}.{} is not a value", s.table, s.key))?;
                if s.value.matches(value) {
                    continue;
                }
                let from = value.clone().decorated("", "").to_string();
                // Keep the comment after the value and the spacing around it.
                let decor = value.decor().clone();
                *value = s.value.to_toml();
                *value.decor_mut() = decor;
                changes.push(Change { what, from: Some(from), to: s.value.repr() });
            }
        }
    }
    if changes.is_empty() {
        return Ok(None);
    }
    Ok(Some((doc.to_string(), changes)))
}

/// Sets `credHelpers` entries in an `auth.json` text (absent or empty: a new file), keeping
/// every other key (`auths` holds secrets). Written as Podman writes it (tab indent,
/// sorted keys). `Ok(None)` when nothing changes.
pub fn merge_cred_helpers(
    text: Option<&str>,
    wanted: &BTreeMap<String, String>,
) -> Result<Option<(String, Vec<Change>)>, String> {
    let mut doc: serde_json::Value = match text {
        Some(t) if !t.trim().is_empty() => serde_json::from_str(t)
            .map_err(|e| format!("line {}, column {}: not JSON", e.line(), e.column()))?,
        _ => serde_json::json!({}),
    };
    let root = doc.as_object_mut().ok_or("not a JSON object")?;
    let helpers = root.entry("credHelpers").or_insert_with(|| serde_json::json!({}));
    let helpers = helpers.as_object_mut().ok_or("credHelpers is not an object")?;
    let mut changes = Vec::new();
    for (registry, helper) in wanted {
        let current = helpers.get(registry);
        if current.and_then(|v| v.as_str()) == Some(helper.as_str()) {
            continue;
        }
        changes.push(Change {
            what: format!("credHelpers[{registry:?}]"),
            from: current.map(|v| v.to_string()),
            to: format!("{helper:?}"),
        });
        helpers.insert(registry.clone(), serde_json::Value::String(helper.clone()));
    }
    if changes.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    serde::Serialize::serialize(&doc, &mut ser).map_err(|e| e.to_string())?;
    out.push(b'\n');
    Ok(Some((String::from_utf8(out).expect("JSON is UTF-8"), changes)))
}

/// A credential helper name as Podman turns it into `docker-credential-<name>`.
pub fn valid_helper_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

/// A registry key: a host[:port][/path], no spaces or control characters.
pub fn valid_registry(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic())
}

/// What to do about `[storage] driver`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverDecision {
    /// Already configured, and the storage (if any) agrees.
    Keep,
    /// Set it: no storage yet, or only storage of the wanted driver.
    Set,
    /// Storage made with another driver exists: switching would break Podman.
    Conflict(String),
}

/// `configured`: the user's `[storage] driver`; `in_use`: drivers with a layer store
/// (`<graphroot>/<driver>-layers`).
pub fn decide_driver(
    wanted: &str,
    configured: Option<&str>,
    in_use: &[String],
    graphroot: &Path,
) -> DriverDecision {
    let foreign: Vec<&str> = in_use.iter().map(String::as_str).filter(|d| *d != wanted).collect();
    let needs_write = configured != Some(wanted);
    let broken_already = !in_use.is_empty() && !in_use.iter().any(|d| d == wanted);
    if (needs_write && !foreign.is_empty()) || broken_already {
        let drivers = foreign.join(", ");
        return DriverDecision::Conflict(format!(
            "the storage at {} was created with the {drivers} driver: Podman refuses to start with \
             {wanted} over it (database graph driver mismatch); not switched. Run `podman system reset` \
             as the runner user (deletes all images and containers) or set [podman_config] storage_driver = {:?}",
            graphroot.display(),
            foreign.first().copied().unwrap_or(wanted)
        ));
    }
    if needs_write {
        DriverDecision::Set
    } else {
        DriverDecision::Keep
    }
}

/// The tmpfiles.d line that links the Docker socket path to the user's Podman socket.
pub fn tmpfiles_contents(uid: u32, user: &str) -> String {
    format!(
        "# Written by executor-agent ([podman_config] docker_socket_link = true): tools that hard-code\n\
         # /var/run/docker.sock reach {user}'s rootless Podman. Only root and {user} may use it.\n\
         L {DOCKER_SOCK} - - - - /run/user/{uid}/podman/podman.sock\n"
    )
}
