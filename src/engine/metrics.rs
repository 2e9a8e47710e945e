//! Prometheus metrics (`GET /metrics`, OpenMetrics text): checks, readiness, repairs, drift.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::checks::{CheckSet, Transition};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: String,
    required: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepairLabels {
    step: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

pub struct Metrics {
    registry: Registry,
    check_ok: Family<CheckLabels, Gauge>,
    ready: Gauge,
    time_to_ready: Gauge<f64, AtomicU64>,
    repairs: Family<RepairLabels, Counter>,
    drift: Family<DriftLabels, Counter>,
    gc_freed: Counter,
    canary_rounds: Family<OutcomeLabels, Counter>,
    canary_failures: Family<StageLabels, Counter>,
    canary_stage_seconds: Family<StageLabels, Gauge<f64, AtomicU64>>,
    canary_round_seconds: Histogram,
    job_containers: Gauge,
    jobs_known: Gauge,
    self_eviction_pending: Gauge,
    self_eviction_due: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("executor_agent");
        let check_ok = Family::<CheckLabels, Gauge>::default();
        registry.register("check_ok", "1 when the check passes, 0 when it fails", check_ok.clone());
        let ready = Gauge::default();
        registry.register("ready", "1 when every required check passes", ready.clone());
        let time_to_ready = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "time_to_ready_seconds",
            "Seconds from the agent's start until the node was first ready",
            time_to_ready.clone(),
        );
        let repairs = Family::<RepairLabels, Counter>::default();
        registry.register(
            "repairs",
            "Repair attempts by step and outcome (success, failure)",
            repairs.clone(),
        );
        let drift = Family::<DriftLabels, Counter>::default();
        registry.register("drift_events", "Times a passing check started failing", drift.clone());
        let gc_freed = Counter::default();
        registry.register("image_gc_freed_bytes", "Bytes freed by removing unused images", gc_freed.clone());
        let build = Family::<BuildLabels, Gauge>::default();
        registry.register("build_info", "The agent's version", build.clone());
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        let canary_rounds = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "canary_rounds",
            "Job canary rounds by outcome (pass, fail)",
            canary_rounds.clone(),
        );
        let canary_failures = Family::<StageLabels, Counter>::default();
        registry.register(
            "canary_failures",
            "Failed job canary rounds by the stage that failed",
            canary_failures.clone(),
        );
        let canary_stage_seconds = Family::<StageLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "canary_stage_duration_seconds",
            "How long each stage of the latest job canary round took",
            canary_stage_seconds.clone(),
        );
        let canary_round_seconds = Histogram::new([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]);
        registry.register(
            "canary_round_duration_seconds",
            "Wall time of job canary rounds, cleanup included",
            canary_round_seconds.clone(),
        );
        let job_containers = Gauge::default();
        registry.register(
            "job_containers",
            "Running containers of the runner user that are not the agent's (0 while unknown)",
            job_containers.clone(),
        );
        let jobs_known = Gauge::default();
        registry.register(
            "jobs_known",
            "1 when the agent could list the runner user's containers at its latest pass",
            jobs_known.clone(),
        );
        let self_eviction_pending = Gauge::default();
        registry.register(
            "self_eviction_pending",
            "1 while the node counts down to ending itself (self_eviction: not ready, idle, not drained)",
            self_eviction_pending.clone(),
        );
        let self_eviction_due = Gauge::default();
        registry.register(
            "self_eviction_due_timestamp_seconds",
            "When the node will end itself unless it recovers (Unix time); 0 when it will not",
            self_eviction_due.clone(),
        );
        Metrics {
            registry,
            check_ok,
            ready,
            time_to_ready,
            repairs,
            drift,
            gc_freed,
            canary_rounds,
            canary_failures,
            canary_stage_seconds,
            canary_round_seconds,
            job_containers,
            jobs_known,
            self_eviction_pending,
            self_eviction_due,
        }
    }

    /// Self-eviction's countdown: when it will act (Unix seconds), or `None`.
    pub fn self_eviction(&self, due_unix: Option<u64>) {
        self.self_eviction_pending.set(i64::from(due_unix.is_some()));
        self.self_eviction_due.set(due_unix.map_or(0, |t| t as i64));
    }

    /// What runs on the node, as of the latest pass (`None`: the API could not be asked).
    pub fn jobs(&self, jobs: Option<&crate::jobs::Jobs>) {
        self.jobs_known.set(i64::from(jobs.is_some()));
        self.job_containers.set(jobs.map_or(0, |j| j.containers as i64));
    }

    /// Updates the gauges from the latest checks and counts drift from their transitions.
    pub fn observe(&self, checks: &CheckSet, transitions: &[Transition]) {
        for c in checks.checks() {
            let labels = CheckLabels { check: c.name.to_string(), required: c.required.to_string() };
            self.check_ok.get_or_create(&labels).set(i64::from(c.ok));
        }
        self.ready.set(i64::from(checks.ready()));
        for t in transitions.iter().filter(|t| !t.ok) {
            self.drift.get_or_create(&DriftLabels { check: t.name.to_string() }).inc();
        }
    }

    pub fn first_ready(&self, seconds: f64) {
        self.time_to_ready.set(seconds);
    }

    pub fn repaired(&self, step: &str, success: bool) {
        let outcome = if success { "success" } else { "failure" };
        self.repairs.get_or_create(&RepairLabels { step: step.into(), outcome: outcome.into() }).inc();
    }

    pub fn image_gc_freed(&self, bytes: u64) {
        self.gc_freed.inc_by(bytes);
    }

    /// Counts a canary round and records its stages' times.
    pub fn canary_round(&self, report: &crate::canary::round::Report) {
        let outcome = if report.failure.is_none() { "pass" } else { "fail" };
        self.canary_rounds.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
        if let Some((stage, _)) = &report.failure {
            self.canary_failures.get_or_create(&StageLabels { stage: stage.name().into() }).inc();
        }
        for (stage, took) in &report.stages {
            self.canary_stage_seconds
                .get_or_create(&StageLabels { stage: stage.name().into() })
                .set(took.as_secs_f64());
        }
        self.canary_round_seconds.observe(report.total.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::{Observation, CHECK_NAMES};
    use std::time::SystemTime;

    #[test]
    fn exposes_checks_readiness_repairs_and_drift() {
        let m = Metrics::new();
        let mut set = CheckSet::pending(SystemTime::UNIX_EPOCH);
        let t = set.record(
            CHECK_NAMES.iter().map(|&n| Observation::pass(n, "ok")).collect(),
            SystemTime::UNIX_EPOCH,
        );
        m.observe(&set, &t);
        m.first_ready(0.75);
        let t = set.record(vec![Observation::fail("podman-api", "refused")], SystemTime::UNIX_EPOCH);
        m.observe(&set, &t);
        m.repaired("podman-socket", true);
        m.image_gc_freed(1024);
        m.canary_round(&crate::canary::round::Report {
            stages: vec![(crate::canary::Stage::Network, std::time::Duration::from_millis(250))],
            total: std::time::Duration::from_millis(700),
            failure: Some((crate::canary::Stage::Dns, "no answer".into())),
            leftovers_removed: 0,
            imported: false,
        });
        let text = m.render();
        for line in [
            "executor_agent_check_ok{check=\"podman-api\",required=\"true\"} 0",
            "executor_agent_check_ok{check=\"linger\",required=\"true\"} 1",
            "executor_agent_ready 0",
            "executor_agent_time_to_ready_seconds 0.75",
            "executor_agent_repairs_total{step=\"podman-socket\",outcome=\"success\"} 1",
            "executor_agent_drift_events_total{check=\"podman-api\"} 1",
            "executor_agent_image_gc_freed_bytes_total 1024",
            "executor_agent_canary_rounds_total{outcome=\"fail\"} 1",
            "executor_agent_canary_failures_total{stage=\"dns\"} 1",
            "executor_agent_canary_stage_duration_seconds{stage=\"network\"} 0.25",
            "executor_agent_canary_round_duration_seconds_count 1",
            "executor_agent_build_info{version=\"",
            "executor_agent_job_containers 0",
            "executor_agent_jobs_known 0",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let jobs = crate::jobs::Jobs { containers: 3, gitlab_jobs: vec![42], unlabelled: 1 };
        m.jobs(Some(&jobs));
        let text = m.render();
        assert!(
            text.contains("executor_agent_job_containers 3") && text.contains("executor_agent_jobs_known 1")
        );
    }

    #[test]
    fn every_metric_is_in_the_operators_table() {
        let docs = include_str!("../../docs/metrics.md");
        let text = Metrics::new().render();
        for name in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()) {
            assert!(docs.contains(&format!("`{name}")), "{name} is not in docs/metrics.md");
        }
    }
}
