//! Tree fixtures (tempdir roots) for the runner-privileges check: groups, sudoers, engine
//! sockets, the Docker units and the mask plan.

use super::*;
use crate::config::Settings;
use crate::runner_user::Account;
use crate::steps::Step;
use std::os::unix::fs::PermissionsExt;

/// FCOS's stock rule (fedora-coreos-config, /etc/sudoers.d/coreos-sudo-group).
const COREOS_SUDO_GROUP: &str = "%wheel ALL=(ALL) NOPASSWD: ALL\n";
/// The relevant part of Fedora's /etc/sudoers: wheel with a password, and the NOPASSWD
/// variant commented out.
const FEDORA_SUDOERS: &str = "\
## Allow root to run any commands anywhere
root\tALL=(ALL) \tALL
Defaults   !visiblepw
Defaults    env_keep =  \"COLORS DISPLAY HOSTNAME HISTSIZE KDEDIR LS_COLORS\"
Defaults    env_keep += \"MAIL QTDIR USERNAME LANG LC_ADDRESS LC_CTYPE\"
## Allows people in group wheel to run all commands
%wheel\tALL=(ALL)\tALL
## Same thing without a password
# %wheel\tALL=(ALL)\tNOPASSWD: ALL
#includedir /etc/sudoers.d
";

fn stock_core() -> Who {
    let groups = parse_group(
        "root:x:0:\nadm:x:4:core\nwheel:x:10:core\nsudo:x:16:core\nsystemd-journal:x:190:core\ncore:x:1000:\n",
    );
    Who::from_groups("core", 1000, 1000, &groups, &[])
}

fn dedicated() -> Who {
    let groups = parse_group("root:x:0:\nwheel:x:10:core\ndocker:x:990:\nrunner:x:1001:\n");
    Who::from_groups("runner", 1001, 1001, &groups, &[])
}

fn rules(files: &[(&str, &str)], who: &Who) -> Vec<String> {
    let files: Vec<(String, String)> = files.iter().map(|(f, t)| (f.to_string(), t.to_string())).collect();
    sudo_findings(&files, who).rules.into_iter().map(|(f, n, t)| format!("{f}:{n}: {t}")).collect()
}

fn sudo(text: &str, who: &Who) -> Vec<String> {
    rules(&[("/etc/sudoers", text)], who)
}

#[test]
fn groups_are_found_by_membership_and_primary_gid() {
    let who = stock_core();
    assert_eq!(
        who.groups,
        [
            ("core".to_string(), 1000),
            ("adm".into(), 4),
            ("wheel".into(), 10),
            ("sudo".into(), 16),
            ("systemd-journal".into(), 190)
        ]
    );
    assert_eq!(
        root_group_findings(&who),
        ["core is in group wheel (sudo's admin group)", "core is in group sudo (sudo's admin group)"]
    );
    assert!(root_group_findings(&dedicated()).is_empty(), "wheel lists core, not runner");
    // A primary group that grants root, and a GID known only by number (NSS, no file).
    let groups = parse_group("docker:x:990:\n# comment\nbroken line\nwheel:x:ten:runner\n");
    let who = Who::from_groups("runner", 1001, 990, &groups, &[0, 4242]);
    assert_eq!(
        root_group_findings(&who),
        [
            "runner is in group docker (drives the rootful Docker daemon)",
            "runner is in group gid 0 (group 0)"
        ]
    );
    assert!(!who.in_group_named("wheel"), "a line with a non-numeric GID is skipped");
}

#[test]
fn fcos_stock_sudoers_give_core_root_without_a_password() {
    let who = stock_core();
    let found = rules(
        &[("/etc/sudoers", FEDORA_SUDOERS), ("/etc/sudoers.d/coreos-sudo-group", COREOS_SUDO_GROUP)],
        &who,
    );
    assert_eq!(found, ["/etc/sudoers.d/coreos-sudo-group:1: %wheel ALL=(ALL) NOPASSWD: ALL"]);
    // Fedora's main file alone: wheel needs a password, the NOPASSWD line is a comment.
    assert!(sudo(FEDORA_SUDOERS, &who).is_empty());
    assert!(rules(&[("/etc/sudoers.d/coreos-sudo-group", COREOS_SUDO_GROUP)], &dedicated()).is_empty());
}

#[test]
fn sudoers_forms_that_name_the_user() {
    let core = stock_core();
    let yes = [
        "core ALL=(ALL) NOPASSWD: ALL",
        "core ALL=(ALL:ALL) NOPASSWD:ALL",
        "core\tALL = NOPASSWD: ALL",
        "#1000 ALL=(root) NOPASSWD: /usr/bin/systemctl",
        "%#10 ALL=(ALL) NOPASSWD: ALL",
        "alice, core ALL=(ALL) NOPASSWD: ALL",
        "ALL ALL=(ALL) NOPASSWD: ALL",
        "core ALL=(ALL) SETENV: NOPASSWD: ALL",
        "core ALL=(ALL) NOPASSWD: /bin/ls, /bin/sh",
        "core ALL=(ALL) /bin/ls, NOPASSWD: /bin/sh",
        "core ALL=(postgres) NOPASSWD: /bin/psql, (root) /bin/sh",
        "core ALL=(ALL) NOPASSWD: TIMEOUT=5m /bin/sh",
        "core ALL=(ALL) \\\n    NOPASSWD: ALL",
        "core ALL=(ALL) NOPASSWD: ALL # a comment",
    ];
    for line in yes {
        assert_eq!(sudo(line, &core).len(), 1, "{line:?} lets core become root without a password");
    }
    let no = [
        "core ALL=(ALL) ALL",
        "# core ALL=(ALL) NOPASSWD: ALL",
        "alice ALL=(ALL) NOPASSWD: ALL",
        "%docker ALL=(ALL) NOPASSWD: ALL",
        "#1001 ALL=(ALL) NOPASSWD: ALL",
        "ALL, !core ALL=(ALL) NOPASSWD: ALL",
        "core ALL=(postgres) NOPASSWD: ALL",
        "core ALL=(:wheel) NOPASSWD: ALL",
        "core ALL=() NOPASSWD: ALL",
        "core ALL=(ALL, !root) NOPASSWD: ALL",
        "core ALL=(postgres) NOPASSWD: /bin/psql, /bin/pg_dump, (root) PASSWD: /bin/sh",
        "Defaults:core !requiretty",
        "Cmnd_Alias SHELLS = /bin/sh, /bin/bash",
    ];
    for line in no {
        assert!(sudo(line, &core).is_empty(), "{line:?} must not count");
    }
}

#[test]
fn sudoers_aliases_and_defaults() {
    let core = stock_core();
    let text = "User_Alias ADMINS = alice, %wheel\nRunas_Alias ROOTS = root, operator\nADMINS ALL = (ROOTS) NOPASSWD: ALL\n";
    assert_eq!(sudo(text, &core), ["/etc/sudoers:3: ADMINS ALL = (ROOTS) NOPASSWD: ALL"]);
    let text = "User_Alias OTHERS = alice, bob\nOTHERS ALL=(ALL) NOPASSWD: ALL\n";
    assert!(sudo(text, &core).is_empty());
    // `!authenticate` makes every rule password-less, wherever the Defaults line stands.
    let text = "core ALL=(ALL) ALL\nDefaults:core !authenticate\n";
    assert_eq!(sudo(text, &core), ["/etc/sudoers:1: core ALL=(ALL) ALL"]);
    assert!(sudo("core ALL=(ALL) ALL\nDefaults:alice !authenticate\n", &core).is_empty());
    assert!(sudo("Defaults !authenticate\nDefaults authenticate\ncore ALL=(ALL) ALL\n", &core).is_empty());
    // Includes other than sudoers.d are not followed, and said so.
    let files = vec![(
        "/etc/sudoers".to_string(),
        "@include /etc/sudoers.local\n#includedir /etc/sudoers.d\n".to_string(),
    )];
    let found = sudo_findings(&files, &core);
    assert_eq!(found.notes, ["/etc/sudoers:1: not followed: @include /etc/sudoers.local"]);
}

// ------------------------------------------------------------------------------------------------
// Tree fixtures.

struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        // The tree's "/" as a node has it: searchable by everyone.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Tree { dir }
    }

    fn root(&self) -> Root {
        Root::new(self.dir.path())
    }

    fn write(&self, node: &str, text: &str) -> &Self {
        let path = self.root().join(node);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        self
    }

    fn link(&self, node: &str, target: &str) -> &Self {
        let path = self.root().join(node);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, path).unwrap();
        self
    }

    /// A listening Unix socket at `node` with owner, group and mode (needs root for chown).
    fn socket(&self, node: &str, uid: u32, gid: u32, mode: u32) -> std::os::unix::net::UnixListener {
        let path = self.root().join(node);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        listener
    }

    fn context(&self, user: &str, uid: u32, gid: u32, settings: Settings) -> Context {
        let account = Account { name: user.into(), uid, gid, home: format!("/var/home/{user}").into() };
        Context::new(self.root(), settings, account)
    }

    /// A stock FCOS tree as far as this check reads it.
    fn fcos() -> Tree {
        let t = Tree::new();
        t.write(
            "/etc/group",
            "root:x:0:\nwheel:x:10:core\nsudo:x:16:core\nadm:x:4:core\ndocker:x:982:\ncore:x:1000:\nrunner:x:1001:\n",
        )
        .write("/etc/sudoers", FEDORA_SUDOERS)
        .write("/etc/sudoers.d/coreos-sudo-group", COREOS_SUDO_GROUP)
        .write("/usr/lib/systemd/system/docker.socket", "[Socket]\nListenStream=/run/docker.sock\n")
        .write("/usr/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd\n")
        .link("/etc/systemd/system/sockets.target.wants/docker.socket", "/usr/lib/systemd/system/docker.socket")
        .link("/var/run", "../run");
        t
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test]
async fn stock_fcos_core_fails_naming_each_path_to_root() {
    let tree = Tree::fcos();
    let _sock = is_root().then(|| tree.socket("/run/docker.sock", 0, 982, 0o660));
    let cx = tree.context("core", 1000, 1000, Settings::default());
    let inspection = inspect(&cx).await;
    let obs = &inspection.observations[0];
    assert_eq!(obs.name, CHECK);
    assert!(!obs.ok);
    assert!(
        obs.detail.starts_with(
            "core is in group wheel (sudo's admin group); core is in group sudo (sudo's admin group); \
             /etc/sudoers.d/coreos-sudo-group:1: %wheel ALL=(ALL) NOPASSWD: ALL; "
        ),
        "{}",
        obs.detail
    );
    assert!(
        obs.detail.ends_with(
            "docker.socket (rootful dockerd, for root and group docker) is enabled; \
             [runner_privileges] mask_docker = true masks it"
        ),
        "{}",
        obs.detail
    );
    // core is not in group docker: root:docker 0660 is not its way in.
    assert!(!obs.detail.contains("/run/docker.sock ("), "{}", obs.detail);
    assert!(inspection.plan.is_empty(), "mask_docker is off by default");
}

#[tokio::test]
async fn a_dedicated_runner_user_passes() {
    let tree = Tree::fcos();
    let _sock = is_root().then(|| tree.socket("/run/docker.sock", 0, 982, 0o660));
    let cx = tree.context("runner", 1001, 1001, Settings::default());
    let obs = inspect(&cx).await.observations.remove(0);
    assert!(obs.ok, "{}", obs.detail);
    assert_eq!(
        obs.detail,
        "runner has no path to root: no wheel/sudo/docker group, no NOPASSWD rule, no rootful engine socket \
         it can write; docker.socket (rootful dockerd, for root and group docker) is enabled; \
         [runner_privileges] mask_docker = true masks it"
    );
}

#[tokio::test]
async fn a_reachable_rootful_socket_fails_the_check() {
    if !is_root() {
        return; // chown to root needs root
    }
    let tree = Tree::fcos();
    tree.write("/etc/group", "root:x:0:\ndocker:x:982:\npodman:x:983:runner\nrunner:x:1001:\n");
    let _docker = tree.socket("/run/docker.sock", 0, 982, 0o666);
    std::fs::set_permissions(tree.root().join("/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _podman = tree.socket("/run/podman/podman.sock", 0, 983, 0o660);
    std::fs::set_permissions(tree.root().join("/run/podman"), std::fs::Permissions::from_mode(0o750))
        .unwrap();
    std::os::unix::fs::chown(tree.root().join("/run/podman"), Some(0), Some(983)).unwrap();
    let cx = tree.context("runner", 1001, 1001, Settings::default());
    let obs = inspect(&cx).await.observations.remove(0);
    assert!(!obs.ok);
    assert!(
        obs.detail.starts_with(
            "/run/docker.sock (root:docker 0666, a rootful engine) is writable by runner (anyone may); \
             /run/podman/podman.sock (root:podman 0660, a rootful engine) is writable by runner through group podman"
        ),
        "{}",
        obs.detail
    );
    // /var/run/docker.sock is the same socket (/var/run -> ../run): named once.
    assert_eq!(obs.detail.matches("docker.sock (").count(), 1, "{}", obs.detail);

    // A directory on the way the user cannot search hides the socket.
    std::fs::set_permissions(tree.root().join("/run/podman"), std::fs::Permissions::from_mode(0o700))
        .unwrap();
    let obs = inspect(&cx).await.observations.remove(0);
    assert!(!obs.detail.contains("podman.sock"), "{}", obs.detail);
}

#[tokio::test]
async fn the_users_own_socket_behind_docker_sock_is_no_path_to_root() {
    if !is_root() {
        return;
    }
    let tree = Tree::fcos();
    // podman_config's docker_socket_link: /run/docker.sock -> the runner's rootless socket.
    let _own = tree.socket("/run/user/1001/podman/podman.sock", 1001, 1001, 0o660);
    tree.link("/run/docker.sock", "/run/user/1001/podman/podman.sock");
    let cx = tree.context("runner", 1001, 1001, Settings::default());
    let obs = inspect(&cx).await.observations.remove(0);
    assert!(obs.ok, "{}", obs.detail);
}

#[tokio::test]
async fn unreadable_sudoers_are_a_fact_not_an_error() {
    let tree = Tree::fcos();
    std::fs::remove_file(tree.root().join("/etc/sudoers.d/coreos-sudo-group")).unwrap();
    std::fs::create_dir(tree.root().join("/etc/sudoers.d/not-a-file")).unwrap();
    // Unreadable even for root: a directory where the main file should be.
    std::fs::remove_file(tree.root().join("/etc/sudoers")).unwrap();
    std::fs::create_dir(tree.root().join("/etc/sudoers")).unwrap();
    let cx = tree.context("runner", 1001, 1001, Settings::default());
    let obs = inspect(&cx).await.observations.remove(0);
    assert!(!obs.ok, "nothing found is not the same as nothing there");
    assert!(
        obs.detail.starts_with(
            "no path to root found for runner, but not everything could be read; cannot read /etc/sudoers: is a directory"
        ),
        "{}",
        obs.detail
    );
}

#[test]
fn resolving_links_stays_inside_the_tree() {
    let tree = Tree::new();
    tree.write("/run/docker.sock", "").link("/var/run", "/run").link("/srv/loop", "/srv/loop");
    let root = tree.root();
    assert_eq!(
        resolve_in_root(&root, Path::new("/var/run/docker.sock")).unwrap(),
        Path::new("/run/docker.sock")
    );
    tree.link("/var/run2", "../run");
    assert_eq!(
        resolve_in_root(&root, Path::new("/var/run2/docker.sock")).unwrap(),
        Path::new("/run/docker.sock")
    );
    assert_eq!(resolve_in_root(&root, Path::new("/srv/loop")).unwrap_err().raw_os_error(), Some(libc::ELOOP));
    assert!(resolve_in_root(&root, Path::new("/nope/x")).is_err());
}

#[test]
fn mode_bits_decide_access_by_owner_then_group_then_others() {
    let who = dedicated(); // uid 1001, groups runner (1001) only
    assert!(permits(0o600, 1001, 0, &who, 6));
    assert!(!permits(0o066, 1001, 1001, &who, 2), "the owner class applies to the owner alone");
    assert!(permits(0o060, 0, 1001, &who, 6));
    assert!(!permits(0o606, 0, 1001, &who, 2), "the group class applies to members alone");
    assert!(permits(0o602, 0, 0, &who, 2));
    assert!(!permits(0o660, 0, 982, &who, 2));
}

// ------------------------------------------------------------------------------------------------
// The Docker units and the mask plan.

fn facts(name: &str, exists: bool, masked: bool, active: Option<bool>) -> UnitFacts {
    UnitFacts { name: name.into(), exists, masked, enabled: exists && !masked, active }
}

#[test]
fn mask_plan_masks_what_exists_then_stops_what_runs() {
    let live =
        [facts("docker.socket", true, false, Some(true)), facts("docker.service", true, false, Some(false))];
    assert_eq!(mask_plan(false, &live), MaskPlan::default(), "off by default: nothing");
    let plan = mask_plan(true, &live);
    assert_eq!(plan.mask, ["docker.socket", "docker.service"]);
    assert_eq!(plan.stop, ["docker.socket"]);
    assert_eq!(
        plan.lines(),
        [
            "mask docker.socket and docker.service (rootful Docker; [runner_privileges] mask_docker = true)",
            "stop docker.socket"
        ]
    );
    // Masked while running: only the stop is left.
    let masked_running =
        [facts("docker.socket", true, true, Some(false)), facts("docker.service", true, true, Some(true))];
    assert_eq!(
        mask_plan(true, &masked_running),
        MaskPlan { mask: vec![], stop: vec!["docker.service".into()] }
    );
    // No Docker on the node, or files only (nothing known to run): nothing to stop.
    assert!(mask_plan(true, &[facts("docker.socket", false, false, Some(false))]).is_empty());
    let files = [facts("docker.socket", true, false, None), facts("docker.service", true, false, None)];
    assert_eq!(mask_plan(true, &files).stop, Vec::<String>::new());
}

#[test]
fn unit_files_say_enabled_masked_or_absent() {
    let tree = Tree::fcos();
    let root = tree.root();
    assert_eq!(unit_facts_from_files(&root, "docker.socket"), facts("docker.socket", true, false, None));
    let service = unit_facts_from_files(&root, "docker.service");
    assert!(service.exists && !service.enabled && !service.masked);
    assert!(!unit_facts_from_files(&root, "nosuch.socket").exists);
    tree.link("/etc/systemd/system/docker.service", "/dev/null");
    let service = unit_facts_from_files(&root, "docker.service");
    assert!(service.exists && service.masked);
    assert_eq!(docker_note(&[facts("docker.socket", true, true, None)]).unwrap(), "docker.socket is masked");
    assert_eq!(docker_note(&[facts("docker.socket", false, false, None)]), None);
}

#[tokio::test]
async fn mask_docker_masks_both_units_in_a_tree_once() {
    let tree = Tree::fcos();
    let mut settings = Settings::default();
    settings.runner_privileges.mask_docker = true;
    let cx = tree.context("runner", 1001, 1001, settings);
    assert!(Step::RunnerPrivileges.repairs(&cx));
    let before = inspect(&cx).await;
    assert_eq!(
        before.plan,
        ["mask docker.socket and docker.service (rootful Docker; [runner_privileges] mask_docker = true)"]
    );
    assert!(before.observations[0].ok, "a plan, not a failure: {:?}", before.observations);
    assert!(before.wants_repair());
    let changes = converge(&cx).await.unwrap();
    assert_eq!(
        changes,
        ["masked docker.socket and docker.service (rootful Docker; [runner_privileges] mask_docker = true)"]
    );
    for unit in DOCKER_UNITS {
        let link = tree.root().join(format!("/etc/systemd/system/{unit}"));
        assert_eq!(std::fs::read_link(link).unwrap(), Path::new("/dev/null"));
    }
    let after = inspect(&cx).await;
    assert!(after.plan.is_empty(), "{:?}", after.plan);
    assert!(
        after.observations[0].detail.ends_with("; docker.socket is masked"),
        "{}",
        after.observations[0].detail
    );
    assert!(converge(&cx).await.unwrap().is_empty(), "converged: nothing to do");
}

#[test]
fn a_local_unit_file_is_not_replaced_by_a_mask() {
    let tree = Tree::fcos();
    tree.write("/etc/systemd/system/docker.service", "[Service]\nExecStart=/usr/local/bin/dockerd\n");
    let plan = MaskPlan { mask: vec!["docker.service".into()], stop: vec![] };
    let err = mask_in_tree(&tree.root(), &plan).unwrap_err();
    assert!(err.to_string().contains("is a file (a local unit)"), "{err}");
}

#[test]
fn the_step_is_advisory_and_file_only() {
    assert!(!crate::checks::default_policy(CHECK).required);
    assert!(crate::steps::check_spec(CHECK).is_some_and(|c| c.advisory));
    assert!(!Step::RunnerPrivileges.needs_live_system());
    assert_eq!(Step::RunnerPrivileges.checks().collect::<Vec<_>>(), [CHECK]);
    let tree = Tree::new();
    let cx = tree.context("runner", 1001, 1001, Settings::default());
    assert!(!Step::RunnerPrivileges.repairs(&cx), "inspect only unless mask_docker");
    assert!(Step::for_context(&cx).contains(&Step::RunnerPrivileges), "runs with --root");
}
