//! The runner user: who it is, and running a program as that user with a clean environment.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::paths::Root;
use crate::subid::RunnerUser;

/// The runner user as this node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl Account {
    /// Looks the user up through NSS on the live system, or in `<root>/etc/passwd` otherwise.
    pub fn lookup(root: &Root, name: &str) -> Result<Account> {
        if root.is_host() {
            let user = nix::unistd::User::from_name(name)
                .with_context(|| format!("looking up user {name:?}"))?
                .with_context(|| format!("user {name:?} does not exist on this node"))?;
            return Ok(Account {
                name: user.name,
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
                home: user.dir,
            });
        }
        let passwd = root.join("/etc/passwd");
        let text =
            std::fs::read_to_string(&passwd).with_context(|| format!("reading {}", passwd.display()))?;
        parse_passwd(&text, name).with_context(|| format!("user {name:?} is not in {}", passwd.display()))
    }

    pub fn as_subid_owner(&self) -> RunnerUser {
        RunnerUser { name: self.name.clone(), uid: self.uid }
    }

    /// `/run/user/UID`, the user's XDG_RUNTIME_DIR.
    pub fn runtime_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/user/{}", self.uid))
    }

    /// The user manager's unit in the system manager.
    pub fn manager_unit(&self) -> String {
        format!("user@{}.service", self.uid)
    }

    /// A command that runs as this user, with the session environment of a login shell and
    /// nothing inherited from root's environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<tokio::process::Command> {
        let groups = supplementary_groups(&self.name, self.gid)?;
        let (uid, gid) = (self.uid, self.gid);
        let runtime_dir = self.runtime_dir();
        let mut cmd = std::process::Command::new(program);
        cmd.env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .env("DBUS_SESSION_BUS_ADDRESS", format!("unix:path={}/bus", runtime_dir.display()))
            .current_dir(if self.home.is_dir() { self.home.as_path() } else { Path::new("/") });
        let already_the_user = nix::unistd::geteuid().as_raw() == uid;
        // SAFETY: only async-signal-safe system calls run between fork and exec. The std
        // uid/gid setters run before pre_exec hooks and would drop privileges before
        // setgroups, so all three are done here, in the required order.
        if !already_the_user {
            unsafe {
                cmd.pre_exec(move || {
                    nix::unistd::setgroups(&groups)?;
                    nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
                    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
                    Ok(())
                });
            }
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        Ok(cmd)
    }
}

fn supplementary_groups(name: &str, gid: u32) -> Result<Vec<nix::unistd::Gid>> {
    let cname = CString::new(name)?;
    nix::unistd::getgrouplist(&cname, nix::unistd::Gid::from_raw(gid))
        .with_context(|| format!("looking up the groups of {name:?}"))
}

fn parse_passwd(text: &str, name: &str) -> Result<Account> {
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() == 7 && fields[0] == name {
            return Ok(Account {
                name: name.to_string(),
                uid: fields[2].parse().with_context(|| format!("bad UID in passwd line for {name}"))?,
                gid: fields[3].parse().with_context(|| format!("bad GID in passwd line for {name}"))?,
                home: PathBuf::from(fields[5]),
            });
        }
    }
    bail!("no such user")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_user_in_a_passwd_file() {
        let text =
            "root:x:0:0:root:/root:/bin/bash\ncore:x:1000:1000:CoreOS Admin:/var/home/core:/bin/bash\n";
        let a = parse_passwd(text, "core").unwrap();
        assert_eq!((a.uid, a.gid, a.home.as_path()), (1000, 1000, Path::new("/var/home/core")));
        assert_eq!(a.manager_unit(), "user@1000.service");
        assert!(parse_passwd(text, "nobody").is_err());
    }
}
