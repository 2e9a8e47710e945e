//! Test doubles for the services the agent talks to over D-Bus: a private `dbus-daemon`, systemd's
//! manager (`org.freedesktop.systemd1`) and logind (`org.freedesktop.login1`). They answer the
//! real bus names, object paths, interface names and signatures, so the agent's own zbus_systemd
//! proxies talk to them unchanged.
//!
//! Everything the doubles know, how they should behave and what they were asked lives in one
//! [`World`], shared by the interface objects and the test as `Arc<Mutex<World>>`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use executor_agent::systemd::unit_object_path;
use zbus::message::Header;
use zbus::object_server::{ObjectServer, SignalEmitter};
use zbus::{interface, Connection, OwnedObjectPath};

pub const SYSTEMD_NAME: &str = "org.freedesktop.systemd1";
pub const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
pub const LOGIND_NAME: &str = "org.freedesktop.login1";
pub const LOGIND_PATH: &str = "/org/freedesktop/login1";

/// The state shared by the doubles and the test.
pub type Shared = Arc<Mutex<World>>;

// ------------------------------------------------------------------------------------------------
// The bus

/// A private `dbus-daemon` listening in a temporary directory; killed on drop.
pub struct Bus {
    child: Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    pub fn start() -> Bus {
        keep_off_the_host_system_bus();
        let dir = tempfile::tempdir().expect("creating a directory for the private bus");
        let config = dir.path().join("bus.conf");
        let socket = dir.path().join("bus");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("writing the bus configuration");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting dbus-daemon (Debian package dbus-daemon, pulled in by dbus)");
        let mut address = String::new();
        BufReader::new(child.stdout.take().expect("dbus-daemon stdout"))
            .read_line(&mut address)
            .expect("reading the bus address");
        let address = address.trim().to_string();
        assert!(!address.is_empty(), "dbus-daemon printed no address");
        Bus { child, address, _dir: dir }
    }

    pub async fn connect(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("connecting to the private bus")
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SystemBus` reconnects to the system bus after an error; make sure no test can reach the
/// host's real one (and its real logind and systemd) that way.
fn keep_off_the_host_system_bus() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/executor-agent-tests/system_bus_socket",
        )
    });
}

// ------------------------------------------------------------------------------------------------
// The shared world

/// What the doubles know (units, jobs, users), how they behave, and what they were asked.
#[derive(Debug, Default)]
pub struct World {
    /// Every method call to either double, in the order received, e.g. `StartUnit podman.socket replace`.
    pub calls: Vec<String>,
    /// What happened to jobs, in order, e.g. `job 1 start podman.socket done`.
    pub events: Vec<String>,
    /// Units systemd has loaded; `LoadUnit` of any other name adds it as `not-found`.
    pub units: BTreeMap<String, Unit>,
    /// How each unit's jobs end; a unit with no plan gets `JobPlan::default()`.
    pub plans: BTreeMap<String, JobPlan>,
    /// Jobs queued and not yet removed, by unit.
    pub pending: BTreeMap<String, Job>,
    /// The last job ID handed out.
    pub last_job: u32,
    /// Unique names of the clients that called `Subscribe` (a second call is refused, as by systemd).
    pub subscribers: HashSet<String>,
    /// Users logind knows (has a session or linger for), with their `Linger` flag.
    pub users: BTreeMap<u32, bool>,
    /// How long the start of `user@UID.service` that logind queues on `SetUserLinger` takes.
    pub logind_start_delay: Duration,
}

/// One unit's `org.freedesktop.systemd1.Unit` properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub unit_file_state: String,
    pub triggers: Vec<String>,
}

impl Unit {
    /// A loaded unit with the given unit file state, active state and sub-state.
    pub fn loaded(unit_file_state: &str, active_state: &str, sub_state: &str) -> Unit {
        Unit {
            load_state: "loaded".into(),
            active_state: active_state.into(),
            sub_state: sub_state.into(),
            unit_file_state: unit_file_state.into(),
            triggers: Vec::new(),
        }
    }

    /// What systemd answers for a name with no unit file.
    pub fn not_found() -> Unit {
        Unit {
            load_state: "not-found".into(),
            unit_file_state: String::new(),
            ..Unit::loaded("", "inactive", "dead")
        }
    }

    /// A unit linked to /dev/null.
    pub fn masked() -> Unit {
        Unit { load_state: "masked".into(), ..Unit::loaded("masked", "inactive", "dead") }
    }

    /// The units this one activates (a socket's service).
    pub fn triggering(mut self, units: &[&str]) -> Unit {
        self.triggers = units.iter().map(|u| u.to_string()).collect();
        self
    }
}

/// The kind of a job, after the method that queued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    Start,
    Stop,
    Restart,
}

impl JobKind {
    fn word(self) -> &'static str {
        match self {
            JobKind::Start => "start",
            JobKind::Stop => "stop",
            JobKind::Restart => "restart",
        }
    }
}

/// A queued job: `/org/freedesktop/systemd1/job/ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: u32,
    pub kind: JobKind,
    pub unit: String,
}

impl Job {
    pub fn path(&self) -> OwnedObjectPath {
        job_path(self.id)
    }
}

pub fn job_path(id: u32) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{SYSTEMD_PATH}/job/{id}")).expect("job path")
}

/// When a job's `JobRemoved` is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// From inside the method handler, before its reply (systemd does this for jobs that
    /// finish at once).
    BeforeReply,
    /// This long after the reply.
    AfterReply(Duration),
    /// Never: the job stays queued.
    Never,
}

/// How a unit's jobs end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobPlan {
    pub removal: Removal,
    /// `JobRemoved`'s result: done, failed, timeout, canceled, skipped…
    pub result: &'static str,
    /// Send first a `JobRemoved` for another job (ID + 100) of the same unit, with this result.
    pub decoy: Option<&'static str>,
}

impl Default for JobPlan {
    fn default() -> Self {
        JobPlan { removal: Removal::AfterReply(Duration::from_millis(10)), result: "done", decoy: None }
    }
}

impl World {
    fn call(&mut self, call: String) {
        self.calls.push(call);
    }

    fn plan(&self, unit: &str) -> JobPlan {
        self.plans.get(unit).copied().unwrap_or_default()
    }

    fn unit(&mut self, name: &str) -> &mut Unit {
        self.units.entry(name.to_string()).or_insert_with(Unit::not_found)
    }

    fn new_job(&mut self, unit: &str, kind: JobKind) -> Job {
        self.last_job += 1;
        let job = Job { id: self.last_job, kind, unit: unit.to_string() };
        self.pending.insert(unit.to_string(), job.clone());
        job
    }

    /// Applies a finished job to its unit, as systemd would.
    fn finish(&mut self, job: &Job, result: &str) {
        if self.pending.get(&job.unit) == Some(job) {
            self.pending.remove(&job.unit);
        }
        let unit = self.unit(&job.unit);
        let socket = job.unit.ends_with(".socket");
        match (result, job.kind) {
            ("done", JobKind::Start | JobKind::Restart) => {
                unit.active_state = "active".into();
                unit.sub_state = if socket { "listening" } else { "running" }.into();
            }
            ("done", JobKind::Stop) => {
                unit.active_state = "inactive".into();
                unit.sub_state = "dead".into();
            }
            ("failed" | "timeout", _) => {
                unit.active_state = "failed".into();
                unit.sub_state = "failed".into();
            }
            _ => {}
        }
        self.events.push(format!("job {} {} {} {result}", job.id, job.kind.word(), job.unit));
    }
}

/// Ends a job according to its plan: `BeforeReply` before returning, the others in a task.
async fn carry_out(world: Shared, systemd: Connection, job: Job, plan: JobPlan) {
    let end = |world: Shared, systemd: Connection, job: Job, plan: JobPlan| async move {
        let emitter = SignalEmitter::new(&systemd, SYSTEMD_PATH).expect("manager path");
        if let Some(result) = plan.decoy {
            let other = Job { id: job.id + 100, ..job.clone() };
            world
                .lock()
                .unwrap()
                .events
                .push(format!("decoy JobRemoved {} {} {result}", other.id, other.unit));
            SystemdManager::job_removed(&emitter, other.id, other.path(), &other.unit, result)
                .await
                .expect("sending the decoy JobRemoved");
        }
        if plan.removal == Removal::Never {
            return;
        }
        world.lock().unwrap().finish(&job, plan.result);
        // The test may be over and the bus gone: nothing to report to then.
        let _ = SystemdManager::job_removed(&emitter, job.id, job.path(), &job.unit, plan.result).await;
    };
    match plan.removal {
        Removal::BeforeReply => end(world, systemd, job, plan).await,
        Removal::AfterReply(delay) => {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                end(world, systemd, job, plan).await
            });
        }
        Removal::Never => {
            tokio::spawn(end(world, systemd, job, plan));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// systemd

/// systemd's errors, as `org.freedesktop.systemd1.NAME`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.systemd1")]
pub enum SystemdError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
    UnitMasked(String),
    AlreadySubscribed(String),
}

/// `org.freedesktop.systemd1.Manager` at `/org/freedesktop/systemd1`: loads units, queues jobs
/// and announces their end with `JobRemoved`.
pub struct SystemdManager {
    world: Shared,
}

impl SystemdManager {
    /// StartUnit, StopUnit and RestartUnit: queue a job (or merge into the unit's pending job of
    /// the same kind, as systemd does with mode "replace") and return its path.
    async fn queue(
        &self,
        conn: &Connection,
        method: &str,
        unit: String,
        mode: String,
        kind: JobKind,
    ) -> Result<OwnedObjectPath, SystemdError> {
        let (job, plan) = {
            let mut world = self.world.lock().unwrap();
            world.call(format!("{method} {unit} {mode}"));
            match world.units.get(&unit).map(|u| u.load_state.as_str()) {
                Some("loaded") => {}
                // systemd refuses every job but a stop on a masked unit.
                Some("masked") if kind == JobKind::Stop => {}
                Some("masked") => return Err(SystemdError::UnitMasked(format!("Unit {unit} is masked."))),
                _ => return Err(SystemdError::NoSuchUnit(format!("Unit {unit} not found."))),
            }
            if let Some(job) = world.pending.get(&unit).filter(|j| j.kind == kind).cloned() {
                world.events.push(format!("{method} {unit} merged into job {}", job.id));
                return Ok(job.path());
            }
            let job = world.new_job(&unit, kind);
            world.events.push(format!("job {} {} {unit} queued by {method}", job.id, kind.word()));
            (job, world.plan(&unit))
        };
        let path = job.path();
        carry_out(self.world.clone(), conn.clone(), job, plan).await;
        Ok(path)
    }
}

#[interface(name = "org.freedesktop.systemd1.Manager")]
impl SystemdManager {
    async fn load_unit(
        &self,
        name: String,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        {
            let mut world = self.world.lock().unwrap();
            world.call(format!("LoadUnit {name}"));
            world.unit(&name);
        }
        let path = unit_object_path(&name);
        server.at(path.as_str(), UnitObject { name, world: self.world.clone() }).await?;
        OwnedObjectPath::try_from(path).map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    async fn start_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, SystemdError> {
        self.queue(conn, "StartUnit", name, mode, JobKind::Start).await
    }

    async fn stop_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, SystemdError> {
        self.queue(conn, "StopUnit", name, mode, JobKind::Stop).await
    }

    async fn restart_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, SystemdError> {
        self.queue(conn, "RestartUnit", name, mode, JobKind::Restart).await
    }

    fn reset_failed_unit(&self, name: String) -> Result<(), SystemdError> {
        let mut world = self.world.lock().unwrap();
        world.call(format!("ResetFailedUnit {name}"));
        let unit = world
            .units
            .get_mut(&name)
            .ok_or_else(|| SystemdError::NoSuchUnit(format!("Unit {name} not loaded.")))?;
        if unit.active_state == "failed" {
            unit.active_state = "inactive".into();
            unit.sub_state = "dead".into();
        }
        Ok(())
    }

    fn enable_unit_files(
        &self,
        files: Vec<String>,
        runtime: bool,
        force: bool,
    ) -> (bool, Vec<(String, String, String)>) {
        let mut world = self.world.lock().unwrap();
        world.call(format!("EnableUnitFiles {} {runtime} {force}", files.join(",")));
        let mut changes = Vec::new();
        for file in files {
            let unit = world.unit(&file);
            if unit.load_state == "loaded" {
                unit.unit_file_state = "enabled".into();
                changes.push((
                    "symlink".into(),
                    format!("/etc/systemd/user/sockets.target.wants/{file}"),
                    format!("/usr/lib/systemd/user/{file}"),
                ));
            }
        }
        (false, changes)
    }

    /// Links each unit to /dev/null in /etc (systemd shows it masked after the Reload that
    /// follows; the double at once).
    fn mask_unit_files(
        &self,
        files: Vec<String>,
        runtime: bool,
        force: bool,
    ) -> Vec<(String, String, String)> {
        let mut world = self.world.lock().unwrap();
        world.call(format!("MaskUnitFiles {} {runtime} {force}", files.join(",")));
        let mut changes = Vec::new();
        for file in files {
            let unit = world.unit(&file);
            unit.load_state = "masked".into();
            unit.unit_file_state = "masked".into();
            changes.push(("symlink".into(), format!("/etc/systemd/system/{file}"), "/dev/null".into()));
        }
        changes
    }

    fn reload(&self) {
        self.world.lock().unwrap().call("Reload".into());
    }

    fn subscribe(&self, #[zbus(header)] header: Header<'_>) -> Result<(), SystemdError> {
        let mut world = self.world.lock().unwrap();
        world.call("Subscribe".into());
        let sender = header.sender().map(|s| s.to_string()).unwrap_or_default();
        if !world.subscribers.insert(sender) {
            return Err(SystemdError::AlreadySubscribed("Client is already subscribed.".into()));
        }
        Ok(())
    }

    #[zbus(signal)]
    async fn job_removed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        job: OwnedObjectPath,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

/// `org.freedesktop.systemd1.Unit` at `/org/freedesktop/systemd1/unit/<escaped name>`: one
/// unit's state, read from the world at each property read.
pub struct UnitObject {
    name: String,
    world: Shared,
}

impl UnitObject {
    fn get<T>(&self, f: impl FnOnce(&Unit) -> T) -> T {
        let mut world = self.world.lock().unwrap();
        f(world.unit(&self.name))
    }
}

#[interface(name = "org.freedesktop.systemd1.Unit")]
impl UnitObject {
    #[zbus(property)]
    fn load_state(&self) -> String {
        self.get(|u| u.load_state.clone())
    }

    #[zbus(property)]
    fn active_state(&self) -> String {
        self.get(|u| u.active_state.clone())
    }

    #[zbus(property)]
    fn sub_state(&self) -> String {
        self.get(|u| u.sub_state.clone())
    }

    #[zbus(property)]
    fn unit_file_state(&self) -> String {
        self.get(|u| u.unit_file_state.clone())
    }

    #[zbus(property)]
    fn triggers(&self) -> Vec<String> {
        self.get(|u| u.triggers.clone())
    }
}

// ------------------------------------------------------------------------------------------------
// logind

/// logind's errors, as `org.freedesktop.login1.NAME`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.login1")]
pub enum LogindError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUser(String),
}

pub fn user_path(uid: u32) -> String {
    format!("{LOGIND_PATH}/user/_{uid}")
}

/// `org.freedesktop.login1.Manager` at `/org/freedesktop/login1`: knows users and turns linger
/// on, which queues the start of the user's manager in the systemd double.
pub struct LogindManager {
    world: Shared,
    /// The systemd double's connection, to send `JobRemoved` for the job logind queues.
    systemd: Connection,
}

#[interface(name = "org.freedesktop.login1.Manager")]
impl LogindManager {
    async fn get_user(
        &self,
        uid: u32,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, LogindError> {
        let known = {
            let mut world = self.world.lock().unwrap();
            world.call(format!("GetUser {uid}"));
            world.users.contains_key(&uid)
        };
        if !known {
            return Err(LogindError::NoSuchUser(format!("User ID {uid} is not logged in or lingering")));
        }
        server.at(user_path(uid), UserObject { uid, world: self.world.clone() }).await?;
        Ok(OwnedObjectPath::try_from(user_path(uid))?)
    }

    async fn set_user_linger(
        &self,
        uid: u32,
        enable: bool,
        interactive: bool,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), LogindError> {
        let unit = format!("user@{uid}.service");
        let queued = {
            let mut world = self.world.lock().unwrap();
            world.call(format!("SetUserLinger {uid} {enable} {interactive}"));
            world.users.insert(uid, enable);
            let startable = world
                .units
                .get(&unit)
                .is_some_and(|u| u.load_state == "loaded" && u.active_state != "active");
            if enable && startable && !world.pending.contains_key(&unit) {
                // logind asks systemd to start the user's manager and returns at once.
                let job = world.new_job(&unit, JobKind::Start);
                world.events.push(format!("job {} start {unit} queued by logind", job.id));
                let plan = world.plan(&unit);
                let removal = match plan.removal {
                    Removal::Never => Removal::Never,
                    _ => Removal::AfterReply(world.logind_start_delay),
                };
                Some((job, JobPlan { removal, decoy: None, ..plan }))
            } else {
                None
            }
        };
        server.at(user_path(uid), UserObject { uid, world: self.world.clone() }).await?;
        if let Some((job, plan)) = queued {
            carry_out(self.world.clone(), self.systemd.clone(), job, plan).await;
        }
        Ok(())
    }
}

/// `org.freedesktop.login1.User` at `/org/freedesktop/login1/user/_UID`.
pub struct UserObject {
    uid: u32,
    world: Shared,
}

#[interface(name = "org.freedesktop.login1.User")]
impl UserObject {
    #[zbus(property)]
    fn linger(&self) -> bool {
        self.world.lock().unwrap().users.get(&self.uid).copied().unwrap_or(false)
    }
}

// ------------------------------------------------------------------------------------------------
// The doubles together

/// A private bus with the systemd double and, unless left out, the logind double on it, each
/// on its own connection like the real services.
pub struct Doubles {
    pub world: Shared,
    systemd: Connection,
    logind: Option<Connection>,
    // Last: dropped after the connections.
    bus: Bus,
}

impl Doubles {
    /// systemd and logind.
    pub async fn start() -> Doubles {
        let mut doubles = Doubles::without_logind().await;
        doubles.start_logind().await;
        doubles
    }

    /// systemd only: logind is not on the bus.
    pub async fn without_logind() -> Doubles {
        let bus = Bus::start();
        let world = Shared::new(Mutex::new(World {
            logind_start_delay: Duration::from_millis(50),
            ..World::default()
        }));
        let systemd = zbus::connection::Builder::address(bus.address.as_str())
            .name(SYSTEMD_NAME)
            .serve_at(SYSTEMD_PATH, SystemdManager { world: world.clone() })
            .build()
            .await
            .expect("starting the systemd double");
        Doubles { world, systemd, logind: None, bus }
    }

    /// Puts logind on the bus (again).
    pub async fn start_logind(&mut self) {
        let logind = zbus::connection::Builder::address(self.bus.address.as_str())
            .name(LOGIND_NAME)
            .serve_at(LOGIND_PATH, LogindManager { world: self.world.clone(), systemd: self.systemd.clone() })
            .build()
            .await
            .expect("starting the logind double");
        self.logind = Some(logind);
    }

    /// A new client connection, like the agent's.
    pub async fn client(&self) -> Connection {
        self.bus.connect().await
    }

    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    pub fn add_unit(&self, name: &str, unit: Unit) {
        self.world().units.insert(name.to_string(), unit);
    }

    pub fn plan(&self, unit: &str, plan: JobPlan) {
        self.world().plans.insert(unit.to_string(), plan);
    }

    pub fn unit(&self, name: &str) -> Unit {
        self.world().units.get(name).cloned().unwrap_or_else(|| panic!("{name} is not a unit of the double"))
    }

    pub fn calls(&self) -> Vec<String> {
        self.world().calls.clone()
    }

    pub fn events(&self) -> Vec<String> {
        self.world().events.clone()
    }
}
