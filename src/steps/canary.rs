//! Canary step: the `canary` check from the job canary (src/canary/). In the daemon it reads
//! the runner's latest round and never waits for one; in `check` and `apply` it runs a round.

use anyhow::Result;

use super::{Context, Inspection};
use crate::canary::Handle;
use crate::podman_api::Client;

fn api(cx: &Context) -> Client {
    Client::new(super::podman_socket::socket_path(cx), cx.settings.canary.timeout)
        .with_expected_peer(cx.user.uid)
}

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
