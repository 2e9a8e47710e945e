//! Self-eviction's decision (`[self_eviction]`, opt-in): how long the node has stayed not
//! ready with nothing running and no drain, and when that is long enough to end it.
//! src/system/eviction.rs keeps the record and acts.

use std::time::{Duration, Instant};

/// What the decision looks at, each turn of the daemon's loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    /// Whether a job runs; `None` while the agent cannot ask Podman (never counted as idle:
    /// containers outlive their API service).
    pub jobs_running: Option<bool>,
    /// Drained by anyone (an operator, a Spot notice, FleetLock): the node's end is in hand.
    pub drained: bool,
    /// A self-eviction happened and the node has not been ready since: a node that comes
    /// back broken stays up and says so, instead of ending itself again and again.
    pub evicted_before: bool,
}

/// Why a node that is not ready does not count down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    JobRunning,
    JobsUnknown,
    Drained,
    EvictedBefore,
}

impl Hold {
    pub fn describe(self) -> &'static str {
        match self {
            Hold::JobRunning => "a job runs",
            Hold::JobsUnknown => "what runs cannot be asked of Podman",
            Hold::Drained => "the node is drained",
            Hold::EvictedBefore => "it ended itself once already and has not been ready since",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    Held(Hold),
    /// Counting down to `due`; `started` on the turn the wait began (announce it then).
    Pending {
        due: Instant,
        started: bool,
    },
    /// The wait is over: act, once.
    Act,
}

/// The wait, kept by the daemon across turns.
#[derive(Debug, Default)]
pub struct Countdown {
    since: Option<Instant>,
    acted: bool,
}

impl Countdown {
    /// Whether a wait was going on (to say it was called off when it ends).
    pub fn pending(&self) -> bool {
        self.since.is_some() && !self.acted
    }

    /// When the wait ends, while one goes on (the loop wakes then).
    pub fn due(&self, after: Duration) -> Option<Instant> {
        self.since.filter(|_| !self.acted).map(|since| since + after)
    }

    pub fn observe(&mut self, now: Instant, c: &Conditions, after: Duration) -> Verdict {
        let hold = if c.ready {
            None
        } else if c.evicted_before || self.acted {
            Some(Hold::EvictedBefore)
        } else if c.drained {
            Some(Hold::Drained)
        } else {
            match c.jobs_running {
                Some(true) => Some(Hold::JobRunning),
                None => Some(Hold::JobsUnknown),
                Some(false) => None,
            }
        };
        if c.ready {
            self.since = None;
            self.acted = false;
            return Verdict::Ready;
        }
        if let Some(hold) = hold {
            self.since = None;
            return Verdict::Held(hold);
        }
        let started = self.since.is_none();
        let since = *self.since.get_or_insert(now);
        let due = since + after;
        if now >= due {
            self.acted = true;
            self.since = None;
            return Verdict::Act;
        }
        Verdict::Pending { due, started }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(60);

    fn broken_idle() -> Conditions {
        Conditions { ready: false, jobs_running: Some(false), drained: false, evicted_before: false }
    }

    #[test]
    fn counts_down_while_not_ready_and_idle_then_acts_once() {
        let t0 = Instant::now();
        let mut c = Countdown::default();
        let due = t0 + AFTER;
        assert_eq!(c.observe(t0, &broken_idle(), AFTER), Verdict::Pending { due, started: true });
        assert_eq!(c.due(AFTER), Some(due));
        assert_eq!(
            c.observe(t0 + AFTER / 2, &broken_idle(), AFTER),
            Verdict::Pending { due, started: false }
        );
        assert_eq!(c.observe(due, &broken_idle(), AFTER), Verdict::Act);
        // Never again in this not-ready spell.
        assert_eq!(c.observe(due + AFTER * 3, &broken_idle(), AFTER), Verdict::Held(Hold::EvictedBefore));
    }

    #[test]
    fn a_job_unknown_jobs_or_a_drain_hold_it_and_start_the_wait_again() {
        let t0 = Instant::now();
        for (conditions, hold) in [
            (Conditions { jobs_running: Some(true), ..broken_idle() }, Hold::JobRunning),
            (Conditions { jobs_running: None, ..broken_idle() }, Hold::JobsUnknown),
            (Conditions { drained: true, ..broken_idle() }, Hold::Drained),
        ] {
            let mut c = Countdown::default();
            c.observe(t0, &broken_idle(), AFTER);
            assert!(c.pending());
            assert_eq!(c.observe(t0 + AFTER / 2, &conditions, AFTER), Verdict::Held(hold));
            assert!(!c.pending());
            // The whole wait again from when the hold ended, not from the first start.
            let later = t0 + AFTER;
            assert_eq!(
                c.observe(later, &broken_idle(), AFTER),
                Verdict::Pending { due: later + AFTER, started: true }
            );
        }
    }

    #[test]
    fn ready_calls_it_off_and_an_earlier_eviction_holds_it_until_ready() {
        let t0 = Instant::now();
        let mut c = Countdown::default();
        c.observe(t0, &broken_idle(), AFTER);
        let ready = Conditions { ready: true, ..broken_idle() };
        assert_eq!(c.observe(t0 + AFTER / 2, &ready, AFTER), Verdict::Ready);
        assert!(!c.pending());
        // After a reboot that did not help: the record of the eviction holds it.
        let mut fresh = Countdown::default();
        let again = Conditions { evicted_before: true, ..broken_idle() };
        assert_eq!(fresh.observe(t0, &again, AFTER), Verdict::Held(Hold::EvictedBefore));
        assert_eq!(fresh.observe(t0 + AFTER * 2, &again, AFTER), Verdict::Held(Hold::EvictedBefore));
    }

    #[test]
    fn acting_once_is_forgotten_when_the_node_was_ready_in_between() {
        let t0 = Instant::now();
        let mut c = Countdown::default();
        c.observe(t0, &broken_idle(), AFTER);
        assert_eq!(c.observe(t0 + AFTER, &broken_idle(), AFTER), Verdict::Act);
        let ready = Conditions { ready: true, ..broken_idle() };
        c.observe(t0 + AFTER * 2, &ready, AFTER);
        let t1 = t0 + AFTER * 3;
        assert_eq!(c.observe(t1, &broken_idle(), AFTER), Verdict::Pending { due: t1 + AFTER, started: true });
    }
}
