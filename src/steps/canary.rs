//! Canary step: the `canary` check from the job canary (src/canary/). In the daemon it reads
//! the runner's latest round and never waits for one; in `check` and `apply` it runs a round.

use anyhow::Result;

use super::{CheckSpec, Context, Inspection, Spec, Step};
use crate::canary::Handle;
use crate::podman_api::Client;

fn api(cx: &Context) -> Client {
    Client::new(super::podman_socket::socket_path(cx), cx.settings.canary.timeout)
        .with_expected_peer(cx.user.uid)
}

pub const SPEC: Spec = Spec {
    name: "canary",
    checks: &[CheckSpec::required(crate::canary::CHECK)],
    needs_live_system: true,
    // A round proves everything below the API: after whatever can change it.
    after: &[Step::PodmanSocket, Step::PodmanConfig, Step::IdMapping, Step::Storage],
    requires: &[Step::Linger, Step::PodmanSocket],
    // Re-running the round is its "repair" in `apply`; the daemon's runner schedules its own.
    repairs: |cx| matches!(*cx.canary, Handle::Direct(_)),
};

pub async fn inspect(cx: &Context) -> Inspection {
    let observation = match &*cx.canary {
        Handle::Daemon(runner) => runner.observation(),
        Handle::Direct(direct) => direct.inspect(&api(cx), &cx.settings.canary).await,
    };
    Inspection { observations: vec![observation], plan: Vec::new() }
}

/// Runs the round again once the steps it needs were repaired (`apply`); the daemon's
/// runner decides its own rounds.
pub async fn converge(cx: &Context) -> Result<Vec<String>> {
    if let Handle::Direct(direct) = &*cx.canary {
        direct.rerun(&api(cx), &cx.settings.canary).await;
    }
    Ok(Vec::new())
}
