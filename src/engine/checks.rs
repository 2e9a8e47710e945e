//! Check results: what each step last saw, whether readiness depends on it, flap damping,
//! and when each check last changed.

use serde::Serialize;
use std::time::SystemTime;

/// The checks the core steps report, in the order they are shown.
pub const CHECK_NAMES: [&str; 6] =
    ["subuid", "subgid", "linger", "podman-socket", "podman-api", "unprivileged-ports"];

/// The longest detail a check carries (a status line carries one, the JSON answers all).
pub const MAX_DETAIL_CHARS: usize = 1000;

pub use crate::config::{CheckPolicy, CheckPolicyOverride};

/// A check's policy when the configuration says nothing: required unless its step declares
/// it advisory (`SPEC` in src/steps/), flipping on the first disagreeing observation.
pub fn default_policy(name: &str) -> CheckPolicy {
    CheckPolicy {
        required: crate::steps::check_spec(name).is_none_or(|c| !c.advisory),
        failures_before_critical: 1,
        successes_before_passing: 1,
    }
}

/// The policy of one check: `[checks.NAME]` over its default.
pub fn configured_policy(settings: &crate::config::Settings, name: &str) -> CheckPolicy {
    let default = default_policy(name);
    settings.checks.get(name).map_or(default, |o| o.apply(default))
}

/// One observation made by a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Observation {
    pub fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Observation { name, ok: true, detail: detail.into() }
    }

    pub fn fail(name: &'static str, detail: impl Into<String>) -> Self {
        Observation { name, ok: false, detail: detail.into() }
    }
}

/// A check as reported to probes: the damped verdict, the latest detail, and when the
/// verdict last flipped.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub required: bool,
    pub detail: String,
    /// RFC 3339 time of the last change of `ok` (or of the first observation).
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
    /// Observations in a row that disagree with `ok` (flap damping).
    #[serde(skip)]
    streak: u32,
    /// Not observed yet: the first observation sets the verdict at once.
    #[serde(skip)]
    pending: bool,
    #[serde(skip)]
    policy: CheckPolicy,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

/// A verdict change worth a journal entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub name: &'static str,
    pub ok: bool,
    pub required: bool,
    pub detail: String,
}

/// The latest result of every check.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckSet {
    checks: Vec<Check>,
}

impl CheckSet {
    /// Whether every check `step` reports passes now (a check not recorded yet does not).
    pub fn step_passes(&self, step: crate::steps::Step) -> bool {
        step.checks().all(|name| self.checks.iter().any(|c| c.name == name && c.ok))
    }

    /// The checks of `steps` that fail now, in the order shown.
    pub fn failing_of(&self, steps: &[crate::steps::Step]) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| !c.ok && steps.iter().any(|s| s.reports(c.name)))
            .map(|c| c.name)
            .collect()
    }

    /// The core checks, not run yet, with their default policies.
    pub fn pending(now: SystemTime) -> Self {
        Self::pending_with(&CHECK_NAMES, default_policy, now)
    }

    /// Checks that have not run yet, so a probe before the first pass says why it is not ready.
    pub fn pending_with(
        names: &[&'static str],
        policy: impl Fn(&str) -> CheckPolicy,
        now: SystemTime,
    ) -> Self {
        let mut set = CheckSet::default();
        for &name in names {
            let policy = policy(name);
            set.checks.push(Check {
                name,
                ok: false,
                required: policy.required,
                detail: "not checked yet".into(),
                since: now,
                streak: 0,
                pending: true,
                policy,
            });
        }
        set.sort();
        set
    }

    fn sort(&mut self) {
        self.checks.sort_by_key(|c| crate::steps::check_position(c.name));
    }

    /// Records new observations; returns the checks whose verdict flipped. A pending check
    /// takes its first verdict at once; after that a verdict flips only after the policy's
    /// number of disagreeing observations in a row.
    pub fn record(&mut self, observations: Vec<Observation>, now: SystemTime) -> Vec<Transition> {
        let mut transitions = Vec::new();
        for mut obs in observations {
            // The one door every detail passes on its way to STATUS=, HTTP and the journal:
            // whatever a step quoted (Podman's messages, a file the runner user controls)
            // leaves it as one bounded line.
            obs.detail = crate::text::one_line(&obs.detail, MAX_DETAIL_CHARS);
            let index = match self.checks.iter().position(|c| c.name == obs.name) {
                Some(i) => i,
                None => {
                    let policy = default_policy(obs.name);
                    self.checks.push(Check {
                        name: obs.name,
                        ok: false,
                        required: policy.required,
                        detail: String::new(),
                        since: now,
                        streak: 0,
                        pending: true,
                        policy,
                    });
                    self.checks.len() - 1
                }
            };
            let check = &mut self.checks[index];
            let first = std::mem::take(&mut check.pending);
            if obs.ok == check.ok && !first {
                check.streak = 0;
                check.detail = obs.detail;
                continue;
            }
            check.streak = check.streak.saturating_add(1);
            let needed = if obs.ok {
                check.policy.successes_before_passing
            } else {
                check.policy.failures_before_critical
            };
            if first || check.streak >= needed {
                check.ok = obs.ok;
                check.since = now;
                check.streak = 0;
                check.detail = obs.detail;
                transitions.push(Transition {
                    name: check.name,
                    ok: check.ok,
                    required: check.required,
                    detail: check.detail.clone(),
                });
            } else {
                let verb = if obs.ok { "passed" } else { "failed" };
                check.detail =
                    format!("{} ({verb} {} of {needed} times before it flips)", obs.detail, check.streak);
            }
        }
        self.sort();
        transitions
    }

    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    /// Ready when every required check passes.
    pub fn ready(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok || !c.required)
    }

    pub fn failing(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }

    /// The line `systemctl status` shows, e.g. `ready: 6/6 checks pass` or
    /// `not ready: podman-api: connection refused`.
    pub fn status_line(&self) -> String {
        let required: Vec<&Check> = self.checks.iter().filter(|c| c.required).collect();
        let passing = required.iter().filter(|c| c.ok).count();
        let warnings: Vec<&Check> = self.checks.iter().filter(|c| !c.required && !c.ok).collect();
        let warning = match warnings.first() {
            None => String::new(),
            Some(w) => format!("; warning: {}: {}", w.name, w.detail),
        };
        match required.iter().find(|c| !c.ok) {
            None => format!("ready: {passing}/{} checks pass{warning}", required.len()),
            Some(first) => {
                let more = required.iter().filter(|c| !c.ok).count() - 1;
                let more = if more > 0 { format!(" (+{more} more)") } else { String::new() };
                format!("not ready: {}: {}{more}", first.name, first.detail)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pending_set_is_not_ready_and_says_why() {
        let set = CheckSet::pending(SystemTime::UNIX_EPOCH);
        assert!(!set.ready());
        assert_eq!(set.status_line(), "not ready: subuid: not checked yet (+5 more)");
    }

    #[test]
    fn since_moves_only_when_ok_flips() {
        let t0 = SystemTime::UNIX_EPOCH;
        let t1 = t0 + Duration::from_secs(10);
        let t2 = t0 + Duration::from_secs(20);
        let mut set = CheckSet::pending(t0);
        let all_ok: Vec<_> = CHECK_NAMES.iter().map(|&n| Observation::pass(n, "fine")).collect();
        assert_eq!(set.record(all_ok.clone(), t1).len(), 6);
        assert!(set.ready());
        assert_eq!(set.status_line(), "ready: 6/6 checks pass");
        assert!(set.record(all_ok, t2).is_empty());
        assert!(set.checks().iter().all(|c| c.since == t1));

        let t = set.record(vec![Observation::fail("podman-api", "connection refused")], t2);
        assert_eq!(
            t,
            vec![Transition {
                name: "podman-api",
                ok: false,
                required: true,
                detail: "connection refused".into()
            }]
        );
        assert_eq!(set.status_line(), "not ready: podman-api: connection refused");
        let api = set.checks().iter().find(|c| c.name == "podman-api").unwrap();
        assert_eq!(api.since, t2);
    }

    #[test]
    fn damping_needs_n_failures_and_m_passes_in_a_row() {
        let t = SystemTime::UNIX_EPOCH;
        let policy = |_: &str| CheckPolicy {
            required: true,
            failures_before_critical: 3,
            successes_before_passing: 2,
        };
        let mut set = CheckSet::pending_with(&["podman-api"], policy, t);
        let pass = || vec![Observation::pass("podman-api", "OK")];
        let fail = || vec![Observation::fail("podman-api", "refused")];
        // The first verdict is taken at once, whatever the policy.
        assert_eq!(set.record(pass(), t).len(), 1);
        assert!(set.ready());
        assert!(set.record(fail(), t).is_empty());
        assert!(set.record(fail(), t).is_empty());
        assert!(set.ready(), "two failures must not flip a check that needs three");
        assert_eq!(set.checks()[0].detail, "refused (failed 2 of 3 times before it flips)");
        // A pass in between starts the count again.
        assert!(set.record(pass(), t).is_empty());
        for _ in 0..2 {
            assert!(set.record(fail(), t).is_empty());
        }
        assert_eq!(set.record(fail(), t).len(), 1);
        assert!(!set.ready());
        assert!(set.record(pass(), t).is_empty());
        assert!(!set.ready());
        assert_eq!(set.record(pass(), t).len(), 1);
        assert!(set.ready());
    }

    #[test]
    fn checks_are_asked_by_the_step_that_reports_them() {
        use crate::steps::Step;
        let mut set = CheckSet::pending(SystemTime::now());
        assert!(!set.step_passes(Step::PodmanSocket), "pending is not passing");
        set.record(
            vec![
                Observation::pass("linger", "on"),
                Observation::pass("podman-socket", "listening"),
                Observation::fail("podman-api", "no answer"),
            ],
            SystemTime::now(),
        );
        assert!(set.step_passes(Step::Linger));
        assert!(!set.step_passes(Step::PodmanSocket), "one of its two checks fails");
        assert_eq!(set.failing_of(&[Step::Linger, Step::PodmanSocket]), ["podman-api"]);
    }

    #[test]
    fn advisory_checks_warn_without_blocking_readiness() {
        let t = SystemTime::UNIX_EPOCH;
        let mut set = CheckSet::pending(t);
        let mut obs: Vec<_> = CHECK_NAMES.iter().map(|&n| Observation::pass(n, "fine")).collect();
        obs.push(Observation::fail("docker-cli", "no docker on PATH"));
        set.record(obs, t);
        assert!(set.ready());
        assert_eq!(set.status_line(), "ready: 6/6 checks pass; warning: docker-cli: no docker on PATH");
        let docker = set.checks().iter().find(|c| c.name == "docker-cli").unwrap();
        assert!(!docker.required && !docker.ok);
    }

    #[test]
    fn details_reach_every_door_as_one_bounded_line() {
        let mut set = CheckSet::default();
        let hostile = format!("cgroup_manager \"x\nMAINPID=1\nREADY=1\x1b[2J\" {}", "y".repeat(5000));
        set.record(vec![Observation::fail("podman-config", hostile)], SystemTime::UNIX_EPOCH);
        let detail = &set.checks()[0].detail;
        assert!(!detail.contains(['\n', '\r', '\x1b']), "{detail:?}");
        assert!(detail.starts_with("cgroup_manager \"x MAINPID=1 READY=1 [2J\""), "{detail}");
        assert_eq!(detail.chars().count(), MAX_DETAIL_CHARS);
        assert!(!set.status_line().contains('\n'));
    }

    #[test]
    fn serialises_since_as_rfc3339() {
        let mut set = CheckSet::default();
        set.record(vec![Observation::pass("linger", "on")], SystemTime::UNIX_EPOCH);
        let json = serde_json::to_string(set.checks()).unwrap();
        assert_eq!(
            json,
            r#"[{"name":"linger","ok":true,"required":true,"detail":"on","since":"1970-01-01T00:00:00Z"}]"#
        );
    }
}
