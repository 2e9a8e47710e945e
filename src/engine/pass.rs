//! The pass engine: repairs drifted steps in rounds (dependencies first, independent steps
//! concurrently, each within its backoff) and inspects what it repaired. The daemon and
//! `apply` drive the real steps through it; the tests below drive fake ones.

use anyhow::Result;
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::checks::Observation;
use crate::journal;
use crate::steps::{self, Context, Inspection, Repaired, Step};

/// What the engine needs from a set of steps: their order constraints, whether each may
/// repair, and the I/O. `Context` is the real one.
pub trait Steps {
    type Step: Copy + Eq + Hash + Debug + 'static;

    fn name(&self, step: Self::Step) -> &'static str;
    /// Steps attempted before this one in a pass (order only).
    fn after(&self, step: Self::Step) -> &'static [Self::Step];
    /// Steps that must pass before this one is attempted at all.
    fn requires(&self, step: Self::Step) -> &'static [Self::Step];
    fn repairs(&self, step: Self::Step) -> bool;
    /// The shortest and the longest wait before a failed repair is attempted again.
    fn backoff_bounds(&self) -> (Duration, Duration);
    fn converge(&self, step: Self::Step) -> impl Future<Output = Result<Repaired>>;
    fn inspect_all(&self, steps: &[Self::Step]) -> impl Future<Output = Vec<(Self::Step, Inspection)>>;
}

impl Steps for Context {
    type Step = Step;

    fn name(&self, step: Step) -> &'static str {
        step.name()
    }

    fn after(&self, step: Step) -> &'static [Step] {
        step.after()
    }

    fn requires(&self, step: Step) -> &'static [Step] {
        step.requires()
    }

    fn repairs(&self, step: Step) -> bool {
        step.repairs(self)
    }

    fn backoff_bounds(&self) -> (Duration, Duration) {
        (self.settings.repair.backoff_min, self.settings.repair.backoff_max)
    }

    async fn converge(&self, step: Step) -> Result<Repaired> {
        steps::timed(step, "converged", step.converge(self)).await
    }

    async fn inspect_all(&self, steps: &[Step]) -> Vec<(Step, Inspection)> {
        steps::inspect_all(self, steps).await
    }
}

/// Exponential backoff for a step that keeps failing, reset when it converges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
    next_attempt: Option<Instant>,
}

impl Backoff {
    pub const fn new() -> Self {
        Backoff { failures: 0, next_attempt: None }
    }

    pub fn may_attempt(&self, now: Instant) -> bool {
        self.next_attempt.is_none_or(|t| now >= t)
    }

    /// Records a failed attempt; returns the delay until the next one.
    pub fn failed(&mut self, now: Instant, min: Duration, max: Duration) -> Duration {
        let delay = min.saturating_mul(1u32 << self.failures.min(20)).min(max);
        self.failures += 1;
        self.next_attempt = Some(now + delay);
        delay
    }

    pub fn succeeded(&mut self) {
        *self = Backoff::new();
    }

    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }
}

/// One pass's outcome for the caller (the daemon or `apply`).
pub struct PassResult<S = Step> {
    pub inspections: Vec<(S, Inspection)>,
    /// Steps whose repair was attempted.
    pub attempted: Vec<S>,
    pub changes: Vec<(S, String)>,
    pub errors: Vec<(S, anyhow::Error)>,
}

/// Converges the steps that `seen` shows drifted and inspects the repaired ones again (unless
/// the repair already proved its result). Rounds: each repairs, concurrently, the drifted
/// steps whose `after` steps were attempted in an earlier round (or pass) and whose
/// `requires` steps pass.
pub async fn repair_pass<E: Steps>(
    engine: &E,
    steps: &[E::Step],
    seen: Vec<(E::Step, Inspection)>,
    backoff: &mut HashMap<E::Step, Backoff>,
) -> PassResult<E::Step> {
    let now = Instant::now();
    let (backoff_min, backoff_max) = engine.backoff_bounds();
    let mut inspections: HashMap<E::Step, Inspection> = seen.into_iter().collect();
    let mut changes = Vec::new();
    let mut errors = Vec::new();
    let mut attempted: Vec<E::Step> = Vec::new();
    let passes = |inspections: &HashMap<E::Step, Inspection>, d: &E::Step| {
        inspections.get(d).is_none_or(|i| i.converged())
    };
    loop {
        let due: Vec<E::Step> = steps
            .iter()
            .copied()
            .filter(|s| {
                inspections.get(s).is_some_and(|i| i.wants_repair())
                    && engine.repairs(*s)
                    && !attempted.contains(s)
            })
            .filter(|s| backoff.get(s).is_none_or(|b| b.may_attempt(now)))
            .filter(|s| {
                engine
                    .after(*s)
                    .iter()
                    .all(|d| !steps.contains(d) || attempted.contains(d) || passes(&inspections, d))
            })
            .filter(|s| engine.requires(*s).iter().all(|d| passes(&inspections, d)))
            .collect();
        if due.is_empty() {
            break;
        }
        let outcomes = futures_util::future::join_all(due.iter().map(|&s| engine.converge(s))).await;
        let mut proven: Vec<(E::Step, Inspection)> = Vec::new();
        for (step, outcome) in due.iter().copied().zip(outcomes) {
            match outcome {
                Ok(done) => {
                    backoff.entry(step).or_default().succeeded();
                    changes.extend(done.changes.into_iter().map(|c| (step, c)));
                    proven.extend(done.proof.map(|p| (step, p)));
                }
                Err(e) => {
                    let delay = backoff.entry(step).or_default().failed(now, backoff_min, backoff_max);
                    tracing::warn!(
                        message_id = journal::REPAIR_FAILED,
                        step = engine.name(step),
                        retry_in_ms = delay.as_millis() as u64,
                        "error: repairing {} -> {}; retrying in {}",
                        engine.name(step),
                        journal::chain(&e),
                        humantime::format_duration(delay)
                    );
                    errors.push((step, e));
                }
            }
            attempted.push(step);
        }
        let unproven: Vec<E::Step> =
            due.iter().copied().filter(|s| !proven.iter().any(|(p, _)| p == s)).collect();
        let again = engine.inspect_all(&unproven).await;
        inspections.extend(proven);
        inspections.extend(again);
    }
    for (step, inspection) in &inspections {
        if !inspection.wants_repair() {
            backoff.entry(*step).or_default().succeeded();
        }
    }
    let inspections = steps.iter().map(|s| (*s, inspections.remove(s).unwrap_or_default())).collect();
    PassResult { inspections, attempted, changes, errors }
}

/// Observations of a pass, with the repair error added where a repair failed.
pub fn observations<S: PartialEq>(result: &PassResult<S>) -> Vec<Observation> {
    let mut out = Vec::new();
    for (step, inspection) in &result.inspections {
        let error = result.errors.iter().find(|(s, _)| s == step).map(|(_, e)| journal::detail(e));
        for obs in &inspection.observations {
            let mut obs = obs.clone();
            if let (false, Some(error)) = (obs.ok, &error) {
                if !obs.detail.contains(error.as_str()) {
                    obs.detail = format!("{} (repair failed: {error})", obs.detail);
                }
            }
            out.push(obs);
        }
    }
    out
}

/// When the loop runs its next pass unprompted: at the resync, or, while the node is not
/// ready, as soon as the first backoff ends (backoffs already over were attempted by the
/// pass that set them, or wait for the resync).
pub fn next_pass_due<'a>(
    now: Instant,
    next_resync: Instant,
    ready: bool,
    backoffs: impl IntoIterator<Item = &'a Backoff>,
) -> Instant {
    if ready {
        return next_resync;
    }
    let retry_at = backoffs.into_iter().filter_map(Backoff::next_attempt).filter(|t| *t > now).min();
    retry_at.map_or(next_resync, |r| r.min(next_resync))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn backoff_doubles_up_to_the_limit_and_resets() {
        let t0 = Instant::now();
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(5));
        let mut b = Backoff::new();
        assert!(b.may_attempt(t0));
        let delays: Vec<_> = (0..5).map(|_| b.failed(t0, min, max).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        assert!(!b.may_attempt(t0 + Duration::from_secs(4)));
        assert!(b.may_attempt(t0 + Duration::from_secs(5)));
        b.succeeded();
        assert_eq!(b, Backoff::new());
    }

    #[test]
    fn a_failed_repair_is_added_to_the_failing_check() {
        let pass = PassResult {
            inspections: vec![(
                Step::PodmanSocket,
                Inspection {
                    observations: vec![
                        Observation::pass("podman-socket", "ok"),
                        Observation::fail("podman-api", "refused"),
                    ],
                    plan: vec![],
                },
            )],
            attempted: vec![Step::PodmanSocket],
            changes: vec![],
            errors: vec![(Step::PodmanSocket, anyhow::anyhow!("podman.socket is masked"))],
        };
        let obs = observations(&pass);
        assert_eq!(obs[0].detail, "ok");
        assert_eq!(obs[1].detail, "refused (repair failed: podman.socket is masked)");
    }

    // ---- fake steps: the engine's rules without any I/O ----

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    enum Fake {
        /// Like the user manager: others need it.
        Manager,
        /// Like the socket: after and requiring Manager.
        Socket,
        /// Like subordinate IDs: independent.
        Ids,
        /// After Ids and Socket, requires Socket (like id-mapping).
        Mapping,
        /// Only reports.
        Report,
    }

    const ALL: [Fake; 5] = [Fake::Manager, Fake::Socket, Fake::Ids, Fake::Mapping, Fake::Report];

    /// The fake node: which steps are broken, which repairs fail or prove themselves, and a
    /// log of what the engine did, one line per call with the round it was in.
    #[derive(Default)]
    struct Node {
        broken: RefCell<Vec<Fake>>,
        repair_fails: Vec<Fake>,
        proves: Vec<Fake>,
        log: RefCell<Vec<String>>,
        round: RefCell<u32>,
    }

    impl Node {
        fn broken(steps: &[Fake]) -> Node {
            Node { broken: RefCell::new(steps.to_vec()), ..Node::default() }
        }

        fn inspection(&self, step: Fake) -> Inspection {
            let name = format!("{step:?}");
            let obs = if self.broken.borrow().contains(&step) {
                Observation::fail("fake", name.as_str())
            } else {
                Observation::pass("fake", name.as_str())
            };
            Inspection { observations: vec![obs], plan: vec![] }
        }

        fn seen(&self) -> Vec<(Fake, Inspection)> {
            ALL.iter().map(|&s| (s, self.inspection(s))).collect()
        }

        fn log(&self) -> Vec<String> {
            self.log.borrow().clone()
        }
    }

    impl Steps for Node {
        type Step = Fake;

        fn name(&self, _: Fake) -> &'static str {
            "fake"
        }

        fn after(&self, step: Fake) -> &'static [Fake] {
            match step {
                Fake::Socket => &[Fake::Manager],
                Fake::Mapping => &[Fake::Ids, Fake::Socket],
                _ => &[],
            }
        }

        fn requires(&self, step: Fake) -> &'static [Fake] {
            match step {
                Fake::Socket => &[Fake::Manager],
                Fake::Mapping => &[Fake::Socket],
                _ => &[],
            }
        }

        fn repairs(&self, step: Fake) -> bool {
            step != Fake::Report
        }

        fn backoff_bounds(&self) -> (Duration, Duration) {
            (Duration::from_secs(1), Duration::from_secs(60))
        }

        async fn converge(&self, step: Fake) -> Result<Repaired> {
            let round = *self.round.borrow();
            self.log.borrow_mut().push(format!("{round}: converge {step:?}"));
            if self.repair_fails.contains(&step) {
                anyhow::bail!("{step:?} cannot be repaired");
            }
            self.broken.borrow_mut().retain(|s| *s != step);
            let proof = self.proves.contains(&step).then(|| self.inspection(step));
            Ok(Repaired { changes: vec![format!("fixed {step:?}")], proof })
        }

        async fn inspect_all(&self, steps: &[Fake]) -> Vec<(Fake, Inspection)> {
            let round = *self.round.borrow();
            self.log.borrow_mut().push(format!("{round}: inspect {steps:?}"));
            *self.round.borrow_mut() += 1;
            steps.iter().map(|&s| (s, self.inspection(s))).collect()
        }
    }

    fn run(node: &Node, backoff: &mut HashMap<Fake, Backoff>) -> PassResult<Fake> {
        let seen = node.seen();
        futures_executor(repair_pass(node, &ALL, seen, backoff))
    }

    /// The engine's futures need no reactor: poll them on the test's thread.
    fn futures_executor<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn fails(result: &PassResult<Fake>, step: Fake) -> bool {
        result.inspections.iter().any(|(s, i)| *s == step && !i.converged())
    }

    #[test]
    fn a_step_is_repaired_after_what_it_comes_after_and_independent_ones_together() {
        let node = Node::broken(&[Fake::Manager, Fake::Socket, Fake::Ids, Fake::Mapping]);
        let result = run(&node, &mut HashMap::new());
        assert_eq!(
            node.log(),
            [
                "0: converge Manager",
                "0: converge Ids",
                "0: inspect [Manager, Ids]",
                "1: converge Socket",
                "1: inspect [Socket]",
                "2: converge Mapping",
                "2: inspect [Mapping]",
            ]
        );
        assert!(result.errors.is_empty());
        assert!(ALL.iter().all(|&s| !fails(&result, s)));
        assert_eq!(result.changes.len(), 4);
    }

    #[test]
    fn a_step_is_not_attempted_while_a_step_it_requires_fails() {
        let node = Node {
            repair_fails: vec![Fake::Manager],
            ..Node::broken(&[Fake::Manager, Fake::Socket, Fake::Mapping])
        };
        let result = run(&node, &mut HashMap::new());
        assert_eq!(node.log(), ["0: converge Manager", "0: inspect [Manager]"]);
        assert_eq!(result.attempted, [Fake::Manager]);
        assert_eq!(result.errors.len(), 1);
        assert!(fails(&result, Fake::Socket) && fails(&result, Fake::Mapping));
    }

    #[test]
    fn after_is_order_only_a_failed_predecessor_does_not_hold_a_step_back() {
        // Mapping comes after Ids but does not require it.
        let node = Node { repair_fails: vec![Fake::Ids], ..Node::broken(&[Fake::Ids, Fake::Mapping]) };
        let result = run(&node, &mut HashMap::new());
        assert_eq!(
            node.log(),
            ["0: converge Ids", "0: inspect [Ids]", "1: converge Mapping", "1: inspect [Mapping]"]
        );
        assert!(fails(&result, Fake::Ids) && !fails(&result, Fake::Mapping));
    }

    #[test]
    fn a_failed_repair_waits_out_its_backoff_and_a_converged_step_resets_it() {
        let mut backoff = HashMap::new();
        let node = Node { repair_fails: vec![Fake::Ids], ..Node::broken(&[Fake::Ids]) };
        run(&node, &mut backoff);
        let next = backoff[&Fake::Ids].next_attempt().expect("a retry time");
        assert!(next > Instant::now());

        // The next pass, within the backoff: not attempted, still failing.
        node.log.borrow_mut().clear();
        let result = run(&node, &mut backoff);
        assert!(node.log().is_empty(), "attempted within its backoff: {:?}", node.log());
        assert!(fails(&result, Fake::Ids));
        assert_eq!(backoff[&Fake::Ids].next_attempt(), Some(next), "a skipped step keeps its backoff");

        // Fixed from outside: the pass sees it converged and forgets the backoff.
        node.broken.borrow_mut().clear();
        run(&node, &mut backoff);
        assert_eq!(backoff[&Fake::Ids], Backoff::new());
    }

    #[test]
    fn a_repair_that_proves_its_result_is_not_inspected_again() {
        let node = Node { proves: vec![Fake::Socket], ..Node::broken(&[Fake::Socket, Fake::Ids]) };
        let result = run(&node, &mut HashMap::new());
        assert_eq!(node.log(), ["0: converge Socket", "0: converge Ids", "0: inspect [Ids]"]);
        assert!(!fails(&result, Fake::Socket));
    }

    #[test]
    fn steps_that_only_report_are_never_converged() {
        let node = Node::broken(&[Fake::Report]);
        let result = run(&node, &mut HashMap::new());
        assert!(node.log().is_empty());
        assert!(result.attempted.is_empty());
        assert!(fails(&result, Fake::Report));
    }

    #[test]
    fn the_next_pass_is_the_resync_unless_a_retry_comes_first_on_a_node_not_ready() {
        let now = Instant::now();
        let resync = now + Duration::from_secs(30);
        let mut soon = Backoff::new();
        soon.failed(now, Duration::from_secs(2), Duration::from_secs(60));
        let mut late = Backoff::new();
        late.failed(now, Duration::from_secs(90), Duration::from_secs(90));
        let mut over = Backoff::new();
        over.failed(now - Duration::from_secs(10), Duration::from_secs(1), Duration::from_secs(1));

        assert_eq!(next_pass_due(now, resync, true, [&soon]), resync, "ready: retries wait");
        assert_eq!(next_pass_due(now, resync, false, [&soon, &late]), now + Duration::from_secs(2));
        assert_eq!(next_pass_due(now, resync, false, [&late]), resync, "never later than the resync");
        assert_eq!(next_pass_due(now, resync, false, [&over]), resync, "a backoff already over");
        assert_eq!(next_pass_due(now, resync, false, []), resync);
    }
}
