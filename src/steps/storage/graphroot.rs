//! Where the runner user's rootless Podman keeps its images (the graphroot), found the way
//! containers/storage finds it for a rootless user.
//!
//! The user's storage.conf is the runner user's file: it is read through [`crate::userfs`]
//! (no symlink below the home, the user's or root's, regular, bounded) and a parse error
//! names a line and column, never the text. The graphroot it names is the user's to choose,
//! so the step measures it through a descriptor that followed no link of the user's.

use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

use crate::paths::Root;
use crate::runner_user::Account;
use crate::userfs::{Dir, Owner};

/// The user's own storage.conf; it overrides the system file for that user.
const USER_CONF: &str = ".config/containers/storage.conf";
/// The system files, first existing one wins (containers/storage reads only one).
const SYSTEM_CONFS: [&str; 2] = ["/etc/containers/storage.conf", "/usr/share/containers/storage.conf"];
/// The rootless default below the user's home.
const DEFAULT: &str = ".local/share/containers/storage";

/// The graphroot, and which file set it (for the check's detail).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graphroot {
    /// The node path, e.g. `/var/home/core/.local/share/containers/storage`.
    pub path: PathBuf,
    /// The file that set it, `None` for the rootless default.
    pub set_by: Option<PathBuf>,
}

/// Reads the user's and the system's storage.conf under `root`.
pub fn locate(root: &Root, user: &Account) -> Result<Graphroot> {
    let user_conf = user.home.join(USER_CONF);
    let user_text = read_users_conf(root, user)?;
    let system = system_conf(root)?;
    resolve(
        user,
        user_text.as_deref().map(|t| (user_conf.as_path(), t)),
        system.as_ref().map(|(f, t)| (f.as_path(), t.as_str())),
    )
}

/// The system storage.conf in effect (root's file, the first of [`SYSTEM_CONFS`] that exists)
/// and its text.
pub fn system_conf(root: &Root) -> Result<Option<(PathBuf, String)>> {
    for file in SYSTEM_CONFS {
        if let Some(text) = read_if_present(&root.join(file))? {
            return Ok(Some((PathBuf::from(file), text)));
        }
    }
    Ok(None)
}

/// The user's `[storage] graphroot`, else the system's `[storage] rootless_storage_path`,
/// else `$HOME/.local/share/containers/storage`; `$HOME`, `$USER`, `$UID` expanded.
pub fn resolve(
    user: &Account,
    user_conf: Option<(&Path, &str)>,
    system_conf: Option<(&Path, &str)>,
) -> Result<Graphroot> {
    let chosen = match (setting(user_conf, "graphroot")?, setting(system_conf, "rootless_storage_path")?) {
        (Some(found), _) | (None, Some(found)) => Some(found),
        (None, None) => None,
    };
    let Some((file, value)) = chosen else {
        return Ok(Graphroot { path: user.home.join(DEFAULT), set_by: None });
    };
    let path = PathBuf::from(expand(&value, user));
    if !path.is_absolute() {
        bail!("{}: graphroot {value:?} is not an absolute path", file.display());
    }
    Ok(Graphroot { path, set_by: Some(file.to_path_buf()) })
}

/// `[storage] KEY` of a storage.conf, if set and not empty.
fn setting(conf: Option<(&Path, &str)>, key: &str) -> Result<Option<(PathBuf, String)>> {
    let Some((file, text)) = conf else { return Ok(None) };
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow!("{} is not valid TOML ({})", file.display(), toml_error(text, &e)))?;
    let value = table.get("storage").and_then(|s| s.get(key));
    match value {
        None => Ok(None),
        Some(toml::Value::String(s)) if s.is_empty() => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some((file.to_path_buf(), s.clone()))),
        Some(other) => bail!("{}: [storage] {key} is {other}, not a path", file.display()),
    }
}

/// Expands `$NAME` and `${NAME}` like Go's os.ExpandEnv in the user's Podman service, which
/// knows HOME, USER and (containers/storage substitutes it) UID; any other name is empty there.
fn expand(value: &str, user: &Account) -> String {
    let lookup = |name: &str| match name {
        "HOME" => user.home.display().to_string(),
        "USER" | "LOGNAME" => user.name.clone(),
        "UID" => user.uid.to_string(),
        "XDG_RUNTIME_DIR" => user.runtime_dir().display().to_string(),
        _ => String::new(),
    };
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        if consumed == 0 {
            // A lone `$` stays as it is.
            out.push('$');
            rest = after;
        } else {
            out.push_str(&lookup(name));
            rest = &after[consumed..];
        }
    }
    out.push_str(rest);
    out
}

/// A TOML error as "line L, column C: message", without the snippet of the file that the
/// error's Display quotes (the file may be the user's; the detail is shown on `/readyz`).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = crate::text::one_line(e.message(), 200);
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// The user's `~/.config/containers/storage.conf` (under `root`), read through its
/// directories without following a link; `None` when it or a directory is missing.
fn read_users_conf(root: &Root, user: &Account) -> Result<Option<String>> {
    let owner = Owner { uid: user.uid, gid: user.gid };
    let Some(home) = Dir::open_home(&root.join(&user.home), owner)? else { return Ok(None) };
    let Some(config) = home.child(".config", owner)? else { return Ok(None) };
    let Some(containers) = config.child("containers", owner)? else { return Ok(None) };
    Ok(containers.read("storage.conf", owner)?.map(|f| f.text))
}

/// A system file (root's): read as it is.
fn read_if_present(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context(format!("reading {}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> Account {
        Account { name: "core".into(), uid: 1000, gid: 1000, home: PathBuf::from("/var/home/core") }
    }

    const USER: &str = "/var/home/core/.config/containers/storage.conf";
    const SYSTEM: &str = "/etc/containers/storage.conf";

    fn resolved(user: Option<&str>, system: Option<&str>) -> Result<Graphroot> {
        resolve(&core(), user.map(|t| (Path::new(USER), t)), system.map(|t| (Path::new(SYSTEM), t)))
    }

    #[test]
    fn default_is_below_the_users_home() {
        let g = resolved(None, Some("[storage]\ndriver = \"overlay\"\n")).unwrap();
        assert_eq!(
            g,
            Graphroot { path: "/var/home/core/.local/share/containers/storage".into(), set_by: None }
        );
        // An empty value means "not set" to containers/storage too.
        assert_eq!(resolved(Some("[storage]\ngraphroot = \"\"\n"), None).unwrap().set_by, None);
    }

    #[test]
    fn users_graphroot_beats_the_systems_rootless_path() {
        let system = "[storage]\nrootless_storage_path = \"/var/lib/ci/$UID/storage\"\n";
        let g = resolved(None, Some(system)).unwrap();
        assert_eq!(g.path, PathBuf::from("/var/lib/ci/1000/storage"));
        assert_eq!(g.set_by.as_deref(), Some(Path::new(SYSTEM)));
        let g = resolved(Some("[storage]\ngraphroot = \"${HOME}/big/$USER\"\n"), Some(system)).unwrap();
        assert_eq!(g.path, PathBuf::from("/var/home/core/big/core"));
        assert_eq!(g.set_by.as_deref(), Some(Path::new(USER)));
    }

    #[test]
    fn expands_like_go_expand_env() {
        let u = core();
        assert_eq!(expand("/x/$NOPE/y", &u), "/x//y");
        assert_eq!(expand("/cost$", &u), "/cost$");
        assert_eq!(expand("/a/${UID}b/$UIDc", &u), "/a/1000b/");
        assert_eq!(expand("/a/${HOME", &u), "/a/${HOME");
    }

    #[test]
    fn bad_files_and_relative_paths_are_errors_naming_the_file() {
        let err = resolved(Some("[storage\n"), None).unwrap_err();
        assert!(err.to_string().contains(USER), "{err:#}");
        let err = resolved(Some("[storage]\ngraphroot = 5\n"), None).unwrap_err();
        assert!(err.to_string().contains("graphroot is 5"), "{err:#}");
        let err = resolved(Some("[storage]\ngraphroot = \"containers\"\n"), None).unwrap_err();
        assert!(err.to_string().contains("not an absolute path"), "{err:#}");
    }

    #[test]
    fn locate_reads_the_files_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let write = |p: &str, t: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, t).unwrap();
        };
        assert_eq!(locate(&root, &core()).unwrap().set_by, None);
        write(
            "/usr/share/containers/storage.conf",
            "[storage]\nrootless_storage_path = \"/usr/share-wins\"\n",
        );
        assert_eq!(locate(&root, &core()).unwrap().path, PathBuf::from("/usr/share-wins"));
        // /etc's file replaces /usr/share's entirely, even without the key.
        write(SYSTEM, "[storage]\ndriver = \"overlay\"\n");
        assert_eq!(locate(&root, &core()).unwrap().set_by, None);
        write(USER, "[storage]\ngraphroot = \"/srv/podman\"\n");
        assert_eq!(locate(&root, &core()).unwrap().path, PathBuf::from("/srv/podman"));
    }

    #[test]
    fn parse_errors_name_the_place_not_the_text() {
        let err = resolved(Some("[storage]\ngraphroot = \"/x\"\ntoken = hunter2\n"), None).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.starts_with(&format!("{USER} is not valid TOML (line 3, column ")), "{text}");
        assert!(!text.contains("hunter2") && !text.contains('\n'), "{text}");
    }

    #[test]
    fn the_users_storage_conf_is_not_read_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let secret = root.join("/etc/shadow");
        std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
        std::fs::write(&secret, "root:$6$hunter2:19000::::::\n").unwrap();
        let conf_dir = root.join("/var/home/core/.config/containers");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::os::unix::fs::symlink(&secret, conf_dir.join("storage.conf")).unwrap();
        let err = locate(&root, &core()).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("storage.conf: it is a symlink"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        // Nor through a symlinked directory, nor a FIFO in its place.
        std::fs::remove_file(conf_dir.join("storage.conf")).unwrap();
        nix::unistd::mkfifo(&conf_dir.join("storage.conf"), nix::sys::stat::Mode::from_bits_truncate(0o644))
            .unwrap();
        let err = locate(&root, &core()).unwrap_err();
        assert!(format!("{err:#}").contains("it is a FIFO, not a regular file"), "{err:#}");
        std::fs::remove_dir_all(root.join("/var/home/core/.config")).unwrap();
        std::os::unix::fs::symlink(root.join("/etc"), root.join("/var/home/core/.config")).unwrap();
        let err = locate(&root, &core()).unwrap_err();
        assert!(format!("{err:#}").contains(".config: it is a symlink"), "{err:#}");
    }
}
