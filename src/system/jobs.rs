//! Runner jobs on the node: the runner user's running containers that are not the agent's own
//! (every object of the canary carries its label). GitLab Runner labels each container of a
//! job with the job's ID; containers a job starts through the socket itself (Testcontainers,
//! `docker run` in a script) carry no such label and count as well. What a container says
//! of itself is the runner user's text: only numeric job IDs are taken, and only so many.

use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeSet;

use crate::podman_api::objects::ContainerSummary;
use crate::podman_api::Client;

/// The label GitLab Runner's docker executor puts on every container of a job.
pub const GITLAB_JOB_ID: &str = "com.gitlab.gitlab-runner.job.id";
/// Most job IDs listed; the count stays exact.
const MAX_LISTED: usize = 20;

/// What runs on the node besides the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Jobs {
    /// Running containers that are not the agent's.
    pub containers: usize,
    /// The GitLab jobs they belong to (IDs from [`GITLAB_JOB_ID`]), lowest first, at most 20.
    pub gitlab_jobs: Vec<u64>,
    /// Containers without a GitLab job label (started by a job through the socket, or by hand).
    pub unlabelled: usize,
}

impl Jobs {
    pub fn from_containers(containers: &[ContainerSummary]) -> Jobs {
        let mut ids = BTreeSet::new();
        let mut jobs = Jobs::default();
        for c in containers {
            let labels = c.labels.as_ref();
            if labels.is_some_and(|l| l.contains_key(crate::canary::round::LABEL_KEY)) {
                continue;
            }
            jobs.containers += 1;
            match labels.and_then(|l| l.get(GITLAB_JOB_ID)).and_then(|id| id.parse::<u64>().ok()) {
                Some(id) => {
                    ids.insert(id);
                }
                None => jobs.unlabelled += 1,
            }
        }
        jobs.gitlab_jobs = ids.into_iter().take(MAX_LISTED).collect();
        jobs
    }

    pub fn any(&self) -> bool {
        self.containers > 0
    }

    /// "no job runs", "GitLab jobs 41, 42 (3 containers)", "2 containers without a job label".
    pub fn describe(&self) -> String {
        if !self.any() {
            return "no job runs".into();
        }
        let containers = match self.containers {
            1 => "1 container".to_string(),
            n => format!("{n} containers"),
        };
        if self.gitlab_jobs.is_empty() {
            return format!("{containers} without a job label");
        }
        let ids: Vec<String> = self.gitlab_jobs.iter().map(u64::to_string).collect();
        let noun = if ids.len() == 1 { "GitLab job" } else { "GitLab jobs" };
        format!("{noun} {} ({containers})", ids.join(", "))
    }
}

/// The jobs running now.
pub async fn running(api: &Client) -> Result<Jobs> {
    Ok(Jobs::from_containers(&api.list_running_containers().await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn container(labels: &[(&str, &str)]) -> ContainerSummary {
        ContainerSummary {
            id: "c".into(),
            image_id: String::new(),
            image: String::new(),
            created: 0,
            labels: Some(
                labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            ),
        }
    }

    #[test]
    fn the_canary_is_no_job_and_job_ids_are_read_from_the_runners_label() {
        let canary = container(&[(crate::canary::round::LABEL_KEY, "123-456")]);
        assert_eq!(Jobs::from_containers(std::slice::from_ref(&canary)), Jobs::default());
        assert_eq!(Jobs::from_containers(std::slice::from_ref(&canary)).describe(), "no job runs");

        let build = container(&[(GITLAB_JOB_ID, "42"), ("com.gitlab.gitlab-runner.type", "build")]);
        let service = container(&[(GITLAB_JOB_ID, "42")]);
        let other = container(&[(GITLAB_JOB_ID, "7")]);
        let testcontainer = container(&[("org.testcontainers", "true")]);
        let bare = ContainerSummary { labels: None, ..testcontainer.clone() };
        let jobs = Jobs::from_containers(&[canary, build, service, other, testcontainer, bare]);
        assert_eq!(jobs, Jobs { containers: 5, gitlab_jobs: vec![7, 42], unlabelled: 2 });
        assert_eq!(jobs.describe(), "GitLab jobs 7, 42 (5 containers)");
        assert!(jobs.any());
    }

    #[test]
    fn a_containers_own_text_is_never_taken_as_a_job_id() {
        let forged = container(&[(GITLAB_JOB_ID, "42\n\u{1b}[2Jready")]);
        let jobs = Jobs::from_containers(&[forged]);
        assert_eq!(jobs, Jobs { containers: 1, gitlab_jobs: vec![], unlabelled: 1 });
        assert_eq!(jobs.describe(), "1 container without a job label");
        let many: Vec<_> = (0..100).map(|i| container(&[(GITLAB_JOB_ID, &i.to_string())])).collect();
        let jobs = Jobs::from_containers(&many);
        assert_eq!((jobs.containers, jobs.gitlab_jobs.len()), (100, 20));
    }
}
