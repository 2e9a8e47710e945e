//! Butane (`variant: fcos`, `version: 1.4.0`) to Ignition 3.3.0, for the Butane features this
//! project's config uses, translated the way coreos/butane does (base/v0_4, base/util/url.go):
//! `inline`/`local` contents become the smallest data URL (URL-escaped, base64, or gzip+base64
//! with `compression: gzip`), uncompressed ones get `compression: ""`, fields are written in the
//! Ignition Go structs' order and empty ones are left out.

use crate::render::gojson::Json;
use crate::render::yaml::{self, Node};
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use std::path::{Component, Path};
use std::sync::Mutex;

/// The Ignition spec version that Butane fcos 1.4.0 produces.
pub const IGNITION_VERSION: &str = "3.3.0";

/// A Butane config restricted to the supported fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub directories: Vec<Directory>,
    pub files: Vec<File>,
    pub links: Vec<Link>,
    pub units: Vec<Unit>,
}

/// Fields every storage node has.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFields {
    pub path: String,
    pub overwrite: Option<bool>,
    pub user: Option<Owner>,
    pub group: Option<Owner>,
}

/// `user` or `group` of a node: a numeric ID or a name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Owner {
    pub id: Option<i64>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct File {
    pub node: NodeFields,
    pub mode: Option<i64>,
    pub contents: Option<Resource>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Directory {
    pub node: NodeFields,
    pub mode: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Link {
    pub node: NodeFields,
    pub target: Option<String>,
    pub hard: Option<bool>,
}

/// File contents: exactly one of `inline`, `local`, `source`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resource {
    pub inline: Option<String>,
    pub local: Option<String>,
    pub source: Option<String>,
    pub compression: Option<String>,
    pub hash: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unit {
    pub name: String,
    pub enabled: Option<bool>,
    pub mask: Option<bool>,
    pub contents: Option<String>,
    pub dropins: Vec<Dropin>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dropin {
    pub name: String,
    pub contents: Option<String>,
}

impl Config {
    /// Parses a Butane document; unknown or unsupported keys are errors (Butane rejects unused keys).
    pub fn parse(text: &str) -> Result<Config> {
        let doc = yaml::parse(text)?;
        let mut top = Fields::new(&doc, "the document")?;
        let variant = top.string("variant")?.ok_or_else(|| anyhow!("`variant` is missing"))?;
        let version = top.string("version")?.ok_or_else(|| anyhow!("`version` is missing"))?;
        if variant != "fcos" || version != "1.4.0" {
            bail!("only `variant: fcos` with `version: 1.4.0` is supported (found {variant} {version})");
        }
        let mut config = Config::default();
        if let Some(storage) = top.take("storage") {
            let mut storage = Fields::new(storage, "storage")?;
            config.directories = storage.list("directories", parse_directory)?;
            config.files = storage.list("files", parse_file)?;
            config.links = storage.list("links", parse_link)?;
            storage.finish()?;
        }
        if let Some(systemd) = top.take("systemd") {
            let mut systemd = Fields::new(systemd, "systemd")?;
            config.units = systemd.list("units", parse_unit)?;
            systemd.finish()?;
        }
        top.finish()?;
        Ok(config)
    }

    /// The file entry for `path`, for callers that adapt a variant.
    pub fn file_mut(&mut self, path: &str) -> Option<&mut File> {
        self.files.iter_mut().find(|f| f.node.path == path)
    }

    /// Translates to Ignition 3.3.0; `files_dir` is Butane's `--files-dir` for `local` contents.
    pub fn to_ignition(&self, files_dir: Option<&Path>) -> Result<Json> {
        self.lint()?;
        let mut files = Vec::new();
        for f in &self.files {
            files.push(file_json(f, files_dir).with_context(|| format!("storage.files {}", f.node.path))?);
        }
        let storage = Json::object([
            ("directories", Json::Array(self.directories.iter().map(directory_json).collect()).non_empty()),
            ("files", Json::Array(files).non_empty()),
            ("links", Json::Array(self.links.iter().map(link_json).collect()).non_empty()),
        ]);
        let systemd =
            Json::object([("units", Json::Array(self.units.iter().map(unit_json).collect()).non_empty())]);
        Ok(Json::object([
            ("ignition", Some(Json::object([("version", Some(Json::String(IGNITION_VERSION.into())))]))),
            ("storage", storage.non_empty()),
            ("systemd", systemd.non_empty()),
        ]))
    }

    /// The checks that make `butane --strict` fail for the supported fields.
    fn lint(&self) -> Result<()> {
        let nodes = self
            .files
            .iter()
            .map(|f| &f.node)
            .chain(self.directories.iter().map(|d| &d.node))
            .chain(self.links.iter().map(|l| &l.node));
        let mut seen = std::collections::BTreeSet::new();
        for node in nodes {
            if !node.path.starts_with('/') {
                bail!("storage path {:?} is not absolute", node.path);
            }
            if !seen.insert(node.path.as_str()) {
                bail!("storage path {} appears twice", node.path);
            }
        }
        for f in &self.files {
            if let Some(mode) = f.mode {
                if !(0..=0o7777).contains(&mode) {
                    bail!("storage.files {}: mode {mode:o} is out of range", f.node.path);
                }
            }
            if let Some(c) = &f.contents {
                let given = [&c.inline, &c.local, &c.source].iter().filter(|v| v.is_some()).count();
                if given != 1 {
                    bail!(
                        "storage.files {}: contents need exactly one of inline, local, source",
                        f.node.path
                    );
                }
                if let Some(hash) = &c.hash {
                    check_hash(hash).with_context(|| format!("storage.files {}", f.node.path))?;
                }
            }
        }
        for u in &self.units {
            if u.enabled == Some(true) {
                if let Some(contents) = &u.contents {
                    if !contents.lines().any(|l| l.trim() == "[Install]") {
                        bail!("unit {} is enabled but has no [Install] section (Ignition warns, so butane --strict fails)", u.name);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Accepts `sha512-<128 hex>` and `sha256-<64 hex>`, as Ignition does.
fn check_hash(hash: &str) -> Result<()> {
    let (kind, hex) =
        hash.split_once('-').ok_or_else(|| anyhow!("hash {hash:?} is not of the form sha512-<hex>"))?;
    let len = match kind {
        "sha512" => 128,
        "sha256" => 64,
        _ => bail!("hash type {kind:?} is not sha512 or sha256"),
    };
    if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        bail!("hash {hash:?} is not {len} lowercase hex digits");
    }
    Ok(())
}

fn owner_json(owner: &Option<Owner>) -> Option<Json> {
    owner.as_ref().and_then(|o| {
        Json::object([("id", o.id.map(Json::Int)), ("name", o.name.clone().map(Json::String))]).non_empty()
    })
}

/// The `Node` fields in Ignition's order: group, overwrite, path, user.
fn node_fields(n: &NodeFields) -> Vec<(&'static str, Option<Json>)> {
    vec![
        ("group", owner_json(&n.group)),
        ("overwrite", n.overwrite.map(Json::Bool)),
        ("path", Some(Json::String(n.path.clone()))),
        ("user", owner_json(&n.user)),
    ]
}

fn file_json(f: &File, files_dir: Option<&Path>) -> Result<Json> {
    let mut fields = node_fields(&f.node);
    let contents = match &f.contents {
        Some(c) => resource_json(c, files_dir)?.non_empty(),
        None => None,
    };
    fields.push(("contents", contents));
    fields.push(("mode", f.mode.map(Json::Int)));
    Ok(Json::object(fields))
}

fn directory_json(d: &Directory) -> Json {
    let mut fields = node_fields(&d.node);
    fields.push(("mode", d.mode.map(Json::Int)));
    Json::object(fields)
}

fn link_json(l: &Link) -> Json {
    let mut fields = node_fields(&l.node);
    fields.push(("hard", l.hard.map(Json::Bool)));
    fields.push(("target", l.target.clone().map(Json::String)));
    Json::object(fields)
}

fn unit_json(u: &Unit) -> Json {
    let dropins = u
        .dropins
        .iter()
        .map(|d| {
            Json::object([
                ("contents", d.contents.clone().map(Json::String)),
                ("name", Some(Json::String(d.name.clone()))),
            ])
        })
        .collect();
    Json::object([
        ("contents", u.contents.clone().map(Json::String)),
        ("dropins", Json::Array(dropins).non_empty()),
        ("enabled", u.enabled.map(Json::Bool)),
        ("mask", u.mask.map(Json::Bool)),
        ("name", Some(Json::String(u.name.clone()))),
    ])
}

/// A Resource in Ignition's order: compression, httpHeaders, source, verification.
fn resource_json(r: &Resource, files_dir: Option<&Path>) -> Result<Json> {
    let mut compression = r.compression.clone();
    let mut source = r.source.clone();
    let data = match (&r.inline, &r.local) {
        (Some(inline), _) => Some(inline.as_bytes().to_vec()),
        (None, Some(local)) => Some(read_local(local, files_dir)?),
        (None, None) => None,
    };
    if let Some(data) = data {
        let (url, chosen) = make_data_url(&data, r.compression.as_deref());
        source = Some(url);
        if let Some(chosen) = chosen {
            compression = Some(chosen.to_string());
        }
    }
    let verification = Json::object([("hash", r.hash.clone().map(Json::String))]);
    Ok(Json::object([
        ("compression", compression.map(Json::String)),
        ("source", source.map(Json::String)),
        ("verification", verification.non_empty()),
    ]))
}

/// Reads `local` from the files directory, refusing paths that leave it (as Butane does).
fn read_local(local: &str, files_dir: Option<&Path>) -> Result<Vec<u8>> {
    let dir =
        files_dir.ok_or_else(|| anyhow!("`local: {local}` needs a files directory (butane --files-dir)"))?;
    let rel = Path::new(local);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!("`local: {local}` is outside the files directory");
    }
    crate::harness::host::read(dir.join(rel))
}

/// Butane's `MakeDataURL`: the shortest of a URL-escaped, a base64 and (when the config sets no
/// compression) a gzip+base64 data URL. Returns the URL and the compression value to write:
/// `Some("")` or `Some("gzip")` when the config set none, `None` to keep the config's own.
pub fn make_data_url(contents: &[u8], current_compression: Option<&str>) -> (String, Option<&'static str>) {
    // Nodes embed the same multi-megabyte binary once per scenario: compress it once per run.
    /// (contents, compression unset, data URL, compression written)
    type Entry = (Vec<u8>, bool, String, Option<&'static str>);
    static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    const CACHE_FROM: usize = 1 << 20;
    let unset = current_compression.is_none_or(str::is_empty);
    if contents.len() >= CACHE_FROM {
        let cache = CACHE.lock().unwrap();
        if let Some((_, _, url, c)) =
            cache.iter().find(|(data, u, _, _)| *u == unset && data.as_slice() == contents)
        {
            return (url.clone(), *c);
        }
    }
    let mut compression = if unset { Some("") } else { None };
    // Candidate lengths first; only the chosen encoding is built.
    let escaped_len = 1 + contents.iter().map(|&b| if is_path_unreserved(b) { 1 } else { 3 }).sum::<usize>();
    let b64_len = ";base64,".len() + contents.len().div_ceil(3) * 4;
    let mut best_len = escaped_len.min(b64_len);
    let mut gzipped = None;
    if unset {
        let gz = crate::render::gzip::compress(contents);
        let gz_len = ";base64,".len() + gz.len().div_ceil(3) * 4;
        if gz_len + "gzip".len() < best_len {
            best_len = gz_len;
            gzipped = Some(gz);
            compression = Some("gzip");
        }
    }
    let opaque = match gzipped {
        Some(gz) => format!(";base64,{}", base64::engine::general_purpose::STANDARD.encode(gz)),
        None if b64_len < escaped_len => {
            format!(";base64,{}", base64::engine::general_purpose::STANDARD.encode(contents))
        }
        None => format!(",{}", path_escape(contents)),
    };
    debug_assert_eq!(opaque.len(), best_len);
    let url = format!("data:{opaque}");
    if contents.len() >= CACHE_FROM {
        CACHE.lock().unwrap().push((contents.to_vec(), unset, url.clone(), compression));
    }
    (url, compression)
}

fn is_path_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.~$&+:=@".contains(&b)
}

/// Go's `url.PathEscape` (what dataurl v1.0.0's `Escape` calls): keeps `A-Za-z0-9-_.~$&+:=@`.
pub fn path_escape(data: &[u8]) -> String {
    const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(data.len());
    for &b in data {
        if is_path_unreserved(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(UPPER_HEX[(b >> 4) as usize] as char);
            out.push(UPPER_HEX[(b & 0xf) as usize] as char);
        }
    }
    out
}

// ---- reading the YAML tree into the typed config ----

/// The entries of one mapping, taken one by one; `finish` rejects what is left.
struct Fields<'a> {
    what: String,
    entries: Vec<(&'a str, &'a Node)>,
}

impl<'a> Fields<'a> {
    fn new(node: &'a Node, what: &str) -> Result<Self> {
        match node {
            Node::Map(entries, _) => Ok(Fields {
                what: what.to_string(),
                entries: entries.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            }),
            other => bail!("line {}: {what} must be a mapping, found {}", other.line(), other.kind()),
        }
    }

    fn take(&mut self, key: &str) -> Option<&'a Node> {
        let i = self.entries.iter().position(|(k, _)| *k == key)?;
        let node = self.entries.remove(i).1;
        (!is_null(node)).then_some(node)
    }

    fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Node::Scalar(s, _, _)) => Ok(Some(s.clone())),
            Some(other) => {
                bail!("line {}: {}.{key} must be a string, found {}", other.line(), self.what, other.kind())
            }
        }
    }

    fn required_string(&mut self, key: &str) -> Result<String> {
        self.string(key)?.ok_or_else(|| anyhow!("{}: `{key}` is required", self.what))
    }

    /// yaml.v3 decoding a plain scalar into a Go bool.
    fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Node::Scalar(s, true, line)) => match s.as_str() {
                "true" | "True" | "TRUE" => Ok(Some(true)),
                "false" | "False" | "FALSE" => Ok(Some(false)),
                _ => bail!("line {line}: {}.{key} must be true or false, found {s:?}", self.what),
            },
            Some(other) => bail!("line {}: {}.{key} must be an unquoted boolean", other.line(), self.what),
        }
    }

    /// yaml.v3 decoding a plain scalar into a Go int: `strconv.ParseInt(s, 0, 64)` semantics.
    fn int(&mut self, key: &str) -> Result<Option<i64>> {
        match self.take(key) {
            None => Ok(None),
            Some(Node::Scalar(s, true, line)) => parse_go_int(s)
                .map(Some)
                .ok_or_else(|| anyhow!("line {line}: {}.{key} must be an integer, found {s:?}", self.what)),
            Some(other) => bail!("line {}: {}.{key} must be an unquoted integer", other.line(), self.what),
        }
    }

    /// A file mode, which must be written in octal (`0644`): Butane warns on decimal-looking modes.
    fn mode(&mut self, key: &str) -> Result<Option<i64>> {
        let line = self.entries.iter().find(|(k, _)| *k == key).map(|(_, n)| n.line());
        let raw = match self.entries.iter().find(|(k, _)| *k == key) {
            Some((_, Node::Scalar(s, _, _))) => Some(s.clone()),
            _ => None,
        };
        let value = self.int(key)?;
        if let (Some(raw), Some(line)) = (raw, line) {
            if !(raw.starts_with('0') || raw.starts_with("0o")) {
                bail!("line {line}: write {}.{key} in octal with a leading 0 (like 0644); Butane warns on {raw}", self.what);
            }
        }
        Ok(value)
    }

    fn owner(&mut self, key: &str) -> Result<Option<Owner>> {
        let Some(node) = self.take(key) else { return Ok(None) };
        let mut f = Fields::new(node, &format!("{}.{key}", self.what))?;
        let owner = Owner { id: f.int("id")?, name: f.string("name")? };
        f.finish()?;
        Ok(Some(owner))
    }

    fn list<T>(&mut self, key: &str, item: impl Fn(&'a Node, &str) -> Result<T>) -> Result<Vec<T>> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Node::Seq(items, _)) => {
                items.iter().enumerate().map(|(i, n)| item(n, &format!("{}.{key}.{i}", self.what))).collect()
            }
            Some(other) => {
                bail!("line {}: {}.{key} must be a list, found {}", other.line(), self.what, other.kind())
            }
        }
    }

    fn node_fields(&mut self) -> Result<NodeFields> {
        Ok(NodeFields {
            path: self.required_string("path")?,
            overwrite: self.bool("overwrite")?,
            user: self.owner("user")?,
            group: self.owner("group")?,
        })
    }

    fn finish(self) -> Result<()> {
        if let Some((key, node)) = self.entries.first() {
            bail!(
                "line {}: {}.{key} is not a Butane fcos 1.4.0 field this renderer supports (unknown keys make Butane fail too)",
                node.line(),
                self.what
            );
        }
        Ok(())
    }
}

fn is_null(node: &Node) -> bool {
    matches!(node, Node::Scalar(s, true, _) if s.is_empty() || s == "~" || s == "null" || s == "Null" || s == "NULL")
}

/// `strconv.ParseInt(s, 0, 64)` after yaml.v3 drops underscores: `0x`, `0o`, `0b` and leading-0 octal.
fn parse_go_int(s: &str) -> Option<i64> {
    let plain = s.replace('_', "");
    let (neg, digits) = match plain.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, plain.strip_prefix('+').unwrap_or(&plain)),
    };
    let (radix, body) = if let Some(h) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        (16, h)
    } else if let Some(o) = digits.strip_prefix("0o").or_else(|| digits.strip_prefix("0O")) {
        (8, o)
    } else if let Some(b) = digits.strip_prefix("0b").or_else(|| digits.strip_prefix("0B")) {
        (2, b)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if body.is_empty() {
        return None;
    }
    let v = i64::from_str_radix(body, radix).ok()?;
    Some(if neg { -v } else { v })
}

fn parse_resource(node: &Node, what: &str) -> Result<Resource> {
    let mut f = Fields::new(node, what)?;
    let mut r = Resource {
        inline: f.string("inline")?,
        local: f.string("local")?,
        source: f.string("source")?,
        compression: f.string("compression")?,
        hash: None,
    };
    if let Some(v) = f.take("verification") {
        let mut v = Fields::new(v, &format!("{what}.verification"))?;
        r.hash = v.string("hash")?;
        v.finish()?;
    }
    f.finish()?;
    Ok(r)
}

fn parse_file(node: &Node, what: &str) -> Result<File> {
    let mut f = Fields::new(node, what)?;
    let file = File {
        node: f.node_fields()?,
        mode: f.mode("mode")?,
        contents: match f.take("contents") {
            Some(c) => Some(parse_resource(c, &format!("{what}.contents"))?),
            None => None,
        },
    };
    f.finish()?;
    Ok(file)
}

fn parse_directory(node: &Node, what: &str) -> Result<Directory> {
    let mut f = Fields::new(node, what)?;
    let dir = Directory { node: f.node_fields()?, mode: f.mode("mode")? };
    f.finish()?;
    Ok(dir)
}

fn parse_link(node: &Node, what: &str) -> Result<Link> {
    let mut f = Fields::new(node, what)?;
    let link = Link { node: f.node_fields()?, target: f.string("target")?, hard: f.bool("hard")? };
    f.finish()?;
    Ok(link)
}

fn parse_unit(node: &Node, what: &str) -> Result<Unit> {
    let mut f = Fields::new(node, what)?;
    let mut unit = Unit {
        name: f.required_string("name")?,
        enabled: f.bool("enabled")?,
        mask: f.bool("mask")?,
        contents: f.string("contents")?,
        dropins: Vec::new(),
    };
    unit.dropins = f.list("dropins", |n, w| {
        let mut d = Fields::new(n, w)?;
        let dropin = Dropin { name: d.required_string("name")?, contents: d.string("contents")? };
        d.finish()?;
        Ok(dropin)
    })?;
    f.finish()?;
    Ok(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(text: &str) -> String {
        Config::parse(text).unwrap().to_ignition(None).unwrap().to_pretty()
    }

    #[test]
    fn go_int_parsing_matches_strconv_base_0() {
        assert_eq!(parse_go_int("0755"), Some(0o755));
        assert_eq!(parse_go_int("0o644"), Some(0o644));
        assert_eq!(parse_go_int("420"), Some(420));
        assert_eq!(parse_go_int("0x1F"), Some(31));
        assert_eq!(parse_go_int("0"), Some(0));
        assert_eq!(parse_go_int("089"), None);
    }

    #[test]
    fn path_escape_matches_go() {
        // Values from dataurl's own tests and Go's url.PathEscape rules.
        assert_eq!(path_escape(b"A brief note\n"), "A%20brief%20note%0A");
        assert_eq!(path_escape(b"a/b;c,d?e"), "a%2Fb%3Bc%2Cd%3Fe");
        assert_eq!(path_escape(b"k=v:w@x+y&z$~"), "k=v:w@x+y&z$~");
        assert_eq!(path_escape("(é)".as_bytes()), "%28%C3%A9%29");
    }

    /// Expected values printed by Go 1.19's url.PathEscape and json.MarshalIndent for this input.
    #[test]
    fn escaping_matches_go_output_byte_for_byte() {
        let input = "a&b<c>d\t\"q\"\\ e\u{1} /;,?$+:=@~!*()' é\n";
        assert_eq!(
            path_escape(input.as_bytes()),
            "a&b%3Cc%3Ed%09%22q%22%5C%20e%01%20%2F%3B%2C%3F$+:=@~%21%2A%28%29%27%20%C3%A9%0A"
        );
        assert_eq!(
            Json::String(input.into()).to_pretty(),
            r#""a\u0026b\u003cc\u003ed\t\"q\"\\ e\u0001 /;,?$+:=@~!*()' é\n""#
        );
    }

    #[test]
    fn short_text_becomes_url_escaped_with_empty_compression() {
        let out = render("variant: fcos\nversion: 1.4.0\nstorage:\n  files:\n    - path: /etc/hostname\n      mode: 0644\n      contents:\n        inline: node1\n");
        assert_eq!(
            out,
            "{\n  \"ignition\": {\n    \"version\": \"3.3.0\"\n  },\n  \"storage\": {\n    \"files\": [\n      {\n        \"path\": \"/etc/hostname\",\n        \"contents\": {\n          \"compression\": \"\",\n          \"source\": \"data:,node1\"\n        },\n        \"mode\": 420\n      }\n    ]\n  }\n}"
        );
    }

    #[test]
    fn binary_data_prefers_base64_and_repetitive_data_gzip() {
        // 4 bytes: ",%00%01%02%FF" (13) beats ";base64,AAEC/w==" (16).
        let (url, c) = make_data_url(&[0u8, 1, 2, 255], None);
        assert_eq!((url.as_str(), c), ("data:,%00%01%02%FF", Some("")));
        let (url, c) = make_data_url(&[0u8, 1, 2, 255].repeat(3), None);
        assert_eq!((url.as_str(), c), ("data:;base64,AAEC/wABAv8AAQL/", Some("")));
        let text = "x = 1\n".repeat(200);
        let (url, c) = make_data_url(text.as_bytes(), None);
        assert!(url.starts_with("data:;base64,H4sI"), "{url}");
        assert_eq!(c, Some("gzip"));
        // A config that sets compression itself keeps it and is never compressed again.
        let (url, c) = make_data_url(text.as_bytes(), Some("gzip"));
        assert!(!url.contains("H4sI"));
        assert_eq!(c, None);
    }

    #[test]
    fn units_and_verification_keep_ignition_field_order() {
        let out = render(concat!(
            "variant: fcos\nversion: 1.4.0\n",
            "storage:\n  files:\n    - path: /usr/local/bin/x\n      mode: 0755\n      overwrite: true\n",
            "      contents:\n        source: https://example.invalid/x\n        verification:\n          hash: sha256-",
            "0000000000000000000000000000000000000000000000000000000000000000\n",
            "systemd:\n  units:\n    - name: x.service\n      enabled: true\n      contents: |\n        [Install]\n        WantedBy=multi-user.target\n"
        ));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["storage"]["files"][0]["mode"], 493);
        let file = &out[out.find("\"files\"").unwrap()..out.find("\"systemd\"").unwrap()];
        let keys: Vec<_> = file
            .lines()
            .filter(|l| l.starts_with("        \""))
            .map(|l| l.trim().split('"').nth(1).unwrap())
            .collect();
        assert_eq!(keys, ["overwrite", "path", "contents", "mode"]);
        assert!(out.contains("\"contents\": \"[Install]\\nWantedBy=multi-user.target\\n\",\n        \"enabled\": true,\n        \"name\": \"x.service\""));
    }

    #[test]
    fn rejects_unknown_keys_decimal_modes_and_two_sources() {
        let base = "variant: fcos\nversion: 1.4.0\n";
        assert!(Config::parse(&format!("{base}passwd: {{}}\n")).unwrap_err().to_string().contains("passwd"));
        assert!(
            Config::parse(&format!("{base}storage:\n  files:\n    - path: /a\n      mode: 644\n")).is_err()
        );
        let two = format!("{base}storage:\n  files:\n    - path: /a\n      contents:\n        inline: a\n        source: data:,a\n");
        assert!(Config::parse(&two).unwrap().to_ignition(None).is_err());
        assert!(Config::parse("variant: fcos\nversion: 1.5.0\n").is_err());
    }
}
