//! The agent's D-Bus work against doubles of systemd and logind on a private bus: reading unit
//! state, running jobs to their `JobRemoved`, `ensure_socket`, and the linger step.

mod dbus_doubles;

use std::future::Future;
use std::time::{Duration, Instant};

use dbus_doubles::{job_path, Doubles, JobPlan, Removal, Unit};
use executor_agent::checks::Observation;
use executor_agent::config::Settings;
use executor_agent::paths::Root;
use executor_agent::runner_user::Account;
use executor_agent::steps::{Context, Inspection, Step, SystemBus};
use executor_agent::systemd::{self, UnitState};
use executor_agent::user_manager::{ensure_socket, EnsureReport};
use futures_util::StreamExt;
use zbus::message::{Sequence, Type};
use zbus::{Message, MessageStream, OwnedObjectPath};

const SOCKET: &str = "podman.socket";
const SERVICE: &str = "podman.service";
const USER_MANAGER: &str = "user@1000.service";
const TIMEOUT: Duration = Duration::from_secs(2);

/// Fails the test instead of hanging it.
async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut).await.expect("no answer within 10 s")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn after(delay_ms: u64, result: &'static str) -> JobPlan {
    JobPlan { removal: Removal::AfterReply(Duration::from_millis(delay_ms)), result, decoy: None }
}

/// Everything the client connection received after `stream` was opened, until 100 ms of quiet.
async fn received(stream: &mut MessageStream) -> Vec<Message> {
    let mut messages = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_millis(100), stream.next()).await {
        messages.push(message);
    }
    messages
}

/// Where the `JobRemoved` signal for `job` and the method reply that returned `job` came.
fn arrival_of(messages: &[Message], job: &OwnedObjectPath) -> (Sequence, Sequence) {
    let signal = messages
        .iter()
        .find(|m| {
            m.message_type() == Type::Signal
                && m.header().member().is_some_and(|n| n.as_str() == "JobRemoved")
                && m.body().deserialize::<(u32, OwnedObjectPath, String, String)>().is_ok_and(|b| &b.1 == job)
        })
        .expect("the client received no JobRemoved for the job");
    let reply = messages
        .iter()
        .find(|m| {
            m.message_type() == Type::MethodReturn
                && m.body().deserialize::<OwnedObjectPath>().is_ok_and(|path| &path == job)
        })
        .expect("the client received no reply returning the job");
    (signal.recv_position(), reply.recv_position())
}

fn core() -> Account {
    Account { name: "core".into(), uid: 1000, gid: 1000, home: "/var/home/core".into() }
}

fn context(conn: zbus::Connection) -> Context {
    let mut settings = Settings::default();
    settings.linger.user_manager_timeout = TIMEOUT;
    Context { system_bus: SystemBus::with_connection(conn), ..Context::new(Root::host(), settings, core()) }
}

// ------------------------------------------------------------------------------------------------
// systemd::unit_state

#[tokio::test]
async fn unit_state_reads_the_five_properties_of_a_loaded_unit() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "active", "listening").triggering(&[SERVICE]));
    let conn = d.client().await;
    let state = bounded(systemd::unit_state(&conn, SOCKET)).await.unwrap();
    assert_eq!(
        state,
        UnitState {
            name: SOCKET.into(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "listening".into(),
            unit_file_state: "enabled".into(),
            triggers: strings(&[SERVICE]),
            // The double has no org.freedesktop.systemd1.Socket interface: no Result.
            result: String::new(),
        }
    );
    assert_eq!(state.summary(), "podman.socket enabled, active (listening)");
    assert_eq!(d.calls(), ["LoadUnit podman.socket"]);
}

#[tokio::test]
async fn unit_state_of_a_unit_without_a_file_is_not_found() {
    let d = Doubles::without_logind().await;
    let conn = d.client().await;
    let state = bounded(systemd::unit_state(&conn, "ghost.service")).await.unwrap();
    assert_eq!((state.load_state.as_str(), state.active_state.as_str()), ("not-found", "inactive"));
    assert_eq!(state.unit_file_state, "");
    assert!(!state.is_enabled());
}

// ------------------------------------------------------------------------------------------------
// systemd::run_job (through start, stop, restart)

#[tokio::test]
async fn start_catches_a_job_removed_sent_before_the_method_reply() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead"));
    d.plan(SOCKET, JobPlan { removal: Removal::BeforeReply, ..JobPlan::default() });
    let conn = d.client().await;
    let mut raw = MessageStream::from(&conn);
    let manager = systemd::manager(&conn).await.unwrap();

    bounded(systemd::start(&manager, SOCKET, TIMEOUT)).await.expect("start");

    // The double really did send the signal first, and the client really did receive it first.
    let (signal, reply) = arrival_of(&received(&mut raw).await, &job_path(1));
    assert!(signal < reply, "JobRemoved arrived after the StartUnit reply: the test proves nothing");
    assert_eq!(d.calls(), ["Subscribe", "StartUnit podman.socket replace"]);
    assert_eq!(
        d.events(),
        ["job 1 start podman.socket queued by StartUnit", "job 1 start podman.socket done"]
    );
    assert_eq!(d.unit(SOCKET).active_state, "active");
}

#[tokio::test]
async fn start_waits_for_a_job_removed_sent_after_the_reply() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead"));
    d.plan(SOCKET, after(200, "done"));
    let conn = d.client().await;
    let mut raw = MessageStream::from(&conn);
    let manager = systemd::manager(&conn).await.unwrap();

    let started = Instant::now();
    bounded(systemd::start(&manager, SOCKET, TIMEOUT)).await.expect("start");
    let took = started.elapsed();
    // Read before anything else can run: the job must be over when start returns.
    assert_eq!(d.unit(SOCKET).active_state, "active", "start returned before its job finished");
    assert!(took >= Duration::from_millis(200), "start returned after {took:?}");

    let (signal, reply) = arrival_of(&received(&mut raw).await, &job_path(1));
    assert!(reply < signal, "the double sent JobRemoved before the reply");
}

#[tokio::test]
async fn a_job_that_does_not_end_in_done_is_an_error_naming_unit_and_result() {
    for result in ["failed", "timeout", "canceled", "dependency"] {
        let d = Doubles::without_logind().await;
        d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead"));
        d.plan(SOCKET, after(20, result));
        let conn = d.client().await;
        let manager = systemd::manager(&conn).await.unwrap();
        let err = bounded(systemd::start(&manager, SOCKET, TIMEOUT)).await.expect_err(result);
        assert_eq!(format!("{err:#}"), format!("starting podman.socket: job {result}"));
    }
}

#[tokio::test]
async fn a_skipped_job_counts_as_success() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead"));
    d.plan(SOCKET, after(20, "skipped"));
    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();
    bounded(systemd::start(&manager, SOCKET, TIMEOUT)).await.expect("a skipped job is not an error");
}

#[tokio::test]
async fn a_job_removed_that_never_comes_times_out_within_the_timeout() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead"));
    d.plan(SOCKET, JobPlan { removal: Removal::Never, ..JobPlan::default() });
    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();

    let started = Instant::now();
    let err = bounded(systemd::start(&manager, SOCKET, Duration::from_millis(300))).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(format!("{err:#}"), "starting podman.socket: no result within 300ms: deadline has elapsed");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "timed out after {took:?}");
}

#[tokio::test]
async fn a_job_removed_for_another_job_is_ignored() {
    // A decoy that fails before the job that succeeds: taking it would fail the start.
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead"));
    d.plan(SOCKET, JobPlan { decoy: Some("failed"), ..after(50, "done") });
    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();
    bounded(systemd::start(&manager, SOCKET, TIMEOUT)).await.expect("the decoy's result was taken");
    assert_eq!(
        d.events(),
        [
            "job 1 start podman.socket queued by StartUnit",
            "decoy JobRemoved 101 podman.socket failed",
            "job 1 start podman.socket done"
        ]
    );

    // A decoy that succeeds while the job itself never ends: taking it would end the wait early.
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead"));
    d.plan(SOCKET, JobPlan { removal: Removal::Never, result: "done", decoy: Some("done") });
    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();
    let err = bounded(systemd::start(&manager, SOCKET, Duration::from_millis(300))).await.unwrap_err();
    assert_eq!(err.to_string(), "starting podman.socket: no result within 300ms");
    assert_eq!(
        d.events(),
        ["job 1 start podman.socket queued by StartUnit", "decoy JobRemoved 101 podman.socket done"]
    );
}

#[tokio::test]
async fn a_refused_job_names_the_unit_and_systemds_reason() {
    let d = Doubles::without_logind().await;
    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();
    let err = bounded(systemd::start(&manager, "ghost.service", TIMEOUT)).await.unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "starting ghost.service: request refused: org.freedesktop.systemd1.NoSuchUnit: Unit ghost.service not found."
    );
}

#[tokio::test]
async fn stop_and_restart_queue_their_own_jobs() {
    let d = Doubles::without_logind().await;
    d.add_unit(SERVICE, Unit::loaded("disabled", "active", "running"));
    d.add_unit(SOCKET, Unit::loaded("enabled", "active", "listening"));

    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();
    bounded(systemd::stop(&manager, SERVICE, TIMEOUT)).await.expect("stop");
    assert_eq!(
        (d.unit(SERVICE).active_state.as_str(), d.unit(SERVICE).sub_state.as_str()),
        ("inactive", "dead")
    );

    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();
    bounded(systemd::restart(&manager, SOCKET, TIMEOUT)).await.expect("restart");

    assert_eq!(
        d.calls(),
        ["Subscribe", "StopUnit podman.service replace", "Subscribe", "RestartUnit podman.socket replace"]
    );
    assert_eq!(d.events()[3], "job 2 restart podman.socket done");
}

/// systemd refuses a second `Subscribe` from the same connection with
/// `org.freedesktop.systemd1.AlreadySubscribed` (core/dbus-manager.c, method_subscribe), and so
/// does the double: the second job must not fail on it.
#[tokio::test]
async fn two_jobs_on_one_connection() {
    let d = Doubles::without_logind().await;
    d.add_unit(SERVICE, Unit::loaded("disabled", "active", "running"));
    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();
    bounded(systemd::stop(&manager, SERVICE, TIMEOUT)).await.expect("first job");
    bounded(systemd::start(&manager, SERVICE, TIMEOUT)).await.expect("second job on the same connection");
    assert_eq!(d.unit(SERVICE).active_state, "active");
    assert_eq!(
        d.calls(),
        ["Subscribe", "StopUnit podman.service replace", "Subscribe", "StartUnit podman.service replace"]
    );
    // The double did refuse the second Subscribe.
    let conn = d.client().await;
    let manager = systemd::manager(&conn).await.unwrap();
    manager.subscribe().await.expect("first Subscribe of a new connection");
    let err = manager.subscribe().await.unwrap_err();
    assert_eq!(err.to_string(), "org.freedesktop.systemd1.AlreadySubscribed: Client is already subscribed.");
}

// ------------------------------------------------------------------------------------------------
// user_manager::ensure_socket

#[tokio::test]
async fn ensure_socket_starts_an_enabled_socket_that_is_not_running() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead").triggering(&[SERVICE]));
    let conn = d.client().await;
    let report = bounded(ensure_socket(&conn, SOCKET, false, TIMEOUT)).await.unwrap();
    assert_eq!(report.changes, ["started podman.socket"]);
    assert_eq!(report.state.summary(), "podman.socket enabled, active (listening)");
    assert_eq!(
        d.calls(),
        ["LoadUnit podman.socket", "Subscribe", "StartUnit podman.socket replace", "LoadUnit podman.socket"]
    );
}

#[tokio::test]
async fn ensure_socket_enables_and_reloads_before_starting_a_disabled_socket() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("disabled", "inactive", "dead"));
    let conn = d.client().await;
    let report = bounded(ensure_socket(&conn, SOCKET, false, TIMEOUT)).await.unwrap();
    assert_eq!(report.changes, ["enabled podman.socket", "started podman.socket"]);
    assert_eq!(report.state.summary(), "podman.socket enabled, active (listening)");
    assert_eq!(
        d.calls(),
        [
            "LoadUnit podman.socket",
            "EnableUnitFiles podman.socket false true",
            "Reload",
            "Subscribe",
            "StartUnit podman.socket replace",
            "LoadUnit podman.socket"
        ]
    );
}

#[tokio::test]
async fn ensure_socket_resets_a_failed_socket_before_starting_it() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "failed", "failed"));
    let conn = d.client().await;
    let report = bounded(ensure_socket(&conn, SOCKET, false, TIMEOUT)).await.unwrap();
    assert_eq!(report.changes, ["started podman.socket"]);
    assert_eq!(
        d.calls(),
        [
            "LoadUnit podman.socket",
            "ResetFailedUnit podman.socket",
            "Subscribe",
            "StartUnit podman.socket replace",
            "LoadUnit podman.socket"
        ]
    );
}

#[tokio::test]
async fn ensure_socket_leaves_an_enabled_listening_socket_alone() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "active", "listening"));
    let conn = d.client().await;
    let report = bounded(ensure_socket(&conn, SOCKET, false, TIMEOUT)).await.unwrap();
    assert_eq!(report, EnsureReport { changes: vec![], state: report.state.clone() });
    assert_eq!(d.calls(), ["LoadUnit podman.socket", "LoadUnit podman.socket"]);
}

#[tokio::test]
async fn ensure_socket_restart_stops_the_running_service_before_restarting_the_socket() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "active", "running").triggering(&[SERVICE]));
    d.add_unit(SERVICE, Unit::loaded("disabled", "active", "running"));
    let conn = d.client().await;
    let report = bounded(ensure_socket(&conn, SOCKET, true, TIMEOUT)).await.unwrap();
    assert_eq!(report.changes, ["restarted podman.socket"]);
    assert_eq!(d.unit(SERVICE).active_state, "inactive");
    assert_eq!(report.state.summary(), "podman.socket enabled, active (listening)");
    assert_eq!(
        d.calls(),
        [
            "LoadUnit podman.socket",
            "Subscribe",
            "StopUnit podman.service replace",
            "Subscribe",
            "RestartUnit podman.socket replace",
            "LoadUnit podman.socket"
        ]
    );
}

#[tokio::test]
async fn ensure_socket_restart_of_a_stopped_socket_just_starts_it() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead").triggering(&[SERVICE]));
    d.add_unit(SERVICE, Unit::loaded("disabled", "inactive", "dead"));
    let conn = d.client().await;
    let report = bounded(ensure_socket(&conn, SOCKET, true, TIMEOUT)).await.unwrap();
    assert_eq!(report.changes, ["started podman.socket"]);
    assert_eq!(
        d.calls(),
        ["LoadUnit podman.socket", "Subscribe", "StartUnit podman.socket replace", "LoadUnit podman.socket"]
    );
}

#[tokio::test]
async fn ensure_socket_refuses_a_masked_socket() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::masked());
    let conn = d.client().await;
    let err = bounded(ensure_socket(&conn, SOCKET, false, TIMEOUT)).await.unwrap_err();
    assert_eq!(format!("{err:#}"), "podman.socket is masked in the user manager");
    assert_eq!(d.calls(), ["LoadUnit podman.socket"]);
}

#[tokio::test]
async fn ensure_socket_refuses_a_socket_that_is_not_installed() {
    let d = Doubles::without_logind().await;
    let conn = d.client().await;
    let err = bounded(ensure_socket(&conn, SOCKET, false, TIMEOUT)).await.unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "podman.socket is not installed (no unit file in the user manager's search path)"
    );
    assert_eq!(d.calls(), ["LoadUnit podman.socket"]);
}

#[tokio::test]
async fn ensure_socket_reports_a_start_that_fails() {
    let d = Doubles::without_logind().await;
    d.add_unit(SOCKET, Unit::loaded("enabled", "inactive", "dead"));
    d.plan(SOCKET, after(20, "failed"));
    let conn = d.client().await;
    let err = bounded(ensure_socket(&conn, SOCKET, false, TIMEOUT)).await.unwrap_err();
    assert_eq!(format!("{err:#}"), "starting podman.socket: job failed");
}

// ------------------------------------------------------------------------------------------------
// steps::linger

#[tokio::test]
async fn linger_is_off_before_converge_and_on_after() {
    let d = Doubles::start().await;
    d.add_unit(USER_MANAGER, Unit::loaded("static", "inactive", "dead"));
    let cx = context(d.client().await);

    let before = bounded(Step::Linger.inspect(&cx)).await;
    assert_eq!(
        before,
        Inspection {
            observations: vec![Observation::fail("linger", "linger off for core")],
            plan: strings(&[
                "enable linger for core (logind SetUserLinger)",
                "start user@1000.service and wait until it is active"
            ]),
        }
    );

    let changes = bounded(Step::Linger.converge(&cx)).await.map(|r| r.changes).expect("converge");
    assert_eq!(changes, ["enabled linger for core", "started user@1000.service"]);

    let after = bounded(Step::Linger.inspect(&cx)).await;
    assert_eq!(
        after,
        Inspection {
            observations: vec![Observation::pass("linger", "linger on for core, user@1000.service active")],
            plan: vec![],
        }
    );
    assert_eq!(
        d.calls(),
        [
            "GetUser 1000",
            "LoadUnit user@1000.service",
            "GetUser 1000",
            "LoadUnit user@1000.service",
            "SetUserLinger 1000 true false",
            "Subscribe",
            "StartUnit user@1000.service replace",
            "GetUser 1000",
            "LoadUnit user@1000.service"
        ]
    );
}

#[tokio::test]
async fn linger_converge_returns_only_once_the_user_manager_is_active() {
    let d = Doubles::start().await;
    d.add_unit(USER_MANAGER, Unit::loaded("static", "inactive", "dead"));
    d.world().logind_start_delay = Duration::from_millis(300);
    let cx = context(d.client().await);

    let started = Instant::now();
    bounded(Step::Linger.converge(&cx)).await.map(|r| r.changes).expect("converge");
    let took = started.elapsed();
    // Read before anything else can run: logind's start must be over when converge returns.
    assert_eq!(
        d.unit(USER_MANAGER).active_state,
        "active",
        "converge returned before the user manager was up"
    );
    assert!(took >= Duration::from_millis(300), "converge returned after {took:?}");
    assert_eq!(
        d.events(),
        [
            "job 1 start user@1000.service queued by logind",
            "StartUnit user@1000.service merged into job 1",
            "job 1 start user@1000.service done"
        ]
    );
}

#[tokio::test]
async fn linger_converge_resets_a_failed_user_manager() {
    let d = Doubles::start().await;
    d.world().users.insert(1000, true);
    d.add_unit(USER_MANAGER, Unit::loaded("static", "failed", "failed"));
    let cx = context(d.client().await);

    let inspection = bounded(Step::Linger.inspect(&cx)).await;
    assert_eq!(
        inspection.observations,
        [Observation::fail("linger", "linger on for core, but user@1000.service static, failed (failed)")]
    );
    assert_eq!(inspection.plan, ["start user@1000.service and wait until it is active"]);

    let changes = bounded(Step::Linger.converge(&cx)).await.map(|r| r.changes).expect("converge");
    assert_eq!(changes, ["started user@1000.service"]);
    assert_eq!(d.unit(USER_MANAGER).active_state, "active");
    assert_eq!(
        d.calls()[2..],
        [
            "GetUser 1000",
            "LoadUnit user@1000.service",
            "ResetFailedUnit user@1000.service",
            "Subscribe",
            "StartUnit user@1000.service replace"
        ]
    );
}

#[tokio::test]
async fn linger_converge_reports_a_user_manager_that_fails_to_start() {
    let d = Doubles::start().await;
    d.world().users.insert(1000, true);
    d.add_unit(USER_MANAGER, Unit::loaded("static", "inactive", "dead"));
    d.plan(USER_MANAGER, after(20, "failed"));
    let cx = context(d.client().await);
    let err = bounded(Step::Linger.converge(&cx)).await.map(|r| r.changes).unwrap_err();
    assert_eq!(format!("{err:#}"), "starting user@1000.service: job failed");
}

#[tokio::test]
async fn linger_converge_times_out_when_the_user_manager_never_comes_up() {
    let d = Doubles::start().await;
    d.add_unit(USER_MANAGER, Unit::loaded("static", "inactive", "dead"));
    d.plan(USER_MANAGER, JobPlan { removal: Removal::Never, ..JobPlan::default() });
    let mut cx = context(d.client().await);
    cx.settings.linger.user_manager_timeout = Duration::from_millis(300);
    let err = bounded(Step::Linger.converge(&cx)).await.map(|r| r.changes).unwrap_err();
    assert_eq!(err.to_string(), "starting user@1000.service: no result within 300ms");
}

#[tokio::test]
async fn linger_on_with_the_user_manager_running_needs_nothing() {
    let d = Doubles::start().await;
    d.world().users.insert(1000, true);
    d.add_unit(USER_MANAGER, Unit::loaded("static", "active", "running"));
    let cx = context(d.client().await);
    let inspection = bounded(Step::Linger.inspect(&cx)).await;
    assert!(inspection.converged(), "{inspection:?}");
    assert_eq!(inspection.observations[0].detail, "linger on for core, user@1000.service active");
    assert_eq!(
        bounded(Step::Linger.converge(&cx)).await.map(|r| r.changes).expect("converge"),
        Vec::<String>::new()
    );
    assert_eq!(
        d.calls(),
        ["GetUser 1000", "LoadUnit user@1000.service", "GetUser 1000", "LoadUnit user@1000.service"]
    );
}

#[tokio::test]
async fn linger_inspect_without_logind_fails_fast_with_a_useful_detail() {
    let d = Doubles::without_logind().await;
    d.add_unit(USER_MANAGER, Unit::loaded("static", "active", "running"));
    let cx = context(d.client().await);
    let started = Instant::now();
    let inspection = bounded(Step::Linger.inspect(&cx)).await;
    assert!(started.elapsed() < Duration::from_secs(2), "inspect took {:?}", started.elapsed());
    assert_eq!(inspection.plan, ["enable linger for core once the system bus answers"]);
    let observation = &inspection.observations[0];
    assert!(!observation.ok);
    assert_eq!(
        observation.detail,
        "asking logind about the user: org.freedesktop.DBus.Error.ServiceUnknown: \
         The name org.freedesktop.login1 was not provided by any .service files"
    );
}

/// `SystemBus::with_connection` is how tests (and callers) hand the steps their bus; an error
/// must not make the next pass silently talk to another bus.
#[tokio::test]
async fn linger_keeps_the_given_bus_after_an_error() {
    let mut d = Doubles::without_logind().await;
    d.add_unit(USER_MANAGER, Unit::loaded("static", "inactive", "dead"));
    let cx = context(d.client().await);
    let first = bounded(Step::Linger.inspect(&cx)).await;
    assert!(!first.converged());

    d.start_logind().await;
    let second = bounded(Step::Linger.inspect(&cx)).await;
    assert_eq!(second.observations, [Observation::fail("linger", "linger off for core")]);
}

// ------------------------------------------------------------------------------------------------
// runner-privileges: masking FCOS's rootful Docker

#[tokio::test]
async fn mask_docker_masks_both_units_then_stops_them_socket_first() {
    use executor_agent::steps::runner_privileges;
    let d = Doubles::without_logind().await;
    d.add_unit(
        "docker.socket",
        Unit::loaded("enabled", "active", "listening").triggering(&["docker.service"]),
    );
    d.add_unit("docker.service", Unit::loaded("disabled", "active", "running"));
    let mut cx = context(d.client().await);
    cx.settings.runner_privileges.mask_docker = true;
    assert!(Step::RunnerPrivileges.repairs(&cx));
    let before = bounded(Step::RunnerPrivileges.inspect(&cx)).await;
    assert_eq!(
        before.plan,
        [
            "mask docker.socket and docker.service (rootful Docker; [runner_privileges] mask_docker = true)",
            "stop docker.socket",
            "stop docker.service"
        ]
    );
    d.world().calls.clear();
    let changes = bounded(Step::RunnerPrivileges.converge(&cx)).await.map(|r| r.changes).unwrap();
    assert_eq!(
        changes,
        [
            "masked docker.socket and docker.service (rootful Docker; [runner_privileges] mask_docker = true)",
            "stopped docker.socket",
            "stopped docker.service"
        ]
    );
    let calls: Vec<String> =
        d.calls().into_iter().filter(|c| !c.starts_with("LoadUnit") && c != "Subscribe").collect();
    assert_eq!(
        calls,
        [
            "MaskUnitFiles docker.socket,docker.service false true",
            "Reload",
            "StopUnit docker.socket replace",
            "StopUnit docker.service replace"
        ]
    );
    for unit in runner_privileges::DOCKER_UNITS {
        let u = d.unit(unit);
        assert_eq!((u.load_state.as_str(), u.active_state.as_str()), ("masked", "inactive"), "{unit}");
    }
    // Converged: nothing planned, nothing done.
    let after = bounded(Step::RunnerPrivileges.inspect(&cx)).await;
    assert!(after.plan.is_empty(), "{:?}", after.plan);
    assert!(after.observations[0].detail.contains("docker.socket is masked"), "{:?}", after.observations);
    assert!(bounded(Step::RunnerPrivileges.converge(&cx)).await.map(|r| r.changes).unwrap().is_empty());
}

#[tokio::test]
async fn without_mask_docker_an_enabled_docker_socket_is_only_reported() {
    let d = Doubles::without_logind().await;
    d.add_unit("docker.socket", Unit::loaded("enabled", "active", "listening"));
    let cx = context(d.client().await);
    assert!(!Step::RunnerPrivileges.repairs(&cx));
    let seen = bounded(Step::RunnerPrivileges.inspect(&cx)).await;
    assert!(seen.plan.is_empty());
    assert!(
        seen.observations[0].detail.contains(
            "docker.socket (rootful dockerd, for root and group docker) is enabled and active; \
             [runner_privileges] mask_docker = true masks it"
        ),
        "{:?}",
        seen.observations
    );
    assert!(bounded(Step::RunnerPrivileges.converge(&cx)).await.map(|r| r.changes).unwrap().is_empty());
    assert!(!d.calls().iter().any(|c| c.starts_with("MaskUnitFiles") || c.starts_with("StopUnit")));
}
