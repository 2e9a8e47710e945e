//! Drain step: the `drain` check, failing while an operator has the node drained
//! (src/system/drain.rs keeps the record).

use anyhow::Result;

use super::{CheckSpec, Context, Inspection, Spec};
use crate::checks::Observation;
use crate::drain::current;

pub const CHECK: &str = "drain";

/// Reports only: an operator's drain is undone by `undrain`, never by a repair.
pub const SPEC: Spec = Spec {
    name: "drain",
    checks: &[CheckSpec::required(CHECK)],
    needs_live_system: true,
    after: &[],
    requires: &[],
    repairs: super::never,
};

/// Never called (`SPEC.repairs` is `never`): a drain is lifted by `undrain`.
pub async fn converge(_cx: &Context) -> Result<Vec<String>> {
    Ok(Vec::new())
}

pub async fn inspect(cx: &Context) -> Inspection {
    let observation = match current(&cx.root) {
        Ok(None) => Observation::pass(CHECK, "not drained"),
        Ok(Some(d)) => {
            Observation::fail(CHECK, format!("drained since {} by {}: {}", d.since, d.by, d.reason))
        }
        Err(e) => Observation::fail(CHECK, crate::journal::detail(&e)),
    };
    Inspection { observations: vec![observation], plan: Vec::new() }
}
