//! Check results: what each step last saw, when it last changed, and the node's readiness.

use serde::Serialize;
use std::time::SystemTime;

/// Names of the checks, in the order they are reported.
pub const CHECK_NAMES: [&str; 6] =
    ["subuid", "subgid", "linger", "podman-socket", "podman-api", "unprivileged-ports"];

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

/// A check as reported to probes: the observation plus when its `ok` last flipped.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// RFC 3339 time of the last change of `ok` (or of the first observation).
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

/// A readiness change worth a journal entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// The latest result of every check.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckSet {
    checks: Vec<Check>,
}

impl CheckSet {
    /// Checks that have not run yet, so a probe before the first pass says why it is not ready.
    pub fn pending(now: SystemTime) -> Self {
        CheckSet {
            checks: CHECK_NAMES
                .iter()
                .map(|&name| Check { name, ok: false, detail: "not checked yet".into(), since: now })
                .collect(),
        }
    }

    /// Records new observations; returns the checks whose `ok` flipped.
    pub fn record(&mut self, observations: Vec<Observation>, now: SystemTime) -> Vec<Transition> {
        let mut transitions = Vec::new();
        for obs in observations {
            match self.checks.iter_mut().find(|c| c.name == obs.name) {
                Some(check) => {
                    if check.ok != obs.ok {
                        check.since = now;
                        transitions.push(Transition {
                            name: obs.name,
                            ok: obs.ok,
                            detail: obs.detail.clone(),
                        });
                    }
                    check.ok = obs.ok;
                    check.detail = obs.detail;
                }
                None => {
                    transitions.push(Transition { name: obs.name, ok: obs.ok, detail: obs.detail.clone() });
                    self.checks.push(Check { name: obs.name, ok: obs.ok, detail: obs.detail, since: now });
                }
            }
        }
        self.checks.sort_by_key(|c| CHECK_NAMES.iter().position(|&n| n == c.name).unwrap_or(usize::MAX));
        transitions
    }

    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    pub fn ready(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    pub fn failing(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }

    /// The line `systemctl status` shows, e.g. `ready: 6/6 checks pass` or
    /// `not ready: podman-api: connection refused`.
    pub fn status_line(&self) -> String {
        let passing = self.checks.iter().filter(|c| c.ok).count();
        match self.failing().next() {
            None => format!("ready: {passing}/{} checks pass", self.checks.len()),
            Some(first) => {
                let more = self.failing().count() - 1;
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
            vec![Transition { name: "podman-api", ok: false, detail: "connection refused".into() }]
        );
        assert_eq!(set.status_line(), "not ready: podman-api: connection refused");
        let api = set.checks().iter().find(|c| c.name == "podman-api").unwrap();
        assert_eq!(api.since, t2);
    }

    #[test]
    fn serialises_since_as_rfc3339() {
        let mut set = CheckSet::default();
        set.record(vec![Observation::pass("linger", "on")], SystemTime::UNIX_EPOCH);
        let json = serde_json::to_string(set.checks()).unwrap();
        assert_eq!(json, r#"[{"name":"linger","ok":true,"detail":"on","since":"1970-01-01T00:00:00Z"}]"#);
    }
}
