//! Breaker policies, as `SetPolicy` requests (prost bytes) and as the config's and the fleet's
//! `[service.breaker]` tables (JSON of `BreakerConfig`, what a fleet policy record holds).
//!
//! A policy that passes the checks: reads back the same through the request the CLI would
//! send, becomes an API message, and runs the kernel's state machine (agent-common's `Counts`,
//! the code the programs run) for a few connects and outcomes without overflow.
#![no_main]

use breakwater::{
    api::convert::policy_message,
    config::BreakerConfig,
    core::policy::{PolicySpec, Rules},
};
use breakwater_common::breaker::{Admission, Counts};
use breakwater_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

/// The monotonic clock of a node up for at most ~146 years.
const MAX_NOW: u64 = 1 << 62;

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    if form & 1 == 0 {
        let Ok(req) = pb::SetPolicyRequest::decode(rest) else {
            return;
        };
        let spec = PolicySpec::from_request(&req);
        let (Ok(rules), quorum) = (spec.rules(), spec.quorum()) else {
            return;
        };
        let again = PolicySpec::from_request(&spec.to_request(&req.service));
        assert_eq!(again.rules().ok(), Some(rules), "{req:?}");
        let _ = policy_message(&rules, quorum.ok().flatten().as_ref());
        run(&rules, rest);
    } else {
        let Ok(config) = serde_json::from_slice::<BreakerConfig>(rest) else {
            return;
        };
        let Ok(rules) = config.policy() else {
            return;
        };
        // What the fleet CLI writes and the agents read back.
        let json = serde_json::to_vec(&config).expect("serializes");
        let back: BreakerConfig = serde_json::from_slice(&json).expect("reads back");
        assert_eq!(back.policy().ok(), Some(rules));
        let spec = config.spec().expect("resolved above");
        let _ = policy_message(&rules, spec.quorum().ok().flatten().as_ref());
        run(&rules, rest);
    }
});

/// Connects and outcomes driven by the input's bytes, at times from the input.
fn run(rules: &Rules, bytes: &[u8]) {
    let p = &rules.policy;
    let mut counts = Counts::default();
    let mut now: u64 = 1_000_000_000;
    let mut admitted = Vec::new();
    for &b in bytes.iter().take(64) {
        now = now.saturating_add(u64::from(b) << (b % 48)).min(MAX_NOW);
        match b % 4 {
            0 | 1 => {
                if let (Admission::Admit { generation, .. }, _) = counts.on_connect(p, now) {
                    admitted.push(generation);
                }
            }
            _ => {
                if let Some(generation) = admitted.pop() {
                    counts.on_outcome(p, generation, b % 3 == 0, b % 5 == 0, now);
                }
            }
        }
        let _ = counts.effective(p, now);
        let _ = counts.open_remaining_ms(now);
    }
}
