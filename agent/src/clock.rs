//! The kernel's clock, as the agent reads it.

use std::time::{Duration, SystemTime};

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, which the programs' timestamps and
/// the breakers' deadlines use.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The wall-clock time of a CLOCK_MONOTONIC instant, `now_ns` being CLOCK_MONOTONIC now.
pub fn wall_time(mono_ns: u64, now_ns: u64) -> SystemTime {
    let ago = now_ns.saturating_sub(mono_ns);
    SystemTime::now() - Duration::from_nanos(ago)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_instants_map_to_wall_time() {
        let now = monotonic_ns();
        assert!(monotonic_ns() >= now);
        let then = wall_time(now.saturating_sub(2_000_000_000), monotonic_ns());
        let ago = SystemTime::now().duration_since(then).unwrap();
        assert!(
            ago >= Duration::from_secs(2) && ago < Duration::from_secs(3),
            "{ago:?}"
        );
    }
}
